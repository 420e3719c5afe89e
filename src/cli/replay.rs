//! `portcullis replay --policy NEW [--keys K] AUDIT.jsonl`: every audited decision decided
//! again with a new policy, through the proxy's own decision function, and what would change,
//! grouped by route and principal.
//!
//! The caller is rebuilt from the event: a key by its id from `--keys` (so its scopes narrow it
//! as before), otherwise the event's principal with its full access. Decisions that did not come
//! from the policy (an unknown key, a bad path, a rate limit, a malformed request) are counted
//! as not replayed: a new policy cannot change them.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use http::Method;

use super::CommandError;
use crate::decision::{self, Reason};
use crate::identity::Caller;
use crate::path::BackendReading;
use crate::reload::compile_once;
use crate::store::KeysLocation;

/// What replaying found.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Decisions decided again.
    pub replayed: u64,
    /// Decisions a policy cannot change (identity or request faults).
    pub skipped: u64,
    /// Lines that are not audit events.
    pub corrupt: u64,
    /// (route, principal, before, after) → count.
    pub changes: BTreeMap<(String, String, String, String), u64>,
}

/// Runs the command; `Ok(n)` is the number of changed decisions.
pub fn run(policy: &Path, keys: Option<&str>, audit: &Path) -> Result<u64, CommandError> {
    let keys = match keys {
        Some(k) => super::keys_location(k)?,
        None => KeysLocation::File(super::explain::empty_keys()?),
    };
    let (snapshot, _) = super::block_on(compile_once(policy, &keys, &Default::default()))?
        .map_err(|(_, p)| CommandError::Usage(p.to_string()))?;
    let file = std::fs::File::open(audit)
        .map_err(|e| CommandError::Usage(format!("{}: {e}", audit.display())))?;
    let reading = BackendReading::default();
    let mut found = Replayed::default();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| CommandError::Usage(format!("{}: {e}", audit.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!(
                    "{}:{}: not an audit event ({e}); skipped",
                    audit.display(),
                    n + 1
                );
                found.corrupt += 1;
                continue;
            }
        };
        if event["kind"] != "decision" {
            continue;
        }
        let (Some(method), Some(path), Some(reason)) = (
            event["method"].as_str(),
            event["path"].as_str(),
            event["reason"].as_str(),
        ) else {
            eprintln!(
                "{}:{}: a decision without method, path or reason; skipped",
                audit.display(),
                n + 1
            );
            found.corrupt += 1;
            continue;
        };
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            found.corrupt += 1;
            continue;
        };
        if !replayable(reason) {
            found.skipped += 1;
            continue;
        }
        let principal = event["principal"].as_str();
        let token;
        let identified: Result<Caller<'_>, Reason> = match (event["key_id"].as_str(), principal) {
            (Some(id), _) if snapshot.keys.by_id(id).is_some() => snapshot
                .keys
                .by_id(id)
                .map(Caller::Key)
                .ok_or(Reason::UnknownKey),
            (_, Some(p)) => {
                token = crate::oauth::caller_for(&snapshot.policy, p, &[], "replay", None);
                match &token {
                    Ok(t) => Ok(Caller::Token(t)),
                    Err(r) => Err(*r),
                }
            }
            (_, None) => Err(Reason::NoCredential),
        };
        let decided = decision::judge(&snapshot, &method, path, &reading, identified);
        found.replayed += 1;
        let before = format!(
            "{}({reason})",
            if event["decision"] == "allow" {
                "allow"
            } else {
                "deny"
            }
        );
        let after = format!(
            "{}({})",
            if decided.reason.allows() {
                "allow"
            } else {
                "deny"
            },
            decided.reason.as_str()
        );
        if before != after {
            let route = decided
                .route
                .map(|r| r.matcher.to_string())
                .or_else(|| event["route"].as_str().map(|r| format!("{method} {r}")))
                .unwrap_or_else(|| format!("{method} (no route)"));
            *found
                .changes
                .entry((route, principal.unwrap_or("-").to_string(), before, after))
                .or_default() += 1;
        }
    }
    print_report(&found);
    Ok(found.changes.values().sum())
}

/// Whether the policy decided this reason (and another policy could decide otherwise).
fn replayable(reason: &str) -> bool {
    matches!(
        reason,
        "granted" | "public" | "forbidden" | "no_route" | "ambiguous_path" | "no_credential"
    )
}

fn print_report(found: &Replayed) {
    let changed: u64 = found.changes.values().sum();
    if !found.changes.is_empty() {
        println!("changes (route, principal, before → after, count):");
        for ((route, principal, before, after), count) in &found.changes {
            println!("  {route}  {principal}  {before} → {after}  {count}");
        }
    }
    println!(
        "{} decisions replayed, {changed} would change; {} not decided by the policy (left as they were); {} corrupt lines skipped",
        found.replayed, found.skipped, found.corrupt
    );
}
