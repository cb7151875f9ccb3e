//! What the api, worker and scheduler share: domain types, settings, the queue topology, the
//! Redis store and its keys, the image store, the retry policy and telemetry set-up.
//!
//! Only this crate talks to lapin and Redis directly; agents and handlers go through it.

pub mod breaker;
pub mod config;
pub mod costs;
pub mod dlq;
pub mod domain;
pub mod images;
pub mod keys;
pub mod ledger;
pub mod pricing;
pub mod queue;
pub mod ratelimit;
pub mod retry;
pub mod stats;
pub mod store;
pub mod telemetry;

/// Resolves on Ctrl-C or SIGTERM: the shutdown future every binary passes to its `run`.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("Shutdown signal received");
}
