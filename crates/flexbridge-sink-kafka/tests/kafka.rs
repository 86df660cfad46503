//! The `kafka` sink: error classification through librdkafka's mock cluster (faults a real
//! broker cannot give on demand), and round-trips against the real Kafka-protocol broker
//! that scripts/kafka.sh starts (FLEXBRIDGE_KAFKA_BROKERS). A missing broker fails these
//! tests; they never skip.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use flexbridge_core::{ContentMode, EventKind, Limits, Sink, SinkConfig, SinkContext};
use flexbridge_sink_kafka::{KafkaSink, KafkaSinkConfig, Properties};
use flexbridge_testkit::{
    assert_publishes_pipelined, cut_under_load_and_recover, event, every_kind, unique,
    ProxiedBroker,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

async fn connect(config: &KafkaSinkConfig) -> KafkaSink {
    let context = SinkContext::standalone(&config.name).unwrap();
    config.open(&Limits::default(), &context).await.unwrap()
}

fn config(brokers: String, topic: String) -> KafkaSinkConfig {
    KafkaSinkConfig {
        name: "kafka".to_owned(),
        brokers,
        topic,
        key: None,
        content_mode: ContentMode::Binary,
        message_timeout: Duration::from_secs(5),
        linger: Duration::from_millis(2),
        properties: Properties::default(),
    }
}

#[tokio::test]
async fn an_injected_permanent_error_is_permanent() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("fb-mock", 1, 1).unwrap();
    let sink = connect(&config(mock.bootstrap_servers(), "fb-mock".into())).await;
    sink.publish(&event(EventKind::ChannelCreated, 1))
        .await
        .unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let err = sink
        .publish(&event(EventKind::ChannelCreated, 2))
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert_eq!(err.reason(), "not_authorized");
}

#[tokio::test]
async fn an_injected_retryable_error_is_retryable() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("fb-mock", 1, 1).unwrap();
    let mut c = config(mock.bootstrap_servers(), "fb-mock".into());
    c.message_timeout = Duration::from_secs(1);
    let sink = connect(&c).await;
    // Set-up: the first publish also connects and initialises the idempotent producer, which
    // can take longer than the short 1 s timeout this test needs on a loaded machine.
    let started = std::time::Instant::now();
    while sink
        .publish(&event(EventKind::ChannelCreated, 1))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the producer never became ready"
        );
    }
    // A leader that keeps moving: librdkafka retries until the message times out.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 500],
    );
    let err = sink
        .publish(&event(EventKind::ChannelCreated, 2))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    sink.publish(&event(EventKind::ChannelCreated, 3))
        .await
        .unwrap();
}

fn brokers() -> String {
    std::env::var("FLEXBRIDGE_KAFKA_BROKERS")
        .expect("FLEXBRIDGE_KAFKA_BROKERS is not set: scripts/test.sh starts a Kafka-protocol broker (scripts/kafka.sh) and sets it")
}

async fn create_topics(names: &[String]) {
    create_topics_on(&brokers(), names).await;
}

async fn create_topics_on(brokers: &str, names: &[String]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, 3, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .unwrap();
    for r in results {
        r.unwrap();
    }
}

/// Every record of `topics`, as (topic, partition, key, value, headers).
type Record = (String, i32, String, Vec<u8>, HashMap<String, String>);

/// A consumer of its own group, from the earliest offset, subscribed to `topics`.
fn consumer(brokers: &str, topics: &[&str]) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("fbtest-group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(topics).unwrap();
    consumer
}

fn read_all(topics: &[String], expected: usize) -> Vec<Record> {
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let consumer = consumer(&brokers(), &names);
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    while out.len() < expected && started.elapsed() < Duration::from_secs(30) {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let m = message.unwrap();
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8(h.value.unwrap_or_default().to_vec()).unwrap(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push((
                m.topic().to_owned(),
                m.partition(),
                String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap(),
                m.payload().unwrap_or_default().to_vec(),
                headers,
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_round_trips_with_headers_key_and_topic() {
    let prefix = unique("fbtest.");
    let topics: Vec<String> = EventKind::ALL
        .iter()
        .map(|k| format!("{prefix}.{}", k.short_name()))
        .collect();
    create_topics(&topics).await;
    let sink = connect(&config(brokers(), format!("{prefix}.{{event}}"))).await;
    sink.health().await.unwrap();
    let events = every_kind();
    for e in &events {
        sink.publish(e).await.unwrap();
    }
    let records = read_all(&topics, events.len());
    assert_eq!(records.len(), events.len());
    for e in &events {
        let (topic, _, key, value, headers) = records
            .iter()
            .find(|r| r.4.get("ce_id").map(String::as_str) == Some(e.id()))
            .unwrap();
        assert_eq!(topic, &format!("{prefix}.{}", e.kind().short_name()));
        assert_eq!(key, e.partition_key());
        assert_eq!(value.as_slice(), &e.data_json()[..]);
        for (name, v) in e.attributes() {
            assert_eq!(
                headers.get(&format!("ce_{name}")).map(String::as_str),
                Some(v),
                "ce_{name}"
            );
        }
        assert_eq!(
            headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_round_trips_as_a_cloudevent() {
    let topic = unique("fbtest-structured.");
    create_topics(std::slice::from_ref(&topic)).await;
    let mut c = config(brokers(), topic.clone());
    c.content_mode = ContentMode::Structured;
    let sink = connect(&c).await;
    let e = event(EventKind::ParticipantJoined, 1);
    sink.publish(&e).await.unwrap();
    let records = read_all(std::slice::from_ref(&topic), 1);
    let (_, _, key, value, headers) = &records[0];
    assert_eq!(key, e.partition_key());
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/cloudevents+json; charset=UTF-8")
    );
    let envelope: serde_json::Value = serde_json::from_slice(value).unwrap();
    assert_eq!(envelope["id"], e.id());
    assert_eq!(envelope["specversion"], "1.0");
    assert_eq!(envelope["data"]["participant_type"], "agent");
}

/// Managed clusters often require compression: every codec this build has round-trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_codec_round_trips() {
    for codec in ["zstd", "lz4", "snappy", "gzip"] {
        let topic = unique(&format!("fbtest-{codec}."));
        create_topics(std::slice::from_ref(&topic)).await;
        let mut c = config(brokers(), topic.clone());
        c.properties = Properties(
            [("compression.type".to_owned(), codec.to_owned())]
                .into_iter()
                .collect(),
        );
        let sink = connect(&c).await;
        let e = event(EventKind::ChannelStatusUpdated, 7);
        sink.publish(&e).await.unwrap();
        let records = read_all(std::slice::from_ref(&topic), 1);
        assert_eq!(records.len(), 1, "{codec}");
        assert_eq!(records[0].3.as_slice(), &e.data_json()[..], "{codec}");
    }
}

/// A TLS listener (`openssl s_server` with a certificate from a fresh test CA) stands in for a
/// managed broker: with `security.protocol = SSL` and the CA configured, the handshake
/// succeeds and the Kafka request arrives decrypted (it carries the client id); with another
/// CA the handshake fails and nothing arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_broker_verifies_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = flexbridge_testkit::test_pki(dir.path(), "server");
    let other = flexbridge_testkit::test_pki(dir.path(), "other");
    for (ca, expect_request) in [(&pki.ca, true), (&other.ca, false)] {
        let port = flexbridge_testkit::free_port();
        let mut server = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-accept"])
            .arg(port.to_string())
            .arg("-cert")
            .arg(&pki.cert)
            .arg("-key")
            .arg(&pki.key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let output = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut stdout = server.stdout.take().unwrap();
        let collected = Arc::clone(&output);
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                collected.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        flexbridge_testkit::wait_for_port(port);
        let mut c = config(format!("localhost:{port}"), "fbtest-tls".into());
        c.name = "tls-probe".into();
        c.properties = Properties(
            [
                ("security.protocol", "SSL"),
                ("ssl.ca.location", ca.to_str().unwrap()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        );
        let sink = connect(&c).await;
        // The health check's metadata request makes librdkafka connect.
        let _ = sink.health().await;
        let arrived = || {
            let bytes = output.lock().unwrap().clone();
            String::from_utf8_lossy(&bytes).contains("flexbridge-tls-probe")
        };
        let started = std::time::Instant::now();
        while !arrived() && started.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            arrived(),
            expect_request,
            "CA {}: request arrived = {}",
            ca.display(),
            arrived()
        );
        drop(sink);
        let _ = server.kill();
        let _ = server.wait();
    }
}

/// With the default kind of template (only `{event}`), the health check asks for every topic:
/// a missing one shows as unhealthy before any event fails, and healthy once created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_missing_topic_until_it_exists() {
    let prefix = unique("fbtest-health.");
    let sink = connect(&config(brokers(), format!("{prefix}.{{event}}"))).await;
    let err = sink.health().await.unwrap_err();
    assert_eq!(err.reason(), "unknown_topic", "{err}");
    assert!(err.to_string().contains(&prefix), "{err}");
    let topics: Vec<String> = EventKind::ALL
        .iter()
        .map(|k| format!("{prefix}.{}", k.short_name()))
        .collect();
    create_topics(&topics).await;
    let started = std::time::Instant::now();
    while let Err(e) = sink.health().await {
        assert!(started.elapsed() < Duration::from_secs(10), "{e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_topic_is_a_permanent_error() {
    let mut c = config(brokers(), unique("fbtest-missing."));
    c.message_timeout = Duration::from_secs(3);
    let sink = connect(&c).await;
    let err = sink
        .publish(&event(EventKind::ChannelCreated, 1))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "unknown_topic", "{err}");
    assert!(!err.is_retryable());
}

/// The shared broker contract, as NATS and RabbitMQ run it: publishes are pipelined under
/// 200 ms of broker latency, and a connection cut under load fails retryably, shows in health,
/// recovers by itself, and every confirmed record is in Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_broker_contract_holds_through_a_proxy() {
    let broker = ProxiedBroker::start().await;
    let topic = unique("fbtest-contract.");
    create_topics_on(&broker.brokers(), std::slice::from_ref(&topic)).await;
    let mut c = config(broker.brokers(), topic.clone());
    // After a cut, librdkafka bumps the idempotent producer's epoch; until the broker fences
    // the old one and the sink replaces it, records wait (seen: up to about 3 s). The timeout
    // leaves room for that and the resend.
    c.message_timeout = Duration::from_secs(8);
    let sink = Arc::new(connect(&c).await);
    // The first publish initialises the idempotent producer outside the timed scenario.
    sink.publish(&event(EventKind::ChannelCreated, 0))
        .await
        .unwrap();
    assert_publishes_pipelined(sink.clone(), &broker.proxy).await;
    let (confirmed, _) = cut_under_load_and_recover(sink.clone(), &broker.proxy).await;
    let brokers = broker.brokers();
    let wanted = confirmed.clone();
    let missing = tokio::task::spawn_blocking(move || missing_ids(&brokers, &topic, wanted))
        .await
        .unwrap();
    assert!(
        missing.is_empty(),
        "{} confirmed records are not in Kafka: {missing:?}",
        missing.len()
    );
}

/// A link that goes silent (bytes dropped, no FIN) shows in health within the metadata
/// request's timeout (Kafka has no heartbeat of its own on a producer connection) and
/// recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_link_shows_in_health_and_recovers() {
    let broker = ProxiedBroker::start().await;
    let topic = unique("fbtest-silent.");
    create_topics_on(&broker.brokers(), std::slice::from_ref(&topic)).await;
    let sink = Arc::new(connect(&config(broker.brokers(), topic)).await);
    let started = std::time::Instant::now();
    while sink.health().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    flexbridge_testkit::silent_link_is_noticed_and_recovered(
        sink,
        &broker.proxy,
        Duration::from_secs(2),
    )
    .await;
}

/// The ids of `wanted` not found in `topic` within 30 s (duplicates and records whose publish
/// failed may be there too: at least once).
fn missing_ids(
    brokers: &str,
    topic: &str,
    mut wanted: std::collections::HashSet<String>,
) -> std::collections::HashSet<String> {
    let consumer = consumer(brokers, &[topic]);
    let started = std::time::Instant::now();
    while !wanted.is_empty() && started.elapsed() < Duration::from_secs(30) {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let m = message.unwrap();
            let id = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "ce_id")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            if let Some(id) = id {
                wanted.remove(&id);
            }
        }
    }
    wanted
}
