//! The spool's record log: append-only segment files in `<dir>/segments/`, each named by the
//! sequence number of its first record. A record is a 16-byte header (payload length, CRC-32
//! of sequence number and payload, sequence number) and the payload. One thread appends;
//! many appends share one `write` and one `fdatasync` (group commit). Readers take a short
//! lock on the in-memory index (one offset per record) and read with `pread`.
//!
//! After a crash the tail of the last segment may be torn: opening reads each segment up to
//! the first record whose length, checksum or sequence number is wrong, and cuts the file
//! there. What was acknowledged was fsynced, so it is always before that point.
//!
//! A segment is deleted once every sink is past its last record, except the first one that
//! could be kept: it is renamed to `spare` and becomes the next segment, rewritten from its
//! start (as PostgreSQL recycles its WAL segments). An `fdatasync` after a write that grows a
//! file also commits the new size and blocks through the filesystem's journal; one after a
//! write over blocks already written flushes the data alone (on the bench machine's ext4 a
//! commit took 28-38 % less time). What follows the last record of a reused file is the old
//! segment's: a segment is cut to its last record when the next one starts, and the last
//! segment when the log opens, so reading never runs into it. After a restart with a spare
//! waiting, appends start the spare instead of growing the cut last segment.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The first bytes of every segment.
const MAGIC: &[u8; 8] = b"FBSPOOL1";
/// Payload length (u32), CRC-32 (u32), sequence number (u64); little-endian.
const HEADER: usize = 16;
/// A payload larger than this is a torn or foreign record (webhook bodies are far smaller).
const MAX_RECORD: usize = 64 << 20;
/// A finished segment kept for reuse as the next one (not a `.seg`, so never read as one).
const SPARE: &str = "spare";
/// A finished segment is kept as the spare only while the disk has this many segments' worth
/// free: a disk running short gets the space back at once.
const SPARE_ROOM: u64 = 4;

/// One segment in the index.
struct Segment {
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Where each record starts (a segment never exceeds 4 GiB).
    offsets: Vec<u32>,
    /// Where the last record ends.
    len: u64,
}

impl Segment {
    fn end_seq(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }

    /// Byte range of records `from..to` (indexes into this segment).
    fn span(&self, from: usize, to: usize) -> (u64, u64) {
        let start = self.offsets.get(from).map_or(self.len, |o| u64::from(*o));
        let end = self.offsets.get(to).map_or(self.len, |o| u64::from(*o));
        (start, end)
    }
}

/// A run of records to read from one segment, copied out of the index.
struct Run {
    file: Arc<File>,
    first_seq: u64,
    start: u64,
    end: u64,
}

/// The index readers and the writer share.
#[derive(Default)]
pub(crate) struct Index {
    segments: VecDeque<Segment>,
}

impl Index {
    /// The first record kept, if any.
    fn first_seq(&self) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| !s.offsets.is_empty())
            .map(|s| s.first)
    }

    /// One past the last record kept, or the start of an empty last segment (which keeps
    /// the sequence going after everything was deleted).
    fn end_seq(&self) -> Option<u64> {
        self.segments.back().map(Segment::end_seq)
    }

    /// Payload bytes of the records with `from <= seq < to`.
    fn payload_bytes(&self, from: u64, to: u64) -> u64 {
        let mut bytes = 0;
        for segment in &self.segments {
            if segment.end_seq() <= from || segment.first >= to {
                continue;
            }
            let i = usize::try_from(from.saturating_sub(segment.first)).unwrap_or(usize::MAX);
            let j = usize::try_from(to - segment.first)
                .unwrap_or(usize::MAX)
                .min(segment.offsets.len());
            let (start, end) = segment.span(i, j);
            bytes += (end - start) - (HEADER as u64) * (j - i) as u64;
        }
        bytes
    }
}

/// The log: the shared index plus what only the writer touches.
pub(crate) struct Log {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
    /// The segment appends go to; `None` until the next append creates one.
    active: Option<Arc<File>>,
    next_seq: u64,
    segment_bytes: u64,
    /// Set when a write failed; the active segment is then retired as soon as the spool is
    /// empty, so a disk that was full gets its space back.
    write_failed: bool,
    buffer: Vec<u8>,
    /// `segments/spare` holds a finished segment to reuse.
    spare: bool,
}

/// What opening found.
pub(crate) struct Opened {
    pub log: Log,
    /// The first record kept (`next_seq` when none).
    pub first_seq: u64,
    /// Bytes cut from torn tails.
    pub cut: u64,
}

fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    index
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// Payload length, checksum and sequence number in a record's header (`header` holds at
/// least [`HEADER`] bytes).
fn record_header(header: &[u8]) -> (usize, u32, u64) {
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&header[8..16]);
    (
        u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize,
        u32::from_le_bytes([header[4], header[5], header[6], header[7]]),
        u64::from_le_bytes(seq),
    )
}

/// Makes a new directory entry durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// What [`scan`] found in one segment.
struct Scanned {
    /// Where each valid record starts.
    offsets: Vec<u32>,
    /// Where the last valid record ends.
    len: u64,
    /// Reading stopped at what claims to be the next record but is incomplete or fails its
    /// checksum: a torn write (in the last segment) or damage. Otherwise it stopped at the end
    /// of the file or at bytes left by the file's earlier use as another segment.
    torn: bool,
}

/// Reads the valid records of one segment.
fn scan(file: &File, path: &Path, expected_first: u64) -> io::Result<Scanned> {
    let size = file.metadata()?.len();
    let mut reader = io::BufReader::with_capacity(256 << 10, file);
    let mut magic = [0u8; 8];
    reader.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(invalid(format!(
            "{} is not a flexbridge spool segment",
            path.display()
        )));
    }
    let mut offsets = Vec::new();
    let mut at = MAGIC.len() as u64;
    let mut payload = Vec::new();
    let torn = loop {
        let remaining = size - at;
        let mut header = [0u8; HEADER];
        if remaining < HEADER as u64 || reader.read_exact(&mut header).is_err() {
            // A few bytes of a header: the start of a write that went no further.
            break remaining > 0;
        }
        let (len, crc, seq) = record_header(&header);
        let expected = expected_first + offsets.len() as u64;
        if seq != expected {
            // Sequence numbers only grow and are never reused: an earlier segment's bytes.
            break false;
        }
        if len > MAX_RECORD || remaining - (HEADER as u64) < len as u64 {
            break true;
        }
        payload.resize(len, 0);
        if reader.read_exact(&mut payload).is_err() || checksum(seq, &payload) != crc {
            break true;
        }
        let Ok(offset) = u32::try_from(at) else {
            break false;
        };
        offsets.push(offset);
        at += (HEADER + len) as u64;
    };
    Ok(Scanned {
        offsets,
        len: at,
        torn,
    })
}

impl Log {
    /// Opens the segments in `dir/segments` (created if missing), cutting torn tails.
    /// `min_next` is the lowest sequence number the next append may take (cursors can be
    /// ahead of the records kept).
    pub(crate) fn open(dir: &Path, segment_bytes: u64, min_next: u64) -> io::Result<Opened> {
        let dir = dir.join("segments");
        std::fs::create_dir_all(&dir)?;
        let spare = dir.join(SPARE).is_file();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(first) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u64>().ok())
            {
                names.push((first, entry.path()));
            }
        }
        names.sort();
        let mut index = Index::default();
        let mut cut = 0;
        let count = names.len();
        for (position, (first, path)) in names.into_iter().enumerate() {
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let size = file.metadata()?.len();
            if size < MAGIC.len() as u64 {
                // Created, not yet written when the process died: nothing was in it.
                drop(file);
                std::fs::remove_file(&path)?;
                continue;
            }
            if let Some(previous) = index.segments.back() {
                if first < previous.end_seq() {
                    return Err(invalid(format!(
                        "{} starts at record {first}, inside the previous segment (which ends at {})",
                        path.display(),
                        previous.end_seq()
                    )));
                }
            }
            let Scanned { offsets, len, torn } = scan(&file, &path, first)?;
            if len < size && position + 1 == count {
                // Only the last segment is written to, so only its tail can be torn by a crash.
                // Bytes of its earlier use go too: a write the crash interrupted may have left
                // later blocks behind them.
                if torn {
                    cut += size - len;
                    tracing::warn!(
                        segment = %path.display(),
                        bytes = size - len,
                        "spool: cut a torn or unreadable tail (records never acknowledged)"
                    );
                }
                file.set_len(len)?;
                file.sync_all()?;
            } else if len < size {
                // An earlier segment was cut to its last record when the next one started: more
                // is a write that failed and could not be undone, or damage on disk. Its bytes
                // stay in the file for whoever investigates; the records after it are skipped.
                tracing::error!(
                    segment = %path.display(),
                    readable = offsets.len(),
                    unreadable_bytes = size - len,
                    "spool: a segment has unreadable records; they are skipped and kept on disk"
                );
            }
            if offsets.is_empty() && position + 1 < count {
                drop(file);
                std::fs::remove_file(&path)?;
                continue;
            }
            index.segments.push_back(Segment {
                first,
                path,
                file: Arc::new(file),
                offsets,
                len,
            });
        }
        let first_seq = index.first_seq();
        let next_seq = index.end_seq().unwrap_or(0).max(min_next);
        // Appends go to the last segment only if it continues at `next_seq`, and not when a
        // spare is waiting: the last segment was just cut, so every commit into it would grow
        // the file (the slow fsync), where the spare is rewritten in place. Its records stay
        // where they are; the next append starts the spare as a new segment.
        let active = index
            .segments
            .back()
            .filter(|s| {
                s.end_seq() == next_seq && s.len < segment_bytes && (s.offsets.is_empty() || !spare)
            })
            .map(|s| Arc::clone(&s.file));
        // An empty last segment that is not continued would only confuse the next open.
        if active.is_none() {
            if let Some(last) = index.segments.back() {
                if last.offsets.is_empty() {
                    let path = last.path.clone();
                    index.segments.pop_back();
                    std::fs::remove_file(path)?;
                }
            }
        }
        Ok(Opened {
            first_seq: first_seq.unwrap_or(next_seq),
            cut,
            log: Self {
                dir,
                index: Arc::new(Mutex::new(index)),
                active,
                next_seq,
                segment_bytes,
                write_failed: false,
                buffer: Vec::new(),
                spare,
            },
        })
    }

    /// The index, for readers.
    pub(crate) fn index(&self) -> Arc<Mutex<Index>> {
        Arc::clone(&self.index)
    }

    /// The sequence number of the next append.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Starts a segment at `next_seq`: its file (the spare, if there is one), magic and
    /// directory entry made durable.
    fn start_segment(&mut self) -> io::Result<Arc<File>> {
        let path = self.dir.join(segment_name(self.next_seq));
        let reuse = std::mem::take(&mut self.spare);
        let created = (|| {
            // A spare that cannot be taken (removed by hand, say) only costs the reuse.
            let file = if reuse && std::fs::rename(self.dir.join(SPARE), &path).is_ok() {
                OpenOptions::new().read(true).write(true).open(&path)?
            } else {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)?
            };
            file.write_all_at(MAGIC, 0)?;
            file.sync_data()?;
            sync_dir(&self.dir)?;
            Ok::<_, io::Error>(file)
        })();
        let file = match created {
            Ok(file) => Arc::new(file),
            Err(error) => {
                let _ = std::fs::remove_file(&path);
                return Err(error);
            }
        };
        lock(&self.index).segments.push_back(Segment {
            first: self.next_seq,
            path,
            file: Arc::clone(&file),
            offsets: Vec::new(),
            len: MAGIC.len() as u64,
        });
        self.active = Some(Arc::clone(&file));
        Ok(file)
    }

    /// Appends `records` durably (one write, one fdatasync); returns the first one's sequence
    /// number. On failure nothing of them is kept and the log takes appends again.
    pub(crate) fn append<'a>(
        &mut self,
        records: impl ExactSizeIterator<Item = &'a [u8]>,
    ) -> io::Result<u64> {
        let first_seq = self.next_seq;
        if records.len() == 0 {
            return Ok(first_seq);
        }
        let (file, len) = {
            let index = lock(&self.index);
            match (&self.active, index.segments.back()) {
                (Some(file), Some(last)) if last.len < self.segment_bytes => {
                    (Some(Arc::clone(file)), last.len)
                }
                _ => (None, 0),
            }
        };
        let (file, len) = match file {
            Some(file) => (file, len),
            None => {
                self.cut_active();
                let file = self
                    .start_segment()
                    .inspect_err(|_| self.write_failed = true)?;
                (file, MAGIC.len() as u64)
            }
        };
        let mut offsets = Vec::with_capacity(records.len());
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        let mut seq = first_seq;
        for record in records {
            let offset = u32::try_from(len + buffer.len() as u64)
                .map_err(|_| invalid("segment over 4 GiB".to_owned()))?;
            offsets.push(offset);
            let payload_len = u32::try_from(record.len())
                .ok()
                .filter(|l| *l as usize <= MAX_RECORD)
                .ok_or_else(|| invalid(format!("record of {} bytes", record.len())))?;
            buffer.extend_from_slice(&payload_len.to_le_bytes());
            buffer.extend_from_slice(&checksum(seq, record).to_le_bytes());
            buffer.extend_from_slice(&seq.to_le_bytes());
            buffer.extend_from_slice(record);
            seq += 1;
        }
        let written = file
            .write_all_at(&buffer, len)
            .and_then(|()| file.sync_data());
        let end = len + buffer.len() as u64;
        // Large batches are rare; keep the buffer from pinning their size.
        if buffer.capacity() <= 4 << 20 {
            self.buffer = buffer;
        }
        if let Err(error) = written {
            self.write_failed = true;
            // Undo the partial write so the next batch starts on a record boundary; if even
            // that fails, the next batch starts a new segment (the torn bytes are cut at the
            // next open).
            if file.set_len(len).is_err() {
                self.retire_active();
            }
            return Err(error);
        }
        let mut index = lock(&self.index);
        if let Some(last) = index.segments.back_mut() {
            last.offsets.extend_from_slice(&offsets);
            last.len = end;
        }
        self.next_seq = seq;
        Ok(first_seq)
    }

    /// Stops appending to the active segment and cuts it to its last record, so a reused
    /// file's older bytes are never read as records after it.
    fn cut_active(&mut self) {
        let Some(file) = self.active.take() else {
            return;
        };
        let Some(len) = lock(&self.index).segments.back().map(|s| s.len) else {
            return;
        };
        let cut = file.metadata().and_then(|m| {
            if m.len() > len {
                file.set_len(len)?;
                file.sync_data()?;
            }
            Ok(())
        });
        if let Err(error) = cut {
            tracing::warn!(%error, "spool: cannot cut a finished segment to its last record (the next start reports the rest as unreadable)");
        }
    }

    /// Whether the disk has room to keep a finished segment for reuse.
    fn room_for_spare(&self) -> bool {
        rustix::fs::statvfs(&self.dir).is_ok_and(|stats| {
            stats.f_bavail.saturating_mul(stats.f_frsize)
                >= self.segment_bytes.saturating_mul(SPARE_ROOM)
        })
    }

    /// Stops appending to the active segment; an empty one is deleted.
    fn retire_active(&mut self) {
        self.active = None;
        let mut index = lock(&self.index);
        if index.segments.back().is_some_and(|s| s.offsets.is_empty()) {
            if let Some(last) = index.segments.pop_back() {
                let _ = std::fs::remove_file(last.path);
            }
        }
    }

    /// Payload bytes of the records with `from <= seq < to`.
    pub(crate) fn payload_bytes(&self, from: u64, to: u64) -> u64 {
        lock(&self.index).payload_bytes(from, to)
    }

    /// Deletes the segments whose records are all below `low`. The active segment goes too
    /// when every record is below `low` and it is large or a write failed (a disk that was
    /// full gets its space back). Returns the number of segments deleted.
    pub(crate) fn delete_below(&mut self, low: u64) -> io::Result<usize> {
        let mut doomed = Vec::new();
        {
            let mut index = lock(&self.index);
            while index.segments.len() > 1
                && index.segments.front().is_some_and(|s| s.end_seq() <= low)
            {
                if let Some(segment) = index.segments.pop_front() {
                    doomed.push(segment.path);
                }
            }
            let retire = index.segments.len() == 1
                && index.segments.front().is_some_and(|s| {
                    s.end_seq() <= low
                        && !s.offsets.is_empty()
                        && (self.write_failed || s.len >= self.segment_bytes / 4)
                });
            if retire {
                if let Some(segment) = index.segments.pop_front() {
                    doomed.push(segment.path);
                }
                self.active = None;
            }
        }
        let count = doomed.len();
        for path in doomed {
            let kept = !self.spare
                && !self.write_failed
                && self.room_for_spare()
                && std::fs::rename(&path, self.dir.join(SPARE)).is_ok();
            if kept {
                self.spare = true;
            } else {
                std::fs::remove_file(path)?;
            }
        }
        if count > 0 && self.active.is_none() {
            self.write_failed = false;
            // An empty segment named after the next sequence number keeps the numbering
            // going across a restart (dead letters are keyed by it); if the disk refuses
            // even that, the next append tries again.
            if let Err(error) = self.start_segment() {
                tracing::debug!(%error, "spool: cannot start a segment yet");
            }
        }
        Ok(count)
    }
}

/// Up to `limit` records with `from <= seq < to`, in order, checked against their checksums.
pub(crate) fn read(
    index: &Mutex<Index>,
    from: u64,
    to: u64,
    limit: usize,
) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let runs = runs(index, from, to, limit);
    read_runs(index, runs)
}

/// Where the records `from <= seq < to` (at most `limit`) are, copied out of the index.
fn runs(index: &Mutex<Index>, from: u64, to: u64, limit: usize) -> Vec<Run> {
    let mut runs = Vec::new();
    {
        let index = lock(index);
        let mut left = limit;
        for segment in &index.segments {
            if left == 0 || segment.first >= to {
                break;
            }
            if segment.end_seq() <= from {
                continue;
            }
            let i = usize::try_from(from.saturating_sub(segment.first)).unwrap_or(usize::MAX);
            let j = usize::try_from(to - segment.first)
                .unwrap_or(usize::MAX)
                .min(segment.offsets.len())
                .min(i.saturating_add(left));
            if i >= j {
                continue;
            }
            let (start, end) = segment.span(i, j);
            runs.push(Run {
                file: Arc::clone(&segment.file),
                first_seq: segment.first + i as u64,
                start,
                end,
            });
            left -= j - i;
        }
    }
    runs
}

/// Reads the records of `runs`, in order.
fn read_runs(index: &Mutex<Index>, runs: Vec<Run>) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    for run in runs {
        if let Err(error) = read_run(&run, &mut out) {
            // Between the index and the read every sink may have finished the run's segment,
            // and its file been reused for new records: those records are gone, not damaged.
            if lock(index)
                .first_seq()
                .is_none_or(|first| first > run.first_seq)
            {
                break;
            }
            return Err(error);
        }
    }
    Ok(out)
}

/// Reads the records of one run into `out`, checked against their checksums.
fn read_run(run: &Run, out: &mut Vec<(u64, Vec<u8>)>) -> io::Result<()> {
    let mut bytes = vec![0u8; usize::try_from(run.end - run.start).unwrap_or(0)];
    run.file.read_exact_at(&mut bytes, run.start)?;
    let mut at = 0;
    let mut seq = run.first_seq;
    let before = out.len();
    while at < bytes.len() {
        let record = bytes.get(at..at + HEADER).and_then(|header| {
            let (len, crc, _) = record_header(header);
            let payload = bytes.get(at + HEADER..at + HEADER + len)?;
            Some((len, crc, payload))
        });
        let Some((len, crc, payload)) = record else {
            out.truncate(before);
            return Err(invalid(format!("record {seq}: truncated")));
        };
        if checksum(seq, payload) != crc {
            out.truncate(before);
            return Err(invalid(format!("record {seq}: checksum mismatch")));
        }
        out.push((seq, payload.to_vec()));
        at += HEADER + len;
        seq += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn records(n: usize, from: usize) -> Vec<Vec<u8>> {
        (from..from + n)
            .map(|i| format!("record {i}").repeat(i % 7 + 1).into_bytes())
            .collect()
    }

    fn append(log: &mut Log, records: &[Vec<u8>]) -> u64 {
        log.append(records.iter().map(Vec::as_slice)).unwrap()
    }

    #[test]
    fn records_come_back_in_order_across_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let all = records(300, 0);
        {
            let mut log = Log::open(dir.path(), 4096, 0).unwrap().log;
            for chunk in all.chunks(7) {
                append(&mut log, chunk);
            }
            assert!(lock(&log.index).segments.len() > 3, "it rolled");
            let back = read(&log.index, 0, 300, 1000).unwrap();
            assert_eq!(
                back.iter().map(|r| &r.1).collect::<Vec<_>>(),
                all.iter().collect::<Vec<_>>()
            );
            assert_eq!(read(&log.index, 10, 20, 4).unwrap().len(), 4, "limit");
            assert_eq!(read(&log.index, 295, 1000, 100).unwrap().len(), 5);
        }
        let opened = Log::open(dir.path(), 4096, 0).unwrap();
        assert_eq!((opened.first_seq, opened.cut), (0, 0));
        assert_eq!(opened.log.next_seq(), 300);
        let back = read(&opened.log.index, 0, 300, 1000).unwrap();
        assert_eq!(back.len(), 300);
        assert!(back
            .iter()
            .enumerate()
            .all(|(i, (seq, r))| *seq == i as u64 && *r == all[i]));
    }

    #[test]
    fn a_torn_tail_is_cut_and_appends_continue_after_the_last_good_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 1 << 20, 0).unwrap().log;
        append(&mut log, &records(10, 0));
        let path = lock(&log.index).segments[0].path.clone();
        drop(log);
        let good = std::fs::metadata(&path).unwrap().len();
        // A crash in the middle of a write: half a record, then garbage after a whole one.
        let file = OpenOptions::new().append(true).open(&path).unwrap();
        let mut torn = Vec::new();
        torn.extend_from_slice(&5u32.to_le_bytes());
        torn.extend_from_slice(&checksum(10, b"hello").to_le_bytes());
        torn.extend_from_slice(&10u64.to_le_bytes());
        torn.extend_from_slice(b"hel");
        std::io::Write::write_all(&mut &file, &torn).unwrap();
        drop(file);
        let opened = Log::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(opened.cut, torn.len() as u64);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        let mut log = opened.log;
        assert_eq!(log.next_seq(), 10);
        append(&mut log, &records(2, 10));
        let back = read(&log.index, 0, 100, 100).unwrap();
        assert_eq!(back.len(), 12);
        assert_eq!(back[11].1, records(1, 11)[0]);
    }

    fn inode(path: &Path) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
    }

    fn segment_files(log: &Log) -> Vec<(PathBuf, u64)> {
        lock(&log.index)
            .segments
            .iter()
            .map(|s| (s.path.clone(), s.len))
            .collect()
    }

    /// Checks that records `from..` of `all` read back from `log`, and the same after it is
    /// reopened (4 KiB segments) with nothing cut; returns the reopened log.
    fn records_survive_reopen(dir: &Path, log: Log, all: &[Vec<u8>], from: usize) -> Log {
        let (first, end) = (from as u64, all.len() as u64);
        let back = read(&log.index, first, end, 1000).unwrap();
        assert_eq!(
            back.iter().map(|r| &r.1).collect::<Vec<_>>(),
            all[from..].iter().collect::<Vec<_>>()
        );
        drop(log);
        let opened = Log::open(dir, 4096, 0).unwrap();
        assert_eq!(opened.cut, 0);
        assert_eq!(read(&opened.log.index, first, end, 1000).unwrap(), back);
        opened.log
    }

    #[test]
    fn a_finished_segment_is_reused_as_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 4096, 0).unwrap().log;
        let all = records(400, 0);
        for chunk in all[..200].chunks(10) {
            append(&mut log, chunk);
        }
        // A segment that was written to its end and left is cut to its last record.
        let segments = segment_files(&log);
        for (path, len) in &segments[..segments.len() - 1] {
            assert_eq!(std::fs::metadata(path).unwrap().len(), *len);
        }
        let first = segments[0].0.clone();
        let first_inode = inode(&first);
        assert!(log.delete_below(150).unwrap() > 0);
        let spare = dir.path().join("segments").join(SPARE);
        assert!(!first.exists());
        assert_eq!(
            inode(&spare),
            first_inode,
            "the first finished segment is kept"
        );
        for chunk in all[200..].chunks(10) {
            append(&mut log, chunk);
        }
        assert!(!spare.exists(), "the spare became a segment");
        let reused = segment_files(&log)
            .into_iter()
            .find(|(path, _)| inode(path) == first_inode);
        let (reused, _) = reused.expect("a later segment is the reused file");
        assert!(reused > first);
        let reopened = records_survive_reopen(dir.path(), log, &all, 150);
        assert_eq!(reopened.next_seq(), 400);
    }

    #[test]
    fn after_a_restart_appends_go_to_the_spare_not_the_last_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 4096, 0).unwrap().log;
        let all = records(300, 0);
        for chunk in all[..200].chunks(10) {
            append(&mut log, chunk);
        }
        assert!(log.delete_below(100).unwrap() > 0);
        let spare = dir.path().join("segments").join(SPARE);
        let spare_inode = inode(&spare);
        let (last, last_len) = segment_files(&log).pop().unwrap();
        assert!(last_len < 4096, "the last segment has room left");
        drop(log);

        let mut log = Log::open(dir.path(), 4096, 0).unwrap().log;
        append(&mut log, &all[200..210]);
        assert_eq!(
            std::fs::metadata(&last).unwrap().len(),
            last_len,
            "the last segment before the restart did not grow"
        );
        assert!(!spare.exists());
        let (now, _) = segment_files(&log).pop().unwrap();
        assert_eq!(now, dir.path().join("segments").join(segment_name(200)));
        assert_eq!(inode(&now), spare_inode, "the spare took the appends");
        for chunk in all[210..].chunks(10) {
            append(&mut log, chunk);
        }
        records_survive_reopen(dir.path(), log, &all, 100);
    }

    #[test]
    fn without_a_spare_appends_continue_the_last_segment_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 1 << 20, 0).unwrap().log;
        append(&mut log, &records(10, 0));
        drop(log);
        let mut log = Log::open(dir.path(), 1 << 20, 0).unwrap().log;
        append(&mut log, &records(10, 10));
        assert_eq!(segment_files(&log).len(), 1);
        assert_eq!(read(&log.index, 0, 20, 100).unwrap().len(), 20);
    }

    #[test]
    fn an_earlier_use_of_the_last_segment_is_not_read_as_records() {
        let dir = tempfile::tempdir().unwrap();
        let segment_bytes = 64 << 10;
        let mut log = Log::open(dir.path(), segment_bytes, 0).unwrap().log;
        // Large records fill the first segment; once finished, it is the spare.
        let large = |n: u64| -> Vec<Vec<u8>> {
            (0..n).map(|i| vec![b'a' + (i % 26) as u8; 1000]).collect()
        };
        append(&mut log, &large(100));
        append(&mut log, &large(70));
        assert_eq!(log.delete_below(100).unwrap(), 1);
        // The next segment is the spare: small records overwrite the start of the large ones,
        // whose later bytes stay after them.
        append(&mut log, &records(5, 170));
        let (path, len) = segment_files(&log).pop().unwrap();
        assert!(
            std::fs::metadata(&path).unwrap().len() > len,
            "older bytes follow"
        );
        drop(log);
        let opened = Log::open(dir.path(), segment_bytes, 0).unwrap();
        assert_eq!(opened.cut, 0, "not a torn write");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            len,
            "cut at its last record"
        );
        let mut log = opened.log;
        assert_eq!(log.next_seq(), 175);
        append(&mut log, &records(2, 175));
        let back = read(&log.index, 170, 1000, 1000).unwrap();
        assert_eq!(
            back.iter().map(|r| &r.1).collect::<Vec<_>>(),
            records(7, 170).iter().collect::<Vec<_>>()
        );
        // Left for the next segment: cut to its last record (a later open must find nothing
        // after it); the file is made longer than anything written to it first.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(segment_bytes * 2)
            .unwrap();
        append(&mut log, &large(70));
        append(&mut log, &records(1, 247));
        let segments = segment_files(&log);
        let (left, len) = &segments[segments.len() - 2];
        assert_eq!(left, &path);
        assert_eq!(std::fs::metadata(left).unwrap().len(), *len);
    }

    #[test]
    fn a_read_that_finds_its_segment_reused_returns_no_records_and_no_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 4096, 0).unwrap().log;
        for chunk in records(100, 0).chunks(10) {
            append(&mut log, chunk);
        }
        let first_end = lock(&log.index).segments[0].end_seq();
        // A reader found the first segment in the index; before it reads, every sink finishes
        // it and its file is written again as a later segment.
        let runs = runs(&log.index, 0, first_end, 1000);
        log.delete_below(first_end).unwrap();
        let large: Vec<Vec<u8>> = (0..40).map(|i| vec![b'x'; 100 + i]).collect();
        for chunk in large.chunks(5) {
            append(&mut log, chunk);
        }
        let first_inode = std::os::unix::fs::MetadataExt::ino(&runs[0].file.metadata().unwrap());
        assert!(
            segment_files(&log)
                .iter()
                .any(|(path, _)| inode(path) == first_inode),
            "the first segment's file was reused"
        );
        assert!(read_runs(&log.index, runs).unwrap().is_empty());
    }

    #[test]
    fn a_corrupted_record_ends_the_log_there_and_reads_report_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 1 << 20, 0).unwrap().log;
        append(&mut log, &records(5, 0));
        let (path, offset) = {
            let index = lock(&log.index);
            (index.segments[0].path.clone(), index.segments[0].offsets[3])
        };
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", u64::from(offset) + HEADER as u64)
            .unwrap();
        let error = read(&log.index, 0, 5, 5).unwrap_err();
        assert!(error.to_string().contains("record 3: checksum"), "{error}");
        drop(log);
        let opened = Log::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(opened.log.next_seq(), 3);
        assert!(opened.cut > 0);
    }

    #[test]
    fn damage_in_an_earlier_segment_is_skipped_never_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 4096, 0).unwrap().log;
        for chunk in records(300, 0).chunks(5) {
            append(&mut log, chunk);
        }
        let (path, offset, end) = {
            let index = lock(&log.index);
            assert!(index.segments.len() > 2);
            let first = &index.segments[0];
            (first.path.clone(), first.offsets[2], first.end_seq())
        };
        drop(log);
        let size = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", u64::from(offset) + HEADER as u64)
            .unwrap();
        let opened = Log::open(dir.path(), 4096, 0).unwrap();
        assert_eq!(opened.cut, 0);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            size,
            "kept on disk"
        );
        let back = read(&opened.log.index, 0, 300, 1000).unwrap();
        let seqs: Vec<u64> = back.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs[..2], [0, 1]);
        assert_eq!(seqs[2], end, "skips to the next segment");
        assert_eq!(opened.log.next_seq(), 300);
    }

    #[test]
    fn segments_below_every_cursor_are_deleted_and_bytes_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 4096, 0).unwrap().log;
        let all = records(200, 0);
        for chunk in all.chunks(10) {
            append(&mut log, chunk);
        }
        let total: u64 = all.iter().map(|r| r.len() as u64).sum();
        assert_eq!(log.payload_bytes(0, 200), total);
        assert_eq!(log.payload_bytes(5, 6), all[5].len() as u64);
        let segments = lock(&log.index).segments.len();
        assert!(log.delete_below(100).unwrap() > 0);
        let index = lock(&log.index);
        assert!(index.segments.len() < segments);
        assert!(index.first_seq().unwrap() <= 100);
        drop(index);
        assert_eq!(read(&log.index, 100, 200, 1000).unwrap().len(), 100);
        // Everything finished: the last segment goes (a quarter of the segment size), an
        // empty one named after the next record keeps the numbering.
        log.delete_below(200).unwrap();
        let index = lock(&log.index);
        assert_eq!(index.segments.len(), 1);
        assert_eq!(
            (index.segments[0].first, index.segments[0].offsets.len()),
            (200, 0)
        );
        drop(index);
        let reopened = Log::open(dir.path(), 4096, 0).unwrap();
        assert_eq!(reopened.log.next_seq(), 200);
        // Cursors can be ahead of every record kept.
        let ahead = Log::open(dir.path(), 4096, 500).unwrap();
        assert_eq!(ahead.log.next_seq(), 500);
    }

    #[test]
    fn after_a_failed_write_the_empty_spool_gives_its_segment_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 1 << 20, 0).unwrap().log;
        append(&mut log, &records(3, 0));
        log.write_failed = true;
        assert_eq!(log.delete_below(3).unwrap(), 1);
        assert!(lock(&log.index).segments[0].offsets.is_empty());
        assert_eq!(append(&mut log, &records(1, 3)), 3);
        assert_eq!(read(&log.index, 0, 10, 10).unwrap()[0].0, 3);
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("segments")).unwrap();
        std::fs::write(
            dir.path().join("segments").join(segment_name(0)),
            b"not a segment",
        )
        .unwrap();
        let error = Log::open(dir.path(), 1 << 20, 0).err().unwrap();
        assert!(error.to_string().contains("not a flexbridge spool segment"));
    }
}
