//! The key cache (`key_cache:`): the last state loaded from a PostgreSQL store, so a proxy that
//! starts while the database is down can still serve. A folder holding
//!
//! - `keys.yaml`: the base of the last full load, in the keys-file format (hashes only), and
//! - `state.json`: the change number that base includes, the changes applied since (the
//!   overlay), and the change number they bring it to.
//!
//! Both are written atomically (temporary file, sync, rename), mode 0600. `state.json` is
//! removed before a new base replaces the old one and written after, so a cache is either
//! whole or ignored: an old overlay is never applied to a newer base.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::keys::entry::{Change, KeyEntry};
use crate::keys::{self, Compiled, KeyStore, UsageTable};
use crate::policy::Policy;

const BASE: &str = "keys.yaml";
const STATE: &str = "state.json";

#[derive(Debug, Serialize, Deserialize)]
struct State {
    base_cursor: i64,
    cursor: i64,
    upserts: Vec<KeyEntry>,
    removed: Vec<String>,
}

/// Writes a new base while a full load streams by.
pub struct BaseWriter {
    dir: PathBuf,
    file: tempfile::NamedTempFile,
    count: usize,
    buffer: String,
    failed: Option<std::io::Error>,
}

impl BaseWriter {
    /// Starts a new base in `dir` (created if missing), beside the current cache, which stays
    /// valid until [`BaseWriter::finish`].
    pub fn start(dir: &Path) -> std::io::Result<BaseWriter> {
        std::fs::create_dir_all(dir)?;
        let file = tempfile::Builder::new()
            .prefix(".keys-cache-")
            .tempfile_in(dir)?;
        crate::keys::file::set_private(file.as_file())?;
        let mut writer = BaseWriter {
            dir: dir.to_path_buf(),
            file,
            count: 0,
            buffer: String::with_capacity(1 << 16),
            failed: None,
        };
        keys::reader::render_header(&mut writer.buffer, 1, false);
        Ok(writer)
    }

    /// Adds one entry.
    pub fn add(&mut self, entry: &KeyEntry) {
        keys::reader::render_entry(&mut self.buffer, entry);
        self.count += 1;
        if self.buffer.len() > 1 << 16 {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.failed.is_none() {
            if let Err(e) = self.file.write_all(self.buffer.as_bytes()) {
                self.failed = Some(e);
            }
        }
        self.buffer.clear();
    }

    /// Puts the base in place and records that it includes changes up to `cursor`.
    pub fn finish(mut self, cursor: i64) -> std::io::Result<()> {
        if self.count == 0 {
            self.buffer.clear();
            keys::reader::render_header(&mut self.buffer, 1, true);
        }
        self.flush();
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        self.file.as_file().sync_all()?;
        // The old state goes first: an overlay must never be read against a newer base.
        match std::fs::remove_file(self.dir.join(STATE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.file
            .persist(self.dir.join(BASE))
            .map_err(|e| e.error)?;
        write_state(
            &self.dir,
            &State {
                base_cursor: cursor,
                cursor,
                upserts: Vec::new(),
                removed: Vec::new(),
            },
        )
    }
}

/// Records the overlay of `keys` (the changes since its base) and the cursor it reached.
pub fn write_changes(dir: &Path, keys: &KeyStore, cursor: i64) -> std::io::Result<()> {
    let Some(current) = read_state(dir)? else {
        // No base on disk yet: nothing to add changes to.
        return Ok(());
    };
    let changed = keys.changed();
    write_state(
        dir,
        &State {
            base_cursor: current.base_cursor,
            cursor,
            upserts: changed.upserts.values().cloned().collect(),
            removed: changed.removed.iter().cloned().collect(),
        },
    )
}

/// The cached state compiled for `policy`, and the cursor it reached; `None` without a cache.
pub async fn load(
    dir: &Path,
    policy: Arc<Policy>,
    usage: &Arc<UsageTable>,
) -> std::io::Result<Option<(Compiled, i64)>> {
    let Some(state) = read_state(dir)? else {
        return Ok(None);
    };
    let base = dir.join(BASE);
    let usage = usage.clone();
    tokio::task::spawn_blocking(move || {
        let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let compiled = keys::compile_path(&base, &policy, None, &usage)
            .map_err(|p| invalid(crate::diagnostic::FileProblems::new(&base, p).to_string()))?
            .compiled;
        let changes: Vec<Change> = state
            .removed
            .into_iter()
            .map(Change::Remove)
            .chain(state.upserts.into_iter().map(Change::Upsert))
            .collect();
        let mut with_changes = compiled
            .store
            .with_changes(&changes, &policy, &usage)
            .map_err(|p| invalid(format!("{} problem(s) in the cached changes", p.len())))?;
        with_changes.warnings.extend(compiled.warnings);
        Ok(Some((with_changes, state.cursor)))
    })
    .await
    .map_err(std::io::Error::other)?
}

fn read_state(dir: &Path) -> std::io::Result<Option<State>> {
    match std::fs::read(dir.join(STATE)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_state(dir: &Path, state: &State) -> std::io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".state-")
        .tempfile_in(dir)?;
    crate::keys::file::set_private(tmp.as_file())?;
    serde_json::to_writer(&mut tmp, state).map_err(std::io::Error::other)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(STATE)).map_err(|e| e.error)?;
    Ok(())
}
