//! Configuration text: TOML into each section's and each sink type's settings, then their
//! validation (what `check-config` runs before anything connects).
#![no_main]
use flexbridge_core::{Limits, SinkConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = toml::from_str::<serde_json::Value>(text) else {
        return;
    };
    let limits = Limits::default();
    if let Ok(config) = serde_json::from_value::<flexbridge_ingress::IngressConfig>(value.clone()) {
        let _ = config.validate();
    }
    if let Ok(config) = serde_json::from_value::<flexbridge_ingress::TwilioConfig>(value.clone()) {
        let _ = config.validate();
    }
    if let Ok(config) = serde_json::from_value::<flexbridge_core::DeliveryConfig>(value.clone()) {
        let _ = config.validate(["a", "b"]);
    }
    if let Ok(config) =
        serde_json::from_value::<flexbridge_sink_kafka::KafkaSinkConfig>(value.clone())
    {
        let _ = config.plan(&limits).is_ok();
    }
    if let Ok(config) =
        serde_json::from_value::<flexbridge_sink_nats::NatsSinkConfig>(value.clone())
    {
        let _ = config.plan(&limits).is_ok();
    }
    if let Ok(config) =
        serde_json::from_value::<flexbridge_sink_rabbitmq::RabbitMqSinkConfig>(value)
    {
        let _ = config.plan(&limits).is_ok();
    }
});
