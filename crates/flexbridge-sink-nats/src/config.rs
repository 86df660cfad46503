//! `type = "nats"` settings.

use flexbridge_core::route::Template;
use flexbridge_core::secret::redact_url;
use flexbridge_core::{ContentMode, Secret};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::PathBuf;
use std::time::Duration;

/// `type = "nats"`: publish to NATS JetStream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSinkConfig {
    /// Unique sink name, used in metrics and logs.
    pub name: String,
    /// Server URL or list of URLs, e.g. `nats://127.0.0.1:4222` or `tls://nats.example:4222`.
    pub url: ServerUrls,
    /// Subject template; placeholders are made subject-safe (`.`, `*`, `>`, spaces become `_`).
    #[serde(default = "default_subject")]
    pub subject: String,
    /// `binary` (ce-* headers, `data` as payload) or `structured` (the whole envelope).
    #[serde(default)]
    pub content_mode: ContentMode,
    /// Publish through JetStream and wait for the PubAck. `false` is core NATS: at-most-once,
    /// warned about at start-up.
    #[serde(default = "yes")]
    pub jetstream: bool,
    /// Create (or check) this stream at start-up; without it, a stream must already capture
    /// the subjects.
    #[serde(default)]
    pub stream: Option<StreamConfig>,
    /// User name (with `password`).
    #[serde(default)]
    pub user: Option<String>,
    /// Password (with `user`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// Authentication token.
    #[serde(default)]
    pub token: Option<Secret>,
    /// NKey seed (`SU...`).
    #[serde(default)]
    pub nkey_seed: Option<Secret>,
    /// Credentials file (JWT and NKey seed), as `nsc` writes it.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// TLS settings.
    #[serde(default)]
    pub tls: NatsTls,
    /// Longest wait for a PubAck before the attempt counts as a retryable timeout.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Longest wait for one connection attempt.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often the client pings the server; a connection that goes silent (packets dropped,
    /// no reset) is dropped and re-opened after about three intervals without an answer.
    #[serde(default = "default_ping_interval", with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Client connections publishes are spread over, in turn (1-16). The server reads each
    /// connection on a goroutine of its own, so more than one can help a server with cores to
    /// spare; on a machine shared with the server it made no difference (docs/bench).
    #[serde(default = "default_connections")]
    pub connections: usize,
}

/// TLS to the NATS servers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// Refuse to connect without TLS.
    #[serde(default)]
    pub required: bool,
    /// CA certificates (PEM) to trust.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM), with `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// A stream provisioned at start-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Stream name (no spaces, `.`, `*` or `>`).
    pub name: String,
    /// Subjects the stream captures; default: every subject the sink's template can produce.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// `file` or `memory`.
    #[serde(default)]
    pub storage: Storage,
    /// Window in which JetStream drops a second message with the same event id.
    #[serde(default = "default_duplicate_window", with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Discard messages older than this (unset: keep by the other limits).
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Keep at most this many messages, discarding the oldest (unset: no limit).
    #[serde(default)]
    pub max_messages: Option<i64>,
    /// Keep at most this many bytes, discarding the oldest (unset: no limit).
    #[serde(default)]
    pub max_bytes: Option<i64>,
    /// `limits`, `interest` or `workqueue`.
    #[serde(default)]
    pub retention: Retention,
    /// Replicas in a cluster.
    #[serde(default = "one")]
    pub replicas: usize,
}

/// Stream storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk.
    #[default]
    File,
    /// In memory.
    Memory,
}

/// Stream retention policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    /// Keep by limits.
    #[default]
    Limits,
    /// Keep while a consumer is interested.
    Interest,
    /// Remove once acknowledged.
    Workqueue,
}

impl StreamConfig {
    pub(crate) fn to_nats(&self, subjects: Vec<String>) -> async_nats::jetstream::stream::Config {
        use async_nats::jetstream::stream;
        stream::Config {
            name: self.name.clone(),
            subjects,
            storage: match self.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            duplicate_window: self.duplicate_window,
            max_age: self.max_age.unwrap_or_default(),
            max_messages: self.max_messages.unwrap_or(-1),
            max_bytes: self.max_bytes.unwrap_or(-1),
            retention: match self.retention {
                Retention::Limits => stream::RetentionPolicy::Limits,
                Retention::Interest => stream::RetentionPolicy::Interest,
                Retention::Workqueue => stream::RetentionPolicy::WorkQueue,
            },
            num_replicas: self.replicas,
            ..Default::default()
        }
    }
}

fn default_subject() -> String {
    "flex.interactions.{account}.{event}".to_owned()
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(3)
}
/// Most client connections one sink opens.
pub const MAX_CONNECTIONS: usize = 16;
fn default_connections() -> usize {
    1
}
fn default_ping_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}

/// NATS server URLs: one (a comma-separated list works too) or a list in the configuration.
/// A password inside a URL never prints: `Debug` and serialization redact it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ServerUrls(pub Vec<String>);

impl From<Vec<String>> for ServerUrls {
    fn from(urls: Vec<String>) -> Self {
        Self(urls)
    }
}

impl std::ops::Deref for ServerUrls {
    type Target = Vec<String>;
    fn deref(&self) -> &Vec<String> {
        &self.0
    }
}

impl std::fmt::Debug for ServerUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|u| redact_url(u)))
            .finish()
    }
}

impl<'de> Deserialize<'de> for ServerUrls {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(Self(match OneOrMany::deserialize(deserializer)? {
            OneOrMany::One(url) => url.split(',').map(|u| u.trim().to_owned()).collect(),
            OneOrMany::Many(urls) => urls,
        }))
    }
}

impl Serialize for ServerUrls {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|u| redact_url(u)))
    }
}

impl NatsSinkConfig {
    /// The parsed subject template, and every problem as `sinks.<name>.<key>: message`.
    pub(crate) fn check(&self) -> (Option<Template>, Vec<String>) {
        let key = |k: &str| format!("sinks.{}.{k}", self.name);
        let mut errors = Vec::new();
        let mut subject = None;
        if self.url.is_empty() || self.url.iter().any(|u| u.trim().is_empty()) {
            errors.push(format!("{}: at least one server URL is needed", key("url")));
        }
        match Template::parse(&self.subject) {
            Err(e) => errors.push(format!("{}: {e}", key("subject"))),
            Ok(t) => {
                let pattern = t.pattern("event", "x");
                if pattern.split('.').any(|token| {
                    token.is_empty()
                        || token
                            .chars()
                            .any(|c| c.is_whitespace() || c == '*' || c == '>')
                }) {
                    errors.push(format!(
                        "{}: {:?} is not a valid subject (empty token, space, * or >)",
                        key("subject"),
                        self.subject
                    ));
                }
                subject = Some(t);
            }
        }
        let methods = [
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some(),
            self.credentials_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            errors.push(format!(
                "sinks.{}: use one of user/password, token, nkey_seed, credentials_file",
                self.name
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            errors.push(format!(
                "sinks.{}: user and password go together",
                self.name
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            errors.push(format!(
                "{}: cert_file and key_file go together",
                key("tls")
            ));
        }
        if self.ack_timeout.is_zero()
            || self.connect_timeout.is_zero()
            || self.ping_interval.is_zero()
        {
            errors.push(format!(
                "sinks.{}: timeouts must be greater than zero",
                self.name
            ));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            errors.push(format!(
                "{}: {} is out of range (1 to {MAX_CONNECTIONS})",
                key("connections"),
                self.connections
            ));
        }
        if let Some(stream) = &self.stream {
            if stream.name.is_empty()
                || stream
                    .name
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
            {
                errors.push(format!(
                    "{}: {:?} is not a valid stream name",
                    key("stream.name"),
                    stream.name
                ));
            }
            if stream.duplicate_window.is_zero() {
                errors.push(format!(
                    "{}: must be greater than zero, or duplicates are not dropped",
                    key("stream.duplicate_window")
                ));
            }
            if !self.jetstream {
                errors.push(format!("{}: needs jetstream = true", key("stream")));
            }
        }
        (subject, errors)
    }
}
