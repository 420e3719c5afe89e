//! Keys: who is presenting this request?
//!
//! Pure: the [`KeyStore`] is compiled from the keys file against a policy, precomputing each key's
//! effective grants (principal ∩ scopes), so a request costs one SHA-256, one hash-table lookup
//! and a short grant scan. The clock is passed in by the caller.
//!
//! The store is compact because it may hold a million keys: records are fixed-size, strings live
//! in one arena, both indexes are tables of `u32` positions, and keys with the same effective
//! grants share one grant set.

pub mod credential;
pub mod entry;
pub mod file;
pub mod reader;
pub mod secret;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::io::{BufRead, Read};
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use hashbrown::HashTable;
use sha2::{Digest, Sha256};

use crate::diagnostic::Problem;
use crate::policy::grant::{self, Grant};
use crate::policy::{Policy, Principal};
use entry::{Change, KeyEntry};
use reader::{EntryLines, ReadError};

/// A key's call count and last use, shared across reloads so counts survive a keys-file change.
#[derive(Debug, Default)]
pub struct Usage {
    calls: AtomicU64,
    last_used: AtomicI64,
    flushed: AtomicU64,
    /// The key's rate-limit state (see `limits::take`); 8 bytes per key, kept across reloads.
    pub limiter: AtomicU64,
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

    /// Calls not yet added to a shared store.
    pub fn unflushed(&self) -> u64 {
        self.calls()
            .saturating_sub(self.flushed.load(Ordering::Relaxed))
    }

    /// Records that `n` more calls reached the shared store.
    pub fn mark_flushed(&self, n: u64) {
        self.flushed.fetch_add(n, Ordering::Relaxed);
    }
}

/// Usage cells for every key a process has loaded, append-only and lock-free. Each store maps
/// its keys to slots here; a reload reuses the slot of a key id it already knew.
#[derive(Default)]
pub struct UsageTable {
    slots: boxcar::Vec<Usage>,
}

impl UsageTable {
    fn push(&self) -> u32 {
        self.slots.push(Usage::default()) as u32
    }

    fn get(&self, slot: u32) -> &Usage {
        static UNUSED: Usage = Usage {
            calls: AtomicU64::new(0),
            last_used: AtomicI64::new(0),
            flushed: AtomicU64::new(0),
            limiter: AtomicU64::new(0),
        };
        self.slots.get(slot as usize).unwrap_or(&UNUSED)
    }
}

/// Start and length of a string in the store's arena.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    len: u32,
}

const NO_TIME: i64 = i64::MIN;

#[derive(Debug)]
struct Record {
    digest: [u8; 32],
    id: Span,
    prefix: Span,
    purpose: Option<Span>,
    principal: u32,
    grants: u32,
    slot: u32,
    expires: i64,
    created: i64,
    active: bool,
    scoped: bool,
}

/// One key of a store, with everything a decision needs.
#[derive(Clone, Copy)]
pub struct Key<'s> {
    table: &'s KeyTable,
    record: &'s Record,
    index: u32,
}

impl std::fmt::Debug for Key<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("id", &self.id()).finish()
    }
}

impl<'s> Key<'s> {
    /// Public id.
    pub fn id(&self) -> &'s str {
        self.table.text(self.record.id)
    }

    /// First 10 characters of the key.
    pub fn prefix(&self) -> &'s str {
        self.table.text(self.record.prefix)
    }

    /// What the key is for.
    pub fn purpose(&self) -> Option<&'s str> {
        self.record.purpose.map(|s| self.table.text(s))
    }

    /// Owner.
    pub fn principal(&self) -> &'s Arc<Principal> {
        &self.table.principals[self.record.principal as usize]
    }

    /// Effective grants: the principal's, narrowed by the scopes when there are any.
    pub fn grants(&self) -> &'s [Grant] {
        &self.table.grant_sets[self.record.grants as usize]
    }

    /// Whether the key carries scopes.
    pub fn scoped(&self) -> bool {
        self.record.scoped
    }

    /// Inactive keys answer 401.
    pub fn active(&self) -> bool {
        self.record.active
    }

    /// Unix seconds after which the key answers 401.
    pub fn expires(&self) -> Option<i64> {
        (self.record.expires != NO_TIME).then_some(self.record.expires)
    }

    /// Unix seconds of creation, when known.
    pub fn created(&self) -> Option<i64> {
        (self.record.created != NO_TIME).then_some(self.record.created)
    }

    /// Call count and last use.
    pub fn usage(&self) -> &'s Usage {
        self.table.usage.get(self.record.slot)
    }

    /// Position in the store.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether the key may be used at `now` (Unix seconds).
    pub fn state(self, now: i64) -> KeyLookup<'s> {
        if !self.record.active {
            KeyLookup::Inactive(self)
        } else if self.record.expires != NO_TIME && now >= self.record.expires {
            KeyLookup::Expired(self)
        } else {
            KeyLookup::Valid(self)
        }
    }
}

/// What a presented key turned out to be.
pub enum KeyLookup<'s> {
    /// Known, active, not expired.
    Valid(Key<'s>),
    /// Not in the store.
    Unknown,
    /// Deactivated.
    Inactive(Key<'s>),
    /// Past its expiry.
    Expired(Key<'s>),
}

/// One compiled set of keys, indexed by hash and by id: fixed-size records, strings in one arena,
/// both indexes tables of `u32` positions.
pub struct KeyTable {
    records: Vec<Record>,
    arena: String,
    principals: Vec<Arc<Principal>>,
    grant_sets: Vec<Arc<[Grant]>>,
    by_hash: HashTable<u32>,
    by_id: HashTable<u32>,
    id_hasher: std::hash::RandomState,
    usage: Arc<UsageTable>,
}

fn digest_hash(digest: &[u8; 32]) -> u64 {
    // The digest is uniformly random and not chosen by clients: its first bytes are the hash.
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

impl KeyTable {
    fn with_usage(usage: Arc<UsageTable>, capacity: usize) -> Self {
        KeyTable {
            records: Vec::with_capacity(capacity),
            arena: String::with_capacity(capacity * 24),
            principals: Vec::new(),
            grant_sets: Vec::new(),
            by_hash: HashTable::with_capacity(capacity),
            by_id: HashTable::with_capacity(capacity),
            id_hasher: std::hash::RandomState::new(),
            usage,
        }
    }

    fn text(&self, span: Span) -> &str {
        let start = span.start as usize;
        self.arena
            .get(start..start + span.len as usize)
            .unwrap_or("")
    }

    fn find_hash(&self, digest: &[u8; 32]) -> Option<u32> {
        self.by_hash
            .find(digest_hash(digest), |i| {
                self.records[*i as usize].digest == *digest
            })
            .copied()
    }

    fn find_id(&self, id: &str) -> Option<u32> {
        let hash = self.id_hasher.hash_one(id);
        self.by_id
            .find(hash, |i| self.text(self.records[*i as usize].id) == id)
            .copied()
    }

    fn key(&self, position: u32, index: u32) -> Option<Key<'_>> {
        self.records.get(position as usize).map(|record| Key {
            table: self,
            record,
            index,
        })
    }

    fn len(&self) -> u32 {
        self.records.len() as u32
    }
}

/// What a store's recent changes left on top of its base table: the entries changed or added
/// since the base was loaded, and the ids removed. Small; a full reload folds it away.
#[derive(Debug, Default, Clone)]
pub struct Changed {
    /// Entries added or changed, by id.
    pub upserts: std::collections::BTreeMap<String, KeyEntry>,
    /// Ids removed from the base.
    pub removed: std::collections::BTreeSet<String>,
}

impl Changed {
    /// How many entries the overlay carries.
    pub fn len(&self) -> usize {
        self.upserts.len() + self.removed.len()
    }

    /// Whether nothing changed since the base.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every usable key: a base table (loaded whole) and, for a store with a change feed, an
/// overlay of the entries changed since, so one change never rebuilds a million keys. Lookups
/// try the overlay first; base keys the overlay changed or removed are hidden.
pub struct KeyStore {
    base: Arc<KeyTable>,
    overlay: KeyTable,
    hidden: hashbrown::HashSet<u32>,
    changed: Arc<Changed>,
}

impl Default for KeyStore {
    fn default() -> Self {
        KeyStore::whole(KeyTable::with_usage(Arc::default(), 0))
    }
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("keys", &self.len())
            .field("overlay", &self.overlay.records.len())
            .finish()
    }
}

impl KeyStore {
    fn whole(base: KeyTable) -> Self {
        let usage = base.usage.clone();
        KeyStore {
            base: Arc::new(base),
            overlay: KeyTable::with_usage(usage, 0),
            hidden: hashbrown::HashSet::new(),
            changed: Arc::default(),
        }
    }

    /// Looks a presented key up and checks its state at `now` (Unix seconds).
    #[inline]
    pub fn lookup(&self, presented: &str, now: i64) -> KeyLookup<'_> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.lookup_digest(&digest, now)
    }

    /// Looks a key up by its SHA-256 digest.
    pub fn lookup_digest(&self, digest: &[u8; 32], now: i64) -> KeyLookup<'_> {
        let found = if self.overlay.records.is_empty() {
            self.base
                .find_hash(digest)
                .and_then(|i| self.base.key(i, i))
        } else {
            match self.overlay.find_hash(digest) {
                Some(i) => self.overlay.key(i, self.base.len() + i),
                None => self
                    .base
                    .find_hash(digest)
                    .filter(|i| !self.hidden.contains(i))
                    .and_then(|i| self.base.key(i, i)),
            }
        };
        match found {
            Some(key) => key.state(now),
            None => KeyLookup::Unknown,
        }
    }

    /// A key by its public id.
    pub fn by_id(&self, id: &str) -> Option<Key<'_>> {
        if let Some(i) = self.overlay.find_id(id) {
            return self.overlay.key(i, self.base.len() + i);
        }
        let i = self.base.find_id(id)?;
        if self.hidden.contains(&i) {
            return None;
        }
        self.base.key(i, i)
    }

    /// A key by its position (as `Key::index` gave it).
    pub fn get(&self, index: u32) -> Option<Key<'_>> {
        match index.checked_sub(self.base.len()) {
            None => self.base.key(index, index),
            Some(i) => self.overlay.key(i, index),
        }
    }

    /// Every key: the base's in load order, then the overlay's.
    pub fn records(&self) -> impl Iterator<Item = Key<'_>> {
        let base = (0..self.base.len())
            .filter(|i| !self.hidden.contains(i))
            .filter_map(|i| self.base.key(i, i));
        let overlay =
            (0..self.overlay.len()).filter_map(|i| self.overlay.key(i, self.base.len() + i));
        base.chain(overlay)
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.base.records.len() - self.hidden.len() + self.overlay.records.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What changed since the base was loaded.
    pub fn changed(&self) -> &Changed {
        &self.changed
    }

    /// This store with `changes` applied on top: the base is shared, only the overlay (every
    /// change since the base) is rebuilt. Entries are checked as a load checks them.
    pub fn with_changes(
        &self,
        changes: &[Change],
        policy: &Policy,
        usage: &Arc<UsageTable>,
    ) -> Result<Compiled, Vec<Problem>> {
        let mut changed = (*self.changed).clone();
        for change in changes {
            match change {
                Change::Upsert(entry) => {
                    changed.removed.remove(&entry.id);
                    changed.upserts.insert(entry.id.clone(), entry.clone());
                }
                Change::Remove(id) => {
                    changed.upserts.remove(id);
                    if self.base.find_id(id).is_some() {
                        changed.removed.insert(id.clone());
                    }
                }
            }
        }
        let mut builder =
            StoreBuilder::new(policy, Some(self), usage, changed.upserts.len()).lenient();
        for (n, entry) in changed.upserts.values().enumerate() {
            builder.add(entry.clone(), &|_| (n + 1, 0));
        }
        let compiled = builder.finish_table()?;
        let hidden = changed
            .upserts
            .keys()
            .chain(changed.removed.iter())
            .filter_map(|id| self.base.find_id(id))
            .collect();
        Ok(Compiled {
            store: KeyStore {
                base: self.base.clone(),
                overlay: compiled.0,
                hidden,
                changed: Arc::new(changed),
            },
            warnings: compiled.1,
        })
    }
}

/// A compiled store and the problems that did not stop it (keys disabled or narrowed).
pub struct Compiled {
    /// The store.
    pub store: KeyStore,
    /// Problems that made a key unusable or narrower, but not the file invalid.
    pub warnings: Vec<Problem>,
}

/// Builds a store entry by entry, so a million-key file never has to sit in memory as text.
///
/// Errors (bad hash, duplicate id or hash, bad date, bad grant syntax) reject the file; a key
/// whose principal no longer exists is left out and a scope naming an unknown resource is dropped
/// (narrowing the key further), each with a warning, so removing a principal from the policy
/// revokes its keys instead of blocking the policy reload.
pub struct StoreBuilder<'a> {
    policy: &'a Policy,
    previous: Option<&'a KeyStore>,
    store: KeyTable,
    principal_slots: HashMap<*const Principal, u32>,
    grant_set_slots: HashMap<(u32, Vec<String>), u32>,
    unscoped_slots: HashMap<u32, u32>,
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
    lenient: bool,
}

impl<'a> StoreBuilder<'a> {
    /// A builder; `previous` (the live store) lets usage counts carry over by key id.
    pub fn new(
        policy: &'a Policy,
        previous: Option<&'a KeyStore>,
        usage: &Arc<UsageTable>,
        capacity: usize,
    ) -> Self {
        StoreBuilder {
            policy,
            previous,
            store: KeyTable::with_usage(usage.clone(), capacity),
            principal_slots: HashMap::new(),
            grant_set_slots: HashMap::new(),
            unscoped_slots: HashMap::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
            lenient: false,
        }
    }

    /// Adds one entry; `at` places a field for error messages.
    pub fn add(&mut self, entry: KeyEntry, at: &dyn Fn(Option<&str>) -> (usize, usize)) {
        let problem = |field: &str, message: String| {
            let (line, column) = at(Some(field));
            Problem::at(line, column, message)
        };
        let Some(digest) = secret::parse_hash(&entry.hash) else {
            let message = format!(
                "key {:?}: hash must be \"sha256:\" followed by 64 hex digits",
                entry.id
            );
            return self.fail(problem("hash", message));
        };
        let mut times = [NO_TIME; 2];
        for (slot, (field, value)) in times
            .iter_mut()
            .zip([("expires", &entry.expires), ("created", &entry.created)])
        {
            match value.as_deref().map(parse_time) {
                None => {}
                Some(Ok(t)) => *slot = t,
                Some(Err(e)) => {
                    let message = format!("key {:?}: {field}: {e}", entry.id);
                    return self.fail(problem(field, message));
                }
            }
        }
        let policy = self.policy;
        let Some(principal) = policy.principal(&entry.principal) else {
            let message = format!(
                "key {:?} belongs to unknown principal {:?}; it is disabled",
                entry.id, entry.principal
            );
            return self.warnings.push(problem("principal", message));
        };
        let principal_slot = self.principal_slot(principal);
        let Some(grants) = self.grant_set(&entry, principal_slot, principal, &problem) else {
            return;
        };
        self.insert(entry, digest, principal_slot, grants, times, &problem);
    }

    fn insert(
        &mut self,
        entry: KeyEntry,
        digest: [u8; 32],
        principal: u32,
        grants: u32,
        [expires, created]: [i64; 2],
        problem: &dyn Fn(&str, String) -> Problem,
    ) {
        let KeyTable {
            records,
            arena,
            by_hash,
            by_id,
            id_hasher,
            usage,
            ..
        } = &mut self.store;
        let index = records.len() as u32;
        let span_str = |s: Span| s.start as usize..(s.start + s.len) as usize;
        let hash = digest_hash(&digest);
        let hash_slot = match by_hash.entry(
            hash,
            |i| records[*i as usize].digest == digest,
            |i| digest_hash(&records[*i as usize].digest),
        ) {
            hashbrown::hash_table::Entry::Vacant(v) => v,
            hashbrown::hash_table::Entry::Occupied(_) => {
                let message = format!("key {:?} has the same hash as another key", entry.id);
                return self.fail(problem("hash", message));
            }
        };
        let id_hash = id_hasher.hash_one(entry.id.as_str());
        let id_slot = match by_id.entry(
            id_hash,
            |i| arena[span_str(records[*i as usize].id)] == *entry.id,
            |i| id_hasher.hash_one(&arena[span_str(records[*i as usize].id)]),
        ) {
            hashbrown::hash_table::Entry::Vacant(v) => v,
            hashbrown::hash_table::Entry::Occupied(_) => {
                let message = format!("duplicate key id {:?}", entry.id);
                return self.fail(problem("id", message));
            }
        };
        let slot = self
            .previous
            .and_then(|p| p.by_id(&entry.id))
            .filter(|k| Arc::ptr_eq(&k.table.usage, usage))
            .map_or_else(|| usage.push(), |k| k.record.slot);
        let id = push_text(arena, &entry.id);
        let prefix = push_text(arena, &entry.prefix);
        let purpose = entry.purpose.as_deref().map(|p| push_text(arena, p));
        records.push(Record {
            digest,
            id,
            prefix,
            purpose,
            principal,
            grants,
            slot,
            expires,
            created,
            active: entry.active,
            scoped: entry.scopes.is_some(),
        });
        hash_slot.insert(index);
        id_slot.insert(index);
    }

    fn principal_slot(&mut self, principal: &Arc<Principal>) -> u32 {
        let principals = &mut self.store.principals;
        *self
            .principal_slots
            .entry(Arc::as_ptr(principal))
            .or_insert_with(|| {
                principals.push(principal.clone());
                (principals.len() - 1) as u32
            })
    }

    /// The shared grant set for this principal and these scopes.
    fn grant_set(
        &mut self,
        entry: &KeyEntry,
        principal_slot: u32,
        principal: &Principal,
        problem: &dyn Fn(&str, String) -> Problem,
    ) -> Option<u32> {
        let Some(scopes) = &entry.scopes else {
            // Most keys have no scopes: they share their principal's set, found without allocating.
            if let Some(slot) = self.unscoped_slots.get(&principal_slot) {
                return Some(*slot);
            }
            let slot = self.store.grant_sets.len() as u32;
            self.store.grant_sets.push(principal.grants.clone());
            self.unscoped_slots.insert(principal_slot, slot);
            return Some(slot);
        };
        let cache_key = (principal_slot, scopes.clone());
        if let Some(slot) = self.grant_set_slots.get(&cache_key) {
            return Some(*slot);
        }
        let mut compiled = Vec::with_capacity(scopes.len());
        for scope in scopes {
            match self.policy.compile_grant(scope) {
                Ok(g) => compiled.push(g),
                Err(e) if e.contains("unknown resource") => {
                    let message = format!("key {:?}: {e}; scope dropped", entry.id);
                    self.warnings.push(problem("scopes", message));
                }
                Err(e) => {
                    let message = format!("key {:?}: {e}", entry.id);
                    self.fail(problem("scopes", message));
                    return None;
                }
            }
        }
        let slot = self.store.grant_sets.len() as u32;
        self.store
            .grant_sets
            .push(grant::intersect_sets(&principal.grants, &compiled).into());
        self.grant_set_slots.insert(cache_key, slot);
        Some(slot)
    }

    /// Reads entries from a shared store: an entry that would reject a file (a bad hash, a
    /// duplicate) is left out with a warning instead, so one bad row never takes every
    /// proxy's keys down.
    pub fn lenient(mut self) -> Self {
        self.lenient = true;
        self
    }

    fn fail(&mut self, problem: Problem) {
        if self.lenient {
            self.warnings.push(Problem::at(
                problem.line,
                problem.column,
                format!("{}; the key is left out", problem.message),
            ));
        } else {
            self.errors.push(problem);
        }
    }

    /// The store, or every error found.
    pub fn finish(self) -> Result<Compiled, Vec<Problem>> {
        let (table, warnings) = self.finish_table()?;
        Ok(Compiled {
            store: KeyStore::whole(table),
            warnings,
        })
    }

    fn finish_table(mut self) -> Result<(KeyTable, Vec<Problem>), Vec<Problem>> {
        if self.errors.is_empty() {
            self.store.records.shrink_to_fit();
            self.store.arena.shrink_to_fit();
            Ok((self.store, self.warnings))
        } else {
            self.errors.extend(self.warnings);
            self.errors.sort_by_key(|p| (p.line, p.column));
            Err(self.errors)
        }
    }
}

fn push_text(arena: &mut String, text: &str) -> Span {
    let start = arena.len() as u32;
    arena.push_str(text);
    Span {
        start,
        len: text.len() as u32,
    }
}

/// Compiles keys-file text against a policy.
pub fn compile(
    text: &str,
    policy: &Policy,
    previous: Option<&KeyStore>,
    usage: &Arc<UsageTable>,
) -> Result<Compiled, Vec<Problem>> {
    let mut builder = StoreBuilder::new(policy, previous, usage, text.len() / 150);
    let fast = reader::read_entries(text.as_bytes(), &mut |entry, lines| {
        builder.add(entry, &|field| lines.of(field));
    });
    match fast {
        Ok(_) => builder.finish(),
        Err(ReadError::Version(message)) => Err(vec![Problem::at(1, 1, message)]),
        Err(ReadError::Io(e)) => Err(vec![Problem::at(0, 0, e.to_string())]),
        Err(ReadError::Unsupported { .. }) => compile_general(text, policy, previous, usage),
    }
}

/// The general path: serde_yaml for files outside the fast reader's subset.
fn compile_general(
    text: &str,
    policy: &Policy,
    previous: Option<&KeyStore>,
    usage: &Arc<UsageTable>,
) -> Result<Compiled, Vec<Problem>> {
    let file = file::parse_general(text).map_err(|p| vec![p])?;
    let mut builder = StoreBuilder::new(policy, previous, usage, file.keys.len());
    for (index, entry) in file.keys.into_iter().enumerate() {
        builder.add(entry, &|field| file::locate(text, index, field));
    }
    builder.finish()
}

/// A keys file compiled straight from disk, with the SHA-256 of its bytes.
pub struct CompiledFile {
    /// The store and its warnings.
    pub compiled: Compiled,
    /// SHA-256 of the file's content, to tell later whether it changed.
    pub digest: [u8; 32],
}

/// Entries handed from the reading thread to the building one at a time.
const BATCH: usize = 4096;

/// Compiles a keys file while reading it, never holding its text in memory (a million keys are
/// ~180 MB of YAML). Falls back to reading it whole for files outside the fast reader's subset.
pub fn compile_path(
    path: &Path,
    policy: &Policy,
    previous: Option<&KeyStore>,
    usage: &Arc<UsageTable>,
) -> Result<CompiledFile, Vec<Problem>> {
    let open = || std::fs::File::open(path).map_err(|e| vec![read_problem(&e)]);
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let mut hashing = HashingReader {
        inner: std::io::BufReader::with_capacity(256 * 1024, open()?),
        hasher: Sha256::new(),
    };
    let mut builder = StoreBuilder::new(policy, previous, usage, (size / 150) as usize);
    // Reading and parsing run on a second thread, building on this one: a million keys load in
    // about half the time on two cores.
    let (fast, hasher) = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(KeyEntry, EntryLines)>>(8);
        let reading = scope.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            let result = reader::read_entries(&mut hashing, &mut |entry, lines| {
                batch.push((entry, lines));
                if batch.len() == BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                    let _ = tx.send(full);
                }
            });
            let _ = tx.send(batch);
            (result, hashing.hasher)
        });
        for batch in rx {
            for (entry, lines) in batch {
                builder.add(entry, &|field| lines.of(field));
            }
        }
        reading
            .join()
            .unwrap_or_else(|_| (Err(ReadError::Unsupported { line: 0 }), Sha256::new()))
    });
    match fast {
        Ok(_) => {
            let digest = hasher.finalize().into();
            builder
                .finish()
                .map(|compiled| CompiledFile { compiled, digest })
        }
        Err(ReadError::Version(message)) => Err(vec![Problem::at(1, 1, message)]),
        Err(ReadError::Io(e)) => Err(vec![read_problem(&e)]),
        Err(ReadError::Unsupported { .. }) => {
            drop(builder);
            let mut text = String::new();
            open()?
                .read_to_string(&mut text)
                .map_err(|e| vec![read_problem(&e)])?;
            let digest = Sha256::digest(text.as_bytes()).into();
            compile(&text, policy, previous, usage)
                .map(|compiled| CompiledFile { compiled, digest })
        }
    }
}

fn read_problem(e: &std::io::Error) -> Problem {
    let hint = crate::diagnostic::read_hint(e);
    Problem::at(0, 0, format!("cannot read keys file: {e}{hint}"))
}

/// What to say when the keys file cannot be opened at all: for a missing one, how to make it.
pub fn missing_keys_message(path: &Path, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        format!(
            "{}: the keys file does not exist yet: create it with `portcullis keys create --keys {} --principal NAME`, or write an empty one (`version: 1` and `keys: []`)",
            path.display(),
            path.display()
        )
    } else {
        format!("{}: cannot read keys file: {e}", path.display())
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`, the form this tool writes, without a general date parser: a million
/// keys carry a million `created` times. Anything else goes to the `time` crate.
fn parse_utc_seconds(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        b[range].iter().try_fold(0i64, |acc, d| {
            d.is_ascii_digit().then(|| acc * 10 + i64::from(d - b'0'))
        })
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let valid = (1..=12).contains(&month)
        && day >= 1
        && day <= month_days[(month - 1) as usize]
        && hour < 24
        && minute < 60
        && second < 60;
    if !valid {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Hashes what passes through, so a file is read once for both parsing and change detection.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: BufRead> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for HashingReader<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        if let Ok(buf) = self.inner.fill_buf() {
            let n = amt.min(buf.len());
            self.hasher.update(&buf[..n]);
        }
        self.inner.consume(amt);
    }
}

/// Parses an RFC 3339 time into Unix seconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    if let Some(t) = parse_utc_seconds(text) {
        return Ok(t);
    }
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
        let compiled = compile(&text, &policy, None, &Arc::default()).unwrap();
        let ds = policy.resource_id("datasets").unwrap();
        let KeyLookup::Valid(full) = compiled.store.lookup("pcs_full", 0) else {
            panic!()
        };
        assert!(grant::any_allows(full.grants(), ds, Some("x"), Access::Write).is_some());
        let KeyLookup::Valid(read) = compiled.store.lookup("pcs_read", 0) else {
            panic!()
        };
        assert!(grant::any_allows(read.grants(), ds, Some("x"), Access::Read).is_some());
        assert!(grant::any_allows(read.grants(), ds, Some("x"), Access::Write).is_none());
        assert!(matches!(
            compiled.store.lookup("pcs_nope", 0),
            KeyLookup::Unknown
        ));
    }

    #[test]
    fn scopes_never_exceed_the_principal() {
        let policy = crate::policy::compile(POLICY).unwrap();
        let text = keys_text(&[("a", "pcs_wide", "alice", Some("'*:*'"))]);
        let compiled = compile(&text, &policy, None, &Arc::default()).unwrap();
        let ds = policy.resource_id("datasets").unwrap();
        let KeyLookup::Valid(k) = compiled.store.lookup("pcs_wide", 0) else {
            panic!()
        };
        assert!(grant::any_allows(k.grants(), ds, None, Access::Manage).is_none());
        assert!(grant::any_allows(k.grants(), ds, None, Access::Write).is_some());
    }

    #[test]
    fn orphans_are_disabled_and_errors_are_located() {
        let policy = crate::policy::compile(POLICY).unwrap();
        let text = keys_text(&[("a", "pcs_x", "ghost", None)]);
        let compiled = compile(&text, &policy, None, &Arc::default()).unwrap();
        assert!(compiled.store.is_empty());
        assert_eq!(compiled.warnings.len(), 1);
        let text = keys_text(&[
            ("x", "pcs_x", "alice", None),
            ("a", "pcs_y", "alice", None),
            ("a", "pcs_z", "alice", None),
        ])
        .replacen("sha256:", "sha256:zz", 1);
        let errors = compile(&text, &policy, None, &Arc::default())
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
        let compiled = compile(&text, &policy, None, &Arc::default()).unwrap();
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

    #[test]
    fn the_quick_time_parser_agrees_with_the_time_crate() {
        let full = |t: &str| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .unwrap()
                .unix_timestamp()
        };
        for t in [
            "1970-01-01T00:00:00Z",
            "2000-02-29T23:59:59Z",
            "2026-11-27T03:04:05Z",
            "2100-03-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
        ] {
            assert_eq!(parse_utc_seconds(t), Some(full(t)), "{t}");
        }
        for t in [
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-27 03:04:05Z",
            "2026-11-27T03:04:05+01:00",
        ] {
            assert_eq!(parse_utc_seconds(t), None, "{t}");
        }
        assert_eq!(
            parse_time("2026-11-27T04:04:05+01:00").unwrap(),
            full("2026-11-27T03:04:05Z")
        );
    }

    #[test]
    fn usage_survives_a_recompile_by_key_id() {
        let policy = crate::policy::compile(POLICY).unwrap();
        let usage = Arc::default();
        let text = keys_text(&[("a", "pcs_x", "alice", None)]);
        let first = compile(&text, &policy, None, &usage).unwrap().store;
        let KeyLookup::Valid(k) = first.lookup("pcs_x", 10) else {
            panic!()
        };
        k.usage().record(10);
        let more = keys_text(&[("b", "pcs_y", "alice", None), ("a", "pcs_x", "alice", None)]);
        let second = compile(&more, &policy, Some(&first), &usage).unwrap().store;
        assert_eq!(second.by_id("a").unwrap().usage().calls(), 1);
        assert_eq!(second.by_id("b").unwrap().usage().calls(), 0);
        assert_eq!(second.by_id("a").unwrap().index(), 1);
    }

    #[test]
    fn a_file_outside_the_fast_subset_still_loads_and_errors_are_placed() {
        let policy = crate::policy::compile(POLICY).unwrap();
        let hash = secret::hash_text("pcs_flow");
        let text = format!(
            "version: 1\nkeys:\n  - {{id: f, prefix: p, hash: \"{hash}\", principal: alice}}\n"
        );
        let store = compile(&text, &policy, None, &Arc::default())
            .unwrap()
            .store;
        assert!(matches!(store.lookup("pcs_flow", 0), KeyLookup::Valid(_)));
        let typo = "version: 1\nkeys:\n  - id: a\n    prefix: p\n    hash: h\n    principal: alice\n    activ: false\n";
        let errors = compile(typo, &policy, None, &Arc::default()).err().unwrap();
        assert_eq!(errors[0].line, 7, "{errors:?}");
    }

    #[test]
    fn changes_apply_on_top_of_the_base_without_rebuilding_it() {
        let policy = crate::policy::compile(POLICY).unwrap();
        let usage = Arc::default();
        let text = keys_text(&[("a", "pcs_a", "alice", None), ("b", "pcs_b", "alice", None)]);
        let base = compile(&text, &policy, None, &usage).unwrap().store;
        let KeyLookup::Valid(a) = base.lookup("pcs_a", 0) else {
            panic!()
        };
        a.usage().record(5);
        let entry = |id: &str, key: &str, active: bool| KeyEntry {
            id: id.into(),
            prefix: key[..4].into(),
            hash: secret::hash_text(key),
            principal: "alice".into(),
            scopes: Some(vec!["datasets:read".into()]),
            purpose: None,
            active,
            created: None,
            expires: None,
        };
        let changes = vec![
            Change::Upsert(entry("c", "pcs_c", true)),
            Change::Upsert(entry("a", "pcs_a", false)),
            Change::Remove("b".into()),
        ];
        let next = base.with_changes(&changes, &policy, &usage).unwrap().store;
        assert!(Arc::ptr_eq(&base.base, &next.base), "the base is shared");
        assert_eq!(next.len(), 2);
        assert!(matches!(next.lookup("pcs_c", 0), KeyLookup::Valid(_)));
        assert!(matches!(next.lookup("pcs_a", 0), KeyLookup::Inactive(_)));
        assert!(matches!(next.lookup("pcs_b", 0), KeyLookup::Unknown));
        assert!(next.by_id("b").is_none());
        assert_eq!(
            next.by_id("a").unwrap().usage().calls(),
            1,
            "usage follows the id"
        );
        let c = next.by_id("c").unwrap();
        assert_eq!(next.get(c.index()).unwrap().id(), "c");
        let ids: Vec<&str> = next.records().map(|k| k.id()).collect();
        assert_eq!(ids, vec!["a", "c"]);
        // A later change to an overlay key, and a re-added id, stay consistent.
        let again = next
            .with_changes(
                &[
                    Change::Remove("c".into()),
                    Change::Upsert(entry("b", "pcs_b2", true)),
                ],
                &policy,
                &usage,
            )
            .unwrap()
            .store;
        assert!(matches!(again.lookup("pcs_c", 0), KeyLookup::Unknown));
        assert!(matches!(again.lookup("pcs_b", 0), KeyLookup::Unknown));
        assert!(matches!(again.lookup("pcs_b2", 0), KeyLookup::Valid(_)));
        assert_eq!(again.len(), 2);
        assert_eq!(again.changed().len(), 2);
    }
}
