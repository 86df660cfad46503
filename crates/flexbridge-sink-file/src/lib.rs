//! The `file` and `stdout` sinks: one CloudEvent JSON envelope per line.
//!
//! Both hand lines to a dedicated writer thread that group-commits: it takes everything queued,
//! writes it with one `write`, flushes, and for `file` calls `fdatasync` once for the whole
//! group before confirming every event in it. Under load one fsync covers many events; alone,
//! an event costs one write and one fsync.

mod writer;

use async_trait::async_trait;
use flexbridge_core::{BuildError, Event, Limits, Sink, SinkConfig, SinkContext, SinkError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
pub use writer::Stats;
use writer::{GroupWriter, Output};

/// `type = "file"`: append events to a local file, fsync'd before each confirmation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Unique sink name, used in metrics and logs.
    pub name: String,
    /// File to append to; created if missing (its directory must exist).
    pub path: PathBuf,
}

/// `type = "stdout"`: write events to standard output (logs go to standard error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// Unique sink name, used in metrics and logs.
    pub name: String,
    /// Pretty-print each event over several lines (for people, not for pipelines).
    #[serde(default)]
    pub pretty: bool,
}

/// Appends events to a file.
pub struct FileSink {
    name: String,
    writer: GroupWriter,
}

impl FileSink {
    /// Lines and groups committed so far: lines / syncs is the events per fsync.
    pub fn stats(&self) -> Stats {
        self.writer.stats()
    }
}

#[async_trait]
impl SinkConfig for FileSinkConfig {
    type Plan = ();
    type Sink = FileSink;

    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self, _limits: &Limits) -> Result<(), Vec<String>> {
        if self.path.as_os_str().is_empty() {
            return Err(vec![format!("sinks.{}.path: must not be empty", self.name)]);
        }
        Ok(())
    }

    /// Opens (or creates) the file for appending and starts its writer thread.
    async fn build(&self, (): (), _context: &SinkContext) -> Result<FileSink, BuildError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| {
                BuildError::open(
                    format!("cannot open {} for appending", self.path.display()),
                    e,
                )
            })?;
        let writer = GroupWriter::start(&self.name, Output::File(file), false)
            .map_err(|e| BuildError::open("cannot start the writer thread", e))?;
        Ok(FileSink {
            name: self.name.clone(),
            writer,
        })
    }
}

/// Writes events to standard output.
pub struct StdoutSink {
    name: String,
    writer: GroupWriter,
}

#[async_trait]
impl SinkConfig for StdoutSinkConfig {
    type Plan = ();
    type Sink = StdoutSink;

    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self, _limits: &Limits) -> Result<(), Vec<String>> {
        Ok(())
    }

    /// Starts the writer thread on standard output.
    async fn build(&self, (): (), _context: &SinkContext) -> Result<StdoutSink, BuildError> {
        let writer = GroupWriter::start(&self.name, Output::Stdout(std::io::stdout()), self.pretty)
            .map_err(|e| BuildError::open("cannot start the writer thread", e))?;
        Ok(StdoutSink {
            name: self.name.clone(),
            writer,
        })
    }
}

macro_rules! impl_sink {
    ($ty:ty) => {
        #[async_trait]
        impl Sink for $ty {
            fn name(&self) -> &str {
                &self.name
            }

            async fn publish(&self, event: &Event) -> Result<(), SinkError> {
                self.writer.write(event.envelope_json().clone()).await
            }

            async fn health(&self) -> Result<(), SinkError> {
                self.writer.probe().await
            }

            async fn drain(&self) -> Result<(), SinkError> {
                self.writer.drain().await
            }
        }
    };
}

impl_sink!(FileSink);
impl_sink!(StdoutSink);

#[cfg(test)]
mod tests {
    use super::*;
    use flexbridge_core::InteractionEvent;
    use std::sync::Arc;
    use std::time::SystemTime;

    async fn open(name: &str, path: impl Into<std::path::PathBuf>) -> Result<FileSink, BuildError> {
        let config = FileSinkConfig {
            name: name.into(),
            path: path.into(),
        };
        config
            .open(&Limits::default(), &SinkContext::standalone(name).unwrap())
            .await
    }

    fn event(n: usize) -> Event {
        let data = InteractionEvent::from_params(vec![
            ("EventType".into(), "onInteractionCreated".into()),
            ("AccountSid".into(), "AC1".into()),
            ("InteractionSid".into(), format!("KD{n}")),
        ])
        .unwrap();
        Event::new(format!("id{n}"), SystemTime::UNIX_EPOCH, data)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_publishes_are_all_written_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "earlier line\n").unwrap();
        let sink = Arc::new(open("f", path.clone()).await.unwrap());
        let tasks: Vec<_> = (0..500)
            .map(|n| {
                let sink = Arc::clone(&sink);
                tokio::spawn(async move { sink.publish(&event(n)).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        sink.health().await.unwrap();
        sink.drain().await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "earlier line", "appends, never truncates");
        assert_eq!(lines.len(), 501);
        let mut ids: Vec<String> = lines[1..]
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["id"].as_str().unwrap().to_owned()
            })
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 500);
        // Group commit: far fewer fsyncs than events.
        let stats = sink.writer.stats();
        assert_eq!(stats.lines, 500);
        assert!(stats.syncs < 500, "{stats:?}");
    }

    #[tokio::test]
    async fn publish_after_drain_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sink = open("f", dir.path().join("e.jsonl")).await.unwrap();
        sink.publish(&event(1)).await.unwrap();
        sink.drain().await.unwrap();
        let err = sink.publish(&event(2)).await.unwrap_err();
        assert_eq!(err.reason(), "closed");
        assert!(sink.health().await.is_err());
    }

    #[tokio::test]
    async fn a_missing_directory_is_a_clear_error() {
        let err = open("f", "/nonexistent/dir/e.jsonl").await.err().unwrap();
        assert!(err.to_string().contains("/nonexistent/dir/e.jsonl"));
        let err = open("f", "").await.err().unwrap();
        assert!(
            err.to_string().contains("sinks.f.path: must not be empty"),
            "{err}"
        );
    }

    /// A write error (here: the file is a full device) fails the publish as an I/O error
    /// instead of confirming it.
    #[tokio::test]
    async fn write_errors_are_reported_not_confirmed() {
        let sink = open("full", "/dev/full").await.unwrap();
        let err = sink.publish(&event(1)).await.unwrap_err();
        assert_eq!(err.reason(), "io");
        assert!(err.is_retryable());
    }
}
