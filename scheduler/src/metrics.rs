//! The scheduler's metrics (catalogued in `docs/metrics.md`). Deliveries are counted by
//! `deliver` as `pictor_notifications_total`.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::schedule::Job;

pub fn describe() {
    metrics::describe_counter!(
        "pictor_scheduler_runs_total",
        metrics::Unit::Count,
        "scheduler job runs, by job and outcome (done, retry, lost_lock)"
    );
    metrics::describe_gauge!(
        "pictor_scheduler_last_run_timestamp_seconds",
        metrics::Unit::Seconds,
        "when each scheduler job last completed a run (Unix time)"
    );
    metrics::describe_counter!(
        "pictor_scheduler_alerts_total",
        metrics::Unit::Count,
        "alerts sent, by alert and kind"
    );
    metrics::describe_gauge!(
        "pictor_scheduler_delivery_channels",
        metrics::Unit::Count,
        "channels that reach a person (email with recipients, Slack); 0: only the outbox"
    );
    metrics::describe_gauge!(
        "pictor_scheduler_run_overdue_seconds",
        metrics::Unit::Seconds,
        "how long the oldest due run of a scheduled job has waited to be done (0: none due)"
    );
}

/// The channels that reach a person.
pub fn delivery_channels(channels: u32) {
    metrics::gauge!("pictor_scheduler_delivery_channels").set(f64::from(channels));
}

/// How long the oldest due run of `job` has been waiting (0 when none is due).
pub fn run_overdue(job: Job, seconds: f64) {
    metrics::gauge!("pictor_scheduler_run_overdue_seconds", "job" => job.as_str()).set(seconds);
}

/// A run ended: `done` (recorded), `retry` (left for a later tick) or `lost_lock`.
pub fn run(job: Job, outcome: &'static str) {
    metrics::counter!("pictor_scheduler_runs_total", "job" => job.as_str(), "outcome" => outcome)
        .increment(1);
    if outcome == "done" {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        metrics::gauge!("pictor_scheduler_last_run_timestamp_seconds", "job" => job.as_str())
            .set(now);
    }
}

/// An alert was sent: `alert` is `budget`, `agent_error_rate`, `response_time`,
/// `no_consumers`, `queue_backlog`, `dead_letters`, `provider_cooldown` or `missed_run`; `kind`
/// is `threshold` or `projected` (budget), `firing`, `repeat` or `resolved` (the others).
pub fn alert(alert: &'static str, kind: &'static str) {
    metrics::counter!("pictor_scheduler_alerts_total", "alert" => alert, "kind" => kind)
        .increment(1);
}
