//! The dead-letter queue (`{q}.jobs.dead`) for operators: look at what is in it, and put failed
//! jobs whose messages ended there back in line. `pictor admin dlq` is a thin shell over this.
//!
//! Both operations read the queue with `basic.get` on one channel and **hold** every delivery
//! they do not consume until they are done, so no message is seen twice in one pass. What they
//! leave is given back with `basic.nack(requeue)`, one delivery at a time: since RabbitMQ 4.3 that
//! is the return that does not count as a failed delivery (`basic.reject` and a closed channel
//! do), so looking at the queue never brings a message closer to a delivery limit. (On RabbitMQ
//! 4.0 to 4.2 every return counts, and quorum queues default to a limit of 20; the dead-letter
//! queue needs `x-delivery-limit = -1` there.) Returned messages may come back in another order.
//!
//! Replaying follows the order that keeps every accepted job on a path to a terminal state:
//! first the job is reset from `failed` to `queued` in Redis, then a fresh message is published
//! with a confirm, and only then is the dead letter acked. A fresh message carries no
//! `x-delivery-count`, so the job gets a full set of deliveries again.
//!
//! A replayed job runs from its input image, which a `processing_failed` job keeps until its
//! images expire with it (`docs/storage.md`). One whose input is gone anyway (a retention shorter
//! than the job TTL, or a job that also failed for good) could only fail again, so its dead letter
//! is acked without a replay and reported in [`ReplayReport::input_gone`].

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

use shared::codes::NoticeKind;
use shared::config::AmqpSettings;
use shared::domain::{JobId, JobStatus, Notice};
use shared::images::{ImageStore, ImageStoreError};
use shared::queue::{JobMessage, Publisher, QueueError, Topology};
use shared::store::{Guard, JobStore, JobUpdate, StoreError, UpdateOutcome};

/// How long one broker operation (a get, a declare, a confirm) may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of a payload a listing shows.
const BODY_PREVIEW_CHARS: usize = 500;

/// One message in the dead-letter queue, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The job it names: from the payload, or else from the `message-id` property.
    pub job_id: Option<JobId>,
    /// Why it was dead-lettered (`rejected`, `delivery_limit`, `expired`, ...).
    pub reason: String,
    /// The queue it was dead-lettered from.
    pub queue: String,
    /// How often it has been dead-lettered (the sum of the `x-death` counts).
    pub deaths: u32,
    /// The payload as text (invalid UTF-8 replaced), cut to 500 characters.
    pub body: String,
    pub message_id: Option<String>,
}

impl DeadLetter {
    fn read(properties: &BasicProperties, data: &[u8]) -> Self {
        let message_id = properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_string());
        let job_id = JobMessage::decode(data)
            .ok()
            .map(|message| message.job_id())
            .or_else(|| message_id.as_deref().and_then(JobId::parse));
        let headers = properties.headers().clone().unwrap_or_default();
        let deaths = death_records(&headers);
        let reason = header_text(&headers, "x-first-death-reason")
            .or_else(|| {
                deaths
                    .first()
                    .and_then(|death| header_text(death, "reason"))
            })
            .unwrap_or_default();
        let queue = header_text(&headers, "x-first-death-queue")
            .or_else(|| deaths.first().and_then(|death| header_text(death, "queue")))
            .unwrap_or_default();
        let deaths = deaths
            .iter()
            .filter_map(|death| death.inner().get("count").and_then(as_u32))
            .sum();
        Self {
            job_id,
            reason,
            queue,
            deaths,
            body: String::from_utf8_lossy(data)
                .chars()
                .take(BODY_PREVIEW_CHARS)
                .collect(),
            message_id,
        }
    }
}

/// The `x-death` entries, most recent first (as RabbitMQ keeps them).
fn death_records(headers: &FieldTable) -> Vec<FieldTable> {
    match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(entries)) => entries
            .as_slice()
            .iter()
            .filter_map(|entry| match entry {
                AMQPValue::FieldTable(table) => Some(table.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn header_text(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(key)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_string()),
        _ => None,
    }
}

fn as_u32(value: &AMQPValue) -> Option<u32> {
    match value {
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        _ => None,
    }
}

/// Reads up to `limit` dead letters without removing any: each is held until all are read, then
/// returned to the queue.
pub async fn list(settings: &AmqpSettings, limit: usize) -> Result<Vec<DeadLetter>, DlqError> {
    let mut reader = Reader::open(settings, "dlq-list").await?;
    let mut letters = Vec::new();
    let mut failure = None;
    while letters.len() < limit {
        match reader.next().await {
            Ok(Some(delivery)) => {
                letters.push(DeadLetter::read(&delivery.properties, &delivery.data));
                reader.hold(delivery);
            }
            Ok(None) => break,
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    let finished = reader.finish().await;
    match failure {
        Some(error) => Err(error.into()),
        None => finished.map(|()| letters).map_err(DlqError::from),
    }
}

/// What [`replay`] did with the dead letters it read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Failed jobs reset to `queued` and published afresh; their dead letters were acked.
    pub replayed: Vec<JobId>,
    /// Dead letters acked without a replay, because nothing is left to retry: the job ended
    /// some other way (succeeded, canceled, waiting for the user), expired from Redis, or was
    /// already replayed by an earlier dead letter of this pass.
    pub discarded: Vec<Discarded>,
    /// Dead letters left in the queue because their job is still active (`queued`, `running`,
    /// `retrying`): a worker or the watchdog owns it, and a second message would run it twice.
    pub active: Vec<JobId>,
    /// Dead letters left in the queue because they do not decode as a job message.
    pub undecodable: usize,
    /// Dead letters left in the queue because they name another job than the one asked for.
    pub left: usize,
    /// Dead letters acked without a replay because their failed job's input image is no longer
    /// in the image store: the job stays `failed`, and the user must submit it again.
    pub input_gone: Vec<JobId>,
}

impl ReplayReport {
    /// Dead letters left in the queue for a person to look at (undecodable or job still active).
    pub fn skipped(&self) -> usize {
        self.undecodable + self.active.len()
    }
}

/// A dead letter acked without a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discarded {
    pub job_id: JobId,
    /// The job's status, or `None` if it is gone from Redis.
    pub status: Option<JobStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("there is no dead-letter queue {0} (check PICTOR_QUEUE_PREFIX and PICTOR_AMQP_URL)")]
    NoQueue(String),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Images(#[from] ImageStoreError),
}

/// Reads up to `limit` dead letters and replays the failed jobs they name (only `only`, if
/// given). See [`ReplayReport`] for what happens to each dead letter.
///
/// Stops at the first broker or Redis error; what it replayed until then stays replayed, and
/// every dead letter not yet acked goes back to the queue.
pub async fn replay(
    settings: &AmqpSettings,
    store: &JobStore,
    images: &ImageStore,
    limit: usize,
    only: Option<JobId>,
) -> Result<ReplayReport, DlqError> {
    let mut reader = Reader::open(settings, "dlq-replay").await?;
    let publisher = Publisher::new(settings.clone(), BROKER_TIMEOUT);
    let mut report = ReplayReport::default();
    let mut failure = None;
    for _ in 0..limit {
        let delivery = match reader.next().await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => break,
            Err(error) => {
                failure = Some(error.into());
                break;
            }
        };
        let job_id = match JobMessage::decode(&delivery.data) {
            Ok(message) => message.job_id(),
            Err(_) => {
                report.undecodable += 1;
                reader.hold(delivery);
                continue;
            }
        };
        if only.is_some_and(|wanted| wanted != job_id) {
            report.left += 1;
            reader.hold(delivery);
            continue;
        }
        if let Err(error) = replay_one(
            store,
            images,
            &publisher,
            &mut reader,
            delivery,
            job_id,
            &mut report,
        )
        .await
        {
            failure = Some(error);
            break;
        }
    }
    publisher.close().await;
    let finished = reader.finish().await;
    match failure {
        Some(error) => Err(error),
        None => finished.map(|()| report).map_err(DlqError::from),
    }
}

/// Decides one dead letter whose job is `job_id`: replay, discard or keep it.
async fn replay_one(
    store: &JobStore,
    images: &ImageStore,
    publisher: &Publisher,
    reader: &mut Reader,
    delivery: Delivery,
    job_id: JobId,
    report: &mut ReplayReport,
) -> Result<(), DlqError> {
    if report.replayed.contains(&job_id) {
        // A second dead letter of a job this pass already put back in line.
        report.discarded.push(Discarded {
            job_id,
            status: Some(JobStatus::Queued),
        });
        return reader.ack(delivery).await.map_err(DlqError::from);
    }
    let Some(job) = store.get(job_id).await? else {
        report.discarded.push(Discarded {
            job_id,
            status: None,
        });
        return reader.ack(delivery).await.map_err(DlqError::from);
    };
    if job.status == JobStatus::Failed
        && let Some(input) = &job.input_image
        && !images.exists(&ImageStore::input_of(job_id, input)).await?
    {
        report.input_gone.push(job_id);
        return reader.ack(delivery).await.map_err(DlqError::from);
    }
    let reset = JobUpdate {
        status: Some(JobStatus::Queued),
        clear_error: true,
        reset_infra_attempts: true,
        step_attempts: Some(0),
        requeues: Some(0),
        add_notices: vec![Notice::now(
            NoticeKind::Replayed,
            "Support retried this job.",
        )],
        ..JobUpdate::default()
    };
    // The guard makes the reset atomic with the check: a job that changed since the `get`
    // is judged by the status the update found.
    let found = if job.status == JobStatus::Failed {
        match store
            .update(job_id, Guard::Status(JobStatus::Failed), &reset)
            .await?
        {
            UpdateOutcome::Applied { .. } => Found::Reset,
            UpdateOutcome::Refused(status) => Found::Other(status),
            UpdateOutcome::Missing => Found::Gone,
        }
    } else {
        Found::Other(job.status)
    };
    match found {
        Found::Reset => {}
        Found::Other(status) if !status.is_terminal() => {
            report.active.push(job_id);
            reader.hold(delivery);
            return Ok(());
        }
        Found::Other(status) => {
            report.discarded.push(Discarded {
                job_id,
                status: Some(status),
            });
            return reader.ack(delivery).await.map_err(DlqError::from);
        }
        Found::Gone => {
            report.discarded.push(Discarded {
                job_id,
                status: None,
            });
            return reader.ack(delivery).await.map_err(DlqError::from);
        }
    }
    if let Err(error) = publisher
        .publish(&JobMessage::run(job_id), FieldTable::default())
        .await
    {
        // No message carries the job now: put it back to `failed` as it was, so it does not
        // sit in `queued` forever, and keep its dead letter for the next try.
        let restore = JobUpdate {
            status: Some(JobStatus::Failed),
            error: job.error.clone(),
            error_detail: job.error_detail.clone(),
            step_attempts: Some(job.step_attempts),
            requeues: Some(job.requeues),
            ..JobUpdate::default()
        };
        if let Err(restore_error) = store
            .update(job_id, Guard::Status(JobStatus::Queued), &restore)
            .await
        {
            tracing::error!(job_id = %job_id, error = %restore_error, "Could not mark the job failed again after a failed replay; it is queued without a message");
        }
        reader.hold(delivery);
        return Err(error.into());
    }
    report.replayed.push(job_id);
    // Acked last: if this fails, the dead letter stays and a later pass discards it, since
    // its job is no longer failed.
    reader.ack(delivery).await.map_err(DlqError::from)
}

/// What a replay found the job in.
enum Found {
    /// It was `failed` and is `queued` now.
    Reset,
    Other(JobStatus),
    Gone,
}

/// One pass over the dead-letter queue: a connection, a channel, and the deliveries held so far.
struct Reader {
    connection: Connection,
    channel: Channel,
    queue: String,
    held: Vec<Delivery>,
}

impl Reader {
    async fn open(settings: &AmqpSettings, name: &str) -> Result<Self, DlqError> {
        let connection = shared::queue::connect(settings, name).await?;
        let queue = Topology::new(settings).dead_letter_queue;
        let opened = async {
            let channel = timed(connection.create_channel()).await?;
            // Passive: an operator's command must not create a topology for a mistyped prefix,
            // nor trip over declare arguments it does not share with the services.
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            match timed(channel.queue_declare(
                queue.as_str().into(),
                passive,
                FieldTable::default(),
            ))
            .await
            {
                Ok(_) => Ok(channel),
                Err(QueueError::Unavailable(error)) if is_not_found(&error) => {
                    Err(DlqError::NoQueue(queue.clone()))
                }
                Err(error) => Err(error.into()),
            }
        }
        .await;
        match opened {
            Ok(channel) => Ok(Self {
                connection,
                channel,
                queue,
                held: Vec::new(),
            }),
            Err(error) => {
                let _ = connection.close(200, "dlq done".into()).await;
                Err(error)
            }
        }
    }

    /// The next dead letter not held by this pass, or `None` when the queue has no more.
    async fn next(&mut self) -> Result<Option<Delivery>, QueueError> {
        let got = timed(self.channel.basic_get(
            self.queue.as_str().into(),
            BasicGetOptions { no_ack: false },
        ))
        .await?;
        Ok(got.map(|message| message.delivery))
    }

    /// Keeps `delivery` unacknowledged until [`Reader::finish`], so the queue cannot hand it out
    /// again during this pass.
    fn hold(&mut self, delivery: Delivery) {
        self.held.push(delivery);
    }

    async fn ack(&self, delivery: Delivery) -> Result<(), QueueError> {
        timed(delivery.ack(BasicAckOptions::default()))
            .await
            .map(|_| ())
    }

    /// Gives every held delivery back to the queue and closes the connection. Should a nack
    /// fail, closing the connection returns the rest anyway.
    async fn finish(self) -> Result<(), QueueError> {
        let mut result = Ok(());
        for delivery in &self.held {
            let nacked = timed(delivery.nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            }))
            .await;
            if let Err(error) = nacked {
                result = Err(error);
                break;
            }
        }
        let _ = self.connection.close(200, "dlq done".into()).await;
        result
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

async fn timed<T>(
    future: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, QueueError> {
    tokio::time::timeout(BROKER_TIMEOUT, future)
        .await
        .map_err(|_| QueueError::Timeout(BROKER_TIMEOUT))?
        .map_err(QueueError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Properties of a dead letter as RabbitMQ writes them.
    fn dead_letter_properties(reason: &str, queue: &str, count: i64) -> BasicProperties {
        use lapin::types::{FieldArray, LongString};
        let text = |value: &str| AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()));
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(count));
        death.insert("reason".into(), text(reason));
        death.insert("queue".into(), text(queue));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        headers.insert("x-first-death-reason".into(), text(reason));
        headers.insert("x-first-death-queue".into(), text(queue));
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn a_dead_job_message_names_its_job_reason_queue_and_deaths() {
        let id = JobId::new();
        let letter = DeadLetter::read(
            &dead_letter_properties("delivery_limit", "pictor.jobs", 2),
            &JobMessage::run(id).encode(),
        );
        assert_eq!(letter.job_id, Some(id));
        assert_eq!(letter.reason, "delivery_limit");
        assert_eq!(letter.queue, "pictor.jobs");
        assert_eq!(letter.deaths, 2);
    }

    #[test]
    fn an_unreadable_payload_is_shown_cut_and_named_by_its_message_id() {
        let id = JobId::new();
        let mut payload = vec![0xff];
        payload.extend(std::iter::repeat_n(b'x', 800));
        let properties = dead_letter_properties("rejected", "pictor.jobs", 1)
            .with_message_id(id.to_string().into());
        let letter = DeadLetter::read(&properties, &payload);
        assert_eq!(letter.job_id, Some(id));
        assert_eq!(letter.message_id, Some(id.to_string()));
        assert_eq!(letter.body.chars().count(), BODY_PREVIEW_CHARS);
        assert!(letter.body.starts_with('\u{fffd}'));
    }

    #[test]
    fn a_message_without_death_headers_has_no_reason_and_no_deaths() {
        let letter = DeadLetter::read(&BasicProperties::default(), b"{}");
        assert_eq!(letter.job_id, None);
        assert_eq!(letter.reason, "");
        assert_eq!(letter.deaths, 0);
    }
}
