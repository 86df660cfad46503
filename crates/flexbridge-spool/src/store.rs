//! The spool's storage, in its directory:
//!
//! - `segments/`: the records, in an append-only segment log ([`crate::log`]), written by one
//!   thread that group-commits everything queued since its last write (one `write`, one
//!   `fdatasync`).
//! - `cursors.json`: per sink, the first sequence number it has not finished (every record
//!   below it was confirmed or dead-lettered by that sink). Written aside and renamed, at
//!   most every [`CURSOR_SAVE_INTERVAL`] and at close, without fsync: a cursor lost in a
//!   crash only means delivering again, never losing.
//! - `dead-letters.log`: the dead letters ([`crate::dead`]), fsynced before the cursor that
//!   passes them is saved.
//!
//! A segment is deleted once every configured sink's cursor is past its last record.

use crate::dead::{DeadLetters, Op};
use crate::log::{self, Index, Log};
use crate::recent::{Recent, Seen, State};
use crate::SpoolConfig;
use async_trait::async_trait;
use flexbridge_core::{Event, Intake, IntakeError, WebhookRequest};
use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};

/// Most commands folded into one write.
const MAX_BATCH: usize = 4096;

/// Committed events kept in memory for the sinks' readers: a reader that keeps up takes the
/// event the ingress normalized instead of reading the record back and normalizing it again.
/// A reader that falls further behind reads the log.
const TAIL_EVENTS: usize = 2048;

/// How often, at most, the cursors are saved while they move.
const CURSOR_SAVE_INTERVAL: Duration = Duration::from_millis(100);

/// The cursors' file.
const CURSORS_FILE: &str = "cursors.json";

/// Held locked while a process uses the spool.
const LOCK_FILE: &str = "lock";

/// The file of the earlier (redb) spool format.
const REDB_FILE: &str = "spool.redb";

/// Why the spool refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// `spool.max_bytes` is reached.
    #[error("the spool is full ({bytes} of {max} bytes waiting for the sinks)")]
    Full {
        /// Bytes waiting.
        bytes: u64,
        /// `spool.max_bytes`.
        max: u64,
    },
    /// The store failed (disk full, I/O error).
    #[error("the spool cannot write: {0}")]
    Storage(String),
    /// The spool was closed.
    #[error("the spool is closed")]
    Closed,
    /// No configured sink has this name.
    #[error("no sink is called {0:?}")]
    UnknownSink(String),
    /// The spool directory could not be prepared.
    #[error("cannot open the spool in {dir}: {message}")]
    Open {
        /// The directory.
        dir: String,
        /// Why.
        message: String,
    },
}

impl From<std::io::Error> for SpoolError {
    fn from(error: std::io::Error) -> Self {
        Self::Storage(error.to_string())
    }
}

/// Where an append's sequence number, or a purge's count (or the failure) goes.
type Reply = oneshot::Sender<Result<u64, SpoolError>>;

/// An append waiting for its write: record, event for the live tail, reply.
type Append = (Vec<u8>, Option<Arc<Event>>, Reply);

enum Command {
    Append {
        record: Vec<u8>,
        /// The normalized event, for the live tail.
        event: Option<Arc<Event>>,
        done: Reply,
    },
    /// Cursors moved (see [`Shared::reported`]).
    Wake,
    DeadLetter {
        sink: usize,
        seq: u64,
        reason: String,
        message: String,
        /// The record, when it may have left the log (a redrive that failed again).
        record: Option<Vec<u8>>,
    },
    /// A dead letter was delivered after a redrive: drop it.
    Forget {
        sink: usize,
        seq: u64,
    },
    /// A small durable write: tells whether the disk takes writes again.
    Probe,
    /// Drop the dead letters of one sink, or all; replies with the count.
    Purge {
        sink: Option<usize>,
        done: Reply,
    },
    Stop,
}

/// The spool: append (group-committed), read for delivery, record progress and dead letters.
pub struct Spool {
    index: Arc<Mutex<Index>>,
    recent: Mutex<Recent>,
    /// Woken when a first delivery settles, for redeliveries waiting on it.
    settled: tokio::sync::Notify,
    redelivery_waiters: AtomicUsize,
    redeliveries: IntCounter,
    commands: mpsc::UnboundedSender<Command>,
    committed: watch::Receiver<u64>,
    shared: Arc<Shared>,
    sinks: Vec<String>,
    start_cursors: Vec<u64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// State the writer thread and the spool share.
struct Shared {
    bytes: AtomicU64,
    max_bytes: u64,
    /// Set when an append found no room; cleared when records leave.
    full: AtomicBool,
    healthy: AtomicBool,
    metrics: SpoolMetrics,
    /// The most recently committed events, contiguous in sequence (see [`TAIL_EVENTS`]).
    tail: Mutex<std::collections::VecDeque<(u64, Arc<Event>)>>,
    /// Per sink, the cursor the writer holds (for status).
    cursors: Vec<AtomicU64>,
    /// Per sink, the latest cursor its runner reported. Progress comes with every event:
    /// the writer reads these once per loop instead of taking a command per event.
    reported: Vec<AtomicU64>,
    /// A [`Command::Wake`] is queued; the writer clears it when it starts a loop.
    wake_pending: AtomicBool,
    dead: Mutex<DeadLetters>,
}

/// The spool's metric families.
struct SpoolMetrics {
    bytes: IntGauge,
    depth: Vec<IntGauge>,
    oldest: Vec<prometheus::Gauge>,
    dead: Vec<IntGauge>,
    replayed: IntCounter,
    write_errors: IntCounter,
    commit_seconds: prometheus::Histogram,
    committed_records: IntCounter,
}

impl SpoolMetrics {
    fn register(
        registry: &Registry,
        sinks: &[String],
        max_bytes: u64,
    ) -> Result<Self, prometheus::Error> {
        let capacity = IntGauge::new(
            "flexbridge_spool_max_bytes",
            "spool.max_bytes: beyond it webhooks are answered 503 (compare flexbridge_spool_bytes).",
        )?;
        capacity.set(i64::try_from(max_bytes).unwrap_or(i64::MAX));
        registry.register(Box::new(capacity))?;
        let bytes = IntGauge::new(
            "flexbridge_spool_bytes",
            "Bytes of records in the spool waiting for at least one sink.",
        )?;
        let depth = IntGaugeVec::new(
            Opts::new(
                "flexbridge_spool_depth",
                "Records in the spool a sink has not finished yet.",
            ),
            &["sink"],
        )?;
        let oldest = prometheus::GaugeVec::new(
            Opts::new(
                "flexbridge_spool_oldest_age_seconds",
                "Age of the oldest record a sink has not finished (0 when none).",
            ),
            &["sink"],
        )?;
        let dead = IntGaugeVec::new(
            Opts::new(
                "flexbridge_spool_dead_letters",
                "Events a sink refused for good, kept in the spool's dead letters.",
            ),
            &["sink"],
        )?;
        let replayed = IntCounter::new(
            "flexbridge_spool_replayed_total",
            "Records found unfinished at start-up and delivered again.",
        )?;
        let write_errors = IntCounter::new(
            "flexbridge_spool_write_errors_total",
            "Spool commits that failed (the webhooks in them were answered 503).",
        )?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(depth.clone()))?;
        registry.register(Box::new(oldest.clone()))?;
        registry.register(Box::new(dead.clone()))?;
        registry.register(Box::new(replayed.clone()))?;
        let commit_seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "flexbridge_spool_commit_duration_seconds",
                "Time to write and fsync one commit (the records that arrived together); the \
                 disk's share of every spooled webhook's latency.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )?;
        let committed_records = IntCounter::new(
            "flexbridge_spool_committed_records_total",
            "Records made durable; over the commit count, the records per fsync.",
        )?;
        registry.register(Box::new(write_errors.clone()))?;
        registry.register(Box::new(commit_seconds.clone()))?;
        registry.register(Box::new(committed_records.clone()))?;
        Ok(Self {
            bytes,
            depth: sinks
                .iter()
                .map(|s| depth.with_label_values(&[s]))
                .collect(),
            oldest: sinks
                .iter()
                .map(|s| oldest.with_label_values(&[s]))
                .collect(),
            dead: sinks.iter().map(|s| dead.with_label_values(&[s])).collect(),
            replayed,
            write_errors,
            commit_seconds,
            committed_records,
        })
    }
}

/// One dead letter.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    /// The sink that refused it.
    pub sink: String,
    /// Its sequence number in the spool.
    pub seq: u64,
    /// When it was dead-lettered (milliseconds since the epoch).
    pub time_ms: u64,
    /// The sink's low-cardinality reason.
    pub reason: String,
    /// The sink's message.
    pub message: String,
    /// The spool record.
    #[serde(skip)]
    pub record: Vec<u8>,
}

/// One sink's view of the spool.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SinkStatus {
    /// The sink.
    pub sink: String,
    /// Records it has not finished.
    pub depth: u64,
    /// Age of the oldest of them, in seconds.
    pub oldest_age_secs: f64,
    /// Its dead letters.
    pub dead_letters: u64,
}

/// The whole spool's state.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpoolStatus {
    /// Bytes of records waiting.
    pub bytes: u64,
    /// `spool.max_bytes`.
    pub max_bytes: u64,
    /// Whether the last commit succeeded.
    pub writable: bool,
    /// Per sink.
    pub sinks: Vec<SinkStatus>,
}

/// Segment size: an eighth of `max_bytes` (the disk a spool needs beyond `max_bytes` is about
/// two segments: the rest of one whose records are partly delivered, and the spare kept for
/// reuse), between 1 and 64 MiB.
fn segment_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 8).clamp(1 << 20, 64 << 20)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn encode_dead(reason: &str, message: &str, record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + reason.len() + message.len() + record.len());
    out.extend_from_slice(&now_ms().to_be_bytes());
    for text in [reason, message] {
        out.extend_from_slice(&(text.len() as u32).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(record);
    out
}

fn decode_dead(sink: &str, seq: u64, bytes: &[u8]) -> Option<DeadLetter> {
    let time_ms = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
    let mut at = 8;
    let mut text = || -> Option<String> {
        let len = u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
        let value = String::from_utf8_lossy(bytes.get(at + 4..at + 4 + len)?).into_owned();
        at += 4 + len;
        Some(value)
    };
    let reason = text()?;
    let message = text()?;
    Some(DeadLetter {
        sink: sink.to_owned(),
        seq,
        time_ms,
        reason,
        message,
        record: bytes.get(at..)?.to_vec(),
    })
}

/// The saved cursors; a missing or unreadable file means none (everything kept is
/// delivered again).
fn load_cursors(dir: &Path) -> std::collections::HashMap<String, u64> {
    let path = dir.join(CURSORS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            tracing::warn!(file = %path.display(), %error, "spool: unreadable cursors; every record kept is delivered again");
            std::collections::HashMap::new()
        }),
        Err(_) => std::collections::HashMap::new(),
    }
}

/// Writes the cursors aside and renames them into place; `durable` also fsyncs (at close).
fn save_cursors(
    dir: &Path,
    sinks: &[String],
    cursors: &[u64],
    durable: bool,
) -> std::io::Result<()> {
    let map: std::collections::BTreeMap<&str, u64> = sinks
        .iter()
        .map(String::as_str)
        .zip(cursors.iter().copied())
        .collect();
    let bytes = serde_json::to_vec(&map).map_err(std::io::Error::other)?;
    let aside = dir.join(format!("{CURSORS_FILE}.new"));
    {
        let mut file = std::fs::File::create(&aside)?;
        std::io::Write::write_all(&mut file, &bytes)?;
        if durable {
            file.sync_data()?;
        }
    }
    std::fs::rename(&aside, dir.join(CURSORS_FILE))?;
    if durable {
        log::sync_dir(dir)?;
    }
    Ok(())
}

impl Spool {
    /// Opens (or creates) the spool in `dir` for these sinks (configuration order) and starts
    /// its writer thread. Records a sink had not finished are delivered again.
    pub fn open(
        config: &SpoolConfig,
        sinks: Vec<String>,
        registry: &Registry,
    ) -> Result<Arc<Self>, SpoolError> {
        let (dir, max_bytes) = (config.dir.as_path(), config.max_bytes);
        let open_error = |message: String| SpoolError::Open {
            dir: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_error(e.to_string()))?;
        if dir.join(REDB_FILE).exists() {
            return Err(open_error(format!(
                "it holds {REDB_FILE}, a spool of an earlier development build of flexbridge; \
                 let that build deliver it (or remove the file) before starting this one"
            )));
        }
        // One process per spool: a second one would interleave its writes with ours. The
        // lock goes with the writer thread (at close) or with the process.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(|e| open_error(e.to_string()))?;
        lock.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => {
                open_error("another flexbridge process is using it".to_owned())
            }
            std::fs::TryLockError::Error(e) => open_error(e.to_string()),
        })?;
        let stored = load_cursors(dir);
        let dead = DeadLetters::open(dir).map_err(|e| open_error(e.to_string()))?;
        // Sequence numbers are never reused (dead letters are keyed by them).
        let min_next = stored
            .values()
            .copied()
            .chain(dead.last_seq().map(|s| s + 1))
            .max()
            .unwrap_or(0);
        let opened = Log::open(dir, segment_bytes(max_bytes), min_next)
            .map_err(|e| open_error(e.to_string()))?;
        if opened.cut > 0 {
            tracing::warn!(
                bytes = opened.cut,
                "spool: a torn tail was cut (a write the crash interrupted; none of it was acknowledged)"
            );
        }
        let log = opened.log;
        let (first, next_seq) = (opened.first_seq, log.next_seq());
        // A sink new to this spool starts at the oldest record still kept.
        let start_cursors: Vec<u64> = sinks
            .iter()
            .map(|sink| {
                stored
                    .get(sink)
                    .map_or(first, |c| (*c).clamp(first, next_seq))
            })
            .collect();
        let low = start_cursors.iter().copied().min().unwrap_or(next_seq);
        let bytes = log.payload_bytes(low, next_seq);

        let metrics = SpoolMetrics::register(registry, &sinks, max_bytes)
            .map_err(|e| open_error(e.to_string()))?;
        let redeliveries = IntCounter::new(
            "flexbridge_spool_redeliveries_total",
            "Deliveries of an event accepted shortly before, answered 200 without a second copy.",
        )
        .and_then(|c| registry.register(Box::new(c.clone())).map(|()| c))
        .map_err(|e| open_error(e.to_string()))?;
        metrics.bytes.set(bytes as i64);
        let mut replayed = 0;
        for (i, cursor) in start_cursors.iter().enumerate() {
            let depth = next_seq.saturating_sub(*cursor);
            replayed += depth;
            metrics.depth[i].set(depth as i64);
            metrics.dead[i].set(dead.count(&sinks[i]) as i64);
        }
        metrics.replayed.inc_by(replayed);
        if replayed > 0 {
            tracing::info!(
                records = replayed,
                bytes,
                "spool: delivering again what the sinks had not confirmed before the restart"
            );
        }
        let shared = Arc::new(Shared {
            bytes: AtomicU64::new(bytes),
            max_bytes,
            full: AtomicBool::new(bytes >= max_bytes),
            healthy: AtomicBool::new(true),
            metrics,
            tail: Mutex::new(std::collections::VecDeque::with_capacity(TAIL_EVENTS)),
            cursors: start_cursors.iter().map(|c| AtomicU64::new(*c)).collect(),
            reported: start_cursors.iter().map(|c| AtomicU64::new(*c)).collect(),
            wake_pending: AtomicBool::new(false),
            dead: Mutex::new(dead),
        });
        let (commands, receiver) = mpsc::unbounded_channel();
        let (committed_tx, committed) = watch::channel(next_seq);
        // Waking a task from a foreign thread costs a futex and often an IPI per task: the
        // writer hands each write's replies to one task on the runtime, which wakes the
        // waiting requests locally (one cross-thread wake per write).
        let confirmer = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (confirm, mut confirmations) = mpsc::unbounded_channel::<Vec<(Reply, u64)>>();
            runtime.spawn(async move {
                while let Some(replies) = confirmations.recv().await {
                    for (done, seq) in replies {
                        let _ = done.send(Ok(seq));
                    }
                }
            });
            confirm
        });
        let index = log.index();
        let writer = Writer {
            log,
            dir: dir.to_owned(),
            shared: Arc::clone(&shared),
            sinks: sinks.clone(),
            cursors: start_cursors.clone(),
            saved: start_cursors.clone(),
            saved_at: Instant::now(),
            save_failed: false,
            deleted_below: low,
            pending_dead: Vec::new(),
            _lock: lock,
            committed: committed_tx,
            confirmer,
        };
        let handle = std::thread::Builder::new()
            .name("spool-writer".to_owned())
            .spawn(move || writer.run(receiver))
            .map_err(|e| open_error(e.to_string()))?;
        Ok(Arc::new(Self {
            index,
            settled: tokio::sync::Notify::new(),
            redelivery_waiters: AtomicUsize::new(0),
            recent: Mutex::new(Recent::new(
                config.redelivery_window,
                config.redelivery_entries,
            )),
            redeliveries,
            commands,
            committed,
            shared,
            sinks,
            start_cursors,
            writer: Mutex::new(Some(handle)),
        }))
    }

    /// Appends a record; returns its sequence number once it is durable (fsynced).
    pub async fn append(&self, record: Vec<u8>) -> Result<u64, SpoolError> {
        self.append_event(record, None).await
    }

    /// Appends a record and keeps its event in the live tail for the sinks' readers.
    async fn append_event(
        &self,
        record: Vec<u8>,
        event: Option<Arc<Event>>,
    ) -> Result<u64, SpoolError> {
        let size = record.len() as u64;
        let before = self.shared.bytes.fetch_add(size, Ordering::AcqRel);
        if before + size > self.shared.max_bytes {
            self.shared.bytes.fetch_sub(size, Ordering::AcqRel);
            self.shared.full.store(true, Ordering::Release);
            return Err(SpoolError::Full {
                bytes: before,
                max: self.shared.max_bytes,
            });
        }
        let (done, result) = oneshot::channel();
        if self
            .commands
            .send(Command::Append {
                record,
                event,
                done,
            })
            .is_err()
        {
            self.shared.bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(SpoolError::Closed);
        }
        result.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// The sinks, in configuration order.
    pub fn sinks(&self) -> &[String] {
        &self.sinks
    }

    /// Where sink `index` starts after opening.
    pub fn start_cursor(&self, index: usize) -> u64 {
        self.start_cursors.get(index).copied().unwrap_or(0)
    }

    /// The next sequence number to be committed (records below it are durable).
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Up to `limit` records with `from <= seq < to`, in order.
    pub fn read(
        &self,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        Ok(log::read(&self.index, from, to, limit)?)
    }

    /// Up to `limit` committed events with `from <= seq < to`, in order, from the live tail;
    /// `None` when `from` is no longer (or not yet) there: read the store then.
    pub fn tail(&self, from: u64, to: u64, limit: usize) -> Option<Vec<(u64, Arc<Event>)>> {
        let tail = self.shared.tail.lock().ok()?;
        let (first, _) = tail.front()?;
        let skip = usize::try_from(from.checked_sub(*first)?).ok()?;
        if skip >= tail.len() {
            return None;
        }
        let count = usize::try_from(to.saturating_sub(from))
            .unwrap_or(usize::MAX)
            .min(limit);
        Some(tail.range(skip..).take(count).cloned().collect())
    }

    /// Sink `index` finished every record below `cursor`.
    pub fn progress(&self, index: usize, cursor: u64) {
        if let Some(reported) = self.shared.reported.get(index) {
            reported.fetch_max(cursor, Ordering::AcqRel);
            // One wake per writer loop, however many events finished meanwhile.
            if !self.shared.wake_pending.swap(true, Ordering::AcqRel) {
                let _ = self.commands.send(Command::Wake);
            }
        }
    }

    /// Sink `index` refused record `seq` for good: keep it in the dead letters. `record` is
    /// needed when the record may have left the spool (a redriven dead letter).
    pub fn dead_letter(
        &self,
        index: usize,
        seq: u64,
        reason: &str,
        message: &str,
        record: Option<Vec<u8>>,
    ) {
        let _ = self.commands.send(Command::DeadLetter {
            sink: index,
            seq,
            reason: reason.to_owned(),
            message: message.to_owned(),
            record,
        });
    }

    /// A redriven dead letter was delivered: drop it.
    pub fn forget(&self, index: usize, seq: u64) {
        let _ = self.commands.send(Command::Forget { sink: index, seq });
    }

    /// Drops the dead letters of `sink` (all sinks when `None`); returns how many.
    pub async fn purge(&self, sink: Option<&str>) -> Result<u64, SpoolError> {
        let sink = match sink {
            Some(name) => Some(self.index_of(name)?),
            None => None,
        };
        let (done, result) = oneshot::channel();
        self.commands
            .send(Command::Purge { sink, done })
            .map_err(|_| SpoolError::Closed)?;
        result.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// The configuration index of sink `name`.
    pub fn index_of(&self, name: &str) -> Result<usize, SpoolError> {
        self.sinks
            .iter()
            .position(|s| s == name)
            .ok_or_else(|| SpoolError::UnknownSink(name.to_owned()))
    }

    /// Whether the spool accepts writes: its last commit succeeded and it has room.
    pub fn check(&self) -> Result<(), SpoolError> {
        if !self.shared.healthy.load(Ordering::Acquire) {
            // Readiness probes drive recovery: without traffic nothing else would write.
            let _ = self.commands.send(Command::Probe);
            return Err(SpoolError::Storage("the last commit failed".to_owned()));
        }
        let bytes = self.shared.bytes.load(Ordering::Acquire);
        if self.shared.full.load(Ordering::Acquire) {
            return Err(SpoolError::Full {
                bytes,
                max: self.shared.max_bytes,
            });
        }
        Ok(())
    }

    /// Depth, oldest age and dead letters per sink; updates the gauges.
    pub fn status(&self) -> Result<SpoolStatus, SpoolError> {
        let next = *self.committed.borrow();
        let mut sinks = Vec::with_capacity(self.sinks.len());
        for (i, sink) in self.sinks.iter().enumerate() {
            let cursor = self.shared.cursors[i].load(Ordering::Acquire);
            let oldest = log::read(&self.index, cursor, next, 1)?
                .first()
                .and_then(|(_, record)| WebhookRequest::decode(record).ok())
                .and_then(|r| SystemTime::now().duration_since(r.received_at).ok())
                .unwrap_or(Duration::ZERO);
            let dead_letters = self
                .shared
                .dead
                .lock()
                .map_err(|_| SpoolError::Storage("dead letters unavailable".to_owned()))?
                .count(sink);
            self.shared.metrics.oldest[i].set(oldest.as_secs_f64());
            sinks.push(SinkStatus {
                sink: sink.clone(),
                depth: next.saturating_sub(cursor),
                oldest_age_secs: oldest.as_secs_f64(),
                dead_letters,
            });
        }
        Ok(SpoolStatus {
            bytes: self.shared.bytes.load(Ordering::Acquire),
            max_bytes: self.shared.max_bytes,
            writable: self.shared.healthy.load(Ordering::Acquire),
            sinks,
        })
    }

    /// The dead letters, of one sink or of all.
    pub fn dead_letters(&self, sink: Option<&str>) -> Result<Vec<DeadLetter>, SpoolError> {
        let listed = self
            .shared
            .dead
            .lock()
            .map_err(|_| SpoolError::Storage("dead letters unavailable".to_owned()))?
            .list(sink)?;
        Ok(listed
            .into_iter()
            .filter_map(|(name, seq, letter)| decode_dead(&name, seq, &letter))
            .collect())
    }

    /// True when `id` was accepted recently and is durable: this delivery needs no second
    /// copy. While its first delivery is being stored, waits for the outcome; false when it
    /// is new (now registered as being stored) or its first delivery was not stored.
    async fn redelivered(&self, id: &str) -> bool {
        let recent = || {
            self.recent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let seen = recent().check(id, std::time::Instant::now());
        match seen {
            Seen::New => return false,
            Seen::Again(State::Stored) => return true,
            Seen::Again(State::Storing) => {}
        }
        self.redelivery_waiters.fetch_add(1, Ordering::AcqRel);
        let _waiting = Count(&self.redelivery_waiters);
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            // Registered before looking, so a settle in between is not missed.
            notified.as_mut().enable();
            let seen = recent().check(id, std::time::Instant::now());
            match seen {
                Seen::Again(State::Storing) => notified.await,
                Seen::Again(State::Stored) => return true,
                // Not stored the first time (or aged out): this delivery stores it.
                Seen::New => return false,
            }
        }
    }

    /// Stops the writer after everything queued so far is committed.
    pub fn close(&self) {
        let _ = self.commands.send(Command::Stop);
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

#[async_trait]
impl Intake for Spool {
    fn wants_record(&self) -> bool {
        true
    }

    async fn accept(&self, event: Arc<Event>, record: Option<Vec<u8>>) -> Result<(), IntakeError> {
        let Some(record) = record else {
            return Err(IntakeError::Spool {
                reason: "spool_unavailable",
                message: "no spool record was made for this event".to_owned(),
            });
        };
        if self.redelivered(event.id()).await {
            self.redeliveries.inc();
            return Ok(());
        }
        // Settles the id even when this future is dropped mid-append (the client went away):
        // a redelivery waiting on it must not wait forever.
        let mut settle = Settle {
            spool: self,
            id: event.id(),
            stored: false,
        };
        let result = self.append_event(record, Some(Arc::clone(&event))).await;
        settle.stored = result.is_ok();
        drop(settle);
        match result {
            Ok(_) => Ok(()),
            Err(error @ SpoolError::Full { .. }) => Err(IntakeError::Spool {
                reason: "spool_full",
                message: error.to_string(),
            }),
            Err(error) => Err(IntakeError::Spool {
                reason: "spool_unavailable",
                message: error.to_string(),
            }),
        }
    }
}

/// Records how the first delivery of an id ended, and wakes redeliveries waiting on it. On
/// drop, so that an append abandoned by its request counts as not stored (a retry stores the
/// event again: at-least-once, never a wait without end).
struct Settle<'a> {
    spool: &'a Spool,
    id: &'a str,
    stored: bool,
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        self.spool
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .settle(self.id, self.stored);
        if self.spool.redelivery_waiters.load(Ordering::Acquire) > 0 {
            self.spool.settled.notify_waiters();
        }
    }
}

/// Decrements a counter when dropped.
struct Count<'a>(&'a AtomicUsize);

impl Drop for Count<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A dead letter waiting to be written: sink, sequence number, encoded letter.
type PendingDead = (usize, u64, Vec<u8>);

/// The writer thread: folds every queued command into one write.
struct Writer {
    log: Log,
    dir: PathBuf,
    shared: Arc<Shared>,
    sinks: Vec<String>,
    cursors: Vec<u64>,
    /// The cursors last saved.
    saved: Vec<u64>,
    saved_at: Instant,
    save_failed: bool,
    /// Records below this were counted out of `bytes`.
    deleted_below: u64,
    /// Dead letters not yet durable (a failed write is retried with the next batch); no
    /// cursor is saved and no segment deleted past them.
    pending_dead: Vec<PendingDead>,
    /// The spool's lock, released with the writer.
    _lock: std::fs::File,
    committed: watch::Sender<u64>,
    /// Where a write's replies go to be sent from the runtime; `None`: sent from here.
    confirmer: Option<mpsc::UnboundedSender<Vec<(Reply, u64)>>>,
}

impl Writer {
    fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Command>) {
        let mut stop = false;
        while !stop {
            // A set flag whose Wake was already drained by an earlier loop still means a
            // cursor this writer has not read: loop without waiting.
            let first = if self.shared.wake_pending.load(Ordering::Acquire) {
                Command::Wake
            } else {
                match receiver.blocking_recv() {
                    Some(command) => command,
                    None => break,
                }
            };
            self.shared.wake_pending.swap(false, Ordering::AcqRel);
            // Read before draining the commands: a runner sends a dead letter before it
            // reports a cursor past it, so every dead letter those cursors pass is in the
            // drained batch, taken before anything is deleted.
            let reported = self.reported();
            let mut batch = vec![first];
            let mut drained = false;
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => {
                        drained = true;
                        break;
                    }
                }
            }
            let mut appends: Vec<Append> = Vec::new();
            let mut forget = Vec::new();
            let mut purges = Vec::new();
            let mut probe = false;
            for command in batch {
                match command {
                    Command::Append {
                        record,
                        event,
                        done,
                    } => appends.push((record, event, done)),
                    Command::Wake => {}
                    Command::DeadLetter {
                        sink,
                        seq,
                        reason,
                        message,
                        record,
                    } => self.take_dead_letter(sink, seq, &reason, &message, record),
                    Command::Forget { sink, seq } => forget.push((sink, seq)),
                    Command::Purge { sink, done } => purges.push((sink, done)),
                    Command::Probe => probe = true,
                    Command::Stop => stop = true,
                }
            }
            self.write_appends(appends);
            self.write_dead_letters(&forget, purges);
            if probe {
                self.probe();
            }
            if drained {
                self.take_reported(&reported);
            }
            self.advance(stop);
        }
        // Only with nothing left unread (a dead letter in it would be passed).
        if receiver.try_recv().is_err() {
            let reported = self.reported();
            self.take_reported(&reported);
        }
        self.advance(true);
    }

    fn reported(&self) -> Vec<u64> {
        self.shared
            .reported
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .collect()
    }

    fn take_reported(&mut self, reported: &[u64]) {
        for (cursor, reported) in self.cursors.iter_mut().zip(reported) {
            *cursor = (*cursor).max(*reported);
        }
    }

    /// Keeps a dead letter for the next dead-letter write; the record is read from the log
    /// now, while the sink's cursor has not passed it.
    fn take_dead_letter(
        &mut self,
        sink: usize,
        seq: u64,
        reason: &str,
        message: &str,
        record: Option<Vec<u8>>,
    ) {
        let record = match record {
            Some(record) => record,
            None => match log::read(&self.log.index(), seq, seq + 1, 1) {
                Ok(mut records) => records.pop().map(|(_, r)| r).unwrap_or_default(),
                Err(error) => {
                    tracing::error!(%error, seq, "spool: cannot read the record of a dead letter; it is kept without it");
                    Vec::new()
                }
            },
        };
        self.pending_dead
            .push((sink, seq, encode_dead(reason, message, &record)));
    }

    fn write_appends(&mut self, appends: Vec<Append>) {
        if appends.is_empty() {
            return;
        }
        let first_seq = self.log.next_seq();
        let started = Instant::now();
        let appended = self
            .log
            .append(appends.iter().map(|(r, _, _)| r.as_slice()));
        match appended {
            Ok(_) => {
                let metrics = &self.shared.metrics;
                metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.committed_records.inc_by(appends.len() as u64);
                self.shared.healthy.store(true, Ordering::Release);
                self.extend_tail(first_seq, &appends);
                let _ = self.committed.send(self.log.next_seq());
                let replies: Vec<(Reply, u64)> = appends
                    .into_iter()
                    .enumerate()
                    .map(|(n, (_, _, done))| (done, first_seq + n as u64))
                    .collect();
                match &self.confirmer {
                    Some(confirmer) => {
                        if let Err(unsent) = confirmer.send(replies) {
                            for (done, seq) in unsent.0 {
                                let _ = done.send(Ok(seq));
                            }
                        }
                    }
                    None => {
                        for (done, seq) in replies {
                            let _ = done.send(Ok(seq));
                        }
                    }
                }
            }
            Err(error) => {
                self.shared.healthy.store(false, Ordering::Release);
                self.shared.metrics.write_errors.inc();
                tracing::error!(%error, records = appends.len(), "spool commit failed: the webhooks in it are answered 503");
                for (record, _, done) in appends {
                    self.shared
                        .bytes
                        .fetch_sub(record.len() as u64, Ordering::AcqRel);
                    let _ = done.send(Err(SpoolError::Storage(error.to_string())));
                }
            }
        }
    }

    /// Writes the pending dead letters and forgets (one fsync), then each purge.
    fn write_dead_letters(&mut self, forget: &[(usize, u64)], purges: Vec<(Option<usize>, Reply)>) {
        if self.pending_dead.is_empty() && forget.is_empty() && purges.is_empty() {
            return;
        }
        let Ok(mut dead) = self.shared.dead.lock() else {
            return;
        };
        let name = |i: usize| self.sinks.get(i).map_or("", String::as_str);
        let mut ops: Vec<Op<'_>> = self
            .pending_dead
            .iter()
            .map(|(sink, seq, letter)| Op::Add(name(*sink), *seq, letter))
            .collect();
        ops.extend(
            forget
                .iter()
                .map(|(sink, seq)| Op::Forget(name(*sink), *seq)),
        );
        let mut failure = None;
        if let Err(error) = dead.write(&ops) {
            self.shared.metrics.write_errors.inc();
            tracing::error!(%error, letters = self.pending_dead.len(), "spool: cannot write dead letters; retried with the next write (their sinks' cursors wait)");
            failure = Some(error.to_string());
        } else {
            self.pending_dead.clear();
        }
        for (sink, done) in purges {
            let result = match &failure {
                Some(error) => Err(SpoolError::Storage(error.clone())),
                None => {
                    let count = match sink {
                        Some(i) => dead.count(name(i)),
                        None => dead.len(),
                    };
                    let sink_name = sink.map(name);
                    dead.write(&[Op::Purge(sink_name)])
                        .map(|()| count)
                        .map_err(SpoolError::from)
                }
            };
            let _ = done.send(result);
        }
        for (i, sink) in self.sinks.iter().enumerate() {
            self.shared.metrics.dead[i].set(dead.count(sink) as i64);
        }
    }

    /// A small fsynced write beside the log: whether the disk takes writes again.
    fn probe(&mut self) {
        let path = self.dir.join(".probe");
        let result = std::fs::File::create(&path).and_then(|file| {
            std::io::Write::write_all(&mut &file, &[0u8; 4096])?;
            file.sync_data()
        });
        let _ = std::fs::remove_file(&path);
        match result {
            Ok(()) => self.shared.healthy.store(true, Ordering::Release),
            Err(error) => tracing::debug!(%error, "spool: the disk still refuses writes"),
        }
    }

    /// Frees what every sink finished, deletes the segments behind them, saves the cursors
    /// (at most every [`CURSOR_SAVE_INTERVAL`]; durably when `closing`) and updates gauges.
    fn advance(&mut self, closing: bool) {
        let next = self.log.next_seq();
        // Nothing passes a dead letter that is not durable yet.
        let mut saveable = self.cursors.clone();
        for (sink, seq, _) in &self.pending_dead {
            if let Some(c) = saveable.get_mut(*sink) {
                *c = (*c).min(*seq);
            }
        }
        let low = saveable.iter().copied().min().unwrap_or(next);
        if low > self.deleted_below {
            let freed = self.log.payload_bytes(self.deleted_below, low);
            self.deleted_below = low;
            let bytes = self.shared.bytes.fetch_sub(freed, Ordering::AcqRel) - freed;
            if freed > 0 {
                self.shared.full.store(false, Ordering::Release);
            }
            self.shared.metrics.bytes.set(bytes as i64);
            if let Err(error) = self.log.delete_below(low) {
                tracing::warn!(%error, "spool: cannot delete a finished segment (retried later)");
            }
        }
        for (i, cursor) in self.cursors.iter().enumerate() {
            self.shared.cursors[i].store(*cursor, Ordering::Release);
            self.shared.metrics.depth[i].set(next.saturating_sub(*cursor) as i64);
        }
        let due = closing || self.saved_at.elapsed() >= CURSOR_SAVE_INTERVAL;
        if saveable != self.saved && due {
            match save_cursors(&self.dir, &self.sinks, &saveable, closing) {
                Ok(()) => {
                    self.saved = saveable;
                    self.saved_at = Instant::now();
                    if std::mem::take(&mut self.save_failed) {
                        tracing::info!("spool: cursors saved again");
                    }
                }
                Err(error) => {
                    if !std::mem::replace(&mut self.save_failed, true) {
                        tracing::warn!(%error, "spool: cannot save the cursors (a restart would deliver more again)");
                    }
                }
            }
        }
    }

    /// Puts the events of a write that started at `first_seq` in the live tail; an append
    /// without its event breaks the sequence, so the tail restarts after it.
    fn extend_tail(&self, first_seq: u64, appends: &[Append]) {
        if appends.is_empty() {
            return;
        }
        let Ok(mut tail) = self.shared.tail.lock() else {
            return;
        };
        if tail.back().is_some_and(|(seq, _)| seq + 1 != first_seq) {
            tail.clear();
        }
        for (n, (_, event, _)) in appends.iter().enumerate() {
            match event {
                Some(event) => tail.push_back((first_seq + n as u64, Arc::clone(event))),
                None => tail.clear(),
            }
        }
        while tail.len() > TAIL_EVENTS {
            tail.pop_front();
        }
    }
}
