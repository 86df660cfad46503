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
use flexbridge_testkit::ceiling::{self, LoadArgs};

#[derive(Parser)]
struct Args {
    /// The server.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    #[command(flatten)]
    load: LoadArgs,
    /// Client connections; the publishers take them in turn.
    #[arg(long, default_value_t = 1)]
    connections: usize,
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

    let payload = bytes::Bytes::from(vec![b'x'; args.load.size]);
    let mut contexts = vec![js.clone()];
    for _ in 1..args.connections.max(1) {
        let extra = async_nats::connect(&args.url).await.expect("connect");
        contexts.push(jetstream::new(extra));
    }
    let subject: std::sync::Arc<str> = format!("{subject}.ACx.channel").into();
    let measured = ceiling::drive(&args.load, move |worker, n| {
        let (js, subject) = (
            contexts[worker % contexts.len()].clone(),
            std::sync::Arc::clone(&subject),
        );
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
        async move {
            js.send_publish(subject.to_string(), message)
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    })
    .await;
    let _ = js.delete_stream(&name).await;
    println!("{}", measured.summary());
}
