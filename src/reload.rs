//! Loading policy and keys from disk into the live state: parse → compile → swap, all or nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::diagnostic::FileProblems;
use crate::state::{LiveState, Snapshot, Source};

/// Owns the file paths and the generation counter; the only writer of the live state.
pub struct Loader {
    policy_path: PathBuf,
    keys_path: PathBuf,
    generation: AtomicU64,
    state: LiveState,
}

/// Reads both files and compiles a snapshot, or says what is wrong and where.
pub fn compile_files(
    policy_path: &Path,
    keys_path: &Path,
    generation: u64,
) -> Result<(Snapshot, Vec<FileProblems>), FileProblems> {
    let read = |path: &Path, what: &str| {
        std::fs::read_to_string(path)
            .map_err(|e| FileProblems::single(path, format!("cannot read {what} file: {e}")))
    };
    let policy_text = read(policy_path, "policy")?;
    let keys_text = read(keys_path, "keys")?;
    match Snapshot::compile(&policy_text, &keys_text, generation) {
        Ok((snapshot, warnings)) => {
            let warnings = if warnings.is_empty() {
                Vec::new()
            } else {
                vec![FileProblems::new(keys_path, warnings)]
            };
            Ok((snapshot, warnings))
        }
        Err((Source::Policy, problems)) => Err(FileProblems::new(policy_path, problems)),
        Err((Source::Keys, problems)) => Err(FileProblems::new(keys_path, problems)),
    }
}

impl Loader {
    /// Loads the first snapshot; fails when the files are not valid.
    pub fn start(policy_path: PathBuf, keys_path: PathBuf) -> Result<Arc<Loader>, FileProblems> {
        let (snapshot, warnings) = compile_files(&policy_path, &keys_path, 1)?;
        log_warnings(&warnings);
        Ok(Arc::new(Loader {
            policy_path,
            keys_path,
            generation: AtomicU64::new(1),
            state: Arc::new(ArcSwap::from_pointee(snapshot)),
        }))
    }

    /// The live state requests read.
    pub fn state(&self) -> LiveState {
        self.state.clone()
    }

    /// Reloads both files; on any problem the current snapshot keeps serving.
    pub fn reload(&self) -> Result<u64, FileProblems> {
        let next = self.generation.load(Ordering::SeqCst) + 1;
        let (snapshot, warnings) = compile_files(&self.policy_path, &self.keys_path, next)?;
        log_warnings(&warnings);
        self.state.store(Arc::new(snapshot));
        self.generation.store(next, Ordering::SeqCst);
        Ok(next)
    }
}

fn log_warnings(warnings: &[FileProblems]) {
    for w in warnings {
        for line in w.to_string().lines() {
            tracing::warn!("{line}");
        }
    }
}
