//! Every metric flexbridge exports, named in this module only and registered into a registry
//! the caller passes in. Labels are of low cardinality: never a SID.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
/// The handles sink crates get from [`SinkContext`].
pub use prometheus::{IntCounter as Counter, IntGauge as Gauge};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Buckets for publish and webhook latency, in seconds: fine below 10 ms where fsync and
/// broker confirms live, then up to and past Twilio's 15 s request timeout, so a publish that
/// hits the acknowledgement timeout (at most 15 s) lands in a bucket of its own, not `+Inf`.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 12.5,
    15.0, 20.0, 30.0,
];

/// Every status the webhook listener answers, so each series exists (at 0) from the start:
/// an alert on `increase()` then fires on the first failure, not the second.
pub const HTTP_STATUSES: &[&str] = &[
    "200", "400", "403", "404", "405", "408", "413", "415", "503",
];

/// The metric families.
#[derive(Clone)]
pub struct Metrics {
    /// `flexbridge_http_requests_total{status}`: ingress responses by status code.
    pub http_requests: IntCounterVec,
    /// `flexbridge_http_rejections_total{reason}`: requests refused before publishing, other
    /// than by verification.
    pub http_rejections: IntCounterVec,
    /// `flexbridge_verification_failures_total{reason}`.
    pub verification_failures: IntCounterVec,
    /// `flexbridge_http_request_duration_seconds{status}`: from the request's arrival to its
    /// answer, what Twilio's 15 s timeout is measured against.
    pub http_duration: HistogramVec,
    /// `flexbridge_http_requests_in_flight`.
    pub in_flight: IntGauge,
    /// `flexbridge_events_total{type}`: verified, normalized events by short type name.
    pub events: IntCounterVec,
    /// `flexbridge_sink_publish_duration_seconds{sink,outcome}`: one publish including its
    /// retries; `outcome` is `success` or `failure`.
    pub sink_publish_duration: HistogramVec,
    /// `flexbridge_sink_failures_total{sink,reason}`: publishes that failed for good.
    pub sink_failures: IntCounterVec,
    /// `flexbridge_sink_retries_total{sink}`.
    pub sink_retries: IntCounterVec,
    /// `flexbridge_sink_up{sink}`: 1 when the last health check passed.
    pub sink_up: IntGaugeVec,
    /// `flexbridge_sink_reconnections_total{sink}`: connections to the broker re-established.
    pub sink_reconnections: IntCounterVec,
    /// `flexbridge_info{version,signature_verification}`: always 1; the labels say how this
    /// process runs (`signature_verification` is `enabled` or `disabled`).
    pub info: IntGaugeVec,
    /// Where sink crates register their own families (see [`SinkContext`]).
    registry: Registry,
    /// Families registered by sink crates, by name: one family for every sink of a type.
    sink_families: Arc<Mutex<HashMap<&'static str, Family>>>,
}

/// A family a sink crate registered.
#[derive(Clone)]
enum Family {
    Counter(IntCounterVec),
    Gauge(IntGaugeVec),
}

impl Metrics {
    /// Creates the families and registers them.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            http_requests: IntCounterVec::new(
                Opts::new("flexbridge_http_requests_total", "Ingress responses by status code."),
                &["status"],
            )?,
            http_rejections: IntCounterVec::new(
                Opts::new(
                    "flexbridge_http_rejections_total",
                    "Requests refused before publishing (not counting verification failures), by reason.",
                ),
                &["reason"],
            )?,
            verification_failures: IntCounterVec::new(
                Opts::new(
                    "flexbridge_verification_failures_total",
                    "Requests whose Twilio signature, body hash or account was refused, by reason.",
                ),
                &["reason"],
            )?,
            http_duration: HistogramVec::new(
                HistogramOpts::new(
                    "flexbridge_http_request_duration_seconds",
                    "Time from a webhook request's arrival to its answer (Twilio gives up after 15 s), by status.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["status"],
            )?,
            in_flight: IntGauge::new(
                "flexbridge_http_requests_in_flight",
                "Webhook requests being handled.",
            )?,
            events: IntCounterVec::new(
                Opts::new("flexbridge_events_total", "Verified, normalized events by type."),
                &["type"],
            )?,
            sink_publish_duration: HistogramVec::new(
                HistogramOpts::new(
                    "flexbridge_sink_publish_duration_seconds",
                    "Time to publish one event to a sink, retries included, by outcome.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["sink", "outcome"],
            )?,
            sink_failures: IntCounterVec::new(
                Opts::new(
                    "flexbridge_sink_failures_total",
                    "Publishes that failed after all retries, by sink and reason.",
                ),
                &["sink", "reason"],
            )?,
            sink_retries: IntCounterVec::new(
                Opts::new("flexbridge_sink_retries_total", "Publish retries by sink."),
                &["sink"],
            )?,
            sink_up: IntGaugeVec::new(
                Opts::new("flexbridge_sink_up", "1 when the sink's last health check passed."),
                &["sink"],
            )?,
            sink_reconnections: IntCounterVec::new(
                Opts::new(
                    "flexbridge_sink_reconnections_total",
                    "Connections to the broker re-established after a loss.",
                ),
                &["sink"],
            )?,
            info: IntGaugeVec::new(
                Opts::new("flexbridge_info", "Constant 1; labels describe this process."),
                &["version", "signature_verification"],
            )?,
            registry: registry.clone(),
            sink_families: Arc::default(),
        };
        registry.register(Box::new(m.http_requests.clone()))?;
        registry.register(Box::new(m.http_rejections.clone()))?;
        registry.register(Box::new(m.verification_failures.clone()))?;
        registry.register(Box::new(m.http_duration.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.sink_publish_duration.clone()))?;
        registry.register(Box::new(m.sink_failures.clone()))?;
        registry.register(Box::new(m.sink_retries.clone()))?;
        registry.register(Box::new(m.sink_up.clone()))?;
        registry.register(Box::new(m.sink_reconnections.clone()))?;
        registry.register(Box::new(m.info.clone()))?;
        for status in HTTP_STATUSES {
            m.http_requests.with_label_values(&[status]);
            m.http_duration.with_label_values(&[status]);
        }
        Ok(m)
    }

    /// Label children for one sink, resolved once so the hot path does no label lookup.
    pub fn for_sink(&self, sink: &str) -> SinkMetrics {
        // The reasons every sink can fail with exist from the start (see HTTP_STATUSES).
        for reason in SINK_FAILURE_REASONS {
            self.sink_failures.with_label_values(&[sink, reason]);
        }
        SinkMetrics {
            success: self
                .sink_publish_duration
                .with_label_values(&[sink, "success"]),
            failure: self
                .sink_publish_duration
                .with_label_values(&[sink, "failure"]),
            retries: self.sink_retries.with_label_values(&[sink]),
            up: self.sink_up.with_label_values(&[sink]),
            reconnections: self.sink_reconnections.with_label_values(&[sink]),
            failures: self.sink_failures.clone(),
            sink: sink.to_owned(),
        }
    }
}

/// Failure reasons shared by every sink, created at 0 for each sink.
pub const SINK_FAILURE_REASONS: &[&str] = &["timeout", "disconnected"];

/// One sink's metric handles.
#[derive(Clone)]
pub struct SinkMetrics {
    /// Publish latency of successful publishes.
    pub success: Histogram,
    /// Publish latency of failed publishes.
    pub failure: Histogram,
    /// Retries.
    pub retries: IntCounter,
    /// Health gauge.
    pub up: IntGauge,
    /// Reconnections (broker sinks).
    pub reconnections: IntCounter,
    failures: IntCounterVec,
    sink: String,
}

impl SinkMetrics {
    /// Counts a publish that failed for good.
    pub fn failed(&self, reason: &str) {
        self.failures.with_label_values(&[&self.sink, reason]).inc();
    }
}

impl Metrics {
    /// The value of `family{sink="<sink>"}` (a counter or gauge), for tests and reports.
    pub fn sample(&self, family: &str, sink: &str) -> Option<f64> {
        self.registry
            .gather()
            .into_iter()
            .find(|f| f.name() == family)?
            .get_metric()
            .iter()
            .find(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "sink" && l.value() == sink)
            })
            // A counter's series has no gauge value and the other way round: one is zero.
            .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
    }

    /// The family `name` with a `sink` label, registered on first use and shared after.
    fn sink_family(
        &self,
        name: &'static str,
        help: &'static str,
        make: impl Fn(Opts) -> Result<Family, prometheus::Error>,
    ) -> Result<Family, prometheus::Error> {
        let mut families = self
            .sink_families
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(family) = families.get(name) {
            return Ok(family.clone());
        }
        let family = make(Opts::new(name, help))?;
        match &family {
            Family::Counter(c) => self.registry.register(Box::new(c.clone()))?,
            Family::Gauge(g) => self.registry.register(Box::new(g.clone()))?,
        }
        families.insert(name, family.clone());
        Ok(family)
    }
}

/// What the daemon hands a sink crate to build one sink: the sink's name, the shared metric
/// handles every sink records, and a way to register the families only this kind of sink has
/// (JetStream duplicates, RabbitMQ returns, the Kafka queue depth).
#[derive(Clone)]
pub struct SinkContext {
    name: String,
    metrics: Metrics,
}

impl SinkContext {
    /// The context of the sink `name`.
    pub fn new(metrics: &Metrics, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            metrics: metrics.clone(),
        }
    }

    /// A context with a registry of its own (tests, tools).
    pub fn standalone(name: &str) -> Result<Self, prometheus::Error> {
        Ok(Self::new(&Metrics::register(&Registry::new())?, name))
    }

    /// The sink's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The metrics every sink shares, for this sink.
    pub fn shared(&self) -> SinkMetrics {
        self.metrics.for_sink(&self.name)
    }

    /// The metric families (for [`Metrics::sample`]).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This sink's series of the counter family `name` (labelled `sink`), registered once.
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
    ) -> Result<IntCounter, prometheus::Error> {
        let family = self.metrics.sink_family(name, help, |opts| {
            IntCounterVec::new(opts, &["sink"]).map(Family::Counter)
        })?;
        match family {
            Family::Counter(c) => Ok(c.with_label_values(&[&self.name])),
            Family::Gauge(_) => Err(prometheus::Error::Msg(format!("{name} is a gauge"))),
        }
    }

    /// This sink's series of the gauge family `name` (labelled `sink`), registered once.
    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
    ) -> Result<IntGauge, prometheus::Error> {
        let family = self.metrics.sink_family(name, help, |opts| {
            IntGaugeVec::new(opts, &["sink"]).map(Family::Gauge)
        })?;
        match family {
            Family::Gauge(g) => Ok(g.with_label_values(&[&self.name])),
            Family::Counter(_) => Err(prometheus::Error::Msg(format!("{name} is a counter"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_families_are_registered_once_and_shared_by_sinks_of_a_type() {
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let a = SinkContext::new(&metrics, "a");
        let b = SinkContext::new(&metrics, "b");
        a.counter("flexbridge_test_total", "Test.").unwrap().inc();
        b.counter("flexbridge_test_total", "Test.")
            .unwrap()
            .inc_by(2);
        assert_eq!(metrics.sample("flexbridge_test_total", "a"), Some(1.0));
        assert_eq!(metrics.sample("flexbridge_test_total", "b"), Some(2.0));
        a.gauge("flexbridge_test_depth", "Test.").unwrap().set(7);
        assert_eq!(metrics.sample("flexbridge_test_depth", "a"), Some(7.0));
        assert!(a.gauge("flexbridge_test_total", "Test.").is_err());
    }
}
