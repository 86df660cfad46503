//! flexbridge ingress: decides whether a request is an *authentic* Twilio Flex Interactions
//! webhook, and answers it only after every sink confirmed the event.

pub mod config;
pub mod form;
pub mod server;
pub mod signature;
pub mod tls;

pub use config::{IngressConfig, ListenerTls, TwilioConfig};
pub use server::{Ingress, IngressError, Rejection, Undelivered};
pub use signature::{sign, Algorithm, Signed, Verifier, VerifyError};
