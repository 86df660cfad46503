//! The Grafana dashboard and the Prometheus alert rules under `deploy/` use only metrics the
//! daemon exports; failure series exist at 0 from the start; broker-only families carry only
//! the sinks that have them; and no sink delays the webhook listener or floods the log while
//! its broker is unreachable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flexbridge_e2e::{get, Daemon};
use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Every `flexbridge_*` / `process_*` name in a text (PromQL in JSON or YAML).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["flexbridge_", "process_"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(prefix) {
            let start = from + at;
            let before_ok = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |e| start + e);
            if before_ok {
                names.insert(text[start..end].to_owned());
            }
            from = end;
        }
    }
    names
}

/// The series names a `/metrics` page offers (histograms as their `_bucket`, `_sum`, `_count`).
fn exported(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else {
            names.insert(name.to_owned());
        }
    }
    names
}

#[test]
fn dashboards_and_alerts_use_exported_metrics_and_no_sink_delays_the_listener() {
    // A broker that accepts the TCP connection and never answers: a client that waited for it
    // would hold the listener for its whole connect timeout (20 s here).
    let blackhole = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = blackhole.local_addr().unwrap();
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // closed again: connections are refused at once, so clients retry fast
    let started = Instant::now();
    let daemon = Daemon::start(&format!(
        r#"
[twilio]
auth_tokens = ["dash-token"]
[delivery]
mode = "spool"
[spool]
dir = "{{dir}}/spool"

[[sinks]]
name = "events"
type = "file"
path = "{{dir}}/events.jsonl"

[[sinks]]
name = "rabbit"
type = "rabbitmq"
uri = "amqp://guest:guest@{silent}/%2f"
connect_timeout = "20s"

[[sinks]]
name = "jetstream"
type = "nats"
url = "nats://{refused}"
connect_timeout = "20s"

[[sinks]]
name = "kafka"
type = "kafka"
brokers = "{refused}"
"#
    ));
    let healthz = get(daemon.admin, "/healthz");
    assert_eq!(healthz.status, 200);
    // The listener does not wait for any broker: well under the 20 s connect timeout.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "listening after {:?}",
        started.elapsed()
    );

    // Let the clients fail for a while, then read the page.
    std::thread::sleep(Duration::from_secs(3));
    let page = get(daemon.admin, "/metrics").text();
    let names = exported(&page);

    let mut used = BTreeSet::new();
    for file in [
        "deploy/grafana/flexbridge-dashboard.json",
        "deploy/prometheus/flexbridge-alerts.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let found = metric_names(&text);
        assert!(found.len() >= 5, "{file}: only {found:?}");
        used.extend(found);
    }
    let missing: Vec<_> = used.difference(&names).collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or alerts but not exported: {missing:?}\nexported: {names:?}"
    );

    // Failure series exist at 0 before any failure, so alerts see the first one.
    for series in [
        "flexbridge_http_requests_total{status=\"503\"} 0",
        "flexbridge_http_rejections_total{reason=\"spool_full\"} 0",
        "flexbridge_verification_failures_total{reason=\"signature_mismatch\"} 0",
        "flexbridge_sink_failures_total{reason=\"timeout\",sink=\"kafka\"} 0",
        "flexbridge_http_request_duration_seconds_bucket{status=\"200\",le=\"15\"} 0",
        "flexbridge_http_request_duration_seconds_bucket{status=\"200\",le=\"20\"} 0",
    ] {
        assert!(page.contains(series), "missing {series} in:\n{page}");
    }
    for family in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(names.contains(family), "no {family}");
    }
    // Broker-only families carry only their own sink type.
    let sinks_of = |family: &str| -> BTreeSet<String> {
        page.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter_map(|l| {
                l.split("sink=\"")
                    .nth(1)?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .collect()
    };
    assert_eq!(
        sinks_of("flexbridge_sink_queue_depth"),
        BTreeSet::from(["kafka".to_owned()])
    );
    for family in [
        "flexbridge_sink_duplicates_total",
        "flexbridge_sink_returned_total",
    ] {
        let sinks = sinks_of(family);
        assert!(
            sinks.len() <= 1 && !sinks.contains("events") && !sinks.contains("kafka"),
            "{family}: {sinks:?}"
        );
    }

    // An unreachable broker is reported once per state change, not per reconnect attempt.
    let logs = daemon.logs();
    for sink in ["jetstream", "kafka", "rabbit"] {
        let lines: Vec<_> = logs
            .iter()
            .filter(|l| l["sink"] == sink && matches!(l["level"].as_str(), Some("WARN" | "ERROR")))
            .collect();
        assert!(
            lines.len() <= 2,
            "{sink}: {} warning lines in 3 s: {lines:#?}",
            lines.len()
        );
    }
    assert!(
        logs.iter()
            .any(|l| l["sink"] == "kafka" && l["level"] == "WARN"),
        "the Kafka failure was not reported at all: {logs:#?}"
    );
    drop(blackhole);
}
