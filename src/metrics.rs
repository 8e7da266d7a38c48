//! Prometheus metrics, served on /metrics.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub status_writes: IntCounterVec,
    pub provider_calls: IntCounterVec,
    pub deployments: IntCounterVec,
    pub pushed_paths: IntCounter,
    pub pushed_bytes: IntCounterVec,
    pub leader: IntGauge,
    pub builds: IntCounterVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles =
            IntCounterVec::new(Opts::new("nixops_reconciles_total", "Reconciliations run, by kind."), &["kind"])?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new("nixops_reconcile_errors_total", "Reconciliations that failed, by kind and error class."),
            &["kind", "class"],
        )?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new("nixops_reconcile_duration_seconds", "Time spent in one reconciliation, by kind.")
                .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0]),
            &["kind"],
        )?;
        let status_writes = IntCounterVec::new(
            Opts::new("nixops_status_writes_total", "Status updates written to the API server, by kind."),
            &["kind"],
        )?;
        let provider_calls = IntCounterVec::new(
            Opts::new(
                "nixops_provider_calls_total",
                "Calls to providers (SSH, cloud APIs), by provider, operation and result.",
            ),
            &["provider", "operation", "result"],
        )?;
        let deployments = IntCounterVec::new(
            Opts::new(
                "nixops_deployments_total",
                "Deployments of a closure to a machine, by result (Succeeded, Failed, RolledBack).",
            ),
            &["result"],
        )?;
        let pushed_paths = IntCounter::new("nixops_pushed_paths_total", "Store paths pushed to machines.")?;
        let pushed_bytes = IntCounterVec::new(
            Opts::new(
                "nixops_pushed_bytes_total",
                "Bytes pushed to machines: `nar` counts the paths' NAR size, `wire` what went over SSH after compression.",
            ),
            &["kind"],
        )?;
        let leader = IntGauge::new("nixops_leader", "1 while this replica holds the leader lease.")?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(status_writes.clone()))?;
        registry.register(Box::new(provider_calls.clone()))?;
        registry.register(Box::new(deployments.clone()))?;
        registry.register(Box::new(pushed_paths.clone()))?;
        registry.register(Box::new(pushed_bytes.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        let builds = IntCounterVec::new(
            Opts::new(
                "nixops_builds_total",
                "Builds run on builders (one per commit and builder, however many machines it serves), by result.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(builds.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            status_writes,
            provider_calls,
            deployments,
            pushed_paths,
            pushed_bytes,
            leader,
            builds,
        })
    }

    /// Records one finished reconciliation.
    pub fn observe_reconcile(&self, kind: &str, took: Duration, error_class: Option<&str>) {
        self.reconciles.with_label_values(&[kind]).inc();
        self.reconcile_duration.with_label_values(&[kind]).observe(took.as_secs_f64());
        if let Some(class) = error_class {
            self.reconcile_errors.with_label_values(&[kind, class]).inc();
        }
    }

    /// Records one provider call.
    pub fn provider_call(&self, provider: &str, operation: &str, ok: bool) {
        self.provider_calls.with_label_values(&[provider, operation, if ok { "ok" } else { "error" }]).inc();
    }

    /// Records what one push moved.
    pub fn pushed(&self, paths: u64, nar_bytes: u64, wire_bytes: u64) {
        self.pushed_paths.inc_by(paths);
        self.pushed_bytes.with_label_values(&["nar"]).inc_by(nar_bytes);
        self.pushed_bytes.with_label_values(&["wire"]).inc_by(wire_bytes);
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(err) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(%err, "cannot encode metrics");
        }
        out
    }
}
