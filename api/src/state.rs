//! The api's shared state: the stores it talks to and the settings it answers by.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use shared::config::Settings;
use shared::images::ImageStore;
use shared::ledger::Ledger;
use shared::queue::Publisher;
use shared::ratelimit::RateLimiter;
use shared::store::JobStore;

use crate::events::EventHub;

/// What every handler reads, behind one `Arc`: axum clones the state for every request, and the
/// stores inside hold strings and scripts that would be copied each time.
#[derive(Clone)]
pub struct AppState(Arc<Parts>);

impl AppState {
    pub fn new(parts: Parts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = Parts;

    fn deref(&self) -> &Parts {
        &self.0
    }
}

pub struct Parts {
    pub settings: Arc<Settings>,
    pub store: JobStore,
    pub publisher: Publisher,
    pub images: ImageStore,
    pub events: EventHub,
    pub limiter: Arc<RateLimiter>,
    pub ledger: Ledger,
    pub stats: shared::stats::Stats,
    /// When images go, and how much the image store holds.
    pub retention: shared::retention::Retention,
    /// The work queue's depth as last seen by the monitor task (`u32::MAX`: unknown yet).
    pub queue_depth: Arc<AtomicU32>,
}

impl Parts {
    /// `{public_url}{path}`: absolute when a public URL is configured, relative otherwise.
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.settings.api.public_url.trim_end_matches('/')
        )
    }
}

/// Seconds clients are told to wait on a 503. Process-wide because errors are converted into
/// responses without access to the state; every api in one process shares its settings anyway.
static RETRY_AFTER_SECS: AtomicU32 = AtomicU32::new(5);

pub fn set_retry_after_secs(seconds: u32) {
    RETRY_AFTER_SECS.store(seconds.max(1), Ordering::Relaxed);
}

pub fn retry_after_secs() -> u32 {
    RETRY_AFTER_SECS.load(Ordering::Relaxed)
}

/// Keeps `depth` close to the work queue's real depth, reading it once a second, so admission
/// control costs no broker round trip per request.
pub fn spawn_depth_monitor(publisher: Publisher, depth: Arc<AtomicU32>) {
    tokio::spawn(async move {
        loop {
            match publisher.queue_depth().await {
                Ok(current) => depth.store(current, Ordering::Relaxed),
                // Unknown depth must not block jobs: the publish itself will tell the client
                // if the broker is really gone.
                Err(_) => depth.store(0, Ordering::Relaxed),
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
}
