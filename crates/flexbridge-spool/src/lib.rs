//! The spool: `[delivery] mode = "spool"`. A verified webhook is appended to a local store and
//! fsynced before it is answered 200; many requests share one commit (group commit). Every
//! sink then receives it in the background ([`runner`]), in order per partition key, retried
//! without limit while the spool has room; a permanent failure moves it to the dead letters.
//! A record leaves the spool once every sink is past it. After a crash or a restart, whatever
//! a sink had not confirmed is delivered again (at least once: consumers deduplicate on the
//! event id).
//!
//! Storage is a small segment log of our own ([`log`]): append-only files, a CRC-32 per
//! record, one `write` and one `fdatasync` for every record queued since the last one, into a
//! finished segment's file where one can be reused (the `fdatasync` then has no file growth
//! to commit). A torn tail after a crash fails its checksum and is cut at the next start,
//! never read back; what was acknowledged was fsynced before it. Per-sink cursors are a small file replaced by
//! rename, dead letters an append-only file of their own. It replaced an embedded B-tree
//! store (redb), whose commit cost a third of the daemon's CPU at 30k events/s.

mod dead;
mod log;
mod recent;
pub mod runner;
mod store;

pub use runner::Runner;
pub use store::{DeadLetter, SinkStatus, Spool, SpoolError, SpoolStatus};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `[spool]`: where and how much (used when `delivery.mode = "spool"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory of the spool (created if missing); on Kubernetes a persistent volume.
    pub dir: PathBuf,
    /// Largest total size of the records waiting in the spool, in bytes. Beyond it webhooks are
    /// answered 503 + `Retry-After` (nothing already accepted is harmed).
    pub max_bytes: u64,
    /// Events in flight per sink: the spool delivers in this many lanes, each in order, an
    /// event's lane chosen by its partition key (one interaction's events stay in order).
    pub lanes: usize,
    /// A delivery whose event id was accepted less than this long ago gets its 200 again
    /// without a second copy (Twilio's retries carry the same idempotency token, so the same
    /// id); kept in memory only.
    #[serde(with = "humantime_serde")]
    pub redelivery_window: std::time::Duration,
    /// At most this many recent ids are remembered (the oldest are forgotten first).
    pub redelivery_entries: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/flexbridge/spool"),
            max_bytes: 1 << 30,
            lanes: 64,
            redelivery_window: std::time::Duration::from_secs(600),
            redelivery_entries: 20_000,
        }
    }
}

impl SpoolConfig {
    /// Every problem, as `spool.<key>: message`.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.dir.as_os_str().is_empty() {
            errors.push("spool.dir: must not be empty".to_owned());
        }
        if self.max_bytes < 64 * 1024 {
            errors.push("spool.max_bytes: must be at least 65536".to_owned());
        }
        if !(1..=1024).contains(&self.lanes) {
            errors.push("spool.lanes: must be between 1 and 1024".to_owned());
        }
        errors
    }
}
