//! The other end of the traces layer's queue: one background task that posts trace items to
//! OpenAI's `/traces/ingest` in batches, with the Agents SDK's `BatchTraceProcessor` and
//! `BackendSpanExporter` behaviour (`docs/providers.md`, section 5):
//!
//! - at most [`BATCH_SIZE`] items per POST; a flush after each job (the layer rings
//!   [`Notify`] once it queued a job's items), at most one per [`MIN_FLUSH_INTERVAL`] so that
//!   busy workers batch, and every [`SCHEDULE`] as a backstop. Items only
//!   ever arrive at the end of a job, each arrival rings, so the SDK's extra trigger (export
//!   when the queue is 70% full) is always met before it could matter;
//! - [`MAX_ATTEMPTS`] attempts on a 5xx or a network error, 1 s doubling to 30 s between them
//!   plus up to 10% jitter; never again after a 4xx (a 400 names the offending key in `param`,
//!   logged once per key, since every later batch would repeat it);
//! - a batch given up is dropped and counted in `pictor_trace_items_dropped_total`.
//!
//! Its backoff is its own rather than `shared::retry`'s: it mirrors the SDK, is per batch, and
//! must never hold up a job, which it cannot, since jobs only ever `try_send` to the queue.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::wire::{Item, count_dropped};

/// Items per POST.
pub const BATCH_SIZE: usize = 128;
/// Longest wait before queued items are posted.
pub const SCHEDULE: Duration = Duration::from_secs(5);
/// Shortest time between two flushes rung by jobs: under load a job's items wait at most this
/// long and share a POST with the jobs that finished meanwhile (one POST per job cost a worker
/// about 3% of its CPU at 100 jobs/s, docs/benchmarks.md); a quiet worker still posts each job
/// at once.
pub const MIN_FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Attempts per batch, the first included.
pub const MAX_ATTEMPTS: u32 = 3;
const BASE_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(30);

/// Where and how to post.
#[derive(Clone)]
pub struct IngestTarget {
    pub url: String,
    pub api_key: SecretString,
}

/// The running exporter: stop it with [`ExportHandle::shutdown`] to post what is queued.
pub struct ExportHandle {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ExportHandle {
    /// Posts everything still queued, waiting at most `grace` (a dead endpoint must not hold
    /// up a process that is stopping).
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "Trace export did not finish in time; the remaining items are dropped"
            );
            task.abort();
        }
    }
}

/// Starts the exporter task on the current Tokio runtime.
pub fn spawn(
    target: IngestTarget,
    receiver: mpsc::Receiver<Item>,
    flush: Arc<Notify>,
) -> ExportHandle {
    let (stop, stopped) = oneshot::channel();
    let exporter = Exporter::new(target);
    let task = tokio::spawn(exporter.run(receiver, flush, stopped));
    ExportHandle { stop, task }
}

struct Exporter {
    client: reqwest::Client,
    target: IngestTarget,
    /// `param`s of 400 answers already logged.
    rejected_params: HashSet<String>,
    /// The first retry's delay ([`BASE_DELAY`]; shorter in tests).
    base_delay: Duration,
}

/// How one POST went.
enum Posted {
    Accepted,
    /// A 4xx: this batch will never be accepted.
    Rejected {
        status: u16,
        body: String,
    },
    /// A 5xx or a network error: worth another attempt.
    Failed(String),
}

impl Exporter {
    fn new(target: IngestTarget) -> Self {
        // The SDK's timeouts: 60 s per request, 5 s to connect.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            client,
            target,
            rejected_params: HashSet::new(),
            base_delay: BASE_DELAY,
        }
    }

    async fn run(
        mut self,
        mut receiver: mpsc::Receiver<Item>,
        flush: Arc<Notify>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut schedule = tokio::time::interval(SCHEDULE);
        schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_flush: Option<tokio::time::Instant> = None;
        loop {
            let mut stopping = tokio::select! {
                _ = &mut stop => true,
                () = flush.notified() => false,
                _ = schedule.tick() => false,
            };
            let wait = last_flush.map_or(Duration::ZERO, |at| {
                MIN_FLUSH_INTERVAL.saturating_sub(at.elapsed())
            });
            if !stopping && !wait.is_zero() {
                stopping = tokio::select! {
                    _ = &mut stop => true,
                    () = tokio::time::sleep(wait) => false,
                };
            }
            last_flush = Some(tokio::time::Instant::now());
            // Post until the queue is empty. While a batch is in flight new items wait in the
            // queue (or are dropped when it is full); the layer's ring after their job wakes
            // this loop again if they arrived after the last look.
            loop {
                let batch = take_batch(&mut receiver);
                if batch.is_empty() {
                    break;
                }
                self.export(batch).await;
            }
            if stopping || receiver.is_closed() {
                return;
            }
        }
    }

    /// Posts one batch with the SDK's retries; what cannot be posted is dropped and counted.
    async fn export(&mut self, batch: Vec<Item>) {
        let count = batch.len() as u64;
        // Serialized once, straight from the items (no `Value` tree on the way), and shared by
        // every attempt.
        let body = match serde_json::to_vec(&Batch { data: &batch }) {
            Ok(body) => bytes::Bytes::from(body),
            Err(error) => {
                tracing::warn!(%error, items = count, "Trace batch cannot be encoded; it is dropped");
                count_dropped("export_failed", count);
                return;
            }
        };
        drop(batch);
        let mut delay = self.base_delay;
        let mut attempt = 1;
        loop {
            match self.post(&body).await {
                Posted::Accepted => return,
                Posted::Rejected { status, body } => {
                    self.log_rejection(status, &body);
                    count_dropped("rejected", count);
                    return;
                }
                Posted::Failed(error) if attempt >= MAX_ATTEMPTS => {
                    tracing::warn!(
                        %error,
                        attempts = attempt,
                        items = count,
                        "Trace export failed; the batch is dropped"
                    );
                    count_dropped("export_failed", count);
                    return;
                }
                Posted::Failed(error) => {
                    tracing::debug!(%error, attempt, "Trace export failed; retrying");
                }
            }
            let jitter = rand::rng().random_range(0.0..=0.1) * delay.as_secs_f64();
            tokio::time::sleep(delay + Duration::from_secs_f64(jitter)).await;
            delay = (delay * 2).min(MAX_DELAY);
            attempt += 1;
        }
    }

    async fn post(&self, body: &bytes::Bytes) -> Posted {
        let sent = self
            .client
            .post(&self.target.url)
            .bearer_auth(self.target.api_key.expose_secret())
            .header("OpenAI-Beta", "traces=v1")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().as_u16() < 300 => Posted::Accepted,
            Ok(response) if response.status().is_client_error() => {
                let status = response.status().as_u16();
                let body = response.text().await.unwrap_or_default();
                Posted::Rejected { status, body }
            }
            Ok(response) => Posted::Failed(format!("status {}", response.status().as_u16())),
            Err(error) => Posted::Failed(error.without_url().to_string()),
        }
    }

    /// Logs a 4xx once per offending `param` (or status, when the body names none).
    fn log_rejection(&mut self, status: u16, body: &str) {
        let error = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|body| body.get("error").cloned())
            .unwrap_or(Value::Null);
        let param = error["param"].as_str().map(str::to_string);
        let key = param.clone().unwrap_or_else(|| format!("status {status}"));
        if self.rejected_params.insert(key) {
            tracing::warn!(
                status,
                param = param.as_deref().unwrap_or(""),
                code = error["code"].as_str().unwrap_or(""),
                message = error["message"].as_str().unwrap_or(""),
                "Trace ingest rejected a batch; it is dropped"
            );
        }
    }
}

/// An ingest request's body: `{"data": [...]}`.
#[derive(serde::Serialize)]
struct Batch<'a> {
    data: &'a [Item],
}

/// Up to [`BATCH_SIZE`] items already queued.
fn take_batch(receiver: &mut mpsc::Receiver<Item>) -> Vec<Item> {
    let mut batch = Vec::new();
    while batch.len() < BATCH_SIZE {
        match receiver.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::super::wire::{TraceMetadata, TraceObject};
    use super::*;

    pub(super) fn trace(n: usize) -> Item {
        Item::Trace(TraceObject {
            id: format!("trace_{n:032x}"),
            workflow_name: "Pictor job".to_string(),
            group_id: None,
            metadata: Some(TraceMetadata {
                job_id: n.to_string(),
            }),
        })
    }

    #[test]
    fn batches_hold_at_most_128_items() {
        let (sender, mut receiver) = mpsc::channel(1000);
        for n in 0..300 {
            sender.try_send(trace(n)).unwrap();
        }
        assert_eq!(take_batch(&mut receiver).len(), 128);
        assert_eq!(take_batch(&mut receiver).len(), 128);
        assert_eq!(take_batch(&mut receiver).len(), 44);
        assert!(take_batch(&mut receiver).is_empty());
    }

    pub(super) fn target_of(server: &wiremock::MockServer) -> IngestTarget {
        IngestTarget {
            url: format!("{}/v1/traces/ingest", server.uri()),
            api_key: SecretString::from("sk-test"),
        }
    }

    /// An exporter posting to a mock server, retrying after 10 ms instead of 1 s.
    async fn exporter_for(server: &wiremock::MockServer) -> Exporter {
        let mut exporter = Exporter::new(target_of(server));
        exporter.base_delay = Duration::from_millis(10);
        exporter
    }

    pub(super) async fn answer(
        server: &wiremock::MockServer,
        status: u16,
        body: Value,
        times: Option<u64>,
    ) {
        use wiremock::matchers::{header, method, path};
        let mut mock = wiremock::Mock::given(method("POST"))
            .and(path("/v1/traces/ingest"))
            .and(header("openai-beta", "traces=v1"))
            .and(header("authorization", "Bearer sk-test"))
            .and(header("content-type", "application/json"))
            .respond_with(wiremock::ResponseTemplate::new(status).set_body_json(body));
        if let Some(times) = times {
            mock = mock.up_to_n_times(times).with_priority(1);
        }
        mock.mount(server).await;
    }

    pub(super) async fn posts(server: &wiremock::MockServer) -> Vec<Value> {
        server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .map(|request| serde_json::from_slice(&request.body).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_server_error_is_retried_until_the_batch_is_accepted() {
        let server = wiremock::MockServer::start().await;
        answer(&server, 503, serde_json::json!({}), Some(2)).await;
        answer(&server, 200, serde_json::json!({}), None).await;
        exporter_for(&server)
            .await
            .export(vec![trace(1), trace(2)])
            .await;
        let posts = posts(&server).await;
        assert_eq!(posts.len(), 3);
        assert_eq!(posts[2]["data"].as_array().unwrap().len(), 2);
        assert_eq!(posts[2]["data"][0]["object"], "trace");
    }

    #[tokio::test]
    async fn a_batch_is_tried_three_times_at_most() {
        let server = wiremock::MockServer::start().await;
        answer(&server, 500, serde_json::json!({}), None).await;
        exporter_for(&server).await.export(vec![trace(1)]).await;
        assert_eq!(posts(&server).await.len(), MAX_ATTEMPTS as usize);
    }

    #[tokio::test]
    async fn a_rejected_batch_is_not_retried_and_its_param_is_remembered() {
        let server = wiremock::MockServer::start().await;
        let rejection = serde_json::json!({"error": {
            "message": "Unknown parameter: 'data[0].span_data.usage.total_tokens'.",
            "type": "invalid_request_error",
            "param": "data[0].span_data.usage.total_tokens",
            "code": "unknown_parameter",
        }});
        answer(&server, 400, rejection, None).await;
        let mut exporter = exporter_for(&server).await;
        exporter.export(vec![trace(1)]).await;
        exporter.export(vec![trace(2)]).await;
        assert_eq!(
            posts(&server).await.len(),
            2,
            "one POST per batch, no retry"
        );
        assert_eq!(
            exporter.rejected_params,
            HashSet::from(["data[0].span_data.usage.total_tokens".to_string()])
        );
    }

    #[tokio::test]
    async fn shutdown_returns_promptly_when_the_endpoint_is_dead() {
        // Port 9 (discard) on loopback refuses connections here; retries must not outlive the
        // grace period.
        let (sender, receiver) = mpsc::channel(16);
        sender.try_send(trace(1)).unwrap();
        let handle = spawn(
            IngestTarget {
                url: "http://127.0.0.1:9/v1/traces/ingest".to_string(),
                api_key: SecretString::from("sk-test"),
            },
            receiver,
            Arc::new(Notify::new()),
        );
        let started = std::time::Instant::now();
        handle.shutdown(Duration::from_millis(300)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

#[cfg(test)]
mod batching_tests {
    use super::tests::*;
    use super::*;

    #[tokio::test]
    async fn jobs_finishing_close_together_share_a_post_and_each_is_sent() {
        let server = wiremock::MockServer::start().await;
        answer(&server, 200, serde_json::json!({}), None).await;
        let (sender, receiver) = mpsc::channel(1000);
        let flush = Arc::new(Notify::new());
        let handle = spawn(target_of(&server), receiver, flush.clone());
        // Twenty jobs finishing 10 ms apart, each ringing once its items are queued.
        for n in 0..20 {
            sender.try_send(trace(n)).unwrap();
            flush.notify_one();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut sent = 0;
        while sent < 20 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            sent = posts(&server)
                .await
                .iter()
                .map(|post| post["data"].as_array().map_or(0, Vec::len))
                .sum();
        }
        assert_eq!(sent, 20, "every job's items were posted");
        let count = posts(&server).await.len();
        assert!(
            (2..=5).contains(&count),
            "20 jobs in 200 ms went out in {count} posts, not one each"
        );
        handle.shutdown(Duration::from_secs(1)).await;
    }
}
