//! The provider call path: one billed call under the fleet's policies. [`AgentContext::call`]
//! is the loop; each of its steps is a function here.
//!
//! 1. **Admit and hold** ([`AgentContext::admit_and_hold`]): the model's rate-limit buckets,
//!    a budget hold for the call's worst-case cost, and the carried job writes, in one round
//!    trip. A limit that says no defers the job through a delay queue; a blocking budget with
//!    no room fails it.
//! 2. **Begin the attempt** ([`AgentContext::begin_attempt`]): count it on the job, mark the
//!    job running, renew the lease.
//! 3. **Attempt** ([`AgentContext::attempt`]): the HTTP call itself, inside a `provider_call`
//!    span that the trace exporters turn into a generation span, with its metrics.
//! 4. **Settle a success** ([`AgentContext::settle_success`]): the ledger entry (which settles
//!    the hold), the usage on the job and the breaker's success, in one round trip.
//! 5. **Settle a failure** ([`AgentContext::settle_failure`]): give the hold back, tell the
//!    breaker, and decide ([`decide`]) between trying again here, deferring the job, and
//!    failing it.

use std::time::{Duration, Instant};

use shared::codes::{FailureCode, NoticeKind};
use shared::domain::{JobStatus, Notice, Usage};
use shared::ledger::{Hold, LedgerEntry, Reservation};
use shared::ratelimit::Admission;
use shared::retry::RetryPolicy;
use shared::store::JobUpdate;
use tracing::Instrument;

use super::{AgentContext, CallSpec};
use crate::error::{Failure, JobError};
use crate::providers::{Billed, ProviderError, Retry};

/// What to do after a failed attempt.
#[derive(Debug)]
enum Next {
    /// Try again in this process after the delay.
    RetryAfter(Duration),
    /// End the call with this error (deferral or failure).
    Stop(JobError),
}

impl AgentContext {
    /// Runs one provider call under the rate limits and the retry policy. Each attempt counts on
    /// the job; while it waits to retry, the job shows `retrying` with a notice naming the
    /// attempt; a rate limit defers the whole job through a delay queue. The answer's usage is
    /// recorded under the running agent, with its cost, on the job and in the ledger before
    /// this returns.
    pub async fn call<T, F, Fut>(&self, spec: &CallSpec<'_>, mut attempt: F) -> Result<T, JobError>
    where
        T: Billed,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        // Pay once: a step whose answer is already durable must return it here, before any
        // admission or provider call (money safety builds on this seam).
        loop {
            let hold = self.admit_and_hold(spec).await?;
            let number = self.begin_attempt(spec).await?;
            let (result, took) = self.attempt(spec, number, attempt()).await;
            match result {
                Ok(mut answer) => {
                    let usage = answer.usage_mut();
                    usage.agent = self.agent().to_string();
                    self.settle_success(spec, &hold, usage, number, took)
                        .await?;
                    return Ok(answer);
                }
                Err(error) => match self
                    .settle_failure(spec, &hold, error, number, took)
                    .await?
                {
                    Next::RetryAfter(delay) => tokio::time::sleep(delay).await,
                    Next::Stop(error) => return Err(error),
                },
            }
        }
    }

    /// Step 1: the rate limits, the budget hold and any carried job writes go together (one
    /// round trip); a hold taken for a call that may not go ahead is given straight back. The
    /// carried writes fail first: a job that ended or could not be saved is not deferred.
    async fn admit_and_hold(&self, spec: &CallSpec<'_>) -> Result<Hold, JobError> {
        let (admitted, held, flushed) =
            tokio::join!(self.admit(spec), self.reserve(spec), self.flush());
        match (flushed.and(admitted), held) {
            (Ok(()), Ok(hold)) => Ok(hold),
            (Err(denied), Ok(hold)) => {
                if let Err(error) = self.services.ledger.release(&hold).await {
                    tracing::warn!(%error, "Could not release a budget hold; it expires by itself");
                }
                Err(denied)
            }
            (Err(error), Err(_)) | (Ok(()), Err(error)) => Err(error),
        }
    }

    /// Takes this call's share of the model's fleet-wide limits, or defers the job.
    async fn admit(&self, spec: &CallSpec<'_>) -> Result<(), JobError> {
        let Some(limits) = self
            .services
            .limits
            .get(&format!("{}:{}", spec.billing_provider, spec.model))
        else {
            return Ok(());
        };
        // The buckets are asked together (one round trip); any that says no defers the call.
        let asks = buckets(spec, limits).into_iter().map(|bucket| async move {
            let name = format!("{}:{}:{}", spec.billing_provider, spec.model, bucket.kind);
            let admission = self
                .services
                .limiter
                .acquire(&name, bucket.cost, bucket.per_minute, bucket.burst)
                .await
                .map_err(JobError::infrastructure)?;
            Ok::<_, JobError>((name, bucket.per_minute, admission))
        });
        for (name, per_minute, admission) in futures::future::try_join_all(asks).await? {
            if let Admission::Denied { retry_after } = admission {
                crate::metrics::deferral("local_limit");
                return Err(JobError::Deferred {
                    after: retry_after,
                    reason: format!("{name} limit of {per_minute}/min reached"),
                });
            }
        }
        Ok(())
    }

    /// Holds the call's estimated maximum cost against the month's budget, or fails the job
    /// when a blocking budget has no room left.
    async fn reserve(&self, spec: &CallSpec<'_>) -> Result<Hold, JobError> {
        let estimate = estimate_max(spec, &self.services.prices);
        match self
            .services
            .ledger
            .reserve(estimate)
            .await
            .map_err(JobError::infrastructure)?
        {
            Reservation::Held(hold) => Ok(hold),
            Reservation::Refused { spent, reserved } => {
                let budget = self.services.ledger.policy().monthly_micros;
                if spent + estimate <= budget {
                    // There is room once the calls in flight settle (their holds are worst
                    // cases): wait for them instead of failing.
                    crate::metrics::deferral("budget_hold");
                    return Err(JobError::Deferred {
                        after: Duration::from_secs(1),
                        reason: format!(
                            "budget held by calls in flight ({reserved} micro-dollars)"
                        ),
                    });
                }
                Err(JobError::Permanent(Failure::new(
                    FailureCode::BudgetExhausted,
                    format!(
                        "blocking budget: spent {spent} + estimate {estimate} micro-dollars exceeds {budget}"
                    ),
                )))
            }
        }
    }

    /// Step 2: counts the attempt and shows it on the job (independent writes, sent together:
    /// one round trip instead of two). Answers the attempt's number within the step.
    async fn begin_attempt(&self, spec: &CallSpec<'_>) -> Result<u32, JobError> {
        let number = self.next_attempt();
        tokio::try_join!(
            self.renew_lease(),
            self.apply(JobUpdate {
                status: Some(JobStatus::Running),
                provider: Some(spec.provider.to_string()),
                model: Some(spec.model.to_string()),
                add_attempts: 1,
                step_attempts: Some(number),
                ..JobUpdate::default()
            }),
        )?;
        Ok(number)
    }

    /// Step 3: the call itself, in one span per provider call (the trace exporters turn it into
    /// a generation span), with its request metric. Answers the result and how long it took.
    async fn attempt<T: Billed>(
        &self,
        spec: &CallSpec<'_>,
        number: u32,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> (Result<T, ProviderError>, Duration) {
        let span = tracing::info_span!(
            "provider_call",
            provider = spec.provider,
            model = spec.model,
            attempt = number,
            prompt = spec.prompt,
            outcome = tracing::field::Empty,
            input_tokens = tracing::field::Empty,
            output_tokens = tracing::field::Empty,
            images = tracing::field::Empty,
        );
        let started = Instant::now();
        let mut result = call.instrument(span.clone()).await;
        let took = started.elapsed();
        match &mut result {
            Ok(answer) => {
                let usage = answer.usage_mut();
                span.record("outcome", "ok");
                span.record(
                    "input_tokens",
                    usage.input_text_tokens + usage.input_image_tokens,
                );
                span.record(
                    "output_tokens",
                    usage.output_text_tokens + usage.output_image_tokens,
                );
                span.record("images", usage.images);
                crate::metrics::provider_request(spec.provider, spec.model, "2xx", took);
            }
            Err(error) => {
                span.record("outcome", error.code.as_str());
                crate::metrics::provider_request(
                    spec.provider,
                    spec.model,
                    crate::metrics::status_class(error.status, error.code),
                    took,
                );
            }
        }
        (result, took)
    }

    /// Step 4: one script appends the ledger entry, adds the cost to the job and to the month's
    /// aggregates, and settles the budget hold; the usage goes on the job, and the success to
    /// the circuit breaker, in the same round trip.
    async fn settle_success(
        &self,
        spec: &CallSpec<'_>,
        hold: &Hold,
        usage: &Usage,
        number: u32,
        took: Duration,
    ) -> Result<(), JobError> {
        tracing::info!(
            provider = spec.provider,
            model = spec.model,
            elapsed_ms = took.as_millis() as u64,
            attempt = number,
            "Provider call succeeded"
        );
        let entry = LedgerEntry {
            at: chrono::Utc::now(),
            job_id: self.job_id,
            user: self.user.clone(),
            cost_micros: self.price(usage),
            usage: usage.clone(),
        };
        let recorded = async {
            self.services
                .ledger
                .record(&entry, Some(hold))
                .await
                .map_err(JobError::infrastructure)
        };
        let closed = async {
            if spec.breaker {
                self.services
                    .breaker
                    .record_success(spec.billing_provider)
                    .await
                    .map_err(JobError::infrastructure)?;
            }
            Ok(())
        };
        tokio::try_join!(
            closed,
            recorded,
            self.apply(JobUpdate {
                add_usage: vec![usage.clone()],
                ..JobUpdate::default()
            }),
        )?;
        crate::metrics::cost(&usage.provider, &usage.agent, entry.cost_micros);
        Ok(())
    }

    /// Step 5: a failed call is not billed, so its hold goes back; a provider failure counts
    /// on the breaker; then [`decide`] says what comes next, and a retry here shows on the job.
    async fn settle_failure(
        &self,
        spec: &CallSpec<'_>,
        hold: &Hold,
        error: ProviderError,
        number: u32,
        took: Duration,
    ) -> Result<Next, JobError> {
        self.services
            .ledger
            .release(hold)
            .await
            .map_err(JobError::infrastructure)?;
        let next = decide(&self.services.retry, spec, error.clone(), number);
        tracing::warn!(
            provider = spec.provider, model = spec.model, elapsed_ms = took.as_millis() as u64,
            attempt = number, code = error.code.as_str(), status = error.status,
            detail = %error.detail, will_retry = !matches!(next, Next::Stop(JobError::Permanent(_))),
            "Provider call failed"
        );
        if spec.breaker && error.code.is_provider_failure() {
            let opened = self
                .services
                .breaker
                .record_failure(spec.billing_provider)
                .await
                .map_err(JobError::infrastructure)?;
            if opened {
                tracing::warn!(provider = spec.billing_provider, "Provider put in cooldown");
            }
        }
        match &next {
            Next::RetryAfter(delay) => {
                crate::metrics::provider_retry(spec.provider, spec.model);
                let max_attempts = self.services.retry.max_attempts;
                self.apply(JobUpdate {
                    status: Some(JobStatus::Retrying),
                    add_notices: vec![Notice::now(
                        NoticeKind::Retrying,
                        format!(
                            "Attempt {number} of {max_attempts} did not work out ({}); trying again in {:.1} s.",
                            retry_reason(error.code),
                            delay.as_secs_f64()
                        ),
                    )],
                    ..JobUpdate::default()
                })
                .await?;
            }
            Next::Stop(JobError::Deferred { .. }) => crate::metrics::deferral("provider_429"),
            Next::Stop(_) => {}
        }
        Ok(next)
    }

    /// The cost of one call in micro-dollars. Every configured model was checked against the
    /// price table at start-up, so a failure here is a table that lacks a rate the provider
    /// billed: logged as an error for ops to fix, never silently.
    fn price(&self, usage: &Usage) -> i64 {
        match self.services.prices.cost_micros(usage) {
            Ok(cost) => cost,
            Err(error) => {
                tracing::error!(%error, provider = %usage.provider, model = %usage.model, "Cannot price a billed call");
                0
            }
        }
    }
}

/// What comes after attempt `number` failed with `error`: permanent errors and exhausted
/// attempts end the call; a provider's 429 gives the worker back (the job is deferred through a
/// delay queue); any other transient error is retried here after the policy's delay.
fn decide(policy: &RetryPolicy, spec: &CallSpec<'_>, error: ProviderError, number: u32) -> Next {
    let Retry::Yes { after } = error.retry else {
        return Next::Stop(JobError::Permanent(error.into()));
    };
    if !policy.allows_another(number) {
        return Next::Stop(JobError::Permanent(error.into()));
    }
    let delay = policy.delay(number - 1, after);
    if error.code == FailureCode::RateLimited {
        return Next::Stop(JobError::Deferred {
            after: delay,
            reason: format!(
                "{} answered 429 (attempt {number} of {})",
                spec.billing_provider, policy.max_attempts
            ),
        });
    }
    Next::RetryAfter(delay)
}

/// A short, user-readable reason for a retry notice.
fn retry_reason(code: FailureCode) -> &'static str {
    match code {
        FailureCode::ProviderTimeout => "the image service took too long to answer",
        FailureCode::ProviderUnavailable => "the image service is temporarily unavailable",
        _ => "a temporary problem on the image service",
    }
}

/// One rate-limit bucket a call takes from.
#[derive(Debug, PartialEq, Eq)]
struct Bucket {
    /// `rpm`, `ipm` or `tpm`.
    kind: &'static str,
    cost: u32,
    per_minute: u32,
    burst: u32,
}

/// The buckets a call takes from under `limits`: always one request, and its images and
/// tokens where the model has such limits.
fn buckets(spec: &CallSpec<'_>, limits: &shared::config::RateLimitSettings) -> Vec<Bucket> {
    let mut asked = vec![("rpm", 1, limits.requests_per_minute.get())];
    if let Some(images) = limits.images_per_minute {
        asked.push(("ipm", spec.images.max(1), images.get()));
    }
    if let Some(tokens) = limits.tokens_per_minute {
        asked.push(("tpm", spec.tokens.max(1), tokens.get()));
    }
    asked
        .into_iter()
        .map(|(kind, cost, per_minute)| Bucket {
            kind,
            cost,
            per_minute,
            // A burst of a tenth of a minute's budget smooths traffic without idling capacity.
            burst: (per_minute / 10).max(cost).max(1),
        })
        .collect()
}

/// The most a call can plausibly cost, priced modality by modality: generous token counts for
/// text, the largest per-image output (6,240 tokens, high quality at 1024x1536) for each image.
/// Modalities a model has no rate for cannot be billed and are skipped.
fn estimate_max(spec: &CallSpec<'_>, prices: &shared::pricing::PriceTable) -> i64 {
    let base = Usage {
        agent: String::new(),
        provider: spec.billing_provider.to_string(),
        model: spec.model.to_string(),
        ..Usage::default()
    };
    let images = u64::from(spec.images);
    let lines = [
        Usage {
            input_text_tokens: u64::from(spec.tokens) + 2_000,
            ..base.clone()
        },
        Usage {
            output_text_tokens: 1_000,
            ..base.clone()
        },
        Usage {
            input_image_tokens: if images > 0 { 1_600 } else { 0 },
            ..base.clone()
        },
        Usage {
            output_image_tokens: images * 6_240,
            ..base.clone()
        },
    ];
    lines
        .iter()
        .filter_map(|usage| prices.cost_micros(usage).ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn spec(images: u32, tokens: u32) -> CallSpec<'static> {
        CallSpec {
            provider: "openai",
            billing_provider: "openai",
            model: "gpt-image-2",
            prompt: "a fox",
            images,
            tokens,
            breaker: false,
        }
    }

    fn failure(code: FailureCode, retry: Retry) -> ProviderError {
        ProviderError::new("openai", code, retry, "test".to_string(), Some(500))
    }

    #[test]
    fn a_transient_failure_is_retried_here_until_the_attempts_run_out() {
        let policy = RetryPolicy::new(3);
        let transient = || failure(FailureCode::ProviderUnavailable, Retry::Yes { after: None });
        assert!(matches!(
            decide(&policy, &spec(1, 0), transient(), 1),
            Next::RetryAfter(_)
        ));
        assert!(matches!(
            decide(&policy, &spec(1, 0), transient(), 3),
            Next::Stop(JobError::Permanent(Failure {
                code: FailureCode::ProviderUnavailable,
                ..
            }))
        ));
    }

    #[test]
    fn a_permanent_failure_ends_the_call_at_once() {
        let policy = RetryPolicy::new(3);
        let blocked = failure(FailureCode::ContentBlocked, Retry::No);
        assert!(matches!(
            decide(&policy, &spec(1, 0), blocked, 1),
            Next::Stop(JobError::Permanent(Failure {
                code: FailureCode::ContentBlocked,
                ..
            }))
        ));
    }

    #[test]
    fn a_providers_429_defers_the_job_for_the_delay_it_asked() {
        let policy = RetryPolicy::new(3);
        let limited = failure(
            FailureCode::RateLimited,
            Retry::Yes {
                after: Some(Duration::from_secs(7)),
            },
        );
        let Next::Stop(JobError::Deferred { after, reason }) =
            decide(&policy, &spec(1, 0), limited, 2)
        else {
            panic!("a 429 defers");
        };
        assert!(after >= Duration::from_secs(7), "{after:?}");
        assert_eq!(reason, "openai answered 429 (attempt 2 of 3)");
    }

    #[test]
    fn a_call_takes_a_request_and_its_images_and_tokens_where_limited() {
        let limits = shared::config::RateLimitSettings {
            requests_per_minute: NonZeroU32::new(100).unwrap(),
            images_per_minute: NonZeroU32::new(50),
            tokens_per_minute: None,
        };
        assert_eq!(
            buckets(&spec(4, 300), &limits),
            [
                Bucket {
                    kind: "rpm",
                    cost: 1,
                    per_minute: 100,
                    burst: 10
                },
                Bucket {
                    kind: "ipm",
                    cost: 4,
                    per_minute: 50,
                    burst: 5
                },
            ]
        );
    }

    #[test]
    fn the_hold_grows_with_the_images_asked_for() {
        let prices = shared::config::Settings::defaults()
            .unwrap()
            .price_table()
            .unwrap();
        let one = estimate_max(&spec(1, 0), &prices);
        let four = estimate_max(&spec(4, 0), &prices);
        assert!(one > 0);
        assert!(four > 3 * one, "{one} {four}");
    }
}
