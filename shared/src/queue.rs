//! RabbitMQ: the queue topology, the versioned job message, and a confirming publisher.
//!
//! Topology (names carry `amqp.queue_prefix`, so deployments and tests can share a broker):
//! - `{q}.jobs`: a durable **quorum** queue with `x-delivery-limit`; a message redelivered more
//!   often than that (a worker crashing on it again and again) is dead-lettered instead of
//!   looping forever.
//! - `{q}.dlx`: a fanout exchange receiving those dead letters, bound to `{q}.jobs.dead`, a quorum
//!   queue kept for inspection.
//!
//! Messages are persistent and published to the default exchange with `mandatory`, and the
//! publisher waits for the broker's confirm, so an `Ok` from [`Publisher::publish`] means the
//! broker has the message on disk (on a quorum majority in a cluster).

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::config::AmqpSettings;
use crate::domain::{ImageSize, InputImage, JobId, UserId};
use crate::store::JobRecord;

/// Version of the job message schema that this release writes.
///
/// **Compatibility rule** (what makes a release roll back safely, see
/// `docs/runbooks/rollback.md`): a reader accepts every version in [`readable_versions`], one
/// release back and one forward (`MESSAGE_VERSION - 1 ..= MESSAGE_VERSION + 1`), and ignores
/// fields it does not know. So the next release may only *add* optional fields to a message
/// type (its readers must still accept a message without them); a change that is not additive
/// (a field renamed, removed or given a new meaning) is a new message `type` instead, which an
/// older reader dead-letters rather than misreads. Bumping this constant needs a fixture of the
/// new version in `tests/fixtures/messages/` (the `compat` tests fail without one).
pub const MESSAGE_VERSION: u32 = 1;

/// The message versions this release reads: the previous release's, its own, and the next
/// release's (whose additive fields it ignores). Anything else is dead-lettered.
pub const fn readable_versions() -> RangeInclusive<u32> {
    let oldest = if MESSAGE_VERSION > 1 {
        MESSAGE_VERSION - 1
    } else {
        1
    };
    RangeInclusive::new(oldest, MESSAGE_VERSION + 1)
}

/// A message on the jobs queue. Tagged and versioned: a worker reads the versions of
/// [`readable_versions`] and dead-letters any other version or an unknown `type` rather than
/// guessing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobMessage {
    /// Run (or resume) the job; its state lives in the job's Redis hash.
    RunJob {
        v: u32,
        job_id: JobId,
        enqueued_at: chrono::DateTime<chrono::Utc>,
        /// The job's request, so a worker can recreate a job that Redis lost (the api's accept
        /// failed after the broker's confirm, the pending TTL ran out in a long backlog, or a
        /// Redis failover dropped it). Messages from before it was added have none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job: Option<JobSeed>,
        /// The job may not start before this (a user sending jobs faster than their pace):
        /// a worker that gets it earlier sends it back to wait.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_before: Option<chrono::DateTime<chrono::Utc>>,
        /// Fields this release does not know (added by the next release). They are kept, not
        /// dropped, so a message this worker republishes (to a delay queue) reaches a newer
        /// worker whole.
        #[serde(flatten)]
        unknown: serde_json::Map<String, serde_json::Value>,
    },
}

/// What a message carries of its job's request: enough to recreate the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSeed {
    pub user: UserId,
    pub prompt: String,
    pub size: ImageSize,
    pub n: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_image: Option<InputImage>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl JobSeed {
    pub fn of(job: &JobRecord) -> Self {
        Self {
            user: job.user.clone(),
            prompt: job.prompt.clone(),
            size: job.size,
            n: job.n,
            input_image: job.input_image.clone(),
            created_at: job.created_at,
        }
    }

    /// The job as it was accepted, to run again from the start.
    pub fn into_record(self, id: JobId) -> JobRecord {
        let mut job = JobRecord::new(
            id,
            self.user,
            self.prompt,
            self.size,
            self.n,
            self.input_image,
            self.created_at,
        );
        job.accepted = true;
        job
    }
}

impl JobMessage {
    /// A new message in this release's version, for a job that exists in Redis.
    pub fn run(job_id: JobId) -> Self {
        Self::RunJob {
            v: MESSAGE_VERSION,
            job_id,
            enqueued_at: chrono::Utc::now(),
            job: None,
            not_before: None,
            unknown: serde_json::Map::new(),
        }
    }

    /// A new message carrying `job`'s request, so the job can be recreated from it.
    pub fn for_job(job: &JobRecord) -> Self {
        let Self::RunJob {
            v,
            job_id,
            enqueued_at,
            unknown,
            ..
        } = Self::run(job.id);
        Self::RunJob {
            v,
            job_id,
            enqueued_at,
            job: Some(JobSeed::of(job)),
            not_before: None,
            unknown,
        }
    }

    /// The same message, to be started no earlier than `at`.
    #[must_use]
    pub fn not_before(self, at: chrono::DateTime<chrono::Utc>) -> Self {
        match self {
            Self::RunJob {
                v,
                job_id,
                enqueued_at,
                job,
                unknown,
                ..
            } => Self::RunJob {
                v,
                job_id,
                enqueued_at,
                job,
                not_before: Some(at),
                unknown,
            },
        }
    }

    /// How long the job must still wait before it may start, if at all.
    pub fn wait_left(&self, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
        match self {
            Self::RunJob {
                not_before: Some(at),
                ..
            } => (*at - now).to_std().ok().filter(|left| !left.is_zero()),
            Self::RunJob { .. } => None,
        }
    }

    /// The request the message carries, if it carries one.
    pub fn seed(&self) -> Option<&JobSeed> {
        match self {
            Self::RunJob { job, .. } => job.as_ref(),
        }
    }

    /// When the message was first enqueued.
    pub fn enqueued_at(&self) -> chrono::DateTime<chrono::Utc> {
        match self {
            Self::RunJob { enqueued_at, .. } => *enqueued_at,
        }
    }

    pub fn job_id(&self) -> JobId {
        match self {
            Self::RunJob { job_id, .. } => *job_id,
        }
    }

    /// The schema version the message was written in.
    pub fn version(&self) -> u32 {
        match self {
            Self::RunJob { v, .. } => *v,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a message of a version in [`readable_versions`], ignoring (and keeping) fields it
    /// does not know. An unknown `type`, a malformed body or a version outside the window is an
    /// error: the worker dead-letters such a message instead of guessing at it.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let message: Self = serde_json::from_slice(bytes).map_err(MessageError::Malformed)?;
        let version = message.version();
        if readable_versions().contains(&version) {
            Ok(message)
        } else {
            Err(MessageError::UnknownVersion(version))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("malformed job message: {0}")]
    Malformed(serde_json::Error),
    #[error(
        "job message version {0} is not supported (this release reads versions {min} to {max})",
        min = readable_versions().start(),
        max = readable_versions().end()
    )]
    UnknownVersion(u32),
}

/// Delays a deferred job can wait, each a queue whose messages expire back into the work queue.
/// A requested delay is rounded up to the next tier (capped at the largest).
pub const DELAY_TIERS_SECS: [u64; 8] = [1, 2, 5, 10, 30, 60, 300, 900];

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("rabbitmq is unavailable: {0}")]
    Unavailable(#[from] lapin::Error),
    #[error("rabbitmq did not answer within {0:?}")]
    Timeout(Duration),
    #[error("rabbitmq refused the message ({0})")]
    Refused(String),
    /// A message was sent and no confirm came back (a timeout, a connection lost meanwhile, a
    /// `nack`): the broker may hold it all the same, so it may still be delivered.
    #[error("rabbitmq did not confirm the message, which it may still deliver: {0}")]
    Unconfirmed(Box<QueueError>),
    /// The AMQP URL does not parse. Says no more: the URL holds a password.
    #[error("the AMQP URL (PICTOR_AMQP_URL) is not a valid amqp:// or amqps:// URL")]
    InvalidUrl,
}

impl QueueError {
    /// Whether the message may have reached a queue even though its publish failed: a job the
    /// api gives up on after this must be withdrawn, not merely forgotten
    /// (`JobStore::withdraw`).
    pub fn may_have_arrived(&self) -> bool {
        matches!(self, Self::Unconfirmed(_))
    }
}

/// Names of the queues and exchanges of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub jobs_queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub delivery_limit: u32,
    /// Replicas a quorum queue starts with (`amqp.quorum_initial_group_size`); `None`: the
    /// broker's default (every node of the cluster).
    pub initial_group_size: Option<u32>,
    prefix: String,
}

impl Topology {
    pub fn new(settings: &AmqpSettings) -> Self {
        let prefix = &settings.queue_prefix;
        Self {
            jobs_queue: format!("{prefix}.jobs"),
            dead_letter_exchange: format!("{prefix}.dlx"),
            dead_letter_queue: format!("{prefix}.jobs.dead"),
            delivery_limit: settings.delivery_limit.get(),
            initial_group_size: (settings.quorum_initial_group_size > 0)
                .then_some(settings.quorum_initial_group_size),
            prefix: prefix.clone(),
        }
    }

    /// The arguments every queue of Pictor's starts with: a quorum queue, replicated on
    /// `initial_group_size` nodes when set.
    fn quorum_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long_string("quorum"));
        if let Some(size) = self.initial_group_size {
            args.insert(
                "x-quorum-initial-group-size".into(),
                AMQPValue::LongLongInt(i64::from(size)),
            );
        }
        args
    }

    /// The delay queue for a tier of `seconds`.
    pub fn delay_queue(&self, seconds: u64) -> String {
        format!("{}.delay.{seconds}s", self.prefix)
    }

    /// The delay queue that holds a message at most `delay` (the shortest one for less), and its
    /// delay: for a message that knows when it may start and is sent back again if early.
    pub fn delay_queue_at_most(&self, delay: Duration) -> (String, Duration) {
        let tier = DELAY_TIERS_SECS
            .iter()
            .rev()
            .copied()
            .find(|tier| Duration::from_secs(*tier) <= delay)
            .unwrap_or(DELAY_TIERS_SECS[0]);
        (self.delay_queue(tier), Duration::from_secs(tier))
    }

    /// The delay queue that holds a message at least `delay` (or the longest one), and its delay.
    pub fn delay_queue_for(&self, delay: Duration) -> (String, Duration) {
        let wanted = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
        let tier = DELAY_TIERS_SECS
            .iter()
            .copied()
            .find(|tier| *tier >= wanted)
            .unwrap_or(DELAY_TIERS_SECS[DELAY_TIERS_SECS.len() - 1]);
        (self.delay_queue(tier), Duration::from_secs(tier))
    }

    /// Declares everything, idempotently. Every process does this at (re)connect, so no start-up
    /// order between api and worker matters.
    pub async fn declare(&self, channel: &Channel) -> Result<(), QueueError> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                self.dead_letter_queue.as_str().into(),
                durable,
                self.quorum_args(),
            )
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut args = self.quorum_args();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            long_string(&self.dead_letter_exchange),
        );
        channel
            .queue_declare(self.jobs_queue.as_str().into(), durable, args)
            .await?;
        Ok(())
    }

    /// Declares the delay queue of one tier. Delay queues are declared when first used, not
    /// up front: each is a quorum queue (a Raft group), and the api alone (and most tests)
    /// never needs them. A worker's metrics sampler declares all of them, to count what they
    /// hold (a passive declare of a missing queue would close the channel).
    ///
    /// Nobody consumes them; a message expires after the tier's TTL and is dead-lettered (at
    /// least once) back into the work queue.
    pub async fn declare_delay_queue(
        &self,
        channel: &Channel,
        tier_secs: u64,
    ) -> Result<u32, QueueError> {
        let mut args = self.quorum_args();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(tier_secs * 1000).unwrap_or(i64::MAX)),
        );
        args.insert("x-dead-letter-exchange".into(), long_string(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            long_string(&self.jobs_queue),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
        args.insert("x-overflow".into(), long_string("reject-publish"));
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare(self.delay_queue(tier_secs).as_str().into(), durable, args)
            .await?;
        Ok(declared.message_count())
    }

    /// Deletes the queues and exchange (tests and throwaway deployments only).
    pub async fn delete(&self, channel: &Channel) -> Result<(), QueueError> {
        let mut queues = vec![self.jobs_queue.clone(), self.dead_letter_queue.clone()];
        queues.extend(DELAY_TIERS_SECS.iter().map(|tier| self.delay_queue(*tier)));
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        channel
            .exchange_delete(
                self.dead_letter_exchange.as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await?;
        Ok(())
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// The broker's nodes as `amqp.url` lists them: one URL, or several separated by commas (the
/// nodes of a cluster; a comma inside a password must be written `%2C`).
pub fn node_uris(settings: &AmqpSettings) -> Result<Vec<lapin::uri::AMQPUri>, QueueError> {
    settings
        .url
        .expose_secret()
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            let mut uri: lapin::uri::AMQPUri = url
                .parse()
                // The parser's message may quote the URL, password and all.
                .map_err(|_| QueueError::InvalidUrl)?;
            if uri.query.frame_max.is_none() {
                uri.query.frame_max = Some(FRAME_MAX);
            }
            Ok(uri)
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|uris| {
            if uris.is_empty() {
                Err(QueueError::InvalidUrl)
            } else {
                Ok(uris)
            }
        })
}

/// Opens a connection with a bounded handshake time, to one of the broker's nodes: they are
/// tried in a random order (so a fleet spreads over a cluster, and a node that is down costs
/// each process at most one handshake timeout), the first that answers wins. Every reconnect
/// comes through here, so a process whose node is lost moves to another.
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, QueueError> {
    use rand::seq::SliceRandom;
    let mut nodes = node_uris(settings)?;
    nodes.shuffle(&mut rand::rng());
    let count = nodes.len();
    let mut last = None;
    for uri in nodes {
        // Host and port only: the URL carries the password.
        let node = format!("{}:{}", uri.authority.host, uri.authority.port);
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("pictor-{name}").into_bytes()));
        let attempt = tokio::time::timeout(
            settings.connect_timeout,
            Connection::connect_uri(uri, properties),
        )
        .await
        .map_err(|_| QueueError::Timeout(settings.connect_timeout))
        .and_then(|connected| connected.map_err(QueueError::from));
        match attempt {
            Ok(connection) => return Ok(connection),
            Err(error) => {
                if count > 1 {
                    tracing::warn!(%node, %error, "RabbitMQ node unreachable; trying the next");
                }
                last = Some(error);
            }
        }
    }
    Err(last.unwrap_or(QueueError::InvalidUrl))
}

/// Reads how many messages wait in a queue and how many consumers it has, without declaring
/// or changing anything: a passive declare on a fresh channel of one lazily opened connection
/// (the scheduler's alerts). A queue that does not exist reads as `None`: no process has
/// declared it yet, so nothing waits in it and nothing consumes it.
pub struct QueueInspector {
    settings: AmqpSettings,
    timeout: Duration,
    connection: Mutex<Option<Connection>>,
}

impl QueueInspector {
    /// Connects on first use, as `pictor-{name}`; every broker call waits at most `timeout`.
    pub fn new(settings: AmqpSettings, timeout: Duration) -> Self {
        Self {
            settings,
            timeout,
            connection: Mutex::new(None),
        }
    }

    /// Ready messages and consumers of `queue`, or `None` when the queue does not exist.
    pub async fn inspect(&self, queue: &str) -> Result<Option<(u32, u32)>, QueueError> {
        let mut guard = self.connection.lock().await;
        if !guard
            .as_ref()
            .is_some_and(|connection| connection.status().connected())
        {
            *guard = None;
            *guard = Some(connect(&self.settings, "scheduler").await?);
        }
        let Some(connection) = guard.as_ref() else {
            return Err(QueueError::Timeout(self.timeout));
        };
        let channel = match with_timeout(self.timeout, connection.create_channel()).await {
            Ok(channel) => channel,
            Err(error) => {
                *guard = None;
                return Err(error);
            }
        };
        drop(guard);
        let declared = tokio::time::timeout(
            self.timeout,
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .map_err(|_| QueueError::Timeout(self.timeout))?;
        match declared {
            Ok(declared) => {
                let _ = channel.close(200, "inspected".into()).await;
                Ok(Some((declared.message_count(), declared.consumer_count())))
            }
            // The broker closed the channel with 404: the queue is not there.
            Err(error) if is_not_found(&error) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn close(&self) {
        if let Some(connection) = self.connection.lock().await.take() {
            let _ = connection.close(200, "shutdown".into()).await;
        }
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

/// The largest AMQP frame Pictor negotiates unless the URL sets `frame_max`. lapin keeps 32
/// frames of send and of receive buffer per connection, zero-filled, so RabbitMQ's default of
/// 128 KiB costs 8 MiB resident per connection; job messages are well under 1 KiB.
const FRAME_MAX: u32 = 16_384;

/// Publishes job messages with publisher confirms over one long-lived channel, reconnecting
/// lazily when the broker went away. Concurrent publishes share the channel; each waits for
/// its own confirm.
#[derive(Clone)]
pub struct Publisher {
    settings: AmqpSettings,
    topology: Topology,
    confirm_timeout: Duration,
    link: Arc<Mutex<Option<Link>>>,
}

#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    channel: Channel,
}

impl Link {
    fn is_usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

impl Publisher {
    pub fn new(settings: AmqpSettings, confirm_timeout: Duration) -> Self {
        Self {
            topology: Topology::new(&settings),
            settings,
            confirm_timeout,
            link: Arc::new(Mutex::new(None)),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Connects (declaring the topology) unless already connected.
    pub async fn ensure_connected(&self) -> Result<(), QueueError> {
        self.channel().await.map(|_| ())
    }

    /// True if the publisher currently holds an open connection and channel.
    pub async fn is_connected(&self) -> bool {
        self.link.lock().await.as_ref().is_some_and(Link::is_usable)
    }

    async fn channel(&self) -> Result<Channel, QueueError> {
        let mut guard = self.link.lock().await;
        if let Some(link) = guard.as_ref().filter(|link| link.is_usable()) {
            return Ok(link.channel.clone());
        }
        *guard = None;
        let connection = connect(&self.settings, "publisher").await?;
        let channel = with_timeout(self.confirm_timeout, connection.create_channel()).await?;
        with_timeout(
            self.confirm_timeout,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        tokio::time::timeout(self.confirm_timeout, self.topology.declare(&channel))
            .await
            .map_err(|_| QueueError::Timeout(self.confirm_timeout))??;
        *guard = Some(Link {
            connection: Arc::new(connection),
            channel: channel.clone(),
        });
        Ok(channel)
    }

    /// Publishes `message` persistently to the work queue and waits for the broker's confirm.
    pub async fn publish(
        &self,
        message: &JobMessage,
        headers: FieldTable,
    ) -> Result<(), QueueError> {
        let queue = self.topology.jobs_queue.clone();
        self.publish_to(&queue, message, headers).await
    }

    /// Publishes `message` to the delay queue that returns it to the work queue after at least
    /// `delay`; answers the delay actually applied.
    pub async fn publish_delayed(
        &self,
        message: &JobMessage,
        delay: Duration,
    ) -> Result<Duration, QueueError> {
        let (queue, applied) = self.topology.delay_queue_for(delay);
        self.publish_to_delay_queue(message, queue, applied).await
    }

    /// Publishes `message` (which carries its start time, [`JobMessage::not_before`]) to the
    /// longest delay queue that does not hold it past `delay`; the worker sends it back again
    /// while it is early, so it starts within a second of its time instead of a tier's
    /// rounding late.
    pub async fn publish_delayed_at_most(
        &self,
        message: &JobMessage,
        delay: Duration,
    ) -> Result<Duration, QueueError> {
        let (queue, applied) = self.topology.delay_queue_at_most(delay);
        self.publish_to_delay_queue(message, queue, applied).await
    }

    async fn publish_to_delay_queue(
        &self,
        message: &JobMessage,
        queue: String,
        applied: Duration,
    ) -> Result<Duration, QueueError> {
        // Declared first: delay queues are created when first used.
        self.delay_queue_messages(applied.as_secs()).await?;
        self.publish_to(&queue, message, FieldTable::default())
            .await
            .map(|()| applied)
    }

    /// How many messages wait in the delay queue of `tier_secs` (declaring it if it is not
    /// there yet, with the arguments it is always declared with).
    pub async fn delay_queue_messages(&self, tier_secs: u64) -> Result<u32, QueueError> {
        let channel = self.channel().await?;
        let declared = tokio::time::timeout(
            self.confirm_timeout,
            self.topology.declare_delay_queue(&channel, tier_secs),
        )
        .await
        .map_err(|_| QueueError::Timeout(self.confirm_timeout));
        match declared {
            Ok(Ok(messages)) => Ok(messages),
            Ok(Err(error)) | Err(error) => {
                self.link.lock().await.take();
                Err(error)
            }
        }
    }

    /// How many messages wait in the work queue (ready, not yet delivered).
    pub async fn queue_depth(&self) -> Result<u32, QueueError> {
        let queue = self.topology.jobs_queue.clone();
        self.queue_stats(&queue).await.map(|(messages, _)| messages)
    }

    /// Ready messages and consumers of one queue of this topology.
    pub async fn queue_stats(&self, queue: &str) -> Result<(u32, u32), QueueError> {
        let channel = self.channel().await?;
        let declared = with_timeout(
            self.confirm_timeout,
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        Ok((declared.message_count(), declared.consumer_count()))
    }

    /// Publishes `message` persistently to `queue` (by the default exchange) and waits for the
    /// broker's confirm.
    pub async fn publish_to(
        &self,
        queue: &str,
        message: &JobMessage,
        headers: FieldTable,
    ) -> Result<(), QueueError> {
        let channel = self.channel().await?;
        let result = self.publish_on(&channel, queue, message, headers).await;
        if result.is_err() {
            // Drop the link so the next publish reconnects instead of reusing a dead channel.
            self.link.lock().await.take();
        }
        result
    }

    async fn publish_on(
        &self,
        channel: &Channel,
        queue: &str,
        message: &JobMessage,
        headers: FieldTable,
    ) -> Result<(), QueueError> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(message.job_id().to_string()))
            .with_headers(headers);
        let payload = message.encode();
        // From here on the message may be on its way: a failure is in doubt, except the
        // broker's own word that it routed the message nowhere.
        let in_doubt = |error: QueueError| QueueError::Unconfirmed(Box::new(error));
        let confirmation = tokio::time::timeout(self.confirm_timeout, async {
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &payload,
                    properties,
                )
                .await?
                .await
        })
        .await
        .map_err(|_| in_doubt(QueueError::Timeout(self.confirm_timeout)))?
        .map_err(|error| in_doubt(error.into()))?;
        match confirmation {
            lapin::Confirmation::Ack(None) => Ok(()),
            lapin::Confirmation::Ack(Some(returned)) => Err(QueueError::Refused(format!(
                "returned: {}",
                returned.reply_text
            ))),
            // A quorum queue nacks when it could not take responsibility for the message,
            // which does not say that no replica stored it.
            lapin::Confirmation::Nack(_) => {
                Err(in_doubt(QueueError::Refused("nacked".to_string())))
            }
            lapin::Confirmation::NotRequested => {
                Err(QueueError::Refused("confirms were not enabled".to_string()))
            }
        }
    }

    pub async fn close(&self) {
        if let Some(link) = self.link.lock().await.take() {
            let _ = link.connection.close(200, "shutdown".into()).await;
        }
    }
}

async fn with_timeout<T>(
    limit: Duration,
    future: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, QueueError> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| QueueError::Timeout(limit))?
        .map_err(QueueError::from)
}

/// How many times RabbitMQ has delivered this message before (quorum queues set
/// `x-delivery-count` on redeliveries; absent means first delivery).
pub fn delivery_count(properties: &BasicProperties) -> u32 {
    properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("x-delivery-count"))
        .and_then(|value| match value {
            AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(*n),
            AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
            AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
            _ => None,
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_message_is_tagged_and_versioned() {
        let id = JobId::new();
        let message = JobMessage::run(id);
        let value: serde_json::Value = serde_json::from_slice(&message.encode()).unwrap();
        assert_eq!(value["type"], "run_job");
        assert_eq!(value["v"], 1);
        assert_eq!(value["job_id"], id.to_string());
        assert_eq!(JobMessage::decode(&message.encode()).unwrap(), message);
    }

    fn run_job_json(version: u32, extra: &str) -> String {
        format!(
            r#"{{"type":"run_job","v":{version},"job_id":"{}","enqueued_at":"2026-11-25T00:00:00Z"{extra}}}"#,
            JobId::new()
        )
    }

    #[test]
    fn unknown_message_types_and_versions_outside_the_window_do_not_decode() {
        assert!(matches!(
            JobMessage::decode(br#"{"type":"explode","v":1}"#),
            Err(MessageError::Malformed(_))
        ));
        let too_new = MESSAGE_VERSION + 2;
        assert!(matches!(
            JobMessage::decode(run_job_json(too_new, "").as_bytes()),
            Err(MessageError::UnknownVersion(version)) if version == too_new
        ));
        assert!(matches!(
            JobMessage::decode(run_job_json(0, "").as_bytes()),
            Err(MessageError::UnknownVersion(0))
        ));
    }

    #[test]
    fn the_reader_accepts_one_version_back_and_one_forward() {
        let window = readable_versions();
        assert_eq!(*window.end(), MESSAGE_VERSION + 1);
        assert_eq!(*window.start(), MESSAGE_VERSION.saturating_sub(1).max(1));
        for version in window {
            let message = JobMessage::decode(run_job_json(version, "").as_bytes()).unwrap();
            assert_eq!(message.version(), version);
        }
    }

    #[test]
    fn fields_of_a_newer_release_are_ignored_but_survive_a_republish() {
        let next = MESSAGE_VERSION + 1;
        let raw = run_job_json(next, r#","priority":"interactive","hints":{"a":1}"#);
        let message = JobMessage::decode(raw.as_bytes()).unwrap();
        let again: serde_json::Value = serde_json::from_slice(&message.encode()).unwrap();
        let original: serde_json::Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(again, original);
        assert_eq!(again["v"], next);
    }

    #[test]
    fn a_start_time_rounds_down_to_a_tier_and_is_kept_on_the_message() {
        let topology = Topology::new(&crate::config::Settings::defaults().unwrap().amqp);
        assert_eq!(
            topology.delay_queue_at_most(Duration::from_secs(61)).1,
            Duration::from_secs(60)
        );
        assert_eq!(
            topology.delay_queue_at_most(Duration::from_millis(300)).1,
            Duration::from_secs(1)
        );
        assert_eq!(
            topology.delay_queue_at_most(Duration::from_secs(99_999)).1,
            Duration::from_secs(900)
        );
        let now = chrono::Utc::now();
        let message = JobMessage::run(JobId::new()).not_before(now + chrono::Duration::seconds(30));
        let decoded = JobMessage::decode(&message.encode()).unwrap();
        let left = decoded.wait_left(now).unwrap();
        assert!(left > Duration::from_secs(29) && left <= Duration::from_secs(30));
        assert_eq!(decoded.wait_left(now + chrono::Duration::seconds(31)), None);
        assert_eq!(JobMessage::run(JobId::new()).wait_left(now), None);
    }

    #[test]
    fn delays_round_up_to_the_next_tier() {
        let settings = crate::config::Settings::defaults().unwrap().amqp;
        let topology = Topology::new(&settings);
        assert_eq!(
            topology.delay_queue_for(Duration::from_millis(1500)),
            ("pictor.delay.2s".to_string(), Duration::from_secs(2))
        );
        assert_eq!(
            topology.delay_queue_for(Duration::from_secs(22)).1,
            Duration::from_secs(30)
        );
        assert_eq!(
            topology.delay_queue_for(Duration::from_secs(86_400)).1,
            Duration::from_secs(900)
        );
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;
    use crate::config::Settings;

    fn amqp(url: &str) -> AmqpSettings {
        let mut amqp = Settings::defaults().unwrap().amqp;
        amqp.url = url.to_string().into();
        amqp
    }

    #[tokio::test]
    async fn a_connection_negotiates_small_frames_unless_the_url_asks_otherwise() {
        let url = std::env::var("PICTOR_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
        let connection = connect(&amqp(&url), "frame-test").await.unwrap();
        assert_eq!(connection.configuration().frame_max(), FRAME_MAX);
        connection.close(200, "done".into()).await.unwrap();

        let separator = if url.contains('?') { '&' } else { '?' };
        let connection = connect(
            &amqp(&format!("{url}{separator}frame_max=65536")),
            "frame-test",
        )
        .await
        .unwrap();
        assert_eq!(connection.configuration().frame_max(), 65_536);
        connection.close(200, "done".into()).await.unwrap();
    }

    fn real_url() -> String {
        std::env::var("PICTOR_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
    }

    /// A local port nothing listens on.
    fn dead_node() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("amqp://guest:s3cret-password@127.0.0.1:{port}/%2f")
    }

    #[tokio::test]
    async fn a_list_of_nodes_connects_to_one_that_answers_whichever_is_tried_first() {
        let url = format!("{}, {} ,", dead_node(), real_url());
        assert_eq!(
            node_uris(&amqp(&url)).unwrap().len(),
            2,
            "blanks are skipped"
        );
        // The order is random: enough tries that both orders are all but certain to come up.
        for _ in 0..8 {
            let connection = connect(&amqp(&url), "node-list-test").await.unwrap();
            assert!(connection.status().connected());
            connection.close(200, "done".into()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn with_every_node_down_the_error_says_so_without_a_password() {
        let url = format!("{},{}", dead_node(), dead_node());
        let Err(error) = connect(&amqp(&url), "node-list-test").await else {
            panic!("connected to nodes that are down");
        };
        assert!(matches!(error, QueueError::Unavailable(_)), "{error:?}");
        assert!(!error.to_string().contains("s3cret"), "{error}");
        let Err(error) = connect(&amqp(" , "), "node-list-test").await else {
            panic!("an empty list connected");
        };
        assert!(matches!(error, QueueError::InvalidUrl), "{error:?}");
    }

    #[tokio::test]
    async fn queues_start_with_the_configured_replicas_and_a_changed_setting_is_named_by_the_broker()
     {
        let mut settings = amqp(&real_url());
        settings.queue_prefix = format!("pictor-group-test-{}", uuid::Uuid::new_v4().simple());
        let connection = connect(&settings, "group-test").await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let plain = Topology::new(&settings);
        assert_eq!(plain.initial_group_size, None);
        plain.declare(&channel).await.unwrap();
        settings.quorum_initial_group_size = 1;
        let sized = Topology::new(&settings);
        assert_eq!(sized.initial_group_size, Some(1));
        // Queues created with the setting take it (and redeclaring them is fine)...
        sized.declare_delay_queue(&channel, 1).await.unwrap();
        sized.declare_delay_queue(&channel, 1).await.unwrap();
        // ...but RabbitMQ holds a queue to the size it was created with: a deployment that
        // changes the setting later is refused at start-up, and the refusal names it
        // (docs/scaling.md says to set it before the queues exist).
        let refused = sized.declare(&channel).await;
        let channel = connection.create_channel().await.unwrap();
        plain.delete(&channel).await.ok();
        connection.close(200, "done".into()).await.ok();
        let error = refused.expect_err("a changed replica count was accepted");
        assert!(
            error.to_string().contains("x-quorum-initial-group-size"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_url_that_does_not_parse_is_refused_without_quoting_it() {
        let Err(error) = connect(&amqp("amqp:s3cret-password"), "bad-url").await else {
            panic!("a URL that does not parse was accepted");
        };
        assert!(matches!(error, QueueError::InvalidUrl), "{error:?}");
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }
}
