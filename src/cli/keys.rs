//! `portcullis keys ...`: create, list, activate, deactivate, revoke, rotate.
//!
//! Every change is one store edit (a keys file under its lock, or one PostgreSQL transaction),
//! so commands run at once, and proxies' key APIs, never lose each other's keys. `create` and `rotate` print only the new
//! key on stdout; everything else they say goes to stderr.

use std::path::Path;

use super::{expiry_from, format_time, CommandError, KeysArgs, KeysCommand};
use crate::audit::AuditEvent;
use crate::config::Config;
use crate::keys::entry;
use crate::keys::file::{self, KeyEntry};
use crate::keys::secret;
use crate::policy;
use crate::store::{Edit, Store};

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
                principal: Some(os_actor()),
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
            let store = Store::open(&super::keys_location(keys)?);
            let key = create(
                &store,
                principal,
                scopes,
                purpose.clone(),
                expires.as_deref(),
            )?;
            record("key_create", &key[4..12], principal);
            println!("{key}");
            Ok(())
        }
        KeysCommand::List { keys, admin, json } => {
            let store = Store::open(&super::keys_location(keys)?);
            list(&store, admin.as_deref(), *json)
        }
        KeysCommand::Import { keys, from } => import(keys, from),
        KeysCommand::Deactivate(t) | KeysCommand::Activate(t) | KeysCommand::Revoke(t) => {
            let store = Store::open(&super::keys_location(&t.keys)?);
            let (edit, action, done) = match &args.command {
                KeysCommand::Deactivate(_) => (
                    Edit::SetActive {
                        id: t.id.clone(),
                        active: false,
                    },
                    "key_deactivate",
                    "deactivated",
                ),
                KeysCommand::Activate(_) => (
                    Edit::SetActive {
                        id: t.id.clone(),
                        active: true,
                    },
                    "key_activate",
                    "activated",
                ),
                _ => (Edit::Revoke { id: t.id.clone() }, "key_revoke", "revoked"),
            };
            let applied = apply(&store, edit)?;
            let principal = applied.before.map(|e| e.principal).unwrap_or_default();
            record(action, &t.id, &principal);
            eprintln!("{done} {}", t.id);
            Ok(())
        }
        KeysCommand::Rotate { target, overlap } => {
            let store = Store::open(&super::keys_location(&target.keys)?);
            let (key, principal) = rotate(&store, &target.id, overlap.as_deref())?;
            record("key_rotate", &target.id, &principal);
            println!("{key}");
            Ok(())
        }
    }
}

/// Who made a CLI change, as the audit trail records it: the operating-system user and host.
fn os_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("os:{user}@{}", crate::audit::system_hostname())
}

fn apply(store: &Store, edit: Edit) -> Result<crate::store::Applied, CommandError> {
    super::block_on(store.apply(edit))?.map_err(|e| CommandError::Usage(e.to_string()))
}

/// Creates a key entry and returns the plaintext key.
pub fn create(
    store: &Store,
    principal: &str,
    scopes: &[String],
    purpose: Option<String>,
    expires: Option<&str>,
) -> Result<String, CommandError> {
    super::block_on(create_key(store, principal, scopes, purpose, expires))?
}

/// [`create`] for callers already on a runtime (the demo).
pub async fn create_key(
    store: &Store,
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
        &new.material(),
        principal,
        (!scopes.is_empty()).then(|| scopes.to_vec()),
        purpose,
        format_time(now).map_err(CommandError::Usage)?,
        expires,
    );
    store
        .apply(Edit::Create {
            entry,
            max_per_principal: None,
        })
        .await
        .map_err(|e| CommandError::Usage(e.to_string()))?;
    eprintln!(
        "created key {} for {principal}; it is shown once, store it now",
        new.id
    );
    Ok(new.secret)
}

/// Copies a keys file into a PostgreSQL store; ids already there are skipped.
fn import(keys: &str, from: &Path) -> Result<(), CommandError> {
    let crate::store::KeysLocation::Postgres(pg) = super::keys_location(keys)? else {
        return Err(CommandError::Usage(
            "keys import copies into a PostgreSQL store: give --keys postgres://...".into(),
        ));
    };
    let file = file::load(from).map_err(|p| CommandError::Usage(p.to_string()))?;
    for entry in &file.keys {
        entry.check().map_err(|e| {
            CommandError::Usage(format!("key {}: {e}", secret::shown_id(&entry.id)))
        })?;
    }
    let total = file.keys.len();
    let store = crate::store::PgStore::new(*pg);
    let added = super::block_on(store.import(file.keys))?
        .map_err(|e| CommandError::Usage(e.to_string()))?;
    eprintln!(
        "imported {added} of {total} keys into {} ({} already there)",
        store.describe(),
        total - added
    );
    Ok(())
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

/// Makes a successor with the same owner, scopes and purpose; the old key expires after `overlap`.
/// Returns the new key and the owning principal.
pub fn rotate(
    store: &Store,
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
    let applied = apply(
        store,
        Edit::Rotate {
            id: id.to_string(),
            new: new.material(),
            created,
            old_expiry,
        },
    )?;
    let principal = applied.after.map(|e| e.principal).unwrap_or_default();
    eprintln!(
        "rotated {id} → {}; the old key stops at the end of the overlap",
        new.id
    );
    Ok((new.secret, principal))
}

fn list(store: &Store, admin: Option<&str>, json: bool) -> Result<(), CommandError> {
    let listed =
        super::block_on(store.entries(None))?.map_err(|e| CommandError::Usage(e.to_string()))?;
    let usage = match admin {
        Some(url) => Some(fetch_usage(url).map_err(CommandError::Usage)?),
        None => None,
    };
    let time = |t: Option<i64>| {
        t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
            .and_then(|t| format_time(t).ok())
    };
    if json {
        for l in &listed {
            let k = &l.entry;
            let (calls, last) = match (&usage, l.calls) {
                (Some(u), _) => u
                    .get(&k.id)
                    .map(|(c, t)| (c.parse::<u64>().ok(), (t != "-").then(|| t.clone())))
                    .unwrap_or((None, None)),
                (None, Some(c)) => (Some(c), time(l.last_used)),
                (None, None) => (None, None),
            };
            let line = serde_json::json!({
                "id": k.id,
                "prefix": secret::masked(&k.prefix),
                "principal": k.principal,
                "scopes": k.scopes,
                "purpose": k.purpose,
                "active": k.active,
                "created": k.created,
                "expires": k.expires,
                "calls": calls,
                "last_used": last,
            });
            println!("{line}");
        }
        return Ok(());
    }
    let metered = usage.is_some() || store.keeps_usage();
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
    if metered {
        header.extend(["CALLS".to_string(), "LAST USED".to_string()]);
    }
    let rows: Vec<Vec<String>> = listed
        .iter()
        .map(|l| {
            let k = &l.entry;
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
            } else if metered {
                row.push(l.calls.unwrap_or(0).to_string());
                row.push(time(l.last_used).unwrap_or_else(|| "-".into()));
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
