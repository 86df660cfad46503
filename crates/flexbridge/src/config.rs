//! The daemon's configuration: a TOML or YAML file (by extension), then environment overrides
//! `FLEXBRIDGE__SECTION__KEY`, then defaults. Validation is a pure step that reports every
//! problem at once, before anything is bound or connected.

pub use crate::sinks::SinkConfig;
use crate::webhooks::declarations::validate_webhooks;
pub use crate::webhooks::declarations::WebhookDecl;
use flexbridge_core::Limits;
use flexbridge_core::{DeliveryConfig, Secret};
use flexbridge_ingress::{IngressConfig, TwilioConfig};
use flexbridge_sink_file::StdoutSinkConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// `[ingress]`: the webhook listener.
    #[serde(default)]
    pub ingress: IngressConfig,
    /// `[twilio]`: signature verification.
    #[serde(default)]
    pub twilio: TwilioConfig,
    /// `[delivery]`: when a webhook is acknowledged (mode), deadline and retries.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// `[spool]`: the durable local spool of `delivery.mode = "spool"`.
    #[serde(default)]
    pub spool: flexbridge_spool::SpoolConfig,
    /// `[admin]`: health, readiness and metrics.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[shutdown]`: graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// `[[sinks]]`: where events go; every sink must confirm before a webhook gets 200.
    #[serde(default = "default_sinks")]
    pub sinks: Vec<SinkConfig>,
    /// `[[webhooks]]`: the Flex registrations `flexbridge webhooks ensure` maintains.
    #[serde(default)]
    pub webhooks: Vec<WebhookDecl>,
}

impl AppConfig {
    /// What every sink's validation must respect.
    pub fn limits(&self) -> Limits {
        Limits {
            ack_timeout: self.delivery.ack_timeout,
        }
    }
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            ingress: IngressConfig::default(),
            twilio: TwilioConfig::default(),
            delivery: DeliveryConfig::default(),
            spool: flexbridge_spool::SpoolConfig::default(),
            admin: AdminConfig::default(),
            shutdown: ShutdownConfig::default(),
            sinks: default_sinks(),
            webhooks: Vec::new(),
        }
    }
}

fn default_sinks() -> Vec<SinkConfig> {
    vec![SinkConfig::Stdout(Box::new(StdoutSinkConfig {
        name: "stdout".to_owned(),
        pretty: false,
    }))]
}

/// `[admin]`: the health, readiness and metrics listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
    /// How often every sink's health check runs.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// Limit for one sink health check.
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            health_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(2),
        }
    }
}

/// `[shutdown]`: what happens on SIGTERM or SIGINT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time between readiness turning false and the listener closing, so a load balancer
    /// stops sending first (Kubernetes: a few seconds).
    #[serde(with = "humantime_serde")]
    pub readiness_delay: Duration,
    /// Longest wait for in-flight requests once the listener is closed.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Longest wait for each sink's drain.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            readiness_delay: Duration::ZERO,
            grace_period: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Every problem found in the configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

const SECTIONS: &[&str] = &[
    "ingress", "twilio", "delivery", "spool", "admin", "shutdown", "sinks", "webhooks",
];

/// Loads the file (if any) and the environment, and validates the result.
pub fn load(path: Option<&Path>) -> Result<AppConfig, ConfigErrors> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        builder = builder.add_source(config::File::from(path).required(true));
    }
    builder = builder.add_source(
        config::Environment::with_prefix("FLEXBRIDGE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("twilio.auth_tokens")
            .with_list_parse_key("twilio.account_sids"),
    );
    let raw = builder
        .build()
        .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
    let value: Value = raw
        .try_deserialize()
        .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
    let env_token = std::env::var("TWILIO_AUTH_TOKEN").ok();
    from_value(value, env_token.as_deref())
}

/// Builds and validates a configuration from a parsed document, collecting every error: each
/// section and each sink is read on its own so one mistake does not hide the next.
pub fn from_value(value: Value, env_auth_token: Option<&str>) -> Result<AppConfig, ConfigErrors> {
    let mut errors = Vec::new();
    let empty = serde_json::Map::new();
    let table = match &value {
        Value::Object(map) => map,
        Value::Null => &empty,
        _ => {
            return Err(ConfigErrors(
                vec!["the configuration is not a table".into()],
            ))
        }
    };
    for key in table.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            errors.push(format!(
                "unknown section `{key}` (known: {})",
                SECTIONS.join(", ")
            ));
        }
    }
    let mut config = AppConfig {
        ingress: section(table, "ingress", &mut errors),
        twilio: section(table, "twilio", &mut errors),
        delivery: section(table, "delivery", &mut errors),
        spool: section(table, "spool", &mut errors),
        admin: section(table, "admin", &mut errors),
        shutdown: section(table, "shutdown", &mut errors),
        webhooks: section(table, "webhooks", &mut errors),
        sinks: match table.get("sinks") {
            None => default_sinks(),
            Some(Value::Array(items)) if items.is_empty() => {
                errors.push("sinks: at least one sink is needed".into());
                Vec::new()
            }
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    serde_json::from_value::<SinkConfig>(item.clone())
                        .map_err(|e| errors.push(format!("sinks[{i}]: {e}")))
                        .ok()
                })
                .collect(),
            Some(_) => {
                errors.push("sinks: must be a list of tables ([[sinks]])".into());
                Vec::new()
            }
        },
    };
    if let Some(token) = env_auth_token.filter(|t| !t.is_empty()) {
        let token = Secret::new(token);
        if !config.twilio.auth_tokens.contains(&token) {
            config.twilio.auth_tokens.push(token);
        }
    }
    errors.extend(validate(&config));
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

pub(crate) fn section<T: DeserializeOwned + Default>(
    table: &serde_json::Map<String, Value>,
    name: &str,
    errors: &mut Vec<String>,
) -> T {
    match table.get(name) {
        None => T::default(),
        Some(value) => serde_json::from_value(value.clone()).unwrap_or_else(|e| {
            errors.push(format!("{name}: {e}"));
            T::default()
        }),
    }
}

/// The semantic checks, each error as `key: message`.
pub fn validate(config: &AppConfig) -> Vec<String> {
    let mut errors = config.ingress.validate();
    errors.extend(config.twilio.validate());
    errors.extend(
        config
            .delivery
            .validate(config.sinks.iter().map(SinkConfig::name))
            .iter()
            .map(|p| format!("delivery: {p}")),
    );
    if config.delivery.mode == flexbridge_core::DeliveryMode::Spool {
        errors.extend(config.spool.validate());
    }
    if config.delivery.ack_timeout >= Duration::from_secs(15) {
        errors
            .push("delivery.ack_timeout: must stay below Twilio's 15 s request timeout".to_owned());
    }
    if config.admin.listen == config.ingress.listen && config.admin.listen.port() != 0 {
        errors.push(format!(
            "admin.listen: {} is also ingress.listen",
            config.admin.listen
        ));
    }
    for (key, value) in [
        ("admin.health_interval", config.admin.health_interval),
        ("admin.health_timeout", config.admin.health_timeout),
    ] {
        if value.is_zero() {
            errors.push(format!("{key}: must be greater than zero"));
        }
    }
    errors.extend(validate_webhooks(&config.webhooks));
    let limits = config.limits();
    let mut names = HashSet::new();
    for (i, sink) in config.sinks.iter().enumerate() {
        let name = sink.name();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            errors.push(format!(
                "sinks[{i}].name: {name:?} must be non-empty letters, digits, - or _"
            ));
        }
        if !names.insert(name) {
            errors.push(format!("sinks[{i}].name: {name:?} is used twice"));
        }
        errors.extend(sink.validate(&limits));
    }
    errors
}

/// The effective configuration as TOML, secrets redacted.
pub fn to_redacted_toml(config: &AppConfig) -> String {
    toml::to_string_pretty(config).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_need_only_a_secret() {
        let config = from_value(json!({}), Some("tok")).unwrap();
        assert_eq!(config.sinks, default_sinks());
        assert_eq!(config.twilio.auth_tokens, vec![Secret::new("tok")]);
        let errors = from_value(json!({}), None).unwrap_err().0;
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("no secret"), "{errors:?}");
    }

    #[test]
    fn every_error_is_reported_together() {
        let errors = from_value(
            json!({
                "ingress": {"lisen": "x"},
                "twilio": {"auth_tokens": ["t"], "account_sids": ["nope"]},
                "delivery": {"max_attempts": 0},
                "extra_section": {},
                "sinks": [
                    {"type": "file", "name": "a"},
                    {"type": "kafkaa", "name": "b"},
                    {"type": "stdout", "name": "c"},
                    {"type": "stdout", "name": "c"}
                ]
            }),
            None,
        )
        .unwrap_err()
        .0;
        let all = errors.join("\n");
        for expected in [
            "ingress: unknown field `lisen`",
            "twilio.account_sids",
            "delivery: max_attempts",
            "unknown section `extra_section`",
            "sinks[0]: missing field `path`",
            "sinks[1]: unknown variant `kafkaa`, expected one of `file`, `stdout`, `nats`, `rabbitmq`, `kafka`",
            "\"c\" is used twice",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    #[test]
    fn nats_sinks_are_validated_and_their_secrets_redacted() {
        let errors = from_value(
            json!({"sinks": [{"type": "nats", "name": "n", "url": "nats://a:4222", "subject": "x.{nope}",
                              "token": "t", "nkey_seed": "s", "stream": {"name": "bad name"}}]}),
            Some("tok"),
        )
        .unwrap_err()
        .0
        .join("\n");
        for expected in [
            "unknown placeholder {nope}",
            "use one of",
            "not a valid stream name",
        ] {
            assert!(
                errors.contains(expected),
                "missing {expected:?} in {errors}"
            );
        }
        let config = from_value(
            json!({"sinks": [{"type": "nats", "name": "n", "url": ["nats://user:pw@a:4222", "nats://b:4222"],
                              "token": "tok-secret"}]}),
            Some("tok"),
        )
        .unwrap();
        let text = to_redacted_toml(&config);
        assert!(
            !text.contains("pw@") && !text.contains("tok-secret"),
            "{text}"
        );
        assert!(text.contains("nats://b:4222"));
        let config = from_value(
            json!({"sinks": [{"type": "rabbitmq", "name": "r", "uri": "amqp://guest:hunter2@rabbit:5672/%2f"}]}),
            Some("tok"),
        )
        .unwrap();
        let text = to_redacted_toml(&config);
        assert!(
            !text.contains("hunter2") && text.contains("amqp://guest:**REDACTED**@rabbit"),
            "{text}"
        );
        assert!(!format!("{config:?}").contains("hunter2"));
        let errors = from_value(
            json!({"sinks": [{"type": "rabbitmq", "name": "r", "uri": "http://x", "routing_key": "{bad}"}]}),
            Some("tok"),
        )
        .unwrap_err()
        .0
        .join("\n");
        assert!(
            errors.contains("amqp://") && errors.contains("unknown placeholder"),
            "{errors}"
        );
    }

    /// Every kind of secret a configuration can hold stays out of `Debug` output and out of
    /// the printed configuration (`check-config`).
    #[test]
    fn no_secret_prints_in_debug_or_check_config() {
        let secrets = [
            "tok-SECRET-1",
            "shared-SECRET-2",
            "natspw-SECRET-3",
            "natstoken-SECRET-4",
            "SUAseed-SECRET-5",
            "rabbitpw-SECRET-6",
            "kafkapw-SECRET-7",
            "natsurlpw-SECRET-8",
        ];
        let config = from_value(
            json!({
                "twilio": {"auth_tokens": [secrets[0]], "shared_keys": {"k": secrets[1]}},
                "sinks": [
                    {"type": "nats", "name": "n1", "url": format!("nats://u:{}@h:4222", secrets[7]),
                     "user": "u", "password": secrets[2]},
                    {"type": "nats", "name": "n2", "url": "nats://h:4222", "token": secrets[3]},
                    {"type": "nats", "name": "n3", "url": "nats://h:4222", "nkey_seed": secrets[4]},
                    {"type": "rabbitmq", "name": "r", "uri": format!("amqp://u:{}@h/%2f", secrets[5])},
                    {"type": "kafka", "name": "k", "brokers": "h:9092",
                     "properties": {"sasl.password": secrets[6]}}
                ]
            }),
            None,
        )
        .unwrap();
        let debug = format!("{config:?}");
        let printed = to_redacted_toml(&config);
        for secret in secrets {
            assert!(!debug.contains(secret), "{secret} in Debug: {debug}");
            assert!(!printed.contains(secret), "{secret} printed: {printed}");
        }
        assert!(debug.contains("**REDACTED**"));
    }

    #[test]
    fn redacted_output_hides_secrets_and_round_trips() {
        let config = from_value(
            json!({"twilio": {"auth_tokens": ["super-secret"], "shared_keys": {"k1": "also-secret"}}}),
            None,
        )
        .unwrap();
        let text = to_redacted_toml(&config);
        assert!(
            !text.contains("super-secret") && !text.contains("also-secret"),
            "{text}"
        );
        assert!(text.contains("**REDACTED**"));
        let parsed: AppConfig = toml::from_str(&text).unwrap();
        assert_eq!(parsed.ingress, config.ingress);
        assert!(!format!("{config:?}").contains("super-secret"));
    }

    /// The shipped example configurations and the Helm chart's config parse and validate.
    #[test]
    fn shipped_examples_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut checked = 0;
        for dir in ["deploy", "helm/flexbridge"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                if !matches!(ext, "toml" | "yaml" | "yml") || path.ends_with("Chart.yaml") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let value: Value = if ext == "toml" {
                    toml::from_str(&text).unwrap()
                } else {
                    // values.yaml holds the daemon's config under `config`.
                    let raw = config::Config::builder()
                        .add_source(config::File::from_str(&text, config::FileFormat::Yaml))
                        .build()
                        .unwrap()
                        .try_deserialize::<Value>()
                        .unwrap();
                    raw.get("config").cloned().unwrap_or(raw)
                };
                if let Err(e) = from_value(value, Some("example-token")) {
                    panic!("{}: {e}", path.display());
                }
                checked += 1;
            }
        }
        assert!(checked >= 3, "only {checked} example configs found");
    }
}
