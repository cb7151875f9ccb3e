//! Optional OTLP export of the same `tracing` spans (`job` ⊃ `agent` ⊃ `provider_call`, and
//! whatever else the log filter lets through) to a collector, for teams that run Jaeger,
//! Tempo or an OpenTelemetry Collector instead of (or beside) OpenAI's dashboard.
//!
//! OTLP over HTTP/protobuf with the blocking reqwest client, batched by the SDK's processor on
//! its own thread: it needs no Tokio reactor and never runs on a job's task.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter as SdkSpanExporter};
use tracing::Subscriber;
use tracing_subscriber::registry::LookupSpan;

/// The resource every span carries: the service (`api`, `worker`, `pictor`).
fn resource(service: &'static str) -> Resource {
    Resource::builder().with_service_name(service).build()
}

/// A provider that batches spans to `{base}/v1/traces` (the OTLP/HTTP path, which the
/// exporter does not add to an endpoint given in code).
pub fn provider(
    service: &'static str,
    base: &url::Url,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let endpoint = format!("{}/v1/traces", base.as_str().trim_end_matches('/'));
    let exporter = SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()?;
    Ok(provider_with(service, exporter))
}

/// A batching provider around any exporter (tests use the in-memory one).
pub fn provider_with(
    service: &'static str,
    exporter: impl SdkSpanExporter + 'static,
) -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(service))
        .build()
}

/// The `tracing` layer feeding `provider`.
pub fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("pictor"))
}

#[cfg(test)]
mod tests {
    use opentelemetry_sdk::trace::InMemorySpanExporter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn a_job_span_and_its_agent_child_reach_the_exporter() {
        let exporter = InMemorySpanExporter::default();
        let provider = provider_with("worker", exporter.clone());
        let subscriber = tracing_subscriber::registry().with(layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let _job = tracing::info_span!("job", job_id = "j1").entered();
            let _agent = tracing::info_span!("agent", agent = "router").entered();
        });
        provider.force_flush().unwrap();

        let spans = exporter.get_finished_spans().unwrap();
        let job = spans.iter().find(|span| span.name == "job").unwrap();
        let agent = spans.iter().find(|span| span.name == "agent").unwrap();
        assert_eq!(agent.parent_span_id, job.span_context.span_id());
        assert_eq!(agent.span_context.trace_id(), job.span_context.trace_id());
        assert!(
            agent
                .attributes
                .iter()
                .any(|kv| kv.key.as_str() == "agent" && kv.value.as_str() == "router")
        );
        provider.shutdown().unwrap();
    }
}
