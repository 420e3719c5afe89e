//! The command line through the real binary: `check` diagnostics, exit codes for bad
//! config, `keys create|list|deactivate|activate|revoke|rotate`, `explain`, `demo`, and a
//! running proxy picking up key changes and stopping cleanly on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// What one finished command printed.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(self, what: &str) -> Self {
        assert_eq!(
            self.code,
            Some(0),
            "{what} failed:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs the binary to completion (killed after [`PATIENCE`]) with a backtrace requested, so
/// a panic would be loud.
fn cli(args: &[&str]) -> Ran {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portcullis");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("portcullis {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// `(line, column, message)` for each stderr line of the form `...FILE:LINE:COLUMN: message`.
fn problems(stderr: &str, file: &str) -> Vec<(usize, usize, String)> {
    let needle = format!("{file}:");
    stderr
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(&needle)? + needle.len()..];
            let mut parts = rest.splitn(3, ':');
            let line = parts.next()?.parse().ok()?;
            let col = parts.next()?.parse().ok()?;
            Some((line, col, parts.next()?.trim().to_string()))
        })
        .collect()
}

/// 1-based number of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).expect(needle) + 1
}

fn entries(path: &Path) -> Vec<serde_yaml::Value> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["keys"].as_sequence().cloned().unwrap_or_default()
}

fn entry(path: &Path, id: &str) -> Option<serde_yaml::Value> {
    entries(path)
        .into_iter()
        .find(|e| e["id"].as_str() == Some(id))
}

fn is_active(entry: &serde_yaml::Value) -> bool {
    entry["active"].as_bool().unwrap_or(true)
}

/// Asserts `text` is exactly one line holding a well-formed key; returns it.
fn only_a_key(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected only the key on stdout, got {text:?}"
    );
    let key = lines[0].trim().to_string();
    assert!(
        key.starts_with("pcs_") && key.len() == 44,
        "not a key: {key:?}"
    );
    assert!(
        key[4..].chars().all(|c| c.is_ascii_alphanumeric()),
        "not a key: {key:?}"
    );
    key
}

/// A workspace with the standard policy and a keys file holding `keys`.
fn workspace_with(keys: &[&TestKey]) -> Workspace {
    let ws = Workspace::new();
    ws.write("policy.yaml", POLICY);
    ws.write("keys.yaml", &keys_yaml(keys));
    ws
}

// --- check ---------------------------------------------------------------------------------

#[test]
fn check_without_arguments_reads_portcullis_yaml_here_or_exits_2() {
    let ws = workspace_with(&[&TestKey::new("alice")]);
    let run_in = |dir: &std::path::Path| {
        let out = Command::new(BIN)
            .arg("check")
            .current_dir(dir)
            .output()
            .expect("spawn portcullis");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // Nothing to check: a bad command line, exit 2, saying what to give.
    let (code, stderr) = run_in(&ws.path(""));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("-c CONFIG") && stderr.contains("--policy"),
        "{stderr}"
    );
    // With a portcullis.yaml in the working folder, that is what is checked (as `run` does).
    ws.write_config("http://127.0.0.1:9", "");
    let (code, stderr) = run_in(&ws.path(""));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn check_accepts_a_valid_policy_and_keys() {
    let ws = workspace_with(&[
        &TestKey::new("alice"),
        &TestKey::new("etl-bot").scopes(&["jobs:read"]),
    ]);
    let (policy, keys) = (ws.path("policy.yaml"), ws.path("keys.yaml"));
    cli(&["check", "--policy", &show(&policy)]).ok("check --policy");
    cli(&["check", "--policy", &show(&policy), "--keys", &show(&keys)]).ok("check --keys");
    let config = ws.write_config("http://127.0.0.1:9", "");
    cli(&["check", "-c", &show(&config)]).ok("check -c");
}

#[test]
fn check_reports_every_problem_with_file_line_and_column() {
    let policy = r#"version: 1
routes:
  - match: GET /v1/datasets
    resource: datasets
    access: read
roles:
  viewer: ["datasets:read", "widgets:read"]
principals:
  alice: { kind: user, roles: [ghost] }
  bob: { kind: user, roles: [viewer] }
"#;
    let ws = Workspace::new();
    let path = ws.write("policy.yaml", policy);
    let ran = cli(&["check", "--policy", &show(&path)]);
    assert_ne!(ran.code, Some(0), "check accepted a broken policy");
    let found = problems(&ran.stderr, "policy.yaml");
    for (needle, word) in [("widgets:read", "widgets"), ("roles: [ghost]", "ghost")] {
        let line = line_of(policy, needle);
        let hit = found.iter().find(|(l, _, _)| *l == line);
        let (_, col, msg) = hit.unwrap_or_else(|| {
            panic!(
                "no problem reported at line {line} ({word}); stderr:\n{}",
                ran.stderr
            )
        });
        assert!(*col >= 1, "column {col}");
        assert!(
            msg.contains(word),
            "message at line {line} does not name {word:?}: {msg}"
        );
    }
    assert!(
        ran.stderr.contains(&format!("{}:", path.display())),
        "problems do not name the file path:\n{}",
        ran.stderr
    );
}

#[test]
fn check_rejects_a_misspelt_field() {
    let policy = "version: 1\nroutes:\n  - match: GET /v1/datasets\n    resource: datasets\n    acess: read\nroles: {}\nprincipals: {}\n";
    let ws = Workspace::new();
    let path = ws.write("policy.yaml", policy);
    let ran = cli(&["check", "--policy", &show(&path)]);
    assert_ne!(ran.code, Some(0), "check accepted `acess:`");
    let found = problems(&ran.stderr, "policy.yaml");
    let hit = found.iter().find(|(_, _, m)| m.contains("acess"));
    let (line, _, _) = hit.unwrap_or_else(|| {
        panic!(
            "no FILE:LINE:COL problem naming `acess`; stderr:\n{}",
            ran.stderr
        )
    });
    assert!(
        (3..=5).contains(line),
        "`acess` reported at line {line}, it is on line 5"
    );
}

#[test]
fn check_reports_problems_in_the_keys_file() {
    let good = TestKey::new("alice");
    let keys = format!(
        "version: 1\nkeys:\n  - id: \"ghost001\"\n    prefix: \"pcs_ghost0\"\n    hash: \"{}\"\n    principal: \"nobody-here\"\n  - id: \"badhash1\"\n    prefix: \"pcs_badhas\"\n    hash: \"sha256:not-hex\"\n    principal: \"alice\"\n",
        good.hash()
    );
    let ws = Workspace::new();
    let policy = ws.write("policy.yaml", POLICY);
    let path = ws.write("keys.yaml", &keys);
    let ran = cli(&["check", "--policy", &show(&policy), "--keys", &show(&path)]);
    assert_ne!(
        ran.code,
        Some(0),
        "check accepted a key for an unknown principal and a bad hash"
    );
    let found = problems(&ran.stderr, "keys.yaml");
    assert!(
        found.iter().any(|(l, _, _)| (3..=6).contains(l)),
        "unknown principal not reported in lines 3-6:\n{}",
        ran.stderr
    );
    assert!(
        found.iter().any(|(l, _, _)| (7..=10).contains(l)),
        "bad hash not reported in lines 7-10:\n{}",
        ran.stderr
    );
}

// --- run with bad config -------------------------------------------------------------------

fn assert_plain_config_error(ran: &Ran, what: &str) {
    assert_eq!(
        ran.code,
        Some(64),
        "{what}: exit code; stderr:\n{}",
        ran.stderr
    );
    let lines: Vec<&str> = ran
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(!lines.is_empty(), "{what}: no message on stderr");
    assert!(
        lines.len() <= 3,
        "{what}: expected one plain message, got:\n{}",
        ran.stderr
    );
    for bad in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(
            !ran.stderr.contains(bad),
            "{what}: stderr contains {bad:?}:\n{}",
            ran.stderr
        );
    }
    assert!(!ran.stdout.contains("listening"), "{what}: started anyway");
}

#[test]
fn run_with_a_missing_config_exits_64() {
    let ws = Workspace::new();
    let missing = ws.path("nope.yaml");
    let ran = cli(&["run", "-c", &show(&missing)]);
    assert_plain_config_error(&ran, "missing config");
}

#[test]
fn run_with_malformed_yaml_exits_64() {
    let ws = workspace_with(&[]);
    let config = ws.write(
        "portcullis.yaml",
        "listen: [127.0.0.1:0\nupstream: {http://x\n",
    );
    let ran = cli(&["run", "-c", &show(&config)]);
    assert_plain_config_error(&ran, "malformed YAML");
}

#[test]
fn run_with_an_unknown_config_field_exits_64() {
    let ws = workspace_with(&[]);
    let config = ws.write_config("http://127.0.0.1:9", "listne: 127.0.0.1:0\n");
    let ran = cli(&["run", "-c", &show(&config)]);
    assert_plain_config_error(&ran, "unknown field");
    assert!(
        ran.stderr.contains("listne"),
        "message does not name the field:\n{}",
        ran.stderr
    );
}

// --- keys ----------------------------------------------------------------------------------

#[test]
fn keys_create_prints_only_the_key_and_keeps_other_entries_in_a_0600_file() {
    let existing = TestKey::new("victor");
    let ws = workspace_with(&[&existing]);
    let keys = ws.path("keys.yaml");
    let k = &show(&keys);
    let policy = show(&ws.path("policy.yaml"));
    let ran = cli(&[
        "keys",
        "create",
        "--keys",
        k,
        "--policy",
        &policy,
        "--principal",
        "alice",
        "--scope",
        "datasets:read",
        "--scope",
        "jobs:read",
        "--purpose",
        "analytics dashboard",
        "--expires",
        "1h",
    ])
    .ok("keys create");
    let key = only_a_key(&ran.stdout);
    let id = &key[4..12];
    let e = entry(&keys, id)
        .unwrap_or_else(|| panic!("no entry with id {id}:\n{}", ws.read("keys.yaml")));
    assert_eq!(e["prefix"].as_str(), Some(&key[..10]));
    assert_eq!(
        e["hash"].as_str().unwrap(),
        format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
    );
    assert_eq!(e["principal"].as_str(), Some("alice"));
    assert_eq!(e["purpose"].as_str(), Some("analytics dashboard"));
    let scopes: Vec<&str> = e["scopes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert_eq!(scopes, ["datasets:read", "jobs:read"]);
    assert!(!e["expires"].is_null(), "--expires 1h did not set expires");
    assert!(is_active(&e));

    let second = only_a_key(
        &cli(&["keys", "create", "--keys", k, "--principal", "etl-bot"])
            .ok("second create")
            .stdout,
    );
    assert_ne!(second, key);
    let ids: Vec<String> = entries(&keys)
        .iter()
        .filter_map(|e| e["id"].as_str().map(String::from))
        .collect();
    for want in [existing.id.as_str(), id, &second[4..12]] {
        assert!(
            ids.iter().any(|i| i == want),
            "entry {want} lost; ids {ids:?}"
        );
    }
    let text = ws.read("keys.yaml");
    assert!(
        !text.contains(&key) && !text.contains(&second),
        "plaintext key written to the keys file"
    );
    let mode = std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "keys file mode {mode:o}");
    cli(&[
        "check",
        "--policy",
        &show(&ws.path("policy.yaml")),
        "--keys",
        k,
    ])
    .ok("check after create");
}

#[test]
fn keys_create_accepts_an_rfc3339_expiry() {
    let ws = workspace_with(&[]);
    let keys = ws.path("keys.yaml");
    let ran = cli(&[
        "keys",
        "create",
        "--keys",
        &show(&keys),
        "--principal",
        "victor",
        "--expires",
        "2099-01-01T00:00:00Z",
    ])
    .ok("keys create --expires DATE");
    let key = only_a_key(&ran.stdout);
    let e = entry(&keys, &key[4..12]).unwrap();
    let expires = match &e["expires"] {
        serde_yaml::Value::String(s) => s.clone(),
        other => format!("{other:?}"),
    };
    assert!(expires.starts_with("2099-01-01"), "expires {expires:?}");
}

#[test]
fn keys_list_masks_prefixes_and_never_shows_secrets() {
    let (a, b) = (
        TestKey::new("alice").scopes(&["datasets:read"]),
        TestKey::new("etl-bot"),
    );
    let ws = workspace_with(&[&a, &b]);
    let keys = ws.path("keys.yaml");
    let created = only_a_key(
        &cli(&[
            "keys",
            "create",
            "--keys",
            &show(&keys),
            "--principal",
            "victor",
        ])
        .ok("create")
        .stdout,
    );
    let ran = cli(&["keys", "list", "--keys", &show(&keys)]).ok("keys list");
    for (id, prefix, principal) in [
        (&a.id, a.prefix(), "alice"),
        (&b.id, b.prefix(), "etl-bot"),
        (
            &created[4..12].to_string(),
            created[..10].to_string(),
            "victor",
        ),
    ] {
        assert!(
            ran.stdout.contains(&format!("{prefix}***")),
            "no masked prefix {prefix}*** in:\n{}",
            ran.stdout
        );
        assert!(
            ran.stdout.contains(id.as_str()),
            "id {id} missing:\n{}",
            ran.stdout
        );
        assert!(
            ran.stdout.contains(principal),
            "principal {principal} missing:\n{}",
            ran.stdout
        );
    }
    for secret in [
        a.key.as_str(),
        b.key.as_str(),
        created.as_str(),
        &a.hash()[7..],
        &b.hash()[7..],
        "sha256:",
    ] {
        assert!(
            !ran.stdout.contains(secret) && !ran.stderr.contains(secret),
            "keys list shows {secret:?}"
        );
    }
}

#[test]
fn keys_deactivate_activate_and_revoke_edit_the_file() {
    let (a, b) = (TestKey::new("alice"), TestKey::new("victor"));
    let ws = workspace_with(&[&a, &b]);
    let keys = ws.path("keys.yaml");
    let k = &show(&keys);
    let run = |verb: &str, id: &str| cli(&["keys", verb, "--keys", k, id]);
    run("deactivate", &a.id).ok("deactivate");
    assert!(
        !is_active(&entry(&keys, &a.id).unwrap()),
        "still active after deactivate"
    );
    assert!(
        is_active(&entry(&keys, &b.id).unwrap()),
        "deactivate touched another key"
    );
    run("activate", &a.id).ok("activate");
    assert!(
        is_active(&entry(&keys, &a.id).unwrap()),
        "inactive after activate"
    );
    run("revoke", &a.id).ok("revoke");
    assert!(
        entry(&keys, &a.id).is_none(),
        "entry still present after revoke"
    );
    assert!(entry(&keys, &b.id).is_some(), "revoke removed another key");
    assert_ne!(
        run("deactivate", "zzzzzzzz").code,
        Some(0),
        "deactivating an unknown id succeeded"
    );
}

#[test]
fn keys_rotate_prints_only_the_new_key_and_the_old_one_gets_an_expiry() {
    let old = TestKey::new("victor").scopes(&["datasets:read"]);
    let ws = workspace_with(&[&old]);
    let keys = ws.path("keys.yaml");
    let ran = cli(&[
        "keys",
        "rotate",
        "--keys",
        &show(&keys),
        &old.id,
        "--overlap",
        "1h",
    ])
    .ok("rotate");
    let new = only_a_key(&ran.stdout);
    assert_ne!(new, old.key);
    let e = entry(&keys, &new[4..12]).expect("entry for the rotated key");
    assert_eq!(e["principal"].as_str(), Some("victor"));
    assert_eq!(
        e["hash"].as_str().unwrap(),
        format!("sha256:{}", hex::encode(Sha256::digest(new.as_bytes())))
    );
    let kept = entry(&keys, &old.id).expect("old key removed despite --overlap");
    assert!(
        !kept["expires"].is_null(),
        "old key has no expiry after rotate"
    );
}

#[test]
fn explain_says_allow_or_deny_on_the_first_line_and_exits_0() {
    let (viewer, bot) = (TestKey::new("victor"), TestKey::new("etl-bot"));
    let ws = workspace_with(&[&viewer, &bot]);
    let (p, k) = (ws.path("policy.yaml"), ws.path("keys.yaml"));
    let explain = |id: &str, method: &str, path: &str| {
        cli(&[
            "explain",
            "--policy",
            &show(&p),
            "--keys",
            &show(&k),
            "--key-id",
            id,
            method,
            path,
        ])
    };
    for (key, method, path, want) in [
        (&viewer, "GET", "/v1/datasets/ds_1", "allow"),
        (&viewer, "PUT", "/v1/datasets/ds_1", "deny"),
        (&viewer, "GET", "/v1/no-such-route", "deny"),
        (&bot, "PUT", "/v1/datasets/ds_1", "allow"),
        (&bot, "PUT", "/v1/datasets/ds_2", "deny"),
    ] {
        let ran = explain(&key.id, method, path).ok(&format!("explain {method} {path}"));
        let first = ran.stdout.lines().next().unwrap_or("");
        assert!(
            first.starts_with(want),
            "{} {method} {path}: first line {first:?}, wanted {want}",
            key.principal
        );
        assert!(!ran.stdout.contains(&key.key) && !ran.stdout.contains(&key.hash()[7..]));
    }
}

// --- a running process ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_made_keys_work_and_key_changes_apply_without_a_restart() {
    let backend = RecordingBackend::start().await;
    let ws = workspace_with(&[]);
    ws.write_config(&backend.url(), "");
    let keys = ws.path("keys.yaml");
    let k = show(&keys);
    let key = only_a_key(
        &cli(&["keys", "create", "--keys", &k, "--principal", "victor"])
            .ok("create")
            .stdout,
    );
    let id = key[4..12].to_string();
    let proxy = Proxy::spawn(ws).await;
    let auth = format!("Bearer {key}");
    let status = || async {
        get(proxy.addr, "/v1/datasets/ds_1", &[("authorization", &auth)])
            .await
            .status
    };
    assert_eq!(status().await, 200);
    assert_eq!(
        backend.single().header("x-portcullis-key-id"),
        Some(id.as_str())
    );

    let edit = |verb: &str| cli(&["keys", verb, "--keys", &k, &id]).ok(verb);
    edit("deactivate");
    eventually(
        "deactivated key refused",
        Duration::from_secs(10),
        || async { status().await == 401 },
    )
    .await;
    edit("activate");
    eventually(
        "activated key accepted",
        Duration::from_secs(10),
        || async { status().await == 200 },
    )
    .await;
    edit("revoke");
    eventually("revoked key refused", Duration::from_secs(10), || async {
        status().await == 401
    })
    .await;
}

#[tokio::test]
async fn run_prints_its_addresses_serves_health_and_exits_0_on_sigterm() {
    let backend = RecordingBackend::start().await;
    let proxy = Proxy::start(&backend.url(), POLICY, &keys_yaml(&[]), "").await;
    assert_eq!(get(proxy.admin, "/healthz", &[]).await.status, 200);
    assert_eq!(get(proxy.admin, "/readyz", &[]).await.status, 200);
    assert_eq!(get(proxy.addr, "/status", &[]).await.status, 200);
    let status = proxy.terminate().await;
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_both_work_during_the_overlap() {
    let backend = RecordingBackend::start().await;
    let old = TestKey::new("victor");
    let ws = workspace_with(&[&old]);
    ws.write_config(&backend.url(), "");
    let keys = ws.path("keys.yaml");
    let new = only_a_key(
        &cli(&[
            "keys",
            "rotate",
            "--keys",
            &show(&keys),
            &old.id,
            "--overlap",
            "1h",
        ])
        .ok("rotate")
        .stdout,
    );
    let proxy = Proxy::spawn(ws).await;
    for key in [&old.key, &new] {
        let auth = format!("Bearer {key}");
        assert_eq!(
            get(proxy.addr, "/v1/datasets/ds_1", &[("authorization", &auth)])
                .await
                .status,
            200
        );
    }
    assert_eq!(backend.count(), 2);
}

// --- demo ----------------------------------------------------------------------------------

/// One request a demo `curl` line describes.
#[derive(Debug)]
struct CurlRequest {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: String,
}

/// Splits a shell command line: single and double quotes, backslash escapes.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut cur, mut in_word) = (Vec::new(), String::new(), false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                cur.extend(chars.by_ref().take_while(|&c| c != '\''));
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => cur.extend(chars.next()),
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.extend(chars.next());
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

fn parse_curl(line: &str) -> CurlRequest {
    let words = shell_words(line);
    let mut req = CurlRequest {
        method: String::new(),
        url: String::new(),
        headers: vec![],
        body: String::new(),
    };
    let mut it = words.into_iter().skip(1);
    while let Some(w) = it.next() {
        match w.as_str() {
            "-H" | "--header" => {
                let h = it.next().unwrap_or_default();
                let (n, v) = h
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad header {h:?} in {line:?}"));
                req.headers
                    .push((n.trim().to_string(), v.trim().to_string()));
            }
            "-X" | "--request" => req.method = it.next().unwrap_or_default(),
            "-u" | "--user" => {
                use base64::Engine;
                let creds =
                    base64::engine::general_purpose::STANDARD.encode(it.next().unwrap_or_default());
                req.headers
                    .push(("authorization".into(), format!("Basic {creds}")));
            }
            "-d" | "--data" | "--data-raw" | "--data-binary" | "--json" => {
                req.body = it.next().unwrap_or_default()
            }
            "-I" | "--head" => req.method = "HEAD".into(),
            "-o" | "--output" | "-w" | "--write-out" | "-m" | "--max-time"
            | "--connect-timeout" => {
                it.next();
            }
            u if u.starts_with("http://") || u.starts_with("https://") => req.url = u.to_string(),
            _ => {}
        }
    }
    if req.method.is_empty() {
        req.method = if req.body.is_empty() { "GET" } else { "POST" }.into();
    }
    assert!(!req.url.is_empty(), "no URL in {line:?}");
    req
}

#[tokio::test]
async fn demo_prints_curl_lines_that_show_an_allow_a_401_and_a_403_with_keys_and_a_token() {
    let mut child = tokio::process::Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn demo");
    let stderr = drain_to_string(child.stderr.take().unwrap());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut curls = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        // Once three curl lines are in, wait briefly for any more, then go.
        let wait = if curls.len() >= 3 {
            Duration::from_millis(700)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(wait, lines.next_line()).await {
            Ok(Ok(Some(line))) if line.trim_start().starts_with("curl ") => {
                curls.push(line.trim().to_string())
            }
            Ok(Ok(Some(_))) => {}
            _ => break,
        }
    }
    assert!(
        curls.len() >= 3,
        "demo printed {} curl lines; stderr:\n{}",
        curls.len(),
        stderr.lock().unwrap()
    );
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let mut statuses = Vec::new();
    let mut token_statuses = Vec::new();
    for line in &curls {
        let req = parse_curl(line);
        let uri: http::Uri = req.url.parse().unwrap();
        let authority = uri.authority().unwrap().as_str().to_string();
        let addr = tokio::net::lookup_host(&authority)
            .await
            .unwrap()
            .find(|a| a.is_ipv4())
            .unwrap();
        let headers: Vec<(&str, &str)> = req
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let r = send(addr, &req.method, path, &headers, &req.body).await;
        statuses.push(r.status);
        let oauth = req
            .headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("authorization") && v.starts_with("Bearer ey"));
        if oauth {
            token_statuses.push(r.status);
        }
    }
    // The OAuth lines: a token the demo signed itself, allowed once and refused once.
    assert!(
        token_statuses.iter().any(|s| (200..300).contains(s)) && token_statuses.contains(&403),
        "the demo's OAuth token lines should show an allow and a 403: {curls:#?} → {statuses:?}"
    );
    assert!(
        statuses.iter().any(|s| (200..300).contains(s)),
        "no allowed request among {curls:#?} → {statuses:?}"
    );
    assert!(
        statuses.contains(&401),
        "no 401 among {curls:#?} → {statuses:?}"
    );
    assert!(
        statuses.contains(&403),
        "no 403 among {curls:#?} → {statuses:?}"
    );
    child.kill().await.unwrap();
}

#[test]
fn keys_create_refuses_scopes_beyond_the_principal_and_past_expiries() {
    let ws = workspace_with(&[]);
    let keys = show(&ws.path("keys.yaml"));
    let policy = show(&ws.path("policy.yaml"));
    let create = |extra: &[&str]| {
        let mut args = vec!["keys", "create", "--keys", &keys, "--principal", "victor"];
        args.extend_from_slice(extra);
        cli(&args)
    };
    // victor is a viewer: a write scope would exceed him (the key API refuses the same).
    let ran = create(&["--policy", &policy, "--scope", "datasets:write"]);
    assert_eq!(ran.code, Some(64), "{}", ran.stderr);
    assert!(ran.stderr.contains("exceeds the grants"), "{}", ran.stderr);
    // Scopes that cannot be checked are refused rather than written unchecked.
    let ran = create(&["--scope", "datasets:read"]);
    assert_eq!(ran.code, Some(64), "{}", ran.stderr);
    for past in ["2020-01-01T00:00:00Z", "0s"] {
        let ran = create(&["--policy", &policy, "--expires", past]);
        assert_eq!(ran.code, Some(64), "{past}: {}", ran.stderr);
        assert!(ran.stderr.contains("not in the future"), "{}", ran.stderr);
    }
    let ran = create(&["--policy", &policy, "--purpose", "bad\u{7f}text"]);
    assert_eq!(ran.code, Some(64), "{}", ran.stderr);
    assert!(
        !ws.read("keys.yaml").contains("victor"),
        "nothing was written"
    );
    create(&["--policy", &policy, "--scope", "datasets:read"]).ok("a scope within victor");
}

#[test]
fn no_message_echoes_a_whole_key() {
    let victor = TestKey::new("victor");
    let ws = workspace_with(&[&victor]);
    let keys = show(&ws.path("keys.yaml"));
    let policy = show(&ws.path("policy.yaml"));
    let secret_part = &victor.key[12..];
    for args in [
        vec![
            "explain",
            "--policy",
            &policy,
            "--keys",
            &keys,
            "--key-id",
            &victor.key,
            "GET",
            "/v1/datasets",
        ],
        vec!["keys", "deactivate", "--keys", &keys, &victor.key],
        vec!["keys", "rotate", "--keys", &keys, &victor.key],
        vec!["keys", "revoke", "--keys", &keys, &victor.key],
    ] {
        let ran = cli(&args);
        assert_ne!(ran.code, Some(0), "{args:?}");
        let all = format!("{}{}", ran.stdout, ran.stderr);
        assert!(!all.contains(secret_part), "{args:?} echoed the key: {all}");
        assert!(all.contains("whole key"), "{args:?}: {all}");
    }
}
