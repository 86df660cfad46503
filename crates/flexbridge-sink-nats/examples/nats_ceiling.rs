//! The broker's own ceiling, for the bench to show beside flexbridge's JetStream figure: a
//! plain async-nats client with `--in-flight` publishes awaiting their PubAck, each with a
//! unique `Nats-Msg-Id` and the CloudEvents headers the sink sends, into a stream of the
//! bench's storage type. No HTTP, no event model. The stream is deleted at the end.
//! Prints one JSON line: `{"rate", "sent", "latency_ms": {"p50", "p99"}}`.
//!   cargo run --release -p flexbridge-sink-nats --example nats_ceiling -- --duration 10
#![allow(clippy::expect_used)] // a measurement tool: a broken set-up should stop it loudly

use async_nats::jetstream::{self, message::PublishMessage, stream};
use async_nats::HeaderMap;
use clap::Parser;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The server.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Publishes per second, paced as `flexbridge simulate --rate` paces webhooks (the
    /// bench's half-load run); without it, as fast as the acknowledgements come back.
    #[arg(long)]
    rate: Option<f64>,
    /// Publishes awaiting their PubAck at any time.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Client connections; the publishers take them in turn.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Payload bytes (the sink's binary-mode payload is about this size).
    #[arg(long, default_value_t = 370)]
    size: usize,
    /// Stream storage: file or memory.
    #[arg(long, default_value = "file")]
    storage: String,
    /// Instead of measuring: delete this stream (the bench starts and ends each JetStream row
    /// with an empty stream, as the ceiling has).
    #[arg(long)]
    delete: Option<String>,
    /// Instead of measuring: empty this stream and keep it (the bench empties a row's stream
    /// between its full-load and half-load runs while flexbridge keeps publishing to it).
    #[arg(long)]
    purge: Option<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let client = async_nats::connect(&args.url).await.expect("connect");
    let js = jetstream::new(client.clone());
    if let Some(name) = &args.delete {
        let _ = js.delete_stream(name).await;
        return;
    }
    if let Some(name) = &args.purge {
        if let Ok(stream) = js.get_stream(name).await {
            let _ = stream.purge().await;
        }
        return;
    }
    let name = format!("FLEXBRIDGE_CEILING_{}", std::process::id());
    let subject = format!("flexbridge.ceiling.{}", std::process::id());
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{subject}.>")],
        storage: if args.storage == "memory" {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        },
        max_messages: 200_000,
        ..stream::Config::default()
    })
    .await
    .expect("stream");

    let payload = bytes::Bytes::from(vec![b'x'; args.size]);
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let pacer = std::sync::Arc::new(flexbridge_testkit::Pacer::new(args.rate));
    let mut contexts = vec![js.clone()];
    for _ in 1..args.connections.max(1) {
        let extra = async_nats::connect(&args.url).await.expect("connect");
        contexts.push(jetstream::new(extra));
    }
    let mut workers = Vec::new();
    for worker in 0..args.in_flight {
        let (js, payload, subject) = (
            contexts[worker % contexts.len()].clone(),
            payload.clone(),
            format!("{subject}.ACx.channel"),
        );
        let pacer = std::sync::Arc::clone(&pacer);
        workers.push(tokio::spawn(async move {
            let mut latency =
                Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let mut headers = HeaderMap::new();
                headers.insert("Content-Type", "application/json");
                for header in [
                    "ce-specversion",
                    "ce-source",
                    "ce-subject",
                    "ce-time",
                    "ce-dataschema",
                    "ce-type",
                    "ce-id",
                ] {
                    headers.insert(header, "AC6cc6c0214ebb8cff8474535aaa544929");
                }
                let message = PublishMessage::build()
                    .payload(payload.clone())
                    .headers(headers)
                    .message_id(format!("{}-{worker}-{n}", std::process::id()));
                pacer.turn().await;
                let sent = Instant::now();
                js.send_publish(subject.clone(), message)
                    .await
                    .expect("publish")
                    .await
                    .expect("ack");
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
    let _ = js.delete_stream(&name).await;
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
