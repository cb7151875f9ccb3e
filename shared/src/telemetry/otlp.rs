//! Optional OTLP export of the same `tracing` spans (`job` ⊃ `agent` ⊃ `provider_call`, and
//! whatever else the log filter lets through) to a collector, for teams that run Jaeger,
//! Tempo or an OpenTelemetry Collector instead of (or beside) OpenAI's dashboard.
//!
//! OTLP over HTTP/protobuf with the blocking reqwest client, batched by the SDK's processor on
//! its own thread: it needs no Tokio reactor and never runs on a job's task.

use base64::Engine;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig, WithHttpConfig};
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
    let (base, headers) = credentials_as_header(base);
    let endpoint = format!("{}/v1/traces", base.as_str().trim_end_matches('/'));
    let exporter = SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .with_headers(headers)
        .build()?;
    Ok(provider_with(service, exporter))
}

/// Moves credentials in the endpoint (`https://user:token@collector/`) into a basic
/// `Authorization` header, so that the URL the HTTP client holds, and may log at debug (its
/// connection pool does), carries none.
fn credentials_as_header(base: &url::Url) -> (url::Url, std::collections::HashMap<String, String>) {
    let mut headers = std::collections::HashMap::new();
    if base.username().is_empty() && base.password().is_none() {
        return (base.clone(), headers);
    }
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = decode(base.username());
    let password = base.password().map(decode).unwrap_or_default();
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    headers.insert("Authorization".to_string(), format!("Basic {token}"));
    let mut bare = base.clone();
    // Neither can fail for an http(s) URL, the only kind the setting accepts.
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    (bare, headers)
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
    fn credentials_in_the_endpoint_become_a_basic_authorization_header() {
        let url = url::Url::parse("https://collector:s%40cret@otel.example:4318/base").unwrap();
        let (bare, headers) = credentials_as_header(&url);
        assert_eq!(bare.as_str(), "https://otel.example:4318/base");
        let token = base64::engine::general_purpose::STANDARD.encode("collector:s@cret");
        assert_eq!(headers["Authorization"], format!("Basic {token}"));

        let plain = url::Url::parse("http://127.0.0.1:4318").unwrap();
        let (same, none) = credentials_as_header(&plain);
        assert_eq!(same, plain);
        assert!(none.is_empty());
    }

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
