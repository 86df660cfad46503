//! flexbridge core: what a Flex Interactions webhook *means*.
//!
//! This crate holds the event model, the versioned CloudEvents schema, routing templates,
//! the sink contract, the retry policy and the metric definitions. It has no network code:
//! the ingress crate decides whether a request is authentic, sink crates decide how an event
//! is delivered, and the binary wires them together.

pub mod cloudevents;
pub mod delivery;
pub mod event;
pub mod failure_log;
pub mod intake;
pub mod metrics;
pub mod retry;
pub mod route;
pub mod schema;
pub mod secret;
pub mod sink;
pub mod webhook;

pub use cloudevents::{Binding, ContentMode};
pub use delivery::{
    Delivery, DeliveryConfig, DeliveryConfigError, DeliveryError, DeliveryMode, RetryOverrides,
};
pub use event::{EventKind, InteractionEvent};
pub use failure_log::FailureLog;
pub use intake::{Intake, IntakeError};
pub use metrics::SinkContext;
pub use schema::v1::{normalize, Event, NormalizeError};
pub use secret::Secret;
pub use sink::{BuildError, Limits, Retry, Sink, SinkConfig, SinkError};
pub use webhook::{Attestation, Verified, WebhookRequest};
