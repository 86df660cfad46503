//! The daemon's life end to end: graceful shutdown with a request in flight, the demo, the
//! traffic simulator against the real binary, and the schema command.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use flexbridge_e2e::*;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "lifecycle-token";
const PATH: &str = "/flex/interactions";

fn file_daemon(extra: &str) -> Daemon {
    Daemon::start(&format!(
        "{extra}\n[twilio]\nauth_tokens = [\"{TOKEN}\"]\n\n[[sinks]]\nname = \"archive\"\ntype = \"file\"\npath = \"{{dir}}/events.jsonl\"\n"
    ))
}

fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM while a request is in flight: readiness turns false, the listener closes, the
/// request still completes with 200 and is in the file, and the process exits 0.
#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let mut daemon = file_daemon("[shutdown]\ngrace_period = \"10s\"\n");
    let request = signed_form(
        &daemon,
        PATH,
        TOKEN,
        &status_updated("KD00000000000000000000000000000010", "closed"),
    )
    .bytes(daemon.ingress);
    let (head_and_half, rest) = request.split_at(request.len() - 20);
    let mut stream = TcpStream::connect(daemon.ingress).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream.write_all(head_and_half).unwrap();
    wait_until(
        "the request to be in flight",
        Duration::from_secs(5),
        || daemon.metric("flexbridge_http_requests_in_flight") == 1.0,
    );

    daemon.terminate();
    daemon.wait_for_log("that the listener closed", |l| {
        l["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("webhook listener closed")
    });
    let ready = get(daemon.admin, "/readyz");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["draining"], true);
    assert!(
        TcpStream::connect(daemon.ingress).is_err(),
        "new connections must be refused"
    );

    stream.write_all(rest).unwrap();
    let response = read_response(&mut stream);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(daemon.wait(Duration::from_secs(10)), Some(0));
    let events = read_events(&daemon.dir.path().join("events.jsonl"));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["id"], response.json()["id"]);
    daemon.wait_for_log("that the sink drained", |l| l["message"] == "sink drained");
}

#[test]
fn demo_prints_a_lifecycle_covering_all_seven_event_types() {
    let output = Command::new(binary()).arg("demo").output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events: Vec<serde_json::Value> = serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    let types: HashSet<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.len(), 7, "{types:?}");
    assert!(events.iter().all(|e| e["specversion"] == "1.0"));
}

/// `simulate` against the real daemon: every 200 is in the file, once, and each interaction's
/// events are in lifecycle order.
#[test]
fn simulated_traffic_every_200_is_written_in_order() {
    let daemon = file_daemon("");
    let url = daemon.url(PATH);
    let output = Command::new(binary())
        .args([
            "simulate",
            "--url",
            &url,
            "--auth-token",
            TOKEN,
            "--count",
            "400",
            "--concurrency",
            "8",
            "--json-summary",
            "--no-progress",
            "--seed",
            "42",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["sent"], 400, "{summary}");
    assert_eq!(summary["status"]["200"], 400, "{summary}");
    for key in ["p50", "p90", "p99", "max"] {
        assert!(summary["latency_ms"][key].as_f64().unwrap() > 0.0);
    }

    let events = read_events(&daemon.dir.path().join("events.jsonl"));
    assert_eq!(events.len(), 400);
    let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 400, "every event once");
    let rank = |e: &serde_json::Value| match (
        e["type"].as_str().unwrap(),
        e["data"]["channel_status"].as_str(),
    ) {
        ("com.twilio.flex.interactions.interaction.created", _) => 0,
        ("com.twilio.flex.interactions.channel.create_failed", _) => 1,
        ("com.twilio.flex.interactions.channel.created", _) => 2,
        ("com.twilio.flex.interactions.channel.status_updated", Some("active")) => 3,
        ("com.twilio.flex.interactions.participant.joined", _) => 4,
        ("com.twilio.flex.interactions.participant.updated", _) => 5,
        ("com.twilio.flex.interactions.participant.left", _) => 6,
        ("com.twilio.flex.interactions.channel.status_updated", Some("closed")) => 7,
        other => panic!("unexpected {other:?}"),
    };
    let mut last: HashMap<&str, i32> = HashMap::new();
    for e in &events {
        let interaction = e["subject"].as_str().unwrap();
        let r = rank(e);
        let previous = last.insert(interaction, r).unwrap_or(-1);
        assert!(r >= previous, "out of order for {interaction}");
    }
    assert!(last.len() >= 40, "{} interactions", last.len());

    // GET and JSON encodings are accepted too.
    for mode in [&["--method", "get"][..], &["--json"][..]] {
        let output = Command::new(binary())
            .args([
                "simulate",
                "--url",
                &url,
                "--auth-token",
                TOKEN,
                "--count",
                "20",
                "--json-summary",
                "--no-progress",
            ])
            .args(mode)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{mode:?}: {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(
        read_events(&daemon.dir.path().join("events.jsonl")).len(),
        440
    );

    // Unsigned traffic is refused, and simulate says so in its exit code.
    let output = Command::new(binary())
        .args([
            "simulate",
            "--url",
            &url,
            "--count",
            "5",
            "--json-summary",
            "--no-progress",
        ])
        .env_remove("TWILIO_AUTH_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["status"]["403"], 5, "{summary}");
}

#[test]
fn schema_command_writes_exactly_the_shipped_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(binary())
        .args(["schema", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/v1");
    let mut count = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(shipped.join(name)).unwrap()
        );
        count += 1;
    }
    assert_eq!(count, 9);
    let printed = Command::new(binary()).arg("schema").output().unwrap();
    let all: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!(all.as_object().unwrap().len(), 9);
    assert_eq!(
        all["CloudEvent.json"]["$id"],
        "urn:flexbridge:schema:CloudEvent:1"
    );
}

/// SIGTERM under keep-alive load: from the moment readiness turns false every answer carries
/// `Connection: close`, so each client leaves after its current request instead of having an
/// idle connection closed under a request it is sending. No request is left without an answer,
/// every client is told to leave, and every 200 is in the file.
#[test]
fn sigterm_under_keep_alive_load_cuts_no_request() {
    keep_alive_clients_through_sigterm("");
}

/// The same in spool mode.
#[test]
fn sigterm_under_keep_alive_load_cuts_no_request_in_spool_mode() {
    keep_alive_clients_through_sigterm(
        "[delivery]\nmode = \"spool\"\n[spool]\ndir = \"{dir}/spool\"\n",
    );
}

fn keep_alive_clients_through_sigterm(mode: &str) {
    use flexbridge_simulate::traffic::Traffic;
    use flexbridge_simulate::{read_answer, write_request, Encoding, Signer, Target};
    let mut d = file_daemon(&format!("[shutdown]\nreadiness_delay = \"2s\"\n{mode}"));
    let target = Target::parse(&d.url(PATH)).unwrap();
    let addr = d.ingress;
    let clients: Vec<_> = (0..16u64)
        .map(|seed| {
            let target = target.clone();
            std::thread::spawn(move || {
                let mut traffic = Traffic::new(
                    "AC0123456789abcdef0123456789abcdef".into(),
                    "GO0123456789abcdef0123456789abcdef".into(),
                    seed,
                );
                let mut stream = TcpStream::connect(addr).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(15)))
                    .unwrap();
                let signer = Signer::AuthToken(TOKEN.to_owned());
                let (mut ids, mut buffer) = (Vec::new(), Vec::new());
                loop {
                    for params in traffic.lifecycle() {
                        buffer.clear();
                        let token = traffic.sid("idem-");
                        write_request(
                            &mut buffer,
                            &target,
                            Encoding::Form,
                            &signer,
                            &params,
                            &token,
                        )
                        .unwrap();
                        if stream.write_all(&buffer).is_err() {
                            return (ids, false, true);
                        }
                        match read_answer(&mut stream) {
                            Ok(answer) => {
                                assert_eq!(answer.status, 200, "{}", answer.text());
                                let body: serde_json::Value =
                                    serde_json::from_slice(&answer.body).unwrap();
                                ids.push(body["id"].as_str().unwrap().to_owned());
                                if answer.header("connection") == Some("close") {
                                    return (ids, true, false);
                                }
                            }
                            // Written, never answered: the connection was cut under it.
                            Err(_) => return (ids, false, true),
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    d.terminate();
    let mut acknowledged = HashSet::new();
    for client in clients {
        let (ids, told_to_leave, cut) = client.join().unwrap();
        assert!(!cut, "a request was left without an answer");
        assert!(told_to_leave, "the client was never told Connection: close");
        acknowledged.extend(ids);
    }
    assert_eq!(d.wait(Duration::from_secs(30)), Some(0));
    assert!(acknowledged.len() > 100, "{}", acknowledged.len());
    let stored: HashSet<String> = read_events(&d.dir.path().join("events.jsonl"))
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        acknowledged.is_subset(&stored),
        "an acknowledged event is missing"
    );
}
