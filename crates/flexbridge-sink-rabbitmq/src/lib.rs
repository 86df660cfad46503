//! The `rabbitmq` sink: every publish is mandatory and persistent on a channel in confirm
//! mode, and returns only once the broker confirmed it. A nack or a returned (unroutable)
//! message is an error, never a success. Publishes are pipelined on the confirm channel: each
//! request awaits its own confirm while others are in flight.
//!
//! A background task keeps the connection: it reconnects with backoff after the connection or
//! the channel is lost, and declares (or passively checks) the topology each time.

mod config;

pub use config::{Argument, Declare, QueueDeclare, RabbitMqSinkConfig, RabbitTls};

use async_trait::async_trait;
use flexbridge_core::cloudevents::Encoded;
use flexbridge_core::metrics::Counter;
use flexbridge_core::metrics::SinkMetrics;
use flexbridge_core::retry::Backoff;
use flexbridge_core::route::Template;
use flexbridge_core::secret::redact_url;
use flexbridge_core::FailureLog;
use flexbridge_core::{
    Binding, BuildError, ContentMode, Event, Limits, Retry, Sink, SinkConfig, SinkContext,
    SinkError,
};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify};

/// `flexbridge_sink_returned_total{sink}`.
const RETURNED: &str = "flexbridge_sink_returned_total";

/// A live connection and its confirm-mode channel.
struct Link {
    connection: Connection,
    channel: Channel,
}

/// State shared with the connection task.
struct Shared {
    link: RwLock<Option<Arc<Link>>>,
    /// Why the sink cannot publish now (connection or topology), for health and errors.
    problem: RwLock<Option<SinkErrorInfo>>,
    /// Wakes the connection task when a publish finds the link broken.
    broken: Notify,
}

#[derive(Clone)]
struct SinkErrorInfo {
    retry: Retry,
    reason: &'static str,
    message: String,
}

impl SinkErrorInfo {
    fn to_error(&self) -> SinkError {
        SinkError::new(self.retry, self.reason, self.message.clone())
    }
}

/// Publishes to RabbitMQ.
pub struct RabbitMqSink {
    name: String,
    exchange: ShortString,
    routing_key: Template,
    content_mode: ContentMode,
    shared: Arc<Shared>,
    returned: Counter,
    stop: watch::Sender<bool>,
    /// True once the first connection attempt finished (connected or failed).
    first_attempt: watch::Receiver<bool>,
}

impl RabbitMqSink {
    /// Waits until the first connection attempt finished, connected or not (at most
    /// `connect_timeout`). The daemon does not wait (readiness covers it); a caller that
    /// publishes right after `open`, like a test, may.
    pub async fn first_attempt(&self) {
        let mut done = self.first_attempt.clone();
        let _ = done.wait_for(|d| *d).await;
    }
}

/// Longest routing key AMQP 0-9-1 can carry (a short string).
pub const MAX_ROUTING_KEY: usize = 255;

/// Makes a value safe inside a routing key: `.` and white space become `_`.
pub fn routing_key_value(value: &str, out: &mut String) {
    out.extend(value.chars().map(|c| {
        if c == '.' || c.is_whitespace() || c.is_control() {
            '_'
        } else {
            c
        }
    }));
}

#[async_trait]
impl SinkConfig for RabbitMqSinkConfig {
    /// The routing key template.
    type Plan = Template;
    type Sink = RabbitMqSink;

    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self, _limits: &Limits) -> Result<Template, Vec<String>> {
        match self.check() {
            (Some(routing_key), errors) if errors.is_empty() => Ok(routing_key),
            (_, errors) => Err(errors),
        }
    }

    /// Starts the connection task. A broker that is down is not an error: the task keeps
    /// retrying and the health check reports it until it connects.
    async fn build(
        &self,
        routing_key: Template,
        context: &SinkContext,
    ) -> Result<RabbitMqSink, BuildError> {
        let returned = context.counter(
            RETURNED,
            "Messages the broker returned as unroutable (mandatory publish, no binding).",
        )?;
        let shared = Arc::new(Shared {
            link: RwLock::new(None),
            problem: RwLock::new(Some(SinkErrorInfo {
                retry: Retry::Retryable,
                reason: "disconnected",
                message: "not connected to RabbitMQ yet".to_owned(),
            })),
            broken: Notify::new(),
        });
        let (stop, stopped) = watch::channel(false);
        let (first_attempt, first_attempt_done) = watch::channel(false);
        tokio::spawn(maintain(
            self.clone(),
            Arc::clone(&shared),
            context.shared(),
            stopped,
            first_attempt,
        ));
        // Not waiting for the first attempt: the listener starts at once, the health check
        // reports the sink until it is connected, and a publish meanwhile is retried.
        Ok(RabbitMqSink {
            name: self.name.clone(),
            exchange: self.exchange.as_str().into(),
            routing_key,
            content_mode: self.content_mode,
            shared,
            returned,
            stop,
            first_attempt: first_attempt_done,
        })
    }
}

impl RabbitMqSink {
    fn current(&self) -> Result<Arc<Link>, SinkError> {
        let problem = self.shared.problem.read().ok().and_then(|p| p.clone());
        if let Some(problem) = problem.as_ref().filter(|p| p.retry == Retry::Permanent) {
            // A topology problem: publishing would fail (and close the channel) anyway.
            return Err(problem.to_error());
        }
        let link = self.shared.link.read().ok().and_then(|l| l.clone());
        match link {
            Some(link) if link.channel.status().connected() => Ok(link),
            _ => {
                self.shared.broken.notify_one();
                Err(problem.map(|p| p.to_error()).unwrap_or_else(|| {
                    SinkError::retryable("disconnected", "not connected to RabbitMQ")
                }))
            }
        }
    }

    fn properties(event: &Event, encoded: &Encoded<'_>) -> BasicProperties {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(event.id().into())
            .with_timestamp(event_timestamp(event))
            .with_app_id("flexbridge".into())
            .with_type(event.ce_type().into())
            .with_content_type(encoded.content_type.into());
        if encoded.is_structured() {
            return properties;
        }
        let mut headers = FieldTable::default();
        for (name, value) in encoded.headers() {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
        properties.with_headers(headers)
    }
}

/// Receipt time in seconds since the epoch (the AMQP `timestamp` property).
fn event_timestamp(event: &Event) -> u64 {
    event
        .received_at()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lapin_error(reason: &'static str, error: lapin::Error) -> SinkError {
    SinkError::retryable(reason, error.to_string()).with_source(error)
}

#[async_trait]
impl Sink for RabbitMqSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, event: &Event) -> Result<(), SinkError> {
        let link = self.current()?;
        let routing_key = self.routing_key.render_with(event, routing_key_value);
        // AMQP's short string: the broker (and the encoder) refuse more than 255 bytes. A
        // custom template with long values can produce one; it never fits, so it is permanent.
        if routing_key.len() > MAX_ROUTING_KEY {
            return Err(SinkError::permanent(
                "invalid_routing_key",
                format!(
                    "the routing key is {} bytes; AMQP allows at most {MAX_ROUTING_KEY}",
                    routing_key.len()
                ),
            ));
        }
        let encoded = Binding::Amqp.encode(event, self.content_mode);
        let confirm = link
            .channel
            .basic_publish(
                self.exchange.clone(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                encoded.payload,
                Self::properties(event, &encoded),
            )
            .await
            .map_err(|e| {
                self.shared.broken.notify_one();
                lapin_error("disconnected", e)
            })?;
        match confirm.await.map_err(|e| {
            self.shared.broken.notify_one();
            lapin_error("disconnected", e)
        })? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                self.returned.inc();
                Err(SinkError::permanent(
                    "unroutable",
                    format!(
                        "RabbitMQ returned the message: no queue is bound to exchange {:?} for routing key {:?} ({} {})",
                        self.exchange.as_str(),
                        routing_key,
                        returned.reply_code,
                        returned.reply_text.as_str()
                    ),
                ))
            }
            Confirmation::Nack(_) => Err(SinkError::retryable(
                "nack",
                "RabbitMQ refused the message (nack): a queue is full or the broker could not store it",
            )),
            Confirmation::NotRequested => Err(SinkError::permanent(
                "no_confirm",
                "the channel is not in confirm mode",
            )),
        }
    }

    async fn health(&self) -> Result<(), SinkError> {
        let link = self.current()?;
        // A memory or disk alarm blocks every publishing connection (`connection.blocked`):
        // publishes then wait without an error, so it must show here.
        if link.connection.status().blocked() {
            return Err(SinkError::retryable(
                "blocked",
                "RabbitMQ has blocked this connection (a memory or disk alarm on the broker); publishes wait until it is lifted",
            ));
        }
        Ok(())
    }

    async fn drain(&self) -> Result<(), SinkError> {
        // Each publish awaited its own confirm; nothing is outstanding once the ingress drained.
        let _ = self.stop.send(true);
        let link = self.shared.link.write().ok().and_then(|mut l| l.take());
        if let Some(link) = link {
            let _ = link
                .channel
                .close(200, "flexbridge shutting down".into())
                .await;
            link.connection
                .close(200, "flexbridge shutting down".into())
                .await
                .map_err(|e| lapin_error("close_failed", e))?;
        }
        Ok(())
    }
}

/// Keeps a link: connect, confirm_select, topology; wait until it breaks; back off; repeat.
async fn maintain(
    config: RabbitMqSinkConfig,
    shared: Arc<Shared>,
    metrics: SinkMetrics,
    mut stop: watch::Receiver<bool>,
    first_attempt: watch::Sender<bool>,
) {
    // Capped at 2 s: a reconnect attempt is cheap, and a webhook waits for it (at most
    // `delivery.ack_timeout`), so a broker back after a blip must be found quickly.
    let backoff = match Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 2.0, 0.5) {
        Ok(backoff) => backoff,
        Err(_) => return,
    };
    let uri = redact_url(config.uri.expose());
    let mut failures = 0u32;
    let failure_log = FailureLog::new(config.name.clone());
    let mut connected_before = false;
    loop {
        match tokio::time::timeout(config.connect_timeout, establish(&config)).await {
            Ok(Ok((link, topology))) => {
                failures = 0;
                failure_log.success();
                if connected_before {
                    metrics.reconnections.inc();
                }
                connected_before = true;
                let link = Arc::new(link);
                if let Ok(mut slot) = shared.link.write() {
                    *slot = Some(Arc::clone(&link));
                }
                set_problem(&shared, topology.clone());
                match &topology {
                    None => {
                        tracing::info!(sink = %config.name, uri = %uri, exchange = %config.exchange, "connected to RabbitMQ; publisher confirms on")
                    }
                    Some(problem) => {
                        tracing::error!(sink = %config.name, error = %problem.message, "RabbitMQ topology is not usable")
                    }
                }
                let _ = first_attempt.send(true);
                // Wait until the link breaks (or a publish says it did), or shutdown.
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        () = shared.broken.notified() => {}
                        () = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                    if !link.connection.status().connected() || !link.channel.status().connected() {
                        break;
                    }
                    if topology.is_some() {
                        // Re-check the topology from time to time: someone may create it.
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        break;
                    }
                }
                if let Ok(mut slot) = shared.link.write() {
                    *slot = None;
                }
                if topology.is_none() {
                    tracing::warn!(sink = %config.name, "lost the RabbitMQ connection or channel; reconnecting");
                    set_problem(
                        &shared,
                        Some(SinkErrorInfo {
                            retry: Retry::Retryable,
                            reason: "disconnected",
                            message: "the RabbitMQ connection was lost; reconnecting".to_owned(),
                        }),
                    );
                }
                let _ = link.connection.close(200, "reconnecting".into()).await;
            }
            outcome => {
                let message = match outcome {
                    Ok(Err(error)) => error.to_string(),
                    _ => format!("no connection within {:?}", config.connect_timeout),
                };
                failure_log.failure(&format!("cannot connect to RabbitMQ at {uri}"), &message);
                set_problem(
                    &shared,
                    Some(SinkErrorInfo {
                        retry: Retry::Retryable,
                        reason: "disconnected",
                        message: format!("cannot connect to RabbitMQ at {uri}: {message}"),
                    }),
                );
                let _ = first_attempt.send(true);
                failures += 1;
                let delay = backoff.delay(failures, rand::random::<f64>());
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn set_problem(shared: &Shared, problem: Option<SinkErrorInfo>) {
    if let Ok(mut slot) = shared.problem.write() {
        *slot = problem;
    }
}

/// Connects, opens the confirm channel and declares or checks the topology. A topology
/// problem (the exchange is missing) keeps the link but is reported as a permanent error.
async fn establish(
    config: &RabbitMqSinkConfig,
) -> Result<(Link, Option<SinkErrorInfo>), lapin::Error> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("flexbridge {}", config.name).into());
    let connection = match &config.tls.ca_file {
        None => Connection::connect(&config.connect_uri(), properties).await?,
        Some(ca_file) => {
            let cert_chain = std::fs::read_to_string(ca_file).map_err(|e| {
                lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(
                    std::io::Error::new(
                        e.kind(),
                        format!("tls.ca_file {}: {e}", ca_file.display()),
                    ),
                )))
            })?;
            let tls = lapin::tcp::OwnedTLSConfig {
                identity: None,
                cert_chain: Some(cert_chain),
            };
            Connection::connect_with_config(
                &config.connect_uri(),
                properties,
                tls,
                lapin::runtime::default_runtime()?,
            )
            .await?
        }
    };
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let problem = if config.exchange.is_empty() {
        None
    } else {
        // A failed passive declare closes its channel: use a throwaway one.
        let setup = connection.create_channel().await?;
        let outcome = declare(&setup, config).await;
        let _ = setup.close(200, "topology done".into()).await;
        match outcome {
            Ok(()) => None,
            Err(error) if config.declare.is_none() => Some(SinkErrorInfo {
                retry: Retry::Permanent,
                reason: "exchange_missing",
                message: format!(
                    "exchange {:?} does not exist on RabbitMQ ({error}): create it, or let flexbridge declare it with the sink's `declare` settings",
                    config.exchange
                ),
            }),
            Err(error) => Some(SinkErrorInfo {
                retry: Retry::Permanent,
                reason: "topology",
                message: format!("declaring the topology failed: {error}"),
            }),
        }
    };
    Ok((
        Link {
            connection,
            channel,
        },
        problem,
    ))
}

async fn declare(channel: &Channel, config: &RabbitMqSinkConfig) -> Result<(), lapin::Error> {
    let exchange: ShortString = config.exchange.as_str().into();
    let Some(declare) = &config.declare else {
        return channel
            .exchange_declare(
                exchange,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
    };
    let kind = match declare.exchange_type.as_str() {
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "headers" => ExchangeKind::Headers,
        _ => ExchangeKind::Topic,
    };
    channel
        .exchange_declare(
            exchange.clone(),
            kind,
            ExchangeDeclareOptions {
                durable: declare.durable,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for queue in &declare.queues {
        let mut arguments = FieldTable::default();
        for (name, value) in &queue.arguments {
            let value = match value {
                Argument::Bool(b) => AMQPValue::Boolean(*b),
                Argument::Int(i) => AMQPValue::LongLongInt(*i),
                Argument::Text(t) => AMQPValue::LongString(t.as_str().into()),
            };
            arguments.insert(name.as_str().into(), value);
        }
        channel
            .queue_declare(
                queue.name.as_str().into(),
                QueueDeclareOptions {
                    durable: queue.durable,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await?;
        for binding in &queue.bindings {
            channel
                .queue_bind(
                    queue.name.as_str().into(),
                    exchange.clone(),
                    binding.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever a parameter holds, it stays one word of the routing key (no `.`, white
        /// space or control character), so topic-exchange bindings cannot be fooled.
        #[test]
        fn every_value_stays_one_routing_key_word(value in "\\PC{0,40}|[ .\t]{0,4}") {
            let mut out = String::new();
            routing_key_value(&value, &mut out);
            proptest::prop_assert!(!out.contains('.') && !out.chars().any(|c| c.is_whitespace() || c.is_control()), "{out:?}");
        }
    }

    #[test]
    fn the_heartbeat_goes_into_the_uri_unless_it_names_one() {
        let mut c: RabbitMqSinkConfig = serde_json::from_value(
            serde_json::json!({"name": "r", "uri": "amqp://u:p@h:5672/%2f"}),
        )
        .unwrap();
        assert_eq!(c.connect_uri(), "amqp://u:p@h:5672/%2f?heartbeat=10");
        c.uri = flexbridge_core::Secret::new("amqp://h/%2f?frame_max=8192");
        assert_eq!(c.connect_uri(), "amqp://h/%2f?frame_max=8192&heartbeat=10");
        c.uri = flexbridge_core::Secret::new("amqp://h/%2f?heartbeat=3");
        assert_eq!(c.connect_uri(), "amqp://h/%2f?heartbeat=3");
        c.heartbeat = Duration::ZERO;
        c.uri = flexbridge_core::Secret::new("amqp://h/%2f");
        assert_eq!(c.connect_uri(), "amqp://h/%2f");
    }

    #[test]
    fn routing_key_values_keep_their_word() {
        let mut out = String::new();
        routing_key_value("a.b c", &mut out);
        assert_eq!(out, "a_b_c");
    }
}
