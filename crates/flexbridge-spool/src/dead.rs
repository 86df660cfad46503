//! The dead letters: `<dir>/dead-letters.log`, an append-only file of checksummed operations
//! (add, forget, purge), replayed at open. Only an index (sink, sequence number -> where the
//! letter is) stays in memory. The file is rewritten without the letters that left once they
//! are most of it.

use crate::log::sync_dir;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const FILE: &str = "dead-letters.log";
/// Length (u32), CRC-32 of the body (u32), then the body: kind, fields.
const HEADER: usize = 8;
const ADD: u8 = 1;
const FORGET: u8 = 2;
const PURGE_ONE: u8 = 3;
const PURGE_ALL: u8 = 4;
/// Rewrite the file once it is larger than this and mostly letters that left.
const COMPACT_AFTER: u64 = 1 << 20;

/// One operation on the dead letters.
pub(crate) enum Op<'a> {
    /// A letter: its sink, sequence number and encoded content (time, reason, message, record).
    Add(&'a str, u64, &'a [u8]),
    Forget(&'a str, u64),
    Purge(Option<&'a str>),
}

fn encode(op: &Op<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    let put_sink = |out: &mut Vec<u8>, sink: &str| {
        // Sink names are short (config keys); a longer one is cut, never mis-framed.
        let bytes = &sink.as_bytes()[..sink.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    match op {
        Op::Add(sink, seq, letter) => {
            out.push(ADD);
            put_sink(out, sink);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(letter);
        }
        Op::Forget(sink, seq) => {
            out.push(FORGET);
            put_sink(out, sink);
            out.extend_from_slice(&seq.to_le_bytes());
        }
        Op::Purge(Some(sink)) => {
            out.push(PURGE_ONE);
            put_sink(out, sink);
        }
        Op::Purge(None) => out.push(PURGE_ALL),
    }
    let body_len = (out.len() - start - HEADER) as u32;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The body length and checksum in a frame's header (`header` holds at least [`HEADER`] bytes).
fn frame_header(header: &[u8]) -> (usize, u32) {
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    (word(0) as usize, word(4))
}

/// Applies every frame of `buffer`, written at file offset `base`, to `index`.
fn apply_frames(index: &mut BTreeMap<(String, u64), Place>, buffer: &[u8], base: u64) {
    let mut at = 0;
    while let Some(header) = buffer.get(at..at + HEADER) {
        let (len, _) = frame_header(header);
        let Some(body) = buffer.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        let _ = apply(index, body, base + (at + HEADER) as u64);
        at += HEADER + len;
    }
}

/// Where a letter's content is in the file.
#[derive(Clone, Copy)]
struct Place {
    offset: u64,
    len: u32,
}

/// The dead letters' file and index.
pub(crate) struct DeadLetters {
    path: PathBuf,
    file: Arc<File>,
    len: u64,
    index: BTreeMap<(String, u64), Place>,
}

/// Applies one decoded body at `offset` (the body's start) to the index.
fn apply(index: &mut BTreeMap<(String, u64), Place>, body: &[u8], offset: u64) -> Option<()> {
    let kind = *body.first()?;
    if kind == PURGE_ALL {
        index.clear();
        return Some(());
    }
    let sink_len = u16::from_le_bytes(body.get(1..3)?.try_into().ok()?) as usize;
    let sink = String::from_utf8_lossy(body.get(3..3 + sink_len)?).into_owned();
    let rest = 3 + sink_len;
    match kind {
        PURGE_ONE => index.retain(|(s, _), _| *s != sink),
        ADD | FORGET => {
            let seq = u64::from_le_bytes(body.get(rest..rest + 8)?.try_into().ok()?);
            if kind == ADD {
                let len = u32::try_from(body.len() - rest - 8).ok()?;
                let place = Place {
                    offset: offset + (rest + 8) as u64,
                    len,
                };
                index.insert((sink, seq), place);
            } else {
                index.remove(&(sink, seq));
            }
        }
        _ => return None,
    }
    Some(())
}

impl DeadLetters {
    /// Opens (or creates) the file in `dir` and replays it; a torn tail is cut.
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        let path = dir.join(FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let size = file.metadata()?.len();
        let mut reader = io::BufReader::new(&file);
        let mut index = BTreeMap::new();
        let mut at = 0u64;
        let mut body = Vec::new();
        loop {
            let mut header = [0u8; HEADER];
            if size - at < HEADER as u64 || reader.read_exact(&mut header).is_err() {
                break;
            }
            let (len, crc) = frame_header(&header);
            let len = len as u64;
            if size - at - (HEADER as u64) < len {
                break;
            }
            body.resize(usize::try_from(len).unwrap_or(0), 0);
            if reader.read_exact(&mut body).is_err() || crc32fast::hash(&body) != crc {
                break;
            }
            if apply(&mut index, &body, at + HEADER as u64).is_none() {
                break;
            }
            at += HEADER as u64 + len;
        }
        drop(reader);
        if at < size {
            tracing::warn!(
                file = %path.display(),
                bytes = size - at,
                "spool: cut a torn tail of the dead letters"
            );
            file.set_len(at)?;
            file.sync_all()?;
        }
        Ok(Self {
            path,
            file: Arc::new(file),
            len: at,
            index,
        })
    }

    /// Writes `ops` durably (one write, one fdatasync) and applies them. On failure nothing
    /// of them is applied.
    pub(crate) fn write(&mut self, ops: &[Op<'_>]) -> io::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut buffer = Vec::new();
        for op in ops {
            encode(op, &mut buffer);
        }
        let written = self
            .file
            .write_all_at(&buffer, self.len)
            .and_then(|()| self.file.sync_data());
        if let Err(error) = written {
            let _ = self.file.set_len(self.len);
            return Err(error);
        }
        apply_frames(&mut self.index, &buffer, self.len);
        self.len += buffer.len() as u64;
        let live_bytes: u64 = self.index.values().map(|p| u64::from(p.len)).sum();
        if self.len > COMPACT_AFTER && self.len > 4 * live_bytes {
            if let Err(error) = self.compact() {
                tracing::warn!(%error, "spool: cannot compact the dead letters (retried later)");
            }
        }
        Ok(())
    }

    /// Rewrites the file with only the letters kept (written aside, fsynced, renamed).
    fn compact(&mut self) -> io::Result<()> {
        let letters = self.list(None)?;
        let aside = self.path.with_extension("log.new");
        let mut buffer = Vec::new();
        for (sink, seq, letter) in &letters {
            encode(&Op::Add(sink, *seq, letter), &mut buffer);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&aside)?;
        file.write_all_at(&buffer, 0)?;
        file.sync_data()?;
        std::fs::rename(&aside, &self.path)?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        let mut index = BTreeMap::new();
        apply_frames(&mut index, &buffer, 0);
        self.file = Arc::new(file);
        self.len = buffer.len() as u64;
        self.index = index;
        Ok(())
    }

    /// Whether a letter of `sink` for `seq` is kept.
    #[cfg(test)]
    pub(crate) fn contains(&self, sink: &str, seq: u64) -> bool {
        self.index.contains_key(&(sink.to_owned(), seq))
    }

    /// The highest sequence number of any letter.
    pub(crate) fn last_seq(&self) -> Option<u64> {
        self.index.keys().map(|(_, seq)| *seq).max()
    }

    /// Letters of every sink, configured or not.
    pub(crate) fn len(&self) -> u64 {
        self.index.len() as u64
    }

    /// Letters per sink.
    pub(crate) fn count(&self, sink: &str) -> u64 {
        self.index
            .range((sink.to_owned(), 0)..=(sink.to_owned(), u64::MAX))
            .count() as u64
    }

    /// The letters (of one sink or all): sink, sequence number, encoded content.
    pub(crate) fn list(&self, sink: Option<&str>) -> io::Result<Vec<(String, u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for ((name, seq), place) in &self.index {
            if sink.is_some_and(|s| s != name) {
                continue;
            }
            let mut letter = vec![0u8; place.len as usize];
            self.file.read_exact_at(&mut letter, place.offset)?;
            out.push((name.clone(), *seq, letter));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn operations_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut dead = DeadLetters::open(dir.path()).unwrap();
        dead.write(&[
            Op::Add("a", 1, b"one"),
            Op::Add("a", 2, b"two"),
            Op::Add("b", 1, b"b-one"),
        ])
        .unwrap();
        dead.write(&[Op::Forget("a", 1)]).unwrap();
        assert_eq!((dead.count("a"), dead.count("b")), (1, 1));
        drop(dead);
        let path = dir.path().join(FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let good = bytes.len();
        bytes.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
        std::fs::write(&path, &bytes).unwrap();
        let mut dead = DeadLetters::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, good);
        assert_eq!(
            dead.list(None).unwrap(),
            vec![
                ("a".into(), 2, b"two".to_vec()),
                ("b".into(), 1, b"b-one".to_vec())
            ]
        );
        assert!(dead.contains("a", 2) && !dead.contains("a", 1));
        dead.write(&[Op::Purge(Some("a"))]).unwrap();
        assert_eq!(dead.list(None).unwrap().len(), 1);
        dead.write(&[Op::Purge(None)]).unwrap();
        assert!(dead.list(None).unwrap().is_empty());
        drop(dead);
        assert!(DeadLetters::open(dir.path())
            .unwrap()
            .list(None)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn the_file_is_compacted_once_mostly_gone_letters() {
        let dir = tempfile::tempdir().unwrap();
        let mut dead = DeadLetters::open(dir.path()).unwrap();
        let letter = vec![7u8; 4096];
        for seq in 0..400 {
            dead.write(&[Op::Add("s", seq, &letter)]).unwrap();
            if seq % 10 != 0 {
                dead.write(&[Op::Forget("s", seq)]).unwrap();
            }
        }
        let size = std::fs::metadata(dir.path().join(FILE)).unwrap().len();
        assert!(size < 1 << 20, "compacted: {size}");
        assert_eq!(dead.count("s"), 40);
        drop(dead);
        let dead = DeadLetters::open(dir.path()).unwrap();
        let letters = dead.list(Some("s")).unwrap();
        assert_eq!(letters.len(), 40);
        assert!(letters
            .iter()
            .all(|(_, seq, l)| seq % 10 == 0 && *l == letter));
    }
}
