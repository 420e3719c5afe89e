//! The example policies in `policies/examples/` run their scenarios through the real binary.
//!
//! Each example folder holds `policy.yaml`, `portcullis.yaml` and `scenario.txt`. The scenario's
//! `key NAME PRINCIPAL [SCOPE...]` lines become keys made by `portcullis keys create` in a temp
//! copy of the folder; then `portcullis check` must pass, `portcullis explain` must answer
//! `allow` or `deny` for every `allow|deny KEY METHOD PATH` line, and the running proxy must
//! agree: an allowed request reaches a backend (which echoes the principal it was told about),
//! a denied one gets the example's `deny_status` (401 or 403) and never reaches it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const PATIENCE: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct KeySpec {
    name: String,
    principal: String,
    scopes: Vec<String>,
}

struct Expectation {
    line: usize,
    allow: bool,
    key: String,
    method: String,
    path: String,
}

struct Scenario {
    keys: Vec<KeySpec>,
    expectations: Vec<Expectation>,
}

fn parse_scenario(text: &str) -> Scenario {
    let mut scenario = Scenario {
        keys: Vec::new(),
        expectations: Vec::new(),
    };
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["key", name, principal, scopes @ ..] => scenario.keys.push(KeySpec {
                name: name.to_string(),
                principal: principal.to_string(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
            }),
            [verdict @ ("allow" | "deny"), key, method, path] => {
                scenario.expectations.push(Expectation {
                    line: i + 1,
                    allow: *verdict == "allow",
                    key: key.to_string(),
                    method: method.to_string(),
                    path: path.to_string(),
                })
            }
            _ => panic!("scenario line {}: cannot read {raw:?}", i + 1),
        }
    }
    assert!(
        !scenario.expectations.is_empty(),
        "scenario has no requests"
    );
    scenario
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run portcullis")
}

fn succeed(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "portcullis {args:?} failed ({:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A key made by `keys create`: its public id and the plaintext.
struct MadeKey {
    id: String,
    secret: String,
    principal: String,
}

fn make_keys(dir: &Path, scenario: &Scenario) -> HashMap<String, MadeKey> {
    let keys = dir.join("keys.yaml");
    let policy = dir.join("policy.yaml");
    let mut made = HashMap::new();
    for spec in &scenario.keys {
        let mut args = vec![
            "keys",
            "create",
            "--keys",
            keys.to_str().unwrap(),
            "--principal",
            &spec.principal,
            "--policy",
            policy.to_str().unwrap(),
            "--purpose",
            &spec.name,
        ];
        for scope in &spec.scopes {
            args.extend(["--scope", scope.as_str()]);
        }
        let secret = succeed(&args).trim().to_string();
        assert!(secret.len() > 12, "unexpected key output {secret:?}");
        made.insert(
            spec.name.clone(),
            MadeKey {
                id: secret[4..12].to_string(),
                secret,
                principal: spec.principal.clone(),
            },
        );
    }
    made
}

/// Copies an example into a temp folder and makes its keys there.
fn prepare(example: &str) -> (tempfile::TempDir, Scenario, HashMap<String, MadeKey>) {
    let source = repo().join("policies/examples").join(example);
    let dir = tempfile::tempdir().unwrap();
    for file in ["policy.yaml", "portcullis.yaml"] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let scenario = parse_scenario(&std::fs::read_to_string(source.join("scenario.txt")).unwrap());
    let keys = make_keys(dir.path(), &scenario);
    (dir, scenario, keys)
}

fn check_passes(dir: &Path) {
    let config = dir.join("portcullis.yaml");
    succeed(&["check", "-c", config.to_str().unwrap()]);
    let (policy, keys) = (dir.join("policy.yaml"), dir.join("keys.yaml"));
    succeed(&[
        "check",
        "--policy",
        policy.to_str().unwrap(),
        "--keys",
        keys.to_str().unwrap(),
    ]);
}

fn explain_agrees(dir: &Path, scenario: &Scenario, keys: &HashMap<String, MadeKey>) {
    let (policy, keys_file) = (dir.join("policy.yaml"), dir.join("keys.yaml"));
    let mut wrong = Vec::new();
    for e in &scenario.expectations {
        let key = keys
            .get(&e.key)
            .unwrap_or_else(|| panic!("line {}: no key {:?}", e.line, e.key));
        let out = succeed(&[
            "explain",
            "--policy",
            policy.to_str().unwrap(),
            "--keys",
            keys_file.to_str().unwrap(),
            "--key-id",
            &key.id,
            &e.method,
            &e.path,
        ]);
        let verdict = out.split_whitespace().next().unwrap_or("");
        let expected = if e.allow { "allow" } else { "deny" };
        if verdict != expected {
            wrong.push(format!(
                "line {}: {expected} {} {} {} got:\n{out}",
                e.line, e.key, e.method, e.path
            ));
        }
    }
    assert!(wrong.is_empty(), "explain disagrees:\n{}", wrong.join("\n"));
}

/// A backend that answers 200 with the principal portcullis named in `X-Portcullis-Principal`.
fn spawn_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let head = read_head(&mut stream);
                let principal = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("x-portcullis-principal")
                            .then(|| value.trim().to_string())
                    })
                    .unwrap_or_default();
                let body = format!("principal={principal}");
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

fn read_head(stream: &mut TcpStream) -> String {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The proxy as a child process; killed when dropped.
struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(dir: &Path, backend: SocketAddr) -> Proxy {
    let example = std::fs::read_to_string(dir.join("portcullis.yaml")).unwrap();
    let mut config: String = example
        .lines()
        .filter(|l| {
            !["listen:", "upstream:", "admin:"]
                .iter()
                .any(|f| l.starts_with(f))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    config.push_str(&format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstream: http://{backend}\n"
    ));
    let path = dir.join("run.yaml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "-c", path.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening proxy http://") {
                let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
            }
        }
    });
    let addr = rx
        .recv_timeout(PATIENCE)
        .expect("the proxy did not report its address");
    Proxy { child, addr }
}

/// Sends one request with the key as a Bearer token; returns the status and the body.
fn request(proxy: SocketAddr, key: &str, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: api.example\r\nauthorization: Bearer {key}\r\n\
         content-length: 0\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

fn deny_status(dir: &Path) -> u16 {
    let config = std::fs::read_to_string(dir.join("portcullis.yaml")).unwrap();
    if config.lines().any(|l| l.starts_with("deny_status: 401")) {
        401
    } else {
        403
    }
}

fn proxy_agrees(dir: &Path, scenario: &Scenario, keys: &HashMap<String, MadeKey>) {
    let proxy = start_proxy(dir, spawn_backend());
    let denied = deny_status(dir);
    let mut wrong = Vec::new();
    for e in &scenario.expectations {
        let key = &keys[&e.key];
        let (status, answer) = request(proxy.addr, &key.secret, &e.method, &e.path);
        let ok = if e.allow {
            status == 200 && answer.ends_with(&format!("principal={}", key.principal))
        } else {
            status == denied && !answer.contains("principal=")
        };
        if !ok {
            wrong.push(format!(
                "line {}: {} {} {} {} got {status}:\n{answer}",
                e.line,
                if e.allow { "allow" } else { "deny" },
                e.key,
                e.method,
                e.path
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "the proxy disagrees:\n{}",
        wrong.join("\n")
    );
}

fn run_example(name: &str) {
    let (dir, scenario, keys) = prepare(name);
    check_passes(dir.path());
    explain_agrees(dir.path(), &scenario, &keys);
    proxy_agrees(dir.path(), &scenario, &keys);
}

#[test]
fn lab_data_platform() {
    run_example("lab-data-platform");
}

#[test]
fn portfolio_metrics() {
    run_example("portfolio-metrics");
}

#[test]
fn data_platform_denies_with_401() {
    assert_eq!(
        deny_status(&repo().join("policies/examples/data-platform")),
        401
    );
    run_example("data-platform");
}

#[test]
fn endpoint_keys() {
    run_example("endpoint-keys");
}

#[test]
fn every_example_folder_has_a_test_and_a_readme_section() {
    let readme = std::fs::read_to_string(repo().join("policies/examples/README.md")).unwrap();
    let tested = [
        "lab-data-platform",
        "portfolio-metrics",
        "data-platform",
        "endpoint-keys",
    ];
    for entry in std::fs::read_dir(repo().join("policies/examples")).unwrap() {
        let entry = entry.unwrap();
        if !entry.file_type().unwrap().is_dir() {
            continue;
        }
        let name = entry.file_name().into_string().unwrap();
        assert!(tested.contains(&name.as_str()), "{name} has no test here");
        assert!(
            readme.contains(&format!("({name}/)")),
            "README.md does not link {name}/"
        );
    }
}

/// The policy and keys the Kubernetes example mounts are valid as committed.
#[test]
fn kubernetes_example_policy_and_keys_pass_check() {
    let example = repo().join("deploy/kubernetes/example");
    let (policy, keys) = (example.join("policy.yaml"), example.join("keys.yaml"));
    succeed(&[
        "check",
        "--policy",
        policy.to_str().unwrap(),
        "--keys",
        keys.to_str().unwrap(),
    ]);
}

/// Every shipped example checks clean as committed (`check -c policies/examples/X/portcullis.yaml`),
/// with the empty keys file it ships.
#[test]
fn every_shipped_example_config_checks_clean_as_committed() {
    let examples = repo().join("policies/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let config = entry.unwrap().path().join("portcullis.yaml");
        if config.is_file() {
            succeed(&["check", "-c", config.to_str().unwrap()]);
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} example configs found");
}
