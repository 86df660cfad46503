//! Background delivery from the spool: per sink, a reader takes committed records in order
//! and hands each to one of `lanes` workers chosen by its partition key, so one interaction's
//! events are published in order while other interactions' are in flight. A worker retries a
//! retryable failure without limit (the spool keeps the event); a permanent one moves the event
//! to the dead letters and does not block the events behind it. The sink's cursor advances to
//! the first record not yet finished.

use crate::store::{Spool, SpoolError};
use flexbridge_core::{normalize, Attestation, Delivery, Event, Verified, WebhookRequest};
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// Records read from the store at once.
const READ_BATCH: usize = 256;
/// Events queued per lane: bounds memory while a sink is down.
const LANE_QUEUE: usize = 16;

/// Which records of one sink are out, to advance its cursor only past finished ones.
struct Tracker {
    in_flight: BTreeSet<u64>,
    next: u64,
    cursor: u64,
}

impl Tracker {
    fn dispatched(&mut self, seq: u64) {
        self.in_flight.insert(seq);
        self.next = seq + 1;
    }

    /// Marks `seq` finished; the new cursor when it moved.
    fn finished(&mut self, seq: u64) -> Option<u64> {
        self.in_flight.remove(&seq);
        let cursor = self.in_flight.first().copied().unwrap_or(self.next);
        (cursor > self.cursor).then(|| {
            self.cursor = cursor;
            cursor
        })
    }
}

/// The background delivery of every sink.
pub struct Runner {
    tasks: Mutex<JoinSet<()>>,
    stop: watch::Sender<bool>,
    cursors: Vec<Arc<Mutex<Tracker>>>,
    spool: Arc<Spool>,
    delivery: Arc<Delivery>,
}

impl Runner {
    /// Starts delivering from `spool` to every sink of `delivery` (the same sinks, in the same
    /// order), `lanes` events in flight per sink.
    pub fn start(spool: Arc<Spool>, delivery: Arc<Delivery>, lanes: usize) -> Self {
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut cursors = Vec::new();
        for index in 0..delivery.len() {
            let start = spool.start_cursor(index);
            let tracker = Arc::new(Mutex::new(Tracker {
                in_flight: BTreeSet::new(),
                next: start,
                cursor: start,
            }));
            cursors.push(Arc::clone(&tracker));
            let mut senders = Vec::with_capacity(lanes);
            for _ in 0..lanes.max(1) {
                let (tx, rx) = mpsc::channel(LANE_QUEUE);
                senders.push(tx);
                tasks.spawn(lane(
                    rx,
                    Arc::clone(&spool),
                    Arc::clone(&delivery),
                    index,
                    Arc::clone(&tracker),
                ));
            }
            tasks.spawn(reader(
                Arc::clone(&spool),
                index,
                start,
                senders,
                Arc::clone(&tracker),
                stopped.clone(),
            ));
        }
        Self {
            tasks: Mutex::new(tasks),
            stop,
            cursors,
            spool,
            delivery,
        }
    }

    /// Delivers the dead letters of `sink` (every sink when `None`) again, once the route is
    /// fixed: each is dropped when its sink confirms it, and stays with the new reason when
    /// the sink refuses it again. Returns how many were sent.
    pub fn redrive(&self, sink: Option<&str>) -> Result<usize, SpoolError> {
        if let Some(name) = sink {
            self.spool.index_of(name)?;
        }
        let letters = self.spool.dead_letters(sink)?;
        let count = letters.len();
        for letter in letters {
            let index = self.spool.index_of(&letter.sink)?;
            let (spool, delivery) = (Arc::clone(&self.spool), Arc::clone(&self.delivery));
            tokio::spawn(async move {
                let event = WebhookRequest::decode(&letter.record)
                    .ok()
                    .and_then(|r| normalize(Verified::attest(r, Attestation::Spooled)).ok());
                let Some(event) = event else {
                    return; // unreadable: it stays where it is
                };
                match delivery.deliver_to(index, &event).await {
                    Ok(()) => {
                        tracing::info!(sink = %letter.sink, event_id = event.id(), "redriven dead letter delivered");
                        spool.forget(index, letter.seq);
                    }
                    Err(failure) => {
                        tracing::warn!(sink = %letter.sink, event_id = event.id(), reason = failure.error.reason(), error = %failure.error, "redriven dead letter refused again");
                        spool.dead_letter(
                            index,
                            letter.seq,
                            failure.error.reason(),
                            &failure.error.to_string(),
                            Some(letter.record),
                        );
                    }
                }
            });
        }
        Ok(count)
    }

    /// True when every sink finished every committed record.
    pub fn idle(&self) -> bool {
        let committed = *self.spool.committed().borrow();
        self.cursors.iter().all(|tracker| {
            tracker
                .lock()
                .map(|t| t.cursor >= committed)
                .unwrap_or(false)
        })
    }

    /// Keeps delivering for up to `timeout` or until every sink caught up, then stops. What
    /// is left stays in the spool and is delivered after the next start.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let started = tokio::time::Instant::now();
        while !self.idle() && started.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let caught_up = self.idle();
        let _ = self.stop.send(true);
        let mut tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        caught_up
    }
}

fn lane_of(key: &str, lanes: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % lanes.max(1) as u64) as usize
}

async fn reader(
    spool: Arc<Spool>,
    index: usize,
    mut next: u64,
    lanes: Vec<mpsc::Sender<(u64, Arc<Event>)>>,
    tracker: Arc<Mutex<Tracker>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut committed = spool.committed();
    let sink = spool.sinks().get(index).cloned().unwrap_or_default();
    loop {
        let upto = *committed.borrow_and_update();
        if next >= upto {
            tokio::select! {
                changed = committed.changed() => if changed.is_err() { return },
                _ = stop.changed() => return,
            }
            continue;
        }
        // A reader that keeps up takes the events the ingress normalized, from memory.
        if let Some(events) = spool.tail(next, upto, READ_BATCH) {
            for (seq, event) in events {
                if let Ok(mut t) = tracker.lock() {
                    t.dispatched(seq);
                }
                next = seq + 1;
                let lane = lane_of(event.partition_key(), lanes.len());
                if lanes[lane].send((seq, event)).await.is_err() {
                    return;
                }
            }
            continue;
        }
        let records = {
            let spool = Arc::clone(&spool);
            match tokio::task::spawn_blocking(move || spool.read(next, upto, READ_BATCH)).await {
                Ok(Ok(records)) => records,
                Ok(Err(error)) => {
                    tracing::error!(sink, %error, "spool: cannot read records; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(_) => return,
            }
        };
        if records.is_empty() {
            // Records below `upto` that are gone were finished already (another run).
            next = upto;
            continue;
        }
        for (seq, record) in records {
            if let Ok(mut t) = tracker.lock() {
                t.dispatched(seq);
            }
            next = seq + 1;
            let event = WebhookRequest::decode(&record)
                .map_err(|e| e.to_string())
                .and_then(|request| {
                    normalize(Verified::attest(request, Attestation::Spooled))
                        .map_err(|e| e.to_string())
                });
            match event {
                Ok(event) => {
                    let lane = lane_of(event.partition_key(), lanes.len());
                    if lanes[lane].send((seq, Arc::new(event))).await.is_err() {
                        return;
                    }
                }
                Err(message) => {
                    tracing::error!(sink, seq, %message, "spool: a record cannot be read back; moved to the dead letters");
                    spool.dead_letter(index, seq, "corrupt", &message, None);
                    let cursor = tracker.lock().ok().and_then(|mut t| t.finished(seq));
                    if let Some(cursor) = cursor {
                        spool.progress(index, cursor);
                    }
                }
            }
        }
    }
}

async fn lane(
    mut events: mpsc::Receiver<(u64, Arc<Event>)>,
    spool: Arc<Spool>,
    delivery: Arc<Delivery>,
    index: usize,
    tracker: Arc<Mutex<Tracker>>,
) {
    while let Some((seq, event)) = events.recv().await {
        if let Err(failure) = delivery.deliver_to(index, &event).await {
            tracing::error!(
                sink = %failure.sink,
                event_id = event.id(),
                ce_type = event.ce_type(),
                interaction_sid = event.data().interaction_sid().unwrap_or(""),
                reason = failure.error.reason(),
                error = %failure.error,
                "the sink refused the event for good; moved to the spool's dead letters (flexbridge dlq)"
            );
            spool.dead_letter(
                index,
                seq,
                failure.error.reason(),
                &failure.error.to_string(),
                None,
            );
        }
        let cursor = tracker.lock().ok().and_then(|mut t| t.finished(seq));
        if let Some(cursor) = cursor {
            spool.progress(index, cursor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_stops_at_the_first_unfinished_record() {
        let mut t = Tracker {
            in_flight: BTreeSet::new(),
            next: 10,
            cursor: 10,
        };
        for seq in 10..15 {
            t.dispatched(seq);
        }
        assert_eq!(t.finished(12), None);
        assert_eq!(t.finished(10), Some(11));
        assert_eq!(t.finished(11), Some(13));
        assert_eq!(t.finished(14), None);
        assert_eq!(t.finished(13), Some(15));
    }

    #[test]
    fn one_key_always_gets_one_lane() {
        assert_eq!(lane_of("KD1", 64), lane_of("KD1", 64));
        assert!(lane_of("KD2", 64) < 64);
        assert_eq!(lane_of("anything", 1), 0);
    }
}
