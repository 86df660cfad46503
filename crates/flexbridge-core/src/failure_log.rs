//! Connection failures logged once per state change, then as a periodic summary: a broker
//! that stays down must not write a line per reconnect attempt (librdkafka alone reports
//! several a second), yet an operator must see that it is still down and when it came back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a connection that stays down is reported again.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// One sink's connection failures.
pub struct FailureLog {
    sink: String,
    failing: AtomicBool,
    state: Mutex<State>,
}

struct State {
    since: Option<Instant>,
    failures: u64,
    suppressed: u64,
    last_report: Option<Instant>,
}

/// What [`FailureLog`] decided to write for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logged {
    /// Nothing: already reported, summary not due.
    Quiet,
    /// The first failure after a healthy state.
    Failing,
    /// The periodic reminder, with the failures since the last line.
    StillFailing { suppressed: u64 },
    /// Back to healthy, with the failures of the outage.
    Recovered { failures: u64 },
}

impl FailureLog {
    /// A log for `sink`.
    pub fn new(sink: impl Into<String>) -> Self {
        Self {
            sink: sink.into(),
            failing: AtomicBool::new(false),
            state: Mutex::new(State {
                since: None,
                failures: 0,
                suppressed: 0,
                last_report: None,
            }),
        }
    }

    /// Records a failure and writes the WARN line if one is due.
    pub fn failure(&self, what: &str, error: &dyn std::fmt::Display) -> Logged {
        let logged = self.failure_at(Instant::now());
        match &logged {
            Logged::Failing => {
                tracing::warn!(sink = %self.sink, %error, "{what}; retrying in the background (repeats are summarized every {}s)", SUMMARY_EVERY.as_secs());
            }
            Logged::StillFailing { suppressed } => {
                tracing::warn!(sink = %self.sink, %error, failures = suppressed, "{what}: still failing");
            }
            Logged::Quiet | Logged::Recovered { .. } => {}
        }
        logged
    }

    /// Records a success; writes the INFO line once after a failing period. Cheap when
    /// nothing failed (one atomic load), so it can be called per publish.
    pub fn success(&self) -> Logged {
        if !self.failing.load(Ordering::Relaxed) {
            return Logged::Quiet;
        }
        let logged = self.success_at(Instant::now());
        if let Logged::Recovered { failures } = &logged {
            tracing::info!(sink = %self.sink, failures, "connection recovered");
        }
        logged
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`FailureLog::failure`] at a given time, without writing.
    pub fn failure_at(&self, now: Instant) -> Logged {
        let mut state = self.lock();
        state.failures += 1;
        if state.since.is_none() {
            state.since = Some(now);
            state.last_report = Some(now);
            state.suppressed = 0;
            self.failing.store(true, Ordering::Relaxed);
            return Logged::Failing;
        }
        state.suppressed += 1;
        match state.last_report {
            Some(last) if now.duration_since(last) < SUMMARY_EVERY => Logged::Quiet,
            _ => {
                state.last_report = Some(now);
                let suppressed = std::mem::take(&mut state.suppressed);
                Logged::StillFailing { suppressed }
            }
        }
    }

    /// [`FailureLog::success`] at a given time, without writing.
    pub fn success_at(&self, _now: Instant) -> Logged {
        let mut state = self.lock();
        self.failing.store(false, Ordering::Relaxed);
        if state.since.take().is_none() {
            return Logged::Quiet;
        }
        let failures = std::mem::take(&mut state.failures);
        state.suppressed = 0;
        Logged::Recovered { failures }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_state_change_and_a_summary_per_interval() {
        let log = FailureLog::new("k");
        let t0 = Instant::now();
        assert_eq!(log.success_at(t0), Logged::Quiet);
        assert_eq!(log.failure_at(t0), Logged::Failing);
        for i in 1..=100 {
            let now = t0 + Duration::from_millis(50 * i);
            assert_eq!(log.failure_at(now), Logged::Quiet, "attempt {i}");
        }
        assert_eq!(
            log.failure_at(t0 + SUMMARY_EVERY),
            Logged::StillFailing { suppressed: 101 }
        );
        assert_eq!(log.failure_at(t0 + SUMMARY_EVERY), Logged::Quiet);
        assert_eq!(
            log.success_at(t0 + SUMMARY_EVERY),
            Logged::Recovered { failures: 103 }
        );
        assert_eq!(log.success(), Logged::Quiet);
        assert_eq!(log.failure_at(t0 + SUMMARY_EVERY * 2), Logged::Failing);
    }
}
