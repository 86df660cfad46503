//! `application/json` webhook bodies: parameters, then normalization.
#![no_main]
use flexbridge_core::{normalize, Attestation, Verified, WebhookRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(params) = flexbridge_ingress::server::json_params(data) {
        let request = WebhookRequest {
            params,
            idempotency_token: None,
            received_at: std::time::SystemTime::UNIX_EPOCH,
        };
        if let Ok(event) = normalize(Verified::attest(request, Attestation::AuthToken)) {
            serde_json::from_slice::<serde_json::Value>(event.envelope_json()).expect("valid JSON");
        }
    }
});
