//! The backend must never perform an operation the proxy did not judge. Each test puts the
//! real binary in front of a tiny backend that reads requests the way a framework an attacker
//! would target does (ignores GET bodies like Python's `http.server`, strips `;params` like
//! Tomcat/Spring, routes case-insensitively like Express, reads `.json` suffixes like Rails,
//! honours method and URL override headers like Symfony/Laravel/Express `method-override`,
//! folds `_` into `-` in header names like wsgiref/PHP), and asserts that every operation
//! that backend performed was granted to the key that asked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const POLICY_TEXT: &str = r#"version: 1
routes:
  - match: GET /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: read
  - match: GET /v1/datasets/latest
    resource: jobs
    access: read
  - match: DELETE /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: write
  - match: GET|POST /v1/search
    resource: datasets
    access: read
    allow_body: true
roles:
  viewer: ["datasets:read"]
  editor: ["*:read", "*:write"]
principals:
  victor: { kind: user, roles: [viewer] }
  alice: { kind: user, roles: [editor] }
"#;

/// How the test backend reads requests.
#[derive(Clone, Copy, Default)]
struct Framework {
    /// Never reads a body on GET/HEAD/DELETE (Python `http.server`, many static handlers).
    ignores_bodyless_bodies: bool,
    /// Strips `;params` from every segment (Tomcat, Jetty, Spring).
    strips_matrix: bool,
    /// Routes ignoring case, folding like Java's `equalsIgnoreCase` (Express, Spring).
    case_insensitive: bool,
    /// Reads a `.ext` on the last segment as a format (Rails).
    format_suffix: bool,
    /// Honours `X-HTTP-Method-Override` & co. and `_method` (Symfony, Laravel, Express).
    method_override: bool,
    /// Honours `X-Original-URL` / `X-Rewrite-URL` (Symfony, IIS-aware apps).
    url_override: bool,
}

impl Framework {
    fn all() -> Framework {
        Framework {
            ignores_bodyless_bodies: true,
            strips_matrix: true,
            case_insensitive: true,
            format_suffix: true,
            method_override: true,
            url_override: true,
        }
    }
}

/// One operation the backend performed, with the identity it believed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Operation {
    /// `read-dataset ds_1`, `read-latest`, `delete-dataset ds_2`, `search`, or `none`.
    what: String,
    principal: String,
    /// Every header as the framework sees it (names folded `_` → `-`, lower case).
    headers: Vec<(String, String)>,
}

struct Backend {
    addr: SocketAddr,
    done: Arc<Mutex<Vec<Operation>>>,
}

impl Backend {
    async fn start(framework: Framework) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let done = Arc::new(Mutex::new(Vec::new()));
        let log = done.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, framework, log.clone()));
            }
        });
        Backend { addr, done }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn operations(&self) -> Vec<Operation> {
        self.done.lock().unwrap().clone()
    }

    fn whats(&self) -> Vec<String> {
        self.operations().into_iter().map(|o| o.what).collect()
    }
}

/// A keep-alive HTTP/1.1 loop: parse a head, maybe read a body, route, answer, repeat.
async fn serve(mut stream: TcpStream, fw: Framework, log: Arc<Mutex<Vec<Operation>>>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or("");
        let mut parts = request_line.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        // CGI-style: header names lower-cased with `_` read as `-`.
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| {
                (
                    k.trim().to_ascii_lowercase().replace('_', "-"),
                    v.trim().to_string(),
                )
            })
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let bodyless = matches!(method.as_str(), "GET" | "HEAD" | "DELETE");
        if !(fw.ignores_bodyless_bodies && bodyless) {
            let length: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < length {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..length);
        }
        let what = route(fw, &method, &target, &header);
        log.lock().unwrap().push(Operation {
            what,
            principal: header("x-portcullis-principal").unwrap_or_default(),
            headers: headers.clone(),
        });
        let close = header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let answer = if close {
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        } else {
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        };
        if stream.write_all(answer.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The framework's router: which operation `method target` performs.
fn route(
    fw: Framework,
    method: &str,
    target: &str,
    header: &dyn Fn(&str) -> Option<String>,
) -> String {
    let (mut path, query) = target.split_once('?').unwrap_or((target, ""));
    let overridden_url;
    if fw.url_override {
        if let Some(url) = header("x-original-url").or_else(|| header("x-rewrite-url")) {
            overridden_url = url;
            path = &overridden_url;
        }
    }
    let mut method = method.to_string();
    if fw.method_override {
        let from_header = [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
        ]
        .iter()
        .find_map(|h| header(h));
        let from_query = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("_method="))
            .map(str::to_string);
        if let Some(m) = from_header.or(from_query) {
            method = m.to_ascii_uppercase();
        }
    }
    let mut segments: Vec<String> = path.split('/').map(str::to_string).collect();
    if fw.strips_matrix {
        for s in &mut segments {
            if let Some((keep, _)) = s.split_once(';') {
                *s = keep.to_string();
            }
        }
    }
    if fw.format_suffix {
        if let Some(last) = segments.last_mut() {
            if let Some(dot) = last.get(1..).and_then(|l| l.find('.')) {
                last.truncate(dot + 1);
            }
        }
    }
    let fold = |s: &str| -> String {
        if !fw.case_insensitive {
            return s.to_string();
        }
        let decoded = percent_decode(s);
        decoded
            .chars()
            .map(|c| match c {
                'ſ' => 's',
                'ı' | 'İ' => 'i',
                '\u{212A}' => 'k',
                c => c.to_ascii_lowercase(),
            })
            .collect()
    };
    let is = |s: &String, literal: &str| fold(s) == literal || s == literal;
    match (method.as_str(), segments.as_slice()) {
        ("GET" | "HEAD", [_, v1, d, latest])
            if is(v1, "v1") && is(d, "datasets") && is(latest, "latest") =>
        {
            "read-latest".into()
        }
        ("GET" | "HEAD", [_, v1, d, id]) if is(v1, "v1") && is(d, "datasets") => {
            format!("read-dataset {id}")
        }
        ("DELETE", [_, v1, d, id]) if is(v1, "v1") && is(d, "datasets") => {
            format!("delete-dataset {id}")
        }
        ("GET" | "POST", [_, v1, s]) if is(v1, "v1") && is(s, "search") => "search".into(),
        _ => "none".into(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What each principal may do, as the policy says: the oracle the backend's log is held to.
fn granted(principal: &str, what: &str) -> bool {
    match principal {
        "alice" => true,
        "victor" => what.starts_with("read-dataset ") || what == "search" || what == "none",
        _ => what == "none",
    }
}

fn assert_only_granted(backend: &Backend) {
    for op in backend.operations() {
        assert!(
            granted(&op.principal, &op.what),
            "the backend performed {:?} as {:?}, which the policy does not grant; all: {:?}",
            op.what,
            op.principal,
            backend.whats()
        );
    }
}

struct Setup {
    backend: Backend,
    proxy: Proxy,
    victor: TestKey,
    alice: TestKey,
}

async fn setup(framework: Framework, extra_config: &str) -> Setup {
    let backend = Backend::start(framework).await;
    let victor = TestKey::new("victor");
    let alice = TestKey::new("alice");
    let proxy = Proxy::start(
        &backend.url(),
        POLICY_TEXT,
        &keys_yaml(&[&victor, &alice]),
        extra_config,
    )
    .await;
    Setup {
        backend,
        proxy,
        victor,
        alice,
    }
}

/// Sends raw bytes on one connection and gives the statuses answered.
async fn statuses(proxy: &Proxy, bytes: &[u8]) -> Vec<u16> {
    raw(proxy.addr, bytes).await.statuses()
}

fn smuggling_get(method: &str, key: &TestKey) -> Vec<u8> {
    let smuggled = "DELETE /v1/datasets/ds_2 HTTP/1.1\r\nHost: x\r\nX-Portcullis-Principal: alice\r\nContent-Length: 0\r\n\r\n";
    format!(
        "{method} /v1/datasets/ds_1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{smuggled}",
        key.key,
        smuggled.len()
    )
    .into_bytes()
}

// --- 1. bodies on methods without body semantics --------------------------------------------

#[tokio::test]
async fn a_get_or_head_body_cannot_smuggle_a_second_request() {
    let s = setup(Framework::all(), "").await;
    for method in ["GET", "HEAD"] {
        let got = statuses(&s.proxy, &smuggling_get(method, &s.victor)).await;
        assert_eq!(got.first(), Some(&400), "{method}: {got:?}");
    }
    // The same on a pooled connection that earlier requests warmed up.
    for _ in 0..3 {
        let ok = send(
            s.proxy.addr,
            "GET",
            "/v1/datasets/ds_1",
            &[("authorization", &format!("Bearer {}", s.victor.key))],
            "",
        )
        .await;
        assert_eq!(ok.status, 200);
    }
    let got = statuses(&s.proxy, &smuggling_get("GET", &s.victor)).await;
    assert_eq!(got.first(), Some(&400));
    assert!(
        !s.backend.whats().iter().any(|w| w.starts_with("delete")),
        "{:?}",
        s.backend.whats()
    );
    assert_only_granted(&s.backend);
    assert!(s
        .backend
        .operations()
        .iter()
        .all(|o| o.principal != "alice"));
}

#[tokio::test]
async fn a_get_body_over_h2c_is_refused_too() {
    let s = setup(Framework::all(), "").await;
    let tcp = TcpStream::connect(s.proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let smuggled = "DELETE /v1/datasets/ds_2 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    let req = http::Request::get(format!("http://{}/v1/datasets/ds_1", s.proxy.addr))
        .header("authorization", format!("Bearer {}", s.victor.key))
        .body(Full::new(Bytes::from(smuggled)))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status().as_u16(), 400);
    assert!(s.backend.whats().is_empty(), "{:?}", s.backend.whats());
}

#[tokio::test]
async fn a_route_that_allows_a_get_body_closes_the_backend_connection_after_it() {
    let s = setup(Framework::all(), "").await;
    let smuggled = "DELETE /v1/datasets/ds_2 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    let bytes = format!(
        "GET /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{smuggled}",
        s.victor.key,
        smuggled.len()
    );
    let got = statuses(&s.proxy, bytes.as_bytes()).await;
    assert_eq!(got.first(), Some(&200), "{got:?}");
    // Another request right after must not share the connection the body was left on.
    let ok = send(
        s.proxy.addr,
        "GET",
        "/v1/datasets/ds_1",
        &[("authorization", &format!("Bearer {}", s.victor.key))],
        "",
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(s.backend.whats(), vec!["search", "read-dataset ds_1"]);
    let search = &s.backend.operations()[0];
    assert!(
        search
            .headers
            .iter()
            .any(|(k, v)| k == "connection" && v == "close"),
        "{:?}",
        search.headers
    );
    // A POST body is this request's body and travels normally.
    let post = send(
        s.proxy.addr,
        "POST",
        "/v1/search",
        &[("authorization", &format!("Bearer {}", s.victor.key))],
        "{\"q\":1}",
    )
    .await;
    assert_eq!(post.status, 200);
    assert_only_granted(&s.backend);
}

// --- 3. another spelling of a static route ---------------------------------------------------

#[tokio::test]
async fn a_static_route_is_not_reached_under_another_spelling() {
    let s = setup(Framework::all(), "").await;
    let auth = format!("Bearer {}", s.victor.key);
    for (target, expected) in [
        ("/v1/datasets/latest;x", 400),
        ("/v1/datasets/LATEST", 403),
        ("/v1/datasets/Latest", 403),
        ("/v1/datasets/latest.json", 403),
        ("/v1/datasets/LATEST.json", 403),
        ("/v1/datasets/late%C5%BFt", 403),
        ("/V1/DATASETS/latest", 403),
        ("/v1/datasets/latest", 403),
    ] {
        let r = send(s.proxy.addr, "GET", target, &[("authorization", &auth)], "").await;
        assert_eq!(r.status, expected, "{target}: {}", r.text());
    }
    // What the viewer may do still works, suffixes and capitals included.
    for target in [
        "/v1/datasets/ds_1",
        "/v1/datasets/DS_1",
        "/v1/datasets/ds_1.json",
    ] {
        let r = send(s.proxy.addr, "GET", target, &[("authorization", &auth)], "").await;
        assert_eq!(r.status, 200, "{target}: {}", r.text());
    }
    // An editor, who may read both, is not refused for an odd spelling.
    let r = send(
        s.proxy.addr,
        "GET",
        "/v1/datasets/LATEST",
        &[("authorization", &format!("Bearer {}", s.alice.key))],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_only_granted(&s.backend);
}

#[tokio::test]
async fn with_matrix_parameters_stripped_both_readings_are_judged() {
    let s = setup(Framework::all(), "backend:\n  matrix_parameters: strip\n").await;
    let auth = format!("Bearer {}", s.victor.key);
    let r = send(
        s.proxy.addr,
        "GET",
        "/v1/datasets/latest;x",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = send(
        s.proxy.addr,
        "GET",
        "/v1/datasets/ds_1;v=2",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_only_granted(&s.backend);
}

#[tokio::test]
async fn a_backend_described_as_strict_gets_the_literal_reading_only() {
    let strict = Framework {
        ignores_bodyless_bodies: false,
        ..Framework::default()
    };
    let s = setup(
        strict,
        "backend:\n  case_insensitive: false\n  format_suffixes: false\n  matrix_parameters: literal\n",
    )
    .await;
    let auth = format!("Bearer {}", s.victor.key);
    for target in [
        "/v1/datasets/LATEST",
        "/v1/datasets/latest.json",
        "/v1/datasets/latest;x",
    ] {
        let r = send(s.proxy.addr, "GET", target, &[("authorization", &auth)], "").await;
        assert_eq!(r.status, 200, "{target}: {}", r.text());
    }
    assert_only_granted(&s.backend);
}

// --- 4. method and URL overrides ------------------------------------------------------------

#[tokio::test]
async fn override_headers_never_reach_the_backend() {
    let s = setup(Framework::all(), "").await;
    for header in [
        "X-HTTP-Method-Override: DELETE",
        "X-HTTP-Method: DELETE",
        "X-Method-Override: DELETE",
        "X_HTTP_Method_Override: DELETE",
        "X-Original-URL: /v1/datasets/latest",
        "X-Rewrite-URL: /v1/datasets/latest",
        "X_Original_URL: /v1/datasets/latest",
    ] {
        let bytes = format!(
            "GET /v1/datasets/ds_1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n{header}\r\nConnection: close\r\n\r\n",
            s.victor.key
        );
        let got = statuses(&s.proxy, bytes.as_bytes()).await;
        assert_eq!(got, vec![200], "{header}");
    }
    let whats = s.backend.whats();
    assert!(whats.iter().all(|w| w == "read-dataset ds_1"), "{whats:?}");
    assert_only_granted(&s.backend);
}

#[tokio::test]
async fn a_method_override_query_parameter_is_400() {
    let s = setup(Framework::all(), "").await;
    let auth = format!("Bearer {}", s.victor.key);
    for target in [
        "/v1/datasets/ds_2?_method=DELETE",
        "/v1/datasets/ds_2?x=1&_METHOD=delete",
        "/v1/datasets/ds_2?%5Fmethod=DELETE",
    ] {
        let r = send(s.proxy.addr, "GET", target, &[("authorization", &auth)], "").await;
        assert_eq!(r.status, 400, "{target}");
        assert_eq!(
            r.json()["type"],
            "https://portcullis.dev/problems/method-override"
        );
    }
    assert!(s.backend.whats().is_empty(), "{:?}", s.backend.whats());
}

// --- 7. planted forwarding and id headers -----------------------------------------------------

#[tokio::test]
async fn planted_forwarding_and_id_headers_never_reach_a_folding_backend() {
    let s = setup(Framework::all(), "").await;
    let bytes = format!(
        "GET /v1/datasets/ds_1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nX_Forwarded_For: 10.6.6.6\r\nX_Request_Id: planted\r\nX-Real-IP: 10.6.6.6\r\nTrue-Client-IP: 10.6.6.6\r\nX-Client-IP: 10.6.6.6\r\nX_Portcullis_Principal: alice\r\nConnection: close\r\n\r\n",
        s.victor.key
    );
    assert_eq!(statuses(&s.proxy, bytes.as_bytes()).await, vec![200]);
    let op = s.backend.operations().pop().unwrap();
    assert_eq!(op.principal, "victor");
    let all = |name: &str| -> Vec<&str> {
        op.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(
        all("x-forwarded-for"),
        vec!["127.0.0.1"],
        "{:?}",
        op.headers
    );
    assert_eq!(all("x-request-id").len(), 1);
    assert_ne!(all("x-request-id"), vec!["planted"]);
    for name in ["x-real-ip", "true-client-ip", "x-client-ip"] {
        assert!(
            all(name).is_empty(),
            "{name} reached the backend: {:?}",
            op.headers
        );
    }
    assert!(
        !op.headers.iter().any(|(_, v)| v.contains("10.6.6.6")),
        "{:?}",
        op.headers
    );
}
