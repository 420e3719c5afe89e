//! The keys file as a store: edits run under the lock file (read, change, write to a temporary
//! file, read back, rename), so concurrent writers never lose each other's keys. Reads are
//! parsed once per file version.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{apply_to, Applied, Edit, Listed, StoreError};
use crate::keys::entry::KeysFile;
use crate::keys::file;
use crate::watch::FileVersion;

/// The file as last parsed, with the version it was parsed at.
type Parsed = Arc<Mutex<Option<(FileVersion, Arc<KeysFile>)>>>;

/// A keys file.
pub struct FileStore {
    path: PathBuf,
    cache: Parsed,
}

impl FileStore {
    /// The store over the file at `path` (created by the first edit if missing).
    pub fn new(path: PathBuf) -> FileStore {
        FileStore {
            path,
            cache: Arc::default(),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `edit` under the keys-file lock (on a blocking thread).
    pub async fn apply(&self, edit: Edit) -> Result<Applied, StoreError> {
        let path = self.path.clone();
        blocking(move || {
            let mut outcome: Option<Result<Applied, StoreError>> = None;
            let written = file::update(&path, |f| {
                let result = apply_to(&mut f.keys, edit);
                let failed = result.is_err();
                outcome = Some(result);
                if failed {
                    anyhow::bail!("refused");
                }
                Ok(())
            });
            match (outcome, written) {
                (Some(Err(e)), _) => Err(e),
                (Some(Ok(applied)), Ok(_)) => Ok(applied),
                (_, Err(e)) => Err(write_error(&e)),
                (None, Ok(_)) => Err(StoreError::Failed("the change did not run".into())),
            }
        })
        .await
    }

    /// One entry by id.
    pub async fn entry(&self, id: &str) -> Result<Option<Listed>, StoreError> {
        let file = self.read().await?;
        Ok(file.keys.iter().find(|k| k.id == id).map(unmetered))
    }

    /// Every entry, or one principal's, in file order.
    pub async fn entries(&self, principal: Option<&str>) -> Result<Vec<Listed>, StoreError> {
        let file = self.read().await?;
        Ok(file
            .keys
            .iter()
            .filter(|k| principal.is_none_or(|p| k.principal == p))
            .map(unmetered)
            .collect())
    }

    /// The file as parsed, once per file version.
    async fn read(&self) -> Result<Arc<KeysFile>, StoreError> {
        let path = self.path.clone();
        let cache = self.cache.clone();
        blocking(move || {
            let version = crate::watch::version(&path);
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            if let (Some(v), Some((cached, file))) = (version, cache.as_ref()) {
                if v == *cached {
                    return Ok(file.clone());
                }
            }
            let file = match file::load(&path) {
                Ok(f) => Arc::new(f),
                Err(p) if version.is_none() => {
                    return Err(StoreError::Failed(format!(
                        "{p}; create it with `portcullis keys create`"
                    )))
                }
                Err(p) => return Err(StoreError::Failed(p.to_string())),
            };
            *cache = version.map(|v| (v, file.clone()));
            Ok(file)
        })
        .await
    }
}

fn unmetered(entry: &crate::keys::entry::KeyEntry) -> Listed {
    Listed {
        entry: entry.clone(),
        calls: None,
        last_used: None,
    }
}

/// A failed write, with the cause an operator can act on (a read-only Secret mount, say).
fn write_error(e: &anyhow::Error) -> StoreError {
    let text = format!("{e:#}");
    let read_only = text.contains("Read-only file system") || text.contains("Permission denied");
    let hint = if read_only {
        " (the keys file is read-only here, as a Kubernetes Secret mount is: use a PostgreSQL store for self-service keys, see the README)"
    } else {
        ""
    };
    StoreError::Failed(format!("{text}{hint}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StoreError::Failed(format!(
            "the key store task failed: {e}"
        )))
    })
}
