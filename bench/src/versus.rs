//! Scenario 8: Pictor beside the same service built on a stack a Node team knows (Fastify +
//! BullMQ, see `peer.rs`), on the same machine, doing the same work per job: 64 keep-alive
//! clients post small JSON jobs for a window; one worker at concurrency 64 calls the router's
//! chat completion and the image model on one shared mock, decodes the PNG, writes it to a tmpfs
//! and writes the job's final state to Redis. Rounds alternate between the two stacks, each on
//! a fresh deployment; the report takes the median round of each.
//!
//! Besides throughput it reads the CPU time of every process involved (`/proc/<pid>/stat`):
//! the stack's api and worker, the machine's Redis and RabbitMQ servers (whole processes), and
//! the mock (its own thread), from the start of a round's window until its backlog has drained,
//! divided by the jobs that succeeded meanwhile; and Redis' `INFO commandstats` over the same
//! span. Redis and RabbitMQ are measured whole, so nothing else may use them meanwhile.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::fleet::{Deployment, Images, Process, fetch_metrics, find_process, metric_sum};
use crate::load::{self, Latencies};
use crate::mock::{Mock, MockSpec};
use crate::peer::{self, Peer, PeerInstall};
use crate::scenarios::{drain, median, start_api, start_worker};

const CONCURRENCY: usize = 64;
const CLIENTS: usize = 64;
/// Load before each measured window: connections, scripts, V8's JIT; its backlog drains first.
const WARM_UP: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    Pictor,
    Peer,
}

impl Stack {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pictor => "Pictor",
            Self::Peer => "Fastify + BullMQ",
        }
    }

    /// The worker's counter of finished jobs (labelled `outcome`).
    fn finished_metric(self) -> &'static str {
        match self {
            Self::Pictor => "pictor_jobs_finished_total",
            Self::Peer => "peer_jobs_finished_total",
        }
    }
}

/// CPU seconds so far of each process a round involves.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSnapshot {
    api: f64,
    worker: f64,
    redis: f64,
    rabbitmq: f64,
    mock: f64,
    /// The bench process itself (load generator and mock).
    bench: f64,
    /// Every core's busy time (`/proc/stat`).
    machine: f64,
}

/// CPU per job of each process over one round, milliseconds (the api's per accepted job, the
/// others per job succeeded between the window's start and the drained backlog).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuPerJob {
    pub api: f64,
    pub worker: f64,
    pub redis: f64,
    pub rabbitmq: f64,
    pub mock: f64,
}

impl CpuPerJob {
    /// The service's own processes: api, worker, Redis and, for Pictor, RabbitMQ (the peer uses
    /// none; what the idle broker spent meanwhile is reported, not counted). The mock stands in
    /// for the provider and is not counted.
    pub fn total(&self, stack: Stack) -> f64 {
        let broker = if stack == Stack::Pictor {
            self.rabbitmq
        } else {
            0.0
        };
        self.api + self.worker + self.redis + broker
    }
}

/// Calls and microseconds per Redis command (`INFO commandstats`).
pub type CommandStats = BTreeMap<String, (u64, u64)>;

pub struct Round {
    pub stack: Stack,
    pub window_seconds: f64,
    pub accepted: u64,
    pub failed_posts: u64,
    pub latencies: Latencies,
    /// Jobs that succeeded during the window.
    pub succeeded_in_window: f64,
    /// Jobs that succeeded from the window's start until the backlog drained.
    pub jobs: f64,
    pub cpu: CpuPerJob,
    /// Redis commands over the round (the deltas), for `jobs` jobs.
    pub commands: CommandStats,
    /// Cores' worth of CPU the machine spent on anything but the measured processes and the
    /// bench over the round: how quiet the machine was.
    pub others_cores: f64,
}

impl Round {
    pub fn succeeded_per_second(&self) -> f64 {
        self.succeeded_in_window / self.window_seconds
    }

    pub fn accepted_per_second(&self) -> f64 {
        self.accepted as f64 / self.window_seconds
    }
}

pub struct Versus {
    pub window: Duration,
    /// Runtime threads of each Pictor process (`PICTOR_THREADS`; 0: one per CPU).
    pub threads: usize,
    pub rounds: Vec<Round>,
    pub node: String,
    pub commit: String,
}

impl Versus {
    pub fn of(&self, stack: Stack) -> impl Iterator<Item = &Round> {
        self.rounds.iter().filter(move |round| round.stack == stack)
    }

    /// The median over this stack's rounds of `value`.
    pub fn median(&self, stack: Stack, value: impl Fn(&Round) -> f64) -> f64 {
        median(&self.of(stack).map(value).collect::<Vec<_>>())
    }

    /// Pictor's end-to-end jobs/s over the peer's (median rounds).
    pub fn ratio(&self) -> f64 {
        self.median(Stack::Pictor, Round::succeeded_per_second)
            / self.median(Stack::Peer, Round::succeeded_per_second)
    }

    /// The stack's Redis commands summed over its rounds, and the jobs they served.
    pub fn commands(&self, stack: Stack) -> (CommandStats, f64) {
        let mut total = CommandStats::new();
        let mut jobs = 0.0;
        for round in self.of(stack) {
            jobs += round.jobs;
            for (name, (calls, usec)) in &round.commands {
                let entry = total.entry(name.clone()).or_default();
                entry.0 += calls;
                entry.1 += usec;
            }
        }
        (total, jobs)
    }
}

/// The machine's Redis and RabbitMQ server processes.
struct Servers {
    redis: Option<u32>,
    rabbitmq: Option<u32>,
    redis_url: String,
}

impl Servers {
    fn find() -> Self {
        let redis_url =
            std::env::var("PICTOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let port = redis_url
            .rsplit(':')
            .next()
            .and_then(|port| port.split('/').next())
            .unwrap_or("6379")
            .to_string();
        let redis = find_process("redis-server", &format!(":{port}"))
            .or_else(|| find_process("redis-server", ""));
        let rabbitmq = find_process("beam.smp", "rabbit");
        Self {
            redis,
            rabbitmq,
            redis_url,
        }
    }

    fn snapshot(&self, api: &Process, worker: &Process, mock: &Mock) -> CpuSnapshot {
        let of = |pid: Option<u32>| {
            pid.and_then(|pid| crate::fleet::cpu_seconds(&format!("/proc/{pid}/stat")))
                .unwrap_or(f64::NAN)
        };
        CpuSnapshot {
            api: api.cpu_seconds().unwrap_or(f64::NAN),
            worker: worker.cpu_seconds().unwrap_or(f64::NAN),
            redis: of(self.redis),
            rabbitmq: of(self.rabbitmq),
            mock: mock.cpu_seconds().unwrap_or(f64::NAN),
            bench: crate::fleet::cpu_seconds("/proc/self/stat").unwrap_or(f64::NAN),
            machine: machine_busy_seconds().unwrap_or(f64::NAN),
        }
    }
}

/// Busy time of all cores so far (everything in `/proc/stat`'s `cpu` line but idle and
/// iowait), seconds.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let busy: f64 = ticks.iter().take(8).sum::<f64>() - ticks.get(3)? - ticks.get(4)?;
    Some(busy / 100.0)
}

/// `INFO commandstats` as calls and microseconds per command.
async fn command_stats(redis_url: &str) -> Option<CommandStats> {
    let client = redis::Client::open(redis_url).ok()?;
    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .ok()?;
    Some(parse_command_stats(&info))
}

fn parse_command_stats(info: &str) -> CommandStats {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|value| value.parse::<u64>().ok())
            };
            Some((name.to_string(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

fn command_delta(before: &CommandStats, after: &CommandStats) -> CommandStats {
    after
        .iter()
        .filter_map(|(name, (calls, usec))| {
            let (calls_before, usec_before) = before.get(name).copied().unwrap_or_default();
            let calls = calls.saturating_sub(calls_before);
            (calls > 0).then(|| (name.clone(), (calls, usec.saturating_sub(usec_before))))
        })
        .collect()
}

/// Which Pictor was measured: the commit, and whether Pictor's own crates differed from it
/// (the bench's do not count).
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(crate::workspace_root())
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=10", "HEAD"]) {
        Some(head) => {
            let pictor = [
                "api",
                "worker",
                "scheduler",
                "shared",
                "cli",
                "Cargo.toml",
                "Cargo.lock",
            ];
            let mut args = vec!["status", "--porcelain", "--untracked-files=no", "--"];
            args.extend(pictor);
            let dirty = git(&args).is_some_and(|status| !status.is_empty());
            if dirty {
                format!("{head} with uncommitted changes")
            } else {
                head
            }
        }
        None => "unknown".into(),
    }
}

/// Scenario 8: `rounds` rounds of each stack, alternating which goes first, with `window`
/// seconds of load each.
pub async fn versus(
    binary: &Path,
    window: Duration,
    rounds: usize,
    threads: usize,
) -> anyhow::Result<Versus> {
    let install = peer::install()?;
    let servers = Servers::find();
    if servers.redis.is_none() || servers.rabbitmq.is_none() {
        eprintln!(
            "warning: cannot find the redis-server ({:?}) or RabbitMQ beam.smp ({:?}) process; their CPU is not reported",
            servers.redis, servers.rabbitmq
        );
    }
    let mock = Mock::start_on_own_thread(MockSpec {
        delay: Duration::ZERO,
        image_side: 64,
    })
    .await?;
    let mut result = Versus {
        threads,
        window,
        rounds: Vec::new(),
        node: peer::node_version(),
        commit: commit(),
    };
    for index in 0..rounds {
        let order = if index % 2 == 0 {
            [Stack::Pictor, Stack::Peer]
        } else {
            [Stack::Peer, Stack::Pictor]
        };
        for stack in order {
            let round = match stack {
                Stack::Pictor => pictor_round(binary, &mock, &servers, window, threads).await?,
                Stack::Peer => peer_round(&install, &mock, &servers, window).await?,
            };
            println!(
                "  {} round {}: {:.0} jobs/s end to end, {:.0} accepted/s, p99 {:.2} ms, CPU {:.3} ms/job (api {:.0} µs, worker {:.3}, Redis {:.3}, RabbitMQ {:.3}, mock {:.3}); other load {:.2} cores",
                stack.name(),
                index + 1,
                round.succeeded_per_second(),
                round.accepted_per_second(),
                round.latencies.percentile_ms(99.0),
                round.cpu.total(stack),
                round.cpu.api * 1000.0,
                round.cpu.worker,
                round.cpu.redis,
                round.cpu.rabbitmq,
                round.cpu.mock,
                round.others_cores,
            );
            result.rounds.push(round);
        }
    }
    Ok(result)
}

/// Two builds of Pictor on scenario 8's work, `rounds` rounds each, alternating which goes
/// first (`--baseline`): the before/after of a cut, printed, with each process' CPU per job.
pub async fn builds(
    binary: &Path,
    baseline: &Path,
    window: Duration,
    rounds: usize,
    threads: usize,
) -> anyhow::Result<()> {
    let servers = Servers::find();
    let mock = Mock::start_on_own_thread(MockSpec {
        delay: Duration::ZERO,
        image_side: 64,
    })
    .await?;
    let builds = [("this build", binary), ("baseline", baseline)];
    let mut measured: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    for index in 0..rounds {
        let order = if index % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let (name, path) = builds[which];
            let round = pictor_round(path, &mock, &servers, window, threads).await?;
            println!(
                "  {name} round {}: {}",
                index + 1,
                describe(
                    &round.cpu,
                    round.succeeded_per_second(),
                    round.latencies.percentile_ms(99.0),
                    round.others_cores
                )
            );
            measured[which].push(round);
        }
    }
    for (which, (name, path)) in builds.iter().enumerate() {
        let rounds = &measured[which];
        let of =
            |value: &dyn Fn(&Round) -> f64| median(&rounds.iter().map(value).collect::<Vec<_>>());
        let cpu = CpuPerJob {
            api: of(&|r| r.cpu.api),
            worker: of(&|r| r.cpu.worker),
            redis: of(&|r| r.cpu.redis),
            rabbitmq: of(&|r| r.cpu.rabbitmq),
            mock: of(&|r| r.cpu.mock),
        };
        let jobs: f64 = rounds.iter().map(|round| round.jobs).sum();
        let calls = |pick: &dyn Fn(&str) -> bool| -> f64 {
            rounds
                .iter()
                .flat_map(|round| round.commands.iter())
                .filter(|(command, _)| pick(command))
                .map(|(_, (calls, _))| *calls as f64)
                .sum::<f64>()
                / jobs.max(1.0)
        };
        println!(
            "{name}: Redis commands per job {:.1} (scripts' own calls included), of which {:.1} scripts",
            calls(&|_| true),
            calls(&|command| command == "evalsha"),
        );
        // The mock does the same work for both builds, so its CPU per job moves only with the
        // machine: each round's figures in units of it cancel most of the machine's drift.
        let relative = |value: &dyn Fn(&CpuPerJob) -> f64| {
            of(&|r| value(&r.cpu) / r.cpu.mock.max(f64::EPSILON))
        };
        println!(
            "{name}, medians in the mock's CPU per job of the same round: total {:.2}, api {:.2}, worker {:.2}, Redis {:.2}, RabbitMQ {:.2}",
            relative(&|cpu| cpu.total(Stack::Pictor)),
            relative(&|cpu| cpu.api),
            relative(&|cpu| cpu.worker),
            relative(&|cpu| cpu.redis),
            relative(&|cpu| cpu.rabbitmq),
        );
        println!(
            "{name} ({}), medians: {}",
            path.display(),
            describe(
                &cpu,
                of(&Round::succeeded_per_second),
                of(&|r| r.latencies.percentile_ms(99.0)),
                of(&|r| r.others_cores)
            )
        );
    }
    Ok(())
}

fn describe(cpu: &CpuPerJob, jobs_per_second: f64, p99_ms: f64, others: f64) -> String {
    format!(
        "{jobs_per_second:.0} jobs/s end to end, p99 {p99_ms:.2} ms, CPU {:.3} ms/job (api {:.0} µs, worker {:.3}, Redis {:.3}, RabbitMQ {:.3}, mock {:.3}); other load {others:.2} cores",
        cpu.total(Stack::Pictor),
        cpu.api * 1000.0,
        cpu.worker,
        cpu.redis,
        cpu.rabbitmq,
        cpu.mock,
    )
}

async fn pictor_round(
    binary: &Path,
    mock: &Mock,
    servers: &Servers,
    window: Duration,
    threads: usize,
) -> anyhow::Result<Round> {
    let env = [("PICTOR_THREADS", threads.to_string())];
    let deployment = Deployment::new(binary, &mock.base_url(), &env, Images::Tmpfs)?;
    let result = async {
        let api = start_api(&deployment, &[]).await?;
        let (worker, metrics) = start_worker(&deployment, CONCURRENCY, &[]).await?;
        let running = Running {
            stack: Stack::Pictor,
            url: deployment.api_url("/v1/jobs"),
            api: &api,
            worker: &worker,
            metrics,
        };
        let round = measure(&running, mock, servers, window).await;
        worker.stop(Duration::from_secs(15)).await;
        api.stop(Duration::from_secs(10)).await;
        round
    }
    .await;
    deployment.cleanup().await;
    result
}

async fn peer_round(
    install: &PeerInstall,
    mock: &Mock,
    servers: &Servers,
    window: Duration,
) -> anyhow::Result<Round> {
    let deployment = Peer::new(install, &mock.base_url())?;
    let result = async {
        let api = deployment.start_api().await?;
        let (worker, metrics) = deployment.start_worker(CONCURRENCY).await?;
        let running = Running {
            stack: Stack::Peer,
            url: deployment.api_url("/v1/jobs"),
            api: &api,
            worker: &worker,
            metrics,
        };
        let round = measure(&running, mock, servers, window).await;
        worker.stop(Duration::from_secs(15)).await;
        api.stop(Duration::from_secs(10)).await;
        round
    }
    .await;
    deployment.cleanup().await;
    result
}

/// One stack's api and worker, started.
struct Running<'a> {
    stack: Stack,
    /// `POST` here creates a job.
    url: String,
    api: &'a Process,
    worker: &'a Process,
    /// The worker's metrics page.
    metrics: String,
}

/// Warms the stack up, then posts jobs for `window` and waits for the backlog to drain,
/// reading every process' CPU and Redis' command counts around it.
async fn measure(
    running: &Running<'_>,
    mock: &Mock,
    servers: &Servers,
    window: Duration,
) -> anyhow::Result<Round> {
    let Running {
        stack,
        url,
        api,
        worker,
        metrics,
    } = running;
    let (stack, url, metrics) = (*stack, url.as_str(), metrics.as_str());
    let client = reqwest::Client::new();
    let finished = stack.finished_metric();
    let succeeded = |page: &str| metric_sum(page, finished, "outcome=\"succeeded\"");
    load::post_jobs(url, CLIENTS, WARM_UP).await;
    drain(&client, metrics, finished).await;

    let before = fetch_metrics(&client, metrics).await?;
    let commands_before = command_stats(&servers.redis_url).await.unwrap_or_default();
    let cpu_before = servers.snapshot(api, worker, mock);
    let started = Instant::now();
    let run = load::post_jobs(url, CLIENTS, window).await;
    let window_seconds = started.elapsed().as_secs_f64();
    let after = fetch_metrics(&client, metrics).await?;
    let api_after = api.cpu_seconds().unwrap_or(f64::NAN);
    drain(&client, metrics, finished).await;
    let cpu_after = servers.snapshot(api, worker, mock);
    let commands_after = command_stats(&servers.redis_url).await.unwrap_or_default();
    let drained = fetch_metrics(&client, metrics).await?;
    let seconds = started.elapsed().as_secs_f64();

    let jobs = succeeded(&drained) - succeeded(&before);
    anyhow::ensure!(jobs > 0.0, "no {} job succeeded", stack.name());
    let per_job = |delta: f64| delta * 1000.0 / jobs;
    let cpu = CpuPerJob {
        api: (api_after - cpu_before.api) * 1000.0 / run.ok.max(1) as f64,
        worker: per_job(cpu_after.worker - cpu_before.worker),
        redis: per_job(cpu_after.redis - cpu_before.redis),
        rabbitmq: per_job(cpu_after.rabbitmq - cpu_before.rabbitmq),
        mock: per_job(cpu_after.mock - cpu_before.mock),
    };
    let measured = [
        cpu_after.api - cpu_before.api,
        cpu_after.worker - cpu_before.worker,
        cpu_after.redis - cpu_before.redis,
        cpu_after.rabbitmq - cpu_before.rabbitmq,
        cpu_after.bench - cpu_before.bench,
    ]
    .iter()
    .filter(|value| value.is_finite())
    .sum::<f64>();
    let others = (cpu_after.machine - cpu_before.machine - measured).max(0.0);
    Ok(Round {
        stack,
        window_seconds,
        accepted: run.ok,
        failed_posts: run.failed,
        latencies: run.latencies,
        succeeded_in_window: succeeded(&after) - succeeded(&before),
        jobs,
        cpu,
        commands: command_delta(&commands_before, &commands_after),
        others_cores: others / seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_stats_are_read_from_info_and_subtracted() {
        let before = parse_command_stats(
            "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=100,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\ncmdstat_hset:calls=5,usec=5,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n",
        );
        let after = parse_command_stats(
            "# Commandstats\r\ncmdstat_evalsha:calls=30,usec=400,usec_per_call=13.33,rejected_calls=0,failed_calls=0\r\ncmdstat_hset:calls=5,usec=5,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\ncmdstat_xadd:calls=2,usec=8,usec_per_call=4.00,rejected_calls=0,failed_calls=0\r\n",
        );
        let delta = command_delta(&before, &after);
        assert_eq!(delta.get("evalsha"), Some(&(20, 300)));
        assert_eq!(delta.get("xadd"), Some(&(2, 8)));
        assert!(!delta.contains_key("hset"));
    }
}
