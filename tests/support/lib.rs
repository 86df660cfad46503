//! Helpers for end-to-end tests: start the real `flexbridge` binary, talk raw HTTP/1.1 to it,
//! sign requests as Twilio does, read its JSON logs and metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use flexbridge_ingress::form::encode as form_encode;
pub use flexbridge_ingress::signature::{body_sha256, sign, Algorithm};

/// The `flexbridge` binary built alongside these tests (or `FLEXBRIDGE_BIN`).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FLEXBRIDGE_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test> -> target/<profile>/flexbridge
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join("flexbridge");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p flexbridge` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// A name no other test or run uses (streams, exchanges, queues).
pub fn unique(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}{}x{nanos:x}x{n}", std::process::id())
}

/// Runs `flexbridge simulate` against `daemon` and returns its JSON summary.
pub fn simulate(
    daemon: &Daemon,
    path: &str,
    token: &str,
    count: u32,
    extra: &[&str],
) -> serde_json::Value {
    let count = count.to_string();
    let mut args = vec!["--count", count.as_str()];
    args.extend_from_slice(extra);
    simulate_with(&daemon.url(path), token, &args)
}

/// Runs `flexbridge simulate --url URL` with these arguments and returns its JSON summary.
pub fn simulate_with(url: &str, token: &str, args: &[&str]) -> serde_json::Value {
    let output = Command::new(binary())
        .args(["simulate", "--url", url, "--auth-token", token])
        .args(["--json-summary", "--no-progress"])
        .args(args)
        .output()
        .unwrap();
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The testkit's TCP proxy in front of `upstream` (`host:port`), on a runtime of its own so
/// that blocking tests can cut and restore it.
pub struct Proxy {
    target: ProxyTarget,
    _runtime: tokio::runtime::Runtime,
}

enum ProxyTarget {
    Plain(flexbridge_testkit::TcpProxy),
    /// A Kafka-protocol broker of its own that advertises the proxy.
    Kafka(flexbridge_testkit::ProxiedBroker),
}

fn proxy_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

impl Proxy {
    /// Starts proxying to `upstream`.
    pub fn start(upstream: &str) -> Self {
        use std::net::ToSocketAddrs;
        let upstream = upstream.to_socket_addrs().unwrap().next().unwrap();
        let runtime = proxy_runtime();
        let proxy = runtime.block_on(flexbridge_testkit::TcpProxy::start(upstream));
        Self {
            target: ProxyTarget::Plain(proxy),
            _runtime: runtime,
        }
    }

    /// Starts a Kafka-protocol broker (tansu) of its own behind a proxy: every connection
    /// the client makes goes through the proxy. Stopped when dropped.
    pub fn kafka() -> Self {
        let runtime = proxy_runtime();
        let broker = runtime.block_on(flexbridge_testkit::ProxiedBroker::start());
        Self {
            target: ProxyTarget::Kafka(broker),
            _runtime: runtime,
        }
    }

    /// The proxy, to cut, blackhole, delay or restore.
    pub fn tcp(&self) -> &flexbridge_testkit::TcpProxy {
        match &self.target {
            ProxyTarget::Plain(proxy) => proxy,
            ProxyTarget::Kafka(broker) => &broker.proxy,
        }
    }

    /// `host:port` of the proxy.
    pub fn addr(&self) -> String {
        self.tcp().addr.to_string()
    }
}

/// `host:port` of a broker URL such as `amqp://user:pw@host:5672/%2f` or `nats://host:4222`.
pub fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split('/').next().unwrap_or(rest);
    rest.rsplit_once('@').map_or(rest, |(_, host)| host)
}

/// How the proxy breaks the broker connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every connection closed, new ones refused (a reset).
    Cut,
    /// Every byte dropped, nothing closed (no FIN, no RST).
    Blackhole,
}

/// Steady signed traffic (`rate` requests per second for `duration`, eight connections) while
/// the proxy cuts every broker connection from `cut_at` for `cut_for`; returns the simulator's
/// summary.
pub fn traffic_through_cut(
    daemon: &Daemon,
    path: &str,
    token: &str,
    proxy: &Proxy,
    load: (Duration, u32),
    window: (Duration, Duration),
) -> serde_json::Value {
    traffic_through_fault(daemon, path, token, proxy, load, window, Fault::Cut)
}

/// Like [`traffic_through_cut`], with the fault chosen.
pub fn traffic_through_fault(
    daemon: &Daemon,
    path: &str,
    token: &str,
    proxy: &Proxy,
    (duration, rate): (Duration, u32),
    (cut_at, cut_for): (Duration, Duration),
    fault: Fault,
) -> serde_json::Value {
    let url = daemon.url(path);
    let token = token.to_owned();
    let secs = format!("{}ms", duration.as_millis());
    let traffic = std::thread::spawn(move || {
        simulate_with(
            &url,
            &token,
            &[
                "--duration",
                &secs,
                "--rate",
                &rate.to_string(),
                "--concurrency",
                "8",
            ],
        )
    });
    std::thread::sleep(cut_at);
    match fault {
        Fault::Cut => proxy.tcp().cut(),
        Fault::Blackhole => proxy.tcp().blackhole(),
    }
    std::thread::sleep(cut_for);
    proxy.tcp().restore();
    traffic.join().unwrap()
}

/// Waits until `/readyz` answers 200 (at most 15 s).
pub fn wait_ready(daemon: &Daemon) {
    let started = Instant::now();
    while get(daemon.admin, "/readyz").status != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not ready: {}",
            get(daemon.admin, "/readyz").text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Owned parameters from literals.
pub fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A running daemon; killed when dropped.
pub struct Daemon {
    child: Child,
    /// The webhook listener.
    pub ingress: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Holds the config file (and anything else a test puts there).
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `flexbridge run` with this TOML config (listen addresses are set to random ports
    /// unless the config sets them) and waits until it listens.
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = config.replace("{dir}", dir.path().to_str().unwrap());
        let mut full = String::new();
        if !config.contains("[ingress]") {
            full.push_str("[ingress]\nlisten = \"127.0.0.1:0\"\n");
        }
        if !config.contains("[admin]") {
            full.push_str("[admin]\nlisten = \"127.0.0.1:0\"\nhealth_interval = \"200ms\"\n");
        }
        full.push_str(&config);
        let path = dir.path().join("flexbridge.toml");
        std::fs::write(&path, full).unwrap();
        let mut child = Command::new(binary())
            .args([
                "--log-format",
                "json",
                "--log-level",
                "debug,hyper=info",
                "run",
                "--config",
            ])
            .arg(&path)
            .env_remove("TWILIO_AUTH_TOKEN")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                sink.lock().unwrap().push(value);
            }
        });
        let started = Instant::now();
        loop {
            let listening = logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| l["message"] == "flexbridge is listening")
                .cloned();
            if let Some(line) = listening {
                let ingress = line["ingress"].as_str().unwrap().parse().unwrap();
                let admin = line["admin"].as_str().unwrap().parse().unwrap();
                return Self {
                    child,
                    ingress,
                    admin,
                    logs,
                    dir,
                };
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "flexbridge exited with {status} before listening: {:#?}",
                    logs.lock().unwrap()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "flexbridge did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The signed URL for a path on this daemon (public_url is not set, so Host is used).
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.ingress)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors and resident memory (KiB) of the daemon, from /proc.
    pub fn fds_and_rss_kib(&self) -> (usize, u64) {
        let pid = self.pid();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0);
        (fds, rss)
    }

    /// Log lines so far.
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits up to 5 s for a log line matching `predicate`.
    pub fn wait_for_log(
        &self,
        what: &str,
        predicate: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let started = Instant::now();
        loop {
            if let Some(line) = self.logs().into_iter().find(&predicate) {
                return line;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no log line {what}; logs: {:#?}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of a metric sample, e.g. `flexbridge_http_requests_total{status="200"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = get(self.admin, "/metrics").text();
        text.lines()
            .find_map(|line| {
                line.strip_prefix(sample)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    /// The process's peak resident memory (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(started.elapsed() < limit, "flexbridge did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response, read by the simulator's HTTP/1.1 parser (the one the load generator uses).
#[derive(Debug)]
pub struct Response(pub flexbridge_simulate::Answer);

impl std::ops::Deref for Response {
    type Target = flexbridge_simulate::Answer;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Response {
    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

/// Sends raw bytes (a whole request with `Connection: close`) and reads the response.
pub fn raw(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream.write_all(request).unwrap();
    read_response(&mut stream)
}

/// Reads one response from a stream.
pub fn read_response(stream: &mut TcpStream) -> Response {
    Response(flexbridge_simulate::read_answer(stream).unwrap_or_else(|e| panic!("{e}")))
}

/// A request to send: method, path, headers, body.
pub struct Req {
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Req {
    /// The request as bytes, with Host, Content-Length and `Connection: close`.
    pub fn bytes(&self, host: SocketAddr) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n",
            self.method, self.path
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if !self.body.is_empty() || self.method == "POST" {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn send(&self, addr: SocketAddr) -> Response {
        raw(addr, &self.bytes(addr))
    }
}

/// A form POST signed with an Auth Token for `daemon`'s URL.
pub fn signed_form(daemon: &Daemon, path: &str, token: &str, params: &[(String, String)]) -> Req {
    let signature = sign(Algorithm::HmacSha1, token, &daemon.url(path), params);
    Req {
        method: "POST",
        path: path.to_owned(),
        headers: vec![
            (
                "Content-Type".into(),
                "application/x-www-form-urlencoded".into(),
            ),
            ("X-Twilio-Signature".into(), signature),
        ],
        body: form_encode(params).into_bytes(),
    }
}

/// A GET with the parameters in the query, signed over the URL.
pub fn signed_get(daemon: &Daemon, path: &str, token: &str, params: &[(String, String)]) -> Req {
    let path = format!("{path}?{}", form_encode(params));
    let signature = sign(Algorithm::HmacSha1, token, &daemon.url(&path), &[]);
    Req {
        method: "GET",
        path,
        headers: vec![("X-Twilio-Signature".into(), signature)],
        body: Vec::new(),
    }
}

/// A JSON POST with bodySHA256 in the query, signed over the URL.
pub fn signed_json(daemon: &Daemon, path: &str, token: &str, body: &[u8]) -> Req {
    let path = format!("{path}?bodySHA256={}", body_sha256(body));
    let signature = sign(Algorithm::HmacSha1, token, &daemon.url(&path), &[]);
    Req {
        method: "POST",
        path,
        headers: vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-Twilio-Signature".into(), signature),
        ],
        body: body.to_vec(),
    }
}

/// GET on the admin or ingress listener.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    Req {
        method: "GET",
        path: path.to_owned(),
        headers: vec![],
        body: vec![],
    }
    .send(addr)
}

/// Lines of a JSON-lines file (empty if missing).
pub fn read_events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A documented onChannelStatusUpdated webhook.
pub fn status_updated(interaction: &str, status: &str) -> Vec<(String, String)> {
    params(&[
        ("EventType", "onChannelStatusUpdated"),
        ("AccountSid", "AC00000000000000000000000000000000"),
        ("InstanceSid", "GO00000000000000000000000000000000"),
        ("InteractionSid", interaction),
        ("ChannelSid", "UO00000000000000000000000000000000"),
        ("MediaChannelSid", "CH00000000000000000000000000000000"),
        ("ChannelStatus", status),
        ("MediaChannelType", "sms"),
    ])
}

/// RabbitMQ (`FLEXBRIDGE_AMQP_URL`, default the local broker).
pub fn amqp_url() -> String {
    std::env::var("FLEXBRIDGE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Reads every message of `queue` (message ids), then deletes the queue and the exchange.
pub fn drain_and_delete(exchange: &str, queue: &str) -> Vec<String> {
    drain_and_delete_at(&amqp_url(), exchange, queue)
}

/// [`drain_and_delete`] on the broker at `url`.
pub fn drain_and_delete_at(url: &str, exchange: &str, queue: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let mut ids = Vec::new();
        while let Some(m) = match queue {
            "" => None,
            queue => channel
                .basic_get(
                    queue.into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap(),
        } {
            ids.push(
                m.delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .unwrap()
                    .to_string(),
            );
        }
        let _ = channel
            .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await;
        let _ = channel
            .exchange_delete(
                exchange.into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
        ids
    })
}

/// NATS (`FLEXBRIDGE_NATS_URL`, default the local server).
pub fn nats_url() -> String {
    std::env::var("FLEXBRIDGE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Every message of a stream: (Nats-Msg-Id, subject). Deletes the stream afterwards.
pub fn drain_stream(name: &str) -> Vec<(String, String)> {
    runtime().block_on(async {
        let client = async_nats::connect(nats_url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(name).await.unwrap();
        let count = stream.info().await.unwrap().state.messages;
        let mut out = Vec::new();
        for seq in 1..=count {
            let m = stream.get_raw_message(seq).await.unwrap();
            let id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned();
            out.push((id, m.subject.to_string()));
        }
        js.delete_stream(name).await.unwrap();
        out
    })
}

/// Declares `queue` (not durable) bound to `exchange` with `key`: the route a test adds later.
pub fn bind_queue(exchange: &str, queue: &str, key: &str) {
    runtime().block_on(async {
        let connection =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                lapin::options::QueueBindOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
    });
}

/// Runs `flexbridge` with these arguments; returns (exit code, stdout, stderr).
pub fn flexbridge(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(binary()).args(args).output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits until the spool has delivered everything to `sink` (at most `limit`).
pub fn wait_delivered(daemon: &Daemon, sink: &str, limit: Duration) {
    let started = Instant::now();
    let sample = format!("flexbridge_spool_depth{{sink=\"{sink}\"}}");
    while daemon.metric(&sample) > 0.0 {
        assert!(
            started.elapsed() < limit,
            "the spool still holds {} events for {sink}",
            daemon.metric(&sample)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Spool mode through an outage: 30 s of `fault` under 40 requests a second; every request
/// must get 200, and the spool must deliver everything to `sink` afterwards. Returns how many
/// were acknowledged (the caller counts them in its broker).
pub fn spool_through_outage(
    daemon: &Daemon,
    path: &str,
    token: &str,
    proxy: &Proxy,
    sink: &str,
    fault: Fault,
) -> u64 {
    let summary = traffic_through_fault(
        daemon,
        path,
        token,
        proxy,
        (Duration::from_secs(34), 40),
        (Duration::from_secs(2), Duration::from_secs(30)),
        fault,
    );
    let sent = summary["sent"].as_u64().unwrap();
    assert!(sent >= 1000, "{summary}");
    assert_eq!(summary["status"]["200"], sent, "{summary}");
    wait_delivered(daemon, sink, Duration::from_secs(120));
    sent
}

/// Confirm mode through a 2 s cut under 100 requests a second: the retries ride it out, no
/// request gets a 503. Returns how many were acknowledged.
pub fn confirm_through_a_short_cut(daemon: &Daemon, path: &str, token: &str, proxy: &Proxy) -> u64 {
    let summary = traffic_through_cut(
        daemon,
        path,
        token,
        proxy,
        (Duration::from_secs(6), 100),
        (Duration::from_millis(1500), Duration::from_secs(2)),
    );
    let sent = summary["sent"].as_u64().unwrap();
    assert!(sent >= 300, "{summary}");
    assert_eq!(summary["status"]["200"], sent, "{summary}");
    sent
}

/// Steady signed traffic (50 req/s for 12 s) to `daemon` while the broker is stopped 3 s in
/// (`broker(false)`) and started 3 s later (`broker(true)`): a real broker restart. Checks
/// that every webhook got 200 and returns how many were sent.
pub fn traffic_through_restart(
    daemon: &Daemon,
    path: &str,
    token: &str,
    mut broker: impl FnMut(bool),
) -> u64 {
    let (target, token) = (daemon.url(path), token.to_owned());
    let traffic = std::thread::spawn(move || {
        simulate_with(
            &target,
            &token,
            &["--duration", "12s", "--rate", "50", "--concurrency", "16"],
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    broker(false);
    std::thread::sleep(Duration::from_secs(3));
    broker(true);
    let summary = traffic.join().unwrap();
    let sent = summary["sent"].as_u64().unwrap();
    assert!(sent >= 400, "{summary}");
    assert_eq!(summary["status"]["200"], sent, "{summary}");
    sent
}
