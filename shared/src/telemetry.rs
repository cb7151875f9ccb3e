//! Telemetry set-up shared by every binary: logs, and the traces of jobs.
//!
//! - Logs: readable text in development, JSON lines in production, filtered by `RUST_LOG`
//!   (default `info`). A JSON line carries its current span and the list of spans it is in, so
//!   every line logged while a job runs names its `job_id` and `trace_id`, whatever the filter.
//! - Traces: each job as an OpenAI Agents trace ([`traces`], exported by [`ingest`]) when
//!   `traces.openai_enabled` is on (`true`, or `auto` with an OpenAI key), and the same spans over OTLP ([`otlp`]) when
//!   `traces.otlp_endpoint` is. Both have their own filters, independent of `RUST_LOG`'s.
//!
//! [`init`] returns a [`TelemetryGuard`]; a binary calls [`TelemetryGuard::shutdown`] before it
//! exits so that traces still queued are sent.

pub mod batched;
pub mod ingest;
pub mod otlp;
pub mod traces;
pub mod wire;

use std::time::Duration;

use tracing::Subscriber;
use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, Settings};

/// How long a stopping process may spend sending the traces it still holds.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The `RUST_LOG` filter, or the default one.
fn log_filter() -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,object_store=warn"))
}

/// Whether a callsite is one of the job spans the traces are made of: kept for the logs'
/// span context and the OTLP export even when `RUST_LOG` asks for warnings only.
fn job_span(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.is_span() && matches!(metadata.name(), "job" | "agent" | "provider_call")
}

type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync + 'static>;

/// The log lines: `filter`'s, in `format`, with the job spans kept for their context.
fn log_layer<S, W>(format: LogFormat, filter: EnvFilter, writer: W) -> BoxedLayer<S>
where
    S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let filter = filter.or(filter_fn(job_span));
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        // Colours only for a person at a terminal: escape codes in a log file or a collector
        // break every search for a field.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    }
}

/// What [`init`] started; call [`TelemetryGuard::shutdown`] before the process exits.
#[must_use = "call shutdown() before exiting, or queued traces are lost"]
#[derive(Default)]
pub struct TelemetryGuard {
    openai: Option<ingest::ExportHandle>,
    otlp: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    /// Writes the log lines still buffered when the guard goes (declared last: the exporters'
    /// own last words come first).
    logs: Option<batched::Flusher>,
}

impl TelemetryGuard {
    /// Sends the traces still queued (waiting a few seconds at most) and stops the exporters.
    /// Then writes the log lines still buffered (as dropping the guard does).
    pub async fn shutdown(self) {
        let Self { openai, otlp, logs } = self;
        if let Some(openai) = openai {
            openai.shutdown(SHUTDOWN_GRACE).await;
        }
        if let Some(provider) = otlp {
            // The SDK's shutdown blocks on its batch thread and a blocking HTTP client.
            let stopped = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = stopped {
                tracing::warn!(%error, "OTLP exporter did not shut down cleanly");
            }
        }
        // A blocking wait of two seconds at most, once, as the process ends.
        drop(logs);
    }
}

/// Installs the global subscriber once; later calls (tests, `pictor dev`) are harmless no-ops
/// that start nothing. Trace exporters need a Tokio runtime: without one they stay off.
/// Whether the process named `service` runs agents: the worker, or `pictor dev` (api, worker and
/// scheduler in one process, named `pictor`).
fn runs_agents(service: &str) -> bool {
    matches!(service, "worker" | "pictor")
}

pub fn init(service: &'static str, settings: &Settings) -> TelemetryGuard {
    let mut notes: Vec<String> = Vec::new();
    let runtime = tokio::runtime::Handle::try_current().is_ok();

    let openai = openai_traces(service, settings, runtime, &mut notes);
    let otlp = otlp_traces(service, settings, runtime, &mut notes);
    let format = settings.telemetry.log_format;
    // The fleet's long-running processes write their lines in batches; one-off commands, whose
    // lines mix with what they print, write each line at once.
    let batched = matches!(service, "api" | "worker" | "scheduler")
        .then(|| batched::spawn(std::io::stdout()))
        .and_then(Result::ok);
    let (log, logs) = match batched {
        Some((writer, flusher)) => (log_layer(format, log_filter(), writer), Some(flusher)),
        None => (log_layer(format, log_filter(), std::io::stdout), None),
    };
    let mut layers: Vec<BoxedLayer<tracing_subscriber::Registry>> = vec![log];
    let mut openai_parts = None;
    if let Some((layer, receiver, flush, target)) = openai {
        layers.push(layer.with_filter(filter_fn(traces::wants)).boxed());
        openai_parts = Some((receiver, flush, target));
    }
    if let Some(provider) = &otlp {
        layers.push(
            otlp::layer(provider)
                .with_filter(log_filter().or(filter_fn(job_span)))
                .boxed(),
        );
    }
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_err()
    {
        // Someone installed a subscriber first; the layers built here were dropped with it.
        return TelemetryGuard::default();
    }
    for note in notes {
        tracing::warn!("{note}");
    }
    if settings.traces.openai_mode == crate::config::OpenAiTracesMode::Auto
        && !settings.traces.openai_enabled
        && runs_agents(service)
    {
        tracing::info!(
            "OpenAI traces are off: traces.openai_enabled is auto and there is no OpenAI API key \
             (OPENAI_API_KEY)"
        );
    }
    let openai = openai_parts.map(|(receiver, flush, target)| {
        tracing::info!(
            endpoint = %endpoint_for_logs(&target.url),
            workflow = %settings.traces.workflow_name,
            redact = settings.traces.redact,
            setting = settings.traces.openai_mode.as_str(),
            "OpenAI traces on"
        );
        ingest::spawn(target, receiver, flush)
    });
    if let Some(endpoint) = &settings.traces.otlp_endpoint
        && otlp.is_some()
    {
        tracing::info!(
            endpoint = %endpoint_for_logs(endpoint.as_str()),
            "OTLP trace export on"
        );
    }
    tracing::debug!(service, "Telemetry initialised");
    TelemetryGuard { openai, otlp, logs }
}

/// The OpenAI traces layer and what its exporter needs, when this process exports traces; why
/// not goes to `notes`.
fn openai_traces(
    service: &str,
    settings: &Settings,
    runtime: bool,
    notes: &mut Vec<String>,
) -> Option<(
    traces::OpenAiTracesLayer,
    tokio::sync::mpsc::Receiver<wire::Item>,
    std::sync::Arc<tokio::sync::Notify>,
    ingest::IngestTarget,
)> {
    // Only processes that run agents make the spans the OpenAI traces dashboard shows (job,
    // agent, provider call). Elsewhere the layer would export nothing, yet its per-layer filter
    // makes every event a dynamic check: 10 µs per accepted job in the api (docs/benchmarks.md).
    if !settings.traces.openai_enabled || !runs_agents(service) {
        None
    } else if !runtime {
        notes.push("OpenAI traces are off: no Tokio runtime to export them from".to_string());
        None
    } else if let Some(api_key) = settings.openai.api_key.clone() {
        let config = traces::TracesConfig {
            workflow_name: settings.traces.workflow_name.clone(),
            redact: settings.traces.redact,
        };
        let (layer, receiver, flush) =
            traces::OpenAiTracesLayer::new(config, settings.traces.queue_size.get());
        let target = ingest::IngestTarget {
            url: settings.traces.ingest_url(&settings.openai),
            api_key,
        };
        Some((layer, receiver, flush, target))
    } else {
        notes.push(
            "OpenAI traces are off: traces.openai_enabled is set but there is no OpenAI API key \
             (OPENAI_API_KEY)"
                .to_string(),
        );
        None
    }
}

/// The OTLP exporter's provider, when an endpoint is configured and can be used; why not goes
/// to `notes`.
fn otlp_traces(
    service: &'static str,
    settings: &Settings,
    runtime: bool,
    notes: &mut Vec<String>,
) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    match &settings.traces.otlp_endpoint {
        Some(endpoint) if runtime => match otlp::provider(service, endpoint) {
            Ok(provider) => Some(provider),
            Err(error) => {
                // The exporter's error may quote the URL, credentials and all.
                let base = endpoint.as_str().trim_end_matches('/');
                let error = error
                    .to_string()
                    .replace(base, &endpoint_for_logs(endpoint.as_str()));
                notes.push(format!("OTLP export is off: {error}"));
                None
            }
        },
        Some(_) => {
            notes.push("OTLP export is off: no Tokio runtime".to_string());
            None
        }
        None => None,
    }
}

/// An exporter's URL as logs may show it: scheme, host and port. An endpoint can carry
/// credentials (`https://user:token@collector/`) or a token in its path or query, and neither
/// belongs in a log line.
fn endpoint_for_logs(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(url) => {
            let host = url.host_str().unwrap_or("");
            match url.port() {
                Some(port) => format!("{}://{host}:{port}", url.scheme()),
                None => format!("{}://{host}", url.scheme()),
            }
        }
        Err(_) => "(an unparsable url)".to_string(),
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

    /// Buckets of `pictor_job_deferrals`: how many delay-queue cycles a job went through.
    pub const DEFERRAL_BUCKETS: [f64; 10] =
        [0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];

    /// What `/healthz` answers: `Ok` is `200 ok`, `Err(reason)` a `503` with the reason.
    pub type HealthCheck = std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

    /// The check of a process that is healthy whenever it answers at all (the scheduler).
    pub fn always_healthy() -> HealthCheck {
        std::sync::Arc::new(|| Ok(()))
    }

    /// Serves `/metrics` (this process's recorder) and `/healthz` (as `health` says) on `addr`
    /// until `shutdown` turns true: the small server of the processes that have no api of their
    /// own (workers, the scheduler). `service` names the process in the start-up log line.
    pub async fn serve(
        service: &'static str,
        addr: std::net::SocketAddr,
        health: HealthCheck,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        use axum::http::StatusCode;
        use axum::routing::get;
        let router = axum::Router::new()
            .route(
                "/metrics",
                get(|| async { handle().map(|handle| handle.render()).unwrap_or_default() }),
            )
            .route(
                "/healthz",
                get(move || async move {
                    match health() {
                        Ok(()) => (StatusCode::OK, "ok".to_string()),
                        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(service, %addr, "Metrics listening");
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await
    }

    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

    /// Installs the global recorder once (later calls return the same handle) and keeps its
    /// histograms' upkeep running. Processes that never call this record nothing.
    pub fn install() -> Option<PrometheusHandle> {
        if let Some(handle) = HANDLE.get() {
            return Some(handle.clone());
        }
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), &SECONDS_BUCKETS)
            .ok()?
            .set_buckets_for_metric(
                Matcher::Full("pictor_job_deferrals".to_string()),
                &DEFERRAL_BUCKETS,
            )
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A log sink the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn exporter_endpoints_are_logged_without_credentials_path_or_query() {
        assert_eq!(
            endpoint_for_logs("https://collector-user:s3cret@otel.example.com:4318/v1?token=abc"),
            "https://otel.example.com:4318"
        );
        assert_eq!(
            endpoint_for_logs("https://api.openai.com/v1/traces/ingest"),
            "https://api.openai.com"
        );
        assert_eq!(endpoint_for_logs("not a url"), "(an unparsable url)");
    }

    #[test]
    fn json_lines_inside_an_agent_span_still_name_the_job_and_its_trace() {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::registry().with(log_layer(
            LogFormat::Json,
            EnvFilter::new("warn"),
            move || writer.clone(),
        ));
        tracing::subscriber::with_default(subscriber, || {
            let _job = tracing::info_span!(
                "job",
                job_id = "0190f0d5-7c1e-7000-8000-000000000001",
                trace_id = "trace_0190f0d57c1e70008000000000000001"
            )
            .entered();
            let _agent = tracing::info_span!("agent", agent = "create").entered();
            tracing::warn!(code = "provider_timeout", "Provider call failed");
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(line["fields"]["message"], "Provider call failed");
        assert_eq!(line["span"]["agent"], "create");
        assert_eq!(
            line["spans"][0]["job_id"],
            "0190f0d5-7c1e-7000-8000-000000000001"
        );
        assert_eq!(
            line["spans"][0]["trace_id"],
            "trace_0190f0d57c1e70008000000000000001"
        );
    }
}
