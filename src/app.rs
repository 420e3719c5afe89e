//! Wiring: the only module that knows every other one. Builds metrics, the live state, TLS, the
//! watchers and the listeners, and runs until shutdown.

use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use tokio::sync::{mpsc, watch};

use crate::admin::{self, Admin, Readiness};
use crate::audit::{AuditEvent, Auditor};
use crate::config::Config;
use crate::keyapi::{KeyAction, KeyApi};
use crate::metrics::Metrics;
use crate::oauth::{OAuth, OAuthMetrics};
use crate::proxy::forward::Upstream;
use crate::proxy::server::{self, ConnectionLimits, ConnectionStats};
use crate::proxy::service::{RequestIds, Service};
use crate::reload::{feed, Loader, Sources, TlsFiles};
use crate::store::{KeysLocation, Store};
use crate::tls::{self, CertResolver};

/// Errors that end the program, split by exit code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The operator's configuration is wrong: exit 64 with this message.
    #[error("{0}")]
    Config(String),
    /// Anything else: exit 1.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// How long to wait after a file event before reloading, so a burst of writes is one reload.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// A running proxy.
pub struct Started {
    /// The proxy listener's address.
    pub proxy: std::net::SocketAddr,
    /// The admin listener's address.
    pub admin: std::net::SocketAddr,
    /// Ends when the proxy has drained.
    pub task: tokio::task::JoinHandle<()>,
    /// Reloads on demand (SIGHUP).
    pub loader: Arc<Loader>,
    /// Flip to true to begin a graceful shutdown.
    pub stop: watch::Sender<bool>,
    /// Readiness, turned off when draining.
    pub readiness: Arc<Readiness>,
    /// The audit stream (flushed on shutdown).
    pub audit: Auditor,
    _watch: crate::watch::FileWatch,
    _followers: Followers,
}

/// The store's change feed and usage flush; stopped when dropped.
struct Followers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Followers {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Runs the proxy with a loaded config until SIGTERM/SIGINT.
pub async fn run(config: Config) -> Result<(), RunError> {
    // Signal handlers exist before the listeners do, so a SIGHUP or SIGTERM that arrives as
    // soon as the process looks ready never falls back to the default action (exit).
    let signals = Signals::register()?;
    let started = start(&config).await?;
    signals.spawn(
        started.loader.clone(),
        started.readiness.clone(),
        started.stop.clone(),
    );
    let Started {
        task,
        audit,
        loader,
        _followers,
        ..
    } = started;
    task.await
        .map_err(|e| RunError::Other(anyhow::anyhow!("proxy task failed: {e}")))?;
    drop(_followers);
    if let Store::Postgres(pg) = &**loader.store() {
        // The last counts of this proxy join the fleet's totals before it goes.
        if let Err(e) = feed::flush_usage(&loader, pg).await {
            tracing::warn!(error = %e, "the last usage flush failed; these counts are lost");
        }
    }
    audit.record(AuditEvent::Shutdown);
    audit
        .shutdown(config.grace_period.max(Duration::from_secs(5)))
        .await;
    tracing::info!("stopped");
    Ok(())
}

/// Loads the state, binds both listeners, starts watching files, and starts serving.
pub async fn start(config: &Config) -> Result<Started, RunError> {
    let registry = Registry::new();
    let metrics = Metrics::register(&registry, config.metrics.per_key)
        .map_err(|e| RunError::Other(e.into()))?;
    let audit = match &config.audit {
        Some(audit) => Auditor::start(audit, &registry)
            .map_err(|e| RunError::Config(format!("audit: {e:#}")))?,
        None => Auditor::disabled_on(&registry),
    };
    let tls_files = match &config.tls {
        None => None,
        Some(t) => {
            let key = tls::load_certified_key(&t.cert, &t.key).map_err(RunError::Config)?;
            Some(TlsFiles {
                cert: t.cert.clone(),
                key: t.key.clone(),
                resolver: Arc::new(CertResolver::new(key)),
            })
        }
    };
    let acceptor = match (&config.tls, &tls_files) {
        (Some(t), Some(files)) => {
            let server = tls::server_config(t, files.resolver.clone()).map_err(RunError::Config)?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
        }
        _ => None,
    };
    let store = Arc::new(Store::open(&config.keys));
    let loader = Loader::start(
        Sources {
            policy: config.policy.clone(),
            keys: config.keys.clone(),
            store: store.clone(),
            key_cache: config.key_cache.clone(),
        },
        metrics.clone(),
        tls_files,
        audit.clone(),
    )
    .await
    .map_err(|p| RunError::Config(p.to_string()))?;
    let shadow = match &config.shadow_policy {
        Some(path) => {
            let shadow = crate::shadow::Shadow::load(path, &registry)
                .map_err(|e| RunError::Other(e.into()))?;
            loader.follow_shadow(shadow.clone());
            Some(shadow)
        }
        None => None,
    };
    if config.key_api.enabled {
        warn_if_keys_are_read_only(&config.keys);
    }
    let upstream_tls = match config.upstream.scheme_str() {
        Some("https") => Some(
            tls::upstream_client_config(config.upstream_tls.ca.as_deref())
                .map_err(RunError::Config)?,
        ),
        _ => None,
    };
    let upstream = Upstream::new(
        &config.upstream,
        config.upstream_connect_timeout,
        config.upstream_timeout,
        upstream_tls,
    )?;
    let oauth = match &config.oauth {
        None => None,
        Some(oauth) => {
            let metrics =
                OAuthMetrics::register(&registry).map_err(|e| RunError::Other(e.into()))?;
            Some(
                OAuth::start(oauth, metrics)
                    .await
                    .map_err(RunError::Config)?,
            )
        }
    };
    let key_audit = audit.clone();
    let key_api = config.key_api.enabled.then(|| {
        Arc::new(KeyApi::new(
            config.key_api.prefix.clone(),
            loader.clone(),
            Box::new(move |action: KeyAction| {
                key_audit.record(AuditEvent::KeyChange {
                    action: action.action,
                    key_id: Some(action.key_id.clone()),
                    principal: Some(action.principal.clone()),
                    target_key_id: action.target_key_id.clone(),
                    target_principal: action.target_principal.clone(),
                    result: action.result.clone(),
                    via: "api",
                });
                tracing::info!(
                    action = action.action,
                    key_id = %action.key_id,
                    principal = %action.principal,
                    target_key_id = %action.target_key_id,
                    target_principal = %action.target_principal,
                    result = %action.result,
                    "key change"
                );
            }),
            config.key_api.max_keys_per_principal,
        ))
    });
    let service = Arc::new(Service {
        state: loader.state(),
        upstream,
        deny_status: config.deny_status,
        max_header_bytes: config.max_header_bytes,
        ids: RequestIds::new(),
        proto: if acceptor.is_some() { "https" } else { "http" },
        metrics: metrics.clone(),
        access_log: config.log.access_log,
        key_api,
        audit: audit.clone(),
        backend: config.backend,
        body_timeout: config.connections.body_timeout,
        oauth,
        filter_max_bytes: config.filter_max_bytes,
        token_limiters: papaya::HashMap::new(),
        shadow,
    });
    let limits = ConnectionLimits {
        max_buf_size: (config.max_header_bytes * 2).max(8192),
        max_header_list_size: u32::try_from(config.max_header_bytes * 2).unwrap_or(u32::MAX),
        first_request_timeout: config.connections.first_request_timeout,
        idle_timeout: config.connections.idle_timeout,
        max_connections: config
            .connections
            .max
            .unwrap_or_else(server::default_max_connections),
    };
    let connection_stats =
        ConnectionStats::register(&registry).map_err(|e| RunError::Other(e.into()))?;
    // Bind every listener before saying anything, so a busy port never follows a `listening`.
    let proxy_listener = server::bind(config.listen, "proxy")
        .await
        .map_err(|e| RunError::Config(e.to_string()))?;
    let admin_listener = server::bind(config.admin, "admin")
        .await
        .map_err(|e| RunError::Config(e.to_string()))?;
    let proxy = server::announce(&proxy_listener, "proxy", acceptor.is_some())
        .map_err(anyhow::Error::from)?;
    let admin_addr =
        server::announce(&admin_listener, "admin", false).map_err(anyhow::Error::from)?;
    audit.record(AuditEvent::Start {
        version: env!("CARGO_PKG_VERSION"),
    });
    let file_watch = spawn_reloader(loader.clone());
    let followers = match &*store {
        Store::Postgres(pg) => {
            let mut tasks = feed::spawn(loader.clone(), pg.clone(), config.key_store);
            tasks.push(feed::spawn_usage_flush(
                loader.clone(),
                pg.clone(),
                config.key_store.usage_flush_interval,
            ));
            tasks
        }
        Store::File(_) => Vec::new(),
    };
    let readiness = Arc::new(Readiness::default());
    let admin = Arc::new(Admin {
        loader: loader.clone(),
        state: loader.state(),
        readiness: readiness.clone(),
        registry,
        audit: audit.clone(),
    });
    tokio::spawn(admin::serve(admin_listener, admin));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(server::serve(
        proxy_listener,
        acceptor,
        service,
        limits,
        connection_stats,
        stop_rx,
        config.grace_period,
    ));
    Ok(Started {
        proxy,
        admin: admin_addr,
        task,
        loader,
        stop,
        readiness,
        audit,
        _watch: file_watch,
        _followers: Followers(followers),
    })
}

/// The key API writes keys; say at start when the keys file cannot be written (a Kubernetes
/// Secret is mounted read-only), instead of failing the first change.
fn warn_if_keys_are_read_only(keys: &KeysLocation) {
    let Some(path) = keys.file() else { return };
    let writable = std::fs::OpenOptions::new().append(true).open(path).is_ok()
        && path
            .parent()
            .map(|d| {
                if d.as_os_str().is_empty() {
                    std::path::Path::new(".")
                } else {
                    d
                }
            })
            .and_then(|d| tempfile::tempfile_in(d).ok())
            .is_some();
    if !writable {
        tracing::warn!(
            keys = %path.display(),
            "the key API is enabled but the keys file cannot be written (a read-only Secret mount?): key changes will fail; use a PostgreSQL store (keys: postgres://...) or set key_api.enabled: false"
        );
    }
}

/// Watches the loader's files and reloads (debounced) on every change.
fn spawn_reloader(loader: Arc<Loader>) -> crate::watch::FileWatch {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let guard = crate::watch::watch(loader.watched_files(), tx);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            loader.reload().await;
        }
    });
    guard
}

/// SIGHUP (reload), SIGTERM and SIGINT (drain), registered up front.
#[cfg(unix)]
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn register() -> Result<Signals, RunError> {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind| signal(kind).map_err(|e| RunError::Other(e.into()));
        Ok(Signals {
            hup: listen(SignalKind::hangup())?,
            term: listen(SignalKind::terminate())?,
            int: listen(SignalKind::interrupt())?,
        })
    }

    fn spawn(self, loader: Arc<Loader>, readiness: Arc<Readiness>, stop: watch::Sender<bool>) {
        let Signals {
            mut hup,
            mut term,
            mut int,
        } = self;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading");
                loader.reload().await;
            }
        });
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
                _ = int.recv() => tracing::info!("SIGINT: draining"),
            }
            readiness.start_draining();
            let _ = stop.send(true);
        });
    }
}

/// Ctrl-C (drain) elsewhere.
#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn register() -> Result<Signals, RunError> {
        Ok(Signals)
    }

    fn spawn(self, _loader: Arc<Loader>, readiness: Arc<Readiness>, stop: watch::Sender<bool>) {
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            readiness.start_draining();
            let _ = stop.send(true);
        });
    }
}
