//! Routing templates: a topic, routing key or subject built from event fields.
//!
//! Placeholders (a missing value renders as `none`):
//! - `{event}`: the short name, e.g. `channel.status_updated` (`unknown` for unknown types)
//! - `{event_type}`: Twilio's `EventType`, e.g. `onChannelStatusUpdated`
//! - `{account}`: the Account SID
//! - `{instance}`: the Flex Instance SID
//! - `{interaction}`: the Interaction SID
//! - `{channel_type}`: the media channel type, e.g. `sms`
//!
//! `{{` and `}}` are literal braces. Each sink passes a sanitizer that makes a value safe for
//! its broker (e.g. NATS subject tokens). `{event}` is flexbridge's own vocabulary
//! (lower-case words, `_` and one `.`) and is never sanitized, so `channel.status_updated`
//! stays two tokens of a NATS subject or a RabbitMQ routing key.

use crate::schema::v1::Event;
use std::fmt;

/// A value a template can take from an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// `{event}`
    Event,
    /// `{event_type}`
    EventType,
    /// `{account}`
    Account,
    /// `{instance}`
    Instance,
    /// `{interaction}`
    Interaction,
    /// `{channel_type}`
    ChannelType,
}

impl Placeholder {
    /// Every placeholder name, for error messages and docs.
    pub const NAMES: &'static [&'static str] = &[
        "event",
        "event_type",
        "account",
        "instance",
        "interaction",
        "channel_type",
    ];

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "event" => Self::Event,
            "event_type" => Self::EventType,
            "account" => Self::Account,
            "instance" => Self::Instance,
            "interaction" => Self::Interaction,
            "channel_type" => Self::ChannelType,
            _ => return None,
        })
    }

    fn value(self, event: &Event) -> Option<&str> {
        let data = event.data();
        match self {
            Self::Event => Some(event.kind().short_name()),
            Self::EventType => Some(data.event_type()),
            Self::Account => Some(data.account_sid()),
            Self::Instance => data.instance_sid(),
            Self::Interaction => data.interaction_sid(),
            Self::ChannelType => data.media_channel_type(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Value(Placeholder),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{name}` with a name that is not a placeholder.
    #[error("unknown placeholder {{{name}}} (known: {known})", known = Placeholder::NAMES.join(", "))]
    UnknownPlaceholder {
        /// The name inside the braces.
        name: String,
    },
    /// A `{` without its `}`, or a lone `}`.
    #[error("unbalanced brace at byte {at} (write {{{{ or }}}} for a literal brace)")]
    UnbalancedBrace {
        /// Byte offset.
        at: usize,
    },
    /// The template is empty.
    #[error("the template is empty")]
    Empty,
}

impl Template {
    /// Parses a template.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        if template.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = template.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let rest = &template[at + 1..];
                    let end = rest
                        .find('}')
                        .ok_or(TemplateError::UnbalancedBrace { at })?;
                    let name = &rest[..end];
                    let placeholder = Placeholder::parse(name).ok_or_else(|| {
                        TemplateError::UnknownPlaceholder {
                            name: name.to_owned(),
                        }
                    })?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Value(placeholder));
                    for _ in 0..=end {
                        chars.next();
                    }
                }
                '}' => return Err(TemplateError::UnbalancedBrace { at }),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self {
            source: template.to_owned(),
            parts,
        })
    }

    /// The template text as configured.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The rendered text when the template has no placeholder.
    pub fn as_static(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Literal(text)] => Some(text),
            _ => None,
        }
    }

    /// Renders the template for an event; `sanitize` appends a value made safe for the broker.
    pub fn render_with(&self, event: &Event, sanitize: impl Fn(&str, &mut String)) -> String {
        let mut out = String::with_capacity(self.source.len() + 48);
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Value(Placeholder::Event) => out.push_str(event.kind().short_name()),
                Part::Value(placeholder) => {
                    sanitize(placeholder.value(event).unwrap_or("none"), &mut out)
                }
            }
        }
        out
    }

    /// The template with every placeholder but `{event}` rendered by `wildcard`, and `{event}`
    /// as `event_name`: how a sink derives the subjects or keys it will publish to.
    pub fn pattern(&self, event_name: &str, wildcard: &str) -> String {
        let mut out = String::with_capacity(self.source.len());
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Value(Placeholder::Event) => out.push_str(event_name),
                Part::Value(_) => out.push_str(wildcard),
            }
        }
        out
    }

    /// Renders the template with values as they are.
    pub fn render(&self, event: &Event) -> String {
        self.render_with(event, |value, out| out.push_str(value))
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::InteractionEvent;
    use std::time::SystemTime;

    fn event(pairs: &[(&str, &str)]) -> Event {
        let params = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let data = InteractionEvent::from_params(params).unwrap();
        Event::new("id".into(), SystemTime::UNIX_EPOCH, data)
    }

    #[test]
    fn renders_every_placeholder() {
        let e = event(&[
            ("EventType", "onChannelStatusUpdated"),
            ("AccountSid", "AC1"),
            ("InstanceSid", "GO1"),
            ("InteractionSid", "KD1"),
            ("MediaChannelType", "sms"),
        ]);
        let t = Template::parse(
            "x.{event}.{event_type}.{account}.{instance}.{interaction}.{channel_type}",
        )
        .unwrap();
        assert_eq!(
            t.render(&e),
            "x.channel.status_updated.onChannelStatusUpdated.AC1.GO1.KD1.sms"
        );
    }

    #[test]
    fn missing_values_render_as_none_and_braces_escape() {
        let e = event(&[("EventType", "onParticipantLeft"), ("AccountSid", "AC1")]);
        let t = Template::parse("{{{instance}}}").unwrap();
        assert_eq!(t.render(&e), "{none}");
        assert_eq!(
            Template::parse("flex.interactions").unwrap().as_static(),
            Some("flex.interactions")
        );
    }

    #[test]
    fn sanitizer_is_applied_to_values_only() {
        let e = event(&[("EventType", "onWeird Event.x"), ("AccountSid", "AC1")]);
        let t = Template::parse("a.b.{event_type}").unwrap();
        let rendered = t.render_with(&e, |v, out| {
            out.extend(
                v.chars()
                    .map(|c| if c == '.' || c == ' ' { '_' } else { c }),
            )
        });
        assert_eq!(rendered, "a.b.onWeird_Event_x");
    }

    #[test]
    fn rejects_bad_templates() {
        assert!(matches!(
            Template::parse("a.{nope}"),
            Err(TemplateError::UnknownPlaceholder { .. })
        ));
        assert!(matches!(
            Template::parse("a.{event"),
            Err(TemplateError::UnbalancedBrace { .. })
        ));
        assert!(matches!(
            Template::parse("a}"),
            Err(TemplateError::UnbalancedBrace { .. })
        ));
        assert_eq!(Template::parse(""), Err(TemplateError::Empty));
    }
}
