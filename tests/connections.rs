//! Connection limits and timeouts through the real binary: sockets that never send a request,
//! HTTP/2 connections that never open a stream, idle keep-alive connections, stalled bodies,
//! and a flood of connections under a low file-descriptor limit. The admin listener and new
//! clients must stay served throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FAST: &str =
    "connections:\n  first_request_timeout: 1s\n  idle_timeout: 1s\n  body_timeout: 1s\n";

/// Reads until the peer closes; returns what came and how long the close took.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(started.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, None),
        }
    }
}

async fn world_with(extra: &str) -> (RecordingBackend, Proxy, TestKey) {
    let backend = RecordingBackend::start().await;
    let viewer = TestKey::new("victor");
    let proxy = Proxy::start(&backend.url(), POLICY, &keys_yaml(&[&viewer]), extra).await;
    (backend, proxy, viewer)
}

#[tokio::test]
async fn a_socket_that_sends_nothing_is_closed_after_first_request_timeout() {
    let (_backend, proxy, _) = world_with(FAST).await;
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let (_, closed) = until_closed(&mut silent, Duration::from_secs(10)).await;
    let closed = closed.expect("the silent connection was closed");
    assert!(
        closed >= Duration::from_millis(900),
        "closed after {closed:?}"
    );
}

#[tokio::test]
async fn an_http2_connection_without_a_stream_is_closed() {
    let (_backend, proxy, _) = world_with(FAST).await;
    let mut h2 = TcpStream::connect(proxy.addr).await.unwrap();
    // The client preface and an empty SETTINGS frame, then nothing.
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (got, closed) = until_closed(&mut h2, Duration::from_secs(10)).await;
    assert!(
        closed.is_some(),
        "the streamless HTTP/2 connection stayed open"
    );
    assert!(
        !got.is_empty(),
        "the server spoke HTTP/2 (SETTINGS, GOAWAY) before closing"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_but_a_busy_one_is_not() {
    let (backend, proxy, viewer) = world_with(FAST).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!(
        "GET /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        viewer.key
    );
    // Requests every 400 ms keep it open well past the idle timeout...
    for _ in 0..5 {
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(backend.count(), 5);
    // ...then silence closes it.
    let (_, closed) = until_closed(&mut conn, Duration::from_secs(10)).await;
    assert!(closed.is_some(), "the idle connection stayed open");
}

#[tokio::test]
async fn a_request_waiting_for_a_slow_backend_is_not_cut_by_the_idle_timeout() {
    let backend = RecordingBackend::with_slow_delay(Duration::from_millis(2500)).await;
    let proxy = Proxy::start(&backend.url(), POLICY, "version: 1\nkeys: []\n", FAST).await;
    let started = Instant::now();
    let resp = get(proxy.addr, "/slow", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[tokio::test]
async fn a_stalled_request_body_answers_408_and_is_not_an_upstream_error() {
    let (_backend, proxy, _) = world_with(FAST).await;
    let editor = TestKey::new("alice");
    std::fs::write(proxy.workspace.path("keys.yaml"), keys_yaml(&[&editor])).unwrap();
    eventually("the new key is live", PATIENCE, || async {
        send(
            proxy.addr,
            "GET",
            "/v1/datasets",
            &[("authorization", &format!("Bearer {}", editor.key))],
            "",
        )
        .await
        .status
            == 200
    })
    .await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 100\r\n\r\nonly part",
        editor.key
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let (got, _) = until_closed(&mut conn, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        !metrics.contains("portcullis_upstream_errors_total{kind="),
        "a client's stalled body counted as an upstream error:\n{metrics}"
    );
}

#[tokio::test]
async fn a_broken_chunked_body_answers_400_not_502() {
    let (_backend, proxy, _) = world_with("").await;
    let editor = TestKey::new("alice");
    std::fs::write(proxy.workspace.path("keys.yaml"), keys_yaml(&[&editor])).unwrap();
    eventually("the new key is live", PATIENCE, || async {
        send(
            proxy.addr,
            "GET",
            "/v1/datasets",
            &[("authorization", &format!("Bearer {}", editor.key))],
            "",
        )
        .await
        .status
            == 200
    })
    .await;
    let bytes = format!(
        "POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\nnot a chunk\r\n\r\n",
        editor.key
    );
    let reply = raw(proxy.addr, bytes.as_bytes()).await;
    assert_eq!(
        reply.status(),
        400,
        "{}",
        String::from_utf8_lossy(&reply.bytes)
    );
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        !metrics.contains("portcullis_upstream_errors_total{kind="),
        "a client's broken body counted as an upstream error:\n{metrics}"
    );
}

#[tokio::test]
async fn past_max_connections_new_clients_get_503_and_the_admin_port_stays_reachable() {
    let (_backend, proxy, viewer) =
        world_with("connections:\n  max: 8\n  first_request_timeout: 3s\n").await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(proxy.addr).await.unwrap();
    let (got, closed) = until_closed(&mut extra, Duration::from_secs(5)).await;
    assert!(closed.is_some());
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(get(proxy.admin, "/readyz", &[]).await.status, 200);
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("portcullis_connections_refused_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_connections_open 8"),
        "{metrics}"
    );
    // Once the silent ones are closed, clients are served again.
    eventually("a new client is served", PATIENCE, || async {
        try_send(
            proxy.addr,
            "GET",
            "/v1/datasets",
            &[("authorization", &format!("Bearer {}", viewer.key))],
            "",
        )
        .await
        .is_ok_and(|r| r.status == 200)
    })
    .await;
    drop(held);
}

#[tokio::test]
async fn six_hundred_idle_sockets_under_ulimit_512_lock_nobody_out() {
    let backend = RecordingBackend::start().await;
    let viewer = TestKey::new("victor");
    let ws = Workspace::new();
    ws.write("policy.yaml", POLICY);
    ws.write("keys.yaml", &keys_yaml(&[&viewer]));
    ws.write_config(&backend.url(), "");
    let proxy = Proxy::spawn_with_fd_limit(ws, 512).await;
    let mut held = Vec::new();
    for _ in 0..600 {
        match TcpStream::connect(proxy.addr).await {
            Ok(s) => held.push(s),
            Err(e) => panic!("connect failed after {} sockets: {e}", held.len()),
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(proxy.admin, "/readyz", &[]).await.status,
        200,
        "probe locked out"
    );
    assert_eq!(get(proxy.admin, "/healthz", &[]).await.status, 200);
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("portcullis_connections_refused_total"),
        "{metrics}"
    );
    // Close some of ours, as clients would; a real client then gets through.
    held.truncate(100);
    eventually(
        "a client is served beside 100 idle sockets",
        PATIENCE,
        || async {
            try_send(
                proxy.addr,
                "GET",
                "/v1/datasets",
                &[("authorization", &format!("Bearer {}", viewer.key))],
                "",
            )
            .await
            .is_ok_and(|r| r.status == 200)
        },
    )
    .await;
    assert!(backend.count() >= 1);
}
