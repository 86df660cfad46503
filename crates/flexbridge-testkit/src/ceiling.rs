//! What the plain-client ceilings (the sink crates' `*_ceiling` examples, the bench's
//! `ceiling-*` rows) share: the load arguments, the load loop and the summary line, so the
//! three brokers' ceilings are measured the same way as each other and as `flexbridge
//! simulate` measures flexbridge.

use crate::Pacer;
use hdrhistogram::Histogram;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The load arguments of every ceiling (`#[command(flatten)]` into its own).
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Publishes per second, paced as `flexbridge simulate --rate` paces webhooks (the
    /// bench's half-load run); without it, as fast as the acknowledgements come back.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Publishes awaiting their acknowledgement at any time.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// Payload bytes (the sinks' binary-mode payload is about this size).
    #[arg(long, default_value_t = 370)]
    pub size: usize,
}

/// What a ceiling run measured: each publish's time from its turn to its acknowledgement.
pub struct Measured {
    latency: Histogram<u64>,
    elapsed: Duration,
}

impl Measured {
    /// The summary line the bench reads, in the shape of `flexbridge simulate --json-summary`:
    /// `{"rate", "sent", "latency_ms": {"p50", "p99"}}`.
    pub fn summary(&self) -> serde_json::Value {
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        serde_json::json!({
            "rate": self.latency.len() as f64 / self.elapsed.as_secs_f64(),
            "sent": self.latency.len(),
            "latency_ms": {"p50": ms(0.5), "p99": ms(0.99)},
        })
    }
}

/// Runs `args.in_flight` publishers for `args.duration`, each awaiting its acknowledgement
/// before its next publish, paced at `args.rate` if given. `publish(worker, n)` makes the
/// n-th publish (from 1) of a publisher; the future it returns is awaited after the pacer's
/// turn and timed, and must panic if the broker refuses it.
pub async fn drive<F, Fut>(args: &LoadArgs, publish: F) -> Measured
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let publish = Arc::new(publish);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let pacer = Arc::new(Pacer::new(args.rate));
    let workers: Vec<_> = (0..args.in_flight)
        .map(|worker| {
            let (publish, pacer) = (Arc::clone(&publish), Arc::clone(&pacer));
            tokio::spawn(async move {
                let mut latency = histogram();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    // Built before the turn, as the load generator signs a request before
                    // its turn: only the publish and its acknowledgement are timed.
                    let published = publish(worker, n);
                    pacer.turn().await;
                    let sent = Instant::now();
                    published.await;
                    latency.saturating_record(sent.elapsed().as_micros().max(1) as u64);
                }
                latency
            })
        })
        .collect();
    let mut latency = histogram();
    for worker in workers {
        latency
            .add(worker.await.expect("a publisher panicked"))
            .expect("histograms of the same bounds merge");
    }
    Measured {
        latency,
        elapsed: started.elapsed(),
    }
}

/// 1 µs to 10 minutes, three significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every publish of every publisher is made once, in order, and counted; the summary's
    /// rate is what was sent over the time it took.
    #[tokio::test]
    async fn every_publish_is_made_timed_and_counted() {
        let made = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&made);
        let args = LoadArgs {
            duration: 1,
            rate: Some(200.0),
            in_flight: 4,
            size: 0,
        };
        let measured = drive(&args, move |worker, n| {
            seen.lock().unwrap().push((worker, n));
            async { tokio::time::sleep(Duration::from_millis(2)).await }
        })
        .await;
        let summary = measured.summary();
        let sent = summary["sent"].as_u64().unwrap();
        // Paced at 200 a second for 1 s: never more than the pacer allows (200, plus one
        // waiting turn per publisher at the deadline); the lower bounds leave room for a
        // machine busy with other tests.
        assert!((100..=204).contains(&sent), "{summary}");
        let rate = summary["rate"].as_f64().unwrap();
        assert!((90.0..=205.0).contains(&rate), "{summary}");
        // What is timed is the publish: it sleeps 2 ms.
        let p50 = summary["latency_ms"]["p50"].as_f64().unwrap();
        assert!((2.0..200.0).contains(&p50), "{summary}");
        let made = made.lock().unwrap();
        assert_eq!(made.len() as u64, sent);
        for worker in 0..4 {
            let ns: Vec<u64> = made
                .iter()
                .filter(|(w, _)| *w == worker)
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(ns, (1..=ns.len() as u64).collect::<Vec<_>>(), "{worker}");
        }
    }
}
