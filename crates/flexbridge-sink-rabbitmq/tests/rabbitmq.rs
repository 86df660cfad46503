//! The `rabbitmq` sink against the real RabbitMQ (127.0.0.1:5672, guest/guest, or
//! FLEXBRIDGE_AMQP_URL). A missing broker fails these tests; they never skip.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use flexbridge_core::metrics::Metrics;
use flexbridge_core::{ContentMode, EventKind, Limits, Secret, Sink, SinkConfig, SinkContext};
use flexbridge_sink_rabbitmq::{Argument, Declare, QueueDeclare, RabbitMqSink, RabbitMqSinkConfig};
use flexbridge_testkit::{
    assert_publishes_pipelined, cut_under_load_and_recover, event, every_kind, unique, RabbitNode,
    TcpProxy,
};
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::AMQPValue;
use lapin::{Connection, ConnectionProperties};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

fn broker_url() -> String {
    std::env::var("FLEXBRIDGE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn via(proxy: SocketAddr) -> String {
    format!("amqp://guest:guest@{proxy}/%2f")
}

fn broker_addr() -> SocketAddr {
    let url = broker_url();
    let rest = url.split('@').nth(1).unwrap();
    rest.split('/').next().unwrap().parse().unwrap()
}

/// The test's own exchange and queue, deleted when dropped.
struct Topology {
    exchange: String,
    queue: String,
}

impl Topology {
    fn new() -> Self {
        Self {
            exchange: unique("fbtest.ex."),
            queue: unique("fbtest.q."),
        }
    }

    fn declare(&self, arguments: BTreeMap<String, Argument>) -> Declare {
        Declare {
            exchange_type: "topic".to_owned(),
            durable: false,
            queues: vec![QueueDeclare {
                name: self.queue.clone(),
                durable: false,
                bindings: vec!["#".to_owned()],
                arguments,
            }],
        }
    }

    /// Every message in the queue, in order.
    async fn drain(&self) -> Vec<lapin::message::BasicGetMessage> {
        let connection = Connection::connect(&broker_url(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ is not reachable at {}: {e}", broker_url()));
        let channel = connection.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(message);
        }
        out
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let (exchange, queue) = (self.exchange.clone(), self.queue.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(connection) =
                    Connection::connect(&broker_url(), ConnectionProperties::default()).await
                {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await;
                        let _ = channel
                            .exchange_delete(
                                exchange.as_str().into(),
                                ExchangeDeleteOptions::default(),
                            )
                            .await;
                    }
                }
            });
        })
        .join();
    }
}

fn config(uri: String, exchange: &str, declare: Option<Declare>) -> RabbitMqSinkConfig {
    RabbitMqSinkConfig {
        name: "rabbit".to_owned(),
        uri: Secret::new(uri),
        exchange: exchange.to_owned(),
        routing_key: "{event}".to_owned(),
        content_mode: ContentMode::Binary,
        declare,
        connect_timeout: Duration::from_secs(3),
        heartbeat: Duration::from_secs(10),
        tls: Default::default(),
    }
}

async fn open(config: &RabbitMqSinkConfig) -> (RabbitMqSink, Metrics) {
    let context = SinkContext::standalone(&config.name).unwrap();
    let sink = config.open(&Limits::default(), &context).await.unwrap();
    // `open` does not wait for the broker; these tests publish at once.
    sink.first_attempt().await;
    (sink, context.metrics().clone())
}

fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
        other => panic!("not a string: {other:?}"),
    }
}

#[tokio::test]
async fn every_event_type_round_trips_with_headers_properties_and_routing_key() {
    let t = Topology::new();
    let c = config(broker_url(), &t.exchange, Some(t.declare(BTreeMap::new())));
    let (sink, _) = open(&c).await;
    sink.health().await.unwrap();
    let events = every_kind();
    for e in &events {
        sink.publish(e).await.unwrap();
    }
    let structured = RabbitMqSinkConfig {
        content_mode: ContentMode::Structured,
        ..c.clone()
    };
    let (structured_sink, _) = open(&structured).await;
    let last = event(EventKind::ChannelStatusUpdated, 99);
    structured_sink.publish(&last).await.unwrap();

    let messages = t.drain().await;
    assert_eq!(messages.len(), events.len() + 1);
    for (e, m) in events.iter().zip(&messages) {
        let d = &m.delivery;
        assert_eq!(d.routing_key.as_str(), e.kind().short_name());
        assert_eq!(d.exchange.as_str(), t.exchange);
        assert_eq!(&d.data[..], &e.data_json()[..]);
        let p = &d.properties;
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), e.id());
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(p.app_id().as_ref().unwrap().as_str(), "flexbridge");
        assert_eq!(p.kind().as_ref().unwrap().as_str(), e.ce_type());
        let received = e
            .received_at()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(p.timestamp().unwrap(), received);
        let headers = p.headers().as_ref().unwrap().inner();
        for (name, value) in e.attributes() {
            let header = headers
                .get(format!("cloudEvents_{name}").as_str())
                .unwrap_or_else(|| panic!("cloudEvents_{name}"));
            assert_eq!(text(header), value);
        }
    }
    let m = &messages[events.len()].delivery;
    assert_eq!(
        m.properties.content_type().as_ref().unwrap().as_str(),
        "application/cloudevents+json; charset=UTF-8"
    );
    assert_eq!(&m.data[..], &last.envelope_json()[..]);
}

#[tokio::test]
async fn an_unroutable_message_is_an_error_not_a_success() {
    let t = Topology::new();
    let declare = Declare {
        queues: vec![],
        ..t.declare(BTreeMap::new())
    };
    let (sink, metrics) = open(&config(broker_url(), &t.exchange, Some(declare))).await;
    sink.health().await.unwrap();
    let err = sink
        .publish(&event(EventKind::InteractionCreated, 1))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "unroutable");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("no queue is bound"), "{err}");
    assert_eq!(
        metrics.sample("flexbridge_sink_returned_total", "rabbit"),
        Some(1.0)
    );
}

/// A custom routing key template whose rendering exceeds AMQP's 255 bytes is refused for
/// good before it reaches the encoder or the broker, and the channel stays usable.
#[tokio::test]
async fn a_routing_key_over_255_bytes_is_a_permanent_error() {
    let t = Topology::new();
    let mut c = config(broker_url(), &t.exchange, Some(t.declare(BTreeMap::new())));
    c.routing_key = ["{interaction}"; 9].join("-");
    let (sink, _) = open(&c).await;
    sink.health().await.unwrap();
    let err = sink
        .publish(&event(EventKind::InteractionCreated, 1))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "invalid_routing_key", "{err}");
    assert!(!err.is_retryable());
    sink.health().await.unwrap();
}

/// A connection that goes silent is noticed by the heartbeat (1 s here) and re-opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_noticed_by_the_heartbeat_and_recovers() {
    let t = Topology::new();
    let proxy = TcpProxy::start(broker_addr()).await;
    let mut c = config(
        via(proxy.addr),
        &t.exchange,
        Some(t.declare(BTreeMap::new())),
    );
    c.heartbeat = Duration::from_secs(1);
    let (sink, _) = open(&c).await;
    sink.health().await.unwrap();
    flexbridge_testkit::silent_link_is_noticed_and_recovered(
        Arc::new(sink),
        &proxy,
        Duration::from_secs(1),
    )
    .await;
}

/// `amqps://` with the CA from `tls.ca_file`, against a RabbitMQ node of the test's own
/// listening for TLS with a fresh test PKI: it connects and publishes; with another CA the
/// handshake is refused and health says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_verifies_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = flexbridge_testkit::test_pki(dir.path(), "rabbit");
    let other = flexbridge_testkit::test_pki(dir.path(), "other");
    let node = RabbitNode::start(Some((&pki.cert, &pki.key)));
    let port = node.tls_port.unwrap();
    let mut c = config(
        format!("amqps://guest:guest@localhost:{port}/%2f"),
        &unique("fbtest.tls."),
        Some(Declare {
            exchange_type: "topic".to_owned(),
            durable: false,
            queues: vec![QueueDeclare {
                name: unique("fbtest.tlsq."),
                durable: false,
                bindings: vec!["#".to_owned()],
                arguments: BTreeMap::new(),
            }],
        }),
    );
    c.tls.ca_file = Some(pki.ca.clone());
    let (sink, _) = open(&c).await;
    sink.health().await.unwrap();
    sink.publish(&event(EventKind::ChannelCreated, 1))
        .await
        .unwrap();

    c.tls.ca_file = Some(other.ca);
    let (refused, _) = open(&c).await;
    let err = refused.health().await.unwrap_err();
    assert_eq!(err.reason(), "disconnected", "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
}

/// A memory alarm makes the broker block publishing connections (`connection.blocked`);
/// publishes then wait without an error, so health must say it, and clear once lifted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_blocked_by_a_broker_alarm_shows_in_health() {
    let node = RabbitNode::start(None);
    let exchange = unique("fbtest.blocked.");
    let queue = unique("fbtest.blockedq.");
    let c = config(
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", node.port),
        &exchange,
        Some(Declare {
            exchange_type: "topic".to_owned(),
            durable: false,
            queues: vec![QueueDeclare {
                name: queue,
                durable: false,
                bindings: vec!["#".to_owned()],
                arguments: BTreeMap::new(),
            }],
        }),
    );
    let (sink, _) = open(&c).await;
    let sink = Arc::new(sink);
    sink.health().await.unwrap();
    sink.publish(&event(EventKind::ChannelCreated, 1))
        .await
        .unwrap();
    node.ctl(&["set_vm_memory_high_watermark", "0.00001"]);
    // The broker blocks a connection when it next publishes.
    let pending = {
        let sink = Arc::clone(&sink);
        tokio::spawn(async move { sink.publish(&event(EventKind::ChannelCreated, 2)).await })
    };
    let started = std::time::Instant::now();
    loop {
        match sink.health().await {
            Err(e) if e.reason() == "blocked" => break,
            other => assert!(
                started.elapsed() < Duration::from_secs(15),
                "not reported as blocked: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.ctl(&["set_vm_memory_high_watermark", "0.6"]);
    let started = std::time::Instant::now();
    while sink.health().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(15), "still blocked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pending.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_broker_nack_is_an_error() {
    let t = Topology::new();
    let arguments = BTreeMap::from([
        ("x-max-length".to_owned(), Argument::Int(1)),
        (
            "x-overflow".to_owned(),
            Argument::Text("reject-publish".to_owned()),
        ),
    ]);
    let (sink, _) = open(&config(
        broker_url(),
        &t.exchange,
        Some(t.declare(arguments)),
    ))
    .await;
    sink.publish(&event(EventKind::ChannelCreated, 1))
        .await
        .unwrap();
    let err = sink
        .publish(&event(EventKind::ChannelCreated, 2))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "nack");
    assert_eq!(t.drain().await.len(), 1);
}

#[tokio::test]
async fn a_missing_exchange_is_reported_clearly() {
    let (sink, _) = open(&config(broker_url(), &unique("fbtest.missing."), None)).await;
    let health = sink.health().await.unwrap_err();
    assert_eq!(health.reason(), "exchange_missing");
    assert!(health.to_string().contains("does not exist"), "{health}");
    let err = sink
        .publish(&event(EventKind::ChannelCreated, 1))
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
}

/// With 200 ms added to every broker-to-client packet, 50 concurrent publishes finish in
/// about one delay: confirms are pipelined, not one publish at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_are_pipelined_not_serialized() {
    let t = Topology::new();
    let proxy = TcpProxy::start(broker_addr()).await;
    let (sink, _) = open(&config(
        via(proxy.addr),
        &t.exchange,
        Some(t.declare(BTreeMap::new())),
    ))
    .await;
    sink.health().await.unwrap();
    assert_publishes_pipelined(Arc::new(sink), &proxy).await;
    assert_eq!(t.drain().await.len(), 50);
}

/// The connection is cut under load: in-flight publishes fail cleanly (retryably), the sink
/// reconnects by itself, later publishes succeed, and nothing confirmed is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_fails_cleanly_reconnects_and_loses_nothing_confirmed() {
    let t = Topology::new();
    let proxy = TcpProxy::start(broker_addr()).await;
    let (sink, metrics) = open(&config(
        via(proxy.addr),
        &t.exchange,
        Some(t.declare(BTreeMap::new())),
    ))
    .await;
    sink.health().await.unwrap();
    let (confirmed, _) = cut_under_load_and_recover(Arc::new(sink), &proxy).await;
    let stored: HashSet<String> = t
        .drain()
        .await
        .iter()
        .map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string()
        })
        .collect();
    let missing: Vec<_> = confirmed.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "confirmed but not in the queue: {missing:?}"
    );
    assert!(
        metrics
            .sink_reconnections
            .with_label_values(&["rabbit"])
            .get()
            >= 1
    );
}
