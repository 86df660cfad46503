//! The admin listener: `/healthz`, `/readyz`, `/metrics`.

use crate::config::AdminConfig;
use bytes::Bytes;
use flexbridge_core::Delivery;
use flexbridge_core::{normalize, Attestation, Verified, WebhookRequest};
use flexbridge_spool::{DeadLetter, Runner, Spool, SpoolError};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, TextEncoder};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Why a sink is not healthy: a short reason anyone may see, and the message (hosts, user
/// names, broker errors) served to loopback only.
#[derive(Clone, PartialEq)]
struct Problem {
    reason: String,
    message: String,
}

/// What the admin endpoints report.
pub struct AdminState {
    registry: prometheus::Registry,
    delivery: Arc<Delivery>,
    /// Set when shutdown starts: readiness turns false.
    pub draining: AtomicBool,
    /// `flexbridge_admin_connections_refused_total`: connections over `admin.max_connections`.
    admin_refused: prometheus::IntCounter,
    /// Each sink's last health result: name and problem, if any.
    sinks: RwLock<Vec<(String, Option<Problem>)>>,
    /// In spool mode, readiness follows the spool accepting writes, not the brokers: a broker
    /// blip must not take every replica out of the Service.
    spool: Option<Arc<Spool>>,
    /// In spool mode, the background delivery (dead-letter redrive).
    runner: Option<Arc<Runner>>,
}

impl AdminState {
    /// New state; sinks count as unhealthy until the first check.
    pub fn new(
        registry: prometheus::Registry,
        delivery: Arc<Delivery>,
        spooling: Option<(Arc<Spool>, Arc<Runner>)>,
    ) -> Result<Self, prometheus::Error> {
        let admin_refused = prometheus::IntCounter::new(
            "flexbridge_admin_connections_refused_total",
            "Admin listener connections closed at once: admin.max_connections were open.",
        )?;
        registry.register(Box::new(admin_refused.clone()))?;
        let (spool, runner) = match spooling {
            Some((spool, runner)) => (Some(spool), Some(runner)),
            None => (None, None),
        };
        let sinks = delivery
            .sinks()
            .map(|s| {
                let problem = Problem {
                    reason: "not_checked".to_owned(),
                    message: "not checked yet".to_owned(),
                };
                (s.name().to_owned(), Some(problem))
            })
            .collect();
        Ok(Self {
            registry,
            admin_refused,
            delivery,
            draining: AtomicBool::new(false),
            sinks: RwLock::new(sinks),
            spool,
            runner,
        })
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
            let now = result.err().map(|e| Problem {
                reason: e.reason().to_owned(),
                message: e.to_string(),
            });
            match (&previous, &now) {
                (None, Some(problem)) => {
                    tracing::warn!(sink = %name, error = %problem.message, "sink became unhealthy")
                }
                (Some(_), None) => tracing::info!(sink = %name, "sink is healthy"),
                _ => {}
            }
            *previous = now;
        }
    }

    /// True when the last check found every sink healthy.
    fn sinks_healthy(&self) -> bool {
        self.sinks
            .read()
            .map(|s| s.iter().all(|(_, error)| error.is_none()))
            .unwrap_or(false)
    }

    /// Readiness and its JSON body. `detailed` (a loopback client) adds the error messages,
    /// which may name hosts and users; anyone else gets the sink names and short reasons.
    fn readiness(&self, detailed: bool) -> (bool, String) {
        let draining = self.draining.load(Ordering::SeqCst);
        let sinks = self.sinks.read().map(|s| s.clone()).unwrap_or_default();
        let sinks_healthy = sinks.iter().all(|(_, error)| error.is_none());
        let spool = self.spool.as_ref().map(|spool| spool.check());
        let healthy = match &spool {
            Some(check) => check.is_ok(),
            None => sinks_healthy,
        };
        let mut body = serde_json::json!({
            "ready": healthy && !draining,
            "draining": draining,
            "spool": spool.as_ref().map(|check| serde_json::json!({
                "writable": check.is_ok(),
            })),
            "sinks": sinks.iter().map(|(name, problem)| serde_json::json!({
                "name": name,
                "healthy": problem.is_none(),
                "reason": problem.as_ref().map(|p| p.reason.as_str()),
            })).collect::<Vec<_>>(),
        });
        if detailed {
            if let Some(check) = &spool {
                body["spool"]["error"] = check
                    .as_ref()
                    .err()
                    .map_or(serde_json::Value::Null, |e| e.to_string().into());
            }
            for (value, (_, problem)) in body["sinks"]
                .as_array_mut()
                .into_iter()
                .flatten()
                .zip(&sinks)
            {
                value["error"] = problem
                    .as_ref()
                    .map_or(serde_json::Value::Null, |p| p.message.clone().into());
            }
        }
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
    // The sinks connect in the background and the listener does not wait for them: check
    // often at first, so readiness turns true as soon as they are connected.
    let started = tokio::time::Instant::now();
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        state.refresh_health(timeout).await;
        let starting = started.elapsed() < STARTUP_WINDOW && !state.sinks_healthy();
        wait = if starting {
            interval.min(STARTUP_RECHECK)
        } else {
            interval
        };
    }
}

/// How long after start the health checks run every [`STARTUP_RECHECK`] until every sink
/// is healthy.
const STARTUP_WINDOW: Duration = Duration::from_secs(30);
const STARTUP_RECHECK: Duration = Duration::from_millis(100);

/// Serves the admin endpoints until `finished` turns true (after the drain, so readiness
/// stays observable during shutdown). At most `config.max_connections` are open at once; a
/// connection beyond it is closed at once, and one that does not send its headers within
/// `config.header_read_timeout` is closed.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    config: AdminConfig,
    mut finished: watch::Receiver<bool>,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let refused_log = std::sync::atomic::AtomicU64::new(0);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = finished.wait_for(|f| *f) => return,
        };
        match accepted {
            Ok((stream, peer)) => match Arc::clone(&open).try_acquire_owned() {
                Ok(permit) => spawn(stream, peer, &state, config.header_read_timeout, permit),
                Err(_) => {
                    drop(stream);
                    state.admin_refused.inc();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    if refused_log.swap(now, Ordering::Relaxed) != now {
                        tracing::warn!(%peer, max_connections = config.max_connections, "admin listener: too many open connections; closing new ones (at most one line a second)");
                    }
                }
            },
            Err(error) => {
                tracing::warn!(%error, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn spawn(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: &Arc<AdminState>,
    header_read_timeout: Duration,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let service = service_fn(move |request| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(route(&state, &request, peer).await) }
        });
        let _ = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        drop(permit);
    });
}

async fn route<B>(
    state: &AdminState,
    request: &Request<B>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path == "/spool" || path.starts_with("/dlq") {
        return spool_route(state, request, peer).await;
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n", "text/plain");
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        "/readyz" => {
            let (ready, body) = state.readiness(peer.ip().is_loopback());
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

/// `sink=NAME` from the query, if any.
fn sink_param<B>(request: &Request<B>) -> Option<String> {
    form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "sink")
        .map(|(_, v)| v.into_owned())
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    text(status, format!("{value:#}\n"), "application/json")
}

/// A dead letter as the API shows it: with the event's id, type and Interaction SID.
fn letter_json(letter: &DeadLetter, with_event: bool) -> serde_json::Value {
    let event = WebhookRequest::decode(&letter.record)
        .ok()
        .and_then(|r| normalize(Verified::attest(r, Attestation::Spooled)).ok());
    let mut value = serde_json::json!({
        "sink": letter.sink,
        "seq": letter.seq,
        "time_ms": letter.time_ms,
        "reason": letter.reason,
        "message": letter.message,
        "event_id": event.as_ref().map(|e| e.id().to_owned()),
        "ce_type": event.as_ref().map(|e| e.ce_type()),
        "interaction_sid": event.as_ref().and_then(|e| e.data().interaction_sid().map(str::to_owned)),
    });
    if with_event {
        value["event"] = event
            .and_then(|e| serde_json::from_slice(e.envelope_json()).ok())
            .unwrap_or(serde_json::Value::Null);
    }
    value
}

/// `/spool` and `/dlq...`: the spool's state and its dead letters. Dead letters and changes
/// (redrive, purge) are served to loopback only: the admin port may be reachable from the
/// cluster; `/spool` (counts) to anyone who reaches the port.
async fn spool_route<B>(
    state: &AdminState,
    request: &Request<B>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let (Some(spool), Some(runner)) = (&state.spool, &state.runner) else {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not in spool mode (delivery.mode = \"confirm\")"}),
        );
    };
    let error = |status, e: &dyn std::fmt::Display| {
        json(status, &serde_json::json!({"error": e.to_string()}))
    };
    let sink = sink_param(request);
    let path = request.uri().path();
    let method = request.method();
    // Dead letters hold whole events (SIDs, channel data) and broker errors (host names);
    // the admin port also serves probes and metrics to the cluster network.
    if (method == Method::POST || path.starts_with("/dlq")) && !peer.ip().is_loopback() {
        return error(
            StatusCode::FORBIDDEN,
            &"dead letters and changes to the spool are served to loopback only",
        );
    }
    match (method, path) {
        (&Method::GET, "/spool") => match spool.status() {
            Ok(status) => json(StatusCode::OK, &serde_json::json!(status)),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
        },
        (&Method::GET, "/dlq") => match spool.dead_letters(sink.as_deref()) {
            Ok(letters) => json(
                StatusCode::OK,
                &serde_json::Value::Array(letters.iter().map(|l| letter_json(l, false)).collect()),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
        },
        (&Method::POST, "/dlq/redrive") => match runner.redrive(sink.as_deref()) {
            Ok(n) => json(StatusCode::OK, &serde_json::json!({"redriven": n})),
            Err(e @ SpoolError::UnknownSink(_)) => error(StatusCode::NOT_FOUND, &e),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
        },
        (&Method::POST, "/dlq/purge") => match spool.purge(sink.as_deref()).await {
            Ok(n) => json(StatusCode::OK, &serde_json::json!({"purged": n})),
            Err(e @ SpoolError::UnknownSink(_)) => error(StatusCode::NOT_FOUND, &e),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
        },
        (&Method::GET, _) => {
            // /dlq/<sink>/<seq>
            let mut parts = path.trim_start_matches("/dlq/").splitn(2, '/');
            let (Some(name), Some(Ok(seq))) = (parts.next(), parts.next().map(str::parse::<u64>))
            else {
                return error(StatusCode::NOT_FOUND, &"use /dlq/<sink>/<seq>");
            };
            match spool.dead_letters(Some(name)) {
                Ok(letters) => match letters.iter().find(|l| l.seq == seq) {
                    Some(letter) => json(StatusCode::OK, &letter_json(letter, true)),
                    None => error(StatusCode::NOT_FOUND, &"no such dead letter"),
                },
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
            }
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &"GET /spool, GET /dlq, GET /dlq/<sink>/<seq>, POST /dlq/redrive, POST /dlq/purge",
        ),
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
