//! The writer thread: the other end of the bounded queue that `Auditor::record` feeds. It
//! renders each event, appends it to the JSON-lines sink and the spool in batches (one write and
//! at most one fsync per batch), and tells the shipper how far the spool reaches.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::event::Stamped;
use super::jsonl::JsonLines;
use super::metrics::{AuditMetrics, SINK_FILE, SINK_SYSLOG};
use super::rfc5424::Formatter;
use super::spool::{SpoolPos, SpoolWriter};
use super::Shared;

/// Most events taken from the queue per batch.
const BATCH: usize = 4096;
/// How often the writer wakes without events (fsync interval, rotation, CLI records).
const TICK: Duration = Duration::from_millis(100);
/// How long the writer gathers events after the first of a batch arrives.
const GATHER: Duration = Duration::from_millis(2);
/// How often `incoming/` is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What travels through the queue. Events are unboxed on purpose: they are nearly every
/// message, and boxing would add an allocation on the request path.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Msg {
    /// An event to write.
    Event(Stamped),
    /// Write everything queued so far, sync, answer with the final spool position, and exit.
    Stop(oneshot::Sender<SpoolPos>),
}

/// The writer thread's state.
pub(crate) struct Writer {
    /// The queue's receiving end.
    pub rx: mpsc::Receiver<Msg>,
    /// Renders JSON and RFC 5424.
    pub formatter: Formatter,
    /// The spool, when syslog is configured.
    pub spool: Option<SpoolWriter>,
    /// The JSON-lines sink, when configured.
    pub file: Option<JsonLines>,
    /// Counters.
    pub metrics: AuditMetrics,
    /// State read by `accepting()`.
    pub shared: Arc<Shared>,
    /// Where the spool's complete records end, for the shipper.
    pub published: watch::Sender<SpoolPos>,
}

/// Per-batch tallies, counted once the batch is committed.
#[derive(Default)]
struct Tally {
    file_lines: u64,
    spooled: u64,
    spool_full: u64,
}

impl Writer {
    /// Runs until stopped or until every `Auditor` is gone, then signals `done`.
    pub fn run(mut self, done: oneshot::Sender<()>) {
        match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt.block_on(self.run_loop()),
            Err(e) => tracing::error!(error = %e, "audit writer: cannot start"),
        }
        self.shared.stopped.store(true, Ordering::Relaxed);
        drop(self.spool.take());
        let _ = done.send(());
    }

    async fn run_loop(&mut self) {
        self.sweep_incoming();
        let mut last_sweep = Instant::now();
        let mut batch = Vec::with_capacity(BATCH);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                n = self.rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        self.sync();
                        return;
                    }
                    // Group commit: give the request path a moment to hand over more events,
                    // so at moderate rates one write, one fsync and one wake-up of the shipper
                    // serve many events, and sending an event rarely has to wake this thread.
                    if batch.len() < BATCH {
                        tokio::time::sleep(GATHER).await;
                        while batch.len() < BATCH {
                            match self.rx.try_recv() {
                                Ok(msg) => batch.push(msg),
                                Err(_) => break,
                            }
                        }
                    }
                    if let Some(reply) = self.handle(&mut batch) {
                        self.stop(reply);
                        return;
                    }
                }
                _ = tick.tick() => {
                    if last_sweep.elapsed() >= SWEEP_EVERY {
                        self.sweep_incoming();
                        last_sweep = Instant::now();
                    }
                    self.tick();
                }
            }
        }
    }

    /// Writes one batch; returns the stop request if the batch held one.
    fn handle(&mut self, batch: &mut Vec<Msg>) -> Option<oneshot::Sender<SpoolPos>> {
        let mut tally = Tally::default();
        let mut stop = None;
        for msg in batch.drain(..) {
            match msg {
                Msg::Event(s) => {
                    self.metrics.queue_depth.dec();
                    self.write(&s, &mut tally);
                }
                Msg::Stop(reply) => stop = Some(reply),
            }
        }
        self.commit(tally);
        stop
    }

    fn write(&mut self, s: &Stamped, tally: &mut Tally) {
        if let Some(file) = &mut self.file {
            match file.write_line(&self.formatter.json(s)) {
                Ok(()) => tally.file_lines += 1,
                Err(e) => {
                    self.metrics.count(SINK_FILE, "dropped", 1);
                    self.fail("audit file", &e);
                }
            }
        }
        if let Some(spool) = &mut self.spool {
            if spool.append(&self.formatter.syslog(s)) {
                tally.spooled += 1;
            } else {
                tally.spool_full += 1;
            }
        }
    }

    fn commit(&mut self, tally: Tally) {
        let mut ok = true;
        if let Some(file) = &mut self.file {
            match file.flush() {
                Ok(()) => self.metrics.count(SINK_FILE, "sent", tally.file_lines),
                Err(e) => {
                    self.metrics.count(SINK_FILE, "dropped", tally.file_lines);
                    ok = false;
                    self.fail("audit file", &e);
                }
            }
        }
        if tally.spool_full > 0 {
            self.metrics.count(SINK_SYSLOG, "dropped", tally.spool_full);
            if !self.shared.spool_full_logged.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    "audit: spool_max_bytes reached; dropping syslog events (counted in \
                     portcullis_audit_events_total{{result=\"dropped\"}})"
                );
            }
        } else if tally.spooled > 0 {
            self.shared
                .spool_full_logged
                .store(false, Ordering::Relaxed);
        }
        if let Some(spool) = &mut self.spool {
            match spool.commit() {
                Ok(pos) => {
                    self.metrics.count(SINK_SYSLOG, "spooled", tally.spooled);
                    self.published
                        .send_if_modified(|p| std::mem::replace(p, pos) != pos);
                }
                Err(e) => {
                    self.metrics.count(SINK_SYSLOG, "dropped", e.lost);
                    self.metrics.count(
                        SINK_SYSLOG,
                        "spooled",
                        tally.spooled.saturating_sub(e.lost),
                    );
                    ok = false;
                    self.fail("audit spool", &e.source);
                }
            }
        }
        if ok && tally.file_lines + tally.spooled > 0 {
            self.shared.sink_failing.store(false, Ordering::Relaxed);
        }
        self.update_spool_gauge();
    }

    fn fail(&self, what: &str, e: &std::io::Error) {
        if !self.shared.sink_failing.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %e, "{what}: write failed; events are dropped and counted");
        }
    }

    fn update_spool_gauge(&self) {
        let bytes = self.shared.spool_bytes.load(Ordering::Relaxed);
        self.metrics
            .spool_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    fn tick(&mut self) {
        if let Some(spool) = &mut self.spool {
            if let Err(e) = spool.tick() {
                self.fail("audit spool fsync", &e);
            }
        }
        if let Some(file) = &mut self.file {
            if let Err(e) = file.tick() {
                self.fail("audit file", &e);
            }
        }
        self.update_spool_gauge();
    }

    /// Moves records written by the key CLI into the spool.
    fn sweep_incoming(&mut self) {
        let Some(spool) = &mut self.spool else {
            return;
        };
        match spool.take_incoming() {
            Ok(0) => {}
            Ok(n) => {
                self.metrics.count(SINK_SYSLOG, "spooled", n);
                let pos = spool.position();
                self.published
                    .send_if_modified(|p| std::mem::replace(p, pos) != pos);
            }
            Err(e) => tracing::warn!(error = %e.source, "audit: cannot take CLI audit records"),
        }
    }

    fn sync(&mut self) {
        if let Some(spool) = &mut self.spool {
            if let Err(e) = spool.sync() {
                self.fail("audit spool fsync", &e);
            }
        }
        if let Some(file) = &mut self.file {
            if let Err(e) = file.sync() {
                self.fail("audit file", &e);
            }
        }
    }

    /// Takes what is still queued (refusing more), writes it, syncs and answers.
    fn stop(&mut self, reply: oneshot::Sender<SpoolPos>) {
        self.rx.close();
        let mut tally = Tally::default();
        while let Ok(msg) = self.rx.try_recv() {
            if let Msg::Event(s) = msg {
                self.metrics.queue_depth.dec();
                self.write(&s, &mut tally);
            }
        }
        self.commit(tally);
        self.sweep_incoming();
        self.sync();
        let pos = self
            .spool
            .as_ref()
            .map(SpoolWriter::position)
            .unwrap_or_default();
        let _ = reply.send(pos);
    }
}
