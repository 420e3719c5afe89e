//! Response filtering through the real binary: a list route with `filter:` returns only the
//! items the caller may read, keeps every other byte of the backend's answer, passes a
//! whole-resource caller's answer through untouched, and refuses (502) what it cannot filter,
//! never passing the unfiltered list on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;

const POLICY_TEXT: &str = r#"version: 1
routes:
  - match: GET /v1/companies
    resource: companies
    access: read
    filter: { items: /data, instance: /id }
  - match: GET /v1/companies/{company}
    resource: companies
    instance: company
    access: read
  - match: GET /v1/bare
    resource: companies
    access: read
    filter: { items: "", instance: /id }
  - match: GET /v1/broken/{*kind}
    resource: companies
    access: read
    filter: { items: /data, instance: /id }
  - match: GET /v1/jobs
    resource: jobs
    access: read
principals:
  mixed: { kind: user, grants: ["companies/a:read", "companies/b:write", "companies/7:read", "companies/x%20y:read"] }
  all: { kind: user, grants: ["companies:read"] }
  none: { kind: user, grants: ["jobs:read"] }
"#;

const LIST: &str = r#"{"total": 5, "data": [{"id": "a", "name": "A"}, {"id": "b", "name": "B"}, {"id": "c", "name": "C"}, {"id": 7}, {"id": "x y"}, {"name": "no id"}], "next": "cursor-1"}"#;

/// What the backend saw: the `Accept-Encoding` of each request.
type Seen = Arc<Mutex<Vec<Option<String>>>>;

/// A backend that answers the list, and broken variants under `/v1/broken/...`.
async fn backend() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        s.lock().unwrap().push(
                            req.headers()
                                .get("accept-encoding")
                                .map(|v| v.to_str().unwrap().to_string()),
                        );
                        Ok::<_, Infallible>(answer(req.uri().path()))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn answer(path: &str) -> Response<Full<Bytes>> {
    let json = |body: String| {
        Response::builder()
            .header("content-type", "application/json")
            .header("etag", "\"v1\"")
            .header("content-md5", "Q2hlY2sgSW50ZWdyaXR5IQ==")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    match path {
        "/v1/companies" => json(LIST.to_string()),
        "/v1/bare" => json(r#"[{"id": "c"}, {"id": "a"}]"#.to_string()),
        "/v1/broken/html" => json("<html>not json</html>".to_string()),
        "/v1/broken/object" => json(r#"{"data": {"id": "c"}}"#.to_string()),
        "/v1/broken/gzip" => {
            let mut r = json(LIST.to_string());
            r.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
            r
        }
        "/v1/broken/huge" => {
            let items: Vec<String> = (0..20_000)
                .map(|i| format!(r#"{{"id": "c{i}", "pad": "................................................"}}"#))
                .collect();
            json(format!(r#"{{"data": [{}]}}"#, items.join(",")))
        }
        "/v1/broken/error" => Response::builder()
            .status(500)
            .body(Full::new(Bytes::from(r#"{"data": [{"id": "c"}]}"#)))
            .unwrap(),
        _ => Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    }
}

async fn start() -> (Proxy, Seen, TestKey, TestKey, TestKey) {
    let (addr, seen) = backend().await;
    let mixed = TestKey::new("mixed");
    let all = TestKey::new("all");
    let none = TestKey::new("none");
    let proxy = Proxy::start(
        &format!("http://{addr}"),
        POLICY_TEXT,
        &keys_yaml(&[&mixed, &all, &none]),
        "filter_max_bytes: 65536\naudit:\n  file: audit.jsonl\n",
    )
    .await;
    (proxy, seen, mixed, all, none)
}

async fn call(proxy: &Proxy, path: &str, key: &TestKey) -> Resp {
    let (n, v) = key.bearer();
    get(
        proxy.addr,
        path,
        &[(n, &v), ("accept-encoding", "gzip, br")],
    )
    .await
}

fn audit_events(proxy: &Proxy) -> Vec<serde_json::Value> {
    proxy
        .workspace
        .read("audit.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["kind"] == "decision")
        .collect()
}

#[tokio::test]
async fn a_partial_key_sees_only_its_items_in_order_with_the_rest_of_the_body_intact() {
    let (proxy, seen, mixed, _, _) = start().await;
    let r = call(&proxy, "/v1/companies", &mixed).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        r#"{"total": 5, "data": [{"id": "a", "name": "A"},{"id": "b", "name": "B"},{"id": 7},{"id": "x y"}], "next": "cursor-1"}"#
    );
    assert_eq!(
        r.header("content-length"),
        Some(r.text().len().to_string().as_str())
    );
    assert_eq!(r.header("etag"), None);
    assert_eq!(r.header("content-md5"), None);
    // The backend was asked for an uncompressed answer, whatever the client accepts.
    assert_eq!(seen.lock().unwrap()[0].as_deref(), Some("identity"));
    // The body itself as the list: the same rule.
    let r = call(&proxy, "/v1/bare", &mixed).await;
    assert_eq!(r.text(), r#"[{"id": "a"}]"#);
    // One instance it may not read is still refused on the item route, and the items it sees
    // are exactly the ones it may fetch by path (the same grant test, the same spelling).
    assert_eq!(call(&proxy, "/v1/companies/c", &mixed).await.status, 403);
    for id in ["a", "b", "7", "x%20y"] {
        let r = call(&proxy, &format!("/v1/companies/{id}"), &mixed).await;
        assert_ne!(r.status, 403, "{id}");
    }

    eventually("the audit event of the filtered list", PATIENCE, || async {
        audit_events(&proxy)
            .iter()
            .any(|e| e["path"] == "/v1/companies" && e["filtered"] == 2)
    })
    .await;
    let m = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        m.contains("portcullis_filtered_items_total{route=\"/v1/companies\"} 2"),
        "{m}"
    );
}

#[tokio::test]
async fn a_whole_resource_key_gets_the_backends_bytes_and_a_key_without_the_resource_is_refused() {
    let (proxy, _, _, all, none) = start().await;
    let r = call(&proxy, "/v1/companies", &all).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), LIST);
    assert_eq!(r.header("etag"), Some("\"v1\""));
    let r = call(&proxy, "/v1/companies", &none).await;
    assert_eq!(r.status, 403);
    let r = call(&proxy, "/v1/companies", &TestKey::new("nobody")).await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn what_cannot_be_filtered_is_refused_never_passed_on() {
    let (proxy, _, mixed, _, _) = start().await;
    for (kind, reason) in [
        ("html", "not_json"),
        ("object", "not_an_array"),
        ("gzip", "compressed"),
        ("huge", "too_large"),
    ] {
        let path = format!("/v1/broken/{kind}");
        let r = call(&proxy, &path, &mixed).await;
        assert_eq!(r.status, 502, "{kind}: {}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{kind}"
        );
        assert!(
            !r.text().contains("\"c\""),
            "{kind}: the unfiltered body leaked"
        );
        assert!(r.text().contains(reason), "{kind}: {}", r.text());
        let path_for = path.clone();
        eventually(&format!("audit of {kind}"), PATIENCE, || {
            let path = path_for.clone();
            let proxy = &proxy;
            async move {
                audit_events(proxy).iter().any(|e| {
                    e["path"] == path.as_str() && e["filter_error"] == reason && e["status"] == 502
                })
            }
        })
        .await;
    }
    // A backend error is not a list: it is passed on as it is.
    let r = call(&proxy, "/v1/broken/error", &mixed).await;
    assert_eq!(r.status, 500);
    let m = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        m.contains(
            "portcullis_filter_failures_total{reason=\"too_large\",route=\"/v1/broken/{*kind}\"} 1"
        ),
        "{m}"
    );
}

#[test]
fn check_reports_bad_filters_where_they_are() {
    let (code, stderr) = check_policy(
        "version: 1\nroutes:\n  - match: GET /v1/a\n    resource: a\n    access: read\n    filter: { items: data, instance: /id }\n  - match: GET /status\n    public: true\n    filter: { items: /data, instance: /id }\n  - match: GET /v1/a/{x}\n    resource: a\n    instance: x\n    access: read\n    filter: { items: /data, instance: /id~2 }\nprincipals: {}\n",
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("policy.yaml:6:22: filter.items: \"data\" is not a JSON Pointer"),
        "{stderr}"
    );
    assert!(
        stderr.contains("policy.yaml:9:13: a public route"),
        "{stderr}"
    );
    assert!(
        stderr.contains("filter.instance: \"/id~2\" is not a JSON Pointer"),
        "{stderr}"
    );
    assert!(stderr.contains("already names one instance"), "{stderr}");
}
