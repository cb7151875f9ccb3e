//! Logging set-up shared by every binary: readable text in development, JSON lines in
//! production, filtered by `RUST_LOG` (default `info`). Spans carry the job id, so every line
//! logged while a job runs names it.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Installs the global subscriber once; later calls (tests, `pictor dev`) are harmless no-ops.
pub fn init(service: &'static str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,object_store=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_target(false))
            .try_init(),
    };
    if result.is_ok() {
        tracing::debug!(service, "Telemetry initialised");
    }
}

/// Prometheus metrics: one recorder per process, rendered by `/metrics`.
pub mod metrics {
    use std::sync::OnceLock;

    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

    /// Buckets for every `_seconds` histogram (see docs/metrics.md).
    pub const SECONDS_BUCKETS: [f64; 15] = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
    ];

    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

    /// Installs the global recorder once (later calls return the same handle) and keeps its
    /// histograms' upkeep running. Processes that never call this record nothing.
    pub fn install() -> Option<PrometheusHandle> {
        if let Some(handle) = HANDLE.get() {
            return Some(handle.clone());
        }
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), &SECONDS_BUCKETS)
            .ok()?;
        let handle = builder.install_recorder().ok()?;
        let handle = HANDLE.get_or_init(|| handle).clone();
        let upkeep = handle.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        });
        Some(handle)
    }

    /// The installed recorder's handle, if this process installed one.
    pub fn handle() -> Option<PrometheusHandle> {
        HANDLE.get().cloned()
    }
}

/// The trace id of a job, in the OpenAI traces format (`trace_` + 32 hex digits). Derived from
/// the job id, so every process (api, worker, exporters, logs) names the same trace without
/// coordination; it also travels in the job message's `trace-id` header.
pub fn trace_id(job: crate::domain::JobId) -> String {
    format!("trace_{}", job.as_uuid().simple())
}

/// Message headers carrying a job's trace context to the worker.
pub fn trace_headers(job: crate::domain::JobId) -> lapin::types::FieldTable {
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "trace-id".into(),
        lapin::types::AMQPValue::LongString(trace_id(job).into_bytes().into()),
    );
    headers
}

/// The trace id a message carries, if any.
pub fn trace_id_from(properties: &lapin::BasicProperties) -> Option<String> {
    match properties.headers().as_ref()?.inner().get("trace-id")? {
        lapin::types::AMQPValue::LongString(value) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        _ => None,
    }
}
