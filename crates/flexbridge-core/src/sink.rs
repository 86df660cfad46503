//! The sink contract. A sink publishes an event and returns only once its destination has
//! confirmed it (fsync, broker ack, delivery report). Retries, timeouts and metrics wrap every
//! sink from outside ([`crate::delivery`]); a sink only says whether an error may be retried.

use crate::schema::v1::Event;
use async_trait::async_trait;
use std::error::Error as StdError;
use std::fmt;

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

    /// The sink type, e.g. `file`.
    fn kind(&self) -> &'static str;

    /// Publishes one event; returns only after the destination confirmed it durable.
    async fn publish(&self, event: &Event) -> Result<(), SinkError>;

    /// Whether the sink can publish now; feeds `/readyz`.
    async fn health(&self) -> Result<(), SinkError>;

    /// Waits until everything accepted so far is confirmed, then releases resources. Called
    /// once, on shutdown, after the last publish.
    async fn drain(&self) -> Result<(), SinkError>;
}
