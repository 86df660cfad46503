//! The `nats` sink against the real nats-server with JetStream (127.0.0.1:4222, or
//! FLEXBRIDGE_NATS_URL). A missing server fails these tests; they never skip.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use async_nats::jetstream;
use flexbridge_core::metrics::Metrics;
use flexbridge_core::{ContentMode, Event, EventKind, Limits, Sink, SinkConfig, SinkContext};
use flexbridge_sink_nats::{NatsSink, NatsSinkConfig, NatsTls, Retention, Storage, StreamConfig};
use flexbridge_testkit::{
    assert_publishes_pipelined, cut_under_load_and_recover, event, every_kind, unique, TcpProxy,
};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn server_url() -> String {
    std::env::var("FLEXBRIDGE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn server_addr() -> SocketAddr {
    let url = server_url();
    let host_port = url
        .rsplit("://")
        .next()
        .unwrap()
        .rsplit('@')
        .next()
        .unwrap();
    host_port.parse().unwrap()
}

/// A test's own stream on `<prefix>.>`, deleted when dropped.
struct TestStream {
    js: jetstream::Context,
    name: String,
    prefix: String,
}

impl TestStream {
    async fn create(duplicate_window: Duration) -> Self {
        let client = async_nats::connect(server_url())
            .await
            .unwrap_or_else(|e| panic!("NATS is not reachable at {}: {e}", server_url()));
        let js = jetstream::new(client);
        let name = unique("FBTEST");
        let prefix = unique("fbtest");
        js.create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            storage: jetstream::stream::StorageType::Memory,
            duplicate_window,
            ..Default::default()
        })
        .await
        .unwrap();
        Self { js, name, prefix }
    }

    async fn messages(&self) -> Vec<async_nats::jetstream::message::StreamMessage> {
        let mut stream = self.js.get_stream(&self.name).await.unwrap();
        let count = stream.info().await.unwrap().state.messages;
        let mut out = Vec::new();
        for seq in 1..=count {
            out.push(stream.get_raw_message(seq).await.unwrap());
        }
        out
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let js = self.js.clone();
        let name = self.name.clone();
        // Best effort: the runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let _ = js.delete_stream(&name).await;
            });
        })
        .join();
    }
}

fn config(url: String, subject: String) -> NatsSinkConfig {
    NatsSinkConfig {
        name: "nats".to_owned(),
        url: vec![url].into(),
        subject,
        content_mode: ContentMode::Binary,
        jetstream: true,
        stream: None,
        user: None,
        password: None,
        token: None,
        nkey_seed: None,
        credentials_file: None,
        tls: NatsTls::default(),
        ack_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ping_interval: Duration::from_secs(10),
        connections: 2,
    }
}

async fn connected(config: &NatsSinkConfig) -> (NatsSink, Metrics) {
    let context = SinkContext::standalone(&config.name).unwrap();
    let sink = config.open(&Limits::default(), &context).await.unwrap();
    let metrics = context.metrics().clone();
    let started = Instant::now();
    while sink
        .health()
        .await
        .is_err_and(|e| e.reason() == "disconnected")
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "NATS is not reachable at {:?}",
            config.url
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (sink, metrics)
}

fn decode(value: &str) -> String {
    percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

#[tokio::test]
async fn every_event_type_round_trips_in_binary_and_structured_mode() {
    let stream = TestStream::create(Duration::from_secs(60)).await;
    let binary = config(
        server_url(),
        format!("{}.bin.{{account}}.{{event}}", stream.prefix),
    );
    let (sink, _) = connected(&binary).await;
    sink.health().await.unwrap();
    let events = every_kind();
    for e in &events {
        sink.publish(e).await.unwrap();
    }
    let structured = NatsSinkConfig {
        content_mode: ContentMode::Structured,
        subject: format!("{}.structured.{{event}}", stream.prefix),
        ..binary.clone()
    };
    let (structured_sink, _) = connected(&structured).await;
    let structured_events: Vec<Event> = EventKind::ALL.iter().map(|k| event(*k, 100)).collect();
    for e in &structured_events {
        structured_sink.publish(e).await.unwrap();
    }

    let messages = stream.messages().await;
    assert_eq!(messages.len(), events.len() * 2);
    for (e, m) in events.iter().zip(&messages) {
        assert_eq!(
            m.subject.as_str(),
            format!(
                "{}.bin.{}.{}",
                stream.prefix,
                e.data().account_sid(),
                e.kind().short_name()
            )
        );
        assert_eq!(&m.payload[..], &e.data_json()[..]);
        let header = |name: &str| m.headers.get(name).map(|v| decode(v.as_str()));
        for (name, value) in e.attributes() {
            assert_eq!(
                header(&format!("ce-{name}")).as_deref(),
                Some(value),
                "ce-{name}"
            );
        }
        assert_eq!(header("Nats-Msg-Id").as_deref(), Some(e.id()));
        assert_eq!(
            header("ce-datacontenttype").as_deref(),
            Some("application/json")
        );
    }
    // The error message of onChannelCreateFailed has a space, quotes, % and ñ: encoded on the
    // wire as the binding requires.
    let failed = &messages[2];
    let raw = failed.headers.get("ce-type").unwrap().as_str();
    assert_eq!(raw, "com.twilio.flex.interactions.channel.create_failed");
    for (e, m) in structured_events.iter().zip(&messages[events.len()..]) {
        assert_eq!(
            m.headers.get("Content-Type").unwrap().as_str(),
            "application/cloudevents+json; charset=UTF-8"
        );
        let envelope: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(envelope["id"], e.id());
        assert_eq!(envelope["specversion"], "1.0");
        assert_eq!(&m.payload[..], &e.envelope_json()[..]);
    }
}

/// A connection that goes silent is noticed by the ping (1 s here) and re-opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_noticed_by_the_ping_and_recovers() {
    let stream = TestStream::create(Duration::from_secs(60)).await;
    let proxy = TcpProxy::start(server_addr()).await;
    let mut c = config(
        format!("nats://{}", proxy.addr),
        format!("{}.{{event}}", stream.prefix),
    );
    c.ping_interval = Duration::from_secs(1);
    let (sink, _) = connected(&c).await;
    flexbridge_testkit::silent_link_is_noticed_and_recovered(
        Arc::new(sink),
        &proxy,
        Duration::from_secs(1),
    )
    .await;
}

/// A NATS server of the test's own with TLS required (a fresh test PKI) and JetStream in a
/// temporary directory: with `tls.ca_file` the sink connects, provisions its stream and
/// publishes; with another CA it never connects and health says so. The server is stopped
/// and its directory deleted afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_server_verifies_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = flexbridge_testkit::test_pki(dir.path(), "nats");
    let other = flexbridge_testkit::test_pki(dir.path(), "other");
    let port = flexbridge_testkit::free_port();
    let store = dir.path().join("jetstream");
    let mut server = std::process::Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&store)
        .arg("--tls")
        .arg("--tlscert")
        .arg(&pki.cert)
        .arg("--tlskey")
        .arg(&pki.key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server");
    flexbridge_testkit::wait_for_port(port);
    let mut c = config(
        format!("tls://localhost:{port}"),
        "fbtls.{event}".to_owned(),
    );
    c.tls.required = true;
    c.tls.ca_file = Some(pki.ca.clone());
    c.stream = Some(StreamConfig {
        name: "FBTLS".to_owned(),
        subjects: vec![],
        storage: Storage::Memory,
        duplicate_window: Duration::from_secs(30),
        max_age: None,
        max_messages: None,
        max_bytes: None,
        retention: Retention::Limits,
        replicas: 1,
    });
    let (sink, _) = connected(&c).await;
    sink.health().await.unwrap();
    sink.publish(&event(EventKind::ChannelCreated, 1))
        .await
        .unwrap();

    c.tls.ca_file = Some(other.ca);
    let context = SinkContext::standalone("refused").unwrap();
    let refused = c.open(&Limits::default(), &context).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let err = refused.health().await.unwrap_err();
    assert_eq!(err.reason(), "disconnected", "{err}");
    drop((sink, refused));
    let _ = server.kill();
    let _ = server.wait();
}

#[tokio::test]
async fn the_same_event_twice_is_stored_once_and_counted_as_duplicate() {
    let stream = TestStream::create(Duration::from_secs(60)).await;
    let (sink, metrics) = connected(&config(
        server_url(),
        format!("{}.{{event}}", stream.prefix),
    ))
    .await;
    let e = event(EventKind::ChannelStatusUpdated, 1);
    sink.publish(&e).await.unwrap();
    sink.publish(&e).await.unwrap();
    assert_eq!(stream.messages().await.len(), 1);
    assert_eq!(
        metrics.sample("flexbridge_sink_duplicates_total", "nats"),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_subject_without_a_stream_is_a_permanent_error_and_unhealthy() {
    let subject = format!("{}.{{event}}", unique("fbnostream"));
    let (sink, _) = connected(&config(server_url(), subject)).await;
    let started = Instant::now();
    let err = sink
        .publish(&event(EventKind::InteractionCreated, 1))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "must not hang until a timeout"
    );
    assert_eq!(err.reason(), "stream_not_found");
    assert!(!err.is_retryable());
    let health = sink.health().await.unwrap_err();
    assert_eq!(health.reason(), "stream_not_found");
    assert!(
        health
            .to_string()
            .contains("no JetStream stream captures subject"),
        "{health}"
    );
}

/// A server whose JetStream does not answer (here: not enabled; in production: restarting or
/// electing a leader) makes a publish come back with "no responders", which async-nats
/// reports as `StreamNotFound`. That is not a missing stream: the publish must be retried.
#[tokio::test]
async fn no_responders_while_jetstream_is_away_is_retryable() {
    let server = AuthServer::start_with(&[], false);
    let c = config(
        format!("nats://127.0.0.1:{}", server.port),
        "away.{event}".to_owned(),
    );
    let (sink, _) = connected(&c).await;
    let err = sink
        .publish(&event(EventKind::InteractionCreated, 1))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "no_responders", "{err}");
    assert!(err.is_retryable(), "{err}");
    let health = sink.health().await.unwrap_err();
    assert_eq!(health.reason(), "no_responders", "{health}");
    assert!(health.is_retryable());
}

#[tokio::test]
async fn the_sink_provisions_its_stream() {
    let stream_name = unique("FBPROV");
    let prefix = unique("fbprov");
    let mut c = config(server_url(), format!("{prefix}.{{account}}.{{event}}"));
    c.stream = Some(StreamConfig {
        name: stream_name.clone(),
        subjects: vec![],
        storage: Storage::Memory,
        duplicate_window: Duration::from_secs(30),
        max_age: Some(Duration::from_secs(3600)),
        max_messages: Some(1000),
        max_bytes: None,
        retention: Retention::Limits,
        replicas: 1,
    });
    let (sink, _) = connected(&c).await;
    sink.health().await.unwrap();
    for e in every_kind() {
        sink.publish(&e).await.unwrap();
    }
    let js = jetstream::new(async_nats::connect(server_url()).await.unwrap());
    let mut stream = js.get_stream(&stream_name).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 8);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(30));
    assert_eq!(info.config.max_messages, 1000);
    js.delete_stream(&stream_name).await.unwrap();
}

/// Many requests publish at once: with 200 ms added to every server-to-client packet, 50
/// concurrent publishes finish in about one delay, not fifty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_are_pipelined_not_serialized() {
    let stream = TestStream::create(Duration::from_secs(60)).await;
    let proxy = TcpProxy::start(server_addr()).await;
    let (sink, _) = connected(&config(
        format!("nats://{}", proxy.addr),
        format!("{}.{{event}}", stream.prefix),
    ))
    .await;
    assert_publishes_pipelined(Arc::new(sink), &proxy).await;
    assert_eq!(stream.messages().await.len(), 50);
}

/// Publishes take the sink's connections in turn: each of three carries a third of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_are_spread_over_the_connections() {
    let stream = TestStream::create(Duration::from_secs(60)).await;
    let proxy = TcpProxy::start(server_addr()).await;
    let mut three = config(
        format!("nats://{}", proxy.addr),
        format!("{}.{{event}}", stream.prefix),
    );
    three.connections = 3;
    let (sink, _) = connected(&three).await;
    // Every connection is up (the health check needs only one).
    let started = Instant::now();
    while proxy.bytes_sent_upstream().len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not 3 connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = proxy.bytes_sent_upstream();
    for n in 0..30 {
        sink.publish(&event(EventKind::ParticipantUpdated, n))
            .await
            .unwrap();
    }
    let after = proxy.bytes_sent_upstream();
    assert_eq!(after.len(), 3, "a connection was re-opened: {after:?}");
    // Ten events of several hundred bytes each; a connection left out sends only pings.
    for (connection, (a, b)) in after.iter().zip(&before).enumerate() {
        assert!(
            a - b > 10 * 300,
            "connection {connection} sent {} bytes",
            a - b
        );
    }
    assert_eq!(stream.messages().await.len(), 30);
}

/// The connection is cut under load: in-flight publishes fail cleanly (retryably), the client
/// reconnects by itself, later publishes succeed, and every acknowledged event is in the
/// stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_fails_cleanly_reconnects_and_loses_nothing_acknowledged() {
    let stream = TestStream::create(Duration::from_secs(60)).await;
    let proxy = TcpProxy::start(server_addr()).await;
    let (sink, metrics) = connected(&config(
        format!("nats://{}", proxy.addr),
        format!("{}.{{event}}", stream.prefix),
    ))
    .await;
    let (acknowledged, _) = cut_under_load_and_recover(Arc::new(sink), &proxy).await;
    let stored: HashSet<String> = stream
        .messages()
        .await
        .iter()
        .map(|m| m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned())
        .collect();
    let missing: Vec<_> = acknowledged.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    assert!(
        metrics
            .sink_reconnections
            .with_label_values(&["nats"])
            .get()
            >= 1
    );
}

/// Core NATS (jetstream = false): delivered to a subscriber, no PubAck to wait for.
#[tokio::test]
async fn core_nats_publishes_without_jetstream() {
    use futures::StreamExt;
    let prefix = unique("fbcore");
    let client = async_nats::connect(server_url()).await.unwrap();
    let mut subscriber = client.subscribe(format!("{prefix}.>")).await.unwrap();
    client.flush().await.unwrap();
    let mut c = config(server_url(), format!("{prefix}.{{event}}"));
    c.jetstream = false;
    let (sink, _) = connected(&c).await;
    sink.health().await.unwrap();
    let e = event(EventKind::ParticipantJoined, 7);
    sink.publish(&e).await.unwrap();
    sink.drain().await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), subscriber.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        message.subject.as_str(),
        format!("{prefix}.participant.joined")
    );
    assert_eq!(&message.payload[..], &e.data_json()[..]);
}

/// A dedicated nats-server with authentication, started by the test.
struct AuthServer {
    child: std::process::Child,
    port: u16,
    _store: tempfile_dir::Dir,
}

mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl AuthServer {
    fn start(auth: &[&str]) -> Self {
        Self::start_with(auth, true)
    }

    fn start_with(auth: &[&str], jetstream: bool) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = std::env::temp_dir().join(unique("fbnats"));
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .args(if jetstream { &["-js"][..] } else { &[] })
            .args(auth)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server must be installed (scripts/services.sh installs it)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _store: tempfile_dir::Dir(store),
        }
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn user_password_and_token_authentication() {
    let stream = |name: &str| StreamConfig {
        name: name.to_owned(),
        subjects: vec![],
        storage: Storage::Memory,
        duplicate_window: Duration::from_secs(60),
        max_age: None,
        max_messages: None,
        max_bytes: None,
        retention: Retention::Limits,
        replicas: 1,
    };
    let server = AuthServer::start(&["--user", "flex", "--pass", "s3cret"]);
    let mut c = config(
        format!("nats://127.0.0.1:{}", server.port),
        "auth.{event}".to_owned(),
    );
    c.stream = Some(stream("AUTH"));
    c.user = Some("flex".to_owned());
    c.password = Some(flexbridge_core::Secret::new("s3cret"));
    let (sink, _) = connected(&c).await;
    sink.health().await.unwrap();
    sink.publish(&event(EventKind::ChannelCreated, 1))
        .await
        .unwrap();
    // A wrong password never connects: the sink reports it instead of publishing.
    c.password = Some(flexbridge_core::Secret::new("wrong"));
    c.connect_timeout = Duration::from_millis(500);
    let refused = c
        .open(
            &Limits::default(),
            &SinkContext::standalone("nats").unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(refused.health().await.unwrap_err().reason(), "disconnected");
    let err = refused
        .publish(&event(EventKind::ChannelCreated, 2))
        .await
        .unwrap_err();
    assert!(
        err.is_retryable() && !err.to_string().contains("wrong"),
        "{err}"
    );
    drop(server);

    let server = AuthServer::start(&["--auth", "tok-123"]);
    let mut c = config(
        format!("nats://127.0.0.1:{}", server.port),
        "auth.{event}".to_owned(),
    );
    c.stream = Some(stream("AUTHTOKEN"));
    c.token = Some(flexbridge_core::Secret::new("tok-123"));
    let (sink, _) = connected(&c).await;
    sink.health().await.unwrap();
    sink.publish(&event(EventKind::ChannelCreated, 3))
        .await
        .unwrap();
}
