//! Both listeners under abuse, against the real binary: slow headers, more idle connections
//! than allowed, oversized headers and URIs, pipelined garbage; and `/readyz` telling a
//! remote client which sink is unhealthy without its hosts or user names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flexbridge_e2e::*;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const TOKEN: &str = "abuse-token";

fn config(extra: &str) -> String {
    format!(
        "{extra}\n[twilio]\nauth_tokens = [\"{TOKEN}\"]\n\n[[sinks]]\nname = \"archive\"\ntype = \"file\"\npath = \"{{dir}}/events.jsonl\"\n"
    )
}

/// Reads until the peer closes (Ok(bytes)) or `limit` passes (Err).
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, Vec<u8>> {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(out),
            Err(_) => {}
        }
        if started.elapsed() > limit {
            return Err(out);
        }
    }
}

/// True when `/healthz` answers 200 on a fresh connection (false if it is closed unanswered).
fn healthz_answers(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let answer = read_until_closed(&mut stream, Duration::from_secs(2)).unwrap_or_default();
    answer.starts_with(b"HTTP/1.1 200")
}

#[test]
fn the_admin_listener_closes_slow_and_excess_connections() {
    let daemon = Daemon::start(&config(
        "[admin]\nlisten = \"127.0.0.1:0\"\nhealth_interval = \"200ms\"\nmax_connections = 8\nheader_read_timeout = \"1s\"\n",
    ));
    // Slowloris: half a request line, then nothing. Closed after the header timeout.
    let mut slow = TcpStream::connect(daemon.admin).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    assert!(
        read_until_closed(&mut slow, Duration::from_secs(5)).is_ok(),
        "a connection without its headers stays open"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));

    // Eight idle connections take every slot: the ninth is closed at once.
    let idle: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(daemon.admin).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut ninth = TcpStream::connect(daemon.admin).unwrap();
    let _ = ninth.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let answer = read_until_closed(&mut ninth, Duration::from_millis(900))
        .expect("the connection over the cap was not closed at once");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // The idle ones time out, and the listener answers again.
    drop(idle);
    let started = Instant::now();
    while !healthz_answers(daemon.admin) {
        assert!(started.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.metric("flexbridge_admin_connections_refused_total") >= 1.0);
    assert!(daemon.logs().iter().any(|l| l["message"]
        .as_str()
        .unwrap_or("")
        .contains("too many open connections")));
}

#[test]
fn the_webhook_listener_refuses_oversized_headers_and_garbage_without_a_500() {
    let daemon = Daemon::start(&config(""));
    // A URI and a header far beyond any Twilio request.
    let long = "a".repeat(512 * 1024);
    for request in [
        format!("POST /flex/interactions?{long} HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("POST /flex/interactions HTTP/1.1\r\nHost: x\r\nX-Big: {long}\r\n\r\n"),
    ] {
        let mut stream = TcpStream::connect(daemon.ingress).unwrap();
        let _ = stream.write_all(request.as_bytes());
        let answer = read_until_closed(&mut stream, Duration::from_secs(5)).unwrap_or_default();
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 4"),
            "{}",
            &text[..text.len().min(200)]
        );
    }
    // Pipelined garbage after a valid request: the valid one is answered, the rest refused.
    let mut stream = TcpStream::connect(daemon.ingress).unwrap();
    stream
        .write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\xfeNOT HTTP AT ALL\r\n\r\n\r\n")
        .unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(5)).unwrap_or_default();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(!text.contains(" 500 "), "{text}");
    // Still serving, and nothing was written.
    assert_eq!(get(daemon.admin, "/healthz").status, 200);
    assert_eq!(
        daemon.metric("flexbridge_http_requests_total{status=\"200\"}"),
        0.0
    );
    assert!(read_events(&daemon.dir.path().join("events.jsonl")).is_empty());
}

/// A local address that is not loopback (the machine's own, on its first interface).
fn non_loopback_ip() -> IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks the route and source address.
    socket.connect("192.0.2.1:9").unwrap();
    let ip = socket.local_addr().unwrap().ip();
    assert!(
        !ip.is_loopback(),
        "this test needs a non-loopback interface"
    );
    ip
}

#[test]
fn readyz_names_the_unhealthy_sink_without_hosts_or_users_unless_asked_on_loopback() {
    let daemon = Daemon::start(&format!(
        "[admin]\nlisten = \"0.0.0.0:0\"\nhealth_interval = \"200ms\"\n[twilio]\nauth_tokens = [\"{TOKEN}\"]\n\n[[sinks]]\nname = \"rabbit\"\ntype = \"rabbitmq\"\nuri = \"amqp://secret-user:pw@127.0.0.1:1/%2f\"\nconnect_timeout = \"1s\"\n"
    ));
    let port = daemon.admin.port();
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    // Wait for the first failed connection attempt (the message then names the address).
    while !get(loopback, "/readyz").text().contains("127.0.0.1:1") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            get(loopback, "/readyz").text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let local = get(loopback, "/readyz");
    assert_eq!(local.status, 503);
    assert!(local.text().contains("127.0.0.1:1"), "{}", local.text());

    let remote = get(SocketAddr::new(non_loopback_ip(), port), "/readyz");
    assert_eq!(remote.status, 503);
    let body = remote.json();
    assert_eq!(body["sinks"][0]["name"], "rabbit");
    assert_eq!(body["sinks"][0]["healthy"], false);
    assert_eq!(body["sinks"][0]["reason"], "disconnected");
    let text = remote.text();
    for secret in ["127.0.0.1:1", "secret-user", "error"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

/// Thousands of idle connections on the webhook listener: beyond `ingress.max_connections`
/// each new one is answered 503 and closed at once, the daemon's descriptors stay bounded by
/// the cap, its memory barely moves, and a real request is served once the idle ones go.
#[test]
fn thousands_of_idle_connections_are_capped_with_bounded_descriptors_and_memory() {
    let daemon = Daemon::start(&config(
        "[ingress]\nlisten = \"127.0.0.1:0\"\nmax_connections = 100\nheader_read_timeout = \"30s\"\n",
    ));
    let (fds_before, rss_before) = daemon.fds_and_rss_kib();
    let streams: Vec<TcpStream> = (0..3000)
        .map(|_| TcpStream::connect(daemon.ingress).unwrap())
        .collect();
    // Over the cap, the 503 arrives at once; under it, nothing does.
    std::thread::sleep(Duration::from_millis(500));
    let mut idle = Vec::new();
    let mut refused = 0;
    for mut stream in streams {
        stream.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => {
                assert!(
                    buf.starts_with(b"HTTP/1.1 503"),
                    "{:?}",
                    String::from_utf8_lossy(&buf[..n])
                );
                refused += 1;
            }
            _ => idle.push(stream),
        }
    }
    let (fds, rss) = daemon.fds_and_rss_kib();
    assert!(refused >= 2800, "only {refused} of 3000 refused (cap 100)");
    assert!(
        fds <= fds_before + 110,
        "descriptors {fds_before} -> {fds} with a cap of 100"
    );
    assert!(
        rss <= rss_before + 16 * 1024,
        "RSS {rss_before} KiB -> {rss} KiB"
    );
    assert!(
        daemon.metric("flexbridge_http_rejections_total{reason=\"too_many_connections\"}")
            >= refused as f64 - 1.0
    );
    drop(idle);
    let started = Instant::now();
    loop {
        let response = get(daemon.ingress, "/nope");
        if response.status == 404 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{}",
            response.status
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
