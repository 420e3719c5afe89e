//! Accepting connections: HTTP/1.1 and HTTP/2 (prior knowledge or ALPN) on one port, with a cap
//! on open connections, timeouts for connections that never send a request or sit idle, and a
//! graceful shutdown that lets in-flight requests finish.
//!
//! Every connection is watched: one that has not completed a request head within
//! `first_request_timeout` of being accepted (an HTTP/1 socket that sends nothing, an HTTP/2
//! connection with no stream after its preface, a slow head) is closed, and so is one with no
//! request in flight and no byte either way for `idle_timeout`. Past `max_connections`, a new
//! plaintext connection gets a bare 503 and is closed, so file descriptors stay available for
//! the admin listener and for the backend.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;

use super::headers::Hop;
use super::service::Service;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection told to close may take to finish what it is doing.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Limits applied to every client connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// hyper's HTTP/1 read buffer; headers beyond it are refused with 431 by hyper itself.
    pub max_buf_size: usize,
    /// HTTP/2 header list limit.
    pub max_header_list_size: u32,
    /// A connection must complete its first request head this soon after being accepted.
    pub first_request_timeout: Duration,
    /// A connection without a request in flight and without traffic is closed after this.
    pub idle_timeout: Duration,
    /// Open client connections at most.
    pub max_connections: usize,
}

/// What the listener did: the open count it enforces the cap with, and its metrics.
#[derive(Debug)]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: AtomicUsize,
    open_gauge: IntGauge,
    refused: IntCounter,
    timed_out: IntCounter,
}

impl ConnectionStats {
    /// Registers `portcullis_connections_open`, `portcullis_connections_refused_total` and
    /// `portcullis_connections_timed_out_total` on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Arc<ConnectionStats>> {
        let open_gauge = IntGauge::new(
            "portcullis_connections_open",
            "Client connections open on the proxy listener.",
        )?;
        let refused = IntCounter::new(
            "portcullis_connections_refused_total",
            "Client connections refused because connections.max were open.",
        )?;
        let timed_out = IntCounter::new(
            "portcullis_connections_timed_out_total",
            "Client connections closed for sending no request in time or sitting idle.",
        )?;
        registry.register(Box::new(open_gauge.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(timed_out.clone()))?;
        Ok(Arc::new(ConnectionStats {
            open: AtomicUsize::new(0),
            open_gauge,
            refused,
            timed_out,
        }))
    }
}

/// What one connection has been doing, shared by its I/O, its requests and its watchdog.
struct Activity {
    born: Instant,
    last_ms: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicU32,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            last_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Resolves when the connection should be closed, saying why.
    async fn expired(&self, limits: &ConnectionLimits) -> &'static str {
        let first = limits.first_request_timeout.as_millis() as u64;
        let idle = limits.idle_timeout.as_millis() as u64;
        loop {
            let now = self.now_ms();
            let (deadline, why) = if self.in_flight.load(Ordering::Relaxed) > 0 {
                (now + idle, "")
            } else if self.requests.load(Ordering::Relaxed) == 0 {
                (first, "no request head in time")
            } else {
                (self.last_ms.load(Ordering::Relaxed) + idle, "idle")
            };
            if !why.is_empty() && now >= deadline {
                return why;
            }
            tokio::time::sleep(Duration::from_millis(deadline.saturating_sub(now).max(10))).await;
        }
    }
}

/// Decrements the in-flight count when a request's handling ends, however it ends.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> InFlight {
        activity.requests.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A stream that notes the time of every byte read or written.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Keeps the open-connection count right, and wakes the drain when the last one closes.
struct Open {
    stats: Arc<ConnectionStats>,
    closed: Arc<Notify>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::SeqCst);
        self.stats.open_gauge.dec();
        self.closed.notify_waiters();
    }
}

/// Everything a connection task needs.
struct Server {
    builder: auto::Builder<TokioExecutor>,
    service: Arc<Service>,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    closed: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
}

/// Serves the proxy on `listener` until `shutdown` turns true, then drains for at most `grace`.
///
/// Thread per core: one single-threaded runtime per available core (at most
/// [`super::pool::MAX_SHARDS`]), each accepting on the same listening socket and serving the
/// connections it accepted, with its own backend connections. A request never hops threads, so
/// there are no cross-thread wake-ups and no work-stealing bookkeeping on the request path
/// (pingora measured the same for its "no steal" runtime). Everything else (reloads, audit,
/// admin, key store) stays on the main runtime.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: Arc<Service>,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(limits.max_buf_size)
        .header_read_timeout(limits.first_request_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_list_size)
        .max_concurrent_streams(256);
    let server = Arc::new(Server {
        builder,
        service,
        limits,
        stats: stats.clone(),
        closed: Arc::new(Notify::new()),
        shutdown: shutdown.clone(),
    });
    let shards = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, super::pool::MAX_SHARDS);
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot share the proxy listener");
            return;
        }
    };
    let mut finished = Vec::new();
    for shard in 1..=shards {
        let listener = match listener.try_clone() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, shard, "cannot share the proxy listener");
                continue;
            }
        };
        let (server, tls, shutdown) = (server.clone(), tls.clone(), shutdown.clone());
        let (done, finished_rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name(format!("portcullis-proxy-{shard}"))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(async move {
                        super::pool::enter_shard(shard);
                        match TcpListener::from_std(listener) {
                            Ok(listener) => {
                                server.accept_loop(listener, tls, shutdown, grace).await
                            }
                            Err(e) => tracing::error!(error = %e, shard, "cannot listen"),
                        }
                    }),
                    Err(e) => tracing::error!(error = %e, shard, "cannot start a proxy runtime"),
                }
                let _ = done.send(());
            });
        match spawned {
            Ok(_) => finished.push(finished_rx),
            Err(e) => tracing::error!(error = %e, shard, "cannot start a proxy thread"),
        }
    }
    drop(listener);
    for shard in finished {
        let _ = shard.await;
    }
}

impl Server {
    /// One shard: accept until shutdown, then wait for the open connections (every shard's)
    /// to finish, for at most `grace`.
    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        mut shutdown: watch::Receiver<bool>,
        grace: Duration,
    ) {
        let stats = self.stats.clone();
        let limits = self.limits;
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
            if stats.open.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
                stats.open.fetch_sub(1, Ordering::SeqCst);
                stats.refused.inc();
                if tls.is_none() {
                    tokio::spawn(refuse(stream));
                }
                continue;
            }
            stats.open_gauge.inc();
            let open = Open {
                stats: stats.clone(),
                closed: self.closed.clone(),
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _open = open;
                server.connection(stream, peer, tls).await;
            });
        }
        drop(listener);
        let drained = async {
            loop {
                let notified = self.closed.notified();
                if stats.open.load(Ordering::SeqCst) == 0 {
                    break;
                }
                notified.await;
            }
        };
        tokio::select! {
            _ = drained => tracing::info!("all connections drained"),
            _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
        }
    }
}

/// A connection over the cap: a bare 503, then close.
async fn refuse(mut stream: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(BUSY).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

impl Server {
    async fn connection(&self, stream: TcpStream, peer: SocketAddr, tls: Option<TlsAcceptor>) {
        let activity = Arc::new(Activity::new());
        let watched = Watched {
            inner: stream,
            activity: activity.clone(),
        };
        match tls {
            None => self.serve_io(watched, peer, activity).await,
            Some(acceptor) => {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(watched)).await {
                    Ok(Ok(s)) => self.serve_io(s, peer, activity).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            }
        }
    }

    async fn serve_io<I>(&self, io: I, peer: SocketAddr, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = self.service.clone();
        let hop = Arc::new(Hop::new(peer, service.proto));
        let requests = activity.clone();
        let svc = service_fn(move |request| {
            let (service, hop) = (service.clone(), hop.clone());
            let in_flight = InFlight::start(&requests);
            async move {
                let response = service.handle(request, hop).await;
                drop(in_flight);
                Ok::<_, Infallible>(response)
            }
        });
        let connection = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::pin!(connection);
        let mut shutdown = self.shutdown.clone();
        let closing = tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %peer, "client connection ended with an error");
                }
                return;
            }
            why = activity.expired(&self.limits) => {
                self.stats.timed_out.inc();
                tracing::debug!(%peer, why, "closing client connection");
                CLOSE_GRACE
            }
            _ = stopped(&mut shutdown) => Duration::MAX,
        };
        connection.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(closing, connection).await;
    }
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Binds a listener (announced by the caller once every listener is bound).
pub async fn bind(addr: SocketAddr, role: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({role}): {e}"))
}

/// Prints where a bound listener is, so scripts and tests can find a `:0` port.
pub fn announce(listener: &TcpListener, role: &str, tls: bool) -> io::Result<SocketAddr> {
    let local = listener.local_addr()?;
    let scheme = if tls { "https" } else { "http" };
    println!("listening {role} {scheme}://{local}");
    tracing::info!(%local, role, "listening");
    Ok(local)
}

/// The default connection cap: raise the soft file-descriptor limit to the hard one (as Go
/// and nginx's `worker_rlimit_nofile` do), then leave room for one backend connection per
/// client connection, the admin listener, the audit spool and the watched files.
pub fn default_max_connections() -> usize {
    let limit = raise_fd_limit();
    (limit.saturating_sub(64) / 2).max(16)
}

#[cfg(unix)]
fn raise_fd_limit() -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(current), max) = (limit.current, limit.maximum) {
        let wanted = max.unwrap_or(current.max(65_536)).min(1 << 20);
        if wanted > current {
            limit.current = Some(wanted);
            if setrlimit(Resource::Nofile, limit).is_ok() {
                return wanted as usize;
            }
        }
        return current as usize;
    }
    1 << 20
}

#[cfg(not(unix))]
fn raise_fd_limit() -> usize {
    1024
}
