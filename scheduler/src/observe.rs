//! The scheduler's small HTTP server: `/metrics` (Prometheus) and `/healthz`, as each worker
//! serves them, on `scheduler.metrics_addr`.

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use tokio::sync::watch;

/// Serves `/metrics` and `/healthz` on `addr` until shutdown.
pub async fn serve(addr: SocketAddr, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let router = Router::new()
        .route(
            "/metrics",
            get(|| async {
                shared::telemetry::metrics::handle()
                    .map(|handle| handle.render())
                    .unwrap_or_default()
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "Scheduler metrics listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}
