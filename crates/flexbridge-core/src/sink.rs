//! The sink contract. A sink publishes an event and returns only once its destination has
//! confirmed it (fsync, broker ack, delivery report). Retries, timeouts and metrics wrap every
//! sink from outside ([`crate::delivery`]); a sink only says whether an error may be retried.

use crate::metrics::SinkContext;
use crate::schema::v1::Event;
use async_trait::async_trait;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// Whether trying again may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A transient failure: timeout, connection lost, broker busy.
    Retryable,
    /// Trying again will fail the same way: bad topic, authorization, unroutable.
    Permanent,
}

/// A sink failure: whether it may be retried, a low-cardinality reason for metrics and logs,
/// a message, and the underlying error.
#[derive(Debug, thiserror::Error)]
pub struct SinkError {
    retry: Retry,
    reason: &'static str,
    message: String,
    #[source]
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.reason)
    }
}

impl SinkError {
    /// A failure whose retry class is decided at run time.
    pub fn new(retry: Retry, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            retry,
            reason,
            message: message.into(),
            source: None,
        }
    }

    /// A failure that may succeed on a later attempt.
    pub fn retryable(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Retry::Retryable, reason, message)
    }

    /// A failure that will not succeed on a later attempt.
    pub fn permanent(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Retry::Permanent, reason, message)
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// True when a retry may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retry == Retry::Retryable
    }

    /// The low-cardinality reason, used as a metric label.
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// The message without the reason.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// A destination for events.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// The configured, unique sink name (a metric label).
    fn name(&self) -> &str;

    /// Publishes one event; returns only after the destination confirmed it durable.
    async fn publish(&self, event: &Event) -> Result<(), SinkError>;

    /// Whether the sink can publish now; feeds `/readyz`.
    async fn health(&self) -> Result<(), SinkError>;

    /// Waits until everything accepted so far is confirmed, then releases resources. Called
    /// once, on shutdown, after the last publish.
    async fn drain(&self) -> Result<(), SinkError>;

    /// How long a record may stay in the client after its attempt began, even once the
    /// caller gave up on it: a client that keeps retrying a record on its own until a timeout
    /// of its own (Kafka's `message.timeout.ms`) may still deliver it until then. Under a
    /// deadline, a retry starts only if that much time is left, so that nothing lands after
    /// the webhook was answered 503. `None`: an abandoned attempt is over.
    fn attempt_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Settings outside a sink's own table that its validation must respect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// `delivery.ack_timeout`: a sink's own publish timeout must stay below it.
    pub ack_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a sink could not be built: the one error shape of every sink crate.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid (every problem, as `sinks.<name>.<key>: message`).
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// Opening the file, starting a thread, creating the client failed.
    #[error("{message}")]
    Open {
        /// What could not be done.
        message: String,
        /// Why.
        #[source]
        source: Box<dyn StdError + Send + Sync + 'static>,
    },
    /// The sink's metric families could not be registered.
    #[error("registering the sink's metrics")]
    Metrics(#[from] prometheus::Error),
}

impl BuildError {
    /// An `Open` error.
    pub fn open(message: impl Into<String>, source: impl StdError + Send + Sync + 'static) -> Self {
        Self::Open {
            message: message.into(),
            source: Box::new(source),
        }
    }
}

/// A sink's configuration table (`[[sinks]]` with its `type`): it validates itself without I/O
/// and builds its sink. Adding a sink type is one crate implementing this, and one line in
/// the binary's list of sink types.
#[async_trait]
pub trait SinkConfig: Send + Sync + 'static {
    /// What validation parsed (templates and the like), handed to `build` so that building
    /// never parses again.
    type Plan: Send;
    /// The sink this configuration builds.
    type Sink: Sink;

    /// The configured, unique sink name.
    fn name(&self) -> &str;

    /// Pure validation: the parsed plan, or every problem as `sinks.<name>.<key>: message`.
    fn plan(&self, limits: &Limits) -> Result<Self::Plan, Vec<String>>;

    /// Opens or connects the sink. A broker that is down is not an error here: the sink
    /// reconnects by itself and its health check reports it meanwhile.
    async fn build(
        &self,
        plan: Self::Plan,
        context: &SinkContext,
    ) -> Result<Self::Sink, BuildError>;

    /// Validates, then builds.
    async fn open(&self, limits: &Limits, context: &SinkContext) -> Result<Self::Sink, BuildError> {
        let plan = self.plan(limits).map_err(BuildError::Invalid)?;
        self.build(plan, context).await
    }
}
