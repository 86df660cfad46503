//! The broker's own ceiling, for the bench to show beside flexbridge's Kafka figure: a plain
//! rdkafka `FutureProducer` configured as the sink configures its own (idempotent,
//! `acks=all`, the sink's default `linger`), with `--in-flight` records awaiting their
//! delivery report, each with a distinct key and the CloudEvents headers the sink sends, into
//! a topic of its own with the bench's partition count. No HTTP, no event model. The topic is
//! deleted at the end. Prints one JSON line: `{"rate", "sent", "latency_ms": {"p50", "p99"}}`.
//!   cargo run --release -p flexbridge-sink-kafka --example kafka_ceiling -- --brokers 127.0.0.1:9092
#![allow(clippy::expect_used)] // a measurement tool: a broken set-up should stop it loudly

use clap::Parser;
use hdrhistogram::Histogram;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Bootstrap brokers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Records per second, paced as `flexbridge simulate --rate` paces webhooks (the bench's
    /// half-load run); without it, as fast as the delivery reports come back.
    #[arg(long)]
    rate: Option<f64>,
    /// Records awaiting their delivery report at any time.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Payload bytes (the sink's binary-mode payload is about this size).
    #[arg(long, default_value_t = 370)]
    size: usize,
    /// Partitions of the topic (the bench's topic has 3).
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// `linger.ms` (the sink's default is 1 ms).
    #[arg(long, default_value = "1")]
    linger_ms: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let topic = format!("flexbridge-ceiling-{}", std::process::id());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .create()
        .expect("admin client");
    for result in admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                args.partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic")
    {
        result.expect("create topic");
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("message.timeout.ms", "5000")
        .set("linger.ms", &args.linger_ms)
        .set("topic.metadata.propagation.max.ms", "1000")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer");

    let payload = vec![b'x'; args.size];
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let pacer = std::sync::Arc::new(flexbridge_testkit::Pacer::new(args.rate));
    let mut workers = Vec::new();
    for worker in 0..args.in_flight {
        let (producer, payload, topic) = (producer.clone(), payload.clone(), topic.clone());
        let pacer = std::sync::Arc::clone(&pacer);
        workers.push(tokio::spawn(async move {
            let mut latency =
                Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                // A key per record, as interaction SIDs spread the sink's records over the
                // partitions.
                let key = format!("KD{worker:08x}{n:024x}");
                let mut headers = OwnedHeaders::new_with_capacity(8);
                for name in [
                    "ce_specversion",
                    "ce_id",
                    "ce_source",
                    "ce_type",
                    "ce_subject",
                    "ce_time",
                    "ce_dataschema",
                    "content-type",
                ] {
                    headers = headers.insert(Header {
                        key: name,
                        value: Some("AC6cc6c0214ebb8cff8474535aaa544929"),
                    });
                }
                pacer.turn().await;
                let sent = Instant::now();
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(&key)
                            .payload(&payload)
                            .headers(headers),
                        Timeout::After(Duration::from_secs(5)),
                    )
                    .await
                    .map_err(|(error, _)| error)
                    .expect("delivery");
                latency.saturating_record(sent.elapsed().as_micros().max(1) as u64);
            }
            latency
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    for worker in workers {
        latency.add(worker.await.expect("worker")).expect("merge");
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(producer);
    let _ = admin
        .delete_topics(&[topic.as_str()], &AdminOptions::new())
        .await;
    println!(
        "{}",
        serde_json::json!({
            "rate": latency.len() as f64 / elapsed,
            "sent": latency.len(),
            "latency_ms": {
                "p50": latency.value_at_quantile(0.5) as f64 / 1000.0,
                "p99": latency.value_at_quantile(0.99) as f64 / 1000.0,
            },
        })
    );
}
