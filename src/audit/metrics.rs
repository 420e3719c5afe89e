//! Audit counters, registered on the registry the caller gives (no global registry), so each
//! test and each proxy gets its own. Updated by `record` (queue), the writer (spool, file) and
//! the shipper (sent, reconnects); all prometheus metrics are atomics, safe on the request path.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// `sink` label values.
pub(crate) const SINK_SYSLOG: &str = "syslog";
/// `sink` label value for the JSON-lines file or stdout.
pub(crate) const SINK_FILE: &str = "file";

/// The audit metrics.
#[derive(Clone)]
pub(crate) struct AuditMetrics {
    /// `portcullis_audit_events_total{sink,result}`; result is sent, spooled or dropped.
    pub events: IntCounterVec,
    /// `portcullis_audit_queue_depth`: events handed over but not yet written.
    pub queue_depth: IntGauge,
    /// `portcullis_audit_spool_bytes`: bytes in spool segments on disk.
    pub spool_bytes: IntGauge,
    /// `portcullis_audit_reconnects_total`: syslog connections lost or not made.
    pub reconnects: IntCounter,
    /// `portcullis_audit_resent_total`: events sent again after a reconnect.
    pub resent: IntCounter,
    /// `portcullis_audit_syslog_connected`: 1 while a syslog connection is up.
    pub connected: IntGauge,
}

impl AuditMetrics {
    /// Metrics registered on `registry`, with the series for the configured sinks at zero.
    pub fn register(registry: &Registry, sinks: &[&str]) -> prometheus::Result<AuditMetrics> {
        let m = AuditMetrics::new()?;
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.queue_depth.clone()))?;
        // The spool and connection series describe a syslog sink; without one, a
        // `connected 0` would read as an outage.
        if sinks.contains(&SINK_SYSLOG) {
            registry.register(Box::new(m.spool_bytes.clone()))?;
            registry.register(Box::new(m.reconnects.clone()))?;
            registry.register(Box::new(m.resent.clone()))?;
            registry.register(Box::new(m.connected.clone()))?;
        }
        for sink in sinks {
            let results: &[&str] = if *sink == SINK_SYSLOG {
                &["sent", "spooled", "dropped"]
            } else {
                &["sent", "dropped"]
            };
            for result in results {
                m.events.with_label_values(&[sink, result]);
            }
        }
        Ok(m)
    }

    /// Unregistered metrics.
    pub fn new() -> prometheus::Result<AuditMetrics> {
        Ok(AuditMetrics {
            events: IntCounterVec::new(
                Opts::new(
                    "portcullis_audit_events_total",
                    "Audit events by sink and result (sent, spooled, dropped).",
                ),
                &["sink", "result"],
            )?,
            queue_depth: IntGauge::new(
                "portcullis_audit_queue_depth",
                "Audit events waiting in the in-memory queue.",
            )?,
            spool_bytes: IntGauge::new(
                "portcullis_audit_spool_bytes",
                "Bytes of audit spool segments on disk.",
            )?,
            reconnects: IntCounter::new(
                "portcullis_audit_reconnects_total",
                "Syslog connections lost or failed to connect.",
            )?,
            resent: IntCounter::new(
                "portcullis_audit_resent_total",
                "Audit events sent again after a reconnect (at-least-once).",
            )?,
            connected: IntGauge::new(
                "portcullis_audit_syslog_connected",
                "1 while the syslog connection is up.",
            )?,
        })
    }

    /// Counts `n` events for `sink` with `result`.
    pub fn count(&self, sink: &str, result: &str, n: u64) {
        if n > 0 {
            self.events.with_label_values(&[sink, result]).inc_by(n);
        }
    }

    /// The current count for `sink`/`result`.
    #[cfg(test)]
    pub fn get(&self, sink: &str, result: &str) -> u64 {
        self.events.with_label_values(&[sink, result]).get()
    }
}
