//! The RabbitMQ side of the worker: consume with manual acks and a prefetch equal to the
//! concurrency, run each delivery through the [`Pipeline`], and ack only after the job's final
//! state is written (acks of a few milliseconds go together, [`crate::acks`]). A worker that
//! dies before acking loses nothing: the broker redelivers the message and the pipeline
//! finishes the job (writing its result once).
//!
//! The connection is supervised here with an explicit reconnect loop that re-declares the
//! topology, rather than lapin's auto-recovery (see the crate notes in the reference).
//!
//! A panic in a job's run is caught here and counted as one of the job's infrastructure
//! failures: its message is requeued, and a job that keeps panicking ends `failed` and is
//! dead-lettered like any job that used up its attempts. An uncaught panic would leave the
//! message unacked and its prefetch slot taken until the channel closed. [`ConsumerHealth`]
//! says whether the consumer takes work at all, for the worker's `/healthz`.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
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

use crate::acks::{ACK_BATCH, ACK_WINDOW, AckBatch, Flush};
use crate::agents::JobError;
use crate::attempts::Verdict;
use crate::pipeline::{Finished, Pipeline, RunLease};

pub struct Consumer {
    pub settings: AmqpSettings,
    pub topology: Topology,
    /// Publishes deferred jobs to the delay queues.
    pub publisher: Publisher,
    pub pipeline: Arc<Pipeline>,
    pub concurrency: u16,
    pub shutdown_grace: Duration,
    /// Whether this consumer takes work, as `/healthz` reports it.
    pub health: Arc<ConsumerHealth>,
}

/// Whether the consumer takes work: it has a channel with a registered consumer, and not every
/// prefetch slot is held by a delivery that stopped moving. Read by the worker's `/healthz`.
#[derive(Debug)]
pub struct ConsumerHealth {
    /// The current channel's slots; `None` while there is no channel (not connected yet, or
    /// reconnecting).
    current: Mutex<Option<Arc<Slots>>>,
    /// Prefetch slots a channel has.
    concurrency: usize,
    /// How long every slot may stay taken with none of them settled before the consumer counts
    /// as wedged.
    stall_after: Duration,
}

/// The prefetch slots of one channel: deliveries received and not yet settled, and when one
/// last arrived or was settled.
#[derive(Debug)]
struct Slots {
    taken: AtomicUsize,
    progress: Mutex<Instant>,
}

impl Slots {
    fn moved(&self) {
        *self.progress.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }
}

/// One delivery's prefetch slot. It is given back only by [`Slot::settled`], after the
/// message was acked, requeued or rejected: a task that died before that leaves its slot
/// taken, as the broker does.
struct Slot(Arc<Slots>);

impl Slot {
    fn take(slots: &Arc<Slots>) -> Self {
        slots.taken.fetch_add(1, Ordering::SeqCst);
        slots.moved();
        Self(slots.clone())
    }

    fn settled(self) {
        self.0.taken.fetch_sub(1, Ordering::SeqCst);
        self.0.moved();
    }
}

/// What sends one delivery's ack: lapin's [`lapin::Acker`], or a stand-in in tests.
trait SendAck: Send + Sync + 'static {
    fn send(&self, multiple: bool) -> futures::future::BoxFuture<'_, Result<bool, lapin::Error>>;
}

impl SendAck for lapin::Acker {
    fn send(&self, multiple: bool) -> futures::future::BoxFuture<'_, Result<bool, lapin::Error>> {
        self.ack(BasicAckOptions { multiple }).boxed()
    }
}

/// One channel's acks waiting to be sent together ([`crate::acks`]), and the consume loop's
/// wake-up when the first one arrives or enough have.
struct AckQueue<A = lapin::Acker> {
    batch: Mutex<AckBatch<(A, Slot)>>,
    wake: tokio::sync::Notify,
}

impl<A> Default for AckQueue<A> {
    fn default() -> Self {
        Self {
            batch: Mutex::new(AckBatch::default()),
            wake: tokio::sync::Notify::new(),
        }
    }
}

impl<A: SendAck> AckQueue<A> {
    fn lock(&self) -> std::sync::MutexGuard<'_, AckBatch<(A, Slot)>> {
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn delivered(&self, tag: u64) {
        self.lock().delivered(tag);
    }

    /// The delivery was requeued or rejected on its own: its slot is free.
    fn settled(&self, tag: u64, slot: Slot) {
        self.lock().settled(tag);
        slot.settled();
    }

    /// The delivery's job ended: its ack goes with the next flush, and its slot after that.
    fn ready(&self, tag: u64, acker: A, slot: Slot) {
        let waiting = self.lock().ready(tag, (acker, slot));
        if waiting == 1 || waiting >= ACK_BATCH {
            self.wake.notify_one();
        }
    }

    /// Sends every waiting ack: the oldest run with one `multiple` ack, the rest one by one.
    /// Runs beside the consume loop, one flush at a time per channel (a `multiple` ack must
    /// not overtake a single ack it would cover), and gives up after [`ACK_TIMEOUT`]: an ack
    /// lapin queued just as the connection died may never be answered, and the loop must
    /// still see the connection go and reconnect.
    async fn flush(self: Arc<Self>) -> Result<(), shared::queue::QueueError> {
        let Flush { run, singles } = self.lock().take();
        let multiple = run.len() > 1;
        let mut acks = Vec::with_capacity(1 + singles.len());
        if let Some((_, (acker, _))) = run.last() {
            acks.push(acker.send(multiple));
        }
        for (_, (acker, _)) in &singles {
            acks.push(acker.send(false));
        }
        let sent = tokio::time::timeout(ACK_TIMEOUT, futures::future::join_all(acks))
            .await
            .map_err(|_| shared::queue::QueueError::Timeout(ACK_TIMEOUT))?;
        for acked in sent {
            if let Err(error) = acked {
                // The broker will redeliver; the pipeline will see the job has ended.
                tracing::warn!(%error, "Ack failed; the job will be redelivered and skipped");
            }
        }
        for (_, (_, slot)) in run.into_iter().chain(singles) {
            slot.settled();
        }
        Ok(())
    }
}

/// How long a flush of acks may take before the channel counts as lost.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

impl ConsumerHealth {
    /// A consumer with `concurrency` slots that counts as wedged when all of them stay taken
    /// for `stall_after` without one settling.
    pub fn new(concurrency: usize, stall_after: Duration) -> Self {
        Self {
            current: Mutex::new(None),
            concurrency,
            stall_after,
        }
    }

    /// `Ok` while the consumer takes work; else why not.
    pub fn check(&self) -> Result<(), String> {
        let current = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(slots) = current else {
            return Err("not consuming: no RabbitMQ channel (reconnecting)".to_string());
        };
        let taken = slots.taken.load(Ordering::SeqCst);
        let idle = slots
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed();
        if taken >= self.concurrency && idle >= self.stall_after {
            return Err(format!(
                "wedged: all {taken} job slots taken and none settled for {} s",
                idle.as_secs()
            ));
        }
        Ok(())
    }

    /// A channel is consuming: fresh slots, all free (the broker took back the old channel's
    /// unsettled deliveries when it closed).
    fn consuming(&self) -> Arc<Slots> {
        let slots = Arc::new(Slots {
            taken: AtomicUsize::new(0),
            progress: Mutex::new(Instant::now()),
        });
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(slots.clone());
        slots
    }

    /// The channel is gone.
    fn disconnected(&self) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl Consumer {
    /// Consumes until `shutdown` flips to true, then stops taking deliveries, waits up to the
    /// grace period for jobs in flight, and closes (unfinished jobs go back to the queue).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut in_flight = JoinSet::new();
        let mut backoff = Duration::from_millis(200);
        while !*shutdown.borrow() {
            let consumed = self.consume(&mut in_flight, &mut shutdown).await;
            self.health.disconnected();
            match consumed {
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
        let slots = self.health.consuming();
        let acks = Arc::new(AckQueue::default());
        // When the waiting acks go (the window's end after the first of them), whether they
        // are due, and the flush under way, if any: it runs beside the loop, which keeps
        // taking deliveries and noticing a lost connection meanwhile.
        let mut flush_at: Option<tokio::time::Instant> = None;
        let mut due = false;
        let mut flushing: Option<futures::future::BoxFuture<'static, _>> = None;
        loop {
            if due && flushing.is_none() {
                flushing = Some(acks.clone().flush().boxed());
                due = false;
            }
            tokio::select! {
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let pipeline = self.pipeline.clone();
                        let publisher = self.publisher.clone();
                        let limit = self.topology.delivery_limit;
                        let slot = Slot::take(&slots);
                        acks.delivered(delivery.delivery_tag);
                        let settle = Settle { acks: acks.clone(), slot };
                        in_flight.spawn(handle(pipeline, publisher, delivery, limit, settle));
                    }
                    Some(Err(error)) => return Err(error.into()),
                    None => return Err(shared::queue::QueueError::Refused("consumer was cancelled by the broker".into())),
                },
                Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Err(error) = joined
                        && error.is_panic()
                    {
                        // A panic outside the job's run (which `run_with_retries` catches):
                        // the delivery went with the task, unsettled.
                        tracing::error!(%error, "A job's task panicked outside its run; its message stays unacked until the channel closes");
                    }
                },
                () = acks.wake.notified() => {
                    if acks.lock().waiting() >= ACK_BATCH {
                        due = true;
                        flush_at = None;
                    } else if flush_at.is_none() {
                        flush_at = Some(tokio::time::Instant::now() + ACK_WINDOW);
                    }
                },
                () = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)), if flush_at.is_some() => {
                    due = true;
                    flush_at = None;
                },
                // Acks that became ready while it ran were timed by their wake-up meanwhile.
                Some(flushed) = futures::future::OptionFuture::from(flushing.as_mut()) => {
                    flushing = None;
                    flushed?;
                },
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
                        // Let jobs in flight ack on this channel before it closes.
                        let _ = tokio::time::timeout(self.shutdown_grace, async {
                            while in_flight.join_next().await.is_some() {}
                        }).await;
                        if let Some(flushing) = flushing.take() {
                            let _ = flushing.await;
                        }
                        let _ = acks.clone().flush().await;
                        let _ = connection.close(200, "shutdown".into()).await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Where a delivery's settlement goes: its channel's waiting acks, and its prefetch slot.
struct Settle {
    acks: Arc<AckQueue>,
    slot: Slot,
}

impl Settle {
    /// The delivery was acked (with the next flush) or requeued or rejected (already).
    fn done(self, delivery: &Delivery, ack: bool) {
        if ack {
            self.acks
                .ready(delivery.delivery_tag, delivery.acker.clone(), self.slot);
        } else {
            self.acks.settled(delivery.delivery_tag, self.slot);
        }
    }
}

/// Handles one delivery end to end, acking or requeueing it, then gives its slot back.
async fn handle(
    pipeline: Arc<Pipeline>,
    publisher: Publisher,
    delivery: Delivery,
    delivery_limit: u32,
    settled: Settle,
) {
    let message = match JobMessage::decode(&delivery.data) {
        Ok(message) => message,
        Err(error) => {
            tracing::error!(%error, "Unreadable job message; dead-lettering it");
            let _ = Box::pin(delivery.reject(BasicRejectOptions { requeue: false })).await;
            settled.done(&delivery, false);
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
    let ack = async {
        let outcome =
            run_with_retries(&pipeline, &message, deliveries_before, delivery_limit).await;
        let poisoned = deliveries_before >= delivery_limit;
        Box::pin(settle(&delivery, &publisher, &message, outcome, poisoned)).await
    }
    .instrument(span)
    .await;
    settled.done(&delivery, ack);
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
    // Every try of this delivery is one run of the job, holding its claim on the job.
    let lease = RunLease::new(format!(
        "{}.{}",
        pipeline.services.worker_id,
        uuid::Uuid::new_v4().simple()
    ));
    let outcome = run_tries(pipeline, message, deliveries_before, delivery_limit, &lease).await;
    // However it ended (a panic, trouble handed back to the queue), the next delivery may run:
    // the job's final write gave the lease back, or this does.
    if !lease.released()
        && let Err(error) =
            Box::pin(pipeline.store.release_run(message.job_id(), &lease.runner)).await
    {
        tracing::warn!(%error, "Could not release the job's run; the next one waits for it to lapse");
    }
    outcome
}

async fn run_tries(
    pipeline: &Pipeline,
    message: &JobMessage,
    deliveries_before: u32,
    delivery_limit: u32,
    lease: &RunLease,
) -> Result<Finished, JobError> {
    let seen = AtomicU32::new(0);
    loop {
        let run = AssertUnwindSafe(pipeline.run(message, deliveries_before, delivery_limit, lease))
            .catch_unwind()
            .await
            .map_err(|panic| panic_message(panic.as_ref()));
        let run = match run {
            Ok(run) => run,
            Err(what) => return Box::pin(panicked(pipeline, message, &seen, &what)).await,
        };
        match run {
            Err(JobError::Retryable { source, after }) => {
                let cause = format!("{source:#}");
                tracing::warn!(error = %cause, "Job hit infrastructure trouble");
                let verdict = Box::pin(pipeline.services.infra.count(
                    &pipeline.store,
                    message.job_id(),
                    &seen,
                ))
                .await;
                match verdict {
                    Verdict::RetryAfter(pause) => {
                        tokio::time::sleep(after.map_or(pause, |after| after.max(pause))).await;
                    }
                    Verdict::Exhausted(failures) => {
                        return Box::pin(pipeline.give_up(message.job_id(), failures, &cause))
                            .await;
                    }
                }
            }
            outcome => return outcome,
        }
    }
}

/// After the job's run panicked: counts the panic as one of the job's infrastructure failures,
/// then hands the message back to the queue after the pause the count asks for, or, past the
/// job's budget, ends the job `failed` (its message is dead-lettered). Nothing the panicking
/// run held in this process can be trusted, so the job runs again from what Redis says.
async fn panicked(
    pipeline: &Pipeline,
    message: &JobMessage,
    seen: &AtomicU32,
    what: &str,
) -> Result<Finished, JobError> {
    let cause = format!("the job's run panicked: {what}");
    tracing::error!(panic = %what, "A job's run panicked; counting it as an infrastructure failure");
    crate::metrics::job_panicked();
    let verdict = pipeline
        .services
        .infra
        .count(&pipeline.store, message.job_id(), seen)
        .await;
    match verdict {
        Verdict::RetryAfter(pause) => {
            tokio::time::sleep(pause).await;
            Err(JobError::infrastructure(anyhow::anyhow!(cause)))
        }
        Verdict::Exhausted(failures) => pipeline.give_up(message.job_id(), failures, &cause).await,
    }
}

/// What a panic said, when it said it with a string (as `panic!` and `expect` do).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Acks a delivery whose delayed copy the broker confirmed (never before: the job would be
/// lost), or gives it back to the queue when the copy could not be published.
async fn settle_delayed(
    delivery: &Delivery,
    delayed: Result<Duration, shared::queue::QueueError>,
    requeue: BasicNackOptions,
) {
    let settled = match delayed {
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

/// Settles the delivery after its run: a deferred job's delayed copy is published (and
/// confirmed) before this one is acked; a poison message is dead-lettered once its job ended;
/// trouble gives the message back to the queue. An ended or skipped job is to be acked: `true`,
/// and its ack goes with the channel's next flush ([`crate::acks`]).
async fn settle(
    delivery: &Delivery,
    publisher: &Publisher,
    message: &JobMessage,
    outcome: Result<Finished, JobError>,
    poisoned: bool,
) -> bool {
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    match outcome {
        Ok(Finished::Deferred(after)) => {
            let delayed = publisher.publish_delayed(message, after).await;
            settle_delayed(delivery, delayed, requeue).await;
        }
        Ok(Finished::NotYet(left)) => {
            let delayed = publisher.publish_delayed_at_most(message, left).await;
            settle_delayed(delivery, delayed, requeue).await;
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
            return true;
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
    false
}

/// Counts a job in flight for as long as it is handled, however the handling ends.
struct InFlight;

impl Drop for InFlight {
    fn drop(&mut self) {
        crate::metrics::in_flight(-1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_says_whether_the_consumer_takes_work() {
        let health = ConsumerHealth::new(2, Duration::ZERO);
        let error = health.check().expect_err("no channel yet");
        assert!(error.contains("not consuming"), "{error}");

        let slots = health.consuming();
        assert_eq!(health.check(), Ok(()));
        let first = Slot::take(&slots);
        assert_eq!(health.check(), Ok(()), "a slot is still free");
        let second = Slot::take(&slots);
        let error = health.check().expect_err("every slot taken, none settling");
        assert!(error.contains("wedged: all 2 job slots"), "{error}");
        first.settled();
        assert_eq!(health.check(), Ok(()));
        drop(second);
        health.disconnected();
        assert!(health.check().is_err(), "reconnecting");
        health.consuming();
        assert_eq!(health.check(), Ok(()), "a new channel's slots are all free");
    }

    /// Records what it was asked to send, or never answers.
    struct Recorder {
        tag: u64,
        sent: Sent,
        hangs: bool,
    }

    impl SendAck for Recorder {
        fn send(
            &self,
            multiple: bool,
        ) -> futures::future::BoxFuture<'_, Result<bool, lapin::Error>> {
            self.sent.lock().unwrap().push((self.tag, multiple));
            if self.hangs {
                futures::future::pending().boxed()
            } else {
                futures::future::ready(Ok(true)).boxed()
            }
        }
    }

    /// What the recorders were asked to send: each tag, and whether as a `multiple` ack.
    type Sent = Arc<Mutex<Vec<(u64, bool)>>>;

    fn queue(tags: &[u64], slots: &Arc<Slots>, hangs: bool) -> (Arc<AckQueue<Recorder>>, Sent) {
        let acks = Arc::new(AckQueue::default());
        let sent = Arc::new(Mutex::new(Vec::new()));
        for &tag in tags {
            acks.delivered(tag);
        }
        for &tag in tags.iter().filter(|tag| **tag != 3) {
            let recorder = Recorder {
                tag,
                sent: sent.clone(),
                hangs,
            };
            acks.ready(tag, recorder, Slot::take(slots));
        }
        (acks, sent)
    }

    #[tokio::test]
    async fn a_flush_sends_one_multiple_ack_for_the_run_and_frees_the_slots_it_acked() {
        let health = ConsumerHealth::new(8, Duration::from_secs(60));
        let slots = health.consuming();
        // 3 is still running: 1 and 2 go as one multiple ack, 4 and 5 one by one.
        let (acks, sent) = queue(&[1, 2, 3, 4, 5], &slots, false);
        let _running = Slot::take(&slots);
        acks.clone().flush().await.expect("every ack answered");
        assert_eq!(
            *sent.lock().unwrap(),
            [(2, true), (4, false), (5, false)],
            "what went to the broker"
        );
        assert_eq!(
            slots.taken.load(Ordering::SeqCst),
            1,
            "only 3's slot is held"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_whose_acks_are_never_answered_gives_up_so_the_loop_reconnects() {
        let health = ConsumerHealth::new(8, Duration::from_secs(60));
        let slots = health.consuming();
        let (acks, sent) = queue(&[1, 2], &slots, true);
        let started = tokio::time::Instant::now();
        let flushed = tokio::time::timeout(Duration::from_secs(60), acks.clone().flush())
            .await
            .expect("the flush gave up by itself");
        assert!(
            matches!(flushed, Err(shared::queue::QueueError::Timeout(_))),
            "{flushed:?}"
        );
        assert_eq!(started.elapsed(), ACK_TIMEOUT);
        assert_eq!(*sent.lock().unwrap(), [(2, true)]);
    }

    #[test]
    fn busy_slots_are_healthy_until_they_stall() {
        let health = ConsumerHealth::new(1, Duration::from_secs(3600));
        let slots = health.consuming();
        let _slot = Slot::take(&slots);
        assert_eq!(health.check(), Ok(()), "a job may take a while");
    }
}
