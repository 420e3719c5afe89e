//! Accepting connections: HTTP/1.1 and HTTP/2 (prior knowledge) on one port, with graceful
//! shutdown that lets in-flight requests finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

use super::headers::Hop;
use super::service::Service;

/// Limits applied to every client connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// hyper's HTTP/1 read buffer; headers beyond it are refused with 431 by hyper itself.
    pub max_buf_size: usize,
    /// HTTP/2 header list limit.
    pub max_header_list_size: u32,
    /// How long a client may take to send its request head.
    pub header_read_timeout: Duration,
}

/// Serves the proxy on `listener` until `shutdown` turns true, then drains for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: Arc<Service>,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(limits.max_buf_size)
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_list_size)
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
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
            _ = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let hop = Arc::new(Hop::new(peer, service.proto));
        let svc = service_fn(move |request| {
            let (service, hop) = (service.clone(), hop.clone());
            async move { Ok::<_, Infallible>(service.handle(request, hop).await) }
        });
        match &tls {
            None => {
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, %peer, "client connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                let accept = acceptor.accept(stream);
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            return tracing::debug!(error = %e, %peer, "TLS handshake failed")
                        }
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .into_owned();
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(error = %e, %peer, "client connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Binds a listener and prints where, so scripts and tests can find a `:0` port.
pub async fn bind(addr: SocketAddr, role: &str, tls: bool) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({role}): {e}"))?;
    let local = listener.local_addr()?;
    let scheme = if tls { "https" } else { "http" };
    println!("listening {role} {scheme}://{local}");
    tracing::info!(%local, role, "listening");
    Ok(listener)
}
