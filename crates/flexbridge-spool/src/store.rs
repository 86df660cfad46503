//! The spool's storage: one redb file with three tables, written by one thread that
//! group-commits everything queued since its last commit.
//!
//! - `events`: sequence number -> spool record ([`flexbridge_core::WebhookRequest::encode`]).
//! - `cursors`: sink name -> the first sequence number that sink has not finished (every
//!   record below it was confirmed or dead-lettered by that sink).
//! - `dead_letters`: (sink, sequence number) -> time, reason, message and the record.
//!
//! A record is deleted once every configured sink's cursor is past it.

use crate::recent::{Recent, Seen, State};
use crate::SpoolConfig;
use async_trait::async_trait;
use flexbridge_core::{Event, Intake, IntakeError, WebhookRequest};
use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
const DEAD: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead_letters");

/// redb's cache: the spool reads back what it wrote moments ago; 4 MiB measured no slower
/// than 16 MiB, with less memory.
const SPOOL_CACHE_BYTES: usize = 4 << 20;

/// Most commands folded into one commit.
const MAX_BATCH: usize = 4096;

/// Committed events kept in memory for the sinks' readers: a reader that keeps up takes the
/// event the ingress normalized instead of reading the record back and normalizing it again.
/// A reader that falls further behind reads the store.
const TAIL_EVENTS: usize = 2048;

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

impl<E: Into<redb::Error>> From<E> for SpoolError {
    fn from(error: E) -> Self {
        Self::Storage(error.into().to_string())
    }
}

/// Where an append's sequence number, or a purge's count (or the failure) goes.
type Reply = oneshot::Sender<Result<u64, SpoolError>>;

/// An append waiting for its commit: record, event for the live tail, reply.
type Append = (Vec<u8>, Option<Arc<Event>>, Reply);

/// A dead letter to write: sink, sequence number, reason, message, record if known.
type DeadCommand = (usize, u64, String, String, Option<Vec<u8>>);

enum Command {
    Append {
        record: Vec<u8>,
        /// The normalized event, for the live tail.
        event: Option<Arc<Event>>,
        done: Reply,
    },
    Progress {
        sink: usize,
        cursor: u64,
    },
    DeadLetter {
        sink: usize,
        seq: u64,
        reason: String,
        message: String,
        /// The record, when it may have left the events table (a redrive that failed again).
        record: Option<Vec<u8>>,
    },
    /// A dead letter was delivered after a redrive: drop it.
    Forget {
        sink: usize,
        seq: u64,
    },
    /// An empty durable commit: tells whether the disk takes writes again.
    Probe,
    /// Drop the dead letters of one sink, or all; replies with the count.
    Purge {
        sink: Option<usize>,
        done: Reply,
    },
    Stop,
}

/// The open database, replaced after an I/O error: redb refuses every transaction after one
/// until it is reopened, and a disk that was full may have room again.
struct Store {
    path: std::path::PathBuf,
    current: std::sync::RwLock<Option<Arc<Database>>>,
}

impl Store {
    fn open(path: &std::path::Path) -> Result<Database, redb::DatabaseError> {
        // redb caches up to 1 GiB by default; the spool reads what it just wrote, so a small
        // cache does (the kernel's page cache holds the rest) and memory stays bounded.
        Database::builder()
            .set_cache_size(SPOOL_CACHE_BYTES)
            .create(path)
    }

    /// The database, for one transaction.
    fn get(&self) -> Result<Arc<Database>, SpoolError> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| SpoolError::Storage("the spool is being reopened".to_owned()))
    }

    /// Closes the database (once the transactions using it ended) and opens it again.
    fn reopen(&self) -> Result<(), SpoolError> {
        let mut slot = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = slot.take() {
            // Readers hold it only for one short read transaction.
            let started = std::time::Instant::now();
            while Arc::strong_count(&old) > 1 && started.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(old);
        }
        let db = Self::open(&self.path).map_err(|e| SpoolError::Storage(e.to_string()))?;
        *slot = Some(Arc::new(db));
        Ok(())
    }
}

/// The spool: append (group-committed), read for delivery, record progress and dead letters.
pub struct Spool {
    db: Arc<Store>,
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
}

/// The spool's metric families.
struct SpoolMetrics {
    bytes: IntGauge,
    depth: Vec<IntGauge>,
    oldest: Vec<prometheus::Gauge>,
    dead: Vec<IntGauge>,
    replayed: IntCounter,
    write_errors: IntCounter,
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
        registry.register(Box::new(write_errors.clone()))?;
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
        let path = dir.join("spool.redb");
        let db = Store::open(&path).map_err(|e| open_error(e.to_string()))?;
        let tx = db.begin_write()?;
        tx.open_table(EVENTS)?;
        tx.open_table(CURSORS)?;
        tx.open_table(DEAD)?;
        tx.commit()?;

        let tx = db.begin_read()?;
        let events = tx.open_table(EVENTS)?;
        let cursors = tx.open_table(CURSORS)?;
        let mut bytes = 0u64;
        for entry in events.iter()? {
            bytes += entry?.1.value().len() as u64;
        }
        let first = events.first()?.map(|(k, _)| k.value());
        let last = events.last()?.map(|(k, _)| k.value());
        let mut highest_cursor = 0;
        for entry in cursors.iter()? {
            highest_cursor = highest_cursor.max(entry?.1.value());
        }
        let next_seq = last.map_or(0, |l| l + 1).max(highest_cursor);
        let mut start_cursors = Vec::with_capacity(sinks.len());
        for sink in &sinks {
            // A sink new to this spool starts at the oldest record still kept.
            let stored = cursors.get(sink.as_str())?.map(|c| c.value());
            start_cursors.push(stored.unwrap_or_else(|| first.unwrap_or(next_seq)));
        }
        let dead_table = tx.open_table(DEAD)?;
        let mut dead_counts = vec![0i64; sinks.len()];
        for entry in dead_table.iter()? {
            let (key, _) = entry?;
            let (sink, _) = key.value();
            if let Some(i) = sinks.iter().position(|s| s == sink) {
                dead_counts[i] += 1;
            }
        }
        drop((events, cursors, dead_table, tx));

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
            metrics.dead[i].set(dead_counts[i]);
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
        });
        let db = Arc::new(Store {
            path,
            current: std::sync::RwLock::new(Some(Arc::new(db))),
        });
        let (commands, receiver) = mpsc::unbounded_channel();
        let (committed_tx, committed) = watch::channel(next_seq);
        // Waking a task from a foreign thread costs a futex and often an IPI per task: the
        // writer hands each commit's replies to one task on the runtime, which wakes the
        // waiting requests locally (one cross-thread wake per commit).
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
        let writer = Writer {
            db: Arc::clone(&db),
            shared: Arc::clone(&shared),
            sinks: sinks.clone(),
            cursors: start_cursors.clone(),
            persisted: start_cursors.clone(),
            next_seq,
            deleted_below: first.unwrap_or(next_seq),
            committed: committed_tx,
            confirmer,
        };
        let handle = std::thread::Builder::new()
            .name("spool-writer".to_owned())
            .spawn(move || writer.run(receiver))
            .map_err(|e| open_error(e.to_string()))?;
        Ok(Arc::new(Self {
            db,
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
        let tx = self.db.get()?.begin_read()?;
        let events = tx.open_table(EVENTS)?;
        let mut out = Vec::new();
        for entry in events.range(from..to)?.take(limit) {
            let (key, value) = entry?;
            out.push((key.value(), value.value().to_vec()));
        }
        Ok(out)
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
        let _ = self.commands.send(Command::Progress {
            sink: index,
            cursor,
        });
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
        let tx = self.db.get()?.begin_read()?;
        let events = tx.open_table(EVENTS)?;
        let cursors = tx.open_table(CURSORS)?;
        let dead = tx.open_table(DEAD)?;
        let next = *self.committed.borrow();
        let mut sinks = Vec::with_capacity(self.sinks.len());
        for (i, sink) in self.sinks.iter().enumerate() {
            let cursor = cursors
                .get(sink.as_str())?
                .map_or(self.start_cursor(i), |c| c.value());
            let oldest = events
                .range(cursor..)?
                .next()
                .transpose()?
                .and_then(|(_, v)| WebhookRequest::decode(v.value()).ok())
                .and_then(|r| SystemTime::now().duration_since(r.received_at).ok())
                .unwrap_or(Duration::ZERO);
            let dead_letters = dead
                .range((sink.as_str(), 0)..=(sink.as_str(), u64::MAX))?
                .count() as u64;
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
        let tx = self.db.get()?.begin_read()?;
        let dead = tx.open_table(DEAD)?;
        let mut out = Vec::new();
        for entry in dead.iter()? {
            let (key, value) = entry?;
            let (name, seq) = key.value();
            if sink.is_none_or(|s| s == name) {
                if let Some(letter) = decode_dead(name, seq, value.value()) {
                    out.push(letter);
                }
            }
        }
        Ok(out)
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

/// The writer thread: folds every queued command into one transaction.
struct Writer {
    db: Arc<Store>,
    shared: Arc<Shared>,
    sinks: Vec<String>,
    cursors: Vec<u64>,
    persisted: Vec<u64>,
    next_seq: u64,
    deleted_below: u64,
    committed: watch::Sender<u64>,
    /// Where a commit's replies go to be sent from the runtime; `None`: sent from here.
    confirmer: Option<mpsc::UnboundedSender<Vec<(Reply, u64)>>>,
}

impl Writer {
    fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Command>) {
        let mut stop = false;
        while !stop {
            let Some(first) = receiver.blocking_recv() else {
                break;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            let mut appends = Vec::new();
            let mut dead = Vec::new();
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
                    Command::Progress { sink, cursor } => {
                        if let Some(c) = self.cursors.get_mut(sink) {
                            *c = (*c).max(cursor);
                        }
                    }
                    Command::DeadLetter {
                        sink,
                        seq,
                        reason,
                        message,
                        record,
                    } => dead.push((sink, seq, reason, message, record)),
                    Command::Forget { sink, seq } => forget.push((sink, seq)),
                    Command::Purge { sink, done } => purges.push((sink, done)),
                    Command::Probe => probe = true,
                    Command::Stop => stop = true,
                }
            }
            let first_seq = self.next_seq;
            let deleted_below = self.deleted_below;
            match self.commit(&appends, &dead, &forget, &purges, probe) {
                Ok((freed, purged)) => {
                    self.shared.healthy.store(true, Ordering::Release);
                    let bytes = self.shared.bytes.fetch_sub(freed, Ordering::AcqRel) - freed;
                    if freed > 0 {
                        self.shared.full.store(false, Ordering::Release);
                    }
                    self.shared.metrics.bytes.set(bytes as i64);
                    self.persisted.clone_from(&self.cursors);
                    for (i, cursor) in self.cursors.iter().enumerate() {
                        self.shared.metrics.depth[i]
                            .set(self.next_seq.saturating_sub(*cursor) as i64);
                    }
                    for (sink, ..) in &dead {
                        if let Some(gauge) = self.shared.metrics.dead.get(*sink) {
                            gauge.inc();
                        }
                    }
                    for (sink, _) in &forget {
                        if let Some(gauge) = self.shared.metrics.dead.get(*sink) {
                            gauge.dec();
                        }
                    }
                    for ((sink, done), count) in purges.into_iter().zip(purged) {
                        for (i, gauge) in self.shared.metrics.dead.iter().enumerate() {
                            if sink.is_none_or(|s| s == i) {
                                gauge.set(0);
                            }
                        }
                        let _ = done.send(Ok(count));
                    }
                    self.extend_tail(first_seq, &appends);
                    let _ = self.committed.send(self.next_seq);
                    let replies: Vec<(Reply, u64)> = appends
                        .into_iter()
                        .enumerate()
                        .map(|(n, (_, _, done))| (done, first_seq + n as u64))
                        .collect();
                    match &self.confirmer {
                        Some(confirmer) if !replies.is_empty() => {
                            if let Err(unsent) = confirmer.send(replies) {
                                for (done, seq) in unsent.0 {
                                    let _ = done.send(Ok(seq));
                                }
                            }
                        }
                        _ => {
                            for (done, seq) in replies {
                                let _ = done.send(Ok(seq));
                            }
                        }
                    }
                }
                Err(error) => {
                    self.next_seq = first_seq;
                    self.deleted_below = deleted_below;
                    self.cursors.clone_from(&self.persisted);
                    self.shared.healthy.store(false, Ordering::Release);
                    self.shared.metrics.write_errors.inc();
                    tracing::error!(%error, records = appends.len(), "spool commit failed: the webhooks in it are answered 503");
                    for (record, _, done) in appends {
                        self.shared
                            .bytes
                            .fetch_sub(record.len() as u64, Ordering::AcqRel);
                        let _ = done.send(Err(SpoolError::Storage(error.to_string())));
                    }
                    for (_, done) in purges {
                        let _ = done.send(Err(SpoolError::Storage(error.to_string())));
                    }
                    // Dead letters and progress are sent again by their runners' next
                    // progress; a dead letter lost here is delivered again after a restart.
                    // redb refuses everything after an I/O error until it is reopened.
                    if let Err(error) = self.db.reopen() {
                        tracing::error!(%error, "spool: cannot reopen the store; retrying at the next write");
                    }
                }
            }
        }
    }

    /// Puts the events of a commit that started at `first_seq` in the live tail; an append
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

    /// One transaction: appends, dead letters, cursors, and the deletion of records every
    /// sink is past. Durable (fsynced) when it holds appends or dead letters. Returns the
    /// bytes freed.
    fn commit(
        &mut self,
        appends: &[Append],
        dead: &[DeadCommand],
        forget: &[(usize, u64)],
        purges: &[(Option<usize>, Reply)],
        probe: bool,
    ) -> Result<(u64, Vec<u64>), SpoolError> {
        let mut tx = self.db.get()?.begin_write()?;
        if appends.is_empty() && dead.is_empty() && purges.is_empty() && !probe {
            // Progress only: losing it in a crash means delivering again, never losing.
            tx.set_durability(Durability::None)?;
        }
        let mut freed = 0;
        let mut purged = Vec::with_capacity(purges.len());
        {
            let mut events = tx.open_table(EVENTS)?;
            for (record, _, _) in appends {
                events.insert(self.next_seq, record.as_slice())?;
                self.next_seq += 1;
            }
            let mut dead_table = tx.open_table(DEAD)?;
            for (sink, seq, reason, message, record) in dead {
                let record = match record {
                    Some(record) => record.clone(),
                    None => events
                        .get(*seq)?
                        .map(|v| v.value().to_vec())
                        .unwrap_or_default(),
                };
                if let Some(name) = self.sinks.get(*sink) {
                    dead_table.insert(
                        (name.as_str(), *seq),
                        encode_dead(reason, message, &record).as_slice(),
                    )?;
                }
            }
            for (sink, seq) in forget {
                if let Some(name) = self.sinks.get(*sink) {
                    dead_table.remove((name.as_str(), *seq))?;
                }
            }
            for (sink, _) in purges {
                let mut count = 0;
                dead_table.retain(|(name, _), _| {
                    let matches = match sink {
                        Some(i) => self.sinks.get(*i).is_some_and(|s| s == name),
                        None => true,
                    };
                    count += u64::from(matches);
                    !matches
                })?;
                purged.push(count);
            }
            let mut cursors = tx.open_table(CURSORS)?;
            for (i, cursor) in self.cursors.iter().enumerate() {
                if self.persisted.get(i) != Some(cursor) {
                    cursors.insert(self.sinks[i].as_str(), *cursor)?;
                }
            }
            let low = self.cursors.iter().copied().min().unwrap_or(self.next_seq);
            if low > self.deleted_below {
                events.retain_in(self.deleted_below..low, |_, value| {
                    freed += value.len() as u64;
                    false
                })?;
                self.deleted_below = low;
            }
        }
        tx.commit()?;
        Ok((freed, purged))
    }
}
