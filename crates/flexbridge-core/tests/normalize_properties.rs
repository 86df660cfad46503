//! Properties of normalization over arbitrary parameters: it never panics, refuses exactly
//! the requests without `EventType` or `AccountSid`, keeps every parameter (in its field, or
//! under `data.extra`: unmodeled names, repeats, values their type refuses; repeated names
//! as lists in arrival order), emits valid JSON, and gives the same id to the same delivery.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flexbridge_core::{normalize, Attestation, NormalizeError, Verified, WebhookRequest};
use proptest::prelude::*;
use std::time::{Duration, SystemTime};

const KNOWN: &[&str] = &[
    "onInteractionCreated",
    "onChannelCreated",
    "onChannelCreateFailed",
    "onChannelStatusUpdated",
    "onParticipantJoined",
    "onParticipantLeft",
    "onParticipantUpdated",
];

/// Modeled parameters with arbitrary values (typed ones may not parse: then they are kept
/// under `extra`, never dropped).
fn modeled() -> impl Strategy<Value = Vec<(String, String)>> {
    let names = prop_oneof![
        Just("InstanceSid"),
        Just("InteractionSid"),
        Just("ChannelSid"),
        Just("ChannelStatus"),
        Just("ParticipantSid"),
        Just("ParticipantType"),
        Just("MediaChannelType"),
        Just("MediaChannelSid"),
        Just("TaskSid"),
        Just("InteractionChannelSid"),
    ];
    prop::collection::vec((names.prop_map(str::to_owned), "\\PC{0,12}"), 0..8)
}

/// Names the schema does not model.
fn unmodeled() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(("Zz[A-Za-z]{1,3}", "\\PC{0,12}"), 0..8)
}

fn request(params: Vec<(String, String)>, token: Option<String>) -> WebhookRequest {
    WebhookRequest {
        params,
        idempotency_token: token,
        received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_547_200),
    }
}

/// Every string in a JSON value, recursively.
fn collect_strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn normalization_never_panics_and_keeps_every_parameter(
        event_type in prop_oneof![
            prop::sample::select(KNOWN).prop_map(str::to_owned),
            "\\PC{0,16}",
        ],
        account in prop_oneof![Just(String::new()), "AC[0-9a-f]{32}", "\\PC{1,12}"],
        modeled in modeled(),
        extra in unmodeled(),
        token in prop::option::of("[a-z0-9-]{1,40}"),
    ) {
        let mut params = vec![
            ("EventType".to_owned(), event_type.clone()),
            ("AccountSid".to_owned(), account.clone()),
        ];
        params.extend(modeled);
        params.extend(extra.iter().cloned());
        let verified = Verified::attest(request(params.clone(), token.clone()), Attestation::AuthToken);
        let params = params;
        match normalize(verified) {
            Err(NormalizeError::MissingEventType) => prop_assert!(event_type.is_empty()),
            Err(NormalizeError::MissingAccountSid) => prop_assert!(account.is_empty()),
            Ok(event) => {
                prop_assert!(!event_type.is_empty() && !account.is_empty());
                let data: serde_json::Value = serde_json::from_slice(event.data_json()).unwrap();
                let envelope: serde_json::Value = serde_json::from_slice(event.envelope_json()).unwrap();
                prop_assert_eq!(&envelope["data"], &data);
                prop_assert_eq!(data["event_type"].as_str(), Some(event_type.as_str()));
                prop_assert_eq!(data["account_sid"].as_str(), Some(account.as_str()));
                for name in extra.iter().map(|(n, _)| n) {
                    let sent: Vec<&str> = extra.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect();
                    let kept = &data["extra"][name.as_str()];
                    let kept: Vec<&str> = match kept {
                        serde_json::Value::String(one) => vec![one.as_str()],
                        serde_json::Value::Array(many) => many.iter().map(|v| v.as_str().unwrap()).collect(),
                        other => { prop_assert!(false, "{name}: {other}"); unreachable!() }
                    };
                    prop_assert_eq!(kept, sent, "{}", name);
                }
                // Every non-empty value of every parameter is somewhere in `data`: in its
                // field, or under `extra` (a repeat, or a value its type does not accept).
                let mut leaves = Vec::new();
                collect_strings(&data, &mut leaves);
                for (name, value) in &params {
                    if !value.is_empty() {
                        prop_assert!(leaves.contains(value), "{}={:?} is not in {}", name, value, data);
                    }
                }
                // The same delivery normalizes to the same id.
                let again = normalize(Verified::attest(request(params, token), Attestation::AuthToken)).unwrap();
                prop_assert_eq!(again.id(), event.id());
            }
        }
    }
}
