//! The `nats` sink end to end: the real binary, signed webhooks and `flexbridge simulate`, read
//! back from the real JetStream stream.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use flexbridge_e2e::*;
use std::collections::HashSet;
use std::time::Duration;

const TOKEN: &str = "nats-e2e-token";
const PATH: &str = "/flex/interactions";

fn daemon_with_stream(stream: &str, prefix: &str) -> Daemon {
    Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n\n[[sinks]]\nname = \"jetstream\"\ntype = \"nats\"\nurl = \"{}\"\nsubject = \"{prefix}.{{account}}.{{event}}\"\n[sinks.stream]\nname = \"{stream}\"\nstorage = \"memory\"\nduplicate_window = \"5m\"\n",
        nats_url()
    ))
}

#[test]
fn simulated_traffic_every_200_has_its_message_in_the_stream() {
    let (stream, prefix) = (unique("FBE2E"), unique("fbe2e"));
    let daemon = daemon_with_stream(&stream, &prefix);
    wait_ready(&daemon);
    let summary = simulate(&daemon, PATH, TOKEN, 300, &["--concurrency", "16"]);
    assert_eq!(summary["status"]["200"], 300, "{summary}");
    drop(daemon);
    let messages = drain_stream(&stream);
    let ids: HashSet<&str> = messages.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(messages.len(), 300);
    assert_eq!(ids.len(), 300);
    assert!(messages
        .iter()
        .all(|(_, subject)| subject.starts_with(&format!("{prefix}.AC"))));
}

#[test]
fn the_same_signed_webhook_twice_gives_two_200s_and_one_message() {
    let (stream, prefix) = (unique("FBDUP"), unique("fbdup"));
    let daemon = daemon_with_stream(&stream, &prefix);
    wait_ready(&daemon);
    let webhook = status_updated("KD00000000000000000000000000000020", "closed");
    for _ in 0..2 {
        let response = signed_form(&daemon, PATH, TOKEN, &webhook)
            .header("I-Twilio-Idempotency-Token", "same-delivery")
            .send(daemon.ingress);
        assert_eq!(response.status, 200, "{}", response.text());
    }
    assert_eq!(
        daemon.metric("flexbridge_sink_duplicates_total{sink=\"jetstream\"}"),
        1.0
    );
    drop(daemon);
    assert_eq!(drain_stream(&stream).len(), 1);
}

#[test]
fn no_stream_for_the_subject_gives_503_a_clear_log_and_not_ready() {
    let daemon = Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n\n[[sinks]]\nname = \"jetstream\"\ntype = \"nats\"\nurl = \"{}\"\nsubject = \"{}.{{event}}\"\n",
        nats_url(),
        unique("fbnone")
    ));
    // The sink connects in the background: once connected, its health check finds the
    // subject has no stream.
    let started = std::time::Instant::now();
    while !get(daemon.admin, "/readyz")
        .text()
        .contains("no JetStream stream")
    {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{}",
            get(daemon.admin, "/readyz").text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let response = signed_form(
        &daemon,
        PATH,
        TOKEN,
        &status_updated("KD00000000000000000000000000000021", "active"),
    )
    .send(daemon.ingress);
    assert_eq!(response.status, 503, "{}", response.text());
    let line = daemon.wait_for_log("about the missing stream", |l| {
        l["reason"] == "sink_unavailable"
    });
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains("no JetStream stream captures"),
        "{line}"
    );
    let ready = get(daemon.admin, "/readyz");
    assert_eq!(ready.status, 503);
    let body = ready.json();
    assert!(
        body["sinks"][0]["error"]
            .as_str()
            .unwrap()
            .contains("no JetStream stream captures subject"),
        "{body}"
    );
}

/// Confirm mode rides out a broker blip: every connection to NATS is cut for 2 s under steady
/// traffic; publishes are retried until `delivery.ack_timeout`, so no webhook gets a 503 and
/// every acknowledged event is in the stream.
#[test]
fn a_two_second_cut_in_confirm_mode_costs_no_503() {
    let (stream, prefix) = (unique("FBE2ECUT"), unique("fbe2ecut"));
    let proxy = Proxy::start(authority(&nats_url()));
    let daemon = Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nack_timeout = \"10s\"\n\n[[sinks]]\nname = \"jetstream\"\ntype = \"nats\"\nurl = \"nats://{}\"\nsubject = \"{prefix}.{{account}}.{{event}}\"\n[sinks.stream]\nname = \"{stream}\"\nstorage = \"memory\"\nduplicate_window = \"5m\"\n",
        proxy.addr()
    ));
    wait_ready(&daemon);
    let sent = confirm_through_a_short_cut(&daemon, PATH, TOKEN, &proxy);
    drop(daemon);
    let messages = drain_stream(&stream);
    let ids: HashSet<&str> = messages.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids.len() as u64,
        sent,
        "every acknowledged event is in the stream"
    );
}

/// Without `I-Twilio-Idempotency-Token`, two deliveries with identical parameters are two
/// events: two 200s, two distinct ids, two messages (JetStream's duplicate window on the id
/// must never swallow a distinct event while flexbridge answers 200).
#[test]
fn identical_deliveries_without_a_token_are_two_messages() {
    let (stream, prefix) = (unique("FBE2ENOTOKEN"), unique("fbe2enotoken"));
    let daemon = daemon_with_stream(&stream, &prefix);
    wait_ready(&daemon);
    let params = status_updated("KD000000000000000000000000000000e1", "closed");
    let first = signed_form(&daemon, PATH, TOKEN, &params).send(daemon.ingress);
    let second = signed_form(&daemon, PATH, TOKEN, &params).send(daemon.ingress);
    assert_eq!((first.status, second.status), (200, 200));
    assert_ne!(first.json()["id"], second.json()["id"]);
    drop(daemon);
    assert_eq!(drain_stream(&stream).len(), 2);
}

/// A nats-server of the test's own with JetStream on disk, restartable on the same port and
/// store (the shared server cannot be restarted under the other tests).
struct OwnServer {
    child: Option<std::process::Child>,
    port: u16,
    store: tempfile::TempDir,
}

impl OwnServer {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            child: None,
            port,
            store: tempfile::tempdir().unwrap(),
        };
        server.up();
        server
    }

    fn up(&mut self) {
        let child = std::process::Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server must be installed (scripts/services.sh installs it)");
        self.child = Some(child);
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A clean stop, as a rolling restart does it.
    fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A real broker restart under steady traffic in spool mode: the server stops (JetStream
/// goes away: connection refused, then "no responders" while it recovers its stream from
/// disk) and comes back; every webhook gets 200 and every event is in the stream afterwards.
#[test]
fn a_real_nats_restart_under_traffic_loses_nothing_in_spool_mode() {
    real_nats_restart("spool");
}

/// The same restart in confirm mode: 3 s without the server is within `ack_timeout`, so the
/// retries ride it out: no 503.
#[test]
fn a_real_nats_restart_under_traffic_costs_no_503_in_confirm_mode() {
    real_nats_restart("confirm");
}

fn real_nats_restart(mode: &str) {
    let mut server = OwnServer::start();
    let url = format!("nats://127.0.0.1:{}", server.port);
    let spool = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nmode = \"{mode}\"\n[spool]\ndir = \"{}\"\n\n[[sinks]]\nname = \"jetstream\"\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"restart.{{account}}.{{event}}\"\n[sinks.stream]\nname = \"RESTART\"\nstorage = \"file\"\nduplicate_window = \"5m\"\n",
        spool.path().display()
    ));
    wait_ready(&d);
    let sent = traffic_through_restart(&d, PATH, TOKEN, |up| {
        if up {
            server.up()
        } else {
            server.down()
        }
    });
    wait_delivered(&d, "jetstream", std::time::Duration::from_secs(60));
    drop(d);
    let ids: std::collections::HashSet<String> = runtime().block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("RESTART").await.unwrap();
        let count = stream.info().await.unwrap().state.messages;
        let mut ids = std::collections::HashSet::new();
        for seq in 1..=count {
            let m = stream.get_raw_message(seq).await.unwrap();
            ids.insert(m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned());
        }
        ids
    });
    assert_eq!(
        ids.len() as u64,
        sent,
        "every acknowledged event is in the stream"
    );
}
