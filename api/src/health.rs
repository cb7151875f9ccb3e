//! Liveness (`/healthz`: the process answers) and readiness (`/readyz`: Redis and RabbitMQ are
//! reachable, so a load balancer should send traffic here).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::{AppState, retry_after_secs};

/// The process answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

/// Whether the api can serve: Redis and RabbitMQ reachable.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    pub status: &'static str,
    pub checks: ReadinessChecks,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadinessChecks {
    /// `ok` or `unavailable`.
    pub redis: &'static str,
    /// `ok` or `unavailable`.
    pub rabbitmq: &'static str,
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    summary = "Liveness",
    responses((status = 200, description = "The process is up.", body = Health)),
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    summary = "Readiness",
    description = "Checks Redis and RabbitMQ (2 s each): send traffic here only when `200`.",
    responses(
        (status = 200, description = "Ready.", body = Readiness),
        (status = 503, description = "Redis or RabbitMQ is unreachable.", body = Readiness,
            headers(("Retry-After" = u32, description = "Seconds to wait before asking again."))),
    ),
)]
pub async fn readyz(State(app): State<AppState>) -> Response {
    let limit = Duration::from_secs(2);
    let (redis, rabbitmq) = tokio::join!(
        tokio::time::timeout(limit, app.store.ping()),
        tokio::time::timeout(limit, app.publisher.ensure_connected()),
    );
    let redis_ok = matches!(redis, Ok(Ok(())));
    let rabbitmq_ok = matches!(rabbitmq, Ok(Ok(())));
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let body = Json(Readiness {
        status: if redis_ok && rabbitmq_ok {
            "ready"
        } else {
            "unavailable"
        },
        checks: ReadinessChecks {
            redis: word(redis_ok),
            rabbitmq: word(rabbitmq_ok),
        },
    });
    if redis_ok && rabbitmq_ok {
        (StatusCode::OK, body).into_response()
    } else {
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs()));
        response
    }
}
