//! Hands JetStream publishes to the client in bursts.
//!
//! async-nats writes whatever its connection task finds queued each time it runs. Called from
//! each request's task, a publish wakes that connection task straight away (tokio runs a task
//! woken by the running one next), so under load almost every message left in a write of its
//! own: the server then read 2.7 messages per `read` instead of the plain client's 14.5 and spent
//! ~21 µs per message instead of ~17. The outbox task instead waits one scheduler pass
//! (`yield_now`) after its first job, so the requests already woken in this pass add theirs, and
//! then queues them all before the connection task runs. It never waits on a timer: an idle
//! sink publishes at once.

use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::{self, message::PublishMessage};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// A publish waiting for its turn, and where its ack future goes.
struct Job {
    subject: String,
    message: PublishMessage,
    queued: oneshot::Sender<Result<PublishAckFuture, PublishError>>,
}

/// The requests' side of the outbox task.
pub(crate) struct Outbox {
    jobs: mpsc::UnboundedSender<Job>,
    /// Bursts handed to the client so far (publishes / bursts = the batching achieved).
    #[cfg_attr(not(test), allow(dead_code))]
    bursts: Arc<AtomicU64>,
}

/// Jobs taken from the channel at once; more wait for the next round.
const BURST: usize = 256;

impl Outbox {
    /// Starts the outbox task on the current runtime; it ends when the outbox is dropped.
    pub(crate) fn start(js: jetstream::Context) -> Self {
        // Unbounded is bounded in practice: every publisher awaits its ack future, so the
        // queue holds at most the requests in flight.
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        let bursts = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&bursts);
        tokio::spawn(async move {
            let mut burst = Vec::with_capacity(BURST);
            while queue.recv_many(&mut burst, BURST).await > 0 {
                // One scheduler pass: the requests already woken add their publishes.
                tokio::task::yield_now().await;
                while burst.len() < BURST {
                    match queue.try_recv() {
                        Ok(job) => burst.push(job),
                        Err(_) => break,
                    }
                }
                counted.fetch_add(1, Ordering::Relaxed);
                for job in burst.drain(..) {
                    // A publisher that gave up (its deadline passed, its request ended) is not
                    // published for: it answered or retried, and a late copy would only be a
                    // duplicate for the stream to drop.
                    if job.queued.is_closed() {
                        continue;
                    }
                    let _ = job
                        .queued
                        .send(js.send_publish(job.subject, job.message).await);
                }
            }
        });
        Self { jobs, bursts }
    }

    /// Bursts handed to the client so far.
    #[cfg(test)]
    pub(crate) fn bursts(&self) -> u64 {
        self.bursts.load(Ordering::Relaxed)
    }

    /// Queues a publish; resolves to its ack future once the client has it.
    pub(crate) async fn send_publish(
        &self,
        subject: String,
        message: PublishMessage,
    ) -> Option<Result<PublishAckFuture, PublishError>> {
        let (queued, taken) = oneshot::channel();
        self.jobs
            .send(Job {
                subject,
                message,
                queued,
            })
            .ok()?;
        taken.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::stream;

    /// A memory stream of the test's own on the NATS server (never skips when it is missing):
    /// the context, the stream's name and its subject. The test deletes it.
    async fn fresh_stream() -> (jetstream::Context, String, String) {
        let url = std::env::var("FLEXBRIDGE_NATS_URL")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
        let client = async_nats::connect(url)
            .await
            .expect("a NATS server with JetStream");
        let js = jetstream::new(client);
        let name = flexbridge_testkit::unique("FLEXBRIDGE_OUTBOX").replace(['.', '-'], "_");
        let subject = format!("{name}.events");
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::Memory,
            ..stream::Config::default()
        })
        .await
        .expect("stream");
        (js, name, subject)
    }

    /// Publishes that become ready in the same scheduler pass reach the client as one burst,
    /// and every one of them still gets its own ack. One worker thread, as under load: a
    /// task woken by the running one runs next, which without the outbox's wait would hand
    /// over nearly every publish alone. Needs the NATS server (never skips).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn publishes_ready_together_leave_in_one_burst_each_with_its_own_ack() {
        let (js, name, subject) = fresh_stream().await;
        let outbox = Arc::new(Outbox::start(js.clone()));
        // Spawned from a worker, so that all 64 are ready in the same pass.
        let driver = {
            let (outbox, subject) = (Arc::clone(&outbox), subject.clone());
            tokio::spawn(async move { publish_64(outbox, subject).await })
        };
        let mut sequences = driver.await.expect("driver");
        let bursts = outbox.bursts();
        let _ = js.delete_stream(&name).await;
        sequences.sort_unstable();
        sequences.dedup();
        assert_eq!(sequences.len(), 64, "each publish has an ack of its own");
        assert!(
            bursts <= 3,
            "64 publishes ready together took {bursts} bursts"
        );
    }

    /// A publish whose caller stopped waiting before the outbox reached it is not sent.
    #[tokio::test]
    async fn a_publish_nobody_waits_for_any_more_is_not_sent() {
        use futures::FutureExt as _;
        let (js, name, subject) = fresh_stream().await;
        let outbox = Outbox::start(js.clone());
        let message = |id: &str| PublishMessage::build().payload("x".into()).message_id(id);
        // Queued, then abandoned at once: the outbox task has not run yet.
        assert!(outbox
            .send_publish(subject.clone(), message("abandoned"))
            .now_or_never()
            .is_none());
        let ack = match outbox.send_publish(subject.clone(), message("kept")).await {
            Some(Ok(pending)) => pending.await.expect("ack"),
            _ => panic!("the second publish was not queued"),
        };
        let mut stream = js.get_stream(&name).await.expect("stream");
        let messages = stream.info().await.expect("info").state.messages;
        let _ = js.delete_stream(&name).await;
        assert_eq!(
            ack.sequence, 1,
            "the abandoned publish took no sequence number"
        );
        assert_eq!(messages, 1);
    }

    async fn publish_64(outbox: Arc<Outbox>, subject: String) -> Vec<u64> {
        let publishers: Vec<_> = (0..64)
            .map(|n| {
                let (outbox, subject) = (Arc::clone(&outbox), subject.clone());
                tokio::spawn(async move {
                    let message = PublishMessage::build()
                        .payload(format!("{n}").into())
                        .message_id(format!("id-{n}"));
                    match outbox.send_publish(subject, message).await {
                        Some(Ok(pending)) => pending.await.map(|ack| ack.sequence).ok(),
                        _ => None,
                    }
                })
            })
            .collect();
        let mut sequences = Vec::new();
        for publisher in publishers {
            sequences.push(publisher.await.expect("task").expect("acked"));
        }
        sequences
    }
}
