//! `[ingress]` and `[twilio]` settings.

use flexbridge_core::Secret;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// `[ingress]`: the webhook listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// Address the webhook listener binds, e.g. `0.0.0.0:8080` in a container.
    pub listen: SocketAddr,
    /// Path Twilio calls; any other path is answered 404.
    pub path: String,
    /// The base URL Twilio calls (scheme, host, optional port, optional path prefix that a
    /// proxy strips), e.g. `https://hooks.example.com`. The signed URL is this + request path +
    /// raw query. Unset: `http://` + the Host header, right only without a proxy in front.
    pub public_url: Option<String>,
    /// Rebuild the signed URL from `X-Forwarded-Proto`, `X-Forwarded-Host` and
    /// `X-Forwarded-Port`. Only behind a proxy that sets them and strips them from clients.
    pub trust_forwarded_headers: bool,
    /// Largest accepted body; larger requests are answered 413.
    pub max_body_bytes: usize,
    /// A connection that has not sent its request headers within this time is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request whose body has not arrived within this time is answered 408.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// `Retry-After` sent with a 503 when a sink did not confirm.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Requests handled at once; beyond it a request is answered 503 + `Retry-After` at once
    /// instead of queueing (memory stays bounded under overload).
    pub max_in_flight: usize,
    /// Open connections; beyond it a new connection is answered 503 + `Retry-After` and
    /// closed.
    pub max_connections: usize,
    /// `[ingress.tls]`: terminate TLS here, for deployments without an ingress or load
    /// balancer doing it. Unset: plain HTTP.
    pub tls: Option<ListenerTls>,
}

/// `[ingress.tls]`: the listener's certificate, re-read when its files change (a renewed
/// certificate is picked up without a restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain, leaf first.
    pub cert_file: std::path::PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
    /// How often the files are checked for a change.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            path: "/flex/interactions".to_owned(),
            public_url: None,
            trust_forwarded_headers: false,
            max_body_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            retry_after: Duration::from_secs(5),
            max_in_flight: 1024,
            max_connections: 2048,
            tls: None,
        }
    }
}

impl IngressConfig {
    /// Every problem with these settings, as `key: message`.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !self.path.starts_with('/') || self.path.contains(['?', '#']) {
            errors.push(format!(
                "ingress.path: {:?} must start with / and hold no query or fragment",
                self.path
            ));
        }
        if let Some(url) = &self.public_url {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            match rest {
                None => errors.push(format!(
                    "ingress.public_url: {} must start with https:// or http://",
                    flexbridge_core::secret::redact_url(url)
                )),
                Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                    errors.push("ingress.public_url: the host is missing".to_owned())
                }
                Some(rest) if rest.contains(['?', '#']) => errors.push(
                    "ingress.public_url: must hold no query or fragment (the request's own are appended)"
                        .to_owned(),
                ),
                Some(_) => {}
            }
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > 16 * 1024 * 1024 {
            errors.push(format!(
                "ingress.max_body_bytes: {} must be between 1 and 16777216",
                self.max_body_bytes
            ));
        }
        for (key, value) in [
            ("max_in_flight", self.max_in_flight),
            ("max_connections", self.max_connections),
        ] {
            if value == 0 {
                errors.push(format!("ingress.{key}: must be at least 1"));
            }
        }
        for (key, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
        ] {
            if value.is_zero() {
                errors.push(format!("ingress.{key}: must be greater than zero"));
            }
        }
        errors
    }
}

/// `[twilio]`: how requests are proven to come from Twilio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwilioConfig {
    /// Verify `X-Twilio-Signature`. Only an explicit `false` turns verification off, which
    /// logs a warning at start-up and shows in the `flexbridge_info` metric.
    pub verify_signatures: bool,
    /// Auth Tokens accepted for HMAC-SHA1 signatures; several allow rotation. The
    /// `TWILIO_AUTH_TOKEN` environment variable is added to this list.
    pub auth_tokens: Vec<Secret>,
    /// SharedKey secrets for HMAC-SHA256 signatures, by key id (the `key=` of
    /// `X-Twilio-Webhooks-Signature-Settings`).
    pub shared_keys: BTreeMap<String, Secret>,
    /// If not empty, only these Account SIDs are accepted (others get 403).
    pub account_sids: Vec<String>,
}

impl Default for TwilioConfig {
    fn default() -> Self {
        Self {
            verify_signatures: true,
            auth_tokens: Vec::new(),
            shared_keys: BTreeMap::new(),
            account_sids: Vec::new(),
        }
    }
}

impl TwilioConfig {
    /// Every problem with these settings, as `key: message`.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.verify_signatures && self.auth_tokens.is_empty() && self.shared_keys.is_empty() {
            errors.push(
                "twilio: no secret to verify X-Twilio-Signature with: set twilio.auth_tokens, \
                 twilio.shared_keys or TWILIO_AUTH_TOKEN (or, for local testing only, \
                 twilio.verify_signatures = false)"
                    .to_owned(),
            );
        }
        if self.auth_tokens.iter().any(Secret::is_empty) {
            errors.push("twilio.auth_tokens: an entry is empty".to_owned());
        }
        for (id, secret) in &self.shared_keys {
            if secret.is_empty() {
                errors.push(format!("twilio.shared_keys.{id}: the secret is empty"));
            }
        }
        for sid in &self.account_sids {
            let ok = sid.len() == 34
                && sid.starts_with("AC")
                && sid[2..].bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                errors.push(format!(
                    "twilio.account_sids: {sid:?} is not an Account SID (AC + 32 hex digits)"
                ));
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_except_for_the_missing_secret() {
        assert!(IngressConfig::default().validate().is_empty());
        let errors = TwilioConfig::default().validate();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("TWILIO_AUTH_TOKEN"));
        let off = TwilioConfig {
            verify_signatures: false,
            ..TwilioConfig::default()
        };
        assert!(off.validate().is_empty());
    }

    #[test]
    fn reports_every_problem() {
        let ingress = IngressConfig {
            path: "flex".into(),
            public_url: Some("ftp://x".into()),
            max_body_bytes: 0,
            header_read_timeout: Duration::ZERO,
            ..IngressConfig::default()
        };
        assert_eq!(ingress.validate().len(), 4);
        let twilio = TwilioConfig {
            auth_tokens: vec![Secret::new("")],
            account_sids: vec!["AC123".into()],
            ..TwilioConfig::default()
        };
        assert_eq!(twilio.validate().len(), 2, "{:?}", twilio.validate());
    }
}
