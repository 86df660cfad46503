//! The group-commit writer thread shared by the `file` and `stdout` sinks.

use bytes::Bytes;
use flexbridge_core::SinkError;
use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Largest group written and synced at once.
const MAX_GROUP_BYTES: usize = 1 << 20;

pub(crate) enum Output {
    File(File),
    Stdout(io::Stdout),
}

type Outcome = Result<(), (io::ErrorKind, String)>;

enum Job {
    Write {
        line: Bytes,
        done: oneshot::Sender<Outcome>,
    },
    Probe(oneshot::Sender<Outcome>),
    Drain(oneshot::Sender<Outcome>),
}

/// What a writer has done so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Lines written and confirmed.
    pub lines: u64,
    /// Groups committed (one write and, for a file, one fdatasync each).
    pub syncs: u64,
}

#[derive(Default)]
struct Counters {
    lines: AtomicU64,
    syncs: AtomicU64,
}

/// Publishers of one committed group and its outcome.
type Confirmation = (Vec<oneshot::Sender<Outcome>>, Outcome);

/// Handle to a writer thread.
pub(crate) struct GroupWriter {
    jobs: mpsc::UnboundedSender<Job>,
    counters: Arc<Counters>,
}

impl GroupWriter {
    pub(crate) fn start(name: &str, output: Output, pretty: bool) -> io::Result<Self> {
        // Unbounded is bounded in practice: every publisher waits for its confirmation, so the
        // queue never holds more than the requests in flight (and saves a semaphore per event).
        let (jobs, queue) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let sink = name.to_owned();
        // Waking a task from a foreign thread costs a futex and often an IPI per task. The
        // writer thread therefore hands each committed group to one task on the runtime, which
        // wakes the group's publishers locally: one cross-thread wake per group.
        let confirmer = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (confirm, mut confirmations) = mpsc::unbounded_channel::<Confirmation>();
            runtime.spawn(async move {
                while let Some((waiting, outcome)) = confirmations.recv().await {
                    for done in waiting {
                        let _ = done.send(outcome.clone());
                    }
                }
            });
            confirm
        });
        std::thread::Builder::new()
            .name(format!("sink-{name}"))
            .spawn(move || run(&sink, output, pretty, queue, &thread_counters, confirmer))?;
        Ok(Self { jobs, counters })
    }

    pub(crate) async fn write(&self, line: Bytes) -> Result<(), SinkError> {
        let (done, confirmed) = oneshot::channel();
        self.submit(Job::Write { line, done }, confirmed).await
    }

    pub(crate) async fn probe(&self) -> Result<(), SinkError> {
        let (done, confirmed) = oneshot::channel();
        self.submit(Job::Probe(done), confirmed).await
    }

    pub(crate) async fn drain(&self) -> Result<(), SinkError> {
        let (done, confirmed) = oneshot::channel();
        self.submit(Job::Drain(done), confirmed).await
    }

    async fn submit(
        &self,
        job: Job,
        confirmed: oneshot::Receiver<Outcome>,
    ) -> Result<(), SinkError> {
        self.jobs.send(job).map_err(|_| {
            SinkError::permanent("closed", "the sink is drained or its writer stopped")
        })?;
        match confirmed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err((kind, message))) => Err(io_error(kind, message)),
            Err(_) => Err(SinkError::retryable(
                "writer_stopped",
                "the writer stopped before confirming",
            )),
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats {
            lines: self.counters.lines.load(Ordering::Relaxed),
            syncs: self.counters.syncs.load(Ordering::Relaxed),
        }
    }
}

fn io_error(kind: io::ErrorKind, message: String) -> SinkError {
    match kind {
        // Retrying cannot fix these without an operator.
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            SinkError::permanent("io", message)
        }
        _ => SinkError::retryable("io", message),
    }
}

fn run(
    sink: &str,
    mut output: Output,
    pretty: bool,
    mut queue: mpsc::UnboundedReceiver<Job>,
    counters: &Counters,
    confirmer: Option<mpsc::UnboundedSender<Confirmation>>,
) {
    // Bytes known to be durable: a failed group is cut back to here so no torn line remains.
    let mut committed = match &output {
        Output::File(file) => file.metadata().map(|m| m.len()).unwrap_or(0),
        Output::Stdout(_) => 0,
    };
    let mut buffer = Vec::with_capacity(64 * 1024);
    let mut waiting = Vec::with_capacity(256);
    while let Some(first) = queue.blocking_recv() {
        let mut next = Some(first);
        let mut drain = None;
        let mut probes = Vec::new();
        buffer.clear();
        while let Some(job) = next.take() {
            match job {
                Job::Write { line, done } => {
                    append(&mut buffer, &line, pretty);
                    waiting.push(done);
                }
                Job::Probe(done) => probes.push(done),
                Job::Drain(done) => {
                    drain = Some(done);
                    break;
                }
            }
            if buffer.len() < MAX_GROUP_BYTES {
                next = queue.try_recv().ok();
            }
        }
        let outcome = commit(&mut output, &buffer, &mut committed);
        if !waiting.is_empty() {
            if outcome.is_ok() {
                counters
                    .lines
                    .fetch_add(waiting.len() as u64, Ordering::Relaxed);
            } else if let Err((_, message)) = &outcome {
                tracing::warn!(sink, events = waiting.len(), error = %message, "writing events failed; publishers are told");
            }
        }
        counters.syncs.fetch_add(1, Ordering::Relaxed);
        waiting.extend(probes);
        let group = std::mem::replace(&mut waiting, Vec::with_capacity(256));
        let unsent = match &confirmer {
            Some(confirmer) => confirmer
                .send((group, outcome.clone()))
                .err()
                .map(|returned| returned.0 .0),
            None => Some(group),
        };
        // Without a runtime (or once it is gone), confirm from this thread.
        for done in unsent.into_iter().flatten() {
            let _ = done.send(outcome.clone());
        }
        if let Some(done) = drain {
            let _ = done.send(outcome);
            // Refuse whatever comes after the drain.
            queue.close();
            while let Ok(job) = queue.try_recv() {
                let done = match job {
                    Job::Write { done, .. } | Job::Probe(done) | Job::Drain(done) => done,
                };
                let _ = done.send(Err((
                    io::ErrorKind::BrokenPipe,
                    "the sink is drained".into(),
                )));
            }
            break;
        }
    }
}

fn append(buffer: &mut Vec<u8>, line: &[u8], pretty: bool) {
    if pretty {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) {
            if serde_json::to_writer_pretty(&mut *buffer, &value).is_ok() {
                buffer.push(b'\n');
                return;
            }
        }
    }
    buffer.extend_from_slice(line);
    buffer.push(b'\n');
}

fn commit(output: &mut Output, buffer: &[u8], committed: &mut u64) -> Outcome {
    let result = match output {
        Output::File(file) => file
            .write_all(buffer)
            .and_then(|()| file.sync_data())
            .map(|()| *committed += buffer.len() as u64)
            .inspect_err(|_| {
                // Cut a partly written group back so the file holds whole lines only.
                let _ = file.set_len(*committed);
            }),
        Output::Stdout(stdout) => {
            let mut lock = stdout.lock();
            lock.write_all(buffer).and_then(|()| lock.flush())
        }
    };
    result.map_err(|e| (e.kind(), e.to_string()))
}
