//! The broker's own ceiling, for the bench to show beside flexbridge's Kafka figure: a plain
//! rdkafka `FutureProducer` configured as the sink configures its own (idempotent,
//! `acks=all`, the sink's default `linger`), with `--in-flight` records awaiting their
//! delivery report, each with a distinct key and the CloudEvents headers the sink sends, into
//! a topic of its own with the bench's partition count. No HTTP, no event model. The topic is
//! deleted at the end. Prints one JSON line: `{"rate", "sent", "latency_ms": {"p50", "p99"}}`.
//!   cargo run --release -p flexbridge-sink-kafka --example kafka_ceiling -- --brokers 127.0.0.1:9092
#![allow(clippy::expect_used)] // a measurement tool: a broken set-up should stop it loudly

use clap::Parser;
use flexbridge_testkit::ceiling::{self, LoadArgs};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
struct Args {
    /// Bootstrap brokers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[command(flatten)]
    load: LoadArgs,
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

    let payload = Arc::new(vec![b'x'; args.load.size]);
    let (sender, to) = (producer.clone(), Arc::<str>::from(topic.as_str()));
    let measured = ceiling::drive(&args.load, move |worker, n| {
        let (producer, payload, topic) = (sender.clone(), Arc::clone(&payload), Arc::clone(&to));
        // A key per record, as interaction SIDs spread the sink's records over the partitions.
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
        async move {
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&key)
                        .payload(payload.as_slice())
                        .headers(headers),
                    Timeout::After(Duration::from_secs(5)),
                )
                .await
                .map_err(|(error, _)| error)
                .expect("delivery");
        }
    })
    .await;
    drop(producer);
    let _ = admin
        .delete_topics(&[topic.as_str()], &AdminOptions::new())
        .await;
    println!("{}", measured.summary());
}
