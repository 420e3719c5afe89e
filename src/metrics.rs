//! Prometheus metrics. The struct registers itself on a registry it is given (no global
//! statics), so every test and every embedded proxy gets its own.
//!
//! Label sets are bounded: route templates and resource names come from the policy, never from
//! raw request paths; key ids appear only in the opt-in per-key series.

use prometheus::{
    exponential_buckets, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Every metric portcullis exposes on `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    /// `portcullis_requests_total{decision,reason,resource,access,status}`.
    pub requests: IntCounterVec,
    /// Whole request, from the first byte of the head to the response head sent.
    pub request_duration: Histogram,
    /// Time the backend took to send its response head.
    pub upstream_duration: Histogram,
    /// Time spent inside portcullis itself: the request minus the wait for the backend.
    pub overhead_duration: Histogram,
    /// `portcullis_reloads_total{file,result}`.
    pub reloads: IntCounterVec,
    /// Usable keys in the live snapshot.
    pub keys_loaded: IntGauge,
    /// Routes in the live policy.
    pub policy_routes: IntGauge,
    /// Generation of the live snapshot.
    pub config_generation: IntGauge,
    /// Unix time of the last good load.
    pub last_reload_success: Gauge,
    /// Upstream failures by kind (`connect`, `timeout`).
    pub upstream_errors: IntCounterVec,
    /// Requests refused for a rate limit, by principal kind and route.
    pub rate_limited: IntCounterVec,
    /// Items filtered routes removed from answers, by route.
    pub filtered_items: IntCounterVec,
    /// Answers of filtered routes that could not be filtered (502), by route and reason.
    pub filter_failures: IntCounterVec,
    /// Opt-in per-key series (cardinality grows with the number of keys).
    pub per_key: Option<PerKeyMetrics>,
}

/// `portcullis_key_requests_total{key_id}` and `portcullis_key_last_used_timestamp_seconds{key_id}`.
#[derive(Clone)]
pub struct PerKeyMetrics {
    /// Requests per key.
    pub requests: IntCounterVec,
    /// Last use per key.
    pub last_used: GaugeVec,
}

impl Metrics {
    /// Creates and registers every metric on `registry`.
    pub fn register(registry: &Registry, per_key: bool) -> prometheus::Result<Metrics> {
        let latency = || exponential_buckets(0.000_025, 2.0, 18);
        let requests = IntCounterVec::new(
            Opts::new(
                "portcullis_requests_total",
                "Requests by decision, reason, resource, access and status.",
            ),
            &["decision", "reason", "resource", "access", "status"],
        )?;
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "portcullis_request_duration_seconds",
                "Whole request: head received to response head sent.",
            )
            .buckets(latency()?),
        )?;
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "portcullis_upstream_duration_seconds",
                "Backend time to response head.",
            )
            .buckets(latency()?),
        )?;
        let overhead_duration = Histogram::with_opts(
            HistogramOpts::new(
                "portcullis_overhead_seconds",
                "Time spent inside portcullis: the request minus the backend's time.",
            )
            .buckets(exponential_buckets(0.000_001, 2.0, 20)?),
        )?;
        let reloads = IntCounterVec::new(
            Opts::new("portcullis_reloads_total", "Reloads by file and result."),
            &["file", "result"],
        )?;
        let keys_loaded =
            IntGauge::new("portcullis_keys_loaded", "Usable keys in the live state.")?;
        let policy_routes =
            IntGauge::new("portcullis_policy_routes", "Routes in the live policy.")?;
        let config_generation = IntGauge::new(
            "portcullis_config_generation",
            "Generation of the live policy and keys.",
        )?;
        let last_reload_success = Gauge::new(
            "portcullis_last_reload_success_timestamp_seconds",
            "Unix time of the last successful load.",
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "portcullis_upstream_errors_total",
                "Requests the backend did not answer, by kind.",
            ),
            &["kind"],
        )?;
        let filtered_items = IntCounterVec::new(
            Opts::new(
                "portcullis_filtered_items_total",
                "Items removed from answers by response filtering, by route.",
            ),
            &["route"],
        )?;
        let filter_failures = IntCounterVec::new(
            Opts::new(
                "portcullis_filter_failures_total",
                "Answers of filtered routes that could not be filtered and were refused (502), by route and reason.",
            ),
            &["route", "reason"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "portcullis_rate_limited_total",
                "Requests refused with 429 because the key (or token principal) was over its limit, by principal kind and route.",
            ),
            &["principal_kind", "route"],
        )?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(filtered_items.clone()))?;
        registry.register(Box::new(filter_failures.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "portcullis_build_info",
                "Always 1; the version label says which build runs.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(overhead_duration.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        // Every series at zero from the start, so dashboards and rate() see them before the
        // first reload.
        for file in ["policy", "keys", "tls"] {
            for result in ["ok", "error"] {
                reloads.with_label_values(&[file, result]);
            }
        }
        registry.register(Box::new(keys_loaded.clone()))?;
        registry.register(Box::new(policy_routes.clone()))?;
        registry.register(Box::new(config_generation.clone()))?;
        registry.register(Box::new(last_reload_success.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(build_info))?;
        let per_key = if per_key {
            let requests = IntCounterVec::new(
                Opts::new(
                    "portcullis_key_requests_total",
                    "Requests per key (opt-in: one series per key).",
                ),
                &["key_id"],
            )?;
            let last_used = GaugeVec::new(
                Opts::new(
                    "portcullis_key_last_used_timestamp_seconds",
                    "Last use per key (opt-in).",
                ),
                &["key_id"],
            )?;
            registry.register(Box::new(requests.clone()))?;
            registry.register(Box::new(last_used.clone()))?;
            Some(PerKeyMetrics {
                requests,
                last_used,
            })
        } else {
            None
        };
        Ok(Metrics {
            requests,
            request_duration,
            upstream_duration,
            overhead_duration,
            reloads,
            keys_loaded,
            policy_routes,
            config_generation,
            last_reload_success,
            upstream_errors,
            rate_limited,
            filtered_items,
            filter_failures,
            per_key,
        })
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(registry: &Registry) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn registers_on_its_own_registry_twice_without_clashing() {
        let a = Registry::new();
        let b = Registry::new();
        let m = Metrics::register(&a, true).unwrap();
        Metrics::register(&b, false).unwrap();
        m.requests
            .with_label_values(&["allow", "granted", "datasets", "read", "200"])
            .inc();
        let text = Metrics::render(&a);
        assert!(text.contains("portcullis_requests_total{access=\"read\",decision=\"allow\",reason=\"granted\",resource=\"datasets\",status=\"200\"} 1"));
        assert!(text.contains("portcullis_build_info{version="));
        assert!(!Metrics::render(&b).contains("portcullis_key_requests_total"));
    }
}
