//! Retry with exponential backoff and jitter, written once for every sink.

use std::time::Duration;

/// Exponential backoff: `initial * multiplier^(attempt-1)`, capped at `max`, then reduced by a
/// random part of up to `jitter` (0 to 1) so that many requests do not retry in step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
}

/// Why backoff values are rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackoffError {
    /// The first delay is zero.
    #[error("the initial backoff must be greater than zero")]
    ZeroInitial,
    /// The cap is below the first delay.
    #[error("the maximum backoff ({max:?}) is below the initial backoff ({initial:?})")]
    MaxBelowInitial {
        /// Configured initial delay.
        initial: Duration,
        /// Configured cap.
        max: Duration,
    },
    /// The multiplier is below 1 or not finite.
    #[error("the backoff multiplier must be a finite number of at least 1, not {0}")]
    Multiplier(f64),
    /// The jitter is outside 0..=1.
    #[error("the backoff jitter must be between 0 and 1, not {0}")]
    Jitter(f64),
}

impl Backoff {
    /// Validates and builds a backoff.
    pub fn new(
        initial: Duration,
        max: Duration,
        multiplier: f64,
        jitter: f64,
    ) -> Result<Self, BackoffError> {
        if initial.is_zero() {
            return Err(BackoffError::ZeroInitial);
        }
        if max < initial {
            return Err(BackoffError::MaxBelowInitial { initial, max });
        }
        if !multiplier.is_finite() || multiplier < 1.0 {
            return Err(BackoffError::Multiplier(multiplier));
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(BackoffError::Jitter(jitter));
        }
        Ok(Self {
            initial,
            max,
            multiplier,
            jitter,
        })
    }

    /// The delay before retry number `retry` (1 for the first retry). `random` is a value in
    /// `0.0..1.0`; callers pass a random number, tests a fixed one.
    pub fn delay(&self, retry: u32, random: f64) -> Duration {
        let exponent = retry.saturating_sub(1).min(64) as i32;
        let raw = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = raw.min(self.max.as_secs_f64());
        let jittered = capped * (1.0 - self.jitter * random.clamp(0.0, 1.0));
        Duration::from_secs_f64(jittered)
    }
}

/// How one sink's publish is retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delays between attempts.
    pub backoff: Backoff,
    /// Optional cap on attempts, the first included; `None` retries until the deadline.
    pub max_attempts: Option<u32>,
    /// Limit for one attempt; a slower attempt counts as a retryable timeout.
    pub attempt_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn grows_exponentially_and_caps() {
        let b = Backoff::new(ms(10), ms(100), 2.0, 0.0).unwrap();
        assert_eq!(b.delay(1, 0.5), ms(10));
        assert_eq!(b.delay(2, 0.5), ms(20));
        assert_eq!(b.delay(3, 0.5), ms(40));
        assert_eq!(b.delay(5, 0.5), ms(100));
        assert_eq!(b.delay(500, 0.5), ms(100));
    }

    #[test]
    fn jitter_only_shortens() {
        let b = Backoff::new(ms(100), ms(100), 2.0, 0.5).unwrap();
        assert_eq!(b.delay(1, 0.0), ms(100));
        assert_eq!(b.delay(1, 1.0), ms(50));
    }

    #[test]
    fn rejects_bad_values() {
        assert_eq!(
            Backoff::new(ms(0), ms(1), 2.0, 0.1),
            Err(BackoffError::ZeroInitial)
        );
        assert!(matches!(
            Backoff::new(ms(10), ms(1), 2.0, 0.1),
            Err(BackoffError::MaxBelowInitial { .. })
        ));
        assert_eq!(
            Backoff::new(ms(1), ms(1), 0.5, 0.1),
            Err(BackoffError::Multiplier(0.5))
        );
        assert_eq!(
            Backoff::new(ms(1), ms(1), 2.0, 1.5),
            Err(BackoffError::Jitter(1.5))
        );
    }
}
