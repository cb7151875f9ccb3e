//! Runs one job from its message to its final state: load, mark running, walk the agent chain
//! from the router, store images, and write the terminal state exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use shared::codes::{FailureCode, NoticeKind};
use shared::domain::{Clarification, JobId, JobStatus, Notice, StoredImage, UserError};
use shared::images::{ImageStore, ImageStoreError};
use shared::queue::JobMessage;
use shared::store::{
    Claim, Guard, JobRecord, JobStore, JobUpdate, Recreated, RunEnd, UpdateOutcome,
};
use tracing::Instrument;

use crate::agents::{Agent, AgentContext, ENTRY_AGENT, Failure, JobError, JobInput, Outcome};
use crate::context::Services;
use crate::context::{PendingSettlement, settle_orphaned_call};

/// The `outcome` label of one agent run.
fn run_outcome(result: &Result<Outcome, JobError>) -> &'static str {
    match result {
        Ok(Outcome::Handoff { .. }) => "handoff",
        Ok(Outcome::Images(_)) => "ok",
        Ok(Outcome::Clarify(_)) => "clarify",
        Err(JobError::Deferred { .. }) => "deferred",
        Err(JobError::Ended(_)) => "ended",
        Err(JobError::Permanent(_) | JobError::Abandoned(_) | JobError::Retryable { .. }) => {
            "failed"
        }
    }
}

/// Longest a copy of a job's message waits before checking again whether another run of the
/// job still holds it.
const RECHECK_BUSY: Duration = Duration::from_secs(60);

/// Longest agent chain a job may walk; a loop of handoffs is a bug, not a reason to hang.
const MAX_HOPS: usize = 4;

/// What the pipeline needs, shared by all jobs of a worker.
pub struct Pipeline {
    pub store: JobStore,
    pub images: ImageStore,
    pub agents: HashMap<&'static str, Arc<dyn Agent>>,
    pub services: Arc<Services>,
}

/// What a run knows of its job for the statistics of its end.
#[derive(Clone, Copy)]
struct Seen {
    created_at: chrono::DateTime<chrono::Utc>,
    intent: Option<shared::domain::Intent>,
    deferrals: u32,
}

/// The lease a delivery's run holds on its job ([`JobStore::get_and_claim`]), and whether the
/// job's final write gave it back (then the consumer need not).
pub struct RunLease {
    pub runner: String,
    released: AtomicBool,
}

impl RunLease {
    pub fn new(runner: String) -> Self {
        Self {
            runner,
            released: AtomicBool::new(false),
        }
    }

    /// Whether the job's final write gave the lease back.
    pub fn released(&self) -> bool {
        self.released.load(Ordering::Relaxed)
    }
}

/// One run of a job, as the write of its end needs it.
struct Run<'a> {
    job_id: JobId,
    /// The lease to give back with the job's end (none: the caller gives it back).
    lease: Option<&'a RunLease>,
    /// The message being run (none: a job ended without one), which can write the job again
    /// if Redis loses it ([`Pipeline::end_lost_record`]).
    message: Option<&'a JobMessage>,
    /// What the statistics need of the job, once it is read.
    seen: std::sync::Mutex<Option<Seen>>,
    /// Whether the end's write counted the job in the statistics.
    counted: AtomicBool,
}

impl<'a> Run<'a> {
    fn new(job_id: JobId, lease: Option<&'a RunLease>, message: Option<&'a JobMessage>) -> Self {
        Self {
            job_id,
            lease,
            message,
            seen: std::sync::Mutex::new(None),
            counted: AtomicBool::new(false),
        }
    }

    fn runner(&self) -> &str {
        self.lease.map_or("", |lease| lease.runner.as_str())
    }

    fn see(&self, seen: Seen) {
        if let Ok(mut slot) = self.seen.lock() {
            *slot = Some(seen);
        }
    }

    fn saw_intent(&self, intent: Option<shared::domain::Intent>) {
        if let Ok(mut slot) = self.seen.lock()
            && let Some(seen) = slot.as_mut()
        {
            seen.intent = intent;
        }
    }

    fn seen(&self) -> Option<Seen> {
        self.seen.lock().ok().and_then(|seen| *seen)
    }
}

/// A run's last paid answer not entered yet, with the context that can enter it alone.
struct Last<'a> {
    pending: PendingSettlement,
    cx: &'a AgentContext,
}

impl Last<'_> {
    /// Enters the answer in a write of its own ([`AgentContext::settle_pending`]).
    async fn settle_alone(self) -> Result<(), JobError> {
        Box::pin(self.cx.settle_pending(self.pending)).await
    }
}

/// How a job left the pipeline (for logs and the consumer's ack decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// The job reached this terminal status now.
    Ended(JobStatus),
    /// Nothing to do: the job was already terminal, or is gone.
    Skipped,
    /// A rate limit says wait: the job is `queued` again and its message must go back through
    /// a delay queue for this long.
    Deferred(Duration),
    /// The job may not start yet (its user sent jobs faster than their pace): its message goes
    /// back through a delay queue holding it at most this long, and is checked again.
    NotYet(Duration),
    /// The job used up its infrastructure attempts and ended `failed` now: its message goes to
    /// the dead-letter queue, where ops can replay it once the trouble is fixed.
    Abandoned,
}

impl Pipeline {
    /// Runs the message's job as `lease`'s run (one delivery's run: the same for each try of
    /// it). `Err` means "try later" (infrastructure trouble).
    pub async fn run(
        &self,
        message: &JobMessage,
        deliveries_before: u32,
        delivery_limit: u32,
        lease: &RunLease,
    ) -> Result<Finished, JobError> {
        let run = Run::new(message.job_id(), Some(lease), Some(message));
        let result = self
            .run_inner(message, deliveries_before, delivery_limit, &run)
            .await;
        let ended = match result {
            Ok(Finished::Ended(status)) => Some(status),
            Ok(Finished::Abandoned) => Some(JobStatus::Failed),
            _ => None,
        };
        let seen = run
            .seen
            .lock()
            .map(|mut seen| seen.take())
            .unwrap_or_default();
        if let (Some(status), Some(job)) = (ended, seen) {
            // The job ended here and now: count it, with its intent and its whole life span.
            let lived = (chrono::Utc::now() - job.created_at)
                .to_std()
                .unwrap_or_default();
            crate::metrics::job_finished(status, job.intent, lived);
            crate::metrics::job_deferrals(job.deferrals);
            // Counted in the final write, unless the job ended by another write.
            if !run.counted.load(Ordering::Relaxed) {
                let recorded = Box::pin(self.services.stats.job_finished(
                    chrono::Utc::now(),
                    status,
                    job.intent,
                    lived,
                ))
                .await;
                if let Err(error) = recorded {
                    tracing::warn!(%error, "Could not record the job in the daily statistics");
                }
            }
        }
        result
    }

    async fn run_inner(
        &self,
        message: &JobMessage,
        deliveries_before: u32,
        delivery_limit: u32,
        run: &Run<'_>,
    ) -> Result<Finished, JobError> {
        let runner = run.runner();
        // One round trip reads the job and, unless its message says not yet, claims its run:
        // one run at a time, since a copy of the message delivered while another run of the
        // job goes on (its channel closed before it could ack) must wait for that run's lease.
        let now = chrono::Utc::now();
        let claimed = std::time::Instant::now();
        let until =
            now + chrono::Duration::from_std(self.services.job_deadline).unwrap_or_default();
        let job_id = message.job_id();
        // Each step's future is boxed, here and in the consumer and call path, so that a job
        // waiting on its provider holds only the state of that wait: a future awaited in
        // place is part of its caller's state for the whole run (the largest step sets the
        // size), and at concurrency 1,024 each KiB per job is a MiB (docs/benchmarks.md).
        let claim_now = message.wait_left(now).is_none();
        let found = Box::pin(self.store.get_and_claim(job_id, runner, until, claim_now))
            .await
            .map_err(JobError::infrastructure)?;
        let (job, claim) = match found {
            Some(found) => found,
            // Gone from Redis: recreated from the message, and claimed below.
            None => match Box::pin(self.load(message)).await? {
                Some(job) => (job, Claim::NotTried),
                None => return Ok(Finished::Skipped),
            },
        };
        // What the statistics need of a job that ends in this run, known without reading the
        // job back: only this run writes it (one run at a time), and of what they count only
        // the intent changes while it runs (a handoff), which the agents' context follows.
        run.see(Seen {
            created_at: job.created_at,
            intent: job.intent,
            deferrals: job.deferrals,
        });
        if job.status.is_terminal() {
            tracing::info!(
                status = job.status.as_str(),
                "Job already ended; nothing to do"
            );
            // Its message is acked next, so the end must survive a failover even when the
            // write that made it fell short of its replicas (that shortfall is why a run may be
            // here): a write of this connection's own, then the replicas' acknowledgement of
            // it, covers every write before it on the primary.
            Box::pin(self.store.mark_accepted(job_id, None))
                .await
                .map_err(JobError::infrastructure)?;
            return Ok(Finished::Skipped);
        }
        if let Some(left) = message.wait_left(now) {
            return Ok(Finished::NotYet(left));
        }
        let held = match claim {
            Claim::Taken => None,
            Claim::HeldUntil(held_until) => Some(held_until),
            Claim::NotTried => Box::pin(self.store.claim_run(job_id, runner, until))
                .await
                .map_err(JobError::infrastructure)?,
        };
        if let Some(held_until) = held {
            let left = (held_until - chrono::Utc::now())
                .to_std()
                .unwrap_or_default();
            tracing::info!(
                left_ms = left.as_millis() as u64,
                "Another run of this job is under way; checking again later"
            );
            return Ok(Finished::NotYet(
                left.clamp(Duration::from_secs(1), RECHECK_BUSY),
            ));
        }
        // A call the run before this one left marked in flight may have been billed.
        Box::pin(settle_orphaned_call(&self.services.ledger, &job))
            .await
            .map_err(JobError::infrastructure)?;
        if job.infra_attempts >= self.services.infra.limit {
            return Box::pin(self.give_up_run(run, job.infra_attempts, "met in earlier runs"))
                .await;
        }
        if deliveries_before >= delivery_limit {
            // The broker will dead-letter this message if this delivery fails too, so end the
            // job now rather than risk leaving it without a terminal state.
            let failure = Failure::new(
                FailureCode::ProcessingFailed,
                format!(
                    "delivered {} times; giving up at the delivery limit",
                    deliveries_before + 1
                ),
            );
            return Box::pin(self.fail(run, JobUpdate::default(), failure)).await;
        }
        let cx = AgentContext::new(&job, self.services.clone(), runner);
        cx.lease_taken(claimed);
        // Sent with the first provider call's attempt (or the first write, if sooner): a job
        // that turns out to have ended stops there, before anything is billed; a lease taken
        // for it is cleared with the others when this run finishes.
        cx.carry(
            JobUpdate {
                status: Some(JobStatus::Running),
                accept: true,
                ..JobUpdate::default()
            },
            true,
        );
        let input = match Box::pin(self.load_input(&job)).await {
            Ok(input) => input,
            Err(JobError::Permanent(failure)) => {
                let carried = cx.take_carried().unwrap_or_default();
                return Box::pin(self.fail(run, carried, failure)).await;
            }
            Err(error) => return Err(error),
        };
        let walked = self.walk(&input, &cx).await;
        run.saw_intent(cx.intent());
        // Writes still carried (the last attempt's count, a handoff) go with the job's end.
        let carried = cx.take_carried();
        if let (Err(JobError::Retryable { .. }), Some(update)) = (&walked, &carried) {
            // The job runs again later; keep what is known (attempts made, the step).
            if let Err(error) = Box::pin(self.store.update(run.job_id, Guard::Active, update)).await
            {
                tracing::warn!(%error, "Could not save the job's progress before a retry");
            }
        }
        let last = cx.take_pending().map(|pending| Last { pending, cx: &cx });
        Box::pin(self.conclude(run, walked, carried.unwrap_or_default(), last)).await
    }

    /// Ends the job as its agents decided, with the `carried` writes in the same write. The
    /// `last` paid answer, if it is not entered yet, goes with the job's images in their final
    /// write; any other end enters it first.
    async fn conclude(
        &self,
        run: &Run<'_>,
        walked: Result<Outcome, JobError>,
        carried: JobUpdate,
        last: Option<Last<'_>>,
    ) -> Result<Finished, JobError> {
        let walked = match (walked, last) {
            (Ok(Outcome::Images(images)), last) => {
                return self.succeed(run, carried, images, last).await;
            }
            (walked, Some(last)) => last.settle_alone().await.and(walked),
            (walked, None) => walked,
        };
        match walked {
            Ok(Outcome::Images(images)) => self.succeed(run, carried, images, None).await,
            Ok(Outcome::Clarify(clarification)) => self.clarify(run, carried, clarification).await,
            Ok(Outcome::Handoff { to, .. }) => {
                self.fail(
                    run,
                    carried,
                    Failure::new(
                        FailureCode::InternalError,
                        format!("agent chain longer than {MAX_HOPS} hops (last handoff to {to})"),
                    ),
                )
                .await
            }
            Err(JobError::Permanent(failure)) => self.fail(run, carried, failure).await,
            Err(JobError::Abandoned(failure)) => {
                Ok(match self.fail(run, carried, failure).await? {
                    Finished::Ended(_) => Finished::Abandoned,
                    other => other,
                })
            }
            Err(JobError::Deferred { after, reason }) => {
                self.defer(run, carried, after, &reason).await
            }
            Err(JobError::Ended(status)) => {
                tracing::info!(
                    status = status.as_str(),
                    "Job ended elsewhere while running; result discarded"
                );
                Ok(Finished::Skipped)
            }
            Err(error @ JobError::Retryable { .. }) => Err(error),
        }
    }

    /// The message's job, recreated from the message when Redis lost it (a `202` never ends as
    /// a 404): the api's accept failed after the broker's confirm, the short pending TTL ran
    /// out in a long backlog, or a Redis failover dropped it. `None`: nothing to run (the job
    /// expired, or a message from before messages carried their job).
    async fn load(&self, message: &JobMessage) -> Result<Option<JobRecord>, JobError> {
        let job_id = message.job_id();
        if let Some(job) = self
            .store
            .get(job_id)
            .await
            .map_err(JobError::infrastructure)?
        {
            return Ok(Some(job));
        }
        let ttl = chrono::Duration::from_std(self.store.ttl()).unwrap_or_default();
        let Some(seed) = message
            .seed()
            .filter(|_| message.enqueued_at() + ttl > chrono::Utc::now())
        else {
            tracing::warn!(
                "Job not found (expired, or its message carries no request); dropping its message"
            );
            return Ok(None);
        };
        let job = seed.clone().into_record(job_id);
        match self
            .store
            .recreate(&job)
            .await
            .map_err(JobError::infrastructure)?
        {
            Recreated::Created => {
                tracing::warn!("Job missing from Redis; recreated from its message");
                crate::metrics::job_recreated();
                Ok(Some(job))
            }
            Recreated::Withdrawn => {
                tracing::warn!(
                    "Job withdrawn by the api (the broker had not confirmed it, and its client \
                     was told it was not accepted); dropping its message"
                );
                Ok(None)
            }
            // Another worker recreated it meanwhile.
            Recreated::Exists => self
                .store
                .get(job_id)
                .await
                .map_err(JobError::infrastructure),
        }
    }

    /// Ends the job `failed` after `failures` infrastructure failures; its message then goes
    /// to the dead-letter queue.
    pub async fn give_up(
        &self,
        job_id: JobId,
        failures: u32,
        cause: &str,
    ) -> Result<Finished, JobError> {
        self.give_up_run(&Run::new(job_id, None, None), failures, cause)
            .await
    }

    async fn give_up_run(
        &self,
        run: &Run<'_>,
        failures: u32,
        cause: &str,
    ) -> Result<Finished, JobError> {
        crate::metrics::infra_exhausted("run");
        tracing::error!(failures, cause, "Job used up its infrastructure attempts");
        let failure = Failure::new(
            FailureCode::ProcessingFailed,
            format!("{failures} infrastructure failures (the last: {cause})"),
        );
        Ok(match self.fail(run, JobUpdate::default(), failure).await? {
            Finished::Ended(_) => Finished::Abandoned,
            other => other,
        })
    }

    async fn load_input(&self, job: &JobRecord) -> Result<JobInput, JobError> {
        let image = match &job.input_image {
            Some(input) => {
                let bytes = match self.images.get(&ImageStore::input_of(job.id, input)).await {
                    Ok(bytes) => bytes,
                    // Deleted by the retention (or with a failure) before this run: a job that
                    // can never run, not trouble to retry.
                    Err(ImageStoreError::NotFound) => {
                        return Err(JobError::Permanent(Failure::with_message(
                            FailureCode::ImageRequired,
                            "The image sent with this job is no longer kept. Please submit it \
                             again.",
                            "input image not in the image store (expired or deleted)",
                        )));
                    }
                    Err(error) => return Err(JobError::infrastructure(error)),
                };
                Some((bytes, input.mime_type))
            }
            None => None,
        };
        Ok(JobInput {
            id: job.id,
            start: job.next_agent.clone(),
            prompt: job
                .agent_prompt
                .clone()
                .unwrap_or_else(|| job.prompt.clone()),
            size: job.size,
            n: job.n,
            image,
        })
    }

    /// Walks the agent chain from the entry agent until an agent produces a final outcome.
    async fn walk(&self, input: &JobInput, cx: &AgentContext) -> Result<Outcome, JobError> {
        let mut input = input.clone();
        let start = input.start.take();
        let mut next: &str = start.as_deref().unwrap_or(ENTRY_AGENT);
        for _ in 0..MAX_HOPS {
            let agent = self.agents.get(next).ok_or_else(|| {
                JobError::Permanent(Failure::new(
                    FailureCode::InternalError,
                    format!("no agent named {next} is registered"),
                ))
            })?;
            let span = tracing::info_span!("agent", agent = agent.name());
            cx.enter(agent.name());
            let started = std::time::Instant::now();
            let result = agent.run(&input, cx).instrument(span).await;
            crate::metrics::agent_run(agent.name(), run_outcome(&result), started.elapsed());
            match result? {
                Outcome::Handoff { to, intent, prompt } => {
                    tracing::info!(trace_event = "handoff", from = agent.name(), to, "Handoff");
                    // Remember the step, so a deferred or redelivered job resumes here. It is
                    // written with the next agent's first write, before its provider call.
                    cx.carry(
                        JobUpdate {
                            intent: Some(intent),
                            next_agent: Some(Some(to.to_string())),
                            agent_prompt: Some(Some(prompt.clone())),
                            step_attempts: Some(0),
                            ..JobUpdate::default()
                        },
                        false,
                    );
                    cx.reset_step();
                    input.prompt = prompt;
                    next = to;
                }
                outcome => return Ok(outcome),
            }
        }
        Ok(Outcome::Handoff {
            to: "(none)",
            intent: shared::domain::Intent::Unclear,
            prompt: input.prompt,
        })
    }

    async fn succeed(
        &self,
        run: &Run<'_>,
        carried: JobUpdate,
        images: Vec<StoredImage>,
        last: Option<Last<'_>>,
    ) -> Result<Finished, JobError> {
        if images.is_empty() {
            if let Some(last) = last
                && let Err(lost) = last.settle_alone().await
            {
                return Box::pin(self.conclude(run, Err(lost), carried, None)).await;
            }
            return self
                .fail(
                    run,
                    carried,
                    Failure::with_message(
                        FailureCode::NoImageReturned,
                        "The image service returned no image. Please try again.",
                        "provider answered successfully with zero images",
                    ),
                )
                .await;
        }
        self.finish(
            run,
            carried,
            JobUpdate {
                status: Some(JobStatus::Succeeded),
                images: Some(images),
                ..JobUpdate::default()
            },
            last,
        )
        .await
    }

    async fn clarify(
        &self,
        run: &Run<'_>,
        carried: JobUpdate,
        clarification: Clarification,
    ) -> Result<Finished, JobError> {
        self.finish(
            run,
            carried,
            JobUpdate {
                status: Some(JobStatus::NeedsClarification),
                clarification: Some(clarification),
                ..JobUpdate::default()
            },
            None,
        )
        .await
    }

    /// Puts the job back to `queued` with a notice saying when it will be tried again.
    async fn defer(
        &self,
        run: &Run<'_>,
        carried: JobUpdate,
        after: Duration,
        reason: &str,
    ) -> Result<Finished, JobError> {
        let retry_at = chrono::Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
        if let Err(error) = self.services.stats.deferral(chrono::Utc::now()).await {
            tracing::warn!(%error, "Could not record the deferral in the daily statistics");
        }
        tracing::info!(
            after_ms = after.as_millis() as u64,
            reason,
            "Job deferred by a rate limit"
        );
        let mut notice = Notice::now(
            NoticeKind::RateLimited,
            format!(
                "The image service is at its limit right now (requests per minute or budget in use), so your job is waiting in line. It will be tried again at about {}.",
                retry_at.format("%H:%M:%S UTC")
            ),
        );
        notice.retry_at = Some(retry_at);
        match self
            .store
            .update(
                run.job_id,
                Guard::Active,
                &carried.then(JobUpdate {
                    status: Some(JobStatus::Queued),
                    // One notice, kept up to date: the job's hash does not grow per deferral.
                    add_notices: vec![notice.in_place()],
                    add_deferrals: 1,
                    ..JobUpdate::default()
                }),
            )
            .await
            .map_err(JobError::infrastructure)?
        {
            UpdateOutcome::Applied { .. } => Ok(Finished::Deferred(after)),
            UpdateOutcome::Refused(status) => Ok(Finished::Ended(status)),
            UpdateOutcome::Missing => Err(JobError::record_lost()),
        }
    }

    async fn fail(
        &self,
        run: &Run<'_>,
        carried: JobUpdate,
        failure: Failure,
    ) -> Result<Finished, JobError> {
        tracing::warn!(code = %failure.code, detail = %failure.detail, "Job failed");
        let code = failure.code;
        let finished = self
            .finish(
                run,
                carried,
                JobUpdate {
                    status: Some(JobStatus::Failed),
                    error: Some(UserError::new(failure.code, failure.message)),
                    error_detail: Some(failure.detail),
                    ..JobUpdate::default()
                },
                None,
            )
            .await?;
        if finished == Finished::Ended(JobStatus::Failed) && code != FailureCode::ProcessingFailed {
            self.delete_failed_images(run.job_id).await;
        }
        Ok(finished)
    }

    /// A job that failed for good keeps no images: nothing will show or use them again. The
    /// exception is `processing_failed`, an infrastructure failure whose message went to the
    /// dead-letter queue: ops may replay it once the trouble is fixed, and the replay needs its
    /// input (and resumes after its paid steps, whose outputs are kept too). Its images go when
    /// they expire, with the job. Best effort: what is left expires likewise.
    async fn delete_failed_images(&self, job_id: JobId) {
        match self.images.delete_jobs(&[job_id]).await {
            Ok(deleted) if deleted.objects > 0 => {
                crate::metrics::images_deleted("failed", deleted.objects);
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "Could not delete a failed job's images; they go when they expire");
            }
        }
    }

    /// Writes a terminal state once, after the `carried` writes (in the same write): if the job
    /// already ended (canceled meanwhile, or another worker finished a redelivered copy), this
    /// result is discarded.
    ///
    /// The `last` paid answer not entered yet rides in the same script ([`RunEnd::settle`]);
    /// when it cannot, it is entered alone first, and when the write fails, it is entered alone
    /// before the failure goes on as any final write's would: the next try of the run finds
    /// the answer kept, whatever happened to the write.
    async fn finish(
        &self,
        run: &Run<'_>,
        carried: JobUpdate,
        update: JobUpdate,
        last: Option<Last<'_>>,
    ) -> Result<Finished, JobError> {
        let status = update.status.unwrap_or(JobStatus::Failed);
        let mut last = last;
        let settle = match &last {
            Some(last) if !shared::failpoint::fails("settle_step") => {
                last.cx.settlement_part(&last.pending)
            }
            _ => None,
        };
        if settle.is_none()
            && let Some(alone) = last.take()
            && let Err(lost) = alone.settle_alone().await
        {
            return Box::pin(self.conclude(run, Err(lost), carried, None)).await;
        }
        // What a failed write with the answer riding on it would still end the job with.
        let kept_carried = last.as_ref().map(|_| carried.clone());
        // Accepted again with its end: a Redis failover may have lost the earlier marks (the
        // api's, this run's first write), and a job not marked accepted is never shown.
        let update = carried.then(JobUpdate {
            accept: true,
            ..update
        });
        if shared::failpoint::fails("before_final_write") {
            let error = JobError::infrastructure(anyhow::anyhow!("failpoint before_final_write"));
            return self.end_not_written(run, last, kept_carried, error).await;
        }
        // One script: the end, its statistics (if it applies) and the run's lease given back.
        let now = chrono::Utc::now();
        let stats = run.seen().map(|job| {
            let lived = (now - job.created_at).to_std().unwrap_or_default();
            self.services
                .stats
                .job_finished_part(now, status, job.intent, lived)
        });
        let counts = stats.is_some();
        let release = run
            .lease
            .map(|lease| self.store.release_part(run.job_id, &lease.runner));
        let outcome = match self
            .store
            .finish_run(
                run.job_id,
                RunEnd {
                    update: &update,
                    stats,
                    release,
                    settle,
                },
            )
            .await
        {
            Ok(outcome) => outcome,
            Err(error) => {
                let error = JobError::infrastructure(error);
                return self.end_not_written(run, last, kept_carried, error).await;
            }
        };
        if let Some(last) = &last {
            last.cx.answer_kept(&last.pending).await;
        }
        if let Some(lease) = run.lease {
            lease.released.store(true, Ordering::Relaxed);
        }
        match outcome {
            UpdateOutcome::Applied { .. } => {
                run.counted.store(counts, Ordering::Relaxed);
                tracing::info!(status = status.as_str(), "Job finished");
                Ok(Finished::Ended(status))
            }
            UpdateOutcome::Refused(existing) => {
                tracing::info!(
                    status = existing.as_str(),
                    "Job had already ended; result discarded"
                );
                // A job canceled (or failed) meanwhile keeps no images; one that succeeded in
                // another run shows these same kept images, which stay.
                if existing != JobStatus::Succeeded {
                    self.discard_images(run.job_id, update.images.as_deref())
                        .await;
                }
                Ok(Finished::Skipped)
            }
            UpdateOutcome::Missing => {
                // Redis lost the record while this run held the job's end: the job is written
                // again from its message with that end, so that the answers in hand are not
                // paid for again by a run from scratch.
                if self.end_lost_record(run, &update, last.as_ref()).await {
                    tracing::warn!(
                        status = status.as_str(),
                        "Job missing from Redis at its end; recreated from its message with it"
                    );
                    return Ok(Finished::Ended(status));
                }
                // What this run made goes with the record; the next run makes its own.
                self.discard_images(run.job_id, update.images.as_deref())
                    .await;
                Err(JobError::record_lost())
            }
        }
    }

    /// Writes a job whose record Redis lost during this run again, from the run's message, with
    /// the run's end (`update`) and the cost and usage of its `last` call, whose settlement
    /// found no job to write them on. What earlier calls wrote on the lost record is gone
    /// from the job (the ledger keeps them). Answers whether the job now stands with its end.
    async fn end_lost_record(
        &self,
        run: &Run<'_>,
        update: &JobUpdate,
        last: Option<&Last<'_>>,
    ) -> bool {
        let Some(seed) = run.message.and_then(JobMessage::seed) else {
            return false;
        };
        let job = seed.clone().into_record(run.job_id);
        match self.store.recreate(&job).await {
            Ok(Recreated::Created | Recreated::Exists) => {}
            Ok(Recreated::Withdrawn) | Err(_) => return false,
        }
        crate::metrics::job_recreated();
        let mut end = update.clone();
        if let Some(last) = last {
            let (cost, usage) = last.pending.priced();
            end.add_cost_micros += cost;
            end.add_usage.push(usage);
        }
        matches!(
            self.store.update(run.job_id, Guard::Active, &end).await,
            Ok(UpdateOutcome::Applied { .. })
        )
    }

    /// The final write failed (`error`) with the `last` paid answer riding on it: the answer
    /// is entered alone (retried in place), then the failure goes on. Past the job's budget of
    /// infrastructure failures the job fails instead, with the `carried` writes.
    async fn end_not_written(
        &self,
        run: &Run<'_>,
        last: Option<Last<'_>>,
        carried: Option<JobUpdate>,
        error: JobError,
    ) -> Result<Finished, JobError> {
        if let Some(last) = last
            && let Err(lost) = last.settle_alone().await
        {
            let carried = carried.unwrap_or_default();
            return Box::pin(self.conclude(run, Err(lost), carried, None)).await;
        }
        Err(error)
    }

    /// Deletes kept images no job shows (best effort: what is left expires with retention).
    async fn discard_images(&self, job_id: JobId, images: Option<&[StoredImage]>) {
        for (index, image) in images.unwrap_or_default().iter().enumerate() {
            let path = ImageStore::output_path(job_id, index, image.mime_type);
            if let Err(error) = self.images.delete(&path).await {
                tracing::warn!(%error, %path, "Could not delete a discarded image");
            }
        }
    }
}
