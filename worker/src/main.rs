//! `pictor-worker`: consumes jobs and runs agents.

use anyhow::Context;
use shared::config::Settings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().context("cannot load settings")?;
    let telemetry = shared::telemetry::init("worker", &settings);
    if settings.telemetry.metrics {
        shared::telemetry::metrics::install();
    }
    let worker = worker::Worker::build(settings).await?;
    worker.run_until_stopped(shared::shutdown_signal()).await;
    // The last jobs' traces are still queued: send them before leaving.
    telemetry.shutdown().await;
    Ok(())
}
