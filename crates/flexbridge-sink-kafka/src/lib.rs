//! The `kafka` sink: an idempotent `FutureProducer` (`enable.idempotence=true`, `acks=all`)
//! shared by every request without a lock (many records in flight), `publish` returning on
//! the delivery report, CloudEvents Kafka binding in binary (default) or structured mode, and
//! the record key = the `partitionkey` (the Interaction SID), so one interaction's events stay
//! in order in their partition.

use async_trait::async_trait;
use flexbridge_core::cloudevents::Encoded;
use flexbridge_core::metrics::{Counter, Gauge};
use flexbridge_core::route::Template;
use flexbridge_core::{
    Binding, BuildError, ContentMode, Event, Limits, Retry, Sink, SinkConfig, SinkContext,
    SinkError,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::RwLock;
use std::time::Duration;

/// librdkafka properties passed through (TLS, SASL, tuning). Values of keys that hold
/// secrets (passwords, keys, tokens) never print.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Properties(pub BTreeMap<String, String>);

fn is_secret(key: &str) -> bool {
    [
        "password",
        "secret",
        "token",
        "key.pem",
        "keystore",
        "ssl.key",
        "oauthbearer.config",
    ]
    .iter()
    .any(|s| key.contains(s))
}

impl Properties {
    fn redacted(&self) -> BTreeMap<&str, &str> {
        self.0
            .iter()
            .map(|(k, v)| {
                let v = if is_secret(k) {
                    flexbridge_core::secret::REDACTED
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect()
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.redacted()).finish()
    }
}

impl Serialize for Properties {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.redacted().serialize(serializer)
    }
}

/// `type = "kafka"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Unique sink name, used in metrics and logs.
    pub name: String,
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Topic: a plain name or a template; values are made topic-safe (characters outside
    /// `[A-Za-z0-9._-]` become `_`).
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Record key template; default the CloudEvents `partitionkey` (Interaction SID, else
    /// Account SID), which keeps one interaction's events in order.
    #[serde(default)]
    pub key: Option<String>,
    /// `binary` (`ce_*` headers, `data` as value) or `structured` (the envelope).
    #[serde(default)]
    pub content_mode: ContentMode,
    /// Longest time librdkafka tries to deliver a record (`message.timeout.ms`); must stay
    /// below `delivery.ack_timeout`.
    #[serde(default = "default_message_timeout", with = "humantime_serde")]
    pub message_timeout: Duration,
    /// `linger.ms`: how long the producer waits to batch records under load.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
    /// librdkafka properties (e.g. `security.protocol`, `sasl.mechanisms`, `sasl.username`,
    /// `sasl.password`, `ssl.ca.location`, `compression.type`); they override the defaults
    /// above except `enable.idempotence` and `acks`.
    #[serde(default)]
    pub properties: Properties,
}

fn default_topic() -> String {
    "flex.interactions.{event}".to_owned()
}
fn default_message_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_linger() -> Duration {
    Duration::from_millis(2)
}

impl KafkaSinkConfig {
    /// Every problem, as `sinks.<name>.<key>: message`.
    fn check(&self, limits: &Limits) -> (Option<KafkaPlan>, Vec<String>) {
        let key = |k: &str| format!("sinks.{}.{k}", self.name);
        let mut errors = Vec::new();
        let mut topic = None;
        if self.brokers.trim().is_empty() {
            errors.push(format!("{}: at least one broker is needed", key("brokers")));
        }
        match Template::parse(&self.topic) {
            Err(e) => errors.push(format!("{}: {e}", key("topic"))),
            Ok(t) => {
                let sample = t.pattern("channel.status_updated", "x");
                if sample.len() > 249
                    || !sample
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                {
                    errors.push(format!(
                        "{}: {:?} is not a valid topic name ([A-Za-z0-9._-], at most 249)",
                        key("topic"),
                        self.topic
                    ));
                }
                topic = Some(t);
            }
        }
        let record_key = match self.key.as_deref().map(Template::parse).transpose() {
            Ok(k) => k,
            Err(e) => {
                errors.push(format!("{}: {e}", key("key")));
                None
            }
        };
        if self.message_timeout >= limits.ack_timeout {
            errors.push(format!(
                "{}: must stay below delivery.ack_timeout ({}), or a record may land after the webhook was answered 503",
                key("message_timeout"),
                humantime::format_duration(limits.ack_timeout)
            ));
        }
        if self.message_timeout.is_zero() {
            errors.push(format!(
                "{}: must be greater than zero",
                key("message_timeout")
            ));
        }
        for fixed in ["enable.idempotence", "acks"] {
            if self.properties.0.contains_key(fixed) {
                errors.push(format!(
                    "{}: {fixed} is fixed (idempotent, acks=all) so that an acknowledged event is in Kafka",
                    key("properties")
                ));
            }
        }
        let plan = topic.map(|topic| KafkaPlan {
            topic,
            key: record_key,
        });
        (plan, errors)
    }
}

/// What validation parsed: the topic and key templates.
pub struct KafkaPlan {
    topic: Template,
    key: Option<Template>,
}

/// `flexbridge_sink_queue_depth{sink}`.
const QUEUE_DEPTH: &str = "flexbridge_sink_queue_depth";

/// Makes a value topic-safe: characters outside `[A-Za-z0-9._-]` become `_`.
pub fn topic_value(value: &str, out: &mut String) {
    out.extend(value.chars().map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            c
        } else {
            '_'
        }
    }));
}

/// Publishes to Kafka.
pub struct KafkaSink {
    name: String,
    /// The producer and its generation; replaced when librdkafka reports a fatal error.
    producer: RwLock<(u64, FutureProducer)>,
    /// What a replacement producer is built from.
    client_config: ClientConfig,
    /// Producers replaced after a fatal error (counted as reconnections).
    rebuilds: Counter,
    topic: Template,
    key: Option<Template>,
    content_mode: ContentMode,
    message_timeout: Duration,
    queue_depth: Gauge,
}

#[async_trait]
impl SinkConfig for KafkaSinkConfig {
    type Plan = KafkaPlan;
    type Sink = KafkaSink;

    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self, limits: &Limits) -> Result<KafkaPlan, Vec<String>> {
        match self.check(limits) {
            (Some(plan), errors) if errors.is_empty() => Ok(plan),
            (_, errors) => Err(errors),
        }
    }

    /// Builds the producer. A broker that is down is not an error: librdkafka keeps trying,
    /// and the health check reports it.
    async fn build(&self, plan: KafkaPlan, context: &SinkContext) -> Result<KafkaSink, BuildError> {
        let config = self;
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set(
                "message.timeout.ms",
                config.message_timeout.as_millis().to_string(),
            )
            .set("linger.ms", config.linger.as_millis().to_string())
            .set("client.id", format!("flexbridge-{}", config.name))
            // A topic the broker says does not exist fails within a second instead of after
            // librdkafka's default 30 s (longer than any acknowledgement deadline).
            .set("topic.metadata.propagation.max.ms", "1000");
        for (key, value) in &config.properties.0 {
            client.set(key, value);
        }
        client.set("enable.idempotence", "true").set("acks", "all");
        let producer: FutureProducer = client
            .create()
            .map_err(|e| BuildError::open("librdkafka refused the producer configuration", e))?;
        Ok(KafkaSink {
            name: config.name.clone(),
            producer: RwLock::new((0, producer)),
            client_config: client,
            rebuilds: context.shared().reconnections,
            topic: plan.topic,
            key: plan.key,
            content_mode: config.content_mode,
            message_timeout: config.message_timeout,
            queue_depth: context.gauge(
                QUEUE_DEPTH,
                "Records waiting in the client library for the broker, sampled at each health check.",
            )?,
        })
    }
}

impl KafkaSink {
    /// The current producer and its generation (a cheap clone: the producer is shared).
    fn producer(&self) -> (u64, FutureProducer) {
        self.producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces producer `generation` if librdkafka declared it dead. An idempotent producer
    /// that hits a fatal error (fenced after its epoch was bumped, out-of-order sequence) fails
    /// every later record: only a new producer publishes again.
    fn recover(
        &self,
        generation: u64,
        producer: &FutureProducer,
        error: Option<&KafkaError>,
    ) -> Option<String> {
        let (code, reason) = producer.client().fatal_error().or_else(|| {
            let code = error?.rdkafka_error_code()?;
            is_dead_producer(code).then(|| (code, code.to_string()))
        })?;
        let mut slot = self
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.0 != generation {
            return Some(reason); // another request already replaced it
        }
        match self.client_config.create::<FutureProducer>() {
            Ok(fresh) => {
                let old = std::mem::replace(&mut *slot, (generation + 1, fresh));
                drop(slot);
                self.rebuilds.inc();
                tracing::warn!(sink = %self.name, ?code, %reason, "the Kafka producer hit a fatal error; replaced it with a new one");
                // Dropping a producer purges its queue and joins its thread: not on a worker.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(error) => {
                tracing::error!(sink = %self.name, %error, "the Kafka producer hit a fatal error and a new one could not be created");
            }
        }
        Some(reason)
    }

    /// The record headers: the attributes in binary mode, and `content-type` in both modes.
    fn headers(encoded: &Encoded<'_>) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new_with_capacity(10);
        for (key, value) in encoded.headers() {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        headers.insert(Header {
            key: "content-type",
            value: Some(encoded.content_type),
        })
    }
}

/// Errors after which this producer's identity (producer id and epoch) is unusable: every
/// later record fails the same way, so the producer must be replaced. librdkafka raises some
/// as fatal errors, but not a fence after an epoch bump of a non-transactional producer.
fn is_dead_producer(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::ProducerFenced | C::InvalidProducerEpoch | C::OutOfOrderSequenceNumber | C::Fatal
    )
}

/// Maps a producer error to retryable or permanent.
pub fn classify(error: KafkaError) -> SinkError {
    use RDKafkaErrorCode as C;
    let code = error.rdkafka_error_code();
    let permanent = matches!(
        code,
        Some(
            C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidRecord
                | C::InvalidTopic
                | C::InvalidRequiredAcks
                | C::SaslAuthenticationFailed
                | C::Authentication
        )
    );
    let reason = match code {
        Some(C::UnknownTopicOrPartition | C::UnknownTopic) => "unknown_topic",
        Some(
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication,
        ) => "not_authorized",
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => "too_large",
        Some(C::MessageTimedOut | C::RequestTimedOut) => "timeout",
        Some(C::NotLeaderForPartition | C::LeaderNotAvailable) => "leader_change",
        Some(C::QueueFull) => "queue_full",
        Some(
            C::AllBrokersDown
            | C::BrokerNotAvailable
            | C::BrokerTransportFailure
            | C::NetworkException,
        ) => "broker_down",
        _ if permanent => "rejected",
        _ => "produce_failed",
    };
    let message = error.to_string();
    let retry = if permanent {
        Retry::Permanent
    } else {
        Retry::Retryable
    };
    SinkError::new(retry, reason, message).with_source(error)
}

#[async_trait]
impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, event: &Event) -> Result<(), SinkError> {
        let topic = self.topic.render_with(event, topic_value);
        let key = match &self.key {
            Some(template) => std::borrow::Cow::Owned(template.render(event)),
            None => std::borrow::Cow::Borrowed(event.partition_key()),
        };
        let encoded = Binding::Kafka.encode(event, self.content_mode);
        let mut replaced = false;
        loop {
            let record = FutureRecord::to(&topic)
                .key(key.as_ref())
                .payload(encoded.payload.as_ref())
                .headers(Self::headers(&encoded));
            let (generation, producer) = self.producer();
            // Waiting for room in a full local queue counts against the same deadline.
            let error = match producer
                .send(record, Timeout::After(self.message_timeout))
                .await
            {
                Ok(_) => return Ok(()),
                Err((error, _)) => error,
            };
            match self.recover(generation, &producer, Some(&error)) {
                // The dead producer's records were refused, not written: the replacement
                // sends this one again, once.
                Some(_) if !replaced => replaced = true,
                Some(reason) => {
                    return Err(SinkError::retryable(
                        "producer_fatal",
                        format!("the producer hit a fatal error and was replaced: {reason}"),
                    )
                    .with_source(error))
                }
                None => return Err(classify(error)),
            }
        }
    }

    async fn health(&self) -> Result<(), SinkError> {
        self.queue_depth
            .set(i64::from(self.producer().1.in_flight_count()));
        let (generation, producer) = self.producer();
        if let Some(reason) = self.recover(generation, &producer, None) {
            return Err(SinkError::retryable(
                "producer_fatal",
                format!("the producer hit a fatal error and was replaced: {reason}"),
            ));
        }
        // fetch_metadata blocks: keep it off the runtime's workers.
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|_| ())
        })
        .await
        .map_err(|e| SinkError::retryable("health_check", e.to_string()))?
        .map_err(|e| {
            SinkError::retryable(
                "broker_down",
                format!("no Kafka broker answered a metadata request: {e}"),
            )
            .with_source(e)
        })
    }

    async fn drain(&self) -> Result<(), SinkError> {
        let (_, producer) = self.producer();
        let timeout = self.message_timeout;
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| SinkError::retryable("flush_failed", e.to_string()))?
            .map_err(|e| SinkError::retryable("flush_failed", e.to_string()).with_source(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_properties_never_print() {
        let p = Properties(BTreeMap::from([
            ("sasl.password".to_owned(), "hunter2".to_owned()),
            ("compression.type".to_owned(), "lz4".to_owned()),
        ]));
        let shown = format!("{p:?} {}", serde_json::to_string(&p).unwrap());
        assert!(
            !shown.contains("hunter2") && shown.contains("lz4"),
            "{shown}"
        );
    }

    #[test]
    fn topic_values_are_safe() {
        let mut out = String::new();
        topic_value("a b/ñ.c", &mut out);
        assert_eq!(out, "a_b__.c");
    }

    #[test]
    fn classification() {
        let e = classify(KafkaError::MessageProduction(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
        assert!(!e.is_retryable() && e.reason() == "unknown_topic");
        let e = classify(KafkaError::MessageProduction(
            RDKafkaErrorCode::NotLeaderForPartition,
        ));
        assert!(e.is_retryable() && e.reason() == "leader_change");
        let e = classify(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut,
        ));
        assert!(e.is_retryable() && e.reason() == "timeout");
    }
}
