//! The six scenarios. Each starts its own deployment (and mock provider), measures, and tears
//! everything down, so they can run alone or together in any order.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use crate::fleet::{Deployment, Images, KEY, Process, fetch_metrics, free_port, metric_sum};
use crate::load::{self, Latencies, Run};
use crate::mock::{Mock, MockSpec};

/// How much work each scenario does; `--quick` shrinks it for a smoke run.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub window: Duration,
    pub rounds: usize,
    pub fleet_jobs: usize,
    pub pipeline_jobs: usize,
}

impl Scale {
    pub fn full() -> Self {
        Self {
            window: Duration::from_secs(10),
            rounds: 3,
            fleet_jobs: 10_000,
            pipeline_jobs: 1_000,
        }
    }

    pub fn quick() -> Self {
        Self {
            window: Duration::from_secs(3),
            rounds: 1,
            fleet_jobs: 1_000,
            pipeline_jobs: 200,
        }
    }
}

const SMALL_IMAGE: u32 = 64;
const REALISTIC_IMAGE: u32 = 1024;

/// What telemetry the processes run with (scenario 5 compares `Off` and `On`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Telemetry {
    /// Production defaults: metrics on, trace export off.
    Default,
    /// Metrics off, trace export off.
    Off,
    /// Metrics on, every job exported as an OpenAI trace to the mock's ingest endpoint.
    On,
}

impl Telemetry {
    fn env(self, mock: &Mock) -> Vec<(&'static str, String)> {
        match self {
            Self::Default => Vec::new(),
            Self::Off => vec![
                ("PICTOR_METRICS", "false".into()),
                ("PICTOR_OPENAI_TRACES", "false".into()),
            ],
            Self::On => vec![
                ("PICTOR_METRICS", "true".into()),
                ("PICTOR_OPENAI_TRACES", "true".into()),
                (
                    "PICTOR_TRACES_ENDPOINT",
                    format!("{}/traces/ingest", mock.base_url()),
                ),
            ],
        }
    }
}

/// A mock provider answering after `delay` with a `side`×`side` PNG, and a deployment calling it.
async fn deploy(
    binary: &Path,
    delay: Duration,
    side: u32,
    telemetry: Option<Telemetry>,
    images: Images,
) -> anyhow::Result<(Mock, Deployment)> {
    let mock = Mock::start(MockSpec {
        delay,
        image_side: side,
    })
    .await?;
    let env = telemetry.map(|mode| mode.env(&mock)).unwrap_or_default();
    let deployment = Deployment::new(binary, &mock.base_url(), &env, images)?;
    Ok((mock, deployment))
}

/// The middle value (the mean of the two middle ones for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub(crate) async fn start_api(
    deployment: &Deployment,
    extra: &[(&str, String)],
) -> anyhow::Result<Process> {
    deployment
        .spawn("api", extra, Some(deployment.api_url("/readyz")))
        .await
}

/// Starts a worker with a metrics endpoint; answers it and its metrics URL.
pub(crate) async fn start_worker(
    deployment: &Deployment,
    concurrency: usize,
    extra: &[(&str, String)],
) -> anyhow::Result<(Process, String)> {
    let port = free_port()?;
    let mut env = vec![
        ("PICTOR_WORKER_CONCURRENCY", concurrency.to_string()),
        ("PICTOR_WORKER_METRICS_ADDR", format!("127.0.0.1:{port}")),
    ];
    env.extend(extra.iter().cloned());
    let worker = deployment
        .spawn(
            "worker",
            &env,
            Some(format!("http://127.0.0.1:{port}/healthz")),
        )
        .await?;
    Ok((worker, format!("http://127.0.0.1:{port}/metrics")))
}

// ---------------------------------------------------------------------------------------------
// 1. Ingress throughput
// ---------------------------------------------------------------------------------------------

pub struct Ingress {
    pub clients: usize,
    pub api: Run,
    pub raw: Run,
    pub api_rates: Vec<f64>,
    pub raw_rates: Vec<f64>,
    pub api_rss_kib: u64,
    /// CPU (user + system) the api process spent per accepted job over the timed rounds.
    pub api_cpu_us_per_job: f64,
}

impl Ingress {
    pub fn ratio(&self) -> f64 {
        median(&self.api_rates) / median(&self.raw_rates)
    }
}

/// Scenario 1 (and the throughput half of scenario 5).
pub async fn ingress(
    binary: &Path,
    scale: Scale,
    clients: usize,
    telemetry: Telemetry,
) -> anyhow::Result<Ingress> {
    let (_mock, deployment) = deploy(
        binary,
        Duration::ZERO,
        SMALL_IMAGE,
        Some(telemetry),
        Images::Tmpfs,
    )
    .await?;
    let result = ingress_in(&deployment, scale, clients).await;
    deployment.cleanup().await;
    result
}

async fn ingress_in(
    deployment: &Deployment,
    scale: Scale,
    clients: usize,
) -> anyhow::Result<Ingress> {
    let api = start_api(deployment, &[]).await?;
    let url = deployment.api_url("/v1/jobs");
    // Warm up: connections, the publisher's channel, Redis scripts.
    load::post_jobs(&url, clients, Duration::from_secs(1)).await;
    let mut result = Ingress {
        clients,
        api: Run::default(),
        raw: Run::default(),
        api_rates: Vec::new(),
        raw_rates: Vec::new(),
        api_rss_kib: 0,
        api_cpu_us_per_job: f64::NAN,
    };
    let mut api_cpu_seconds = 0.0;
    for _ in 0..scale.rounds {
        let raw = load::raw_publish(deployment.settings(), clients, scale.window).await?;
        result.raw_rates.push(raw.per_second());
        merge(&mut result.raw, raw);
        let cpu_before = api.cpu_seconds().unwrap_or_default();
        let run = load::post_jobs(&url, clients, scale.window).await;
        api_cpu_seconds += api.cpu_seconds().unwrap_or_default() - cpu_before;
        result.api_rates.push(run.per_second());
        merge(&mut result.api, run);
    }
    result.api_rss_kib = api.peak_rss_kib().unwrap_or_default();
    result.api_cpu_us_per_job = api_cpu_seconds * 1e6 / result.api.ok.max(1) as f64;
    api.stop(Duration::from_secs(10)).await;
    Ok(result)
}

fn merge(total: &mut Run, run: Run) {
    total.elapsed += run.elapsed;
    total.absorb(run);
}

// ---------------------------------------------------------------------------------------------
// 2. I/O-bound fleet
// ---------------------------------------------------------------------------------------------

pub struct FleetRow {
    pub concurrency: usize,
    pub jobs: usize,
    pub succeeded: u64,
    pub seconds: f64,
    pub peak_rss_kib: u64,
    pub ceiling: f64,
    pub image_bytes: usize,
}

impl FleetRow {
    pub fn per_second(&self) -> f64 {
        self.succeeded as f64 / self.seconds
    }
}

/// Scenario 2: every provider call (router and image) answers after 2 s with a realistic
/// 1024×1024 PNG. The jobs are queued through the api first; then one worker process starts
/// and is timed from start to the last job finished. Lower concurrencies run proportionally
/// fewer jobs (at least 500): their throughput is bounded by concurrency ÷ 4 s either way.
pub async fn fleet(binary: &Path, scale: Scale, concurrency: usize) -> anyhow::Result<FleetRow> {
    let delay = Duration::from_secs(2);
    let (mock, deployment) = deploy(binary, delay, REALISTIC_IMAGE, None, Images::Disk).await?;
    let jobs = (scale.fleet_jobs * concurrency / 1024).max(500.min(scale.fleet_jobs));
    let result = fleet_in(&deployment, jobs, concurrency).await;
    deployment.cleanup().await;
    let (seconds, succeeded, peak_rss_kib) = result?;
    Ok(FleetRow {
        concurrency,
        jobs,
        succeeded,
        seconds,
        peak_rss_kib,
        ceiling: concurrency as f64 / (2.0 * delay.as_secs_f64()),
        image_bytes: mock.image_bytes,
    })
}

async fn fleet_in(
    deployment: &Deployment,
    jobs: usize,
    concurrency: usize,
) -> anyhow::Result<(f64, u64, u64)> {
    let api = start_api(deployment, &[]).await?;
    submit_exactly(deployment, jobs, 64).await?;
    let started = Instant::now();
    let (worker, metrics) = start_worker(deployment, concurrency, &[]).await?;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60 + (jobs as u64) / 2);
    let mut peak = 0;
    let (finished, succeeded) = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::task::block_in_place(|| deployment.sweep_outputs());
        peak = peak.max(worker.peak_rss_kib().unwrap_or_default());
        let page = fetch_metrics(&client, &metrics).await.unwrap_or_default();
        let finished = metric_sum(&page, "pictor_jobs_finished_total", "");
        let succeeded = metric_sum(&page, "pictor_jobs_finished_total", "outcome=\"succeeded\"");
        if finished as usize >= jobs || Instant::now() > deadline {
            break (finished, succeeded);
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    if (finished as usize) < jobs {
        anyhow::bail!("only {finished} of {jobs} jobs finished in time");
    }
    worker.stop(Duration::from_secs(15)).await;
    api.stop(Duration::from_secs(10)).await;
    Ok((seconds, succeeded as u64, peak))
}

/// Posts exactly `jobs` jobs through the api with `clients` concurrent callers.
async fn submit_exactly(
    deployment: &Deployment,
    jobs: usize,
    clients: usize,
) -> anyhow::Result<()> {
    let client = load::http_client(clients);
    let url = deployment.api_url("/v1/jobs");
    let body = Arc::new(load::small_job().to_string());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, body, next) =
                (client.clone(), url.clone(), body.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < jobs {
                    let response = client
                        .post(&url)
                        .bearer_auth(KEY)
                        .header("content-type", "application/json")
                        .body(body.as_str().to_owned())
                        .send()
                        .await?;
                    anyhow::ensure!(
                        response.status().as_u16() == 202,
                        "the api answered {}",
                        response.status()
                    );
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Pipeline overhead
// ---------------------------------------------------------------------------------------------

pub struct Pipeline {
    pub jobs: usize,
    pub failed: usize,
    /// Accept (the 202) → `succeeded` seen by a client polling every millisecond.
    pub latencies: Latencies,
    /// Mean provider time per job (both calls), from the worker's own histogram; NaN when
    /// metrics are off.
    pub provider_ms_per_job: f64,
    /// CPU seconds the api and the worker spent per job.
    pub cpu_ms_per_job: f64,
    /// Batches the trace exporter posted to the mock's ingest endpoint.
    pub trace_posts: u64,
}

/// Scenario 3 (and the latency half of scenario 5): a steady 100 jobs/s against a mock that
/// answers at once.
pub async fn pipeline(
    binary: &Path,
    scale: Scale,
    telemetry: Telemetry,
) -> anyhow::Result<Pipeline> {
    let (mock, deployment) = deploy(
        binary,
        Duration::ZERO,
        SMALL_IMAGE,
        Some(telemetry),
        Images::Tmpfs,
    )
    .await?;
    let result = pipeline_in(&deployment, scale).await;
    deployment.cleanup().await;
    let (_, _, trace_posts) = mock.calls();
    result.map(|pipeline| Pipeline {
        trace_posts,
        ..pipeline
    })
}

async fn pipeline_in(deployment: &Deployment, scale: Scale) -> anyhow::Result<Pipeline> {
    let api = start_api(deployment, &[]).await?;
    let (worker, metrics) = start_worker(deployment, 64, &[]).await?;
    let client = load::http_client(256);
    // Warm up: 50 jobs through the whole path.
    run_steady(deployment, &client, 50).await;
    let before = fetch_metrics(&client, &metrics).await.unwrap_or_default();
    let cpu_before =
        api.cpu_seconds().unwrap_or_default() + worker.cpu_seconds().unwrap_or_default();
    let (latencies, failed) = run_steady(deployment, &client, scale.pipeline_jobs).await;
    let cpu_after =
        api.cpu_seconds().unwrap_or_default() + worker.cpu_seconds().unwrap_or_default();
    let after = fetch_metrics(&client, &metrics).await.unwrap_or_default();
    let provider_seconds = metric_sum(&after, "pictor_provider_request_duration_seconds_sum", "")
        - metric_sum(&before, "pictor_provider_request_duration_seconds_sum", "");
    let jobs = scale.pipeline_jobs;
    let provider_ms_per_job = if after.is_empty() {
        f64::NAN
    } else {
        provider_seconds * 1000.0 / jobs as f64
    };
    worker.stop(Duration::from_secs(15)).await;
    api.stop(Duration::from_secs(10)).await;
    Ok(Pipeline {
        jobs,
        failed,
        latencies,
        provider_ms_per_job,
        cpu_ms_per_job: (cpu_after - cpu_before) * 1000.0 / jobs as f64,
        trace_posts: 0,
    })
}

/// Submits `jobs` jobs at 100 per second (open loop: a slow job does not delay the next
/// submission) and follows each by polling `GET /v1/jobs/{id}` every millisecond.
async fn run_steady(
    deployment: &Deployment,
    client: &reqwest::Client,
    jobs: usize,
) -> (Latencies, usize) {
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        ticker.tick().await;
        let client = client.clone();
        let create = deployment.api_url("/v1/jobs");
        let base = deployment.api_url("/v1/jobs/");
        tasks.push(tokio::spawn(async move {
            follow_one(&client, &create, &base).await
        }));
    }
    let mut latencies = Latencies::default();
    let mut failed = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(took)) => latencies.push(took),
            _ => failed += 1,
        }
    }
    (latencies, failed)
}

async fn follow_one(
    client: &reqwest::Client,
    create: &str,
    base: &str,
) -> anyhow::Result<Duration> {
    let response = client
        .post(create)
        .bearer_auth(KEY)
        .json(&load::small_job())
        .send()
        .await?;
    anyhow::ensure!(response.status().as_u16() == 202, "{}", response.status());
    let accepted = Instant::now();
    let id = response.json::<Value>().await?["id"]
        .as_str()
        .context("no id")?
        .to_string();
    let url = format!("{base}{id}");
    // A poll starts every millisecond (a sleep after each answer would poll every 2-3 ms: the
    // answer's time plus the timer's rounding up).
    let mut every = tokio::time::interval(Duration::from_millis(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let job: Value = client
            .get(&url)
            .bearer_auth(KEY)
            .send()
            .await?
            .json()
            .await?;
        match job["status"].as_str() {
            Some("succeeded") => return Ok(accepted.elapsed()),
            Some("failed" | "canceled" | "needs_clarification") => {
                anyhow::bail!("job ended {}", job["status"])
            }
            _ if accepted.elapsed() > Duration::from_secs(30) => anyhow::bail!("job too slow"),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. End-to-end throughput
// ---------------------------------------------------------------------------------------------

pub struct EndToEnd {
    pub succeeded_per_second: f64,
    /// CPU of Redis' main thread (the one that runs commands) per job, ms, from accepting a
    /// round's jobs to the last one's end.
    pub redis_cpu_ms_per_job: f64,
    /// Commands Redis ran per job (`total_commands_processed`; a script's inner calls are not
    /// counted).
    pub redis_commands_per_job: f64,
    pub accepted_per_second: f64,
    pub raw_consume_per_second: f64,
    pub concurrency: usize,
}

/// Scenario 4: 64 clients post jobs as fast as the api takes them; one worker runs them against
/// a mock that answers at once. Jobs reaching `succeeded` per second over the window, beside
/// a raw consume-and-ack of the same kind of queue with the worker's prefetch.
pub async fn end_to_end(binary: &Path, scale: Scale) -> anyhow::Result<EndToEnd> {
    let (_mock, deployment) =
        deploy(binary, Duration::ZERO, SMALL_IMAGE, None, Images::Tmpfs).await?;
    let result = end_to_end_in(&deployment, scale).await;
    deployment.cleanup().await;
    result
}

async fn end_to_end_in(deployment: &Deployment, scale: Scale) -> anyhow::Result<EndToEnd> {
    let concurrency = 64;
    let raw = load::raw_consume(deployment.settings(), 20_000, 64).await?;
    let api = start_api(deployment, &[]).await?;
    let (worker, metrics) = start_worker(deployment, concurrency, &[]).await?;
    let client = reqwest::Client::new();
    let url = deployment.api_url("/v1/jobs");
    let mut succeeded = Vec::new();
    let mut accepted = Vec::new();
    let mut redis_cpu = Vec::new();
    let mut redis_commands = Vec::new();
    for _ in 0..scale.rounds {
        let before = fetch_metrics(&client, &metrics).await?;
        let redis_before = redis_usage(deployment).await;
        let load = tokio::spawn({
            let url = url.clone();
            let window = scale.window;
            async move { load::post_jobs(&url, 64, window).await }
        });
        let started = Instant::now();
        let run = load.await?;
        let after = fetch_metrics(&client, &metrics).await?;
        let seconds = started.elapsed().as_secs_f64();
        let done = succeeded_between(&before, &after);
        succeeded.push(done / seconds);
        accepted.push(run.per_second());
        // Let the backlog drain so rounds do not inherit each other's queue.
        drain(&client, &metrics, "pictor_jobs_finished_total").await;
        let drained = fetch_metrics(&client, &metrics).await?;
        let jobs = succeeded_between(&before, &drained);
        if let (Some(start), Some(end)) = (redis_before, redis_usage(deployment).await) {
            redis_cpu.push((end.0 - start.0) * 1000.0 / jobs.max(1.0));
            redis_commands.push((end.1 - start.1) as f64 / jobs.max(1.0));
        }
    }
    worker.stop(Duration::from_secs(15)).await;
    api.stop(Duration::from_secs(10)).await;
    Ok(EndToEnd {
        succeeded_per_second: median(&succeeded),
        redis_cpu_ms_per_job: median(&redis_cpu),
        redis_commands_per_job: median(&redis_commands),
        accepted_per_second: median(&accepted),
        raw_consume_per_second: raw.per_second(),
        concurrency,
    })
}

/// Jobs that succeeded between two scrapes of the worker's metrics.
fn succeeded_between(before: &str, after: &str) -> f64 {
    let succeeded =
        |page: &str| metric_sum(page, "pictor_jobs_finished_total", "outcome=\"succeeded\"");
    succeeded(after) - succeeded(before)
}

/// Redis' main-thread CPU seconds and commands run so far (`INFO`), server-wide: the bench
/// is assumed to be the only one using this Redis while it runs.
async fn redis_usage(deployment: &Deployment) -> Option<(f64, u64)> {
    let redis = shared::connection::Redis::connect(&deployment.settings().redis)
        .await
        .ok()?;
    let mut connection = redis.connection();
    let info: String = redis::cmd("INFO")
        .arg("everything")
        .query_async(&mut connection)
        .await
        .ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.trim().parse::<f64>().ok())
    };
    let cpu = field("used_cpu_sys_main_thread")? + field("used_cpu_user_main_thread")?;
    Some((cpu, field("total_commands_processed")? as u64))
}

/// Waits until the counter `finished` on the worker's metrics page has stopped moving for
/// half a second (five minutes at most): the backlog has drained.
pub(crate) async fn drain(client: &reqwest::Client, metrics: &str, finished: &str) {
    let mut last = -1.0;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let page = fetch_metrics(client, metrics).await.unwrap_or_default();
        let finished = metric_sum(&page, finished, "");
        if (finished - last).abs() < f64::EPSILON {
            return;
        }
        last = finished;
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Memory at rest
// ---------------------------------------------------------------------------------------------

pub struct Idle {
    pub api_kib: u64,
    pub worker_kib: u64,
    pub scheduler_kib: u64,
}

/// Scenario 6: each process started alone with the default settings, then left idle.
pub async fn idle(binary: &Path) -> anyhow::Result<Idle> {
    let (_mock, deployment) =
        deploy(binary, Duration::ZERO, SMALL_IMAGE, None, Images::Tmpfs).await?;
    let result = idle_in(&deployment).await;
    deployment.cleanup().await;
    result
}

async fn idle_in(deployment: &Deployment) -> anyhow::Result<Idle> {
    let api = start_api(deployment, &[]).await?;
    let worker_port = free_port()?;
    let worker = deployment
        .spawn(
            "worker",
            &[(
                "PICTOR_WORKER_METRICS_ADDR",
                format!("127.0.0.1:{worker_port}"),
            )],
            Some(format!("http://127.0.0.1:{worker_port}/healthz")),
        )
        .await?;
    let scheduler_port = free_port()?;
    let scheduler = deployment
        .spawn(
            "scheduler",
            &[(
                "PICTOR_SCHEDULER_METRICS_ADDR",
                format!("127.0.0.1:{scheduler_port}"),
            )],
            Some(format!("http://127.0.0.1:{scheduler_port}/healthz")),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = Idle {
        api_kib: api.rss_kib().unwrap_or_default(),
        worker_kib: worker.rss_kib().unwrap_or_default(),
        scheduler_kib: scheduler.rss_kib().unwrap_or_default(),
    };
    for process in [api, worker, scheduler] {
        process.stop(Duration::from_secs(10)).await;
    }
    Ok(idle)
}
