//! Job state in Redis: one hash per job, a per-user index, idempotency keys and change events.
//!
//! Every state change after creation goes through one Lua script ([`UPDATE_SCRIPT`]) so that it
//! is atomic with its guard ("only while the job is not terminal"), its version bump, its TTL
//! refresh and its `PUBLISH` to the events channel. That single path is what makes "a result is
//! written once" and "SSE sees every change" true with many workers and api replicas.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use crate::config::RedisSettings;
use crate::domain::{
    Clarification, ImageSize, InputImage, Intent, JobId, JobStatus, Notice, StoredImage, Usage,
    UserError, UserId,
};
use crate::keys::Keys;

/// How long a job hash lives before the broker has confirmed its message. A process that dies
/// between the Redis write and the confirm leaves nothing that outlives this.
pub const PENDING_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis is unavailable: {0}")]
    Unavailable(#[from] redis::RedisError),
    #[error("job {id} has a malformed field {field}")]
    Corrupt { id: String, field: &'static str },
}

/// A job as stored. Field names match the hash fields one to one.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub user: UserId,
    pub status: JobStatus,
    pub prompt: String,
    pub size: ImageSize,
    pub n: u32,
    pub input_image: Option<InputImage>,
    pub intent: Option<Intent>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub attempts: u32,
    pub notices: Vec<Notice>,
    pub images: Vec<StoredImage>,
    pub error: Option<UserError>,
    /// Technical detail of a failure, for logs and ops; never shown to the user.
    pub error_detail: Option<String>,
    pub clarification: Option<Clarification>,
    pub usage: Vec<Usage>,
    pub cost_micros: i64,
    pub accepted: bool,
    /// The agent to run next when the job (re)starts; none means the entry agent. Set on
    /// handoff, so a deferred or redelivered job resumes where it was instead of paying for the
    /// router again, and by a clarification.
    pub next_agent: Option<String>,
    /// The prompt handed to `next_agent` (the router's cleaned prompt).
    pub agent_prompt: Option<String>,
    /// Provider attempts already made in the current step, kept across deferrals.
    pub step_attempts: u32,
    /// How often the watchdog has requeued this job.
    pub requeues: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: u64,
}

impl JobRecord {
    /// A freshly accepted job, not yet confirmed by the broker.
    pub fn new(
        id: JobId,
        user: UserId,
        prompt: String,
        size: ImageSize,
        n: u32,
        input_image: Option<InputImage>,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            id,
            user,
            status: JobStatus::Queued,
            prompt,
            size,
            n,
            input_image,
            intent: None,
            provider: None,
            model: None,
            attempts: 0,
            notices: Vec::new(),
            images: Vec::new(),
            error: None,
            error_detail: None,
            clarification: None,
            usage: Vec::new(),
            cost_micros: 0,
            accepted: false,
            next_agent: None,
            agent_prompt: None,
            step_attempts: 0,
            requeues: 0,
            created_at: now,
            updated_at: now,
            version: 0,
        }
    }

    fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("id", self.id.to_string()),
            ("user", self.user.to_string()),
            ("status", self.status.as_str().to_string()),
            ("prompt", self.prompt.clone()),
            ("size", self.size.as_str().to_string()),
            ("n", self.n.to_string()),
            ("attempts", self.attempts.to_string()),
            ("notices", json(&self.notices)),
            ("images", json(&self.images)),
            ("usage", json(&self.usage)),
            ("cost_micros", self.cost_micros.to_string()),
            ("accepted", u8::from(self.accepted).to_string()),
            ("created_at", self.created_at.to_rfc3339()),
            ("updated_at", self.updated_at.to_rfc3339()),
            ("version", self.version.to_string()),
        ];
        if let Some(image) = &self.input_image {
            fields.push(("input_image", json(image)));
        }
        if let Some(agent) = &self.next_agent {
            fields.push(("next_agent", agent.clone()));
        }
        if let Some(prompt) = &self.agent_prompt {
            fields.push(("agent_prompt", prompt.clone()));
        }
        fields.push(("step_attempts", self.step_attempts.to_string()));
        fields.push(("requeues", self.requeues.to_string()));
        fields
    }

    fn from_fields(mut map: HashMap<String, String>) -> Result<Self, StoreError> {
        let id_text = map.get("id").cloned().unwrap_or_default();
        let corrupt = |field| StoreError::Corrupt {
            id: id_text.clone(),
            field,
        };
        let mut take = |field: &'static str| map.remove(field);
        let id = take("id")
            .as_deref()
            .and_then(JobId::parse)
            .ok_or_else(|| corrupt("id"))?;
        let user = take("user")
            .and_then(|u| UserId::parse(&u).ok())
            .ok_or_else(|| corrupt("user"))?;
        let status = take("status")
            .as_deref()
            .and_then(JobStatus::parse)
            .ok_or_else(|| corrupt("status"))?;
        let size = take("size")
            .as_deref()
            .and_then(ImageSize::parse)
            .ok_or_else(|| corrupt("size"))?;
        let time = |raw: Option<String>, field| {
            raw.and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc))
                .ok_or_else(|| corrupt(field))
        };
        let created_at = time(take("created_at"), "created_at")?;
        let updated_at = time(take("updated_at"), "updated_at")?;
        fn parse_json<T: for<'de> Deserialize<'de>>(raw: Option<String>) -> Option<Option<T>> {
            match raw.as_deref() {
                None | Some("") => Some(None),
                Some(text) => serde_json::from_str(text).ok().map(Some),
            }
        }
        macro_rules! json_field {
            ($name:literal) => {
                parse_json(take($name)).ok_or_else(|| corrupt($name))?
            };
        }
        let input_image: Option<InputImage> = json_field!("input_image");
        let notices: Option<Vec<Notice>> = json_field!("notices");
        let images: Option<Vec<StoredImage>> = json_field!("images");
        let usage: Option<Vec<Usage>> = json_field!("usage");
        let error: Option<UserError> = json_field!("error");
        let clarification: Option<Clarification> = json_field!("clarification");
        let intent: Option<Intent> = json_field!("intent");
        let number = |raw: Option<String>| raw.and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        Ok(Self {
            id,
            user,
            status,
            prompt: take("prompt").unwrap_or_default(),
            size,
            n: u32::try_from(number(take("n"))).unwrap_or(1),
            input_image,
            intent,
            provider: take("provider").filter(|v| !v.is_empty()),
            model: take("model").filter(|v| !v.is_empty()),
            attempts: u32::try_from(number(take("attempts"))).unwrap_or(0),
            notices: notices.unwrap_or_default(),
            images: images.unwrap_or_default(),
            error,
            error_detail: take("error_detail").filter(|v| !v.is_empty()),
            clarification,
            usage: usage.unwrap_or_default(),
            cost_micros: number(take("cost_micros")),
            accepted: take("accepted").as_deref() == Some("1"),
            next_agent: take("next_agent").filter(|v| !v.is_empty()),
            agent_prompt: take("agent_prompt").filter(|v| !v.is_empty()),
            step_attempts: u32::try_from(number(take("step_attempts"))).unwrap_or(0),
            requeues: u32::try_from(number(take("requeues"))).unwrap_or(0),
            created_at,
            updated_at,
            version: u64::try_from(number(take("version"))).unwrap_or(0),
        })
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_string())
}

/// A change to a job, applied atomically by [`JobStore::update`].
#[derive(Debug, Default, Clone)]
pub struct JobUpdate {
    pub status: Option<JobStatus>,
    pub intent: Option<Intent>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub images: Option<Vec<StoredImage>>,
    pub error: Option<UserError>,
    pub error_detail: Option<String>,
    pub clarification: Option<Clarification>,
    pub add_notices: Vec<Notice>,
    pub add_usage: Vec<Usage>,
    pub add_attempts: u32,
    pub add_cost_micros: i64,
    /// Marks the job accepted (the worker does this too, in case the api could not).
    pub accept: bool,
    pub input_image: Option<InputImage>,
    /// `Some(None)` clears the field.
    pub next_agent: Option<Option<String>>,
    pub agent_prompt: Option<Option<String>>,
    pub step_attempts: Option<u32>,
    pub requeues: Option<u32>,
    /// Removes the clarification (when the user answered it).
    pub clear_clarification: bool,
    /// Removes a previous error (when ops replay a dead-lettered job).
    pub clear_error: bool,
}

impl JobUpdate {
    pub fn status(status: JobStatus) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }

    /// This update followed by `later`, as one: what applying both in turn would leave on the
    /// job (later values win, lists and counters add up), with one version bump and one event.
    #[must_use]
    pub fn then(self, later: JobUpdate) -> JobUpdate {
        // Destructured, so a new field cannot be forgotten here.
        let JobUpdate {
            status,
            intent,
            provider,
            model,
            prompt,
            images,
            error,
            error_detail,
            clarification,
            mut add_notices,
            mut add_usage,
            add_attempts,
            add_cost_micros,
            accept,
            input_image,
            next_agent,
            agent_prompt,
            step_attempts,
            requeues,
            clear_clarification,
            clear_error,
        } = later;
        let mut notices = self.add_notices;
        notices.append(&mut add_notices);
        let mut usage = self.add_usage;
        usage.append(&mut add_usage);
        // A later clear wipes what came before it; a later value undoes an earlier clear.
        let (clarification, clear_clarification) = if clear_clarification {
            (clarification, true)
        } else {
            match clarification {
                Some(value) => (Some(value), false),
                None => (self.clarification, self.clear_clarification),
            }
        };
        let (error, error_detail, clear_error) = if clear_error {
            (error, error_detail, true)
        } else if error.is_some() || error_detail.is_some() {
            (
                error.or(self.error),
                error_detail.or(self.error_detail),
                false,
            )
        } else {
            (self.error, self.error_detail, self.clear_error)
        };
        JobUpdate {
            status: status.or(self.status),
            intent: intent.or(self.intent),
            provider: provider.or(self.provider),
            model: model.or(self.model),
            prompt: prompt.or(self.prompt),
            images: images.or(self.images),
            error,
            error_detail,
            clarification,
            add_notices: notices,
            add_usage: usage,
            add_attempts: self.add_attempts + add_attempts,
            add_cost_micros: self.add_cost_micros + add_cost_micros,
            accept: self.accept || accept,
            input_image: input_image.or(self.input_image),
            next_agent: next_agent.or(self.next_agent),
            agent_prompt: agent_prompt.or(self.agent_prompt),
            step_attempts: step_attempts.or(self.step_attempts),
            requeues: requeues.or(self.requeues),
            clear_clarification,
            clear_error,
        }
    }

    fn fields(&self, now: DateTime<Utc>) -> HashMap<&'static str, String> {
        let mut fields = HashMap::new();
        fields.insert("updated_at", now.to_rfc3339());
        if let Some(status) = self.status {
            fields.insert("status", status.as_str().to_string());
        }
        if self.accept {
            fields.insert("accepted", "1".to_string());
        }
        if let Some(intent) = self.intent {
            fields.insert("intent", json(&intent));
        }
        if let Some(provider) = &self.provider {
            fields.insert("provider", provider.clone());
        }
        if let Some(model) = &self.model {
            fields.insert("model", model.clone());
        }
        if let Some(prompt) = &self.prompt {
            fields.insert("prompt", prompt.clone());
        }
        if let Some(images) = &self.images {
            fields.insert("images", json(images));
        }
        if let Some(error) = &self.error {
            fields.insert("error", json(error));
        }
        if let Some(detail) = &self.error_detail {
            fields.insert("error_detail", detail.clone());
        }
        if let Some(clarification) = &self.clarification {
            fields.insert("clarification", json(clarification));
        }
        if self.clear_clarification {
            fields.insert("clarification", String::new());
        }
        if self.clear_error {
            fields.insert("error", String::new());
            fields.insert("error_detail", String::new());
        }
        if let Some(image) = &self.input_image {
            fields.insert("input_image", json(image));
        }
        if let Some(agent) = &self.next_agent {
            fields.insert("next_agent", agent.clone().unwrap_or_default());
        }
        if let Some(prompt) = &self.agent_prompt {
            fields.insert("agent_prompt", prompt.clone().unwrap_or_default());
        }
        if let Some(attempts) = self.step_attempts {
            fields.insert("step_attempts", attempts.to_string());
        }
        if let Some(requeues) = self.requeues {
            fields.insert("requeues", requeues.to_string());
        }
        fields
    }
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

/// The Lua script behind [`JobStore::update`]. Arguments are documented inline.
pub const UPDATE_SCRIPT: &str = r#"
-- KEYS[1] job hash
-- ARGV[1] events channel, ARGV[2] guard, ARGV[3] ttl seconds, ARGV[4] fields (JSON object),
-- ARGV[5] notices to append (JSON array), ARGV[6] usage to append (JSON array),
-- ARGV[7] attempts increment, ARGV[8] cost increment (micro-dollars)
local key = KEYS[1]
local status = redis.call('HGET', key, 'status')
if not status then return false end
local terminal = {succeeded = true, failed = true, needs_clarification = true, canceled = true}
if ARGV[2] == 'active' and terminal[status] then return {status, -1} end
if string.sub(ARGV[2], 1, 3) == 'is:' and string.sub(ARGV[2], 4) ~= status then return {status, -1} end
for field, value in pairs(cjson.decode(ARGV[4])) do
  redis.call('HSET', key, field, value)
end
local function append(field, extra_json)
  local extra = cjson.decode(extra_json)
  if #extra == 0 then return end
  local current = cjson.decode(redis.call('HGET', key, field) or '[]')
  for _, item in ipairs(extra) do table.insert(current, item) end
  redis.call('HSET', key, field, cjson.encode(current))
end
append('notices', ARGV[5])
append('usage', ARGV[6])
if tonumber(ARGV[7]) ~= 0 then redis.call('HINCRBY', key, 'attempts', ARGV[7]) end
if tonumber(ARGV[8]) ~= 0 then redis.call('HINCRBY', key, 'cost_micros', ARGV[8]) end
local version = redis.call('HINCRBY', key, 'version', 1)
redis.call('EXPIRE', key, ARGV[3])
local id = redis.call('HGET', key, 'id')
local new_status = redis.call('HGET', key, 'status')
redis.call('PUBLISH', ARGV[1], cjson.encode({job_id = id, status = new_status, version = version}))
return {status, version}
"#;

/// Job state in Redis. Cheap to clone: it wraps one auto-reconnecting multiplexed connection.
#[derive(Clone)]
pub struct JobStore {
    connection: ConnectionManager,
    client: redis::Client,
    keys: Keys,
    ttl: Duration,
    update_script: redis::Script,
}

impl JobStore {
    pub async fn connect(settings: &RedisSettings, ttl: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(settings.url.expose_secret())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let mut connection = client.get_connection_manager_with_config(config).await?;
        warn_if_redis_evicts(&mut connection).await;
        Ok(Self {
            connection,
            client,
            keys: Keys::new(settings.prefix.clone()),
            ttl,
            update_script: redis::Script::new(UPDATE_SCRIPT),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The underlying client, for the few callers that need a dedicated connection (pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
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
        let key = self.keys.job(job.id);
        let index = self.keys.user_jobs(&job.user);
        let oldest_kept = JobId::floor_at(job.created_at - chrono_ttl(self.ttl));
        let mut connection = self.connection.clone();
        redis::pipe()
            .atomic()
            .hset_multiple(&key, &job.to_fields())
            .ignore()
            .expire(&key, PENDING_TTL.as_secs() as i64)
            .ignore()
            .zadd(&index, job.id.to_string(), 0)
            .ignore()
            .zrembylex(&index, "-", format!("({oldest_kept}"))
            .ignore()
            .expire(&index, self.ttl.as_secs() as i64)
            .ignore()
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }

    /// The broker confirmed the job's message: keep it for the full TTL.
    pub async fn mark_accepted(&self, id: JobId) -> Result<(), StoreError> {
        let key = self.keys.job(id);
        let mut connection = self.connection.clone();
        redis::pipe()
            .atomic()
            .hset(&key, "accepted", "1")
            .ignore()
            .expire(&key, self.ttl.as_secs() as i64)
            .ignore()
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
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
        let mut connection = self.connection.clone();
        let guard = match guard {
            Guard::Active => "active".to_string(),
            Guard::Status(status) => format!("is:{}", status.as_str()),
        };
        let result: Option<(String, i64)> = self
            .update_script
            .key(self.keys.job(id))
            .arg(self.keys.events_channel())
            .arg(guard)
            .arg(self.ttl.as_secs())
            .arg(json(&update.fields(Utc::now())))
            .arg(json(&update.add_notices))
            .arg(json(&update.add_usage))
            .arg(update.add_attempts)
            .arg(update.add_cost_micros)
            .invoke_async(&mut connection)
            .await?;
        let Some((previous, version)) = result else {
            return Ok(UpdateOutcome::Missing);
        };
        let previous = JobStatus::parse(&previous).ok_or(StoreError::Corrupt {
            id: id.to_string(),
            field: "status",
        })?;
        Ok(match u64::try_from(version) {
            Ok(version) => UpdateOutcome::Applied { previous, version },
            Err(_) => UpdateOutcome::Refused(previous),
        })
    }

    /// Records that `id` is running and should show progress before `until` (the watchdog's
    /// deadline).
    pub async fn set_lease(&self, id: JobId, until: DateTime<Utc>) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("ZADD")
            .arg(self.keys.leases())
            .arg(until.timestamp_millis())
            .arg(id.to_string())
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
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
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .arg("NX")
            .arg("EX")
            .arg(IDEMPOTENCY_TTL.as_secs())
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

    /// Frees an idempotency key whose job was never accepted.
    pub async fn release_idempotency(
        &self,
        user: &UserId,
        key_digest: &str,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("DEL")
            .arg(self.keys.idempotency(user, key_digest))
            .query_async::<()>(&mut connection)
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

fn chrono_ttl(ttl: Duration) -> chrono::Duration {
    chrono::Duration::from_std(ttl).unwrap_or_else(|_| chrono::Duration::days(7))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_round_trip_through_hash_fields() {
        let mut job = JobRecord::new(
            JobId::new(),
            UserId::parse("alice").unwrap(),
            "a red fox".into(),
            ImageSize::Portrait,
            2,
            Some(InputImage {
                mime_type: crate::domain::ImageMime::Jpeg,
                bytes_len: 10,
            }),
            Utc::now(),
        );
        job.accepted = true;
        let map = job
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let back = JobRecord::from_fields(map).unwrap();
        // RFC 3339 keeps sub-second precision, so the whole record compares equal.
        assert_eq!(back, job);
    }

    /// The hash fields `updates` leave, written one after another.
    fn written_in_turn(
        updates: &[&JobUpdate],
        now: DateTime<Utc>,
    ) -> HashMap<&'static str, String> {
        let mut fields = HashMap::new();
        for update in updates {
            fields.extend(update.fields(now));
        }
        fields
    }

    fn clarification(question: &str) -> Clarification {
        Clarification {
            question: question.to_string(),
            options: vec!["create".to_string(), "edit".to_string()],
        }
    }

    #[test]
    fn a_handoff_then_a_provider_call_writes_what_the_two_writes_would() {
        let handoff = JobUpdate {
            intent: Some(Intent::Create),
            next_agent: Some(Some("create".to_string())),
            agent_prompt: Some(Some("a fox, watercolour".to_string())),
            step_attempts: Some(0),
            ..JobUpdate::default()
        };
        let call = JobUpdate {
            status: Some(JobStatus::Running),
            provider: Some("openai".to_string()),
            model: Some("gpt-image-1".to_string()),
            add_attempts: 1,
            step_attempts: Some(1),
            ..JobUpdate::default()
        };
        let now = Utc::now();
        let merged = handoff.clone().then(call.clone());
        assert_eq!(merged.fields(now), written_in_turn(&[&handoff, &call], now));
        assert_eq!(merged.add_attempts, 1);
        assert_eq!(merged.step_attempts, Some(1), "the later count wins");
    }

    #[test]
    fn notices_usage_and_counters_add_up_in_order() {
        let first = JobUpdate {
            add_notices: vec![Notice::now(
                crate::codes::NoticeKind::FallbackProvider,
                "Gemini is down",
            )],
            add_attempts: 2,
            add_cost_micros: 40_000,
            accept: true,
            ..JobUpdate::default()
        };
        let second = JobUpdate {
            add_notices: vec![Notice::now(
                crate::codes::NoticeKind::Retrying,
                "Attempt 1 of 3",
            )],
            add_attempts: 1,
            add_cost_micros: 2_500,
            ..JobUpdate::default()
        };
        let merged = first.then(second);
        let codes: Vec<&str> = merged.add_notices.iter().map(|n| n.code.as_str()).collect();
        assert_eq!(codes, ["fallback_provider", "retrying"]);
        assert_eq!(merged.add_attempts, 3);
        assert_eq!(merged.add_cost_micros, 42_500);
        assert!(merged.accept, "an earlier accept is kept");
    }

    /// Merges `first` and `second` in both orders, checks that each merge writes what the two
    /// writes in turn would, and returns the fields of (first then second, second then first).
    fn merged_both_ways(
        first: &JobUpdate,
        second: &JobUpdate,
    ) -> (HashMap<&'static str, String>, HashMap<&'static str, String>) {
        let now = Utc::now();
        let forward = first.clone().then(second.clone()).fields(now);
        assert_eq!(forward, written_in_turn(&[first, second], now));
        let backward = second.clone().then(first.clone()).fields(now);
        assert_eq!(backward, written_in_turn(&[second, first], now));
        (forward, backward)
    }

    #[test]
    fn a_clear_and_a_value_keep_their_order_when_merged() {
        let asked = JobUpdate {
            clarification: Some(clarification("Create or edit?")),
            ..JobUpdate::default()
        };
        let answered = JobUpdate {
            clear_clarification: true,
            ..JobUpdate::default()
        };
        let (cleared, asked_again) = merged_both_ways(&asked, &answered);
        assert_eq!(cleared["clarification"], "");
        assert!(asked_again["clarification"].contains("Create or edit?"));

        let failed = JobUpdate {
            error: Some(UserError {
                code: "processing_failed".to_string(),
                message: "Please submit it again.".to_string(),
            }),
            error_detail: Some("stuck".to_string()),
            ..JobUpdate::default()
        };
        let replayed = JobUpdate {
            clear_error: true,
            ..JobUpdate::default()
        };
        let (cleared, failed_again) = merged_both_ways(&failed, &replayed);
        assert_eq!(cleared["error"], "");
        assert_eq!(cleared["error_detail"], "");
        assert!(failed_again["error"].contains("processing_failed"));
    }
}
