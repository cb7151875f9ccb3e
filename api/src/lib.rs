//! Pictor's HTTP ingress: parse, authorise, enqueue, answer. It never calls a model provider;
//! it only writes jobs to Redis and RabbitMQ and reads them back.

mod auth;
mod clarify;
mod costs;
mod dashboard;
mod error;
mod events;
mod extract;
mod health;
mod inputs;
mod intake;
mod jobs;
mod legacy;
mod observe;
mod openapi;
mod playground;
mod state;
mod submit;
mod view;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, header};
use shared::config::Settings;
use shared::images::ImageStore;
use shared::ledger::BudgetPolicy;
use shared::queue::Publisher;
use shared::store::JobStore;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ErrorCode};
use events::EventHub;
pub use openapi::{DOCS_PATH, SPEC_PATH};
use state::AppState;

/// A bound, ready-to-serve api.
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
}

impl Application {
    /// Connects to Redis, opens the image store, binds the listening socket. RabbitMQ is
    /// connected lazily (and re-connected) on first publish, so the api starts, and reports
    /// not-ready, while the broker is down.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        use anyhow::Context;
        state::set_retry_after_secs(settings.api.retry_after_secs);
        observe::describe();
        let store = JobStore::connect(&settings.redis, settings.jobs.ttl)
            .await
            .context("cannot connect to redis (PICTOR_REDIS_URL)")?
            .with_image_retention(settings.images.retention);
        let images = ImageStore::open(&settings.images.store)
            .context("cannot open the image store (PICTOR_IMAGE_STORE)")?;
        let publisher = Publisher::new(settings.amqp.clone(), settings.api.publish_timeout);
        if let Err(error) = publisher.ensure_connected().await {
            tracing::warn!(%error, "RabbitMQ is not reachable yet; jobs get 503 until it is");
        }
        if settings.api_keys().is_empty() {
            tracing::warn!("No API keys are configured (PICTOR_API_KEYS): every request gets 401");
        }
        let redis = store.redis().clone();
        let events = EventHub::start(redis.client().clone(), redis.keys().events_channel());
        let listener = TcpListener::bind(settings.api.addr)
            .await
            .with_context(|| format!("cannot listen on {} (PICTOR_API_ADDR)", settings.api.addr))?;
        let queue_depth = Arc::new(std::sync::atomic::AtomicU32::new(0));
        state::spawn_depth_monitor(publisher.clone(), queue_depth.clone());
        let state = AppState::new(state::Parts {
            limiter: Arc::new(redis.limiter()),
            ledger: redis.ledger(BudgetPolicy::from(&settings.budget)),
            stats: redis.stats(),
            retention: redis.image_retention(settings.images.retention),
            settings: Arc::new(settings),
            store,
            publisher,
            images,
            events,
            queue_depth,
        });
        let router = router(state.clone())?;
        Ok(Self {
            listener,
            router,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.state.settings.api.addr)
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(addr = %self.local_addr(), "Api listening");
        let publisher = self.state.publisher.clone();
        let result = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await;
        publisher.close().await;
        result
    }
}

/// Every public route of the api, each registered together with its OpenAPI operation (the
/// handler's `#[utoipa::path]`), so the router and the document come from this one list. A
/// route given to the axum router directly instead is missing from the document, and the e2e
/// test `openapi` fails.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(jobs::list, jobs::create))
        .routes(routes!(jobs::get, jobs::cancel))
        .routes(routes!(jobs::image))
        .routes(routes!(jobs::events))
        .routes(routes!(jobs::clarify))
        .routes(routes!(costs::summary))
        .routes(routes!(costs::export_csv))
        .routes(routes!(dashboard::page))
        .routes(routes!(health::healthz))
        .routes(routes!(observe::metrics))
        .routes(routes!(health::readyz))
}

/// The OpenAPI 3.1 document of the api, as served at [`SPEC_PATH`].
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    api_routes().into_openapi()
}

fn router(state: AppState) -> anyhow::Result<Router> {
    let max_body = state.settings.api.max_body_bytes.get();
    let cors = cors_layer(&state.settings.api.cors_origins)?;
    let (api, document) = api_routes().split_for_parts();
    let mut router = api
        .merge(legacy::routes())
        .merge(playground::routes())
        // Not in the document: the document itself and its browsable page.
        .merge(openapi::routes(document))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async {
            ApiError::client(
                ErrorCode::MethodNotAllowed,
                "this method is not allowed on this path",
            )
        })
        .with_state(state)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::Internal(
                "a handler panicked".to_string(),
            ))
        }))
        .layer(axum::middleware::from_fn(observe::track_requests))
        .layer(TraceLayer::new_for_http());
    if let Some(cors) = cors {
        router = router.layer(cors);
    }
    Ok(router)
}

fn cors_layer(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    if origins.is_empty() {
        return Ok(None);
    }
    let origins = origins
        .iter()
        .map(|origin| {
            HeaderValue::from_str(origin.trim_end_matches('/')).map_err(|_| {
                anyhow::anyhow!(
                    "invalid setting api.cors_origins (PICTOR_CORS_ORIGINS): {origin:?}"
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                header::LOCATION,
                header::RETRY_AFTER,
                HeaderName::from_static("idempotent-replayed"),
            ])
            .max_age(std::time::Duration::from_secs(3600)),
    ))
}
