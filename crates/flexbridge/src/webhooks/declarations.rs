//! `[[webhooks]]`: the Flex registrations `flexbridge webhooks ensure` maintains, their
//! validation, and the checks the command line shares with them.

use crate::config::ConfigErrors;
use flexbridge_flex_api::EVENTS;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;

/// The URL registered with Twilio: `url` without a fragment, then `#overrides` when set.
pub fn url_with_overrides(url: &str, overrides: Option<&str>) -> String {
    let url = url.split('#').next().unwrap_or(url);
    match overrides {
        Some(overrides) => format!("{url}#{}", overrides.trim_start_matches('#')),
        None => url.to_owned(),
    }
}

/// The event names outside the seven documented ones.
pub fn unknown_events(events: &[String]) -> impl Iterator<Item = &str> {
    events
        .iter()
        .map(String::as_str)
        .filter(|e| !EVENTS.contains(e))
}

/// What is wrong with an unknown event name.
pub fn unknown_event_message(event: &str) -> String {
    format!("{event:?} is not one of {}", EVENTS.join(", "))
}

/// One `[[webhooks]]` entry: a registration flexbridge manages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookDecl {
    /// Unique name; the registration's friendly name is `flexbridge:<name>`, which is how
    /// `ensure --prune` recognises what flexbridge manages.
    pub name: String,
    /// The URL Twilio calls (usually `ingress.public_url` + `ingress.path`).
    pub url: String,
    /// `POST` (default) or `GET`.
    #[serde(default = "default_method")]
    pub method: String,
    /// `global` (default) or `interaction`.
    #[serde(default, rename = "type")]
    pub kind: flexbridge_flex_api::WebhookType,
    /// Events to subscribe to; default all seven.
    #[serde(default = "all_events")]
    pub events: Vec<String>,
    /// Twilio connection overrides appended as `#...`, e.g. `rc=3&rp=5xx,ct,rt` so Twilio
    /// retries on 5xx (whether Interactions webhooks honour them is unconfirmed).
    #[serde(default)]
    pub connection_overrides: Option<String>,
    /// Accept event names outside the seven documented ones.
    #[serde(default)]
    pub allow_unknown_events: bool,
}

/// The friendly-name prefix of registrations flexbridge manages.
pub const MANAGED_PREFIX: &str = "flexbridge:";

fn default_method() -> String {
    "POST".to_owned()
}

fn all_events() -> Vec<String> {
    EVENTS.iter().map(|e| (*e).to_owned()).collect()
}

impl WebhookDecl {
    /// Every problem, as `webhooks[i].key: message`.
    pub fn validate(&self, i: usize) -> Vec<String> {
        let mut errors = Vec::new();
        if self.name.is_empty() {
            errors.push(format!("webhooks[{i}].name: must not be empty"));
        }
        if !(self.url.starts_with("https://") || self.url.starts_with("http://"))
            || self.url.contains('#')
        {
            errors.push(format!(
                "webhooks[{i}].url: {:?} must be an http(s) URL without a fragment (use connection_overrides)",
                self.url
            ));
        }
        if !matches!(self.method.as_str(), "POST" | "GET") {
            errors.push(format!("webhooks[{i}].method: must be POST or GET"));
        }
        if self.events.is_empty() {
            errors.push(format!(
                "webhooks[{i}].events: at least one event is needed"
            ));
        }
        if !self.allow_unknown_events {
            for event in unknown_events(&self.events) {
                errors.push(format!(
                    "webhooks[{i}].events: {} (set allow_unknown_events = true to send it anyway)",
                    unknown_event_message(event)
                ));
            }
        }
        errors
    }

    /// The registration this entry describes.
    pub fn spec(&self) -> flexbridge_flex_api::WebhookSpec {
        flexbridge_flex_api::WebhookSpec {
            kind: self.kind,
            url: url_with_overrides(&self.url, self.connection_overrides.as_deref()),
            method: self.method.clone(),
            events: self.events.clone(),
            friendly_name: Some(format!("{MANAGED_PREFIX}{}", self.name)),
        }
    }
}

/// Reads only the `[[webhooks]]` section of a configuration file (for `webhooks ensure`,
/// which needs no daemon settings).
pub fn load(path: Option<&Path>) -> Result<Vec<WebhookDecl>, ConfigErrors> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        builder = builder.add_source(config::File::from(path).required(true));
    }
    let value: Value = builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
    let mut errors = Vec::new();
    let table = value.as_object().cloned().unwrap_or_default();
    let webhooks: Vec<WebhookDecl> = crate::config::section(&table, "webhooks", &mut errors);
    errors.extend(validate_webhooks(&webhooks));
    if errors.is_empty() {
        Ok(webhooks)
    } else {
        Err(ConfigErrors(errors))
    }
}

pub(crate) fn validate_webhooks(webhooks: &[WebhookDecl]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut names = HashSet::new();
    for (i, webhook) in webhooks.iter().enumerate() {
        errors.extend(webhook.validate(i));
        if !names.insert(webhook.name.as_str()) {
            errors.push(format!(
                "webhooks[{i}].name: {:?} is used twice",
                webhook.name
            ));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_any_fragment_and_unknown_events_are_named() {
        assert_eq!(url_with_overrides("https://h/x", None), "https://h/x");
        assert_eq!(
            url_with_overrides("https://h/x#old", Some("#rc=3")),
            "https://h/x#rc=3"
        );
        let events = vec!["onChannelCreated".to_owned(), "onNope".to_owned()];
        assert_eq!(unknown_events(&events).collect::<Vec<_>>(), ["onNope"]);
        assert!(unknown_event_message("onNope").contains("onParticipantUpdated"));
    }
}
