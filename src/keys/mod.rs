//! Keys: who is presenting this request?
//!
//! Pure: the [`KeyStore`] is compiled from the keys file against a policy, precomputing each key's
//! effective grants (principal ∩ scopes), so a request costs one SHA-256, one hash-map lookup and
//! a short grant scan. The clock is passed in by the caller.

pub mod credential;
pub mod file;
pub mod secret;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::diagnostic::Problem;
use crate::policy::grant::{self, Grant};
use crate::policy::{Policy, Principal};
use file::KeysFile;

/// A SHA-256 digest used as a map key. Its first eight bytes are already uniformly random and
/// not chosen by clients, so they are the hash; no need to run SipHash over it again.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest(pub [u8; 32]);

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// Hasher that passes a `u64` through.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A key's call count and last use, shared across reloads so counts survive a keys-file change.
#[derive(Debug, Default)]
pub struct Usage {
    calls: AtomicU64,
    last_used: AtomicI64,
}

impl Usage {
    /// Counts one call at `now` (Unix seconds). Lock-free.
    #[inline]
    pub fn record(&self, now: i64) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.last_used.fetch_max(now, Ordering::Relaxed);
    }

    /// Calls so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Unix seconds of the last call, if any.
    pub fn last_used(&self) -> Option<i64> {
        let t = self.last_used.load(Ordering::Relaxed);
        (t > 0).then_some(t)
    }
}

/// Usage cells by key id. Only touched while compiling a store, never on the request path.
#[derive(Default)]
pub struct UsageTable {
    cells: Mutex<HashMap<Box<str>, Arc<Usage>>>,
}

impl UsageTable {
    fn cells_for(&self, ids: &[&str]) -> Vec<Arc<Usage>> {
        let mut cells = match self.cells.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let out: Vec<Arc<Usage>> = ids
            .iter()
            .map(|id| cells.entry((*id).into()).or_default().clone())
            .collect();
        if cells.len() > ids.len() {
            let keep: std::collections::HashSet<&str> = ids.iter().copied().collect();
            cells.retain(|id, _| keep.contains(&**id));
        }
        out
    }
}

/// One usable key, with everything a decision needs.
#[derive(Debug)]
pub struct KeyRecord {
    /// Public id.
    pub id: Box<str>,
    /// First 10 characters of the key.
    pub prefix: Box<str>,
    /// Owner.
    pub principal: Arc<Principal>,
    /// Effective grants: the principal's, narrowed by the scopes when there are any.
    pub grants: Arc<[Grant]>,
    /// Whether the key carries scopes.
    pub scoped: bool,
    /// Inactive keys answer 401.
    pub active: bool,
    /// Unix seconds after which the key answers 401.
    pub expires: Option<i64>,
    /// Unix seconds of creation, when known.
    pub created: Option<i64>,
    /// What the key is for.
    pub purpose: Option<Box<str>>,
    /// Call count and last use.
    pub usage: Arc<Usage>,
    /// Position in the store.
    pub index: u32,
}

/// What a presented key turned out to be.
pub enum KeyLookup<'s> {
    /// Known, active, not expired.
    Valid(&'s KeyRecord),
    /// Not in the store.
    Unknown,
    /// Deactivated.
    Inactive(&'s KeyRecord),
    /// Past its expiry.
    Expired(&'s KeyRecord),
}

/// Every key, indexed by hash and by id.
#[derive(Default)]
pub struct KeyStore {
    by_hash: HashMap<KeyDigest, u32, BuildHasherDefault<DigestHasher>>,
    by_id: HashMap<Box<str>, u32>,
    records: Vec<KeyRecord>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("keys", &self.records.len())
            .finish()
    }
}

/// A compiled store and the problems that did not stop it (keys disabled or narrowed).
pub struct Compiled {
    /// The store.
    pub store: KeyStore,
    /// Problems that made a key unusable or narrower, but not the file invalid.
    pub warnings: Vec<Problem>,
}

impl KeyStore {
    /// Looks a presented key up and checks its state at `now` (Unix seconds).
    #[inline]
    pub fn lookup(&self, key: &str, now: i64) -> KeyLookup<'_> {
        let digest = KeyDigest(secret::digest(key));
        let Some(index) = self.by_hash.get(&digest) else {
            return KeyLookup::Unknown;
        };
        let record = &self.records[*index as usize];
        if !record.active {
            KeyLookup::Inactive(record)
        } else if record.expires.is_some_and(|e| now >= e) {
            KeyLookup::Expired(record)
        } else {
            KeyLookup::Valid(record)
        }
    }

    /// A key by its public id.
    pub fn by_id(&self, id: &str) -> Option<&KeyRecord> {
        self.by_id.get(id).map(|i| &self.records[*i as usize])
    }

    /// A key by its position.
    pub fn get(&self, index: u32) -> Option<&KeyRecord> {
        self.records.get(index as usize)
    }

    /// Every key in file order.
    pub fn records(&self) -> &[KeyRecord] {
        &self.records
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Compiles a keys file against a policy. `source` is the file's text, used only to place
/// problems. Errors (bad hash, duplicate id or hash, bad date, bad grant syntax) reject the file;
/// a key whose principal no longer exists is left out and a scope naming an unknown resource is
/// dropped (narrowing the key further), each with a warning, so removing a principal from the
/// policy revokes its keys instead of blocking the policy reload.
pub fn compile(
    file: &KeysFile,
    policy: &Policy,
    source: &str,
    usage: &UsageTable,
) -> Result<Compiled, Vec<Problem>> {
    let ids: Vec<&str> = file.keys.iter().map(|k| k.id.as_str()).collect();
    let mut cells = usage.cells_for(&ids).into_iter();
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut store = KeyStore::default();
    store.by_hash.reserve(file.keys.len());
    store.records.reserve(file.keys.len());
    for (index, entry) in file.keys.iter().enumerate() {
        let cell = cells.next().unwrap_or_default();
        let at = |field: Option<&str>, message: String| {
            let (line, column) = file::locate(source, index, field);
            Problem::at(line, column, message)
        };
        let Some(digest) = secret::parse_hash(&entry.hash) else {
            errors.push(at(
                Some("hash"),
                format!(
                    "key {:?}: hash must be \"sha256:\" followed by 64 hex digits",
                    entry.id
                ),
            ));
            continue;
        };
        let expires = match entry.expires.as_deref().map(parse_time) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                errors.push(at(
                    Some("expires"),
                    format!("key {:?}: expires: {e}", entry.id),
                ));
                continue;
            }
        };
        let created = match entry.created.as_deref().map(parse_time) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                let message = format!("key {:?}: created: {e}", entry.id);
                errors.push(at(Some("created"), message));
                None
            }
        };
        let Some(principal) = policy.principal(&entry.principal) else {
            warnings.push(at(
                Some("principal"),
                format!(
                    "key {:?} belongs to unknown principal {:?}; it is disabled",
                    entry.id, entry.principal
                ),
            ));
            continue;
        };
        let grants = match &entry.scopes {
            None => principal.grants.clone(),
            Some(scopes) => {
                let mut compiled = Vec::with_capacity(scopes.len());
                for scope in scopes {
                    match policy.compile_grant(scope) {
                        Ok(g) => compiled.push(g),
                        Err(e) if e.contains("unknown resource") => warnings.push(at(
                            Some("scopes"),
                            format!("key {:?}: {e}; scope dropped", entry.id),
                        )),
                        Err(e) => {
                            errors.push(at(Some("scopes"), format!("key {:?}: {e}", entry.id)))
                        }
                    }
                }
                grant::intersect_sets(&principal.grants, &compiled).into()
            }
        };
        let record_index = store.records.len() as u32;
        if store
            .by_id
            .insert(entry.id.as_str().into(), record_index)
            .is_some()
        {
            errors.push(at(Some("id"), format!("duplicate key id {:?}", entry.id)));
            continue;
        }
        if store
            .by_hash
            .insert(KeyDigest(digest), record_index)
            .is_some()
        {
            errors.push(at(
                Some("hash"),
                format!("key {:?} has the same hash as another key", entry.id),
            ));
            continue;
        }
        store.records.push(KeyRecord {
            id: entry.id.as_str().into(),
            prefix: entry.prefix.as_str().into(),
            principal: principal.clone(),
            grants,
            scoped: entry.scopes.is_some(),
            active: entry.active,
            expires,
            created,
            purpose: entry.purpose.as_deref().map(Into::into),
            usage: cell,
            index: record_index,
        });
    }
    if errors.is_empty() {
        Ok(Compiled { store, warnings })
    } else {
        errors.extend(warnings);
        errors.sort_by_key(|p| (p.line, p.column));
        Err(errors)
    }
}

/// Parses an RFC 3339 time into Unix seconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("{text:?} is not an RFC 3339 time ({e})"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::policy::grant::Access;

    const POLICY: &str = "version: 1\nroutes:\n  - match: GET /d/{id}\n    resource: datasets\n    instance: id\n    access: read\n  - match: PUT /d/{id}\n    resource: datasets\n    instance: id\n    access: write\nprincipals:\n  alice: { kind: user, grants: ['datasets:write'] }\n";

    fn keys_text(entries: &[(&str, &str, &str, Option<&str>)]) -> String {
        let mut out = String::from("version: 1\nkeys:\n");
        for (id, key, principal, scopes) in entries {
            out.push_str(&format!(
                "  - id: {id}\n    prefix: {}\n    hash: {}\n    principal: {principal}\n",
                &key[..4],
                secret::hash_text(key)
            ));
            if let Some(s) = scopes {
                out.push_str(&format!("    scopes: [{s}]\n"));
            }
        }
        out
    }

    #[test]
    fn lookup_and_scope_narrowing() {
        let policy = crate::policy::compile(POLICY).unwrap();
        let text = keys_text(&[
            ("a", "pcs_full", "alice", None),
            ("b", "pcs_read", "alice", Some("'*:read'")),
        ]);
        let file = file::parse(&text).unwrap();
        let compiled = compile(&file, &policy, &text, &UsageTable::default()).unwrap();
        let ds = policy.resource_id("datasets").unwrap();
        let KeyLookup::Valid(full) = compiled.store.lookup("pcs_full", 0) else {
            panic!()
        };
        assert!(grant::any_allows(&full.grants, ds, Some("x"), Access::Write).is_some());
        let KeyLookup::Valid(read) = compiled.store.lookup("pcs_read", 0) else {
            panic!()
        };
        assert!(grant::any_allows(&read.grants, ds, Some("x"), Access::Read).is_some());
        assert!(grant::any_allows(&read.grants, ds, Some("x"), Access::Write).is_none());
        assert!(matches!(
            compiled.store.lookup("pcs_nope", 0),
            KeyLookup::Unknown
        ));
    }

    #[test]
    fn scopes_never_exceed_the_principal() {
        let policy = crate::policy::compile(POLICY).unwrap();
        let text = keys_text(&[("a", "pcs_wide", "alice", Some("'*:*'"))]);
        let file = file::parse(&text).unwrap();
        let compiled = compile(&file, &policy, &text, &UsageTable::default()).unwrap();
        let ds = policy.resource_id("datasets").unwrap();
        let KeyLookup::Valid(k) = compiled.store.lookup("pcs_wide", 0) else {
            panic!()
        };
        assert!(grant::any_allows(&k.grants, ds, None, Access::Manage).is_none());
        assert!(grant::any_allows(&k.grants, ds, None, Access::Write).is_some());
    }

    #[test]
    fn orphans_are_disabled_and_errors_are_located() {
        let policy = crate::policy::compile(POLICY).unwrap();
        let text = keys_text(&[("a", "pcs_x", "ghost", None)]);
        let compiled = compile(
            &file::parse(&text).unwrap(),
            &policy,
            &text,
            &UsageTable::default(),
        )
        .unwrap();
        assert!(compiled.store.is_empty());
        assert_eq!(compiled.warnings.len(), 1);
        let text = keys_text(&[
            ("x", "pcs_x", "alice", None),
            ("a", "pcs_y", "alice", None),
            ("a", "pcs_z", "alice", None),
        ])
        .replacen("sha256:", "sha256:zz", 1);
        let errors = compile(
            &file::parse(&text).unwrap(),
            &policy,
            &text,
            &UsageTable::default(),
        )
        .err()
        .unwrap();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].line, 5);
    }

    #[test]
    fn inactive_and_expired() {
        let policy = crate::policy::compile(POLICY).unwrap();
        let mut text = keys_text(&[("a", "pcs_x", "alice", None), ("b", "pcs_y", "alice", None)]);
        text = text.replacen(
            "    principal: alice\n",
            "    principal: alice\n    active: false\n",
            1,
        );
        text.push_str("    expires: 2020-01-01T00:00:00Z\n");
        let compiled = compile(
            &file::parse(&text).unwrap(),
            &policy,
            &text,
            &UsageTable::default(),
        )
        .unwrap();
        assert!(matches!(
            compiled.store.lookup("pcs_x", 0),
            KeyLookup::Inactive(_)
        ));
        assert!(matches!(
            compiled.store.lookup("pcs_y", 1_500_000_000),
            KeyLookup::Valid(_)
        ));
        assert!(matches!(
            compiled.store.lookup("pcs_y", 1_600_000_000),
            KeyLookup::Expired(_)
        ));
    }
}
