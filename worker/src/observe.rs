//! The worker's gauges: a sampler that turns broker, breaker, budget and image store state into
//! gauges every few seconds, so the gauges cost nothing on the job path. They are served with
//! the other metrics by `shared::telemetry::metrics::serve`.

use std::time::Duration;

use crate::breaker::CircuitBreaker;
use shared::ledger::{Ledger, Month};
use shared::queue::{Publisher, Topology};
use shared::retention::Retention;
use tokio::sync::watch;

use crate::providers::{gemini, openai};

pub struct Sampler {
    pub publisher: Publisher,
    pub topology: Topology,
    pub breaker: CircuitBreaker,
    pub ledger: Ledger,
    pub retention: Retention,
    pub fair: shared::fair::Fairness,
}

impl Sampler {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            self.sample().await;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => {},
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn sample(&self) {
        for (label, queue) in [
            ("jobs", &self.topology.jobs_queue),
            ("dead", &self.topology.dead_letter_queue),
        ] {
            if let Ok((messages, consumers)) = self.publisher.queue_stats(queue).await {
                crate::metrics::queue(label, messages, consumers);
            }
        }
        // Deferred jobs wait in the delay queues. They are declared here if no deferral has
        // yet: a passive declare of a missing one would close the publisher's channel.
        let mut delayed = 0;
        for tier in shared::queue::DELAY_TIERS_SECS {
            if let Ok(messages) = self.publisher.delay_queue_messages(tier).await {
                delayed += messages;
            }
        }
        crate::metrics::queue("delayed", delayed, 0);
        if let Ok(backlog) = self.fair.backlog().await {
            crate::metrics::backlog(&backlog);
        }
        for provider in [openai::NAME, gemini::NAME] {
            if let Ok(open) = self.breaker.is_open(provider).await {
                crate::metrics::cooldown(provider, open);
            }
        }
        let budget = self.ledger.policy().monthly_micros;
        if let Ok(spent) = self.ledger.spent(Month::of(chrono::Utc::now())).await {
            crate::metrics::budget_spent_ratio(spent as f64 / budget.max(1) as f64);
        }
        if let Ok(usage) = self.retention.usage().await {
            crate::metrics::image_store(usage);
        }
    }
}
