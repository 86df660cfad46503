//! The `kafka` sink: an idempotent `FutureProducer` (`enable.idempotence=true`, `acks=all`)
//! shared by every request without a lock (many records in flight), `publish` returning on
//! the delivery report, CloudEvents Kafka binding in binary (default) or structured mode, and
//! the record key = the `partitionkey` (the Interaction SID), so one interaction's events stay
//! in order in their partition.

use async_trait::async_trait;
use flexbridge_core::cloudevents::Encoded;
use flexbridge_core::metrics::{Counter, Gauge};
use flexbridge_core::route::Template;
use flexbridge_core::FailureLog;
use flexbridge_core::{
    Binding, BuildError, ContentMode, Event, Limits, Retry, Sink, SinkConfig, SinkContext,
    SinkError,
};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// librdkafka properties passed through (TLS, SASL, tuning). Values of keys that hold
/// secrets (passwords, keys, tokens) never print. A number or boolean is taken as its text
/// (`linger.ms = 5`, or an environment override).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Properties(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Properties {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Integer(i64),
            Number(f64),
            Flag(bool),
        }
        let raw = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
        Ok(Properties(
            raw.into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        Scalar::Text(s) => s,
                        Scalar::Integer(i) => i.to_string(),
                        Scalar::Number(n) => n.to_string(),
                        Scalar::Flag(b) => b.to_string(),
                    };
                    (k, v)
                })
                .collect(),
        ))
    }
}

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
    /// `linger.ms`: how long the producer waits to batch records under load (1 ms by
    /// default; 0 makes one request per record). Against a broker that answers much later,
    /// at a high rate per partition, librdkafka's broker thread spins while it waits: the
    /// README's Kafka section says what to raise.
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
/// With 64 webhooks waiting, throughput is about 64 / latency, and the linger is most of the
/// latency: in one run of the bench against tansu, 1 ms gave 31.0k req/s at 18 µs per event,
/// 2 ms 19.7-20.3k, and 0 ms 21.3k at 49.5 µs (a request per record).
fn default_linger() -> Duration {
    Duration::from_millis(1)
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
        errors.extend(
            self.check_client_config()
                .err()
                .map(|e| format!("{}: {e}", key("properties"))),
        );
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

impl KafkaSinkConfig {
    /// The producer's librdkafka configuration: our defaults, then `properties`, then the
    /// settings that make an acknowledged event durable.
    fn client_config(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &self.brokers)
            .set(
                "message.timeout.ms",
                self.message_timeout.as_millis().to_string(),
            )
            // librdkafka takes fractions of a millisecond: "500us" must not become 0.
            .set(
                "linger.ms",
                (self.linger.as_secs_f64() * 1000.0).to_string(),
            )
            .set("client.id", format!("flexbridge-{}", self.name))
            // A topic the broker says does not exist fails within a second instead of after
            // librdkafka's default 30 s (longer than any acknowledgement deadline).
            .set("topic.metadata.propagation.max.ms", "1000");
        for (key, value) in &self.properties.0 {
            client.set(key, value);
        }
        client.set("enable.idempotence", "true").set("acks", "all");
        client
    }

    /// Hands every property to librdkafka without starting a client, so `check-config`
    /// rejects what this build cannot honour (an unknown property, a protocol, codec or SASL
    /// mechanism it was built without) instead of `run` failing later.
    fn check_client_config(&self) -> Result<(), String> {
        let native = self
            .client_config()
            .create_native_config()
            .map_err(|e| format!("librdkafka refused it: {}", kafka_error_text(&e)))?;
        // The SASL mechanism is only checked when a client starts: compare it with what this
        // build has (`builtin.features`, e.g. `sasl_scram`).
        let features = native.get("builtin.features").unwrap_or_default();
        let mechanism = self
            .properties
            .0
            .get("sasl.mechanisms")
            .or_else(|| self.properties.0.get("sasl.mechanism"));
        let sasl_in_use = self
            .properties
            .0
            .get("security.protocol")
            .is_some_and(|p| p.to_ascii_lowercase().starts_with("sasl"));
        if let (Some(mechanism), true) = (mechanism, sasl_in_use) {
            let feature = match mechanism.to_ascii_uppercase().as_str() {
                "PLAIN" => "sasl_plain",
                "SCRAM-SHA-256" | "SCRAM-SHA-512" => "sasl_scram",
                "OAUTHBEARER" => "sasl_oauthbearer",
                "GSSAPI" => "sasl_gssapi",
                other => return Err(format!("unknown SASL mechanism {other:?} (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER)")),
            };
            if !features.split(',').any(|f| f == feature) {
                return Err(format!(
                    "SASL mechanism {mechanism} is not in this build (it has: {features})"
                ));
            }
        }
        Ok(())
    }
}

/// librdkafka's message without the wrapper's prefix.
fn kafka_error_text(error: &KafkaError) -> String {
    match error {
        KafkaError::ClientConfig(_, message, key, value) => {
            let value = if is_secret(key) {
                flexbridge_core::secret::REDACTED
            } else {
                value.as_str()
            };
            format!("{key} = {value:?}: {message}")
        }
        other => other.to_string(),
    }
}

/// What validation parsed: the topic and key templates.
pub struct KafkaPlan {
    topic: Template,
    key: Option<Template>,
}

/// `flexbridge_sink_queue_depth{sink}`.
const QUEUE_DEPTH: &str = "flexbridge_sink_queue_depth";

/// The topic of every event kind, when the template has no placeholder but `{event}`;
/// empty when a topic depends on the event's values.
fn fixed_topics(template: &Template) -> Vec<String> {
    let mut topics: Vec<String> = flexbridge_core::EventKind::ALL
        .iter()
        .map(|kind| template.pattern(kind.short_name(), "*"))
        .collect();
    if topics.iter().any(|t| t.contains('*')) {
        return Vec::new();
    }
    topics.sort();
    topics.dedup();
    topics
}

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC: usize = 249;

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

/// The producer of this sink, with its logging context.
type FutureProducer = rdkafka::producer::FutureProducer<LogContext>;

/// Sends librdkafka's errors and warnings through the sink's [`FailureLog`]: with the broker
/// down librdkafka reports several failures a second, each as an error callback and a log
/// line; an operator gets one line when it starts failing, a summary a minute, and one when
/// it recovers.
#[derive(Clone)]
pub struct LogContext {
    failures: Arc<FailureLog>,
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                self.failures.failure(
                    "the Kafka client reports a problem",
                    &format_args!("{fac}: {message}"),
                );
            }
            _ => tracing::debug!(fac, message, "librdkafka"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.failures.failure(
            "the Kafka client reports a problem",
            &format_args!("{error}: {reason}"),
        );
    }
}

/// Publishes to Kafka.
pub struct KafkaSink {
    /// Connection failures, logged per state change.
    failures: Arc<FailureLog>,
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
    /// The topics every event goes to when the template has no placeholder but `{event}`:
    /// the health check asks the broker for each.
    check_topics: Vec<String>,
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
        let client = config.client_config();
        let check_topics = fixed_topics(&plan.topic);
        let failures = Arc::new(FailureLog::new(config.name.clone()));
        let log_context = LogContext {
            failures: Arc::clone(&failures),
        };
        let producer: FutureProducer = client
            .create_with_context(log_context)
            .map_err(|e| BuildError::open("librdkafka refused the producer configuration", e))?;
        Ok(KafkaSink {
            failures,
            name: config.name.clone(),
            producer: RwLock::new((0, producer)),
            client_config: client,
            rebuilds: context.shared().reconnections,
            topic: plan.topic,
            key: plan.key,
            check_topics,
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
        let context = LogContext {
            failures: Arc::clone(&self.failures),
        };
        match self
            .client_config
            .create_with_context::<_, FutureProducer>(context)
        {
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

    /// A record stays in librdkafka's queue, retried by it, until `message.timeout.ms` after
    /// it was queued, even once the attempt was abandoned.
    fn attempt_lifetime(&self) -> Option<Duration> {
        Some(self.message_timeout)
    }

    async fn publish(&self, event: &Event) -> Result<(), SinkError> {
        let topic = self.topic.render_with(event, topic_value);
        // Kafka refuses a topic name over 249 characters; a template with long values can
        // render one, and it never fits.
        if topic.len() > MAX_TOPIC || topic.is_empty() || topic == "." || topic == ".." {
            return Err(SinkError::permanent(
                "invalid_topic",
                format!(
                    "the rendered topic ({} characters) is not a valid Kafka topic name",
                    topic.len()
                ),
            ));
        }
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
                Ok(_) => {
                    self.failures.success();
                    return Ok(());
                }
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
        // fetch_metadata blocks: keep it off the runtime's workers. With topics known in
        // advance (no placeholder but `{event}`), each is asked for: a missing topic makes
        // every event of its kind fail, so it shows here rather than at the first event.
        let topics = self.check_topics.clone();
        let missing = tokio::task::spawn_blocking(move || {
            let client = producer.client();
            if topics.is_empty() {
                return client
                    .fetch_metadata(None, Duration::from_secs(2))
                    .map(|_| None);
            }
            for topic in &topics {
                let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(2))?;
                let absent = metadata.topics().iter().any(|t| {
                    t.name() == topic
                        && t.error().is_some_and(|e| {
                            RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition
                        })
                });
                if absent {
                    return Ok(Some(topic.clone()));
                }
            }
            Ok(None)
        })
        .await
        .map_err(|e| SinkError::retryable("health_check", e.to_string()))?
        .map_err(|e: KafkaError| {
            SinkError::retryable(
                "broker_down",
                format!("no Kafka broker answered a metadata request: {e}"),
            )
            .with_source(e)
        })?;
        if let Some(topic) = missing {
            return Err(SinkError::permanent(
                "unknown_topic",
                format!(
                    "topic {topic} does not exist (create it, or let the broker create topics)"
                ),
            ));
        }
        self.failures.success();
        Ok(())
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

    proptest::proptest! {
        /// Whatever a parameter holds, the topic text it renders uses only Kafka's legal
        /// characters (the length is checked when publishing).
        #[test]
        fn every_value_renders_legal_topic_characters(value in "\\PC{0,40}") {
            let mut out = String::new();
            topic_value(&value, &mut out);
            proptest::prop_assert!(out.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')), "{out:?}");
            proptest::prop_assert_eq!(out.chars().count(), value.chars().count());
        }
    }

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

    fn with_properties(pairs: &[(&str, &str)]) -> KafkaSinkConfig {
        serde_json::from_value(serde_json::json!({
            "name": "k",
            "brokers": "kafka-1:9093",
            "properties": pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        }))
        .unwrap()
    }

    /// `linger` reaches librdkafka as it was written, a fraction of a millisecond included
    /// (`as_millis` once turned "500us" into 0, a request per record).
    #[test]
    fn linger_keeps_fractions_of_a_millisecond() {
        for (linger, expected) in [
            ("500us", "0.5"),
            ("1ms", "1"),
            ("2ms 500us", "2.5"),
            ("0s", "0"),
        ] {
            let mut config = with_properties(&[]);
            config.linger = humantime::parse_duration(linger).unwrap();
            let native = config.client_config().create_native_config().unwrap();
            assert_eq!(native.get("linger.ms").unwrap(), expected, "{linger}");
        }
    }

    /// A managed Kafka needs TLS, SASL (PLAIN, SCRAM, OAUTHBEARER) and the usual codecs: this
    /// build has them, and validation accepts such a configuration.
    #[test]
    fn tls_sasl_and_every_codec_are_built_in() {
        let limits = Limits::default();
        for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] {
            for codec in ["zstd", "lz4", "snappy", "gzip"] {
                let config = with_properties(&[
                    ("security.protocol", "SASL_SSL"),
                    ("sasl.mechanisms", mechanism),
                    ("sasl.username", "u"),
                    ("sasl.password", "p"),
                    ("compression.type", codec),
                ]);
                if let Err(errors) = config.plan(&limits) {
                    panic!("{mechanism} + {codec}: {errors:?}");
                }
            }
        }
        assert!(with_properties(&[("security.protocol", "SSL")])
            .plan(&limits)
            .is_ok());
    }

    /// What this build cannot honour fails validation (`check-config`, exit 64) with the key
    /// and the reason, never at `run`; a secret value is not echoed.
    #[test]
    fn what_this_build_cannot_honour_fails_validation() {
        let limits = Limits::default();
        for (pairs, expected) in [
            (
                vec![
                    ("security.protocol", "SASL_SSL"),
                    ("sasl.mechanisms", "GSSAPI"),
                ],
                "SASL mechanism GSSAPI is not in this build",
            ),
            (
                vec![
                    ("security.protocol", "SASL_PLAINTEXT"),
                    ("sasl.mechanism", "NTLM"),
                ],
                "unknown SASL mechanism",
            ),
            (vec![("compression.type", "brotli")], "compression.type"),
            (vec![("no.such.property", "1")], "no.such.property"),
            (
                vec![("sasl.password", "hunter2"), ("sasl.passwordd", "x")],
                "sasl.passwordd",
            ),
        ] {
            let errors = with_properties(&pairs)
                .plan(&limits)
                .err()
                .unwrap()
                .join("\n");
            assert!(errors.contains(expected), "{pairs:?}: {errors}");
            assert!(errors.contains("sinks.k.properties"), "{errors}");
            assert!(!errors.contains("hunter2"), "{errors}");
        }
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
