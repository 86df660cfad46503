//! `type = "rabbitmq"` settings.

use flexbridge_core::route::Template;
use flexbridge_core::secret::redact_url;
use flexbridge_core::{ContentMode, Secret};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::time::Duration;

/// `type = "rabbitmq"`: publish to a RabbitMQ exchange with publisher confirms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqSinkConfig {
    /// Unique sink name, used in metrics and logs.
    pub name: String,
    /// `amqp://user:password@host:5672/vhost` or `amqps://...`; the password is redacted in
    /// logs and `check-config`.
    #[serde(serialize_with = "redacted")]
    pub uri: Secret,
    /// Exchange to publish to.
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// Routing key: a plain key or a template (placeholders as for every sink; values have
    /// `.` and white space replaced by `_`, `{event}` stays `object.action`).
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
    /// `binary` (`cloudEvents_*` headers, `data` as body) or `structured` (the envelope).
    #[serde(default)]
    pub content_mode: ContentMode,
    /// Topology to declare at connection; without it, the exchange must exist (checked
    /// passively, with a clear error when it does not).
    #[serde(default)]
    pub declare: Option<Declare>,
    /// Longest wait for one connection attempt.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// AMQP heartbeat proposed to the broker (the lower of both wins). A connection that goes
    /// silent (packets dropped, no reset) is closed and re-opened after two intervals without
    /// traffic; `0s` leaves it to the broker (RabbitMQ: 60 s). A `heartbeat` query parameter in
    /// `uri` takes precedence.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// `[sinks.tls]` for an `amqps://` URI: the CA that signed the broker's certificate
    /// (default: the system's roots).
    #[serde(default)]
    pub tls: RabbitTls,
}

/// `[sinks.tls]` of a RabbitMQ sink.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitTls {
    /// PEM file of the CA (or chain) that signed the broker's certificate.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Topology declared at connection: the exchange, and queues bound to it for a quick start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declare {
    /// Exchange type: `topic`, `direct`, `fanout` or `headers`.
    #[serde(default = "default_exchange_type")]
    pub exchange_type: String,
    /// Durable exchange (survives a broker restart).
    #[serde(default = "yes")]
    pub durable: bool,
    /// Queues to declare and bind.
    #[serde(default)]
    pub queues: Vec<QueueDeclare>,
}

/// A queue declared and bound at connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueDeclare {
    /// Queue name.
    pub name: String,
    /// Durable queue.
    #[serde(default = "yes")]
    pub durable: bool,
    /// Binding keys (e.g. `channel.#`); default `#`, everything.
    #[serde(default = "default_bindings")]
    pub bindings: Vec<String>,
    /// Queue arguments, e.g. `x-max-length = 100000`, `x-queue-type = "quorum"`.
    #[serde(default)]
    pub arguments: BTreeMap<String, Argument>,
}

/// A queue argument value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Argument {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A string.
    Text(String),
}

fn default_exchange() -> String {
    "flex.interactions".to_owned()
}
fn default_routing_key() -> String {
    "{event}".to_owned()
}
fn default_exchange_type() -> String {
    "topic".to_owned()
}
fn default_bindings() -> Vec<String> {
    vec!["#".to_owned()]
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}

impl RabbitMqSinkConfig {
    /// The URI to connect to: `uri` with the configured heartbeat, unless it names one.
    pub(crate) fn connect_uri(&self) -> String {
        let uri = self.uri.expose();
        if self.heartbeat.is_zero() || uri.contains("heartbeat=") {
            return uri.to_owned();
        }
        let sep = if uri.contains('?') { '&' } else { '?' };
        format!(
            "{uri}{sep}heartbeat={}",
            self.heartbeat.as_secs().clamp(1, 65535)
        )
    }
}
fn yes() -> bool {
    true
}

fn redacted<S: Serializer>(uri: &Secret, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redact_url(uri.expose()))
}

impl RabbitMqSinkConfig {
    /// Every problem, as `sinks.<name>.<key>: message`.
    pub(crate) fn check(&self) -> (Option<Template>, Vec<String>) {
        let key = |k: &str| format!("sinks.{}.{k}", self.name);
        let mut errors = Vec::new();
        let uri = self.uri.expose();
        if !(uri.starts_with("amqp://") || uri.starts_with("amqps://")) {
            errors.push(format!(
                "{}: {} must start with amqp:// or amqps://",
                key("uri"),
                redact_url(uri)
            ));
        }
        let routing_key = Template::parse(&self.routing_key)
            .map_err(|e| errors.push(format!("{}: {e}", key("routing_key"))))
            .ok();
        if self.exchange.len() > 255 {
            errors.push(format!("{}: longer than 255 bytes", key("exchange")));
        }
        if let Some(declare) = &self.declare {
            if !matches!(
                declare.exchange_type.as_str(),
                "topic" | "direct" | "fanout" | "headers"
            ) {
                errors.push(format!(
                    "{}: {:?} is not topic, direct, fanout or headers",
                    key("declare.exchange_type"),
                    declare.exchange_type
                ));
            }
            if self.exchange.is_empty() {
                errors.push(format!(
                    "{}: the default exchange cannot be declared",
                    key("declare")
                ));
            }
            for queue in &declare.queues {
                if queue.name.is_empty() {
                    errors.push(format!("{}: a queue needs a name", key("declare.queues")));
                }
            }
        }
        if self.connect_timeout.is_zero() {
            errors.push(format!(
                "{}: must be greater than zero",
                key("connect_timeout")
            ));
        }
        (routing_key, errors)
    }
}
