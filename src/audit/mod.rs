//! Audit: the "record it" step of the request flow, and the stream to the SIEM.
//!
//! ```text
//! request path ──record()──▶ bounded queue ──▶ writer thread ──▶ JSON lines (file / stdout)
//!   (never blocks)                               │  render RFC 5424, append, fsync (batched)
//!                                                ▼
//!                                          spool segments ──▶ shipper thread ──▶ SIEM
//!                                          (on disk)          (udp / tcp / tls, resend window)
//! ```
//!
//! `record` stamps the event (time, `seq`, `event_id` = boot id + seq) and hands it over without
//! waiting; a full queue drops the event and counts it. The writer owns all file I/O, the
//! shipper all network I/O; neither runs on the proxy's runtime. Delivery to syslog is
//! at-least-once (see [`shipper`]); the spool keeps events through SIEM outages and restarts
//! and is the only place they are dropped, past `spool_max_bytes`, counted.
//!
//! This module knows nothing of hyper: it receives owned [`AuditEvent`]s.

mod event;
mod jsonl;
mod metrics;
mod rfc5424;
mod shipper;
mod spool;
mod transport;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};

pub use event::{AuditEvent, DecisionEvent, FIELD_NAMES};
pub use rfc5424::{facility_code, system_hostname, APP_NAME, MIN_MESSAGE_BYTES};
pub use spool::FsyncPolicy;

use event::Stamped;
use metrics::{AuditMetrics, SINK_FILE, SINK_SYSLOG};
use rfc5424::Formatter;
use shipper::{Shipper, ShipperTiming, StopRequest};
use spool::{SpoolPos, SpoolWriter};
use transport::{Scheme, TlsFiles, Transport};
use writer::{Msg, Writer};

/// SD-ID used when `audit.syslog.sd_id` is not set.
pub const DEFAULT_SD_ID: &str = "portcullis@32473";
/// Events the in-memory queue holds before `record` drops.
pub const DEFAULT_QUEUE_CAPACITY: usize = 32_768;
/// Default `spool_max_bytes`: 1 GiB.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
/// Smallest `spool_max_bytes` accepted.
pub const MIN_SPOOL_BYTES: u64 = 64 * 1024;
/// Default `fsync`: group commit every 200 ms. A SIGKILL of portcullis loses nothing that
/// reached the spool (the data is in the kernel's page cache); a power loss or kernel crash can
/// lose the events of at most the last 300 ms (the interval plus the writer's 100 ms tick)
/// that the SIEM has not yet received. `always` makes every
/// batch durable before it ships, at one fsync per batch, which at moderate request rates is
/// one per event.
pub const DEFAULT_FSYNC: &str = "200ms";
/// Default `confirm_after`: how long sent bytes must survive on a live connection.
pub const DEFAULT_CONFIRM_AFTER: Duration = Duration::from_secs(2);

/// The `audit:` block of `portcullis.yaml`.
#[derive(schemars::JsonSchema, Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON lines to this file; `-` means stdout.
    pub file: Option<PathBuf>,
    /// The syslog stream to the SIEM.
    pub syslog: Option<SyslogConfig>,
    /// Refuse traffic (503, not ready) rather than lose audit events.
    #[serde(default)]
    pub fail_closed: bool,
    /// Events the in-memory queue holds (default 32768).
    pub queue_capacity: Option<usize>,
}

/// The `audit.syslog:` block.
#[derive(schemars::JsonSchema, Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// `udp://host:port`, `tcp://host:port` or `tls://host:port`.
    pub url: String,
    /// CA bundle for `tls://` (default: the system's CA certificates).
    pub ca: Option<PathBuf>,
    /// Client certificate chain for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Its private key.
    pub client_key: Option<PathBuf>,
    /// TLS name to verify when it differs from the URL's host.
    pub server_name: Option<String>,
    /// Where undelivered events wait (default `spool`, beside the config file).
    pub spool_dir: Option<PathBuf>,
    /// Spool size past which events are dropped and counted (default 1 GiB).
    pub spool_max_bytes: Option<u64>,
    /// Segment file size (default `spool_max_bytes / 16`, between 64 KiB and 64 MiB).
    pub segment_bytes: Option<u64>,
    /// Syslog facility name (default `authpriv`).
    pub facility: Option<String>,
    /// Structured-data ID (default `portcullis@32473`).
    pub sd_id: Option<String>,
    /// `always` (fsync each batch before it ships), `interval` (1 s), a duration such as
    /// `200ms` (that interval; the default), or `never`.
    pub fsync: Option<String>,
    /// HOSTNAME in the header (default: this machine's name).
    pub hostname: Option<String>,
    /// Cap on one message (default 2048 for UDP, 8192 for TCP/TLS); longer fields are cut.
    pub max_message_bytes: Option<usize>,
    /// How long sent bytes must survive on a live connection to count as delivered (default 2s).
    pub confirm_after: Option<String>,
    /// Upper bound on one connection attempt including the TLS handshake (default 5s).
    pub connect_timeout: Option<String>,
    /// Largest wait between reconnect attempts (default 30s).
    pub backoff_max: Option<String>,
}

/// A validated [`SyslogConfig`] with defaults filled in.
#[derive(Debug, Clone)]
struct SyslogSettings {
    endpoint: transport::Endpoint,
    spool_dir: PathBuf,
    spool_max_bytes: u64,
    segment_bytes: u64,
    facility: u8,
    sd_id: String,
    fsync: FsyncPolicy,
    hostname: String,
    max_message_bytes: usize,
    connect_timeout: Duration,
    timing: ShipperTiming,
}

/// The value, or `None` with the problem recorded.
fn keep<T>(problems: &mut Vec<String>, r: Result<T, String>) -> Option<T> {
    r.map_err(|e| problems.push(e)).ok()
}

fn duration(field: &str, value: Option<&str>, default: Duration) -> Result<Duration, String> {
    value.map_or(Ok(default), |v| {
        humantime::parse_duration(v).map_err(|e| format!("audit.syslog.{field}: {v:?}: {e}"))
    })
}

impl SyslogConfig {
    /// The settings with defaults filled in, or every problem found.
    fn settings(&self) -> Result<SyslogSettings, Vec<String>> {
        let mut problems = Vec::new();
        let endpoint = keep(
            &mut problems,
            transport::parse_url(&self.url).map_err(|e| format!("audit.syslog.url: {e}")),
        );
        let udp = matches!(&endpoint, Some(e) if e.scheme == Scheme::Udp);
        let tls = endpoint.as_ref().map(|e| self.check_tls(e.scheme));
        let spool = keep(&mut problems, self.spool_sizes());
        let facility = keep(&mut problems, self.facility_code());
        let sd_id = keep(&mut problems, self.sd_id());
        let fsync = keep(
            &mut problems,
            FsyncPolicy::parse(self.fsync.as_deref().unwrap_or(DEFAULT_FSYNC))
                .map_err(|e| format!("audit.syslog.{e}")),
        );
        let max_message_bytes = keep(&mut problems, self.max_message_bytes(udp));
        let hostname = keep(&mut problems, self.hostname());
        let timing = keep(&mut problems, self.timing());
        let connect_timeout = keep(
            &mut problems,
            duration(
                "connect_timeout",
                self.connect_timeout.as_deref(),
                Duration::from_secs(5),
            ),
        );
        let _ = keep(&mut problems, tls.unwrap_or(Ok(())));
        let (
            Some(endpoint),
            Some((spool_max_bytes, segment_bytes)),
            Some(facility),
            Some(sd_id),
            Some(fsync),
            Some(max_message_bytes),
            Some(hostname),
            Some(timing),
            Some(connect_timeout),
        ) = (
            endpoint,
            spool,
            facility,
            sd_id,
            fsync,
            max_message_bytes,
            hostname,
            timing,
            connect_timeout,
        )
        else {
            return Err(problems);
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(SyslogSettings {
            endpoint,
            spool_dir: self
                .spool_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("spool")),
            spool_max_bytes,
            segment_bytes,
            facility,
            sd_id,
            fsync,
            hostname,
            max_message_bytes,
            connect_timeout,
            timing,
        })
    }

    fn facility_code(&self) -> Result<u8, String> {
        let name = self.facility.as_deref().unwrap_or("authpriv");
        facility_code(name)
            .ok_or_else(|| format!("audit.syslog.facility: unknown facility {name:?}"))
    }

    fn sd_id(&self) -> Result<String, String> {
        let sd_id = self.sd_id.as_deref().unwrap_or(DEFAULT_SD_ID);
        if rfc5424::valid_sd_name(sd_id) {
            Ok(sd_id.to_owned())
        } else {
            Err(format!(
                "audit.syslog.sd_id: {sd_id:?} must be 1-32 printable ASCII characters without \
                 '=', ']', '\"' or space"
            ))
        }
    }

    /// `spool_max_bytes` and `segment_bytes`.
    fn spool_sizes(&self) -> Result<(u64, u64), String> {
        let max = self.spool_max_bytes.unwrap_or(DEFAULT_SPOOL_MAX_BYTES);
        if max < MIN_SPOOL_BYTES {
            return Err(format!(
                "audit.syslog.spool_max_bytes: at least {MIN_SPOOL_BYTES}"
            ));
        }
        match self.segment_bytes {
            Some(0) => Err("audit.syslog.segment_bytes: must be positive".to_owned()),
            Some(n) => Ok((max, n)),
            None => Ok((max, (max / 16).clamp(64 * 1024, 64 << 20))),
        }
    }

    fn max_message_bytes(&self, udp: bool) -> Result<usize, String> {
        let n = self
            .max_message_bytes
            .unwrap_or(if udp { 2048 } else { 8192 });
        let ceiling = if udp { 65_507 } else { 1 << 20 };
        if (MIN_MESSAGE_BYTES..=ceiling).contains(&n) {
            Ok(n)
        } else {
            Err(format!(
                "audit.syslog.max_message_bytes: between {MIN_MESSAGE_BYTES} and {ceiling}"
            ))
        }
    }

    fn hostname(&self) -> Result<String, String> {
        match &self.hostname {
            None => Ok(rfc5424::system_hostname()),
            Some(h)
                if !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Ok(h.clone())
            }
            Some(_) => Err("audit.syslog.hostname: 1-255 printable ASCII characters".to_owned()),
        }
    }

    fn timing(&self) -> Result<ShipperTiming, String> {
        Ok(ShipperTiming {
            confirm_after: duration(
                "confirm_after",
                self.confirm_after.as_deref(),
                DEFAULT_CONFIRM_AFTER,
            )?,
            write_timeout: Duration::from_secs(30),
            backoff_base: Duration::from_millis(100),
            backoff_max: duration(
                "backoff_max",
                self.backoff_max.as_deref(),
                Duration::from_secs(30),
            )?,
        })
    }

    fn tls_files(&self) -> TlsFiles<'_> {
        TlsFiles {
            ca: self.ca.as_deref(),
            client_cert: self.client_cert.as_deref(),
            client_key: self.client_key.as_deref(),
            server_name: self.server_name.as_deref(),
        }
    }

    fn check_tls(&self, scheme: Scheme) -> Result<(), String> {
        if scheme != Scheme::Tls {
            let tls_only = [
                self.ca.is_some(),
                self.client_cert.is_some(),
                self.client_key.is_some(),
                self.server_name.is_some(),
            ];
            return match tls_only.contains(&true) {
                true => Err(
                    "audit.syslog: ca, client_cert, client_key and server_name need a tls:// url"
                        .to_owned(),
                ),
                false => Ok(()),
            };
        }
        transport::tls_connector(&self.tls_files())
            .map(|_| ())
            .map_err(|e| format!("audit.syslog: {e:#}"))
    }
}

fn resolve(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

impl AuditConfig {
    /// Resolves relative paths against `base` (the config file's folder) and fills in the
    /// default `spool_dir` (`spool`, there too). `file: "-"` stays stdout.
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(file) = &mut self.file {
            if !jsonl::is_stdout(file) {
                resolve(base, file);
            }
        }
        if let Some(s) = &mut self.syslog {
            let spool = s.spool_dir.get_or_insert_with(|| PathBuf::from("spool"));
            resolve(base, spool);
            for p in [&mut s.ca, &mut s.client_cert, &mut s.client_key]
                .into_iter()
                .flatten()
            {
                resolve(base, p);
            }
        }
    }

    /// The folders `run` must be able to write: the spool, and the JSON-lines file's folder.
    pub fn writable_paths(&self) -> Vec<(&'static str, PathBuf)> {
        let mut out = Vec::new();
        if let Some(s) = &self.syslog {
            if let Some(spool) = &s.spool_dir {
                out.push(("audit.syslog.spool_dir", spool.clone()));
            }
        }
        if let Some(file) = &self.file {
            if !jsonl::is_stdout(file) {
                let folder = match file.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                out.push(("audit.file", folder));
            }
        }
        out
    }

    /// Every problem with the block, one message each (reads the TLS files to check them).
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
            problems.push("audit.file: empty path".to_owned());
        }
        if self.queue_capacity == Some(0) {
            problems.push("audit.queue_capacity: must be positive".to_owned());
        }
        if let Some(s) = &self.syslog {
            if let Err(p) = s.settings() {
                problems.extend(p);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn sinks(&self) -> Vec<&'static str> {
        let mut sinks = Vec::new();
        if self.syslog.is_some() {
            sinks.push(SINK_SYSLOG);
        }
        if self.file.is_some() {
            sinks.push(SINK_FILE);
        }
        sinks
    }
}

/// State shared by the `Auditor` handles and the writer thread.
pub(crate) struct Shared {
    /// `audit.fail_closed`.
    pub fail_closed: bool,
    /// The last spool or file write failed.
    pub sink_failing: AtomicBool,
    /// A "spool full" error was logged (log once per episode).
    pub spool_full_logged: AtomicBool,
    /// A "queue full" error was logged.
    pub queue_full_logged: AtomicBool,
    /// Bytes in spool segments (writer adds, shipper subtracts).
    pub spool_bytes: Arc<AtomicU64>,
    /// `spool_max_bytes` (u64::MAX without syslog).
    pub spool_limit: u64,
    /// Room one more event needs.
    pub headroom: u64,
    /// The writer has exited.
    pub stopped: AtomicBool,
}

impl Shared {
    fn new(
        config: &AuditConfig,
        settings: Option<&SyslogSettings>,
        spool_bytes: Arc<AtomicU64>,
    ) -> Shared {
        Shared {
            fail_closed: config.fail_closed,
            sink_failing: AtomicBool::new(false),
            spool_full_logged: AtomicBool::new(false),
            queue_full_logged: AtomicBool::new(false),
            spool_bytes,
            spool_limit: settings.map_or(u64::MAX, |s| s.spool_max_bytes),
            headroom: settings.map_or(0, |s| s.max_message_bytes as u64 + 16),
            stopped: AtomicBool::new(false),
        }
    }
}

/// What `shutdown` needs, taken once.
struct Control {
    stop_shipper: Option<(watch::Sender<Option<StopRequest>>, oneshot::Receiver<()>)>,
    published: watch::Receiver<SpoolPos>,
    writer_done: oneshot::Receiver<()>,
}

struct Inner {
    seq: AtomicU64,
    tx: mpsc::Sender<Msg>,
    metrics: AuditMetrics,
    shared: Arc<Shared>,
    sinks: Vec<&'static str>,
    boot_id: String,
    // Touched once, by `shutdown`; never on the request path.
    control: Mutex<Option<Control>>,
}

/// Cheap-to-clone handle used on the request path.
#[derive(Clone)]
pub struct Auditor {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            None => f.write_str("Auditor(disabled)"),
            Some(i) => write!(f, "Auditor(boot {}, sinks {:?})", i.boot_id, i.sinks),
        }
    }
}

fn formatter(settings: Option<&SyslogSettings>, boot_id: &str) -> Formatter {
    match settings {
        Some(s) => Formatter::new(
            boot_id,
            s.facility,
            &s.hostname,
            &s.sd_id,
            s.max_message_bytes,
        ),
        None => Formatter::new(
            boot_id,
            10,
            &rfc5424::system_hostname(),
            DEFAULT_SD_ID,
            8192,
        ),
    }
}

impl Auditor {
    /// Starts the sinks: opens the file and the spool (errors here are startup errors), then a
    /// writer thread and, for syslog, a shipper thread with its own runtime. May be called
    /// inside or outside a tokio runtime.
    pub fn start(config: &AuditConfig, registry: &prometheus::Registry) -> anyhow::Result<Auditor> {
        config
            .validate()
            .map_err(|p| anyhow!("invalid audit config: {}", p.join("; ")))?;
        let sinks = config.sinks();
        if sinks.is_empty() {
            return Ok(Auditor::disabled());
        }
        let metrics = AuditMetrics::register(registry, &sinks).context("audit metrics")?;
        let boot_id = format!("{:016x}", rand::random::<u64>());
        let settings = match &config.syslog {
            Some(s) => Some(s.settings().map_err(|p| anyhow!(p.join("; ")))?),
            None => None,
        };
        let (file, spool, spool_bytes) = open_sinks(config, settings.as_ref())?;
        let start_pos = spool
            .as_ref()
            .map(SpoolWriter::position)
            .unwrap_or_default();
        let (published_tx, published_rx) = watch::channel(start_pos);
        let shared = Arc::new(Shared::new(config, settings.as_ref(), spool_bytes.clone()));
        metrics
            .spool_bytes
            .set(i64::try_from(spool_bytes.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        let stop_shipper = match &settings {
            Some(s) => Some(spawn_shipper(
                s,
                config,
                &metrics,
                &spool_bytes,
                &published_rx,
                start_pos,
            )?),
            None => None,
        };
        let (tx, rx) = mpsc::channel(config.queue_capacity.unwrap_or(DEFAULT_QUEUE_CAPACITY));
        let writer_done = spawn_writer(Writer {
            rx,
            formatter: formatter(settings.as_ref(), &boot_id),
            spool,
            file,
            metrics: metrics.clone(),
            shared: shared.clone(),
            published: published_tx,
        })?;
        tracing::info!(boot_id = %boot_id, sinks = ?sinks, "audit started");
        let control = Control {
            stop_shipper,
            published: published_rx,
            writer_done,
        };
        Ok(Auditor {
            inner: Some(Arc::new(Inner {
                seq: AtomicU64::new(0),
                tx,
                metrics,
                shared,
                sinks,
                boot_id,
                control: Mutex::new(Some(control)),
            })),
        })
    }

    /// An auditor that records nothing (no `audit:` block): counts nothing, never blocks.
    pub fn disabled() -> Auditor {
        Auditor { inner: None }
    }

    /// Like [`Auditor::disabled`], with the audit metric families registered (at zero) so that
    /// dashboards and alerts find them even when no sink is configured.
    pub fn disabled_on(registry: &prometheus::Registry) -> Auditor {
        if let Err(e) = metrics::AuditMetrics::register(registry, &[]) {
            tracing::warn!(error = %e, "cannot register audit metrics");
        }
        Auditor::disabled()
    }

    /// Whether this auditor records anything.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// This boot's id: the prefix of every `event_id` (None when disabled).
    pub fn boot_id(&self) -> Option<&str> {
        self.inner.as_ref().map(|i| i.boot_id.as_str())
    }

    /// Never blocks and never awaits: stamps time and `seq` (hence `event_id`) and hands the
    /// event to the bounded queue. A full queue drops the event, counted per sink.
    pub fn record(&self, event: AuditEvent) {
        let Some(inner) = &self.inner else { return };
        let seq = inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let stamped = Stamped {
            seq,
            time: OffsetDateTime::now_utc(),
            event,
        };
        inner.metrics.queue_depth.inc();
        if inner.tx.try_send(Msg::Event(stamped)).is_ok() {
            if inner.shared.queue_full_logged.load(Ordering::Relaxed) {
                inner
                    .shared
                    .queue_full_logged
                    .store(false, Ordering::Relaxed);
            }
            return;
        }
        inner.metrics.queue_depth.dec();
        for sink in &inner.sinks {
            inner.metrics.count(sink, "dropped", 1);
        }
        if !inner.shared.queue_full_logged.swap(true, Ordering::Relaxed) {
            tracing::error!("audit queue full or closed; dropping events (counted)");
        }
    }

    /// False when `fail_closed` is set and the queue is full, the spool is full or a sink
    /// cannot be written (or audit has shut down): the proxy then answers 503 and is not ready.
    pub fn accepting(&self) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let s = &inner.shared;
        if !s.fail_closed {
            return true;
        }
        let spool_full = s
            .spool_bytes
            .load(Ordering::Relaxed)
            .saturating_add(s.headroom)
            > s.spool_limit;
        !(spool_full
            || s.sink_failing.load(Ordering::Relaxed)
            || s.stopped.load(Ordering::Relaxed)
            || inner.tx.capacity() == 0)
    }

    /// Flushes what can be flushed (queue → spool → SIEM) within `deadline`, then stops the
    /// threads. Events still unsent stay in the spool for the next start. Call after
    /// recording [`AuditEvent::Shutdown`]; later `record`s are dropped (counted).
    pub async fn shutdown(&self, deadline: Duration) {
        let Some(inner) = &self.inner else { return };
        let Some(control) = inner.control.lock().ok().and_then(|mut c| c.take()) else {
            return;
        };
        let end = Instant::now() + deadline;
        let end_tokio = tokio::time::Instant::from_std(end);
        let (reply_tx, reply_rx) = oneshot::channel();
        let flushed = tokio::time::timeout_at(end_tokio, async {
            inner.tx.send(Msg::Stop(reply_tx)).await.ok()?;
            reply_rx.await.ok()
        })
        .await
        .ok()
        .flatten();
        if flushed.is_none() {
            tracing::warn!("audit: the writer did not flush before the deadline");
        }
        if let Some((stop, done)) = control.stop_shipper {
            let until = flushed.unwrap_or_else(|| *control.published.borrow());
            stop.send_replace(Some(StopRequest {
                until,
                deadline: end,
            }));
            // The shipper stops itself at the deadline; the margin covers its final fsync.
            let _ = tokio::time::timeout_at(end_tokio + Duration::from_millis(500), done).await;
        }
        let _ =
            tokio::time::timeout_at(end_tokio + Duration::from_millis(500), control.writer_done)
                .await;
    }

    /// For tests: the metrics handle.
    #[cfg(test)]
    fn metrics(&self) -> Option<&AuditMetrics> {
        self.inner.as_ref().map(|i| &i.metrics)
    }
}

/// Opens the JSON-lines file and the spool (the startup errors), counting the spool's bytes.
fn open_sinks(
    config: &AuditConfig,
    settings: Option<&SyslogSettings>,
) -> anyhow::Result<(
    Option<jsonl::JsonLines>,
    Option<SpoolWriter>,
    Arc<AtomicU64>,
)> {
    let file = match &config.file {
        Some(path) => Some(
            jsonl::JsonLines::open(path)
                .with_context(|| format!("opening audit file {}", path.display()))?,
        ),
        None => None,
    };
    let spool_bytes = Arc::new(AtomicU64::new(0));
    let spool = match settings {
        Some(s) => Some(
            SpoolWriter::open(
                &s.spool_dir,
                s.spool_max_bytes,
                s.segment_bytes,
                s.fsync,
                spool_bytes.clone(),
            )
            .with_context(|| format!("opening audit spool {}", s.spool_dir.display()))?,
        ),
        None => None,
    };
    Ok((file, spool, spool_bytes))
}

/// Starts the writer thread; the receiver resolves when it has exited (spool lock released).
fn spawn_writer(writer: Writer) -> anyhow::Result<oneshot::Receiver<()>> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("portcullis-audit-writer".to_owned())
        .spawn(move || writer.run(done_tx))
        .context("starting the audit writer thread")?;
    Ok(done_rx)
}

/// Starts the shipper thread; returns its stop channel and completion signal.
fn spawn_shipper(
    s: &SyslogSettings,
    config: &AuditConfig,
    metrics: &AuditMetrics,
    spool_bytes: &Arc<AtomicU64>,
    published: &watch::Receiver<SpoolPos>,
    start_pos: SpoolPos,
) -> anyhow::Result<(watch::Sender<Option<StopRequest>>, oneshot::Receiver<()>)> {
    let syslog = config
        .syslog
        .as_ref()
        .ok_or_else(|| anyhow!("no syslog config"))?;
    let transport = Transport::new(s.endpoint.clone(), &syslog.tls_files(), s.connect_timeout)?;
    let start = spool::start_position(&s.spool_dir, start_pos)
        .with_context(|| format!("reading audit spool {}", s.spool_dir.display()))?;
    let (stop_tx, stop_rx) = watch::channel(None);
    let shipper = Shipper::new(
        s.spool_dir.clone(),
        transport,
        s.timing,
        metrics.clone(),
        spool_bytes.clone(),
        published.clone(),
        stop_rx,
        start,
    );
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("portcullis-audit-shipper".to_owned())
        .spawn(move || {
            // Built here, not by the caller: a runtime must not be dropped inside another.
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(shipper.run()),
                Err(e) => tracing::error!(error = %e, "audit shipper: cannot start"),
            }
            let _ = done_tx.send(());
        })
        .context("starting the audit shipper thread")?;
    Ok((stop_tx, done_rx))
}

/// Records one event synchronously, for the key CLI: appends it to the JSON-lines file and/or
/// to the spool's `incoming/` folder, from where the running proxy's writer (or the next
/// start) ships it. `file: "-"` writes the line to stderr (the CLI's stdout holds the key).
pub fn record_once(config: &AuditConfig, event: AuditEvent) -> anyhow::Result<()> {
    config
        .validate()
        .map_err(|p| anyhow!("invalid audit config: {}", p.join("; ")))?;
    let settings = match &config.syslog {
        Some(s) => Some(s.settings().map_err(|p| anyhow!(p.join("; ")))?),
        None => None,
    };
    let boot_id = format!("{:016x}", rand::random::<u64>());
    let f = formatter(settings.as_ref(), &boot_id);
    let stamped = Stamped {
        seq: 1,
        time: OffsetDateTime::now_utc(),
        event,
    };
    if let Some(path) = &config.file {
        jsonl::append_once(path, &f.json(&stamped))
            .with_context(|| format!("writing audit file {}", path.display()))?;
    }
    if let Some(s) = &settings {
        spool::write_incoming(&s.spool_dir, &[f.syslog(&stamped)])
            .with_context(|| format!("writing audit spool {}", s.spool_dir.display()))?;
    }
    Ok(())
}

/// Renders `event` the way the syslog sink (RFC 5424, at most `max_bytes`) and the JSON-lines
/// sink do, without any I/O: what the fuzz target and property tests drive.
pub fn render_event(
    event: AuditEvent,
    hostname: &str,
    sd_id: &str,
    max_bytes: usize,
) -> (Vec<u8>, String) {
    let formatter = rfc5424::Formatter::new("fuzzboot", 10, hostname, sd_id, max_bytes);
    let stamped = event::Stamped {
        seq: 1,
        time: time::OffsetDateTime::UNIX_EPOCH,
        event,
    };
    (formatter.syslog(&stamped), formatter.json(&stamped))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::BufRead;
    use tokio::io::AsyncReadExt;

    fn decision(n: u64) -> AuditEvent {
        AuditEvent::Decision(DecisionEvent {
            request_id: format!("req-{n}"),
            allow: n.is_multiple_of(2),
            reason: if n.is_multiple_of(2) {
                "granted"
            } else {
                "forbidden"
            },
            status: if n.is_multiple_of(2) { 200 } else { 403 },
            method: "GET".into(),
            path: format!("/v1/datasets/{n}"),
            client_ip: "127.0.0.1".into(),
            ..DecisionEvent::default()
        })
    }

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn metric(a: &Auditor, sink: &str, result: &str) -> u64 {
        a.metrics().map_or(0, |m| m.get(sink, result))
    }

    /// An auditor whose queue nobody reads.
    fn stalled(capacity: usize, fail_closed: bool) -> (Auditor, mpsc::Receiver<Msg>) {
        let (tx, rx) = mpsc::channel(capacity);
        let (_, published) = watch::channel(SpoolPos::default());
        let (_, writer_done) = oneshot::channel();
        let inner = Inner {
            seq: AtomicU64::new(0),
            tx,
            metrics: AuditMetrics::new().unwrap(),
            shared: Arc::new(Shared {
                fail_closed,
                sink_failing: AtomicBool::new(false),
                spool_full_logged: AtomicBool::new(false),
                queue_full_logged: AtomicBool::new(false),
                spool_bytes: Arc::new(AtomicU64::new(0)),
                spool_limit: u64::MAX,
                headroom: 0,
                stopped: AtomicBool::new(false),
            }),
            sinks: vec![SINK_SYSLOG, SINK_FILE],
            boot_id: "test".into(),
            control: Mutex::new(Some(Control {
                stop_shipper: None,
                published,
                writer_done,
            })),
        };
        (
            Auditor {
                inner: Some(Arc::new(inner)),
            },
            rx,
        )
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let (a, mut rx) = stalled(3, false);
        for n in 0..10 {
            a.record(decision(n));
        }
        assert_eq!(metric(&a, SINK_SYSLOG, "dropped"), 7);
        assert_eq!(metric(&a, SINK_FILE, "dropped"), 7);
        assert_eq!(a.metrics().map(|m| m.queue_depth.get()), Some(3));
        assert!(a.accepting(), "fail-open keeps accepting");
        let seqs: Vec<u64> = std::iter::from_fn(|| match rx.try_recv() {
            Ok(Msg::Event(s)) => Some(s.seq),
            _ => None,
        })
        .collect();
        assert_eq!(
            seqs,
            [1, 2, 3],
            "the dropped events leave a visible gap in seq"
        );
    }

    #[test]
    fn fail_closed_stops_accepting_when_the_queue_is_full() {
        let (a, mut rx) = stalled(2, true);
        a.record(decision(1));
        assert!(a.accepting());
        a.record(decision(2));
        assert!(!a.accepting());
        let _ = rx.try_recv();
        assert!(a.accepting());
    }

    #[test]
    fn auditor_is_shareable_across_tasks() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<Auditor>();
    }

    #[test]
    fn disabled_records_nothing() {
        let a = Auditor::disabled();
        a.record(decision(1));
        assert!(a.accepting());
        assert!(!a.is_enabled());
    }

    #[tokio::test]
    async fn json_lines_get_every_event_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            file: Some(dir.path().join("audit.jsonl")),
            ..AuditConfig::default()
        };
        let registry = prometheus::Registry::new();
        let a = Auditor::start(&config, &registry).unwrap();
        a.record(AuditEvent::Start { version: "1" });
        for n in 0..100 {
            a.record(decision(n));
        }
        a.record(AuditEvent::Shutdown);
        a.shutdown(Duration::from_secs(5)).await;
        let f = std::fs::File::open(dir.path().join("audit.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = std::io::BufReader::new(f)
            .lines()
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
            .collect();
        assert_eq!(lines.len(), 102);
        let boot = a.boot_id().unwrap_or_default().to_owned();
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["seq"], i as u64 + 1);
            assert_eq!(l["event_id"], format!("{boot}-{}", i + 1));
        }
        assert_eq!(lines[0]["kind"], "start");
        assert_eq!(lines[101]["kind"], "shutdown");
        assert_eq!(metric(&a, SINK_FILE, "sent"), 102);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(text.contains("portcullis_audit_events_total{result=\"sent\",sink=\"file\"} 102"));
        assert!(text.contains("portcullis_audit_queue_depth 0"));
        a.record(decision(1000));
        assert_eq!(
            metric(&a, SINK_FILE, "dropped"),
            1,
            "after shutdown, counted"
        );
    }

    #[tokio::test]
    async fn full_spool_drops_counted_and_fail_closed_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            syslog: Some(SyslogConfig {
                // Nothing listens on port 9 of loopback (discard); the spool must absorb.
                url: "tcp://127.0.0.1:9".into(),
                spool_dir: Some(dir.path().join("spool")),
                spool_max_bytes: Some(MIN_SPOOL_BYTES),
                fsync: Some("never".into()),
                ..SyslogConfig::default()
            }),
            fail_closed: true,
            ..AuditConfig::default()
        };
        let a = Auditor::start(&config, &prometheus::Registry::new()).unwrap();
        assert!(a.accepting());
        for n in 0..300 {
            a.record(decision(n));
        }
        eventually("all 300 accounted for", || {
            metric(&a, SINK_SYSLOG, "spooled") + metric(&a, SINK_SYSLOG, "dropped") == 300
        })
        .await;
        let dropped = metric(&a, SINK_SYSLOG, "dropped");
        assert!(dropped > 0 && dropped < 300, "{dropped}");
        assert!(!a.accepting());
        assert_eq!(metric(&a, SINK_SYSLOG, "sent"), 0);
        a.shutdown(Duration::from_millis(200)).await;
        let on_disk: u64 = spool::list_segments(&dir.path().join("spool"))
            .unwrap()
            .iter()
            .map(|s| s.1)
            .sum();
        assert!(on_disk <= MIN_SPOOL_BYTES, "{on_disk}");
    }

    /// Takes one octet-counted frame off the front of `buf`.
    fn take_frame(buf: &mut Vec<u8>) -> Option<String> {
        let sp = buf.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&buf[..sp]).ok()?.parse().ok()?;
        let end = sp + 1 + len;
        if buf.len() < end {
            return None;
        }
        let msg = String::from_utf8_lossy(&buf[sp + 1..end]).into_owned();
        buf.drain(..end);
        Some(msg)
    }

    /// A receiver that reads five frames on its first connection, then resets it; the
    /// shipper must resend from its last confirmed point and nothing may be missing.
    #[tokio::test]
    async fn reconnect_resends_everything_unconfirmed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut frames = 0;
                loop {
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(msg) = take_frame(&mut buf) {
                        sink.lock().unwrap().push(msg);
                        frames += 1;
                    }
                    if first && frames >= 5 {
                        break;
                    }
                }
                first = false;
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            syslog: Some(SyslogConfig {
                url: format!("tcp://127.0.0.1:{port}"),
                spool_dir: Some(dir.path().to_owned()),
                confirm_after: Some("10s".into()),
                backoff_max: Some("200ms".into()),
                fsync: Some("never".into()),
                ..SyslogConfig::default()
            }),
            ..AuditConfig::default()
        };
        let a = Auditor::start(&config, &prometheus::Registry::new()).unwrap();
        for n in 0..20 {
            a.record(decision(n));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let boot = a.boot_id().unwrap_or_default().to_owned();
        let ids = |r: &Arc<Mutex<Vec<String>>>| -> std::collections::BTreeSet<u64> {
            r.lock()
                .unwrap()
                .iter()
                .filter_map(|m| {
                    let i = m.find(&format!("event_id=\"{boot}-"))?;
                    let rest = &m[i + 11 + boot.len()..];
                    rest[..rest.find('"')?].parse().ok()
                })
                .collect()
        };
        eventually("all 20 event ids", || ids(&received).len() == 20).await;
        assert!(received.lock().unwrap().len() > 20, "some were resent");
        assert!(a.metrics().map_or(0, |m| m.reconnects.get()) >= 1);
        a.shutdown(Duration::from_secs(5)).await;
    }

    /// After bytes survive `confirm_after` on a live connection they count as delivered: a
    /// later reconnect resends nothing before that point.
    #[tokio::test]
    async fn confirmed_events_are_not_resent_after_a_reconnect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::<String>::new()));
        let hang_up = Arc::new(tokio::sync::Notify::new());
        let (sink, hang) = (received.clone(), hang_up.clone());
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = tokio::select! {
                        n = conn.read(&mut chunk) => n.unwrap_or(0),
                        _ = hang.notified(), if first => 0,
                    };
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(msg) = take_frame(&mut buf) {
                        sink.lock().unwrap().push(msg);
                    }
                }
                first = false;
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            syslog: Some(SyslogConfig {
                url: format!("tcp://127.0.0.1:{port}"),
                spool_dir: Some(dir.path().to_owned()),
                confirm_after: Some("100ms".into()),
                backoff_max: Some("200ms".into()),
                ..SyslogConfig::default()
            }),
            ..AuditConfig::default()
        };
        let a = Auditor::start(&config, &prometheus::Registry::new()).unwrap();
        for n in 1..=10 {
            a.record(decision(n));
        }
        eventually("10 received", || received.lock().unwrap().len() == 10).await;
        let segment_len = || {
            spool::list_segments(dir.path())
                .unwrap()
                .last()
                .map_or(0, |s| s.1)
        };
        eventually("the shipped offset to reach the end", || {
            spool::load_shipped(dir.path()).is_some_and(|p| p.offset == segment_len())
        })
        .await;
        hang_up.notify_one();
        for n in 11..=15 {
            a.record(decision(n));
        }
        let boot = a.boot_id().unwrap_or_default().to_owned();
        let last = format!("event_id=\"{boot}-15\"");
        eventually("the 15th event", || {
            received.lock().unwrap().iter().any(|m| m.contains(&last))
        })
        .await;
        assert_eq!(
            received.lock().unwrap().len(),
            15,
            "nothing confirmed was resent"
        );
        a.shutdown(Duration::from_secs(5)).await;
    }

    #[test]
    fn record_once_writes_file_and_incoming() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            file: Some(dir.path().join("a.jsonl")),
            syslog: Some(SyslogConfig {
                url: "tcp://127.0.0.1:9".into(),
                spool_dir: Some(dir.path().join("spool")),
                ..SyslogConfig::default()
            }),
            ..AuditConfig::default()
        };
        let event = AuditEvent::KeyChange {
            action: "key_create",
            key_id: None,
            principal: None,
            target_key_id: "k1".into(),
            target_principal: "alice".into(),
            result: "ok".into(),
            via: "cli",
        };
        record_once(&config, event).unwrap();
        let line = std::fs::read_to_string(dir.path().join("a.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["action"], "key_create");
        assert_eq!(v["via"], "cli");
        let incoming: Vec<_> = std::fs::read_dir(dir.path().join("spool/incoming"))
            .unwrap()
            .collect();
        assert_eq!(incoming.len(), 1);
    }

    #[test]
    fn config_parses_resolves_and_validates() {
        let yaml = "file: audit.jsonl\nsyslog:\n  url: tls://siem:6514\n  ca: tls/ca.pem\n";
        let mut c: AuditConfig = serde_yaml::from_str(yaml).unwrap();
        c.resolve_paths(Path::new("/etc/portcullis"));
        assert_eq!(
            c.file.as_deref(),
            Some(Path::new("/etc/portcullis/audit.jsonl"))
        );
        let s = c.syslog.as_ref().unwrap();
        assert_eq!(
            s.ca.as_deref(),
            Some(Path::new("/etc/portcullis/tls/ca.pem"))
        );
        assert_eq!(
            s.spool_dir.as_deref(),
            Some(Path::new("/etc/portcullis/spool"))
        );
        let problems = c.validate().unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("ca.pem")),
            "{problems:?}"
        );

        let mut stdout = AuditConfig {
            file: Some("-".into()),
            ..AuditConfig::default()
        };
        stdout.resolve_paths(Path::new("/x"));
        assert_eq!(stdout.file.as_deref(), Some(Path::new("-")));

        assert!(serde_yaml::from_str::<AuditConfig>("syslog:\n  url: x\n  acess: 1\n").is_err());
        let bad = AuditConfig {
            syslog: Some(SyslogConfig {
                url: "http://x".into(),
                facility: Some("nope".into()),
                sd_id: Some("a b".into()),
                fsync: Some("sometimes".into()),
                spool_max_bytes: Some(10),
                max_message_bytes: Some(100),
                confirm_after: Some("soon".into()),
                ..SyslogConfig::default()
            }),
            queue_capacity: Some(0),
            ..AuditConfig::default()
        };
        let problems = bad.validate().unwrap_err();
        assert_eq!(problems.len(), 8, "{problems:#?}");
        let udp_with_ca = AuditConfig {
            syslog: Some(SyslogConfig {
                url: "udp://h:514".into(),
                ca: Some("ca.pem".into()),
                ..SyslogConfig::default()
            }),
            ..AuditConfig::default()
        };
        assert!(udp_with_ca.validate().is_err());
    }
}
