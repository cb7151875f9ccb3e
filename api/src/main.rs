//! `pictor-api`: the HTTP ingress alone.

use anyhow::Context;
use shared::config::Settings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().context("cannot load settings")?;
    let telemetry = shared::telemetry::init("api", &settings);
    if settings.telemetry.metrics {
        shared::telemetry::metrics::install();
    }
    let app = api::Application::build(settings).await?;
    app.run_until_stopped(shared::shutdown_signal()).await?;
    telemetry.shutdown().await;
    Ok(())
}
