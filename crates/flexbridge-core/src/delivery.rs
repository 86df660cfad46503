//! Delivery of one event to every configured sink: concurrently, each with retries, a
//! per-attempt timeout and an overall deadline, recording the same metrics for every sink.

use crate::metrics::{Metrics, SinkMetrics};
use crate::retry::{Backoff, BackoffError, RetryPolicy};
use crate::schema::v1::Event;
use crate::sink::{Sink, SinkError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// When a webhook is acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// After every sink confirmed the event (no disk needed; a broker outage longer than
    /// `ack_timeout` means 503s).
    #[default]
    Confirm,
    /// After the event is durable in the local spool (`[spool]`); the sinks receive it in the
    /// background, retried without limit while the spool has room.
    Spool,
}

/// `[delivery]`: how long a webhook may wait for the sinks, and how publishes are retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// `confirm` (default) or `spool`.
    pub mode: DeliveryMode,
    /// Longest time a webhook waits for every sink to confirm, retries included, before it is
    /// answered 503. Keep it below Twilio's 15 s request timeout. Retryable failures are
    /// retried until this deadline, not for a fixed number of attempts.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Limit for one publish attempt; a slower attempt is a retryable timeout.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Optional cap on attempts per sink and event, the first included. Unset (the default),
    /// a retryable failure is retried until the deadline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Delay before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest delay between two attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Factor by which the delay grows after each retry (at least 1).
    pub backoff_multiplier: f64,
    /// Share of each delay, 0 to 1, taken off at random so retries spread out; 1 (the
    /// default) is "full jitter": a delay anywhere between zero and the exponential value.
    pub backoff_jitter: f64,
    /// `[delivery.sinks.<name>]`: per-sink overrides of the retry settings above.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub sinks: BTreeMap<String, RetryOverrides>,
}

/// The retry settings of one sink: `[delivery]` with that sink's overrides applied.
#[derive(Debug, Clone, PartialEq)]
struct RetrySettings {
    attempt_timeout: Duration,
    max_attempts: Option<u32>,
    initial_backoff: Duration,
    max_backoff: Duration,
    backoff_multiplier: f64,
    backoff_jitter: f64,
}

/// `[delivery.sinks.<name>]`: the settings of [`RetrySettings`] one sink overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryOverrides {
    /// Limit for one publish attempt of this sink.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub attempt_timeout: Option<Duration>,
    /// Cap on attempts for this sink.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Delay before this sink's first retry.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub initial_backoff: Option<Duration>,
    /// Longest delay between two attempts of this sink.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<Duration>,
    /// Growth factor of this sink's delays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_multiplier: Option<f64>,
    /// Jitter of this sink's delays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_jitter: Option<f64>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            mode: DeliveryMode::Confirm,
            ack_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
            max_attempts: None,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            backoff_multiplier: 2.0,
            backoff_jitter: 1.0,
            sinks: BTreeMap::new(),
        }
    }
}

/// Why delivery settings are rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryConfigError {
    /// Bad backoff values.
    #[error("{scope}{0}", scope = Scope(.1))]
    Backoff(BackoffError, Option<String>),
    /// `max_attempts` is zero.
    #[error("{scope}max_attempts must be at least 1", scope = Scope(.0))]
    NoAttempts(Option<String>),
    /// A timeout is zero.
    #[error("{scope}{0} must be greater than zero", scope = Scope(.1))]
    ZeroTimeout(&'static str, Option<String>),
    /// `[delivery.sinks.<name>]` names no configured sink.
    #[error("sinks.{0}: there is no sink named {0:?}")]
    UnknownSink(String),
}

/// `sinks.<name>.` before a per-sink error, nothing before a global one.
struct Scope<'a>(&'a Option<String>);

impl fmt::Display for Scope<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(sink) => write!(f, "sinks.{sink}: "),
            None => Ok(()),
        }
    }
}

impl RetrySettings {
    fn with(&self, o: &RetryOverrides) -> Self {
        Self {
            attempt_timeout: o.attempt_timeout.unwrap_or(self.attempt_timeout),
            max_attempts: o.max_attempts.or(self.max_attempts),
            initial_backoff: o.initial_backoff.unwrap_or(self.initial_backoff),
            max_backoff: o.max_backoff.unwrap_or(self.max_backoff),
            backoff_multiplier: o.backoff_multiplier.unwrap_or(self.backoff_multiplier),
            backoff_jitter: o.backoff_jitter.unwrap_or(self.backoff_jitter),
        }
    }

    fn policy(&self, scope: Option<&str>) -> Result<RetryPolicy, Vec<DeliveryConfigError>> {
        let scope = || scope.map(str::to_owned);
        let mut errors = Vec::new();
        if self.max_attempts == Some(0) {
            errors.push(DeliveryConfigError::NoAttempts(scope()));
        }
        if self.attempt_timeout.is_zero() {
            errors.push(DeliveryConfigError::ZeroTimeout("attempt_timeout", scope()));
        }
        let backoff = Backoff::new(
            self.initial_backoff,
            self.max_backoff,
            self.backoff_multiplier,
            self.backoff_jitter,
        )
        .map_err(|e| errors.push(DeliveryConfigError::Backoff(e, scope())))
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

impl DeliveryConfig {
    fn global(&self) -> RetrySettings {
        RetrySettings {
            attempt_timeout: self.attempt_timeout,
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            backoff_multiplier: self.backoff_multiplier,
            backoff_jitter: self.backoff_jitter,
        }
    }

    /// The retry policy of the sink `name`: the global settings with its overrides.
    pub fn policy_for(&self, name: &str) -> Result<RetryPolicy, Vec<DeliveryConfigError>> {
        match self.sinks.get(name) {
            Some(overrides) => self.global().with(overrides).policy(Some(name)),
            None => self.global().policy(None),
        }
    }

    /// Validates the settings for these sinks; reports every problem.
    pub fn validate<'a>(
        &self,
        sinks: impl IntoIterator<Item = &'a str>,
    ) -> Vec<DeliveryConfigError> {
        let mut errors = Vec::new();
        if self.ack_timeout.is_zero() {
            errors.push(DeliveryConfigError::ZeroTimeout("ack_timeout", None));
        }
        errors.extend(self.global().policy(None).err().into_iter().flatten());
        let names: Vec<&str> = sinks.into_iter().collect();
        for (name, overrides) in &self.sinks {
            if !names.contains(&name.as_str()) {
                errors.push(DeliveryConfigError::UnknownSink(name.clone()));
                continue;
            }
            // Only what the override itself breaks: global errors are reported once above.
            if self.global().policy(None).is_ok() {
                errors.extend(
                    self.global()
                        .with(overrides)
                        .policy(Some(name))
                        .err()
                        .into_iter()
                        .flatten(),
                );
            }
        }
        errors
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
    policy: RetryPolicy,
    metrics: SinkMetrics,
}

/// Below this much time left before the deadline, no further attempt is started.
const LAST_ATTEMPT_WINDOW: Duration = Duration::from_millis(5);

/// Publishes events to every sink; the shared retry, timeout and metrics layer.
pub struct Delivery {
    targets: Vec<Target>,
    ack_timeout: Duration,
}

impl Delivery {
    /// Wraps the sinks, each with its retry policy from `config`.
    pub fn new(
        sinks: Vec<Arc<dyn Sink>>,
        config: &DeliveryConfig,
        metrics: &Metrics,
    ) -> Result<Self, Vec<DeliveryConfigError>> {
        let errors = config.validate(sinks.iter().map(|s| s.name()));
        if !errors.is_empty() {
            return Err(errors);
        }
        let targets = sinks
            .into_iter()
            .map(|sink| {
                Ok(Target {
                    policy: config.policy_for(sink.name())?,
                    metrics: metrics.for_sink(sink.name()),
                    sink,
                })
            })
            .collect::<Result<_, Vec<DeliveryConfigError>>>()?;
        Ok(Self {
            targets,
            ack_timeout: config.ack_timeout,
        })
    }

    /// How many sinks there are.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// True without sinks (the configuration always has one).
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
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
                .publish(only, event, Some(deadline))
                .await
                .err()
                .into_iter()
                .collect(),
            targets => futures::future::join_all(
                targets
                    .iter()
                    .map(|t| self.publish(t, event, Some(deadline))),
            )
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect(),
        };
        if failures.is_empty() {
            Ok(())
        } else {
            Err(DeliveryError { failures })
        }
    }

    /// Publishes to the sink at `index` (configuration order) until it confirms or fails
    /// permanently: no deadline and no attempt cap. The spool delivers this way, since it
    /// keeps the event meanwhile; dropping the future abandons the attempt.
    pub async fn deliver_to(&self, index: usize, event: &Event) -> Result<(), SinkFailure> {
        match self.targets.get(index) {
            Some(target) => self.publish(target, event, None).await,
            None => Err(SinkFailure {
                sink: format!("#{index}"),
                attempts: 0,
                error: SinkError::permanent("no_such_sink", "no sink at this index"),
            }),
        }
    }

    /// One sink: attempts until it confirms, the error is permanent, the optional attempt cap
    /// is reached, or the deadline passes. Fast failures (a sink that is reconnecting) are
    /// retried with backoff up to the deadline, never abandoned after a few attempts. Without
    /// a deadline, only a permanent error ends it.
    async fn publish(
        &self,
        target: &Target,
        event: &Event,
        deadline: Option<Instant>,
    ) -> Result<(), SinkFailure> {
        let policy = &target.policy;
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let limit = match deadline {
                Some(deadline) => policy
                    .attempt_timeout
                    .min(deadline.saturating_duration_since(Instant::now())),
                None => policy.attempt_timeout,
            };
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
            // A retry must settle before the deadline: a sink whose client keeps a record
            // after the attempt was dropped needs that long left, on top of the window.
            let reserve = LAST_ATTEMPT_WINDOW + target.sink.attempt_lifetime().unwrap_or_default();
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let retry = error.is_retryable()
                && match remaining {
                    Some(remaining) => {
                        policy.max_attempts.is_none_or(|max| attempt < max) && remaining > reserve
                    }
                    None => true,
                };
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
            // Near the deadline the delay shrinks so that a last attempt still fits.
            let delay = policy.backoff.delay(attempt, rand::random::<f64>());
            let delay = match remaining {
                Some(remaining) => delay.min((remaining - reserve) / 2),
                None => delay,
            };
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
        /// What `attempt_lifetime` answers.
        lifetime: Option<Duration>,
        /// When each attempt began.
        started: Mutex<Vec<Instant>>,
    }

    enum Step {
        Ok,
        Retryable,
        Permanent,
        Hang,
    }

    impl Scripted {
        fn new(name: &'static str, script: Vec<Step>) -> Arc<Self> {
            Self::with_lifetime(name, script, None)
        }

        fn with_lifetime(
            name: &'static str,
            mut script: Vec<Step>,
            lifetime: Option<Duration>,
        ) -> Arc<Self> {
            script.reverse();
            Arc::new(Self {
                name,
                script: Mutex::new(script),
                attempts: AtomicU32::new(0),
                lifetime,
                started: Mutex::new(Vec::new()),
            })
        }
    }

    #[async_trait]
    impl Sink for Scripted {
        fn name(&self) -> &str {
            self.name
        }
        async fn publish(&self, _event: &Event) -> Result<(), SinkError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            self.started.lock().unwrap().push(Instant::now());
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
        fn attempt_lifetime(&self) -> Option<Duration> {
            self.lifetime
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

    fn config(max_attempts: Option<u32>) -> DeliveryConfig {
        DeliveryConfig {
            mode: DeliveryMode::Confirm,
            ack_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(2),
            max_attempts,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            backoff_multiplier: 2.0,
            backoff_jitter: 0.0,
            sinks: BTreeMap::new(),
        }
    }

    fn delivery(sinks: Vec<Arc<dyn Sink>>, max_attempts: Option<u32>) -> (Delivery, Metrics) {
        delivery_with(sinks, &config(max_attempts))
    }

    fn delivery_with(sinks: Vec<Arc<dyn Sink>>, config: &DeliveryConfig) -> (Delivery, Metrics) {
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        (Delivery::new(sinks, config, &metrics).unwrap(), metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn retries_retryable_errors_with_backoff() {
        let sink = Scripted::new("a", vec![Step::Retryable, Step::Retryable, Step::Ok]);
        let (d, metrics) = delivery(vec![sink.clone()], None);
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
        let (d, metrics) = delivery(vec![sink.clone()], None);
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
        let (d, _) = delivery(vec![sink.clone()], Some(2));
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
        let (d, _) = delivery(vec![sink.clone()], None);
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
        let (d, _) = delivery(vec![good.clone(), bad.clone()], None);
        let err = d.deliver(&event()).await.unwrap_err();
        assert_eq!(err.failures.len(), 1);
        assert_eq!(err.failures[0].sink, "bad");
        assert_eq!(good.attempts.load(Ordering::SeqCst), 1);
    }

    /// A sink that fails fast (as one does while it reconnects) is retried until the
    /// deadline, not abandoned after a few attempts: a broker blip shorter than
    /// `ack_timeout` costs latency, never a 503.
    #[tokio::test(start_paused = true)]
    async fn fast_failures_are_retried_until_the_deadline() {
        let sink = Scripted::new("a", (0..1000).map(|_| Step::Retryable).collect());
        let (d, _) = delivery(vec![sink.clone()], None);
        let start = Instant::now();
        let err = d.deliver(&event()).await.unwrap_err();
        let elapsed = start.elapsed();
        assert!(
            elapsed > Duration::from_millis(9_900) && elapsed <= Duration::from_secs(10),
            "{elapsed:?}"
        );
        // 100 ms doubling to the 1 s cap: about 14 attempts in 10 s, more near the deadline.
        let attempts = err.failures[0].attempts;
        assert!((12..=40).contains(&attempts), "{attempts} attempts");
    }

    /// A sink whose client keeps a record for 3 s after the attempt began (Kafka's
    /// `message.timeout.ms`): no retry starts later than 3 s before the 10 s deadline, so no
    /// record can land after the webhook was answered 503. The failure comes at once.
    #[tokio::test(start_paused = true)]
    async fn a_retry_starts_only_if_it_settles_before_the_deadline() {
        let lifetime = Duration::from_secs(3);
        let steps = |n| (0..n).map(|_| Step::Retryable).collect::<Vec<_>>();
        let sink = Scripted::with_lifetime("a", steps(1000), Some(lifetime));
        let (d, _) = delivery(vec![sink.clone()], None);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let err = d.deliver(&event()).await.unwrap_err();
        let started = sink.started.lock().unwrap().clone();
        assert!(started.len() >= 8, "{} attempts", started.len());
        for at in &started {
            assert!(
                *at + lifetime <= deadline,
                "an attempt began at {:?}",
                *at - start
            );
        }
        // The last retry still began close to the limit: retries go on while they fit.
        let last = started[started.len() - 1] - start;
        assert!(last >= Duration::from_millis(6_500), "{last:?}");
        assert!(
            start.elapsed() <= Duration::from_secs(7),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(err.failures[0].attempts as usize, started.len());
        // Without a lifetime the same sink is retried up to the deadline itself.
        let free = Scripted::new("a", steps(1000));
        let (d, _) = delivery(vec![free.clone()], None);
        let start = Instant::now();
        d.deliver(&event()).await.unwrap_err();
        let last = *free.started.lock().unwrap().last().unwrap() - start;
        assert!(last > Duration::from_millis(9_900), "{last:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_blip_shorter_than_the_deadline_is_ridden_out() {
        // 3 s of fast failures (about 8 attempts), then the broker is back.
        let mut script: Vec<Step> = (0..8).map(|_| Step::Retryable).collect();
        script.push(Step::Ok);
        let sink = Scripted::new("a", script);
        let (d, metrics) = delivery(vec![sink.clone()], None);
        d.deliver(&event()).await.unwrap();
        assert_eq!(metrics.sink_retries.with_label_values(&["a"]).get(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn per_sink_overrides_apply_to_their_sink_only() {
        let capped = Scripted::new("capped", (0..100).map(|_| Step::Retryable).collect());
        let free = Scripted::new("free", (0..5).map(|_| Step::Retryable).collect());
        let mut config = config(None);
        config.sinks.insert(
            "capped".into(),
            RetryOverrides {
                max_attempts: Some(3),
                ..RetryOverrides::default()
            },
        );
        let (d, _) = delivery_with(vec![capped.clone(), free.clone()], &config);
        let err = d.deliver(&event()).await.unwrap_err();
        assert_eq!(err.failures.len(), 1);
        assert_eq!(err.failures[0].sink, "capped");
        assert_eq!(err.failures[0].attempts, 3);
        assert_eq!(free.attempts.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_only_success_or_a_permanent_error_ends_it() {
        let sink = Scripted::new(
            "a",
            (0..200)
                .map(|_| Step::Retryable)
                .chain([Step::Ok, Step::Retryable, Step::Permanent])
                .collect(),
        );
        let (d, _) = delivery(vec![sink.clone()], Some(2));
        d.deliver_to(0, &event()).await.unwrap();
        assert_eq!(sink.attempts.load(Ordering::SeqCst), 201);
        let err = d.deliver_to(0, &event()).await.unwrap_err();
        assert_eq!(err.error.reason(), "rejected");
    }

    #[test]
    fn config_reports_every_problem() {
        let mut config = DeliveryConfig {
            max_attempts: Some(0),
            ack_timeout: Duration::ZERO,
            backoff_jitter: 3.0,
            ..DeliveryConfig::default()
        };
        config
            .sinks
            .insert("ghost".into(), RetryOverrides::default());
        let errors = config.validate(["a"]);
        assert_eq!(errors.len(), 4, "{errors:?}");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text.contains(&"sinks.ghost: there is no sink named \"ghost\"".to_owned()),
            "{text:?}"
        );
        let mut config = DeliveryConfig::default();
        config.sinks.insert(
            "a".into(),
            RetryOverrides {
                initial_backoff: Some(Duration::from_secs(5)),
                ..RetryOverrides::default()
            },
        );
        let text: Vec<String> = config
            .validate(["a"])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(text.len(), 1, "{text:?}");
        assert!(
            text[0].starts_with("sinks.a: the maximum backoff"),
            "{text:?}"
        );
        assert!(DeliveryConfig::default().validate(["a"]).is_empty());
    }
}
