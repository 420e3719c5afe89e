//! Problems found while loading a file, each with the place an operator has to look at.
//!
//! Loading never stops at the first problem: `portcullis check` and reload errors report every
//! problem as `file:line:column: message`, the way compilers do.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub column: usize,
    /// What is wrong, in plain words.
    pub message: String,
}

impl Problem {
    /// A problem at a line and column.
    pub fn at(line: usize, column: usize, message: impl Into<String>) -> Self {
        Problem {
            line,
            column,
            message: message.into(),
        }
    }

    /// A problem at a `marked_yaml` span (falls back to 1:1 when it has no position).
    pub fn at_span(span: &marked_yaml::Span, message: impl Into<String>) -> Self {
        let (line, column) = span
            .start()
            .map(|m| (m.line(), m.column()))
            .unwrap_or((1, 1));
        Problem::at(line, column, message)
    }
}

/// Every problem found in one file, tied to its path for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblems {
    /// The file as the operator named it.
    pub path: PathBuf,
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl FileProblems {
    /// Ties problems to a file, sorting them by position.
    pub fn new(path: &Path, mut problems: Vec<Problem>) -> Self {
        problems.sort_by_key(|p| (p.line, p.column));
        FileProblems {
            path: path.to_path_buf(),
            problems,
        }
    }

    /// One problem for a whole file (unreadable, for instance).
    pub fn single(path: &Path, message: impl Into<String>) -> Self {
        FileProblems::new(path, vec![Problem::at(0, 0, message)])
    }
}

impl fmt::Display for FileProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if self.path.as_os_str().is_empty() {
                write!(f, "{}", p.message)?;
            } else if p.line == 0 {
                write!(f, "{}: {}", self.path.display(), p.message)?;
            } else {
                write!(
                    f,
                    "{}:{}:{}: {}",
                    self.path.display(),
                    p.line,
                    p.column,
                    p.message
                )?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for FileProblems {}

/// A hint for an operator when a watched file cannot be read.
pub fn read_hint(e: &std::io::Error) -> &'static str {
    const ELOOP: i32 = 40;
    match e.kind() {
        std::io::ErrorKind::NotFound => " (deleted? keeping the last good state)",
        _ if e.raw_os_error() == Some(ELOOP) => " (symlink loop)",
        _ => "",
    }
}

/// Turns a `marked_yaml` parse or shape error into a located problem.
pub fn from_marked_yaml(err: &marked_yaml::FromYamlError) -> Problem {
    use marked_yaml::LoadError;
    match err {
        marked_yaml::FromYamlError::ParseYaml(load) => {
            let marker = match load {
                LoadError::TopLevelMustBeMapping(m)
                | LoadError::TopLevelMustBeSequence(m)
                | LoadError::UnexpectedAnchor(m)
                | LoadError::MappingKeyMustBeScalar(m)
                | LoadError::UnexpectedTag(m)
                | LoadError::ScanError(m, _) => Some(*m),
                LoadError::DuplicateKey(inner) => inner.key.span().start().copied(),
            };
            let message = strip_marker_prefix(&load.to_string());
            match marker {
                Some(m) => Problem::at(m.line(), m.column(), message),
                None => Problem::at(1, 1, message),
            }
        }
        marked_yaml::FromYamlError::FromNode(node_err) => {
            let message = node_err.to_string();
            match node_err.start_mark() {
                Some(m) => Problem::at(m.line(), m.column(), message),
                None => Problem::at(1, 1, message),
            }
        }
    }
}

/// `marked_yaml` prefixes some messages with `source:line:column: `; we print our own.
fn strip_marker_prefix(message: &str) -> String {
    // `line:column: ` or `source:line:column: `: drop the leading all-digit parts.
    let mut rest = message;
    let mut stripped = 0;
    while let Some((head, tail)) = rest.split_once(':') {
        if head.is_empty() || !head.trim().chars().all(|c| c.is_ascii_digit()) || stripped == 3 {
            break;
        }
        rest = tail;
        stripped += 1;
    }
    if stripped >= 2 {
        rest.trim().to_string()
    } else {
        message.to_string()
    }
}

/// Turns a `serde_yaml` error into a located problem.
pub fn from_serde_yaml(err: &serde_yaml::Error) -> Problem {
    let message = err.to_string();
    let message = match message.split_once(" at line ") {
        Some((head, _)) => head.to_string(),
        None => message,
    };
    match err.location() {
        Some(loc) => Problem::at(loc.line(), loc.column(), message),
        None => Problem::at(1, 1, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_prefixes_are_dropped() {
        assert_eq!(strip_marker_prefix("43:26: oops: here"), "oops: here");
        assert_eq!(strip_marker_prefix("0:43:26: oops"), "oops");
        assert_eq!(strip_marker_prefix("plain: message"), "plain: message");
    }
}
