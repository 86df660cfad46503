//! The `kafka` sink end to end against the real Kafka-protocol broker that scripts/kafka.sh
//! starts (FLEXBRIDGE_KAFKA_BROKERS): `flexbridge simulate` traffic read back in order, and a
//! broker that is down at start and comes back.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use flexbridge_e2e::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const TOKEN: &str = "kafka-e2e-token";
const PATH: &str = "/flex/interactions";
const KINDS: [&str; 8] = [
    "interaction.created",
    "channel.created",
    "channel.create_failed",
    "channel.status_updated",
    "participant.joined",
    "participant.left",
    "participant.updated",
    "unknown",
];

fn brokers() -> String {
    std::env::var("FLEXBRIDGE_KAFKA_BROKERS")
        .expect("FLEXBRIDGE_KAFKA_BROKERS is not set: scripts/test.sh starts a Kafka-protocol broker (scripts/kafka.sh) and sets it")
}

fn topics_for(prefix: &str) -> Vec<String> {
    KINDS.iter().map(|k| format!("{prefix}.{k}")).collect()
}

fn create_topics(brokers: &str, topics: &[String]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| NewTopic::new(t, 3, TopicReplication::Fixed(1)))
            .collect();
        for result in admin
            .create_topics(&new, &AdminOptions::new())
            .await
            .unwrap()
        {
            result.unwrap();
        }
    });
}

/// (ce_type, interaction key, channel_status) of every record, per partition in offset order.
/// A consumer of its own group, from the earliest offset, subscribed to `topics`.
fn consumer(brokers: &str, topics: &[&str]) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("fbe2e-group"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(topics).unwrap();
    consumer
}

fn read(brokers: &str, topics: &[String], expected: usize) -> Vec<(String, String, String)> {
    let consumer = consumer(
        brokers,
        &topics.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut out = Vec::new();
    let started = Instant::now();
    // Until `expected` records arrived and nothing more came for a second (so an unexpected
    // extra record is seen too), or a minute passed.
    let mut last = Instant::now();
    while (out.len() < expected || last.elapsed() < Duration::from_secs(1))
        && started.elapsed() < Duration::from_secs(60)
    {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            last = Instant::now();
            let m = m.unwrap();
            let header = |name: &str| {
                m.headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == name)
                            .and_then(|h| h.value.map(|v| String::from_utf8(v.to_vec()).unwrap()))
                    })
                    .unwrap_or_default()
            };
            let data: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            out.push((
                header("ce_type"),
                String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
                data["channel_status"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    out
}

fn sink_config(brokers: &str, topic: &str) -> String {
    format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nack_timeout = \"4s\"\n\n[[sinks]]\nname = \"kafka\"\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\nmessage_timeout = \"3s\"\n"
    )
}

/// Every 200 has its record, and each interaction's events, sent in sequence on one
/// connection while other interactions go concurrently, are read back from their partition
/// (one topic, three partitions, keyed by interaction) in the order they were sent.
#[test]
fn simulated_traffic_every_200_has_its_record_in_order() {
    let topic = vec![unique("fbe2e.all.")];
    create_topics(&brokers(), &topic);
    let d = Daemon::start(&sink_config(&brokers(), &topic[0]));
    let summary = simulate(&d, PATH, TOKEN, 300, &["--concurrency", "16"]);
    assert_eq!(summary["status"]["200"], 300, "{summary}");
    let records = read(&brokers(), &topic, 300);
    assert_eq!(records.len(), 300);
    let rank = |(kind, _, status): &(String, String, String)| match (
        kind.rsplit("interactions.").next().unwrap(),
        status.as_str(),
    ) {
        ("interaction.created", _) => 0,
        ("channel.create_failed", _) => 1,
        ("channel.created", _) => 2,
        ("channel.status_updated", "active") => 3,
        ("participant.joined", _) => 4,
        ("participant.updated", _) => 5,
        ("participant.left", _) => 6,
        ("channel.status_updated", _) => 7,
        other => panic!("unexpected {other:?}"),
    };
    let mut last: HashMap<&str, i32> = HashMap::new();
    for r in &records {
        let previous = last.insert(r.1.as_str(), rank(r)).unwrap_or(-1);
        assert!(rank(r) >= previous, "interaction {} read out of order", r.1);
    }
    assert!(last.len() >= 30, "{} interactions", last.len());
}

/// Each event type goes to the topic its template names.
#[test]
fn the_topic_template_routes_by_event_type() {
    let prefix = unique("fbe2e.kind.");
    create_topics(&brokers(), &topics_for(&prefix));
    let d = Daemon::start(&sink_config(&brokers(), &format!("{prefix}.{{event}}")));
    let summary = simulate(&d, PATH, TOKEN, 40, &["--concurrency", "4"]);
    assert_eq!(summary["status"]["200"], 40, "{summary}");
    assert_eq!(read(&brokers(), &topics_for(&prefix), 40).len(), 40);
    // The producer queue depth is exported for operators (sampled by the health loop).
    let metrics = get(d.admin, "/metrics").text();
    assert!(
        metrics.contains("flexbridge_sink_queue_depth{sink=\"kafka\"}"),
        "{metrics}"
    );
}

/// The broker is down when the daemon starts: it starts anyway, is not ready, answers 503
/// and acknowledges nothing; when the broker comes up it becomes ready without a restart.
#[test]
fn broker_down_at_start_then_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let topic = vec![unique("fbdown.")];
    let d = Daemon::start(&sink_config(&address, &topic[0]));
    assert_eq!(get(d.admin, "/readyz").status, 503);
    let refused = signed_form(
        &d,
        PATH,
        TOKEN,
        &status_updated("KD00000000000000000000000000000040", "active"),
    )
    .send(d.ingress);
    assert_eq!(refused.status, 503, "{}", refused.text());

    let broker = std::process::Command::new("tansu")
        .args([
            "broker",
            "--listener-url",
            &format!("tcp://{address}"),
            "--advertised-listener-url",
            &format!("tcp://{address}"),
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tansu must be installed (scripts/kafka.sh installs it)");
    // Stopped however the test ends: a failed assertion must not leave a broker running.
    let _broker = KillOnDrop(broker);
    let started = Instant::now();
    while std::net::TcpStream::connect(&address).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "tansu did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    create_topics(&address, &topic);
    let started = Instant::now();
    while get(d.admin, "/readyz").status != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not ready again: {}",
            get(d.admin, "/readyz").text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The in-memory broker starts empty, so the topic appears only after the producer first
    // looked for it; until librdkafka's metadata catches up a publish may fail (503). A real
    // Kafka keeps its topics across a restart. Whatever the answers, a 503 must not be in
    // Kafka and a 200 must.
    let mut acknowledged = Vec::new();
    let mut refused_ids = vec!["KD00000000000000000000000000000040".to_owned()];
    let started = Instant::now();
    while acknowledged.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no webhook accepted after the broker came back"
        );
        let interaction = format!("KD{:032x}", 0x41 + refused_ids.len());
        let response =
            signed_form(&d, PATH, TOKEN, &status_updated(&interaction, "closed")).send(d.ingress);
        match response.status {
            200 => acknowledged.push(interaction),
            503 => refused_ids.push(interaction),
            other => panic!("unexpected {other}: {}", response.text()),
        }
    }
    let records = read(&address, &topic, 1);
    let keys: Vec<&str> = records.iter().map(|r| r.1.as_str()).collect();
    for id in &acknowledged {
        assert!(
            keys.contains(&id.as_str()),
            "acknowledged {id} is not in Kafka: {keys:?}"
        );
    }
    for id in &refused_ids {
        assert!(
            !keys.contains(&id.as_str()),
            "{id} was answered 503 but is in Kafka"
        );
    }
}

/// A child process killed and reaped when dropped, on success and on panic alike.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The distinct `ce_id`s in `topic`, read until `expected` of them arrived (or a minute).
fn ids_in(brokers: &str, topic: &str, expected: usize) -> std::collections::HashSet<String> {
    let consumer = consumer(brokers, &[topic]);
    let mut ids = std::collections::HashSet::new();
    let started = Instant::now();
    while ids.len() < expected && started.elapsed() < Duration::from_secs(60) {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            if let Some(id) = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "ce_id")
                    .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
            }) {
                ids.insert(id);
            }
        }
    }
    ids
}

/// Spool mode with Kafka: 30 s without the broker (reset or blackhole) under steady traffic:
/// every webhook gets 200, and every event is in Kafka after recovery. A tansu of its own sits
/// behind the proxy (it advertises the proxy, so no connection bypasses it).
fn spool_rides_out_a_kafka_outage(fault: Fault) {
    let proxy = Proxy::kafka();
    let topic = unique("fbe2e-spool-kafka.");
    create_topics(&proxy.addr(), std::slice::from_ref(&topic));
    let spool = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nmode = \"spool\"\n[spool]\ndir = \"{}\"\n\n[[sinks]]\nname = \"kafka\"\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{topic}\"\nmessage_timeout = \"5s\"\n",
        spool.path().display(),
        proxy.addr()
    ));
    let sent = spool_through_outage(&d, PATH, TOKEN, &proxy, "kafka", fault);
    drop(d);
    let ids = ids_in(&proxy.addr(), &topic, sent as usize);
    assert_eq!(
        ids.len() as u64,
        sent,
        "every acknowledged event is in Kafka"
    );
}

#[test]
fn spool_mode_acknowledges_everything_through_a_30s_kafka_reset() {
    spool_rides_out_a_kafka_outage(Fault::Cut);
}

#[test]
fn spool_mode_acknowledges_everything_through_a_30s_kafka_blackhole() {
    spool_rides_out_a_kafka_outage(Fault::Blackhole);
}

/// `check-config` on a managed-Kafka configuration: what this build supports passes (exit 0),
/// what it cannot honour fails there with exit 64 and the key, not later at `run`.
#[test]
fn check_config_accepts_sasl_ssl_and_refuses_what_this_build_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let run = |properties: &str| {
        let path = dir.path().join("kafka.toml");
        std::fs::write(
            &path,
            format!(
                "[[sinks]]\nname = \"kafka\"\ntype = \"kafka\"\nbrokers = \"b-1.example.com:9096\"\n[sinks.properties]\n{properties}"
            ),
        )
        .unwrap();
        let output = std::process::Command::new(binary())
            .args(["check-config", "--config"])
            .arg(&path)
            .env("TWILIO_AUTH_TOKEN", TOKEN)
            .env("KAFKA_PASSWORD", "kafka-secret-value")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!text.contains("kafka-secret-value"), "{text}");
        (output.status.code(), text)
    };
    // The README's example.
    let (code, text) = run(
        "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"flexbridge\"\n\"sasl.password\" = \"${KAFKA_PASSWORD}\"\n\"compression.type\" = \"zstd\"\n",
    );
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run(
        "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"GSSAPI\"\n\"sasl.password\" = \"${KAFKA_PASSWORD}\"\n",
    );
    assert_eq!(code, Some(64), "{text}");
    assert!(
        text.contains("sinks.kafka.properties: SASL mechanism GSSAPI is not in this build"),
        "{text}"
    );
    let (code, text) = run("\"compression.type\" = \"brotli\"\n");
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("compression.type"), "{text}");
}
