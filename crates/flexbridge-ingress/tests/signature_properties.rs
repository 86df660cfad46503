//! Properties of the signature check against an independent implementation of Twilio's
//! algorithm (twilio-notes §1, written here from the description, not from the crate): it
//! accepts exactly what Twilio signs, whatever the parameter order, repeated keys and
//! duplicate values, and with or without the default port; it refuses any other signed
//! string, and never panics on arbitrary input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use flexbridge_core::Secret;
use flexbridge_ingress::signature::{Signed, Verifier, VerifyError};
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use std::collections::BTreeMap;

const TOKEN: &str = "property-test-auth-token";

/// Twilio's string to sign: the URL, then for each name in bytewise order its distinct values
/// sorted, as `name + value`.
fn string_to_sign(url: &str, params: &[(String, String)]) -> String {
    let mut by_name: BTreeMap<&[u8], Vec<&str>> = BTreeMap::new();
    for (name, value) in params {
        by_name.entry(name.as_bytes()).or_default().push(value);
    }
    let mut out = url.to_owned();
    for (name, mut values) in by_name {
        values.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        values.dedup();
        for value in values {
            out.push_str(std::str::from_utf8(name).unwrap());
            out.push_str(value);
        }
    }
    out
}

fn twilio_signature(url: &str, params: &[(String, String)]) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(TOKEN.as_bytes()).unwrap();
    mac.update(string_to_sign(url, params).as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn verifier() -> Verifier {
    Verifier::new(vec![Secret::new(TOKEN)], BTreeMap::new())
}

fn check(url: &str, params: &[(String, String)], signature: &str) -> Result<(), VerifyError> {
    verifier()
        .check(&Signed {
            url,
            params,
            json_body: None,
            signature: Some(signature),
            settings: None,
        })
        .map(|_| ())
}

/// Names from a small alphabet so that repeats and prefixes (`Reason`, `ReasonX`) happen.
fn params() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(("[A-Ca-c]{1,4}", "\\PC{0,8}"), 0..12)
}

fn url() -> impl Strategy<Value = (String, String, Option<u16>)> {
    (
        prop_oneof![Just("https"), Just("http")],
        "[a-z]{1,10}\\.example\\.com",
        prop::option::of(prop_oneof![Just(443u16), Just(80u16), 1024u16..65535]),
    )
        .prop_map(|(scheme, host, port)| (scheme.to_owned(), host, port))
}

fn render(scheme: &str, host: &str, port: Option<u16>, path: &str) -> String {
    match port {
        Some(port) => format!("{scheme}://{host}:{port}{path}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// What Twilio signs is accepted, in any parameter order.
    #[test]
    fn accepts_what_twilio_signs_in_any_order(
        params in params(),
        (scheme, host, port) in url(),
        rotate in 0usize..12,
    ) {
        let url = render(&scheme, &host, port, "/flex/interactions?x=1");
        let signature = twilio_signature(&url, &params);
        let mut shuffled = params.clone();
        if !shuffled.is_empty() {
            let n = rotate % shuffled.len();
            shuffled.rotate_left(n);
            shuffled.reverse();
        }
        prop_assert!(check(&url, &shuffled, &signature).is_ok());
    }

    /// Twilio signs with or without the default port: both verify against the URL received
    /// either way.
    #[test]
    fn the_default_port_may_be_present_or_not(params in params(), (scheme, host, _) in url()) {
        let default = if scheme == "https" { 443 } else { 80 };
        let bare = render(&scheme, &host, None, "/flex/interactions");
        let with_port = render(&scheme, &host, Some(default), "/flex/interactions");
        for signed_on in [&bare, &with_port] {
            let signature = twilio_signature(signed_on, &params);
            for received in [&bare, &with_port] {
                prop_assert!(check(received, &params, &signature).is_ok(), "signed on {signed_on}, received {received}");
            }
        }
    }

    /// Any change to the signed string (a value, a name, the path) is refused.
    #[test]
    fn refuses_anything_else(
        params in params().prop_filter("at least one parameter", |p| !p.is_empty()),
        (scheme, host, port) in url(),
        which in 0usize..12,
        edit in "\\PC{1,4}",
    ) {
        let url = render(&scheme, &host, port, "/flex/interactions");
        let signature = twilio_signature(&url, &params);
        let mut changed = params.clone();
        let i = which % changed.len();
        changed[i].1.push_str(&edit);
        if string_to_sign(&url, &changed) != string_to_sign(&url, &params) {
            let refused = matches!(check(&url, &changed, &signature), Err(VerifyError::Mismatch { .. }));
            prop_assert!(refused, "a changed value was accepted");
        }
        let mut renamed = params.clone();
        renamed[i].0.push('Z');
        if string_to_sign(&url, &renamed) != string_to_sign(&url, &params) {
            prop_assert!(check(&url, &renamed, &signature).is_err());
        }
        let other_path = render(&scheme, &host, port, "/flex/interactionz");
        prop_assert!(check(&other_path, &params, &signature).is_err());
    }

    /// Arbitrary URLs, parameters and header values never panic.
    #[test]
    fn never_panics(url in "\\PC{0,64}", params in params(), signature in "\\PC{0,40}", settings in prop::option::of("\\PC{0,40}")) {
        let _ = verifier().check(&Signed {
            url: &url,
            params: &params,
            json_body: None,
            signature: Some(&signature),
            settings: settings.as_deref(),
        });
    }
}
