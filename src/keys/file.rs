//! The keys file as written: serde types, loading and atomic writing.
//!
//! The file never holds a plaintext key, only its SHA-256. Writes go to a temporary file in the
//! same folder (mode 0600), are synced, and replace the file by rename, so a reader (the proxy's
//! watcher, a Kubernetes sync) never sees half a file.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::diagnostic::{self, FileProblems, Problem};

/// The whole keys file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// Format version; only `1` exists.
    pub version: u32,
    /// Every key, in file order.
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
}

/// One key's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Public identifier, unique.
    pub id: String,
    /// The key's first 10 characters, for display.
    pub prefix: String,
    /// `sha256:<64 hex>` of the whole key.
    pub hash: String,
    /// Owner.
    pub principal: String,
    /// Optional narrowing grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// What the key is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Inactive keys answer 401.
    #[serde(default = "default_active")]
    pub active: bool,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// RFC 3339; past it the key answers 401.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

impl KeyEntry {
    /// The entry for a freshly made key.
    pub fn for_new_key(
        new: &super::secret::NewKey,
        principal: &str,
        scopes: Option<Vec<String>>,
        purpose: Option<String>,
        created: String,
        expires: Option<String>,
    ) -> KeyEntry {
        KeyEntry {
            id: new.id.clone(),
            prefix: new.prefix.clone(),
            hash: new.hash.clone(),
            principal: principal.to_string(),
            scopes,
            purpose,
            active: true,
            created: Some(created),
            expires,
        }
    }

    /// Rotation: this entry's successor for `new` (same owner, scopes, purpose and expiry),
    /// while this entry now expires at `old_expiry`, or earlier if it already would: an overlap
    /// never revives or extends the old key.
    pub fn rotate_to(
        &mut self,
        new: &super::secret::NewKey,
        created: String,
        old_expiry: String,
    ) -> KeyEntry {
        let successor = KeyEntry::for_new_key(
            new,
            &self.principal,
            self.scopes.clone(),
            self.purpose.clone(),
            created,
            self.expires.clone(),
        );
        let keeps_earlier = self.expires.as_deref().is_some_and(|current| {
            match (super::parse_time(current), super::parse_time(&old_expiry)) {
                (Ok(current), Ok(proposed)) => current < proposed,
                _ => false,
            }
        });
        if !keeps_earlier {
            self.expires = Some(old_expiry);
        }
        successor
    }
}

fn default_active() -> bool {
    true
}

/// Parses keys-file text: the fast reader for the usual shapes, serde_yaml for the rest.
pub fn parse(source: &str) -> Result<KeysFile, Problem> {
    let mut keys = Vec::new();
    match super::reader::read_entries(source.as_bytes(), &mut |entry, _| keys.push(entry)) {
        Ok(_) => Ok(KeysFile { version: 1, keys }),
        Err(super::reader::ReadError::Version(message)) => Err(Problem::at(1, 1, message)),
        Err(_) => parse_general(source),
    }
}

/// Parses keys-file text with serde_yaml (precise errors for any YAML).
pub fn parse_general(source: &str) -> Result<KeysFile, Problem> {
    if source.trim().is_empty() {
        return Err(Problem::at(
            1,
            1,
            "the keys file is empty (expected version: 1)",
        ));
    }
    let file: KeysFile =
        serde_yaml::from_str(source).map_err(|e| diagnostic::from_serde_yaml(&e))?;
    if file.version != 1 {
        return Err(Problem::at(
            1,
            1,
            format!(
                "unsupported keys file version {} (expected 1)",
                file.version
            ),
        ));
    }
    Ok(file)
}

/// Reads and parses a keys file. A missing file is an error: start from `version: 1` and `keys: []`.
pub fn load(path: &Path) -> Result<KeysFile, FileProblems> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| FileProblems::single(path, format!("cannot read keys file: {e}")))?;
    parse(&source).map_err(|p| FileProblems::new(path, vec![p]))
}

/// Where entry `index`'s `field` (or the entry itself) starts in the text, for error messages.
/// Only called on the error path, so it may parse the file a second time.
pub fn locate(source: &str, index: usize, field: Option<&str>) -> (usize, usize) {
    let Ok(node) = marked_yaml::parse_yaml(0, source) else {
        return (1, 1);
    };
    let entry = node
        .as_mapping()
        .and_then(|m| m.get_sequence("keys"))
        .and_then(|seq| seq.get_node(index));
    let Some(entry) = entry else {
        return (1, 1);
    };
    let target = field
        .and_then(|f| entry.as_mapping().and_then(|m| m.get_node(f)))
        .unwrap_or(entry);
    target
        .span()
        .start()
        .map_or((1, 1), |m| (m.line(), m.column()))
}

/// Replaces `path` with `file` atomically, mode 0600.
pub fn write_atomic(path: &Path, file: &KeysFile) -> std::io::Result<()> {
    write_text_atomic(path, &render(file))
}

fn write_text_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".keys-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    set_private(tmp.as_file())?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The file's text in canonical form (see `reader::render`).
pub fn render(file: &KeysFile) -> String {
    super::reader::render(file)
}

#[cfg(unix)]
fn set_private(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn set_private(_file: &std::fs::File) -> std::io::Result<()> {
    Ok(())
}

/// Runs `change` on the keys file under an exclusive lock, then writes the result atomically, so
/// concurrent writers (two CLI runs, the key API) never lose each other's changes.
pub fn update<T>(
    path: &Path,
    change: impl FnOnce(&mut KeysFile) -> anyhow::Result<T>,
) -> anyhow::Result<(T, KeysFile)> {
    update_then(path, change, |_| Ok(()))
}

/// Like [`update`], and runs `after_write` with the text written while still holding the lock,
/// so whoever applies the change to live state cannot race another writer.
pub fn update_then<T>(
    path: &Path,
    change: impl FnOnce(&mut KeysFile) -> anyhow::Result<T>,
    after_write: impl FnOnce(&str) -> anyhow::Result<()>,
) -> anyhow::Result<(T, KeysFile)> {
    let lock_path = lock_path(path);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| anyhow::anyhow!("cannot open lock file {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| anyhow::anyhow!("cannot lock {}: {e}", lock_path.display()))?;
    let mut file = match std::fs::read_to_string(path) {
        Ok(source) => {
            parse(&source).map_err(|p| anyhow::anyhow!("{}", FileProblems::new(path, vec![p])))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => KeysFile {
            version: 1,
            keys: Vec::new(),
        },
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    let out = change(&mut file)?;
    let text = render(&file);
    write_text_atomic(path, &text)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    after_write(&text)?;
    drop(lock);
    Ok((out, file))
}

fn lock_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let mut name_str = std::ffi::OsString::from(".");
    name_str.push(name);
    path.with_file_name(name_str)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_and_locates_fields() {
        let text = "version: 1\nkeys:\n  - id: a\n    prefix: pcs_aaaaaa\n    hash: nope\n    principal: bob\n";
        let file = parse(text).unwrap();
        assert_eq!(file.keys.len(), 1);
        assert!(file.keys[0].active);
        assert_eq!(locate(text, 0, Some("hash")), (5, 11));
    }

    #[test]
    fn unknown_fields_are_errors_with_position() {
        let text = "version: 1\nkeys:\n  - id: a\n    prefix: p\n    hash: h\n    principal: b\n    activ: false\n";
        let problem = parse(text).unwrap_err();
        assert_eq!(problem.line, 7, "{problem:?}");
        assert!(problem.message.contains("activ"));
    }

    #[test]
    fn update_writes_private_file_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        update(&path, |f| {
            f.keys.push(KeyEntry {
                id: "abc".into(),
                prefix: "pcs_abc".into(),
                hash: format!("sha256:{}", "0".repeat(64)),
                principal: "p".into(),
                scopes: None,
                purpose: None,
                active: true,
                created: None,
                expires: None,
            });
            Ok(())
        })
        .unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.keys[0].id, "abc");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
