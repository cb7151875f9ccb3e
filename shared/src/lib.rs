//! What the api, worker and scheduler share: domain types, settings, the queue topology, the
//! Redis store and its keys, the image store, the retry policy and telemetry set-up.
//!
//! Only this crate talks to lapin and Redis directly; agents and handlers go through it.

pub mod auth;
pub mod codes;
pub mod config;
pub mod connection;
pub mod costs;
pub mod delivery;
pub mod domain;
pub mod failpoint;
pub mod fair;
pub mod images;
pub mod keys;
pub mod ledger;
pub mod pricing;
pub mod queue;
pub mod ratelimit;
pub mod reconcile;
pub mod retention;
pub mod retry;
pub mod script;
pub mod sentinel;
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

/// Real-Redis helpers for this crate's unit tests: a connection, and a fresh key prefix per
/// test whose keys are deleted afterwards, also when the test panics.
#[cfg(any(test, feature = "testing"))]
#[expect(
    clippy::unwrap_used,
    reason = "a test helper: failing loudly is its job"
)]
pub mod test_redis {
    use std::future::Future;

    use crate::connection::RedisConnection;

    use crate::keys::Keys;

    pub async fn connect() -> RedisConnection {
        let url = std::env::var("PICTOR_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
        let client = redis::Client::open(url).unwrap();
        let manager = client.get_connection_manager().await.unwrap();
        RedisConnection::fixed(client, manager)
    }

    pub async fn with_redis<F, Fut>(test: F)
    where
        F: FnOnce(Keys) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let keys = Keys::new(format!("pictor-test-{}:", uuid::Uuid::new_v4().simple()));
        let outcome = tokio::spawn(test(keys.clone())).await;
        delete_keys(&keys).await;
        if let Err(error) = outcome {
            std::panic::resume_unwind(error.into_panic());
        }
    }

    async fn delete_keys(keys: &Keys) {
        let mut connection = connect().await;
        let mut cursor: u64 = 0;
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(keys.everything_pattern())
                .arg("COUNT")
                .arg(500)
                .query_async(&mut connection)
                .await
                .unwrap();
            if !found.is_empty() {
                redis::cmd("UNLINK")
                    .arg(&found)
                    .query_async::<()>(&mut connection)
                    .await
                    .unwrap();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}
