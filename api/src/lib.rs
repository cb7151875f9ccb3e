//! Pictor's HTTP ingress: parse, authorise, enqueue, answer. It never calls a model provider;
//! it only writes jobs to Redis and RabbitMQ and reads them back.

mod auth;
mod clarify;
mod costs;
mod dashboard;
mod error;
mod events;
mod extract;
mod headers;
mod health;
mod inputs;
mod intake;
mod jobs;
mod legacy;
mod observe;
mod openapi;
mod playground;
mod server;
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
        shared::sentinel::describe();
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
        let events = EventHub::start(redis.clone(), redis.keys().events_channel());
        let listener = TcpListener::bind(settings.api.addr)
            .await
            .with_context(|| format!("cannot listen on {} (PICTOR_API_ADDR)", settings.api.addr))?;
        let api_settings = settings.api.clone();
        // Read once: the cost summary names models from it on every request.
        let prices = Arc::new(settings.price_table().unwrap_or_else(|error| {
            tracing::warn!(%error, "Cost summaries without model names: the price table is unreadable");
            shared::pricing::PriceTable::parse("")
                .unwrap_or_else(|_| unreachable!("an empty table parses"))
        }));
        let state = AppState::new(state::Parts {
            prices,
            limiter: Arc::new(redis.limiter()),
            ledger: redis.ledger(BudgetPolicy::from(&settings.budget)),
            stats: redis.stats(),
            retention: redis.image_retention(settings.images.retention),
            fair: redis.fairness(settings.backlog.fair_policy()),
            settings: Arc::new(settings),
            store,
            publisher,
            images,
            events,
            streams: state::StreamSlots::new(api_settings.max_streams_per_user.get()),
            keys: std::sync::RwLock::new(Arc::new(api_settings.dev_api_keys.clone())),
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
        let (stop, stopped) = tokio::sync::watch::channel(false);
        if let Some(addr) = self.state.settings.api.metrics_addr {
            let stopped = stopped.clone();
            tokio::spawn(async move {
                if let Err(error) = shared::telemetry::metrics::serve(
                    "api",
                    addr,
                    shared::telemetry::metrics::always_healthy(),
                    stopped,
                )
                .await
                {
                    tracing::error!(%error, %addr, "Cannot serve api metrics (PICTOR_API_METRICS_ADDR)");
                }
            });
        }
        observe::spawn_runtime_sampler(stopped.clone());
        spawn_key_reloader(self.state.clone(), stopped.clone());
        let publisher = self.state.publisher.clone();
        let api = &self.state.settings.api;
        let limits = server::ConnectionLimits {
            max_connections: api.max_connections.get(),
            header_read_timeout: api.header_read_timeout,
            retry_after_secs: api.retry_after_secs,
        };
        let result = server::serve(self.listener, self.router, limits, async move {
            shutdown.await;
            let _ = stop.send(true);
        })
        .await;
        publisher.close().await;
        result
    }
}

/// Reloads the key file on SIGHUP until `stopped`: revoking a key is an edit of the file and
/// `kill -HUP`, no restart.
fn spawn_key_reloader(state: AppState, mut stopped: tokio::sync::watch::Receiver<bool>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("Cannot listen for SIGHUP; the key file reloads only on restart");
            return;
        };
        loop {
            tokio::select! {
                _ = hangups.recv() => match state.reload_keys() {
                    Ok(count) => tracing::info!(keys = count, "API keys reloaded"),
                    Err(error) => tracing::error!(%error, "API keys not reloaded; the previous keys stay in force"),
                },
                _ = stopped.changed() => return,
            }
        }
    });
    #[cfg(not(unix))]
    drop((state, stopped));
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
        .routes(routes!(costs::months))
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
    let api = &state.settings.api;
    let limits = Arc::new(server::RequestLimits::new(
        api.request_timeout,
        api.max_in_flight.get(),
        api.retry_after_secs,
    ));
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
        .layer(axum::middleware::from_fn_with_state(
            limits,
            server::bound_requests,
        ))
        .layer(axum::middleware::from_fn(headers::security_headers))
        .layer(axum::middleware::from_fn(observe::track_requests))
        .layer(TraceLayer::new_for_http());
    if let Some(cors) = cors {
        router = router.layer(cors);
    }
    Ok(router)
}

/// CORS for the configured origins. `*` alone allows every origin, without credentials (the
/// api authenticates with a bearer header, never a cookie, so none are needed); `*` beside
/// other origins is a configuration error, as is anything that is not an origin.
fn cors_layer(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|origin| origin == "*") {
        if origins.len() > 1 {
            anyhow::bail!(
                "invalid setting api.cors_origins (PICTOR_CORS_ORIGINS): `*` allows every origin \
                 and must stand alone"
            );
        }
        AllowOrigin::any()
    } else {
        let origins = origins
            .iter()
            .map(|origin| {
                let origin = origin.trim_end_matches('/');
                url::Url::parse(origin)
                    .ok()
                    .filter(|url| matches!(url.scheme(), "http" | "https") && url.path() == "/")
                    .and_then(|_| HeaderValue::from_str(origin).ok())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "invalid setting api.cors_origins (PICTOR_CORS_ORIGINS): {origin:?} \
                             is not an origin like https://app.example.com"
                        )
                    })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(origins)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
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
