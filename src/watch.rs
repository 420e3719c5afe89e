//! Noticing file changes: a `notify` watcher on the folders of every watched file, plus a
//! once-a-second metadata check as a safety net. Both only *trigger* a reload; the loader
//! decides by content whether anything changed.
//!
//! Watching folders rather than files is what makes editors that save by rename and Kubernetes
//! ConfigMap/Secret volumes work: there the files are symlinks into `..data`, itself a symlink
//! swapped atomically to a new timestamped folder, so the file's own inode never changes.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Keeps the watcher alive; dropping it stops watching.
pub struct FileWatch {
    _watcher: Option<RecommendedWatcher>,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// Starts watching `files`; each change sends `()` on `trigger` (coalesced when one is pending).
pub fn watch(files: Vec<PathBuf>, trigger: mpsc::Sender<()>) -> FileWatch {
    let folders: BTreeSet<PathBuf> = files
        .iter()
        .map(|f| match f.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    let names: BTreeSet<OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(OsString::from))
        .collect();
    let notify_trigger = trigger.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| is_relevant(&e, &names)) {
            let _ = notify_trigger.try_send(());
        }
    });
    let watcher = match watcher {
        Ok(mut w) => {
            for folder in &folders {
                if let Err(e) = w.watch(folder, RecursiveMode::NonRecursive) {
                    tracing::warn!(folder = %folder.display(), error = %e, "cannot watch folder; relying on polling");
                }
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "file watcher unavailable; relying on polling");
            None
        }
    };
    // Anything that changed between loading and now would otherwise go unnoticed.
    let _ = trigger.try_send(());
    let seen: Vec<Option<FileVersion>> = files.iter().map(|f| version(f)).collect();
    let poller = tokio::spawn(poll(files, seen, trigger));
    FileWatch {
        _watcher: watcher,
        poller,
    }
}

/// Whether an event can have changed a watched file: a write, create, remove or rename of one of
/// the watched names, or of a `..`-prefixed entry (Kubernetes' `..data` swap). Reads (including
/// the loader's own) and unrelated files in the same folder (an audit log next to the config)
/// must not trigger reloads, or every reload would trigger the next.
fn is_relevant(event: &notify::Event, names: &BTreeSet<OsString>) -> bool {
    use notify::event::{EventKind, ModifyKind};
    let content_event = !matches!(
        event.kind,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_))
    );
    content_event
        && event.paths.iter().any(|path| {
            path.file_name().is_some_and(|name| {
                names.contains(name) || name.to_string_lossy().starts_with("..")
            })
        })
}

/// What identifies a file version without reading it: size, modification time and inode,
/// through symlinks. Used to notice changes cheaply (the poller, the loader, the key API cache).
pub type FileVersion = (u64, SystemTime, u64);

/// The file's version, or `None` when it cannot be read.
pub fn version(path: &Path) -> Option<FileVersion> {
    let m = std::fs::metadata(path).ok()?;
    let modified = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    Some((m.len(), modified, inode(&m)))
}

#[cfg(unix)]
fn inode(m: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    m.ino()
}

#[cfg(not(unix))]
fn inode(_m: &std::fs::Metadata) -> u64 {
    0
}

async fn poll(files: Vec<PathBuf>, mut seen: Vec<Option<FileVersion>>, trigger: mpsc::Sender<()>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now: Vec<Option<FileVersion>> = files.iter().map(|f| version(f)).collect();
        if now != seen {
            seen = now;
            let _ = trigger.try_send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, DataChange, EventKind, ModifyKind, RenameMode};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn only_content_changes_of_watched_names_count() {
        let names: BTreeSet<OsString> = ["policy.yaml", "keys.yaml"]
            .iter()
            .map(OsString::from)
            .collect();
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Content));
        assert!(is_relevant(&event(write, "/c/keys.yaml"), &names));
        assert!(is_relevant(
            &event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/c/policy.yaml"
            ),
            &names
        ));
        assert!(is_relevant(
            &event(EventKind::Create(CreateKind::Any), "/c/..data"),
            &names
        ));
        assert!(!is_relevant(
            &event(EventKind::Access(AccessKind::Any), "/c/keys.yaml"),
            &names
        ));
        assert!(!is_relevant(&event(write, "/c/audit.jsonl"), &names));
        assert!(!is_relevant(&event(write, "/c/.keys-abc.tmp"), &names));
    }
}
