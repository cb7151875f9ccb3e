//! Agents: one file per agent type, all behind the [`Agent`] trait, registered in [`registry`].
//!
//! A job runs as a chain: it starts at the `router`, and each agent either hands off to another
//! agent by name, produces images, or asks the user to clarify. Adding an agent type is one new
//! file here plus one line in [`registry`]; the pipeline never names a concrete agent except the
//! entry point.
//!
//! Agents never touch Redis or RabbitMQ. Everything they need from the outside world (provider
//! calls with retries, usage recording, status changes) goes through [`AgentContext`].

pub mod create;
pub mod edit;
pub mod router;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use shared::config::Settings;
use shared::domain::{Clarification, ImageMime, ImageSize, Intent, JobId, JobStatus, Usage};
use shared::pricing::PriceTable;
use shared::retry::RetryPolicy;
use shared::store::{Guard, JobStore, JobUpdate, UpdateOutcome};

use crate::providers::{GeneratedImage, ProviderError, Providers, Retry};

/// The agent every job starts with.
pub const ENTRY_AGENT: &str = router::NAME;

/// The job as agents see it: the request, already loaded (image bytes included).
#[derive(Debug, Clone)]
pub struct JobInput {
    pub id: JobId,
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
    pub code: String,
    pub message: String,
    pub detail: String,
}

impl From<ProviderError> for Failure {
    fn from(error: ProviderError) -> Self {
        Self {
            code: error.code.to_string(),
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

/// One agent type.
#[async_trait]
pub trait Agent: Send + Sync {
    /// Wire name: used in handoffs, usage records, logs and metric labels.
    fn name(&self) -> &'static str;
    async fn run(&self, job: &JobInput, cx: &AgentContext) -> Result<Outcome, JobError>;
}

/// All agent types by name. One line per agent.
pub fn registry(
    providers: &Providers,
    settings: &Settings,
) -> HashMap<&'static str, Arc<dyn Agent>> {
    let agents: Vec<Arc<dyn Agent>> = vec![
        Arc::new(router::Router::new(
            providers.classifier.clone(),
            settings.worker.min_router_confidence,
        )),
        Arc::new(create::Create::new(providers.generator.clone())),
        Arc::new(edit::Edit::new(providers.editor.clone())),
    ];
    agents
        .into_iter()
        .map(|agent| (agent.name(), agent))
        .collect()
}

/// What agents may do to the world: call providers (with the retry policy) and record usage.
pub struct AgentContext {
    pub job_id: JobId,
    pub store: JobStore,
    pub retry: RetryPolicy,
    pub prices: Arc<PriceTable>,
}

impl AgentContext {
    /// Runs one provider call under the retry policy. Each attempt counts on the job; while it
    /// waits to retry, the job shows `retrying`. Usage of a successful call is recorded on the
    /// job before this returns.
    pub async fn call<T, F, Fut>(
        &self,
        provider: &str,
        model: &str,
        mut attempt: F,
        usage_of: impl Fn(&T) -> Usage,
    ) -> Result<T, JobError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let mut attempts_made = 0;
        loop {
            self.apply(JobUpdate {
                status: Some(JobStatus::Running),
                provider: Some(provider.to_string()),
                model: Some(model.to_string()),
                add_attempts: 1,
                ..JobUpdate::default()
            })
            .await?;
            attempts_made += 1;
            let started = std::time::Instant::now();
            let result = attempt().await;
            let elapsed_ms = started.elapsed().as_millis() as u64;
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
                    let cost = self.price(&usage);
                    self.apply(JobUpdate {
                        add_usage: vec![usage],
                        add_cost_micros: cost,
                        ..JobUpdate::default()
                    })
                    .await?;
                    return Ok(value);
                }
                Err(error) => {
                    let retry_after = match error.retry {
                        Retry::Yes { after } if self.retry.allows_another(attempts_made) => {
                            Some(self.retry.delay(attempts_made - 1, after))
                        }
                        _ => None,
                    };
                    tracing::warn!(
                        provider, model, elapsed_ms, attempt = attempts_made,
                        code = error.code, status = error.status, detail = %error.detail,
                        will_retry = retry_after.is_some(),
                        "Provider call failed"
                    );
                    let Some(delay) = retry_after else {
                        return Err(JobError::Permanent(error.into()));
                    };
                    self.apply(JobUpdate::status(JobStatus::Retrying)).await?;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The cost of one call in micro-dollars. Every configured model was checked against the
    /// price table at start-up, so a failure here is a table that lacks a rate the provider
    /// billed: logged as an error for ops to fix, never silently.
    fn price(&self, usage: &Usage) -> i64 {
        match self.prices.cost_micros(usage) {
            Ok(cost) => cost,
            Err(error) => {
                tracing::error!(%error, provider = %usage.provider, model = %usage.model, "Cannot price a billed call");
                0
            }
        }
    }

    /// Applies an update to a job that must still be active.
    pub async fn apply(&self, update: JobUpdate) -> Result<(), JobError> {
        match self
            .store
            .update(self.job_id, Guard::Active, &update)
            .await
            .map_err(JobError::infrastructure)?
        {
            UpdateOutcome::Applied { .. } => Ok(()),
            UpdateOutcome::Refused(status) => Err(JobError::Ended(status)),
            UpdateOutcome::Missing => Err(JobError::Ended(JobStatus::Canceled)),
        }
    }
}
