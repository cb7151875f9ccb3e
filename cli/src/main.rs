//! `pictor`: one command line for every role. `pictor dev` runs the api and a worker in one
//! process for local use; `pictor api` and `pictor worker` run one role, like the dedicated
//! `pictor-api` and `pictor-worker` binaries.

use anyhow::Context;
use clap::{Parser, Subcommand};
use shared::config::Settings;

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
    /// Run the api and a worker in one process (local development and demos).
    Dev,
    /// Print the effective configuration's built-in defaults (commented TOML) and exit.
    DefaultConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::DefaultConfig = cli.command {
        print!("{}", shared::config::DEFAULT_TOML);
        return Ok(());
    }
    let settings = Settings::load().context("cannot load settings")?;
    shared::telemetry::init("pictor", settings.telemetry.log_format);
    match cli.command {
        Command::Api => {
            let app = api::Application::build(settings).await?;
            app.run_until_stopped(shared::shutdown_signal()).await?;
        }
        Command::Worker => {
            let worker = worker::Worker::build(settings).await?;
            worker.run_until_stopped(shared::shutdown_signal()).await;
        }
        Command::Dev => {
            let app = api::Application::build(settings.clone()).await?;
            let worker = worker::Worker::build(settings).await?;
            let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
            let mut api_stop = stop.subscribe();
            let mut worker_stop = stop.subscribe();
            let api_task = tokio::spawn(app.run_until_stopped(async move {
                let _ = api_stop.recv().await;
            }));
            let worker_task = tokio::spawn(worker.run_until_stopped(async move {
                let _ = worker_stop.recv().await;
            }));
            shared::shutdown_signal().await;
            let _ = stop.send(());
            let (api_result, worker_result) = tokio::join!(api_task, worker_task);
            api_result.context("api task failed")??;
            worker_result.context("worker task failed")?;
        }
        Command::DefaultConfig => {}
    }
    Ok(())
}
