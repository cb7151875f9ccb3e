//! `spawn_app()`: the api on a random port and a worker in-process, against the real Redis and
//! RabbitMQ, isolated per test by a unique queue prefix, Redis key prefix and image directory,
//! with local mock servers standing in for OpenAI and Gemini. Everything the test created is
//! deleted when the [`TestApp`] is dropped, even if the test panicked.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::Value;
use shared::auth::ApiKeys;
use shared::config::Settings;
use shared::queue::Topology;
use shared::store::JobStore;
use tokio::sync::watch;

use crate::mocks::{GeminiMock, OpenAiMock};
use crate::proxy::CuttableProxy;

pub const ALICE: &str = "alice-key";
pub const BOB: &str = "bob-key";
pub const OPS: &str = "ops-key";

/// How a test wants its app.
pub struct Options {
    /// Mock servers for OpenAI and Gemini (with keys set); `false` runs the simulated providers.
    pub mock_providers: bool,
    /// Run a worker in-process.
    pub worker: bool,
    /// Route RabbitMQ through a cuttable proxy.
    pub amqp_proxy: bool,
    /// Route Redis through a cuttable proxy.
    pub redis_proxy: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mock_providers: true,
            worker: true,
            amqp_proxy: false,
            redis_proxy: false,
        }
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub store: JobStore,
    pub topology: Topology,
    pub openai: Option<OpenAiMock>,
    pub gemini: Option<GeminiMock>,
    pub amqp_proxy: Option<CuttableProxy>,
    pub redis_proxy: Option<CuttableProxy>,
    image_dir: PathBuf,
    stop: watch::Sender<bool>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default(), |_| {}).await
}

/// Settings isolated for one test: unique prefixes and image directory, test keys, fast timings.
pub fn test_settings() -> Settings {
    let mut settings = Settings::defaults().expect("defaults load");
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let unique = &unique[..12];
    settings.api.addr = "127.0.0.1:0".parse().expect("address");
    settings.api.dev_api_keys =
        ApiKeys::parse_plain(&format!("alice:user:{ALICE},bob:user:{BOB},ops:ops:{OPS}"))
            .expect("test keys");
    settings.api.publish_timeout = Duration::from_secs(3);
    settings.amqp.queue_prefix = format!("pictor-test-{unique}");
    settings.redis.prefix = format!("pictor-test-{unique}:");
    settings.images.store = std::env::temp_dir()
        .join(format!("pictor-test-{unique}"))
        .to_string_lossy()
        .into_owned();
    settings.worker.concurrency = std::num::NonZeroUsize::new(16).expect("non-zero");
    settings.worker.shutdown_grace = Duration::from_secs(2);
    // Parallel tests share one port space; metrics tests start their own listeners.
    settings.worker.metrics_addr = None;
    settings.api.metrics_addr = None;
    settings.simulated.delay = Duration::from_millis(50);
    if let Ok(url) = std::env::var("PICTOR_AMQP_URL") {
        settings.amqp.url = SecretString::from(url);
    }
    if let Ok(url) = std::env::var("PICTOR_REDIS_URL") {
        settings.redis.url = SecretString::from(url);
    }
    settings
}

/// The api alone, with the default test settings and no worker.
pub async fn spawn_api() -> TestApp {
    spawn_app_with(
        Options {
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await
}

/// api and worker on the simulated providers (no mock servers), with the default test settings.
pub async fn spawn_simulated() -> TestApp {
    spawn_app_with(
        Options {
            mock_providers: false,
            ..Options::default()
        },
        |_| {},
    )
    .await
}

pub async fn spawn_app_with(options: Options, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings();
    let (openai, gemini) = if options.mock_providers {
        let openai = OpenAiMock::start().await;
        let gemini = GeminiMock::start().await;
        settings.openai.base_url = openai.base_url().parse().expect("mock url");
        settings.openai.api_key = Some(SecretString::from("sk-test-secret-openai-key"));
        settings.gemini.base_url = gemini.base_url().parse().expect("mock url");
        settings.gemini.api_key = Some(SecretString::from("test-secret-gemini-key"));
        (Some(openai), Some(gemini))
    } else {
        settings.openai.api_key = None;
        settings.gemini.api_key = None;
        (None, None)
    };
    // The direct settings are what the harness itself uses for inspection and clean-up.
    let direct = settings.clone();
    let amqp_proxy = if options.amqp_proxy {
        let proxy = CuttableProxy::start(service_addr(&settings.amqp.url, 5672)).await;
        settings.amqp.url = SecretString::from(format!("amqp://guest:guest@{}/%2f", proxy.addr));
        Some(proxy)
    } else {
        None
    };
    let redis_proxy = if options.redis_proxy {
        let proxy = CuttableProxy::start(service_addr(&settings.redis.url, 6379)).await;
        settings.redis.url = SecretString::from(format!("redis://{}", proxy.addr));
        Some(proxy)
    } else {
        None
    };
    tweak(&mut settings);

    let (stop, stopped) = watch::channel(false);
    let app = api::Application::build(settings.clone())
        .await
        .expect("api builds");
    let addr = app.local_addr();
    let mut api_stop = stopped.clone();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = api_stop.wait_for(|stop| *stop).await;
    }));
    if options.worker {
        let worker = worker::Worker::build(settings.clone())
            .await
            .expect("worker builds");
        let mut worker_stop = stopped.clone();
        tokio::spawn(worker.run_until_stopped(async move {
            let _ = worker_stop.wait_for(|stop| *stop).await;
        }));
    }
    let store = JobStore::connect(&direct.redis, direct.jobs.ttl)
        .await
        .expect("redis reachable");
    TestApp {
        addr,
        base: format!("http://{addr}"),
        // Idle connections are dropped before the api closes them (after its header read
        // timeout, 10 s): one reused just as the api closed it would fail to send a request
        // (docs/error-handling.md).
        client: reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client"),
        topology: Topology::new(&direct.amqp),
        image_dir: PathBuf::from(&settings.images.store),
        settings: Settings {
            amqp: direct.amqp,
            redis: direct.redis,
            ..settings
        },
        store,
        openai,
        gemini,
        amqp_proxy,
        redis_proxy,
        stop,
    }
}

fn service_addr(url: &SecretString, default_port: u16) -> SocketAddr {
    use secrecy::ExposeSecret;
    let url = url::Url::parse(url.expose_secret()).expect("service url");
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port().unwrap_or(default_port);
    format!("{host}:{port}")
        .parse()
        .expect("services are addressed by IP in tests")
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_job(&self, key: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/jobs"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_raw(
        &self,
        key: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> reqwest::Response {
        self.client
            .post(self.url("/v1/jobs"))
            .bearer_auth(key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_multipart(
        &self,
        key: &str,
        form: reqwest::multipart::Form,
    ) -> reqwest::Response {
        self.client
            .post(self.url("/v1/jobs"))
            .bearer_auth(key)
            .multipart(form)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn delete(&self, key: &str, path: &str) -> reqwest::Response {
        self.client
            .delete(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("request sent")
    }

    /// Posts a job and returns its id, asserting the 202.
    pub async fn submit(&self, key: &str, body: Value) -> String {
        self.submit_at(&self.base, key, body).await
    }

    /// [`TestApp::submit`] to the api at `base` (another api process on this app's queues).
    pub async fn submit_at(&self, base: &str, key: &str, body: Value) -> String {
        let response = self
            .client
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("request sent");
        assert_eq!(
            response.status(),
            StatusCode::ACCEPTED,
            "POST {base}/v1/jobs"
        );
        let body: Value = response.json().await.expect("json body");
        body["id"].as_str().expect("id").to_string()
    }

    pub async fn job(&self, key: &str, id: &str) -> Value {
        let response = self.get(key, &format!("/v1/jobs/{id}")).await;
        assert_eq!(response.status(), StatusCode::OK, "GET job {id}");
        response.json().await.expect("json body")
    }

    /// Polls the job until `done` says so, failing after 30 s. Like a real client it waits
    /// out a `503` (a dependency is briefly away) and polls again.
    pub async fn wait_for(&self, key: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let response = self.get(key, &format!("/v1/jobs/{id}")).await;
            if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                assert!(
                    Instant::now() < deadline,
                    "job {id}: the api stayed unavailable"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            assert_eq!(response.status(), StatusCode::OK, "GET job {id}");
            let job: Value = response.json().await.expect("json body");
            if done(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not reach the expected state; last: {job:#}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn wait_until_terminal(&self, key: &str, id: &str) -> Value {
        self.wait_for(key, id, |job| {
            matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "needs_clarification" | "canceled")
            )
        })
        .await
    }

    /// Every ledger entry of the current month, oldest first.
    pub async fn ledger_entries(&self) -> Vec<shared::ledger::LedgerEntry> {
        let ledger = self
            .store
            .redis()
            .ledger(shared::ledger::BudgetPolicy::from(&self.settings.budget));
        let month = shared::ledger::Month::of(chrono::Utc::now());
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let (entries, last) = ledger
                .entries(month, after.as_deref(), 100)
                .await
                .expect("ledger readable");
            if entries.is_empty() {
                return all;
            }
            all.extend(entries);
            after = last;
        }
    }

    /// A future that resolves when this app stops (for extra workers a test starts).
    pub fn stop_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopped = self.stop.subscribe();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    }

    /// A channel on the real broker (not through any proxy), for inspecting queues.
    pub async fn amqp_channel(&self) -> (lapin::Connection, lapin::Channel) {
        let connection = shared::queue::connect(&self.settings.amqp, "test-inspector")
            .await
            .expect("rabbitmq reachable");
        let channel = connection.create_channel().await.expect("channel");
        (connection, channel)
    }

    /// Messages waiting in a queue of this test's topology.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        self.declared(queue).await.message_count()
    }

    /// Consumers of a queue of this test's topology.
    pub async fn queue_consumers(&self, queue: &str) -> u32 {
        self.declared(queue).await.consumer_count()
    }

    /// A passive declare of a queue of this test's topology: its counts, without changing it.
    async fn declared(&self, queue: &str) -> lapin::Queue {
        let (connection, channel) = self.amqp_channel().await;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = connection.close(200, "done".into()).await;
        declared
    }

    /// Environment for a `pictor-worker` child process equivalent to this app's worker.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        use secrecy::ExposeSecret;
        let s = &self.settings;
        let mut env = vec![
            (
                "PICTOR_AMQP_URL".to_string(),
                s.amqp.url.expose_secret().to_string(),
            ),
            (
                "PICTOR_QUEUE_PREFIX".to_string(),
                s.amqp.queue_prefix.clone(),
            ),
            (
                "PICTOR_REDIS_URL".to_string(),
                s.redis.url.expose_secret().to_string(),
            ),
            ("PICTOR_REDIS_PREFIX".to_string(), s.redis.prefix.clone()),
            ("PICTOR_IMAGE_STORE".to_string(), s.images.store.clone()),
            (
                "PICTOR_WORKER_CONCURRENCY".to_string(),
                s.worker.concurrency.to_string(),
            ),
            (
                "PICTOR_WORKER_MAX_INFRA_ATTEMPTS".to_string(),
                s.worker.max_infra_attempts.to_string(),
            ),
            (
                "PICTOR_BUDGET_POLICY".to_string(),
                if s.budget.policy == shared::config::BudgetPolicyKind::Block {
                    "block"
                } else {
                    "alert"
                }
                .to_string(),
            ),
            ("OPENAI_BASE_URL".to_string(), s.openai.base_url.to_string()),
            ("GEMINI_BASE_URL".to_string(), s.gemini.base_url.to_string()),
        ];
        if let Some(key) = &s.openai.api_key {
            env.push((
                "OPENAI_API_KEY".to_string(),
                key.expose_secret().to_string(),
            ));
        }
        if let Some(key) = &s.gemini.api_key {
            env.push((
                "GEMINI_API_KEY".to_string(),
                key.expose_secret().to_string(),
            ));
        }
        env
    }

    /// A `pictor-worker` process for this app (its env from [`TestApp::worker_env`]) with
    /// `extra` variables on top; killed when dropped.
    pub fn worker_process(&self, extra: &[(&str, &str)]) -> tokio::process::Child {
        tokio::process::Command::new(workspace_binary("pictor-worker"))
            .envs(self.worker_env())
            .env("RUST_LOG", "warn")
            // No metrics listener: parallel tests (and a local fleet) would fight over the port.
            .env("PICTOR_WORKER_METRICS_ADDR", "")
            .envs(extra.iter().copied())
            .kill_on_drop(true)
            .spawn()
            .expect("worker starts")
    }
}

/// Sends SIGTERM, as an orchestrator does, and waits (at most 20 s) for the process to exit.
pub async fn stop_gracefully(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    let pid = child.id().expect("process still running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "SIGTERM delivered to {pid}");
    tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the process exits within its grace period")
        .expect("wait for the process")
}

/// Path of a binary built by this workspace (`cargo build --workspace --bins` builds them).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1, for a child process to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free local port")
        .port()
}

/// A `pictor` process started by a test: an api, or a worker whose `/metrics` and `/healthz`
/// listen at `base`. Dropping it kills and reaps the process, also when the test panicked, so it
/// never outlives the queues and keys the [`TestApp`] deletes (drop it first: declare it after
/// the app).
pub struct PictorProcess {
    /// `http://127.0.0.1:{port}`.
    pub base: String,
    /// Where its stdout and stderr go, when the test asked to read them
    /// ([`TestApp::spawn_process_logged`]).
    pub log: Option<PathBuf>,
    child: std::process::Child,
}

impl PictorProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A line of `/proc/{pid}/status` in kB (`VmRSS`, `VmHWM`: resident and peak resident).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the process is alive");
        status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{field}:")))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc status"))
    }

    /// What the process wrote so far (stdout and stderr), if it was started logged: read once
    /// the lines it logged before the call have had time to be written (its log lines go out in
    /// batches, `shared::telemetry::batched`).
    pub async fn output(&self) -> String {
        tokio::time::sleep(shared::telemetry::batched::BATCH_WINDOW * 4).await;
        let path = self
            .log
            .as_ref()
            .expect("started with spawn_process_logged");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) with `kill`.
    pub fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIG{signal} delivered");
    }

    /// Waits up to `within` for the process to exit, and answers how it did (`None`: still
    /// running).
    pub async fn exit_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The names of the process' threads (`/proc/{pid}/task/*/comm`).
    pub fn thread_names(&self) -> Vec<String> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid())).expect("alive");
        tasks
            .filter_map(Result::ok)
            .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
            .map(|name| name.trim().to_string())
            .collect()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for PictorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(log) = &self.log {
            let _ = std::fs::remove_file(log);
        }
    }
}

impl TestApp {
    /// Starts `pictor <role>` (`api` or `worker`) on this app's broker, queues, Redis prefix,
    /// image store and provider mocks ([`TestApp::worker_env`]; an api also gets the test keys
    /// and this app's per-user limits), then `extra`, with its HTTP listener on a free port, and
    /// waits until it answers there (an api on `/readyz`, a worker on `/healthz`).
    pub async fn spawn_process(&self, role: &str, extra: &[(&str, String)]) -> PictorProcess {
        self.start_process(role, extra, false).await
    }

    /// [`TestApp::spawn_process`] with its stdout and stderr kept for [`PictorProcess::output`].
    pub async fn spawn_process_logged(
        &self,
        role: &str,
        extra: &[(&str, String)],
    ) -> PictorProcess {
        self.start_process(role, extra, true).await
    }

    /// The command [`TestApp::spawn_process`] runs, with nothing listening for it yet: for
    /// tests of how a misconfigured process refuses to start.
    pub fn process_command(&self, role: &str, extra: &[(&str, String)]) -> std::process::Command {
        let mut command = std::process::Command::new(workspace_binary("pictor"));
        command
            .arg(role)
            .envs(self.worker_env())
            .env("PICTOR_API_METRICS_ADDR", "")
            .env("PICTOR_WORKER_METRICS_ADDR", "")
            .env("RUST_LOG", "warn");
        if role == "api" {
            let api = &self.settings.api;
            command
                .env(
                    "PICTOR_API_KEYS",
                    format!("alice:user:{ALICE},bob:user:{BOB},ops:ops:{OPS}"),
                )
                .env(
                    "PICTOR_USER_JOBS_PER_MINUTE",
                    api.user_jobs_per_minute.to_string(),
                )
                .env("PICTOR_USER_BURST", api.user_burst.to_string());
        }
        command.envs(extra.iter().map(|(name, value)| (*name, value.as_str())));
        command
    }

    async fn start_process(
        &self,
        role: &str,
        extra: &[(&str, String)],
        logged: bool,
    ) -> PictorProcess {
        let port = free_port();
        let (listen_var, probe) = match role {
            "api" => ("PICTOR_API_ADDR", "/readyz"),
            _ => ("PICTOR_WORKER_METRICS_ADDR", "/healthz"),
        };
        let mut command = self.process_command(role, extra);
        // The listener goes last so that `extra` cannot move it.
        command.env(listen_var, format!("127.0.0.1:{port}"));
        let log = logged.then(|| {
            let path = std::env::temp_dir().join(format!(
                "pictor-{role}-{}.log",
                uuid::Uuid::new_v4().simple()
            ));
            let file = std::fs::File::create(&path).expect("log file");
            command
                .stdout(file.try_clone().expect("log file"))
                .stderr(file);
            path
        });
        let mut process = PictorProcess {
            base: format!("http://127.0.0.1:{port}"),
            log,
            child: command.spawn().expect("pictor starts"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("pictor {role} exited during start-up: {status}");
            }
            let answer = self
                .client
                .get(format!("{}{probe}", process.base))
                .send()
                .await;
            if answer.is_ok_and(|response| response.status().is_success()) {
                return process;
            }
            assert!(
                Instant::now() < deadline,
                "pictor {role} did not answer {probe} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts `count` `pictor worker` processes (see [`TestApp::spawn_process`]) and waits until
    /// every one of them consumes the work queue, so work submitted next is shared by all.
    pub async fn spawn_workers(
        &self,
        count: usize,
        extra: &[(&str, String)],
    ) -> Vec<PictorProcess> {
        let queue = &self.topology.jobs_queue;
        let wanted = self.queue_consumers(queue).await
            + u32::try_from(count).expect("a small number of workers");
        let mut workers = Vec::with_capacity(count);
        for _ in 0..count {
            workers.push(self.spawn_process("worker", extra).await);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.queue_consumers(queue).await < wanted {
            assert!(
                Instant::now() < deadline,
                "{count} workers did not all consume {queue} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        workers
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let settings = self.settings.clone();
        let topology = self.topology.clone();
        let image_dir = self.image_dir.clone();
        // Clean up on a thread with its own runtime: Drop cannot await, and this must run even
        // when the test panicked.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                if let Ok(store) = JobStore::connect(&settings.redis, settings.jobs.ttl).await {
                    let _ = store.delete_everything().await;
                }
                if let Ok(connection) = shared::queue::connect(&settings.amqp, "test-cleanup").await
                {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = topology.delete(&channel).await;
                    }
                    let _ = connection.close(200, "cleanup".into()).await;
                }
            });
            let _ = std::fs::remove_dir_all(image_dir);
        });
        let _ = cleanup.join();
    }
}

/// The value of the Prometheus sample `name{…}` whose labels include all of `labels` (the first
/// such series), from the text exposition format.
pub fn metric_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let matches = labels
                .iter()
                .all(|(key, wanted)| rest.contains(&format!("{key}=\"{wanted}\"")));
            matches.then(|| value.parse().ok()).flatten()
        })
}
