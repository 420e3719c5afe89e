//! Loading policy, keys and the TLS certificate into the live state: read → parse → compile →
//! swap, all or nothing. A file that fails is rejected whole and the previous state keeps
//! serving; the problem is logged with `file:line:column` and counted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::audit::{AuditEvent, Auditor};
use crate::diagnostic::{self, FileProblems};
use crate::keys::{self, KeyStore, UsageTable};
use crate::metrics::Metrics;
use crate::policy;
use crate::state::{LiveState, Snapshot};
use crate::tls::CertResolver;
use crate::watch::{version, FileVersion};

/// Which file a reload outcome is about (the `file` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadFile {
    /// The policy file.
    Policy,
    /// The keys file.
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
    /// Nothing changed on disk.
    Unchanged,
    /// A new snapshot is live.
    Applied {
        /// Files whose content changed.
        files: Vec<ReloadFile>,
        /// The new generation.
        generation: u64,
    },
    /// Rejected; the previous state keeps serving.
    Rejected {
        /// The file at fault.
        file: ReloadFile,
        /// Every problem, `file:line:column: message` per line.
        problems: String,
    },
}

/// Reads both files and compiles a snapshot, or says what is wrong and where.
pub fn compile_files(
    policy_path: &Path,
    keys_path: &Path,
    generation: u64,
    usage: &Arc<UsageTable>,
) -> Result<(Snapshot, Vec<FileProblems>), (ReloadFile, FileProblems)> {
    let policy_text = read(policy_path, "policy").map_err(|p| (ReloadFile::Policy, p))?;
    let loaded = compile_from(
        policy_path,
        &policy_text,
        keys_path,
        None,
        usage,
        generation,
    )?;
    Ok((loaded.snapshot, loaded.warnings))
}

/// A compiled snapshot with what identifies the file versions it came from.
struct Loaded {
    snapshot: Snapshot,
    warnings: Vec<FileProblems>,
    policy_digest: [u8; 32],
    keys_digest: [u8; 32],
}

/// Compiles the policy text, then streams the keys file against it.
fn compile_from(
    policy_path: &Path,
    policy_text: &str,
    keys_path: &Path,
    previous: Option<&KeyStore>,
    usage: &Arc<UsageTable>,
    generation: u64,
) -> Result<Loaded, (ReloadFile, FileProblems)> {
    let policy = policy::compile(policy_text)
        .map_err(|p| (ReloadFile::Policy, FileProblems::new(policy_path, p)))?;
    let keys = keys::compile_path(keys_path, &policy, previous, usage)
        .map_err(|p| (ReloadFile::Keys, FileProblems::new(keys_path, p)))?;
    finish(
        policy_path,
        policy_text,
        policy,
        keys.compiled,
        keys.digest,
        keys_path,
        generation,
    )
}

fn finish(
    policy_path: &Path,
    policy_text: &str,
    policy: crate::policy::Policy,
    compiled: keys::Compiled,
    keys_digest: [u8; 32],
    keys_path: &Path,
    generation: u64,
) -> Result<Loaded, (ReloadFile, FileProblems)> {
    let mut warnings = Vec::new();
    if !policy.warnings().is_empty() {
        warnings.push(FileProblems::new(policy_path, policy.warnings().to_vec()));
    }
    if !compiled.warnings.is_empty() {
        warnings.push(FileProblems::new(keys_path, compiled.warnings));
    }
    Ok(Loaded {
        snapshot: Snapshot {
            generation,
            policy: Arc::new(policy),
            keys: Arc::new(compiled.store),
        },
        warnings,
        policy_digest: digest(policy_text.as_bytes()),
        keys_digest,
    })
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

/// What the live state was loaded from.
struct Versions {
    policy: [u8; 32],
    keys: [u8; 32],
    keys_fingerprint: Option<FileVersion>,
    tls: [u8; 32],
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

/// Owns the file paths and the generation counter; the only writer of the live state.
pub struct Loader {
    policy_path: PathBuf,
    keys_path: PathBuf,
    generation: AtomicU64,
    state: LiveState,
    usage: Arc<UsageTable>,
    versions: Mutex<Versions>,
    metrics: Metrics,
    tls: Option<TlsFiles>,
    audit: Auditor,
}

impl Loader {
    /// Loads the first snapshot; fails when the files are not valid.
    pub fn start(
        policy_path: PathBuf,
        keys_path: PathBuf,
        metrics: Metrics,
        tls: Option<TlsFiles>,
        audit: Auditor,
    ) -> Result<Arc<Loader>, FileProblems> {
        let usage = Arc::<UsageTable>::default();
        let keys_fingerprint = version(&keys_path);
        let policy_text = read(&policy_path, "policy")?;
        let loaded = compile_from(&policy_path, &policy_text, &keys_path, None, &usage, 1)
            .map_err(|(_, p)| p)?;
        log_warnings(&loaded.warnings);
        let tls_digest = tls.as_ref().map_or([0; 32], tls_digest);
        let loader = Loader {
            policy_path,
            keys_path,
            generation: AtomicU64::new(1),
            state: Arc::new(ArcSwap::from_pointee(loaded.snapshot)),
            usage,
            versions: Mutex::new(Versions {
                policy: loaded.policy_digest,
                keys: loaded.keys_digest,
                keys_fingerprint,
                tls: tls_digest,
            }),
            metrics,
            tls,
            audit,
        };
        loader.publish_gauges();
        Ok(Arc::new(loader))
    }

    /// The live state requests read.
    pub fn state(&self) -> LiveState {
        self.state.clone()
    }

    /// The files to watch.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.policy_path.clone(), self.keys_path.clone()];
        if let Some(tls) = &self.tls {
            files.push(tls.cert.clone());
            files.push(tls.key.clone());
        }
        files
    }

    /// Re-reads every file and applies what changed. Never leaves a half-applied state.
    pub fn reload(&self) -> Vec<ReloadOutcome> {
        let mut versions = match self.versions.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut outcomes = vec![self.reload_state(&mut versions)];
        if let Some(tls) = &self.tls {
            outcomes.push(self.reload_tls(tls, &mut versions.tls));
        }
        for outcome in &outcomes {
            self.count(outcome);
        }
        outcomes
    }

    fn reload_state(&self, versions: &mut Versions) -> ReloadOutcome {
        let policy_text = match read(&self.policy_path, "policy") {
            Ok(t) => t,
            Err(problems) => return rejected(ReloadFile::Policy, &problems),
        };
        let policy_changed = digest(policy_text.as_bytes()) != versions.policy;
        let keys_fingerprint = version(&self.keys_path);
        if let Err(e) = std::fs::metadata(&self.keys_path) {
            let hint = diagnostic::read_hint(&e);
            let message = format!("cannot read keys file: {e}{hint}");
            return rejected(
                ReloadFile::Keys,
                &FileProblems::single(&self.keys_path, message),
            );
        }
        if !policy_changed && keys_fingerprint == versions.keys_fingerprint {
            return ReloadOutcome::Unchanged;
        }
        let next = self.generation.load(Ordering::SeqCst) + 1;
        let current = self.state.load_full();
        let loaded = match compile_from(
            &self.policy_path,
            &policy_text,
            &self.keys_path,
            Some(&current.keys),
            &self.usage,
            next,
        ) {
            Ok(l) => l,
            Err((file, problems)) => return rejected(file, &problems),
        };
        if version(&self.keys_path) != keys_fingerprint {
            // Written to while we read it (a `cp` in progress): take the next event instead of a
            // half-written file.
            return ReloadOutcome::Unchanged;
        }
        versions.keys_fingerprint = keys_fingerprint;
        let keys_changed = loaded.keys_digest != versions.keys;
        if !policy_changed && !keys_changed {
            return ReloadOutcome::Unchanged;
        }
        let files: Vec<ReloadFile> = [
            (policy_changed, ReloadFile::Policy),
            (keys_changed, ReloadFile::Keys),
        ]
        .into_iter()
        .filter_map(|(changed, f)| changed.then_some(f))
        .collect();
        self.swap(loaded, versions);
        ReloadOutcome::Applied {
            files,
            generation: next,
        }
    }

    fn swap(&self, loaded: Loaded, versions: &mut Versions) {
        log_warnings(&loaded.warnings);
        let generation = loaded.snapshot.generation;
        self.state.store(Arc::new(loaded.snapshot));
        self.generation.store(generation, Ordering::SeqCst);
        versions.policy = loaded.policy_digest;
        versions.keys = loaded.keys_digest;
        self.publish_gauges();
    }

    /// Applies keys text that was just written to the keys file (by the key API), so the change
    /// is live before the writer answers; the watcher then finds nothing new to apply.
    pub fn apply_keys_text(&self, keys_text: &str) -> Result<u64, String> {
        let mut versions = match self.versions.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Keys change against the live policy; a policy edited on disk meanwhile is the watcher's
        // business and is applied (and audited) as a policy reload.
        let current = self.state.load_full();
        let next = self.generation.load(Ordering::SeqCst) + 1;
        let compiled = keys::compile(keys_text, &current.policy, Some(&current.keys), &self.usage)
            .map_err(|p| FileProblems::new(&self.keys_path, p).to_string())?;
        let loaded = Loaded {
            snapshot: Snapshot {
                generation: next,
                policy: current.policy.clone(),
                keys: Arc::new(compiled.store),
            },
            warnings: Vec::new(),
            policy_digest: versions.policy,
            keys_digest: digest(keys_text.as_bytes()),
        };
        versions.keys_fingerprint = version(&self.keys_path);
        self.swap(loaded, &mut versions);
        self.count(&ReloadOutcome::Applied {
            files: vec![ReloadFile::Keys],
            generation: next,
        });
        Ok(next)
    }

    /// The keys file path.
    pub fn keys_path(&self) -> &Path {
        &self.keys_path
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
