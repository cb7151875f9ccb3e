//! One throwaway deployment per scenario: the real `pictor` binary started as separate api,
//! worker and scheduler processes against the local Redis and RabbitMQ, on their own queue
//! prefix, Redis prefix, image directory and ports, all deleted afterwards.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shared::config::Settings;
use shared::queue::Topology;
use shared::store::JobStore;
use tokio::process::{Child, Command};

/// Rate limits high enough never to defer a job, for every model the defaults configure.
const NO_LIMITS: &str = r#"
[rate_limits."openai:gpt-4.1-mini"]
requests_per_minute = 1000000000
tokens_per_minute = 1000000000

[rate_limits."openai:gpt-image-2"]
requests_per_minute = 1000000000
images_per_minute = 1000000000

[rate_limits."gemini:gemini-3.1-flash-image"]
requests_per_minute = 1000000000
images_per_minute = 1000000000
"#;

pub const KEY: &str = "bench-secret";

/// Where a deployment's image store lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Images {
    /// A directory on the machine's disk.
    Disk,
    /// A tmpfs (`/dev/shm`) where there is one: for the scenarios whose images are small, so
    /// that the disk's inode allocation (a third of the worker's CPU on this VM's ext4, varying
    /// with how many files were deleted lately) does not drown Pictor's own costs. In
    /// production the object store is S3 or a volume of its own, not the worker's disk.
    Tmpfs,
}

pub struct Deployment {
    dir: PathBuf,
    images: PathBuf,
    binary: PathBuf,
    settings: Settings,
    env: Vec<(String, String)>,
    pub api_port: u16,
}

impl Deployment {
    /// A deployment whose providers are the mock at `openai_base`. `env` adds to (and overrides)
    /// the bench's defaults.
    pub fn new(
        binary: &Path,
        openai_base: &str,
        env: &[(&str, String)],
        images: Images,
    ) -> anyhow::Result<Self> {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("pictor-bench-{}", &unique[..10]);
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)?;
        let shm = Path::new("/dev/shm");
        let images = if images == Images::Tmpfs && shm.is_dir() {
            shm.join(&id)
        } else {
            dir.join("images")
        };
        std::fs::create_dir_all(&images)?;
        let config = dir.join("bench.toml");
        std::fs::write(&config, NO_LIMITS)?;
        let api_port = free_port()?;
        let amqp_url = std::env::var("PICTOR_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
        let redis_url =
            std::env::var("PICTOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let mut vars: Vec<(String, String)> = vec![
            ("PICTOR_CONFIG", config.to_string_lossy().into_owned()),
            ("PICTOR_API_ADDR", format!("127.0.0.1:{api_port}")),
            ("PICTOR_API_METRICS_ADDR", String::new()),
            ("PICTOR_API_KEYS", format!("bench:user:{KEY}")),
            ("PICTOR_AMQP_URL", amqp_url),
            ("PICTOR_REDIS_URL", redis_url),
            ("PICTOR_QUEUE_PREFIX", id.clone()),
            ("PICTOR_REDIS_PREFIX", format!("{id}:")),
            ("PICTOR_IMAGE_STORE", images.to_string_lossy().into_owned()),
            ("PICTOR_MAX_PENDING_JOBS", "10000000".into()),
            ("PICTOR_MAX_PENDING_PER_USER", "10000000".into()),
            ("PICTOR_USER_JOBS_PER_MINUTE", "100000000".into()),
            ("PICTOR_USER_BURST", "1000000".into()),
            ("PICTOR_BUDGET_MONTHLY_USD", "100000000.00".into()),
            ("PICTOR_WORKER_METRICS_ADDR", String::new()),
            ("PICTOR_SCHEDULER_METRICS_ADDR", String::new()),
            ("OPENAI_BASE_URL", openai_base.to_string()),
            ("OPENAI_API_KEY", "sk-bench-not-a-real-key".into()),
            ("GEMINI_API_KEY", "bench-not-a-real-key".into()),
            ("PICTOR_OPENAI_TRACES", "false".into()),
            ("PICTOR_METRICS", "true".into()),
            ("RUST_LOG", "info".into()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
        for (name, value) in env {
            vars.retain(|(existing, _)| existing != name);
            vars.push(((*name).to_string(), value.clone()));
        }
        let mut settings = Settings::defaults()?;
        settings.amqp.queue_prefix = id.clone();
        settings.redis.prefix = format!("{id}:");
        if let Some((_, url)) = vars.iter().find(|(name, _)| name == "PICTOR_AMQP_URL") {
            settings.amqp.url = url.clone().into();
        }
        if let Some((_, url)) = vars.iter().find(|(name, _)| name == "PICTOR_REDIS_URL") {
            settings.redis.url = url.clone().into();
        }
        Ok(Self {
            dir,
            images,
            binary: binary.to_path_buf(),
            settings,
            env: vars,
            api_port,
        })
    }

    /// Limits the shipped image model to `per_minute` images (and requests) a minute, with the
    /// other models unlimited as before: for the scenarios where the provider's limit is the
    /// bottleneck. Call before spawning the processes.
    pub fn limit_image_model(&self, per_minute: u32) -> anyhow::Result<()> {
        let model = &self.settings.openai.image_model;
        let limited = NO_LIMITS.replace(
            &format!(
                "[rate_limits.\"openai:{model}\"]\nrequests_per_minute = 1000000000\nimages_per_minute = 1000000000"
            ),
            &format!(
                "[rate_limits.\"openai:{model}\"]\nrequests_per_minute = {per_minute}\nimages_per_minute = {per_minute}"
            ),
        );
        anyhow::ensure!(
            limited != NO_LIMITS,
            "the image model {model} has no limit to change"
        );
        std::fs::write(self.dir.join("bench.toml"), limited)?;
        Ok(())
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api_port)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Deletes the output images already written, as a retention policy would (one job's
    /// directory at a time, once its image is complete), and answers how many it deleted.
    ///
    /// Scenario 2 writes 24 GB of images. Into a page cache that keeps growing, every write
    /// lands in memory this VM has never touched, and the hypervisor's first-touch faults
    /// then cost more than everything else the worker does (`perf`: a third of all CPU in
    /// `copy_folio_from_iter_atomic`, 6 ms per image against under 1 ms for a page already
    /// used). Deleting what was written keeps the page cache the size a machine in steady
    /// state has, so the scenario measures the worker rather than the VM's memory history.
    pub fn sweep_outputs(&self) -> usize {
        let Ok(jobs) = std::fs::read_dir(self.images.join("outputs")) else {
            return 0;
        };
        jobs.flatten()
            .filter(|job| {
                // A complete image has its final name; one still being written ends in `#n`.
                std::fs::read_dir(job.path()).is_ok_and(|mut files| {
                    files.any(|file| {
                        file.is_ok_and(|file| !file.file_name().to_string_lossy().contains('#'))
                    })
                })
            })
            .filter(|job| std::fs::remove_dir_all(job.path()).is_ok())
            .count()
    }

    /// Starts `pictor <role>` with this deployment's environment plus `extra`, logging to a file
    /// in the deployment's directory, and waits until it answers `ready_url` (if any).
    pub async fn spawn(
        &self,
        role: &str,
        extra: &[(&str, String)],
        ready_url: Option<String>,
    ) -> anyhow::Result<Process> {
        let mut env = self.env.clone();
        env.extend(
            extra
                .iter()
                .map(|(name, value)| ((*name).to_string(), value.clone())),
        );
        Process::start(&self.binary, &[role], &env, role, &self.dir, ready_url).await
    }

    /// Deletes the queues, the Redis keys and the image directory; the processes' logs are kept
    /// under `target/bench-logs/{id}/` (until the next run) for a look after a surprising number.
    pub async fn cleanup(&self) {
        let logs = crate::workspace_root()
            .join("target")
            .join("bench-logs")
            .join(self.dir.file_name().unwrap_or_default());
        if std::fs::create_dir_all(&logs).is_ok()
            && let Ok(entries) = std::fs::read_dir(&self.dir)
        {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|ext| ext == "log") {
                    let _ = std::fs::copy(&path, logs.join(entry.file_name()));
                }
            }
        }
        if let Ok(store) = JobStore::connect(&self.settings.redis, self.settings.jobs.ttl).await {
            let _ = store.delete_everything().await;
        }
        if let Ok(connection) = shared::queue::connect(&self.settings.amqp, "bench-cleanup").await {
            if let Ok(channel) = connection.create_channel().await {
                let _ = Topology::new(&self.settings.amqp).delete(&channel).await;
            }
            let _ = connection.close(200, "cleanup".into()).await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.images);
    }
}

pub struct Process {
    pub role: String,
    pub pid: u32,
    child: Child,
}

impl Process {
    /// Starts `program` with `args` and no environment but `PATH` and `env` (later entries win),
    /// logging to `{dir}/{role}.log`, and waits until it answers `ready_url` (if any).
    pub async fn start(
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
        role: &str,
        dir: &Path,
        ready_url: Option<String>,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(dir.join(format!("{role}.log")))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let pid = child.id().context("the process exited at once")?;
        let mut process = Process {
            role: role.to_string(),
            pid,
            child,
        };
        if let Some(url) = ready_url {
            process.wait_ready(&url, dir).await?;
        }
        Ok(process)
    }

    async fn wait_ready(&mut self, url: &str, dir: &Path) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join(format!("{}.log", self.role)))
                    .unwrap_or_default();
                bail!("pictor {} exited with {status}:\n{log}", self.role);
            }
            if let Ok(response) = client.get(url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("pictor {} did not become ready at {url}", self.role);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident set size now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmRSS:")
    }

    /// Peak resident set size since start, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmHWM:")
    }

    /// CPU time (user + system) so far, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(&format!("/proc/{}/stat", self.pid))
    }

    /// SIGTERM, then wait for a graceful exit (SIGKILL after `grace`).
    pub async fn stop(mut self, grace: Duration) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// CPU time (user + system) so far, in seconds, of the process or thread whose `stat` file is
/// at `stat_path` (`/proc/<pid>/stat`, `/proc/self/task/<tid>/stat`).
pub fn cpu_seconds(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Clock ticks; 100 a second on every Linux this runs on (`getconf CLK_TCK`).
    Some((utime + stime) / 100.0)
}

/// The pid of a running process named `comm` (as in `/proc/<pid>/comm`) whose command line
/// contains `cmdline_contains`: how the bench finds the machine's Redis and RabbitMQ.
pub fn find_process(comm: &str, cmdline_contains: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            name.trim() == comm && String::from_utf8_lossy(&cmdline).contains(cmdline_contains)
        })
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The sum of every sample of a Prometheus counter whose labels contain `filter`, read from a
/// `/metrics` page.
pub fn metric_sum(page: &str, name: &str, filter: &str) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| line.contains(filter))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn fetch_metrics(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    Ok(client
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}
