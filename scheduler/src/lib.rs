//! Pictor's scheduler: the daily usage, cost and performance report, budget and health alerts,
//! and the monthly CSV export, delivered by email and Slack (or to a local outbox).
//!
//! Every replica ticks (every 15 s by default) and, for each job, asks [`Schedule::due`] which
//! periods are due given the latest one done; each due run is elected to exactly one replica
//! through Redis (`state`), runs, and is recorded as done before the next one starts. Time comes
//! from an injectable [`Clock`], so tests drive the scheduler through report times, downtime and
//! month ends without waiting. The library holds everything; `main.rs` and `pictor scheduler`
//! only parse the command line ([`cli`]).

pub mod alerts;
mod budget;
pub mod cli;
pub mod clock;
mod daily;
pub mod deliver;
mod export;
mod health;
mod metrics;
pub mod ready;
mod render;
pub mod schedule;
mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, NaiveDate, Utc};
use shared::config::{AlertsVia, SchedulerSettings, Settings};
use shared::delivery::DeliveryStatus;
use shared::fair::Fairness;
use shared::images::ImageStore;
use shared::ledger::{BudgetPolicy, Ledger, Month};
use shared::queue::{QueueInspector, Topology};
use shared::reconcile::OpenAiCosts;
use shared::stats::Stats;
use shared::store::JobStore;
use tokio::sync::watch;
use tracing::Instrument;

pub use crate::clock::{Clock, ManualClock, SystemClock};
use crate::deliver::{Delivery, Message, Outcome, Report};
pub use crate::schedule::{Job, Period, Schedule};
use crate::state::{Claim, Lease, SchedulerState};

/// How often a replica looks for due runs unless told otherwise.
pub const DEFAULT_TICK_INTERVAL: Duration = Duration::from_secs(15);

/// How long the alerts wait for RabbitMQ's answer about a queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `pictor-scheduler` command line.
pub fn cli_main() -> anyhow::Result<()> {
    let cli = <cli::Cli as clap::Parser>::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(cli::main(cli.args))
}

/// A scheduler replica, ready to tick.
pub struct Scheduler {
    context: Arc<Context>,
    tick_interval: Duration,
    metrics_addr: Option<SocketAddr>,
    /// Inside `pictor dev`, where an outbox is the expected place for reports.
    dev: bool,
    silent_warning: ready::SilentWarning,
}

/// What every job needs.
pub(crate) struct Context {
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) schedule: Schedule,
    pub(crate) settings: SchedulerSettings,
    /// Where exports go (`images.store`), named in the export's message.
    pub(crate) exports_location: String,
    pub(crate) policy: BudgetPolicy,
    pub(crate) state: SchedulerState,
    pub(crate) stats: Stats,
    pub(crate) ledger: Ledger,
    pub(crate) exports: ImageStore,
    pub(crate) delivery: Delivery,
    /// OpenAI's Costs API, when an admin key is configured, for the reconciliation.
    pub(crate) openai_costs: Option<OpenAiCosts>,
    pub(crate) tolerance_percent: f64,
    /// The queues' names, and a passive reader of their messages and consumers (alerts).
    pub(crate) topology: Topology,
    pub(crate) queues: QueueInspector,
    /// The fair backlog, whose `pending` is the backlog alert's figure.
    pub(crate) fair: Fairness,
}

/// A run completed and recorded by a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    pub job: Job,
    /// The period's key (`2026-11-05`, `2026-11`, `2026-11-05T08:01`).
    pub period: String,
}

/// A job to run by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manual {
    DailyReport(NaiveDate),
    MonthlyExport(Month),
    BudgetCheck,
    HealthCheck,
}

/// A message a run produced, and how each channel took it (`None` in a dry run).
#[derive(Debug, Clone)]
pub struct Sending {
    pub message: Message,
    pub report: Option<Report>,
}

/// How a run ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunOutcome {
    /// Record it as done.
    Complete,
    /// Nothing was delivered for a reason that may pass: leave it for a later tick.
    RetryLater,
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// At least one channel took it.
    Delivered,
    /// No channel took it and none will: every failure was permanent. Logged and counted.
    GaveUp,
    /// No channel took it, and at least one failure may pass.
    Retry,
    /// Not sent: it had been sent before (budget alerts).
    Skipped,
}

/// Sends a run's messages, or in a dry run only collects them.
pub(crate) struct Dispatcher<'a> {
    delivery: Option<&'a Delivery>,
    sent: Mutex<Vec<Sending>>,
}

impl<'a> Dispatcher<'a> {
    fn new(delivery: Option<&'a Delivery>) -> Self {
        Self {
            delivery,
            sent: Mutex::new(Vec::new()),
        }
    }

    /// A dry run sends nothing and changes no alert state.
    pub(crate) fn dry_run(&self) -> bool {
        self.delivery.is_none()
    }

    pub(crate) async fn send(&self, message: Message) -> Sent {
        let (report, sent) = match self.delivery {
            None => (None, Sent::Delivered),
            Some(delivery) => {
                let report = delivery.send(&message).await;
                let sent = classify(&report);
                match sent {
                    Sent::Delivered => {
                        tracing::info!(subject = %message.subject, "Message delivered");
                    }
                    Sent::GaveUp => tracing::error!(
                        subject = %message.subject,
                        "Message not delivered: every channel refused it for good"
                    ),
                    Sent::Retry | Sent::Skipped => tracing::warn!(
                        subject = %message.subject,
                        "Message not delivered yet: a channel failed for a reason that may pass"
                    ),
                }
                (Some(report), sent)
            }
        };
        self.sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Sending { message, report });
        sent
    }

    fn into_sent(self) -> Vec<Sending> {
        self.sent
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn classify(report: &Report) -> Sent {
    if report.delivered() {
        return Sent::Delivered;
    }
    let transient = [&report.email, &report.slack, &report.outbox]
        .into_iter()
        .any(|outcome| {
            matches!(
                outcome,
                Outcome::Failed {
                    permanent: false,
                    ..
                }
            )
        });
    if transient { Sent::Retry } else { Sent::GaveUp }
}

impl Scheduler {
    /// A scheduler on the real clock, delivering as the settings say.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let delivery = Delivery::from_settings(&settings.scheduler)?;
        Self::build_with(settings, Arc::new(SystemClock), delivery).await
    }

    /// A scheduler on `clock`, delivering through `delivery` (tests use a manual clock and fast
    /// retries).
    pub async fn build_with(
        settings: Settings,
        clock: Arc<dyn Clock>,
        delivery: Delivery,
    ) -> anyhow::Result<Self> {
        let schedule = Schedule::from_settings(&settings.scheduler)?;
        let store = JobStore::connect(&settings.redis, settings.jobs.ttl)
            .await
            .context("cannot connect to redis (PICTOR_REDIS_URL)")?;
        let exports = ImageStore::open(&settings.images.store)
            .context("cannot open the object store for exports (PICTOR_IMAGE_STORE)")?;
        metrics::describe();
        shared::sentinel::describe();
        let redis = store.redis();
        let policy = BudgetPolicy::from(&settings.budget);
        let context = Context {
            clock,
            schedule,
            exports_location: settings.images.store.clone(),
            state: SchedulerState::new(redis.connection(), redis.keys().clone()),
            stats: redis.stats(),
            ledger: redis.ledger(policy.clone()),
            policy,
            exports,
            delivery,
            settings: settings.scheduler.clone(),
            openai_costs: match &settings.openai.admin_key {
                Some(key) => Some(
                    OpenAiCosts::new(&settings.openai.base_url, key.clone())
                        .context("cannot build the OpenAI Costs API client")?,
                ),
                None => None,
            },
            tolerance_percent: settings.reconcile.tolerance_percent,
            topology: Topology::new(&settings.amqp),
            queues: QueueInspector::new(settings.amqp.clone(), QUEUE_TIMEOUT),
            fair: redis.fairness(settings.backlog.fair_policy()),
        };
        Ok(Self {
            context: Arc::new(context),
            tick_interval: DEFAULT_TICK_INTERVAL,
            metrics_addr: settings.scheduler.metrics_addr,
            dev: false,
            silent_warning: ready::SilentWarning::default(),
        })
    }

    /// Marks this replica as running inside `pictor dev`, where reports in the outbox folder are
    /// expected: no warning, and the dashboard shows no banner.
    pub fn dev(mut self, dev: bool) -> Self {
        self.dev = dev;
        self
    }

    /// The channels this replica delivers through.
    pub fn channels(&self) -> ready::Channels {
        let (email, slack) = self.context.delivery.channels();
        ready::Channels {
            email,
            slack,
            dev: self.dev,
        }
    }

    pub fn with_tick_interval(mut self, interval: Duration) -> Self {
        self.tick_interval = interval;
        self
    }

    /// Serve `/metrics` and `/healthz` on `addr` (`None`: not at all) while running.
    pub fn with_metrics_addr(mut self, addr: Option<SocketAddr>) -> Self {
        self.metrics_addr = addr;
        self
    }

    pub fn schedule(&self) -> &Schedule {
        &self.context.schedule
    }

    /// Ticks until `shutdown` resolves. A run in progress when it does is finished first, so
    /// that it is recorded and its lock freed.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (sender, mut stopped) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = sender.send(true);
        });
        let channels = self.channels();
        if self.context.settings.alerts_via == AlertsVia::Alertmanager {
            tracing::info!(
                "Alerts of infra/prometheus/alerts.yml are left to Prometheus and Alertmanager \
                 (PICTOR_ALERTS_VIA=alertmanager); this scheduler sends reports, the export and \
                 the budget alerts no rule has"
            );
        }
        if let Some(addr) = self.metrics_addr {
            let stop = stopped.clone();
            tokio::spawn(async move {
                if let Err(error) = ready::serve(addr, channels, stop).await {
                    tracing::error!(%error, %addr, "Cannot serve scheduler metrics (PICTOR_SCHEDULER_METRICS_ADDR)");
                }
            });
        }
        let schedule = &self.context.schedule;
        tracing::info!(
            report_time = %schedule.report_time.format("%H:%M"),
            export_time = %schedule.export_time.format("%H:%M"),
            zone = %schedule.zone,
            tick_ms = self.tick_interval.as_millis(),
            "Scheduler started"
        );
        loop {
            self.tick().await;
            tokio::select! {
                () = tokio::time::sleep(self.tick_interval) => {}
                _ = stopped.wait_for(|stop| *stop) => break,
            }
        }
        self.context.queues.close().await;
        tracing::info!("Scheduler stopped");
    }

    /// Runs every job's due periods once: the jobs side by side, each job's periods oldest
    /// first. Returns the runs completed and recorded, in job order.
    pub async fn tick(&self) -> Vec<Ran> {
        self.observe().await;
        let [daily, monthly, budget, health] = Job::ALL;
        let alertmanager = self.context.settings.alerts_via == AlertsVia::Alertmanager;
        let (daily, monthly, budget, health) = tokio::join!(
            self.tick_job(daily),
            self.tick_job(monthly),
            self.tick_job(budget),
            async {
                if alertmanager {
                    // Prometheus evaluates these rules and Alertmanager delivers them.
                    Vec::new()
                } else {
                    self.tick_job(health).await
                }
            },
        );
        [daily, monthly, budget, health].concat()
    }

    /// What every replica says at every tick: where it delivers (the dashboard's status in
    /// Redis, a gauge, and a warning every hour while nobody is told), and how late the
    /// scheduled jobs are (a gauge, for `PictorSchedulerMissedRun`).
    async fn observe(&self) {
        let context = &self.context;
        let now = context.clock.now();
        let channels = self.channels();
        metrics::delivery_channels(channels.count());
        if channels.silent() && self.silent_warning.due(now) {
            tracing::warn!(
                outbox_dir = %context.settings.outbox_dir.display(),
                "{}",
                ready::SETTINGS_HINT
            );
        }
        let status = DeliveryStatus {
            email: channels.email,
            slack: channels.slack,
            dev: channels.dev,
            at: now,
        };
        if let Err(error) = context
            .state
            .publish_delivery(&status, DeliveryStatus::ttl(self.tick_interval))
            .await
        {
            tracing::warn!(%error, "Cannot publish the scheduler's delivery status");
        }
        for job in alerts::WATCHED_JOBS {
            if let Ok(overdue) = alerts::overdue(context, job, now).await {
                let seconds = overdue.map_or(0.0, |(_, due)| (now - due).num_seconds() as f64);
                metrics::run_overdue(job, seconds.max(0.0));
            }
        }
    }

    async fn tick_job(&self, job: Job) -> Vec<Ran> {
        let context = &self.context;
        let now = context.clock.now();
        let last = match context.state.last_done(job).await {
            Ok(last) => last,
            Err(error) => {
                tracing::warn!(%error, job = job.as_str(), "Cannot read the scheduler's state; trying again on the next tick");
                return Vec::new();
            }
        };
        let mut ran = Vec::new();
        for period in context.schedule.due(job, now, last.as_deref()) {
            let lease = match context.state.begin(job, &period).await {
                Ok(Claim::Won(lease)) => lease,
                Ok(Claim::Done) => continue,
                // Another replica runs it; later periods wait until it is done.
                Ok(Claim::Busy) => break,
                Err(error) => {
                    tracing::warn!(%error, job = job.as_str(), %period, "Cannot take the run's lock; trying again on the next tick");
                    break;
                }
            };
            let span = tracing::info_span!("scheduled_run", job = job.as_str(), period = %period, token = lease.token);
            let recorded = self.run_elected(&lease, period, now).instrument(span).await;
            if !recorded {
                break;
            }
            ran.push(Ran {
                job,
                period: lease.period.clone(),
            });
        }
        ran
    }

    /// Runs a period this replica was elected for and records it; true once it is recorded
    /// done, false when it is left for a later tick (or lost to another replica).
    async fn run_elected(&self, lease: &Lease, period: Period, now: DateTime<Utc>) -> bool {
        let context = &self.context;
        let job = lease.job;
        let dispatcher = Dispatcher::new(Some(&context.delivery));
        let outcome = self.run_period(job, period, now, &dispatcher).await;
        match outcome {
            Ok(RunOutcome::Complete) => match context.state.finish(lease).await {
                Ok(true) => {
                    tracing::info!("Scheduled run done");
                    metrics::run(job, "done");
                    true
                }
                Ok(false) => {
                    tracing::warn!(
                        "Scheduled run finished after its lock expired; another replica may have run it too"
                    );
                    metrics::run(job, "lost_lock");
                    false
                }
                Err(error) => {
                    tracing::error!(%error, "Scheduled run finished but cannot be recorded as done");
                    false
                }
            },
            Ok(RunOutcome::RetryLater) | Err(_) => {
                match &outcome {
                    Err(error) => tracing::error!(
                        error = %format!("{error:#}"),
                        "Scheduled run failed; trying again on a later tick"
                    ),
                    _ => tracing::warn!(
                        "Scheduled run delivered nothing; trying again on a later tick"
                    ),
                }
                metrics::run(job, "retry");
                if let Err(error) = context.state.release(lease).await {
                    tracing::warn!(%error, "Cannot free the run's lock; it expires on its own");
                }
                false
            }
        }
    }

    /// Runs one job by hand, whatever the schedule and the done markers say, and records
    /// nothing. A dry run sends nothing, changes no alert state, and returns the messages.
    pub async fn run_now(&self, manual: Manual, dry_run: bool) -> anyhow::Result<Vec<Sending>> {
        let now = self.context.clock.now();
        let (job, period) = match manual {
            Manual::DailyReport(date) => (Job::DailyReport, Period::Day(date)),
            Manual::MonthlyExport(month) => (Job::MonthlyExport, Period::Month(month)),
            Manual::BudgetCheck => (Job::BudgetAlerts, Period::Minute(now)),
            Manual::HealthCheck => (Job::HealthAlerts, Period::Minute(now)),
        };
        let dispatcher = Dispatcher::new((!dry_run).then_some(&self.context.delivery));
        self.run_period(job, period, now, &dispatcher).await?;
        Ok(dispatcher.into_sent())
    }

    async fn run_period(
        &self,
        job: Job,
        period: Period,
        now: DateTime<Utc>,
        out: &Dispatcher<'_>,
    ) -> anyhow::Result<RunOutcome> {
        let context = &self.context;
        match (job, period) {
            (Job::DailyReport, Period::Day(date)) => {
                let mut inputs = daily::load(&context.stats, &context.ledger, date).await?;
                inputs.openai_bill =
                    daily::load_openai_bill(context.openai_costs.as_ref(), date).await;
                inputs.tolerance_percent = context.tolerance_percent;
                let report = daily::DailyReport::compute(date, &inputs, &context.policy);
                let message = report.doc().into_message(report.subject(), Vec::new());
                Ok(outcome_of(out.send(message).await))
            }
            (Job::MonthlyExport, Period::Month(month)) => {
                let export = export::Export::build(&context.ledger, month).await?;
                if !out.dry_run() {
                    export
                        .store(&context.exports)
                        .await
                        .context("cannot write the export to the object store")?;
                }
                let location = format!(
                    "{} in {}",
                    export::Export::object_path(month),
                    context.exports_location
                );
                Ok(outcome_of(out.send(export.message(&location)).await))
            }
            (Job::BudgetAlerts, Period::Minute(_)) => budget::run(context, now, out).await,
            (Job::HealthAlerts, Period::Minute(_)) => health::run(context, now, out).await,
            (job, period) => Err(anyhow::anyhow!("{job} has no period like {period}")),
        }
    }
}

fn outcome_of(sent: Sent) -> RunOutcome {
    match sent {
        Sent::Retry => RunOutcome::RetryLater,
        Sent::Delivered | Sent::GaveUp | Sent::Skipped => RunOutcome::Complete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(email: Outcome, slack: Outcome) -> Report {
        Report {
            email,
            slack,
            outbox: Outcome::NotConfigured,
        }
    }

    fn failed(permanent: bool) -> Outcome {
        Outcome::Failed {
            permanent,
            error: "boom".into(),
        }
    }

    #[test]
    fn a_message_is_retried_only_when_no_channel_took_it_and_one_may_still() {
        assert_eq!(
            classify(&report(Outcome::Sent, failed(false))),
            Sent::Delivered
        );
        assert_eq!(classify(&report(failed(true), failed(false))), Sent::Retry);
        assert_eq!(classify(&report(failed(true), failed(true))), Sent::GaveUp);
        assert_eq!(
            classify(&report(failed(true), Outcome::NotConfigured)),
            Sent::GaveUp
        );
    }
}
