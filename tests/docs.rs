//! `docs/` is the repository's reference; these tests keep it in step with the code where a
//! machine can tell: every metric name registered in `src/`, every audit field, every field of
//! `portcullis.yaml` (and of its blocks, the policy and the keys file), every command and flag
//! is documented, no documented metric is gone from the code, and the reference never points
//! outside the repository.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// String literals shaped like metric names that are not metrics.
const NOT_METRICS: &[(&str, &str)] = &[(
    "portcullis_keys",
    "the PostgreSQL NOTIFY channel (src/store/postgres.rs)",
)];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
}

/// Every string literal of the form `"portcullis_[a-z_]+"` in `text`.
fn metric_literals(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("\"portcullis_") {
        let start = from + found + 1;
        let mut end = start + "portcullis_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if bytes.get(end) == Some(&b'"') && end > start + "portcullis_".len() {
            out.push(text[start..end].to_string());
        }
        from = end;
    }
    out
}

/// Whether `name` occurs in `text` as a whole word (not as the start of a longer name).
fn contains_word(text: &str, name: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices(name).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + name.len()).copied();
        !before.is_some_and(is_name_byte) && !after.is_some_and(is_name_byte)
    })
}

/// Every word shaped like a metric name in `text` (`portcullis_` followed by name characters).
fn metric_words(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("portcullis_") {
        if at > 0 && is_name_byte(bytes[at - 1]) {
            continue;
        }
        let mut end = at + "portcullis_".len();
        while end < bytes.len() && is_name_byte(bytes[end]) {
            end += 1;
        }
        if end > at + "portcullis_".len() {
            out.insert(text[at..end].to_string());
        }
    }
    out
}

/// The text inside backticks in a Markdown document, each span as written and, for dotted spans
/// (`audit.syslog.url`), also its last component.
fn backticked(markdown: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, span) in markdown.split('`').enumerate() {
        if i % 2 == 1 && !span.contains('\n') {
            out.insert(span.to_string());
            if let Some((_, last)) = span.rsplit_once('.') {
                out.insert(last.to_string());
            }
        }
    }
    out
}

/// The serde field names of `struct NAME { ... }` in `source` (a `rename` is honoured).
fn struct_fields(source: &str, name: &str) -> Vec<String> {
    let opening = format!("struct {name} {{");
    let start = source
        .find(&opening)
        .unwrap_or_else(|| panic!("struct {name} not found"))
        + opening.len();
    let body = &source[start..];
    let body = &body[..body.find("\n}").expect("end of struct")];
    let mut fields = Vec::new();
    let mut rename: Option<String> = None;
    for line in body.lines().map(str::trim) {
        if line.starts_with("//") || line.is_empty() {
            continue;
        }
        if line.starts_with("#[") {
            if let Some(at) = line.find("rename = \"") {
                let rest = &line[at + "rename = \"".len()..];
                rename = rest.split('"').next().map(str::to_string);
            }
            continue;
        }
        let line = line.strip_prefix("pub ").unwrap_or(line);
        if let Some((field, _)) = line.split_once(':') {
            if field.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                fields.push(rename.take().unwrap_or_else(|| field.to_string()));
            }
        }
        rename = None;
    }
    assert!(!fields.is_empty(), "no fields found in struct {name}");
    fields
}

#[test]
fn every_metric_in_the_code_is_documented() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut names = BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        names.extend(metric_literals(&text));
    }
    for (name, _why) in NOT_METRICS {
        names.remove(*name);
    }
    assert!(
        names.contains("portcullis_requests_total") && names.len() > 20,
        "the scan found too few metric names: {names:?}"
    );
    let docs = read("docs/metrics.md");
    let missing: Vec<&String> = names.iter().filter(|n| !contains_word(&docs, n)).collect();
    assert!(
        missing.is_empty(),
        "metrics registered in src/ but missing from docs/metrics.md: {missing:?}"
    );
    let gone: Vec<String> = metric_words(&docs)
        .into_iter()
        .filter(|w| !names.contains(w))
        .collect();
    assert!(
        gone.is_empty(),
        "docs/metrics.md names metrics no longer in src/: {gone:?}"
    );
}

#[test]
fn every_audit_field_is_documented() {
    let documented = backticked(&read("docs/audit.md"));
    let missing: Vec<&&str> = portcullis::audit::FIELD_NAMES
        .iter()
        .filter(|f| !documented.contains(**f))
        .collect();
    assert!(
        missing.is_empty(),
        "audit fields missing from docs/audit.md: {missing:?}"
    );
}

/// `(source file, struct, document)`: every serde field of the struct must appear in backticks
/// in the document.
const FILE_FORMATS: &[(&str, &str, &str)] = &[
    ("src/config.rs", "ConfigFile", "docs/configuration.md"),
    ("src/config.rs", "KeyStoreFile", "docs/configuration.md"),
    ("src/config.rs", "BackendFile", "docs/configuration.md"),
    ("src/config.rs", "ConnectionsFile", "docs/configuration.md"),
    ("src/config.rs", "KeyApiConfig", "docs/configuration.md"),
    (
        "src/config.rs",
        "UpstreamTlsConfig",
        "docs/configuration.md",
    ),
    ("src/config.rs", "MetricsConfig", "docs/configuration.md"),
    ("src/config.rs", "LogConfig", "docs/configuration.md"),
    ("src/tls.rs", "TlsConfig", "docs/configuration.md"),
    ("src/audit/mod.rs", "AuditConfig", "docs/configuration.md"),
    ("src/audit/mod.rs", "SyslogConfig", "docs/configuration.md"),
    ("src/oauth/config.rs", "OAuthFile", "docs/configuration.md"),
    ("src/oauth/config.rs", "IssuerFile", "docs/configuration.md"),
    ("src/policy/model.rs", "PolicyFile", "docs/policy.md"),
    ("src/policy/model.rs", "LimitsSpec", "docs/policy.md"),
    ("src/policy/model.rs", "RouteSpec", "docs/policy.md"),
    ("src/policy/model.rs", "FilterSpec", "docs/policy.md"),
    ("src/policy/model.rs", "PrincipalSpec", "docs/policy.md"),
    ("src/keys/entry.rs", "KeysFile", "docs/keys-file.md"),
    ("src/keys/entry.rs", "KeyEntry", "docs/keys-file.md"),
];

#[test]
fn every_file_field_is_documented() {
    let mut missing = Vec::new();
    for (source, name, doc) in FILE_FORMATS {
        let documented = backticked(&read(doc));
        for field in struct_fields(&read(source), name) {
            if !documented.contains(&field) {
                missing.push(format!("{name}.{field} ({source}) in {doc}"));
            }
        }
    }
    assert!(missing.is_empty(), "fields not documented: {missing:#?}");
}

#[test]
fn top_level_config_fields_have_a_row() {
    // The top-level table lists each field as "| `name` |".
    let docs = read("docs/configuration.md");
    let missing: Vec<String> = struct_fields(&read("src/config.rs"), "ConfigFile")
        .into_iter()
        .filter(|f| !docs.contains(&format!("| `{f}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "top-level fields without a row in docs/configuration.md: {missing:?}"
    );
}

/// Whether `flag` (`--keys`) occurs in `text` not as the start of a longer flag.
fn contains_flag(text: &str, flag: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices(flag).any(|(at, _)| {
        !bytes
            .get(at + flag.len())
            .is_some_and(|b| b.is_ascii_lowercase() || *b == b'-')
    })
}

fn undocumented_flags(command: &clap::Command, path: &str, docs: &str, out: &mut Vec<String>) {
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" || long == "version" {
            continue;
        }
        if !contains_flag(docs, &format!("--{long}")) {
            out.push(format!("{path} --{long}"));
        }
    }
    for sub in command.get_subcommands() {
        let name = sub.get_name();
        if name == "help" {
            continue;
        }
        if !docs.contains(&format!("`{name}`")) {
            out.push(format!("{path} {name}"));
        }
        undocumented_flags(sub, &format!("{path} {name}"), docs, out);
    }
}

#[test]
fn every_command_and_flag_is_documented() {
    use clap::CommandFactory;
    let docs = read("docs/cli.md");
    let mut missing = Vec::new();
    undocumented_flags(
        &portcullis::cli::Cli::command(),
        "portcullis",
        &docs,
        &mut missing,
    );
    assert!(
        missing.is_empty(),
        "commands or flags missing from docs/cli.md: {missing:?}"
    );
}

#[test]
fn the_reference_stays_inside_the_repository() {
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    assert!(pages.len() >= 8, "docs/ has only {pages:?}");
    pages.push(root().join("README.md"));
    pages.push(root().join("deploy/README.md"));
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        assert!(
            !text.contains("../shared/") && !text.contains("SPEC.md"),
            "{} points outside the repository",
            page.display()
        );
        // Every relative link resolves inside the repository.
        for link in text.split("](").skip(1) {
            let target = link.split(')').next().unwrap_or("");
            let file = target.split('#').next().unwrap_or("");
            if file.is_empty() || file.contains("://") {
                continue;
            }
            let resolved = page.parent().unwrap().join(file);
            assert!(
                resolved.exists(),
                "{}: link to {target} does not resolve",
                page.display()
            );
            let inside = resolved
                .canonicalize()
                .unwrap()
                .starts_with(root().canonicalize().unwrap());
            assert!(
                inside,
                "{}: {target} is outside the repository",
                page.display()
            );
        }
    }
}

#[test]
fn the_scanners_work() {
    assert_eq!(
        metric_literals(r#"x("portcullis_a_total", "portcullis_b{x}", "portcullis_c")"#),
        vec!["portcullis_a_total", "portcullis_c"]
    );
    assert!(contains_word(
        "`portcullis_keys_loaded`",
        "portcullis_keys_loaded"
    ));
    assert!(!contains_word(
        "`portcullis_keys_loaded`",
        "portcullis_keys"
    ));
    let fields = struct_fields(
        "struct S {\n    /// doc\n    #[serde(rename = \"match\")]\n    pub matcher: String,\n    #[serde(default)]\n    other: Option<u8>,\n}\n",
        "S",
    );
    assert_eq!(fields, vec!["match", "other"]);
    assert!(backticked("a `audit.syslog.url` b").contains("url"));
    assert!(contains_flag("`--keys K`", "--keys"));
    assert!(!contains_flag("`--key-id ID`", "--key"));
}
