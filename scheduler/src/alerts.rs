//! Every alert Pictor defines, in one table that both the scheduler and
//! `infra/prometheus/alerts.yml` follow, and the alerts the scheduler evaluates besides the
//! health figures (`health`) and the budget (`budget`): no consumer on the jobs queue, a growing
//! backlog, dead letters, a provider in cooldown, and a scheduled run missed.
//!
//! [`RULES`] holds each alert's threshold, `for` (how long its condition must hold before it
//! fires), severity and runbook. An end-to-end test (`tests/tests/e2e/alerts.rs`,
//! `the_prometheus_rules_match_the_scheduler_table`) parses `alerts.yml` and fails when a rule
//! disagrees with this table (or a threshold the scheduler reads from a setting has another
//! default), so the two cannot drift: change both together.
//!
//! Each minute (with the health check, elected to one replica) every check reads the same fact
//! the Prometheus rule reads: the queues by a passive declare (`shared::queue::QueueInspector`),
//! the fair backlog's `pending` (what workers export as `pictor_jobs_pending`), the circuit
//! breakers' keys (what `pictor_provider_cooldown` shows), and the scheduler's own done markers
//! (`pictor_scheduler_run_overdue_seconds`). A condition that holds becomes pending; when it has
//! held for the rule's `for` without a gap, the alert fires; it repeats every
//! `alert_repeat_minutes` while it holds and resolves when it stops holding. The state and each
//! change are decided in one Redis script (`SchedulerState::health_transition`), so two replicas
//! announce each change once.
//!
//! **RabbitMQ unreachable.** The scheduler cannot see the queues then, and neither, most likely,
//! can the workers: the no-consumers alert counts an unreachable broker as its condition, and its
//! message names the broker's error instead of figures. The dead-letter alert keeps its state
//! (neither fires nor resolves on facts it cannot read).

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::budget::runbook_url;
use crate::deliver::Message;
use crate::render::{Block, Doc};
use crate::schedule::{Job, Period};
use crate::state::HealthTransition;
use crate::{Context, Dispatcher};

/// How urgent an alert is: `page` wakes someone up, `ticket` is work for office hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Page,
    Ticket,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Page => "page",
            Self::Ticket => "ticket",
        }
    }
}

/// One alert as both the scheduler and Prometheus define it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    /// The Prometheus alert.
    pub name: &'static str,
    /// Its runbook, `docs/runbooks/{runbook}.md`; also the scheduler's name for it.
    pub runbook: &'static str,
    pub severity: Severity,
    /// How long the condition must hold before the alert fires (Prometheus `for:`).
    pub hold: Duration,
    /// The comparison of the rule's expression with its threshold (`>`, `>=`, `==`).
    pub comparison: &'static str,
    pub threshold: f64,
    /// How the scheduler covers it.
    pub scheduler: Coverage,
}

/// How the scheduler covers an alert of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Evaluated with this table's threshold and `for`.
    Evaluated,
    /// Evaluated with a threshold from the named setting, whose default is this table's, over a
    /// window of `health_window_minutes` (default: this table's `for`) judged at once.
    Setting(&'static str),
    /// The budget alerts: thresholds from `budget.thresholds` (default 80 and 100), announced
    /// once a month when crossed.
    Budget,
    /// Not by itself: it is about the scheduler being unable to tell anyone (`/readyz` and a
    /// log warning cover it there).
    PrometheusOnly,
}

const fn minutes(minutes: u64) -> Duration {
    Duration::from_secs(minutes * 60)
}

pub const ERROR_RATE: Rule = Rule {
    name: "PictorAgentErrorRateHigh",
    runbook: "agent-error-rate-high",
    severity: Severity::Page,
    hold: minutes(10),
    comparison: ">",
    threshold: 0.05,
    scheduler: Coverage::Setting("error_rate_threshold"),
};

pub const RESPONSE_TIME: Rule = Rule {
    name: "PictorResponseTimeHigh",
    runbook: "response-time-high",
    severity: Severity::Page,
    hold: minutes(10),
    comparison: ">",
    threshold: 20.0,
    scheduler: Coverage::Setting("latency_p95_threshold_secs"),
};

pub const BACKLOG_GROWING: Rule = Rule {
    name: "PictorQueueBacklogGrowing",
    runbook: "queue-backlog-growing",
    severity: Severity::Ticket,
    hold: minutes(15),
    comparison: ">",
    threshold: 100.0,
    scheduler: Coverage::Evaluated,
};

pub const NO_CONSUMERS: Rule = Rule {
    name: "PictorNoConsumers",
    runbook: "no-consumers",
    severity: Severity::Page,
    hold: minutes(5),
    comparison: "==",
    threshold: 0.0,
    scheduler: Coverage::Evaluated,
};

pub const PROVIDER_COOLDOWN: Rule = Rule {
    name: "PictorProviderInCooldown",
    runbook: "provider-in-cooldown",
    severity: Severity::Ticket,
    hold: minutes(5),
    comparison: "==",
    threshold: 1.0,
    scheduler: Coverage::Evaluated,
};

pub const BUDGET_80: Rule = Rule {
    name: "PictorBudget80Percent",
    runbook: "budget-80-percent",
    severity: Severity::Ticket,
    hold: Duration::ZERO,
    comparison: ">=",
    threshold: 0.8,
    scheduler: Coverage::Budget,
};

pub const BUDGET_EXHAUSTED: Rule = Rule {
    name: "PictorBudgetExhausted",
    runbook: "budget-exhausted",
    severity: Severity::Page,
    hold: Duration::ZERO,
    comparison: ">=",
    threshold: 1.0,
    scheduler: Coverage::Budget,
};

pub const DEAD_LETTERS: Rule = Rule {
    name: "PictorDeadLetters",
    runbook: "dead-letters",
    severity: Severity::Ticket,
    hold: minutes(5),
    comparison: ">",
    threshold: 0.0,
    scheduler: Coverage::Evaluated,
};

/// A daily report or monthly export still not done this many seconds after it was due.
pub const MISSED_RUN: Rule = Rule {
    name: "PictorSchedulerMissedRun",
    runbook: "scheduler-missed-run",
    severity: Severity::Ticket,
    hold: minutes(5),
    comparison: ">",
    threshold: 3600.0,
    scheduler: Coverage::Evaluated,
};

pub const NO_DELIVERY_CHANNEL: Rule = Rule {
    name: "PictorNoDeliveryChannel",
    runbook: "no-delivery-channel",
    severity: Severity::Ticket,
    hold: minutes(15),
    comparison: "==",
    threshold: 0.0,
    scheduler: Coverage::PrometheusOnly,
};

/// Every alert, in the order of `alerts.yml`.
pub const RULES: [Rule; 10] = [
    ERROR_RATE,
    RESPONSE_TIME,
    BACKLOG_GROWING,
    NO_CONSUMERS,
    PROVIDER_COOLDOWN,
    BUDGET_80,
    BUDGET_EXHAUSTED,
    DEAD_LETTERS,
    MISSED_RUN,
    NO_DELIVERY_CHANNEL,
];

/// Whether a budget threshold (a percentage) has a Prometheus rule, so that with
/// `alerts_via = "alertmanager"` Alertmanager announces it and the scheduler does not.
pub fn budget_rule_covers(percent: u32) -> bool {
    RULES.iter().any(|rule| {
        rule.scheduler == Coverage::Budget && (rule.threshold * 100.0).round() as u32 == percent
    })
}

/// The window over which the backlog's trend is judged (Prometheus: `deriv(…[10m])`).
pub const BACKLOG_TREND_WINDOW: Duration = minutes(10);

/// The scheduled jobs whose missed runs are alerted on (the minute jobs are the ones checking).
pub const WATCHED_JOBS: [Job; 2] = [Job::DailyReport, Job::MonthlyExport];

/// One alert's facts this minute.
struct Check {
    rule: Rule,
    /// The alert's state name: the runbook, with the instance (`provider-in-cooldown:gemini`).
    key: String,
    /// The `alert` label of `pictor_scheduler_alerts_total`.
    metric: &'static str,
    /// `None`: the facts could not be read; the alert's state stays as it is.
    holds: Option<bool>,
    /// What is wrong, as the firing subject says it (without the threshold).
    firing: String,
    /// What is true now, as the resolved subject says it.
    resolved: String,
    facts: Vec<(String, String)>,
}

impl Check {
    fn threshold(&self) -> String {
        let hold = self.rule.hold.as_secs() / 60;
        match self.rule.name {
            "PictorQueueBacklogGrowing" => format!(
                "over {} pending and growing, for {hold} minutes",
                self.rule.threshold
            ),
            "PictorNoConsumers" => format!("no consumer while messages wait, for {hold} minutes"),
            "PictorDeadLetters" => format!("more than {} for {hold} minutes", self.rule.threshold),
            "PictorProviderInCooldown" => format!("in cooldown for {hold} minutes"),
            "PictorSchedulerMissedRun" => format!(
                "{} minutes late, for {hold} minutes",
                self.rule.threshold / 60.0
            ),
            _ => format!("{} {}", self.rule.comparison, self.rule.threshold),
        }
    }

    fn message(&self, transition: HealthTransition, now: DateTime<Utc>, base: &str) -> Message {
        let title = match transition {
            HealthTransition::Resolve { .. } => format!("RESOLVED: {}", self.resolved),
            HealthTransition::Repeat { .. } => {
                format!(
                    "STILL FIRING: {} (threshold: {})",
                    self.firing,
                    self.threshold()
                )
            }
            _ => format!("FIRING: {} (threshold: {})", self.firing, self.threshold()),
        };
        let mut facts = self.facts.clone();
        facts.push(("Threshold".to_string(), self.threshold()));
        facts.push((
            "Severity".to_string(),
            self.rule.severity.as_str().to_string(),
        ));
        match transition {
            HealthTransition::Resolve { since } => facts.push((
                "Fired".to_string(),
                format!(
                    "from {} to {} UTC ({} minutes)",
                    since.format("%Y-%m-%d %H:%M"),
                    now.format("%H:%M"),
                    (now - since).num_minutes()
                ),
            )),
            HealthTransition::Repeat { since } => facts.push((
                "Holding since".to_string(),
                format!("{} UTC", since.format("%Y-%m-%d %H:%M")),
            )),
            HealthTransition::Fire { since } => facts.push((
                "Holding since".to_string(),
                format!("{} UTC", since.format("%Y-%m-%d %H:%M")),
            )),
            _ => {}
        }
        let mut doc = Doc::new(title.clone());
        doc.push(Block::Facts(facts));
        doc.push(Block::Link {
            label: "Runbook".to_string(),
            url: runbook_url(base, self.rule.runbook),
        });
        doc.push(Block::Note(format!(
            "Sent by pictor-scheduler, which evaluates {} like Prometheus does (for deployments \
             without Alertmanager). It repeats every alert_repeat_minutes while the alert fires \
             and says when it resolves.",
            self.rule.name
        )));
        doc.into_message(format!("[Pictor] {title}"), Vec::new())
    }
}

/// The oldest period of `job` due and not done, with when it was due.
pub(crate) async fn overdue(
    context: &Context,
    job: Job,
    now: DateTime<Utc>,
) -> anyhow::Result<Option<(Period, DateTime<Utc>)>> {
    let last = context.state.last_done(job).await?;
    let Some(period) = context
        .schedule
        .due(job, now, last.as_deref())
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let due = match &period {
        Period::Day(day) => context.schedule.report_due(*day),
        Period::Month(month) => context.schedule.export_due(*month),
        Period::Minute(_) => None,
    };
    Ok(due.map(|due| (period, due)))
}

/// `1 message`, `3 messages`.
fn count(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// The least-squares slope of `samples` (ms, value) per second, as Prometheus' `deriv`;
/// `None` with fewer than two samples.
pub fn slope(samples: &[(i64, f64)]) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let n = samples.len() as f64;
    let origin = samples[0].0;
    let xs: Vec<f64> = samples
        .iter()
        .map(|(ms, _)| (ms - origin) as f64 / 1000.0)
        .collect();
    let mean_x = xs.iter().sum::<f64>() / n;
    let mean_y = samples.iter().map(|(_, y)| y).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (x, (_, y)) in xs.iter().zip(samples) {
        num += (x - mean_x) * (y - mean_y);
        den += (x - mean_x) * (x - mean_x);
    }
    (den > 0.0).then(|| num / den)
}

async fn checks(context: &Context, now: DateTime<Utc>, dry_run: bool) -> Vec<Check> {
    let mut checks = Vec::new();
    let topology = &context.topology;

    // No consumers: messages ready in the jobs queue and nobody consuming them.
    let jobs = context.queues.inspect(&topology.jobs_queue).await;
    let queue = &topology.jobs_queue;
    checks.push(match &jobs {
        Ok(Some((messages, consumers))) => Check {
            rule: NO_CONSUMERS,
            key: NO_CONSUMERS.runbook.to_string(),
            metric: "no_consumers",
            holds: Some(*messages > 0 && *consumers == 0),
            firing: format!(
                "no worker consumes the jobs queue, {} waiting",
                count(u64::from(*messages), "message")
            ),
            resolved: if *consumers > 0 {
                format!(
                    "the jobs queue has {} again, {} waiting",
                    count(u64::from(*consumers), "consumer"),
                    count(u64::from(*messages), "message")
                )
            } else {
                "no message waits in the jobs queue any more".to_string()
            },
            facts: vec![
                ("Queue".to_string(), queue.clone()),
                ("Messages ready".to_string(), messages.to_string()),
                ("Consumers".to_string(), consumers.to_string()),
            ],
        },
        Ok(None) => Check {
            rule: NO_CONSUMERS,
            key: NO_CONSUMERS.runbook.to_string(),
            metric: "no_consumers",
            holds: Some(false),
            firing: String::new(),
            resolved: format!("the jobs queue {queue} is not declared, so no message waits"),
            facts: vec![("Queue".to_string(), format!("{queue} (not declared)"))],
        },
        Err(error) => Check {
            rule: NO_CONSUMERS,
            key: NO_CONSUMERS.runbook.to_string(),
            metric: "no_consumers",
            holds: Some(true),
            firing: "RabbitMQ unreachable from the scheduler, no consumer of the jobs queue can \
                     be seen"
                .to_string(),
            resolved: String::new(),
            facts: vec![
                ("Queue".to_string(), queue.clone()),
                ("RabbitMQ".to_string(), format!("unreachable: {error}")),
            ],
        },
    });

    // Dead letters: anything in the dead-letter queue.
    // An unreachable broker is not asked twice in a minute: the dead letters are unknown then.
    let dead = match &jobs {
        Ok(_) => context.queues.inspect(&topology.dead_letter_queue).await,
        Err(_) => Err(shared::queue::QueueError::Timeout(Duration::ZERO)),
    };
    let dead_queue = &topology.dead_letter_queue;
    let (holds, messages) = match &dead {
        Ok(Some((messages, _))) => (Some(*messages > 0), Some(*messages)),
        Ok(None) => (Some(false), Some(0)),
        Err(_) => (None, None),
    };
    let messages = messages.unwrap_or_default();
    checks.push(Check {
        rule: DEAD_LETTERS,
        key: DEAD_LETTERS.runbook.to_string(),
        metric: "dead_letters",
        holds,
        firing: format!(
            "{} in the dead-letter queue",
            count(u64::from(messages), "message")
        ),
        resolved: "the dead-letter queue is empty".to_string(),
        facts: vec![
            ("Queue".to_string(), dead_queue.clone()),
            ("Messages".to_string(), messages.to_string()),
        ],
    });

    // The backlog: every job accepted and not ended, and its trend over ten minutes.
    match context.fair.backlog().await {
        Ok(backlog) => {
            let pending = backlog.pending;
            let samples = context
                .state
                .sample(
                    "backlog",
                    now,
                    pending as f64,
                    BACKLOG_TREND_WINDOW,
                    !dry_run,
                )
                .await;
            let trend = samples.ok().and_then(|samples| slope(&samples));
            let per_minute = trend.map_or(0.0, |slope| slope * 60.0);
            let over = pending as f64 > BACKLOG_GROWING.threshold;
            let growing = trend.is_some_and(|slope| slope > 0.0);
            checks.push(Check {
                rule: BACKLOG_GROWING,
                key: BACKLOG_GROWING.runbook.to_string(),
                metric: "queue_backlog",
                holds: Some(over && growing),
                firing: format!(
                    "backlog growing, {pending} jobs pending (+{per_minute:.1} a minute)"
                ),
                resolved: if over {
                    format!("backlog no longer growing, {pending} jobs pending")
                } else {
                    format!("backlog down to {pending} jobs pending")
                },
                facts: vec![
                    (
                        "Pending jobs".to_string(),
                        format!("{pending} (queued, delayed or running)"),
                    ),
                    (
                        "Trend".to_string(),
                        format!(
                            "{per_minute:+.1} jobs a minute over the last {} minutes",
                            BACKLOG_TREND_WINDOW.as_secs() / 60
                        ),
                    ),
                ],
            });
        }
        Err(error) => {
            tracing::warn!(%error, "Cannot read the backlog for its alert");
        }
    }

    // Providers in cooldown: a tripped circuit breaker not closed since.
    for provider in shared::costs::KNOWN_PROVIDERS {
        let open = context.state.breaker_open(provider).await;
        if let Err(error) = &open {
            tracing::warn!(%error, provider, "Cannot read the circuit breaker for its alert");
        }
        checks.push(Check {
            rule: PROVIDER_COOLDOWN,
            key: format!("{}:{provider}", PROVIDER_COOLDOWN.runbook),
            metric: "provider_cooldown",
            holds: open.ok(),
            firing: format!("provider {provider} in cooldown, its circuit breaker is open"),
            resolved: format!("provider {provider} out of cooldown, its circuit breaker closed"),
            facts: vec![("Provider".to_string(), provider.to_string())],
        });
    }

    // Scheduled runs not done long after they were due.
    for job in WATCHED_JOBS {
        let key = format!("{}:{}", MISSED_RUN.runbook, job.as_str());
        match overdue(context, job, now).await {
            Ok(Some((period, due))) => {
                let late = (now - due).num_seconds();
                checks.push(Check {
                    rule: MISSED_RUN,
                    key,
                    metric: "missed_run",
                    holds: Some(late as f64 > MISSED_RUN.threshold),
                    firing: format!(
                        "{job} of {period} not done, {} minutes after it was due",
                        late / 60
                    ),
                    resolved: format!("{job} of {period} is no longer late"),
                    facts: vec![
                        ("Run".to_string(), format!("{job} of {period}")),
                        (
                            "Due".to_string(),
                            format!("{} UTC", due.format("%Y-%m-%d %H:%M")),
                        ),
                    ],
                });
            }
            Ok(None) => checks.push(Check {
                rule: MISSED_RUN,
                key,
                metric: "missed_run",
                holds: Some(false),
                firing: String::new(),
                resolved: format!("{job} caught up, its latest due run is done"),
                facts: Vec::new(),
            }),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), job = job.as_str(), "Cannot read the scheduler's runs for the missed-run alert");
            }
        }
    }
    checks
}

/// One minute's queue, backlog, provider and missed-run alerts.
pub(crate) async fn run(
    context: &Context,
    now: DateTime<Utc>,
    out: &Dispatcher<'_>,
) -> anyhow::Result<()> {
    let settings = &context.settings;
    let repeat = minutes(u64::from(settings.alert_repeat_minutes.get()));
    for check in checks(context, now, out.dry_run()).await {
        let Some(holds) = check.holds else {
            continue;
        };
        let transition = if out.dry_run() {
            context
                .state
                .peek_transition(&check.key, holds, now, check.rule.hold)
                .await?
        } else {
            context
                .state
                .health_transition(&check.key, holds, now, repeat, check.rule.hold)
                .await?
        };
        tracing::debug!(alert = %check.key, holds, ?transition, "Alert check");
        let kind = match transition {
            HealthTransition::Fire { .. } => "firing",
            HealthTransition::Repeat { .. } => "repeat",
            HealthTransition::Resolve { .. } => "resolved",
            HealthTransition::Pending { .. }
            | HealthTransition::Quiet
            | HealthTransition::Clear => continue,
        };
        tracing::info!(alert = %check.key, kind, "Sending an alert");
        crate::metrics::alert(check.metric, kind);
        out.send(check.message(transition, now, &settings.runbook_base_url))
            .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_is_a_least_squares_fit_per_second() {
        assert_eq!(slope(&[(0, 5.0)]), None);
        let rising: Vec<(i64, f64)> = (0..5)
            .map(|i| (i * 60_000, 100.0 + 10.0 * i as f64))
            .collect();
        let slope = slope(&rising).unwrap();
        assert!((slope - 10.0 / 60.0).abs() < 1e-9, "{slope}");
    }

    #[test]
    fn every_rule_has_a_distinct_name_and_runbook() {
        let mut names: Vec<&str> = RULES.iter().map(|rule| rule.name).collect();
        let mut runbooks: Vec<&str> = RULES.iter().map(|rule| rule.runbook).collect();
        names.sort_unstable();
        names.dedup();
        runbooks.sort_unstable();
        runbooks.dedup();
        assert_eq!(names.len(), RULES.len());
        assert_eq!(runbooks.len(), RULES.len());
    }
}
