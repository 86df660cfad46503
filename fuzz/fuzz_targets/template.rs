//! Routing templates: line 1 the template, the rest a form body whose event renders it; the
//! broker-safe value functions keep their promises.
#![no_main]
use flexbridge_core::route::Template;
use flexbridge_core::{normalize, Attestation, Verified, WebhookRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (template, body) = text.split_once('\n').unwrap_or((&text, ""));
    let Ok(template) = Template::parse(template) else {
        return;
    };
    let mut params = flexbridge_ingress::form::parse(body.as_bytes()).unwrap_or_default();
    params.push(("EventType".into(), "onChannelStatusUpdated".into()));
    params.push((
        "AccountSid".into(),
        "AC00000000000000000000000000000000".into(),
    ));
    let request = WebhookRequest {
        params,
        idempotency_token: None,
        received_at: std::time::SystemTime::UNIX_EPOCH,
    };
    let Ok(event) = normalize(Verified::attest(request, Attestation::AuthToken)) else {
        return;
    };
    let _ = template.render(&event);
    let subject = template.render_with(&event, flexbridge_sink_nats::subject_token);
    // The template's own text is checked by the sink's validation; what a value adds must
    // never bring a wildcard or white space in.
    if !template.pattern("x", "_").contains(['*', '>', ' ']) {
        assert!(!subject.contains(['*', '>', ' ']), "{subject:?}");
    }
    let topic = template.render_with(&event, flexbridge_sink_kafka::topic_value);
    let _ = topic;
    let key = template.render_with(&event, flexbridge_sink_rabbitmq::routing_key_value);
    let _ = key;
});
