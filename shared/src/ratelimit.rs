//! A rate limiter shared by the whole fleet: every worker draws from the same buckets in Redis,
//! so a provider's quota (requests or tokens per minute) holds for all processes together rather
//! than for each one.
//!
//! The algorithm is GCRA (the generic cell rate algorithm), a token bucket stored as a single
//! number: the bucket's theoretical arrival time (TAT), the moment at which it is full again.
//! One Lua script ([`ACQUIRE_SCRIPT`]) reads the TAT, decides and writes it back, so two callers
//! can never both take the last unit. The script reads the clock with `redis.call('TIME')`, so
//! workers whose own clocks disagree still agree about every bucket, and it gives the key a
//! PEXPIRE that ends when the bucket is full again, so idle buckets vanish by themselves.

use std::time::Duration;

use crate::connection::RedisConnection;
use redis::{ErrorKind, RedisError};

use crate::keys::Keys;
use crate::script::Part;

const MICROS_PER_MINUTE: u64 = 60_000_000;

/// GCRA in one step. Times are microseconds of the Redis server's clock.
///
/// A bucket of `burst` units that refills one unit every `interval` is full when its TAT is not
/// after now. Taking `cost` units moves the TAT to `max(TAT, now) + cost * interval`; that is
/// allowed if the new TAT is at most `burst * interval` ahead of now, that is if the bucket held
/// `cost` units. Otherwise the caller may retry once enough units have refilled.
pub const ACQUIRE_SCRIPT: &str = r#"
-- KEYS[1] the bucket's TAT
-- ARGV[1] cost (units), ARGV[2] emission interval (microseconds per unit), ARGV[3] burst (units)
-- Returns {1, 0} when granted, {0, microseconds until the cost would fit} when denied.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local cost = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + cost * interval
local allowed_at = new_tat - burst * interval
if allowed_at > now then
  return {0, math.ceil(allowed_at - now)}
end
-- The key lives exactly as long as the bucket is not full; a full bucket needs no key.
local ttl_ms = math.ceil((new_tat - now) / 1000)
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl_ms))
return {1, 0}
"#;

/// [`SCHEDULE_SCRIPT`]'s text, also run as a step of the store's intake
/// (`crate::store::intake`).
macro_rules! schedule_body {
    () => {
        r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allowed_at = new_tat - burst * interval
local ttl_ms = math.ceil((new_tat - now) / 1000)
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl_ms))
if allowed_at > now then return math.ceil(allowed_at - now) end
return 0
"#
    };
}
pub(crate) use schedule_body;

/// GCRA as a schedule: always takes a unit and answers how long until the bucket would have
/// granted it (0 within the burst), so that callers past the rate are spaced at its pace
/// instead of refused. Same arguments as [`ACQUIRE_SCRIPT`] (the cost is always 1).
pub const SCHEDULE_SCRIPT: &str = schedule_body!();

/// Whether a caller may go ahead now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Granted,
    /// Nothing was taken; the same request would be granted after `retry_after` if nobody else
    /// takes units in the meantime.
    Denied {
        retry_after: Duration,
    },
}

/// Named GCRA buckets in Redis; one instance per process serves every bucket.
pub struct RateLimiter {
    connection: RedisConnection,
    keys: Keys,
    script: redis::Script,
    schedule: redis::Script,
}

impl RateLimiter {
    pub fn new(connection: RedisConnection, keys: Keys) -> Self {
        Self {
            connection,
            keys,
            script: redis::Script::new(ACQUIRE_SCRIPT),
            schedule: redis::Script::new(SCHEDULE_SCRIPT),
        }
    }

    /// Takes `cost` units from the bucket `name`, which refills at `per_minute` units per minute
    /// and holds at most `burst` units.
    ///
    /// The rate and burst are passed on every call rather than stored, so a configuration change
    /// applies at once; callers sharing a bucket must pass the same values. A `cost` above
    /// `burst` could never fit, so it is clamped to `burst`: such a request waits for a full
    /// bucket and then empties it. A `cost` of 0 is always granted. A `per_minute` or `burst` of
    /// 0 is a configuration error.
    pub async fn acquire(
        &self,
        name: &str,
        cost: u32,
        per_minute: u32,
        burst: u32,
    ) -> Result<Admission, RedisError> {
        if per_minute == 0 || burst == 0 {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "a rate limit needs a positive rate per minute and a positive burst",
            )));
        }
        let cost = cost.min(burst);
        if cost == 0 {
            return Ok(Admission::Granted);
        }
        // Rounded up, so that rounding never lets more than `per_minute` units through.
        let interval_micros = MICROS_PER_MINUTE.div_ceil(u64::from(per_minute));
        let mut connection = self.connection.clone();
        let (granted, retry_after_micros): (i64, i64) = self
            .script
            .key(self.keys.rate_limit(name))
            .arg(cost)
            .arg(interval_micros)
            .arg(burst)
            .invoke_async(&mut connection)
            .await?;
        Ok(if granted == 1 {
            Admission::Granted
        } else {
            Admission::Denied {
                retry_after: Duration::from_micros(u64::try_from(retry_after_micros).unwrap_or(0)),
            }
        })
    }
}

impl RateLimiter {
    /// Takes one unit of the bucket `name` (`per_minute`, `burst`) whatever its level, and
    /// answers how long the caller should wait to keep to the rate: zero within the burst, then
    /// one interval more for each unit taken past it.
    pub async fn schedule(
        &self,
        name: &str,
        per_minute: u32,
        burst: u32,
    ) -> Result<Duration, RedisError> {
        let mut connection = self.connection.clone();
        let wait_micros: i64 = self
            .schedule_part(name, per_minute, burst)?
            .invoke_async(&self.schedule, &mut connection)
            .await?;
        Ok(Duration::from_micros(
            u64::try_from(wait_micros).unwrap_or(0),
        ))
    }

    /// The keys and arguments of [`Self::schedule`], to run it alone or as a step of a
    /// composed script (whose reply is the wait in microseconds).
    pub fn schedule_part(
        &self,
        name: &str,
        per_minute: u32,
        burst: u32,
    ) -> Result<Part, RedisError> {
        if per_minute == 0 || burst == 0 {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "a rate limit needs a positive rate per minute and a positive burst",
            )));
        }
        let mut part = Part::default();
        part.key(self.keys.rate_limit(name))
            .arg(1)
            .arg(MICROS_PER_MINUTE.div_ceil(u64::from(per_minute)))
            .arg(burst);
        Ok(part)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::test_redis::{connect, with_redis};

    async fn limiter(keys: &Keys) -> RateLimiter {
        RateLimiter::new(connect().await, keys.clone())
    }

    fn retry_after(admission: Admission) -> Duration {
        match admission {
            Admission::Denied { retry_after } => retry_after,
            Admission::Granted => panic!("expected a denial, got a grant"),
        }
    }

    #[tokio::test]
    async fn a_schedule_spaces_the_units_past_the_burst_at_the_rate() {
        with_redis(|keys| async move {
            let limiter = limiter(&keys).await;
            let waits = {
                let mut waits = Vec::new();
                for _ in 0..5 {
                    waits.push(limiter.schedule("pace", 60, 2).await.unwrap());
                }
                waits
            };
            assert_eq!(waits[0], Duration::ZERO);
            assert_eq!(waits[1], Duration::ZERO);
            for (index, wait) in waits.iter().enumerate().skip(2) {
                let expected = Duration::from_secs(index as u64 - 1);
                assert!(
                    wait.abs_diff(expected) < Duration::from_millis(100),
                    "unit {index} waits {wait:?}, not {expected:?}"
                );
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_burst_is_granted_at_once_and_the_next_unit_waits_one_interval() {
        with_redis(|keys| async move {
            let limiter = limiter(&keys).await;
            for _ in 0..3 {
                assert_eq!(
                    limiter.acquire("openai", 1, 60, 3).await.unwrap(),
                    Admission::Granted
                );
            }
            let wait = retry_after(limiter.acquire("openai", 1, 60, 3).await.unwrap());
            assert!(
                wait > Duration::from_millis(500) && wait < Duration::from_millis(1500),
                "retry_after was {wait:?}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_denied_caller_is_granted_after_waiting_the_returned_retry_after() {
        with_redis(|keys| async move {
            let limiter = limiter(&keys).await;
            for _ in 0..2 {
                assert_eq!(
                    limiter.acquire("gemini", 1, 600, 2).await.unwrap(),
                    Admission::Granted
                );
            }
            let wait = retry_after(limiter.acquire("gemini", 1, 600, 2).await.unwrap());
            assert!(
                wait <= Duration::from_millis(100),
                "retry_after was {wait:?}"
            );
            tokio::time::sleep(wait).await;
            assert_eq!(
                limiter.acquire("gemini", 1, 600, 2).await.unwrap(),
                Admission::Granted
            );
        })
        .await;
    }

    #[tokio::test]
    async fn limiters_sharing_a_prefix_draw_from_the_same_bucket() {
        with_redis(|keys| async move {
            let first_worker = limiter(&keys).await;
            let second_worker = limiter(&keys).await;
            assert_eq!(
                first_worker.acquire("openai", 1, 60, 2).await.unwrap(),
                Admission::Granted
            );
            assert_eq!(
                second_worker.acquire("openai", 1, 60, 2).await.unwrap(),
                Admission::Granted
            );
            retry_after(first_worker.acquire("openai", 1, 60, 2).await.unwrap());
            retry_after(second_worker.acquire("openai", 1, 60, 2).await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn buckets_with_different_names_are_independent() {
        with_redis(|keys| async move {
            let limiter = limiter(&keys).await;
            assert_eq!(
                limiter.acquire("openai", 1, 60, 1).await.unwrap(),
                Admission::Granted
            );
            retry_after(limiter.acquire("openai", 1, 60, 1).await.unwrap());
            assert_eq!(
                limiter.acquire("gemini", 1, 60, 1).await.unwrap(),
                Admission::Granted
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_cost_above_one_takes_that_many_units() {
        with_redis(|keys| async move {
            let limiter = limiter(&keys).await;
            assert_eq!(
                limiter.acquire("tokens", 3, 60, 5).await.unwrap(),
                Admission::Granted
            );
            // Two units are left: three more need one more unit, about a second at 60/min.
            let wait = retry_after(limiter.acquire("tokens", 3, 60, 5).await.unwrap());
            assert!(
                wait > Duration::from_millis(500) && wait <= Duration::from_secs(1),
                "retry_after was {wait:?}"
            );
            assert_eq!(
                limiter.acquire("tokens", 2, 60, 5).await.unwrap(),
                Admission::Granted
            );
            retry_after(limiter.acquire("tokens", 1, 60, 5).await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn a_cost_above_the_burst_is_clamped_to_the_burst() {
        with_redis(|keys| async move {
            let limiter = limiter(&keys).await;
            assert_eq!(
                limiter.acquire("tokens", 10, 60, 3).await.unwrap(),
                Admission::Granted
            );
            let wait = retry_after(limiter.acquire("tokens", 10, 60, 3).await.unwrap());
            // A full bucket again: three units at one per second.
            assert!(
                wait > Duration::from_millis(2500) && wait <= Duration::from_secs(3),
                "retry_after was {wait:?}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_bucket_key_expires_once_the_bucket_is_full_again() {
        with_redis(|keys| async move {
            let limiter = limiter(&keys).await;
            assert_eq!(
                limiter.acquire("openai", 1, 600, 5).await.unwrap(),
                Admission::Granted
            );
            let mut connection = connect().await;
            let ttl_ms: i64 = redis::cmd("PTTL")
                .arg(keys.rate_limit("openai"))
                .query_async(&mut connection)
                .await
                .unwrap();
            // One unit refills in 100 ms at 600/min; after that the bucket is full.
            assert!(ttl_ms > 0 && ttl_ms <= 100, "pttl was {ttl_ms}");
        })
        .await;
    }

    #[tokio::test]
    async fn a_zero_rate_or_burst_is_a_configuration_error() {
        with_redis(|keys| async move {
            let limiter = limiter(&keys).await;
            let error = limiter.acquire("openai", 1, 0, 3).await.unwrap_err();
            assert_eq!(error.kind(), ErrorKind::InvalidClientConfig);
            let error = limiter.acquire("openai", 1, 60, 0).await.unwrap_err();
            assert_eq!(error.kind(), ErrorKind::InvalidClientConfig);
        })
        .await;
    }
}
