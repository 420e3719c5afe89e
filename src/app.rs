//! Wiring: the only module that knows every other one. Builds the state, the listeners and the
//! signal handling, and runs until shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::admin::{self, Admin, Readiness};
use crate::config::Config;
use crate::proxy::forward::Upstream;
use crate::proxy::server::{self, ConnectionLimits};
use crate::proxy::service::{RequestIds, Service};
use crate::reload::Loader;

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

/// How long in-flight requests get after SIGTERM.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(25);

/// Runs the proxy with a loaded config until SIGTERM/SIGINT.
pub async fn run(config: Config) -> Result<(), RunError> {
    let loader = Loader::start(config.policy.clone(), config.keys.clone())
        .map_err(|p| RunError::Config(p.to_string()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let readiness = Arc::new(Readiness::default());
    let started = start(&config, &loader, stop_rx, readiness.clone()).await?;
    spawn_signal_handlers(loader, readiness, stop_tx)?;
    started
        .task
        .await
        .map_err(|e| RunError::Other(anyhow::anyhow!("proxy task failed: {e}")))?;
    tracing::info!("stopped");
    Ok(())
}

/// A running proxy: where it listens and the task that ends after shutdown and draining.
pub struct Started {
    /// The proxy listener's address.
    pub proxy: std::net::SocketAddr,
    /// The admin listener's address.
    pub admin: std::net::SocketAddr,
    /// Ends when the proxy has drained.
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds both listeners and starts serving.
pub async fn start(
    config: &Config,
    loader: &Arc<Loader>,
    stop: watch::Receiver<bool>,
    readiness: Arc<Readiness>,
) -> Result<Started, RunError> {
    let upstream = Upstream::new(
        &config.upstream,
        config.upstream_connect_timeout,
        config.upstream_timeout,
    )?;
    let service = Arc::new(Service {
        state: loader.state(),
        upstream,
        deny_status: config.deny_status,
        max_header_bytes: config.max_header_bytes,
        ids: RequestIds::new(),
        proto: "http",
    });
    let limits = ConnectionLimits {
        max_buf_size: (config.max_header_bytes * 2).max(8192),
        max_header_list_size: u32::try_from(config.max_header_bytes * 2).unwrap_or(u32::MAX),
        header_read_timeout: Duration::from_secs(30),
    };
    let proxy_listener = server::bind(config.listen, "proxy")
        .await
        .map_err(|e| RunError::Config(e.to_string()))?;
    let admin_listener = server::bind(config.admin, "admin")
        .await
        .map_err(|e| RunError::Config(e.to_string()))?;
    let admin = Arc::new(Admin {
        state: loader.state(),
        readiness,
    });
    let proxy = proxy_listener.local_addr().map_err(anyhow::Error::from)?;
    let admin_addr = admin_listener.local_addr().map_err(anyhow::Error::from)?;
    tokio::spawn(admin::serve(admin_listener, admin));
    let task = tokio::spawn(server::serve(
        proxy_listener,
        service,
        limits,
        stop,
        DEFAULT_GRACE,
    ));
    Ok(Started {
        proxy,
        admin: admin_addr,
        task,
    })
}

#[cfg(unix)]
fn spawn_signal_handlers(
    loader: Arc<Loader>,
    readiness: Arc<Readiness>,
    stop: watch::Sender<bool>,
) -> Result<(), RunError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(anyhow::Error::from)?;
    let mut term = signal(SignalKind::terminate()).map_err(anyhow::Error::from)?;
    let mut int = signal(SignalKind::interrupt()).map_err(anyhow::Error::from)?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload(&loader);
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
    Ok(())
}

#[cfg(not(unix))]
fn spawn_signal_handlers(
    _loader: Arc<Loader>,
    readiness: Arc<Readiness>,
    stop: watch::Sender<bool>,
) -> Result<(), RunError> {
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        readiness.start_draining();
        let _ = stop.send(true);
    });
    Ok(())
}

/// Reloads and logs the outcome; the current state keeps serving on failure.
pub fn reload(loader: &Loader) {
    match loader.reload() {
        Ok(generation) => tracing::info!(generation, "reloaded policy and keys"),
        Err(problems) => {
            for line in problems.to_string().lines() {
                tracing::error!("reload rejected, previous state keeps serving: {line}");
            }
        }
    }
}
