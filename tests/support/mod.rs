//! Shared harness for the integration tests: a recording backend, keys made the way
//! `portcullis keys create` makes them, the real binary started on `127.0.0.1:0` in a
//! temp dir, a small HTTP client and a raw-bytes client for requests a library would
//! refuse to send. Every test builds its own `World`, so tests run in parallel.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// How long anything in a test may take before we call it hung.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The policy most tests run against. Every line of a route sits on its own line so
/// problems can be pointed at; resources: datasets, exports, jobs, admin.
pub const POLICY: &str = r#"version: 1
routes:
  - match: GET /status
    public: true
  - match: GET /slow
    public: true
  - match: GET|POST /v1/public/{*rest}
    public: true
  - match: GET /v1/datasets
    resource: datasets
    access: read
  - match: POST /v1/datasets
    resource: datasets
    access: write
  - match: GET /v1/datasets/export
    resource: exports
    access: read
  - match: GET /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: read
  - match: PUT|PATCH|DELETE /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: write
  - match: GET /v1/jobs
    resource: jobs
    access: read
  - match: POST /v1/jobs/{job}/cancel
    resource: jobs
    instance: job
    access: write
  - match: GET|POST /v1/admin/{*rest}
    resource: admin
    access: write
roles:
  viewer: ["*:read", "api_keys:read"]
  editor: ["*:read", "*:write", "api_keys:write"]
principals:
  alice: { kind: user, roles: [editor] }
  victor: { kind: user, roles: [viewer] }
  etl-bot: { kind: robot, grants: ["datasets/ds_1:write", "jobs:read"] }
  exporter: { kind: robot, grants: ["exports:read"] }
  ops: { kind: user, grants: ["admin:manage"] }
"#;

// ---------------------------------------------------------------------------
// Recording backend
// ---------------------------------------------------------------------------

/// One request as the backend saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// The request target exactly as received (origin-form unless the proxy sent otherwise).
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// The path part of the target.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// A header value as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A hyper HTTP/1.1 server that records every request and answers 200 with a small JSON
/// body. `?status=NNN` picks another status; `GET /slow` waits `slow_delay` first.
pub struct RecordingBackend {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl RecordingBackend {
    pub async fn start() -> Self {
        Self::with_slow_delay(Duration::from_secs(10)).await
    }

    pub async fn with_slow_delay(slow_delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let shared = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(req, log.clone(), slow_delay));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        RecordingBackend { addr, log, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    pub fn targets(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.target).collect()
    }

    /// The only request recorded so far; panics when there is not exactly one.
    pub fn single(&self) -> Recorded {
        let all = self.requests();
        assert_eq!(
            all.len(),
            1,
            "expected exactly one backend request, got {:?}",
            targets_of(&all)
        );
        all.into_iter().next().unwrap()
    }
}

fn targets_of(all: &[Recorded]) -> Vec<String> {
    all.iter()
        .map(|r| format!("{} {}", r.method, r.target))
        .collect()
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    log: Arc<Mutex<Vec<Recorded>>>,
    slow_delay: Duration,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let target = parts.uri.to_string();
    let path = parts.uri.path().to_string();
    log.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        target: target.clone(),
        headers: parts.headers,
        body,
    });
    if path == "/slow" {
        tokio::time::sleep(slow_delay).await;
    }
    let status = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("status="))
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    let body =
        serde_json::json!({ "backend": "ok", "method": parts.method.as_str(), "target": target });
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap())
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// A key made the way `portcullis keys create` makes one: `pcs_` + 8-char id + 32 alphanumerics.
#[derive(Clone, Debug)]
pub struct TestKey {
    pub id: String,
    pub key: String,
    pub principal: String,
    pub scopes: Option<Vec<String>>,
    pub active: bool,
    pub expires: Option<String>,
}

pub fn random_alnum(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

impl TestKey {
    pub fn new(principal: &str) -> Self {
        let id = random_alnum(8);
        let key = format!("pcs_{id}{}", random_alnum(32));
        TestKey {
            id,
            key,
            principal: principal.into(),
            scopes: None,
            active: true,
            expires: None,
        }
    }

    pub fn scopes(mut self, scopes: &[&str]) -> Self {
        self.scopes = Some(scopes.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn inactive(mut self) -> Self {
        self.active = false;
        self
    }

    pub fn expires(mut self, when: &str) -> Self {
        self.expires = Some(when.into());
        self
    }

    pub fn prefix(&self) -> String {
        self.key[..10].to_string()
    }

    pub fn hash(&self) -> String {
        format!(
            "sha256:{}",
            hex::encode(Sha256::digest(self.key.as_bytes()))
        )
    }

    /// `Authorization: Bearer KEY` as a header pair.
    pub fn bearer(&self) -> (&'static str, String) {
        ("authorization", format!("Bearer {}", self.key))
    }

    fn yaml_entry(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap();
        let mut out = format!(
            "  - id: {}\n    prefix: {}\n    hash: {}\n    principal: {}\n    active: {}\n    created: 2025-01-01T00:00:00Z\n",
            q(&self.id),
            q(&self.prefix()),
            q(&self.hash()),
            q(&self.principal),
            self.active
        );
        if let Some(scopes) = &self.scopes {
            let list: Vec<String> = scopes.iter().map(|s| q(s)).collect();
            out.push_str(&format!("    scopes: [{}]\n", list.join(", ")));
        }
        if let Some(expires) = &self.expires {
            out.push_str(&format!("    expires: {expires}\n"));
        }
        out
    }
}

/// A keys.yaml holding exactly these keys.
pub fn keys_yaml(keys: &[&TestKey]) -> String {
    let mut out = String::from("version: 1\nkeys:\n");
    if keys.is_empty() {
        return "version: 1\nkeys: []\n".into();
    }
    for key in keys {
        out.push_str(&key.yaml_entry());
    }
    out
}

// ---------------------------------------------------------------------------
// The proxy process
// ---------------------------------------------------------------------------

/// A temp dir holding the files one proxy (or one CLI call) works on.
pub struct Workspace {
    pub dir: TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        Workspace {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap()
    }

    /// Writes `portcullis.yaml` pointing at `policy.yaml` and `keys.yaml` in this folder.
    pub fn write_config(&self, upstream: &str, extra: &str) -> PathBuf {
        let config = format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstream: {upstream}\npolicy: policy.yaml\nkeys: keys.yaml\n{extra}"
        );
        self.write("portcullis.yaml", &config)
    }
}

impl Default for Workspace {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `portcullis run`; killed when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub workspace: Workspace,
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Proxy {
    /// Writes policy, keys and config into a fresh temp dir and starts the binary.
    pub async fn start(upstream: &str, policy: &str, keys: &str, extra: &str) -> Proxy {
        let ws = Workspace::new();
        ws.write("policy.yaml", policy);
        ws.write("keys.yaml", keys);
        ws.write_config(upstream, extra);
        Proxy::spawn(ws).await
    }

    /// Starts `portcullis run -c WS/portcullis.yaml` and waits for both `listening` lines
    /// and for `/readyz`.
    pub async fn spawn(workspace: Workspace) -> Proxy {
        let mut command = Command::new(BIN);
        command
            .arg("run")
            .arg("-c")
            .arg(workspace.path("portcullis.yaml"));
        Proxy::spawn_command(workspace, command).await
    }

    /// Like `spawn`, with the soft and hard open-file limit set to `nofile` (`ulimit -n`).
    pub async fn spawn_with_fd_limit(workspace: Workspace, nofile: u32) -> Proxy {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" run -c \"$1\""))
            .arg(BIN)
            .arg(workspace.path("portcullis.yaml"));
        Proxy::spawn_command(workspace, command).await
    }

    async fn spawn_command(workspace: Workspace, mut command: Command) -> Proxy {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn portcullis");
        let stderr = drain_to_string(child.stderr.take().unwrap());
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut proxy, mut admin) = (None, None);
        let deadline = Instant::now() + PATIENCE;
        while proxy.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match tokio::time::timeout(left, lines.next_line()).await {
                Ok(Ok(Some(line))) => line,
                outcome => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                    panic!(
                        "portcullis did not print both listening lines ({outcome:?}); stderr:\n{}",
                        stderr.lock().unwrap()
                    );
                }
            };
            let proxy_line = line
                .strip_prefix("listening proxy http://")
                .or_else(|| line.strip_prefix("listening proxy https://"));
            if let Some(rest) = proxy_line {
                proxy = Some(rest.trim().parse::<SocketAddr>().expect("proxy address"));
            } else if let Some(rest) = line.strip_prefix("listening admin http://") {
                admin = Some(rest.trim().parse::<SocketAddr>().expect("admin address"));
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let proxy = Proxy {
            addr: proxy.unwrap(),
            admin: admin.unwrap(),
            workspace,
            child,
            stderr,
        };
        let admin = proxy.admin;
        eventually("readyz answers 200", PATIENCE, || async move {
            try_send(admin, "GET", "/readyz", &[], "")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await;
        proxy
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("proxy still running")
    }

    /// What the process logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.pid();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid}");
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("exit after SIGTERM")
            .unwrap()
    }
}

/// Reads a child's pipe into a shared string in the background.
pub fn drain_to_string<R>(pipe: R) -> Arc<Mutex<String>>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    text
}

/// The usual fixture: a backend, a proxy running [`POLICY`] in front of it, and one key per
/// principal.
pub struct World {
    pub backend: RecordingBackend,
    pub proxy: Proxy,
    /// alice: editor (`*:read`, `*:write`).
    pub editor: TestKey,
    /// victor: viewer (`*:read`).
    pub viewer: TestKey,
    /// etl-bot (robot): `datasets/ds_1:write`, `jobs:read`.
    pub robot: TestKey,
    /// exporter (robot): `exports:read`.
    pub exporter: TestKey,
    /// ops: `admin:manage`.
    pub ops: TestKey,
}

impl World {
    pub async fn start() -> World {
        Self::start_with("", &[]).await
    }

    /// Starts with extra config lines and extra keys written next to the standard ones.
    pub async fn start_with(extra_config: &str, extra_keys: &[&TestKey]) -> World {
        let backend = RecordingBackend::with_slow_delay(Duration::from_secs(10)).await;
        let editor = TestKey::new("alice");
        let viewer = TestKey::new("victor");
        let robot = TestKey::new("etl-bot");
        let exporter = TestKey::new("exporter");
        let ops = TestKey::new("ops");
        let mut keys = vec![&editor, &viewer, &robot, &exporter, &ops];
        keys.extend_from_slice(extra_keys);
        let proxy = Proxy::start(&backend.url(), POLICY, &keys_yaml(&keys), extra_config).await;
        World {
            backend,
            proxy,
            editor,
            viewer,
            robot,
            exporter,
            ops,
        }
    }

    /// Sends a request with `Authorization: Bearer KEY` (or no credential).
    pub async fn call(&self, method: &str, path: &str, key: Option<&TestKey>) -> Resp {
        let auth = key.map(|k| format!("Bearer {}", k.key));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        send(self.proxy.addr, method, path, &headers, "").await
    }

    /// Sends exact bytes to the proxy.
    pub async fn raw(&self, bytes: &[u8]) -> RawReply {
        raw(self.proxy.addr, bytes).await
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A complete response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

/// GET with the given headers.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    send(addr, "GET", path, headers, "").await
}

/// One request through hyper's client; a fresh connection each time.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    try_send(addr, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`send`], but a connection failure or timeout is an `Err` instead of a panic.
pub async fn try_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Resp, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let fut = async {
        let res = client
            .request(req)
            .await
            .map_err(|e| format!("{method} {path}: {e:?}"))?;
        let (parts, body) = res.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{method} {path} body: {e:?}"))?
            .to_bytes();
        Ok(Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(PATIENCE, fut)
        .await
        .map_err(|_| format!("{method} {path} timed out"))?
}

/// One response parsed from raw bytes.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Everything that came back on one raw connection.
#[derive(Debug)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    pub responses: Vec<RawResponse>,
}

impl RawReply {
    /// Status of the first response; 0 when the connection closed without one.
    pub fn status(&self) -> u16 {
        self.responses.first().map_or(0, |r| r.status)
    }

    pub fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(|r| r.status).collect()
    }
}

/// Writes `bytes` on a new connection and reads until the server closes it or stays quiet
/// for a second. Write errors are ignored: the server may close early and still answer.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> RawReply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let payload = bytes.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&payload).await;
        let _ = wr.flush().await;
        // Keep the write half open: some servers treat a half-close as the end.
        tokio::time::sleep(PATIENCE).await;
        drop(wr);
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + PATIENCE;
    loop {
        let idle = if got.is_empty() {
            PATIENCE
        } else {
            Duration::from_millis(1000)
        };
        let left = deadline.saturating_duration_since(Instant::now()).min(idle);
        match tokio::time::timeout(left, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    writer.abort();
    let responses = parse_responses(&got);
    RawReply {
        bytes: got,
        responses,
    }
}

/// Splits a byte stream into HTTP/1.x responses (Content-Length, chunked, or to the end).
pub fn parse_responses(mut data: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while let Some(end) = find(data, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&data[..end]).into_owned();
        data = &data[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let Some(status) = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse::<u16>().ok())
        else {
            break;
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let find_header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let body = if let Some(len) =
            find_header("content-length").and_then(|v| v.parse::<usize>().ok())
        {
            let len = len.min(data.len());
            let body = data[..len].to_vec();
            data = &data[len..];
            body
        } else if find_header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            let (body, rest) = dechunk(data);
            data = rest;
            body
        } else if status < 200 || status == 204 || status == 304 {
            Vec::new()
        } else {
            let body = data.to_vec();
            data = &[];
            body
        };
        out.push(RawResponse {
            status,
            headers,
            body,
        });
    }
    out
}

fn dechunk(mut data: &[u8]) -> (Vec<u8>, &[u8]) {
    let mut body = Vec::new();
    while let Some(eol) = find(data, b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 {
            let skip = find(data, b"\r\n").map_or(data.len(), |i| i + 2);
            return (body, &data[skip..]);
        }
        let take = size.min(data.len());
        body.extend_from_slice(&data[..take]);
        data = &data[(take + 2).min(data.len())..];
    }
    (body, data)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A GET request with exact bytes in the target, an optional bearer key, `Connection: close`.
pub fn raw_get(target: &str, key: Option<&TestKey>) -> Vec<u8> {
    raw_request("GET", target.as_bytes(), key)
}

/// A request with exact bytes for method and target.
pub fn raw_request(method: &str, target: &[u8], key: Option<&TestKey>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    if let Some(key) = key {
        out.extend_from_slice(format!("Authorization: Bearer {}\r\n", key.key).as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

// ---------------------------------------------------------------------------
// Assertions and waiting
// ---------------------------------------------------------------------------

/// Polls `check` until it returns true; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts an RFC 9457 denial: status, content type, the five fields, a request id that
/// matches the header, and none of `secrets` anywhere in the body.
pub fn assert_problem(resp: &Resp, status: u16, secrets: &[&str]) {
    assert_eq!(resp.status, status, "body: {}", resp.text());
    let ct = resp.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type was {ct:?}"
    );
    let body = resp.json();
    for field in ["type", "title", "status", "detail", "request_id"] {
        assert!(
            body.get(field).is_some(),
            "problem body lacks {field}: {body}"
        );
    }
    assert_eq!(body["status"], status, "status field in {body}");
    let header_id = resp
        .header("x-request-id")
        .expect("denial carries X-Request-Id");
    assert_eq!(
        body["request_id"], header_id,
        "request_id in body vs header"
    );
    let text = resp.text();
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "denial body reveals {secret:?}: {text}"
        );
    }
}

/// Asserts that nothing the backend received is un-normalised or inside `/v1/admin`.
pub fn assert_backend_clean(backend: &RecordingBackend) {
    for r in backend.requests() {
        let path = r.path();
        assert!(
            path.starts_with('/'),
            "backend got a non-origin target {:?}",
            r.target
        );
        assert!(
            !path.starts_with("/v1/admin"),
            "backend got a forbidden request {:?}",
            r.target
        );
        assert!(
            !path.contains("//"),
            "backend got an un-collapsed path {:?}",
            r.target
        );
        for seg in path.split('/') {
            assert!(
                seg != "." && seg != "..",
                "backend got a dot segment {:?}",
                r.target
            );
        }
        let lower = path.to_ascii_lowercase();
        for bad in ["%2e", "%2f", "%5c", "%00", "\\", "#"] {
            assert!(
                !lower.contains(bad),
                "backend got {bad:?} in {:?}",
                r.target
            );
        }
    }
}

/// Path of a file, as text, for command lines and error messages.
pub fn show(path: &Path) -> String {
    path.display().to_string()
}

/// Runs `portcullis check --policy` on a policy text written to a fresh folder: the exit code and
/// stderr.
pub fn check_policy(text: &str) -> (Option<i32>, String) {
    let ws = Workspace::new();
    let policy = ws.write("policy.yaml", text);
    let out = std::process::Command::new(BIN)
        .args(["check", "--policy", policy.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}
