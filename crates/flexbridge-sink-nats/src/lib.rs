//! The `nats` sink: JetStream publish that returns only on the PubAck, with `Nats-Msg-Id` set
//! to the event id so the stream drops Twilio's retries and double deliveries within its
//! duplicate window; CloudEvents NATS binding in binary (default) or structured mode.
//!
//! Publishes are never serialized: every request awaits its own PubAck while others are in
//! flight on the same connection.

mod config;
mod outbox;

pub use config::{NatsSinkConfig, NatsTls, Retention, ServerUrls, Storage, StreamConfig};

use async_nats::connection::State;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::HeaderMap;
use async_trait::async_trait;
use flexbridge_core::cloudevents::any_byte;
use flexbridge_core::metrics::Counter;
use flexbridge_core::route::Template;
use flexbridge_core::secret::redact_url;
use flexbridge_core::FailureLog;
use flexbridge_core::{
    Binding, BuildError, ContentMode, Event, EventKind, Limits, Retry, Sink, SinkConfig,
    SinkContext, SinkError,
};
use percent_encoding::{AsciiSet, CONTROLS};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `flexbridge_sink_duplicates_total{sink}`.
const DUPLICATES: &str = "flexbridge_sink_duplicates_total";

/// The JetStream side of a sink: the context, and the outbox its publishes go through.
struct JetStream {
    context: jetstream::Context,
    outbox: outbox::Outbox,
}

/// What validation parsed: the subject template and the server addresses.
pub struct NatsPlan {
    subject: Template,
    servers: Vec<async_nats::ServerAddr>,
}

/// Publishes to NATS (JetStream unless configured otherwise).
pub struct NatsSink {
    name: String,
    client: async_nats::Client,
    /// Present unless `jetstream = false`.
    jetstream: Option<JetStream>,
    subject: Template,
    content_mode: ContentMode,
    /// One wildcard subject per event kind, to check that a stream captures it.
    check_subjects: Vec<String>,
    stream: Option<StreamConfig>,
    provisioned: AtomicBool,
    duplicates: Counter,
}

/// Characters the CloudEvents NATS binding percent-encodes in header values: space, `"`, `%`
/// and everything outside printable ASCII (non-ASCII bytes are always encoded).
const HEADER_VALUE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// A header value as the binding sends it. Attribute values almost never hold a character to
/// encode and are copied whole, where percent-encoding's iterator would look at each byte on
/// its own.
fn header_value(value: &str) -> String {
    let encoded = |b: u8| !(0x21..=0x7e).contains(&b) || b == b'"' || b == b'%';
    if any_byte(value, encoded) {
        percent_encoding::utf8_percent_encode(value, HEADER_VALUE).collect()
    } else {
        value.to_owned()
    }
}

/// Makes a value one safe subject token: `.`, `*`, `>`, white space, control and non-ASCII
/// characters become `_`.
pub fn subject_token(value: &str, out: &mut String) {
    // An empty token (`a..b`) makes the subject invalid.
    if value.is_empty() {
        out.push('_');
        return;
    }
    out.extend(value.chars().map(|c| {
        if c.is_ascii_graphic() && !matches!(c, '.' | '*' | '>') {
            c
        } else {
            '_'
        }
    }));
}

/// Longest subject published: the server's default `max_control_line` is 4 KiB for the
/// whole `HPUB <subject> <reply> <sizes>` line.
pub const MAX_SUBJECT: usize = 3800;

/// The subject pattern events of `kind` go to: placeholders other than `{event}` become `*`,
/// and a token that mixes a placeholder with text becomes `*` as a whole.
pub fn wildcard_subject(template: &Template, kind: EventKind) -> String {
    template
        .pattern(kind.short_name(), "*")
        .split('.')
        .map(|token| if token.contains('*') { "*" } else { token })
        .collect::<Vec<_>>()
        .join(".")
}

#[async_trait]
impl SinkConfig for NatsSinkConfig {
    type Plan = NatsPlan;
    type Sink = NatsSink;

    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self, _limits: &Limits) -> Result<NatsPlan, Vec<String>> {
        let (subject, mut errors) = self.check();
        let servers: Vec<async_nats::ServerAddr> = self
            .url
            .iter()
            .filter_map(|u| {
                u.parse()
                    .map_err(|e: std::io::Error| {
                        errors.push(format!("sinks.{}.url: {}: {e}", self.name, redact_url(u)))
                    })
                    .ok()
            })
            .collect();
        match subject {
            Some(subject) if errors.is_empty() => Ok(NatsPlan { subject, servers }),
            _ => Err(errors),
        }
    }

    /// Connects. An unreachable server is not an error: the client keeps retrying in the
    /// background and the health check reports it until it connects.
    async fn build(&self, plan: NatsPlan, context: &SinkContext) -> Result<NatsSink, BuildError> {
        let config = self;
        let NatsPlan {
            subject,
            servers: addrs,
        } = plan;
        let sink_metrics = context.shared();
        let duplicates = context.counter(
            DUPLICATES,
            "Publishes the broker reported as duplicates of an event it already had.",
        )?;
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("flexbridge {}", config.name))
            .connection_timeout(config.connect_timeout)
            .ping_interval(config.ping_interval)
            .retry_on_initial_connect();
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(token) = &config.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some(seed) = &config.nkey_seed {
            options = options.nkey(seed.expose().to_owned());
        }
        if let Some(path) = &config.credentials_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| BuildError::open("cannot read the NATS credentials file", e))?;
        }
        if config.tls.required {
            options = options.require_tls(true);
        }
        if let Some(ca) = &config.tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let reconnections = sink_metrics.reconnections.clone();
        let was_connected = std::sync::Arc::new(AtomicBool::new(false));
        let failures = std::sync::Arc::new(FailureLog::new(config.name.clone()));
        let name = config.name.clone();
        options = options.event_callback(move |event| {
            let reconnections = reconnections.clone();
            let was_connected = std::sync::Arc::clone(&was_connected);
            let failures = std::sync::Arc::clone(&failures);
            let name = name.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        if was_connected.swap(true, Ordering::SeqCst) {
                            reconnections.inc();
                        }
                        failures.success();
                        tracing::info!(sink = %name, "connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        failures.failure("disconnected from NATS", &"connection lost");
                    }
                    async_nats::Event::ClientError(error) => {
                        failures.failure("the NATS connection fails", &error);
                    }
                    async_nats::Event::ServerError(error) => {
                        failures.failure("the NATS server reports an error", &error);
                    }
                    other => tracing::warn!(sink = %name, event = %other, "NATS client event"),
                }
            }
        });
        let servers = config
            .url
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(",");
        let client = options
            .connect(addrs)
            .await
            .map_err(|e| BuildError::open(format!("cannot connect to NATS at {servers}"), e))?;
        // Not waiting for the first connection: the listener starts at once, the health check
        // reports the sink until it is connected, and a publish meanwhile is retried.
        let jetstream = config.jetstream.then(|| {
            let context = jetstream::ContextBuilder::new()
                .timeout(config.ack_timeout)
                .build(client.clone());
            JetStream {
                outbox: outbox::Outbox::start(context.clone()),
                context,
            }
        });
        if !config.jetstream {
            tracing::warn!(sink = %config.name, "jetstream = false: core NATS publish is at-most-once; an event acknowledged to Twilio can be lost");
        }
        let mut check_subjects: Vec<String> = EventKind::ALL
            .iter()
            .map(|kind| wildcard_subject(&subject, *kind))
            .collect();
        check_subjects.dedup();
        Ok(NatsSink {
            name: config.name.clone(),
            client,
            jetstream,
            subject,
            content_mode: config.content_mode,
            check_subjects,
            stream: config.stream.clone(),
            provisioned: AtomicBool::new(false),
            duplicates,
        })
    }
}

impl NatsSink {
    fn encode(&self, event: &Event) -> (HeaderMap, bytes::Bytes) {
        let encoded = Binding::Nats.encode(event, self.content_mode);
        let mut headers = HeaderMap::new();
        if encoded.is_structured() {
            headers.insert("Content-Type", encoded.content_type);
        }
        for (name, value) in encoded.headers() {
            // A static name and an owned value: no copy beyond the one the value needs.
            headers.insert(
                async_nats::header::HeaderName::from_static(name),
                header_value(value),
            );
        }
        (headers, encoded.payload.clone())
    }

    async fn provision(&self, js: &jetstream::Context) -> Result<(), SinkError> {
        let Some(stream) = &self.stream else {
            return Ok(());
        };
        if self.provisioned.load(Ordering::SeqCst) {
            return Ok(());
        }
        let subjects = if stream.subjects.is_empty() {
            self.check_subjects.clone()
        } else {
            stream.subjects.clone()
        };
        js.get_or_create_stream(stream.to_nats(subjects))
            .await
            .map_err(|e| {
                SinkError::permanent(
                    "stream_provisioning",
                    format!("cannot create stream {}: {e}", stream.name),
                )
                .with_source(e)
            })?;
        tracing::info!(sink = %self.name, stream = %stream.name, "JetStream stream ready");
        self.provisioned.store(true, Ordering::SeqCst);
        Ok(())
    }
}

impl NatsSink {
    /// Whether a failed publish may succeed later. A publish nobody answered ("no
    /// responders", which async-nats reports as `StreamNotFound`) means either that no stream
    /// captures the subject (permanent) or that JetStream is restarting or electing a leader
    /// (retryable): asking JetStream for the stream of that subject tells the two apart.
    async fn classify(
        &self,
        js: &jetstream::Context,
        subject: &str,
        error: PublishError,
    ) -> SinkError {
        if error.kind() == PublishErrorKind::StreamNotFound {
            return match stream_lookup(js, subject).await {
                StreamLookup::Missing => SinkError::permanent(
                    "stream_not_found",
                    "no JetStream stream captures this subject (provision one with the sink's `stream` settings)",
                ),
                StreamLookup::Found | StreamLookup::Unavailable => SinkError::retryable(
                    "no_responders",
                    "JetStream did not answer the publish (restarting or electing a leader)",
                ),
            }
            .with_source(error);
        }
        let (retry, reason) = match error.kind() {
            PublishErrorKind::MaxPayloadExceeded => (Retry::Permanent, "too_large"),
            PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
                (Retry::Permanent, "rejected")
            }
            PublishErrorKind::TimedOut => (Retry::Retryable, "timeout"),
            PublishErrorKind::BrokenPipe => (Retry::Retryable, "disconnected"),
            PublishErrorKind::MaxAckPending => (Retry::Retryable, "busy"),
            _ => (Retry::Retryable, "publish_failed"),
        };
        SinkError::new(retry, reason, error.to_string()).with_source(error)
    }
}

/// What JetStream says about the stream of a subject.
enum StreamLookup {
    /// A stream captures it.
    Found,
    /// JetStream answered: no stream captures it.
    Missing,
    /// JetStream did not answer (no responders, timeout, disconnected).
    Unavailable,
}

async fn stream_lookup(js: &jetstream::Context, subject: &str) -> StreamLookup {
    use async_nats::jetstream::context::GetStreamByNameErrorKind;
    match tokio::time::timeout(Duration::from_secs(1), js.stream_by_subject(subject)).await {
        Ok(Ok(_)) => StreamLookup::Found,
        Ok(Err(error)) if error.kind() == GetStreamByNameErrorKind::NotFound => {
            StreamLookup::Missing
        }
        Ok(Err(_)) | Err(_) => StreamLookup::Unavailable,
    }
}

#[async_trait]
impl Sink for NatsSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, event: &Event) -> Result<(), SinkError> {
        if self.client.connection_state() != State::Connected {
            return Err(SinkError::retryable(
                "disconnected",
                "not connected to NATS",
            ));
        }
        let subject = self.subject.render_with(event, subject_token);
        // The server refuses a protocol line over its max_control_line (4 KiB by default).
        if subject.len() > MAX_SUBJECT {
            return Err(SinkError::permanent(
                "invalid_subject",
                format!(
                    "the subject is {} bytes; at most {MAX_SUBJECT} fit a NATS protocol line",
                    subject.len()
                ),
            ));
        }
        let (headers, payload) = self.encode(event);
        match &self.jetstream {
            Some(JetStream {
                context: js,
                outbox,
            }) => {
                // The stream this sink provisions must exist before its first publish, or
                // JetStream answers "no responders" and the event would count as refused for
                // good. The health check provisions it too; whichever runs first does it.
                if self.stream.is_some() && !self.provisioned.load(Ordering::SeqCst) {
                    self.provision(js).await.map_err(|e| {
                        SinkError::retryable(
                            "stream_provisioning",
                            format!("the stream is not provisioned yet: {e}"),
                        )
                    })?;
                }
                let message = PublishMessage::build()
                    .payload(payload)
                    .headers(headers)
                    .message_id(event.id());
                let ack = match outbox.send_publish(subject, message).await {
                    Some(Ok(pending)) => pending.await,
                    Some(Err(error)) => Err(error),
                    None => {
                        return Err(SinkError::retryable(
                            "publish_failed",
                            "the publishing task stopped",
                        ))
                    }
                };
                let ack = match ack {
                    Ok(ack) => ack,
                    Err(error) => {
                        // The subject moved into the publish; rendering it again costs only
                        // on this error path.
                        let subject = self.subject.render_with(event, subject_token);
                        return Err(self.classify(js, &subject, error).await);
                    }
                };
                if ack.duplicate {
                    self.duplicates.inc();
                    tracing::debug!(sink = %self.name, event_id = event.id(), stream = %ack.stream, "the stream already had this event");
                }
            }
            None => self
                .client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| {
                    SinkError::retryable("publish_failed", e.to_string()).with_source(e)
                })?,
        }
        Ok(())
    }

    async fn health(&self) -> Result<(), SinkError> {
        if self.client.connection_state() != State::Connected {
            return Err(SinkError::retryable(
                "disconnected",
                "not connected to NATS",
            ));
        }
        let Some(JetStream { context: js, .. }) = &self.jetstream else {
            return Ok(());
        };
        self.provision(js).await?;
        for subject in &self.check_subjects {
            match stream_lookup(js, subject).await {
                StreamLookup::Found => {}
                StreamLookup::Missing => {
                    return Err(SinkError::permanent(
                        "stream_not_found",
                        format!("no JetStream stream captures subject {subject}"),
                    ))
                }
                StreamLookup::Unavailable => {
                    return Err(SinkError::retryable(
                        "no_responders",
                        "JetStream is not answering (restarting or electing a leader)",
                    ))
                }
            }
        }
        Ok(())
    }

    async fn drain(&self) -> Result<(), SinkError> {
        // Every JetStream publish already awaited its PubAck; flushing covers core NATS.
        self.client
            .flush()
            .await
            .map_err(|e| SinkError::retryable("flush_failed", e.to_string()).with_source(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever a parameter holds, its subject token is one valid, non-empty token: no
        /// separator, wildcard, white space or control character.
        #[test]
        fn every_value_renders_one_valid_subject_token(value in "\\PC{0,40}|[ .*>\t]{0,4}") {
            let mut out = String::new();
            subject_token(&value, &mut out);
            proptest::prop_assert!(!out.is_empty());
            proptest::prop_assert!(out.chars().all(|c| c.is_ascii_graphic() && !matches!(c, '.' | '*' | '>')), "{out:?}");
        }
    }

    #[test]
    fn subject_tokens_are_safe() {
        let mut out = String::new();
        subject_token("a.b *>c\tñ", &mut out);
        assert_eq!(out, "a_b___c__");
    }

    #[test]
    fn wildcard_subjects_cover_every_kind() {
        let t = Template::parse("flex.interactions.{account}.{event}").unwrap();
        assert_eq!(
            wildcard_subject(&t, EventKind::ChannelStatusUpdated),
            "flex.interactions.*.channel.status_updated"
        );
        let t = Template::parse("flex.acct_{account}.{event}").unwrap();
        assert_eq!(wildcard_subject(&t, EventKind::Unknown), "flex.*.unknown");
    }

    #[test]
    fn header_values_are_percent_encoded_as_the_binding_requires() {
        let encoded =
            percent_encoding::utf8_percent_encode("a b\"c%d\u{7f}ñ~", HEADER_VALUE).to_string();
        assert_eq!(encoded, "a%20b%22c%25d%7F%C3%B1~");
        // The fast path copies exactly what needs no encoding: every ASCII character and a
        // multi-byte one, at the start, middle and end of values around the 16-byte chunks.
        for len in 0..40 {
            for special in (0u8..0x80).map(char::from).chain(['\u{e9}']) {
                for at in [0, len / 2, len] {
                    let mut value = "a".repeat(len);
                    value.insert(at, special);
                    assert_eq!(
                        header_value(&value),
                        percent_encoding::utf8_percent_encode(&value, HEADER_VALUE).to_string(),
                        "{value:?}"
                    );
                }
            }
        }
    }
}
