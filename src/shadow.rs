//! `shadow_policy:`: a second policy every request is also decided with, enforced never. The
//! audit event records what it would have said (`shadow_decision`, `shadow_reason`), and
//! `portcullis_shadow_mismatches_total{route}` counts where it disagrees with the live policy.
//!
//! The shadow file is watched and reloaded like the policy. A shadow that does not compile is
//! logged and left out (the last good one stays); it never touches enforcement.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use http::Method;
use prometheus::{IntCounterVec, Opts, Registry};
use sha2::{Digest, Sha256};

use crate::decision::{self, Reason};
use crate::identity::{Caller, TokenCaller};
use crate::path::BackendReading;
use crate::policy::{grant, Policy};
use crate::state::Snapshot;

/// The shadow policy and its metric.
pub struct Shadow {
    path: PathBuf,
    policy: ArcSwapOption<Policy>,
    digest: Mutex<[u8; 32]>,
    mismatches: IntCounterVec,
}

/// What the shadow policy would have decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowDecision {
    /// Whether it would have let the request through.
    pub allow: bool,
    /// Why.
    pub reason: Reason,
}

impl Shadow {
    /// Loads `path` (a broken or missing file is logged, not fatal) and registers the metric.
    pub fn load(path: &Path, registry: &Registry) -> prometheus::Result<Arc<Shadow>> {
        let mismatches = IntCounterVec::new(
            Opts::new(
                "portcullis_shadow_mismatches_total",
                "Requests the shadow policy would have decided otherwise (allow vs deny), by route.",
            ),
            &["route"],
        )?;
        registry.register(Box::new(mismatches.clone()))?;
        let shadow = Arc::new(Shadow {
            path: path.to_path_buf(),
            policy: ArcSwapOption::empty(),
            digest: Mutex::new([0; 32]),
            mismatches,
        });
        shadow.reload();
        Ok(shadow)
    }

    /// The file to watch.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the shadow file; a change that compiles replaces it, one that does not is
    /// logged and the last good shadow stays.
    pub fn reload(&self) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "shadow policy unreadable; the last good one stays (enforcement is not affected)");
                return;
            }
        };
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        let mut last = self.digest.lock().unwrap_or_else(|p| p.into_inner());
        if *last == digest {
            return;
        }
        *last = digest;
        match crate::policy::compile(&text) {
            Ok(policy) => {
                self.policy.store(Some(Arc::new(policy)));
                tracing::info!(file = %self.path.display(), "shadow policy loaded");
            }
            Err(problems) => {
                let found = crate::diagnostic::FileProblems::new(&self.path, problems);
                for line in found.to_string().lines() {
                    tracing::warn!(
                        "{line} (shadow policy rejected; the last good one stays, enforcement is not affected)"
                    );
                }
            }
        }
    }

    /// What the shadow policy says about a request the live policy decided as `live`.
    /// `None` without a good shadow policy.
    pub fn decide(
        &self,
        live: &Snapshot,
        method: &Method,
        path: &str,
        reading: &BackendReading,
        caller: Option<Caller<'_>>,
        live_reason: Reason,
    ) -> Option<ShadowDecision> {
        let policy = self.policy.load_full()?;
        let snapshot = Snapshot {
            generation: 0,
            policy,
            keys: live.keys.clone(),
        };
        let rebuilt = caller.map(|c| shadow_caller(&snapshot.policy, c));
        let identified: Result<Caller<'_>, Reason> = match &rebuilt {
            Some(Ok(t)) => Ok(Caller::Token(t)),
            Some(Err(r)) => Err(*r),
            // No caller: the live policy's identity verdict (no key, unknown key...) holds.
            None if live_reason.is_unauthenticated() => Err(live_reason),
            None => Err(Reason::NoCredential),
        };
        let d = decision::judge(&snapshot, method, path, reading, identified);
        Some(ShadowDecision {
            allow: d.reason.allows(),
            reason: d.reason,
        })
    }

    /// Counts a disagreement on `route`.
    pub fn mismatch(&self, route: &str) {
        self.mismatches.with_label_values(&[route]).inc();
    }
}

/// The caller as the shadow policy sees it: its principal's grants there, narrowed as before by
/// the key's or token's scopes.
fn shadow_caller(policy: &Policy, caller: Caller<'_>) -> Result<TokenCaller, Reason> {
    let name = &caller.principal().name;
    let principal = policy.principal(name).ok_or(match caller {
        // A key whose principal the shadow does not know would be left out of its key set.
        Caller::Key(_) => Reason::UnknownKey,
        Caller::Token(_) => Reason::UnknownPrincipal,
    })?;
    let scoped = match caller {
        Caller::Key(k) => k.scoped(),
        Caller::Token(t) => t.scoped,
    };
    let grants: Arc<[grant::Grant]> = if scoped {
        grant::intersect_sets(&principal.grants, caller.grants()).into()
    } else {
        principal.grants.clone()
    };
    let (issuer, client_id) = match caller {
        Caller::Key(_) => (Arc::from("key"), None),
        Caller::Token(t) => (t.issuer.clone(), t.client_id.clone()),
    };
    Ok(TokenCaller {
        principal: principal.clone(),
        grants,
        scoped,
        issuer,
        client_id,
    })
}
