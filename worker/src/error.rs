//! How an agent run ends when it does not produce an outcome: [`JobError`], the worker's one
//! decision (retry the job later, defer it, fail it, or stop because it ended elsewhere), and
//! [`Failure`], what a failed job tells its user and its operators.

use std::time::Duration;

use shared::codes::FailureCode;
use shared::domain::JobStatus;

use crate::providers::ProviderError;

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
    /// The job used up its infrastructure attempts: it ends `failed` with this error and its
    /// message goes to the dead-letter queue, for ops to replay once the trouble is fixed.
    #[error("abandoned: {0}")]
    Abandoned(Failure),
    /// Someone else ended the job (it was canceled); stop quietly.
    #[error("job already ended with status {0:?}")]
    Ended(JobStatus),
}

impl JobError {
    pub fn infrastructure(source: impl Into<anyhow::Error>) -> Self {
        Self::Retryable {
            source: source.into(),
            after: None,
        }
    }

    /// The job's record vanished while it ran, before its end: Redis lost it (a restart
    /// without persistence, a failover that dropped writes). Nothing deletes a started job, so
    /// this is not a cancel: the job runs again, and its next run recreates it from its message
    /// (`Pipeline::load`, counted in `pictor_jobs_recreated_total`), so that an accepted job
    /// still ends and its `GET` is not a `404`.
    pub fn record_lost() -> Self {
        Self::infrastructure(anyhow::anyhow!(
            "the job's record vanished from Redis while it ran; it runs again from its message"
        ))
    }
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
