//! The admin listener: `/healthz`, `/readyz`, `/metrics`.

use bytes::Bytes;
use flexbridge_core::Delivery;
use flexbridge_spool::Spool;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, TextEncoder};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the admin endpoints report.
pub struct AdminState {
    registry: prometheus::Registry,
    delivery: Arc<Delivery>,
    /// Set when shutdown starts: readiness turns false.
    pub draining: AtomicBool,
    /// Each sink's last health result: name and error, if any.
    sinks: RwLock<Vec<(String, Option<String>)>>,
    /// In spool mode, readiness follows the spool accepting writes, not the brokers: a broker
    /// blip must not take every replica out of the Service.
    spool: Option<Arc<Spool>>,
}

impl AdminState {
    /// New state; sinks count as unhealthy until the first check.
    pub fn new(
        registry: prometheus::Registry,
        delivery: Arc<Delivery>,
        spool: Option<Arc<Spool>>,
    ) -> Self {
        let sinks = delivery
            .sinks()
            .map(|s| (s.name().to_owned(), Some("not checked yet".to_owned())))
            .collect();
        Self {
            registry,
            delivery,
            draining: AtomicBool::new(false),
            sinks: RwLock::new(sinks),
            spool,
        }
    }

    /// Runs every sink's health check and records the results, logging changes.
    pub async fn refresh_health(&self, timeout: Duration) {
        if let Some(spool) = &self.spool {
            // Refreshes the spool's depth and age gauges.
            if let Err(error) = spool.status() {
                tracing::warn!(%error, "spool status unavailable");
            }
        }
        let results = self.delivery.check_health(timeout).await;
        let Ok(mut sinks) = self.sinks.write() else {
            return;
        };
        for ((name, previous), (_, result)) in sinks.iter_mut().zip(results) {
            let now = result.err().map(|e| e.to_string());
            match (&previous, &now) {
                (None, Some(error)) => {
                    tracing::warn!(sink = %name, %error, "sink became unhealthy")
                }
                (Some(_), None) => tracing::info!(sink = %name, "sink is healthy"),
                _ => {}
            }
            *previous = now;
        }
    }

    fn readiness(&self) -> (bool, String) {
        let draining = self.draining.load(Ordering::SeqCst);
        let sinks = self.sinks.read().map(|s| s.clone()).unwrap_or_default();
        let sinks_healthy = sinks.iter().all(|(_, error)| error.is_none());
        let spool = self.spool.as_ref().map(|spool| spool.check());
        let healthy = match &spool {
            Some(check) => check.is_ok(),
            None => sinks_healthy,
        };
        let body = serde_json::json!({
            "ready": healthy && !draining,
            "draining": draining,
            "spool": spool.map(|check| serde_json::json!({
                "writable": check.is_ok(),
                "error": check.err().map(|e| e.to_string()),
            })),
            "sinks": sinks.iter().map(|(name, error)| serde_json::json!({
                "name": name,
                "healthy": error.is_none(),
                "error": error,
            })).collect::<Vec<_>>(),
        });
        (healthy && !draining, body.to_string())
    }
}

/// Re-checks sink health every `interval` until the daemon stops.
pub async fn health_loop(
    state: Arc<AdminState>,
    interval: Duration,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        state.refresh_health(timeout).await;
    }
}

/// Serves the admin endpoints until `finished` turns true (after the drain, so readiness
/// stays observable during shutdown).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut finished: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = finished.wait_for(|f| *f) => return,
        };
        match accepted {
            Ok((stream, _)) => spawn(stream, &state),
            Err(error) => {
                tracing::warn!(%error, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn spawn(stream: tokio::net::TcpStream, state: &Arc<AdminState>) {
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let service = service_fn(move |request| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(route(&state, &request)) }
        });
        let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });
}

fn route<B>(state: &AdminState, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n", "text/plain");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        "/readyz" => {
            let (ready, body) = state.readiness();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, body, "application/json")
        }
        "/metrics" => {
            let mut buffer = Vec::new();
            let encoder = TextEncoder::new();
            match encoder.encode(&state.registry.gather(), &mut buffer) {
                Ok(()) => text(StatusCode::OK, buffer, "text/plain; version=0.0.4"),
                Err(error) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode metrics: {error}\n"),
                    "text/plain",
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
    }
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
