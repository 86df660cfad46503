//! The per-event hot path without the network: decode the form body, verify the signature,
//! normalize, encode the envelope; and the whole request handler with a sink that confirms at
//! once. Prints allocations per event first (counted by an instrumented global allocator).
#![allow(clippy::expect_used)] // benchmark set-up: a failure should stop it loudly

use async_trait::async_trait;
use bytes::Bytes;
use criterion::{black_box, Criterion};
use flexbridge_core::metrics::Metrics;
use flexbridge_core::{
    normalize, Delivery, DeliveryConfig, Event, Secret, Sink, SinkError, Verified, WebhookRequest,
};
use flexbridge_ingress::signature::{sign, Algorithm, Signed, Verifier};
use flexbridge_ingress::{form, Ingress, IngressConfig, TwilioConfig};
use http_body_util::Full;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const TOKEN: &str = "bench-auth-token";
const URL: &str = "https://hooks.example.com/flex/interactions";

fn params() -> Vec<(String, String)> {
    [
        ("EventType", "onChannelStatusUpdated"),
        ("AccountSid", "AC6cc6c0214ebb8cff8474535aaa544929"),
        ("InstanceSid", "GO7a22256c347e26d2e1825ec7b87dd087"),
        ("InteractionSid", "KD351f4059ece317a72603d06b13799064"),
        ("ChannelSid", "UO9d861eb682b84f31e1f32863248d1f51"),
        ("MediaChannelSid", "CH8d6379afc0732ce8cba49ff6214c0742"),
        ("ChannelStatus", "active"),
        ("MediaChannelType", "whatsapp"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Decode, verify, normalize, encode: what every event costs besides HTTP and the sink.
fn pipeline(verifier: &Verifier, body: &[u8], signature: &str) -> Event {
    let params = form::parse(body).expect("form");
    let attestation = verifier
        .check(&Signed {
            url: URL,
            params: &params,
            json_body: None,
            signature: Some(signature),
            settings: None,
        })
        .expect("signature");
    let request = WebhookRequest {
        params,
        idempotency_token: Some("idem-0123456789abcdef0123456789abcdef".to_owned()),
        received_at: SystemTime::now(),
    };
    let event = normalize(Verified::attest(request, attestation)).expect("event");
    black_box(event.envelope_json());
    event
}

struct Confirming;

#[async_trait]
impl Sink for Confirming {
    fn name(&self) -> &str {
        "confirming"
    }
    async fn publish(&self, event: &Event) -> Result<(), SinkError> {
        black_box(event.envelope_json());
        Ok(())
    }
    async fn health(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn drain(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

fn ingress() -> Ingress {
    let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
    let delivery = Arc::new(
        Delivery::new(
            vec![Arc::new(Confirming)],
            &DeliveryConfig::default(),
            &metrics,
        )
        .expect("default delivery settings"),
    );
    let config = IngressConfig {
        public_url: Some("https://hooks.example.com".to_owned()),
        ..IngressConfig::default()
    };
    let twilio = TwilioConfig {
        auth_tokens: vec![Secret::new(TOKEN)],
        ..TwilioConfig::default()
    };
    Ingress::new(config, &twilio, delivery, metrics).expect("ingress")
}

fn request(body: &Bytes, signature: &str) -> http::Request<Full<Bytes>> {
    http::Request::post("/flex/interactions")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", signature)
        .header(
            "i-twilio-idempotency-token",
            "idem-0123456789abcdef0123456789abcdef",
        )
        .body(Full::new(body.clone()))
        .expect("request")
}

fn main() {
    let params = params();
    let body = Bytes::from(form::encode(&params));
    let signature = sign(Algorithm::HmacSha1, TOKEN, URL, &params);
    let verifier = Verifier::new(vec![Secret::new(TOKEN)], BTreeMap::new());
    let ingress = ingress();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // Allocations per event, after a warm-up.
    const N: usize = 10_000;
    for _ in 0..100 {
        drop(pipeline(&verifier, &body, &signature));
        let _ = runtime.block_on(ingress.handle(request(&body, &signature)));
    }
    let region = Region::new(GLOBAL);
    for _ in 0..N {
        drop(pipeline(&verifier, &body, &signature));
    }
    let pipeline_allocs = region.change().allocations as f64 / N as f64;
    let region = Region::new(GLOBAL);
    for _ in 0..N {
        let response = runtime.block_on(ingress.handle(request(&body, &signature)));
        assert_eq!(response.status(), 200);
    }
    let handler_allocs = region.change().allocations as f64 / N as f64;
    println!(
        "allocations per event: pipeline {pipeline_allocs:.1}, whole handler {handler_allocs:.1}"
    );

    let mut criterion = Criterion::default().configure_from_args();
    criterion.bench_function("pipeline: parse+verify+normalize+encode", |b| {
        b.iter(|| pipeline(&verifier, &body, &signature))
    });
    criterion.bench_function("handler: request in, 200 out (confirming sink)", |b| {
        b.iter(|| runtime.block_on(ingress.handle(request(&body, &signature))))
    });
    criterion.final_summary();
}
