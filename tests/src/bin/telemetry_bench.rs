//! `telemetry-bench`: what exporting every job as an OpenAI trace costs a worker.
//!
//! Runs the same batch of jobs (300 by default, `--jobs N` to change) through a real api (in
//! this process, on port 0, with the test harness's isolated queues and Redis prefix) and a
//! real worker process on the simulated providers with no artificial delay, in three modes:
//! traces off, traces on against a dead endpoint (a closed local port: every batch fails three
//! times and is dropped), and traces on against a live local mock of the ingest endpoint. Each
//! mode runs `--rounds` times (3 by default), interleaved, and the median is reported.
//!
//! Run it with `cargo run --release -p tests --bin telemetry-bench` (Redis and RabbitMQ up).
//! It is a measurement, not a test: it asserts nothing about timing.
//!
//! The worker is this same executable started with `worker`: it does what `pictor-worker`'s
//! `main` does, except that the trace exporter is handed a made-up OpenAI key while the
//! providers get none, so the simulated providers serve the jobs while traces are on (the
//! exporter takes its key from `openai.api_key`, which would otherwise switch the providers to
//! the real OpenAI client).

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::json;
use shared::config::Settings;
use shared::domain::JobId;
use tests::harness::{ALICE, Options, TestApp, spawn_app_with};

/// Rate limits high enough never to defer a job of the benchmark.
const NO_LIMITS: &str = r#"
[rate_limits."openai:gpt-4.1-mini"]
requests_per_minute = 100000000
tokens_per_minute = 100000000

[rate_limits."openai:gpt-image-2"]
requests_per_minute = 100000000
images_per_minute = 100000000

[rate_limits."gemini:gemini-3.1-flash-image"]
requests_per_minute = 100000000
images_per_minute = 100000000
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Dead,
    Live,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Off => "traces off",
            Mode::Dead => "traces on, dead endpoint",
            Mode::Live => "traces on, live local mock",
        }
    }
}

struct Run {
    seconds: f64,
    /// CPU time (user + system) the worker process spent on the timed jobs.
    worker_cpu: f64,
    posts: usize,
    items: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("worker") {
        return worker().await;
    }
    let jobs = flag(&args, "--jobs").unwrap_or(300);
    let rounds = flag(&args, "--rounds").unwrap_or(3);
    println!(
        "telemetry-bench: {jobs} jobs x {rounds} rounds per mode; {} CPUs, {} GiB RAM",
        std::thread::available_parallelism().map_or(0, usize::from),
        memory_gib()
    );
    layer_cost(20_000);
    let modes = [Mode::Off, Mode::Dead, Mode::Live];
    let mut results: Vec<(Mode, Vec<Run>)> = modes.iter().map(|m| (*m, Vec::new())).collect();
    for round in 1..=rounds {
        for (mode, runs) in &mut results {
            let run = run(*mode, jobs).await?;
            println!(
                "round {round}  {:<28} {:>6.2} s  {:>7.1} jobs/s  {:>6.2} worker CPU ms/job{}",
                mode.label(),
                run.seconds,
                jobs as f64 / run.seconds,
                run.worker_cpu * 1000.0 / jobs as f64,
                if *mode == Mode::Live {
                    format!("  ({} items in {} POSTs)", run.items, run.posts)
                } else {
                    String::new()
                }
            );
            runs.push(run);
        }
    }
    println!();
    println!(
        "| mode | median s | best s | jobs/s (median) | wall vs off | worker CPU ms/job (median) | CPU vs off |"
    );
    println!("|---|---|---|---|---|---|---|");
    let median = |values: Vec<f64>| {
        let mut values = values;
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let best = |values: Vec<f64>| values.into_iter().fold(f64::INFINITY, f64::min);
    let wall = |runs: &[Run]| runs.iter().map(|r| r.seconds).collect::<Vec<_>>();
    let cpu = |runs: &[Run]| {
        runs.iter()
            .map(|r| r.worker_cpu * 1000.0 / jobs as f64)
            .collect::<Vec<_>>()
    };
    let (base_wall, base_cpu) = (median(wall(&results[0].1)), median(cpu(&results[0].1)));
    for (mode, runs) in &results {
        let (seconds, cpu_ms) = (median(wall(runs)), median(cpu(runs)));
        println!(
            "| {} | {:.2} | {:.2} | {:.1} | x{:.3} | {:.2} | x{:.3} |",
            mode.label(),
            seconds,
            best(wall(runs)),
            jobs as f64 / seconds,
            seconds / base_wall,
            cpu_ms,
            cpu_ms / base_cpu
        );
    }
    Ok(())
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime
    // are fields 14 and 15, in clock ticks.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    ticks as f64 / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The traces layer alone, on one thread: what a create job's spans (job, two agents, two
/// provider calls, a handoff) cost with and without it, and what serializing its items for the
/// ingest endpoint costs the exporter.
fn layer_cost(jobs: usize) {
    use shared::telemetry::traces::{OpenAiTracesLayer, TracesConfig};
    use tracing_subscriber::layer::SubscriberExt;

    let time = |subscriber: tracing::Dispatch| {
        let started = Instant::now();
        tracing::dispatcher::with_default(&subscriber, || {
            for _ in 0..jobs {
                synthetic_job();
            }
        });
        started.elapsed().as_secs_f64() * 1e6 / jobs as f64
    };
    let bare = time(tracing::Dispatch::new(tracing_subscriber::registry()));
    let config = TracesConfig {
        workflow_name: "Pictor job".to_string(),
        redact: false,
    };
    let (layer, mut receiver, _flush) = OpenAiTracesLayer::new(config, jobs * 6 + 8);
    let traced = time(tracing::Dispatch::new(
        tracing_subscriber::registry().with(layer),
    ));
    let mut items = Vec::new();
    while let Ok(item) = receiver.try_recv() {
        items.push(item);
    }
    let started = Instant::now();
    let bytes: usize = items
        .chunks(128)
        .map(|batch| serde_json::to_vec(&json!({ "data": batch })).map_or(0, |body| body.len()))
        .sum();
    let serialize = started.elapsed().as_secs_f64() * 1e6 / jobs as f64;
    println!(
        "layer alone ({jobs} synthetic create jobs, {} items, {} bytes of JSON per job): \
         spans without the layer {bare:.1} us/job, with it {traced:.1} us/job \
         (+{:.1} us), exporter serialization {serialize:.1} us/job",
        items.len(),
        bytes / jobs.max(1),
        traced - bare
    );
}

/// The spans and events the worker emits for a create job.
fn synthetic_job() {
    let call = |model: &str, input: u64, output: u64, images: u32| {
        let span = tracing::info_span!(
            "provider_call",
            provider = "openai",
            model,
            attempt = 1u32,
            prompt = "a lighthouse at dawn, watercolor",
            outcome = tracing::field::Empty,
            input_tokens = tracing::field::Empty,
            output_tokens = tracing::field::Empty,
            images = tracing::field::Empty,
        );
        span.record("outcome", "ok");
        span.record("input_tokens", input);
        span.record("output_tokens", output);
        span.record("images", images);
    };
    let _job = tracing::info_span!(
        "job",
        job_id = "01a21427-2b7c-77e0-88a5-34f429dc83e4",
        trace_id = "trace_01a214272b7c77e088a534f429dc83e4",
        delivery = 1u32
    )
    .entered();
    {
        let _router = tracing::info_span!("agent", agent = "router").entered();
        call("gpt-4.1-mini", 120, 24, 0);
    }
    tracing::info!(
        trace_event = "handoff",
        from = "router",
        to = "create",
        "Handoff"
    );
    {
        let _create = tracing::info_span!("agent", agent = "create").entered();
        call("gpt-image-2", 10, 1056, 1);
    }
}

fn flag(args: &[String], name: &str) -> Option<usize> {
    let at = args.iter().position(|arg| arg == name)?;
    args.get(at + 1)?.parse().ok()
}

fn memory_gib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| (kib + 512 * 1024) / (1024 * 1024))
}

/// One mode: a fresh app and worker, a warm-up job, then `jobs` jobs timed from the first
/// submission to the last terminal state.
async fn run(mode: Mode, jobs: usize) -> anyhow::Result<Run> {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |settings| {
            settings.api.user_jobs_per_minute =
                NonZeroU32::new(1_000_000).unwrap_or(NonZeroU32::MIN);
            settings.api.user_burst = NonZeroU32::new(1_000_000).unwrap_or(NonZeroU32::MIN);
        },
    )
    .await;
    let ingest = match mode {
        Mode::Live => {
            let server = wiremock::MockServer::start().await;
            wiremock::Mock::given(wiremock::matchers::method("POST"))
                .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(json!({})))
                .mount(&server)
                .await;
            Some(server)
        }
        _ => None,
    };
    let config = std::env::temp_dir().join(format!("pictor-bench-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&config, NO_LIMITS).context("cannot write the bench config")?;
    let mut worker = tokio::process::Command::new(std::env::current_exe()?);
    worker
        .arg("worker")
        .envs(app.worker_env())
        .env("PICTOR_CONFIG", &config)
        .env("PICTOR_SIMULATED_DELAY_MS", "0")
        .env("PICTOR_WORKER_CONCURRENCY", "64")
        .env("PICTOR_WORKER_METRICS_ADDR", "")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    match (mode, &ingest) {
        (Mode::Off, _) => {
            worker.env("PICTOR_OPENAI_TRACES", "false");
        }
        (Mode::Dead, _) => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            worker.env("PICTOR_OPENAI_TRACES", "true").env(
                "PICTOR_TRACES_ENDPOINT",
                format!("http://127.0.0.1:{port}/v1/traces/ingest"),
            );
        }
        (Mode::Live, Some(server)) => {
            worker.env("PICTOR_OPENAI_TRACES", "true").env(
                "PICTOR_TRACES_ENDPOINT",
                format!("{}/v1/traces/ingest", server.uri()),
            );
        }
        (Mode::Live, None) => anyhow::bail!("the live mode needs its mock"),
    }
    let mut worker = worker.spawn().context("cannot start the bench worker")?;

    // Warm up: the worker is connected and consuming once its first job ends.
    let warm = submit(&app).await?;
    wait_terminal(&app, &warm).await?;

    let pid = worker.id().context("the worker has a pid")?;
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..jobs)
        .map(|_| submit(&app))
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    for id in &ids {
        wait_terminal(&app, id).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Give the last flush a moment (in every mode alike), then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let worker_cpu = cpu_seconds(pid) - cpu_before;

    let (posts, items) = match &ingest {
        Some(server) => {
            let requests = server.received_requests().await.unwrap_or_default();
            let items = requests
                .iter()
                .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
                .map(|body| body["data"].as_array().map_or(0, Vec::len))
                .sum();
            (requests.len(), items)
        }
        None => (0, 0),
    };
    let _ = worker.kill().await;
    let _ = std::fs::remove_file(&config);
    Ok(Run {
        seconds,
        worker_cpu,
        posts,
        items,
    })
}

/// Submits one job, waiting out a `503` like a real client (a loaded machine can make Redis
/// or RabbitMQ briefly slower than the api's timeouts).
async fn submit(app: &TestApp) -> anyhow::Result<String> {
    let mut tries = 0;
    let response = loop {
        let response = app
            .post_job(ALICE, json!({"prompt": "a lighthouse at dawn, watercolor"}))
            .await;
        tries += 1;
        if response.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE || tries >= 20 {
            break response;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    anyhow::ensure!(
        response.status() == reqwest::StatusCode::ACCEPTED,
        "submission refused: {}",
        response.status()
    );
    let body: serde_json::Value = response.json().await?;
    body["id"]
        .as_str()
        .map(str::to_string)
        .context("no id in the answer")
}

/// Polls Redis (not the api, so polling does not load the api being measured).
async fn wait_terminal(app: &TestApp, id: &str) -> anyhow::Result<()> {
    let id = JobId::parse(id).context("job id")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(job) = app.store.get(id).await?
            && job.status.is_terminal()
        {
            anyhow::ensure!(
                job.status.as_str() == "succeeded",
                "job {id} ended {}",
                job.status.as_str()
            );
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "job {id} did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The worker role: `pictor-worker`'s `main`, with the exporter's key set apart.
async fn worker() -> anyhow::Result<()> {
    let settings = Settings::load().context("cannot load settings")?;
    let mut traced = settings.clone();
    traced.openai.api_key = Some(SecretString::from("sk-bench-not-a-real-key"));
    let telemetry = shared::telemetry::init("worker", &traced);
    let worker = worker::Worker::build(settings).await?;
    worker.run_until_stopped(shared::shutdown_signal()).await;
    telemetry.shutdown().await;
    Ok(())
}
