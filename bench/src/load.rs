//! Load generation over HTTP and straight over AMQP, and the statistics of what it measured.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Value, json};
use shared::config::Settings;
use shared::domain::JobId;
use shared::queue::{JobMessage, Topology};

use crate::fleet::KEY;

/// Latencies in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn push(&mut self, took: Duration) {
        self.0
            .push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// The `p`-th percentile (nearest rank) in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        let index = rank.clamp(1, sorted.len()) - 1;
        sorted[index] as f64 / 1000.0
    }
}

/// What a fixed-time load run saw.
#[derive(Debug, Default)]
pub struct Run {
    pub ok: u64,
    pub failed: u64,
    pub elapsed: Duration,
    pub latencies: Latencies,
}

impl Run {
    /// Adds another run's counts and latencies (not its elapsed time) to this one.
    pub fn absorb(&mut self, other: Run) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.latencies.extend(other.latencies);
    }

    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// The small JSON job every ingress run posts.
pub fn small_job() -> Value {
    json!({"prompt": "a red fox in fresh snow, morning light, watercolor", "size": "1024x1024"})
}

/// An HTTP client that keeps one connection per concurrent caller alive.
pub fn http_client(connections: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .pool_idle_timeout(Duration::from_secs(90))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .unwrap_or_default()
}

/// `callers` concurrent tasks, each awaiting `call` back to back for `duration`; a call that
/// answers `true` counts as done, with its latency.
async fn closed_loop<F, Fut>(callers: usize, duration: Duration, call: F) -> Run
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (call, stop) = (call.clone(), stop.clone());
            tokio::spawn(async move {
                let mut run = Run::default();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    if call().await {
                        run.ok += 1;
                        run.latencies.push(sent.elapsed());
                    } else {
                        run.failed += 1;
                    }
                }
                run
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Run::default();
    for task in tasks {
        if let Ok(run) = task.await {
            total.absorb(run);
        }
    }
    total.elapsed = started.elapsed();
    total
}

/// `clients` concurrent callers, each posting jobs back to back on its own keep-alive
/// connection for `duration`.
pub async fn post_jobs(url: &str, clients: usize, duration: Duration) -> Run {
    let client = http_client(clients);
    let body = Arc::new(small_job().to_string());
    let url = Arc::new(url.to_string());
    closed_loop(clients, duration, move || {
        let (client, body, url) = (client.clone(), body.clone(), url.clone());
        async move {
            let response = client
                .post(url.as_str())
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .body(body.as_str().to_owned())
                .send()
                .await;
            match response {
                Ok(response) => {
                    let accepted = response.status().as_u16() == 202;
                    let _ = response.bytes().await;
                    accepted
                }
                Err(_) => false,
            }
        }
    })
    .await
}

/// The bytes the api publishes for one job.
pub fn job_payload() -> Vec<u8> {
    JobMessage::run(JobId::new()).encode()
}

async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// A fresh topology of the same kind as the fleet's (a quorum work queue with its dead-letter
/// exchange and delivery limit), on its own prefix.
pub async fn raw_topology(
    settings: &Settings,
    suffix: &str,
) -> anyhow::Result<(Connection, Channel, Topology)> {
    let mut amqp = settings.amqp.clone();
    amqp.queue_prefix = format!("{}-raw-{suffix}", settings.amqp.queue_prefix);
    let topology = Topology::new(&amqp);
    let connection = shared::queue::connect(&amqp, "bench-raw").await?;
    let channel = confirm_channel(&connection).await?;
    topology.declare(&channel).await?;
    Ok((connection, channel, topology))
}

async fn publish_one(channel: &Channel, queue: &str, payload: &[u8]) -> anyhow::Result<()> {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(uuid::Uuid::now_v7().to_string()));
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            payload,
            properties,
        )
        .await?
        .await?;
    if confirm.is_nack() {
        anyhow::bail!("the broker nacked a publish");
    }
    Ok(())
}

/// The raw limit of scenario 1: `publishers` concurrent publishers on one confirming channel
/// (as the api has), each publishing a persistent message of the api's size to a quorum queue
/// and awaiting its own confirm, back to back for `duration`. No HTTP, no Redis.
pub async fn raw_publish(
    settings: &Settings,
    publishers: usize,
    duration: Duration,
) -> anyhow::Result<Run> {
    let (connection, channel, topology) = raw_topology(settings, "publish").await?;
    let payload = Arc::new(job_payload());
    let queue = Arc::new(topology.jobs_queue.clone());
    let total = closed_loop(publishers, duration, {
        let channel = channel.clone();
        move || {
            let (channel, payload, queue) = (channel.clone(), payload.clone(), queue.clone());
            async move { publish_one(&channel, &queue, &payload).await.is_ok() }
        }
    })
    .await;
    let _ = topology.delete(&channel).await;
    let _ = connection.close(200, "bench done".into()).await;
    Ok(total)
}

/// The raw limit of scenario 4: fill a quorum queue of the fleet's kind with `messages` job
/// messages, then consume them with manual acks, one ack per message, `prefetch` unacked at a
/// time (the worker's concurrency), and time the consumption.
pub async fn raw_consume(
    settings: &Settings,
    messages: usize,
    prefetch: u16,
) -> anyhow::Result<Run> {
    let (connection, channel, topology) = raw_topology(settings, "consume").await?;
    let payload = Arc::new(job_payload());
    // Fill with 64 publishers awaiting their confirms.
    let per_task = messages.div_ceil(64);
    let fills: Vec<_> = (0..64)
        .map(|_| {
            let channel = channel.clone();
            let payload = payload.clone();
            let queue = topology.jobs_queue.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    publish_one(&channel, &queue, &payload).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for fill in fills {
        fill.await??;
    }
    let total = per_task * 64;
    let consumer_channel = connection.create_channel().await?;
    consumer_channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let started = Instant::now();
    let mut consumer = consumer_channel
        .basic_consume(
            topology.jobs_queue.as_str().into(),
            "bench-raw-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut run = Run::default();
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        delivery.ack(BasicAckOptions::default()).await?;
        run.ok += 1;
        if run.ok as usize >= total {
            break;
        }
    }
    run.elapsed = started.elapsed();
    let _ = topology.delete(&channel).await;
    let _ = connection.close(200, "bench done".into()).await;
    Ok(run)
}
