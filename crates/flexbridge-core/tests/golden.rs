//! Golden files pin what schema v1 emits for every event type and every known quirk, and
//! every golden event is validated against the shipped JSON Schemas.
//!
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test -p flexbridge-core
//! --test golden`; a change to an existing v1 golden means a change to a published version.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use flexbridge_core::schema::v1::SCHEMA_FILES;
use flexbridge_core::{normalize, Attestation, Verified, WebhookRequest};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const AC: &str = "AC00000000000000000000000000000000";
const GO: &str = "GO00000000000000000000000000000000";
const KD: &str = "KD00000000000000000000000000000000";
const UO: &str = "UO00000000000000000000000000000000";
const CH: &str = "CH00000000000000000000000000000000";
const UT: &str = "UT00000000000000000000000000000000";
const WT: &str = "WT00000000000000000000000000000000";

struct Case {
    name: &'static str,
    token: Option<&'static str>,
    params: Vec<(&'static str, &'static str)>,
}

fn cases() -> Vec<Case> {
    let participant = |event: &'static str, kind: &'static str| {
        vec![
            ("EventType", event),
            ("AccountSid", AC),
            ("InteractionSid", KD),
            ("ChannelSid", UO),
            ("ParticipantSid", UT),
            ("ParticipantType", kind),
            ("TaskSid", WT),
            ("MediaChannelSid", CH),
            ("MediaChannelType", "whatsapp"),
        ]
    };
    vec![
        Case {
            name: "interaction_created",
            token: Some("idem-1"),
            params: vec![
                ("EventType", "onInteractionCreated"),
                ("AccountSid", AC),
                ("InstanceSid", GO),
                ("InteractionSid", KD),
                ("MediaChannelSid", CH),
                ("MediaChannelType", "sms"),
            ],
        },
        Case {
            name: "channel_created",
            token: Some("idem-2"),
            params: vec![
                ("EventType", "onChannelCreated"),
                ("AccountSid", AC),
                ("InstanceSid", GO),
                ("InteractionSid", KD),
                ("ChannelSid", UO),
                ("MediaChannelSid", CH),
                ("MediaChannelType", "chat"),
            ],
        },
        Case {
            name: "channel_create_failed",
            token: Some("idem-3"),
            params: vec![
                ("EventType", "onChannelCreateFailed"),
                ("AccountSid", AC),
                ("ErrorCode", "45001"),
                ("ErrorMessage", "Downstream resource failed"),
                ("MediaChannelType", "voice"),
            ],
        },
        Case {
            name: "channel_create_failed_non_integer_error_code",
            token: Some("idem-4"),
            params: vec![
                ("EventType", "onChannelCreateFailed"),
                ("AccountSid", AC),
                ("ErrorCode", "E45001"),
                ("InteractionSid", KD),
            ],
        },
        Case {
            name: "channel_status_updated",
            token: Some("idem-5"),
            params: vec![
                ("EventType", "onChannelStatusUpdated"),
                ("AccountSid", AC),
                ("InstanceSid", GO),
                ("InteractionSid", KD),
                ("ChannelSid", UO),
                ("MediaChannelSid", CH),
                ("ChannelStatus", "closed"),
                ("MediaChannelType", "sms"),
            ],
        },
        Case {
            name: "channel_status_inactive",
            token: Some("idem-6"),
            params: vec![
                ("EventType", "onChannelStatusUpdated"),
                ("AccountSid", AC),
                ("InteractionSid", KD),
                ("ChannelSid", UO),
                ("ChannelStatus", "inactive"),
                ("MediaChannelType", "web"),
            ],
        },
        Case {
            name: "participant_joined",
            token: Some("idem-7"),
            params: participant("onParticipantJoined", "agent"),
        },
        Case {
            name: "participant_left",
            token: Some("idem-8"),
            params: participant("onParticipantLeft", "customer"),
        },
        Case {
            name: "participant_updated",
            token: Some("idem-9"),
            params: participant("onParticipantUpdated", "supervisor"),
        },
        Case {
            name: "participant_joined_flex_instance_sid",
            token: Some("idem-10"),
            params: {
                let mut p = participant("onParticipantJoined", "bot");
                p.push(("FlexInstanceSid", GO));
                p
            },
        },
        Case {
            name: "unknown_event_type",
            token: Some("idem-11"),
            params: vec![
                ("EventType", "onInteractionTransferred"),
                ("AccountSid", AC),
                ("InstanceSid", GO),
                ("InteractionSid", KD),
                ("TransferTarget", "WW00000000000000000000000000000000"),
            ],
        },
        Case {
            name: "unknown_parameters_and_repeats",
            token: Some("idem-12"),
            params: vec![
                ("EventType", "onInteractionCreated"),
                ("AccountSid", AC),
                ("InstanceSid", GO),
                ("InteractionSid", KD),
                ("Routing.Properties", "b"),
                ("Routing.Properties", "a"),
                ("NewTwilioField", ""),
                ("MediaChannelType", "gbm"),
            ],
        },
        Case {
            name: "no_idempotency_token",
            token: None,
            params: vec![
                ("EventType", "onInteractionCreated"),
                ("AccountSid", AC),
                ("MediaChannelType", "email"),
            ],
        },
    ]
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/v1")
}

fn emit(case: &Case) -> Value {
    let request = WebhookRequest {
        params: case
            .params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        idempotency_token: case.token.map(str::to_owned),
        received_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_000_000_123),
    };
    let event = normalize(Verified::attest(request, Attestation::AuthToken)).unwrap();
    serde_json::from_slice(event.envelope_json()).unwrap()
}

#[test]
fn golden_events_are_pinned() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for case in cases() {
        let path = golden_dir().join(format!("{}.json", case.name));
        let actual = emit(&case);
        if update {
            let text = serde_json::to_string_pretty(&actual).unwrap() + "\n";
            std::fs::write(&path, text).unwrap();
            continue;
        }
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .unwrap();
        if expected != actual {
            mismatches.push(format!(
                "{}:\nexpected {}\nactual   {}",
                case.name, expected, actual
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

fn validator(file: &str) -> jsonschema::Validator {
    let (_, text) = SCHEMA_FILES
        .iter()
        .find(|(name, _)| *name == file)
        .unwrap_or_else(|| panic!("no schema {file}"));
    let schema: Value = serde_json::from_str(text).unwrap();
    jsonschema::draft202012::new(&schema).unwrap()
}

#[test]
fn every_golden_event_validates_against_the_shipped_schemas() {
    let envelope = validator("CloudEvent.json");
    let mut checked = 0;
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let path = entry.unwrap().path();
        let event: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let errors: Vec<String> = envelope
            .iter_errors(&event)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        // dataschema is `urn:flexbridge:schema:<id>:1`, the $id of the data schema file.
        let dataschema = event["dataschema"].as_str().unwrap();
        let id = dataschema
            .strip_prefix("urn:flexbridge:schema:")
            .and_then(|rest| rest.strip_suffix(":1"))
            .unwrap();
        let data_validator = validator(&format!("{id}.json"));
        let errors: Vec<String> = data_validator
            .iter_errors(&event["data"])
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        checked += 1;
    }
    assert_eq!(checked, cases().len());
}

#[test]
fn schemas_reject_what_v1_never_emits() {
    let case = &cases()[4];
    let mut event = emit(case);
    let envelope = validator("CloudEvent.json");
    assert!(envelope.is_valid(&event));
    event["data"]["surprise"] = Value::from("x");
    let data = validator("FlexInteractions.ChannelStatusUpdated.json");
    assert!(
        !data.is_valid(&event["data"]),
        "unknown data fields must go under extra"
    );
    event["specversion"] = Value::from("0.3");
    assert!(!envelope.is_valid(&event));
}

#[test]
fn every_kind_has_its_schema_file_and_id() {
    for kind in flexbridge_core::EventKind::ALL {
        let file = format!("{}.json", kind.schema_name());
        let (_, text) = SCHEMA_FILES
            .iter()
            .find(|(name, _)| *name == file)
            .unwrap_or_else(|| panic!("no schema file for {kind}"));
        let schema: Value = serde_json::from_str(text).unwrap();
        assert_eq!(schema["$id"], kind.names().data_schema);
    }
}

/// A published version never changes in place: the checksums of schemas/v1 are pinned here.
/// Changing a v1 schema is a new version (schemas/v2 and `schema::v2`), never an edit.
#[test]
fn published_v1_schemas_never_change() {
    let sums = std::fs::read_to_string(schemas_dir().join("SHA256SUMS")).unwrap();
    let mut listed = 0;
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (sum, name) = line.split_once("  ").unwrap();
        let content = std::fs::read(schemas_dir().join(name)).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&content)),
            sum,
            "schemas/v1/{name} changed: v1 is published; add a new version instead"
        );
        let embedded = SCHEMA_FILES.iter().find(|(n, _)| *n == name).unwrap();
        assert_eq!(embedded.1.as_bytes(), content.as_slice());
        listed += 1;
    }
    assert_eq!(listed, SCHEMA_FILES.len());
}
