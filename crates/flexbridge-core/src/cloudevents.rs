//! The CloudEvents protocol bindings, written once for every broker sink: the header that
//! carries each context attribute in binary mode, and what a message carries in each content
//! mode. A sink only says which binding it speaks and where its protocol puts headers.

use crate::schema::v1::{Event, DATA_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE};
use bytes::Bytes;
use std::fmt;

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

/// A context attribute v1 events carry besides `data`, in CloudEvents order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute {
    /// `specversion`
    SpecVersion,
    /// `id`
    Id,
    /// `source`
    Source,
    /// `type`
    Type,
    /// `subject`
    Subject,
    /// `time`
    Time,
    /// `datacontenttype`
    DataContentType,
    /// `dataschema`
    DataSchema,
    /// `partitionkey` (extension)
    PartitionKey,
}

/// Attribute names, then their header names per binding, in [`Attribute`] order.
const NAMES: [[&str; 4]; 9] = [
    [
        "specversion",
        "ce_specversion",
        "cloudEvents_specversion",
        "ce-specversion",
    ],
    ["id", "ce_id", "cloudEvents_id", "ce-id"],
    ["source", "ce_source", "cloudEvents_source", "ce-source"],
    ["type", "ce_type", "cloudEvents_type", "ce-type"],
    ["subject", "ce_subject", "cloudEvents_subject", "ce-subject"],
    ["time", "ce_time", "cloudEvents_time", "ce-time"],
    [
        "datacontenttype",
        "ce_datacontenttype",
        "cloudEvents_datacontenttype",
        "ce-datacontenttype",
    ],
    [
        "dataschema",
        "ce_dataschema",
        "cloudEvents_dataschema",
        "ce-dataschema",
    ],
    [
        "partitionkey",
        "ce_partitionkey",
        "cloudEvents_partitionkey",
        "ce-partitionkey",
    ],
];

impl Attribute {
    /// The attribute's CloudEvents name.
    pub fn name(self) -> &'static str {
        NAMES[self as usize][0]
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A CloudEvents protocol binding: the prefix of the headers that carry attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// Kafka: `ce_<attribute>`.
    Kafka = 1,
    /// AMQP 0-9-1 (RabbitMQ): `cloudEvents_<attribute>`.
    Amqp = 2,
    /// NATS, as HTTP: `ce-<attribute>`, values percent-encoded by the sink.
    Nats = 3,
}

impl Binding {
    /// The header that carries `attribute` in binary mode.
    pub fn header(self, attribute: Attribute) -> &'static str {
        NAMES[attribute as usize][self as usize]
    }

    /// What a message of this binding carries for `event` in `mode`.
    pub fn encode(self, event: &Event, mode: ContentMode) -> Encoded<'_> {
        match mode {
            ContentMode::Binary => Encoded {
                binding: self,
                event,
                content_type: DATA_CONTENT_TYPE,
                payload: event.data_json(),
                binary: true,
            },
            ContentMode::Structured => Encoded {
                binding: self,
                event,
                content_type: STRUCTURED_CONTENT_TYPE,
                payload: event.envelope_json(),
                binary: false,
            },
        }
    }
}

/// One event as a message of a binding: content type, payload and attribute headers.
#[derive(Debug, Clone, Copy)]
pub struct Encoded<'a> {
    binding: Binding,
    event: &'a Event,
    /// The message's content type: `application/json` in binary mode (the body is `data`),
    /// `application/cloudevents+json; charset=UTF-8` in structured mode.
    pub content_type: &'static str,
    /// The body: `data` in binary mode, the envelope in structured mode.
    pub payload: &'a Bytes,
    binary: bool,
}

impl<'a> Encoded<'a> {
    /// The attribute headers, (header name, value): every attribute in binary mode, none in
    /// structured mode (the envelope carries them).
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &'a str)> + 'a {
        let (binding, binary) = (self.binding, self.binary);
        self.event
            .attributes()
            .filter(move |_| binary)
            .map(move |(attribute, value)| (binding.header(attribute), value))
    }

    /// True in structured mode.
    pub fn is_structured(&self) -> bool {
        !self.binary
    }
}

/// Whether any byte of `value` matches: the check before escaping or encoding an attribute
/// value, which almost never needs it (SIDs, URNs, times). It looks at 16 bytes at a time with
/// no early exit inside a chunk, so the compiler compares them at once; a byte-by-byte search
/// costs several times as much.
pub fn any_byte(value: &str, matches: impl Fn(u8) -> bool + Copy) -> bool {
    let chunk_matches = |chunk: &[u8]| chunk.iter().fold(false, |any, &b| any | matches(b));
    let mut chunks = value.as_bytes().chunks_exact(16);
    let tail = chunks.remainder();
    chunks.any(chunk_matches) || chunk_matches(tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::InteractionEvent;
    use std::time::SystemTime;

    fn event() -> Event {
        let data = InteractionEvent::from_params(vec![
            ("EventType".into(), "onInteractionCreated".into()),
            ("AccountSid".into(), "AC1".into()),
            ("InteractionSid".into(), "KD1".into()),
        ])
        .unwrap();
        Event::new("id1".into(), SystemTime::UNIX_EPOCH, data)
    }

    #[test]
    fn header_names_follow_each_binding() {
        for (attribute, _) in event().attributes() {
            let name = attribute.name();
            assert_eq!(Binding::Kafka.header(attribute), format!("ce_{name}"));
            assert_eq!(
                Binding::Amqp.header(attribute),
                format!("cloudEvents_{name}")
            );
            assert_eq!(Binding::Nats.header(attribute), format!("ce-{name}"));
        }
    }

    #[test]
    fn binary_carries_data_and_headers_structured_the_envelope() {
        let event = event();
        let binary = Binding::Kafka.encode(&event, ContentMode::Binary);
        assert_eq!(binary.payload, event.data_json());
        assert_eq!(binary.content_type, "application/json");
        let headers: Vec<_> = binary.headers().collect();
        assert_eq!(headers.len(), 9);
        assert!(headers.contains(&("ce_id", "id1")));
        assert!(headers.contains(&("ce_subject", "KD1")));
        let structured = Binding::Amqp.encode(&event, ContentMode::Structured);
        assert_eq!(structured.payload, event.envelope_json());
        assert_eq!(structured.content_type, STRUCTURED_CONTENT_TYPE);
        assert_eq!(structured.headers().count(), 0);
    }
}
