//! The request as the ingress hands it over, and the typestate that proves it was verified.

use std::time::SystemTime;

/// One received webhook: its decoded parameters in arrival order (repeated names kept), the
/// idempotency token Twilio sends with every delivery, and when it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookRequest {
    /// Decoded parameters, in the order they arrived.
    pub params: Vec<(String, String)>,
    /// `I-Twilio-Idempotency-Token`: the same on Twilio's retries of one delivery.
    pub idempotency_token: Option<String>,
    /// Receipt time; it becomes the CloudEvent `time` (Interactions payloads carry none).
    pub received_at: SystemTime,
}

/// How a request came to be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attestation {
    /// `X-Twilio-Signature` matched with an Auth Token (HMAC-SHA1).
    AuthToken,
    /// `X-Twilio-Signature` matched with a SharedKey (HMAC-SHA256).
    SharedKey,
    /// Signature verification is switched off by configuration.
    VerificationDisabled,
}

/// A value that a verifier has vouched for. Normalization only accepts `Verified` requests,
/// so the compiler stops an unverified request from reaching a sink.
#[derive(Debug, Clone)]
pub struct Verified<T> {
    inner: T,
    attestation: Attestation,
}

impl<T> Verified<T> {
    /// Marks `inner` as verified. Only a verifier calls this (the ingress crate's signature
    /// check, or a test); grep for it when auditing the trust boundary.
    pub fn attest(inner: T, attestation: Attestation) -> Self {
        Self { inner, attestation }
    }

    /// How the value was verified.
    pub fn attestation(&self) -> Attestation {
        self.attestation
    }

    /// Read access to the verified value.
    pub fn get(&self) -> &T {
        &self.inner
    }

    /// Gives up the proof and returns the value.
    pub fn into_inner(self) -> T {
        self.inner
    }
}
