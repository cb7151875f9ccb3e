//! `pictor-bench`: Pictor's benchmark suite. Runs the real `pictor` binary (release build)
//! against the local Redis and RabbitMQ and a local mock provider, prints a table per scenario
//! and rewrites the generated part of `docs/benchmarks.md`.
//!
//! ```sh
//! cargo run --release -p bench            # everything (about 20 minutes on 2 cores)
//! cargo run --release -p bench -- --quick # a smoke run with small numbers
//! cargo run --release -p bench -- --only ingress,idle --no-write
//! ```
//!
//! Each scenario measures its own reference in the same run (the broker's raw limits, the
//! provider's ceiling, telemetry off), so the ratios hold on a noisy machine. It asserts
//! nothing: targets are compared and reported, not enforced.

mod fairness;
mod fleet;
mod load;
mod mock;
mod peer;
mod report;
mod scenarios;
mod versus;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use scenarios::{Scale, Telemetry};

#[derive(Debug, Parser)]
#[command(name = "pictor-bench", about = "Pictor's benchmark suite")]
struct Args {
    /// Scenarios to run, comma separated: ingress, fleet, pipeline, e2e, telemetry, idle, peer
    /// (Pictor beside a Fastify + BullMQ peer, its own section), and fairness (not by default:
    /// it takes minutes and writes its own section).
    #[arg(long, value_delimiter = ',', default_values_t = ["ingress", "fleet", "pipeline", "e2e", "telemetry", "idle", "peer"].map(String::from))]
    only: Vec<String>,
    /// Small numbers, for a smoke run (not for publishing).
    #[arg(long)]
    quick: bool,
    /// Do not rewrite docs/benchmarks.md.
    #[arg(long)]
    no_write: bool,
    /// Another `pictor` build to run scenario 8's work against instead of the peer (the
    /// before of a cut): prints both builds' rounds and medians, writes nothing.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// The `pictor` binary to measure (default: build and use target/release/pictor).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Concurrent HTTP clients (and raw publishers) of scenario 1.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds of each timed window of scenarios 1, 4, 5 and 8 (default: 10, or 3 with
    /// --quick; scenario 8: 20, or 5 with --quick).
    #[arg(long)]
    window: Option<u64>,
    /// Runtime threads of each Pictor process in scenario 8 and `--baseline` runs
    /// (`PICTOR_THREADS`; 0: one per CPU, the shipped default). 1 unless told: each of the
    /// peer's Node processes runs one event loop, and one thread per process is what
    /// docs/scaling.md advises where Pictor's processes share few cores with Redis and RabbitMQ.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Worker concurrencies of scenario 2.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 256, 1024])]
    concurrency: Vec<usize>,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Builds `pictor` in release mode (a no-op when it is up to date) and answers its path.
fn release_binary() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["build", "--release", "-p", "cli", "--bin", "pictor"])
        .current_dir(&root)
        .status()
        .context("cannot run cargo to build pictor")?;
    anyhow::ensure!(status.success(), "building pictor failed");
    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), PathBuf::from);
    Ok(target.join("release").join("pictor"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => release_binary()?,
    };
    if let Some(baseline) = &args.baseline {
        let window = Duration::from_secs(args.window.unwrap_or(if args.quick { 5 } else { 20 }));
        println!(
            "\nscenario 8's work, this build against {} ({} s windows)…",
            baseline.display(),
            window.as_secs()
        );
        return versus::builds(
            &binary,
            baseline,
            window,
            if args.quick { 1 } else { 3 },
            args.threads,
        )
        .await;
    }

    let scale = if args.quick {
        Scale::quick()
    } else {
        Scale::full()
    };
    let scale = match args.window {
        Some(seconds) => Scale {
            window: Duration::from_secs(seconds),
            ..scale
        },
        None => scale,
    };
    let wants = |name: &str| args.only.iter().any(|only| only == name);
    // The logs of the previous run go; this run's are kept for a look afterwards.
    let _ = std::fs::remove_dir_all(workspace_root().join("target").join("bench-logs"));
    let machine = report::Machine::read().await;
    println!("{}", machine.describe());
    let mut report = report::Report::new(machine, scale, args.quick);

    if wants("ingress") {
        println!("\n1. ingress throughput ({} clients)…", args.clients);
        let ingress = scenarios::ingress(&binary, scale, args.clients, Telemetry::Default).await?;
        report.ingress(&ingress);
    }
    if wants("fleet") {
        for concurrency in &args.concurrency {
            println!("\n2. I/O-bound fleet at concurrency {concurrency}…");
            let row = scenarios::fleet(&binary, scale, *concurrency).await?;
            report.fleet(&row);
        }
    }
    if wants("pipeline") {
        println!("\n3. pipeline overhead…");
        let pipeline = scenarios::pipeline(&binary, scale, Telemetry::Default).await?;
        report.pipeline(&pipeline);
    }
    if wants("e2e") {
        println!("\n4. end-to-end throughput…");
        let e2e = scenarios::end_to_end(&binary, scale).await?;
        report.end_to_end(&e2e);
    }
    if wants("telemetry") {
        println!("\n5. telemetry overhead…");
        let mut runs = Vec::new();
        // Interleaved so that drift of the machine hits both modes alike; the report takes the
        // median round of each mode, so one hiccup does not decide the result.
        for _ in 0..scale.rounds {
            for mode in [Telemetry::Off, Telemetry::On] {
                let ingress = scenarios::ingress(&binary, scale, args.clients, mode).await?;
                let pipeline = scenarios::pipeline(&binary, scale, mode).await?;
                runs.push((mode, ingress, pipeline));
            }
        }
        report.telemetry(&runs);
    }
    if wants("idle") {
        println!("\n6. memory at rest…");
        let idle = scenarios::idle(&binary).await?;
        report.idle(&idle);
    }

    if wants("peer") {
        let window = Duration::from_secs(args.window.unwrap_or(if args.quick { 5 } else { 20 }));
        println!(
            "\n8. against a Fastify + BullMQ peer ({} s windows)…",
            window.as_secs()
        );
        let comparison = versus::versus(&binary, window, scale.rounds, args.threads).await?;
        let section = report.versus(&comparison);
        if !args.no_write && !args.quick {
            let path = workspace_root().join("docs").join("benchmarks.md");
            report::write_versus(&path, &section)?;
        }
    }

    if wants("fairness") {
        println!("\n7. the fair backlog at scale…");
        let fairness = fairness::fairness(&binary, 1).await?;
        println!("{}", report::fairness_markdown(&fairness));
        if !args.no_write && !args.quick {
            let path = workspace_root().join("docs").join("benchmarks.md");
            report::write_fairness(&path, &report::Machine::read().await, &fairness)?;
        }
    }

    println!("\n{}", report.summary());
    if !args.no_write && !args.quick && !report.is_empty() {
        let path = workspace_root().join("docs").join("benchmarks.md");
        report::write_into(&path, &report.markdown())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
