//! Protocols through the real binary: HTTP/2 with prior knowledge (h2c), WebSocket-style
//! `Upgrade` passed through for allowed requests and refused before the backend otherwise, and
//! request bodies streamed to the backend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const POLICY_TEXT: &str = "version: 1\nroutes:\n  - match: GET /v1/stream\n    resource: streams\n    access: read\n  - match: POST /v1/upload\n    resource: streams\n    access: write\nprincipals:\n  victor: { kind: user, grants: ['streams:write'] }\n";

/// A backend that upgrades `GET /v1/stream` and then echoes bytes upper-cased, and answers
/// `POST /v1/upload` with the size of the body it received.
async fn upgrade_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<Incoming>| async move {
                    if req.uri().path() == "/v1/upload" {
                        let body = req.into_body().collect().await?.to_bytes();
                        return Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(
                            body.len().to_string(),
                        ))));
                    }
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(upgraded) = upgrade.await else { return };
                        let mut io = TokioIo::new(upgraded);
                        let mut buf = [0u8; 64];
                        while let Ok(n) = io.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            let upper = buf[..n].to_ascii_uppercase();
                            if io.write_all(&upper).await.is_err() {
                                break;
                            }
                        }
                    });
                    let mut res = Response::new(Full::new(Bytes::new()));
                    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    res.headers_mut()
                        .insert("upgrade", "websocket".parse().unwrap());
                    res.headers_mut()
                        .insert("connection", "upgrade".parse().unwrap());
                    Ok(res)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

async fn upgrade_request(proxy: SocketAddr, key: Option<&TestKey>) -> (String, TcpStream) {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let auth = key.map_or(String::new(), |k| {
        format!("Authorization: Bearer {}\r\n", k.key)
    });
    let head = format!(
        "GET /v1/stream HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{auth}\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, tcp.read(&mut buf))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n > 0, "connection closed before the response head");
        got.extend_from_slice(&buf[..n]);
    }
    (String::from_utf8_lossy(&got).to_string(), tcp)
}

#[tokio::test]
async fn an_allowed_upgrade_is_spliced_through_to_the_backend() {
    let backend = upgrade_backend().await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(
        &format!("http://{backend}"),
        POLICY_TEXT,
        &keys_yaml(&[&victor]),
        "",
    )
    .await;
    let (head, mut tcp) = upgrade_request(proxy.addr, Some(&victor)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp.write_all(b"hello through the gate").await.unwrap();
    let mut echoed = vec![0u8; 22];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"HELLO THROUGH THE GATE");
}

#[tokio::test]
async fn an_upgrade_without_a_key_is_refused_before_the_backend() {
    let backend = RecordingBackend::start().await;
    let proxy = Proxy::start(&backend.url(), POLICY_TEXT, &keys_yaml(&[]), "").await;
    let (head, _) = upgrade_request(proxy.addr, None).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let backend = RecordingBackend::start().await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(&backend.url(), POLICY_TEXT, &keys_yaml(&[&victor]), "").await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    for (key, expected) in [(Some(&victor), 200), (None, 401)] {
        let mut req = Request::get(format!("http://{}/v1/stream", proxy.addr));
        if let Some(k) = key {
            req = req.header("x-api-key", &k.key);
        }
        let res = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), expected);
    }
    let seen = backend.single();
    assert!(seen.header("x-api-key").is_none(), "credential removed");
    assert_eq!(seen.header("x-portcullis-principal"), Some("victor"));
}

#[tokio::test]
async fn a_large_request_body_is_streamed_to_the_backend() {
    let backend = upgrade_backend().await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(
        &format!("http://{backend}"),
        POLICY_TEXT,
        &keys_yaml(&[&victor]),
        "",
    )
    .await;
    let body = "x".repeat(8 * 1024 * 1024);
    let auth = format!("Bearer {}", victor.key);
    let answer = send(
        proxy.addr,
        "POST",
        "/v1/upload",
        &[("authorization", &auth)],
        &body,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), body.len().to_string());
}

/// A raw HTTP/1.1 backend: answers every request on a connection with `200 n` (keep-alive),
/// closes each connection after `per_connection` answers without saying so, and counts the
/// connections it accepted and the request lines it read (which must be in origin form).
async fn counting_backend(
    per_connection: usize,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (a, l) = (accepted.clone(), lines.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let l = l.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut served = 0;
                let mut chunk = [0u8; 4096];
                while served < per_connection {
                    let Ok(n) = tcp.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        l.lock()
                            .unwrap()
                            .push(head.lines().next().unwrap_or("").to_string());
                        served += 1;
                        let body = served.to_string();
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if tcp.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
                // Closes silently: the proxy still holds the connection as idle.
            });
        }
    });
    (addr, accepted, lines)
}

#[tokio::test]
async fn backend_connections_are_reused_and_the_request_line_is_in_origin_form() {
    let (backend, accepted, lines) = counting_backend(usize::MAX).await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(
        &format!("http://{backend}"),
        POLICY_TEXT,
        &keys_yaml(&[&victor]),
        "",
    )
    .await;
    for _ in 0..20 {
        let (n, v) = victor.bearer();
        let r = get(proxy.addr, "/v1/stream?x=1", &[(n, &v)]).await;
        assert_eq!(r.status, 200);
    }
    // Each proxy thread (one per core) keeps its own backend connections.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let opened = accepted.load(Ordering::SeqCst);
    assert!(
        (1..=threads).contains(&opened),
        "{opened} backend connections for 20 sequential requests on {threads} proxy threads"
    );
    let lines = lines.lock().unwrap().clone();
    assert_eq!(lines.len(), 20);
    assert!(
        lines.iter().all(|l| l == "GET /v1/stream?x=1 HTTP/1.1"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_backend_that_closed_an_idle_connection_costs_no_request() {
    // Each connection answers once and is then closed by the backend without a word.
    let (backend, accepted, _) = counting_backend(1).await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(
        &format!("http://{backend}"),
        POLICY_TEXT,
        &keys_yaml(&[&victor]),
        "",
    )
    .await;
    for i in 0..10 {
        let (n, v) = victor.bearer();
        let r = get(proxy.addr, "/v1/stream", &[(n, &v)]).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        // Give the close time to arrive, so the next request finds a dead idle connection.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 10);
}
