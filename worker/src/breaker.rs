//! A circuit breaker per provider, shared by every worker through Redis, so that when a provider
//! is down the whole fleet stops calling it and goes to the fallback, instead of each worker
//! finding out on its own, and so that only one call in the fleet probes whether it is back.
//!
//! The state is four keys per provider (see `keys`) whose lifetimes are Redis expiries: `failures`
//! counts failures in a window that starts at the first one; `open` lives for the cooldown;
//! `tripped` lives from opening until a success closes the breaker; `probe` marks the one call
//! let through once the cooldown is over (half-open) and lives for the probe timeout. Letting
//! the server's expiry be the clock means workers with skewed clocks agree, and a worker that
//! dies while probing cannot wedge the breaker: its probe key expires and another caller
//! probes. Every check-then-change runs as one Lua script, so exactly one caller wins the probe
//! (`SET NX`) and a failure that reaches the threshold opens the breaker exactly once.
//!
//! The breaker guards against a provider that is down, not one that is merely flaky: a success
//! resets the failure count, and any success, even from a call that started before the breaker
//! opened, closes it, because the provider evidently answers again.

use std::time::Duration;

use redis::{ErrorKind, RedisError};
use shared::connection::RedisConnection;

use shared::keys::Keys;

/// How long `tripped` outlives the last opening: long enough that the breaker is still
/// half-open when traffic returns after a quiet spell, short enough that an abandoned provider
/// name leaves nothing behind for good.
const TRIPPED_TTL: Duration = Duration::from_secs(24 * 60 * 60);

const FAILURES: &str = "failures";
const OPEN: &str = "open";
const TRIPPED: &str = "tripped";
const PROBE: &str = "probe";

/// Decides whether a call may go ahead.
pub const PERMIT_SCRIPT: &str = r#"
-- KEYS[1] open, KEYS[2] tripped, KEYS[3] probe
-- ARGV[1] probe timeout (milliseconds)
-- Returns {'closed', 0}, {'probe', 0} or {'open', milliseconds until a call may be let through}.
local open_left = redis.call('PTTL', KEYS[1])
if open_left ~= -2 then return {'open', math.max(open_left, 0)} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'closed', 0} end
-- Tripped and the cooldown is over: half-open. The first caller becomes the probe; the others
-- wait for its report or for its key to expire.
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[1]) then return {'probe', 0} end
return {'open', math.max(redis.call('PTTL', KEYS[3]), 0)}
"#;

/// Counts a failure and opens the breaker when needed.
pub const FAILURE_SCRIPT: &str = r#"
-- KEYS[1] failures, KEYS[2] open, KEYS[3] tripped, KEYS[4] probe
-- ARGV[1] failure threshold, ARGV[2] window, ARGV[3] cooldown, ARGV[4] tripped lifetime (all ms)
-- Returns 0 if the breaker stays closed, 1 if it was already open, 2 if this failure opened it.
local function open()
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
  redis.call('DEL', KEYS[1], KEYS[4])
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  -- Tripped and not closed since. During the cooldown a late failure changes nothing; once it
  -- is over (half-open), a failure, normally the probe's, reopens the breaker at once.
  if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
  open()
  return 2
end
local failures = redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if failures < tonumber(ARGV[1]) then return 0 end
open()
return 2
"#;

/// When failures open the breaker and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BreakerPolicy {
    /// Failures within `window` that open the breaker (0 is taken as 1).
    pub failure_threshold: u32,
    /// Counted from the first failure; the count starts again after it.
    pub window: Duration,
    /// How long the breaker stays open before one probe may go through.
    pub cooldown: Duration,
    /// How long the other callers wait for the probe to report before another caller probes.
    /// Make it longer than the slowest call.
    pub probe_timeout: Duration,
}

/// The answer to "may I call this provider?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// The breaker is closed: call.
    Closed,
    /// The breaker is half-open and this caller is its one probe: call, and report the outcome
    /// with [`CircuitBreaker::record_success`] or [`CircuitBreaker::record_failure`].
    Probe,
    /// Do not call; go to the fallback. `until` is the time left until a call may be let through
    /// again: the rest of the cooldown, or while a probe is out, the rest of its timeout (sooner
    /// if it reports success).
    Open { until: Duration },
}

/// Circuit breakers in Redis, one per provider name; one instance serves every provider.
#[derive(Clone)]
pub struct CircuitBreaker {
    connection: RedisConnection,
    keys: Keys,
    policy: BreakerPolicy,
    permit_script: redis::Script,
    failure_script: redis::Script,
}

impl CircuitBreaker {
    /// The breaker on a process's Redis connection.
    pub fn on(redis: &shared::connection::Redis, policy: BreakerPolicy) -> Self {
        Self::new(redis.connection(), redis.keys().clone(), policy)
    }

    pub fn new(connection: RedisConnection, keys: Keys, policy: BreakerPolicy) -> Self {
        Self {
            connection,
            keys,
            policy,
            permit_script: redis::Script::new(PERMIT_SCRIPT),
            failure_script: redis::Script::new(FAILURE_SCRIPT),
        }
    }

    /// May a call to `provider` go ahead? `Closed`: yes. `Open`: no, go to the fallback.
    /// `Probe`: yes, and this caller is the single probe allowed after the cooldown; the others
    /// see `Open` until it reports or its `probe_timeout` runs out.
    pub async fn permit(&self, provider: &str) -> Result<Permit, RedisError> {
        let mut connection = self.connection.clone();
        let (state, millis): (String, i64) = self
            .permit_script
            .key(self.keys.breaker(provider, OPEN))
            .key(self.keys.breaker(provider, TRIPPED))
            .key(self.keys.breaker(provider, PROBE))
            .arg(millis(self.policy.probe_timeout))
            .invoke_async(&mut connection)
            .await?;
        match state.as_str() {
            "closed" => Ok(Permit::Closed),
            "probe" => {
                tracing::info!(provider, "Circuit breaker lets a probe through");
                Ok(Permit::Probe)
            }
            "open" => Ok(Permit::Open {
                until: Duration::from_millis(u64::try_from(millis).unwrap_or(0)),
            }),
            _ => Err(RedisError::from((
                ErrorKind::UnexpectedReturnType,
                "unexpected circuit breaker state",
                state,
            ))),
        }
    }

    /// A call to `provider` succeeded: close the breaker and clear the failure count.
    pub async fn record_success(&self, provider: &str) -> Result<(), RedisError> {
        let mut connection = self.connection.clone();
        let (was_tripped,): (u32,) = redis::pipe()
            .atomic()
            .del(&[
                self.keys.breaker(provider, FAILURES),
                self.keys.breaker(provider, OPEN),
                self.keys.breaker(provider, PROBE),
            ])
            .ignore()
            .del(self.keys.breaker(provider, TRIPPED))
            .query_async(&mut connection)
            .await?;
        if was_tripped > 0 {
            tracing::info!(provider, "Circuit breaker closed");
        }
        Ok(())
    }

    /// A call to `provider` failed. Returns whether the breaker is open now: the failure reached
    /// the threshold, or the breaker was already open, or it was half-open (a failed probe
    /// reopens it for another cooldown at once).
    pub async fn record_failure(&self, provider: &str) -> Result<bool, RedisError> {
        let mut connection = self.connection.clone();
        let outcome: i64 = self
            .failure_script
            .key(self.keys.breaker(provider, FAILURES))
            .key(self.keys.breaker(provider, OPEN))
            .key(self.keys.breaker(provider, TRIPPED))
            .key(self.keys.breaker(provider, PROBE))
            .arg(self.policy.failure_threshold.max(1))
            .arg(millis(self.policy.window))
            .arg(millis(self.policy.cooldown))
            .arg(millis(TRIPPED_TTL.max(self.policy.cooldown)))
            .invoke_async(&mut connection)
            .await?;
        if outcome == 2 {
            tracing::warn!(
                provider,
                cooldown_ms = millis(self.policy.cooldown),
                "Circuit breaker opened"
            );
        }
        Ok(outcome > 0)
    }

    /// Whether the breaker of `provider` has tripped and no success has closed it since: open,
    /// or half-open waiting for a probe. For metrics and operators; callers use
    /// [`CircuitBreaker::permit`].
    pub async fn is_open(&self, provider: &str) -> Result<bool, RedisError> {
        let mut connection = self.connection.clone();
        let present: u32 = redis::cmd("EXISTS")
            .arg(self.keys.breaker(provider, OPEN))
            .arg(self.keys.breaker(provider, TRIPPED))
            .query_async(&mut connection)
            .await?;
        Ok(present > 0)
    }
}

/// A duration as whole milliseconds for PX, at least 1 because Redis refuses PX 0.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {

    use super::*;
    use shared::test_redis::{connect, with_redis};

    const POLICY: BreakerPolicy = BreakerPolicy {
        failure_threshold: 3,
        window: Duration::from_secs(2),
        cooldown: Duration::from_millis(300),
        probe_timeout: Duration::from_secs(1),
    };

    /// Added to every wait for a key to expire: Redis counts whole milliseconds and expires a
    /// key only after its deadline has passed.
    const MARGIN: Duration = Duration::from_millis(20);

    /// A breaker as one worker holds it: its own connection, the shared prefix.
    async fn worker(keys: &Keys) -> CircuitBreaker {
        CircuitBreaker::new(connect().await, keys.clone(), POLICY)
    }

    async fn trip(breaker: &CircuitBreaker, provider: &str) {
        for _ in 1..POLICY.failure_threshold {
            assert!(!breaker.record_failure(provider).await.unwrap());
        }
        assert!(breaker.record_failure(provider).await.unwrap());
    }

    /// Waits until an `Open` permit says a call may be let through again.
    async fn wait_out(permit: Permit) {
        let Permit::Open { until } = permit else {
            panic!("expected an open breaker, got {permit:?}");
        };
        tokio::time::sleep(until + MARGIN).await;
    }

    #[tokio::test]
    async fn failures_below_the_threshold_keep_the_breaker_closed() {
        with_redis(|keys| async move {
            let breaker = worker(&keys).await;
            for _ in 1..POLICY.failure_threshold {
                assert!(!breaker.record_failure("gemini").await.unwrap());
            }
            assert_eq!(breaker.permit("gemini").await.unwrap(), Permit::Closed);
            assert!(!breaker.is_open("gemini").await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn reaching_the_threshold_opens_the_breaker_for_the_cooldown() {
        with_redis(|keys| async move {
            let breaker = worker(&keys).await;
            trip(&breaker, "gemini").await;
            let Permit::Open { until } = breaker.permit("gemini").await.unwrap() else {
                panic!("expected an open breaker");
            };
            assert!(
                until > Duration::ZERO && until <= POLICY.cooldown,
                "until was {until:?}"
            );
            assert!(breaker.is_open("gemini").await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn workers_sharing_a_prefix_share_one_breaker() {
        with_redis(|keys| async move {
            let first_worker = worker(&keys).await;
            let second_worker = worker(&keys).await;
            for _ in 1..POLICY.failure_threshold {
                assert!(!first_worker.record_failure("gemini").await.unwrap());
            }
            assert!(second_worker.record_failure("gemini").await.unwrap());
            assert!(matches!(
                first_worker.permit("gemini").await.unwrap(),
                Permit::Open { .. }
            ));
            assert!(first_worker.is_open("gemini").await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn breakers_of_different_providers_are_independent() {
        with_redis(|keys| async move {
            let breaker = worker(&keys).await;
            trip(&breaker, "gemini").await;
            assert_eq!(breaker.permit("openai").await.unwrap(), Permit::Closed);
            assert!(!breaker.is_open("openai").await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn a_success_resets_the_failure_count() {
        with_redis(|keys| async move {
            let breaker = worker(&keys).await;
            for _ in 1..POLICY.failure_threshold {
                assert!(!breaker.record_failure("gemini").await.unwrap());
            }
            breaker.record_success("gemini").await.unwrap();
            for _ in 1..POLICY.failure_threshold {
                assert!(!breaker.record_failure("gemini").await.unwrap());
            }
            assert_eq!(breaker.permit("gemini").await.unwrap(), Permit::Closed);
        })
        .await;
    }

    #[tokio::test]
    async fn after_the_cooldown_exactly_one_of_the_concurrent_callers_gets_the_probe() {
        with_redis(|keys| async move {
            let first_worker = worker(&keys).await;
            let second_worker = worker(&keys).await;
            trip(&first_worker, "gemini").await;
            wait_out(first_worker.permit("gemini").await.unwrap()).await;
            let (first, second) = tokio::join!(
                first_worker.permit("gemini"),
                second_worker.permit("gemini")
            );
            let permits = [first.unwrap(), second.unwrap()];
            let probes = permits.iter().filter(|p| **p == Permit::Probe).count();
            let open = permits
                .iter()
                .filter(|p| matches!(p, Permit::Open { .. }))
                .count();
            assert_eq!((probes, open), (1, 1), "permits were {permits:?}");
            assert!(first_worker.is_open("gemini").await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn a_successful_probe_closes_the_breaker() {
        with_redis(|keys| async move {
            let first_worker = worker(&keys).await;
            let second_worker = worker(&keys).await;
            trip(&first_worker, "gemini").await;
            wait_out(first_worker.permit("gemini").await.unwrap()).await;
            assert_eq!(first_worker.permit("gemini").await.unwrap(), Permit::Probe);
            first_worker.record_success("gemini").await.unwrap();
            assert_eq!(
                second_worker.permit("gemini").await.unwrap(),
                Permit::Closed
            );
            assert!(!second_worker.is_open("gemini").await.unwrap());
            // The count starts from zero again.
            assert!(!second_worker.record_failure("gemini").await.unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn a_failed_probe_reopens_the_breaker_for_another_cooldown() {
        with_redis(|keys| async move {
            let breaker = worker(&keys).await;
            trip(&breaker, "gemini").await;
            wait_out(breaker.permit("gemini").await.unwrap()).await;
            assert_eq!(breaker.permit("gemini").await.unwrap(), Permit::Probe);
            assert!(breaker.record_failure("gemini").await.unwrap());
            let permit = breaker.permit("gemini").await.unwrap();
            let Permit::Open { until } = permit else {
                panic!("expected an open breaker, got {permit:?}");
            };
            assert!(
                until > Duration::ZERO && until <= POLICY.cooldown,
                "until was {until:?}"
            );
            wait_out(permit).await;
            assert_eq!(breaker.permit("gemini").await.unwrap(), Permit::Probe);
        })
        .await;
    }

    #[tokio::test]
    async fn a_probe_that_never_reports_is_replaced_after_the_probe_timeout() {
        with_redis(|keys| async move {
            let dead_worker = worker(&keys).await;
            let live_worker = worker(&keys).await;
            trip(&dead_worker, "gemini").await;
            wait_out(dead_worker.permit("gemini").await.unwrap()).await;
            assert_eq!(dead_worker.permit("gemini").await.unwrap(), Permit::Probe);
            let permit = live_worker.permit("gemini").await.unwrap();
            let Permit::Open { until } = permit else {
                panic!("expected an open breaker, got {permit:?}");
            };
            assert!(
                until > POLICY.cooldown && until <= POLICY.probe_timeout,
                "until was {until:?}"
            );
            wait_out(permit).await;
            assert_eq!(live_worker.permit("gemini").await.unwrap(), Permit::Probe);
        })
        .await;
    }
}
