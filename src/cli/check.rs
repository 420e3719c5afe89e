//! `portcullis check`: load everything the way `run` would, before it binds a port, and print
//! every problem. With a config: its TLS files, audit spool and file, key cache and key store
//! too, so a config that `check` passes is one `run` starts with.

use std::path::Path;

use super::{block_on, resolve_files, CommandError, FileArgs};
use crate::config::Config;
use crate::diagnostic::{FileProblems, Problem};
use crate::reload::{compile_once, ReloadFile};
use crate::store::KeysLocation;

/// Runs the check; prints problems to stderr, a summary to stdout.
pub fn run(files: &FileArgs) -> Result<(), CommandError> {
    let resolved = resolve_files(files)?;
    let mut reports: Vec<FileProblems> = Vec::new();
    if let Some(config) = &resolved.config {
        reports.extend(runtime_problems(config));
    }
    let policy_path = resolved.policy;
    let policy_text = std::fs::read_to_string(&policy_path).map_err(|e| {
        CommandError::Usage(format!(
            "{}: cannot read policy file: {e}",
            policy_path.display()
        ))
    })?;
    let compiled = crate::policy::compile(&policy_text);
    let mut summary = String::new();
    match &compiled {
        Ok(p) => {
            if !p.warnings().is_empty() {
                eprintln!("{}", warnings_of(&policy_path, p.warnings()));
            }
            summary.push_str(&format!(
                "{}: ok ({} routes, {} principals)",
                policy_path.display(),
                p.routes().len(),
                p.principals().count()
            ))
        }
        Err(problems) => reports.push(FileProblems::new(&policy_path, problems.clone())),
    }
    if let (Some(keys), Ok(_)) = (&resolved.keys, &compiled) {
        check_keys(&policy_path, keys, &mut reports, &mut summary)?;
    }
    if reports.is_empty() {
        println!("{summary}");
        return Ok(());
    }
    let count = reports.iter().map(|r| r.problems.len()).sum();
    for report in &reports {
        eprintln!("{report}");
    }
    Err(CommandError::Problems(count))
}

/// The keys: unreadable (or an unreachable store) is a usage error (64); problems are reported.
fn check_keys(
    policy_path: &Path,
    keys: &KeysLocation,
    reports: &mut Vec<FileProblems>,
    summary: &mut String,
) -> Result<(), CommandError> {
    if let KeysLocation::File(path) = keys {
        if let Err(e) = std::fs::metadata(path) {
            return Err(CommandError::Usage(crate::keys::missing_keys_message(
                path, &e,
            )));
        }
    }
    match block_on(compile_once(policy_path, keys, &Default::default()))? {
        Ok((snapshot, warnings)) if warnings.is_empty() => summary.push_str(&format!(
            "\n{}: ok ({} keys)",
            keys.describe(),
            snapshot.keys.len()
        )),
        Ok((_, warnings)) => reports.extend(warnings.into_iter().filter(|w| w.path != policy_path)),
        Err((ReloadFile::Keys, problems)) if matches!(keys, KeysLocation::Postgres(_)) => {
            return Err(CommandError::Usage(problems.to_string()))
        }
        Err((_, problems)) => reports.push(problems),
    }
    Ok(())
}

/// What `run` would refuse before serving: TLS files that do not load, an audit spool or file
/// that cannot be written, a key cache that cannot be created.
fn runtime_problems(config: &Config) -> Vec<FileProblems> {
    let mut out = Vec::new();
    let mut fail = |path: &Path, message: String| {
        out.push(FileProblems::new(path, vec![Problem::at(0, 0, message)]))
    };
    if let Some(tls) = &config.tls {
        if let Err(message) = crate::tls::load_certified_key(&tls.cert, &tls.key) {
            fail(&tls.cert, format!("tls: {message}"));
        }
        if let Some(ca) = &tls.client_ca {
            if let Err(message) = crate::tls::root_store(ca) {
                fail(ca, format!("tls.client_ca: {message}"));
            }
        }
    }
    if let Some(ca) = &config.upstream_tls.ca {
        if let Err(message) = crate::tls::root_store(ca) {
            fail(ca, format!("upstream_tls.ca: {message}"));
        }
    }
    if let Some(audit) = &config.audit {
        for (what, path) in audit.writable_paths() {
            if let Err(e) = writable_folder(&path) {
                fail(&path, format!("{what}: cannot be written: {e}"));
            }
        }
    }
    if let Some(cache) = &config.key_cache {
        if let Err(e) = writable_folder(cache) {
            fail(cache, format!("key_cache: cannot be written: {e}"));
        }
    }
    out
}

/// Whether a folder exists (or can be made) and takes a new file.
fn writable_folder(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    tempfile::tempfile_in(dir).map(|_| ())
}

/// Warnings shown as `file:line:column: warning: ...`; they do not fail the check.
pub fn warnings_of(path: &Path, warnings: &[Problem]) -> FileProblems {
    let marked = warnings
        .iter()
        .map(|w| Problem::at(w.line, w.column, format!("warning: {}", w.message)))
        .collect();
    FileProblems::new(path, marked)
}
