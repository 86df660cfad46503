//! Wiring: sinks, delivery, ingress and admin listeners, health loop, graceful shutdown.

use crate::admin::{self, AdminState};
use crate::config::{AppConfig, SinkConfig};
use anyhow::Context as _;
use flexbridge_core::metrics::Metrics;
use flexbridge_core::{Delivery, DeliveryMode, Intake, Sink, SinkContext};
use flexbridge_ingress::Ingress;
use flexbridge_spool::{Runner, Spool};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A started daemon.
pub struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Opens every configured sink. A broker that is down is not an error here, and nothing
/// waits for a connection: each sink connects in the background, reports unhealthy until it
/// is connected, and a publish meanwhile is retried within `delivery.ack_timeout`.
pub async fn open_sinks(
    config: &AppConfig,
    metrics: &Metrics,
) -> anyhow::Result<Vec<Arc<dyn Sink>>> {
    let limits = config.limits();
    let mut sinks = Vec::with_capacity(config.sinks.len());
    for sink in &config.sinks {
        let context = SinkContext::new(metrics, sink.name());
        sinks.push(
            sink.open(&limits, &context)
                .await
                .with_context(|| format!("sink {}", sink.name()))?,
        );
    }
    Ok(sinks)
}

/// Binds the configured addresses and starts.
pub async fn start(config: AppConfig) -> anyhow::Result<Running> {
    let ingress = TcpListener::bind(config.ingress.listen)
        .await
        .with_context(|| format!("cannot bind ingress.listen {}", config.ingress.listen))?;
    let admin = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot bind admin.listen {}", config.admin.listen))?;
    start_on(config, ingress, admin).await
}

/// Starts on listeners the caller bound (the demo binds random ports first).
pub async fn start_on(
    config: AppConfig,
    ingress_listener: TcpListener,
    admin_listener: TcpListener,
) -> anyhow::Result<Running> {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).context("registering metrics")?;
    // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .context("registering the process metrics")?;
    let verification = if config.twilio.verify_signatures {
        "enabled"
    } else {
        tracing::warn!("signature verification is DISABLED (twilio.verify_signatures = false): anyone who can reach the listener can inject events");
        "disabled"
    };
    metrics
        .info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), verification])
        .set(1);
    if config.ingress.public_url.is_none() && !config.ingress.trust_forwarded_headers {
        tracing::warn!("ingress.public_url is not set: the signed URL is rebuilt from the Host header as http://, which fails behind a TLS proxy");
    }
    let sinks = open_sinks(&config, &metrics).await?;
    let delivery = Arc::new(Delivery::new(sinks, &config.delivery, &metrics).map_err(
        |errors| {
            let errors: Vec<String> = errors.iter().map(|e| format!("delivery: {e}")).collect();
            anyhow::anyhow!("{}", errors.join("; "))
        },
    )?);
    // Spool mode: the webhook is answered once the event is durable on local disk; the runner
    // delivers to the sinks in the background.
    let spooling = match config.delivery.mode {
        DeliveryMode::Confirm => None,
        DeliveryMode::Spool => {
            let names = delivery.sinks().map(|s| s.name().to_owned()).collect();
            let spool =
                Spool::open(&config.spool, names, &registry).context("opening the spool")?;
            let runner = Arc::new(Runner::start(
                Arc::clone(&spool),
                Arc::clone(&delivery),
                config.spool.lanes,
            ));
            tracing::info!(dir = %config.spool.dir.display(), max_bytes = config.spool.max_bytes, "spool mode: webhooks are acknowledged once durable in the spool");
            Some((spool, runner))
        }
    };
    let intake: Arc<dyn Intake> = match &spooling {
        Some((spool, _)) => Arc::clone(spool) as Arc<dyn Intake>,
        None => Arc::clone(&delivery) as Arc<dyn Intake>,
    };
    let ingress = Arc::new(Ingress::new(
        config.ingress.clone(),
        &config.twilio,
        intake,
        metrics,
    )?);
    let ingress_addr = ingress_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let state = Arc::new(
        AdminState::new(
            registry,
            Arc::clone(&delivery),
            spooling
                .as_ref()
                .map(|(spool, runner)| (Arc::clone(spool), Arc::clone(runner))),
        )
        .context("registering the admin metrics")?,
    );
    let (stop, stopped) = watch::channel(false);
    let (finished, admin_until) = watch::channel(false);
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&state),
        config.admin.clone(),
        admin_until,
    ));
    tokio::spawn(admin::health_loop(
        Arc::clone(&state),
        config.admin.health_interval,
        config.admin.health_timeout,
        stopped.clone(),
    ));
    tracing::info!(
        ingress = %ingress_addr,
        path = %config.ingress.path,
        admin = %admin_addr,
        sinks = ?config.sinks.iter().map(SinkConfig::name).collect::<Vec<_>>(),
        signature_verification = verification,
        "flexbridge is listening"
    );

    let shutdown = config.shutdown.clone();
    let spool_dir = config.spool.dir.clone();
    let task = tokio::spawn(async move {
        let mut signal = stopped.clone();
        let stop_requested = async move {
            let _ = signal.wait_for(|stop| *stop).await;
        };
        let draining_ingress = Arc::clone(&ingress);
        let serving = Arc::clone(&ingress).serve(
            ingress_listener,
            async move {
                stop_requested.await;
                state.draining.store(true, Ordering::SeqCst);
                // Keep-alive clients are told to leave while the load balancer catches up.
                draining_ingress.begin_drain();
                tracing::info!("shutting down: readiness is now false");
                tokio::time::sleep(shutdown.readiness_delay).await;
            },
            shutdown.grace_period,
        );
        let all_finished = serving.await;
        let mut failed = false;
        if let Some((spool, runner)) = spooling {
            // Keep delivering the backlog for a while; what is left stays on disk.
            if !runner.drain(shutdown.drain_timeout).await {
                failed = true;
                tracing::warn!(dir = %spool_dir.display(), "spool: events not yet delivered to every sink stay in the spool and are delivered after the next start");
            }
            spool.close();
        }
        for (sink, result) in delivery.drain(shutdown.drain_timeout).await {
            match result {
                Ok(()) => tracing::info!(sink, "sink drained"),
                Err(error) => {
                    failed = true;
                    tracing::error!(sink, %error, "sink did not drain cleanly");
                }
            }
        }
        let _ = finished.send(true);
        if !all_finished || failed {
            tracing::warn!("shutdown finished with requests cut or sinks not drained");
        } else {
            tracing::info!("shutdown complete");
        }
        Ok(())
    });
    Ok(Running { stop, task })
}

impl Running {
    /// Stops accepting, finishes in-flight requests, drains the sinks.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await.context("the daemon task failed")?
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn termination_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
