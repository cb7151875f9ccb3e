//! Pictor's worker: consume jobs from RabbitMQ, run agents against the model providers, store
//! images and final states, ack. See `docs/architecture.md` for the path of one job.

mod acks;
pub mod agents;
mod attempts;
pub mod breaker;
mod consumer;
mod context;
mod error;
mod metrics;
mod observe;
mod pipeline;
pub mod providers;
mod retention;
mod watchdog;

use std::future::Future;
use std::sync::Arc;

use crate::attempts::InfraAttempts;
use crate::breaker::{BreakerPolicy, CircuitBreaker};
use anyhow::Context;
use shared::config::Settings;
use shared::images::ImageStore;
use shared::ledger::BudgetPolicy;
use shared::queue::{Publisher, Topology};
use shared::retry::RetryPolicy;
use shared::store::JobStore;
use tokio::sync::watch;

use crate::consumer::Consumer;
use crate::context::Services;
use crate::pipeline::Pipeline;
use crate::providers::Providers;
use crate::retention::Sweeper;
use crate::watchdog::Watchdog;

/// A worker ready to consume.
pub struct Worker {
    consumer: Consumer,
    watchdog: Watchdog,
    sweeper: Sweeper,
    sampler: observe::Sampler,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl Worker {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let providers = Providers::from_settings(&settings)
            .map_err(|error| anyhow::anyhow!("cannot build provider clients: {error}"))?;
        announce(&providers);
        metrics::describe();
        shared::sentinel::describe();
        let prices = settings.price_table()?;
        for (provider, model) in [
            (providers::openai::NAME, &settings.openai.router_model),
            (providers::openai::NAME, &settings.openai.image_model),
            (providers::gemini::NAME, &settings.gemini.image_model),
        ] {
            // A model with no price would be billed at $0: refuse to start instead.
            prices.ensure_priced(provider, model).map_err(|error| {
                anyhow::anyhow!("{error} (configured model {provider}/{model})")
            })?;
        }
        let store = JobStore::connect(&settings.redis, settings.jobs.ttl)
            .await
            .context("cannot connect to redis (PICTOR_REDIS_URL)")?
            .with_image_retention(settings.images.retention);
        let images = ImageStore::open(&settings.images.store)
            .context("cannot open the image store (PICTOR_IMAGE_STORE)")?;
        let redis = store.redis().clone();
        let breaker = CircuitBreaker::on(&redis, breaker_policy(&settings));
        let ledger = redis.ledger(BudgetPolicy::from(&settings.budget));
        let retention = redis.image_retention(settings.images.retention);
        // Alive before the first delivery: a run's claim on a job stands while this beats.
        let worker_id = uuid::Uuid::new_v4().simple().to_string();
        store
            .heartbeat(&worker_id, HEARTBEAT_TTL)
            .await
            .context("cannot write to redis (PICTOR_REDIS_URL)")?;
        let services = Services {
            worker_id,
            images: images.clone(),
            infra: InfraAttempts {
                limit: settings.worker.max_infra_attempts.get(),
            },
            retry: RetryPolicy::new(settings.worker.provider_max_attempts.get()),
            prices,
            fair: redis.fairness(settings.backlog.fair_policy()),
            limits: settings.rate_limits.clone(),
            breaker: breaker.clone(),
            ledger: ledger.clone(),
            stats: redis.stats(),
            store: store.clone(),
            job_deadline: settings.worker.job_deadline,
            redact_prompts: settings.traces.redact,
        };
        let pipeline = Pipeline {
            store,
            images,
            agents: agents::registry(&providers, &settings),
            services: Arc::new(services),
        };
        let concurrency = u16::try_from(settings.worker.concurrency.get()).map_err(|_| {
            anyhow::anyhow!(
                "invalid setting worker.concurrency (PICTOR_WORKER_CONCURRENCY): at most 65535"
            )
        })?;
        let publisher = Publisher::new(settings.amqp.clone(), settings.api.publish_timeout);
        // Every slot taken by a job that ran twice its deadline without settling: wedged.
        let health = Arc::new(consumer::ConsumerHealth::new(
            usize::from(concurrency),
            settings.worker.job_deadline.saturating_mul(2),
        ));
        let watchdog = Watchdog {
            store: pipeline.store.clone(),
            ledger: ledger.clone(),
            publisher: publisher.clone(),
            interval: settings.worker.watchdog_interval,
            deadline: settings.worker.job_deadline,
            max_requeues: settings.worker.watchdog_max_requeues,
        };
        let sweeper = Sweeper {
            store: pipeline.store.clone(),
            images: pipeline.images.clone(),
            retention: retention.clone(),
            interval: settings.images.sweep_interval,
            measure_interval: settings.images.measure_interval,
        };
        let sampler = observe::Sampler {
            publisher: publisher.clone(),
            topology: Topology::new(&settings.amqp),
            breaker,
            ledger,
            retention,
            fair: redis.fairness(settings.backlog.fair_policy()),
        };
        Ok(Self {
            sampler,
            metrics_addr: settings.worker.metrics_addr,
            watchdog,
            sweeper,
            consumer: Consumer {
                topology: Topology::new(&settings.amqp),
                settings: settings.amqp.clone(),
                publisher,
                pipeline: Arc::new(pipeline),
                concurrency,
                shutdown_grace: settings.worker.shutdown_grace,
                health,
            },
        })
    }

    /// Consumes until `shutdown` resolves, then drains gracefully.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (sender, receiver) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = sender.send(true);
        });
        let heartbeat = tokio::spawn(heartbeat(
            self.consumer.pipeline.store.clone(),
            self.consumer.pipeline.services.worker_id.clone(),
        ));
        let watchdog = tokio::spawn(self.watchdog.run(receiver.clone()));
        let sweeper = tokio::spawn(self.sweeper.run(receiver.clone()));
        tokio::spawn(self.sampler.run(receiver.clone()));
        if let Some(addr) = self.metrics_addr {
            let stop = receiver.clone();
            let consumer = self.consumer.health.clone();
            let health: shared::telemetry::metrics::HealthCheck =
                Arc::new(move || consumer.check());
            tokio::spawn(async move {
                if let Err(error) =
                    shared::telemetry::metrics::serve("worker", addr, health, stop).await
                {
                    tracing::error!(%error, %addr, "Cannot serve worker metrics (PICTOR_WORKER_METRICS_ADDR)");
                }
            });
        }
        self.consumer.run(receiver).await;
        // Every run has drained: its claims may go with the heartbeat.
        heartbeat.abort();
        let _ = watchdog.await;
        // A sweep or a measurement cut short is harmless: deletions are idempotent and the
        // next round starts over; a long listing must not hold up the shutdown.
        sweeper.abort();
    }
}

fn breaker_policy(settings: &Settings) -> BreakerPolicy {
    let breaker = &settings.breaker;
    BreakerPolicy {
        failure_threshold: breaker.failure_threshold.get(),
        window: breaker.window,
        cooldown: breaker.cooldown,
        probe_timeout: breaker.probe_timeout,
    }
}

/// Says loudly, at start, which providers are simulated.
fn announce(providers: &Providers) {
    if providers.simulated.is_empty() {
        tracing::info!("All providers are real");
        return;
    }
    for provider in &providers.simulated {
        tracing::warn!(
            provider,
            "SIMULATED PROVIDER: no API key is set for {provider}; its calls are answered by the built-in simulator (images are generated locally, not by a model)"
        );
    }
}

/// How long a worker's heartbeat lasts; it beats every third of that. A worker that died holds
/// its jobs' runs no longer than this ([`shared::store::JobStore::claim_run`]).
const HEARTBEAT_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// Beats until aborted, once the consumer has drained its runs.
async fn heartbeat(store: JobStore, worker_id: String) {
    loop {
        tokio::time::sleep(HEARTBEAT_TTL / 3).await;
        if let Err(error) = store.heartbeat(&worker_id, HEARTBEAT_TTL).await {
            tracing::warn!(%error, "Could not write this worker's heartbeat");
        }
    }
}
