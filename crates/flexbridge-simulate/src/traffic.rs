//! Realistic Flex Interactions traffic: valid SIDs and coherent interaction lifecycles.

use flexbridge_core::EventKind;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One webhook's parameters, in the order Twilio would send them.
pub type Params = Vec<(String, String)>;

/// Generates interactions for one account and Flex instance.
pub struct Traffic {
    account: String,
    instance: String,
    rng: StdRng,
}

const CHANNEL_TYPES: &[&str] = &[
    "sms",
    "whatsapp",
    "chat",
    "web",
    "voice",
    "email",
    "messenger",
];

impl Traffic {
    /// A generator; the same seed gives the same traffic.
    pub fn new(account: String, instance: String, seed: u64) -> Self {
        Self {
            account,
            instance,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A random SID: two letters and 32 lower-case hex digits.
    pub fn sid(&mut self, prefix: &str) -> String {
        let value: u128 = self.rng.gen();
        format!("{prefix}{value:032x}")
    }

    /// One interaction from creation to close, usually nine events; one in twenty fails to
    /// create its channel and ends there.
    pub fn lifecycle(&mut self) -> Vec<Params> {
        let failed = self.rng.gen_ratio(1, 20);
        self.build(failed, false)
    }

    /// One interaction that covers all seven event types: a failed channel attempt, then a
    /// channel, participants joining, updating and leaving, and the close.
    pub fn full_lifecycle(&mut self) -> Vec<Params> {
        self.build(false, true)
    }

    fn build(&mut self, fail_only: bool, with_failure: bool) -> Vec<Params> {
        let channel_type = CHANNEL_TYPES[self.rng.gen_range(0..CHANNEL_TYPES.len())];
        let interaction = self.sid("KD");
        let media = self.sid(if channel_type == "voice" { "CF" } else { "CH" });
        let channel = self.sid("UO");
        let account = self.account.clone();
        let instance = self.instance.clone();
        let event = |kind: EventKind, fields: &[(&str, &str)]| -> Params {
            let mut params = vec![
                (
                    "EventType".to_owned(),
                    kind.twilio_name().unwrap_or_default().to_owned(),
                ),
                ("AccountSid".to_owned(), account.clone()),
            ];
            params.extend(fields.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            params
        };
        let mut events = vec![event(
            EventKind::InteractionCreated,
            &[
                ("InstanceSid", &instance),
                ("InteractionSid", &interaction),
                ("MediaChannelSid", &media),
                ("MediaChannelType", channel_type),
            ],
        )];
        if fail_only || with_failure {
            let failed_channel = self.sid("UO");
            events.push(event(
                EventKind::ChannelCreateFailed,
                &[
                    ("ErrorCode", "45001"),
                    (
                        "ErrorMessage",
                        "Channel creation failed: downstream resource unavailable",
                    ),
                    ("InteractionSid", &interaction),
                    ("ChannelSid", &failed_channel),
                    ("MediaChannelType", channel_type),
                ],
            ));
            if fail_only {
                return events;
            }
        }
        let channel_fields = |status: Option<&'static str>| {
            let mut f = vec![
                ("InstanceSid", instance.as_str()),
                ("InteractionSid", interaction.as_str()),
                ("ChannelSid", channel.as_str()),
                ("MediaChannelSid", media.as_str()),
            ];
            if let Some(status) = status {
                f.push(("ChannelStatus", status));
            }
            f.push(("MediaChannelType", channel_type));
            f
        };
        events.push(event(EventKind::ChannelCreated, &channel_fields(None)));
        events.push(event(
            EventKind::ChannelStatusUpdated,
            &channel_fields(Some("active")),
        ));
        let customer = self.sid("UT");
        let agent = self.sid("UT");
        let task = self.sid("WT");
        let participant = |name: EventKind, who: &str, kind: &str, task: Option<&str>| {
            let mut f = vec![
                ("InteractionSid", interaction.as_str()),
                ("ChannelSid", channel.as_str()),
                ("ParticipantSid", who),
                ("ParticipantType", kind),
            ];
            if let Some(task) = task {
                f.push(("TaskSid", task));
            }
            f.push(("MediaChannelSid", media.as_str()));
            f.push(("MediaChannelType", channel_type));
            event(name, &f)
        };
        events.push(participant(
            EventKind::ParticipantJoined,
            &customer,
            "customer",
            None,
        ));
        events.push(participant(
            EventKind::ParticipantJoined,
            &agent,
            "agent",
            Some(&task),
        ));
        events.push(participant(
            EventKind::ParticipantUpdated,
            &agent,
            "agent",
            Some(&task),
        ));
        events.push(participant(
            EventKind::ParticipantLeft,
            &agent,
            "agent",
            Some(&task),
        ));
        events.push(participant(
            EventKind::ParticipantLeft,
            &customer,
            "customer",
            None,
        ));
        events.push(event(
            EventKind::ChannelStatusUpdated,
            &channel_fields(Some("closed")),
        ));
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn full_lifecycle_covers_every_documented_type_with_valid_sids() {
        let mut t = Traffic::new(
            "AC".to_owned() + &"0".repeat(32),
            "GO".to_owned() + &"1".repeat(32),
            7,
        );
        let events = t.full_lifecycle();
        let types: HashSet<&str> = events
            .iter()
            .map(|p| p.iter().find(|(k, _)| k == "EventType").unwrap().1.as_str())
            .collect();
        assert_eq!(types.len(), 7, "{types:?}");
        for params in &events {
            for (name, value) in params {
                if name.ends_with("Sid") {
                    assert_eq!(value.len(), 34, "{name}={value}");
                    assert!(value[2..].bytes().all(|b| b.is_ascii_hexdigit()));
                }
            }
        }
        // One interaction throughout.
        let interactions: HashSet<&str> = events
            .iter()
            .filter_map(|p| {
                p.iter()
                    .find(|(k, _)| k == "InteractionSid")
                    .map(|(_, v)| v.as_str())
            })
            .collect();
        assert_eq!(interactions.len(), 1);
    }
}
