//! Every Redis key and channel name Pictor uses, built in one place with the configured prefix.
//!
//! Nothing else formats a key. That keeps the key families documented (below), lets one Redis
//! host several deployments or parallel tests side by side, and lets a clean-up delete exactly
//! `prefix*` without touching anything else.
//!
//! | key                              | type    | what                                         |
//! |----------------------------------|---------|----------------------------------------------|
//! | `{p}job:{id}`                    | hash    | one job's state (TTL: jobs.ttl_secs); `runner`: the run holding its lease |
//! | `{p}user:{user}:jobs`            | zset    | a user's job ids, lexicographic = time order  |
//! | `{p}idem:{user}:{sha256(key)}`   | string  | `job_id fingerprint` for an Idempotency-Key   |
//! | `{p}withdrawn`                   | zset    | jobs answered `503` whose message the broker may hold, by when (ms); kept the job TTL |
//! | `{p}events`                      | channel | `{"job_id","status","version"}` per change    |
//! | `{p}ratelimit:{name}`            | string  | a GCRA bucket's TAT in µs (PX: until full)    |
//! | `{p}breaker:{provider}:failures` | string  | failures in the current window (PX: window)   |
//! | `{p}breaker:{provider}:open`     | string  | present while open (PX: cooldown)             |
//! | `{p}breaker:{provider}:tripped`  | string  | from opening to a success (PX: 1 day)         |
//! | `{p}breaker:{provider}:probe`    | string  | the one probe in flight (PX: probe_timeout)   |
//! | `{p}leases`                      | zset    | running job ids by lease expiry (ms), watchdog |
//! | `{p}alive:{worker}`              | string  | a worker process's heartbeat (PX: 10 s)       |
//! | `{p}ledger:{YYYY-MM}`            | stream  | one entry per billed call (durable, no TTL)   |
//! | `{p}costs:{YYYY-MM}`             | hash    | the month's aggregates (see `ledger`)         |
//! | `{p}budget:{YYYY-MM}`            | hash    | `reserved` and `hold:{id}` amounts            |
//! | `{p}budget:{YYYY-MM}:holds`      | zset    | hold ids by expiry (ms)                       |
//! | `{p}budget:{YYYY-MM}:alerted:{n}`| string  | threshold n% already announced this month     |
//! | `{p}budget-events`               | stream  | budget thresholds crossed, for the scheduler  |
//! | `{p}stats:day:{YYYY-MM-DD}`      | hash    | job counts and durations of a UTC day (400 d) |
//! | `{p}stats:minute:{…THH:MM}`      | hash    | the same per minute, for health alerts (2 h)  |
//! | `{p}watchdog:lock`               | string  | the worker running the watchdog this round    |
//! | `{p}image-expiry`                | zset    | job ids by when their images go (ms, Redis time) |
//! | `{p}image-usage`                 | hash    | `bytes`, `objects`, `measured_at` of the store |
//! | `{p}image-sweep:lock`            | string  | the worker sweeping expired images this round |
//! | `{p}image-measure:lock`          | string  | present for the interval after a measurement  |
//! | `{p}sched:fence`                 | string  | scheduler fencing tokens (INCR), never reset  |
//! | `{p}sched:lock:{job}:{period}`   | string  | the token of the replica running it (PX)      |
//! | `{p}sched:done:{job}:{period}`   | string  | the run happened (TTL: the job's catch-up)    |
//! | `{p}sched:last:{job}`            | string  | latest period done, where catch-up resumes    |
//! | `{p}sched:budget-events:last`    | string  | last `budget-events` id the scheduler read    |
//! | `{p}sched:budget-sent:{YYYY-MM}:{alert}` | string | budget alert delivered (80, 100, projected) |
//! | `{p}sched:health:{alert}`        | hash    | an alert's state: `pending`, `since`, `last_sent`, `seen` |
//! | `{p}sched:samples:{name}`        | zset    | a figure sampled each minute (`ms:value` by ms), last 30 min |
//! | `{p}sched:delivery`              | string  | JSON: the channels a scheduler delivers through (PX: 4 ticks) |

//!
//! **Redis Cluster.** A script or transaction may only touch keys of one slot there. Pictor's
//! scripts tie a job to the month's ledger, the backlog to every user's queue, the scheduler's
//! lock to its fence, so a deployment's keys belong together: put a hash tag in the prefix
//! (`PICTOR_REDIS_PREFIX={pictor}:`) and every key above is in that tag's slot
//! ([`hash_tag`]; `docs/scaling.md`, "Redis Cluster"). The `{fair}` tag inside the backlog's
//! keys then counts for nothing, since Redis hashes the first tag of a key.

use crate::domain::{JobId, UserId};

/// The part of `key` Redis Cluster hashes to pick its slot: the text inside the first `{…}`
/// when it is not empty, or else the whole key.
pub fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.find('}')
                .filter(|close| *close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn job(&self, id: JobId) -> String {
        format!("{}job:{id}", self.prefix)
    }

    pub fn user_jobs(&self, user: &UserId) -> String {
        format!("{}user:{user}:jobs", self.prefix)
    }

    pub fn idempotency(&self, user: &UserId, key_digest: &str) -> String {
        format!("{}idem:{user}:{key_digest}", self.prefix)
    }

    /// The jobs the api withdrew after a publish the broker did not confirm (see
    /// `JobStore::withdraw`): a worker never recreates one of them from its message.
    pub fn withdrawn(&self) -> String {
        format!("{}withdrawn", self.prefix)
    }

    pub fn events_channel(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// The theoretical arrival time of the rate-limit bucket `name` (see `ratelimit`).
    pub fn rate_limit(&self, name: &str) -> String {
        format!("{}ratelimit:{name}", self.prefix)
    }

    /// One part (`failures`, `open`, `tripped` or `probe`) of the circuit breaker that guards
    /// `provider` (see `breaker`).
    pub fn breaker(&self, provider: &str, part: &str) -> String {
        format!("{}breaker:{provider}:{part}", self.prefix)
    }

    /// A worker process's heartbeat; `worker_alive("")` is the prefix of them all.
    pub fn worker_alive(&self, worker: &str) -> String {
        format!("{}alive:{worker}", self.prefix)
    }

    pub fn leases(&self) -> String {
        format!("{}leases", self.prefix)
    }

    pub fn ledger(&self, month: &str) -> String {
        format!("{}ledger:{month}", self.prefix)
    }

    pub fn costs(&self, month: &str) -> String {
        format!("{}costs:{month}", self.prefix)
    }

    pub fn budget(&self, month: &str) -> String {
        format!("{}budget:{month}", self.prefix)
    }

    pub fn budget_holds(&self, month: &str) -> String {
        format!("{}budget:{month}:holds", self.prefix)
    }

    /// The marker that threshold `percent` was announced (`percent` empty: the prefix of them).
    pub fn budget_alerted(&self, month: &str, percent: &str) -> String {
        format!("{}budget:{month}:alerted:{percent}", self.prefix)
    }

    pub fn budget_events(&self) -> String {
        format!("{}budget-events", self.prefix)
    }

    pub fn stats_day(&self, date: &str) -> String {
        format!("{}stats:day:{date}", self.prefix)
    }

    pub fn stats_minute(&self, minute: &str) -> String {
        format!("{}stats:minute:{minute}", self.prefix)
    }

    pub fn watchdog_lock(&self) -> String {
        format!("{}watchdog:lock", self.prefix)
    }

    /// Job ids by the time (Unix ms, Redis's clock) their images are to be deleted.
    pub fn image_expiry(&self) -> String {
        format!("{}image-expiry", self.prefix)
    }

    /// The image store's measured size, plus the uploads counted since the measurement.
    pub fn image_usage(&self) -> String {
        format!("{}image-usage", self.prefix)
    }

    pub fn image_sweep_lock(&self) -> String {
        format!("{}image-sweep:lock", self.prefix)
    }

    /// Taken for one measurement interval by the worker that measures the store.
    pub fn image_measure_lock(&self) -> String {
        format!("{}image-measure:lock", self.prefix)
    }

    /// The pending jobs of `user` (sorted set scored by acceptance). Every key of the fair
    /// backlog carries the `{fair}` hash tag, so one script may touch any of them in a cluster.
    pub fn fair_pending(&self, user: &str) -> String {
        format!("{}{{fair}}:pending:{user}", self.prefix)
    }

    /// Users with pending jobs, scored by how many.
    pub fn fair_users(&self) -> String {
        format!("{}{{fair}}:users", self.prefix)
    }

    /// Jobs pending in the whole fleet.
    pub fn fair_total(&self) -> String {
        format!("{}{{fair}}:total", self.prefix)
    }

    /// The fleet's recent completion rate.
    pub fn fair_rate(&self) -> String {
        format!("{}{{fair}}:rate", self.prefix)
    }

    /// Users who asked for `group` (a provider model) lately.
    pub fn fair_wanting(&self, group: &str) -> String {
        format!("{}{{fair}}:wanting:{group}", self.prefix)
    }

    /// What each user was served of `group`.
    pub fn fair_served(&self, group: &str) -> String {
        format!("{}{{fair}}:served:{group}", self.prefix)
    }

    /// Calls granted per user in `minute` (`YYYYmmddHHMM`).
    pub fn fair_grants(&self, minute: &str) -> String {
        format!("{}{{fair}}:grants:{minute}", self.prefix)
    }

    /// A provider model's rate-limit bucket, beside the gate that shares it.
    pub fn fair_bucket(&self, name: &str) -> String {
        format!("{}{{fair}}:bucket:{name}", self.prefix)
    }

    /// The scheduler's fencing-token counter: every run attempt takes the next number.
    pub fn scheduler_fence(&self) -> String {
        format!("{}sched:fence", self.prefix)
    }

    /// Held (with a fencing token) by the scheduler replica running `job` for `period`.
    pub fn scheduler_lock(&self, job: &str, period: &str) -> String {
        format!("{}sched:lock:{job}:{period}", self.prefix)
    }

    /// Present once `job` has run for `period`.
    pub fn scheduler_done(&self, job: &str, period: &str) -> String {
        format!("{}sched:done:{job}:{period}", self.prefix)
    }

    /// The latest period of `job` that is done.
    pub fn scheduler_last(&self, job: &str) -> String {
        format!("{}sched:last:{job}", self.prefix)
    }

    /// The id of the last budget event the scheduler has read.
    pub fn scheduler_budget_cursor(&self) -> String {
        format!("{}sched:budget-events:last", self.prefix)
    }

    /// The marker that budget alert `alert` (a threshold percentage, or `projected`) of `month`
    /// was delivered, whoever raised it.
    pub fn scheduler_budget_sent(&self, month: &str, alert: &str) -> String {
        format!("{}sched:budget-sent:{month}:{alert}", self.prefix)
    }

    /// The state of a firing health alert.
    pub fn scheduler_health(&self, alert: &str) -> String {
        format!("{}sched:health:{alert}", self.prefix)
    }

    /// A figure the scheduler samples every minute to judge its trend (the backlog).
    pub fn scheduler_samples(&self, name: &str) -> String {
        format!("{}sched:samples:{name}", self.prefix)
    }

    /// Where the scheduler delivers (`delivery::DeliveryStatus`), for the dashboard.
    pub fn scheduler_delivery(&self) -> String {
        format!("{}sched:delivery", self.prefix)
    }

    /// A SCAN pattern matching every key of this deployment (prefix glob characters escaped).
    pub fn everything_pattern(&self) -> String {
        let mut escaped = String::with_capacity(self.prefix.len() + 1);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        escaped.push('*');
        escaped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_a_hash_tag_in_the_prefix_every_key_is_in_the_tags_slot() {
        let keys = Keys::new("{dep}:");
        let user = UserId::parse("alice").unwrap();
        let job = JobId::new();
        let every_key = [
            keys.job(job),
            keys.user_jobs(&user),
            keys.idempotency(&user, "abc"),
            keys.withdrawn(),
            keys.rate_limit("openai:gpt-image-2:rpm"),
            keys.breaker("openai", "open"),
            keys.leases(),
            keys.worker_alive("w1"),
            keys.ledger("2026-12"),
            keys.costs("2026-12"),
            keys.budget("2026-12"),
            keys.budget_holds("2026-12"),
            keys.budget_alerted("2026-12", "80"),
            keys.budget_events(),
            keys.stats_day("2026-12-06"),
            keys.stats_minute("2026-12-06T10:00"),
            keys.watchdog_lock(),
            keys.image_expiry(),
            keys.image_usage(),
            keys.image_sweep_lock(),
            keys.image_measure_lock(),
            keys.fair_pending("alice"),
            keys.fair_users(),
            keys.fair_total(),
            keys.fair_rate(),
            keys.fair_wanting("openai:gpt-image-2"),
            keys.fair_served("openai:gpt-image-2"),
            keys.fair_grants("10:00"),
            keys.fair_bucket("openai:gpt-image-2:ipm"),
            keys.scheduler_fence(),
            keys.scheduler_lock("daily-report", "2026-12-05"),
            keys.scheduler_done("daily-report", "2026-12-05"),
            keys.scheduler_last("daily-report"),
            keys.scheduler_budget_cursor(),
            keys.scheduler_budget_sent("2026-12", "80"),
            keys.scheduler_health("error-rate"),
            keys.scheduler_delivery(),
        ];
        for key in &every_key {
            assert_eq!(hash_tag(key), "dep", "{key}");
        }
        // Without a tag in the prefix, only the backlog's keys share one.
        assert_eq!(hash_tag(&Keys::new("p:").fair_users()), "fair");
        assert_eq!(hash_tag("p:job:1"), "p:job:1");
        assert_eq!(
            hash_tag("p:{}:x{y}"),
            "p:{}:x{y}",
            "an empty first tag is no tag"
        );
    }

    #[test]
    fn keys_carry_the_prefix() {
        let keys = Keys::new("t1:");
        let user = UserId::parse("alice").unwrap();
        assert_eq!(keys.user_jobs(&user), "t1:user:alice:jobs");
        assert_eq!(keys.events_channel(), "t1:events");
        assert_eq!(Keys::new("a*b:").everything_pattern(), "a\\*b:*");
    }
}
