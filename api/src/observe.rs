//! The api's metrics (catalogue: docs/metrics.md): request counts and latencies by route
//! template, jobs accepted and rejected, jobs canceled here and their images deleted.
//! `GET /metrics` renders them when the process installed a recorder (the binaries do;
//! in-process tests need not).

use std::collections::HashSet;
use std::sync::{OnceLock, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{counter, histogram};

use crate::auth::Caller;
use crate::error::ApiError;

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    description = "The api's metrics in the Prometheus text format (catalogue: docs/metrics.md), \
        for the ops role only. Prometheus scrapes them without a key on the private \
        `PICTOR_API_METRICS_ADDR` instead.",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The metrics.", body = String, content_type = "text/plain"),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, description = "`forbidden`: not an operator.", body = crate::error::ErrorBody),
    ),
)]
pub async fn metrics(Caller(caller): Caller) -> Result<String, ApiError> {
    if caller.role != shared::domain::Role::Ops {
        return Err(ApiError::client(
            crate::error::ErrorCode::Forbidden,
            "metrics are visible to operators only",
        ));
    }
    Ok(shared::telemetry::metrics::handle()
        .map(|handle| handle.render())
        .unwrap_or_default())
}

/// Samples the runtime's live tasks into `pictor_api_tasks` every second until `stopped`: a
/// leak of per-connection or per-stream tasks shows as a count that does not come back down.
pub fn spawn_runtime_sampler(mut stopped: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        let runtime = tokio::runtime::Handle::current();
        loop {
            metrics::gauge!("pictor_api_tasks").set(runtime.metrics().num_alive_tasks() as f64);
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                _ = stopped.changed() => return,
            }
        }
    });
}

/// Event streams open (up by one, down by one).
pub fn streams_open(delta: f64) {
    metrics::gauge!("pictor_http_streams_open").increment(delta);
}

/// A connection past `api.max_connections` was refused.
pub fn connection_refused() {
    counter!("pictor_http_connections_refused_total").increment(1);
}

/// A request past `api.max_in_flight` was shed.
pub fn request_shed() {
    counter!("pictor_http_requests_shed_total").increment(1);
}

/// Counts and times every request by its route template, never its concrete path (job ids
/// would make the label set unbounded).
///
/// Labels are `&'static str`, so recording allocates no label strings per request: methods
/// outside the standard set count as `OTHER`, and route templates (a fixed set, the router's)
/// are interned.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| interned(path.as_str()));
    let method = method_label(request.method());
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
        "method" => method,
        "route" => route,
        "status_class" => status_class
    )
    .increment(1);
    histogram!("pictor_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Standard methods by name; anything else as `OTHER`, so the label set stays small.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// The one `'static` copy of a route template. Templates come from the router, so the set is
/// fixed and small; each is leaked once.
fn interned(route: &str) -> &'static str {
    static ROUTES: OnceLock<RwLock<HashSet<&'static str>>> = OnceLock::new();
    let routes = ROUTES.get_or_init(RwLock::default);
    let known = routes
        .read()
        .map_or(None, |routes| routes.get(route).copied());
    if let Some(known) = known {
        return known;
    }
    let mut routes = routes
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = routes.get(route) {
        return known;
    }
    let leaked: &'static str = Box::leak(route.to_owned().into_boxed_str());
    routes.insert(leaked);
    leaked
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

/// `objects` images deleted here, because their job was `canceled`.
pub fn images_deleted(reason: &'static str, objects: u64) {
    counter!("pictor_images_deleted_total", "reason" => reason).increment(objects);
}

/// Help texts for the api's metrics (call after the recorder is installed).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("pictor_jobs_accepted_total", "Jobs answered 202 Accepted.");
    describe_gauge!(
        "pictor_api_tasks",
        "Live tokio tasks in the api process, sampled every second."
    );
    describe_gauge!("pictor_http_streams_open", "Event streams open now.");
    describe_counter!(
        "pictor_http_connections_refused_total",
        "Connections refused with 503 past api.max_connections."
    );
    describe_counter!(
        "pictor_http_requests_shed_total",
        "Requests refused with 503 past api.max_in_flight."
    );
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
    describe_counter!(
        "pictor_images_deleted_total",
        "Images deleted from the image store, by why."
    );
}
