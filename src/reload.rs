//! Loading policy, keys and the TLS certificate into the live state: read → parse → compile →
//! swap, all or nothing. A file that fails is rejected whole and the previous state keeps
//! serving; the problem is logged with `file:line:column` and counted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::audit::{AuditEvent, Auditor};
use crate::diagnostic::FileProblems;
use crate::keys::UsageTable;
use crate::metrics::Metrics;
use crate::state::{LiveState, Snapshot, Source};
use crate::tls::CertResolver;

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
    usage: &UsageTable,
) -> Result<(Snapshot, Vec<FileProblems>), (ReloadFile, FileProblems)> {
    let policy_text = read(policy_path, "policy").map_err(|p| (ReloadFile::Policy, p))?;
    let keys_text = read(keys_path, "keys").map_err(|p| (ReloadFile::Keys, p))?;
    compile_texts(
        policy_path,
        &policy_text,
        keys_path,
        &keys_text,
        generation,
        usage,
    )
}

fn compile_texts(
    policy_path: &Path,
    policy_text: &str,
    keys_path: &Path,
    keys_text: &str,
    generation: u64,
    usage: &UsageTable,
) -> Result<(Snapshot, Vec<FileProblems>), (ReloadFile, FileProblems)> {
    match Snapshot::compile(policy_text, keys_text, generation, usage) {
        Ok((snapshot, warnings)) => {
            let warnings = if warnings.is_empty() {
                Vec::new()
            } else {
                vec![FileProblems::new(keys_path, warnings)]
            };
            Ok((snapshot, warnings))
        }
        Err((Source::Policy, problems)) => {
            Err((ReloadFile::Policy, FileProblems::new(policy_path, problems)))
        }
        Err((Source::Keys, problems)) => {
            Err((ReloadFile::Keys, FileProblems::new(keys_path, problems)))
        }
    }
}

fn read(path: &Path, what: &str) -> Result<String, FileProblems> {
    std::fs::read_to_string(path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => " (deleted? keeping the last good state)",
            _ if e.raw_os_error() == Some(40) => " (symlink loop)",
            _ => "",
        };
        FileProblems::single(path, format!("cannot read {what} file: {e}{hint}"))
    })
}

fn digest(text: &[u8]) -> [u8; 32] {
    Sha256::digest(text).into()
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
    usage: UsageTable,
    digests: Mutex<([u8; 32], [u8; 32], [u8; 32])>,
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
        let usage = UsageTable::default();
        let policy_text = read(&policy_path, "policy")?;
        let keys_text = read(&keys_path, "keys")?;
        let (snapshot, warnings) = compile_texts(
            &policy_path,
            &policy_text,
            &keys_path,
            &keys_text,
            1,
            &usage,
        )
        .map_err(|(_, p)| p)?;
        log_warnings(&warnings);
        let tls_digest = tls.as_ref().map_or([0; 32], tls_digest);
        let loader = Loader {
            policy_path,
            keys_path,
            generation: AtomicU64::new(1),
            state: Arc::new(ArcSwap::from_pointee(snapshot)),
            usage,
            digests: Mutex::new((
                digest(policy_text.as_bytes()),
                digest(keys_text.as_bytes()),
                tls_digest,
            )),
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
        let mut digests = match self.digests.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut outcomes = vec![self.reload_state(&mut digests)];
        if let Some(tls) = &self.tls {
            outcomes.push(self.reload_tls(tls, &mut digests.2));
        }
        for outcome in &outcomes {
            self.count(outcome);
        }
        outcomes
    }

    fn reload_state(&self, digests: &mut ([u8; 32], [u8; 32], [u8; 32])) -> ReloadOutcome {
        let texts = read(&self.policy_path, "policy")
            .map_err(|p| (ReloadFile::Policy, p))
            .and_then(|p| {
                Ok((
                    p,
                    read(&self.keys_path, "keys").map_err(|k| (ReloadFile::Keys, k))?,
                ))
            });
        let (policy_text, keys_text) = match texts {
            Ok(t) => t,
            Err((file, problems)) => return rejected(file, &problems),
        };
        let new = (digest(policy_text.as_bytes()), digest(keys_text.as_bytes()));
        if new == (digests.0, digests.1) {
            return ReloadOutcome::Unchanged;
        }
        let mut files = Vec::new();
        if new.0 != digests.0 {
            files.push(ReloadFile::Policy);
        }
        if new.1 != digests.1 {
            files.push(ReloadFile::Keys);
        }
        let next = self.generation.load(Ordering::SeqCst) + 1;
        let compiled = compile_texts(
            &self.policy_path,
            &policy_text,
            &self.keys_path,
            &keys_text,
            next,
            &self.usage,
        );
        match compiled {
            Err((file, problems)) => rejected(file, &problems),
            Ok((snapshot, warnings)) => {
                log_warnings(&warnings);
                self.state.store(Arc::new(snapshot));
                self.generation.store(next, Ordering::SeqCst);
                (digests.0, digests.1) = new;
                self.publish_gauges();
                ReloadOutcome::Applied {
                    files,
                    generation: next,
                }
            }
        }
    }

    /// Applies keys text that was just written to the keys file (by the key API), so the change
    /// is live before the writer answers; the watcher then finds nothing new to apply.
    pub fn apply_keys_text(&self, keys_text: &str) -> Result<u64, String> {
        let mut digests = match self.digests.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let policy_text = read(&self.policy_path, "policy").map_err(|p| p.to_string())?;
        let next = self.generation.load(Ordering::SeqCst) + 1;
        let (snapshot, warnings) = compile_texts(
            &self.policy_path,
            &policy_text,
            &self.keys_path,
            keys_text,
            next,
            &self.usage,
        )
        .map_err(|(_, p)| p.to_string())?;
        log_warnings(&warnings);
        self.state.store(Arc::new(snapshot));
        self.generation.store(next, Ordering::SeqCst);
        digests.0 = digest(policy_text.as_bytes());
        digests.1 = digest(keys_text.as_bytes());
        self.publish_gauges();
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
            .set(crate::proxy::service::unix_now() as f64);
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
