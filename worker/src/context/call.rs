//! The provider call path: one billed call under the fleet's policies, paid for at most once
//! per step. [`AgentContext::call`] is the loop; each of its steps is a function here.
//!
//! 0. **Pay once** ([`AgentContext::kept`]): a step whose answer is already durable gets it
//!    back, with no admission, hold or call. This is the one place that makes every retry,
//!    redelivery, watchdog requeue and restart resume after a paid step.
//! 1. **The gate** ([`AgentContext::begin`], one script and one round trip): the model's
//!    rate-limit buckets and the fair share, a budget hold priced from what the call asks for,
//!    and the attempt's write: count it on the job, mark the job running and the call in
//!    flight, with the carried job writes, all before the request is sent (the lease renewal
//!    beside it). A run that later finds the mark knows a call may have been billed
//!    unrecorded. A limit that says no defers the job; a blocking budget with no room defers
//!    or fails it; a job that ended stops here. In each of those nothing is held or written.
//! 2. **Attempt** ([`AgentContext::attempt`]): the HTTP call itself, inside a `provider_call`
//!    span that the trace exporters turn into a generation span, with its metrics.
//! 3. **Settle a success** ([`AgentContext::settle_success`]): keep the answer (its images in
//!    the object store, after which the answer itself is dropped), then one atomic write: the
//!    ledger entry, the step's durable answer, the usage on the job, the end of the in-flight
//!    mark and of the hold. That write waits for the run's next one ([`PendingSettlement`]):
//!    the job's final write takes it along in its own script, and anything else (the next
//!    call's gate, any other end of the run) writes it first. Trouble with either is retried
//!    in place, holding what it needs, within the job's infrastructure budget.
//! 4. **Settle a failure** ([`AgentContext::settle_failure`]): give the hold back (or, when
//!    the request may have been billed, record the call as possibly billed at its estimate),
//!    tell the breaker, and decide ([`decide`]) between trying again here, deferring the job,
//!    and failing it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shared::codes::{FailureCode, NoticeKind};
use shared::domain::{JobStatus, Notice, Usage};
use shared::fair::{BucketAsk, Grant};
use shared::ledger::{Billing, Hold, Ledger, LedgerEntry, LedgerError, Month, Settled, Settlement};
use shared::retry::RetryPolicy;
use shared::store::{
    CallInFlight, Gate, GateSteps, JobRecord, JobUpdate, StepRecord, UpdateOutcome, step_field,
};
use tracing::Instrument;

use super::{AgentContext, CallSpec};
use crate::attempts::Verdict;
use crate::error::{Failure, JobError};
use crate::providers::{Answer, ProviderError, Retry};

/// One attempt under way: its number in the step, its hold and its in-flight mark.
#[derive(Clone)]
struct Started {
    number: u32,
    hold: Hold,
    call: CallInFlight,
}

/// What to do after a failed attempt.
#[derive(Debug)]
enum Next {
    /// Try again in this process after the delay.
    RetryAfter(Duration),
    /// End the call with this error (deferral or failure).
    Stop(JobError),
}

/// A paid answer, kept (its images stored) but not yet entered: its ledger entry, its step
/// record and the end of its hold and in-flight mark, written in one settlement. It waits for
/// the run's next write to the job, so that the job's final write carries it in the same
/// script (a round trip fewer a job); any other write settles it first, alone, as it would have
/// been at once ([`AgentContext::settle_pending`]). Between the answer and that write the run
/// does no I/O of its own (the breaker hears of the success after it,
/// [`AgentContext::answer_kept`]): a run that dies there leaves the call's in-flight mark, as a
/// run that died before the settlement always did.
pub struct PendingSettlement {
    /// The step the answer belongs to (the agent that asked).
    agent: &'static str,
    entry: LedgerEntry,
    started: Started,
    /// The step's record ([`StepRecord`]) as JSON.
    record: String,
    /// The provider whose circuit breaker hears of the success once the answer is kept, for a
    /// call under a breaker.
    breaker: Option<&'static str>,
}

impl PendingSettlement {
    /// The call's cost and usage, as its settlement writes them on the job.
    pub fn priced(&self) -> (i64, Usage) {
        (self.entry.cost_micros, self.entry.usage.clone())
    }
}

/// What a paid call's settlement writes besides its entry: the end of its hold and of its
/// in-flight mark, its usage on the job and, with `step`, its kept answer.
fn settlement<'a>(started: &'a Started, step: Option<(&'a str, &'a str)>) -> Settlement<'a> {
    Settlement {
        hold: Some(&started.hold),
        step,
        call_id: Some(&started.call.call_id),
        only_if_in_flight: false,
        usage_on_job: true,
    }
}

/// The step's record of a kept answer ([`StepRecord`]), as JSON.
fn step_record<K: serde::Serialize>(
    kept: &K,
    entry: &LedgerEntry,
    started: &Started,
) -> serde_json::Result<String> {
    serde_json::to_string(&StepRecord {
        call_id: started.call.call_id.clone(),
        answer: serde_json::to_value(kept)?,
        usage: entry.usage.clone(),
        cost_micros: entry.cost_micros,
        at: entry.at,
    })
}

impl AgentContext {
    /// Takes the paid answer still to be entered, for the write that carries it (the job's
    /// final write) or settles it first ([`Self::settle_pending`]).
    pub fn take_pending(&self) -> Option<PendingSettlement> {
        super::lock(&self.pending).take()
    }

    /// The settlement's part of the job's final write ([`shared::store::RunEnd::settle`]), or
    /// `None` when it must be written alone ([`Ledger::settle_part`]).
    pub fn settlement_part(&self, pending: &PendingSettlement) -> Option<shared::script::Part> {
        let field = step_field(pending.agent);
        self.services.ledger.settle_part(
            &pending.entry,
            settlement(&pending.started, Some((&field, &pending.record))),
        )
    }

    /// Writes a paid answer's settlement alone, retried in place within the job's budget of
    /// infrastructure failures; past it the call is still entered in the ledger if Redis
    /// lets it, and the job fails ([`JobError::Abandoned`]).
    pub async fn settle_pending(&self, pending: PendingSettlement) -> Result<(), JobError> {
        loop {
            match self.record_step(&pending).await {
                Ok(()) => {
                    self.answer_kept(&pending).await;
                    return Ok(());
                }
                Err(error) => {
                    self.wait_out(&pending.entry, &pending.started, &error)
                        .await?;
                }
            }
        }
    }

    /// Runs one provider call under the rate limits and the retry policy, at most once per
    /// step: a step whose answer is durable gets it back instead. Each attempt counts on the
    /// job; while it waits to retry, the job shows `retrying` with a notice naming the attempt;
    /// a rate limit defers the whole job through a delay queue. The answer is kept (images in
    /// the object store) and recorded, with its usage under the running agent and its cost, on
    /// the job and in the ledger before this returns.
    pub async fn call<T, F, Fut>(
        &self,
        spec: &CallSpec<'_>,
        mut attempt: F,
    ) -> Result<T::Kept, JobError>
    where
        T: Answer,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        if let Some(kept) = self.kept::<T>()? {
            return Ok(kept);
        }
        // The gate and the settlements are boxed: awaited in place, their state would be part of
        // this future while it waits on the provider (5.2 against 0.9 KiB), for every job in
        // flight (see `Pipeline::run_inner`).
        loop {
            let started = Box::pin(self.begin(spec)).await?;
            let (result, took) = self.attempt(spec, started.number, attempt()).await;
            match result {
                Ok(answer) => {
                    return Box::pin(self.settle_success(spec, &started, answer, took)).await;
                }
                Err(error) => {
                    match Box::pin(self.settle_failure(spec, &started, error, took)).await? {
                        Next::RetryAfter(delay) => tokio::time::sleep(delay).await,
                        Next::Stop(error) => return Err(error),
                    }
                }
            }
        }
    }

    /// Step 0: the running agent's paid answer, if its step has one.
    fn kept<T: Answer>(&self) -> Result<Option<T::Kept>, JobError> {
        let Some(step) = self.steps.get(self.agent()) else {
            return Ok(None);
        };
        match serde_json::from_value(step.answer.clone()) {
            Ok(kept) => {
                tracing::info!(
                    call_id = %step.call_id,
                    "Step already paid for; using its kept answer"
                );
                crate::metrics::kept_answer_reused(self.agent());
                Ok(Some(kept))
            }
            // Calling again would pay twice for an answer that exists: fail instead.
            Err(error) => Err(JobError::Permanent(Failure::new(
                FailureCode::InternalError,
                format!(
                    "the kept answer of step {} does not read: {error}",
                    self.agent()
                ),
            ))),
        }
    }

    /// Step 1, in one script and one round trip ([`JobStore::pass_gate`]): the model's
    /// limits and the fair share, the budget hold, and the attempt's write on the job (with
    /// whatever was carried, and the lease renewal beside it). The write counts the attempt,
    /// shows it and marks the call in flight before the request leaves, so a run that finds
    /// the mark knows this call may have been billed. A limit that says no defers the job, a
    /// blocking budget with no room defers or fails it, and a job that ended stops here; in
    /// none of those is anything held or written, and the carried writes stay carried (they
    /// go with the job's deferral or end, whose write is guarded the same way).
    ///
    /// [`JobStore::pass_gate`]: shared::store::JobStore::pass_gate
    async fn begin(&self, spec: &CallSpec<'_>) -> Result<Started, JobError> {
        // An earlier call's answer is entered before this one may cost anything.
        if let Some(pending) = self.take_pending() {
            Box::pin(self.settle_pending(pending)).await?;
        }
        let group = format!("{}:{}", spec.billing_provider, spec.model);
        let asks = self.asks(spec, &group);
        let acquire = match &asks {
            Some(asks) => Some(
                self.services
                    .fair
                    .acquire_part(&self.user, &group, asks)
                    .map_err(JobError::infrastructure)?,
            ),
            None => None,
        };
        let estimate = estimate_max(spec, &self.services.prices);
        let (reserve, hold) = self.services.ledger.reserve_part(estimate);
        let number = self.step_attempts.load(Ordering::SeqCst) + 1;
        let call = CallInFlight {
            call_id: uuid::Uuid::new_v4().simple().to_string(),
            agent: self.agent().to_string(),
            estimate: Usage {
                agent: self.agent().to_string(),
                ..estimate_usage(spec)
            },
            estimate_micros: hold.amount,
            hold_id: hold.id.clone(),
            hold_month: hold.month.to_string(),
            started_at: chrono::Utc::now(),
        };
        let attempt = JobUpdate {
            status: Some(JobStatus::Running),
            provider: Some(spec.provider.to_string()),
            model: Some(spec.model.to_string()),
            add_attempts: 1,
            step_attempts: Some(number),
            call_in_flight: Some(Some(call.clone())),
            ..JobUpdate::default()
        };
        let (carried, renew) = self.carried();
        let update = match carried {
            Some(earlier) => earlier.then(attempt),
            None => attempt,
        };
        let steps = GateSteps {
            acquire,
            reserve: (reserve, hold),
            update: &update,
        };
        let lease = async {
            if renew {
                self.renew_lease().await
            } else {
                Ok(())
            }
        };
        let (gate, lease) = tokio::join!(self.services.store.pass_gate(self.job_id, steps), lease);
        let gate = gate.map_err(JobError::infrastructure)?;
        let hold = match gate {
            Gate::Passed { hold, .. } => hold,
            Gate::Denied(grant) => {
                return Err(deferral(grant, asks.as_deref().unwrap_or(&[]), &group));
            }
            Gate::Refused { spent, reserved } => {
                return Err(self.no_room(estimate, spent, reserved));
            }
            Gate::Ended(UpdateOutcome::Refused(status)) => return Err(JobError::Ended(status)),
            Gate::Ended(_) => return Err(JobError::record_lost()),
        };
        self.sent_carried();
        if let Err(error) = lease {
            // Another run holds the job now: this one makes no call.
            if let Err(error) = self.services.ledger.release(&hold).await {
                tracing::warn!(%error, "Could not release a budget hold; it expires by itself");
            }
            return Err(error);
        }
        self.step_attempts.store(number, Ordering::SeqCst);
        Ok(Started { number, hold, call })
    }

    /// The model's buckets this call takes from, `None` for a model without limits.
    fn asks(&self, spec: &CallSpec<'_>, group: &str) -> Option<Vec<BucketAsk>> {
        let limits = self.services.limits.get(group)?;
        Some(
            buckets(spec, limits)
                .into_iter()
                .map(|bucket| BucketAsk {
                    name: format!("{group}:{}", bucket.kind),
                    cost: bucket.cost,
                    per_minute: bucket.per_minute,
                    burst: bucket.burst,
                })
                .collect(),
        )
    }

    /// A blocking budget has no room for the call's hold: wait for the calls in flight when
    /// there will be room once they settle (their holds are worst cases), else fail the job.
    fn no_room(&self, estimate: i64, spent: i64, reserved: i64) -> JobError {
        let budget = self.services.ledger.policy().monthly_micros;
        if spent + estimate <= budget {
            crate::metrics::deferral("budget_hold");
            return JobError::Deferred {
                after: Duration::from_secs(1),
                reason: format!("budget held by calls in flight ({reserved} micro-dollars)"),
            };
        }
        JobError::Permanent(Failure::new(
            FailureCode::BudgetExhausted,
            format!(
                "blocking budget: spent {spent} + estimate {estimate} micro-dollars exceeds {budget}"
            ),
        ))
    }

    /// Step 2: the call itself, in one span per provider call (the trace exporters turn it into
    /// a generation span), with its request metric. Answers the result and how long it took.
    async fn attempt<T: Answer>(
        &self,
        spec: &CallSpec<'_>,
        number: u32,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> (Result<T, ProviderError>, Duration) {
        let span = provider_call_span(spec, number, self.services.redact_prompts);
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

    /// Step 3: keeps the answer and records it, in place until it is done: the answer is in
    /// hand and was paid for, so infrastructure trouble is waited out here (within the job's
    /// budget of infrastructure failures) rather than handed to a retry that would call again.
    /// Past the budget the call is still entered in the ledger if Redis allows, and the job
    /// fails.
    async fn settle_success<T: Answer>(
        &self,
        spec: &CallSpec<'_>,
        started: &Started,
        mut answer: T,
        took: Duration,
    ) -> Result<T::Kept, JobError> {
        tracing::info!(
            provider = spec.provider,
            model = spec.model,
            elapsed_ms = took.as_millis() as u64,
            attempt = started.number,
            "Provider call succeeded"
        );
        let usage = answer.usage_mut();
        usage.agent = self.agent().to_string();
        let entry = LedgerEntry {
            at: chrono::Utc::now(),
            job_id: self.job_id,
            user: self.user.clone(),
            cost_micros: self.price(usage),
            usage: usage.clone(),
            billing: Billing::Billed,
        };
        // The images first, then the record, each retried in place: once the images are
        // stored the answer (its decoded images, and with them their share of the response
        // budget) is dropped, so a slow settlement holds a few hundred bytes, not megabytes.
        let kept = loop {
            // A provider answered and nothing is kept yet: where a test kills a worker to show
            // what an unknown outcome costs (`shared::failpoint`).
            shared::failpoint::hit("after_answer", self.agent()).await;
            match answer.keep(&self.services.images, self.job_id).await {
                Ok(kept) => break kept,
                Err(error) => self.wait_out(&entry, started, &error).await?,
            }
        };
        drop(answer);
        let record = match step_record(&kept, &entry, started) {
            Ok(record) => record,
            Err(error) => {
                let why = format!("the answer of a billed call could not be written down: {error}");
                return Err(self.lose_answer(&entry, started, why).await);
            }
        };
        crate::metrics::cost(&entry.usage.provider, &entry.usage.agent, entry.cost_micros);
        *super::lock(&self.pending) = Some(PendingSettlement {
            agent: self.agent(),
            entry,
            started: started.clone(),
            record,
            breaker: spec.breaker.then_some(spec.billing_provider),
        });
        Ok(kept)
    }

    /// Infrastructure trouble while a paid answer is in hand: waits before the next try, or,
    /// past the job's budget of such failures, enters the call and fails the job.
    async fn wait_out(
        &self,
        entry: &LedgerEntry,
        started: &Started,
        error: &anyhow::Error,
    ) -> Result<(), JobError> {
        tracing::warn!(error = %format!("{error:#}"), "Could not keep a paid answer yet");
        match self.infra_failure().await {
            Verdict::RetryAfter(pause) => {
                tokio::time::sleep(pause).await;
                Ok(())
            }
            Verdict::Exhausted(failures) => {
                let why = format!(
                    "the answer of a billed call could not be kept after {failures} infrastructure failures: {error:#}"
                );
                Err(self.lose_answer(entry, started, why).await)
            }
        }
    }

    /// Writes the ledger entry, the step's kept answer, the usage on the job, the end of the
    /// in-flight mark and of the hold in one script.
    async fn record_step(&self, pending: &PendingSettlement) -> anyhow::Result<()> {
        if shared::failpoint::fails("settle_step") {
            anyhow::bail!("failpoint settle_step");
        }
        let field = step_field(pending.agent);
        let settled = self
            .record_billed(
                &pending.entry,
                &pending.started,
                Some((&field, &pending.record)),
            )
            .await?;
        if settled == Settled::AlreadyKept {
            tracing::info!("The answer was recorded by an earlier try of this settlement");
        }
        Ok(())
    }

    /// Enters the billed call in the ledger, its usage on the job, the end of its hold and of
    /// its in-flight mark, and with `step` its kept answer, in one script.
    async fn record_billed(
        &self,
        entry: &LedgerEntry,
        started: &Started,
        step: Option<(&str, &str)>,
    ) -> Result<Settled, LedgerError> {
        self.services
            .ledger
            .settle(entry, settlement(started, step))
            .await
    }

    /// A paid answer cannot be kept (`why`): the call is entered in the ledger if Redis lets it
    /// (it was billed, kept or not), and the job fails.
    async fn lose_answer(&self, entry: &LedgerEntry, started: &Started, why: String) -> JobError {
        let recorded = self.record_billed(entry, started, None).await;
        if let Err(error) = recorded {
            tracing::error!(%error, "A billed call could not be entered in the ledger; its in-flight mark will be recorded as possibly billed");
        }
        crate::metrics::infra_exhausted("keep_answer");
        JobError::Abandoned(Failure::new(FailureCode::ProcessingFailed, why))
    }

    /// A paid answer and its ledger entry are durable (written alone or with the job's end):
    /// where a test stops a worker (`shared::failpoint`), then the breaker hears that the
    /// provider answered (best effort: a lost success only delays the breaker's closing until
    /// the next one).
    pub async fn answer_kept(&self, pending: &PendingSettlement) {
        shared::failpoint::hit("after_step_kept", pending.agent).await;
        let Some(provider) = pending.breaker else {
            return;
        };
        if let Err(error) = self.services.breaker.record_success(provider).await {
            tracing::warn!(%error, "Could not tell the circuit breaker about a success");
        }
    }

    /// Step 4: a failed call gives its hold back and its in-flight mark ends, or, when the
    /// request may have been billed without an answer (a timeout, a cut connection), it is
    /// recorded as possibly billed at its estimate. A provider failure counts on the breaker;
    /// then [`decide`] says what comes next, and a retry here shows on the job.
    async fn settle_failure(
        &self,
        spec: &CallSpec<'_>,
        started: &Started,
        error: ProviderError,
        took: Duration,
    ) -> Result<Next, JobError> {
        let number = started.number;
        if error.possibly_billed {
            self.record_possibly_billed(&started.call, "no_answer")
                .await
                .map_err(JobError::infrastructure)?;
        } else {
            self.services
                .ledger
                .release(&started.hold)
                .await
                .map_err(JobError::infrastructure)?;
            // The mark goes with the job's next write (the retry notice, a deferral or its end).
            self.carry(
                JobUpdate {
                    call_in_flight: Some(None),
                    ..JobUpdate::default()
                },
                false,
            );
        }
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

    /// Records `call` in the ledger as possibly billed, at its estimate, and ends its mark and
    /// its hold (one script).
    async fn record_possibly_billed(
        &self,
        call: &CallInFlight,
        reason: &'static str,
    ) -> Result<(), LedgerError> {
        settle_unknown(
            &self.services.ledger,
            self.job_id,
            &self.user,
            call,
            false,
            reason,
        )
        .await
        .map(|_| ())
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

/// The span of attempt `number` of a call. The prompt is on it only when traces are not
/// redacted: the OpenAI traces layer reads it from here, and every other reader of spans (the
/// OTLP exporter, the log lines inside the span) would carry it too.
fn provider_call_span(spec: &CallSpec<'_>, number: u32, redact_prompts: bool) -> tracing::Span {
    let span = tracing::info_span!(
        "provider_call",
        provider = spec.provider,
        model = spec.model,
        attempt = number,
        prompt = tracing::field::Empty,
        outcome = tracing::field::Empty,
        input_tokens = tracing::field::Empty,
        output_tokens = tracing::field::Empty,
        images = tracing::field::Empty,
    );
    if !redact_prompts {
        span.record("prompt", spec.prompt);
    }
    span
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
/// The deferral for a call the model's limits or fair share turned away: after the limits'
/// wait, or after about the slots the others need before this user's turn (`ahead` of the
/// model's slowest bucket's pace for this call).
fn deferral(grant: Grant, asks: &[BucketAsk], group: &str) -> JobError {
    match grant {
        Grant::OverShare { ahead } => {
            crate::metrics::deferral("fair_share");
            let slot = asks
                .iter()
                .map(|ask| Duration::from_secs(60) * ask.cost / ask.per_minute)
                .max()
                .unwrap_or(Duration::from_secs(1));
            JobError::Deferred {
                after: (slot * ahead).max(Duration::from_millis(500)),
                reason: format!("{group} shared with other users' waiting jobs"),
            }
        }
        Grant::Limited { retry_after } => {
            crate::metrics::deferral("local_limit");
            JobError::Deferred {
                after: retry_after,
                reason: format!("{group} limits reached"),
            }
        }
        // Not a denial; the gate denies only what the limits refused.
        Grant::Granted => JobError::Deferred {
            after: Duration::ZERO,
            reason: format!("{group} limits reached"),
        },
    }
}

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

/// The usage a call's hold is priced from: the capability's worst case of its request, or, for a
/// call without one, generous token counts for text and the largest per-image output (6,240
/// tokens, high quality at 1024x1536) for each image.
fn estimate_usage(spec: &CallSpec<'_>) -> Usage {
    let base = Usage {
        provider: spec.billing_provider.to_string(),
        model: spec.model.to_string(),
        ..Usage::default()
    };
    if let Some(estimate) = &spec.estimate {
        return Usage {
            provider: base.provider,
            model: base.model,
            ..estimate.clone()
        };
    }
    let images = u64::from(spec.images);
    Usage {
        input_text_tokens: u64::from(spec.tokens) + 2_000,
        output_text_tokens: 1_000,
        input_image_tokens: if images > 0 { 1_600 } else { 0 },
        output_image_tokens: images * 6_240,
        images: spec.images,
        ..base
    }
}

/// The most a call can cost: its estimate priced modality by modality through the price table
/// that prices the settled call. Modalities a model has no rate for cannot be billed and are
/// skipped.
fn estimate_max(spec: &CallSpec<'_>, prices: &shared::pricing::PriceTable) -> i64 {
    let usage = estimate_usage(spec);
    let only = |set: &dyn Fn(&mut Usage)| {
        let mut line = Usage {
            agent: String::new(),
            provider: usage.provider.clone(),
            model: usage.model.clone(),
            images: usage.images,
            ..Usage::default()
        };
        set(&mut line);
        line
    };
    let lines = [
        only(&|line| line.input_text_tokens = usage.input_text_tokens),
        only(&|line| line.output_text_tokens = usage.output_text_tokens),
        only(&|line| line.input_image_tokens = usage.input_image_tokens),
        only(&|line| line.output_image_tokens = usage.output_image_tokens),
    ];
    lines
        .iter()
        .filter_map(|line| prices.cost_micros(line).ok())
        .sum()
}

/// Records a call whose outcome is unknown as possibly billed, at its estimate, ending its
/// in-flight mark and its hold. With `only_if_in_flight`, nothing happens unless the job still
/// carries the mark (a run that finds an orphaned call, while another may have settled it).
async fn settle_unknown(
    ledger: &Ledger,
    job_id: shared::domain::JobId,
    user: &shared::domain::UserId,
    call: &CallInFlight,
    only_if_in_flight: bool,
    reason: &'static str,
) -> Result<Settled, LedgerError> {
    let entry = LedgerEntry {
        at: chrono::Utc::now(),
        job_id,
        user: user.clone(),
        usage: call.estimate.clone(),
        cost_micros: call.estimate_micros,
        billing: Billing::PossiblyBilled,
    };
    let hold = Month::parse(&call.hold_month).map(|month| Hold {
        id: call.hold_id.clone(),
        month,
        amount: call.estimate_micros,
    });
    let settled = ledger
        .settle(
            &entry,
            Settlement {
                hold: hold.as_ref(),
                call_id: Some(&call.call_id),
                only_if_in_flight,
                ..Settlement::default()
            },
        )
        .await?;
    if settled == Settled::Recorded {
        tracing::warn!(
            call_id = %call.call_id, agent = %call.agent, reason,
            estimate_micros = call.estimate_micros,
            "A provider call's outcome is unknown; recorded as possibly billed"
        );
        crate::metrics::possibly_billed(reason);
    }
    Ok(settled)
}

/// A run found `job` with a call marked in flight: the run before it died (or hung) with the
/// request out. The call may have been billed, so it is recorded as possibly billed, unless
/// another run settled it meanwhile.
pub(crate) async fn settle_orphaned_call(
    ledger: &Ledger,
    job: &JobRecord,
) -> Result<(), LedgerError> {
    if let Some(call) = &job.call_in_flight {
        settle_unknown(ledger, job.id, &job.user, call, true, "worker_lost").await?;
    }
    Ok(())
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
            estimate: None,
        }
    }

    fn failure(code: FailureCode, retry: Retry) -> ProviderError {
        ProviderError::new("openai", code, retry, "test".to_string(), Some(500))
    }

    /// A log sink the test reads back.
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// One attempt's span with `prompt`, a log line inside it, as the OTLP exporter and the
    /// JSON and text logs saw them.
    fn exported(prompt: &str, redact: bool) -> (String, String) {
        use tracing_subscriber::layer::SubscriberExt;
        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = shared::telemetry::otlp::provider_with("worker", exporter.clone());
        let (json, text) = (Sink::default(), Sink::default());
        let (json_writer, text_writer) = (json.clone(), text.clone());
        let subscriber = tracing_subscriber::registry()
            .with(shared::telemetry::otlp::layer(&provider))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(move || json_writer.clone()),
            )
            .with(tracing_subscriber::fmt::layer().with_writer(move || text_writer.clone()));
        let spec = CallSpec {
            prompt,
            ..spec(1, 0)
        };
        tracing::subscriber::with_default(subscriber, || {
            let span = provider_call_span(&spec, 1, redact);
            let _entered = span.enter();
            tracing::warn!("Provider answered slowly");
        });
        provider.force_flush().unwrap();
        let spans = format!("{:?}", exporter.get_finished_spans().unwrap());
        assert!(spans.contains("provider_call"), "the span was exported");
        let logs = [json, text]
            .map(|sink| String::from_utf8(sink.0.lock().unwrap().clone()).unwrap())
            .join("\n");
        assert!(logs.contains("Provider answered slowly"), "{logs}");
        (spans, logs)
    }

    #[test]
    fn a_redacted_prompt_reaches_no_exporter_and_no_log_line() {
        let canary = "canary-7f3a9 a fox in a tuxedo";
        let (spans, logs) = exported(canary, true);
        assert!(!spans.contains("canary-7f3a9"), "{spans}");
        assert!(!logs.contains("canary-7f3a9"), "{logs}");

        // Unredacted, the same span carries it everywhere: the test would see a leak.
        let (spans, logs) = exported(canary, false);
        assert!(spans.contains("canary-7f3a9"), "{spans}");
        assert!(logs.contains("canary-7f3a9"), "{logs}");
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
