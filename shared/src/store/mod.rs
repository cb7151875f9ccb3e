//! Job state in Redis: one hash per job, a per-user index, idempotency keys and change events.
//!
//! Every state change after creation goes through one Lua script ([`UPDATE_SCRIPT`]) so that it
//! is atomic with its guard ("only while the job is not terminal"), its version bump, its TTL
//! refresh and its `PUBLISH` to the events channel. That single path is what makes "a result is
//! written once" and "SSE sees every change" true with many workers and api replicas.

mod finish;
mod gate;
mod intake;
mod record;
mod update;

use std::collections::HashMap;
use std::time::Duration;

use crate::connection::RedisConnection;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use finish::RunEnd;
pub use gate::{Gate, GateSteps};
pub use intake::{Intake, Taken};
use record::json;
pub use record::{CALL_IN_FLIGHT_FIELD, CallInFlight, JobRecord, StepRecord, step_field};
pub use update::{JobUpdate, UPDATE_SCRIPT};

use crate::config::RedisSettings;
use crate::connection::Redis;
use crate::domain::{JobId, JobStatus, UserId};
use crate::keys::Keys;
use crate::script::Part;

/// How long a job hash lives before the broker has confirmed its message. A process that dies
/// between the Redis write and the confirm leaves nothing that outlives this.
pub const PENDING_TTL: Duration = Duration::from_secs(600);

/// What [`JobStore::withdraw`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawal {
    /// The job is gone and will not run, whatever the broker holds.
    Withdrawn,
    /// A worker has started the job: its message was delivered, so the job stands.
    Taken,
}

/// What [`JobStore::recreate`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recreated {
    Created,
    /// A record of the job exists (another worker recreated it meanwhile).
    Exists,
    /// The api withdrew the job: its client was told it was not accepted.
    Withdrawn,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis is unavailable: {0}")]
    Unavailable(#[from] redis::RedisError),
    #[error("job {id} has a malformed field {field}")]
    Corrupt { id: String, field: &'static str },
}

/// The job hash's field naming the run that holds the job's lease ([`JobStore::claim_run`]).
const RUNNER_FIELD: &str = "runner";

/// Writes a new job's hash (short-lived until the broker confirms it) and indexes it for its
/// user, dropping index entries older than the job TTL: the script's text, for
/// [`JobStore::insert_pending`] and as a step of the api's intake ([`intake`]).
macro_rules! insert_body {
    () => {
        "
-- KEYS[1] job hash, KEYS[2] the user's job index
-- ARGV[1] the hash's TTL until accepted (s), ARGV[2] job id, ARGV[3] the oldest index entry
-- kept ('(' and an id: by lexical order, ids are by time), ARGV[4] the index's TTL (s),
-- ARGV[5..] the job's fields, name and value in turn
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
redis.call('ZREMRANGEBYLEX', KEYS[2], '-', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"
    };
}
pub(crate) use insert_body;

/// The claim of [`CLAIM_RUN_SCRIPT`] as a Lua function body, shared with [`GET_AND_CLAIM_SCRIPT`].
macro_rules! claim_body {
    () => {
        "
local holder = redis.call('HGET', job, 'runner')
if holder and holder ~= runner then
  local now_ms = tonumber(now)
  local held = tonumber(redis.call('ZSCORE', leases, id) or '0')
  local worker = string.match(holder, '^([^.]+)%.')
  if held > now_ms and worker then
    local alive = redis.call('PTTL', alive_prefix .. worker)
    if alive > 0 then return math.min(held, now_ms + alive) end
  end
end
if redis.call('EXISTS', job) == 1 then redis.call('HSET', job, 'runner', runner) end
redis.call('ZADD', leases, till, id)
return 0
"
    };
}

/// Releases a run's lease unless another run holds it: KEYS job hash, leases; ARGV job id,
/// runner. The script's text, for [`JobStore::release_run`] and as a step of
/// [`JobStore::finish_run`].
macro_rules! release_run_body {
    () => {
        "local holder = redis.call('HGET', KEYS[1], 'runner')
if holder and holder ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'runner')
return redis.call('ZREM', KEYS[2], ARGV[1])
"
    };
}
pub(crate) use release_run_body;

/// Claims a job's run: KEYS job hash, leases; ARGV job id, runner (`{worker}.{delivery}`), now
/// (ms), until (ms), the heartbeat keys' prefix. Answers 0 when claimed, or until when (ms) the
/// run holding it stands in the way: its lease, or sooner its worker's heartbeat (a worker that
/// died leaves its lease behind; its heartbeat stops within seconds).
const CLAIM_RUN_SCRIPT: &str = concat!(
    "local function CLAIM(job, leases, id, runner, now, till, alive_prefix)\n",
    claim_body!(),
    "end\nreturn CLAIM(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])\n"
);

/// Reads a job and, when `ARGV[6]` is `1` and the job has not ended, claims its run as
/// [`CLAIM_RUN_SCRIPT`] does, in one round trip: KEYS and ARGV[1..5] as there. Answers nil for
/// no job, else `{fields, claim}`: the hash's fields as `HGETALL` gives them, and -1 when no
/// claim was tried, 0 when claimed, or until when (ms) another run holds it. The fields are
/// those before the claim (it only sets `runner`, which a record does not read).
const GET_AND_CLAIM_SCRIPT: &str = concat!(
    "local function CLAIM(job, leases, id, runner, now, till, alive_prefix)\n",
    claim_body!(),
    "end
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return false end
if ARGV[6] ~= '1' then return {fields, -1} end
local terminal = {succeeded = true, failed = true, needs_clarification = true, canceled = true}
for i = 1, #fields, 2 do
  if fields[i] == 'status' then
    if terminal[fields[i + 1]] then return {fields, -1} end
    break
  end
end
return {fields, CLAIM(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])}
"
);

/// What [`JobStore::get_and_claim`] did about the run's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not asked for, or the job has ended.
    NotTried,
    /// This run holds the job now.
    Taken,
    /// Another run holds it until then.
    HeldUntil(DateTime<Utc>),
}

/// Which jobs an update may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Only a job that is not in a terminal status: the rule that makes results write-once.
    Active,
    /// Only a job in exactly this status (e.g. answering a clarification, replaying a failure).
    Status(JobStatus),
}

/// What an update found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    Applied {
        previous: JobStatus,
        version: u64,
    },
    /// The guard refused: the job was already in this (terminal) status.
    Refused(JobStatus),
    Missing,
}

/// The update script's reply, as [`JobStore::update`] gives it, and the job's user: nil for
/// no job, `{status, -1, ''}` when the guard refused, else `{previous status, version, user}`.
pub fn update_outcome(
    id: JobId,
    reply: Option<(String, i64, Option<String>)>,
) -> Result<(UpdateOutcome, Option<UserId>), StoreError> {
    let Some((previous, version, user)) = reply else {
        return Ok((UpdateOutcome::Missing, None));
    };
    let previous = JobStatus::parse(&previous).ok_or(StoreError::Corrupt {
        id: id.to_string(),
        field: "status",
    })?;
    let Ok(version) = u64::try_from(version) else {
        return Ok((UpdateOutcome::Refused(previous), None));
    };
    Ok((
        UpdateOutcome::Applied { previous, version },
        user.and_then(|user| UserId::parse(&user).ok()),
    ))
}

/// What [`JobStore::statuses`] found of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// No hash: the job expired, or never was.
    Gone,
    Status(JobStatus),
    /// A status this release does not know (written by a newer one): treat it as alive.
    Unreadable,
}

impl Presence {
    /// Whether the job may still run, and so still needs its images.
    pub fn is_active(self) -> bool {
        match self {
            Self::Gone => false,
            Self::Status(status) => !status.is_terminal(),
            Self::Unreadable => true,
        }
    }
}

/// A change notification as published on the events channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: JobId,
    pub status: JobStatus,
    pub version: u64,
}

/// What claiming an idempotency key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// The key was free and now points at the new job.
    Claimed,
    /// The key already points at a job created from the same request.
    Existing(JobId),
    /// The key was used before with a different request body.
    Mismatch,
}

/// Job state in Redis. Cheap to clone: it shares its process's one [`Redis`] connection.
#[derive(Clone)]
pub struct JobStore {
    redis: Redis,
    /// The backlog a job is in from its acceptance to its end; every status change that ends a
    /// job, or makes an ended one run again, moves it.
    fair: crate::fair::Fairness,
    connection: RedisConnection,
    keys: Keys,
    ttl: Duration,
    image_retention: Duration,
    update_script: redis::Script,
    gate_script: redis::Script,
    finish_script: redis::Script,
    insert_script: redis::Script,
    intake_script: redis::Script,
    claim_run_script: redis::Script,
    get_and_claim_script: redis::Script,
}

impl JobStore {
    /// The store on `redis`, keeping jobs for `ttl` after their last change, and their images
    /// as long (see [`JobStore::with_image_retention`]).
    pub fn new(redis: Redis, ttl: Duration) -> Self {
        Self {
            connection: redis.connection(),
            keys: redis.keys().clone(),
            fair: redis.fairness(crate::fair::FairPolicy::default()),
            redis,
            ttl,
            image_retention: ttl,
            update_script: redis::Script::new(UPDATE_SCRIPT),
            gate_script: Self::gate_script(),
            finish_script: Self::finish_script(),
            insert_script: redis::Script::new(insert_body!()),
            intake_script: Self::intake_script(),
            claim_run_script: redis::Script::new(CLAIM_RUN_SCRIPT),
            get_and_claim_script: redis::Script::new(GET_AND_CLAIM_SCRIPT),
        }
    }

    /// Schedules the images of a job that ends for deletion `retention` after its end
    /// (`images.retention_secs`) instead of the job TTL.
    #[must_use]
    pub fn with_image_retention(mut self, retention: Duration) -> Self {
        self.image_retention = retention;
        self
    }

    /// Connects to Redis and opens the store on it; [`JobStore::redis`] hands out the other
    /// Redis-backed parts on the same connection.
    pub async fn connect(settings: &RedisSettings, ttl: Duration) -> Result<Self, StoreError> {
        Ok(Redis::connect(settings).await?.jobs(ttl))
    }

    /// The connection this store is on, for the ledger, limiter and the other parts.
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// How long a job is kept after its last change.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await?;
        Ok(())
    }

    /// Writes a new job with a short TTL and indexes it for its user. It becomes durable for the
    /// full TTL only when [`JobStore::mark_accepted`] runs after the broker's confirm.
    pub async fn insert_pending(&self, job: &JobRecord) -> Result<(), StoreError> {
        let mut connection = self.connection.pinned();
        self.insert_part(job)
            .invoke_async::<()>(&self.insert_script, &mut connection)
            .await?;
        // The broker gets the job (and the client its `202`) only once a failover keeps it.
        connection.replicated().await?;
        Ok(())
    }

    /// The keys and arguments of [`Self::insert_pending`]'s script, to run it alone or as a
    /// step of a composed one.
    pub fn insert_part(&self, job: &JobRecord) -> Part {
        let oldest_kept = JobId::floor_at(job.created_at - chrono_ttl(self.ttl));
        let mut part = Part::default();
        part.key(self.keys.job(job.id))
            .key(self.keys.user_jobs(&job.user))
            .arg(PENDING_TTL.as_secs())
            .arg(job.id.to_string())
            .arg(format!("({oldest_kept}"))
            .arg(self.ttl.as_secs());
        for (field, value) in job.to_fields() {
            part.arg(field).arg(value);
        }
        part
    }

    /// Writes `job` (accepted, for the full TTL) if no job of its id exists and the api did
    /// not withdraw it ([`Self::withdraw`]), and indexes it for its user. A worker recreates a
    /// job Redis lost this way, and two workers doing so at once cannot overwrite each other or
    /// a job that came back.
    pub async fn recreate(&self, job: &JobRecord) -> Result<Recreated, StoreError> {
        let mut connection = self.connection.clone();
        let script = redis::Script::new(
            "if redis.call('ZSCORE', KEYS[3], ARGV[2]) then return -1 end \
             if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end \
             redis.call('HSET', KEYS[1], unpack(ARGV, 3)) \
             redis.call('EXPIRE', KEYS[1], ARGV[1]) \
             redis.call('ZADD', KEYS[2], 0, ARGV[2]) \
             redis.call('EXPIRE', KEYS[2], ARGV[1]) \
             return 1",
        );
        let mut invocation = script.key(self.keys.job(job.id));
        invocation
            .key(self.keys.user_jobs(&job.user))
            .key(self.keys.withdrawn())
            .arg(self.ttl.as_secs())
            .arg(job.id.to_string());
        for (field, value) in job.to_fields() {
            invocation.arg(field).arg(value);
        }
        let created: i64 = invocation.invoke_async(&mut connection).await?;
        if created == 1 && !job.status.is_terminal() {
            self.fair.add(&job.user, job.id, job.created_at).await?;
        }
        Ok(match created {
            1 => Recreated::Created,
            -1 => Recreated::Withdrawn,
            _ => Recreated::Exists,
        })
    }

    /// The broker confirmed the job's message: keep it for the full TTL, and with it the
    /// Idempotency-Key claim that created it (`claim`: the user and the key's digest), which
    /// from now on answers retries with this job for [`IDEMPOTENCY_TTL`].
    pub async fn mark_accepted(
        &self,
        id: JobId,
        claim: Option<(&UserId, &str)>,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.pinned();
        // A record that is gone (its short pending TTL ran out, or a failover lost it) is left
        // gone, not recreated as a hash of one field: the worker recreates the job from its
        // message. Without an idempotency key the script has one key (an empty second key
        // would be in another Redis Cluster slot).
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(MARK_ACCEPTED_SCRIPT));
        const MARK_ACCEPTED_SCRIPT: &str = "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
             redis.call('HSET', KEYS[1], 'accepted', '1') \
             redis.call('EXPIRE', KEYS[1], ARGV[1]) \
             if #KEYS > 1 then \
               local claim = redis.call('GET', KEYS[2]) \
               if claim and string.sub(claim, 1, #ARGV[3]) == ARGV[3] then \
                 redis.call('EXPIRE', KEYS[2], ARGV[2]) \
               end \
             end \
             return 1";
        let mut invocation = SCRIPT.key(self.keys.job(id));
        if let Some((user, digest)) = claim {
            invocation.key(self.keys.idempotency(user, digest));
        }
        invocation
            .arg(self.ttl.as_secs())
            .arg(IDEMPOTENCY_TTL.as_secs())
            .arg(format!("{id} "))
            .invoke_async::<i64>(&mut connection)
            .await?;
        // A job the client was told exists stays visible through a failover.
        connection.replicated().await?;
        Ok(())
    }

    /// Gives up on a job whose publish the broker did not confirm but may hold all the same
    /// ([`crate::queue::QueueError::may_have_arrived`]), so that its client's `503` holds: unless
    /// a worker has already started it, its record goes as in [`Self::discard`] and its id
    /// joins the withdrawn ones, which [`Self::recreate`] never brings back from a message. A
    /// job a worker has taken (its run claimed, or anything written on it) was delivered, so the
    /// broker had it: the caller accepts it after all ([`Withdrawal::Taken`]).
    pub async fn withdraw(&self, id: JobId, user: &UserId) -> Result<Withdrawal, StoreError> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(WITHDRAW_SCRIPT));
        const WITHDRAW_SCRIPT: &str = "
-- KEYS[1] job hash, KEYS[2] the user's job index, KEYS[3] withdrawn jobs
-- ARGV[1] job id, ARGV[2] how long the withdrawn are kept (ms)
-- A worker claims a run ('runner') before anything else, and every write it makes counts a
-- 'version': a job with neither was never started.
local job = redis.call('HMGET', KEYS[1], 'runner', 'version', 'accepted')
if job[1] or tonumber(job[2] or '0') > 0 or job[3] == '1' then return 0 end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 1
";
        let mut connection = self.connection.pinned();
        let withdrawn: i64 = SCRIPT
            .key(self.keys.job(id))
            .key(self.keys.user_jobs(user))
            .key(self.keys.withdrawn())
            .arg(id.to_string())
            .arg(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut connection)
            .await?;
        // The withdrawal must outlive a failover as long as the message may.
        connection.replicated().await?;
        Ok(if withdrawn == 1 {
            Withdrawal::Withdrawn
        } else {
            Withdrawal::Taken
        })
    }

    /// Removes a job that was never accepted (the broker refused or was unreachable).
    pub async fn discard(&self, id: JobId, user: &UserId) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::pipe()
            .atomic()
            .del(self.keys.job(id))
            .ignore()
            .zrem(self.keys.user_jobs(user), id.to_string())
            .ignore()
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }

    pub async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        let mut connection = self.connection.clone();
        let map: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.job(id))
            .query_async(&mut connection)
            .await?;
        if map.is_empty() {
            return Ok(None);
        }
        JobRecord::from_fields(map).map(Some)
    }

    /// What Redis holds of each of `ids`, in order, in one round trip.
    pub async fn statuses(&self, ids: &[JobId]) -> Result<Vec<Presence>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection.clone();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGET").arg(self.keys.job(*id)).arg("status");
        }
        let found: Vec<Option<String>> = pipe.query_async(&mut connection).await?;
        Ok(found
            .iter()
            .map(|status| match status.as_deref() {
                None => Presence::Gone,
                Some(raw) => JobStatus::parse(raw).map_or(Presence::Unreadable, Presence::Status),
            })
            .collect())
    }

    /// A user's jobs, newest first, starting after `cursor`. Returns the page and the cursor of
    /// the next page, if there is one.
    pub async fn list(
        &self,
        user: &UserId,
        limit: usize,
        cursor: Option<JobId>,
    ) -> Result<(Vec<JobRecord>, Option<JobId>), StoreError> {
        let index = self.keys.user_jobs(user);
        let mut connection = self.connection.clone();
        let mut jobs = Vec::with_capacity(limit);
        let mut upper = cursor.map_or_else(|| "+".to_string(), |c| format!("({c}"));
        // Entries whose hash expired are skipped and pruned, so keep reading until the page is
        // full or the index runs out.
        loop {
            let want = limit + 1 - jobs.len();
            let ids: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
                .arg(&index)
                .arg(&upper)
                .arg("-")
                .arg("LIMIT")
                .arg(0)
                .arg(want)
                .query_async(&mut connection)
                .await?;
            if ids.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGETALL")
                    .arg(format!("{}job:{id}", self.keys.prefix()));
            }
            let maps: Vec<HashMap<String, String>> = pipe.query_async(&mut connection).await?;
            let mut expired = Vec::new();
            for (id, map) in ids.iter().zip(maps) {
                if map.is_empty() {
                    expired.push(id.clone());
                } else {
                    let job = JobRecord::from_fields(map)?;
                    if job.accepted {
                        jobs.push(job);
                    }
                }
            }
            if !expired.is_empty() {
                redis::cmd("ZREM")
                    .arg(&index)
                    .arg(&expired)
                    .query_async::<()>(&mut connection)
                    .await?;
            }
            let exhausted = ids.len() < want;
            if let Some(last) = ids.last() {
                upper = format!("({last}");
            }
            if jobs.len() > limit || exhausted {
                break;
            }
        }
        let next = if jobs.len() > limit {
            jobs.truncate(limit);
            jobs.last().map(|job| job.id)
        } else {
            None
        };
        Ok((jobs, next))
    }

    /// Applies `update` atomically if `guard` allows, bumping the version and publishing an event.
    pub async fn update(
        &self,
        id: JobId,
        guard: Guard,
        update: &JobUpdate,
    ) -> Result<UpdateOutcome, StoreError> {
        let mut connection = self.connection.pinned();
        let reply = self
            .update_part(id, guard, update)
            .invoke_async(&self.update_script, &mut connection)
            .await?;
        self.after_update(id, update, reply, &mut connection).await
    }

    /// What follows an update's script, alone or as a step ([`Self::finish_run`]): reads its
    /// reply; an end waits for the replicas, a job brought back from its end rejoins the
    /// backlog.
    async fn after_update(
        &self,
        id: JobId,
        update: &JobUpdate,
        reply: Option<(String, i64, Option<String>)>,
        connection: &mut crate::connection::Pinned,
    ) -> Result<UpdateOutcome, StoreError> {
        let (outcome, user) = update_outcome(id, reply)?;
        let UpdateOutcome::Applied { previous, .. } = outcome else {
            return Ok(outcome);
        };
        if update.status.is_some_and(|status| status.is_terminal()) {
            // The job's message is acked after this: its end must survive a failover.
            connection.replicated().await?;
        }
        if previous.is_terminal()
            && update.status.is_some_and(|status| !status.is_terminal())
            && let Some(user) = user
        {
            self.back_in_backlog(id, &user).await;
        }
        Ok(outcome)
    }

    /// The keys and arguments of [`Self::update`]'s script, to run it alone or as a step of a
    /// composed one (whose reply [`update_outcome`] reads).
    pub fn update_part(&self, id: JobId, guard: Guard, update: &JobUpdate) -> Part {
        let guard = match guard {
            Guard::Active => "active".to_string(),
            Guard::Status(status) => format!("is:{}", status.as_str()),
        };
        let fields = update.fields(Utc::now());
        let appended = |items: String| if items == "[]" { String::new() } else { items };
        let mut part = Part::default();
        part.key(self.keys.job(id))
            .key(self.keys.image_expiry())
            .key(self.keys.fair_users())
            .key(self.keys.fair_total())
            .key(self.keys.fair_rate())
            .arg(self.keys.events_channel())
            .arg(guard)
            .arg(self.ttl.as_secs())
            .arg(fields.get("status").map_or("", String::as_str))
            .arg(appended(json(&update.add_notices)))
            .arg(appended(json(&update.add_usage)))
            .arg(update.add_attempts)
            .arg(update.add_cost_micros)
            .arg(u64::try_from(self.image_retention.as_millis()).unwrap_or(u64::MAX))
            .arg(update.add_deferrals)
            .arg(self.keys.fair_pending(""))
            .arg(crate::fair::RATE_SAMPLES);
        for (field, value) in &fields {
            part.arg(*field).arg(value);
        }
        part
    }

    /// Drops backlog entries (older than `min_age`, so a job being accepted right now is left
    /// alone) whose job ended or vanished without its entry going: the write that ended it
    /// could not reach the backlog. Answers how many went.
    pub async fn sweep_backlog(&self, min_age: Duration) -> Result<usize, StoreError> {
        let oldest = (Utc::now() - chrono_ttl(min_age)).timestamp_millis();
        let mut dropped = 0;
        for (user, jobs) in self.fair.entries().await? {
            let old: Vec<JobId> = jobs
                .into_iter()
                .filter(|(_, at)| *at < oldest)
                .map(|(id, _)| id)
                .collect();
            for chunk in old.chunks(500) {
                let presence = self.statuses(chunk).await?;
                for (id, presence) in chunk.iter().zip(presence) {
                    let ended = match presence {
                        Presence::Gone => Some(false),
                        Presence::Status(status) if status.is_terminal() => {
                            Some(status != JobStatus::Canceled)
                        }
                        _ => None,
                    };
                    if let Some(finished) = ended {
                        self.fair.remove(&user, *id, finished).await?;
                        dropped += 1;
                    }
                }
            }
        }
        Ok(dropped)
    }

    /// Puts a job that ended and runs again (an answered question) back in the backlog. Best
    /// effort after the job's own write: one it fails to add only leaves the job out of the
    /// fair share's counts. (A job that ends leaves the backlog in the update's own write.)
    async fn back_in_backlog(&self, id: JobId, user: &UserId) {
        if let Err(error) = self.fair.add(user, id, Utc::now()).await {
            tracing::warn!(job_id = %id, %error, "Could not put the job back in the backlog");
        }
    }

    /// Records that `id` should show progress before `until` (the watchdog's deadline), held by
    /// no runner: the watchdog's lease on a job it requeued, which any worker may claim.
    pub async fn set_lease(&self, id: JobId, until: DateTime<Utc>) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::pipe()
            .atomic()
            .zadd(self.keys.leases(), id.to_string(), until.timestamp_millis())
            .ignore()
            .hdel(self.keys.job(id), RUNNER_FIELD)
            .ignore()
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }

    /// Makes `runner` (one delivery's run of the job, `{worker}.{delivery}`) the one running
    /// `id` until `until`, unless another run holds an unexpired lease on it and its worker's
    /// heartbeat ([`JobStore::heartbeat`]) goes on: then answers until when it stands.
    /// Two copies of one job's message (a redelivery while the first run goes on, after its
    /// channel closed) must not both call the provider.
    pub async fn claim_run(
        &self,
        id: JobId,
        runner: &str,
        until: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut connection = self.connection.clone();
        let held_until: i64 = self
            .claim(id, runner, until)
            .invoke_async(&self.claim_run_script, &mut connection)
            .await?;
        Ok((held_until > 0).then(|| DateTime::from_timestamp_millis(held_until).unwrap_or(until)))
    }

    /// The keys and arguments of `runner`'s claim on `id`, for a claim script.
    fn claim(&self, id: JobId, runner: &str, until: DateTime<Utc>) -> Part {
        let mut part = Part::default();
        part.key(self.keys.job(id))
            .key(self.keys.leases())
            .arg(id.to_string())
            .arg(runner)
            .arg(Utc::now().timestamp_millis())
            .arg(until.timestamp_millis())
            .arg(self.keys.worker_alive(""));
        part
    }

    /// The job, and with `claim` (and the job not ended) the claim of its run by `runner`, in
    /// one round trip: what [`JobStore::get`] then [`JobStore::claim_run`] would do, atomically.
    /// `None` when there is no job.
    pub async fn get_and_claim(
        &self,
        id: JobId,
        runner: &str,
        until: DateTime<Utc>,
        claim: bool,
    ) -> Result<Option<(JobRecord, Claim)>, StoreError> {
        let mut connection = self.connection.clone();
        let found: Option<(HashMap<String, String>, i64)> = self
            .claim(id, runner, until)
            .arg(if claim { "1" } else { "0" })
            .invoke_async(&self.get_and_claim_script, &mut connection)
            .await?;
        let Some((fields, claimed)) = found else {
            return Ok(None);
        };
        let claim = match claimed {
            ..0 => Claim::NotTried,
            0 => Claim::Taken,
            held => Claim::HeldUntil(DateTime::from_timestamp_millis(held).unwrap_or(until)),
        };
        Ok(Some((JobRecord::from_fields(fields)?, claim)))
    }

    /// Says that worker process `worker` is alive for `ttl`; it beats more often than that.
    pub async fn heartbeat(&self, worker: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("SET")
            .arg(self.keys.worker_alive(worker))
            .arg(1)
            .arg("PX")
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }

    /// Ends `runner`'s lease on `id` (nothing if another runner holds it now).
    pub async fn release_run(&self, id: JobId, runner: &str) -> Result<(), StoreError> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(release_run_body!()));
        let mut connection = self.connection.clone();
        self.release_part(id, runner)
            .invoke_async::<i64>(&SCRIPT, &mut connection)
            .await?;
        Ok(())
    }

    /// The keys and arguments of [`Self::release_run`]'s script, to run it as a step of the
    /// job's final write ([`Self::finish_run`]).
    pub fn release_part(&self, id: JobId, runner: &str) -> Part {
        let mut part = Part::default();
        part.key(self.keys.job(id))
            .key(self.keys.leases())
            .arg(id.to_string())
            .arg(runner);
        part
    }

    pub async fn clear_lease(&self, id: JobId) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("ZREM")
            .arg(self.keys.leases())
            .arg(id.to_string())
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }

    /// Counts one infrastructure failure on the job and answers the count so far (`None` when
    /// the job is gone). The count lives on the job, so every delivery and every worker shares
    /// it, whatever the broker counts.
    pub async fn add_infra_attempt(&self, id: JobId) -> Result<Option<u32>, StoreError> {
        let mut connection = self.connection.clone();
        let count: i64 = redis::Script::new(
            "if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end \
             return redis.call('HINCRBY', KEYS[1], 'infra_attempts', 1)",
        )
        .key(self.keys.job(id))
        .invoke_async(&mut connection)
        .await?;
        Ok(u32::try_from(count).ok())
    }

    /// Jobs whose lease ran out before `now` (at most `limit`).
    pub async fn expired_leases(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<JobId>, StoreError> {
        let mut connection = self.connection.clone();
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.leases())
            .arg("-inf")
            .arg(now.timestamp_millis())
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut connection)
            .await?;
        Ok(ids.iter().filter_map(|id| JobId::parse(id)).collect())
    }

    /// Takes a short lock so one process at a time does a periodic chore; true if taken.
    pub async fn try_lock(&self, key: &str, hold: Duration) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let taken: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(uuid::Uuid::new_v4().to_string())
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1))
            .query_async(&mut connection)
            .await?;
        Ok(taken.is_some())
    }

    /// Points an idempotency key at `job` unless it already points somewhere.
    pub async fn claim_idempotency(
        &self,
        user: &UserId,
        key_digest: &str,
        fingerprint: &str,
        job: JobId,
    ) -> Result<IdempotencyClaim, StoreError> {
        let key = self.keys.idempotency(user, key_digest);
        let mut connection = self.connection.clone();
        let value = format!("{job} {fingerprint}");
        // A claim lives briefly until its job is accepted (`mark_accepted` extends it): if the
        // request that took it dies, a retry may claim the key again once this runs out.
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .arg("NX")
            .arg("EX")
            .arg(IDEMPOTENCY_CLAIM_TTL.as_secs())
            .query_async(&mut connection)
            .await?;
        if set.is_some() {
            return Ok(IdempotencyClaim::Claimed);
        }
        let existing: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await?;
        let Some(existing) = existing else {
            // It expired between the two commands: try once more.
            return Box::pin(self.claim_idempotency(user, key_digest, fingerprint, job)).await;
        };
        let (existing_job, existing_fingerprint) =
            existing.split_once(' ').unwrap_or((existing.as_str(), ""));
        match JobId::parse(existing_job) {
            Some(id) if existing_fingerprint == fingerprint => Ok(IdempotencyClaim::Existing(id)),
            Some(_) => Ok(IdempotencyClaim::Mismatch),
            None => Err(StoreError::Corrupt {
                id: existing_job.to_string(),
                field: "idempotency",
            }),
        }
    }

    /// Frees an idempotency key whose job `job` was never accepted, if the claim is still
    /// that job's: a request only ever frees its own claim (compare and delete).
    pub async fn release_idempotency(
        &self,
        user: &UserId,
        key_digest: &str,
        job: JobId,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::Script::new(
            "local claim = redis.call('GET', KEYS[1]) \
             if claim and string.sub(claim, 1, #ARGV[1]) == ARGV[1] then \
               return redis.call('DEL', KEYS[1]) \
             end \
             return 0",
        )
        .key(self.keys.idempotency(user, key_digest))
        .arg(format!("{job} "))
        .invoke_async::<i64>(&mut connection)
        .await?;
        Ok(())
    }

    /// Deletes every key of this deployment's prefix in batches (SCAN + UNLINK). For tests and
    /// for tearing down a throwaway deployment; never called by the services themselves.
    pub async fn delete_everything(&self) -> Result<u64, StoreError> {
        let mut connection = self.connection.clone();
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.keys.everything_pattern())
                .arg("COUNT")
                .arg(500)
                .query_async(&mut connection)
                .await?;
            if !keys.is_empty() {
                deleted += keys.len() as u64;
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(&mut connection)
                    .await?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

/// How long an Idempotency-Key keeps pointing at its job.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a claimed Idempotency-Key waits for its first request's job to be accepted.
pub const IDEMPOTENCY_CLAIM_TTL: Duration = Duration::from_secs(120);

fn chrono_ttl(ttl: Duration) -> chrono::Duration {
    chrono::Duration::from_std(ttl).unwrap_or_else(|_| chrono::Duration::days(7))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ImageSize;
    use crate::test_redis::with_redis;

    fn store_settings(keys: &Keys) -> RedisSettings {
        let mut settings = crate::config::Settings::defaults().unwrap();
        settings.redis.prefix = keys.prefix().to_string();
        settings.redis
    }

    async fn store(keys: &Keys) -> JobStore {
        let redis = Redis::connect(&store_settings(keys)).await.unwrap();
        JobStore::new(redis, Duration::from_secs(600))
    }

    /// The job and what `get_and_claim` did, for a job that exists.
    async fn read_and_claim(
        store: &JobStore,
        id: JobId,
        runner: &str,
        claim: bool,
    ) -> (JobRecord, Claim) {
        let until = Utc::now() + chrono::Duration::seconds(60);
        store
            .get_and_claim(id, runner, until, claim)
            .await
            .unwrap()
            .unwrap()
    }

    /// A pending job of `user`, written and in the backlog, as the api leaves it.
    async fn pending_job(store: &JobStore, user: &str) -> JobRecord {
        let job = JobRecord::new(
            JobId::new(),
            UserId::parse(user).unwrap(),
            "a lighthouse at dawn".to_string(),
            ImageSize::Square,
            1,
            None,
            Utc::now(),
        );
        store.insert_pending(&job).await.unwrap();
        store
            .fair
            .add(&job.user, job.id, job.created_at)
            .await
            .unwrap();
        job
    }

    /// Real Redis (the suite's), under this test's own prefix.
    #[tokio::test]
    async fn a_withdrawn_job_is_gone_for_good_and_a_started_one_cannot_be_withdrawn() {
        with_redis(|keys| async move {
            let store = store(&keys).await;
            let user = UserId::parse("alice").unwrap();
            let index = |store: &JobStore| {
                let (mut connection, key) = (store.connection.clone(), store.keys.user_jobs(&user));
                async move {
                    redis::cmd("ZRANGE")
                        .arg(key)
                        .arg(0)
                        .arg(-1)
                        .query_async::<Vec<String>>(&mut connection)
                        .await
                        .unwrap()
                }
            };
            // Nobody started it: withdrawn, and no message can bring it back.
            let untouched = pending_job(&store, "alice").await;
            assert_eq!(
                store.withdraw(untouched.id, &user).await.unwrap(),
                Withdrawal::Withdrawn
            );
            assert_eq!(store.get(untouched.id).await.unwrap(), None);
            assert!(!index(&store).await.contains(&untouched.id.to_string()));
            assert_eq!(
                store.recreate(&untouched).await.unwrap(),
                Recreated::Withdrawn
            );
            assert_eq!(store.get(untouched.id).await.unwrap(), None);
            // A record already gone (its short TTL ran out) is withdrawn all the same.
            let lost = pending_job(&store, "alice").await;
            store.discard(lost.id, &user).await.unwrap();
            assert_eq!(
                store.withdraw(lost.id, &user).await.unwrap(),
                Withdrawal::Withdrawn
            );
            assert_eq!(store.recreate(&lost).await.unwrap(), Recreated::Withdrawn);

            // A worker claimed its run: the broker had delivered it, so it stands untouched.
            let claimed = pending_job(&store, "alice").await;
            read_and_claim(&store, claimed.id, "run-1", true).await;
            assert_eq!(
                store.withdraw(claimed.id, &user).await.unwrap(),
                Withdrawal::Taken
            );
            let kept = store.get(claimed.id).await.unwrap().unwrap();
            assert_eq!(kept.status, JobStatus::Queued);
            assert!(index(&store).await.contains(&claimed.id.to_string()));
            // So does one a worker wrote on and let go of (deferred, its lease released).
            let deferred = pending_job(&store, "alice").await;
            store
                .update(
                    deferred.id,
                    Guard::Active,
                    &JobUpdate::status(JobStatus::Queued),
                )
                .await
                .unwrap();
            assert_eq!(
                store.withdraw(deferred.id, &user).await.unwrap(),
                Withdrawal::Taken
            );
            // A job Redis lost and nobody withdrew is recreated, once.
            let recreated = pending_job(&store, "alice").await;
            store.discard(recreated.id, &user).await.unwrap();
            assert_eq!(
                store.recreate(&recreated).await.unwrap(),
                Recreated::Created
            );
            assert_eq!(store.recreate(&recreated).await.unwrap(), Recreated::Exists);
            // Withdrawn ids are kept as long as a job, not for ever.
            let ttl: i64 = redis::cmd("PTTL")
                .arg(store.keys.withdrawn())
                .query_async(&mut store.connection.clone())
                .await
                .unwrap();
            assert!((1..=600_000).contains(&ttl), "{ttl} ms");
        })
        .await;
    }

    /// Real Redis (the suite's), under this test's own prefix.
    #[tokio::test]
    async fn a_job_leaves_the_backlog_in_the_write_that_ends_it_and_comes_back_if_it_runs_again() {
        with_redis(|keys| async move {
            let store = store(&keys).await;
            let (done, canceled) = (
                pending_job(&store, "alice").await,
                pending_job(&store, "alice").await,
            );
            pending_job(&store, "bob").await;
            let alice = &done.user;
            // Writes `status` under `guard`, then answers alice's pending jobs, the fleet's,
            // and the completions counted.
            let write = |id: JobId, guard: Guard, status: JobStatus| {
                let store = &store;
                async move {
                    let update = JobUpdate::status(status);
                    store.update(id, guard, &update).await.unwrap();
                    let (mine, total) = store.fair.pending(alice).await.unwrap();
                    let completions: u64 = redis::cmd("LLEN")
                        .arg(store.keys.fair_rate())
                        .query_async(&mut store.connection.clone())
                        .await
                        .unwrap();
                    (mine, total, completions)
                }
            };
            use JobStatus::*;
            // Running changes nothing; succeeding takes the job out and counts a completion.
            assert_eq!(write(done.id, Guard::Active, Running).await, (2, 3, 0));
            assert_eq!(write(done.id, Guard::Active, Succeeded).await, (1, 2, 1));
            // A cancel takes it out too, without counting as a completion; a user with nothing
            // left pending is no longer among the users with pending work.
            assert_eq!(write(canceled.id, Guard::Active, Canceled).await, (0, 1, 1));
            assert_eq!(store.fair.backlog().await.unwrap().users, 1, "bob only");
            // A job that ended and is written again, as ended, is not taken out twice.
            let again = Guard::Status(Succeeded);
            assert_eq!(write(done.id, again, Failed).await, (0, 1, 1));
            // A job that runs again after its end (an answered question) comes back.
            let revived = Guard::Status(Canceled);
            assert_eq!(write(canceled.id, revived, Queued).await, (1, 2, 1));
        })
        .await;
    }

    /// Real Redis (the suite's), under this test's own prefix.
    #[tokio::test]
    async fn a_call_passes_the_gate_only_within_its_limits_budget_and_job_and_holds_nothing_when_it_does_not()
     {
        use crate::fair::{BucketAsk, Grant};
        use crate::ledger::BudgetPolicy;
        with_redis(|keys| async move {
            let store = store(&keys).await;
            let redis = Redis::connect(&store_settings(&keys)).await.unwrap();
            let fair = redis.fairness(crate::fair::FairPolicy::default());
            let ledger = redis.ledger(BudgetPolicy {
                monthly_micros: 1_000,
                thresholds: Vec::new(),
                block: true,
            });
            let job = pending_job(&store, "alice").await;
            // Two calls' units, refilling at one a second.
            let asks = [BucketAsk {
                name: "openai:m:rpm".to_string(),
                cost: 1,
                per_minute: 60,
                burst: 2,
            }];
            let attempt = JobUpdate {
                status: Some(JobStatus::Running),
                add_attempts: 1,
                ..JobUpdate::default()
            };
            let gate = |amount: i64, limited: bool| {
                let steps = GateSteps {
                    acquire: limited
                        .then(|| fair.acquire_part(&job.user, "openai:m", &asks).unwrap()),
                    reserve: ledger.reserve_part(amount),
                    update: &attempt,
                };
                store.pass_gate(job.id, steps)
            };
            // What the budget holds, and the job's status and attempts.
            let state = || async {
                let month = crate::ledger::Month::of(Utc::now()).to_string();
                let reserved: Option<i64> = redis::cmd("HGET")
                    .arg(keys.budget(&month))
                    .arg("reserved")
                    .query_async(&mut store.connection.clone())
                    .await
                    .unwrap();
                let job = store.get(job.id).await.unwrap().unwrap();
                (reserved.unwrap_or(0), job.status, job.attempts)
            };

            let Gate::Passed { hold, outcome } = gate(600, true).await.unwrap() else {
                panic!("within every limit");
            };
            assert_eq!(hold.amount, 600);
            assert!(
                matches!(outcome, UpdateOutcome::Applied { .. }),
                "{outcome:?}"
            );
            assert_eq!(state().await, (600, JobStatus::Running, 1));

            // No room in the budget: no hold and no attempt (the bucket's unit is taken, as
            // when the two ran side by side).
            assert_eq!(
                gate(600, true).await.unwrap(),
                Gate::Refused {
                    spent: 0,
                    reserved: 600
                }
            );
            assert_eq!(state().await, (600, JobStatus::Running, 1));

            // The bucket is empty: nothing held or written.
            let denied = gate(100, true).await.unwrap();
            assert!(
                matches!(denied, Gate::Denied(Grant::Limited { .. })),
                "{denied:?}"
            );
            assert_eq!(state().await, (600, JobStatus::Running, 1));

            // The job ended: the hold the gate took is given back in the same script.
            store
                .update(
                    job.id,
                    Guard::Active,
                    &JobUpdate::status(JobStatus::Canceled),
                )
                .await
                .unwrap();
            assert_eq!(
                gate(100, false).await.unwrap(),
                Gate::Ended(UpdateOutcome::Refused(JobStatus::Canceled))
            );
            assert_eq!(state().await, (600, JobStatus::Canceled, 1));
            ledger.release(&hold).await.unwrap();
            assert_eq!(state().await.0, 0, "the first call's hold, given back");
        })
        .await;
    }

    /// Real Redis (the suite's), under this test's own prefix.
    #[tokio::test]
    async fn a_new_job_is_taken_in_only_within_the_budget_and_the_backlogs_caps_and_written_only_when_not_paced()
     {
        use crate::ledger::{BudgetPolicy, Month};
        with_redis(|keys| async move {
            let store = store(&keys).await;
            let redis = Redis::connect(&store_settings(&keys)).await.unwrap();
            let limiter = redis.limiter();
            let ledger = redis.ledger(BudgetPolicy {
                monthly_micros: 1_000,
                thresholds: Vec::new(),
                block: true,
            });
            let alice = UserId::parse("alice").unwrap();
            let job = || {
                JobRecord::new(
                    JobId::new(),
                    alice.clone(),
                    "a lighthouse at dawn".to_string(),
                    ImageSize::Square,
                    1,
                    None,
                    Utc::now(),
                )
            };
            // Alice may hold two pending jobs, and start one a second after a burst of one.
            let take_in = async |record: &JobRecord| {
                let intake = Intake {
                    budget: ledger.within_part(record.created_at),
                    reserve: store
                        .fair
                        .reserve_part(&alice, record.id, record.created_at, 2, 0),
                    pace: limiter.schedule_part("pace:alice", 60, 1).unwrap(),
                    record,
                    paced_after: Duration::from_millis(500),
                };
                store.take_in(intake).await
            };
            let written = |id: JobId| {
                let store = &store;
                async move { store.get(id).await.unwrap().is_some() }
            };

            let first = job();
            assert_eq!(take_in(&first).await.unwrap(), Taken::Inserted);
            assert!(written(first.id).await);

            // Past the pace: the place and the unit are taken, the record is the caller's to
            // write (with its notice).
            let second = job();
            let Taken::Paced(wait) = take_in(&second).await.unwrap() else {
                panic!("the second job within a second waits for its turn");
            };
            assert!(
                wait > Duration::from_millis(500) && wait <= Duration::from_secs(1),
                "{wait:?}"
            );
            assert!(!written(second.id).await);
            assert_eq!(store.fair.pending(&alice).await.unwrap(), (2, 2));

            // At the cap: nothing taken or written.
            let third = job();
            assert_eq!(
                take_in(&third).await.unwrap(),
                Taken::Full(crate::fair::Reservation::UserFull { pending: 2 })
            );
            assert!(!written(third.id).await);
            assert_eq!(store.fair.pending(&alice).await.unwrap(), (2, 2));

            // The month's spend reaches the blocking budget: refused before the backlog is
            // even asked, nothing taken or written.
            let mut connection = store.connection.clone();
            redis::cmd("HSET")
                .arg(keys.costs(&Month::of(Utc::now()).to_string()))
                .arg("total")
                .arg(1_000)
                .query_async::<()>(&mut connection)
                .await
                .unwrap();
            let fourth = job();
            assert_eq!(
                take_in(&fourth).await.unwrap(),
                Taken::Exhausted { spent: 1_000 }
            );
            assert!(!written(fourth.id).await);
            assert_eq!(store.fair.pending(&alice).await.unwrap(), (2, 2));
        })
        .await;
    }

    /// Real Redis (the suite's), under this test's own prefix.
    #[tokio::test]
    async fn reading_a_job_claims_its_run_for_one_run_at_a_time_and_never_for_an_ended_job() {
        with_redis(|keys| async move {
            let store = store(&keys).await;
            let until = Utc::now() + chrono::Duration::seconds(60);
            let nothing = store.get_and_claim(JobId::new(), "w1.a", until, true);
            assert!(nothing.await.unwrap().is_none(), "no job, no claim");

            let job = pending_job(&store, "alice").await;
            store
                .heartbeat("w1", Duration::from_secs(30))
                .await
                .unwrap();
            let (read, claim) = read_and_claim(&store, job.id, "w1.a", true).await;
            assert_eq!(
                (read.id, read.prompt.as_str()),
                (job.id, "a lighthouse at dawn")
            );
            assert_eq!(claim, Claim::Taken);

            // A second run of the job (a redelivered copy) waits for the first one's lease.
            let (_, second) = read_and_claim(&store, job.id, "w1.b", true).await;
            assert!(
                matches!(second, Claim::HeldUntil(at) if at > Utc::now()),
                "{second:?}"
            );
            // A message that is not due yet reads the job without claiming anything.
            let (_, unasked) = read_and_claim(&store, job.id, "w1.b", false).await;
            assert_eq!(unasked, Claim::NotTried);

            // Once the first run lets go, the second takes the job.
            store.release_run(job.id, "w1.a").await.unwrap();
            let (_, second) = read_and_claim(&store, job.id, "w1.b", true).await;
            assert_eq!(second, Claim::Taken);

            // A job that ended is read, and no run claims it.
            store.release_run(job.id, "w1.b").await.unwrap();
            let ended = JobUpdate::status(JobStatus::Canceled);
            store.update(job.id, Guard::Active, &ended).await.unwrap();
            let (read, claim) = read_and_claim(&store, job.id, "w1.c", true).await;
            assert_eq!((read.status, claim), (JobStatus::Canceled, Claim::NotTried));
            let mut connection = store.connection.clone();
            let leased: Option<f64> = redis::cmd("ZSCORE")
                .arg(keys.leases())
                .arg(job.id.to_string())
                .query_async(&mut connection)
                .await
                .unwrap();
            assert_eq!(leased, None, "an ended job holds no lease");
        })
        .await;
    }
}
