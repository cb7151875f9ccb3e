//! One process's connection to Pictor's Redis: [`Redis`], the handle every Redis-backed part is
//! made from (the job store, the cost ledger, the rate limiter, the daily statistics, the image
//! retention schedule; the worker's circuit breaker and the scheduler's state take their
//! connection from it too). It wraps one auto-reconnecting multiplexed connection and the key
//! prefix, so a process connects once and every part shares that connection.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;
use crate::keys::Keys;
use crate::ledger::{BudgetPolicy, Ledger};
use crate::ratelimit::RateLimiter;
use crate::retention::Retention;
use crate::stats::Stats;
use crate::store::{JobStore, StoreError};

/// Pictor's Redis, as one process holds it. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    connection: ConnectionManager,
    keys: Keys,
}

impl Redis {
    /// Connects (with the settings' timeouts), and warns when Redis may evict Pictor's state.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        let client = redis::Client::open(settings.url.expose_secret())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let mut connection = client.get_connection_manager_with_config(config).await?;
        warn_if_redis_evicts(&mut connection).await;
        Ok(Self {
            client,
            connection,
            keys: Keys::new(settings.prefix.clone()),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The shared multiplexed connection.
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// The underlying client, for the few callers that need a dedicated connection (pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The job store, keeping jobs for `ttl` after their last change.
    pub fn jobs(&self, ttl: Duration) -> JobStore {
        JobStore::new(self.clone(), ttl)
    }

    /// The cost ledger under `policy`.
    pub fn ledger(&self, policy: BudgetPolicy) -> Ledger {
        Ledger::new(self.connection(), self.keys.clone(), policy)
    }

    /// The fleet-wide rate limiter.
    pub fn limiter(&self) -> RateLimiter {
        RateLimiter::new(self.connection(), self.keys.clone())
    }

    /// The image expiry schedule and the image store's size, deleting images `retention` after
    /// their job's last change.
    pub fn image_retention(&self, retention: Duration) -> Retention {
        Retention::new(self.connection(), self.keys.clone(), retention)
    }

    /// The backlog and its fair shares under `policy`.
    pub fn fairness(&self, policy: crate::fair::FairPolicy) -> crate::fair::Fairness {
        crate::fair::Fairness::new(self.connection(), self.keys.clone(), policy)
    }

    /// The daily statistics.
    pub fn stats(&self) -> Stats {
        Stats::new(self.connection(), self.keys.clone())
    }
}

/// Job state, the cost ledger and idempotency keys must never be evicted: a Redis that evicts
/// keys under memory pressure loses accepted jobs silently. Warns at start when the policy is
/// anything but `noeviction` (managed Redis that forbids `CONFIG` is not checked).
async fn warn_if_redis_evicts(connection: &mut ConnectionManager) {
    let reply: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(connection)
        .await;
    if let Ok(reply) = reply
        && let Some(policy) = reply.get(1)
        && policy != "noeviction"
    {
        tracing::warn!(
            policy = %policy,
            "Redis maxmemory-policy is not noeviction: under memory pressure Redis may evict \
             job state and the cost ledger; set `maxmemory-policy noeviction`"
        );
    }
    if let Some(false) = persistence(connection).await {
        tracing::error!(
            "Redis keeps nothing on disk (appendonly no, and no RDB save points): a restart of \
             Redis loses every job's state, the cost ledger, budget holds and rate limits. Set \
             `appendonly yes` (docs/scaling.md, \"Redis\"); on a throwaway machine this is fine"
        );
    }
}

/// Whether Redis writes its data to disk: AOF on, or at least one RDB save point. `None` when
/// it cannot be told (`CONFIG` renamed or refused, as managed services do).
pub async fn persistence(connection: &mut ConnectionManager) -> Option<bool> {
    let reply: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(connection)
        .await
        .ok()?;
    let appendonly = reply.get(1)?.eq_ignore_ascii_case("yes");
    let reply: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async(connection)
        .await
        .ok()?;
    let save_points = reply.get(1).is_some_and(|save| !save.trim().is_empty());
    Some(appendonly || save_points)
}
