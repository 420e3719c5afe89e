//! `portcullis check`: load everything the way `run` would and print every problem.

use super::{resolve_files, CommandError, FileArgs};
use crate::diagnostic::FileProblems;
use crate::keys;
use crate::policy;

/// Runs the check; prints problems to stderr, a summary to stdout.
pub fn run(files: &FileArgs) -> Result<(), CommandError> {
    let resolved = resolve_files(files)?;
    let (policy_path, keys_path) = (resolved.policy, resolved.keys);
    let mut reports: Vec<FileProblems> = Vec::new();
    let policy_text = std::fs::read_to_string(&policy_path).map_err(|e| {
        CommandError::Usage(format!(
            "{}: cannot read policy file: {e}",
            policy_path.display()
        ))
    })?;
    let compiled = policy::compile(&policy_text);
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
    if let (Some(keys_path), Ok(policy)) = (&keys_path, &compiled) {
        match keys::compile_path(keys_path, policy, None, &Default::default()).map(|f| f.compiled) {
            Err(problems) => reports.push(FileProblems::new(keys_path, problems)),
            Ok(c) if !c.warnings.is_empty() => {
                reports.push(FileProblems::new(keys_path, c.warnings))
            }
            Ok(c) => summary.push_str(&format!(
                "\n{}: ok ({} keys)",
                keys_path.display(),
                c.store.len()
            )),
        }
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

/// Warnings shown as `file:line:column: warning: ...`; they do not fail the check.
pub fn warnings_of(
    path: &std::path::Path,
    warnings: &[crate::diagnostic::Problem],
) -> FileProblems {
    let marked = warnings
        .iter()
        .map(|w| {
            crate::diagnostic::Problem::at(w.line, w.column, format!("warning: {}", w.message))
        })
        .collect();
    FileProblems::new(path, marked)
}
