//! The live state and what keeps it current: read → parse → compile → swap, all or nothing.
//!
//! The loader owns the one `ArcSwap<Snapshot>` and follows two sources. The policy (and the TLS
//! certificate) are files, reloaded when they change. Keys follow their store: a keys file is
//! recompiled when it changes; a PostgreSQL store is loaded whole once and then followed by its
//! change feed, each change applied on top of the loaded keys without reading the others again.
//! A source that fails is rejected whole and the previous state keeps serving; the problem is
//! logged as `file:line:column`, counted and audited.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::audit::{AuditEvent, Auditor};
use crate::diagnostic::{self, FileProblems, Problem};
use crate::keys::{self, Compiled, KeyStore, StoreBuilder, UsageTable};
use crate::metrics::Metrics;
use crate::policy::{self, Policy};
use crate::state::{LiveState, Snapshot};
use crate::store::{KeysLocation, PgStore, Store};
use crate::tls::CertResolver;
use crate::watch::{version, FileVersion};

pub mod cache;
pub mod feed;

/// Which source a reload outcome is about (the `file` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadFile {
    /// The policy file.
    Policy,
    /// The keys (file or store).
    Keys,
    /// The TLS certificate and key.
    Tls,
}

impl ReloadFile {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadFile::Policy => "policy",
            ReloadFile::Keys => "keys",
            ReloadFile::Tls => "tls",
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Nothing changed.
    Unchanged,
    /// A new snapshot is live.
    Applied {
        /// Sources whose content changed.
        files: Vec<ReloadFile>,
        /// The new generation.
        generation: u64,
    },
    /// Rejected; the previous state keeps serving.
    Rejected {
        /// The source at fault.
        file: ReloadFile,
        /// Every problem, `file:line:column: message` per line.
        problems: String,
    },
}

/// The TLS material being served, to reload on change.
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Where handshakes get the certificate.
    pub resolver: Arc<CertResolver>,
}

/// Which version of the keys the live state holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeysVersion {
    /// A keys file, by content digest and metadata.
    File {
        digest: [u8; 32],
        fingerprint: Option<FileVersion>,
    },
    /// A shared store, by the last change number applied.
    Store { cursor: i64 },
    /// A shared store that could not be read yet (and no cache): nothing is served.
    Unloaded,
}

impl KeysVersion {
    /// Whether two versions hold the same keys (a touched but unchanged file does).
    fn same_keys(&self, other: &KeysVersion) -> bool {
        match (self, other) {
            (KeysVersion::File { digest: a, .. }, KeysVersion::File { digest: b, .. }) => a == b,
            (a, b) => a == b,
        }
    }
}

struct Versions {
    policy: [u8; 32],
    keys: KeysVersion,
    tls: [u8; 32],
    /// A policy change waits for a key store that could not be read: retried by the feed.
    policy_pending: bool,
}

/// A compiled snapshot and what identifies its sources.
struct Loaded {
    policy: Arc<Policy>,
    policy_digest: [u8; 32],
    keys: KeyStore,
    keys_version: KeysVersion,
    warnings: Vec<FileProblems>,
}

/// Owns the sources and the generation counter; the only writer of the live state.
pub struct Loader {
    policy_path: PathBuf,
    keys: KeysLocation,
    store: Arc<Store>,
    key_cache: Option<PathBuf>,
    generation: AtomicU64,
    state: LiveState,
    usage: Arc<UsageTable>,
    versions: tokio::sync::Mutex<Versions>,
    keys_ready: AtomicBool,
    metrics: Metrics,
    tls: Option<TlsFiles>,
    audit: Auditor,
    /// The last rejection reported: an editor's save often fires several change events, and
    /// one bad edit is reported (logged, counted, audited) once.
    last_rejection: std::sync::Mutex<Option<(ReloadFile, String)>>,
    /// `shadow_policy:`, watched and reloaded with the rest, never enforced.
    shadow: std::sync::OnceLock<Arc<crate::shadow::Shadow>>,
}

/// What the loader is given at start.
pub struct Sources {
    /// The policy file.
    pub policy: PathBuf,
    /// Where keys live.
    pub keys: KeysLocation,
    /// The store over `keys` (shared with the key API).
    pub store: Arc<Store>,
    /// With a PostgreSQL store: where the last state loaded is kept.
    pub key_cache: Option<PathBuf>,
}

impl Loader {
    /// Loads the first snapshot. Fails when a file is invalid. A PostgreSQL store that cannot be
    /// reached is not a failure: the proxy starts from `key_cache` if that holds a state, and
    /// otherwise serves no keys and reports not ready until the database answers.
    pub async fn start(
        sources: Sources,
        metrics: Metrics,
        tls: Option<TlsFiles>,
        audit: Auditor,
    ) -> Result<Arc<Loader>, FileProblems> {
        let usage = Arc::<UsageTable>::default();
        let policy_text = read(&sources.policy, "policy")?;
        let policy = Arc::new(
            policy::compile(&policy_text).map_err(|p| FileProblems::new(&sources.policy, p))?,
        );
        let loaded = load_keys(
            &sources,
            policy,
            digest(policy_text.as_bytes()),
            None,
            &usage,
            true,
        )
        .await
        .map_err(|(_, p)| p)?;
        log_warnings(&loaded.warnings);
        let ready = loaded.keys_version != KeysVersion::Unloaded;
        let loader = Loader {
            policy_path: sources.policy,
            keys: sources.keys,
            store: sources.store,
            key_cache: sources.key_cache,
            generation: AtomicU64::new(1),
            state: Arc::new(ArcSwap::from_pointee(Snapshot {
                generation: 1,
                policy: loaded.policy,
                keys: Arc::new(loaded.keys),
            })),
            usage,
            versions: tokio::sync::Mutex::new(Versions {
                policy: loaded.policy_digest,
                keys: loaded.keys_version,
                tls: tls.as_ref().map_or([0; 32], tls_digest),
                policy_pending: false,
            }),
            keys_ready: AtomicBool::new(ready),
            metrics,
            tls,
            audit,
            last_rejection: std::sync::Mutex::new(None),
            shadow: std::sync::OnceLock::new(),
        };
        loader.publish_gauges();
        Ok(Arc::new(loader))
    }

    /// The live state requests read.
    pub fn state(&self) -> LiveState {
        self.state.clone()
    }

    /// The key store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The per-key usage cells (shared by every snapshot).
    pub fn usage(&self) -> &Arc<UsageTable> {
        &self.usage
    }

    /// Whether keys have been loaded (from the store, its cache, or a file).
    pub fn keys_ready(&self) -> bool {
        self.keys_ready.load(Ordering::SeqCst)
    }

    /// Follows a shadow policy too (before the watcher starts, so its file is watched).
    pub fn follow_shadow(&self, shadow: Arc<crate::shadow::Shadow>) {
        let _ = self.shadow.set(shadow);
    }

    /// The files to watch (a keys file, not a database).
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.policy_path.clone()];
        if let Some(shadow) = self.shadow.get() {
            files.push(shadow.path().to_path_buf());
        }
        if let Some(path) = self.keys.file() {
            files.push(path.to_path_buf());
        }
        if let Some(tls) = &self.tls {
            files.push(tls.cert.clone());
            files.push(tls.key.clone());
        }
        files
    }

    /// Re-reads every source and applies what changed. Never leaves a half-applied state.
    pub async fn reload(&self) -> Vec<ReloadOutcome> {
        if let Some(shadow) = self.shadow.get() {
            shadow.reload();
        }
        let mut versions = self.versions.lock().await;
        let mut outcomes = vec![self.reload_state(&mut versions).await];
        if let Some(tls) = &self.tls {
            outcomes.push(self.reload_tls(tls, &mut versions.tls));
        }
        drop(versions);
        for outcome in &outcomes {
            self.count(outcome);
        }
        outcomes
    }

    /// Brings the keys up to date with the store now: what the key API calls after a change,
    /// so the change applies from the very next request, and what the change feed calls.
    pub async fn catch_up(&self) -> ReloadOutcome {
        let mut versions = self.versions.lock().await;
        let outcome = match &self.keys {
            KeysLocation::File(_) => self.reload_state(&mut versions).await,
            KeysLocation::Postgres(_) => self.follow_store(&mut versions).await,
        };
        drop(versions);
        self.count(&outcome);
        outcome
    }

    async fn reload_state(&self, versions: &mut Versions) -> ReloadOutcome {
        let policy_text = match read(&self.policy_path, "policy") {
            Ok(t) => t,
            Err(problems) => return rejected(ReloadFile::Policy, &problems),
        };
        let policy_digest = digest(policy_text.as_bytes());
        let policy_changed = policy_digest != versions.policy;
        let keys_file = self.keys.file().map(Path::to_path_buf);
        let fingerprint = keys_file.as_deref().and_then(version);
        if let Some(path) = &keys_file {
            if let Err(e) = std::fs::metadata(path) {
                let message = format!("cannot read keys file: {e}{}", diagnostic::read_hint(&e));
                return rejected(ReloadFile::Keys, &FileProblems::single(path, message));
            }
        }
        let keys_changed_on_disk = match versions.keys {
            KeysVersion::File { fingerprint: f, .. } => keys_file.is_some() && f != fingerprint,
            _ => false,
        };
        if !policy_changed && !keys_changed_on_disk {
            return ReloadOutcome::Unchanged;
        }
        let policy = match policy::compile(&policy_text) {
            Ok(p) => Arc::new(p),
            Err(p) => {
                return rejected(ReloadFile::Policy, &FileProblems::new(&self.policy_path, p))
            }
        };
        let current = self.state.load_full();
        let sources = self.sources();
        let loaded = match load_keys(
            &sources,
            policy,
            policy_digest,
            Some(current.keys.clone()),
            &self.usage,
            false,
        )
        .await
        {
            Ok(l) => l,
            Err((file, problems)) => {
                versions.policy_pending = policy_changed && keys_file.is_none();
                return rejected(file, &problems);
            }
        };
        versions.policy_pending = false;
        if let (Some(path), KeysVersion::File { .. }) = (&keys_file, loaded.keys_version) {
            if version(path) != fingerprint {
                // Written to while we read it (a `cp` in progress): take the next event.
                return ReloadOutcome::Unchanged;
            }
        }
        let keys_changed = !loaded.keys_version.same_keys(&versions.keys);
        if !policy_changed && !keys_changed {
            versions.keys = loaded.keys_version;
            return ReloadOutcome::Unchanged;
        }
        let files: Vec<ReloadFile> = [
            (policy_changed, ReloadFile::Policy),
            (keys_changed, ReloadFile::Keys),
        ]
        .into_iter()
        .filter_map(|(changed, f)| changed.then_some(f))
        .collect();
        let generation = self.swap(loaded, versions);
        ReloadOutcome::Applied { files, generation }
    }

    /// A PostgreSQL store: a full load when none has succeeded yet, otherwise the changes since
    /// the last one applied, batch by batch, on top of the loaded keys.
    async fn follow_store(&self, versions: &mut Versions) -> ReloadOutcome {
        let Store::Postgres(pg) = &*self.store else {
            return ReloadOutcome::Unchanged;
        };
        if versions.policy_pending {
            return self.reload_state(versions).await;
        }
        let current = self.state.load_full();
        let KeysVersion::Store { mut cursor } = versions.keys else {
            return self.full_store_load(pg, current, versions).await;
        };
        let mut keys: Option<KeyStore> = None;
        let mut warnings = Vec::new();
        loop {
            let delta = match pg.changes_since(cursor).await {
                Ok(d) => d,
                Err(e) if keys.is_none() => {
                    tracing::debug!(error = %e, "key store poll failed; serving the last state");
                    return ReloadOutcome::Unchanged;
                }
                Err(_) => break,
            };
            if delta.changes.is_empty() {
                break;
            }
            let base = keys.as_ref().unwrap_or(&current.keys);
            match base.with_changes(&delta.changes, &current.policy, &self.usage) {
                Ok(compiled) => {
                    warnings.extend(compiled.warnings);
                    keys = Some(compiled.store);
                    cursor = delta.cursor;
                }
                Err(problems) => {
                    let problems = FileProblems::new(Path::new(&pg.describe()), problems);
                    return rejected(ReloadFile::Keys, &problems);
                }
            }
            if !delta.more {
                break;
            }
        }
        let Some(keys) = keys else {
            return ReloadOutcome::Unchanged;
        };
        if keys.changed().len() > compaction_threshold(keys.len()) {
            // Fold the overlay into a fresh base now and then, so lookups stay one probe.
            return self.full_store_load(pg, current, versions).await;
        }
        if let Some(dir) = &self.key_cache {
            if let Err(e) = cache::write_changes(dir, &keys, cursor) {
                tracing::warn!(cache = %dir.display(), error = %e, "cannot update the key cache");
            }
        }
        let loaded = Loaded {
            policy: current.policy.clone(),
            policy_digest: versions.policy,
            keys,
            keys_version: KeysVersion::Store { cursor },
            warnings: store_warnings(pg, warnings),
        };
        let generation = self.swap(loaded, versions);
        ReloadOutcome::Applied {
            files: vec![ReloadFile::Keys],
            generation,
        }
    }

    async fn full_store_load(
        &self,
        pg: &PgStore,
        current: Arc<Snapshot>,
        versions: &mut Versions,
    ) -> ReloadOutcome {
        match load_from_store(
            pg,
            current.policy.clone(),
            Some(current.keys.clone()),
            &self.usage,
            self.key_cache.as_deref(),
        )
        .await
        {
            Ok((compiled, cursor)) => {
                let loaded = Loaded {
                    policy: current.policy.clone(),
                    policy_digest: versions.policy,
                    keys: compiled.store,
                    keys_version: KeysVersion::Store { cursor },
                    warnings: store_warnings(pg, compiled.warnings),
                };
                let generation = self.swap(loaded, versions);
                ReloadOutcome::Applied {
                    files: vec![ReloadFile::Keys],
                    generation,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "key store load failed; serving the last state");
                ReloadOutcome::Unchanged
            }
        }
    }

    fn sources(&self) -> Sources {
        Sources {
            policy: self.policy_path.clone(),
            keys: self.keys.clone(),
            store: self.store.clone(),
            key_cache: self.key_cache.clone(),
        }
    }

    fn swap(&self, loaded: Loaded, versions: &mut Versions) -> u64 {
        log_warnings(&loaded.warnings);
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        if loaded.keys_version != KeysVersion::Unloaded {
            self.keys_ready.store(true, Ordering::SeqCst);
        }
        self.state.store(Arc::new(Snapshot {
            generation,
            policy: loaded.policy,
            keys: Arc::new(loaded.keys),
        }));
        self.generation.store(generation, Ordering::SeqCst);
        versions.policy = loaded.policy_digest;
        versions.keys = loaded.keys_version;
        self.publish_gauges();
        generation
    }

    fn reload_tls(&self, tls: &TlsFiles, last: &mut [u8; 32]) -> ReloadOutcome {
        let now = tls_digest(tls);
        if now == *last {
            return ReloadOutcome::Unchanged;
        }
        match crate::tls::load_certified_key(&tls.cert, &tls.key) {
            Ok(key) => {
                tls.resolver.replace(key);
                *last = now;
                ReloadOutcome::Applied {
                    files: vec![ReloadFile::Tls],
                    generation: self.generation.load(Ordering::SeqCst),
                }
            }
            Err(message) => ReloadOutcome::Rejected {
                file: ReloadFile::Tls,
                problems: message,
            },
        }
    }

    fn count(&self, outcome: &ReloadOutcome) {
        {
            let mut last = self
                .last_rejection
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match outcome {
                ReloadOutcome::Rejected { file, problems } => {
                    let this = (*file, problems.clone());
                    if last.as_ref() == Some(&this) {
                        tracing::debug!(file = file.as_str(), "reload still rejected");
                        return;
                    }
                    *last = Some(this);
                }
                ReloadOutcome::Applied { .. } => *last = None,
                ReloadOutcome::Unchanged => {}
            }
        }
        match outcome {
            ReloadOutcome::Unchanged => {}
            ReloadOutcome::Applied { files, generation } => {
                for f in files {
                    self.metrics
                        .reloads
                        .with_label_values(&[f.as_str(), "ok"])
                        .inc();
                    self.audit.record(AuditEvent::Reload {
                        file: f.as_str().to_string(),
                        ok: true,
                        error: None,
                        generation: *generation,
                    });
                }
                tracing::info!(generation, files = ?files.iter().map(|f| f.as_str()).collect::<Vec<_>>(), "reloaded");
            }
            ReloadOutcome::Rejected { file, problems } => {
                self.metrics
                    .reloads
                    .with_label_values(&[file.as_str(), "error"])
                    .inc();
                self.audit.record(AuditEvent::Reload {
                    file: file.as_str().to_string(),
                    ok: false,
                    error: Some(problems.clone()),
                    generation: self.generation.load(Ordering::SeqCst),
                });
                for line in problems.lines() {
                    tracing::error!(
                        file = file.as_str(),
                        "reload rejected, previous state keeps serving: {line}"
                    );
                }
            }
        }
    }

    fn publish_gauges(&self) {
        let snapshot = self.state.load();
        self.metrics.keys_loaded.set(snapshot.keys.len() as i64);
        self.metrics
            .policy_routes
            .set(snapshot.policy.routes().len() as i64);
        self.metrics
            .config_generation
            .set(snapshot.generation as i64);
        self.metrics
            .last_reload_success
            .set(crate::clock::unix_now() as f64);
    }
}

/// The overlay size past which a full load folds it into a new base.
fn compaction_threshold(keys: usize) -> usize {
    (keys / 16).max(4096)
}

fn store_warnings(pg: &PgStore, warnings: Vec<Problem>) -> Vec<FileProblems> {
    if warnings.is_empty() {
        Vec::new()
    } else {
        vec![FileProblems::new(Path::new(&pg.describe()), warnings)]
    }
}

/// Loads the keys for `policy` from wherever they live. `starting`: a PostgreSQL store that
/// cannot be reached falls back to the cache, or to no keys at all (not ready).
async fn load_keys(
    sources: &Sources,
    policy: Arc<Policy>,
    policy_digest: [u8; 32],
    previous: Option<Arc<KeyStore>>,
    usage: &Arc<UsageTable>,
    starting: bool,
) -> Result<Loaded, (ReloadFile, FileProblems)> {
    match (&sources.keys, &*sources.store) {
        (KeysLocation::File(path), _) => {
            if starting {
                if let Err(e) = std::fs::metadata(path) {
                    let message = keys::missing_keys_message(path, &e);
                    return Err((
                        ReloadFile::Keys,
                        FileProblems::single(Path::new(""), message),
                    ));
                }
            }
            let (compiled, digest) = compile_file(path.clone(), policy.clone(), previous, usage)
                .await
                .map_err(|p| (ReloadFile::Keys, p))?;
            let warnings = policy_warnings(&sources.policy, &policy)
                .into_iter()
                .chain(
                    (!compiled.warnings.is_empty())
                        .then(|| FileProblems::new(path, compiled.warnings)),
                )
                .collect();
            Ok(Loaded {
                policy,
                policy_digest,
                keys: compiled.store,
                keys_version: KeysVersion::File {
                    digest,
                    fingerprint: version(path),
                },
                warnings,
            })
        }
        (KeysLocation::Postgres(_), Store::Postgres(pg)) => {
            let cache = sources.key_cache.as_deref();
            let (compiled, keys_version) =
                match load_from_store(pg, policy.clone(), previous, usage, cache).await {
                    Ok((compiled, cursor)) => (compiled, KeysVersion::Store { cursor }),
                    Err(e) => {
                        from_cache_or_nothing(pg, &policy, usage, cache, starting, &e).await?
                    }
                };
            let mut warnings: Vec<FileProblems> = policy_warnings(&sources.policy, &policy)
                .into_iter()
                .collect();
            warnings.extend(store_warnings(pg, compiled.warnings));
            Ok(Loaded {
                policy,
                policy_digest,
                keys: compiled.store,
                keys_version,
                warnings,
            })
        }
        (KeysLocation::Postgres(pg), Store::File(_)) => Err((
            ReloadFile::Keys,
            FileProblems::single(Path::new(&pg.redacted()), "store and location disagree"),
        )),
    }
}

/// The database is down: the key cache (if it holds a state) or, at start, no keys at all.
async fn from_cache_or_nothing(
    pg: &PgStore,
    policy: &Arc<Policy>,
    usage: &Arc<UsageTable>,
    cache: Option<&Path>,
    starting: bool,
    error: &crate::store::StoreError,
) -> Result<(Compiled, KeysVersion), (ReloadFile, FileProblems)> {
    let store_problem = || {
        FileProblems::single(
            Path::new(&pg.describe()),
            format!("{error}; keeping the last state"),
        )
    };
    if let Some(dir) = cache {
        match cache::load(dir, policy.clone(), usage).await {
            Ok(Some((compiled, cursor))) => {
                tracing::warn!(%error, cache = %dir.display(), "key store unreachable: serving the cached keys");
                return Ok((compiled, KeysVersion::Store { cursor }));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(cache = %dir.display(), error = %e, "the key cache is unusable")
            }
        }
    }
    if !starting {
        return Err((ReloadFile::Keys, store_problem()));
    }
    tracing::error!(%error, "key store unreachable and no key cache: serving no keys, not ready until it answers");
    let empty = StoreBuilder::new(policy, None, usage, 0)
        .finish()
        .map_err(|p| {
            (
                ReloadFile::Keys,
                FileProblems::new(Path::new(&pg.describe()), p),
            )
        })?;
    Ok((empty, KeysVersion::Unloaded))
}

fn policy_warnings(path: &Path, policy: &Policy) -> Option<FileProblems> {
    (!policy.warnings().is_empty()).then(|| FileProblems::new(path, policy.warnings().to_vec()))
}

/// Streams a keys file into a store on a blocking thread; returns it and the file's digest.
async fn compile_file(
    path: PathBuf,
    policy: Arc<Policy>,
    previous: Option<Arc<KeyStore>>,
    usage: &Arc<UsageTable>,
) -> Result<(Compiled, [u8; 32]), FileProblems> {
    let usage = usage.clone();
    let task_path = path.clone();
    tokio::task::spawn_blocking(move || {
        keys::compile_path(&task_path, &policy, previous.as_deref(), &usage)
            .map(|f| (f.compiled, f.digest))
            .map_err(|p| FileProblems::new(&task_path, p))
    })
    .await
    .unwrap_or_else(|e| Err(FileProblems::single(&path, format!("loading failed: {e}"))))
}

/// Loads every key from the database into a store (built on a blocking thread while rows
/// stream in), writing the key cache on the way when one is configured.
pub async fn load_from_store(
    pg: &PgStore,
    policy: Arc<Policy>,
    previous: Option<Arc<KeyStore>>,
    usage: &Arc<UsageTable>,
    cache: Option<&Path>,
) -> Result<(Compiled, i64), crate::store::StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<crate::keys::entry::KeyEntry>>(8);
    let usage = usage.clone();
    let cache_writer = cache.map(cache::BaseWriter::start).transpose();
    let cache_writer = match cache_writer {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot write the key cache");
            None
        }
    };
    let building = tokio::task::spawn_blocking(move || {
        let mut builder = StoreBuilder::new(&policy, previous.as_deref(), &usage, 0).lenient();
        let mut writer = cache_writer;
        for batch in rx {
            for entry in batch {
                if let Some(w) = writer.as_mut() {
                    w.add(&entry);
                }
                builder.add(entry, &|_| (0, 0));
            }
        }
        (builder.finish(), writer)
    });
    let cursor = pg.load(tx).await;
    let (compiled, writer) = building
        .await
        .map_err(|e| crate::store::StoreError::Failed(format!("loading keys failed: {e}")))?;
    let cursor = cursor?;
    let compiled = compiled.map_err(|p| {
        crate::store::StoreError::Failed(
            FileProblems::new(Path::new(&pg.describe()), p).to_string(),
        )
    })?;
    if let Some(writer) = writer {
        if let Err(e) = writer.finish(cursor) {
            tracing::warn!(error = %e, "cannot write the key cache");
        }
    }
    Ok((compiled, cursor))
}

/// Compiles the policy and the keys once, for `check` and `explain`: a file, or the store.
pub async fn compile_once(
    policy_path: &Path,
    keys: &KeysLocation,
    usage: &Arc<UsageTable>,
) -> Result<(Snapshot, Vec<FileProblems>), (ReloadFile, FileProblems)> {
    let policy_text = read(policy_path, "policy").map_err(|p| (ReloadFile::Policy, p))?;
    let policy = Arc::new(
        policy::compile(&policy_text)
            .map_err(|p| (ReloadFile::Policy, FileProblems::new(policy_path, p)))?,
    );
    let sources = Sources {
        policy: policy_path.to_path_buf(),
        keys: keys.clone(),
        store: Arc::new(Store::open(keys)),
        key_cache: None,
    };
    if let Store::Postgres(pg) = &*sources.store {
        let (compiled, _) = load_from_store(pg, policy.clone(), None, usage, None)
            .await
            .map_err(|e| {
                (
                    ReloadFile::Keys,
                    FileProblems::single(Path::new(&pg.describe()), e.to_string()),
                )
            })?;
        let warnings = store_warnings(pg, compiled.warnings);
        return Ok((
            Snapshot {
                generation: 1,
                policy,
                keys: Arc::new(compiled.store),
            },
            warnings,
        ));
    }
    let loaded = load_keys(&sources, policy, [0; 32], None, usage, false).await?;
    Ok((
        Snapshot {
            generation: 1,
            policy: loaded.policy,
            keys: Arc::new(loaded.keys),
        },
        loaded.warnings,
    ))
}

fn read(path: &Path, what: &str) -> Result<String, FileProblems> {
    std::fs::read_to_string(path).map_err(|e| {
        let hint = diagnostic::read_hint(&e);
        FileProblems::single(path, format!("cannot read {what} file: {e}{hint}"))
    })
}

fn digest(text: &[u8]) -> [u8; 32] {
    Sha256::digest(text).into()
}

fn rejected(file: ReloadFile, problems: &FileProblems) -> ReloadOutcome {
    ReloadOutcome::Rejected {
        file,
        problems: problems.to_string(),
    }
}

fn tls_digest(tls: &TlsFiles) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(std::fs::read(&tls.cert).unwrap_or_default());
    hasher.update([0]);
    hasher.update(std::fs::read(&tls.key).unwrap_or_default());
    hasher.finalize().into()
}

fn log_warnings(warnings: &[FileProblems]) {
    for w in warnings {
        for line in w.to_string().lines() {
            tracing::warn!("{line}");
        }
    }
}
