//! The webhook listener: parse, verify, normalize, deliver, and answer 200 only after every
//! sink confirmed.

use crate::config::{IngressConfig, TwilioConfig};
use crate::form::{self, FormError};
use crate::signature::{Signed, Verifier, VerifyError};
use bytes::Bytes;
use flexbridge_core::metrics::Metrics;
use flexbridge_core::{
    normalize, Attestation, EventKind, Intake, IntakeError, NormalizeError, Verified,
    WebhookRequest,
};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;
use tracing::Instrument;

/// Why a request was not acknowledged. The mapping to an HTTP status lives here only.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// Not the webhook path.
    #[error("no webhook at this path")]
    NotFound,
    /// Neither POST nor GET.
    #[error("method not allowed; use POST or GET")]
    MethodNotAllowed,
    /// A POST that is neither form-encoded nor JSON.
    #[error(
        "unsupported content type {0:?}; use application/x-www-form-urlencoded or application/json"
    )]
    UnsupportedMediaType(String),
    /// Larger than `ingress.max_body_bytes`.
    #[error("body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The body did not arrive within `ingress.body_read_timeout`.
    #[error("the body did not arrive in time")]
    BodyTimeout,
    /// The body could not be read.
    #[error("the body could not be read: {0}")]
    BodyRead(String),
    /// Broken percent-encoding or invalid UTF-8.
    #[error(transparent)]
    Form(#[from] FormError),
    /// A JSON body that is not a JSON object.
    #[error("the JSON body is not a JSON object: {0}")]
    InvalidJson(String),
    /// Not proven to come from Twilio.
    #[error(transparent)]
    Verification(#[from] VerifyError),
    /// An Account SID outside `twilio.account_sids`.
    #[error("account {0} is not allowed")]
    AccountNotAllowed(String),
    /// `EventType` or `AccountSid` missing.
    #[error(transparent)]
    Normalize(#[from] NormalizeError),
    /// A sink did not confirm this event.
    #[error("{}", .0.error)]
    Delivery(Box<Undelivered>),
    /// More than `ingress.max_in_flight` requests at once.
    #[error("too many requests in flight; retry later")]
    Overloaded,
}

impl Rejection {
    /// The `flexbridge_http_rejections_total` reasons that exist from the start: the refusals
    /// of this module, the load shedding and the delivery failures.
    pub const REASONS: &'static [&'static str] = &[
        "not_found",
        "method_not_allowed",
        "unsupported_media_type",
        "payload_too_large",
        "body_timeout",
        "body_read_error",
        "malformed_encoding",
        "invalid_utf8",
        "invalid_json",
        "missing_event_type",
        "missing_account_sid",
        "overloaded",
        "too_many_connections",
        "sink_unavailable",
        "spool_full",
        "spool_unavailable",
    ];

    /// The HTTP status for this rejection.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyRead(_) | Self::Form(_) | Self::InvalidJson(_) | Self::Normalize(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::Verification(_) | Self::AccountNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::Delivery(_) | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A low-cardinality reason (metric label, response body).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::BodyTimeout => "body_timeout",
            Self::BodyRead(_) => "body_read_error",
            Self::Form(FormError::MalformedEncoding { .. }) => "malformed_encoding",
            Self::Form(FormError::InvalidUtf8) => "invalid_utf8",
            Self::InvalidJson(_) => "invalid_json",
            Self::Verification(e) => e.reason(),
            Self::AccountNotAllowed(_) => "account_not_allowed",
            Self::Normalize(NormalizeError::MissingEventType) => "missing_event_type",
            Self::Normalize(NormalizeError::MissingAccountSid) => "missing_account_sid",
            Self::Delivery(undelivered) => undelivered.error.reason(),
            Self::Overloaded => "overloaded",
        }
    }
}

/// An event a sink did not confirm, with what an operator needs to tell which event it was.
#[derive(Debug)]
pub struct Undelivered {
    /// The CloudEvents id.
    pub event_id: String,
    /// The CloudEvents type.
    pub ce_type: &'static str,
    /// The Interaction SID, when the event has one.
    pub interaction_sid: Option<String>,
    /// Which sinks failed, or why the spool refused it.
    pub error: IntakeError,
}

/// Errors building the ingress.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// Invalid settings.
    #[error("invalid ingress settings: {}", .0.join("; "))]
    Config(Vec<String>),
    /// `[ingress.tls]`: the certificate or key cannot be used.
    #[error("ingress.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// The webhook handler and its listener.
pub struct Ingress {
    config: IngressConfig,
    /// `[ingress.tls]`: TLS terminated here.
    tls: Option<crate::tls::ReloadingTls>,
    verifier: Option<Verifier>,
    account_sids: HashSet<String>,
    intake: Arc<dyn Intake>,
    metrics: Metrics,
    ok_counter: prometheus::IntCounter,
    ok_duration: prometheus::Histogram,
    event_counters: [prometheus::IntCounter; EventKind::ALL.len()],
    retry_after: HeaderValue,
    request_prefix: String,
    request_counter: AtomicU64,
    /// Requests being handled (compared with `max_in_flight`).
    in_flight: AtomicUsize,
    /// Open connections (compared with `max_connections`).
    connections: Arc<AtomicUsize>,
    /// Shedding is logged at most once a second, with the count since the last line.
    shed_log: RateLimited,
    /// One limiter per verification reason: a flood of forged requests writes at most a line
    /// a second per reason (the counter counts every one), and one reason does not hide
    /// another.
    verify_log: [RateLimited; VERIFY_REASONS],
    /// Set when shutdown starts: every answer carries `Connection: close`.
    draining: AtomicBool,
    /// The last receipt time handed out, in nanoseconds: each request gets a later one.
    last_receipt: AtomicU64,
}

/// A log line at most once a second, counting what was not logged in between.
#[derive(Default)]
struct RateLimited {
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimited {
    /// `Some(suppressed count)` when a line may be written now.
    fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_second.load(Ordering::Relaxed);
        if now > last
            && self
                .last_second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Verification reasons with a log limiter of their own: [`VerifyError::REASONS`] and
/// `account_not_allowed`.
const VERIFY_REASONS: usize = VerifyError::REASONS.len() + 1;

/// Decrements a counter when dropped.
struct Count<'a>(&'a AtomicUsize);

impl Drop for Count<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The answer to a connection over `max_connections`, written before closing it.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 77\r\n\r\n{\"error\":\"too_many_connections\",\"message\":\"too many open connections; retry\"}";

impl Ingress {
    /// Builds the handler; `twilio.verify_signatures = false` disables verification.
    pub fn new(
        config: IngressConfig,
        twilio: &TwilioConfig,
        intake: Arc<dyn Intake>,
        metrics: Metrics,
    ) -> Result<Self, IngressError> {
        let mut errors = config.validate();
        errors.extend(twilio.validate());
        if !errors.is_empty() {
            return Err(IngressError::Config(errors));
        }
        let verifier = twilio
            .verify_signatures
            .then(|| Verifier::new(twilio.auth_tokens.clone(), twilio.shared_keys.clone()));
        let retry_after = HeaderValue::from(config.retry_after.as_secs().max(1));
        // Every failure series exists at 0 from the start, so an alert sees the first one.
        for reason in Rejection::REASONS {
            metrics.http_rejections.with_label_values(&[reason]);
        }
        for reason in VerifyError::REASONS.iter().chain(&["account_not_allowed"]) {
            metrics.verification_failures.with_label_values(&[reason]);
        }
        let tls = config
            .tls
            .as_ref()
            .map(crate::tls::ReloadingTls::load)
            .transpose()?;
        Ok(Self {
            tls,
            ok_counter: metrics.http_requests.with_label_values(&["200"]),
            ok_duration: metrics.http_duration.with_label_values(&["200"]),
            event_counters: EventKind::ALL
                .map(|kind| metrics.events.with_label_values(&[kind.short_name()])),
            verifier,
            account_sids: twilio.account_sids.iter().cloned().collect(),
            intake,
            metrics,
            retry_after,
            request_prefix: format!("{:08x}", rand_prefix()),
            request_counter: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            connections: Arc::new(AtomicUsize::new(0)),
            shed_log: RateLimited::default(),
            verify_log: Default::default(),
            draining: AtomicBool::new(false),
            last_receipt: AtomicU64::new(0),
            config,
        })
    }

    /// The receipt time of a request: now, but strictly later than any handed out before, so
    /// that no two requests of this process share one (the event id of a delivery without an
    /// idempotency token depends on it).
    fn receipt_time(&self) -> SystemTime {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let mut last = self.last_receipt.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last_receipt.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return SystemTime::UNIX_EPOCH + Duration::from_nanos(next),
                Err(actual) => last = actual,
            }
        }
    }

    /// Starts the drain: from now on every answer carries `Connection: close`, so a keep-alive
    /// client leaves after its current request instead of having an idle connection closed
    /// under a request it is sending. Call it when readiness turns false, before the listener
    /// closes.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Accepts connections until `shutdown` resolves, then stops accepting and lets in-flight
    /// requests finish for up to `grace`. Returns whether every in-flight request finished.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) -> bool {
        let graceful = GracefulShutdown::new();
        if let Some(tls) = &self.tls {
            let interval = tls.reload_interval();
            let this = Arc::downgrade(&self);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    let Some(ingress) = this.upgrade() else {
                        return;
                    };
                    let Some(tls) = &ingress.tls else { return };
                    match tls.reload_if_changed() {
                        Ok(true) => tracing::info!("ingress.tls: the certificate files changed; serving the new certificate"),
                        Ok(false) => {}
                        Err(error) => tracing::error!(%error, "ingress.tls: the changed certificate cannot be used; still serving the previous one"),
                    }
                }
            });
        }
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_read_timeout)
            .keep_alive(true);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((mut stream, _peer)) => {
                        let _ = stream.set_nodelay(true);
                        let open = self.connections.fetch_add(1, Ordering::AcqRel) + 1;
                        if open > self.config.max_connections {
                            self.connections.fetch_sub(1, Ordering::AcqRel);
                            self.shed("too_many_connections");
                            tokio::spawn(async move {
                                use tokio::io::AsyncWriteExt as _;
                                let _ = stream.write_all(TOO_MANY_CONNECTIONS).await;
                                let _ = stream.shutdown().await;
                            });
                            continue;
                        }
                        let connections = Arc::clone(&self.connections);
                        let this = Arc::clone(&self);
                        let service = service_fn(move |request| {
                            let this = Arc::clone(&this);
                            async move { Ok::<_, Infallible>(this.handle(request).await) }
                        });
                        match self.tls.as_ref().map(crate::tls::ReloadingTls::acceptor) {
                            None => {
                                let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                                tokio::spawn(async move {
                                    let _open = Count(&connections);
                                    if let Err(error) = connection.await {
                                        tracing::debug!(%error, "connection ended with an error");
                                    }
                                });
                            }
                            Some(acceptor) => {
                                // The handshake runs in the connection's task, bounded like
                                // the headers, so a slow client cannot hold the accept loop.
                                let watcher = graceful.watcher();
                                let builder = builder.clone();
                                let timeout = self.config.header_read_timeout;
                                tokio::spawn(async move {
                                    let _open = Count(&connections);
                                    let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                                        Ok(Ok(stream)) => stream,
                                        Ok(Err(error)) => {
                                            tracing::debug!(%error, "TLS handshake failed");
                                            return;
                                        }
                                        Err(_) => {
                                            tracing::debug!("TLS handshake timed out");
                                            return;
                                        }
                                    };
                                    let connection = watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
                                    if let Err(error) = connection.await {
                                        tracing::debug!(%error, "connection ended with an error");
                                    }
                                });
                            }
                        }
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        let open = graceful.count();
        tracing::info!(open_connections = open, grace = %humantime::format_duration(grace), "webhook listener closed; finishing in-flight requests");
        let finished = tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_ok();
        if !finished {
            tracing::warn!("grace period over with requests still in flight; cutting them");
        }
        finished
    }

    /// Handles one request. Never panics on input and never answers 500.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: Display + Send + Sync + 'static + std::error::Error,
    {
        let arrived = Instant::now();
        let request_id = self.request_id(request.headers());
        let span = tracing::info_span!("request", request_id = %request_id);
        let _in_flight = InFlight::new(&self.metrics.in_flight);
        let admitted = self.in_flight.fetch_add(1, Ordering::AcqRel) < self.config.max_in_flight;
        let _count = Count(&self.in_flight);
        let outcome = if admitted {
            self.process(request).instrument(span.clone()).await
        } else {
            Err(Rejection::Overloaded)
        };
        let mut response = match outcome {
            Ok(id) => {
                self.ok_counter.inc();
                self.ok_duration.observe(arrived.elapsed().as_secs_f64());
                tracing::debug!(parent: &span, event_id = %id, "event delivered");
                let mut body = String::with_capacity(id.len() + 10);
                body.push_str("{\"id\":\"");
                body.push_str(&id);
                body.push_str("\"}");
                json_response(StatusCode::OK, body)
            }
            Err(rejection) => {
                let response = self.reject(&rejection, &span);
                self.metrics
                    .http_duration
                    .with_label_values(&[response.status().as_str()])
                    .observe(arrived.elapsed().as_secs_f64());
                response
            }
        };
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert("x-request-id", value);
        }
        if self.draining.load(Ordering::Acquire) {
            // hyper closes the connection after this answer.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    async fn process<B>(&self, request: Request<B>) -> Result<String, Rejection>
    where
        B: Body<Data = Bytes>,
        B::Error: Display + Send + Sync + 'static + std::error::Error,
    {
        if request.uri().path() != self.config.path {
            return Err(Rejection::NotFound);
        }
        let (parts, body) = request.into_parts();
        let query = parts.uri.query().unwrap_or("");
        let json = match parts.method {
            Method::POST => match content_type(&parts.headers) {
                ContentType::Form => false,
                ContentType::Json => true,
                ContentType::Other(other) => return Err(Rejection::UnsupportedMediaType(other)),
            },
            Method::GET => false,
            _ => return Err(Rejection::MethodNotAllowed),
        };
        let body = if parts.method == Method::POST {
            self.read_body(&parts.headers, body).await?
        } else {
            Bytes::new()
        };
        let params = if parts.method == Method::GET {
            form::parse(query.as_bytes())?
        } else if json {
            json_params(&body)?
        } else {
            form::parse(&body)?
        };
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let request = WebhookRequest {
            params,
            idempotency_token: header("i-twilio-idempotency-token").map(str::to_owned),
            received_at: self.receipt_time(),
        };
        let verified = match &self.verifier {
            None => Verified::attest(request, Attestation::VerificationDisabled),
            Some(verifier) => {
                let url = self.signed_url(&parts);
                let signed = Signed {
                    url: &url,
                    params: if parts.method == Method::POST && !json {
                        &request.params
                    } else {
                        &[]
                    },
                    json_body: json.then_some(&body[..]),
                    signature: header("x-twilio-signature"),
                    settings: header("x-twilio-webhooks-signature-settings"),
                };
                let attestation = verifier.check(&signed)?;
                Verified::attest(request, attestation)
            }
        };
        if !self.account_sids.is_empty() {
            let account = verified
                .get()
                .params
                .iter()
                .find(|(name, _)| name == "AccountSid")
                .map(|(_, value)| value.as_str())
                .unwrap_or("");
            if !self.account_sids.contains(account) {
                return Err(Rejection::AccountNotAllowed(account.to_owned()));
            }
        }
        // The body is a slice of hyper's read buffer: release it before waiting for the sinks,
        // or hyper must copy the buffer to read the next request.
        drop(body);
        let record = self.intake.wants_record().then(|| verified.get().encode());
        let event = Arc::new(normalize(verified)?);
        self.event_counters[event.kind() as usize].inc();
        match self.intake.accept(Arc::clone(&event), record).await {
            Ok(()) => Ok(event.id().to_owned()),
            Err(error) => Err(Rejection::Delivery(Box::new(Undelivered {
                event_id: event.id().to_owned(),
                ce_type: event.ce_type(),
                interaction_sid: event.data().interaction_sid().map(str::to_owned),
                error,
            }))),
        }
    }

    async fn read_body<B>(&self, headers: &HeaderMap, body: B) -> Result<Bytes, Rejection>
    where
        B: Body<Data = Bytes>,
        B::Error: Display + Send + Sync + 'static + std::error::Error,
    {
        let limit = self.config.max_body_bytes;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(Rejection::PayloadTooLarge(limit));
        }
        let collect = Limited::new(body, limit).collect();
        match tokio::time::timeout(self.config.body_read_timeout, collect).await {
            Err(_) => Err(Rejection::BodyTimeout),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
                Err(Rejection::PayloadTooLarge(limit))
            }
            Ok(Err(error)) => Err(Rejection::BodyRead(error.to_string())),
        }
    }

    /// The URL Twilio called: `public_url` + path + raw query, or the forwarded headers when
    /// trusted, or the Host header.
    fn signed_url(&self, parts: &http::request::Parts) -> String {
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(',').next().unwrap_or("").trim())
                .filter(|v| !v.is_empty())
        };
        if self.config.trust_forwarded_headers {
            if let (Some(proto), Some(host)) = (
                header("x-forwarded-proto"),
                header("x-forwarded-host").or(header("host")),
            ) {
                let port = header("x-forwarded-port")
                    .filter(|_| !host.contains(':') || host.ends_with(']'))
                    .map(|port| format!(":{port}"))
                    .unwrap_or_default();
                return format!("{proto}://{host}{port}{path_and_query}");
            }
        }
        match &self.config.public_url {
            Some(base) => {
                let base = base.trim_end_matches('/');
                let mut url = String::with_capacity(base.len() + path_and_query.len());
                url.push_str(base);
                url.push_str(path_and_query);
                url
            }
            None => format!(
                "{}://{}{path_and_query}",
                if self.tls.is_some() { "https" } else { "http" },
                header("host").unwrap_or("localhost")
            ),
        }
    }

    /// Counts a request or connection refused for load, and logs it at most once a second.
    fn shed(&self, reason: &'static str) {
        self.metrics
            .http_rejections
            .with_label_values(&[reason])
            .inc();
        if reason == "too_many_connections" {
            self.metrics.http_requests.with_label_values(&["503"]).inc();
        }
        if let Some(suppressed) = self.shed_log.allow() {
            tracing::warn!(
                reason,
                suppressed,
                max_in_flight = self.config.max_in_flight,
                max_connections = self.config.max_connections,
                "shedding load: answered 503 at once"
            );
        }
    }

    fn reject(&self, rejection: &Rejection, span: &tracing::Span) -> Response<Full<Bytes>> {
        let status = rejection.status();
        let reason = rejection.reason();
        self.metrics
            .http_requests
            .with_label_values(&[status.as_str()])
            .inc();
        match rejection {
            Rejection::Verification(_) | Rejection::AccountNotAllowed(_) => {
                self.metrics
                    .verification_failures
                    .with_label_values(&[reason])
                    .inc();
                let slot = VerifyError::REASONS
                    .iter()
                    .position(|r| *r == reason)
                    .unwrap_or(VERIFY_REASONS - 1);
                if let Some(suppressed) = self.verify_log[slot].allow() {
                    // The error names the URLs tried: what an operator needs to find a wrong
                    // `public_url`, kept out of the response.
                    tracing::warn!(parent: span, status = status.as_u16(), reason, suppressed, error = %rejection, "request refused: not proven to come from Twilio (at most one line a second per reason; `suppressed` counts the others)");
                }
            }
            Rejection::Overloaded => self.shed(reason),
            Rejection::Delivery(undelivered) => {
                self.metrics
                    .http_rejections
                    .with_label_values(&[reason])
                    .inc();
                tracing::error!(parent: span, status = status.as_u16(), reason, event_id = %undelivered.event_id, ce_type = undelivered.ce_type, interaction_sid = undelivered.interaction_sid.as_deref().unwrap_or(""), error = %rejection, "event not acknowledged (a sink did not confirm it, or the spool refused it); Twilio does not retry 5xx by default, so this event is likely lost unless Twilio retries");
            }
            _ => {
                self.metrics
                    .http_rejections
                    .with_label_values(&[reason])
                    .inc();
                tracing::warn!(parent: span, status = status.as_u16(), reason, error = %rejection, "request refused");
            }
        }
        // A verification failure says why, never which URLs were tried: they are built from
        // the client's Host header and would disclose `public_url`.
        let message = match rejection {
            Rejection::Verification(_) => {
                "the request is not signed by Twilio for this URL".to_owned()
            }
            other => other.to_string(),
        };
        let body = serde_json::json!({ "error": reason, "message": message });
        let mut response = json_response(status, body.to_string());
        match rejection {
            Rejection::Delivery(_) | Rejection::Overloaded => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, self.retry_after.clone());
            }
            Rejection::MethodNotAllowed => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST, GET"));
            }
            _ => {}
        }
        response
    }

    fn request_id(&self, headers: &HeaderMap) -> String {
        let incoming = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()));
        match incoming {
            Some(id) => id.to_owned(),
            None => {
                let n = self.request_counter.fetch_add(1, Ordering::Relaxed);
                // Written by hand: `format!` costs about five times as much, on every request.
                let mut id = String::with_capacity(self.request_prefix.len() + 17);
                id.push_str(&self.request_prefix);
                id.push('-');
                push_hex(&mut id, n);
                id
            }
        }
    }
}

/// Appends `n` in lower-case hex without leading zeros, as `{n:x}` writes it.
fn push_hex(out: &mut String, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (u64::BITS - (n | 1).leading_zeros()).div_ceil(4);
    for digit in (0..digits).rev() {
        out.push(char::from(HEX[((n >> (digit * 4)) & 15) as usize]));
    }
}

enum ContentType {
    Form,
    Json,
    Other(String),
}

fn content_type(headers: &HeaderMap) -> ContentType {
    let raw = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = raw.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        ContentType::Form
    } else if essence.eq_ignore_ascii_case("application/json") {
        ContentType::Json
    } else {
        ContentType::Other(raw.chars().take(100).collect())
    }
}

/// A JSON body's top-level members as parameters: strings as they are, numbers and booleans
/// as their JSON text, arrays as repeated parameters, nested objects as JSON text, null skipped.
pub fn json_params(body: &[u8]) -> Result<Vec<(String, String)>, Rejection> {
    use serde_json::Value;
    let object: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| Rejection::InvalidJson(e.to_string()))?;
    let mut params = Vec::with_capacity(object.len());
    fn text(value: Value) -> Option<String> {
        match value {
            Value::Null => None,
            Value::String(s) => Some(s),
            other => Some(other.to_string()),
        }
    }
    for (name, value) in object {
        match value {
            Value::Array(items) => params.extend(
                items
                    .into_iter()
                    .filter_map(text)
                    .map(|v| (name.clone(), v)),
            ),
            value => params.extend(text(value).map(|v| (name, v))),
        }
    }
    Ok(params)
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn rand_prefix() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    // RandomState is seeded randomly per process: enough for a log correlation prefix.
    RandomState::new().hash_one(std::process::id()) as u32
}

/// Keeps `flexbridge_http_requests_in_flight` right even when a request is cancelled.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_refusal_is_a_whole_http_response() {
        let text = std::str::from_utf8(TOO_MANY_CONNECTIONS).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|l| l.parse::<usize>().ok());
        assert_eq!(length, Some(body.len()));
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
        assert!(head.starts_with("HTTP/1.1 503 ") && head.contains("retry-after: 1"));
    }

    #[test]
    fn request_ids_count_in_hex_as_format_does() {
        for n in [
            0,
            1,
            9,
            10,
            15,
            16,
            255,
            256,
            0xdead_beef,
            u64::MAX >> 4,
            u64::MAX,
        ]
        .into_iter()
        .chain((0..64).map(|bit| 1u64 << bit))
        {
            let mut out = String::from("p-");
            push_hex(&mut out, n);
            assert_eq!(out, format!("p-{n:x}"));
        }
    }

    #[test]
    fn shedding_logs_at_most_once_a_second() {
        let limiter = RateLimited::default();
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
        limiter.last_second.store(0, Ordering::Relaxed);
        assert_eq!(limiter.allow(), Some(2));
    }
}
