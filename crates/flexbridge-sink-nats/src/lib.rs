//! The `nats` sink: JetStream publish that returns only on the PubAck, with `Nats-Msg-Id` set
//! to the event id so the stream drops Twilio's retries and double deliveries within its
//! duplicate window; CloudEvents NATS binding in binary (default) or structured mode.
//!
//! Publishes are never serialized: every request awaits its own PubAck while others are in
//! flight, on one client connection or, with `connections`, spread over several in turn (the
//! server reads each connection on a goroutine of its own; docs/bench has what it changes).

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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
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

/// One client connection, and the JetStream side on it.
struct Link {
    client: async_nats::Client,
    /// Present unless `jetstream = false`.
    jetstream: Option<JetStream>,
}

/// Publishes to NATS (JetStream unless configured otherwise).
pub struct NatsSink {
    name: String,
    /// The connections publishes are spread over; never empty.
    links: Vec<Link>,
    /// The link the next publish starts looking from (round robin).
    next: AtomicUsize,
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
        let servers = config
            .url
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(",");
        let mut links = Vec::with_capacity(config.connections);
        for index in 0..config.connections {
            let client = config
                .connect_options(index, &sink_metrics.reconnections)
                .await?
                .connect(addrs.clone())
                .await
                .map_err(|e| BuildError::open(format!("cannot connect to NATS at {servers}"), e))?;
            // Not waiting for the first connection: the listener starts at once, the health
            // check reports the sink until it is connected, and a publish meanwhile is retried.
            let jetstream = config.jetstream.then(|| {
                let context = jetstream::ContextBuilder::new()
                    .timeout(config.ack_timeout)
                    .build(client.clone());
                JetStream {
                    outbox: outbox::Outbox::start(context.clone()),
                    context,
                }
            });
            links.push(Link { client, jetstream });
        }
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
            links,
            next: AtomicUsize::new(0),
            subject,
            content_mode: config.content_mode,
            check_subjects,
            stream: config.stream.clone(),
            provisioned: AtomicBool::new(false),
            duplicates,
        })
    }
}

impl NatsSinkConfig {
    /// The client options of connection `index` (of `connections`): the name the server shows,
    /// credentials, TLS, and the callback that logs and counts its connection events.
    async fn connect_options(
        &self,
        index: usize,
        reconnections: &Counter,
    ) -> Result<async_nats::ConnectOptions, BuildError> {
        let client_name = if self.connections == 1 {
            format!("flexbridge {}", self.name)
        } else {
            format!(
                "flexbridge {} {}/{}",
                self.name,
                index + 1,
                self.connections
            )
        };
        let mut options = async_nats::ConnectOptions::new()
            .name(client_name)
            .connection_timeout(self.connect_timeout)
            .ping_interval(self.ping_interval)
            .retry_on_initial_connect();
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(token) = &self.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.expose().to_owned());
        }
        if let Some(path) = &self.credentials_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| BuildError::open("cannot read the NATS credentials file", e))?;
        }
        if self.tls.required {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls.cert_file, &self.tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let reconnections = reconnections.clone();
        let was_connected = Arc::new(AtomicBool::new(false));
        // One per connection: a connection that works must not hide one that fails.
        let failures = Arc::new(FailureLog::new(self.name.clone()));
        let name = self.name.clone();
        let connection = index + 1;
        Ok(options.event_callback(move |event| {
            let reconnections = reconnections.clone();
            let was_connected = Arc::clone(&was_connected);
            let failures = Arc::clone(&failures);
            let name = name.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        if was_connected.swap(true, Ordering::SeqCst) {
                            reconnections.inc();
                        }
                        failures.success();
                        tracing::info!(sink = %name, connection, "connected to NATS");
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
                    other => {
                        tracing::warn!(sink = %name, connection, event = %other, "NATS client event")
                    }
                }
            }
        }))
    }
}

/// The first of `count` links, starting at `start` and wrapping, that `usable` accepts.
fn pick(count: usize, start: usize, usable: impl Fn(usize) -> bool) -> Option<usize> {
    // `start` wraps around `usize`: reduced first, so adding to it cannot overflow.
    (0..count)
        .map(|i| (start % count + i) % count)
        .find(|&i| usable(i))
}

impl NatsSink {
    /// The next connected link, round robin; an error when none is connected.
    fn link(&self) -> Result<&Link, SinkError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        pick(self.links.len(), start, |i| {
            self.links[i].client.connection_state() == State::Connected
        })
        .map(|i| &self.links[i])
        .ok_or_else(|| SinkError::retryable("disconnected", "not connected to NATS"))
    }

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
        let link = self.link()?;
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
        match &link.jetstream {
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
            None => link
                .client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| {
                    SinkError::retryable("publish_failed", e.to_string()).with_source(e)
                })?,
        }
        Ok(())
    }

    /// Healthy while at least one connection is up (publishes go to the connected ones) and
    /// JetStream answers on it; a connection that is down logs its own failures.
    async fn health(&self) -> Result<(), SinkError> {
        let link = self.link()?;
        let Some(JetStream { context: js, .. }) = &link.jetstream else {
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
        for link in &self.links {
            link.client
                .flush()
                .await
                .map_err(|e| SinkError::retryable("flush_failed", e.to_string()).with_source(e))?;
        }
        Ok(())
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
    fn publishes_take_the_connected_links_in_turn() {
        let all = |_: usize| true;
        let picks: Vec<_> = (0..5).map(|start| pick(2, start, all)).collect();
        assert_eq!(picks, [Some(0), Some(1), Some(0), Some(1), Some(0)]);
        // Link 1 of 3 down: its turn goes to the next connected one.
        let up = |i: usize| i != 1;
        let picks: Vec<_> = (0..3).map(|start| pick(3, start, up)).collect();
        assert_eq!(picks, [Some(0), Some(2), Some(2)]);
        assert_eq!(pick(3, 7, |_| false), None);
        assert_eq!(pick(1, usize::MAX, all), Some(0));
        assert_eq!(pick(3, usize::MAX, |i| i == 1), Some(1));
    }

    #[test]
    fn connections_default_to_one_and_stay_in_range() {
        let parse = |extra: serde_json::Value| {
            let mut value = serde_json::json!({"name": "n", "url": "nats://127.0.0.1:4222"});
            if let (Some(map), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
                map.extend(extra.clone());
            }
            serde_json::from_value::<NatsSinkConfig>(value).unwrap()
        };
        let default = parse(serde_json::json!({}));
        assert_eq!(default.connections, 1);
        assert!(default.check().1.is_empty());
        assert!(parse(serde_json::json!({"connections": 16}))
            .check()
            .1
            .is_empty());
        for bad in [0, 17] {
            let errors = parse(serde_json::json!({"connections": bad})).check().1;
            assert_eq!(
                errors,
                [format!(
                    "sinks.n.connections: {bad} is out of range (1 to 16)"
                )]
            );
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
