//! The RabbitMQ side of the worker: consume with manual acks and a prefetch equal to the
//! concurrency, run each delivery through the [`Pipeline`], and ack only after the job's final
//! state is written. A worker that dies before acking loses nothing: the broker redelivers the
//! message and the pipeline finishes the job (writing its result once).
//!
//! The connection is supervised here with an explicit reconnect loop that re-declares the
//! topology, rather than lapin's auto-recovery (see the crate notes in the reference).

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use shared::config::AmqpSettings;
use shared::queue::{JobMessage, Publisher, Topology, delivery_count};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::agents::JobError;
use crate::attempts::Verdict;
use crate::pipeline::{Finished, Pipeline};

pub struct Consumer {
    pub settings: AmqpSettings,
    pub topology: Topology,
    /// Publishes deferred jobs to the delay queues.
    pub publisher: Publisher,
    pub pipeline: Arc<Pipeline>,
    pub concurrency: u16,
    pub shutdown_grace: Duration,
}

impl Consumer {
    /// Consumes until `shutdown` flips to true, then stops taking deliveries, waits up to the
    /// grace period for jobs in flight, and closes (unfinished jobs go back to the queue).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut in_flight = JoinSet::new();
        let mut backoff = Duration::from_millis(200);
        while !*shutdown.borrow() {
            match self.consume(&mut in_flight, &mut shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "Consumer lost RabbitMQ; reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {},
                        _ = shutdown.changed() => {},
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let pending = in_flight.len();
        if pending > 0 {
            tracing::info!(pending, "Waiting for jobs in flight");
            let drained = tokio::time::timeout(self.shutdown_grace, async {
                while in_flight.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    left = in_flight.len(),
                    "Grace period over; unfinished jobs return to the queue"
                );
                in_flight.abort_all();
            }
        }
        tracing::info!("Worker stopped");
    }

    /// One connection's life. `Ok` means shutdown was requested; `Err` means reconnect.
    async fn consume(
        &self,
        in_flight: &mut JoinSet<()>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), shared::queue::QueueError> {
        let connection = shared::queue::connect(&self.settings, "worker").await?;
        let channel = connection.create_channel().await?;
        self.topology.declare(&channel).await?;
        channel
            .basic_qos(self.concurrency, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                self.topology.jobs_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %self.topology.jobs_queue, prefetch = self.concurrency, "Consuming jobs");
        loop {
            tokio::select! {
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let pipeline = self.pipeline.clone();
                        let publisher = self.publisher.clone();
                        let limit = self.topology.delivery_limit;
                        in_flight.spawn(handle(pipeline, publisher, delivery, limit));
                    }
                    Some(Err(error)) => return Err(error.into()),
                    None => return Err(shared::queue::QueueError::Refused("consumer was cancelled by the broker".into())),
                },
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {},
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
                        // Let jobs in flight ack on this channel before it closes.
                        let _ = tokio::time::timeout(self.shutdown_grace, async {
                            while in_flight.join_next().await.is_some() {}
                        }).await;
                        let _ = connection.close(200, "shutdown".into()).await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Handles one delivery end to end, acking or requeueing it.
async fn handle(
    pipeline: Arc<Pipeline>,
    publisher: Publisher,
    delivery: Delivery,
    delivery_limit: u32,
) {
    let message = match JobMessage::decode(&delivery.data) {
        Ok(message) => message,
        Err(error) => {
            tracing::error!(%error, "Unreadable job message; dead-lettering it");
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            return;
        }
    };
    let deliveries_before = delivery_count(&delivery.properties);
    crate::metrics::in_flight(1.0);
    let _in_flight = InFlight;
    let job_id = message.job_id();
    let trace_id = shared::telemetry::trace_id_from(&delivery.properties)
        .unwrap_or_else(|| shared::telemetry::trace_id(job_id));
    let span = tracing::info_span!(
        "job",
        job_id = %job_id,
        trace_id = %trace_id,
        delivery = deliveries_before + 1
    );
    async {
        let outcome =
            run_with_retries(&pipeline, &message, deliveries_before, delivery_limit).await;
        let poisoned = deliveries_before >= delivery_limit;
        settle(&delivery, &publisher, &message, outcome, poisoned).await;
    }
    .instrument(span)
    .await;
}

/// Runs the job, trying again here after infrastructure trouble, each failure counted on the
/// job against its budget of infrastructure attempts (shared with every delivery and with the
/// call path). Past the budget the job ends `failed` ([`Finished::Abandoned`]); when even that
/// cannot be written, the trouble is handed back (`Err`) and the message requeued.
async fn run_with_retries(
    pipeline: &Pipeline,
    message: &JobMessage,
    deliveries_before: u32,
    delivery_limit: u32,
) -> Result<Finished, JobError> {
    let seen = AtomicU32::new(0);
    loop {
        match pipeline
            .run(message, deliveries_before, delivery_limit)
            .await
        {
            Err(JobError::Retryable { source, after }) => {
                let cause = format!("{source:#}");
                tracing::warn!(error = %cause, "Job hit infrastructure trouble");
                let verdict = pipeline
                    .services
                    .infra
                    .count(&pipeline.store, message.job_id(), &seen)
                    .await;
                match verdict {
                    Verdict::RetryAfter(pause) => {
                        tokio::time::sleep(after.map_or(pause, |after| after.max(pause))).await;
                    }
                    Verdict::Exhausted(failures) => {
                        return pipeline.give_up(message.job_id(), failures, &cause).await;
                    }
                }
            }
            outcome => return outcome,
        }
    }
}

/// Settles the delivery after its run: a deferred job's delayed copy is published (and
/// confirmed) before this one is acked; a poison message is dead-lettered once its job ended;
/// an ended or skipped job is acked; trouble gives the message back to the queue.
async fn settle(
    delivery: &Delivery,
    publisher: &Publisher,
    message: &JobMessage,
    outcome: Result<Finished, JobError>,
    poisoned: bool,
) {
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    match outcome {
        Ok(Finished::Deferred(after)) => {
            // The delayed copy must be safe with the broker before this one is acked.
            let settled = match publisher.publish_delayed(message, after).await {
                Ok(applied) => {
                    tracing::info!(delay_s = applied.as_secs(), "Job sent to a delay queue");
                    delivery.ack(BasicAckOptions::default()).await
                }
                Err(error) => {
                    tracing::warn!(%error, "Cannot defer the job; requeueing it");
                    delivery.nack(requeue).await
                }
            };
            if let Err(error) = settled {
                tracing::warn!(%error, "Settling a deferred job failed; it will be redelivered");
            }
        }
        Ok(Finished::Abandoned) => {
            // The job has ended failed; its message goes to ops' dead-letter queue.
            tracing::error!(
                "Dead-lettering the message of a job that used up its infrastructure attempts"
            );
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
        }
        Ok(_) if poisoned => {
            // A poison message: its job has been ended; keep the message for ops.
            tracing::error!("Dead-lettering a job message delivered too many times");
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
        }
        Ok(finished) => {
            if let Finished::Ended(status) = finished {
                tracing::debug!(status = status.as_str(), "Acking job");
            }
            if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
                // The broker will redeliver; the pipeline will see the job has ended.
                tracing::warn!(%error, "Ack failed; the job will be redelivered and skipped");
            }
        }
        Err(JobError::Retryable { .. }) => {
            // Give the message back; another worker (or this one later) retries.
            let _ = delivery.nack(requeue).await;
        }
        Err(other) => {
            tracing::error!(error = %other, "Unexpected job error; requeueing");
            let _ = delivery.nack(requeue).await;
        }
    }
}

/// Counts a job in flight for as long as it is handled, however the handling ends.
struct InFlight;

impl Drop for InFlight {
    fn drop(&mut self) {
        crate::metrics::in_flight(-1.0);
    }
}
