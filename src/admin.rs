//! The admin listener, kept off the proxy port: health and readiness for orchestrators,
//! Prometheus metrics, and per-key usage (`/keys`, never a key or a hash).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::keys::secret;
use crate::metrics::Metrics;
use crate::state::{LiveState, Snapshot};

/// Whether the process should receive traffic.
#[derive(Default)]
pub struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    /// Marks the process as shutting down: `/readyz` turns 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// What the admin endpoints read.
pub struct Admin {
    /// Whether keys are loaded (a database store that has not answered yet is not ready).
    pub loader: std::sync::Arc<crate::reload::Loader>,
    /// Live state.
    pub state: LiveState,
    /// Drain flag.
    pub readiness: Arc<Readiness>,
    /// What `/metrics` renders.
    pub registry: prometheus::Registry,
    /// With `audit.fail_closed`, not ready while audit events cannot be kept.
    pub audit: crate::audit::Auditor,
}

impl Admin {
    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, body) = match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "ok\n".to_string()),
            (&Method::GET | &Method::HEAD, "/metrics") => {
                return text_response(
                    StatusCode::OK,
                    Metrics::render(&self.registry),
                    "text/plain; version=0.0.4; charset=utf-8",
                );
            }
            (&Method::GET | &Method::HEAD, "/keys") => {
                return text_response(
                    StatusCode::OK,
                    keys_json(&self.state.load()),
                    "application/json",
                );
            }
            (&Method::GET | &Method::HEAD, "/readyz") => {
                if self.readiness.is_draining() {
                    (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_string())
                } else if !self.loader.keys_ready() {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "keys not loaded: the key store cannot be reached and there is no key cache\n".to_string(),
                    )
                } else if !self.audit.accepting() {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "audit spool full or unwritable (fail_closed)\n".to_string(),
                    )
                } else {
                    let generation = self.state.load().generation;
                    (StatusCode::OK, format!("ready generation={generation}\n"))
                }
            }
            _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
        };
        text_response(status, body, "text/plain; charset=utf-8")
    }
}

fn text_response(
    status: StatusCode,
    body: String,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// The key list with usage, as JSON. Never a key or a hash.
pub fn keys_json(snapshot: &Snapshot) -> String {
    let time = |t: Option<i64>| {
        t.and_then(rfc3339)
            .map_or(serde_json::Value::Null, serde_json::Value::from)
    };
    let keys: Vec<serde_json::Value> = snapshot
        .keys
        .records()
        .map(|k| {
            serde_json::json!({
                "id": k.id(),
                "prefix": secret::masked(k.prefix()),
                "principal": &*k.principal().name,
                "purpose": k.purpose(),
                "active": k.active(),
                "created": time(k.created()),
                "expires": time(k.expires()),
                "calls": k.usage().calls(),
                "last_used": time(k.usage().last_used()),
            })
        })
        .collect();
    serde_json::json!({ "generation": snapshot.generation, "keys": keys }).to_string()
}

fn rfc3339(secs: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(secs).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// Admin connections open at once at most: probes and scrapes need few, and a flood on the
/// admin port must not take the file descriptors the proxy needs.
const MAX_ADMIN_CONNECTIONS: usize = 128;
/// An admin connection is closed after this long, whatever it is doing: answers are small.
const ADMIN_CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves the admin endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_ADMIN_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let admin = admin.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |request| {
                let response = admin.respond(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let _ = tokio::time::timeout(
                ADMIN_CONNECTION_TIMEOUT,
                builder.serve_connection(TokioIo::new(stream), svc),
            )
            .await;
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}
