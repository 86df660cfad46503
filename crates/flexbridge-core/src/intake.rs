//! Where a verified, normalized event goes before its webhook is answered: to the sinks
//! themselves (`confirm` mode: [`crate::Delivery`]) or into a durable local spool that delivers
//! in the background (`spool` mode). The ingress answers 200 only when `accept` returns `Ok`.

use crate::delivery::{Delivery, DeliveryError};
use crate::schema::v1::Event;
use async_trait::async_trait;
use std::sync::Arc;

/// Why an event was not accepted: the webhook is answered 503.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// A sink did not confirm in time (confirm mode).
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The spool could not make the event durable: full, or its disk failing.
    #[error("{message}")]
    Spool {
        /// Low-cardinality reason (`spool_full`, `spool_unavailable`).
        reason: &'static str,
        /// What happened.
        message: String,
    },
}

impl IntakeError {
    /// The reason, for metrics and the response body.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Delivery(_) => "sink_unavailable",
            Self::Spool { reason, .. } => reason,
        }
    }
}

/// Takes an event before its webhook is acknowledged.
#[async_trait]
pub trait Intake: Send + Sync + 'static {
    /// True when [`Intake::accept`] needs the request's spool record
    /// ([`crate::WebhookRequest::encode`]).
    fn wants_record(&self) -> bool;

    /// Returns once the event is safe: confirmed by every sink, or durable in the spool. The
    /// event is shared so the spool can hand it to its sinks without reading it back.
    async fn accept(&self, event: Arc<Event>, record: Option<Vec<u8>>) -> Result<(), IntakeError>;
}

#[async_trait]
impl Intake for Delivery {
    fn wants_record(&self) -> bool {
        false
    }

    async fn accept(&self, event: Arc<Event>, _record: Option<Vec<u8>>) -> Result<(), IntakeError> {
        Ok(self.deliver(&event).await?)
    }
}
