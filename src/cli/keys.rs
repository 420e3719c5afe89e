//! `portcullis keys ...`: create, list, activate, deactivate, revoke, rotate.
//!
//! Every change goes through `keys::file::update` (lock, read, change, atomic replace), so two
//! commands run at once never lose each other's keys. `create` and `rotate` print only the new
//! key on stdout; everything else they say goes to stderr.

use std::path::Path;

use super::{expiry_from, format_time, CommandError, KeysArgs, KeysCommand};
use crate::audit::AuditEvent;
use crate::config::Config;
use crate::keys::entry;
use crate::keys::file::{self, KeyEntry};
use crate::keys::secret;
use crate::policy;

/// Runs a keys subcommand; with `-c`, every change is also an audit event.
pub fn run(args: &KeysArgs) -> Result<(), CommandError> {
    let config = match &args.config {
        None => None,
        Some(path) => Some(Config::load(path).map_err(|p| CommandError::Usage(p.to_string()))?),
    };
    let audit = config.as_ref().and_then(|c| c.audit.clone());
    let record = |action: &'static str, target_key_id: &str, target_principal: &str| {
        if let Some(audit) = &audit {
            let event = AuditEvent::KeyChange {
                action,
                key_id: None,
                principal: None,
                target_key_id: target_key_id.to_string(),
                target_principal: target_principal.to_string(),
                result: "ok".to_string(),
                via: "cli",
            };
            if let Err(e) = crate::audit::record_once(audit, event) {
                eprintln!("warning: the change is made but could not be audited: {e:#}");
            }
        }
    };
    match &args.command {
        KeysCommand::Create {
            keys,
            principal,
            scopes,
            purpose,
            expires,
            policy,
        } => {
            match policy.clone().or_else(|| config.as_ref().map(|c| c.policy.clone())) {
                Some(policy_path) => check_against_policy(&policy_path, principal, scopes)?,
                None if !scopes.is_empty() => {
                    return Err(CommandError::Usage(format!(
                        "give --policy (or -c) so the scopes can be checked against {principal:?}'s grants"
                    )))
                }
                None => eprintln!(
                    "warning: no --policy given: {principal:?} is not checked against a policy"
                ),
            }
            let key = create(keys, principal, scopes, purpose.clone(), expires.as_deref())?;
            record("key_create", &key[4..12], principal);
            println!("{key}");
            Ok(())
        }
        KeysCommand::List { keys, admin } => list(keys, admin.as_deref()),
        KeysCommand::Deactivate(t) => {
            let principal = set_active(&t.keys, &t.id, false)?;
            record("key_deactivate", &t.id, &principal);
            Ok(())
        }
        KeysCommand::Activate(t) => {
            let principal = set_active(&t.keys, &t.id, true)?;
            record("key_activate", &t.id, &principal);
            Ok(())
        }
        KeysCommand::Revoke(t) => {
            let (principal, _) = file::update(&t.keys, |f| {
                let index =
                    f.keys.iter().position(|k| k.id == t.id).ok_or_else(|| {
                        anyhow::anyhow!("no key with id {}", secret::shown_id(&t.id))
                    })?;
                Ok(f.keys.remove(index).principal)
            })?;
            record("key_revoke", &t.id, &principal);
            eprintln!("revoked {}", t.id);
            Ok(())
        }
        KeysCommand::Rotate { target, overlap } => {
            let (key, principal) = rotate(&target.keys, &target.id, overlap.as_deref())?;
            record("key_rotate", &target.id, &principal);
            println!("{key}");
            Ok(())
        }
    }
}

/// Creates a key entry and returns the plaintext key.
pub fn create(
    keys: &Path,
    principal: &str,
    scopes: &[String],
    purpose: Option<String>,
    expires: Option<&str>,
) -> Result<String, CommandError> {
    let now = time::OffsetDateTime::now_utc();
    let expires = expires
        .map(|e| future_expiry(e, now))
        .transpose()
        .map_err(CommandError::Usage)?;
    entry::check_name("principal", principal).map_err(|e| CommandError::Usage(e.to_string()))?;
    entry::check_scopes(scopes).map_err(|e| CommandError::Usage(e.to_string()))?;
    if let Some(p) = &purpose {
        entry::check_text("purpose", p, entry::MAX_PURPOSE_CHARS)
            .map_err(|e| CommandError::Usage(e.to_string()))?;
    }
    for scope in scopes {
        crate::policy::grant::GrantSpec::parse(scope)
            .map_err(|e| CommandError::Usage(e.to_string()))?;
    }
    let new = secret::generate();
    let entry = KeyEntry::for_new_key(
        &new,
        principal,
        (!scopes.is_empty()).then(|| scopes.to_vec()),
        purpose,
        format_time(now).map_err(CommandError::Usage)?,
        expires,
    );
    file::update(keys, |f| {
        anyhow::ensure!(
            !f.keys.iter().any(|k| k.id == entry.id),
            "key id collision; run again"
        );
        f.keys.push(entry);
        Ok(())
    })?;
    eprintln!(
        "created key {} for {principal}; it is shown once, store it now",
        new.id
    );
    Ok(new.secret)
}

/// An expiry that lies in the future: a key made already expired is a mistake, not a key.
pub fn future_expiry(text: &str, now: time::OffsetDateTime) -> Result<String, String> {
    let expires = expiry_from(text, now)?;
    let at = crate::keys::parse_time(&expires)?;
    if at <= now.unix_timestamp() {
        return Err(format!(
            "--expires {text:?} is not in the future: the key would never work"
        ));
    }
    Ok(expires)
}

/// The same no-escalation rule the key API applies to a target principal: the principal exists
/// and every scope lies within its grants. (The CLI runs with file access, so there is no
/// calling key to stay within.)
fn check_against_policy(
    policy_path: &Path,
    principal: &str,
    scopes: &[String],
) -> Result<(), CommandError> {
    let text = std::fs::read_to_string(policy_path)
        .map_err(|e| CommandError::Usage(format!("{}: {e}", policy_path.display())))?;
    let policy = policy::compile(&text).map_err(|p| {
        CommandError::Usage(crate::diagnostic::FileProblems::new(policy_path, p).to_string())
    })?;
    let Some(target) = policy.principal(principal) else {
        return Err(CommandError::Usage(format!(
            "principal {principal:?} is not in {}",
            policy_path.display()
        )));
    };
    for scope in scopes {
        let grant = policy.compile_grant(scope).map_err(CommandError::Usage)?;
        if !crate::policy::grant::set_within(std::slice::from_ref(&grant), &target.grants) {
            return Err(CommandError::Usage(format!(
                "scope {scope:?} exceeds the grants of principal {principal:?}: a key never does more than its principal"
            )));
        }
    }
    Ok(())
}

fn set_active(keys: &Path, id: &str, active: bool) -> Result<String, CommandError> {
    let (principal, _) = file::update(keys, |f| {
        let entry = f
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| anyhow::anyhow!("no key with id {}", secret::shown_id(id)))?;
        entry.active = active;
        Ok(entry.principal.clone())
    })?;
    eprintln!("{} {id}", if active { "activated" } else { "deactivated" });
    Ok(principal)
}

/// Makes a successor with the same owner, scopes and purpose; the old key expires after `overlap`.
/// Returns the new key and the owning principal.
pub fn rotate(
    keys: &Path,
    id: &str,
    overlap: Option<&str>,
) -> Result<(String, String), CommandError> {
    let overlap = super::parse_overlap(overlap).map_err(CommandError::Usage)?;
    let now = time::OffsetDateTime::now_utc();
    let old_expiry = super::later(now, overlap)
        .and_then(format_time)
        .map_err(CommandError::Usage)?;
    let created = format_time(now).map_err(CommandError::Usage)?;
    let new = secret::generate();
    let ((new_id, principal), _) = file::update(keys, |f| {
        let old = f
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| anyhow::anyhow!("no key with id {}", secret::shown_id(id)))?;
        let successor = old.rotate_to(&new, created, old_expiry);
        let principal = successor.principal.clone();
        f.keys.push(successor);
        Ok((new.id.clone(), principal))
    })?;
    eprintln!("rotated {id} → {new_id}; the old key stops at the end of the overlap");
    Ok((new.secret, principal))
}

fn list(keys: &Path, admin: Option<&str>) -> Result<(), CommandError> {
    let f = file::load(keys).map_err(|p| CommandError::Usage(p.to_string()))?;
    let usage = match admin {
        Some(url) => Some(fetch_usage(url).map_err(CommandError::Usage)?),
        None => None,
    };
    let mut header: Vec<String> = [
        "ID",
        "PREFIX",
        "PRINCIPAL",
        "SCOPES",
        "PURPOSE",
        "ACTIVE",
        "CREATED",
        "EXPIRES",
    ]
    .map(String::from)
    .to_vec();
    if usage.is_some() {
        header.extend(["CALLS".to_string(), "LAST USED".to_string()]);
    }
    let rows: Vec<Vec<String>> = f
        .keys
        .iter()
        .map(|k| {
            let mut row = vec![
                k.id.clone(),
                secret::masked(&k.prefix),
                k.principal.clone(),
                k.scopes.as_ref().map_or("-".into(), |s| s.join(",")),
                k.purpose.clone().unwrap_or_else(|| "-".into()),
                k.active.to_string(),
                k.created.clone().unwrap_or_else(|| "-".into()),
                k.expires.clone().unwrap_or_else(|| "-".into()),
            ];
            if let Some(usage) = &usage {
                let (calls, last) = usage
                    .get(&k.id)
                    .cloned()
                    .unwrap_or(("-".into(), "-".into()));
                row.push(calls);
                row.push(last);
            }
            row
        })
        .collect();
    print_table(&header, &rows);
    Ok(())
}

/// Reads `/keys` from a running proxy's admin listener: id → (calls, last used).
fn fetch_usage(url: &str) -> Result<std::collections::HashMap<String, (String, String)>, String> {
    use std::io::{Read, Write};
    let authority = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let fail = |e: &dyn std::fmt::Display| format!("cannot read key usage from {url}: {e}");
    let mut stream = std::net::TcpStream::connect(&authority).map_err(|e| fail(&e))?;
    let timeout = Some(std::time::Duration::from_secs(10));
    stream.set_read_timeout(timeout).map_err(|e| fail(&e))?;
    write!(
        stream,
        "GET /keys HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| fail(&e))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| fail(&e))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail(&"no HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(fail(&head.lines().next().unwrap_or("")));
    }
    let json: serde_json::Value = serde_json::from_str(body).map_err(|e| fail(&e))?;
    let mut out = std::collections::HashMap::new();
    for key in json["keys"].as_array().into_iter().flatten() {
        let id = key["id"].as_str().unwrap_or_default().to_string();
        let calls = key["calls"].as_u64().unwrap_or(0).to_string();
        let last = key["last_used"].as_str().unwrap_or("-").to_string();
        out.insert(id, (calls, last));
    }
    Ok(out)
}

fn print_table(header: &[String], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}
