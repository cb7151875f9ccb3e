//! Liveness (`/healthz`: the process answers) and readiness (`/readyz`: Redis and RabbitMQ are
//! reachable, so a load balancer should send traffic here).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::state::{AppState, retry_after_secs};

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(app): State<AppState>) -> Response {
    let limit = Duration::from_secs(2);
    let (redis, rabbitmq) = tokio::join!(
        tokio::time::timeout(limit, app.store.ping()),
        tokio::time::timeout(limit, app.publisher.ensure_connected()),
    );
    let redis_ok = matches!(redis, Ok(Ok(())));
    let rabbitmq_ok = matches!(rabbitmq, Ok(Ok(())));
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let body = Json(json!({
        "status": if redis_ok && rabbitmq_ok { "ready" } else { "unavailable" },
        "checks": {"redis": word(redis_ok), "rabbitmq": word(rabbitmq_ok)},
    }));
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
