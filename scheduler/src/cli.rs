//! The scheduler's command line, shared by `pictor-scheduler` and `pictor scheduler`: with no
//! subcommand it runs the scheduler; `run <job>` runs one job by hand (to resend a report, or
//! with `--dry-run` to see one without sending it).

use anyhow::Context as _;
use chrono::NaiveDate;
use clap::{Args, Parser, Subcommand};
use shared::config::Settings;
use shared::ledger::Month;

use crate::deliver::{Outcome, Report};
use crate::{Manual, Scheduler, Sending};

#[derive(Debug, Parser)]
#[command(
    name = "pictor-scheduler",
    version,
    about = "Pictor's scheduler: daily reports, budget and health alerts, monthly cost export"
)]
pub struct Cli {
    #[command(flatten)]
    pub args: SchedulerArgs,
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    #[command(subcommand)]
    pub command: Option<SchedulerCommand>,
}

#[derive(Debug, Subcommand)]
pub enum SchedulerCommand {
    /// Run one job now, by hand. It is sent even if it was sent before, and nothing is
    /// recorded, so the schedule goes on as if this run had not happened.
    Run {
        #[command(subcommand)]
        job: RunCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// The daily report of one UTC day.
    DailyReport {
        /// The day, `YYYY-MM-DD`.
        #[arg(long, value_parser = parse_date)]
        date: NaiveDate,
        /// Print the report (text and Slack blocks) instead of sending it.
        #[arg(long)]
        dry_run: bool,
    },
    /// The cost export of one month: written to the object store, emailed with the CSV
    /// attached and announced on Slack.
    MonthlyExport {
        /// The month, `YYYY-MM` (UTC).
        #[arg(long, value_parser = parse_month)]
        month: Month,
        /// Print the message instead of sending it (and write no file).
        #[arg(long)]
        dry_run: bool,
    },
    /// Check the budget now and send the budget alerts not sent yet this month.
    BudgetCheck {
        /// Print the alerts that would be sent, changing nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Evaluate the health alerts now and send what changed (firing, repeat, resolved).
    HealthCheck {
        /// Print what would be sent, changing nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_date(raw: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(raw.trim(), "%Y-%m-%d")
        .map_err(|_| format!("{raw:?} is not a date written YYYY-MM-DD"))
}

fn parse_month(raw: &str) -> Result<Month, String> {
    Month::parse(raw).ok_or_else(|| format!("{raw:?} is not a month written YYYY-MM"))
}

/// `pictor-scheduler`: loads the settings, sets up telemetry, and runs the command.
pub async fn main(args: SchedulerArgs) -> anyhow::Result<()> {
    let settings = Settings::load().context("cannot load settings")?;
    let telemetry = shared::telemetry::init("scheduler", &settings);
    if settings.telemetry.metrics {
        shared::telemetry::metrics::install();
    }
    let result = run(settings, args).await;
    telemetry.shutdown().await;
    result
}

/// Runs the command with settings already loaded (and telemetry set up by the caller).
pub async fn run(settings: Settings, args: SchedulerArgs) -> anyhow::Result<()> {
    let Some(SchedulerCommand::Run { job }) = args.command else {
        let scheduler = Scheduler::build(settings).await?;
        scheduler.run_until_stopped(shared::shutdown_signal()).await;
        return Ok(());
    };
    let (manual, dry_run) = match job {
        RunCommand::DailyReport { date, dry_run } => (Manual::DailyReport(date), dry_run),
        RunCommand::MonthlyExport { month, dry_run } => (Manual::MonthlyExport(month), dry_run),
        RunCommand::BudgetCheck { dry_run } => (Manual::BudgetCheck, dry_run),
        RunCommand::HealthCheck { dry_run } => (Manual::HealthCheck, dry_run),
    };
    let scheduler = Scheduler::build(settings).await?;
    let sent = scheduler.run_now(manual, dry_run).await?;
    if sent.is_empty() {
        println!("nothing to send");
    }
    let mut undelivered = 0;
    for sending in &sent {
        match &sending.report {
            None => print_message(sending),
            Some(report) => {
                println!("{}: {}", sending.message.subject, describe(report));
                if !report.delivered() {
                    undelivered += 1;
                }
            }
        }
    }
    if undelivered > 0 {
        anyhow::bail!("{undelivered} message(s) were not delivered (see above and the log)");
    }
    Ok(())
}

fn print_message(sending: &Sending) {
    let message = &sending.message;
    println!("Subject: {}\n", message.subject);
    println!("{}", message.text);
    println!("--- Slack blocks ---");
    println!(
        "{}",
        serde_json::to_string_pretty(&message.slack_blocks).unwrap_or_default()
    );
    for attachment in &message.attachments {
        println!(
            "--- attachment: {} ({}, {} bytes) ---",
            attachment.filename,
            attachment.content_type,
            attachment.bytes.len()
        );
    }
    println!();
}

fn describe(report: &Report) -> String {
    [
        ("email", &report.email),
        ("slack", &report.slack),
        ("outbox", &report.outbox),
    ]
    .into_iter()
    .filter_map(|(channel, outcome)| match outcome {
        Outcome::Sent => Some(format!("{channel} sent")),
        Outcome::NotConfigured => None,
        Outcome::Failed { permanent, error } => Some(format!(
            "{channel} failed{} ({error})",
            if *permanent { " for good" } else { "" }
        )),
    })
    .collect::<Vec<_>>()
    .join(", ")
}
