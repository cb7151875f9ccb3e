//! The backlog, fleet-wide and fair between users (`docs/architecture.md`, "A fair backlog").
//!
//! **What is pending.** Every job from its acceptance to its end is in its user's pending set
//! (a sorted set scored by acceptance time), the users with pending work are in one sorted set
//! scored by how many, and a counter holds the total. Admission reads and reserves against these
//! (a per-user and a fleet-wide cap) in one script, so the caps hold under concurrent requests.
//!
//! **Fair shares.** When a provider model's rate limit is the bottleneck, its capacity is shared
//! between the users who want it: each call first passes a gate, in the same script as the
//! model's rate-limit buckets, that compares the caller's *served* count for that model (units
//! taken, divided by the user's weight) with those of the other users who asked for it within
//! the last `backlog.fair_window_secs`. A caller more than `backlog.fair_slack` units ahead of
//! the least served contender is deferred (without taking anything) so the others go first,
//! unless the model's buckets would still be at least half full after the call: capacity piling
//! up unused means the others' jobs are not at the gate now (still in the broker's queue, say),
//! and a model must not idle while anyone waits. A user who arrives starts level with the least
//! served one, so nobody saves up credit while away. It is start-time fair queuing over virtual "served" counts, kept per model in Redis, so
//! it holds across any number of worker processes at one script call per provider call. Jobs
//! stay in RabbitMQ's FIFO queue; an over-share job is only deferred when it reaches the gate.
//!
//! **Taking the buckets.** All of a call's buckets (requests, images, tokens per minute) are
//! taken together or not at all: a refusal by one takes nothing from the others.
//!
//! **Place in line.** A waiting job's position is its rank among its user's pending jobs plus,
//! for every other user with pending work, as many of theirs as the fair share lets run before
//! it; the estimated start divides that by the fleet's recent completion rate (the last 32
//! completions within five minutes, kept in the same keys). Both cost one script call reading
//! `O(log n + users with pending work)`, whatever the number of pending jobs.
//!
//! Every key carries the `{fair}` hash tag, so each script's keys share a Redis Cluster slot.

use std::collections::HashMap;
use std::time::Duration;

use crate::connection::RedisConnection;
use redis::RedisError;

use crate::domain::{JobId, UserId};
use crate::keys::Keys;
use crate::script::Part;

const MICROS_PER_MINUTE: u64 = 60_000_000;

/// Reserves a pending slot for a job, within the user's and the fleet's caps: the script's
/// text, for [`RESERVE_SCRIPT`] and as a step of the store's intake (`crate::store::intake`).
macro_rules! reserve_body {
    () => {
        r#"
-- KEYS[1] the user's pending set, KEYS[2] users with pending work, KEYS[3] total
-- ARGV[1] job id, ARGV[2] score (acceptance, ms), ARGV[3] user, ARGV[4] user cap,
-- ARGV[5] fleet cap (0: no cap)
-- Returns {1, user's pending, total} when reserved (or already there), {0, 'user'|'fleet', n}.
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {1, redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[3]) or '0')}
end
local mine = redis.call('ZCARD', KEYS[1])
local user_cap = tonumber(ARGV[4])
if user_cap > 0 and mine >= user_cap then return {0, 'user', mine} end
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
local fleet_cap = tonumber(ARGV[5])
if fleet_cap > 0 and total >= fleet_cap then return {0, 'fleet', total} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZINCRBY', KEYS[2], 1, ARGV[3])
total = redis.call('INCR', KEYS[3])
return {1, mine + 1, total}
"#
    };
}
pub(crate) use reserve_body;

const RESERVE_SCRIPT: &str = reserve_body!();

/// Takes a job out of the pending sets; a finished job counts towards the completion rate.
/// Lua defining `backlog_remove(pending, users, total, rate, id, user, finished, kept)`: takes
/// job `id` out of `user`'s pending set (`pending`) and the counts, and for a job that
/// `finished` ('1': not canceled or lost) records the completion in `rate` (`kept` most
/// recent). Answers 1, or 0 when the job was not pending. Shared by [`REMOVE_SCRIPT`] and the
/// job update (`crate::store::UPDATE_SCRIPT`), which removes an ending job in its own write.
macro_rules! backlog_remove_fn {
    () => {
        r#"
local function backlog_remove(pending, users, total, rate, id, user, finished, kept)
  if redis.call('ZREM', pending, id) == 0 then return 0 end
  local left = tonumber(redis.call('ZINCRBY', users, -1, user))
  if left <= 0 then redis.call('ZREM', users, user) end
  if redis.call('DECR', total) < 0 then redis.call('SET', total, 0) end
  if finished == '1' then
    local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    redis.call('LPUSH', rate, now)
    redis.call('LTRIM', rate, 0, tonumber(kept) - 1)
  end
  return 1
end
"#
    };
}
pub(crate) use backlog_remove_fn;

const REMOVE_SCRIPT: &str = concat!(
    "-- KEYS[1] the user's pending set, KEYS[2] users with pending work, KEYS[3] total,\n",
    "-- KEYS[4] recent completions (list of ms, newest first)\n",
    "-- ARGV[1] job id, ARGV[2] user, ARGV[3] 1 if the job finished (not canceled or lost),\n",
    "-- ARGV[4] completions kept\n",
    backlog_remove_fn!(),
    "return backlog_remove(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4])\n",
);

/// The fair-share gate and the model's buckets, together: the script's text, for
/// [`ACQUIRE_SCRIPT`] and as a step of the store's call gate (`crate::store::gate`).
macro_rules! acquire_body {
    () => {
        r#"
-- KEYS[1] who wants this model (zset: user -> last ask, ms), KEYS[2] served per user (hash),
-- KEYS[3] users with pending work, KEYS[4] grants this minute (hash: user -> calls),
-- KEYS[5..] the buckets' TATs
-- ARGV[1] user, ARGV[2] the user's weight, ARGV[3] slack (units ahead allowed; 0: no fairness),
-- ARGV[4] window (ms), then per bucket: cost, interval (us), burst
-- Returns {1} when granted; {0, 'share', units ahead} or {0, 'limit', us to wait} when not.
local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local now_ms = math.floor(now_us / 1000)
local user = ARGV[1]
local weight = tonumber(ARGV[2])
local slack = tonumber(ARGV[3])
local mine = 0
local over = nil
if slack > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[4]))
  local was_waiting = redis.call('ZSCORE', KEYS[1], user)
  redis.call('ZADD', KEYS[1], now_ms, user)
  local least = nil
  for _, other in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if other ~= user then
      if redis.call('ZSCORE', KEYS[3], other) then
        local served = tonumber(redis.call('HGET', KEYS[2], other) or '0')
        if least == nil or served < least then least = served end
      else
        -- Nothing pending any more: no longer a contender.
        redis.call('ZREM', KEYS[1], other)
        redis.call('HDEL', KEYS[2], other)
      end
    end
  end
  mine = tonumber(redis.call('HGET', KEYS[2], user) or '0')
  if least == nil then
    -- Alone: nobody to be fair to, and no credit to carry into the next contention.
    mine = 0
  else
    if not was_waiting and mine < least then mine = least end
    if mine - least >= slack then over = math.ceil(mine - least - slack + 1) end
  end
end
-- A caller over its share may still take what the others leave: only from a bucket at least
-- half full after the call (capacity piling up unused means the others' jobs are not at the
-- gate now), so the model is never idle while anyone waits, and whoever is under their share
-- takes any unit first.
local wait = 0
local tats = {}
for i = 5, #KEYS do
  local a = 5 + (i - 5) * 3
  local cost = tonumber(ARGV[a])
  local interval = tonumber(ARGV[a + 1])
  local burst = tonumber(ARGV[a + 2])
  if over then burst = math.max(cost, burst - math.ceil(burst / 2)) end
  local tat = tonumber(redis.call('GET', KEYS[i]) or now_us)
  if tat < now_us then tat = now_us end
  local new_tat = tat + cost * interval
  local allowed_at = new_tat - burst * interval
  if allowed_at > now_us and allowed_at - now_us > wait then wait = allowed_at - now_us end
  tats[i] = new_tat
end
if wait > 0 then
  if over then
    redis.call('HSET', KEYS[2], user, tostring(mine))
    return {0, 'share', over}
  end
  return {0, 'limit', math.ceil(wait)}
end
for i = 5, #KEYS do
  local ttl_ms = math.ceil((tats[i] - now_us) / 1000)
  if ttl_ms > 0 then
    redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', string.format('%.0f', ttl_ms))
  end
end
if slack > 0 then
  redis.call('HSET', KEYS[2], user, tostring(mine + 1 / weight))
end
-- The minute's first grant to this user sets the hash's expiry, so the hash's first grant
-- does: one EXPIRE per user and minute, not one per call.
if redis.call('HINCRBY', KEYS[4], user, 1) == 1 then redis.call('EXPIRE', KEYS[4], 180) end
return {1}
"#
    };
}
pub(crate) use acquire_body;

const ACQUIRE_SCRIPT: &str = acquire_body!();

/// A waiting job's place: its rank, the users ahead's share, and the completion rate.
const PLACE_SCRIPT: &str = r#"
-- KEYS[1] the user's pending set, KEYS[2] users with pending work, KEYS[3] recent completions
-- ARGV[1] job id, ARGV[2] user, ARGV[3] weights (JSON object; others weigh 1),
-- ARGV[4] how far back completions count (ms)
-- Returns false when the job is not pending, else {jobs ahead, completions per hour}.
local rank = redis.call('ZRANK', KEYS[1], ARGV[1])
if not rank then return false end
local weights = cjson.decode(ARGV[3])
local function weight(user) return tonumber(weights[user] or 1) end
local mine = weight(ARGV[2])
local ahead = rank
local users = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #users, 2 do
  if users[i] ~= ARGV[2] then
    local share = math.ceil((rank + 1) * weight(users[i]) / mine)
    ahead = ahead + math.min(tonumber(users[i + 1]), share)
  end
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
return {ahead, RATE(KEYS[3], now, tonumber(ARGV[4]))}
"#;

/// The completion rate: the recent completions (at most [`RATE_SAMPLES`], none older than
/// [`RATE_HORIZON_MS`]) over the time from the oldest of them to now, so it falls by itself
/// when completions stop; fewer than two completions give no rate.
const RATE_FUNCTION: &str = r#"
local function RATE(key, now, horizon)
  local done = redis.call('LRANGE', key, 0, -1)
  local count, oldest = 0, now
  for _, at in ipairs(done) do
    local t = tonumber(at)
    if now - t <= horizon then count = count + 1; oldest = t end
  end
  if count < 2 or now <= oldest then return 0 end
  return math.floor(count * 3600000 / (now - oldest))
end
"#;

/// Completions kept for the rate.
pub(crate) const RATE_SAMPLES: u32 = 32;

/// Completions older than this do not count.
const RATE_HORIZON_MS: u64 = 300_000;

/// One rate-limit bucket a call takes from: `cost` units of a bucket refilling at `per_minute`
/// and holding `burst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketAsk {
    /// The bucket's name, unique per model and kind (`openai:gpt-image-2:ipm`).
    pub name: String,
    pub cost: u32,
    pub per_minute: u32,
    pub burst: u32,
}

/// What the gate and the buckets said to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Granted,
    /// The caller is `ahead` units past its fair share while others wait for the model.
    OverShare {
        ahead: u32,
    },
    /// A bucket is empty; all of them would have room after `retry_after`.
    Limited {
        retry_after: Duration,
    },
}

/// What the acquire script's reply says: `{1}`, `{0, 'share', units ahead}` or
/// `{0, 'limit', microseconds to wait}`.
pub fn grant(reply: &[redis::Value]) -> Grant {
    let number = |value: Option<&redis::Value>| match value {
        Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    match reply.first() {
        Some(redis::Value::Int(1)) => Grant::Granted,
        _ => match reply.get(1) {
            Some(redis::Value::BulkString(kind)) if kind == b"share" => Grant::OverShare {
                ahead: u32::try_from(number(reply.get(2))).unwrap_or(u32::MAX),
            },
            _ => Grant::Limited {
                retry_after: Duration::from_micros(number(reply.get(2))),
            },
        },
    }
}

/// What the reserve script's reply (`{1, mine, total}` or `{0, 'user'|'fleet', n}`) says.
pub fn reservation(reply: (i64, redis::Value, u64)) -> Reservation {
    match reply {
        (1, _, _) => Reservation::Reserved,
        (_, redis::Value::BulkString(which), pending) if which == b"user" => {
            Reservation::UserFull { pending }
        }
        (_, _, pending) => Reservation::FleetFull { pending },
    }
}

/// The answer to a reservation of a pending slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    Reserved,
    /// The user holds `pending` jobs, their cap.
    UserFull {
        pending: u64,
    },
    /// The fleet holds `pending` jobs, its cap.
    FleetFull {
        pending: u64,
    },
}

/// Where a waiting job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Jobs that will start before it under the fair share (its user's earlier ones included).
    pub ahead: u64,
    /// Jobs the fleet finished per hour recently (0: none lately, so no estimate).
    pub completions_per_hour: u64,
}

impl Place {
    /// 1 for the next job to start.
    pub fn position(&self) -> u64 {
        self.ahead + 1
    }

    /// How long until it starts at the recent completion rate, if there is one.
    pub fn estimated_wait(&self) -> Option<Duration> {
        (self.completions_per_hour > 0).then(|| {
            Duration::from_secs_f64(self.ahead as f64 * 3600.0 / self.completions_per_hour as f64)
        })
    }
}

/// Per-user weights (`backlog.fair_weights`): a user of weight 2 gets twice the share of one of
/// weight 1, the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Weights(HashMap<String, f64>);

impl Weights {
    /// Parses `user:weight,...`; a weight is a number from 0.01 to 100.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut weights = HashMap::new();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (user, weight) = entry
                .split_once(':')
                .ok_or_else(|| format!("{entry:?} must look like user:weight"))?;
            let weight: f64 = weight
                .trim()
                .parse()
                .map_err(|_| format!("{entry:?}: the weight is not a number"))?;
            if !(0.01..=100.0).contains(&weight) {
                return Err(format!("{entry:?}: a weight must be from 0.01 to 100"));
            }
            if weights.insert(user.trim().to_string(), weight).is_some() {
                return Err(format!("{user:?} is listed twice"));
            }
        }
        Ok(Self(weights))
    }

    pub fn of(&self, user: &str) -> f64 {
        self.0.get(user).copied().unwrap_or(1.0)
    }

    fn json(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_else(|_| "{}".to_string())
    }
}

/// The gate's tuning (`[backlog]`).
#[derive(Debug, Clone)]
pub struct FairPolicy {
    /// Units a user may be ahead of the least served contender; 0 turns fairness off.
    pub slack: u32,
    /// How long a user who asked for a model counts as wanting it.
    pub window: Duration,
    pub weights: Weights,
}

impl Default for FairPolicy {
    /// The shipped defaults (`config.default.toml`).
    fn default() -> Self {
        Self {
            slack: 1,
            window: Duration::from_secs(10),
            weights: Weights::default(),
        }
    }
}

/// The scripts, hashed once.
struct Scripts {
    reserve: redis::Script,
    remove: redis::Script,
    acquire: redis::Script,
    place: redis::Script,
    rate: redis::Script,
}

/// The backlog and the fair shares, in Redis. Cheap to clone.
#[derive(Clone)]
pub struct Fairness {
    connection: RedisConnection,
    keys: Keys,
    policy: std::sync::Arc<FairPolicy>,
    scripts: std::sync::Arc<Scripts>,
}

impl Fairness {
    pub fn new(connection: RedisConnection, keys: Keys, policy: FairPolicy) -> Self {
        Self {
            connection,
            keys,
            policy: std::sync::Arc::new(policy),
            scripts: std::sync::Arc::new(Scripts {
                reserve: redis::Script::new(RESERVE_SCRIPT),
                remove: redis::Script::new(REMOVE_SCRIPT),
                acquire: redis::Script::new(ACQUIRE_SCRIPT),
                place: redis::Script::new(&format!("{RATE_FUNCTION}{PLACE_SCRIPT}")),
                rate: redis::Script::new(&format!(
                    "{RATE_FUNCTION}local t = redis.call('TIME') \
                     return RATE(KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), tonumber(ARGV[1]))"
                )),
            }),
        }
    }

    pub fn policy(&self) -> &FairPolicy {
        &self.policy
    }

    /// How many jobs `user` and the fleet have pending: the cheap check made before a request's
    /// body is read.
    pub async fn pending(&self, user: &UserId) -> Result<(u64, u64), RedisError> {
        let mut connection = self.connection.clone();
        let (mine, total): (u64, Option<u64>) = redis::pipe()
            .zcard(self.keys.fair_pending(user.as_str()))
            .get(self.keys.fair_total())
            .query_async(&mut connection)
            .await?;
        Ok((mine, total.unwrap_or(0)))
    }

    /// Reserves a pending slot for job `id` of `user`, accepted at `at`, within `user_cap` and
    /// `fleet_cap` (0: no cap). Reserving a job already pending changes nothing.
    pub async fn reserve(
        &self,
        user: &UserId,
        id: JobId,
        at: chrono::DateTime<chrono::Utc>,
        user_cap: u32,
        fleet_cap: u32,
    ) -> Result<Reservation, RedisError> {
        let mut connection = self.connection.clone();
        let reply = self
            .reserve_part(user, id, at, user_cap, fleet_cap)
            .invoke_async(&self.scripts.reserve, &mut connection)
            .await?;
        Ok(reservation(reply))
    }

    /// The keys and arguments of [`Self::reserve`], to run it alone or as a step of a composed
    /// script (whose reply [`reservation`] reads).
    pub fn reserve_part(
        &self,
        user: &UserId,
        id: JobId,
        at: chrono::DateTime<chrono::Utc>,
        user_cap: u32,
        fleet_cap: u32,
    ) -> Part {
        let mut part = Part::default();
        part.key(self.keys.fair_pending(user.as_str()))
            .key(self.keys.fair_users())
            .key(self.keys.fair_total())
            .arg(id.to_string())
            .arg(at.timestamp_millis())
            .arg(user.as_str())
            .arg(user_cap)
            .arg(fleet_cap);
        part
    }

    /// Puts job `id` back in the backlog without caps (a job that runs again: an answered
    /// question, a dead letter replayed, a job recreated from its message).
    pub async fn add(
        &self,
        user: &UserId,
        id: JobId,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), RedisError> {
        self.reserve(user, id, at, 0, 0).await.map(|_| ())
    }

    /// Takes job `id` out of the backlog; `finished` (succeeded, failed, asking) counts it
    /// towards the completion rate, a cancel does not. Removing a job twice is harmless.
    pub async fn remove(&self, user: &UserId, id: JobId, finished: bool) -> Result<(), RedisError> {
        let mut connection = self.connection.clone();
        let _: i64 = self
            .scripts
            .remove
            .key(self.keys.fair_pending(user.as_str()))
            .key(self.keys.fair_users())
            .key(self.keys.fair_total())
            .key(self.keys.fair_rate())
            .arg(id.to_string())
            .arg(user.as_str())
            .arg(if finished { "1" } else { "0" })
            .arg(RATE_SAMPLES)
            .invoke_async(&mut connection)
            .await?;
        Ok(())
    }

    /// Passes the fair-share gate of `group` (a provider model) and takes every bucket in
    /// `buckets`, or nothing. A bucket's `cost` above its `burst` is clamped to the burst (it
    /// waits for a full bucket); rates and bursts of 0 are configuration errors.
    pub async fn acquire(
        &self,
        user: &UserId,
        group: &str,
        buckets: &[BucketAsk],
    ) -> Result<Grant, RedisError> {
        let part = self.acquire_part(user, group, buckets)?;
        let mut connection = self.connection.clone();
        let reply: Vec<redis::Value> = part
            .invoke_async(&self.scripts.acquire, &mut connection)
            .await?;
        Ok(grant(&reply))
    }

    /// The keys and arguments of [`Self::acquire`], to run it alone or as a step of a composed
    /// script (whose reply [`grant`] reads).
    pub fn acquire_part(
        &self,
        user: &UserId,
        group: &str,
        buckets: &[BucketAsk],
    ) -> Result<Part, RedisError> {
        let mut part = Part::default();
        part.key(self.keys.fair_wanting(group))
            .key(self.keys.fair_served(group))
            .key(self.keys.fair_users())
            .key(self.keys.fair_grants(&minute_of(chrono::Utc::now())))
            .arg(user.as_str())
            .arg(self.policy.weights.of(user.as_str()))
            .arg(self.policy.slack)
            .arg(u64::try_from(self.policy.window.as_millis()).unwrap_or(u64::MAX));
        for bucket in buckets {
            if bucket.per_minute == 0 || bucket.burst == 0 {
                return Err(RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "a rate limit needs a positive rate per minute and a positive burst",
                )));
            }
            part.key(self.keys.fair_bucket(&bucket.name))
                .arg(bucket.cost.min(bucket.burst))
                .arg(MICROS_PER_MINUTE.div_ceil(u64::from(bucket.per_minute)))
                .arg(bucket.burst);
        }
        Ok(part)
    }

    /// Where job `id` of `user` stands, if it is pending.
    pub async fn place(&self, user: &UserId, id: JobId) -> Result<Option<Place>, RedisError> {
        let mut connection = self.connection.clone();
        let reply: Option<(u64, u64)> = self
            .scripts
            .place
            .key(self.keys.fair_pending(user.as_str()))
            .key(self.keys.fair_users())
            .key(self.keys.fair_rate())
            .arg(id.to_string())
            .arg(user.as_str())
            .arg(self.policy.weights.json())
            .arg(RATE_HORIZON_MS)
            .invoke_async(&mut connection)
            .await?;
        Ok(reply.map(|(ahead, completions_per_hour)| Place {
            ahead,
            completions_per_hour,
        }))
    }

    /// The backlog at a glance, for metrics and `Retry-After`: the jobs pending, the users they
    /// belong to, and the completions per hour.
    pub async fn backlog(&self) -> Result<Backlog, RedisError> {
        let mut connection = self.connection.clone();
        let now = chrono::Utc::now();
        let (total, users, grants, earlier): (
            Option<u64>,
            u64,
            HashMap<String, u64>,
            HashMap<String, u64>,
        ) = redis::pipe()
            .get(self.keys.fair_total())
            .zcard(self.keys.fair_users())
            .hgetall(self.keys.fair_grants(&minute_of(now)))
            .hgetall(
                self.keys
                    .fair_grants(&minute_of(now - chrono::Duration::minutes(1))),
            )
            .query_async(&mut connection)
            .await?;
        let completions_per_hour: u64 = self
            .scripts
            .rate
            .key(self.keys.fair_rate())
            .arg(RATE_HORIZON_MS)
            .invoke_async(&mut connection)
            .await?;
        // The last full minute and this one so far: who took the capacity the gate handed out.
        let mut calls: HashMap<String, u64> = earlier;
        for (user, count) in grants {
            *calls.entry(user).or_default() += count;
        }
        let all: u64 = calls.values().sum();
        let mut shares: Vec<f64> = calls
            .values()
            .map(|count| *count as f64 / all.max(1) as f64)
            .collect();
        shares.sort_by(|a, b| b.total_cmp(a));
        Ok(Backlog {
            pending: total.unwrap_or(0),
            users,
            completions_per_hour,
            top_shares: shares.into_iter().take(3).collect(),
        })
    }

    /// Every pending entry, user by user (for the sweep that drops entries of jobs that ended
    /// or vanished without being removed).
    pub async fn entries(&self) -> Result<Vec<(UserId, Vec<(JobId, i64)>)>, RedisError> {
        let mut connection = self.connection.clone();
        let users: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.fair_users())
            .arg(0)
            .arg(-1)
            .query_async(&mut connection)
            .await?;
        let mut all = Vec::new();
        for user in users {
            let Ok(id) = UserId::parse(&user) else {
                continue;
            };
            let jobs: Vec<(String, i64)> = redis::cmd("ZRANGE")
                .arg(self.keys.fair_pending(&user))
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut connection)
                .await?;
            let jobs = jobs
                .into_iter()
                .filter_map(|(job, at)| Some((JobId::parse(&job)?, at)))
                .collect();
            all.push((id, jobs));
        }
        Ok(all)
    }
}

/// What [`Fairness::backlog`] reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Backlog {
    pub pending: u64,
    /// Users with pending work.
    pub users: u64,
    pub completions_per_hour: u64,
    /// The largest shares of the calls the gate granted over the last minute or two, largest
    /// first (at most three; no user ids).
    pub top_shares: Vec<f64>,
}

impl Backlog {
    /// How long a user at their cap should wait before one of their jobs is likely done: their
    /// share of the fleet's completion rate, within 1 s and 1 h; `None` without a recent rate.
    pub fn user_wait(&self) -> Option<Duration> {
        (self.completions_per_hour > 0).then(|| {
            let users = self.users.max(1) as f64;
            let seconds = users * 3600.0 / self.completions_per_hour as f64;
            Duration::from_secs_f64(seconds.clamp(1.0, 3600.0))
        })
    }

    /// How long until the fleet's backlog has room again: one completion, within 1 s and 1 h.
    pub fn fleet_wait(&self) -> Option<Duration> {
        (self.completions_per_hour > 0).then(|| {
            let seconds = 3600.0 / self.completions_per_hour as f64;
            Duration::from_secs_f64(seconds.clamp(1.0, 3600.0))
        })
    }
}

fn minute_of(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y%m%d%H%M").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_redis::{connect, with_redis};

    fn policy(slack: u32) -> FairPolicy {
        FairPolicy {
            slack,
            window: Duration::from_secs(10),
            weights: Weights::default(),
        }
    }

    async fn fairness(keys: &Keys, policy: FairPolicy) -> Fairness {
        Fairness::new(connect().await, keys.clone(), policy)
    }

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    fn ipm(per_minute: u32, burst: u32) -> Vec<BucketAsk> {
        vec![BucketAsk {
            name: "m:ipm".to_string(),
            cost: 1,
            per_minute,
            burst,
        }]
    }

    #[tokio::test]
    async fn the_caps_hold_per_user_and_for_the_fleet_and_a_removal_frees_a_slot() {
        with_redis(|keys| async move {
            let fair = fairness(&keys, policy(1)).await;
            let (alice, bob) = (user("alice"), user("bob"));
            let now = chrono::Utc::now();
            let first = JobId::new();
            assert_eq!(
                fair.reserve(&alice, first, now, 2, 3).await.unwrap(),
                Reservation::Reserved
            );
            assert_eq!(
                fair.reserve(&alice, first, now, 2, 3).await.unwrap(),
                Reservation::Reserved,
                "reserving twice takes one slot"
            );
            let second = JobId::new();
            fair.reserve(&alice, second, now, 2, 3).await.unwrap();
            assert_eq!(
                fair.reserve(&alice, JobId::new(), now, 2, 3).await.unwrap(),
                Reservation::UserFull { pending: 2 }
            );
            fair.reserve(&bob, JobId::new(), now, 2, 3).await.unwrap();
            assert_eq!(
                fair.reserve(&bob, JobId::new(), now, 2, 3).await.unwrap(),
                Reservation::FleetFull { pending: 3 }
            );
            assert_eq!(fair.pending(&alice).await.unwrap(), (2, 3));

            fair.remove(&alice, first, true).await.unwrap();
            fair.remove(&alice, first, true).await.unwrap();
            assert_eq!(fair.pending(&alice).await.unwrap(), (1, 2), "removed once");
            let backlog = fair.backlog().await.unwrap();
            assert_eq!((backlog.pending, backlog.users), (2, 2));
            assert_eq!(
                backlog.completions_per_hour, 0,
                "one completion is no rate yet"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn buckets_are_taken_all_or_nothing() {
        with_redis(|keys| async move {
            let fair = fairness(&keys, policy(0)).await;
            let alice = user("alice");
            let both = |images: u32| {
                vec![
                    BucketAsk {
                        name: "m:rpm".to_string(),
                        cost: 1,
                        per_minute: 60,
                        burst: 10,
                    },
                    BucketAsk {
                        name: "m:ipm".to_string(),
                        cost: images,
                        per_minute: 60,
                        burst: 4,
                    },
                ]
            };
            assert_eq!(
                fair.acquire(&alice, "m", &both(4)).await.unwrap(),
                Grant::Granted
            );
            // The image bucket is empty: the request bucket must not lose a unit for it.
            for _ in 0..20 {
                assert!(matches!(
                    fair.acquire(&alice, "m", &both(1)).await.unwrap(),
                    Grant::Limited { .. }
                ));
            }
            let requests_only = vec![both(1).remove(0)];
            for _ in 0..9 {
                assert_eq!(
                    fair.acquire(&alice, "m", &requests_only).await.unwrap(),
                    Grant::Granted,
                    "the refused calls took nothing from the request bucket"
                );
            }
            // The ten grants are counted for the minute (two minutes, if one ended during the
            // test), and every minute's count expires by itself.
            let mut connection = crate::test_redis::connect().await;
            let now = chrono::Utc::now();
            let mut counted = 0;
            for minute in [now - chrono::Duration::minutes(1), now] {
                let grants = keys.fair_grants(&minute_of(minute));
                let (count, ttl): (Option<u64>, i64) = redis::pipe()
                    .hget(&grants, "alice")
                    .ttl(&grants)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                if let Some(count) = count {
                    counted += count;
                    assert!(ttl > 0 && ttl <= 180, "{grants}: ttl {ttl}");
                }
            }
            assert_eq!(counted, 10);
        })
        .await;
    }

    /// A scarce bucket: 6 a minute (one unit per 10 s, so none comes back during a test) of
    /// 100, drained to 49 by a user with no pending job (no contender), so that no caller over
    /// its share may take from it (that needs half of it left after the call) and the 49 units
    /// go to whoever is not ahead.
    async fn scarce(fair: &Fairness) -> Vec<BucketAsk> {
        let bucket = ipm(6, 100);
        let filler = user("filler");
        for _ in 0..51 {
            assert_eq!(
                fair.acquire(&filler, "m", &bucket).await.unwrap(),
                Grant::Granted
            );
        }
        bucket
    }

    #[tokio::test]
    async fn a_user_ahead_of_another_waiting_one_yields_and_a_lone_user_never_does() {
        with_redis(|keys| async move {
            let fair = fairness(&keys, policy(1)).await;
            let (alice, bob) = (user("alice"), user("bob"));
            let bucket = scarce(&fair).await;
            let now = chrono::Utc::now();
            fair.reserve(&alice, JobId::new(), now, 0, 0).await.unwrap();
            // Alone, Alice takes all she likes.
            for _ in 0..5 {
                assert_eq!(
                    fair.acquire(&alice, "m", &bucket).await.unwrap(),
                    Grant::Granted
                );
            }
            // Bob arrives level with her (no credit for her past calls, none against him):
            // from then on neither gets more than one call ahead of the other, however eagerly
            // Bob asks.
            fair.reserve(&bob, JobId::new(), now, 0, 0).await.unwrap();
            let (mut alices, mut bobs, mut yielded) = (0, 0, 0);
            for _ in 0..20 {
                for _ in 0..3 {
                    match fair.acquire(&bob, "m", &bucket).await.unwrap() {
                        Grant::Granted => bobs += 1,
                        Grant::OverShare { ahead } => {
                            assert_eq!(ahead, 1);
                            yielded += 1;
                        }
                        Grant::Limited { .. } => panic!("the bucket has room"),
                    }
                }
                if fair.acquire(&alice, "m", &bucket).await.unwrap() == Grant::Granted {
                    alices += 1;
                }
                assert!(bobs - alices <= 2, "Bob {bobs}, Alice {alices}");
            }
            assert!(yielded > 0);
            assert!(alices >= 19, "Alice got her turns: {alices}");
        })
        .await;
    }

    #[tokio::test]
    async fn a_user_over_their_share_takes_what_piles_up_unused_but_never_the_last_half() {
        with_redis(|keys| async move {
            let fair = fairness(&keys, policy(1)).await;
            let (alice, bob) = (user("alice"), user("bob"));
            let now = chrono::Utc::now();
            fair.reserve(&alice, JobId::new(), now, 0, 0).await.unwrap();
            fair.reserve(&bob, JobId::new(), now, 0, 0).await.unwrap();
            // Bob asked once and then his jobs are elsewhere (in the broker's queue, say): Alice,
            // ahead of him, still gets the units nobody takes, down to half the bucket.
            let bucket = ipm(6, 10);
            assert_eq!(
                fair.acquire(&bob, "m", &bucket).await.unwrap(),
                Grant::Granted
            );
            let mut alices = 0;
            while fair.acquire(&alice, "m", &bucket).await.unwrap() == Grant::Granted {
                alices += 1;
                assert!(alices < 10, "the bucket only holds 10");
            }
            // 10 - 1 (Bob's) = 9; Alice's first call was level, the rest over her share: they
            // stop where 5 would be left.
            assert_eq!(alices, 4, "Alice took down to half the bucket");
            assert!(
                matches!(
                    fair.acquire(&alice, "m", &bucket).await.unwrap(),
                    Grant::OverShare { ahead: 4 }
                ),
                "past half, Alice (4 calls ahead of Bob) yields instead of waiting for a unit"
            );
            // The other half is Bob's, who is not ahead.
            for _ in 0..3 {
                assert_eq!(
                    fair.acquire(&bob, "m", &bucket).await.unwrap(),
                    Grant::Granted
                );
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_weight_of_two_takes_two_turns_for_one() {
        with_redis(|keys| async move {
            let mut tuned = policy(1);
            tuned.weights = Weights::parse("paid:2").unwrap();
            let fair = fairness(&keys, tuned).await;
            let (paid, free) = (user("paid"), user("free"));
            let bucket = scarce(&fair).await;
            let now = chrono::Utc::now();
            fair.reserve(&paid, JobId::new(), now, 0, 0).await.unwrap();
            fair.reserve(&free, JobId::new(), now, 0, 0).await.unwrap();
            let mut granted = HashMap::<&str, u32>::new();
            for _ in 0..15 {
                for (name, who) in [("paid", &paid), ("free", &free)] {
                    if fair.acquire(who, "m", &bucket).await.unwrap() == Grant::Granted {
                        *granted.entry(name).or_default() += 1;
                    }
                }
            }
            let (paid, free) = (granted["paid"], granted["free"]);
            assert!(
                (2 * free).abs_diff(paid) <= 2,
                "paid {paid} against free {free}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_place_counts_the_users_earlier_jobs_and_the_others_share() {
        with_redis(|keys| async move {
            let fair = fairness(&keys, policy(1)).await;
            let (alice, bob) = (user("alice"), user("bob"));
            let start = chrono::Utc::now();
            let mut alices = Vec::new();
            for offset in 0..10 {
                let id = JobId::new();
                fair.reserve(
                    &alice,
                    id,
                    start + chrono::Duration::milliseconds(offset),
                    0,
                    0,
                )
                .await
                .unwrap();
                alices.push(id);
            }
            let bobs_first = JobId::new();
            fair.reserve(&bob, bobs_first, start + chrono::Duration::seconds(1), 0, 0)
                .await
                .unwrap();
            // Bob's only job waits for one of Alice's, not ten.
            let place = fair.place(&bob, bobs_first).await.unwrap().unwrap();
            assert_eq!(place.position(), 2);
            assert_eq!(place.estimated_wait(), None, "nothing finished yet");
            // Alice's fifth waits for her four earlier ones and Bob's one.
            let place = fair.place(&alice, alices[4]).await.unwrap().unwrap();
            assert_eq!(place.ahead, 5);
            fair.remove(&alice, alices[0], true).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            fair.remove(&alice, alices[1], true).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let place = fair.place(&alice, alices[4]).await.unwrap().unwrap();
            assert_eq!(place.ahead, 3);
            // Two completions in about 0.1 s: about 20 a second, so 3 ahead is well under a
            // second away.
            let wait = place.estimated_wait().unwrap();
            assert!(wait < Duration::from_secs(1), "{wait:?}");
            let backlog = fair.backlog().await.unwrap();
            assert!(backlog.completions_per_hour > 36_000, "{backlog:?}");
            assert_eq!(fair.place(&alice, alices[0]).await.unwrap(), None);
        })
        .await;
    }

    #[test]
    fn weights_parse_and_refuse_what_they_must() {
        let weights = Weights::parse(" paid:2 , trial:0.5").unwrap();
        assert_eq!(weights.of("paid"), 2.0);
        assert_eq!(weights.of("trial"), 0.5);
        assert_eq!(weights.of("anyone"), 1.0);
        assert!(Weights::parse("paid").is_err());
        assert!(Weights::parse("paid:0").is_err());
        assert!(Weights::parse("paid:1e300").is_err());
        assert!(Weights::parse("paid:2,paid:3").is_err());
        assert_eq!(Weights::parse("").unwrap(), Weights::default());
    }
}
