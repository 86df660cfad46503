//! The ids accepted recently, so a redelivery gets its 200 again without a second copy.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What became of an id's first delivery: `None` while it is being stored.
pub(crate) type Outcome = watch::Receiver<Option<bool>>;

/// Recent ids, bounded by age and count.
pub(crate) struct Recent {
    ids: HashMap<String, Outcome>,
    order: VecDeque<(Instant, String)>,
    window: Duration,
    capacity: usize,
}

/// What to do with a delivery.
pub(crate) enum Seen {
    /// First time (in the window): store it, then report with the sender.
    New(watch::Sender<Option<bool>>),
    /// Seen before: wait for that delivery's outcome.
    Again(Outcome),
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

    /// Registers `id`, or returns the outcome of its earlier delivery.
    pub(crate) fn check(&mut self, id: &str, now: Instant) -> Seen {
        while let Some((at, old)) = self.order.front() {
            if now.duration_since(*at) <= self.window && self.order.len() < self.capacity.max(1) {
                break;
            }
            self.ids.remove(old);
            self.order.pop_front();
        }
        if let Some(outcome) = self.ids.get(id) {
            return Seen::Again(outcome.clone());
        }
        let (sender, outcome) = watch::channel(None);
        self.ids.insert(id.to_owned(), outcome);
        self.order.push_back((now, id.to_owned()));
        Seen::New(sender)
    }

    /// Forgets `id` (its delivery was not stored).
    pub(crate) fn forget(&mut self, id: &str) {
        self.ids.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_remembered_within_the_window_and_the_capacity() {
        let start = Instant::now();
        let mut recent = Recent::new(Duration::from_secs(10), 2);
        assert!(matches!(recent.check("a", start), Seen::New(_)));
        assert!(matches!(recent.check("a", start), Seen::Again(_)));
        assert!(matches!(recent.check("b", start), Seen::New(_)));
        // A third id pushes the oldest out.
        assert!(matches!(recent.check("c", start), Seen::New(_)));
        assert!(matches!(recent.check("a", start), Seen::New(_)));
        // Past the window, forgotten.
        let later = start + Duration::from_secs(11);
        assert!(matches!(recent.check("c", later), Seen::New(_)));
        recent.forget("c");
        assert!(matches!(recent.check("c", later), Seen::New(_)));
    }
}
