//! The api's metrics (catalogue: docs/metrics.md): request counts and latencies by route
//! template, jobs accepted and rejected, and jobs canceled here. `GET /metrics` renders them
//! when the process installed a recorder (the binaries do; in-process tests need not).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{counter, histogram};

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    description = "The api's metrics in the Prometheus text format (catalogue: docs/metrics.md).",
    responses((status = 200, description = "The metrics.", body = String, content_type = "text/plain")),
)]
pub async fn metrics() -> String {
    shared::telemetry::metrics::handle()
        .map(|handle| handle.render())
        .unwrap_or_default()
}

/// Counts and times every request by its route template, never its concrete path (job ids
/// would make the label set unbounded).
pub async fn track_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let method = request.method().as_str().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status_class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    counter!(
        "pictor_http_requests_total",
        "method" => method.clone(),
        "route" => route.clone(),
        "status_class" => status_class
    )
    .increment(1);
    histogram!("pictor_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

pub fn job_accepted() {
    counter!("pictor_jobs_accepted_total").increment(1);
}

/// `reason` is the stable API error code.
pub fn job_rejected(reason: &'static str) {
    counter!("pictor_jobs_rejected_total", "reason" => reason).increment(1);
}

pub fn job_canceled(intent: Option<shared::domain::Intent>, lived: std::time::Duration) {
    let intent = intent.map_or("none", |intent| intent.as_str());
    counter!("pictor_jobs_finished_total", "outcome" => "canceled", "intent" => intent)
        .increment(1);
    histogram!("pictor_job_duration_seconds", "outcome" => "canceled").record(lived.as_secs_f64());
}

/// Help texts for the api's metrics (call after the recorder is installed).
pub fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!("pictor_jobs_accepted_total", "Jobs answered 202 Accepted.");
    describe_counter!(
        "pictor_jobs_rejected_total",
        "Job submissions refused, by API error code."
    );
    describe_counter!(
        "pictor_http_requests_total",
        "HTTP requests by method, route template and status class."
    );
    describe_histogram!(
        "pictor_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "HTTP request latency by method and route template."
    );
    describe_counter!(
        "pictor_jobs_finished_total",
        "Jobs reaching a terminal status, by outcome and intent."
    );
    describe_histogram!(
        "pictor_job_duration_seconds",
        metrics::Unit::Seconds,
        "Jobs' time from acceptance to their terminal status."
    );
}
