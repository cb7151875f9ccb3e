//! The watchdog: finds jobs stuck in `running` past their deadline and requeues (or, after a
//! few tries, fails) them, so every accepted job reaches a terminal state even when a worker
//! vanished in a way the broker did not notice (a frozen process, a partition that kept its
//! connection half-open, a message acked by mistake).
//!
//! Every worker runs one, but a Redis lock per round lets only one of them work at a time.
//! A job's lease is renewed whenever it starts running and before each provider call, so only
//! a job that made no progress for a whole deadline is touched.

use std::time::Duration;

use shared::codes::{FailureCode, NoticeKind};
use shared::domain::{JobStatus, Notice, UserError};
use shared::ledger::Ledger;
use shared::queue::{JobMessage, Publisher};
use shared::store::{Guard, JobStore, JobUpdate, UpdateOutcome};
use tokio::sync::watch;

/// Backlog entries younger than this are left to the writes that made them.
const BACKLOG_SWEEP_MIN_AGE: Duration = Duration::from_secs(60);

pub struct Watchdog {
    pub store: JobStore,
    /// Where a stuck job's call in flight is recorded as possibly billed when it is failed.
    pub ledger: Ledger,
    pub publisher: Publisher,
    pub interval: Duration,
    pub deadline: Duration,
    pub max_requeues: u32,
}

impl Watchdog {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {},
                _ = shutdown.changed() => return,
            }
            if let Err(error) = self.round().await {
                tracing::warn!(%error, "Watchdog round failed; trying again next round");
            }
        }
    }

    /// One pass over expired leases. Returns how many jobs it acted on.
    pub async fn round(&self) -> anyhow::Result<usize> {
        let lock = self.store.keys().watchdog_lock();
        if !self.store.try_lock(&lock, self.interval).await? {
            return Ok(0);
        }
        match self.store.sweep_backlog(BACKLOG_SWEEP_MIN_AGE).await {
            Ok(0) => {}
            Ok(dropped) => tracing::warn!(dropped, "Dropped backlog entries of jobs that ended"),
            Err(error) => tracing::warn!(%error, "Could not sweep the backlog"),
        }
        let now = chrono::Utc::now();
        let mut acted = 0;
        for id in self.store.expired_leases(now, 100).await? {
            let Some(job) = self.store.get(id).await? else {
                self.store.clear_lease(id).await?;
                continue;
            };
            if job.status.is_terminal() {
                self.store.clear_lease(id).await?;
                continue;
            }
            acted += 1;
            if job.requeues < self.max_requeues {
                let update = JobUpdate {
                    status: Some(JobStatus::Queued),
                    requeues: Some(job.requeues + 1),
                    add_notices: vec![Notice::now(
                        NoticeKind::Requeued,
                        "Your job stopped making progress, so it was put back in line.",
                    )],
                    ..JobUpdate::default()
                };
                if let UpdateOutcome::Applied { .. } =
                    self.store.update(id, Guard::Active, &update).await?
                {
                    let until = now + chrono::Duration::from_std(self.deadline)?;
                    self.store.set_lease(id, until).await?;
                    self.publisher
                        .publish(&JobMessage::for_job(&job), Default::default())
                        .await?;
                    tracing::warn!(job_id = %id, requeues = job.requeues + 1, "Watchdog requeued a stuck job");
                }
            } else {
                let update = JobUpdate {
                    status: Some(JobStatus::Failed),
                    error: Some(UserError::new(
                        FailureCode::ProcessingFailed,
                        FailureCode::ProcessingFailed.user_message(),
                    )),
                    error_detail: Some(format!(
                        "stuck in {} past the deadline after {} requeues",
                        job.status.as_str(),
                        job.requeues
                    )),
                    ..JobUpdate::default()
                };
                // Its worker may have died with a billed call out: record it, then end the job.
                crate::context::settle_orphaned_call(&self.ledger, &job).await?;
                self.store.update(id, Guard::Active, &update).await?;
                self.store.clear_lease(id).await?;
                tracing::error!(job_id = %id, "Watchdog failed a job that stayed stuck");
            }
        }
        Ok(acted)
    }
}
