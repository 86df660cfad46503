//! A string that never prints.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// What a secret prints as, everywhere.
pub const REDACTED: &str = "**REDACTED**";

/// A secret value (auth token, shared key, password). `Debug`, `Display` and `Serialize` print
/// [`REDACTED`]; only [`Secret::expose`] gives the value, so every use is easy to find.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value. Call only where the value is used as a key or credential.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// Replaces the password (or, without one, the user) of a URL's userinfo with [`REDACTED`],
/// so broker URIs can be logged: `amqp://guest:secret@host/` becomes
/// `amqp://guest:**REDACTED**@host/`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let user = match userinfo.find(':') {
        Some(colon) => format!("{}:{REDACTED}", &userinfo[..colon]),
        None => REDACTED.to_owned(),
    };
    format!(
        "{}://{user}@{}{}",
        &url[..scheme_end],
        &authority[at + 1..],
        &rest[authority_end..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"**REDACTED**\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn redacts_url_userinfo() {
        assert_eq!(
            redact_url("amqp://guest:pw@localhost:5672/%2f"),
            "amqp://guest:**REDACTED**@localhost:5672/%2f"
        );
        assert_eq!(
            redact_url("https://token@example.com/x?y=1"),
            "https://**REDACTED**@example.com/x?y=1"
        );
        assert_eq!(redact_url("nats://localhost:4222"), "nats://localhost:4222");
        assert_eq!(redact_url("no scheme"), "no scheme");
    }
}
