//! Normalization of form parameters, then every protocol binding in both content modes.
#![no_main]
use flexbridge_core::{normalize, Attestation, Binding, ContentMode, Verified, WebhookRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(params) = flexbridge_ingress::form::parse(data) else {
        return;
    };
    let request = WebhookRequest {
        params,
        idempotency_token: None,
        received_at: std::time::SystemTime::UNIX_EPOCH,
    };
    // The spool's record round-trips.
    let record = request.encode();
    let decoded = WebhookRequest::decode(&record).expect("a record the spool wrote decodes");
    assert_eq!(decoded.params, request.params);
    let Ok(event) = normalize(Verified::attest(request, Attestation::AuthToken)) else {
        return;
    };
    serde_json::from_slice::<serde_json::Value>(event.envelope_json()).expect("valid envelope");
    serde_json::from_slice::<serde_json::Value>(event.data_json()).expect("valid data");
    for binding in [Binding::Kafka, Binding::Amqp, Binding::Nats] {
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let encoded = binding.encode(&event, mode);
            for (_, value) in encoded.headers() {
                let _ = value.len();
            }
        }
    }
});
