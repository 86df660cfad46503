//! Delivery of one event to every configured sink: concurrently, each with retries, a
//! per-attempt timeout and an overall deadline, recording the same metrics for every sink.

use crate::metrics::{Metrics, SinkMetrics};
use crate::retry::{Backoff, BackoffError, RetryPolicy};
use crate::schema::v1::Event;
use crate::sink::{Sink, SinkError};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// `[delivery]`: how long a webhook may wait for the sinks, and how publishes are retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Longest time a webhook waits for every sink to confirm, retries included, before it is
    /// answered 503. Keep it below Twilio's 15 s request timeout.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Limit for one publish attempt; a slower attempt is a retryable timeout.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Attempts per sink and event, the first included.
    pub max_attempts: u32,
    /// Delay before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest delay between two attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Factor by which the delay grows after each retry (at least 1).
    pub backoff_multiplier: f64,
    /// Share of each delay, 0 to 1, taken off at random so retries spread out.
    pub backoff_jitter: f64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            backoff_multiplier: 2.0,
            backoff_jitter: 0.2,
        }
    }
}

/// Why delivery settings are rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryConfigError {
    /// Bad backoff values.
    #[error(transparent)]
    Backoff(#[from] BackoffError),
    /// `max_attempts` is zero.
    #[error("max_attempts must be at least 1")]
    NoAttempts,
    /// A timeout is zero.
    #[error("{0} must be greater than zero")]
    ZeroTimeout(&'static str),
}

impl DeliveryConfig {
    /// Validates the settings and builds the retry policy; reports every problem.
    pub fn policy(&self) -> Result<RetryPolicy, Vec<DeliveryConfigError>> {
        let mut errors = Vec::new();
        if self.max_attempts == 0 {
            errors.push(DeliveryConfigError::NoAttempts);
        }
        if self.ack_timeout.is_zero() {
            errors.push(DeliveryConfigError::ZeroTimeout("ack_timeout"));
        }
        if self.attempt_timeout.is_zero() {
            errors.push(DeliveryConfigError::ZeroTimeout("attempt_timeout"));
        }
        let backoff = Backoff::new(
            self.initial_backoff,
            self.max_backoff,
            self.backoff_multiplier,
            self.backoff_jitter,
        )
        .map_err(|e| errors.push(e.into()))
        .ok();
        match backoff {
            Some(backoff) if errors.is_empty() => Ok(RetryPolicy {
                backoff,
                max_attempts: self.max_attempts,
                attempt_timeout: self.attempt_timeout,
            }),
            _ => Err(errors),
        }
    }
}

/// One sink that did not confirm an event.
#[derive(Debug)]
pub struct SinkFailure {
    /// The sink's name.
    pub sink: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: SinkError,
}

/// At least one sink did not confirm an event: the webhook must not be acknowledged.
#[derive(Debug, thiserror::Error)]
pub struct DeliveryError {
    /// Every sink that failed.
    pub failures: Vec<SinkFailure>,
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, failure) in self.failures.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "sink {} failed after {} attempt(s): {}",
                failure.sink, failure.attempts, failure.error
            )?;
        }
        Ok(())
    }
}

struct Target {
    sink: Arc<dyn Sink>,
    metrics: SinkMetrics,
}

/// Publishes events to every sink; the shared retry, timeout and metrics layer.
pub struct Delivery {
    targets: Vec<Target>,
    policy: RetryPolicy,
    ack_timeout: Duration,
}

impl Delivery {
    /// Wraps the sinks.
    pub fn new(
        sinks: Vec<Arc<dyn Sink>>,
        policy: RetryPolicy,
        ack_timeout: Duration,
        metrics: &Metrics,
    ) -> Self {
        let targets = sinks
            .into_iter()
            .map(|sink| Target {
                metrics: metrics.for_sink(sink.name()),
                sink,
            })
            .collect();
        Self {
            targets,
            policy,
            ack_timeout,
        }
    }

    /// The sinks, in configuration order.
    pub fn sinks(&self) -> impl Iterator<Item = &Arc<dyn Sink>> {
        self.targets.iter().map(|t| &t.sink)
    }

    /// Publishes to every sink concurrently; `Ok` only when every sink confirmed.
    pub async fn deliver(&self, event: &Event) -> Result<(), DeliveryError> {
        let deadline = Instant::now() + self.ack_timeout;
        let failures: Vec<SinkFailure> = match self.targets.as_slice() {
            // The common case: no join machinery.
            [only] => self
                .publish(only, event, deadline)
                .await
                .err()
                .into_iter()
                .collect(),
            targets => {
                futures::future::join_all(targets.iter().map(|t| self.publish(t, event, deadline)))
                    .await
                    .into_iter()
                    .filter_map(Result::err)
                    .collect()
            }
        };
        if failures.is_empty() {
            Ok(())
        } else {
            Err(DeliveryError { failures })
        }
    }

    async fn publish(
        &self,
        target: &Target,
        event: &Event,
        deadline: Instant,
    ) -> Result<(), SinkFailure> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let limit = self.policy.attempt_timeout.min(remaining);
            let error = match tokio::time::timeout(limit, target.sink.publish(event)).await {
                Ok(Ok(())) => {
                    target
                        .metrics
                        .success
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(());
                }
                Ok(Err(error)) => error,
                Err(_) => SinkError::retryable(
                    "timeout",
                    format!(
                        "no confirmation within {}",
                        humantime::format_duration(limit)
                    ),
                ),
            };
            let delay = self.policy.backoff.delay(attempt, rand::random::<f64>());
            let retry = error.is_retryable()
                && attempt < self.policy.max_attempts
                && Instant::now() + delay < deadline;
            if !retry {
                target
                    .metrics
                    .failure
                    .observe(started.elapsed().as_secs_f64());
                target.metrics.failed(error.reason());
                return Err(SinkFailure {
                    sink: target.sink.name().to_owned(),
                    attempts: attempt,
                    error,
                });
            }
            tracing::debug!(sink = target.sink.name(), attempt, reason = error.reason(), error = %error, "publish failed; retrying");
            target.metrics.retries.inc();
            tokio::time::sleep(delay).await;
        }
    }

    /// Runs every sink's health check (each bounded by `timeout`) and updates `sink_up`.
    pub async fn check_health(&self, timeout: Duration) -> Vec<(String, Result<(), SinkError>)> {
        let checks = self.targets.iter().map(|t| async move {
            let result = match tokio::time::timeout(timeout, t.sink.health()).await {
                Ok(result) => result,
                Err(_) => Err(SinkError::retryable(
                    "timeout",
                    "health check did not answer in time",
                )),
            };
            t.metrics.up.set(i64::from(result.is_ok()));
            (t.sink.name().to_owned(), result)
        });
        futures::future::join_all(checks).await
    }

    /// Drains every sink concurrently, each bounded by `timeout`.
    pub async fn drain(&self, timeout: Duration) -> Vec<(String, Result<(), SinkError>)> {
        let drains = self.targets.iter().map(|t| async move {
            let result = match tokio::time::timeout(timeout, t.sink.drain()).await {
                Ok(result) => result,
                Err(_) => Err(SinkError::retryable(
                    "timeout",
                    "drain did not finish in time",
                )),
            };
            (t.sink.name().to_owned(), result)
        });
        futures::future::join_all(drains).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::InteractionEvent;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    use std::time::SystemTime;

    /// A sink that plays a script of outcomes, one per attempt.
    struct Scripted {
        name: &'static str,
        script: Mutex<Vec<Step>>,
        attempts: AtomicU32,
    }

    enum Step {
        Ok,
        Retryable,
        Permanent,
        Hang,
    }

    impl Scripted {
        fn new(name: &'static str, mut script: Vec<Step>) -> Arc<Self> {
            script.reverse();
            Arc::new(Self {
                name,
                script: Mutex::new(script),
                attempts: AtomicU32::new(0),
            })
        }
    }

    #[async_trait]
    impl Sink for Scripted {
        fn name(&self) -> &str {
            self.name
        }
        fn kind(&self) -> &'static str {
            "scripted"
        }
        async fn publish(&self, _event: &Event) -> Result<(), SinkError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let step = self.script.lock().unwrap().pop().unwrap_or(Step::Ok);
            match step {
                Step::Ok => Ok(()),
                Step::Retryable => Err(SinkError::retryable("busy", "try later")),
                Step::Permanent => Err(SinkError::permanent("rejected", "never")),
                Step::Hang => std::future::pending().await,
            }
        }
        async fn health(&self) -> Result<(), SinkError> {
            Ok(())
        }
        async fn drain(&self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    fn event() -> Event {
        let data = InteractionEvent::from_params(vec![
            ("EventType".into(), "onInteractionCreated".into()),
            ("AccountSid".into(), "AC1".into()),
        ])
        .unwrap();
        Event::new("id".into(), SystemTime::UNIX_EPOCH, data)
    }

    fn delivery(sinks: Vec<Arc<dyn Sink>>, max_attempts: u32) -> (Delivery, Metrics) {
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let policy = RetryPolicy {
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 2.0, 0.0)
                .unwrap(),
            max_attempts,
            attempt_timeout: Duration::from_secs(2),
        };
        (
            Delivery::new(sinks, policy, Duration::from_secs(10), &metrics),
            metrics,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn retries_retryable_errors_with_backoff() {
        let sink = Scripted::new("a", vec![Step::Retryable, Step::Retryable, Step::Ok]);
        let (d, metrics) = delivery(vec![sink.clone()], 5);
        let start = Instant::now();
        d.deliver(&event()).await.unwrap();
        assert_eq!(sink.attempts.load(Ordering::SeqCst), 3);
        // 100 ms then 200 ms of backoff, on paused time.
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        assert_eq!(metrics.sink_retries.with_label_values(&["a"]).get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let sink = Scripted::new("a", vec![Step::Permanent]);
        let (d, metrics) = delivery(vec![sink.clone()], 5);
        let err = d.deliver(&event()).await.unwrap_err();
        assert_eq!(sink.attempts.load(Ordering::SeqCst), 1);
        assert_eq!(err.failures[0].error.reason(), "rejected");
        assert_eq!(
            metrics
                .sink_failures
                .with_label_values(&["a", "rejected"])
                .get(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let sink = Scripted::new("a", vec![Step::Retryable, Step::Retryable, Step::Retryable]);
        let (d, _) = delivery(vec![sink.clone()], 2);
        let err = d.deliver(&event()).await.unwrap_err();
        assert_eq!(sink.attempts.load(Ordering::SeqCst), 2);
        assert_eq!(err.failures[0].attempts, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_sink_times_out_and_the_deadline_stops_retries() {
        let sink = Scripted::new(
            "a",
            vec![
                Step::Hang,
                Step::Hang,
                Step::Hang,
                Step::Hang,
                Step::Hang,
                Step::Hang,
            ],
        );
        let (d, _) = delivery(vec![sink.clone()], 100);
        let start = Instant::now();
        let err = d.deliver(&event()).await.unwrap_err();
        assert_eq!(err.failures[0].error.reason(), "timeout");
        // Never past the 10 s acknowledgement deadline.
        assert!(
            start.elapsed() <= Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        assert!(sink.attempts.load(Ordering::SeqCst) >= 4);
    }

    #[tokio::test(start_paused = true)]
    async fn every_sink_must_confirm() {
        let good = Scripted::new("good", vec![Step::Ok]);
        let bad = Scripted::new("bad", vec![Step::Permanent]);
        let (d, _) = delivery(vec![good.clone(), bad.clone()], 3);
        let err = d.deliver(&event()).await.unwrap_err();
        assert_eq!(err.failures.len(), 1);
        assert_eq!(err.failures[0].sink, "bad");
        assert_eq!(good.attempts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn config_reports_every_problem() {
        let config = DeliveryConfig {
            max_attempts: 0,
            ack_timeout: Duration::ZERO,
            backoff_jitter: 3.0,
            ..DeliveryConfig::default()
        };
        let errors = config.policy().unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(DeliveryConfig::default().policy().is_ok());
    }
}
