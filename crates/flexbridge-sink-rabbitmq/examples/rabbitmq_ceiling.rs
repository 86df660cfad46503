//! The broker's own ceiling, for the bench to show beside flexbridge's RabbitMQ figure: a plain
//! lapin client with `--in-flight` publishes awaiting their confirm, each persistent and
//! mandatory to a durable topic exchange bound to a durable queue, with the properties and
//! headers the sink sends and a payload of the sink's size. No HTTP, no event model.
//! Prints one JSON line: `{"rate", "sent", "latency_ms": {"p50", "p99"}}`.
//!   cargo run --release -p flexbridge-sink-rabbitmq --example rabbitmq_ceiling -- --duration 10
#![allow(clippy::expect_used)] // a measurement tool: a broken set-up should stop it loudly

use clap::Parser;
use flexbridge_testkit::ceiling::{self, LoadArgs};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};

#[derive(Parser)]
struct Args {
    /// The broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    #[command(flatten)]
    load: LoadArgs,
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
    let payload = std::sync::Arc::new(vec![b'x'; args.load.size]);
    let exchange: std::sync::Arc<str> = name.as_str().into();
    // One reference count per publish, not a clone of a channel's many.
    let publishers: std::sync::Arc<[lapin::Channel]> = channels.into();
    let measured = ceiling::drive(&args.load, move |worker, n| {
        let (publishers, exchange, payload) = (
            std::sync::Arc::clone(&publishers),
            std::sync::Arc::clone(&exchange),
            std::sync::Arc::clone(&payload),
        );
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
        async move {
            let confirm = publishers[worker % publishers.len()]
                .basic_publish(
                    (*exchange).into(),
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
        }
    })
    .await;
    delete(&connection, &channel, &name).await;
    println!("{}", measured.summary());
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
