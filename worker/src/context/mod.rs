//! What an agent may do to the world, and nothing more: [`AgentContext`] calls providers under
//! the fleet's policies (`call`, in the `call` module), adds notices, consults circuit breakers
//! and writes the job. Agents never touch Redis or RabbitMQ themselves.
//!
//! Writes to the job that need not pay a round trip of their own are *carried*: kept here and
//! sent with the next write (a provider call's attempt writes one, its in-flight mark), in the
//! same script call. Whatever is carried is sent before any provider call, so a job never makes
//! a billed call that its state does not show.

mod call;

pub use call::PendingSettlement;

pub(crate) use call::settle_orphaned_call;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use shared::config::RateLimitSettings;
use shared::domain::{Intent, JobId, Notice, Usage, UserId};
use shared::fair::Fairness;
use shared::images::ImageStore;
use shared::ledger::Ledger;
use shared::pricing::PriceTable;
use shared::retry::RetryPolicy;
use shared::stats::Stats;
use shared::store::{Guard, JobRecord, JobStore, JobUpdate, StepRecord, UpdateOutcome};

use crate::attempts::{InfraAttempts, Verdict};
use crate::breaker::{CircuitBreaker, Permit};
use crate::error::JobError;
use crate::providers::ProviderInfo;

/// What every job of a worker shares: the store and the fleet-wide policies.
pub struct Services {
    /// This worker process, as its heartbeat and its runs name it.
    pub worker_id: String,
    pub store: JobStore,
    /// Where paid answers' images are kept.
    pub images: ImageStore,
    /// Each job's budget of infrastructure failures.
    pub infra: InfraAttempts,
    /// How long a running job may go without starting a provider call before the watchdog
    /// considers it stuck.
    pub job_deadline: Duration,
    pub retry: RetryPolicy,
    pub prices: PriceTable,
    /// The models' rate limits and the fair share of them, taken together.
    pub fair: Fairness,
    pub limits: HashMap<String, RateLimitSettings>,
    pub breaker: CircuitBreaker,
    pub ledger: Ledger,
    pub stats: Stats,
    /// Keep prompts off the `provider_call` span (`traces.redact`): every exporter and log line
    /// that reads spans would carry them otherwise.
    pub redact_prompts: bool,
}

/// One provider call as the call path sees it: who serves it, what it asks for, and which
/// policies apply. Built with [`CallSpec::new`] from the capability that makes the call.
pub struct CallSpec<'a> {
    /// Shown on the job (`simulated` when simulated).
    pub provider: &'static str,
    /// Whose limits and breaker apply.
    pub billing_provider: &'static str,
    pub model: &'a str,
    /// The prompt sent, for traces; left off the span when traces are redacted.
    pub prompt: &'a str,
    /// Units taken from the model's images- or tokens-per-minute budget.
    pub images: u32,
    pub tokens: u32,
    /// Report outcomes to the provider's circuit breaker.
    pub breaker: bool,
    /// The most the call can bill, as the capability priced its request (its budget hold and,
    /// should its outcome be unknown, its possibly-billed cost). Without one, a generous
    /// default from the images and tokens asked for.
    pub estimate: Option<Usage>,
}

impl<'a> CallSpec<'a> {
    /// A call to `provider` with `prompt`, asking for no images and no tokens, outside the
    /// circuit breaker.
    pub fn new<P: ProviderInfo + ?Sized>(provider: &'a P, prompt: &'a str) -> Self {
        Self {
            provider: provider.provider(),
            billing_provider: provider.billing_provider(),
            model: provider.model(),
            prompt,
            images: 0,
            tokens: 0,
            breaker: false,
            estimate: None,
        }
    }

    /// The call asks for `images` images (the images-per-minute budget and the budget hold).
    #[must_use]
    pub fn images(self, images: u32) -> Self {
        Self { images, ..self }
    }

    /// The call sends about `tokens` tokens (the tokens-per-minute budget and the budget hold).
    #[must_use]
    pub fn tokens(self, tokens: u32) -> Self {
        Self { tokens, ..self }
    }

    /// The most the call can bill, from the capability's `estimate` of its request.
    #[must_use]
    pub fn estimate(self, estimate: Usage) -> Self {
        Self {
            estimate: Some(estimate),
            ..self
        }
    }

    /// The call's outcomes count towards the provider's circuit breaker.
    #[must_use]
    pub fn with_breaker(self) -> Self {
        Self {
            breaker: true,
            ..self
        }
    }
}

/// What agents may do to the world: call providers (with the retry policy and rate limits),
/// consult circuit breakers, add notices.
pub struct AgentContext {
    pub job_id: JobId,
    /// Whose job it is, for the cost ledger.
    pub user: UserId,
    pub services: Arc<Services>,
    /// The agent running now; every call's usage is recorded under it.
    agent: Mutex<&'static str>,
    /// Attempts made in the current step, carried across deferrals (persisted on the job).
    step_attempts: AtomicU32,
    /// The paid answers of the job's steps, by agent: a step that has one never calls again.
    steps: BTreeMap<String, StepRecord>,
    /// Infrastructure failures counted for the job so far, as this process knows them.
    infra_seen: AtomicU32,
    /// Writes to the job not sent yet: the next write or round trip takes them along.
    carried: Mutex<Carried>,
    /// The last paid answer's settlement, not written yet: the job's final write takes it
    /// along, and anything else writes it first ([`AgentContext::take_pending`]).
    pending: Mutex<Option<PendingSettlement>>,
    /// This delivery's run of the job, which holds its lease ([`JobStore::claim_run`]).
    runner: String,
    /// When this run last took or renewed its lease (sent, and answered that it holds it).
    lease_at: Mutex<Option<Instant>>,
    /// The job's intent as this run leaves it: as loaded, then the last one carried.
    intent: Mutex<Option<Intent>>,
}

/// A lease taken or renewed this recently is not renewed again: the lease runs for the job's
/// deadline (minutes), and another run can only take it over from a worker whose heartbeat
/// stopped, which a run that was itself stalled this long would see as a lease older than
/// this. Saves the claims that would follow each other within milliseconds (the run's claim,
/// then the first call's attempt, then the next call's) when calls are fast.
const LEASE_FRESH: Duration = Duration::from_secs(1);

/// Job writes waiting for the next round trip (see [`AgentContext::carry`]).
#[derive(Default)]
struct Carried {
    update: Option<JobUpdate>,
    lease: bool,
}

/// Locks a mutex nothing panics while holding; a poisoned one still holds consistent data.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AgentContext {
    /// The context of one run of `job`.
    pub fn new(job: &JobRecord, services: Arc<Services>, runner: &str) -> Self {
        Self {
            runner: runner.to_string(),
            job_id: job.id,
            user: job.user.clone(),
            services,
            agent: Mutex::new(""),
            step_attempts: AtomicU32::new(job.step_attempts),
            steps: job.steps.clone(),
            infra_seen: AtomicU32::new(job.infra_attempts),
            carried: Mutex::default(),
            pending: Mutex::default(),
            lease_at: Mutex::new(None),
            intent: Mutex::new(job.intent),
        }
    }

    /// The job's intent as this run leaves it (see [`AgentContext::carry`]).
    pub fn intent(&self) -> Option<Intent> {
        *lock(&self.intent)
    }

    /// Says that this run took the job's lease at `at` (before sending the claim that held).
    pub fn lease_taken(&self, at: Instant) {
        *lock(&self.lease_at) = Some(at);
    }

    /// Counts one infrastructure failure on the job and says whether to try again.
    pub async fn infra_failure(&self) -> Verdict {
        self.services
            .infra
            .count(&self.services.store, self.job_id, &self.infra_seen)
            .await
    }

    /// Says which agent runs from now on (its calls' usage is recorded under its name).
    pub fn enter(&self, agent: &'static str) {
        *lock(&self.agent) = agent;
    }

    fn agent(&self) -> &'static str {
        *lock(&self.agent)
    }

    /// Keeps `update` (and a lease renewal, if asked) to be sent with the next write to the job
    /// (at the latest the next provider call's attempt), instead of paying a round trip of its
    /// own. Whatever is carried is sent before any provider call.
    pub fn carry(&self, update: JobUpdate, renew_lease: bool) {
        if let Some(intent) = update.intent {
            *lock(&self.intent) = Some(intent);
        }
        let mut carried = lock(&self.carried);
        carried.update = Some(match carried.update.take() {
            Some(earlier) => earlier.then(update),
            None => update,
        });
        carried.lease |= renew_lease;
    }

    /// Sends whatever is carried, the update and the lease together (nothing to do when
    /// nothing is).
    pub async fn flush(&self) -> Result<(), JobError> {
        let Carried { update, lease } = std::mem::take(&mut *lock(&self.carried));
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

    /// What is carried, left carried: the update and whether the lease is to be renewed.
    fn carried(&self) -> (Option<JobUpdate>, bool) {
        let carried = lock(&self.carried);
        (carried.update.clone(), carried.lease)
    }

    /// What [`Self::carried`] answered has been sent.
    fn sent_carried(&self) {
        *lock(&self.carried) = Carried::default();
    }

    /// Takes the carried update, for a write that ends the job (the lease ends with it).
    pub fn take_carried(&self) -> Option<JobUpdate> {
        std::mem::take(&mut *lock(&self.carried)).update
    }

    /// A new step (after a handoff) starts with a fresh attempt budget.
    pub fn reset_step(&self) {
        self.step_attempts.store(0, Ordering::SeqCst);
    }

    /// Tells the watchdog this job is alive for another deadline. Another run that took the
    /// job over (this one stalled past its lease) stops this one here, before a provider call.
    /// Nothing to do when the lease was taken or renewed less than [`LEASE_FRESH`] ago.
    pub async fn renew_lease(&self) -> Result<(), JobError> {
        if lock(&self.lease_at).is_some_and(|at| at.elapsed() < LEASE_FRESH) {
            return Ok(());
        }
        let sent = Instant::now();
        let until = chrono::Utc::now()
            + chrono::Duration::from_std(self.services.job_deadline).unwrap_or_default();
        let held = self
            .services
            .store
            .claim_run(self.job_id, &self.runner, until)
            .await
            .map_err(JobError::infrastructure)?;
        match held {
            None => {
                self.lease_taken(sent);
                Ok(())
            }
            Some(_) => {
                tracing::warn!("Another run holds this job now; this one stops");
                Err(JobError::Ended(shared::domain::JobStatus::Running))
            }
        }
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
            UpdateOutcome::Missing => Err(JobError::record_lost()),
        }
    }
}
