//! The worker's metrics, one function per event so names and labels live in one place
//! (the catalogue is docs/metrics.md). Labels come from small fixed sets: agent and provider
//! names, model ids from config, status classes, outcome words. Never a job or user id.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use shared::codes::FailureCode;
use shared::domain::{Intent, JobStatus};

pub fn job_finished(status: JobStatus, intent: Option<Intent>, since_accepted: Duration) {
    let outcome = status.as_str();
    let intent = intent.map_or("none", |intent| intent.as_str());
    counter!("pictor_jobs_finished_total", "outcome" => outcome, "intent" => intent).increment(1);
    histogram!("pictor_job_duration_seconds", "outcome" => outcome)
        .record(since_accepted.as_secs_f64());
}

/// Deferral cycles of a job that ended (sent back to a delay queue by a rate limit, the
/// api's pacing included).
pub fn job_deferrals(deferrals: u32) {
    histogram!("pictor_job_deferrals").record(f64::from(deferrals));
}

pub fn agent_run(agent: &'static str, outcome: &'static str, took: Duration) {
    counter!("pictor_agent_runs_total", "agent" => agent, "outcome" => outcome).increment(1);
    histogram!("pictor_agent_run_duration_seconds", "agent" => agent).record(took.as_secs_f64());
}

pub fn provider_request(
    provider: &'static str,
    model: &str,
    status_class: &'static str,
    took: Duration,
) {
    let model = model.to_string();
    counter!(
        "pictor_provider_requests_total",
        "provider" => provider,
        "model" => model.clone(),
        "status_class" => status_class
    )
    .increment(1);
    histogram!("pictor_provider_request_duration_seconds", "provider" => provider, "model" => model)
        .record(took.as_secs_f64());
}

pub fn provider_retry(provider: &'static str, model: &str) {
    counter!("pictor_provider_retries_total", "provider" => provider, "model" => model.to_string())
        .increment(1);
}

pub fn fallback(from: &'static str, to: &'static str) {
    counter!("pictor_fallbacks_total", "from" => from, "to" => to).increment(1);
}

/// `reason`: `local_limit`, `provider_429` or `budget_hold`.
pub fn deferral(reason: &'static str) {
    counter!("pictor_deferrals_total", "reason" => reason).increment(1);
}

/// A step found its paid answer and did not call again.
pub fn kept_answer_reused(agent: &'static str) {
    counter!("pictor_kept_answers_reused_total", "agent" => agent).increment(1);
}

/// A call whose outcome is unknown was recorded as possibly billed, by why: `no_answer` (a
/// timeout or a cut connection after the request left) or `worker_lost` (a run found the call
/// still marked in flight).
pub fn possibly_billed(reason: &'static str) {
    counter!("pictor_calls_possibly_billed_total", "reason" => reason).increment(1);
}

/// A job used up its infrastructure attempts, by where: `keep_answer` (holding a paid answer)
/// or `run` (between runs).
pub fn infra_exhausted(stage: &'static str) {
    counter!("pictor_jobs_infra_exhausted_total", "stage" => stage).increment(1);
}

/// A job's run panicked (a bug); the panic was caught and counted against the job's
/// infrastructure attempts.
pub fn job_panicked() {
    counter!("pictor_job_panics_total").increment(1);
}

/// A worker found a message whose job was not in Redis and recreated the job from it.
pub fn job_recreated() {
    counter!("pictor_jobs_recreated_total").increment(1);
}

pub fn cooldown(provider: &'static str, open: bool) {
    gauge!("pictor_provider_cooldown", "provider" => provider).set(if open { 1.0 } else { 0.0 });
}

pub fn in_flight(delta: f64) {
    gauge!("pictor_jobs_in_flight").increment(delta);
}

/// Money, in exact integer micro-dollars (the metrics facade counts integers; dashboards
/// divide by 1e6).
pub fn cost(provider: &str, agent: &str, micros: i64) {
    counter!(
        "pictor_cost_microdollars_total",
        "provider" => provider.to_string(),
        "agent" => agent.to_string()
    )
    .increment(u64::try_from(micros).unwrap_or(0));
}

pub fn queue(queue: &'static str, messages: u32, consumers: u32) {
    gauge!("pictor_queue_messages", "queue" => queue).set(f64::from(messages));
    gauge!("pictor_queue_consumers", "queue" => queue).set(f64::from(consumers));
}

/// The backlog as Redis holds it: jobs pending (waiting, deferred or running), the users they
/// belong to, and the largest shares of the rate-limited capacity over the last minute or two
/// (by rank, never by user).
pub fn backlog(backlog: &shared::fair::Backlog) {
    gauge!("pictor_jobs_pending").set(backlog.pending as f64);
    gauge!("pictor_backlog_users").set(backlog.users as f64);
    for (rank, label) in ["1", "2", "3"].into_iter().enumerate() {
        let share = backlog.top_shares.get(rank).copied().unwrap_or(0.0);
        gauge!("pictor_fair_share_top", "rank" => label).set(share);
    }
}

pub fn budget_spent_ratio(ratio: f64) {
    gauge!("pictor_budget_spent_ratio").set(ratio);
}

/// `objects` images deleted from the image store, by why: `expired` (the sweeper) or `failed`
/// (a job that failed for good).
pub fn images_deleted(reason: &'static str, objects: u64) {
    counter!("pictor_images_deleted_total", "reason" => reason).increment(objects);
}

/// The image store's size as last measured, plus the uploads since (the same figure in every
/// worker: it is read from Redis).
pub fn image_store(usage: shared::retention::StoreUsage) {
    gauge!("pictor_image_store_bytes").set(usage.bytes as f64);
    gauge!("pictor_image_store_objects").set(usage.objects as f64);
}

/// The class of a provider call's outcome for `status_class`.
pub fn status_class(status: Option<u16>, code: FailureCode) -> &'static str {
    match (status, code) {
        (_, FailureCode::ProviderTimeout) => "timeout",
        (Some(status), _) if status >= 500 => "5xx",
        (Some(status), _) if status >= 400 => "4xx",
        (Some(_), _) => "2xx",
        (None, FailureCode::ProviderUnavailable) => "network",
        // Errors found in a 200 answer (a safety block, no image, a bad body).
        (None, _) => "2xx",
    }
}

/// Help texts for the worker's metrics (call after the recorder is installed).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "pictor_kept_answers_reused_total",
        "Steps that found their paid answer and did not call the provider again, by agent."
    );
    describe_counter!(
        "pictor_calls_possibly_billed_total",
        "Provider calls recorded as possibly billed at their estimate, by reason."
    );
    describe_counter!(
        "pictor_jobs_infra_exhausted_total",
        "Jobs that used up their infrastructure attempts and ended failed, by stage."
    );
    describe_counter!(
        "pictor_job_panics_total",
        "Job runs that panicked; each counts as an infrastructure failure of its job."
    );
    describe_counter!(
        "pictor_jobs_recreated_total",
        "Jobs recreated from their message because Redis had lost them."
    );
    describe_counter!(
        "pictor_jobs_finished_total",
        "Jobs reaching a terminal status, by outcome and intent."
    );
    describe_histogram!(
        "pictor_job_duration_seconds",
        Unit::Seconds,
        "Jobs' time from acceptance to their terminal status."
    );
    describe_histogram!(
        "pictor_job_deferrals",
        "Delay-queue cycles of each job that ended (rate limits and pacing)."
    );
    describe_counter!(
        "pictor_agent_runs_total",
        "Agent runs by agent and outcome."
    );
    describe_histogram!(
        "pictor_agent_run_duration_seconds",
        Unit::Seconds,
        "One agent run's duration."
    );
    describe_counter!(
        "pictor_provider_requests_total",
        "Provider calls by provider, model and status class."
    );
    describe_histogram!(
        "pictor_provider_request_duration_seconds",
        Unit::Seconds,
        "One provider call's duration."
    );
    describe_counter!(
        "pictor_provider_retries_total",
        "Provider calls retried after a transient failure."
    );
    describe_counter!(
        "pictor_fallbacks_total",
        "Edits redone by the fallback provider."
    );
    describe_counter!(
        "pictor_deferrals_total",
        "Jobs sent to a delay queue, by reason."
    );
    describe_gauge!(
        "pictor_provider_cooldown",
        "1 while the provider's circuit breaker is open."
    );
    describe_gauge!(
        "pictor_jobs_in_flight",
        "Jobs this worker process is running."
    );
    describe_gauge!("pictor_queue_messages", "Messages ready in the queue.");
    describe_gauge!(
        "pictor_jobs_pending",
        "Jobs accepted and not ended (waiting, deferred or running), fleet-wide."
    );
    describe_gauge!("pictor_backlog_users", "Users with jobs pending.");
    describe_gauge!(
        "pictor_fair_share_top",
        "Share of the rate-limited calls granted over the last minute or two to the users with the largest shares, by rank."
    );
    describe_gauge!("pictor_queue_consumers", "Consumers on the queue.");
    describe_counter!(
        "pictor_cost_microdollars_total",
        "Money spent on provider calls, in micro-dollars."
    );
    describe_gauge!(
        "pictor_budget_spent_ratio",
        "Month-to-date spend divided by the monthly budget."
    );
    describe_counter!(
        "pictor_images_deleted_total",
        "Images deleted from the image store, by why."
    );
    describe_gauge!(
        "pictor_image_store_bytes",
        Unit::Bytes,
        "Bytes of images in the image store (last measurement plus uploads since)."
    );
    describe_gauge!(
        "pictor_image_store_objects",
        "Images in the image store (last measurement plus uploads since)."
    );
}
