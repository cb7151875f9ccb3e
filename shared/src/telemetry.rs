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
