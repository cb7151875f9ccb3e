//! `pictor-worker`: consumes jobs and runs agents.

/// mimalloc in place of glibc's malloc: a job's many short-lived allocations (JSON, headers,
/// Redis replies) cost the worker and the api about a tenth of their CPU in glibc's free
/// lists (docs/benchmarks.md, "Cuts (issue 20)").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use shared::config::Settings;

fn main() -> anyhow::Result<()> {
    Settings::load()
        .context("cannot load settings")?
        .block_on(run)
        .context("cannot start the async runtime")?
}

async fn run(settings: Settings) -> anyhow::Result<()> {
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
