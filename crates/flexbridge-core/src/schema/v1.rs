//! Schema v1: a CloudEvents 1.0 JSON envelope around the typed Interactions event.
//!
//! Naming (documented in the README, relied on by consumers):
//! - `type`: `com.twilio.flex.interactions.<object>.<action>`, e.g.
//!   `com.twilio.flex.interactions.channel.status_updated`; unknown event types get
//!   `com.twilio.flex.interactions.unknown` with the raw name in `data.event_type`.
//! - `source`: `/twilio/accounts/<AccountSid>/flex/interactions`.
//! - `subject`: the Interaction SID, where the event has one.
//! - `time`: receipt time (Twilio sends none), RFC 3339 UTC with milliseconds.
//! - `dataschema`: `urn:flexbridge:schema:<SchemaId>:<version>`, e.g.
//!   `urn:flexbridge:schema:FlexInteractions.ChannelStatusUpdated:1`, in the manner of Twilio
//!   Event Streams (schema id plus an immutable integer version). The same URN is the `$id`
//!   of the shipped JSON Schema file.
//! - `partitionkey` (extension): the Interaction SID, else the Account SID.
//! - `id`: see [`event_id`].

use crate::cloudevents::{any_byte, Attribute};
use crate::event::{EventKind, InteractionEvent, ModelError};
use crate::webhook::{Verified, WebhookRequest};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::time::SystemTime;

/// The schema version this module emits.
pub const VERSION: u32 = 1;

/// CloudEvents `specversion`.
pub const SPEC_VERSION: &str = "1.0";

/// `datacontenttype` of every event, and the content type of `data` in binary mode.
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// The content type of a whole envelope (structured mode).
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";

/// Why a verified request is not an event.
pub type NormalizeError = ModelError;

pub use crate::cloudevents::ContentMode;

/// The shipped JSON Schema files of v1 (draft 2020-12): file name and content. `flexbridge
/// schema` prints or writes them.
pub const SCHEMA_FILES: &[(&str, &str)] = &[
    (
        "CloudEvent.json",
        include_str!("../../../../schemas/v1/CloudEvent.json"),
    ),
    (
        "FlexInteractions.InteractionCreated.json",
        include_str!("../../../../schemas/v1/FlexInteractions.InteractionCreated.json"),
    ),
    (
        "FlexInteractions.ChannelCreated.json",
        include_str!("../../../../schemas/v1/FlexInteractions.ChannelCreated.json"),
    ),
    (
        "FlexInteractions.ChannelCreateFailed.json",
        include_str!("../../../../schemas/v1/FlexInteractions.ChannelCreateFailed.json"),
    ),
    (
        "FlexInteractions.ChannelStatusUpdated.json",
        include_str!("../../../../schemas/v1/FlexInteractions.ChannelStatusUpdated.json"),
    ),
    (
        "FlexInteractions.ParticipantJoined.json",
        include_str!("../../../../schemas/v1/FlexInteractions.ParticipantJoined.json"),
    ),
    (
        "FlexInteractions.ParticipantLeft.json",
        include_str!("../../../../schemas/v1/FlexInteractions.ParticipantLeft.json"),
    ),
    (
        "FlexInteractions.ParticipantUpdated.json",
        include_str!("../../../../schemas/v1/FlexInteractions.ParticipantUpdated.json"),
    ),
    (
        "FlexInteractions.Unknown.json",
        include_str!("../../../../schemas/v1/FlexInteractions.Unknown.json"),
    ),
];

/// The event id, deterministic so consumers can deduplicate on it, and never shared by two
/// distinct deliveries (a broker's duplicate window must never swallow a distinct event):
///
/// - with `I-Twilio-Idempotency-Token` (the same on Twilio's retries of one delivery):
///   `SHA-256("flexbridge.v1\0token\0" AccountSid "\0" token)`;
/// - without it: `SHA-256("flexbridge.v1\0params+time\0" P "\0" T)` where P is every received
///   parameter (so account and event type included), sorted bytewise by name then value,
///   repeats kept, each name and value preceded by its byte length as a 4-byte big-endian
///   integer, and T the receipt time in nanoseconds since the epoch, 8 bytes big-endian. The
///   ingress gives every request a distinct receipt time, so two deliveries with identical
///   parameters get distinct ids; a redelivery without the token cannot be recognised.
///
/// The id is the first 16 bytes of the digest in lower-case hex (32 characters).
pub fn event_id(
    account_sid: &str,
    token: Option<&str>,
    params: &[(String, String)],
    received_at: SystemTime,
) -> String {
    let mut hash = Sha256::new();
    match token {
        Some(token) => {
            hash.update(b"flexbridge.v1\0token\0");
            hash.update(account_sid.as_bytes());
            hash.update(b"\0");
            hash.update(token.as_bytes());
        }
        None => {
            hash.update(b"flexbridge.v1\0params+time\0");
            let mut sorted: Vec<&(String, String)> = params.iter().collect();
            sorted.sort_unstable();
            for (name, value) in sorted {
                for part in [name, value] {
                    hash.update((part.len() as u32).to_be_bytes());
                    hash.update(part.as_bytes());
                }
            }
            let nanos = received_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            hash.update(b"\0");
            hash.update(nanos.to_be_bytes());
        }
    }
    hex::encode(&hash.finalize()[..16])
}

/// A normalized event: the CloudEvent v1 envelope, with its JSON encoded once.
#[derive(Debug)]
pub struct Event {
    id: String,
    source: String,
    received_at: SystemTime,
    time: String,
    data: InteractionEvent,
    /// The envelope; `data` is its tail, so both are encoded once.
    envelope_json: Bytes,
    data_json: Bytes,
}

/// Turns a verified webhook into a v1 event. Fails only when `EventType` or `AccountSid` is
/// missing.
pub fn normalize(request: Verified<WebhookRequest>) -> Result<Event, NormalizeError> {
    let WebhookRequest {
        params,
        idempotency_token,
        received_at,
    } = request.into_inner();
    let account = params
        .iter()
        .find(|(name, value)| name == "AccountSid" && !value.is_empty())
        .map(|(_, value)| value.as_str())
        .ok_or(ModelError::MissingAccountSid);
    // The id is derived from the raw parameters before the model takes them apart.
    let id = match account {
        Ok(account) => event_id(account, idempotency_token.as_deref(), &params, received_at),
        Err(_) => String::new(),
    };
    let data = InteractionEvent::from_params(params)?;
    Ok(Event::new(id, received_at, data))
}

/// Appends `value` as a JSON string, byte for byte as serde_json writes it. The attributes
/// almost never need an escape and are copied whole; the rare one that does goes through
/// serde_json, whose loop looks each byte up in a table (once the largest single cost of
/// encoding an event).
fn json_string(out: &mut Vec<u8>, value: &str) {
    if any_byte(value, |b| b < 0x20 || b == b'"' || b == b'\\') {
        if let Err(error) = serde_json::to_writer(&mut *out, value) {
            tracing::error!(%error, "encoding an event attribute failed");
        }
        return;
    }
    out.reserve(value.len() + 2);
    out.push(b'"');
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
}

impl Event {
    /// Assembles an event and encodes it: `data` once, the envelope around it.
    pub fn new(id: String, received_at: SystemTime, data: InteractionEvent) -> Self {
        let account = data.account_sid();
        let mut source = String::with_capacity(account.len() + 40);
        source.push_str("/twilio/accounts/");
        source.push_str(account);
        source.push_str("/flex/interactions");
        let time = humantime::format_rfc3339_millis(received_at).to_string();
        let mut event = Self {
            id,
            source,
            received_at,
            time,
            data,
            envelope_json: Bytes::new(),
            data_json: Bytes::new(),
        };
        let (envelope, data_start) = event.encode();
        event.envelope_json = Bytes::from(envelope);
        // `data` is the envelope's last member: a slice of it, not a second encoding.
        event.data_json = event
            .envelope_json
            .slice(data_start..event.envelope_json.len() - 1);
        event
    }

    /// The envelope JSON, and where `data` starts in it. The attributes are written here, in
    /// the order and form serde_json gives a struct of them; `data`'s serde encoding is
    /// appended as the last member.
    fn encode(&self) -> (Vec<u8>, usize) {
        // Events measure 730-870 bytes: room for them without a reallocation.
        let mut out = Vec::with_capacity(1024);
        fn member(out: &mut Vec<u8>, key: &[u8], value: &str) {
            out.extend_from_slice(key);
            json_string(out, value);
        }
        member(&mut out, b"{\"specversion\":", SPEC_VERSION);
        member(&mut out, b",\"id\":", &self.id);
        member(&mut out, b",\"source\":", &self.source);
        member(&mut out, b",\"type\":", self.ce_type());
        if let Some(subject) = self.subject() {
            member(&mut out, b",\"subject\":", subject);
        }
        member(&mut out, b",\"time\":", &self.time);
        member(&mut out, b",\"datacontenttype\":", DATA_CONTENT_TYPE);
        member(&mut out, b",\"dataschema\":", self.data_schema());
        member(&mut out, b",\"partitionkey\":", self.partition_key());
        out.extend_from_slice(b",\"data\":");
        let data_start = out.len();
        // Serializing plain strings and maps into a Vec cannot fail.
        if let Err(error) = serde_json::to_writer(&mut out, &self.data) {
            tracing::error!(%error, "encoding event data failed");
        }
        out.push(b'}');
        (out, data_start)
    }

    /// CloudEvent `id`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        self.data.kind()
    }

    /// The CloudEvents `type` (`com.twilio.flex.interactions.channel.status_updated`), not
    /// to be confused with Twilio's `EventType` (`data().event_type()`).
    pub fn ce_type(&self) -> &'static str {
        self.kind().names().ce_type
    }

    /// CloudEvent `source`.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// CloudEvent `subject`: the Interaction SID, where present.
    pub fn subject(&self) -> Option<&str> {
        self.data.interaction_sid()
    }

    /// CloudEvent `time` (receipt time, RFC 3339).
    pub fn time(&self) -> &str {
        &self.time
    }

    /// The receipt time itself (what `time` renders).
    pub fn received_at(&self) -> SystemTime {
        self.received_at
    }

    /// CloudEvent `dataschema`.
    pub fn data_schema(&self) -> &'static str {
        self.kind().names().data_schema
    }

    /// CloudEvent `datacontenttype`.
    pub fn data_content_type(&self) -> &'static str {
        DATA_CONTENT_TYPE
    }

    /// The `partitionkey` extension: Interaction SID, else Account SID.
    pub fn partition_key(&self) -> &str {
        self.data
            .interaction_sid()
            .unwrap_or_else(|| self.data.account_sid())
    }

    /// The typed `data`.
    pub fn data(&self) -> &InteractionEvent {
        &self.data
    }

    /// The whole envelope as JSON (structured content mode), encoded once.
    pub fn envelope_json(&self) -> &Bytes {
        &self.envelope_json
    }

    /// `data` alone as JSON (binary content mode): a slice of the envelope.
    pub fn data_json(&self) -> &Bytes {
        &self.data_json
    }

    /// Every context attribute but `data`, extensions included, as (name, value) in
    /// CloudEvents order; protocol bindings turn them into `ce_*`, `ce-*` or `cloudEvents_*`
    /// headers. `subject` is left out when the event has none.
    pub fn attributes(&self) -> impl Iterator<Item = (Attribute, &str)> {
        [
            (Attribute::SpecVersion, Some(SPEC_VERSION)),
            (Attribute::Id, Some(self.id())),
            (Attribute::Source, Some(self.source())),
            (Attribute::Type, Some(self.ce_type())),
            (Attribute::Subject, self.subject()),
            (Attribute::Time, Some(self.time())),
            (Attribute::DataContentType, Some(DATA_CONTENT_TYPE)),
            (Attribute::DataSchema, Some(self.data_schema())),
            (Attribute::PartitionKey, Some(self.partition_key())),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|value| (name, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    #[test]
    fn without_a_token_the_receipt_time_separates_identical_deliveries() {
        let params = vec![
            ("EventType".to_owned(), "onChannelCreated".to_owned()),
            ("AccountSid".to_owned(), "AC1".to_owned()),
        ];
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(1_796_000_000_123_456_789);
        let later = t + std::time::Duration::from_nanos(1);
        let id = event_id("AC1", None, &params, t);
        assert_eq!(id, event_id("AC1", None, &params, t), "deterministic");
        assert_ne!(id, event_id("AC1", None, &params, later));
        // The rule as documented, computed by hand.
        let mut hash = Sha256::new();
        hash.update(b"flexbridge.v1\0params+time\0");
        for part in ["AccountSid", "AC1", "EventType", "onChannelCreated"] {
            hash.update((part.len() as u32).to_be_bytes());
            hash.update(part.as_bytes());
        }
        hash.update(b"\0");
        hash.update(1_796_000_000_123_456_789u64.to_be_bytes());
        assert_eq!(id, hex::encode(&hash.finalize()[..16]));
        // With the token, the time does not matter: Twilio's retries share the id.
        assert_eq!(
            event_id("AC1", Some("tok"), &params, t),
            event_id("AC1", Some("tok"), &params, later)
        );
    }

    #[test]
    fn data_is_the_envelopes_data_member() {
        for kind in EventKind::ALL {
            let data = InteractionEvent::from_params(vec![
                (
                    "EventType".into(),
                    kind.twilio_name().unwrap_or("onNew").into(),
                ),
                ("AccountSid".into(), "AC1".into()),
                ("InteractionSid".into(), "KD\"1\u{e9}".into()),
            ])
            .unwrap();
            let event = Event::new("id".into(), SystemTime::UNIX_EPOCH, data);
            let envelope: serde_json::Value =
                serde_json::from_slice(event.envelope_json()).unwrap();
            let data: serde_json::Value = serde_json::from_slice(event.data_json()).unwrap();
            assert_eq!(envelope["data"], data);
            assert_eq!(envelope["type"], kind.names().ce_type);
            assert_eq!(envelope["time"], "1970-01-01T00:00:00.000Z");
            assert_eq!(
                serde_json::to_vec(event.data()).unwrap(),
                event.data_json().to_vec()
            );
        }
    }

    /// The hand-written attribute encoding gives serde_json's bytes exactly: every ASCII
    /// character, multi-byte ones, and a character to escape at every position around the
    /// 16-byte chunk boundaries.
    #[test]
    fn attribute_strings_are_encoded_as_serde_json_does() {
        let mut cases: Vec<String> = (0u8..0x80).map(|b| char::from(b).to_string()).collect();
        cases.extend(
            [
                "",
                "KD351f4059ece317a72603d06b13799064",
                "\u{e9}t\u{e9} \u{1F600}",
            ]
            .map(String::from),
        );
        for len in 0..40 {
            for special in ['"', '\\', '\n', '\u{1}', '\u{7f}', '\u{e9}'] {
                for at in 0..=len {
                    let mut text = "a".repeat(len);
                    text.insert(at, special);
                    cases.push(text);
                }
            }
        }
        for text in cases {
            let mut out = Vec::new();
            json_string(&mut out, &text);
            assert_eq!(out, serde_json::to_vec(&text).unwrap(), "{text:?}");
        }
    }

    /// The envelope is byte for byte what serde_json makes of the same members in the same
    /// order, with and without `subject`, with attribute values that need escapes.
    #[test]
    fn the_envelope_is_serde_jsons_encoding_of_its_members() {
        for interaction in [Some("KD\"1\u{e9}\\\n"), None] {
            let mut params = vec![
                ("EventType".to_owned(), "onChannelStatusUpdated".to_owned()),
                ("AccountSid".to_owned(), "AC\"x\u{1}".to_owned()),
                ("ChannelStatus".to_owned(), "active".to_owned()),
            ];
            if let Some(sid) = interaction {
                params.push(("InteractionSid".to_owned(), sid.to_owned()));
            }
            let data = InteractionEvent::from_params(params).unwrap();
            let event = Event::new("i\"d".into(), SystemTime::UNIX_EPOCH, data);
            let mut expected = serde_json::Map::new();
            for (name, value) in [
                ("specversion", Some(SPEC_VERSION)),
                ("id", Some(event.id())),
                ("source", Some(event.source())),
                ("type", Some(event.ce_type())),
                ("subject", event.subject()),
                ("time", Some(event.time())),
                ("datacontenttype", Some(DATA_CONTENT_TYPE)),
                ("dataschema", Some(event.data_schema())),
                ("partitionkey", Some(event.partition_key())),
            ] {
                if let Some(value) = value {
                    expected.insert(name.to_owned(), value.into());
                }
            }
            expected.insert(
                "data".to_owned(),
                serde_json::to_value(event.data()).unwrap(),
            );
            assert_eq!(
                String::from_utf8(event.envelope_json().to_vec()).unwrap(),
                serde_json::to_string(&expected).unwrap()
            );
        }
    }
}
