//! Following the Redis primary that Sentinel names, and knowing when a write is on its replicas.
//!
//! [`follow`] asks the sentinels which node is the primary of the service, every [`POLL`] and at
//! once when a command meets a replica (`READONLY`) or a dropped connection. When the answer changes it connects to the new primary
//! and hands that connection to every [`crate::connection::RedisConnection`] of the process.
//!
//! Replication is asynchronous: a write the old primary answered may be missing on the replica
//! that is promoted. So before Pictor commits to something outside Redis (a `202`, acking a
//! job's message, using a paid answer, running a scheduled job) it asks the primary to `WAIT`
//! for its replicas ([`Replication`]). The number waited for is the most replicas the primary
//! had in sync in the last [`WINDOW`], not how many it has now: during `SENTINEL FAILOVER` the replica
//! being promoted leaves the old primary first, and a write then acknowledged by the remaining
//! replica alone would be lost when that replica follows the new primary.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{Notify, watch};

/// How often the sentinels are asked for the primary, and the primary for its replicas.
pub const POLL: Duration = Duration::from_millis(500);
/// How far back the most replicas seen counts; a replica lost for good costs this long of
/// refused writes.
pub const WINDOW: Duration = Duration::from_secs(5);
/// After a `WAIT` fell short, how long further waits are refused at once instead of each
/// stalling the shared connection for the wait's timeout.
const SHORTFALL_HOLD: Duration = Duration::from_secs(1);

/// Help texts for the metrics of following a primary (every process calls it).
pub fn describe() {
    metrics::describe_counter!(
        "pictor_redis_primary_switches_total",
        "Times this process followed a new Redis primary named by Sentinel."
    );
    metrics::describe_counter!(
        "pictor_redis_replication_shortfalls_total",
        "Writes Pictor relies on that fewer Redis replicas acknowledged than expected."
    );
}

/// The primary a process talks to now.
#[derive(Clone)]
pub struct Primary {
    pub client: redis::Client,
    pub connection: ConnectionManager,
    /// A second connection, for watching the replicas while the first waits on them.
    pub monitor: ConnectionManager,
    /// `host:port`, for logs.
    pub address: String,
    /// Counts the primaries this process has followed; a write and its `WAIT` must share one.
    pub generation: u64,
}

/// How many replicas a write must reach before Pictor relies on it.
pub struct Replication {
    /// `WAIT`'s timeout; zero turns waiting off.
    timeout: Duration,
    /// The fewest replicas a write must reach whatever was seen: a primary just promoted has
    /// none in sync for a moment, and a write it alone holds is lost if the sentinels then
    /// promote another node (two elections in a row, seen here after a crash under load).
    min_replicas: usize,
    state: Mutex<ReplicationState>,
    /// Asks the follower to look again now.
    pub(crate) nudge: Notify,
}

#[derive(Default)]
struct ReplicationState {
    generation: u64,
    /// Replica counts read from the primary, newest last, within [`WINDOW`].
    seen: VecDeque<(Instant, usize)>,
    shortfall_until: Option<Instant>,
}

/// Why a write cannot be relied on yet.
#[derive(Debug, thiserror::Error)]
pub enum NotReplicated {
    #[error("only {acked} of {expected} Redis replicas acknowledged the write")]
    Short { acked: usize, expected: usize },
    #[error("the Redis primary changed between the write and its acknowledgement")]
    PrimaryChanged,
    #[error("Redis replicas fell behind a moment ago; not waiting again yet")]
    Held,
}

impl From<NotReplicated> for redis::RedisError {
    fn from(error: NotReplicated) -> Self {
        std::io::Error::new(std::io::ErrorKind::TimedOut, error.to_string()).into()
    }
}

impl Replication {
    pub fn new(timeout: Duration, min_replicas: u32) -> Self {
        Self {
            timeout,
            min_replicas: usize::try_from(min_replicas).unwrap_or(usize::MAX),
            state: Mutex::new(ReplicationState::default()),
            nudge: Notify::new(),
        }
    }

    /// Records that `primary` had `replicas` connected now.
    fn observe(&self, generation: u64, replicas: usize) {
        let now = Instant::now();
        let mut state = self.state.lock().expect("replication state");
        if state.generation != generation {
            *state = ReplicationState {
                generation,
                ..ReplicationState::default()
            };
        }
        state.seen.push_back((now, replicas));
        while state
            .seen
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > WINDOW)
        {
            state.seen.pop_front();
        }
    }

    /// Replicas a write on primary `generation` must reach: the most seen within the window,
    /// and never fewer than the configured minimum.
    pub fn expected(&self, generation: u64) -> usize {
        let state = self.state.lock().expect("replication state");
        let seen = if state.generation == generation {
            state.seen.iter().map(|(_, n)| *n).max().unwrap_or(0)
        } else {
            0
        };
        seen.max(self.min_replicas)
    }

    /// Waits until the writes `connection` (of primary `generation`) made so far are on the
    /// expected number of replicas.
    pub async fn wait(
        &self,
        connection: &mut ConnectionManager,
        generation: u64,
        current: u64,
    ) -> Result<(), redis::RedisError> {
        if self.timeout.is_zero() {
            return Ok(());
        }
        if generation != current {
            return Err(NotReplicated::PrimaryChanged.into());
        }
        let expected = self.expected(generation);
        if expected == 0 {
            return Ok(());
        }
        if self
            .state
            .lock()
            .expect("replication state")
            .shortfall_until
            .is_some_and(|until| Instant::now() < until)
        {
            return Err(NotReplicated::Held.into());
        }
        let acked: usize = redis::cmd("WAIT")
            .arg(expected)
            .arg(u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX))
            .query_async(connection)
            .await?;
        if acked >= expected {
            return Ok(());
        }
        self.state
            .lock()
            .expect("replication state")
            .shortfall_until = Some(Instant::now() + SHORTFALL_HOLD);
        self.nudge.notify_one();
        metrics::counter!("pictor_redis_replication_shortfalls_total").increment(1);
        Err(NotReplicated::Short { acked, expected }.into())
    }
}

/// Where the sentinels are and how to log in to the nodes they name.
pub struct SentinelSettings {
    pub sentinels: Vec<String>,
    pub service: String,
    /// Credentials and database of the data nodes: the Redis URL's (its address is not used).
    pub node: redis::ConnectionInfo,
    pub timeout: Duration,
}

/// The sentinels, asked in turn. Each is a client of its own, connected on each question: a
/// sentinel that went away must not hold the answer up.
struct Sentinels {
    clients: Vec<redis::Client>,
    service: String,
    node: redis::ConnectionInfo,
    timeout: Duration,
}

impl Sentinels {
    fn new(settings: &SentinelSettings) -> Result<Self, redis::RedisError> {
        let clients = settings
            .sentinels
            .iter()
            .map(|sentinel| {
                if sentinel.contains("://") {
                    redis::Client::open(sentinel.as_str())
                } else {
                    redis::Client::open(format!("redis://{sentinel}"))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            clients,
            service: settings.service.clone(),
            node: settings.node.clone(),
            timeout: settings.timeout,
        })
    }

    /// The primary's `host:port` as the first sentinel that answers names it. This is
    /// `SENTINEL GET-MASTER-ADDR-BY-NAME`, which names the promoted replica as soon as it is
    /// promoted; `SENTINEL MASTERS` (what the `redis` crate's `Sentinel` reads) goes on naming
    /// the old primary until the whole failover has ended, which was 6–7 s here, while the old
    /// primary still takes writes that the failover then discards.
    async fn primary_address(&self) -> Result<(String, u16), redis::RedisError> {
        let mut last = None;
        for client in &self.clients {
            let asked = async {
                let mut connection = client.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.service)
                    .query_async::<Option<(String, u16)>>(&mut connection)
                    .await
            };
            match tokio::time::timeout(self.timeout, asked).await {
                Ok(Ok(Some(address))) => return Ok(address),
                Ok(Ok(None)) => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::MasterNameNotFoundBySentinel,
                        "a sentinel does not know the service",
                        self.service.clone(),
                    )));
                }
                Ok(Err(error)) => last = Some(error),
                Err(_) => {
                    last = Some(
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "a sentinel took too long",
                        )
                        .into(),
                    );
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::EmptySentinelList, "no sentinels"))
        }))
    }

    /// Connects to the node at `address` if it says it is a primary (`ROLE`).
    async fn connect(
        &self,
        (host, port): (String, u16),
        generation: u64,
    ) -> Result<Primary, redis::RedisError> {
        let info = self
            .node
            .clone()
            .set_addr(redis::ConnectionAddr::Tcp(host.clone(), port));
        let client = redis::Client::open(info)?;
        let connection = client
            .get_connection_manager_with_config(manager_config(self.timeout))
            .await?;
        let monitor = client
            .get_connection_manager_with_config(manager_config(self.timeout))
            .await?;
        let role: redis::Value = redis::cmd("ROLE").query_async(&mut monitor.clone()).await?;
        let is_primary = matches!(&role, redis::Value::Array(parts)
            if matches!(parts.first(), Some(redis::Value::BulkString(kind)) if kind == b"master"));
        if !is_primary {
            return Err(redis::RedisError::from((
                redis::ErrorKind::MasterNameNotFoundBySentinel,
                "the node the sentinels name is not a primary yet",
                format!("{host}:{port}"),
            )));
        }
        Ok(Primary {
            client,
            connection,
            monitor,
            address: format!("{host}:{port}"),
            generation,
        })
    }
}

/// Asks the sentinels for the primary until it answers, then keeps following it in the
/// background, sending each new primary on the returned channel.
pub async fn follow(
    settings: SentinelSettings,
    replication: std::sync::Arc<Replication>,
) -> Result<watch::Receiver<std::sync::Arc<Primary>>, redis::RedisError> {
    let sentinels = Sentinels::new(&settings)?;
    let first = sentinels
        .connect(sentinels.primary_address().await?, 1)
        .await?;
    tracing::info!(primary = %first.address, service = %settings.service, "Following the Redis primary that Sentinel names");
    // Counted now, not a poll later: the first writes wait for every replica in sync.
    observe(&first, &replication, settings.timeout).await;
    let (sender, receiver) = watch::channel(std::sync::Arc::new(first));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = replication.nudge.notified() => {}
                () = sender.closed() => return,
            }
            let current = sender.borrow().clone();
            match sentinels.primary_address().await {
                Ok((host, port)) if format!("{host}:{port}") != current.address => {
                    match sentinels
                        .connect((host, port), current.generation + 1)
                        .await
                    {
                        Ok(next) => {
                            tracing::warn!(from = %current.address, to = %next.address, "The Redis primary changed; following it");
                            metrics::counter!("pictor_redis_primary_switches_total").increment(1);
                            let _ = sender.send(std::sync::Arc::new(next));
                        }
                        Err(error) => {
                            tracing::warn!(%error, "The sentinels name a new Redis primary that cannot be used yet");
                        }
                    }
                    continue;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "No sentinel answered for the Redis primary");
                }
            }
            observe(&current, &replication, settings.timeout).await;
        }
    });
    Ok(receiver)
}

/// Records how many replicas follow `primary` in sync now, asked on its monitor connection:
/// the shared one may be held up behind a `WAIT`.
async fn observe(primary: &Primary, replication: &Replication, timeout: Duration) {
    let mut monitor = primary.monitor.clone();
    if let Ok(Ok(count)) = tokio::time::timeout(timeout, replicas(&mut monitor)).await {
        replication.observe(primary.generation, count);
    }
}

/// How every connection manager of a process reconnects and times out.
pub fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
}

/// How many replicas follow the primary in sync (`INFO replication`, `state=online`): one still
/// loading its first copy acknowledges nothing yet, so it does not count.
async fn replicas(connection: &mut ConnectionManager) -> Result<usize, redis::RedisError> {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(connection)
        .await?;
    Ok(online_replicas(&info))
}

fn online_replicas(info: &str) -> usize {
    info.lines()
        .filter(|line| line.starts_with("slave") && line.contains("state=online"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_must_reach_the_most_replicas_seen_lately_on_the_same_primary() {
        let replication = Replication::new(Duration::from_millis(100), 0);
        replication.observe(1, 2);
        replication.observe(1, 1);
        assert_eq!(
            replication.expected(1),
            2,
            "one replica leaving does not lower it"
        );
        assert_eq!(
            replication.expected(2),
            0,
            "a primary never observed asks for none"
        );
        replication.observe(2, 1);
        assert_eq!(
            replication.expected(2),
            1,
            "a new primary starts from its own count"
        );
        assert_eq!(
            replication.expected(1),
            0,
            "the old primary's counts are gone"
        );
    }

    #[test]
    fn a_new_primary_seen_with_no_replica_still_needs_the_minimum() {
        let replication = Replication::new(Duration::from_millis(100), 1);
        assert_eq!(replication.expected(1), 1, "never observed");
        replication.observe(1, 0);
        assert_eq!(replication.expected(1), 1, "observed alone");
        replication.observe(1, 2);
        assert_eq!(replication.expected(1), 2, "more seen: more needed");
    }

    #[test]
    fn only_replicas_in_sync_count() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
            slave0:ip=127.0.0.1,port=6402,state=online,offset=1234,lag=0\r\n\
            slave1:ip=127.0.0.1,port=6403,state=wait_bgsave,offset=0,lag=0\r\n\
            master_replid:abc\r\n";
        assert_eq!(online_replicas(info), 1);
        assert_eq!(
            online_replicas("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n"),
            0
        );
    }
}
