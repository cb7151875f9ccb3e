//! One process's connection to Pictor's Redis: [`Redis`], the handle every Redis-backed part is
//! made from (the job store, the cost ledger, the rate limiter, the daily statistics, the image
//! retention schedule; the worker's circuit breaker and the scheduler's state take their
//! connection from it too). It wraps one auto-reconnecting multiplexed connection and the key
//! prefix, so a process connects once and every part shares that connection.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use secrecy::ExposeSecret;
use tokio::sync::watch;

use crate::config::RedisSettings;
use crate::keys::Keys;
use crate::ledger::{BudgetPolicy, Ledger};
use crate::ratelimit::RateLimiter;
use crate::retention::Retention;
use crate::sentinel::{Primary, Replication, SentinelSettings};
use crate::stats::Stats;
use crate::store::{JobStore, StoreError};

/// Pictor's Redis, as one process holds it. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    connection: RedisConnection,
    keys: Keys,
}

impl Redis {
    /// Connects (with the settings' timeouts), and warns when Redis may evict Pictor's state.
    /// With sentinels configured, connects to the primary they name and follows it.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        let client = redis::Client::open(settings.url.expose_secret())?;
        let connection = if settings.sentinels.is_empty() {
            let manager = client
                .get_connection_manager_with_config(crate::sentinel::manager_config(
                    settings.timeout,
                ))
                .await?;
            RedisConnection::fixed(client, manager)
        } else {
            let replication = Arc::new(Replication::new(
                settings.replica_wait,
                settings.min_replicas,
            ));
            let primary = crate::sentinel::follow(
                SentinelSettings {
                    sentinels: settings.sentinels.clone(),
                    service: settings.sentinel_service.clone(),
                    node: client.get_connection_info().clone(),
                    timeout: settings.timeout,
                },
                replication.clone(),
            )
            .await?;
            RedisConnection {
                primary,
                replication: Some(replication),
            }
        };
        warn_if_redis_evicts(&mut connection.clone()).await;
        warn_if_cluster_without_tag(&mut connection.clone(), &settings.prefix).await;
        Ok(Self {
            connection,
            keys: Keys::new(settings.prefix.clone()),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The shared connection (multiplexed; following the primary under Sentinel).
    pub fn connection(&self) -> RedisConnection {
        self.connection.clone()
    }

    /// A client for the current primary, for the few callers that need a dedicated connection
    /// (pub/sub). Ask again after a disconnect: under Sentinel the primary may have moved.
    pub fn client(&self) -> redis::Client {
        self.connection.primary.borrow().client.clone()
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

/// One process's connection to the Redis primary: a multiplexed, auto-reconnecting
/// [`ConnectionManager`], swapped for a new one when Sentinel names a new primary. Cheap to
/// clone; every command goes to the primary of the moment.
#[derive(Clone)]
pub struct RedisConnection {
    primary: watch::Receiver<Arc<Primary>>,
    /// Under Sentinel: how many replicas a write must reach before Pictor relies on it.
    replication: Option<Arc<Replication>>,
}

impl RedisConnection {
    /// A connection to one fixed Redis.
    pub fn fixed(client: redis::Client, connection: ConnectionManager) -> Self {
        let address = client.get_connection_info().addr().to_string();
        let (_, primary) = watch::channel(Arc::new(Primary {
            client,
            monitor: connection.clone(),
            connection,
            address,
            generation: 0,
        }));
        Self {
            primary,
            replication: None,
        }
    }

    /// The same connection, held to the primary of this moment: a write made through it and
    /// its [`Pinned::replicated`] go to one node.
    pub fn pinned(&self) -> Pinned {
        Pinned {
            primary: self.primary.borrow().clone(),
            connection: self.clone(),
        }
    }

    /// Passes `result` on; an error that says the primary may have moved (a replica's
    /// `READONLY`, a dropped or refused connection) asks the follower to look now.
    fn watched<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let (Err(error), Some(replication)) = (&result, &self.replication)
            && (error.is_connection_dropped()
                || error.is_connection_refusal()
                || error.code() == Some("READONLY"))
        {
            replication.nudge.notify_one();
        }
        result
    }
}

/// A [`RedisConnection`] held to one primary, for a write that must survive a failover.
pub struct Pinned {
    primary: Arc<Primary>,
    connection: RedisConnection,
}

impl Pinned {
    /// Returns once the writes made so far through this connection are on the replicas a
    /// failover could promote (immediately without Sentinel, or with waiting turned off).
    /// An error means the writes may be lost in a failover: treat it as Redis trouble.
    pub async fn replicated(&mut self) -> Result<(), redis::RedisError> {
        let Some(replication) = &self.connection.replication else {
            return Ok(());
        };
        let current = self.connection.primary.borrow().generation;
        replication
            .wait(
                &mut self.primary.connection.clone(),
                self.primary.generation,
                current,
            )
            .await
    }
}

impl redis::aio::ConnectionLike for Pinned {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let mut connection = self.primary.connection.clone();
            self.connection
                .watched(connection.req_packed_command(cmd).await)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let mut connection = self.primary.connection.clone();
            self.connection.watched(
                connection
                    .req_packed_commands(pipeline, offset, count)
                    .await,
            )
        })
    }

    fn get_db(&self) -> i64 {
        self.primary.connection.get_db()
    }
}

impl redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let mut pinned = self.pinned();
        Box::pin(async move { pinned.req_packed_command(cmd).await })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        let mut pinned = self.pinned();
        Box::pin(async move { pinned.req_packed_commands(pipeline, offset, count).await })
    }

    fn get_db(&self) -> i64 {
        self.primary.borrow().connection.get_db()
    }
}

/// Job state, the cost ledger and idempotency keys must never be evicted: a Redis that evicts
/// keys under memory pressure loses accepted jobs silently. Warns at start when the policy is
/// anything but `noeviction` (managed Redis that forbids `CONFIG` is not checked).
async fn warn_if_redis_evicts(connection: &mut RedisConnection) {
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

/// On a Redis Cluster node, every key of a deployment must share a slot ([`crate::keys`]):
/// says so at start when the prefix carries no hash tag, since scripts would then fail with
/// `CROSSSLOT` on the first job.
async fn warn_if_cluster_without_tag(connection: &mut RedisConnection, prefix: &str) {
    let info: redis::RedisResult<String> = redis::cmd("INFO")
        .arg("cluster")
        .query_async(connection)
        .await;
    if let Ok(info) = info
        && info.lines().any(|line| line.trim() == "cluster_enabled:1")
        && crate::keys::hash_tag(prefix) == prefix
    {
        tracing::error!(
            prefix,
            "Redis is a Cluster node and PICTOR_REDIS_PREFIX has no hash tag: Pictor's scripts \
             need every key in one slot. Set a prefix such as `{{pictor}}:` (docs/scaling.md, \
             \"Redis Cluster\")"
        );
    }
}

/// Whether Redis writes its data to disk: AOF on, or at least one RDB save point. `None` when
/// it cannot be told (`CONFIG` renamed or refused, as managed services do).
pub async fn persistence(connection: &mut RedisConnection) -> Option<bool> {
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
