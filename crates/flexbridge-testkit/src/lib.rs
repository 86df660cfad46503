//! Test helpers shared by the sink crates' integration tests: events of every type, and an
//! in-test TCP proxy that can cut connections or delay traffic between flexbridge and a real
//! broker (fault injection a real broker cannot give on demand); and the load loop of the
//! plain-client ceilings the bench measures beside flexbridge (`ceiling`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a panic is the report

pub mod ceiling;

use flexbridge_core::{normalize, Attestation, Event, EventKind, Sink, Verified, WebhookRequest};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A unique suffix for broker objects (streams, exchanges, queues, topics) of one test.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}{}x{nanos:x}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// One event of the given kind (unknown kinds get `onSomethingNew`), with every parameter its
/// type documents, a per-call interaction SID and a unique idempotency token.
pub fn event(kind: EventKind, n: u32) -> Event {
    let interaction = format!("KD{n:032x}");
    let mut params: Vec<(&str, String)> = vec![
        (
            "EventType",
            kind.twilio_name().unwrap_or("onSomethingNew").to_owned(),
        ),
        (
            "AccountSid",
            "AC0123456789abcdef0123456789abcdef".to_owned(),
        ),
        (
            "InstanceSid",
            "GO0123456789abcdef0123456789abcdef".to_owned(),
        ),
        ("InteractionSid", interaction),
        (
            "MediaChannelSid",
            "CH0123456789abcdef0123456789abcdef".to_owned(),
        ),
        ("MediaChannelType", "whatsapp".to_owned()),
    ];
    match kind {
        EventKind::ChannelCreated => {
            params.push(("ChannelSid", "UO0123456789abcdef0123456789abcdef".into()))
        }
        EventKind::ChannelCreateFailed => {
            params.push(("ErrorCode", "45001".into()));
            params.push((
                "ErrorMessage",
                "Downstream failure: 100% \"broken\" ñ".into(),
            ));
        }
        EventKind::ChannelStatusUpdated => params.push(("ChannelStatus", "inactive".into())),
        EventKind::ParticipantJoined
        | EventKind::ParticipantLeft
        | EventKind::ParticipantUpdated => {
            params.push((
                "ParticipantSid",
                "UT0123456789abcdef0123456789abcdef".into(),
            ));
            params.push(("ParticipantType", "agent".into()));
            params.push(("TaskSid", "WT0123456789abcdef0123456789abcdef".into()));
        }
        EventKind::InteractionCreated | EventKind::Unknown => {
            params.push(("Extra Param", "a b".into()))
        }
    }
    let request = WebhookRequest {
        params: params.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        idempotency_token: Some(unique("idem-")),
        received_at: SystemTime::now(),
    };
    normalize(Verified::attest(request, Attestation::AuthToken)).unwrap()
}

/// One event of every kind.
pub fn every_kind() -> Vec<Event> {
    EventKind::ALL
        .iter()
        .enumerate()
        .map(|(n, kind)| event(*kind, n as u32))
        .collect()
}

/// A one-shot timer with the kernel's precision. tokio's timer counts whole milliseconds and
/// rounds a deadline up, so a chunk held "until now" waited about a millisecond and a 5 ms
/// delay became 6-7 ms; the bench's delay rows measure what they say only with this.
struct PreciseTimer(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl PreciseTimer {
    fn new() -> Self {
        use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .expect("timerfd_create");
        // `new` is deprecated for types whose descriptor could change under tokio; an
        // `OwnedFd`'s cannot, and its replacement, `register`, is `unsafe`, which this
        // workspace forbids.
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::new(fd).expect("register the timerfd with tokio");
        Self(fd)
    }

    /// Returns at `at` (at once if it has passed).
    async fn sleep_until(&self, at: std::time::Instant) {
        use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags, Timespec};
        let left = at.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        let value = Timespec::try_from(left).expect("a delay fits a timespec");
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // Arming resets the count of expirations, so an earlier, abandoned wait cannot end
        // this one early.
        timerfd_settime(
            self.0.get_ref(),
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: zero,
                it_value: value,
            },
        )
        .expect("timerfd_settime");
        loop {
            let mut ready = self.0.readable().await.expect("timerfd readiness");
            let mut expirations = [0u8; 8];
            match rustix::io::read(ready.get_inner(), &mut expirations) {
                Ok(_) => return,
                Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                Err(error) => panic!("reading the timerfd: {error}"),
            }
        }
    }
}

/// Copies one direction until either side closes or the proxy cuts. With `delay` (in
/// microseconds), each chunk is written `delay` after it was read (latency, not a gap
/// between chunks); with `counted`, the bytes read are added to it.
async fn pipe(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<u64>,
    delay: Option<Arc<AtomicU64>>,
    blackhole: Arc<AtomicBool>,
    counted: Option<Arc<AtomicU64>>,
) {
    let (chunks, mut due) = tokio::sync::mpsc::unbounded_channel::<(std::time::Instant, Vec<u8>)>();
    let mut cut_writer = cut.clone();
    let writing = tokio::spawn(async move {
        let timer = PreciseTimer::new();
        // Nothing crosses a cut connection, not even a chunk held back by the delay: the
        // cut is checked first and ends the wait.
        loop {
            let next = tokio::select! {
                biased;
                _ = cut_writer.changed() => None,
                next = due.recv() => next,
            };
            let Some((at, chunk)) = next else { break };
            tokio::select! {
                biased;
                _ = cut_writer.changed() => break,
                () = timer.sleep_until(at) => {}
            }
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            n = reader.read(&mut buf) => match n { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = cut.changed() => break,
        };
        if let Some(counted) = &counted {
            counted.fetch_add(n as u64, Ordering::SeqCst);
        }
        if blackhole.load(Ordering::SeqCst) {
            continue; // dropped on the floor: no FIN, no RST, no data
        }
        let micros = delay.as_ref().map_or(0, |d| d.load(Ordering::SeqCst));
        let at = std::time::Instant::now() + Duration::from_micros(micros);
        if chunks.send((at, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(chunks);
    let _ = writing.await;
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`.
pub struct TcpProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    /// The delay of broker-to-client chunks, in microseconds.
    delay_us: Arc<AtomicU64>,
    blackhole: Arc<AtomicBool>,
    /// Bytes each accepted connection sent upstream, in the order they were accepted.
    sent: Arc<std::sync::Mutex<Vec<Arc<AtomicU64>>>>,
}

impl TcpProxy {
    /// Starts proxying.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let delay_us = Arc::new(AtomicU64::new(0));
        let blackhole = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (up2, cut2, delay2, hole2, sent2) = (
            Arc::clone(&up),
            cut.clone(),
            Arc::clone(&delay_us),
            Arc::clone(&blackhole),
            Arc::clone(&sent),
        );
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let counted = Arc::new(AtomicU64::new(0));
                sent2.lock().unwrap().push(Arc::clone(&counted));
                tokio::spawn(pipe(
                    cr,
                    sw,
                    cut2.subscribe(),
                    None,
                    Arc::clone(&hole2),
                    Some(counted),
                ));
                tokio::spawn(pipe(
                    sr,
                    cw,
                    cut2.subscribe(),
                    Some(Arc::clone(&delay2)),
                    Arc::clone(&hole2),
                    None,
                ));
            }
        });
        Self {
            addr,
            up,
            cut,
            delay_us,
            blackhole,
            sent,
        }
    }

    /// Bytes each connection accepted so far sent to the upstream, in the order they were
    /// accepted (closed ones included).
    pub fn bytes_sent_upstream(&self) -> Vec<u64> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .collect()
    }

    /// Closes every open connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Accepts connections again and forwards bytes again.
    pub fn restore(&self) {
        self.blackhole.store(false, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
    }

    /// Drops every byte in both directions, on open and new connections, without closing
    /// anything: a dead NAT entry or a node lost without a reset, until [`TcpProxy::restore`].
    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }

    /// Delays every chunk from the broker to the client (acks, confirms) by `delay`.
    pub fn delay_responses(&self, delay: Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.delay_us.store(micros, Ordering::SeqCst);
    }
}

/// The sink contract under a proxy that adds 200 ms to every broker-to-client packet: 50
/// concurrent publishes must all succeed within 2 s, which a pipelining sink does in about
/// one delay and a serializing one cannot (it needs 50 of them).
pub async fn assert_publishes_pipelined(sink: Arc<dyn Sink>, proxy: &TcpProxy) {
    let (delay, count) = (Duration::from_millis(200), 50u32);
    proxy.delay_responses(delay);
    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..count)
        .map(|n| {
            let sink = Arc::clone(&sink);
            tokio::spawn(
                async move { sink.publish(&event(EventKind::ParticipantUpdated, n)).await },
            )
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    proxy.delay_responses(Duration::ZERO);
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "{count} publishes took {elapsed:?}: serialized"
    );
}

/// A test PKI made with the `openssl` command: a CA, and a server certificate it signed for
/// `localhost` and 127.0.0.1 (an end-entity certificate, as rustls/webpki requires).
pub struct TestPki {
    /// The CA certificate (PEM): what a client trusts.
    pub ca: std::path::PathBuf,
    /// The server certificate (PEM).
    pub cert: std::path::PathBuf,
    /// The server key (PEM).
    pub key: std::path::PathBuf,
}

/// Makes a [`TestPki`] in `dir`, its files named after `name`.
pub fn test_pki(dir: &std::path::Path, name: &str) -> TestPki {
    let path = |suffix: &str| dir.join(format!("{name}-{suffix}"));
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("the openssl command");
        assert!(status.success(), "openssl {args:?} failed");
    };
    let s = |p: &std::path::PathBuf| p.to_str().expect("a UTF-8 path").to_owned();
    let (ca, ca_key) = (path("ca.pem"), path("ca.key"));
    let (cert, key, csr, ext) = (
        path("cert.pem"),
        path("key.pem"),
        path("req.csr"),
        path("ext.cnf"),
    );
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        &format!("/CN={name} test CA"),
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
    ]);
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("writing the extensions file");
    run(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&cert),
    ]);
    TestPki { ca, cert, key }
}

/// Open-loop pacing for the plain-client ceilings: the n-th publish, counted across all
/// publishers, is due at start + n / rate, which is how `flexbridge simulate --rate` paces
/// webhooks, so a ceiling's half-load latency compares with a sink row's.
pub struct Pacer {
    started: tokio::time::Instant,
    rate: Option<f64>,
    claimed: AtomicU64,
}

impl Pacer {
    /// Paces at `rate` per second; `None` (or a rate that is not positive) sends at once.
    pub fn new(rate: Option<f64>) -> Self {
        Self {
            started: tokio::time::Instant::now(),
            rate: rate.filter(|r| *r > 0.0),
            claimed: AtomicU64::new(0),
        }
    }

    /// Waits until the next publish is due.
    pub async fn turn(&self) {
        let seq = self.claimed.fetch_add(1, Ordering::Relaxed);
        if let Some(rate) = self.rate {
            tokio::time::sleep_until(self.started + Duration::from_secs_f64(seq as f64 / rate))
                .await;
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until something accepts connections on 127.0.0.1:`port` (at most 10 s).
pub fn wait_for_port(port: u16) {
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "nothing listens on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sink contract for a link that goes silent (a dead NAT entry, a node lost without a
/// reset: bytes dropped, no FIN): with a keep-alive `period` (RabbitMQ heartbeat, NATS ping
/// interval), the sink's health turns unhealthy within two periods plus a margin for the
/// check itself, and healthy again by itself once traffic flows. Returns how long it took to
/// notice.
pub async fn silent_link_is_noticed_and_recovered(
    sink: Arc<dyn Sink>,
    proxy: &TcpProxy,
    period: Duration,
) -> Duration {
    let healthy = |sink: Arc<dyn Sink>| async move {
        matches!(
            tokio::time::timeout(Duration::from_millis(500), sink.health()).await,
            Ok(Ok(()))
        )
    };
    assert!(
        healthy(Arc::clone(&sink)).await,
        "not healthy before the fault"
    );
    proxy.blackhole();
    let started = tokio::time::Instant::now();
    let limit = period * 2 + Duration::from_secs(3);
    while healthy(Arc::clone(&sink)).await {
        assert!(
            started.elapsed() < limit,
            "a silent link went unnoticed for {:?} (keep-alive period {period:?})",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noticed = started.elapsed();
    proxy.restore();
    let restored = tokio::time::Instant::now();
    while !healthy(Arc::clone(&sink)).await {
        assert!(
            restored.elapsed() < Duration::from_secs(15),
            "not healthy again 15 s after the link came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    noticed
}

/// The sink contract when the connection is cut under load: three rounds of 40 concurrent
/// publishes, the proxy holding answers back 1 s and cutting every connection during the
/// second. Every failure must be
/// retryable, the sink must report unhealthy and then recover by itself within 15 s, and
/// later publishes must succeed. Returns the ids of the confirmed events (the caller checks
/// each is in the broker) and the number of failed publishes.
pub async fn cut_under_load_and_recover(
    sink: Arc<dyn Sink>,
    proxy: &TcpProxy,
) -> (HashSet<String>, usize) {
    let mut confirmed = HashSet::new();
    let mut failed = 0;
    for round in 0..3u32 {
        if round == 1 {
            // Acknowledgements held back, so the cut always lands while some are outstanding
            // (on a loaded machine a fast broker could otherwise confirm them all first). A
            // second, not 100 ms: a loaded CI machine once overslept the 2 ms below past that.
            proxy.delay_responses(Duration::from_secs(1));
        }
        let tasks: Vec<_> = (0..40)
            .map(|n| {
                let sink = Arc::clone(&sink);
                tokio::spawn(async move {
                    let e = event(EventKind::ChannelStatusUpdated, round * 100 + n);
                    sink.publish(&e).await.map(|()| e.id().to_owned())
                })
            })
            .collect();
        if round == 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            proxy.cut();
        }
        for task in tasks {
            match task.await.unwrap() {
                Ok(id) => {
                    confirmed.insert(id);
                }
                Err(error) => {
                    assert!(
                        error.is_retryable(),
                        "a cut connection must fail retryably: {error}"
                    );
                    failed += 1;
                }
            }
        }
        if round == 1 {
            assert!(
                sink.health().await.is_err(),
                "health must report the lost connection"
            );
            proxy.delay_responses(Duration::ZERO);
            proxy.restore();
            let started = tokio::time::Instant::now();
            while sink.health().await.is_err() {
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "the sink did not reconnect"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(failed > 0, "the cut should have failed some publishes");
    assert!(confirmed.len() >= 80, "{} confirmed", confirmed.len());
    (confirmed, failed)
}

/// A Kafka-protocol broker (tansu) of its own, in memory, that advertises the proxy in front of it: every connection
/// the client makes (bootstrap and partition leader) then goes through the proxy, which a
/// shared broker (advertising its own port) would not allow.
pub struct ProxiedBroker {
    child: std::process::Child,
    /// The proxy every connection goes through.
    pub proxy: TcpProxy,
}

impl ProxiedBroker {
    /// Starts tansu (`FLEXBRIDGE_TANSU`, else `tansu` on the PATH) behind a new proxy.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let proxy = TcpProxy::start(([127, 0, 0, 1], port).into()).await;
        let tansu = std::env::var("FLEXBRIDGE_TANSU").unwrap_or_else(|_| "tansu".to_owned());
        let child = std::process::Command::new(&tansu)
            .args(["broker", "--listener-url"])
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{}", proxy.addr))
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{tansu} must be installed (scripts/kafka.sh install): {e}")
            });
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "tansu did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, proxy }
    }

    /// The bootstrap address (the proxy).
    pub fn brokers(&self) -> String {
        self.proxy.addr.to_string()
    }
}

impl Drop for ProxiedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A RabbitMQ node of a test's own (the shared broker must not raise alarms or restart under
/// other tests): its own port, data and log directories; shut down and deleted when dropped.
/// Needs `rabbitmq-server` and `rabbitmqctl` (Debian's rabbitmq-server) and root, as CI has.
pub struct RabbitNode {
    /// Its node name, for `rabbitmqctl -n`.
    pub name: String,
    /// Its AMQP port.
    pub port: u16,
    /// The `amqps` listener, when started with a certificate.
    pub tls_port: Option<u16>,
    /// Held for its drop: the node's data and logs are deleted with it.
    _dir: tempfile::TempDir,
    process: std::process::Child,
}

impl RabbitNode {
    /// Starts a node; with `tls` (certificate, key), it also listens for `amqps`.
    pub fn start(tls: Option<(&std::path::Path, &std::path::Path)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let tls_port = tls.map(|(cert, key)| {
            let port = free_port();
            // Copied in, so the rabbitmq user can read them.
            std::fs::copy(cert, dir.path().join("cert.pem")).unwrap();
            std::fs::copy(key, dir.path().join("key.pem")).unwrap();
            std::fs::write(
                dir.path().join("rabbitmq.conf"),
                format!(
                    "listeners.ssl.default = {port}\nssl_options.certfile = {}\nssl_options.keyfile = {}\nssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n",
                    dir.path().join("cert.pem").display(),
                    dir.path().join("key.pem").display()
                ),
            )
            .unwrap();
            port
        });
        // rabbitmq-server drops to the rabbitmq user when started as root.
        let _ = std::process::Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(dir.path())
            .status();
        let (port, dist) = (free_port(), free_port());
        let name = format!("fbtest{port}@localhost");
        let path = |p: &str| dir.path().join(p);
        let process = std::process::Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_PID_FILE", path("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("plugins"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", path("feature_flags"))
            .env("RABBITMQ_QUORUM_DIR", path("quorum"))
            .env("RABBITMQ_STREAM_DIR", path("stream"))
            .env(
                "RABBITMQ_CONFIG_FILE",
                path(if tls_port.is_some() {
                    "rabbitmq.conf"
                } else {
                    "none"
                }),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rabbitmq-server");
        let node = Self {
            name,
            port,
            tls_port,
            _dir: dir,
            process,
        };
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", tls_port.unwrap_or(port))).is_err() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the private RabbitMQ node did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        node
    }

    /// Runs `rabbitmqctl -n <node> <args>`; panics when it fails.
    pub fn ctl(&self, args: &[&str]) {
        let status = std::process::Command::new("rabbitmqctl")
            .args(["-n", &self.name])
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "rabbitmqctl {args:?}");
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-n", &self.name, "shutdown"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fastest of `n` one-byte round trips through `proxy` to an echo server.
    async fn fastest_round_trip(proxy: &TcpProxy, n: usize) -> Duration {
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        client.set_nodelay(true).unwrap();
        let mut fastest = Duration::MAX;
        for _ in 0..n {
            let started = std::time::Instant::now();
            client.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            client.read_exact(&mut byte).await.unwrap();
            fastest = fastest.min(started.elapsed());
        }
        fastest
    }

    // The fastest of many round trips, not a mean: a loaded machine delays some of them,
    // but not every one. Before the timerfd, tokio's millisecond timer made the fastest
    // 1.16 ms with no delay (and a JetStream publish through a 5 ms proxy took 7.4 ms).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_delay_adds_what_it_says_and_no_delay_adds_nothing() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = echo.accept().await {
                socket.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.into_split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        let proxy = TcpProxy::start(upstream).await;
        let undelayed = fastest_round_trip(&proxy, 200).await;
        assert!(
            undelayed < Duration::from_millis(1),
            "no delay set, yet the fastest round trip took {undelayed:?}"
        );
        let delay = Duration::from_millis(5);
        proxy.delay_responses(delay);
        let delayed = fastest_round_trip(&proxy, 60).await;
        assert!(
            delayed >= delay && delayed < delay + Duration::from_micros(1500),
            "a {delay:?} delay gave a fastest round trip of {delayed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_publishes_by_the_rate_across_publishers() {
        let pacer = Arc::new(Pacer::new(Some(100.0)));
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let pacer = Arc::clone(&pacer);
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    pacer.turn().await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // 20 turns at 100/s: the last is due at 19 / 100 s.
        assert_eq!(start.elapsed(), Duration::from_millis(190));
        let unpaced = Pacer::new(None);
        let start = tokio::time::Instant::now();
        for _ in 0..20 {
            unpaced.turn().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
