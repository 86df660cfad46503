//! The typed model of Flex Interactions events.
//!
//! Seven documented event types plus `Unknown`, which is kept and published, never dropped.
//! Every field except `EventType` and `AccountSid` is optional, every enum is open, and
//! parameters this model does not know are kept under `extra` by their Twilio name.

use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// The kind of an event, with its names in every vocabulary flexbridge uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `onInteractionCreated`
    InteractionCreated,
    /// `onChannelCreated`
    ChannelCreated,
    /// `onChannelCreateFailed`
    ChannelCreateFailed,
    /// `onChannelStatusUpdated`
    ChannelStatusUpdated,
    /// `onParticipantJoined`
    ParticipantJoined,
    /// `onParticipantLeft`
    ParticipantLeft,
    /// `onParticipantUpdated`
    ParticipantUpdated,
    /// Any other `EventType`: published as is, never dropped.
    Unknown,
}

impl EventKind {
    /// Every kind, documented ones first.
    pub const ALL: [EventKind; 8] = [
        EventKind::InteractionCreated,
        EventKind::ChannelCreated,
        EventKind::ChannelCreateFailed,
        EventKind::ChannelStatusUpdated,
        EventKind::ParticipantJoined,
        EventKind::ParticipantLeft,
        EventKind::ParticipantUpdated,
        EventKind::Unknown,
    ];

    /// Maps Twilio's `EventType` value (case-sensitive, as documented).
    pub fn from_twilio(event_type: &str) -> Self {
        KINDS
            .iter()
            .find(|row| row.twilio == Some(event_type))
            .map_or(Self::Unknown, |row| row.kind)
    }

    /// Every name of this kind (its row of [`KINDS`]).
    pub fn names(self) -> &'static KindNames {
        &KINDS[self as usize]
    }

    /// Twilio's `EventType` value; `None` for `Unknown`.
    pub fn twilio_name(self) -> Option<&'static str> {
        self.names().twilio
    }

    /// The short name used in routing templates (`{event}`) and metric labels:
    /// `object.action`, e.g. `channel.status_updated`.
    pub fn short_name(self) -> &'static str {
        self.names().short
    }

    /// The schema id of the event's `data`, e.g. `FlexInteractions.ChannelStatusUpdated`.
    pub fn schema_name(self) -> &'static str {
        self.names().schema_id
    }
}

/// Every name one event kind has, in each vocabulary flexbridge speaks.
#[derive(Debug, PartialEq, Eq)]
pub struct KindNames {
    /// The kind this row describes.
    pub kind: EventKind,
    /// Twilio's `EventType` (`onChannelStatusUpdated`); `None` for `Unknown`.
    pub twilio: Option<&'static str>,
    /// `object.action` (`channel.status_updated`): routing templates and metric labels.
    pub short: &'static str,
    /// The CloudEvents `type` (`com.twilio.flex.interactions.channel.status_updated`).
    pub ce_type: &'static str,
    /// The schema id of `data` (`FlexInteractions.ChannelStatusUpdated`).
    pub schema_id: &'static str,
    /// The v1 CloudEvents `dataschema`: `urn:flexbridge:schema:<schema id>:1`.
    pub data_schema: &'static str,
}

macro_rules! kind_row {
    ($kind:ident, $twilio:expr, $short:literal, $schema:literal) => {
        KindNames {
            kind: EventKind::$kind,
            twilio: $twilio,
            short: $short,
            ce_type: concat!("com.twilio.flex.interactions.", $short),
            schema_id: concat!("FlexInteractions.", $schema),
            data_schema: concat!("urn:flexbridge:schema:FlexInteractions.", $schema, ":1"),
        }
    };
}

/// The one table of event kinds, in [`EventKind`] order. The model, schema v1, routing, the
/// Flex API client and the CLI all read their names from here.
pub const KINDS: [KindNames; 8] = [
    kind_row!(
        InteractionCreated,
        Some("onInteractionCreated"),
        "interaction.created",
        "InteractionCreated"
    ),
    kind_row!(
        ChannelCreated,
        Some("onChannelCreated"),
        "channel.created",
        "ChannelCreated"
    ),
    kind_row!(
        ChannelCreateFailed,
        Some("onChannelCreateFailed"),
        "channel.create_failed",
        "ChannelCreateFailed"
    ),
    kind_row!(
        ChannelStatusUpdated,
        Some("onChannelStatusUpdated"),
        "channel.status_updated",
        "ChannelStatusUpdated"
    ),
    kind_row!(
        ParticipantJoined,
        Some("onParticipantJoined"),
        "participant.joined",
        "ParticipantJoined"
    ),
    kind_row!(
        ParticipantLeft,
        Some("onParticipantLeft"),
        "participant.left",
        "ParticipantLeft"
    ),
    kind_row!(
        ParticipantUpdated,
        Some("onParticipantUpdated"),
        "participant.updated",
        "ParticipantUpdated"
    ),
    kind_row!(Unknown, None, "unknown", "Unknown"),
];

/// The seven documented Twilio `EventType` values, in table order.
pub const TWILIO_EVENT_TYPES: [&str; 7] = {
    let mut names = [""; 7];
    let mut i = 0;
    while i < names.len() {
        if let Some(name) = KINDS[i].twilio {
            names[i] = name;
        }
        i += 1;
    }
    names
};

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// Declares an open enum: known values as variants, anything else kept in `Other`.
/// Serialized as the string Twilio sent, so an unexpected value never fails an event.
macro_rules! open_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $(
                #[doc = concat!("`", $text, "`")]
                $variant,
            )+
            /// A value Twilio sent that this version does not know.
            Other(String),
        }

        impl $name {
            /// Every known value.
            pub const KNOWN: &'static [&'static str] = &[$($text),+];

            /// The value as Twilio spells it.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)+
                    Self::Other(other) => other,
                }
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                match value.as_str() {
                    $($text => Self::$variant,)+
                    _ => Self::Other(value),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl FromParam for $name {
            fn from_param(value: String) -> Result<Self, String> {
                Ok(Self::from(value))
            }
        }
    };
}

open_enum!(
    /// `MediaChannelType`. The API enum; other values pass through.
    MediaChannelType {
        Voice => "voice",
        Sms => "sms",
        Email => "email",
        Web => "web",
        Whatsapp => "whatsapp",
        Chat => "chat",
        Messenger => "messenger",
        Gbm => "gbm",
    }
);

open_enum!(
    /// `ChannelStatus`. Documented as `active|closed`; `inactive` and the rest of the API enum
    /// arrive in practice.
    ChannelStatus {
        Setup => "setup",
        Active => "active",
        Failed => "failed",
        Closed => "closed",
        Inactive => "inactive",
        Pause => "pause",
        Transfer => "transfer",
    }
);

open_enum!(
    /// `ParticipantType`.
    ParticipantType {
        Supervisor => "supervisor",
        Customer => "customer",
        External => "external",
        Agent => "agent",
        Unknown => "unknown",
    }
);

/// Converts one parameter value into a typed field. An `Err` hands the raw value back so it
/// is kept under `extra` instead of failing the event.
pub trait FromParam: Sized {
    /// Parses a raw parameter value.
    fn from_param(value: String) -> Result<Self, String>;
}

impl FromParam for String {
    fn from_param(value: String) -> Result<Self, String> {
        Ok(value)
    }
}

impl FromParam for i64 {
    fn from_param(value: String) -> Result<Self, String> {
        value.trim().parse().map_err(|_| value)
    }
}

/// A parameter value kept under `extra`: a string, or a list when the name was repeated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ExtraValue {
    /// The name arrived once.
    One(String),
    /// The name arrived more than once, values in arrival order.
    Many(Vec<String>),
}

impl ExtraValue {
    fn push(&mut self, value: String) {
        match self {
            Self::One(first) => *self = Self::Many(vec![std::mem::take(first), value]),
            Self::Many(values) => values.push(value),
        }
    }
}

/// Parameters that the schema does not model, by their Twilio name.
pub type Extra = BTreeMap<String, ExtraValue>;

/// Takes parameters out of a request by name; what is left over becomes `extra`.
pub(crate) struct ParamReader {
    params: Vec<(String, String)>,
    extra: Extra,
}

impl ParamReader {
    pub(crate) fn new(params: Vec<(String, String)>) -> Self {
        Self {
            params,
            extra: Extra::new(),
        }
    }

    /// Takes the first value of `name`; empty values count as absent (Twilio sends optional
    /// parameters empty or not at all).
    pub(crate) fn take(&mut self, name: &str) -> Option<String> {
        let index = self.params.iter().position(|(n, _)| n == name)?;
        // `remove`, not `swap_remove`: what is left keeps its arrival order for `extra`.
        let (_, value) = self.params.remove(index);
        if value.is_empty() {
            None
        } else {
            Some(value)
        }
    }

    fn take_typed<T: FromParam>(&mut self, name: &str) -> Option<T> {
        let raw = self.take(name)?;
        match T::from_param(raw) {
            Ok(value) => Some(value),
            Err(raw) => {
                tracing::warn!(param = name, value = %raw, "parameter has an unexpected format; kept under extra");
                self.keep(name.to_owned(), raw);
                None
            }
        }
    }

    fn keep(&mut self, name: String, value: String) {
        match self.extra.get_mut(&name) {
            Some(existing) => existing.push(value),
            None => {
                self.extra.insert(name, ExtraValue::One(value));
            }
        }
    }

    fn into_extra(mut self) -> Extra {
        for (name, value) in std::mem::take(&mut self.params) {
            self.keep(name, value);
        }
        self.extra
    }
}

/// Declares one event type's `data` struct: the fields every event shares, then its own.
macro_rules! event_struct {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty = $param:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize)]
        pub struct $name {
            /// `EventType` as Twilio sent it.
            pub event_type: String,
            /// `AccountSid` (`AC…`).
            pub account_sid: String,
            /// `InstanceSid` (`GO…`), the Flex instance.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub instance_sid: Option<String>,
            /// `InteractionSid` (`KD…`).
            #[serde(skip_serializing_if = "Option::is_none")]
            pub interaction_sid: Option<String>,
            $(
                $(#[$fmeta])*
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
            /// `MediaChannelSid`: the Conversation (`CH…`) or Conference (`CF…`).
            #[serde(skip_serializing_if = "Option::is_none")]
            pub media_channel_sid: Option<String>,
            /// `MediaChannelType`.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub media_channel_type: Option<MediaChannelType>,
            /// Parameters this schema version does not model, by their Twilio name.
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            pub extra: Extra,
        }

        impl $name {
            fn read(event_type: String, account_sid: String, r: &mut ParamReader) -> Self {
                let instance_sid = r.take("InstanceSid");
                let interaction_sid = r.take("InteractionSid");
                $(let $field = r.take_typed::<$ty>($param);)*
                let media_channel_sid = r.take("MediaChannelSid");
                let media_channel_type = r.take_typed("MediaChannelType");
                Self {
                    event_type,
                    account_sid,
                    instance_sid,
                    interaction_sid,
                    $($field,)*
                    media_channel_sid,
                    media_channel_type,
                    extra: Extra::new(),
                }
            }
        }
    };
}

event_struct!(
    /// `onInteractionCreated`: an Interaction was created.
    InteractionCreated {}
);

event_struct!(
    /// `onChannelCreated`: a Channel was created.
    ChannelCreated {
        /// `ChannelSid` (`UO…`).
        channel_sid: String = "ChannelSid",
    }
);

event_struct!(
    /// `onChannelCreateFailed`: a Channel could not be created. Twilio documents no
    /// `InstanceSid` here, and the Interaction, Channel and media SIDs are optional.
    ChannelCreateFailed {
        /// `ChannelSid` (`UO…`); sometimes present although the Channel was not created.
        channel_sid: String = "ChannelSid",
        /// `ErrorCode`, Twilio's error code. A non-integer value is kept under `extra`.
        error_code: i64 = "ErrorCode",
        /// `ErrorMessage`.
        error_message: String = "ErrorMessage",
    }
);

event_struct!(
    /// `onChannelStatusUpdated`: a Channel's status changed.
    ChannelStatusUpdated {
        /// `ChannelSid` (`UO…`).
        channel_sid: String = "ChannelSid",
        /// `ChannelStatus`.
        channel_status: ChannelStatus = "ChannelStatus",
    }
);

event_struct!(
    /// `onParticipantJoined`, `onParticipantLeft` and `onParticipantUpdated`: a Participant
    /// joined, left or changed. Twilio documents no `InstanceSid` for these.
    ParticipantEvent {
        /// `ChannelSid` (`UO…`).
        channel_sid: String = "ChannelSid",
        /// `ParticipantSid` (`UT…`).
        participant_sid: String = "ParticipantSid",
        /// `ParticipantType`.
        participant_type: ParticipantType = "ParticipantType",
        /// `TaskSid` (`WT…`).
        task_sid: String = "TaskSid",
    }
);

event_struct!(
    /// Any `EventType` this version does not know. The shared fields are read; every other
    /// parameter is kept under `extra`.
    UnknownEvent {}
);

/// One Flex Interactions event, typed by kind. Serializes as the CloudEvent `data` object.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum InteractionEvent {
    /// `onInteractionCreated`
    InteractionCreated(InteractionCreated),
    /// `onChannelCreated`
    ChannelCreated(ChannelCreated),
    /// `onChannelCreateFailed`
    ChannelCreateFailed(ChannelCreateFailed),
    /// `onChannelStatusUpdated`
    ChannelStatusUpdated(ChannelStatusUpdated),
    /// `onParticipantJoined`
    ParticipantJoined(ParticipantEvent),
    /// `onParticipantLeft`
    ParticipantLeft(ParticipantEvent),
    /// `onParticipantUpdated`
    ParticipantUpdated(ParticipantEvent),
    /// Any other `EventType`.
    Unknown(UnknownEvent),
}

/// Applies the same expression to whichever struct an `InteractionEvent` holds.
macro_rules! each_variant {
    ($event:expr, $bind:ident => $body:expr) => {
        match $event {
            InteractionEvent::InteractionCreated($bind) => $body,
            InteractionEvent::ChannelCreated($bind) => $body,
            InteractionEvent::ChannelCreateFailed($bind) => $body,
            InteractionEvent::ChannelStatusUpdated($bind) => $body,
            InteractionEvent::ParticipantJoined($bind)
            | InteractionEvent::ParticipantLeft($bind)
            | InteractionEvent::ParticipantUpdated($bind) => $body,
            InteractionEvent::Unknown($bind) => $body,
        }
    };
}

/// Why parameters are not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// `EventType` is missing or empty.
    #[error("the EventType parameter is missing or empty")]
    MissingEventType,
    /// `AccountSid` is missing or empty.
    #[error("the AccountSid parameter is missing or empty")]
    MissingAccountSid,
}

impl InteractionEvent {
    /// Builds the typed event from decoded parameters. Fails only when `EventType` or
    /// `AccountSid` is missing; unknown event types and parameters are kept.
    pub fn from_params(params: Vec<(String, String)>) -> Result<Self, ModelError> {
        let mut r = ParamReader::new(params);
        let event_type = r.take("EventType").ok_or(ModelError::MissingEventType)?;
        let account_sid = r.take("AccountSid").ok_or(ModelError::MissingAccountSid)?;
        let kind = EventKind::from_twilio(&event_type);
        let mut event = match kind {
            EventKind::InteractionCreated => {
                Self::InteractionCreated(InteractionCreated::read(event_type, account_sid, &mut r))
            }
            EventKind::ChannelCreated => {
                Self::ChannelCreated(ChannelCreated::read(event_type, account_sid, &mut r))
            }
            EventKind::ChannelCreateFailed => Self::ChannelCreateFailed(ChannelCreateFailed::read(
                event_type,
                account_sid,
                &mut r,
            )),
            EventKind::ChannelStatusUpdated => Self::ChannelStatusUpdated(
                ChannelStatusUpdated::read(event_type, account_sid, &mut r),
            ),
            EventKind::ParticipantJoined => {
                Self::ParticipantJoined(ParticipantEvent::read(event_type, account_sid, &mut r))
            }
            EventKind::ParticipantLeft => {
                Self::ParticipantLeft(ParticipantEvent::read(event_type, account_sid, &mut r))
            }
            EventKind::ParticipantUpdated => {
                Self::ParticipantUpdated(ParticipantEvent::read(event_type, account_sid, &mut r))
            }
            EventKind::Unknown => {
                Self::Unknown(UnknownEvent::read(event_type, account_sid, &mut r))
            }
        };
        let extra = r.into_extra();
        each_variant!(&mut event, e => e.extra = extra);
        Ok(event)
    }

    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::InteractionCreated(_) => EventKind::InteractionCreated,
            Self::ChannelCreated(_) => EventKind::ChannelCreated,
            Self::ChannelCreateFailed(_) => EventKind::ChannelCreateFailed,
            Self::ChannelStatusUpdated(_) => EventKind::ChannelStatusUpdated,
            Self::ParticipantJoined(_) => EventKind::ParticipantJoined,
            Self::ParticipantLeft(_) => EventKind::ParticipantLeft,
            Self::ParticipantUpdated(_) => EventKind::ParticipantUpdated,
            Self::Unknown(_) => EventKind::Unknown,
        }
    }

    /// `EventType` as received.
    pub fn event_type(&self) -> &str {
        each_variant!(self, e => &e.event_type)
    }

    /// `AccountSid`.
    pub fn account_sid(&self) -> &str {
        each_variant!(self, e => &e.account_sid)
    }

    /// `InstanceSid`, where present.
    pub fn instance_sid(&self) -> Option<&str> {
        each_variant!(self, e => e.instance_sid.as_deref())
    }

    /// `InteractionSid`, where present.
    pub fn interaction_sid(&self) -> Option<&str> {
        each_variant!(self, e => e.interaction_sid.as_deref())
    }

    /// `MediaChannelType`, where present.
    pub fn media_channel_type(&self) -> Option<&str> {
        each_variant!(self, e => e.media_channel_type.as_ref().map(MediaChannelType::as_str))
    }

    /// Parameters the schema does not model.
    pub fn extra(&self) -> &Extra {
        each_variant!(self, e => &e.extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_table_is_in_enum_order_and_round_trips() {
        for (i, kind) in EventKind::ALL.iter().enumerate() {
            assert_eq!(KINDS[i].kind, *kind);
            assert_eq!(*kind as usize, i);
            if let Some(name) = kind.twilio_name() {
                assert_eq!(EventKind::from_twilio(name), *kind);
                assert_eq!(TWILIO_EVENT_TYPES[i], name);
            }
        }
        assert_eq!(EventKind::from_twilio("onSomethingNew"), EventKind::Unknown);
        assert!(TWILIO_EVENT_TYPES.iter().all(|n| n.starts_with("on")));
    }

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn open_enum_keeps_undocumented_values() {
        let e = InteractionEvent::from_params(params(&[
            ("EventType", "onChannelStatusUpdated"),
            ("AccountSid", "AC1"),
            ("ChannelStatus", "inactive"),
            ("MediaChannelType", "carrier-pigeon"),
        ]))
        .unwrap();
        let InteractionEvent::ChannelStatusUpdated(s) = &e else {
            panic!("wrong kind {e:?}")
        };
        assert_eq!(s.channel_status, Some(ChannelStatus::Inactive));
        assert_eq!(
            s.media_channel_type,
            Some(MediaChannelType::Other("carrier-pigeon".into()))
        );
    }

    #[test]
    fn error_code_is_an_integer_and_a_bad_one_is_kept() {
        let e = InteractionEvent::from_params(params(&[
            ("EventType", "onChannelCreateFailed"),
            ("AccountSid", "AC1"),
            ("ErrorCode", "45001"),
        ]))
        .unwrap();
        let InteractionEvent::ChannelCreateFailed(f) = &e else {
            panic!()
        };
        assert_eq!(f.error_code, Some(45001));

        let e = InteractionEvent::from_params(params(&[
            ("EventType", "onChannelCreateFailed"),
            ("AccountSid", "AC1"),
            ("ErrorCode", "E45001"),
        ]))
        .unwrap();
        let InteractionEvent::ChannelCreateFailed(f) = &e else {
            panic!()
        };
        assert_eq!(f.error_code, None);
        assert_eq!(f.extra["ErrorCode"], ExtraValue::One("E45001".into()));
    }

    #[test]
    fn unknown_parameters_and_repeats_are_kept_in_order() {
        let e = InteractionEvent::from_params(params(&[
            ("EventType", "onSomethingNew"),
            ("AccountSid", "AC1"),
            ("InteractionSid", "KD1"),
            ("Tag", "b"),
            ("Zeta", "z"),
            ("Tag", "a"),
        ]))
        .unwrap();
        assert_eq!(e.kind(), EventKind::Unknown);
        assert_eq!(e.interaction_sid(), Some("KD1"));
        assert_eq!(
            e.extra()["Tag"],
            ExtraValue::Many(vec!["b".into(), "a".into()])
        );
        assert_eq!(e.extra()["Zeta"], ExtraValue::One("z".into()));
    }

    #[test]
    fn event_type_and_account_are_required() {
        assert_eq!(
            InteractionEvent::from_params(params(&[("AccountSid", "AC1")])),
            Err(ModelError::MissingEventType)
        );
        assert_eq!(
            InteractionEvent::from_params(params(&[
                ("EventType", "onInteractionCreated"),
                ("AccountSid", "")
            ])),
            Err(ModelError::MissingAccountSid)
        );
    }

    #[test]
    fn kinds_round_trip_their_twilio_names() {
        for kind in EventKind::ALL {
            match kind.twilio_name() {
                Some(name) => assert_eq!(EventKind::from_twilio(name), kind),
                None => assert_eq!(kind, EventKind::Unknown),
            }
        }
    }
}
