//! Prometheus metrics: one recorder per process, rendered on `/metrics`.
//!
//! Metric names: `sentinel_tool_calls_total{outcome}`,
//! `sentinel_tool_call_seconds{outcome}`, `sentinel_policy_version`,
//! `sentinel_upstream_requests_total{backend,result}`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder handle, installed on first use. If another
/// recorder is already installed, this one still renders (empty).
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}
