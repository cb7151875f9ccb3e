//! Agents: one file per agent type, all behind the [`Agent`] trait, registered in [`registry`].
//!
//! A job runs as a chain: it starts at the `router`, and each agent either hands off to another
//! agent by name, produces images, or asks the user to clarify. Adding an agent type is one new
//! file here plus one line in [`registry`]; the pipeline never names a concrete agent except the
//! entry point. An agent that serves an intent says so in [`Agent::route`], and the router's
//! choices (the classifier's schema enum and instructions, and where each verdict goes) are built
//! from those routes: `docs/adding-an-agent.md` walks through it.
//!
//! Agents never touch Redis or RabbitMQ. Everything they need from the outside world (provider
//! calls with retries, usage recording, status changes) goes through [`AgentContext`].

pub mod create;
pub mod edit;
pub mod router;
pub mod upscale;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::atomic::{AtomicU32, Ordering};

use shared::breaker::{CircuitBreaker, Permit};
use shared::codes::{FailureCode, NoticeKind};
use shared::config::{RateLimitSettings, Settings};
use shared::domain::{
    Clarification, ImageMime, ImageSize, Intent, JobId, JobStatus, Notice, Usage, UserId,
};
use shared::ledger::{Hold, Ledger, LedgerEntry, Reservation};
use shared::pricing::PriceTable;
use shared::ratelimit::{Admission, RateLimiter};
use shared::retry::RetryPolicy;
use shared::stats::Stats;
use shared::store::{Guard, JobStore, JobUpdate, UpdateOutcome};
use tracing::Instrument;

use crate::providers::{GeneratedImage, IntentChoice, ProviderError, Providers, Retry};

/// The agent every job starts with.
pub const ENTRY_AGENT: &str = router::NAME;

/// The job as agents see it: the request, already loaded (image bytes included).
#[derive(Debug, Clone)]
pub struct JobInput {
    pub id: JobId,
    /// The agent to start with; none means [`ENTRY_AGENT`].
    pub start: Option<String>,
    pub prompt: String,
    pub size: ImageSize,
    pub n: u32,
    pub image: Option<(Bytes, ImageMime)>,
}

/// What an agent decided.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Continue with another agent (by its registry name), with a possibly rewritten prompt.
    Handoff {
        to: &'static str,
        intent: Intent,
        prompt: String,
    },
    /// Final images.
    Images(Vec<GeneratedImage>),
    /// Ask the user; the job ends `needs_clarification`.
    Clarify(Clarification),
}

/// Why a job could not finish normally.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Infrastructure trouble (Redis, object store): try the whole job again later. The message
    /// is requeued; nothing is reported to the user.
    #[error("retryable: {source}")]
    Retryable {
        source: anyhow::Error,
        after: Option<Duration>,
    },
    /// A rate limit (ours or the provider's) says wait: the job goes back through a delay queue
    /// instead of holding a worker.
    #[error("deferred for {after:?}: {reason}")]
    Deferred { after: Duration, reason: String },
    /// The job cannot succeed; it ends `failed` with this error.
    #[error("permanent: {0}")]
    Permanent(Failure),
    /// Someone else ended the job (it was canceled); stop quietly.
    #[error("job already ended with status {0:?}")]
    Ended(JobStatus),
}

/// A failure as it ends a job: what the user reads, and what only logs and ops read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Failure {
    pub code: FailureCode,
    pub message: String,
    pub detail: String,
}

impl Failure {
    /// A failure with the code's standard sentence for the user.
    pub fn new(code: FailureCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            message: code.user_message().to_string(),
            detail: detail.into(),
        }
    }

    /// A failure with a sentence of its own for the user.
    pub fn with_message(
        code: FailureCode,
        message: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            code,
            message: message.into(),
            detail: detail.into(),
        }
    }

    /// Whether another provider might succeed where this one failed.
    pub fn is_provider_failure(&self) -> bool {
        self.code.is_provider_failure()
    }
}

impl From<ProviderError> for Failure {
    fn from(error: ProviderError) -> Self {
        Self {
            code: error.code,
            message: error.user_message.clone(),
            detail: error.to_string(),
        }
    }
}

impl JobError {
    pub fn infrastructure(source: impl Into<anyhow::Error>) -> Self {
        Self::Retryable {
            source: source.into(),
            after: None,
        }
    }
}

/// How the router reaches an agent: the intent it serves and when a request has that intent.
/// The agent's [`Agent::name`] must be the intent's wire name (`Intent::as_str`), because the
/// api resumes a clarified job at the agent named by the intent the user chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub intent: Intent,
    /// When a request has this intent, in one sentence for the classifier's instructions.
    pub description: &'static str,
    /// Offered as an option of the router's general question ("create or edit?"). A narrow
    /// intent (upscale) is offered only when the router asks about that intent itself.
    pub offered: bool,
}

impl Route {
    pub fn choice(&self) -> IntentChoice {
        IntentChoice {
            intent: self.intent,
            description: self.description,
        }
    }
}

/// One agent type.
#[async_trait]
pub trait Agent: Send + Sync {
    /// Wire name: used in handoffs, usage records, logs and metric labels.
    fn name(&self) -> &'static str;
    /// The intent the router hands off to this agent for; `None` for agents that are not a
    /// router destination (the router itself).
    fn route(&self) -> Option<Route> {
        None
    }
    async fn run(&self, job: &JobInput, cx: &AgentContext) -> Result<Outcome, JobError>;
}

/// All agent types by name. One line per agent; the router is built last, from the others'
/// routes.
pub fn registry(
    providers: &Providers,
    settings: &Settings,
) -> HashMap<&'static str, Arc<dyn Agent>> {
    let mut agents: Vec<Arc<dyn Agent>> = vec![
        Arc::new(create::Create::new(providers.generator.clone())),
        Arc::new(edit::Edit::new(
            providers.editor.clone(),
            providers.fallback_editor.clone(),
        )),
        Arc::new(upscale::Upscale::new(providers.upscaler.clone())),
    ];
    let routes = agents.iter().filter_map(|agent| agent.route()).collect();
    agents.push(Arc::new(router::Router::new(
        providers.classifier.clone(),
        settings.worker.min_router_confidence,
        routes,
    )));
    agents
        .into_iter()
        .map(|agent| (agent.name(), agent))
        .collect()
}

/// A short, user-readable reason for a retry notice.
fn retry_reason(code: FailureCode) -> &'static str {
    match code {
        FailureCode::ProviderTimeout => "the image service took too long to answer",
        FailureCode::ProviderUnavailable => "the image service is temporarily unavailable",
        _ => "a temporary problem on the image service",
    }
}

/// What every job of a worker shares: the store and the fleet-wide policies.
pub struct Services {
    pub store: JobStore,
    /// How long a running job may go without starting a provider call before the watchdog
    /// considers it stuck.
    pub job_deadline: Duration,
    pub retry: RetryPolicy,
    pub prices: PriceTable,
    pub limiter: RateLimiter,
    pub limits: HashMap<String, RateLimitSettings>,
    pub breaker: CircuitBreaker,
    pub ledger: Ledger,
    pub stats: Stats,
}

/// One provider call as the retry loop sees it.
pub struct CallSpec<'a> {
    /// Shown on the job (`simulated` when simulated).
    pub provider: &'static str,
    /// Whose limits and breaker apply.
    pub billing_provider: &'static str,
    pub model: &'a str,
    /// The prompt sent, for traces (the exporter redacts it when configured to).
    pub prompt: &'a str,
    /// Units taken from the model's images- or tokens-per-minute budget.
    pub images: u32,
    pub tokens: u32,
    /// Report outcomes to the provider's circuit breaker.
    pub breaker: bool,
}

/// What agents may do to the world: call providers (with the retry policy and rate limits),
/// consult circuit breakers, add notices.
pub struct AgentContext {
    pub job_id: JobId,
    /// Whose job it is, for the cost ledger.
    pub user: UserId,
    pub services: Arc<Services>,
    /// Attempts made in the current step, carried across deferrals (persisted on the job).
    step_attempts: AtomicU32,
    /// Writes to the job not sent yet: the next write or round trip takes them along.
    carried: std::sync::Mutex<Carried>,
}

/// Job writes waiting for the next round trip (see [`AgentContext::carry`]).
#[derive(Default)]
struct Carried {
    update: Option<JobUpdate>,
    lease: bool,
}

impl AgentContext {
    pub fn new(job_id: JobId, user: UserId, services: Arc<Services>, step_attempts: u32) -> Self {
        Self {
            job_id,
            user,
            services,
            step_attempts: AtomicU32::new(step_attempts),
            carried: std::sync::Mutex::default(),
        }
    }

    /// Keeps `update` (and a lease renewal, if asked) to be sent with the next write to the job
    /// or the next provider call's admission, whichever comes first, instead of paying a round
    /// trip of its own. Whatever is carried is sent before any provider call.
    pub fn carry(&self, update: JobUpdate, renew_lease: bool) {
        let mut carried = self.lock_carried();
        carried.update = Some(match carried.update.take() {
            Some(earlier) => earlier.then(update),
            None => update,
        });
        carried.lease |= renew_lease;
    }

    /// Sends whatever is carried, the update and the lease together (nothing to do when
    /// nothing is).
    pub async fn flush(&self) -> Result<(), JobError> {
        let Carried { update, lease } = std::mem::take(&mut *self.lock_carried());
        let write = async {
            match update {
                Some(update) => self.write(&update).await,
                None => Ok(()),
            }
        };
        let renew = async {
            if lease {
                self.renew_lease().await
            } else {
                Ok(())
            }
        };
        tokio::try_join!(write, renew).map(|_| ())
    }

    /// Takes the carried update, for a write that ends the job (the lease ends with it).
    pub fn take_carried(&self) -> Option<JobUpdate> {
        std::mem::take(&mut *self.lock_carried()).update
    }

    fn lock_carried(&self) -> std::sync::MutexGuard<'_, Carried> {
        // Nothing panics while holding it; a poisoned lock still holds consistent data.
        self.carried
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new step (after a handoff) starts with a fresh attempt budget.
    pub fn reset_step(&self) {
        self.step_attempts.store(0, Ordering::SeqCst);
    }

    /// Runs one provider call under the rate limits and the retry policy. Each attempt counts on
    /// the job; while it waits to retry, the job shows `retrying` with a notice naming the
    /// attempt; a rate limit defers the whole job through a delay queue. Usage and cost of a
    /// successful call are recorded on the job before this returns.
    pub async fn call<T, F, Fut>(
        &self,
        spec: &CallSpec<'_>,
        mut attempt: F,
        usage_of: impl Fn(&T) -> Usage,
    ) -> Result<T, JobError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let max_attempts = self.services.retry.max_attempts;
        loop {
            // Rate limits, the budget hold and any carried job writes go together (one round
            // trip); a hold taken for a call that may not go ahead is given straight back. The
            // carried writes fail first: a job that ended or could not be saved is not deferred.
            let (admitted, held, flushed) =
                tokio::join!(self.admit(spec), self.reserve(spec), self.flush());
            let hold = match (flushed.and(admitted), held) {
                (Ok(()), Ok(hold)) => hold,
                (Err(denied), Ok(hold)) => {
                    if let Err(error) = self.services.ledger.release(&hold).await {
                        tracing::warn!(%error, "Could not release a budget hold; it expires by itself");
                    }
                    return Err(denied);
                }
                (Err(error), Err(_)) | (Ok(()), Err(error)) => return Err(error),
            };
            let attempts_made = self.step_attempts.fetch_add(1, Ordering::SeqCst) + 1;
            // Independent writes, sent together: one round trip instead of two.
            tokio::try_join!(
                self.renew_lease(),
                self.apply(JobUpdate {
                    status: Some(JobStatus::Running),
                    provider: Some(spec.provider.to_string()),
                    model: Some(spec.model.to_string()),
                    add_attempts: 1,
                    step_attempts: Some(attempts_made),
                    ..JobUpdate::default()
                }),
            )?;
            // One span per provider call: the trace exporters turn it into a generation span.
            let span = tracing::info_span!(
                "provider_call",
                provider = spec.provider,
                model = spec.model,
                attempt = attempts_made,
                prompt = spec.prompt,
                outcome = tracing::field::Empty,
                input_tokens = tracing::field::Empty,
                output_tokens = tracing::field::Empty,
                images = tracing::field::Empty,
            );
            let started = std::time::Instant::now();
            let result = attempt().instrument(span.clone()).await;
            let took = started.elapsed();
            let elapsed_ms = took.as_millis() as u64;
            let (provider, model) = (spec.provider, spec.model);
            match &result {
                Ok(value) => {
                    let usage = usage_of(value);
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
                    crate::metrics::provider_request(provider, model, "2xx", took);
                }
                Err(error) => {
                    span.record("outcome", error.code.as_str());
                    crate::metrics::provider_request(
                        provider,
                        model,
                        crate::metrics::status_class(error.status, error.code),
                        took,
                    );
                }
            }
            drop(span);
            match result {
                Ok(value) => {
                    tracing::info!(
                        provider,
                        model,
                        elapsed_ms,
                        attempt = attempts_made,
                        "Provider call succeeded"
                    );
                    let usage = usage_of(&value);
                    let entry = LedgerEntry {
                        at: chrono::Utc::now(),
                        job_id: self.job_id,
                        user: self.user.clone(),
                        cost_micros: self.price(&usage),
                        usage: usage.clone(),
                    };
                    // One script appends the ledger entry, adds the cost to the job and to the
                    // month's aggregates, and settles the budget hold; the usage goes on the
                    // job, and the success to the circuit breaker, in the same round trip.
                    let recorded = async {
                        self.services
                            .ledger
                            .record(&entry, Some(&hold))
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
                    return Ok(value);
                }
                Err(error) => {
                    // A failed call is not billed: give its hold back.
                    self.services
                        .ledger
                        .release(&hold)
                        .await
                        .map_err(JobError::infrastructure)?;
                    let can_retry = matches!(error.retry, Retry::Yes { .. })
                        && self.services.retry.allows_another(attempts_made);
                    tracing::warn!(
                        provider, model, elapsed_ms, attempt = attempts_made,
                        code = error.code.as_str(), status = error.status, detail = %error.detail,
                        will_retry = can_retry,
                        "Provider call failed"
                    );
                    if spec.breaker && Failure::from(error.clone()).is_provider_failure() {
                        let opened = self
                            .services
                            .breaker
                            .record_failure(spec.billing_provider)
                            .await
                            .map_err(JobError::infrastructure)?;
                        if opened {
                            tracing::warn!(
                                provider = spec.billing_provider,
                                "Provider put in cooldown"
                            );
                        }
                    }
                    let Retry::Yes { after } = error.retry else {
                        return Err(JobError::Permanent(error.into()));
                    };
                    if !can_retry {
                        return Err(JobError::Permanent(error.into()));
                    }
                    let delay = self.services.retry.delay(attempts_made - 1, after);
                    if error.code == FailureCode::RateLimited {
                        // The provider said "not now": give the worker back instead of waiting.
                        crate::metrics::deferral("provider_429");
                        return Err(JobError::Deferred {
                            after: delay,
                            reason: format!(
                                "{} answered 429 (attempt {attempts_made} of {max_attempts})",
                                spec.billing_provider
                            ),
                        });
                    }
                    crate::metrics::provider_retry(provider, model);
                    self.apply(JobUpdate {
                        status: Some(JobStatus::Retrying),
                        add_notices: vec![Notice::now(
                            NoticeKind::Retrying,
                            format!(
                                "Attempt {attempts_made} of {max_attempts} did not work out ({}); trying again in {:.1} s.",
                                retry_reason(error.code),
                                delay.as_secs_f64()
                            ),
                        )],
                        ..JobUpdate::default()
                    })
                    .await?;
                    tokio::time::sleep(delay).await;
                }
            }
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
        let mut buckets = vec![("rpm", 1, limits.requests_per_minute.get())];
        if let Some(images) = limits.images_per_minute {
            buckets.push(("ipm", spec.images.max(1), images.get()));
        }
        if let Some(tokens) = limits.tokens_per_minute {
            buckets.push(("tpm", spec.tokens.max(1), tokens.get()));
        }
        // The buckets are asked together (one round trip); any that says no defers the call.
        let asks = buckets
            .into_iter()
            .map(|(kind, cost, per_minute)| async move {
                let name = format!("{}:{}:{kind}", spec.billing_provider, spec.model);
                // A burst of a tenth of a minute's budget smooths traffic without idling capacity.
                let burst = (per_minute / 10).max(cost).max(1);
                let admission = self
                    .services
                    .limiter
                    .acquire(&name, cost, per_minute, burst)
                    .await
                    .map_err(JobError::infrastructure)?;
                Ok::<_, JobError>((name, per_minute, admission))
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

    /// Tells the watchdog this job is alive for another deadline.
    pub async fn renew_lease(&self) -> Result<(), JobError> {
        let until = chrono::Utc::now()
            + chrono::Duration::from_std(self.services.job_deadline).unwrap_or_default();
        self.services
            .store
            .set_lease(self.job_id, until)
            .await
            .map_err(JobError::infrastructure)
    }

    /// Holds the call's estimated maximum cost against the month's budget, or fails the job
    /// when a blocking budget has no room left.
    async fn reserve(&self, spec: &CallSpec<'_>) -> Result<Hold, JobError> {
        let estimate = self.estimate_max(spec);
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

    /// The most a call can plausibly cost, priced modality by modality: generous token counts
    /// for text, the largest per-image output (6,240 tokens, high quality at 1024x1536) for
    /// each image. Modalities a model has no rate for cannot be billed and are skipped.
    fn estimate_max(&self, spec: &CallSpec<'_>) -> i64 {
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
            .filter_map(|usage| self.services.prices.cost_micros(usage).ok())
            .sum()
    }

    /// Whether the provider's circuit lets a call through (closed, or this is the probe).
    pub async fn circuit_allows(&self, billing_provider: &str) -> Result<bool, JobError> {
        let permit = self
            .services
            .breaker
            .permit(billing_provider)
            .await
            .map_err(JobError::infrastructure)?;
        Ok(!matches!(permit, Permit::Open { .. }))
    }

    /// Adds a notice to the job.
    pub async fn notice(&self, notice: Notice) -> Result<(), JobError> {
        self.apply(JobUpdate {
            add_notices: vec![notice],
            ..JobUpdate::default()
        })
        .await
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

    /// Applies an update to a job that must still be active, after what is carried (in the
    /// same write).
    pub async fn apply(&self, update: JobUpdate) -> Result<(), JobError> {
        self.carry(update, false);
        self.flush().await
    }

    async fn write(&self, update: &JobUpdate) -> Result<(), JobError> {
        match self
            .services
            .store
            .update(self.job_id, Guard::Active, update)
            .await
            .map_err(JobError::infrastructure)?
        {
            UpdateOutcome::Applied { .. } => Ok(()),
            UpdateOutcome::Refused(status) => Err(JobError::Ended(status)),
            UpdateOutcome::Missing => Err(JobError::Ended(JobStatus::Canceled)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_intent_but_unclear_has_one_agent_named_after_it() {
        let mut settings = Settings::defaults().unwrap();
        settings.openai.api_key = None;
        settings.gemini.api_key = None;
        let providers = Providers::from_settings(&settings).unwrap();
        let agents = registry(&providers, &settings);

        assert!(agents.contains_key(ENTRY_AGENT));
        for intent in Intent::ALL {
            let serving: Vec<&str> = agents
                .values()
                .filter(|agent| agent.route().is_some_and(|route| route.intent == intent))
                .map(|agent| agent.name())
                .collect();
            if intent == Intent::Unclear {
                assert!(serving.is_empty(), "{serving:?} serve unclear");
            } else {
                // The api resumes a clarified job at the agent named like the chosen intent.
                assert_eq!(serving, [intent.as_str()], "agents serving {intent:?}");
            }
        }
    }
}
