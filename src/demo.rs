//! `portcullis demo`: the embedded default. A built-in backend, the example policy, fresh keys,
//! and the proxy in front, with curl lines that show an allow, a 401 and a 403.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::app::{self, RunError};
use crate::cli::keys::create_key;
use crate::config::Config;
use crate::store::{KeysLocation, Store};

/// The policy the demo runs with.
pub const DEMO_POLICY: &str = include_str!("../policies/demo.yaml");

/// Runs the demo until Ctrl-C.
pub async fn run(listen: SocketAddr) -> Result<(), RunError> {
    let dir = tempfile::tempdir().map_err(anyhow::Error::from)?;
    let policy = dir.path().join("policy.yaml");
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&policy, DEMO_POLICY).map_err(anyhow::Error::from)?;
    let store = Store::open(&KeysLocation::File(keys.clone()));
    let mut made = Vec::new();
    for (principal, purpose) in [("alice", "demo: editor"), ("bob", "demo: viewer")] {
        let key = create_key(
            &store,
            principal,
            &[],
            Some(purpose.to_string()),
            Some("1d"),
        )
        .await
        .map_err(|e| RunError::Other(anyhow::anyhow!("{e}")))?;
        made.push(key);
    }
    let (alice, bob) = (made[0].clone(), made[1].clone());
    let backend = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(anyhow::Error::from)?;
    let backend_addr = backend.local_addr().map_err(anyhow::Error::from)?;
    tokio::spawn(serve_backend(backend));
    let upstream = format!("http://{backend_addr}")
        .parse()
        .map_err(|e| RunError::Other(anyhow::anyhow!("{e}")))?;
    let mut config = Config::with_upstream(upstream);
    config.listen = listen;
    config.admin = SocketAddr::from(([127, 0, 0, 1], 0));
    config.policy = policy;
    config.keys = KeysLocation::File(keys);
    config.grace_period = std::time::Duration::from_secs(2);
    let started = app::start(&config).await?;
    print_instructions(&alice, &bob, backend_addr, started.proxy);
    stopped().await;
    started.readiness.start_draining();
    let _ = started.stop.send(true);
    let _ = started.task.await;
    Ok(())
}

/// Ctrl-C, or SIGTERM where there is one.
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn print_instructions(alice: &str, bob: &str, backend: SocketAddr, proxy: SocketAddr) {
    let base = format!("http://{proxy}");
    println!();
    println!("portcullis demo: a built-in backend on http://{backend}, the proxy on {base}");
    println!("policy: alice is an editor, bob a viewer (see policies/demo.yaml). Try:");
    println!();
    println!("# allowed (200): alice reads a dataset");
    println!("curl -i -H 'Authorization: Bearer {alice}' {base}/v1/datasets/ds_1");
    println!("# 401: no key");
    println!("curl -i {base}/v1/datasets/ds_1");
    println!("# 403: bob is a viewer and may not write");
    println!("curl -i -X PUT -H 'X-API-Key: {bob}' {base}/v1/datasets/ds_1");
    println!();
    println!("Ctrl-C stops the demo.");
}

async fn serve_backend(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let svc = service_fn(|request: Request<Incoming>| async move {
                Ok::<_, Infallible>(echo(&request))
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn echo(request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let body = serde_json::json!({
        "backend": "portcullis demo backend",
        "method": request.method().as_str(),
        "path": request.uri().path(),
        "principal": header("x-portcullis-principal"),
        "key_id": header("x-portcullis-key-id"),
        "request_id": header("x-request-id"),
    });
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
