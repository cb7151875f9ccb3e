//! The scheduler's own state in Redis, and the one place in this crate that talks to Redis
//! (reports read job statistics and the ledger through `shared::stats` and `shared::ledger`).
//! Keys come from `shared::keys` (the `sched:` family).
//!
//! **Leader election, one run at a time.** Every replica ticks; for each due run it calls
//! [`SchedulerState::begin`], one Lua script that returns at once when the run is already done,
//! else takes the next fencing token (`INCR sched:fence`) and tries `SET sched:lock:{job}:{period}
//! token NX PX ttl`. Only the replica that set the lock runs the job. When it is finished,
//! [`Lease::finish`] records `sched:done:{job}:{period}` and advances `sched:last:{job}` **only if
//! the lock still holds its token** (a compare in Lua), then frees the lock: a replica that
//! stalled past its lock's TTL cannot record a run another replica has taken over. Because
//! "done?" and "take the lock" are one atomic step, and "record done" and "free the lock" are
//! another, no second replica can start a run between the first one's send and its record.
//!
//! **Alerts.** Budget alerts are claimed per month and alert (`SET NX`), whoever raised them;
//! a health alert's state changes (fire, repeat, resolve) are decided by one script, so two
//! replicas evaluating the same minute cannot both announce the same change.

use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::connection::RedisConnection;
use shared::keys::Keys;
use shared::store::StoreError;

use crate::schedule::{Job, Period};

const BEGIN_SCRIPT: &str = r"
-- KEYS[1] done marker, KEYS[2] fence counter, KEYS[3] lock; ARGV[1] lock ttl (ms)
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local token = redis.call('INCR', KEYS[2])
if not redis.call('SET', KEYS[3], token, 'NX', 'PX', ARGV[1]) then return 0 end
return token
";

const FINISH_SCRIPT: &str = r"
-- KEYS[1] lock, KEYS[2] done marker, KEYS[3] last done; ARGV[1] token, ARGV[2] done ttl (s),
-- ARGV[3] period key
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
local last = redis.call('GET', KEYS[3])
if (not last) or last < ARGV[3] then redis.call('SET', KEYS[3], ARGV[3]) end
redis.call('DEL', KEYS[1])
return 1
";

const RELEASE_SCRIPT: &str = r"
-- KEYS[1] lock; ARGV[1] token
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

const HEALTH_SCRIPT: &str = r"
-- KEYS[1] alert state hash; ARGV[1] '1' if the condition holds now, ARGV[2] now (ms),
-- ARGV[3] repeat interval (ms), ARGV[4] how long the condition must hold before the alert fires
-- (ms, Prometheus' `for`), ARGV[5] the longest gap between two evaluations that keeps a pending
-- condition (ms; after a longer one it starts over, as Prometheus' pending state would)
local now = tonumber(ARGV[2])
local since = redis.call('HGET', KEYS[1], 'since')
if ARGV[1] == '1' then
  if not since then
    local pending = tonumber(redis.call('HGET', KEYS[1], 'pending') or '-1')
    local seen = tonumber(redis.call('HGET', KEYS[1], 'seen') or '0')
    if pending < 0 or now - seen > tonumber(ARGV[5]) then pending = now end
    if now - pending >= tonumber(ARGV[4]) then
      redis.call('HDEL', KEYS[1], 'pending')
      redis.call('HSET', KEYS[1], 'since', tostring(pending), 'last_sent', ARGV[2], 'seen', ARGV[2])
      return {'fire', pending}
    end
    redis.call('HSET', KEYS[1], 'pending', tostring(pending), 'seen', ARGV[2])
    return {'pending', pending}
  end
  redis.call('HSET', KEYS[1], 'seen', ARGV[2])
  local last = tonumber(redis.call('HGET', KEYS[1], 'last_sent') or '0')
  if now - last >= tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'last_sent', ARGV[2])
    return {'repeat', tonumber(since)}
  end
  return {'quiet', tonumber(since)}
end
redis.call('DEL', KEYS[1])
if since then return {'resolve', tonumber(since)} end
return {'clear', 0}
";

const SAMPLE_SCRIPT: &str = r"
-- KEYS[1] samples (zset, ms:value scored by ms); ARGV[1] now (ms), ARGV[2] value ('' to only
-- read), ARGV[3] window (ms), ARGV[4] kept (ms). Returns the members within the window.
local now = tonumber(ARGV[1])
if ARGV[2] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], now, now)
  redis.call('ZADD', KEYS[1], now, ARGV[1] .. ':' .. ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[4])))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[3]), now)
";

/// A pending condition survives gaps between evaluations up to this long.
const PENDING_GAP: Duration = Duration::from_secs(5 * 60);

/// How long samples are kept.
const SAMPLES_KEPT: Duration = Duration::from_secs(30 * 60);

/// How long a budget alert's delivery marker is kept: past the end of its month.
const BUDGET_SENT_TTL: Duration = Duration::from_secs(70 * 24 * 3600);

#[derive(Clone)]
pub struct SchedulerState {
    connection: RedisConnection,
    keys: Keys,
    begin: redis::Script,
    finish: redis::Script,
    release: redis::Script,
    health: redis::Script,
    sample: redis::Script,
}

/// What [`SchedulerState::begin`] found.
#[derive(Debug)]
pub enum Claim {
    /// This replica holds the run's lock.
    Won(Lease),
    /// Another replica is running it now.
    Busy,
    /// It ran already.
    Done,
}

/// The lock of one run, with its fencing token.
#[derive(Debug)]
pub struct Lease {
    pub job: Job,
    pub period: String,
    pub token: i64,
}

/// A health alert's change of state, as decided atomically in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthTransition {
    /// The condition holds but has not held for the alert's `for` yet (since when it holds).
    Pending { since: DateTime<Utc> },
    /// Started firing now; `since`: when its condition started to hold.
    Fire { since: DateTime<Utc> },
    /// Still firing and the repeat interval has passed since the last message.
    Repeat { since: DateTime<Utc> },
    /// Still firing, announced recently.
    Quiet,
    /// Stopped firing.
    Resolve { since: DateTime<Utc> },
    /// Not firing, was not firing.
    Clear,
}

impl SchedulerState {
    pub fn new(connection: RedisConnection, keys: Keys) -> Self {
        Self {
            connection,
            keys,
            begin: redis::Script::new(BEGIN_SCRIPT),
            finish: redis::Script::new(FINISH_SCRIPT),
            release: redis::Script::new(RELEASE_SCRIPT),
            health: redis::Script::new(HEALTH_SCRIPT),
            sample: redis::Script::new(SAMPLE_SCRIPT),
        }
    }

    /// The latest period of `job` recorded as done.
    pub async fn last_done(&self, job: Job) -> Result<Option<String>, StoreError> {
        let mut connection = self.connection.clone();
        Ok(redis::cmd("GET")
            .arg(self.keys.scheduler_last(job.as_str()))
            .query_async(&mut connection)
            .await?)
    }

    /// Tries to become the one replica that runs `job` for `period`.
    pub async fn begin(&self, job: Job, period: &Period) -> Result<Claim, StoreError> {
        let key = period.key();
        let mut connection = self.connection.pinned();
        let token: i64 = self
            .begin
            .key(self.keys.scheduler_done(job.as_str(), &key))
            .key(self.keys.scheduler_fence())
            .key(self.keys.scheduler_lock(job.as_str(), &key))
            .arg(millis(job.lock_ttl()))
            .invoke_async(&mut connection)
            .await?;
        let claim = match token {
            -1 => Claim::Done,
            0 => Claim::Busy,
            token => Claim::Won(Lease {
                job,
                period: key,
                token,
            }),
        };
        if let Claim::Won(lease) = &claim
            && let Err(error) = connection.replicated().await
        {
            // A lock a failover may lose could let a second replica run the job too.
            let _ = self.release(lease).await;
            return Err(error.into());
        }
        Ok(claim)
    }

    /// Records the run as done and frees its lock; false when the lock had expired and is no
    /// longer ours (nothing is recorded then).
    pub async fn finish(&self, lease: &Lease) -> Result<bool, StoreError> {
        let mut connection = self.connection.pinned();
        let recorded: i64 = self
            .finish
            .key(self.keys.scheduler_lock(lease.job.as_str(), &lease.period))
            .key(self.keys.scheduler_done(lease.job.as_str(), &lease.period))
            .key(self.keys.scheduler_last(lease.job.as_str()))
            .arg(lease.token)
            .arg(lease.job.done_ttl().as_secs().max(1))
            .arg(&lease.period)
            .invoke_async(&mut connection)
            .await?;
        // The run is done only once a failover cannot forget it (and run it again).
        connection.replicated().await?;
        Ok(recorded == 1)
    }

    /// Frees the lock without recording the run, so that a later tick tries again.
    pub async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        self.release
            .key(self.keys.scheduler_lock(lease.job.as_str(), &lease.period))
            .arg(lease.token)
            .invoke_async::<i64>(&mut connection)
            .await?;
        Ok(())
    }

    /// The id of the last budget event read.
    pub async fn budget_cursor(&self) -> Result<Option<String>, StoreError> {
        let mut connection = self.connection.clone();
        Ok(redis::cmd("GET")
            .arg(self.keys.scheduler_budget_cursor())
            .query_async(&mut connection)
            .await?)
    }

    pub async fn set_budget_cursor(&self, id: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("SET")
            .arg(self.keys.scheduler_budget_cursor())
            .arg(id)
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }

    /// Claims the delivery of budget alert `alert` of `month`; false when it was claimed before.
    pub async fn claim_budget_alert(&self, month: &str, alert: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let claimed: Option<String> = redis::cmd("SET")
            .arg(self.keys.scheduler_budget_sent(month, alert))
            .arg("1")
            .arg("NX")
            .arg("EX")
            .arg(BUDGET_SENT_TTL.as_secs())
            .query_async(&mut connection)
            .await?;
        Ok(claimed.is_some())
    }

    /// Whether budget alert `alert` of `month` has been claimed (for dry runs).
    pub async fn budget_alert_claimed(&self, month: &str, alert: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let exists: bool = redis::cmd("EXISTS")
            .arg(self.keys.scheduler_budget_sent(month, alert))
            .query_async(&mut connection)
            .await?;
        Ok(exists)
    }

    /// Gives a claim back after a delivery that failed for a reason that may pass.
    pub async fn unclaim_budget_alert(&self, month: &str, alert: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("DEL")
            .arg(self.keys.scheduler_budget_sent(month, alert))
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }

    /// Applies one evaluation of alert `alert`, which fires once its condition has held for
    /// `hold`, and says what changed.
    pub async fn health_transition(
        &self,
        alert: &str,
        holds: bool,
        now: DateTime<Utc>,
        repeat: Duration,
        hold: Duration,
    ) -> Result<HealthTransition, StoreError> {
        let mut connection = self.connection.clone();
        let (change, since): (String, i64) = self
            .health
            .key(self.keys.scheduler_health(alert))
            .arg(if holds { "1" } else { "0" })
            .arg(now.timestamp_millis())
            .arg(millis(repeat))
            .arg(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX))
            .arg(millis(PENDING_GAP.max(hold / 2)))
            .invoke_async(&mut connection)
            .await?;
        let since = DateTime::from_timestamp_millis(since).unwrap_or(now);
        Ok(match change.as_str() {
            "pending" => HealthTransition::Pending { since },
            "fire" => HealthTransition::Fire { since },
            "repeat" => HealthTransition::Repeat { since },
            "quiet" => HealthTransition::Quiet,
            "resolve" => HealthTransition::Resolve { since },
            _ => HealthTransition::Clear,
        })
    }

    /// When health alert `alert` started firing, if it is firing (for dry runs).
    pub async fn health_since(&self, alert: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut connection = self.connection.clone();
        let since: Option<i64> = redis::cmd("HGET")
            .arg(self.keys.scheduler_health(alert))
            .arg("since")
            .query_async(&mut connection)
            .await?;
        Ok(since.and_then(DateTime::from_timestamp_millis))
    }

    /// What [`SchedulerState::health_transition`] would decide, without changing anything
    /// (dry runs). The repeat interval is not judged: a firing alert reads as a repeat.
    pub async fn peek_transition(
        &self,
        alert: &str,
        holds: bool,
        now: DateTime<Utc>,
        hold: Duration,
    ) -> Result<HealthTransition, StoreError> {
        let mut connection = self.connection.clone();
        let (since, pending): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.keys.scheduler_health(alert))
            .arg("since")
            .arg("pending")
            .query_async(&mut connection)
            .await?;
        let since = since.and_then(DateTime::from_timestamp_millis);
        let pending = pending
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or(now);
        let hold = chrono::Duration::from_std(hold).unwrap_or_default();
        Ok(match (holds, since) {
            (true, Some(since)) => HealthTransition::Repeat { since },
            (true, None) if now - pending >= hold => HealthTransition::Fire { since: pending },
            (true, None) => HealthTransition::Pending { since: pending },
            (false, Some(since)) => HealthTransition::Resolve { since },
            (false, None) => HealthTransition::Clear,
        })
    }

    /// Records `value` as the sample of `name` at `now` (unless `record` is false) and returns
    /// the samples of the last `window` as (ms, value), oldest first.
    pub async fn sample(
        &self,
        name: &str,
        now: DateTime<Utc>,
        value: f64,
        window: Duration,
        record: bool,
    ) -> Result<Vec<(i64, f64)>, StoreError> {
        let mut connection = self.connection.clone();
        let members: Vec<String> = self
            .sample
            .key(self.keys.scheduler_samples(name))
            .arg(now.timestamp_millis())
            .arg(if record {
                value.to_string()
            } else {
                String::new()
            })
            .arg(millis(window))
            .arg(millis(SAMPLES_KEPT.max(window)))
            .invoke_async(&mut connection)
            .await?;
        Ok(members
            .iter()
            .filter_map(|member| {
                let (ms, value) = member.split_once(':')?;
                Some((ms.parse().ok()?, value.parse().ok()?))
            })
            .collect())
    }

    /// Whether the circuit breaker of `provider` has tripped and no success has closed it since
    /// (open, or half-open waiting for a probe): the fact the workers' `pictor_provider_cooldown`
    /// gauge shows, read from the same keys (`worker::breaker`).
    pub async fn breaker_open(&self, provider: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let present: u32 = redis::cmd("EXISTS")
            .arg(self.keys.breaker(provider, "open"))
            .arg(self.keys.breaker(provider, "tripped"))
            .query_async(&mut connection)
            .await?;
        Ok(present > 0)
    }

    /// Publishes where this replica delivers, for the dashboard, for `ttl`.
    pub async fn publish_delivery(
        &self,
        status: &shared::delivery::DeliveryStatus,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        status.publish(&self.connection, &self.keys, ttl).await?;
        Ok(())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}
