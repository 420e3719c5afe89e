//! The admin listener: health and readiness for orchestrators, kept off the proxy port.

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

use crate::state::LiveState;

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
    /// Live state (its presence means the first load succeeded).
    pub state: LiveState,
    /// Drain flag.
    pub readiness: Arc<Readiness>,
}

impl Admin {
    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, body) = match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "ok\n".to_string()),
            (&Method::GET | &Method::HEAD, "/readyz") => {
                if self.readiness.is_draining() {
                    (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_string())
                } else {
                    let generation = self.state.load().generation;
                    (StatusCode::OK, format!("ready generation={generation}\n"))
                }
            }
            _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

/// Serves the admin endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |request| {
                let response = admin.respond(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
