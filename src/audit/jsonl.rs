//! The JSON-lines sink (`audit.file`): one JSON object per line to a file or stdout (`-`).
//! Written by the writer thread beside the spool; follows a file that logrotate moved away by
//! reopening the path when it no longer names the open file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the file is synced and checked for rotation.
const SYNC_EVERY: Duration = Duration::from_secs(1);

enum Out {
    Stdout(io::Stdout),
    File(File),
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Out::Stdout(s) => s.write(buf),
            Out::File(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Out::Stdout(s) => s.flush(),
            Out::File(f) => f.flush(),
        }
    }
}

/// An open JSON-lines destination.
pub(crate) struct JsonLines {
    path: Option<PathBuf>,
    out: BufWriter<Out>,
    dirty: bool,
    last_sync: Instant,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Whether `path` is the configured stdout marker.
pub(crate) fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == "-"
}

impl JsonLines {
    /// Opens (creating) `path` for appending; `-` is stdout.
    pub fn open(path: &Path) -> io::Result<JsonLines> {
        let (path, out) = if is_stdout(path) {
            (None, Out::Stdout(io::stdout()))
        } else {
            (Some(path.to_owned()), Out::File(open_append(path)?))
        };
        Ok(JsonLines {
            path,
            out: BufWriter::with_capacity(64 * 1024, out),
            dirty: false,
            last_sync: Instant::now(),
        })
    }

    /// Buffers one line.
    pub fn write_line(&mut self, json: &str) -> io::Result<()> {
        self.out.write_all(json.as_bytes())?;
        self.out.write_all(b"\n")?;
        self.dirty = true;
        Ok(())
    }

    /// Hands buffered lines to the operating system (end of a batch).
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Syncs a file written since the last sync, and reopens it when it was rotated away.
    pub fn tick(&mut self) -> io::Result<()> {
        if self.last_sync.elapsed() < SYNC_EVERY {
            return Ok(());
        }
        self.sync()?;
        let Some(path) = &self.path else {
            return Ok(());
        };
        let Out::File(file) = self.out.get_ref() else {
            return Ok(());
        };
        let open = file.metadata()?;
        let moved = match std::fs::metadata(path) {
            Ok(now) => now.ino() != open.ino() || now.dev() != open.dev(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(e),
        };
        if moved {
            self.out.flush()?;
            self.out = BufWriter::with_capacity(64 * 1024, Out::File(open_append(path)?));
        }
        Ok(())
    }

    /// Flushes and, for a file, fsyncs.
    pub fn sync(&mut self) -> io::Result<()> {
        self.out.flush()?;
        if self.dirty {
            if let Out::File(f) = self.out.get_ref() {
                f.sync_data()?;
            }
            self.dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }
}

/// Appends one line synchronously (the one-shot CLI path); `-` goes to stderr, because the key
/// CLI's stdout is reserved for the key it prints.
pub(crate) fn append_once(path: &Path, json: &str) -> io::Result<()> {
    let line = format!("{json}\n");
    if is_stdout(path) {
        return io::stderr().write_all(line.as_bytes());
    }
    let mut f = open_append(path)?;
    f.write_all(line.as_bytes())?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn writes_lines_and_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = JsonLines::open(&path).unwrap();
        sink.write_line("{\"a\":1}").unwrap();
        sink.flush().unwrap();
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        sink.last_sync = Instant::now() - SYNC_EVERY;
        sink.tick().unwrap();
        sink.write_line("{\"a\":2}").unwrap();
        sink.flush().unwrap();
        append_once(&path, "{\"a\":3}").unwrap();
        let old = std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(old, "{\"a\":1}\n");
        assert_eq!(new, "{\"a\":2}\n{\"a\":3}\n");
    }
}
