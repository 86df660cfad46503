//! The broker's own ceiling, for the bench to show beside flexbridge's RabbitMQ figure: a plain
//! lapin client with `--in-flight` publishes awaiting their confirm, each persistent and
//! mandatory to a durable topic exchange bound to a durable queue, with the properties and
//! headers the sink sends and a payload of the sink's size. No HTTP, no event model.
//! Prints one JSON line: `{"rate", "sent", "latency_ms": {"p50", "p99"}}`.
//!   cargo run --release -p flexbridge-sink-rabbitmq --example rabbitmq_ceiling -- --duration 10
#![allow(clippy::expect_used)] // a measurement tool: a broken set-up should stop it loudly

use clap::Parser;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Publishes per second, paced as `flexbridge simulate --rate` paces webhooks (the
    /// bench's half-load run); without it, as fast as the acknowledgements come back.
    #[arg(long)]
    rate: Option<f64>,
    /// Publishes awaiting their confirm at any time.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Payload bytes (the sink's binary-mode payload is about this size).
    #[arg(long, default_value_t = 370)]
    size: usize,
    /// Publishing channels, each in confirm mode; publishers take them in turn.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Instead of measuring: delete this queue and the exchange of the same name (the bench
    /// starts and ends each RabbitMQ row with an empty queue, as the ceiling has).
    #[arg(long)]
    delete: Option<String>,
    /// Instead of measuring: empty this queue and keep it (the bench empties a row's queue
    /// between its full-load and half-load runs while flexbridge keeps publishing to it).
    #[arg(long)]
    purge: Option<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let connection = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    if let Some(name) = &args.delete {
        delete(&connection, &channel, name).await;
        return;
    }
    if let Some(name) = &args.purge {
        let _ = channel
            .queue_purge(name.as_str().into(), QueuePurgeOptions::default())
            .await;
        let _ = connection.close(200, "done".into()).await;
        return;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let name = format!("flexbridge.ceiling.{}", std::process::id());
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    let mut arguments = FieldTable::default();
    // Bounded like the bench's queue, so a long run does not fill the broker's disk.
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(200_000));
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("queue");
    channel
        .queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");

    let mut channels = vec![channel.clone()];
    for _ in 1..args.channels.max(1) {
        let extra = connection.create_channel().await.expect("channel");
        extra
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm_select");
        channels.push(extra);
    }
    let payload = vec![b'x'; args.size];
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let pacer = std::sync::Arc::new(flexbridge_testkit::Pacer::new(args.rate));
    let mut workers = Vec::new();
    for worker in 0..args.in_flight {
        let (channel, exchange, payload) = (
            channels[worker % channels.len()].clone(),
            name.clone(),
            payload.clone(),
        );
        let pacer = std::sync::Arc::clone(&pacer);
        workers.push(tokio::spawn(async move {
            let mut latency =
                Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                pacer.turn().await;
                let sent = Instant::now();
                let mut headers = FieldTable::default();
                // What the sink sends in binary mode for a typical event: every CloudEvents
                // attribute but the content type, with values of the same lengths.
                for (header, value) in [
                    ("cloudEvents_specversion", "1.0"),
                    ("cloudEvents_id", "5e4a8c25e109f40ea69b88349cf50257"),
                    (
                        "cloudEvents_source",
                        "/twilio/accounts/AC8c8e24da3e1b3d45f914b4f8ebfc73c5/flex/interactions",
                    ),
                    (
                        "cloudEvents_type",
                        "com.twilio.flex.interactions.interaction.created",
                    ),
                    ("cloudEvents_subject", "KDe9bef2ca293c6ec7e1bd6a9f14db1248"),
                    ("cloudEvents_time", "2026-12-01T11:37:26.766Z"),
                    (
                        "cloudEvents_dataschema",
                        "urn:flexbridge:schema:FlexInteractions.InteractionCreated:1",
                    ),
                    (
                        "cloudEvents_partitionkey",
                        "KDe9bef2ca293c6ec7e1bd6a9f14db1248",
                    ),
                ] {
                    headers.insert(
                        header.into(),
                        AMQPValue::LongString(LongString::from(value)),
                    );
                }
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(format!("{:032x}", (worker as u64) << 40 | n).into())
                    .with_timestamp(1)
                    .with_app_id("flexbridge".into())
                    .with_type("com.twilio.flex.interactions.channel.status-updated.v1".into())
                    .with_content_type("application/json".into())
                    .with_headers(headers);
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "ceiling.channel".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &payload,
                        properties,
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm");
                assert!(
                    matches!(confirm, Confirmation::Ack(None)),
                    "not acknowledged: {confirm:?}"
                );
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
    delete(&connection, &channel, &name).await;
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

/// Deletes the queue and the exchange named `name`, then closes the connection.
async fn delete(connection: &Connection, channel: &lapin::Channel, name: &str) {
    let _ = channel
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(name.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
}
