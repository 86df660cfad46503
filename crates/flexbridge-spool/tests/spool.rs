//! The spool against a scripted sink: durability across reopen, replay, order per partition
//! key, unlimited retries, dead letters, and a full spool.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use async_trait::async_trait;
use flexbridge_core::metrics::Metrics;
use flexbridge_core::{
    normalize, Attestation, Delivery, DeliveryConfig, Event, Intake, Sink, SinkError, Verified,
    WebhookRequest,
};
use flexbridge_spool::{Runner, Spool, SpoolConfig, SpoolError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Records what it confirmed; fails an interaction's events as scripted.
#[derive(Default)]
struct Scripted {
    confirmed: Mutex<Vec<(String, String)>>,
    /// Interaction SID -> retryable failures left.
    flaky: Mutex<HashMap<String, u32>>,
    /// Interaction SIDs refused for good.
    refused: Vec<String>,
}

#[async_trait]
impl Sink for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    async fn publish(&self, event: &Event) -> Result<(), SinkError> {
        let interaction = event.data().interaction_sid().unwrap_or("").to_owned();
        if self.refused.contains(&interaction) {
            return Err(SinkError::permanent("unroutable", "no route"));
        }
        if let Some(left) = self.flaky.lock().unwrap().get_mut(&interaction) {
            if *left > 0 {
                *left -= 1;
                return Err(SinkError::retryable("disconnected", "down"));
            }
        }
        self.confirmed
            .lock()
            .unwrap()
            .push((interaction, event.id().to_owned()));
        Ok(())
    }
    async fn health(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn drain(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

fn request(interaction: &str, n: u32) -> WebhookRequest {
    WebhookRequest {
        params: vec![
            ("EventType".into(), "onChannelStatusUpdated".into()),
            ("AccountSid".into(), "AC1".into()),
            ("InteractionSid".into(), interaction.into()),
            ("ChannelStatus".into(), format!("s{n}")),
        ],
        idempotency_token: Some(format!("tok-{interaction}-{n}")),
        received_at: SystemTime::now(),
    }
}

fn event_of(request: &WebhookRequest) -> Arc<Event> {
    Arc::new(normalize(Verified::attest(request.clone(), Attestation::AuthToken)).unwrap())
}

fn id_of(request: &WebhookRequest) -> String {
    event_of(request).id().to_owned()
}

fn delivery(sink: Arc<Scripted>) -> Arc<Delivery> {
    let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
    let config = DeliveryConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..DeliveryConfig::default()
    };
    Arc::new(Delivery::new(vec![sink], &config, &metrics).unwrap())
}

fn open(dir: &std::path::Path, max_bytes: u64) -> Arc<Spool> {
    let config = SpoolConfig {
        dir: dir.to_owned(),
        max_bytes,
        ..SpoolConfig::default()
    };
    Spool::open(
        &config,
        vec!["scripted".into()],
        &prometheus::Registry::new(),
    )
    .unwrap()
}

/// Waits until `done` holds (at most 10 s).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_idle(runner: &Runner) {
    eventually("not delivered", || runner.idle()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_is_delivered_in_order_per_interaction_and_leaves_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let sink = Arc::new(Scripted {
        flaky: Mutex::new(HashMap::from([("KD2".to_owned(), 30)])),
        ..Scripted::default()
    });
    let runner = Runner::start(Arc::clone(&spool), delivery(Arc::clone(&sink)), 8);
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    let appends = (0..50).map(|n| {
        let interaction = format!("KD{}", n % 5);
        let request = request(&interaction, n);
        expected
            .entry(interaction)
            .or_default()
            .push(id_of(&request));
        let spool = Arc::clone(&spool);
        async move { spool.append(request.encode()).await.unwrap() }
    });
    // Concurrent appends share commits.
    let seqs = futures::future::join_all(appends).await;
    assert_eq!(seqs.len(), 50);
    wait_idle(&runner).await;
    let mut got: HashMap<String, Vec<String>> = HashMap::new();
    for (interaction, id) in sink.confirmed.lock().unwrap().iter() {
        got.entry(interaction.clone()).or_default().push(id.clone());
    }
    // Appends may commit in any order, but each interaction's sequence is kept; KD2 was
    // retried 30 times and still arrived in order.
    for (interaction, ids) in &got {
        let mut sorted_expected = expected[interaction].clone();
        sorted_expected.sort();
        let mut sorted_got = ids.clone();
        sorted_got.sort();
        assert_eq!(sorted_got, sorted_expected, "{interaction}");
    }
    assert_eq!(got.values().map(Vec::len).sum::<usize>(), 50);
    assert!(runner.drain(Duration::from_secs(1)).await);
    // Give the writer a moment to delete what every sink finished.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status = spool.status().unwrap();
    assert_eq!(status.sinks[0].depth, 0);
    assert_eq!(status.bytes, 0, "{status:?}");
    spool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_per_interaction_holds_for_sequential_appends() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let sink = Arc::new(Scripted {
        flaky: Mutex::new(HashMap::from([("KD7".to_owned(), 10)])),
        ..Scripted::default()
    });
    let runner = Runner::start(Arc::clone(&spool), delivery(Arc::clone(&sink)), 4);
    let mut ids = Vec::new();
    for n in 0..20 {
        let request = request("KD7", n);
        ids.push(id_of(&request));
        spool.append(request.encode()).await.unwrap();
    }
    wait_idle(&runner).await;
    let got: Vec<String> = sink
        .confirmed
        .lock()
        .unwrap()
        .iter()
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(got, ids);
    runner.drain(Duration::from_secs(1)).await;
    spool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_records_are_delivered_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    {
        let spool = open(dir.path(), 1 << 20);
        for n in 0..10 {
            let request = request("KD1", n);
            ids.push(id_of(&request));
            spool.append(request.encode()).await.unwrap();
        }
        // No runner: nothing was delivered before the "crash".
        spool.close();
    }
    let spool = open(dir.path(), 1 << 20);
    assert_eq!(spool.status().unwrap().sinks[0].depth, 10);
    let sink = Arc::new(Scripted::default());
    let runner = Runner::start(Arc::clone(&spool), delivery(Arc::clone(&sink)), 4);
    wait_idle(&runner).await;
    let got: Vec<String> = sink
        .confirmed
        .lock()
        .unwrap()
        .iter()
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(got, ids);
    runner.drain(Duration::from_secs(1)).await;
    spool.close();
    // The cursor was saved: a third start delivers nothing again.
    drop((runner, spool));
    let spool = open(dir.path(), 1 << 20);
    assert_eq!(spool.status().unwrap().sinks[0].depth, 0);
    spool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_a_dead_letter_and_does_not_block_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let sink = Arc::new(Scripted {
        refused: vec!["KD9".to_owned()],
        ..Scripted::default()
    });
    let runner = Runner::start(Arc::clone(&spool), delivery(Arc::clone(&sink)), 1);
    let refused = request("KD9", 0);
    spool.append(refused.encode()).await.unwrap();
    for n in 0..5 {
        spool.append(request("KD1", n).encode()).await.unwrap();
    }
    wait_idle(&runner).await;
    assert_eq!(sink.confirmed.lock().unwrap().len(), 5);
    runner.drain(Duration::from_secs(1)).await;
    let letters = spool.dead_letters(None).unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "unroutable");
    assert_eq!(letters[0].sink, "scripted");
    assert_eq!(WebhookRequest::decode(&letters[0].record).unwrap(), refused);
    assert_eq!(spool.status().unwrap().sinks[0].dead_letters, 1);
    spool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redriven_dead_letters_are_delivered_once_the_route_exists_and_purge_drops_them() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    // First the route is missing.
    let refusing = Arc::new(Scripted {
        refused: vec!["KD9".to_owned()],
        ..Scripted::default()
    });
    let runner = Runner::start(Arc::clone(&spool), delivery(Arc::clone(&refusing)), 2);
    for n in 0..3 {
        spool.append(request("KD9", n).encode()).await.unwrap();
    }
    wait_idle(&runner).await;
    eventually("three dead letters", || {
        spool.dead_letters(None).unwrap().len() >= 3
    })
    .await;
    // A redrive while the route is still missing keeps them, with the reason.
    assert_eq!(runner.redrive(Some("scripted")).unwrap(), 3);
    assert!(runner.redrive(Some("nope")).is_err());
    // The redriven ones come back with their reason (a redrive task holds the spool till then).
    tokio::time::sleep(Duration::from_millis(200)).await;
    runner.drain(Duration::from_secs(1)).await;
    spool.close();
    drop((runner, spool));
    // The route exists now (a sink that accepts KD9): redrive delivers and forgets them.
    let spool = open(dir.path(), 1 << 20);
    assert_eq!(spool.dead_letters(None).unwrap().len(), 3);
    let accepting = Arc::new(Scripted::default());
    let runner = Runner::start(Arc::clone(&spool), delivery(Arc::clone(&accepting)), 2);
    assert_eq!(runner.redrive(None).unwrap(), 3);
    eventually("not redriven", || {
        spool.dead_letters(None).unwrap().is_empty()
    })
    .await;
    assert_eq!(accepting.confirmed.lock().unwrap().len(), 3);
    // Purge: dead letters of one sink, then nothing left.
    spool.dead_letter(0, 99, "unroutable", "x", Some(request("KD1", 1).encode()));
    eventually("the dead letter", || {
        !spool.dead_letters(None).unwrap().is_empty()
    })
    .await;
    assert_eq!(spool.purge(Some("scripted")).await.unwrap(), 1);
    assert!(spool.dead_letters(None).unwrap().is_empty());
    assert!(spool.purge(Some("nope")).await.is_err());
    runner.drain(Duration::from_secs(1)).await;
    spool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_and_recovers_when_records_leave() {
    let dir = tempfile::tempdir().unwrap();
    let record = request("KD1", 0).encode();
    let max = (record.len() * 3) as u64;
    let spool = open(dir.path(), max);
    for _ in 0..3 {
        spool.append(record.clone()).await.unwrap();
    }
    let err = spool.append(record.clone()).await.unwrap_err();
    assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    assert!(spool.check().is_err());
    let intake: &dyn Intake = spool.as_ref();
    let event = event_of(&request("KD1", 0));
    let refused = intake
        .accept(Arc::clone(&event), Some(record.clone()))
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), "spool_full");
    // A sink drains it: room again.
    let sink = Arc::new(Scripted::default());
    let runner = Runner::start(Arc::clone(&spool), delivery(sink), 2);
    wait_idle(&runner).await;
    eventually("room again", || spool.check().is_ok()).await;
    spool.append(record).await.unwrap();
    runner.drain(Duration::from_secs(1)).await;
    spool.close();
}

/// A redelivery (same event id) within the window gets Ok again without a second copy; after a
/// failed store the id is forgotten, so a retry is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_is_acknowledged_without_a_second_copy() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let request = request("KD1", 1);
    let event = event_of(&request);
    let intake: &dyn Intake = spool.as_ref();
    let (a, b) = tokio::join!(
        intake.accept(Arc::clone(&event), Some(request.encode())),
        intake.accept(Arc::clone(&event), Some(request.encode()))
    );
    a.unwrap();
    b.unwrap();
    intake
        .accept(Arc::clone(&event), Some(request.encode()))
        .await
        .unwrap();
    assert_eq!(spool.status().unwrap().sinks[0].depth, 1, "one copy");
    spool.close();
}

/// The live tail hands the sinks' readers the events the ingress normalized, in sequence; an
/// append without its event (a record from elsewhere) breaks the sequence, so the tail starts
/// again after it and the reader falls back to the store for that record. Delivery through
/// both paths is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_tail_holds_committed_events_in_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let intake: &dyn Intake = spool.as_ref();
    let mut ids = Vec::new();
    for n in 0..3 {
        let request = request("KD1", n);
        let event = event_of(&request);
        ids.push(event.id().to_owned());
        intake.accept(event, Some(request.encode())).await.unwrap();
    }
    let tail = spool.tail(0, 3, 10).expect("in the tail");
    let seen: Vec<(u64, String)> = tail.iter().map(|(s, e)| (*s, e.id().to_owned())).collect();
    assert_eq!(
        seen,
        vec![
            (0, ids[0].clone()),
            (1, ids[1].clone()),
            (2, ids[2].clone())
        ]
    );
    assert_eq!(spool.tail(1, 3, 1).unwrap().len(), 1, "limit");
    assert_eq!(spool.tail(1, 2, 10).unwrap().len(), 1, "upper bound");
    assert!(spool.tail(3, 4, 10).is_none(), "not committed yet");

    // A bare record (no event): the tail restarts after it.
    let bare = request("KD2", 0);
    ids.push(id_of(&bare));
    spool.append(bare.encode()).await.unwrap();
    let request = request("KD2", 1);
    let event = event_of(&request);
    ids.push(event.id().to_owned());
    intake.accept(event, Some(request.encode())).await.unwrap();
    assert!(spool.tail(0, 5, 10).is_none(), "seq 0 left the tail");
    assert!(
        spool.tail(3, 5, 10).is_none(),
        "seq 3 has no event in memory"
    );
    assert_eq!(spool.tail(4, 5, 10).unwrap()[0].1.id(), ids[4]);

    // Every record reaches the sink once, whichever path the reader took.
    let sink = Arc::new(Scripted::default());
    let runner = Runner::start(Arc::clone(&spool), delivery(Arc::clone(&sink)), 4);
    wait_idle(&runner).await;
    runner.drain(Duration::from_secs(1)).await;
    let mut delivered: Vec<String> = sink
        .confirmed
        .lock()
        .unwrap()
        .iter()
        .map(|(_, id)| id.clone())
        .collect();
    delivered.sort();
    ids.sort();
    assert_eq!(delivered, ids);
    spool.close();
}

/// A first delivery abandoned mid-append (its client went away and hyper dropped the request)
/// must not leave a redelivery of the same id waiting for ever: it counts as not stored, and
/// the redelivery stores the event (at-least-once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_does_not_wait_for_an_abandoned_first_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let intake: &dyn Intake = spool.as_ref();
    // Polled exactly once (it registers the id and queues the append), then dropped. The
    // writer thread may commit within that one poll on an idle machine: then try another id.
    // (A timeout of zero polls more than once: its timer only fires at the next millisecond.)
    let mut abandoned = None;
    for n in 0..100 {
        let request = request("KD1", n);
        let event = event_of(&request);
        let first = futures::FutureExt::now_or_never(
            intake.accept(Arc::clone(&event), Some(request.encode())),
        );
        if first.is_none() {
            abandoned = Some((request, event));
            break;
        }
    }
    let (request, event) = abandoned.expect("no first delivery was still waiting for its commit");
    tokio::time::timeout(
        Duration::from_secs(5),
        intake.accept(Arc::clone(&event), Some(request.encode())),
    )
    .await
    .expect("the redelivery was answered")
    .unwrap();
    assert!(spool.status().unwrap().sinks[0].depth >= 1);
    spool.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_per_spool() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let config = SpoolConfig {
        dir: dir.path().to_owned(),
        ..SpoolConfig::default()
    };
    let second = Spool::open(
        &config,
        vec!["scripted".into()],
        &prometheus::Registry::new(),
    );
    let error = second.err().expect("a second open is refused").to_string();
    assert!(error.contains("another flexbridge process"), "{error}");
    spool.close();
    drop(spool);
    open(dir.path(), 1 << 20).close();
}

/// Once every record was delivered and its segments deleted, a restart goes on numbering
/// after the last record (dead letters are keyed by sequence number and must never be
/// overwritten by a new event), and the dead letters are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbering_goes_on_after_everything_left_and_dead_letters_stay() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = 0;
    for round in 0..3u32 {
        let spool = open(dir.path(), 64 * 1024);
        let sink = Arc::new(Scripted {
            refused: vec!["KD9".to_owned()],
            ..Scripted::default()
        });
        let runner = Runner::start(Arc::clone(&spool), delivery(Arc::clone(&sink)), 4);
        let first = spool.append(request("KD9", round).encode()).await.unwrap();
        assert!(round == 0 || first > last, "{first} after {last}");
        for n in 0..200 {
            last = spool.append(request("KD1", n).encode()).await.unwrap();
        }
        wait_idle(&runner).await;
        eventually("the dead letter", || {
            spool.dead_letters(None).unwrap().len() == round as usize + 1
        })
        .await;
        eventually("nothing waiting", || spool.status().unwrap().bytes == 0).await;
        runner.drain(Duration::from_secs(1)).await;
        spool.close();
        drop((runner, spool));
        let segments = std::fs::read_dir(dir.path().join("segments"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".seg")
            })
            .count();
        assert!(
            segments <= 2,
            "finished segments are deleted: {segments} left"
        );
    }
    let spool = open(dir.path(), 64 * 1024);
    let letters = spool.dead_letters(None).unwrap();
    let seqs: std::collections::HashSet<u64> = letters.iter().map(|l| l.seq).collect();
    assert_eq!(seqs.len(), 3, "three distinct dead letters: {letters:?}");
    spool.close();
}

/// The cursors file lost (or unreadable, as after a crash at the wrong moment): every record
/// still kept is delivered again; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_cursors_mean_delivering_again_never_losing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path(), 1 << 20);
        for n in 0..5 {
            spool.append(request("KD1", n).encode()).await.unwrap();
        }
        let sink = Arc::new(Scripted::default());
        let runner = Runner::start(Arc::clone(&spool), delivery(Arc::clone(&sink)), 1);
        wait_idle(&runner).await;
        runner.drain(Duration::from_secs(1)).await;
        for n in 5..8 {
            spool.append(request("KD1", n).encode()).await.unwrap();
        }
        spool.close();
    }
    std::fs::write(dir.path().join("cursors.json"), b"{torn").unwrap();
    let spool = open(dir.path(), 1 << 20);
    // The five delivered records are still in the (small) segment: delivered again.
    assert_eq!(spool.status().unwrap().sinks[0].depth, 8);
    spool.close();
}

/// Progress is coalesced (the writer reads the latest cursor once per loop); however the
/// reports of many tasks interleave with the writer's loops, the last one always reaches it.
/// (A lost wake-up left 13 records counted as waiting in 2 runs out of 25 before the fix.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_reported_cursor_always_reaches_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let mut last = 0;
    for _ in 0..200 {
        last = spool.append(request("KD1", 0).encode()).await.unwrap() + 1;
    }
    for round in 0..50u64 {
        let reporters = (0..4u64).map(|task| {
            let spool = Arc::clone(&spool);
            tokio::spawn(async move {
                for step in 0..50u64 {
                    spool.progress(0, (round * 4 + step + task).min(last - 1));
                    tokio::task::yield_now().await;
                }
            })
        });
        futures::future::join_all(reporters).await;
        let target = (round * 4 + 49 + 3).min(last - 1);
        eventually("the writer has the last cursor", || {
            spool.status().unwrap().sinks[0].depth == last - target
        })
        .await;
    }
    spool.progress(0, last);
    eventually("everything finished", || spool.status().unwrap().bytes == 0).await;
    spool.close();
}

/// Every commit is timed and its records counted: the disk's share of the webhooks' latency,
/// and how many share an fsync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_timed_and_their_records_counted() {
    let dir = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let config = SpoolConfig {
        dir: dir.path().to_owned(),
        max_bytes: 1 << 20,
        ..SpoolConfig::default()
    };
    let spool = Spool::open(&config, vec!["scripted".into()], &registry).unwrap();
    let appends = (0..50).map(|n| {
        let spool = Arc::clone(&spool);
        async move { spool.append(request("KD1", n).encode()).await.unwrap() }
    });
    futures::future::join_all(appends).await;
    let families = registry.gather();
    let family = |name: &str| {
        families
            .iter()
            .find(|f| f.name() == name)
            .unwrap_or_else(|| panic!("{name} is exported"))
            .get_metric()[0]
            .clone()
    };
    let records = family("flexbridge_spool_committed_records_total");
    assert_eq!(records.get_counter().get_value(), 50.0);
    let commits = family("flexbridge_spool_commit_duration_seconds");
    let histogram = commits.get_histogram();
    assert!(
        (1..=50).contains(&histogram.get_sample_count()),
        "{} commits",
        histogram.get_sample_count()
    );
    assert!(histogram.get_sample_sum() > 0.0);
    spool.close();
}
