//! `portcullis injector`: the mutating admission webhook over HTTPS.
//!
//! `POST /mutate` takes an AdmissionReview and answers with [`review`]; `GET /healthz` and
//! `GET /readyz` serve the kubelet's probes. The certificate is reloaded when its files change
//! (cert-manager renews it in place), and SIGTERM lets in-flight reviews finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use super::{review, InjectOptions};
use crate::config::TlsConfig;
use crate::tls::{load_certified_key, server_config, CertResolver};

/// AdmissionReviews carry one pod; anything far larger is not one.
const MAX_REVIEW_BYTES: usize = 8 * 1024 * 1024;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight reviews may take after SIGTERM (the API server waits at most 30 s).
const GRACE: Duration = Duration::from_secs(15);

/// `portcullis injector --listen ADDR --cert PEM --key PEM`: mutating admission webhook
/// (AdmissionReview v1 over HTTPS) that patches pods annotated `portcullis.dev/inject: "true"`.
/// Runs until SIGTERM/SIGINT.
///
/// Everything that can be wrong in the configuration (the options, the certificate and key, the
/// listen address) is checked before `listening injector ...` is printed; any of it ends the
/// process with exit code 64 and a message naming the file or address.
pub async fn run_injector(
    listen: SocketAddr,
    cert: &Path,
    key: &Path,
    options: InjectOptions,
) -> Result<(), crate::app::RunError> {
    use crate::app::RunError;
    options
        .validate()
        .map_err(|e| RunError::Config(format!("injector: {e}")))?;
    let initial = load_certified_key(cert, key).map_err(|message| {
        RunError::Config(format!(
            "injector: cannot load the serving certificate: {message}"
        ))
    })?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| RunError::Config(format!("injector: cannot listen on {listen}: {e}")))?;
    let local = listener.local_addr().map_err(anyhow::Error::from)?;
    println!("listening injector https://{local}");
    tracing::info!(%local, image = %options.image, "injector listening");
    serve_with(listener, cert, key, initial, options, shutdown_signal())
        .await
        .map_err(RunError::Other)
}

/// Serves the webhook on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    cert: &Path,
    key: &Path,
    options: InjectOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let initial = load_certified_key(cert, key).map_err(|e| anyhow!(e))?;
    serve_with(listener, cert, key, initial, options, shutdown).await
}

/// [`serve`] with the certificate already loaded (`cert` and `key` are watched for renewals).
async fn serve_with(
    listener: TcpListener,
    cert: &Path,
    key: &Path,
    initial: rustls::sign::CertifiedKey,
    options: InjectOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let resolver = Arc::new(CertResolver::new(initial));
    let tls = TlsConfig {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        client_ca: None,
    };
    let acceptor = TlsAcceptor::from(Arc::new(
        server_config(&tls, resolver.clone()).map_err(|e| anyhow!(e))?,
    ));
    let _reloader = spawn_cert_reloader(cert.to_path_buf(), key.to_path_buf(), resolver);
    let options = Arc::new(options);
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (acceptor, builder, options) = (acceptor.clone(), builder.clone(), options.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let svc = service_fn(move |request| {
                let options = options.clone();
                async move { Ok::<_, Infallible>(handle(request, &options).await) }
            });
            let connection = builder.serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(error = %e, %peer, "webhook connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing remaining webhook connections");
    }
    Ok(())
}

async fn handle(request: Request<Incoming>, options: &InjectOptions) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz" | "/readyz") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "review too large\n"),
            };
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(admission) => {
                    let answer = review(&admission, options);
                    let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    response
                }
                Err(_) => text(
                    StatusCode::BAD_REQUEST,
                    "expected an AdmissionReview (JSON)\n",
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Swaps in a renewed certificate; a pair that does not load is logged and the old one stays.
/// Dropping the returned watch ends the reloader too (its channel closes).
fn spawn_cert_reloader(
    cert: PathBuf,
    key: PathBuf,
    resolver: Arc<CertResolver>,
) -> crate::watch::FileWatch {
    let (trigger, mut changes) = mpsc::channel(1);
    let watch = crate::watch::watch(vec![cert.clone(), key.clone()], trigger);
    tokio::spawn(async move {
        while changes.recv().await.is_some() {
            // Let a writer that replaces both files finish the second one.
            tokio::time::sleep(Duration::from_millis(200)).await;
            match load_certified_key(&cert, &key) {
                Ok(pair) => {
                    resolver.replace(pair);
                    tracing::info!(cert = %cert.display(), "webhook certificate reloaded");
                }
                Err(e) => tracing::warn!(error = %e, "webhook certificate not reloaded"),
            }
        }
    });
    watch
}

#[cfg(unix)]
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("injector stopping");
}

#[cfg(not(unix))]
async fn shutdown_signal() {
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("injector stopping");
}
