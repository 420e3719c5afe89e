//! The shipper: streams the spool to the SIEM in order, on its own thread and runtime, so the
//! proxy's runtime never does audit network or file I/O.
//!
//! Plain syslog has no acknowledgement, so delivery is at-least-once by construction:
//! - `cursor` is the next byte to send; `committed` is the last point known delivered, persisted
//!   to `spool/shipped`. After any reconnect (and after a restart) sending resumes from
//!   `committed`: duplicates are possible, gaps are not.
//! - Bytes written on a stream count as delivered once the connection has stayed up for
//!   `confirm_after` since they were written and the receiver has not closed it (a receiver that
//!   dies closes or resets the connection; anything it had not read is inside that window). A
//!   write that stalls on backpressure restarts the clock for everything in flight, since data
//!   is evidently still queued in socket buffers.
//! - At shutdown the shipper half-closes the stream and waits for the receiver to close its
//!   side: the receiver has then read everything, so all of it is committed.
//! - UDP cannot be confirmed; a datagram counts as shipped once sent.
//! - Segments wholly before `committed` are deleted, which is what frees spool space.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf};
use tokio::sync::watch;

use super::metrics::{AuditMetrics, SINK_SYSLOG};
use super::spool::{self, Batch, SpoolPos, SpoolReader};
use super::transport::{Backoff, Conn, Stream, Transport};

/// Bytes read from the spool and written per batch.
const BATCH_BYTES: usize = 256 * 1024;
/// A write slower than this means the receiver is pushing back.
const SLOW_WRITE: Duration = Duration::from_millis(100);
/// How often `spool/shipped` is rewritten while the offset moves.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Largest UDP payload (IPv4).
const UDP_MAX: usize = 65_507;
/// A connection that lasted this long resets the backoff even without a confirmation.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Asks the shipper to deliver up to `until` and stop by `deadline`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StopRequest {
    /// The writer's final position.
    pub until: SpoolPos,
    /// When to give up.
    pub deadline: Instant,
}

/// Timing knobs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShipperTiming {
    /// How long written bytes must survive on a live connection to count as delivered.
    pub confirm_after: Duration,
    /// Upper bound on one batch write before the connection is given up.
    pub write_timeout: Duration,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
}

/// Why a connection ended.
enum SessionEnd {
    /// Shutdown finished (or its deadline passed).
    Stopped,
    /// The connection broke; resend from `committed`.
    Lost(String),
}

/// Ships one spool directory.
pub(crate) struct Shipper {
    dir: PathBuf,
    transport: Transport,
    timing: ShipperTiming,
    backoff: Backoff,
    metrics: AuditMetrics,
    total: Arc<AtomicU64>,
    published: watch::Receiver<SpoolPos>,
    stop: watch::Receiver<Option<StopRequest>>,
    reader: SpoolReader,
    cursor: SpoolPos,
    committed: SpoolPos,
    persisted: SpoolPos,
    last_persist: Instant,
    high_water: SpoolPos,
    in_flight: VecDeque<(SpoolPos, Instant)>,
    confirmed_in_session: bool,
}

impl Shipper {
    /// A shipper starting at `start` (see [`spool::start_position`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dir: PathBuf,
        transport: Transport,
        timing: ShipperTiming,
        metrics: AuditMetrics,
        total: Arc<AtomicU64>,
        published: watch::Receiver<SpoolPos>,
        stop: watch::Receiver<Option<StopRequest>>,
        start: SpoolPos,
    ) -> Shipper {
        Shipper {
            reader: SpoolReader::new(&dir),
            dir,
            transport,
            backoff: Backoff::new(timing.backoff_base, timing.backoff_max),
            timing,
            metrics,
            total,
            published,
            stop,
            cursor: start,
            committed: start,
            persisted: start,
            last_persist: Instant::now(),
            high_water: start,
            in_flight: VecDeque::new(),
            confirmed_in_session: false,
        }
    }

    /// The stop request; a dropped `Auditor` (closed channel) means "stop now".
    fn stop_request(&self) -> Option<StopRequest> {
        if let Some(s) = *self.stop.borrow() {
            return Some(s);
        }
        self.stop.has_changed().is_err().then(|| StopRequest {
            until: SpoolPos::default(),
            deadline: Instant::now(),
        })
    }

    /// Connects, ships, reconnects with backoff, until a stop request is done.
    pub async fn run(mut self) {
        let endpoint = self.transport.endpoint().clone();
        let target = format!("{}:{}", endpoint.host, endpoint.port);
        let mut down_logged = false;
        loop {
            if let Some(stop) = self.stop_request() {
                if self.committed >= stop.until || Instant::now() >= stop.deadline {
                    break;
                }
            }
            let attempt = self.connect().await;
            match attempt {
                Ok(conn) => {
                    tracing::info!(syslog = %target, "audit: connected to syslog");
                    down_logged = false;
                    if self.ship_on(conn, &target).await {
                        break;
                    }
                }
                Err(e) => {
                    self.metrics.reconnects.inc();
                    if !down_logged {
                        tracing::warn!(syslog = %target, error = %format!("{e:#}"),
                            "audit: cannot reach syslog; events wait in the spool");
                        down_logged = true;
                    }
                }
            }
            if self.stop_request().is_some() {
                break;
            }
            let delay = self.backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.changed() => {}
            }
        }
        self.persist(true);
    }

    /// Runs one session; true when shutdown is done, false when the connection was lost.
    async fn ship_on(&mut self, conn: Conn, target: &str) -> bool {
        self.metrics.connected.set(1);
        let began = Instant::now();
        self.confirmed_in_session = false;
        let end = self.session(conn).await;
        self.metrics.connected.set(0);
        self.rewind();
        match end {
            SessionEnd::Stopped => true,
            SessionEnd::Lost(why) => {
                self.metrics.reconnects.inc();
                tracing::warn!(syslog = %target, error = %why,
                    "audit: syslog connection lost; resending from the last confirmed event");
                if self.confirmed_in_session || began.elapsed() >= STABLE_SESSION {
                    self.backoff.reset();
                }
                false
            }
        }
    }

    /// One connection attempt; during shutdown bounded by the deadline.
    async fn connect(&self) -> anyhow::Result<Conn> {
        match self.stop_request() {
            Some(s) => {
                let left = s.deadline.saturating_duration_since(Instant::now());
                tokio::time::timeout(left, self.transport.connect())
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("shutdown deadline")))
            }
            None => self.transport.connect().await,
        }
    }

    /// After a session: forget what was in flight and resend from the last sure point.
    fn rewind(&mut self) {
        self.in_flight.clear();
        self.cursor = self.committed;
        self.persist(false);
    }

    async fn session(&mut self, conn: Conn) -> SessionEnd {
        match conn {
            Conn::Udp(socket) => self.udp_session(socket).await,
            Conn::Stream(stream) => self.stream_session(stream).await,
        }
    }

    /// The next spool batch from the cursor, or `None` when the spool has nothing more yet.
    fn next_batch(&mut self) -> Result<Option<Batch>, String> {
        let published = *self.published.borrow_and_update();
        let batch = self
            .reader
            .read(self.cursor, published, BATCH_BYTES)
            .map_err(|e| format!("reading the spool: {e}"))?;
        if batch.skipped > 0 {
            tracing::warn!(
                segment = self.cursor.segment,
                bytes = batch.skipped,
                "audit: skipped a torn tail at the end of a spool segment"
            );
        }
        Ok((batch.end != self.cursor).then_some(batch))
    }

    /// Counts first sends and resends of the batch's records.
    fn count_sent(&mut self, batch: &Batch) {
        let (mut sent, mut resent) = (0, 0);
        for (_, end) in &batch.records {
            let pos = SpoolPos {
                segment: self.cursor.segment,
                offset: *end,
            };
            if pos > self.high_water {
                sent += 1;
            } else {
                resent += 1;
            }
        }
        self.high_water = self.high_water.max(batch.end);
        self.metrics.count(SINK_SYSLOG, "sent", sent);
        self.metrics.resent.inc_by(resent);
    }

    /// Waits for more spool data, a stop request, or `wake`. A closed channel is not a
    /// wake-up (the writer may exit before the stop request arrives).
    async fn idle(&mut self, wake: Duration) {
        let writer_open = self.published.has_changed().is_ok();
        let stop_open = self.stop.has_changed().is_ok();
        tokio::select! {
            _ = self.published.changed(), if writer_open => {}
            _ = self.stop.changed(), if stop_open => {}
            _ = tokio::time::sleep(wake) => {}
        }
    }

    async fn udp_session(&mut self, socket: tokio::net::UdpSocket) -> SessionEnd {
        loop {
            self.maybe_persist();
            if let Some(stop) = self.stop_request() {
                if self.cursor >= stop.until || Instant::now() >= stop.deadline {
                    return SessionEnd::Stopped;
                }
            }
            let batch = match self.next_batch() {
                Ok(Some(b)) => b,
                Ok(None) => {
                    self.idle(self.next_wake()).await;
                    continue;
                }
                Err(e) => return SessionEnd::Lost(e),
            };
            let segment = self.cursor.segment;
            for (msg, end) in &batch.records {
                let payload = &batch.bytes[msg.clone()];
                if payload.len() > UDP_MAX {
                    self.metrics.count(SINK_SYSLOG, "dropped", 1);
                } else if let Err(e) = socket.send(payload).await {
                    return SessionEnd::Lost(format!("udp send: {e}"));
                } else if (SpoolPos {
                    segment,
                    offset: *end,
                }) > self.high_water
                {
                    self.metrics.count(SINK_SYSLOG, "sent", 1);
                } else {
                    self.metrics.resent.inc();
                }
                self.cursor.offset = *end;
                self.committed = self.cursor;
            }
            self.high_water = self.high_water.max(batch.end);
            self.cursor = batch.end;
            self.committed = batch.end;
            self.confirmed_in_session = true;
        }
    }

    async fn stream_session(&mut self, stream: Box<dyn Stream>) -> SessionEnd {
        let (read, mut write) = tokio::io::split(stream);
        let closed = peer_closed(read);
        tokio::pin!(closed);
        loop {
            // A close that already arrived must win over confirming what is in flight.
            tokio::select! {
                biased;
                why = &mut closed => return SessionEnd::Lost(why),
                _ = std::future::ready(()) => {}
            }
            self.confirm();
            self.maybe_persist();
            if let Some(stop) = self.stop_request() {
                if self.cursor >= stop.until {
                    return self.close(write, closed, stop.deadline).await;
                }
                if Instant::now() >= stop.deadline {
                    return SessionEnd::Stopped;
                }
            }
            let batch = match self.next_batch() {
                Ok(Some(b)) => b,
                Ok(None) => {
                    let wake = self.next_wake();
                    tokio::select! {
                        biased;
                        why = &mut closed => return SessionEnd::Lost(why),
                        _ = self.idle(wake) => {}
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "audit: cannot read the spool");
                    tokio::select! {
                        why = &mut closed => return SessionEnd::Lost(why),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            let began = Instant::now();
            if !batch.bytes.is_empty() {
                if let Err(end) = self
                    .write_batch(&mut write, &mut closed, &batch.bytes)
                    .await
                {
                    return end;
                }
                self.count_sent(&batch);
            }
            self.track(batch.end, batch.bytes.is_empty(), began);
        }
    }

    /// Writes one batch, giving up when the receiver closes, the write stalls past the write
    /// timeout, or the shutdown deadline passes.
    async fn write_batch<W, C>(
        &mut self,
        write: &mut W,
        closed: &mut C,
        bytes: &[u8],
    ) -> Result<(), SessionEnd>
    where
        W: tokio::io::AsyncWrite + Unpin,
        C: std::future::Future<Output = String> + Unpin,
    {
        let timeout = self.timing.write_timeout;
        let send = tokio::time::timeout(timeout, async {
            write.write_all(bytes).await?;
            write.flush().await
        });
        tokio::pin!(send);
        loop {
            let deadline = self.stop_request().map(|s| s.deadline);
            let stop_open = self.stop.has_changed().is_ok();
            tokio::select! {
                biased;
                why = &mut *closed => return Err(SessionEnd::Lost(why)),
                r = &mut send => return match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(SessionEnd::Lost(format!("write: {e}"))),
                    Err(_) => Err(SessionEnd::Lost(format!("write stalled for {timeout:?}"))),
                },
                _ = sleep_until(deadline) => return Err(SessionEnd::Stopped),
                // A stop request may bring a deadline: look again.
                _ = self.stop.changed(), if stop_open => {}
            }
        }
    }

    /// Puts a written batch (ending at `end`) in flight. A write that took long means data is
    /// queued in socket buffers, so everything in flight restarts its confirmation clock.
    fn track(&mut self, end: SpoolPos, empty: bool, began: Instant) {
        let now = Instant::now();
        if now.duration_since(began) > SLOW_WRITE {
            for entry in &mut self.in_flight {
                entry.1 = now;
            }
        }
        // A segment switch carries no bytes: it confirms as soon as what precedes it does.
        let written = if empty {
            now.checked_sub(self.timing.confirm_after).unwrap_or(now)
        } else {
            now
        };
        self.in_flight.push_back((end, written));
        self.cursor = end;
    }

    /// Commits what has been in flight for `confirm_after` on a live connection.
    fn confirm(&mut self) {
        while let Some((pos, written)) = self.in_flight.front().copied() {
            if written.elapsed() < self.timing.confirm_after {
                break;
            }
            self.committed = pos;
            self.confirmed_in_session = true;
            self.in_flight.pop_front();
        }
    }

    /// When the idle loop must look again: the next confirmation or offset write due.
    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let due = |at: Instant| at.saturating_duration_since(now) + Duration::from_millis(1);
        let confirm = self
            .in_flight
            .front()
            .map(|(_, t)| due(*t + self.timing.confirm_after));
        let persist =
            (self.committed != self.persisted).then(|| due(self.last_persist + PERSIST_EVERY));
        [confirm, persist]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(Duration::from_secs(5))
    }

    /// Half-closes and waits for the receiver to close too: then it has read everything.
    async fn close<W, F>(&mut self, mut write: W, closed: F, deadline: Instant) -> SessionEnd
    where
        W: tokio::io::AsyncWrite + Unpin,
        F: std::future::Future<Output = String>,
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let done = async {
            write.shutdown().await.map_err(|e| e.to_string())?;
            closed.await;
            Ok::<(), String>(())
        };
        match tokio::time::timeout(left, done).await {
            Ok(Ok(())) => {
                self.committed = self.cursor;
                self.in_flight.clear();
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "audit: closing the syslog connection"),
            Err(_) => tracing::warn!("audit: syslog did not confirm the last events before the deadline; they stay spooled"),
        }
        SessionEnd::Stopped
    }

    fn maybe_persist(&mut self) {
        if self.committed != self.persisted
            && (self.last_persist.elapsed() >= PERSIST_EVERY
                || self.committed.segment != self.persisted.segment)
        {
            self.persist(false);
        }
    }

    /// Writes the committed offset and deletes the segments wholly before it.
    fn persist(&mut self, sync: bool) {
        if self.committed == self.persisted && !sync {
            return;
        }
        if let Err(e) = spool::store_shipped(&self.dir, self.committed, sync) {
            tracing::warn!(error = %e, "audit: cannot record the shipped offset");
            return;
        }
        self.last_persist = Instant::now();
        if self.committed.segment > self.persisted.segment || sync {
            if let Err(e) = spool::delete_before(&self.dir, self.committed.segment, &self.total) {
                tracing::warn!(error = %e, "audit: cannot delete shipped spool segments");
            }
            self.metrics
                .spool_bytes
                .set(i64::try_from(self.total.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        }
        self.persisted = self.committed;
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the receiver closes or resets the connection (syslog receivers never send).
async fn peer_closed<R: AsyncRead>(mut read: ReadHalf<R>) -> String {
    let mut buf = [0u8; 1024];
    loop {
        match read.read(&mut buf).await {
            Ok(0) => return "closed by the receiver".to_owned(),
            Ok(_) => {}
            Err(e) => return format!("read: {e}"),
        }
    }
}
