//! The on-disk spool between the writer thread and the shipper: what makes the audit stream
//! survive a SIEM outage and a restart of portcullis.
//!
//! Layout of `spool_dir`:
//! - `00000000000000000007.seg` — segment files, append-only. Each record is an RFC 6587
//!   octet-counted frame plus a newline: `LEN SP MSG LF` (MSG an RFC 5424 message), so the
//!   shipper sends `LEN SP MSG` as it is over TCP/TLS and a human can `cat` the file.
//! - `shipped` — `SEGMENT OFFSET`: everything before this point is known to be delivered. Written
//!   by the shipper (temp file + rename); lost or stale only means resending (duplicates, never
//!   gaps).
//! - `incoming/*.seg` — one-shot records from `portcullis keys ...` ([`write_incoming`]), moved
//!   into segments by the running writer (or the next start).
//! - `lock` — held by the one writer process.
//!
//! One writer appends; each start begins a new segment, so a torn tail left by a crash can only
//! sit at the end of an older segment, where the reader skips it. The writer publishes how far
//! the newest segment holds complete records; the reader never reads past that.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEGMENT_EXT: &str = "seg";
const SHIPPED_FILE: &str = "shipped";
const LOCK_FILE: &str = "lock";
const INCOMING_DIR: &str = "incoming";
/// Longest record accepted when reading back (guards against a corrupt length).
const MAX_RECORD: usize = 16 << 20;

/// A point in the spool: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct SpoolPos {
    /// The segment number.
    pub segment: u64,
    /// Bytes from the segment's start.
    pub offset: u64,
}

/// When the writer makes spool appends durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every batch the writer takes from the queue (group commit), before shipping it.
    Always,
    /// At most this long after a write.
    Interval(Duration),
    /// Leave it to the operating system.
    Never,
}

impl FsyncPolicy {
    /// Parses `always`, `never`, `interval` (1 s) or a duration such as `200ms` (an interval).
    pub fn parse(s: &str) -> Result<FsyncPolicy, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            "interval" => Ok(FsyncPolicy::Interval(Duration::from_secs(1))),
            other => humantime::parse_duration(other)
                .ok()
                .filter(|d| !d.is_zero())
                .map(FsyncPolicy::Interval)
                .ok_or_else(|| {
                    format!("fsync: expected always, interval, never or a duration, got {other:?}")
                }),
        }
    }
}

/// The path of segment `id`.
fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{SEGMENT_EXT}"))
}

/// The segments in `dir` as `(id, length)`, oldest first.
pub(crate) fn list_segments(dir: &Path) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((id, entry.metadata()?.len()));
    }
    out.sort_unstable();
    Ok(out)
}

/// Appends one record (`LEN SP MSG LF`) to `out`.
pub(crate) fn encode(msg: &[u8], out: &mut Vec<u8>) {
    let _ = write!(out, "{} ", msg.len());
    out.extend_from_slice(msg);
    out.push(b'\n');
}

/// The size of the record holding a message of `len` bytes.
fn encoded_len(len: usize) -> usize {
    let mut digits = 1;
    let mut n = len / 10;
    while n > 0 {
        digits += 1;
        n /= 10;
    }
    digits + 1 + len + 1
}

/// The result of reading one record from the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A whole record: its size including the LF and where MSG starts.
    Complete { size: usize, msg_start: usize },
    /// More bytes are needed: the record's full size when already known.
    Incomplete(Option<usize>),
    /// Not a record.
    Corrupt,
}

/// Reads the record at the front of `buf`.
pub(crate) fn parse(buf: &[u8]) -> Frame {
    let digits = buf
        .iter()
        .take(11)
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == buf.len() {
        return if buf.first() == Some(&b'0') || digits > 10 {
            Frame::Corrupt
        } else {
            Frame::Incomplete(None)
        };
    }
    if digits == 0 || digits > 10 || buf[0] == b'0' || buf[digits] != b' ' {
        return Frame::Corrupt;
    }
    let len = buf[..digits]
        .iter()
        .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
    if len > MAX_RECORD {
        return Frame::Corrupt;
    }
    let size = digits + 1 + len + 1;
    match buf.get(size - 1) {
        None => Frame::Incomplete(Some(size)),
        Some(b'\n') => Frame::Complete {
            size,
            msg_start: digits + 1,
        },
        Some(_) => Frame::Corrupt,
    }
}

/// Why the writer could not append.
#[derive(Debug)]
pub(crate) struct SpoolError {
    /// The I/O error.
    pub source: io::Error,
    /// Records queued for the failed write that are now lost (counted as dropped).
    pub lost: u64,
}

/// The single appender of a spool directory. Lives in the writer thread.
pub(crate) struct SpoolWriter {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    fsync: FsyncPolicy,
    total: Arc<AtomicU64>,
    segment: u64,
    file: File,
    len: u64,
    pending: Vec<u8>,
    pending_count: u64,
    broken: bool,
    dirty: bool,
    last_sync: Instant,
    _lock: File,
}

impl SpoolWriter {
    /// Locks `dir` (creating it), counts what is there into `total` and starts a new segment.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
        fsync: FsyncPolicy,
        total: Arc<AtomicU64>,
    ) -> io::Result<SpoolWriter> {
        std::fs::create_dir_all(dir.join(INCOMING_DIR))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("spool {} is in use by another process", dir.display()),
            )
        })?;
        let segments = list_segments(dir)?;
        total.store(segments.iter().map(|s| s.1).sum(), Ordering::Relaxed);
        let newest = segments.last().map_or(0, |s| s.0);
        let shipped = load_shipped(dir).map_or(0, |p| p.segment);
        let (segment, file) = create_segment(dir, newest.max(shipped) + 1)?;
        if fsync != FsyncPolicy::Never {
            sync_dir(dir)?;
        }
        Ok(SpoolWriter {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes: segment_bytes.max(1),
            fsync,
            total,
            segment,
            file,
            len: 0,
            pending: Vec::with_capacity(64 * 1024),
            pending_count: 0,
            broken: false,
            dirty: false,
            last_sync: Instant::now(),
            _lock: lock,
        })
    }

    /// How far complete records reach: what the shipper may read.
    pub fn position(&self) -> SpoolPos {
        SpoolPos {
            segment: self.segment,
            offset: self.len,
        }
    }

    /// Whether a message of `len` bytes would fit under `spool_max_bytes` now.
    pub fn fits(&self, len: usize) -> bool {
        self.fits_records(encoded_len(len))
    }

    fn fits_records(&self, bytes: usize) -> bool {
        let used = self.total.load(Ordering::Relaxed) + self.pending.len() as u64;
        used + bytes as u64 <= self.max_bytes
    }

    /// Queues one record for the next [`commit`](Self::commit); false when the spool is full.
    pub fn append(&mut self, msg: &[u8]) -> bool {
        if !self.fits(msg.len()) {
            return false;
        }
        encode(msg, &mut self.pending);
        self.pending_count += 1;
        true
    }

    /// Writes what was appended (one `write`), syncs per policy, rolls a full segment.
    pub fn commit(&mut self) -> Result<SpoolPos, SpoolError> {
        if self.pending.is_empty() {
            return Ok(self.position());
        }
        let lost = self.pending_count;
        let fail = |source| SpoolError { source, lost };
        if self.broken {
            self.roll().map_err(|e| {
                self.discard_pending();
                fail(e)
            })?;
        }
        if let Err(e) = self.file.write_all(&self.pending) {
            // Cut back to the last whole record; if even that fails, never append here again.
            if self.file.set_len(self.len).is_err() {
                self.broken = true;
            }
            self.discard_pending();
            return Err(fail(e));
        }
        let written = self.pending.len() as u64;
        self.len += written;
        self.total.fetch_add(written, Ordering::Relaxed);
        self.discard_pending();
        self.dirty = true;
        if self.fsync == FsyncPolicy::Always {
            self.sync().map_err(|e| SpoolError { source: e, lost: 0 })?;
        }
        if self.len >= self.segment_bytes {
            if let Err(e) = self.roll() {
                self.broken = true;
                tracing::warn!(error = %e, "audit spool: cannot start a new segment");
            }
        }
        Ok(self.position())
    }

    fn discard_pending(&mut self) {
        self.pending.clear();
        self.pending_count = 0;
    }

    /// Syncs when the interval policy says it is time.
    pub fn tick(&mut self) -> io::Result<()> {
        match self.fsync {
            FsyncPolicy::Interval(every) if self.dirty && self.last_sync.elapsed() >= every => {
                self.sync()
            }
            _ => Ok(()),
        }
    }

    /// Makes everything written durable, whatever the policy (used at shutdown).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    fn roll(&mut self) -> io::Result<()> {
        if self.fsync != FsyncPolicy::Never {
            self.sync()?;
        }
        let (segment, file) = create_segment(&self.dir, self.segment + 1)?;
        if self.fsync != FsyncPolicy::Never {
            sync_dir(&self.dir)?;
        }
        self.segment = segment;
        self.file = file;
        self.len = 0;
        self.dirty = false;
        self.broken = false;
        Ok(())
    }

    /// Moves `incoming/` files (from the CLI) into the spool, oldest first. A file is taken
    /// whole or left for later (when the spool is full), so nothing is spooled twice.
    pub fn take_incoming(&mut self) -> Result<u64, SpoolError> {
        let io_err = |source| SpoolError { source, lost: 0 };
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.join(INCOMING_DIR))
            .map_err(io_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == SEGMENT_EXT))
            .collect();
        files.sort();
        let mut taken = 0;
        for path in files {
            let bytes = std::fs::read(&path).map_err(io_err)?;
            let msgs = records(&bytes);
            let need: usize = msgs.iter().map(|r| encoded_len(r.len())).sum();
            if !self.fits_records(need) {
                break;
            }
            for r in &msgs {
                self.append(&bytes[r.clone()]);
            }
            self.commit()?;
            self.sync().map_err(io_err)?;
            std::fs::remove_file(&path).map_err(io_err)?;
            taken += msgs.len() as u64;
        }
        Ok(taken)
    }
}

/// The MSG ranges of the whole records at the front of `bytes`.
fn records(bytes: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Frame::Complete { size, msg_start } = parse(&bytes[at..]) {
        out.push(at + msg_start..at + size - 1);
        at += size;
    }
    out
}

fn create_segment(dir: &Path, mut id: u64) -> io::Result<(u64, File)> {
    loop {
        match OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(segment_path(dir, id))
        {
            Ok(f) => return Ok((id, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => id += 1,
            Err(e) => return Err(e),
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Appends records to `incoming/` for the running writer to pick up: the one-shot path used by
/// the key CLI. Written to a temp file, synced, then renamed, so a reader sees all or nothing.
pub(crate) fn write_incoming(dir: &Path, msgs: &[Vec<u8>]) -> io::Result<()> {
    let incoming = dir.join(INCOMING_DIR);
    std::fs::create_dir_all(&incoming)?;
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let name = format!(
        "{nanos:024}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let tmp = incoming.join(format!("{name}.tmp"));
    let mut bytes = Vec::new();
    for m in msgs {
        encode(m, &mut bytes);
    }
    let mut f = File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, incoming.join(format!("{name}.{SEGMENT_EXT}")))?;
    sync_dir(&incoming)
}

/// The persisted shipped offset, if any and readable.
pub(crate) fn load_shipped(dir: &Path) -> Option<SpoolPos> {
    let text = std::fs::read_to_string(dir.join(SHIPPED_FILE)).ok()?;
    let mut parts = text.split_whitespace();
    let segment = parts.next()?.parse().ok()?;
    let offset = parts.next()?.parse().ok()?;
    Some(SpoolPos { segment, offset })
}

/// Persists the shipped offset (temp file + rename; `sync` also fsyncs, for shutdown).
pub(crate) fn store_shipped(dir: &Path, pos: SpoolPos, sync: bool) -> io::Result<()> {
    let tmp = dir.join(format!("{SHIPPED_FILE}.tmp"));
    let mut f = File::create(&tmp)?;
    writeln!(f, "{} {}", pos.segment, pos.offset)?;
    if sync {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(SHIPPED_FILE))?;
    if sync {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Where the shipper starts: the persisted offset, or the oldest segment when that is missing,
/// unreadable or points outside the spool.
pub(crate) fn start_position(dir: &Path, published: SpoolPos) -> io::Result<SpoolPos> {
    let oldest = list_segments(dir)?
        .first()
        .map_or(published.segment, |s| s.0);
    let from_oldest = SpoolPos {
        segment: oldest,
        offset: 0,
    };
    Ok(match load_shipped(dir) {
        Some(p) if p.segment >= oldest && p <= published => p,
        _ => from_oldest,
    })
}

/// Deletes the segments before `segment` (all shipped); returns the bytes freed.
pub(crate) fn delete_before(dir: &Path, segment: u64, total: &AtomicU64) -> io::Result<u64> {
    let mut freed = 0;
    for (id, len) in list_segments(dir)? {
        if id >= segment {
            break;
        }
        match std::fs::remove_file(segment_path(dir, id)) {
            Ok(()) => freed += len,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    total.fetch_sub(freed.min(total.load(Ordering::Relaxed)), Ordering::Relaxed);
    Ok(freed)
}

/// What one read from the spool returned.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// The records' frames back to back, each `LEN SP MSG` (the TCP/TLS payload).
    pub bytes: Vec<u8>,
    /// Each record's MSG range in `bytes` and the spool offset just after it.
    pub records: Vec<(Range<usize>, u64)>,
    /// Where the next read starts: after the last record, or the start of the next segment.
    pub end: SpoolPos,
    /// Bytes of a torn or corrupt tail skipped at the end of an old segment.
    pub skipped: u64,
}

/// Reads the spool in order for the shipper.
pub(crate) struct SpoolReader {
    dir: PathBuf,
    open: Option<(u64, File)>,
    buf: Vec<u8>,
}

impl SpoolReader {
    /// A reader of `dir`.
    pub fn new(dir: &Path) -> SpoolReader {
        SpoolReader {
            dir: dir.to_owned(),
            open: None,
            buf: Vec::new(),
        }
    }

    /// Up to about `max` bytes of whole records from `from`, never past `published`. An empty
    /// batch with `end == from` means there is nothing more yet.
    pub fn read(&mut self, from: SpoolPos, published: SpoolPos, max: usize) -> io::Result<Batch> {
        let mut batch = Batch {
            end: from,
            ..Batch::default()
        };
        if from.segment > published.segment {
            return Ok(batch);
        }
        let active = from.segment == published.segment;
        let limit = if active { published.offset } else { u64::MAX };
        if from.offset >= limit {
            return Ok(batch);
        }
        let mut want = (limit - from.offset).min(max.max(64) as u64) as usize;
        let n = loop {
            let n = match self.read_at(from, want) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::NotFound && !active => 0,
                Err(e) => return Err(e),
            };
            match parse(&self.buf[..n]) {
                Frame::Incomplete(Some(size)) if n == want && size > want => want = size,
                _ => break n,
            }
        };
        let mut at = 0;
        while let Frame::Complete { size, msg_start } = parse(&self.buf[at..n]) {
            let base = batch.bytes.len();
            batch.bytes.extend_from_slice(&self.buf[at..at + size - 1]);
            at += size;
            let msg = base + msg_start..batch.bytes.len();
            batch.records.push((msg, from.offset + at as u64));
        }
        batch.end.offset = from.offset + at as u64;
        if at == 0 {
            if active {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "corrupt record in segment {} at {}",
                        from.segment, from.offset
                    ),
                ));
            }
            // The end of an older segment (cleanly or at a torn tail): go on with the next.
            batch.skipped = n as u64;
            batch.end = SpoolPos {
                segment: self.next_segment(from.segment, published)?,
                offset: 0,
            };
        }
        Ok(batch)
    }

    /// Reads up to `want` bytes at `from` into `buf`; the count read.
    fn read_at(&mut self, from: SpoolPos, want: usize) -> io::Result<usize> {
        if self.open.as_ref().map(|o| o.0) != Some(from.segment) {
            self.open = None;
            let f = File::open(segment_path(&self.dir, from.segment))?;
            self.open = Some((from.segment, f));
        }
        let Some((_, file)) = &self.open else {
            return Ok(0);
        };
        self.buf.resize(want, 0);
        let mut n = 0;
        while n < want {
            match file.read_at(&mut self.buf[n..want], from.offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    fn next_segment(&mut self, after: u64, published: SpoolPos) -> io::Result<u64> {
        self.open = None;
        let next = list_segments(&self.dir)?
            .into_iter()
            .map(|s| s.0)
            .find(|id| *id > after && *id <= published.segment);
        Ok(next.unwrap_or(published.segment))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn writer(dir: &Path, max: u64, seg: u64) -> (SpoolWriter, Arc<AtomicU64>) {
        let total = Arc::new(AtomicU64::new(0));
        let w = SpoolWriter::open(dir, max, seg, FsyncPolicy::Always, total.clone());
        (w.unwrap_or_else(|e| panic!("open: {e}")), total)
    }

    fn read_all(dir: &Path, from: SpoolPos, published: SpoolPos) -> (Vec<String>, SpoolPos) {
        let mut r = SpoolReader::new(dir);
        let mut out = Vec::new();
        let mut pos = from;
        loop {
            let b = r.read(pos, published, 100).unwrap_or_default();
            for (m, _) in &b.records {
                out.push(String::from_utf8_lossy(&b.bytes[m.clone()]).into_owned());
            }
            if b.end == pos {
                return (out, pos);
            }
            pos = b.end;
        }
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        encode(b"hello", &mut buf);
        assert_eq!(buf, b"5 hello\n");
        assert_eq!(encoded_len(5), 8);
        assert_eq!(encoded_len(12345), 12345 + 7);
        assert_eq!(
            parse(&buf),
            Frame::Complete {
                size: 8,
                msg_start: 2
            }
        );
        assert_eq!(parse(b"5 hel"), Frame::Incomplete(Some(8)));
        assert_eq!(parse(b"12"), Frame::Incomplete(None));
        assert_eq!(parse(b""), Frame::Incomplete(None));
        assert_eq!(parse(b"5 helloX"), Frame::Corrupt);
        assert_eq!(parse(b"05 hello\n"), Frame::Corrupt);
        assert_eq!(parse(b"\0\0\0\0"), Frame::Corrupt);
        assert_eq!(parse(b"x"), Frame::Corrupt);
        assert_eq!(parse(b"99999999999 "), Frame::Corrupt);
    }

    #[test]
    fn segments_roll_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, total) = writer(dir.path(), 1 << 20, 50);
        let first = w.position();
        for i in 0..20 {
            assert!(w.append(format!("message {i}").as_bytes()));
            if i % 3 == 0 {
                w.commit().unwrap();
            }
        }
        let published = w.commit().unwrap();
        let segments = list_segments(dir.path()).unwrap();
        assert!(segments.len() > 3, "{segments:?}");
        assert_eq!(
            total.load(Ordering::Relaxed),
            segments.iter().map(|s| s.1).sum::<u64>()
        );
        let (msgs, end) = read_all(dir.path(), first, published);
        let expected: Vec<_> = (0..20).map(|i| format!("message {i}")).collect();
        assert_eq!(msgs, expected);
        assert_eq!(end, published);
    }

    #[test]
    fn full_spool_refuses_and_frees_after_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, total) = writer(dir.path(), 100, 30);
        let mut accepted = 0;
        for _ in 0..20 {
            if w.append(b"0123456789") {
                accepted += 1;
                w.commit().unwrap();
            }
        }
        assert_eq!(accepted, 7, "14 bytes per record, 100 max");
        assert!(total.load(Ordering::Relaxed) <= 100);
        let pos = w.position();
        let freed = delete_before(dir.path(), pos.segment, &total).unwrap();
        assert!(freed > 0);
        assert!(w.append(b"0123456789"));
    }

    #[test]
    fn restart_starts_a_new_segment_and_skips_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let first;
        {
            let (mut w, _) = writer(dir.path(), 1 << 20, 1 << 20);
            first = w.position();
            w.append(b"one");
            w.append(b"two");
            w.commit().unwrap();
        }
        // A crash mid-append leaves half a record behind.
        let mut f = OpenOptions::new()
            .append(true)
            .open(segment_path(dir.path(), first.segment))
            .unwrap();
        f.write_all(b"40 half a rec").unwrap();
        let (mut w, total) = writer(dir.path(), 1 << 20, 1 << 20);
        assert_eq!(w.position().segment, first.segment + 1);
        assert!(total.load(Ordering::Relaxed) > 0);
        w.append(b"three");
        let published = w.commit().unwrap();
        let start = start_position(dir.path(), published).unwrap();
        assert_eq!(start, first);
        let (msgs, _) = read_all(dir.path(), start, published);
        assert_eq!(msgs, ["one", "two", "three"]);
    }

    #[test]
    fn shipped_offset_persists_and_bounds_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, total) = writer(dir.path(), 1 << 20, 1 << 20);
        w.append(b"a");
        w.append(b"b");
        let published = w.commit().unwrap();
        let after_a = SpoolPos {
            segment: published.segment,
            offset: 4,
        };
        store_shipped(dir.path(), after_a, true).unwrap();
        assert_eq!(load_shipped(dir.path()), Some(after_a));
        assert_eq!(start_position(dir.path(), published).unwrap(), after_a);
        let (msgs, _) = read_all(dir.path(), after_a, published);
        assert_eq!(msgs, ["b"]);
        // An offset beyond the spool (e.g. from a wiped spool) restarts from the oldest data.
        let beyond = SpoolPos {
            segment: published.segment + 5,
            offset: 0,
        };
        store_shipped(dir.path(), beyond, false).unwrap();
        let start = start_position(dir.path(), published).unwrap();
        assert_eq!(start.offset, 0);
        std::fs::write(dir.path().join(SHIPPED_FILE), "garbage").unwrap();
        assert_eq!(load_shipped(dir.path()), None);
        drop(w);
        // A new writer never reuses a segment number at or below the shipped one.
        store_shipped(dir.path(), beyond, false).unwrap();
        let (w, _) = writer(dir.path(), 1 << 20, 1 << 20);
        assert!(w.position().segment > beyond.segment);
        let _ = total;
    }

    #[test]
    fn second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_w, _) = writer(dir.path(), 1 << 20, 1 << 20);
        let total = Arc::new(AtomicU64::new(0));
        let second = SpoolWriter::open(dir.path(), 1, 1, FsyncPolicy::Never, total);
        assert!(second.is_err());
    }

    #[test]
    fn incoming_files_are_taken_whole() {
        let dir = tempfile::tempdir().unwrap();
        write_incoming(dir.path(), &[b"cli one".to_vec(), b"cli two".to_vec()]).unwrap();
        write_incoming(dir.path(), &[b"cli three".to_vec()]).unwrap();
        let (mut w, _) = writer(dir.path(), 1 << 20, 1 << 20);
        let start = w.position();
        assert_eq!(w.take_incoming().unwrap(), 3);
        assert_eq!(w.take_incoming().unwrap(), 0);
        let (msgs, _) = read_all(dir.path(), start, w.position());
        assert_eq!(msgs, ["cli one", "cli two", "cli three"]);
    }

    #[test]
    fn big_records_are_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = writer(dir.path(), 1 << 20, 1 << 20);
        let start = w.position();
        let big = "x".repeat(5000);
        w.append(big.as_bytes());
        w.append(b"small");
        let published = w.commit().unwrap();
        let (msgs, end) = read_all(dir.path(), start, published);
        assert_eq!(msgs, [big.as_str(), "small"]);
        assert_eq!(end, published);
    }

    #[test]
    fn fsync_policy_parses() {
        assert_eq!(FsyncPolicy::parse("always"), Ok(FsyncPolicy::Always));
        assert_eq!(FsyncPolicy::parse("never"), Ok(FsyncPolicy::Never));
        assert_eq!(
            FsyncPolicy::parse("250ms"),
            Ok(FsyncPolicy::Interval(Duration::from_millis(250)))
        );
        assert!(FsyncPolicy::parse("sometimes").is_err());
        assert!(FsyncPolicy::parse("0s").is_err());
    }
}
