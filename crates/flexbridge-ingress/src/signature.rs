//! `X-Twilio-Signature` verification, as Twilio's helper libraries do it.
//!
//! The signed string is the URL Twilio called, followed, for a form POST, by every parameter
//! name and value (names sorted bytewise; each name's values de-duplicated and sorted). The
//! key is an Auth Token (HMAC-SHA1) or, when `X-Twilio-Webhooks-Signature-Settings` names
//! one, a SharedKey (HMAC-SHA256). Because Twilio is inconsistent about ports, the URL is tried
//! as received and with the port toggled (default port added, or any port removed). A JSON
//! body is covered through `bodySHA256` in the query, whose hash is checked too.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use flexbridge_core::{Attestation, Secret};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The algorithm a signature uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// HMAC-SHA1 keyed with an Auth Token.
    HmacSha1,
    /// HMAC-SHA256 keyed with a SharedKey.
    HmacSha256,
}

/// What a request offers for verification.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// The URL Twilio called, as reconstructed (scheme, host, optional port, path, query).
    pub url: &'a str,
    /// Form parameters of a POST; empty for GET and JSON bodies.
    pub params: &'a [(String, String)],
    /// The raw body of an `application/json` request.
    pub json_body: Option<&'a [u8]>,
    /// `X-Twilio-Signature`.
    pub signature: Option<&'a str>,
    /// `X-Twilio-Webhooks-Signature-Settings`.
    pub settings: Option<&'a str>,
}

/// Why a request is not authentic. Each maps to 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No `X-Twilio-Signature` header.
    #[error("the X-Twilio-Signature header is missing")]
    MissingSignature,
    /// A JSON body without `bodySHA256` in the query: the body would not be covered.
    #[error("a JSON body needs bodySHA256 in the query string")]
    BodyHashMissing,
    /// `bodySHA256` does not match the body.
    #[error("bodySHA256 does not match the request body")]
    BodyHashMismatch,
    /// The settings header names a key id that is not configured.
    #[error("the signature names SharedKey {key_id:?}, which is not configured")]
    UnknownKey {
        /// The key id from the header.
        key_id: String,
    },
    /// The settings header names an algorithm other than HMAC_SHA256.
    #[error("unsupported signature algorithm {algorithm:?}")]
    UnsupportedAlgorithm {
        /// The algorithm from the header.
        algorithm: String,
    },
    /// The settings header does not parse.
    #[error("X-Twilio-Webhooks-Signature-Settings is malformed")]
    MalformedSettings,
    /// An Auth Token signature arrived but no Auth Token is configured.
    #[error("the request is signed with an Auth Token but none is configured")]
    NoAuthToken,
    /// No URL variant and key gave the signature.
    #[error("the signature does not match (URLs tried: {})", tried.join(", "))]
    Mismatch {
        /// The URL variants tried, credentials redacted.
        tried: Vec<String>,
    },
}

impl VerifyError {
    /// Every value [`VerifyError::reason`] returns.
    pub const REASONS: &'static [&'static str] = &[
        "signature_missing",
        "body_hash_missing",
        "body_hash_mismatch",
        "unknown_key",
        "unsupported_algorithm",
        "malformed_settings",
        "no_auth_token",
        "signature_mismatch",
    ];

    /// A low-cardinality reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingSignature => "signature_missing",
            Self::BodyHashMissing => "body_hash_missing",
            Self::BodyHashMismatch => "body_hash_mismatch",
            Self::UnknownKey { .. } => "unknown_key",
            Self::UnsupportedAlgorithm { .. } => "unsupported_algorithm",
            Self::MalformedSettings => "malformed_settings",
            Self::NoAuthToken => "no_auth_token",
            Self::Mismatch { .. } => "signature_mismatch",
        }
    }
}

/// Checks signatures against the configured Auth Tokens and SharedKeys.
///
/// Each secret is turned into its keyed HMAC state once, here: keying hashes the secret into
/// the inner and outer states, two hash blocks every request would otherwise redo.
#[derive(Clone)]
pub struct Verifier {
    auth_tokens: Vec<Hmac<Sha1>>,
    shared_keys: BTreeMap<String, Hmac<Sha256>>,
}

/// Names what is configured, never a secret or a state derived from one.
impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("auth_tokens", &self.auth_tokens.len())
            .field("shared_keys", &self.shared_keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Verifier {
    /// Builds a verifier. Several Auth Tokens allow rotation (primary and secondary).
    pub fn new(auth_tokens: Vec<Secret>, shared_keys: BTreeMap<String, Secret>) -> Self {
        Self {
            auth_tokens: auth_tokens.iter().filter_map(keyed).collect(),
            shared_keys: shared_keys
                .iter()
                .filter_map(|(id, secret)| Some((id.clone(), keyed(secret)?)))
                .collect(),
        }
    }

    /// Verifies a request; on success says which kind of secret matched.
    pub fn check(&self, signed: &Signed<'_>) -> Result<Attestation, VerifyError> {
        let signature = signed.signature.ok_or(VerifyError::MissingSignature)?;
        let keys = match signed.settings {
            Some(settings) => {
                let (key_id, algorithm) = parse_settings(settings)?;
                if algorithm != "HMAC_SHA256" {
                    return Err(VerifyError::UnsupportedAlgorithm {
                        algorithm: algorithm.to_owned(),
                    });
                }
                let key = self
                    .shared_keys
                    .get(key_id)
                    .ok_or_else(|| VerifyError::UnknownKey {
                        key_id: key_id.to_owned(),
                    })?;
                Keys::Shared(key)
            }
            None if self.auth_tokens.is_empty() => return Err(VerifyError::NoAuthToken),
            None => Keys::AuthTokens(&self.auth_tokens),
        };
        if let Some(body) = signed.json_body {
            check_body_hash(signed.url, body)?;
        }
        let expected = BASE64.decode(signature.trim()).unwrap_or_default();
        let params = sorted_params(signed.params);
        let matches = |url: &str| match keys {
            Keys::AuthTokens(tokens) => tokens
                .iter()
                .any(|key| mac_matches(key, url, &params, &expected)),
            Keys::Shared(key) => mac_matches(key, url, &params, &expected),
        };
        // The URL as received first; the port-toggled variant is built only when that fails.
        if matches(signed.url) || toggle_port(signed.url).is_some_and(|other| matches(&other)) {
            return Ok(match keys {
                Keys::AuthTokens(_) => Attestation::AuthToken,
                Keys::Shared(_) => Attestation::SharedKey,
            });
        }
        let variants = url_variants(signed.url);
        Err(VerifyError::Mismatch {
            tried: variants
                .iter()
                .map(|url| flexbridge_core::secret::redact_url(url))
                .collect(),
        })
    }
}

/// The keys a request is checked against.
#[derive(Clone, Copy)]
enum Keys<'a> {
    AuthTokens(&'a [Hmac<Sha1>]),
    Shared(&'a Hmac<Sha256>),
}

/// The HMAC keyed with a secret. HMAC accepts keys of any length, so this is never `None`;
/// if it were, the secret would match nothing (fail closed).
fn keyed<M: Mac + hmac::digest::KeyInit>(secret: &Secret) -> Option<M> {
    <M as hmac::digest::KeyInit>::new_from_slice(secret.expose().as_bytes()).ok()
}

/// Computes the signature Twilio would send (base64), for `simulate` and tests.
pub fn sign(algorithm: Algorithm, key: &str, url: &str, params: &[(String, String)]) -> String {
    let params = sorted_params(params);
    let key = Secret::new(key);
    let digest = match algorithm {
        Algorithm::HmacSha1 => keyed::<Hmac<Sha1>>(&key).map(|m| mac(m, url, &params)),
        Algorithm::HmacSha256 => keyed::<Hmac<Sha256>>(&key).map(|m| mac(m, url, &params)),
    };
    let digest = digest.unwrap_or_default();
    BASE64.encode(digest)
}

/// Lower-case hex SHA-256 of a body, as Twilio puts in `bodySHA256`.
pub fn body_sha256(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The signed string, streamed into a keyed HMAC: the URL, then each sorted name and value.
fn signed<M: Mac>(mut mac: M, url: &str, params: &[(&str, &str)]) -> M {
    mac.update(url.as_bytes());
    for (name, value) in params {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

fn mac<M: Mac>(keyed: M, url: &str, params: &[(&str, &str)]) -> Vec<u8> {
    signed(keyed, url, params).finalize().into_bytes().to_vec()
}

fn mac_matches<M: Mac + Clone>(
    keyed: &M,
    url: &str,
    params: &[(&str, &str)],
    expected: &[u8],
) -> bool {
    // verify_slice compares in constant time.
    signed(keyed.clone(), url, params)
        .verify_slice(expected)
        .is_ok()
}

/// Names sorted bytewise, each name's values de-duplicated and sorted.
fn sorted_params(params: &[(String, String)]) -> Vec<(&str, &str)> {
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
}

fn parse_settings(settings: &str) -> Result<(&str, &str), VerifyError> {
    let mut key = None;
    let mut algorithm = None;
    for part in settings.split(',') {
        match part.trim().split_once('=') {
            Some(("key", value)) => key = Some(value.trim()),
            Some(("algorithm", value)) => algorithm = Some(value.trim()),
            _ => {}
        }
    }
    match (key, algorithm) {
        (Some(key), Some(algorithm)) if !key.is_empty() => Ok((key, algorithm)),
        _ => Err(VerifyError::MalformedSettings),
    }
}

fn check_body_hash(url: &str, body: &[u8]) -> Result<(), VerifyError> {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let query = query.split('#').next().unwrap_or("");
    let claimed = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("bodySHA256="))
        .ok_or(VerifyError::BodyHashMissing)?;
    if claimed.eq_ignore_ascii_case(&body_sha256(body)) {
        Ok(())
    } else {
        Err(VerifyError::BodyHashMismatch)
    }
}

/// The URL as received, then with the port toggled: an explicit port removed, or the
/// scheme's default port added.
pub fn url_variants(url: &str) -> Vec<String> {
    let mut variants = vec![url.to_owned()];
    if let Some(other) = toggle_port(url) {
        variants.push(other);
    }
    variants
}

fn toggle_port(url: &str) -> Option<String> {
    let scheme_end = url.find("://")?;
    let scheme = &url[..scheme_end];
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host_start = authority.rfind('@').map_or(0, |at| at + 1);
    let host_port = &authority[host_start..];
    // An IPv6 literal's colons are inside brackets.
    let port_colon = match host_port.rfind(']') {
        Some(bracket) => host_port[bracket..].find(':').map(|c| bracket + c),
        None => host_port.rfind(':'),
    };
    let prefix = &url[..scheme_end + 3 + host_start];
    let tail = &rest[authority_end..];
    match port_colon {
        Some(colon) => Some(format!("{prefix}{}{tail}", &host_port[..colon])),
        None => {
            let port = match scheme.to_ascii_lowercase().as_str() {
                "https" => 443,
                "http" => 80,
                _ => return None,
            };
            Some(format!("{prefix}{host_port}:{port}{tail}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const VECTORS: &str = include_str!("../../../fixtures/twilio-signature-vectors.json");

    /// The verifier holds keyed HMAC states; its Debug output names what is configured and
    /// shows neither a secret nor anything derived from one.
    #[test]
    fn debug_output_shows_no_secret() {
        let verifier = Verifier::new(
            vec![Secret::new("token-hunter2")],
            BTreeMap::from([("KS1".to_owned(), Secret::new("shared-hunter2"))]),
        );
        let debug = format!("{verifier:?}");
        assert_eq!(
            debug,
            r#"Verifier { auth_tokens: 1, shared_keys: ["KS1"] }"#
        );
        assert!(!debug.contains("hunter2"));
    }

    /// Every conformance vector from Twilio's helper libraries passes.
    #[test]
    fn twilio_conformance_vectors() {
        let doc: Value = serde_json::from_str(VECTORS).unwrap();
        let vectors = doc["vectors"].as_array().unwrap();
        assert!(vectors.len() >= 39, "{} vectors", vectors.len());
        let mut failures = Vec::new();
        for v in vectors {
            let name = v["name"].as_str().unwrap();
            let secret = Secret::new(v["auth_token"].as_str().unwrap());
            let settings = v["settings_header"].as_str();
            let verifier = match settings {
                Some(s) => {
                    let (key_id, _) = parse_settings(s).unwrap();
                    Verifier::new(vec![], BTreeMap::from([(key_id.to_owned(), secret)]))
                }
                None => Verifier::new(vec![secret], BTreeMap::new()),
            };
            let params: Vec<(String, String)> = v["params"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p[0].as_str().unwrap().to_owned(),
                        p[1].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            let body = v["body"].as_str().map(str::as_bytes);
            let signed = Signed {
                url: v["url"].as_str().unwrap(),
                params: &params,
                json_body: body,
                signature: Some(v["signature"].as_str().unwrap()),
                settings,
            };
            let valid = verifier.check(&signed).is_ok();
            if valid != v["valid"].as_bool().unwrap() {
                failures.push(format!("{name}: got valid={valid}"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn sign_matches_the_worked_example() {
        // Twilio's security docs: the same inputs as vector V1.
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            sign(
                Algorithm::HmacSha1,
                "12345",
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                &params
            ),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
    }

    #[test]
    fn port_variants() {
        assert_eq!(
            url_variants("https://h.example/p?q=1"),
            vec!["https://h.example/p?q=1", "https://h.example:443/p?q=1"]
        );
        assert_eq!(
            url_variants("http://u:p@h.example:8080/p"),
            vec!["http://u:p@h.example:8080/p", "http://u:p@h.example/p"]
        );
        assert_eq!(
            url_variants("http://[::1]:8080/p"),
            vec!["http://[::1]:8080/p", "http://[::1]/p"]
        );
        assert_eq!(
            url_variants("http://[::1]/p"),
            vec!["http://[::1]/p", "http://[::1]:80/p"]
        );
    }

    #[test]
    fn rotation_accepts_any_configured_token() {
        let params = vec![("EventType".to_owned(), "onInteractionCreated".to_owned())];
        let url = "https://hooks.example.com/flex/interactions";
        let sig = sign(Algorithm::HmacSha1, "secondary", url, &params);
        let verifier = Verifier::new(
            vec![Secret::new("primary"), Secret::new("secondary")],
            BTreeMap::new(),
        );
        let signed = Signed {
            url,
            params: &params,
            json_body: None,
            signature: Some(&sig),
            settings: None,
        };
        assert_eq!(verifier.check(&signed), Ok(Attestation::AuthToken));
        let only_primary = Verifier::new(vec![Secret::new("primary")], BTreeMap::new());
        assert!(matches!(
            only_primary.check(&signed),
            Err(VerifyError::Mismatch { .. })
        ));
    }

    #[test]
    fn failures_say_why() {
        let verifier = Verifier::new(
            vec![Secret::new("t")],
            BTreeMap::from([("k1".to_owned(), Secret::new("s"))]),
        );
        let base = Signed {
            url: "https://user:pw@h.example/p",
            params: &[],
            json_body: None,
            signature: Some("AAAA"),
            settings: None,
        };
        assert_eq!(
            verifier.check(&Signed {
                signature: None,
                ..base
            }),
            Err(VerifyError::MissingSignature)
        );
        let Err(VerifyError::Mismatch { tried }) = verifier.check(&base) else {
            panic!()
        };
        assert_eq!(
            tried,
            vec![
                "https://user:**REDACTED**@h.example/p",
                "https://user:**REDACTED**@h.example:443/p"
            ]
        );
        assert_eq!(
            verifier.check(&Signed {
                settings: Some("key=k2,algorithm=HMAC_SHA256"),
                ..base
            }),
            Err(VerifyError::UnknownKey {
                key_id: "k2".into()
            })
        );
        assert_eq!(
            verifier.check(&Signed {
                settings: Some("key=k1,algorithm=HMAC_SHA512"),
                ..base
            }),
            Err(VerifyError::UnsupportedAlgorithm {
                algorithm: "HMAC_SHA512".into()
            })
        );
        assert_eq!(
            verifier.check(&Signed {
                settings: Some("garbage"),
                ..base
            }),
            Err(VerifyError::MalformedSettings)
        );
        assert_eq!(
            verifier.check(&Signed {
                json_body: Some(b"{}"),
                ..base
            }),
            Err(VerifyError::BodyHashMissing)
        );
        let no_tokens = Verifier::new(vec![], BTreeMap::new());
        assert_eq!(no_tokens.check(&base), Err(VerifyError::NoAuthToken));
    }
}
