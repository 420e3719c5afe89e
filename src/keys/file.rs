//! The keys file as written: serde types, loading and atomic writing.
//!
//! The file never holds a plaintext key, only its SHA-256. Writes go to a temporary file in the
//! same folder (mode 0600), are synced, and replace the file by rename, so a reader (the proxy's
//! watcher, a Kubernetes sync) never sees half a file.

use std::io::Write;
use std::path::Path;

pub use super::entry::{KeyEntry, KeysFile};
use crate::diagnostic::{self, FileProblems, Problem};

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

/// Replaces `path` with `file` atomically, mode 0600, after reading the new file back: a file
/// this writer produced always loads, and a failed write leaves the old file in place.
pub fn write_atomic(path: &Path, file: &KeysFile) -> anyhow::Result<String> {
    let text = render(file);
    write_text_atomic(path, &text, &|written| {
        let back = parse(written).map_err(|p| p.message)?;
        if back.keys == file.keys {
            Ok(())
        } else {
            Err("the file read back differs from what was written".into())
        }
    })
    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(text)
}

/// Writes `text` to a temporary file beside `path`, syncs it, reads it back through `verify`,
/// and only then renames it over `path`.
fn write_text_atomic(
    path: &Path,
    text: &str,
    verify: &dyn Fn(&str) -> Result<(), String>,
) -> std::io::Result<()> {
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
    let written = std::fs::read_to_string(tmp.path())?;
    verify(&written).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("refusing to replace the keys file: {e}"),
        )
    })?;
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

/// Makes a file readable by its owner only: key hashes are not for everyone.
#[cfg(unix)]
pub fn set_private(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
}

/// Makes a file readable by its owner only (nothing to do here).
#[cfg(not(unix))]
pub fn set_private(_file: &std::fs::File) -> std::io::Result<()> {
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
    let text = write_atomic(path, &file)?;
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
