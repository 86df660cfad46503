//! `delivery.mode = "spool"` end to end: the real binary, signed traffic from the simulator,
//! the broker connection broken by the testkit proxy, events read back from the real broker.
//! Every webhook answered 200 must arrive, whatever happened to the broker or the daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use flexbridge_e2e::*;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

const TOKEN: &str = "spool-e2e-token";
const PATH: &str = "/flex/interactions";

/// A spool-mode daemon publishing to RabbitMQ through `proxy`, its spool in `spool_dir`.
fn rabbit_daemon(
    proxy: &Proxy,
    spool_dir: &Path,
    exchange: &str,
    queue: &str,
    extra: &str,
) -> Daemon {
    let uri = amqp_url().replace(authority(&amqp_url()), &proxy.addr());
    Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nmode = \"spool\"\n[spool]\ndir = \"{}\"\n{extra}\n[[sinks]]\nname = \"rabbit\"\ntype = \"rabbitmq\"\nuri = \"{uri}\"\nexchange = \"{exchange}\"\nrouting_key = \"flex.{{event}}\"\n[sinks.declare]\nexchange_type = \"topic\"\ndurable = false\n[[sinks.declare.queues]]\nname = \"{queue}\"\ndurable = false\nbindings = [\"flex.#\"]\n",
        spool_dir.display()
    ))
}

fn ride_out_a_rabbitmq_outage(fault: Fault) {
    let (exchange, queue) = (unique("fbe2e.spool."), unique("fbe2e.spoolq."));
    let spool = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(authority(&amqp_url()));
    let d = rabbit_daemon(&proxy, spool.path(), &exchange, &queue, "");
    wait_ready(&d);
    // Spool mode keeps the replica in the Service while the broker is away.
    let readiness = {
        let admin = d.admin;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(10));
            get(admin, "/readyz")
        })
    };
    let sent = spool_through_outage(&d, PATH, TOKEN, &proxy, "rabbit", fault);
    let ready = readiness.join().unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["spool"]["writable"], true);
    drop(d);
    let ids = drain_and_delete(&exchange, &queue);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len() as u64,
        sent,
        "every acknowledged event is in the queue"
    );
}

#[test]
fn spool_mode_acknowledges_everything_through_a_30s_rabbitmq_reset() {
    ride_out_a_rabbitmq_outage(Fault::Cut);
}

#[test]
fn spool_mode_acknowledges_everything_through_a_30s_rabbitmq_blackhole() {
    ride_out_a_rabbitmq_outage(Fault::Blackhole);
}

#[test]
fn spool_mode_acknowledges_everything_through_a_30s_nats_reset() {
    ride_out_a_nats_outage(Fault::Cut);
}

#[test]
fn spool_mode_acknowledges_everything_through_a_30s_nats_blackhole() {
    ride_out_a_nats_outage(Fault::Blackhole);
}

fn ride_out_a_nats_outage(fault: Fault) {
    let (stream, prefix) = (unique("FBE2ESPOOL"), unique("fbe2espool"));
    let spool = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(authority(&nats_url()));
    let d = Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nmode = \"spool\"\n[spool]\ndir = \"{}\"\n\n[[sinks]]\nname = \"jetstream\"\ntype = \"nats\"\nurl = \"nats://{}\"\nsubject = \"{prefix}.{{account}}.{{event}}\"\n[sinks.stream]\nname = \"{stream}\"\nstorage = \"memory\"\nduplicate_window = \"5m\"\n",
        spool.path().display(),
        proxy.addr()
    ));
    wait_ready(&d);
    let sent = spool_through_outage(&d, PATH, TOKEN, &proxy, "jetstream", fault);
    assert_eq!(
        d.metric("flexbridge_spool_dead_letters{sink=\"jetstream\"}"),
        0.0,
        "nothing was refused for good"
    );
    drop(d);
    let messages = drain_stream(&stream);
    let ids: HashSet<&str> = messages.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids.len() as u64,
        sent,
        "every acknowledged event is in the stream"
    );
}

/// kill -9 with the broker down and events waiting, then a restart on the same spool: the new
/// process delivers every acknowledged event.
#[test]
fn kill_9_with_the_broker_down_loses_nothing_acknowledged() {
    let (exchange, queue) = (unique("fbe2e.kill."), unique("fbe2e.killq."));
    let spool = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(authority(&amqp_url()));
    let d = rabbit_daemon(&proxy, spool.path(), &exchange, &queue, "");
    wait_ready(&d);
    proxy.tcp().cut();
    let summary = simulate_with(
        &d.url(PATH),
        TOKEN,
        &["--count", "300", "--concurrency", "16"],
    );
    assert_eq!(summary["status"]["200"], 300, "{summary}");
    assert!(d.metric("flexbridge_spool_depth{sink=\"rabbit\"}") > 0.0);
    drop(d); // SIGKILL
    proxy.tcp().restore();
    let d = rabbit_daemon(&proxy, spool.path(), &exchange, &queue, "");
    assert!(d.metric("flexbridge_spool_replayed_total") >= 300.0);
    wait_delivered(&d, "rabbit", Duration::from_secs(60));
    drop(d);
    let ids = drain_and_delete(&exchange, &queue);
    let unique_ids = ids.iter().collect::<HashSet<_>>().len();
    assert_eq!(unique_ids, 300, "every acknowledged event arrived");
}

/// A full spool answers 503 + Retry-After (nothing accepted is harmed) and accepts again
/// once the sink has drained it.
#[test]
fn a_full_spool_answers_503_and_recovers() {
    let (exchange, queue) = (unique("fbe2e.full."), unique("fbe2e.fullq."));
    let spool = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(authority(&amqp_url()));
    let d = rabbit_daemon(
        &proxy,
        spool.path(),
        &exchange,
        &queue,
        "max_bytes = 65536\n",
    );
    wait_ready(&d);
    proxy.tcp().cut();
    let summary = simulate_with(
        &d.url(PATH),
        TOKEN,
        &["--count", "600", "--concurrency", "8"],
    );
    let ok = summary["status"]["200"].as_u64().unwrap();
    let full = summary["status"]["503"].as_u64().unwrap_or(0);
    assert!(ok > 50 && full > 0, "{summary}");
    assert_eq!(ok + full, 600);
    assert_eq!(
        d.metric("flexbridge_http_rejections_total{reason=\"spool_full\"}"),
        full as f64
    );
    let line = d.wait_for_log("for a full spool", |l| l["reason"] == "spool_full");
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(
        get(d.admin, "/readyz").status,
        503,
        "a full spool is not ready"
    );
    let refused = signed_form(
        &d,
        PATH,
        TOKEN,
        &status_updated("KD000000000000000000000000000000f1", "closed"),
    )
    .send(d.ingress);
    assert_eq!(refused.status, 503);
    assert!(refused.header("retry-after").is_some());
    assert_eq!(refused.json()["error"], "spool_full");
    proxy.tcp().restore();
    wait_delivered(&d, "rabbit", Duration::from_secs(60));
    wait_ready(&d);
    let again = simulate_with(&d.url(PATH), TOKEN, &["--count", "50"]);
    assert_eq!(again["status"]["200"], 50, "{again}");
    wait_delivered(&d, "rabbit", Duration::from_secs(30));
    drop(d);
    let ids = drain_and_delete(&exchange, &queue);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len() as u64,
        ok + 50,
        "every 200 arrived, no 503 did"
    );
}

/// A permanent refusal (unroutable: no queue bound) does not block the spool: the webhook got
/// its 200, the event waits in the dead letters with the sink and the reason; `flexbridge dlq`
/// shows it, and `dlq redrive` delivers it once the route exists.
#[test]
fn a_permanent_refusal_lands_in_the_dead_letters_and_redrive_delivers_it() {
    let exchange = unique("fbe2e.dead.");
    let spool = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(authority(&amqp_url()));
    let uri = amqp_url().replace(authority(&amqp_url()), &proxy.addr());
    let d = Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nmode = \"spool\"\n[spool]\ndir = \"{}\"\n\n[[sinks]]\nname = \"rabbit\"\ntype = \"rabbitmq\"\nuri = \"{uri}\"\nexchange = \"{exchange}\"\n[sinks.declare]\nexchange_type = \"topic\"\ndurable = false\n",
        spool.path().display()
    ));
    wait_ready(&d);
    let response = signed_form(
        &d,
        PATH,
        TOKEN,
        &status_updated("KD000000000000000000000000000000d1", "closed"),
    )
    .send(d.ingress);
    assert_eq!(response.status, 200, "{}", response.text());
    let id = response.json()["id"].as_str().unwrap().to_owned();
    let line = d.wait_for_log("for the dead letter", |l| {
        l["level"] == "ERROR" && l["event_id"] == id.as_str()
    });
    assert_eq!(line["reason"], "unroutable", "{line}");
    assert_eq!(
        line["interaction_sid"], "KD000000000000000000000000000000d1",
        "{line}"
    );
    wait_delivered(&d, "rabbit", Duration::from_secs(10));
    let started = Instant::now();
    while d.metric("flexbridge_spool_dead_letters{sink=\"rabbit\"}") < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(50));
    }
    let admin = format!("http://{}", d.admin);
    let (code, out, err) = flexbridge(&["dlq", "list", "--admin", &admin]);
    assert_eq!(code, Some(0), "{err}");
    let letters: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(letters.as_array().unwrap().len(), 1, "{letters}");
    assert_eq!(letters[0]["event_id"], id.as_str());
    assert_eq!(letters[0]["reason"], "unroutable");
    let seq = letters[0]["seq"].as_u64().unwrap().to_string();
    let (code, out, _) = flexbridge(&["dlq", "show", "rabbit", &seq, "--admin", &admin]);
    assert_eq!(code, Some(0));
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        shown["event"]["data"]["channel_status"], "closed",
        "{shown}"
    );
    let (code, out, _) = flexbridge(&["spool", "status", "--admin", &admin]);
    assert_eq!(code, Some(0));
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["sinks"][0]["dead_letters"], 1, "{status}");
    // The route is fixed: a queue is bound. Redrive delivers the event.
    let queue = unique("fbe2e.deadq.");
    bind_queue(&exchange, &queue, "#");
    let (code, out, _) = flexbridge(&["dlq", "redrive", "--sink", "rabbit", "--admin", &admin]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"redriven\": 1"), "{out}");
    let started = Instant::now();
    loop {
        let (_, out, _) = flexbridge(&["dlq", "list", "--admin", &admin]);
        if out.trim() == "[]" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still dead: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _, _) = flexbridge(&["dlq", "purge", "--sink", "nope", "--admin", &admin]);
    assert_eq!(code, Some(1), "an unknown sink is an error");
    let (code, out, _) = flexbridge(&["dlq", "purge", "--admin", &admin]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"purged\": 0"), "{out}");
    drop(d);
    assert_eq!(drain_and_delete(&exchange, &queue), vec![id]);
}

/// SIGTERM with events waiting for a broker that is down: the daemon exits within its drain
/// timeout, the events stay in the spool, and the next start delivers them.
#[test]
fn sigterm_keeps_the_backlog_on_disk_for_the_next_start() {
    let (exchange, queue) = (unique("fbe2e.term."), unique("fbe2e.termq."));
    let spool = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(authority(&amqp_url()));
    let mut d = rabbit_daemon(
        &proxy,
        spool.path(),
        &exchange,
        &queue,
        "[shutdown]\ndrain_timeout = \"1s\"\n",
    );
    wait_ready(&d);
    proxy.tcp().cut();
    let summary = simulate_with(&d.url(PATH), TOKEN, &["--count", "100"]);
    assert_eq!(summary["status"]["200"], 100, "{summary}");
    d.terminate();
    assert_eq!(d.wait(Duration::from_secs(15)), Some(0));
    let line = d.wait_for_log("about the backlog", |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("stay in the spool"))
    });
    assert_eq!(line["level"], "WARN");
    drop(d);
    proxy.tcp().restore();
    let d = rabbit_daemon(&proxy, spool.path(), &exchange, &queue, "");
    wait_delivered(&d, "rabbit", Duration::from_secs(30));
    drop(d);
    let ids = drain_and_delete(&exchange, &queue);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 100);
}

/// Twilio's redelivery of an event accepted moments ago (same idempotency token, so the same
/// id) gets its 200 again without a second copy, even to a broker that does not deduplicate.
#[test]
fn a_twilio_redelivery_is_acknowledged_without_a_second_message() {
    let (exchange, queue) = (unique("fbe2e.redeliver."), unique("fbe2e.redeliverq."));
    let spool = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(authority(&amqp_url()));
    let d = rabbit_daemon(&proxy, spool.path(), &exchange, &queue, "");
    wait_ready(&d);
    let webhook = status_updated("KD000000000000000000000000000000a7", "closed");
    let mut ids = HashSet::new();
    for _ in 0..3 {
        let response = signed_form(&d, PATH, TOKEN, &webhook)
            .header("I-Twilio-Idempotency-Token", "one-delivery")
            .send(d.ingress);
        assert_eq!(response.status, 200, "{}", response.text());
        ids.insert(response.json()["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(d.metric("flexbridge_spool_redeliveries_total"), 2.0);
    wait_delivered(&d, "rabbit", Duration::from_secs(10));
    drop(d);
    assert_eq!(drain_and_delete(&exchange, &queue).len(), 1);
}

/// kill -9 in the middle of commits (full-speed traffic), then a restart on the same spool:
/// the spool opens (a commit torn by the crash is discarded by the store's checksums, never
/// read back as garbage) and every acknowledged event arrives. The simulator counts 200s, not
/// ids, so this checks that at least as many distinct events arrive as were acknowledged; a
/// request whose commit completed but whose 200 was lost in the kill may arrive too.
#[test]
fn kill_9_in_the_middle_of_commits_loses_nothing_acknowledged() {
    kill_9_in_the_middle_of_commits("", 0);
}

/// The same with 1 MiB segments (an eighth of `max_bytes`) and a first batch delivered before: the finished segment's
/// file is reused for the next one, so the kill lands on commits into a file that still holds
/// an earlier segment's bytes after them. None of those is read back, nothing acknowledged is
/// lost.
#[test]
fn kill_9_while_segments_are_reused_loses_nothing_acknowledged() {
    kill_9_in_the_middle_of_commits("max_bytes = 8388608", 2000);
}

/// The `.seg` files in `dir`, by inode.
fn segment_inodes(dir: &Path) -> std::collections::HashMap<u64, String> {
    std::fs::read_dir(dir.join("segments"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata().ok()?;
            name.ends_with(".seg")
                .then(|| (std::os::unix::fs::MetadataExt::ino(&meta), name))
        })
        .collect()
}

/// Sends `first` webhooks and waits until they are delivered and a finished segment's file
/// was reused (when `first` > 0), then runs traffic, kills the daemon in the middle of it,
/// restarts it on the same spool and checks that every acknowledged event arrived.
fn kill_9_in_the_middle_of_commits(spool_settings: &str, first: u32) {
    let (exchange, queue) = (unique("fbe2e.crash."), unique("fbe2e.crashq."));
    let spool = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(authority(&amqp_url()));
    let d = rabbit_daemon(&proxy, spool.path(), &exchange, &queue, spool_settings);
    wait_ready(&d);
    let mut acknowledged = 0;
    if first > 0 {
        // One event first, so the first segment's file exists and is noted before anything
        // can finish it: with a fast broker the whole batch can be delivered, and the file
        // reused, before the batch's last answer reaches this test.
        let one = simulate_with(&d.url(PATH), TOKEN, &["--count", "1"]);
        acknowledged += one["status"]["200"].as_u64().unwrap();
        wait_delivered(&d, "rabbit", Duration::from_secs(10));
        let before = segment_inodes(spool.path());
        assert_eq!(before.len(), 1, "one segment file: {before:?}");
        let count = (first - 1).to_string();
        let summary = simulate_with(
            &d.url(PATH),
            TOKEN,
            &["--count", &count, "--concurrency", "32"],
        );
        acknowledged += summary["status"]["200"].as_u64().unwrap();
        wait_delivered(&d, "rabbit", Duration::from_secs(60));
        // Everything delivered: the segments (past a quarter of their 1 MiB) are finished,
        // and the first one's file is a later segment under a new name.
        let started = Instant::now();
        while !segment_inodes(spool.path())
            .iter()
            .any(|(inode, name)| before.get(inode).is_some_and(|old| old != name))
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no segment file was reused: {before:?} then {:?}",
                segment_inodes(spool.path())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let target = d.url(PATH);
    let traffic = std::thread::spawn(move || {
        simulate_with(&target, TOKEN, &["--duration", "3s", "--concurrency", "32"])
    });
    std::thread::sleep(Duration::from_millis(1500));
    drop(d); // SIGKILL, commits in flight
    let summary = traffic.join().unwrap();
    let killed_in = summary["status"]["200"].as_u64().unwrap();
    assert!(killed_in > 100, "{summary}");
    acknowledged += killed_in;
    let d = rabbit_daemon(&proxy, spool.path(), &exchange, &queue, spool_settings);
    wait_ready(&d);
    wait_delivered(&d, "rabbit", Duration::from_secs(60));
    drop(d);
    let ids = drain_and_delete(&exchange, &queue);
    let distinct = ids.iter().collect::<HashSet<_>>().len() as u64;
    assert!(
        distinct >= acknowledged,
        "{distinct} distinct events arrived, {acknowledged} were acknowledged"
    );
}

/// A tmpfs of its own, unmounted when dropped (the tests run as root, as CI does).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        Self { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// The spool's disk fills up (a 2 MiB tmpfs, far below `spool.max_bytes`): webhooks get 503
/// `spool_unavailable` with Retry-After, an ERROR line and the write-error metric, readiness
/// turns false, everything accepted before is delivered once the broker is back, and then the
/// same process is ready again and takes webhooks (no restart needed).
#[test]
fn a_full_disk_answers_503_and_harms_nothing_accepted() {
    let (exchange, queue) = (unique("fbe2e.disk."), unique("fbe2e.diskq."));
    let disk = SmallDisk::mount("2m");
    let proxy = Proxy::start(authority(&amqp_url()));
    let d = rabbit_daemon(&proxy, disk.dir.path(), &exchange, &queue, "");
    wait_ready(&d);
    proxy.tcp().cut();
    let summary = simulate_with(
        &d.url(PATH),
        TOKEN,
        &["--count", "6000", "--concurrency", "8"],
    );
    let ok = summary["status"]["200"].as_u64().unwrap();
    let failed = summary["status"]["503"].as_u64().unwrap_or(0);
    assert!(ok > 100 && failed > 0, "{summary}");
    assert!(d.metric("flexbridge_spool_write_errors_total") >= 1.0);
    assert_eq!(
        d.metric("flexbridge_http_rejections_total{reason=\"spool_unavailable\"}"),
        failed as f64
    );
    let line = d.wait_for_log("for the failing disk", |l| {
        l["level"] == "ERROR"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("spool commit failed"))
    });
    assert!(line["error"].as_str().is_some(), "{line}");
    let refused = signed_form(
        &d,
        PATH,
        TOKEN,
        &status_updated("KD000000000000000000000000000000b2", "closed"),
    )
    .send(d.ingress);
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.header("retry-after").is_some());
    assert_eq!(
        get(d.admin, "/readyz").status,
        503,
        "a spool that cannot write is not ready"
    );
    proxy.tcp().restore();
    wait_delivered(&d, "rabbit", Duration::from_secs(60));
    // Everything left the spool, so its segment gave the disk back: without a restart the
    // spool turns ready again and takes webhooks.
    let started = std::time::Instant::now();
    while get(d.admin, "/readyz").status != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the spool did not recover once the disk had room: {}",
            get(d.admin, "/readyz").text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = signed_form(
        &d,
        PATH,
        TOKEN,
        &status_updated("KD000000000000000000000000000000b3", "closed"),
    )
    .send(d.ingress);
    assert_eq!(after.status, 200, "{}", after.text());
    wait_delivered(&d, "rabbit", Duration::from_secs(30));
    drop(d);
    let ids = drain_and_delete(&exchange, &queue);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len() as u64,
        ok + 1,
        "every 200 arrived, no 503 did"
    );
    drop(disk);
}
