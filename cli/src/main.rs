//! `pictor`: one command line for every role. `pictor dev` runs the api and a worker in one
//! process for local use; `pictor api`, `pictor worker` and `pictor scheduler` run one role, like
//! the dedicated `pictor-api`, `pictor-worker` and `pictor-scheduler` binaries.

/// mimalloc in place of glibc's malloc: a job's many short-lived allocations (JSON, headers,
/// Redis replies) cost the worker and the api about a tenth of their CPU in glibc's free
/// lists (docs/benchmarks.md, "Cuts (issue 20)").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod purge;
mod reconcile;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shared::config::Settings;
use shared::domain::JobId;
use shared::images::ImageStore;
use shared::ledger::{BudgetPolicy, Month};
use shared::store::JobStore;

#[derive(Parser)]
#[command(
    name = "pictor",
    version,
    about = "Pictor: AI image jobs over RabbitMQ and Redis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP ingress.
    Api,
    /// Run a worker.
    Worker,
    /// Run the api, a worker and the scheduler in one process (local development and demos).
    Dev,
    /// Run the scheduler (reports, alerts, monthly export), or one of its jobs by hand
    /// (`pictor scheduler run daily-report --date YYYY-MM-DD --dry-run`).
    Scheduler(scheduler::cli::SchedulerArgs),
    /// Print the effective configuration's built-in defaults (commented TOML) and exit.
    DefaultConfig,
    /// Operator chores.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Look at or replay the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Maintain the cost ledger.
    Costs {
        #[command(subcommand)]
        command: CostsCommand,
    },
    /// Find the retired LangGraph service's checkpoint data in Redis (dry run by default) and
    /// delete it with `--execute`; Pictor's own keys are never touched.
    PurgeLanggraphCheckpoints(purge::PurgeArgs),
}

#[derive(Subcommand)]
enum CostsCommand {
    /// Recompute a month's cost aggregates from its ledger entries and swap them in atomically
    /// (for aggregates lost or damaged; budget holds and alert markers are left alone).
    Rebuild {
        /// The month, `YYYY-MM` (UTC).
        #[arg(long, value_parser = parse_month)]
        month: Month,
    },
    /// Compare the ledger's OpenAI spend per day and model with OpenAI's own bill (the
    /// organization Costs API; needs OPENAI_ADMIN_KEY). Exits 1 when a day differs by more than
    /// PICTOR_RECONCILE_TOLERANCE_PERCENT.
    Reconcile {
        /// The month, `YYYY-MM` (UTC).
        #[arg(long, value_parser = parse_month)]
        month: Month,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters without removing them.
    List {
        /// Read at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Put failed jobs whose messages were dead-lettered back in line. Dead letters whose job
    /// ended otherwise or expired are removed; unreadable ones and those of jobs still active
    /// stay.
    Replay {
        /// Read at most this many dead letters.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Replay only this job.
        #[arg(long, value_parser = parse_job_id)]
        job: Option<JobId>,
    },
}

fn parse_month(raw: &str) -> Result<Month, String> {
    Month::parse(raw).ok_or_else(|| format!("{raw:?} is not a month written YYYY-MM"))
}

fn parse_job_id(raw: &str) -> Result<JobId, String> {
    JobId::parse(raw).ok_or_else(|| format!("{raw:?} is not a job id"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::DefaultConfig = cli.command {
        print!("{}", shared::config::DEFAULT_TOML);
        return Ok(());
    }
    Settings::load()
        .context("cannot load settings")?
        .block_on(|settings| run(cli, settings))
        .context("cannot start the async runtime")?
}

async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    let service = match &cli.command {
        Command::Api => "api",
        Command::Worker => "worker",
        Command::Scheduler(_) => "scheduler",
        _ => "pictor",
    };
    let telemetry = shared::telemetry::init(service, &settings);
    if settings.telemetry.metrics {
        shared::telemetry::metrics::install();
    }
    match cli.command {
        Command::Api => {
            let app = api::Application::build(settings).await?;
            app.run_until_stopped(shared::shutdown_signal()).await?;
            telemetry.shutdown().await;
        }
        Command::Worker => {
            let worker = worker::Worker::build(settings).await?;
            worker.run_until_stopped(shared::shutdown_signal()).await;
            // The last jobs' traces are still queued: send them before leaving.
            telemetry.shutdown().await;
        }
        Command::Dev => {
            let app = api::Application::build(settings.clone()).await?;
            let worker = worker::Worker::build(settings.clone()).await?;
            // In `pictor dev` the outbox folder is the expected place for reports: no warning.
            let scheduler = scheduler::Scheduler::build(settings).await?.dev(true);
            let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
            let mut api_stop = stop.subscribe();
            let mut worker_stop = stop.subscribe();
            let mut scheduler_stop = stop.subscribe();
            let scheduler_task = tokio::spawn(scheduler.run_until_stopped(async move {
                let _ = scheduler_stop.recv().await;
            }));
            let api_task = tokio::spawn(app.run_until_stopped(async move {
                let _ = api_stop.recv().await;
            }));
            let worker_task = tokio::spawn(worker.run_until_stopped(async move {
                let _ = worker_stop.recv().await;
            }));
            shared::shutdown_signal().await;
            let _ = stop.send(());
            let (api_result, worker_result, scheduler_result) =
                tokio::join!(api_task, worker_task, scheduler_task);
            telemetry.shutdown().await;
            api_result.context("api task failed")??;
            worker_result.context("worker task failed")?;
            scheduler_result.context("scheduler task failed")?;
        }
        Command::Scheduler(args) => {
            let result = scheduler::cli::run(settings, args).await;
            telemetry.shutdown().await;
            result?;
        }
        Command::Admin {
            command: AdminCommand::Dlq { command },
        } => dlq(&settings, command).await?,
        Command::Admin {
            command: AdminCommand::Costs { command },
        } => costs(&settings, command).await?,
        Command::Admin {
            command: AdminCommand::PurgeLanggraphCheckpoints(args),
        } => purge::run(&settings, args).await?,
        Command::DefaultConfig => {}
    }
    Ok(())
}

async fn dlq(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { limit } => {
            let letters = cli::dlq::list(&settings.amqp, limit)
                .await
                .context("cannot read the dead-letter queue")?;
            if letters.is_empty() {
                println!("the dead-letter queue is empty");
            }
            for letter in &letters {
                let job = letter
                    .job_id
                    .map_or_else(|| "(unreadable)".to_string(), |id| id.to_string());
                print!(
                    "{job}  reason={}  deaths={}  queue={}",
                    letter.reason, letter.deaths, letter.queue
                );
                if letter.job_id.is_none() {
                    print!(
                        "  body={:?}",
                        letter.body.chars().take(80).collect::<String>()
                    );
                }
                println!();
            }
            if letters.len() == limit {
                println!("(showing the first {limit}; there may be more)");
            }
        }
        DlqCommand::Replay { limit, job } => {
            let store = JobStore::connect(&settings.redis, settings.jobs.ttl)
                .await
                .context("cannot connect to redis")?
                .with_image_retention(settings.images.retention);
            let images = ImageStore::open(&settings.images.store)
                .context("cannot open the image store (PICTOR_IMAGE_STORE)")?;
            let report = cli::dlq::replay(&settings.amqp, &store, &images, limit, job)
                .await
                .context("replay stopped")?;
            println!("replayed {} job(s)", report.replayed.len());
            for id in &report.replayed {
                println!("  {id}");
            }
            println!(
                "discarded {} dead letter(s) with nothing left to retry",
                report.discarded.len()
            );
            for discarded in &report.discarded {
                let status = discarded
                    .status
                    .map_or("gone from redis", |status| status.as_str());
                println!("  {}  {status}", discarded.job_id);
            }
            if !report.input_gone.is_empty() {
                println!(
                    "discarded {} dead letter(s) whose job's input image is no longer kept (the job stays failed; the user must submit it again)",
                    report.input_gone.len()
                );
                for id in &report.input_gone {
                    println!("  {id}");
                }
            }
            println!(
                "skipped {} dead letter(s), left in the queue: {} unreadable, {} of jobs still active",
                report.skipped(),
                report.undecodable,
                report.active.len()
            );
            for id in &report.active {
                println!("  {id}");
            }
            if let Some(id) = job {
                println!("left {} dead letter(s) of other jobs", report.left);
                if !report.replayed.contains(&id)
                    && !report.discarded.iter().any(|d| d.job_id == id)
                    && !report.input_gone.contains(&id)
                    && !report.active.contains(&id)
                {
                    println!(
                        "job {id} was not among the dead letters read (raise --limit to read more)"
                    );
                }
            }
        }
    }
    Ok(())
}

async fn costs(settings: &Settings, command: CostsCommand) -> anyhow::Result<()> {
    match command {
        CostsCommand::Rebuild { month } => {
            let store = JobStore::connect(&settings.redis, settings.jobs.ttl)
                .await
                .context("cannot connect to redis")?;
            let ledger = store.redis().ledger(BudgetPolicy::from(&settings.budget));
            let entries = ledger
                .rebuild(month)
                .await
                .with_context(|| format!("cannot rebuild the costs of {month}"))?;
            let total = ledger
                .spent(month)
                .await
                .context("cannot read the rebuilt total")?;
            println!("rebuilt the costs of {month} from {entries} ledger entries");
            println!(
                "total ${} ({total} micro-dollars)",
                shared::pricing::format_usd(total)
            );
        }
        CostsCommand::Reconcile { month } => {
            if reconcile::run(settings, month).await? {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
