//! The retired LangGraph service's endpoints. `POST /api/langgraph/agents/execute` (and any
//! method on any path under `/api/langgraph/`) answers `410 Gone` with the usual error body
//! (code `endpoint_retired`) plus where to go instead: `POST /v1/jobs` and the migration guide
//! (docs/migration.md).
//!
//! No key is required for the 410: a caller of the old service should learn it moved, not be
//! told to authenticate against a service it has never used. Each call is counted in
//! `pictor_legacy_requests_total{endpoint, method, caller}` and logged at warn, so ops see who
//! still calls it. `caller` is the user id of a valid API key, else `anonymous`; the key itself
//! never reaches a label or a log line. A user id as a label breaks the usual rule on purpose:
//! the set is bounded by the configured keys, and the metric goes away with this file.

use axum::Json;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use metrics::counter;
use serde_json::json;

use crate::error::ErrorCode;
use crate::observe::method_label;
use crate::state::AppState;

/// The old execute endpoint; every other path under `/api/langgraph` is retired with it.
pub const EXECUTE: &str = "/api/langgraph/agents/execute";
const REST: &str = "/api/langgraph/{*rest}";
const ROOT: &str = "/api/langgraph";
const ROOT_SLASH: &str = "/api/langgraph/";

/// The retired routes. Also describes their metric: the router is built once per api, after
/// the binary installed its recorder.
pub fn routes() -> Router<AppState> {
    metrics::describe_counter!(
        "pictor_legacy_requests_total",
        "Calls to the retired LangGraph endpoints (answered 410), by endpoint, method and caller."
    );
    Router::new()
        .route(EXECUTE, any(retired))
        .route(REST, any(retired))
        .route(ROOT, any(retired))
        .route(ROOT_SLASH, any(retired))
}

async fn retired(State(app): State<AppState>, request: Request) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(ROOT, |path| match path.as_str() {
            EXECUTE => EXECUTE,
            REST => REST,
            _ => ROOT,
        });
    let method = method_label(request.method());
    let caller = caller(&app, &request);
    counter!(
        "pictor_legacy_requests_total",
        "endpoint" => endpoint,
        "method" => method,
        "caller" => caller.clone()
    )
    .increment(1);
    // Anyone can call this, without a key: at most one line a second, saying how many calls
    // it stands for, so the endpoint cannot flood the logs. The counter above counts them all.
    if let Some(suppressed) = LOG_SAMPLER.admit() {
        let path: String = request.uri().path().chars().take(200).collect();
        tracing::warn!(
            %caller,
            method,
            endpoint,
            %path,
            suppressed,
            "Retired LangGraph endpoint called; answering 410 (suppressed: calls since the last line)"
        );
    }
    gone(&migration_guide(&app))
}

static LOG_SAMPLER: LogSampler = LogSampler::new();

/// Admits at most one log line a second, counting the ones it holds back.
struct LogSampler {
    /// The second (Unix time) of the last line admitted.
    last: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogSampler {
    const fn new() -> Self {
        Self {
            last: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last line)` when this call may log.
    fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        if now > last
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// The user id of a valid bearer key, else `anonymous` (a missing, malformed or unknown key).
fn caller(app: &AppState, request: &Request) -> String {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .and_then(|(_, secret)| app.authenticate(secret.trim()))
        .map_or_else(
            || "anonymous".to_string(),
            |principal| principal.user.to_string(),
        )
}

/// The guide's address: next to the runbooks when they are linked by URL, else its path in the
/// repository.
fn migration_guide(app: &AppState) -> String {
    app.settings
        .scheduler
        .runbook_base_url
        .trim_end_matches('/')
        .strip_suffix("/runbooks")
        .map_or_else(
            || "docs/migration.md".to_string(),
            |docs| format!("{docs}/migration.md"),
        )
}

/// The 410 body: the api's error shape, with two extra fields a client can follow.
fn gone(migration_guide: &str) -> Response {
    (
        ErrorCode::EndpointRetired.status(),
        Json(json!({
            "error": {
                "code": ErrorCode::EndpointRetired.as_str(),
                "message": format!(
                    "the LangGraph service is retired: submit jobs with POST /v1/jobs and poll \
                     them; see the migration guide at {migration_guide}"
                ),
                "replacement": "POST /v1/jobs",
                "migration_guide": migration_guide,
            }
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn unusual_methods_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        let custom = Method::from_bytes(b"PURGE").expect("a valid method token");
        assert_eq!(method_label(&custom), "OTHER");
    }
}
