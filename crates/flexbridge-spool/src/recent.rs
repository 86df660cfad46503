//! The ids accepted recently, so a redelivery gets its 200 again without a second copy.
//!
//! Kept lean because every event passes here: an id (32 hex digits, as flexbridge makes them)
//! is held as a `u128`, and the rare redelivery that must wait for the first copy's outcome
//! waits on one `Notify` shared by all ids instead of a channel per event.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// An event id: its 128 bits when it is 32 lowercase hex digits (always, for ids flexbridge
/// makes).
#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Hex(u128),
    Text(Box<str>),
}

impl Key {
    fn of(id: &str) -> Self {
        let lower_hex = id.len() == 32
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match u128::from_str_radix(id, 16) {
            Ok(bits) if lower_hex => Self::Hex(bits),
            _ => Self::Text(id.into()),
        }
    }
}

/// Where the first delivery of an id stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Being stored: a redelivery waits for the outcome.
    Storing,
    /// Durable: a redelivery is acknowledged at once.
    Stored,
}

/// Recent ids, bounded by age and count.
pub(crate) struct Recent {
    ids: HashMap<Key, State>,
    order: VecDeque<(Instant, Key)>,
    window: Duration,
    capacity: usize,
}

/// What to do with a delivery.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// First time (in the window): store it, then report with [`Recent::settle`].
    New,
    /// Seen before, in this state.
    Again(State),
}

impl Recent {
    pub(crate) fn new(window: Duration, capacity: usize) -> Self {
        Self {
            ids: HashMap::new(),
            order: VecDeque::new(),
            window,
            capacity,
        }
    }

    /// Registers `id` as being stored, or says where its earlier delivery stands.
    pub(crate) fn check(&mut self, id: &str, now: Instant) -> Seen {
        while let Some((at, old)) = self.order.front() {
            if now.duration_since(*at) <= self.window && self.order.len() < self.capacity.max(1) {
                break;
            }
            self.ids.remove(old);
            self.order.pop_front();
        }
        let key = Key::of(id);
        if let Some(state) = self.ids.get(&key) {
            return Seen::Again(*state);
        }
        self.ids.insert(key.clone(), State::Storing);
        self.order.push_back((now, key));
        Seen::New
    }

    /// The first delivery of `id` finished: stored, or forgotten (not stored) so that a
    /// retry is stored.
    pub(crate) fn settle(&mut self, id: &str, stored: bool) {
        let key = Key::of(id);
        if stored {
            if let Some(state) = self.ids.get_mut(&key) {
                *state = State::Stored;
            }
        } else {
            self.ids.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_remembered_within_the_window_and_the_capacity() {
        let start = Instant::now();
        let mut recent = Recent::new(Duration::from_secs(10), 2);
        let a = "0123456789abcdef0123456789abcdef";
        assert_eq!(recent.check(a, start), Seen::New);
        assert_eq!(recent.check(a, start), Seen::Again(State::Storing));
        recent.settle(a, true);
        assert_eq!(recent.check(a, start), Seen::Again(State::Stored));
        assert_eq!(recent.check("b", start), Seen::New);
        // A third id pushes the oldest out.
        assert_eq!(recent.check("c", start), Seen::New);
        assert_eq!(recent.check(a, start), Seen::New);
        // Past the window, forgotten.
        let later = start + Duration::from_secs(11);
        assert_eq!(recent.check("c", later), Seen::New);
        // Not stored: forgotten, so a retry is stored.
        recent.settle("c", false);
        assert_eq!(recent.check("c", later), Seen::New);
    }

    #[test]
    fn hex_and_other_ids_are_told_apart() {
        let now = Instant::now();
        let mut recent = Recent::new(Duration::from_secs(10), 10);
        assert_eq!(
            recent.check("0000000000000000000000000000000a", now),
            Seen::New
        );
        // Same digits, other case or length: other ids.
        assert_eq!(recent.check("a", now), Seen::New);
        assert_eq!(
            recent.check("0000000000000000000000000000000A", now),
            Seen::New
        );
    }
}
