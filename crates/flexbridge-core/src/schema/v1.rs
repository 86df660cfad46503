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

use crate::event::{EventKind, InteractionEvent, ModelError};
use crate::webhook::{Verified, WebhookRequest};
use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
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

/// How a broker sink carries an event (CloudEvents content modes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// Attributes as protocol headers, `data` as the body.
    #[default]
    Binary,
    /// The whole envelope as the body (`application/cloudevents+json`).
    Structured,
}

/// The CloudEvent `type` of a kind.
pub fn event_type(kind: EventKind) -> &'static str {
    match kind {
        EventKind::InteractionCreated => "com.twilio.flex.interactions.interaction.created",
        EventKind::ChannelCreated => "com.twilio.flex.interactions.channel.created",
        EventKind::ChannelCreateFailed => "com.twilio.flex.interactions.channel.create_failed",
        EventKind::ChannelStatusUpdated => "com.twilio.flex.interactions.channel.status_updated",
        EventKind::ParticipantJoined => "com.twilio.flex.interactions.participant.joined",
        EventKind::ParticipantLeft => "com.twilio.flex.interactions.participant.left",
        EventKind::ParticipantUpdated => "com.twilio.flex.interactions.participant.updated",
        EventKind::Unknown => "com.twilio.flex.interactions.unknown",
    }
}

/// The CloudEvent `dataschema` of a kind: `urn:flexbridge:schema:<SchemaId>:1`.
pub fn data_schema(kind: EventKind) -> &'static str {
    match kind {
        EventKind::InteractionCreated => {
            "urn:flexbridge:schema:FlexInteractions.InteractionCreated:1"
        }
        EventKind::ChannelCreated => "urn:flexbridge:schema:FlexInteractions.ChannelCreated:1",
        EventKind::ChannelCreateFailed => {
            "urn:flexbridge:schema:FlexInteractions.ChannelCreateFailed:1"
        }
        EventKind::ChannelStatusUpdated => {
            "urn:flexbridge:schema:FlexInteractions.ChannelStatusUpdated:1"
        }
        EventKind::ParticipantJoined => {
            "urn:flexbridge:schema:FlexInteractions.ParticipantJoined:1"
        }
        EventKind::ParticipantLeft => "urn:flexbridge:schema:FlexInteractions.ParticipantLeft:1",
        EventKind::ParticipantUpdated => {
            "urn:flexbridge:schema:FlexInteractions.ParticipantUpdated:1"
        }
        EventKind::Unknown => "urn:flexbridge:schema:FlexInteractions.Unknown:1",
    }
}

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

/// The event id, deterministic so consumers can deduplicate on it:
///
/// - with `I-Twilio-Idempotency-Token` (the same on Twilio's retries of one delivery):
///   `SHA-256("flexbridge.v1\0token\0" AccountSid "\0" token)`;
/// - without it: `SHA-256("flexbridge.v1\0params\0" P)` where P is every received parameter
///   (so account and event type included), sorted bytewise by name then value, repeats kept,
///   each name and value preceded by its byte length as a 4-byte big-endian integer.
///
/// The id is the first 16 bytes of the digest in lower-case hex (32 characters).
pub fn event_id(account_sid: &str, token: Option<&str>, params: &[(String, String)]) -> String {
    let mut hash = Sha256::new();
    match token {
        Some(token) => {
            hash.update(b"flexbridge.v1\0token\0");
            hash.update(account_sid.as_bytes());
            hash.update(b"\0");
            hash.update(token.as_bytes());
        }
        None => {
            hash.update(b"flexbridge.v1\0params\0");
            let mut sorted: Vec<&(String, String)> = params.iter().collect();
            sorted.sort_unstable();
            for (name, value) in sorted {
                for part in [name, value] {
                    hash.update((part.len() as u32).to_be_bytes());
                    hash.update(part.as_bytes());
                }
            }
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
    envelope_json: Bytes,
    data_json: OnceLock<Bytes>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    time: &'a str,
    datacontenttype: &'static str,
    dataschema: &'static str,
    partitionkey: &'a str,
    data: &'a InteractionEvent,
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
        Ok(account) => event_id(account, idempotency_token.as_deref(), &params),
        Err(_) => String::new(),
    };
    let data = InteractionEvent::from_params(params)?;
    Ok(Event::new(id, received_at, data))
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC, written directly (this runs for every event).
fn rfc3339_millis(time: SystemTime) -> String {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    let millis = since_epoch.subsec_millis();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    /// Appends `value` as exactly `width` decimal digits.
    fn digits(out: &mut String, value: u64, width: u32) {
        for power in (0..width).rev() {
            let digit = (value / 10u64.pow(power) % 10) as u8;
            out.push(char::from(b'0' + digit));
        }
    }
    let mut out = String::with_capacity(24);
    digits(&mut out, year.clamp(0, 9999) as u64, 4);
    out.push('-');
    digits(&mut out, month as u64, 2);
    out.push('-');
    digits(&mut out, day as u64, 2);
    out.push('T');
    digits(&mut out, rem / 3600, 2);
    out.push(':');
    digits(&mut out, rem / 60 % 60, 2);
    out.push(':');
    digits(&mut out, rem % 60, 2);
    out.push('.');
    digits(&mut out, u64::from(millis), 3);
    out.push('Z');
    out
}

impl Event {
    /// Assembles an event and encodes its envelope.
    pub fn new(id: String, received_at: SystemTime, data: InteractionEvent) -> Self {
        let account = data.account_sid();
        let mut source = String::with_capacity(account.len() + 40);
        source.push_str("/twilio/accounts/");
        source.push_str(account);
        source.push_str("/flex/interactions");
        let time = rfc3339_millis(received_at);
        let mut event = Self {
            id,
            source,
            received_at,
            time,
            data,
            envelope_json: Bytes::new(),
            data_json: OnceLock::new(),
        };
        event.envelope_json = Bytes::from(event.encode_envelope());
        event
    }

    fn encode_envelope(&self) -> Vec<u8> {
        debug_assert!(self.time.len() == 24);
        let envelope = Envelope {
            specversion: SPEC_VERSION,
            id: &self.id,
            source: &self.source,
            ty: self.event_type(),
            subject: self.subject(),
            time: &self.time,
            datacontenttype: DATA_CONTENT_TYPE,
            dataschema: self.data_schema(),
            partitionkey: self.partition_key(),
            data: &self.data,
        };
        let mut out = Vec::with_capacity(768);
        // Serializing plain strings and maps into a Vec cannot fail.
        if let Err(error) = serde_json::to_writer(&mut out, &envelope) {
            tracing::error!(%error, "encoding an event envelope failed");
        }
        out
    }

    /// CloudEvent `id`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        self.data.kind()
    }

    /// CloudEvent `type`.
    pub fn event_type(&self) -> &'static str {
        event_type(self.kind())
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
        data_schema(self.kind())
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

    /// `data` alone as JSON (binary content mode), encoded on first use.
    pub fn data_json(&self) -> &Bytes {
        self.data_json
            .get_or_init(|| match serde_json::to_vec(&self.data) {
                Ok(json) => Bytes::from(json),
                Err(error) => {
                    tracing::error!(%error, "encoding event data failed");
                    Bytes::new()
                }
            })
    }

    /// Every context attribute but `data`, extensions included, as (name, value) in
    /// CloudEvents order; protocol bindings turn them into `ce_*`, `ce-*` or `cloudEvents_*`
    /// headers. `subject` is left out when the event has none.
    pub fn attributes(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("specversion", Some(SPEC_VERSION)),
            ("id", Some(self.id())),
            ("source", Some(self.source())),
            ("type", Some(self.event_type())),
            ("subject", self.subject()),
            ("time", Some(self.time())),
            ("datacontenttype", Some(DATA_CONTENT_TYPE)),
            ("dataschema", Some(self.data_schema())),
            ("partitionkey", Some(self.partition_key())),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|value| (name, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_matches_humantime() {
        for secs in [
            0u64,
            951_782_400,
            1_796_000_000,
            4_102_444_799,
            253_402_300_799,
        ] {
            for millis in [0u64, 7, 999] {
                let t = SystemTime::UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis);
                assert_eq!(
                    rfc3339_millis(t),
                    humantime::format_rfc3339_millis(t).to_string()
                );
            }
        }
    }
}
