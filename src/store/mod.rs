//! Where keys live: a keys file or a shared PostgreSQL database. The store is the one owner of
//! key changes. The key API and the CLI call [`Store::apply`] with an [`Edit`]; the live state
//! (`reload::Loader`) follows the store: a file by re-reading it when it changes, PostgreSQL by its
//! change feed (LISTEN/NOTIFY plus a delta poll by change sequence).
//!
//! Every edit is atomic against every other writer: the file under its lock file, PostgreSQL in
//! one transaction serialised by an advisory lock.

pub mod file;
pub mod postgres;

use std::path::{Path, PathBuf};

use crate::keys::entry::KeyEntry;
use crate::keys::secret::KeyMaterial;

pub use file::FileStore;
pub use postgres::{PgLocation, PgStore};

/// Where `keys:` points: a file, or a PostgreSQL URL (`postgres://` or `postgresql://`).
#[derive(Clone, PartialEq, Eq)]
pub enum KeysLocation {
    /// A keys file.
    File(PathBuf),
    /// A PostgreSQL database.
    Postgres(Box<PgLocation>),
}

impl std::fmt::Debug for KeysLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl KeysLocation {
    /// Reads `keys:` / `--keys`: a URL as such, anything else a path (relative to `base`).
    pub fn parse(text: &str, base: &Path) -> Result<KeysLocation, String> {
        if PgLocation::is_url(text) {
            return PgLocation::parse(text).map(|pg| KeysLocation::Postgres(Box::new(pg)));
        }
        Ok(KeysLocation::File(base.join(text)))
    }

    /// How messages name it: the path, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            KeysLocation::File(path) => path.display().to_string(),
            KeysLocation::Postgres(pg) => pg.redacted(),
        }
    }

    /// The file, if it is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            KeysLocation::File(path) => Some(path),
            KeysLocation::Postgres(_) => None,
        }
    }
}

/// One key change, as the key API and the CLI ask for it.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Add a key; refused when its principal already holds `max_per_principal` keys.
    Create {
        /// The new entry.
        entry: KeyEntry,
        /// Keys one principal may hold at most (`None`: no limit, the CLI).
        max_per_principal: Option<usize>,
    },
    /// Turn a key on or off.
    SetActive {
        /// The key.
        id: String,
        /// On or off.
        active: bool,
    },
    /// Remove a key.
    Revoke {
        /// The key.
        id: String,
    },
    /// Add a successor with the same owner, scopes, purpose and expiry; the old key expires at
    /// `old_expiry` (or earlier, if it already would).
    Rotate {
        /// The key being replaced.
        id: String,
        /// The successor's id, prefix and hash.
        new: KeyMaterial,
        /// The successor's creation time.
        created: String,
        /// When the old key stops.
        old_expiry: String,
    },
}

/// What an edit did: the entry before and after (the successor, for a rotation).
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The entry acted on, as it was (none for a create).
    pub before: Option<KeyEntry>,
    /// The entry made or changed (none for a revoke).
    pub after: Option<KeyEntry>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (a database that is down): nothing was written; try later.
    #[error("the key store is unavailable: {0}")]
    Unavailable(String),
    /// No key with that id.
    #[error("no key with id {0}")]
    NotFound(String),
    /// The principal holds the most keys allowed.
    #[error("principal {principal:?} already holds {max} keys, the most allowed; revoke unused keys first")]
    Quota {
        /// The principal.
        principal: String,
        /// The limit.
        max: usize,
    },
    /// The change would store something invalid; nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// Anything else; nothing was written.
    #[error("{0}")]
    Failed(String),
}

/// A key as listed, with its usage when the store keeps fleet-wide totals.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The entry.
    pub entry: KeyEntry,
    /// Calls recorded in the store (all proxies' flushed counts), if it keeps them.
    pub calls: Option<u64>,
    /// Last use recorded in the store (Unix seconds).
    pub last_used: Option<i64>,
}

/// A keys file or a PostgreSQL database.
pub enum Store {
    /// See [`FileStore`].
    File(FileStore),
    /// See [`PgStore`].
    Postgres(std::sync::Arc<PgStore>),
}

impl Store {
    /// The store at `location` (a database is connected to on first use).
    pub fn open(location: &KeysLocation) -> Store {
        match location {
            KeysLocation::File(path) => Store::File(FileStore::new(path.clone())),
            KeysLocation::Postgres(pg) => {
                Store::Postgres(std::sync::Arc::new(PgStore::new((**pg).clone())))
            }
        }
    }

    /// How messages name the store (never with a password).
    pub fn describe(&self) -> String {
        match self {
            Store::File(f) => f.path().display().to_string(),
            Store::Postgres(pg) => pg.describe(),
        }
    }

    /// Applies one edit atomically against every other writer.
    pub async fn apply(&self, edit: Edit) -> Result<Applied, StoreError> {
        check_edit(&edit)?;
        match self {
            Store::File(f) => f.apply(edit).await,
            Store::Postgres(pg) => pg.apply(edit).await,
        }
    }

    /// One key by id.
    pub async fn entry(&self, id: &str) -> Result<Option<Listed>, StoreError> {
        match self {
            Store::File(f) => f.entry(id).await,
            Store::Postgres(pg) => pg.entry(id).await,
        }
    }

    /// Every key, or one principal's.
    pub async fn entries(&self, principal: Option<&str>) -> Result<Vec<Listed>, StoreError> {
        match self {
            Store::File(f) => f.entries(principal).await,
            Store::Postgres(pg) => pg.entries(principal).await,
        }
    }

    /// Whether usage totals come from the store (fleet-wide) rather than from one proxy.
    pub fn keeps_usage(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }
}

/// Refuses an edit that would store invalid text, whatever the store.
fn check_edit(edit: &Edit) -> Result<(), StoreError> {
    let invalid = |e: crate::keys::entry::BadField| StoreError::Invalid(e.to_string());
    match edit {
        Edit::Create { entry, .. } => entry.check().map_err(invalid),
        Edit::SetActive { id, .. } | Edit::Revoke { id } => {
            crate::keys::entry::check_name("id", id).map_err(invalid)
        }
        Edit::Rotate { id, new, .. } => {
            crate::keys::entry::check_name("id", id).map_err(invalid)?;
            crate::keys::entry::check_name("id", &new.id).map_err(invalid)
        }
    }
}

/// Applies `edit` to a list of entries: the one definition of what each edit means, used by
/// the file store (on the whole file) and by tests.
pub fn apply_to(keys: &mut Vec<KeyEntry>, edit: Edit) -> Result<Applied, StoreError> {
    let position = |keys: &[KeyEntry], id: &str| {
        keys.iter()
            .position(|k| k.id == id)
            .ok_or_else(|| StoreError::NotFound(crate::keys::secret::shown_id(id)))
    };
    match edit {
        Edit::Create {
            entry,
            max_per_principal,
        } => {
            if keys.iter().any(|k| k.id == entry.id) {
                return Err(StoreError::Failed("key id collision; try again".into()));
            }
            if let Some(max) = max_per_principal {
                if keys
                    .iter()
                    .filter(|k| k.principal == entry.principal)
                    .count()
                    >= max
                {
                    return Err(StoreError::Quota {
                        principal: entry.principal.clone(),
                        max,
                    });
                }
            }
            keys.push(entry.clone());
            Ok(Applied {
                before: None,
                after: Some(entry),
            })
        }
        Edit::SetActive { id, active } => {
            let i = position(keys, &id)?;
            let before = keys[i].clone();
            keys[i].active = active;
            Ok(Applied {
                before: Some(before),
                after: Some(keys[i].clone()),
            })
        }
        Edit::Revoke { id } => {
            let i = position(keys, &id)?;
            Ok(Applied {
                before: Some(keys.remove(i)),
                after: None,
            })
        }
        Edit::Rotate {
            id,
            new,
            created,
            old_expiry,
        } => {
            let i = position(keys, &id)?;
            let before = keys[i].clone();
            let successor = keys[i].rotate_to(&new, created, old_expiry);
            keys.push(successor.clone());
            Ok(Applied {
                before: Some(before),
                after: Some(successor),
            })
        }
    }
}
