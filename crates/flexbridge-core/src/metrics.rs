//! Every metric flexbridge exports, named in this module only and registered into a registry
//! the caller passes in. Labels are of low cardinality: never a SID.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Buckets for publish and request latency, in seconds: fine below 10 ms where fsync and broker
/// confirms live, coarse up to the acknowledgement timeout.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
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
    /// `flexbridge_sink_duplicates_total{sink}`: publishes the broker reported as duplicates
    /// of an event it already had (JetStream dedup on the event id).
    pub sink_duplicates: IntCounterVec,
    /// `flexbridge_sink_reconnections_total{sink}`: connections to the broker re-established.
    pub sink_reconnections: IntCounterVec,
    /// `flexbridge_sink_returned_total{sink}`: messages the broker returned as unroutable.
    pub sink_returned: IntCounterVec,
    /// `flexbridge_sink_queue_depth{sink}`: records waiting in the client library for the
    /// broker (Kafka producer queue), sampled at each health check.
    pub sink_queue_depth: IntGaugeVec,
    /// `flexbridge_info{version,signature_verification}`: always 1; the labels say how this
    /// process runs (`signature_verification` is `enabled` or `disabled`).
    pub info: IntGaugeVec,
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
            sink_duplicates: IntCounterVec::new(
                Opts::new(
                    "flexbridge_sink_duplicates_total",
                    "Publishes the broker reported as duplicates of an event it already had.",
                ),
                &["sink"],
            )?,
            sink_reconnections: IntCounterVec::new(
                Opts::new(
                    "flexbridge_sink_reconnections_total",
                    "Connections to the broker re-established after a loss.",
                ),
                &["sink"],
            )?,
            sink_returned: IntCounterVec::new(
                Opts::new(
                    "flexbridge_sink_returned_total",
                    "Messages the broker returned as unroutable (mandatory publish, no binding).",
                ),
                &["sink"],
            )?,
            sink_queue_depth: IntGaugeVec::new(
                Opts::new(
                    "flexbridge_sink_queue_depth",
                    "Records waiting in the client library for the broker, sampled at each health check.",
                ),
                &["sink"],
            )?,
            info: IntGaugeVec::new(
                Opts::new("flexbridge_info", "Constant 1; labels describe this process."),
                &["version", "signature_verification"],
            )?,
        };
        registry.register(Box::new(m.http_requests.clone()))?;
        registry.register(Box::new(m.http_rejections.clone()))?;
        registry.register(Box::new(m.verification_failures.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.sink_publish_duration.clone()))?;
        registry.register(Box::new(m.sink_failures.clone()))?;
        registry.register(Box::new(m.sink_retries.clone()))?;
        registry.register(Box::new(m.sink_up.clone()))?;
        registry.register(Box::new(m.sink_duplicates.clone()))?;
        registry.register(Box::new(m.sink_reconnections.clone()))?;
        registry.register(Box::new(m.sink_returned.clone()))?;
        registry.register(Box::new(m.sink_queue_depth.clone()))?;
        registry.register(Box::new(m.info.clone()))?;
        Ok(m)
    }

    /// Label children for one sink, resolved once so the hot path does no label lookup.
    pub fn for_sink(&self, sink: &str) -> SinkMetrics {
        SinkMetrics {
            success: self
                .sink_publish_duration
                .with_label_values(&[sink, "success"]),
            failure: self
                .sink_publish_duration
                .with_label_values(&[sink, "failure"]),
            retries: self.sink_retries.with_label_values(&[sink]),
            up: self.sink_up.with_label_values(&[sink]),
            duplicates: self.sink_duplicates.with_label_values(&[sink]),
            reconnections: self.sink_reconnections.with_label_values(&[sink]),
            returned: self.sink_returned.with_label_values(&[sink]),
            queue_depth: self.sink_queue_depth.with_label_values(&[sink]),
            failures: self.sink_failures.clone(),
            sink: sink.to_owned(),
        }
    }
}

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
    /// Broker-reported duplicates.
    pub duplicates: IntCounter,
    /// Reconnections.
    pub reconnections: IntCounter,
    /// Unroutable messages returned by the broker.
    pub returned: IntCounter,
    /// Records queued in the client library.
    pub queue_depth: IntGauge,
    failures: IntCounterVec,
    sink: String,
}

impl SinkMetrics {
    /// Counts a publish that failed for good.
    pub fn failed(&self, reason: &str) {
        self.failures.with_label_values(&[&self.sink, reason]).inc();
    }
}
