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
    /// The backlog: pending jobs per user and in all, and where a waiting job stands.
    pub fair: shared::fair::Fairness,
    /// The event streams open, per user.
    pub streams: StreamSlots,
    /// The API keys in force: the settings' at start, the key file's again on SIGHUP.
    pub keys: std::sync::RwLock<Arc<shared::auth::ApiKeys>>,
    /// The price table as read at start, for the models' names in the cost summary.
    pub prices: Arc<shared::pricing::PriceTable>,
}

impl Parts {
    /// The principal `secret` belongs to, by the keys in force now.
    pub fn authenticate(&self, secret: &str) -> Option<shared::domain::Principal> {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        keys.authenticate(secret).cloned()
    }

    /// Re-reads the key file (`api.api_keys_file`) and puts its keys in force, so a key is
    /// revoked or added without a restart. On any error the keys in force stay.
    pub fn reload_keys(&self) -> Result<usize, String> {
        let Some(path) = &self.settings.api.api_keys_file else {
            return Err("no key file is configured (PICTOR_API_KEYS_FILE)".to_string());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let keys = shared::auth::ApiKeys::parse_hashed(&text)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        let count = keys.len();
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        Ok(count)
    }
}

/// The event streams each user holds open, capped per user (`api.max_streams_per_user`).
pub struct StreamSlots {
    open: Arc<std::sync::Mutex<std::collections::HashMap<shared::domain::UserId, u32>>>,
    per_user: u32,
}

/// One open stream: its slot is given back when this is dropped (however the stream ends).
pub struct StreamSlot {
    open: Arc<std::sync::Mutex<std::collections::HashMap<shared::domain::UserId, u32>>>,
    user: shared::domain::UserId,
}

impl StreamSlots {
    pub fn new(per_user: u32) -> Self {
        Self {
            open: Arc::default(),
            per_user,
        }
    }

    /// A slot for one more stream of `user`, unless they hold the most allowed.
    pub fn open(&self, user: &shared::domain::UserId) -> Option<StreamSlot> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(user.clone()).or_insert(0);
        if *count >= self.per_user {
            return None;
        }
        *count += 1;
        crate::observe::streams_open(1.0);
        Some(StreamSlot {
            open: self.open.clone(),
            user: user.clone(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.user);
            }
        }
        crate::observe::streams_open(-1.0);
    }
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
