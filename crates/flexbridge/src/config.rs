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
    /// Open connections at most; a connection beyond it is closed at once, so idle or slow
    /// clients cannot take the descriptors the webhook listener needs.
    pub max_connections: usize,
    /// A connection that has not sent a request's headers within this time is closed
    /// (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            health_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(2),
            max_connections: 64,
            header_read_timeout: Duration::from_secs(5),
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

/// Loads the file (if any) and the environment, expands `${NAME}` / `${file:...}`
/// references, and validates the result.
pub fn load(path: Option<&Path>) -> Result<AppConfig, ConfigErrors> {
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let mut value = read(path, &vars)?;
    let errors = crate::expand::expand(&mut value, &crate::expand::from_env);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let env_token = std::env::var("TWILIO_AUTH_TOKEN").ok();
    from_value(value, env_token.as_deref())
}

const ENV_PREFIX: &str = "FLEXBRIDGE__";
const ENV_SINKS: &str = "FLEXBRIDGE__SINKS__";

/// The file and the `FLEXBRIDGE__*` variables as one document. The `config` crate merges the
/// sections; `[[sinks]]` entries are a list it cannot index, so their variables
/// (`FLEXBRIDGE__SINKS__<index>__<key>[__<key>...]`) are applied here.
fn read(path: Option<&Path>, vars: &[(String, String)]) -> Result<Value, ConfigErrors> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        builder = builder.add_source(config::File::from(path).required(true));
    }
    let sections: std::collections::HashMap<String, String> = vars
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !k.starts_with(ENV_SINKS))
        .cloned()
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("FLEXBRIDGE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("twilio.auth_tokens")
            .with_list_parse_key("twilio.account_sids")
            .source(Some(sections)),
    );
    let raw = builder
        .build()
        .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
    let mut value: Value = raw
        .try_deserialize()
        .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
    let mut errors = Vec::new();
    let mut overrides: Vec<&(String, String)> = vars
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_SINKS))
        .collect();
    // In index order, so `FLEXBRIDGE__SINKS__2__*` may add a third sink after the file's two.
    overrides.sort_by_key(|(k, _)| {
        let index = k[ENV_SINKS.len()..].split("__").next().unwrap_or("");
        (index.parse::<usize>().unwrap_or(usize::MAX), k.clone())
    });
    for (key, text) in overrides {
        if let Err(e) = override_sink(&mut value, &key[ENV_SINKS.len()..], text) {
            errors.push(format!("{key}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(value)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Sets `sinks[index].a.b` from `INDEX__A__B` (keys lowercased, as for the sections).
fn override_sink(document: &mut Value, rest: &str, text: &str) -> Result<(), String> {
    let mut parts = rest.split("__");
    let index: usize = parts
        .next()
        .and_then(|i| i.parse().ok())
        .ok_or("expected FLEXBRIDGE__SINKS__<index>__<key>")?;
    let keys: Vec<String> = parts.map(str::to_ascii_lowercase).collect();
    if keys.is_empty() || keys.iter().any(String::is_empty) {
        return Err("expected FLEXBRIDGE__SINKS__<index>__<key>".into());
    }
    if document.is_null() {
        *document = Value::Object(serde_json::Map::new());
    }
    let Value::Object(root) = document else {
        return Err("the configuration is not a table".into());
    };
    let sinks = root
        .entry("sinks")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(sinks) = sinks else {
        return Err("sinks: must be a list of tables ([[sinks]])".into());
    };
    if index > sinks.len() {
        return Err(format!(
            "there are {} sinks: a new one takes index {}",
            sinks.len(),
            sinks.len()
        ));
    }
    if index == sinks.len() {
        sinks.push(Value::Object(serde_json::Map::new()));
    }
    let mut slot = &mut sinks[index];
    for key in &keys {
        let Value::Object(table) = slot else {
            return Err(format!("{key}: its parent is not a table"));
        };
        slot = table.entry(key.clone()).or_insert(Value::Null);
    }
    // The type comes from what the file has there; a new key is guessed like the sections'.
    *slot = match slot {
        Value::String(_) => Value::String(text.to_owned()),
        Value::Bool(_) | Value::Number(_) => serde_json::from_str(text)
            .map_err(|_| format!("expected the type the file has, got {text:?}"))?,
        _ => scalar(text),
    };
    Ok(())
}

/// `true`/`false`, an integer, or else the text.
fn scalar(text: &str) -> Value {
    match text {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_owned())),
    }
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
                    SinkConfig::deserialize_all(item.clone(), &format!("sinks[{i}]"), &mut errors)
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
        Some(value) => deserialize_all(value.clone(), name, errors).unwrap_or_default(),
    }
}

/// Deserializes `value`, reporting every bad key at once as `prefix.key.path: message`: a key
/// that fails is reported, removed, and the rest tried again (sections take defaults for what
/// is missing). None if anything failed.
pub(crate) fn deserialize_all<T: DeserializeOwned>(
    mut value: Value,
    prefix: &str,
    errors: &mut Vec<String>,
) -> Option<T> {
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..32 {
        match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(parsed) => return removed.is_empty().then_some(parsed),
            Err(e) => {
                let path = e.path().to_string();
                let message = friendly(&e.inner().to_string());
                let at = if path == "." || path.is_empty() {
                    prefix.to_owned()
                } else if path.starts_with('[') {
                    format!("{prefix}{path}")
                } else {
                    format!("{prefix}.{path}")
                };
                // Removing a required key only to hear it is missing says nothing new.
                if message.starts_with("missing field") && !removed.is_empty() {
                    return None;
                }
                errors.push(format!("{at}: {message}"));
                let culprit = match message.strip_prefix("unknown field `") {
                    Some(rest) => {
                        let field = rest.split('`').next().unwrap_or("");
                        if path == "." || path.is_empty() {
                            field.to_owned()
                        } else if path == field || path.ends_with(&format!(".{field}")) {
                            path.clone()
                        } else {
                            format!("{path}.{field}")
                        }
                    }
                    None => path.clone(),
                };
                if culprit.is_empty() || culprit == "." || !remove(&mut value, &culprit) {
                    return None;
                }
                removed.push(culprit);
            }
        }
    }
    None
}

/// Removes the key at a `serde_path_to_error` path (`a.b`, `a[0].b`); false if not there.
fn remove(value: &mut Value, path: &str) -> bool {
    let mut segments: Vec<&str> = Vec::new();
    for part in path.split('.') {
        let mut part = part;
        while let Some(open) = part.find('[') {
            if open > 0 {
                segments.push(&part[..open]);
            }
            let close = part[open..].find(']').map_or(part.len(), |c| open + c);
            segments.push(&part[open..=close.min(part.len() - 1)]);
            part = &part[(close + 1).min(part.len())..];
        }
        if !part.is_empty() {
            segments.push(part);
        }
    }
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut slot = value;
    for segment in parents {
        slot = match (
            slot,
            segment.strip_prefix('[').and_then(|s| s.strip_suffix(']')),
        ) {
            (Value::Array(items), Some(i)) => {
                match i.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(item) => item,
                    None => return false,
                }
            }
            (Value::Object(map), None) => match map.get_mut(*segment) {
                Some(item) => item,
                None => return false,
            },
            _ => return false,
        };
    }
    match (
        slot,
        last.strip_prefix('[').and_then(|s| s.strip_suffix(']')),
    ) {
        (Value::Array(items), Some(i)) => match i.parse::<usize>() {
            Ok(i) if i < items.len() => {
                items.remove(i);
                true
            }
            _ => false,
        },
        (Value::Object(map), None) => map.remove(*last).is_some(),
        _ => false,
    }
}

/// serde's `invalid type: string "big", expected usize` as `expected a non-negative integer,
/// got "big"`.
fn friendly(message: &str) -> String {
    let Some(rest) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
    else {
        return message.to_owned();
    };
    let Some((got, expected)) = rest.split_once(", expected ") else {
        return message.to_owned();
    };
    let expected = match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a non-negative integer",
        "i64" | "i32" | "isize" => "an integer",
        "f64" | "f32" => "a number",
        other => other,
    };
    let got = got
        .strip_prefix("string ")
        .or_else(|| got.strip_prefix("integer "))
        .or_else(|| got.strip_prefix("floating point "))
        .unwrap_or(got)
        .trim_matches('`');
    format!("expected {expected}, got {got}")
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
        (
            "admin.header_read_timeout",
            config.admin.header_read_timeout,
        ),
    ] {
        if value.is_zero() {
            errors.push(format!("{key}: must be greater than zero"));
        }
    }
    if config.admin.max_connections == 0 {
        errors.push("admin.max_connections: must be at least 1".to_owned());
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
            "ingress.lisen: unknown field `lisen`",
            "twilio.account_sids",
            "delivery: max_attempts",
            "unknown section `extra_section`",
            "sinks[0]: missing field `path`",
            "sinks[1].type: unknown sink type `kafkaa`, expected one of `file`, `stdout`, `nats`, `rabbitmq`, `kafka`",
            "\"c\" is used twice",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    /// A type error names the key path and the expected form, and every bad key of a section
    /// (or a sink) is reported, not only the first.
    #[test]
    fn type_errors_name_the_key_and_all_are_reported() {
        let errors = from_value(
            json!({
                "ingress": {"max_body_bytes": "big", "listen": 5, "lisen": "x"},
                "admin": {"health_interval": "soon"},
                "sinks": [{"type": "rabbitmq", "name": "r", "uri": "amqp://h", "connect_timeout": 5, "heartbeat": "often"}]
            }),
            Some("tok"),
        )
        .unwrap_err()
        .0
        .join("\n");
        for expected in [
            "ingress.max_body_bytes: expected a non-negative integer, got \"big\"",
            "ingress.listen:",
            "ingress.lisen: unknown field `lisen`",
            "admin.health_interval: expected a duration, got \"soon\"",
            "sinks[0].connect_timeout: expected a duration, got 5",
            "sinks[0].heartbeat:",
        ] {
            assert!(
                errors.contains(expected),
                "missing {expected:?} in:\n{errors}"
            );
        }
        assert!(errors.lines().count() >= 6, "{errors}");
    }

    /// `FLEXBRIDGE__SINKS__<i>__<key>` overrides a sink's setting (typed like the file's value),
    /// may add a sink at the next index, and a gap is an error naming the variable.
    #[test]
    fn sink_settings_can_be_overridden_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("flexbridge.toml");
        std::fs::write(
            &file,
            "[[sinks]]\nname = \"events\"\ntype = \"file\"\npath = \"/tmp/a.jsonl\"\n",
        )
        .unwrap();
        let vars = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let value = read(
            Some(&file),
            &vars(&[
                ("FLEXBRIDGE__SINKS__0__PATH", "/data/events.jsonl"),
                ("FLEXBRIDGE__SINKS__1__TYPE", "stdout"),
                ("FLEXBRIDGE__SINKS__1__NAME", "console"),
                ("FLEXBRIDGE__INGRESS__MAX_BODY_BYTES", "4096"),
            ]),
        )
        .unwrap();
        let config = from_value(value, Some("tok")).unwrap();
        assert_eq!(config.ingress.max_body_bytes, 4096);
        assert_eq!(config.sinks.len(), 2);
        let SinkConfig::File(sink) = &config.sinks[0] else {
            panic!("{:?}", config.sinks[0]);
        };
        assert_eq!(sink.path, Path::new("/data/events.jsonl"));
        assert_eq!(config.sinks[1].name(), "console");
        let errors = read(Some(&file), &vars(&[("FLEXBRIDGE__SINKS__3__NAME", "x")]))
            .unwrap_err()
            .0
            .join("\n");
        assert!(
            errors
                .contains("FLEXBRIDGE__SINKS__3__NAME: there are 1 sinks: a new one takes index 1"),
            "{errors}"
        );
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
