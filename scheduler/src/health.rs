//! Health alerts for deployments without Prometheus and Alertmanager: every minute, the agent
//! error rate and the p95 response time over a sliding window of per-minute job statistics
//! (`shared::stats`), against the same thresholds as `infra/prometheus/alerts.yml`.
//!
//! An alert holds when the window saw at least `health_min_jobs` finished jobs (fewer is too
//! little traffic to judge) and its figure is over the threshold. When it starts to hold, a
//! firing message with the runbook link goes out; while it holds, the message is repeated at
//! most every `alert_repeat_minutes`; when it stops holding (including when traffic drops
//! under the minimum), a resolved message goes out. The state lives in Redis and each change is
//! decided atomically there (`SchedulerState::health_transition`), so replicas agree on it.
//!
//! The window plays the part of Prometheus' `for:` here: the figures of the whole window
//! (default 10 minutes, the rules' `for: 10m`) are judged at once, so an alert fires as soon as
//! they are over the threshold (`alerts::ERROR_RATE`, `alerts::RESPONSE_TIME`). The same minute's
//! check then evaluates the other alerts (`alerts`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::config::SchedulerSettings;
use shared::stats::StatsSnapshot;

use crate::budget::runbook_url;
use crate::deliver::Message;
use crate::render::{Block, Doc, percent, ratio, seconds};
use crate::state::HealthTransition;
use crate::{Context, Dispatcher, RunOutcome};

/// The two health alerts; the name is also their runbook's file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthAlert {
    ErrorRate,
    ResponseTime,
}

impl HealthAlert {
    pub const ALL: [HealthAlert; 2] = [HealthAlert::ErrorRate, HealthAlert::ResponseTime];

    pub fn name(self) -> &'static str {
        match self {
            Self::ErrorRate => "agent-error-rate-high",
            Self::ResponseTime => "response-time-high",
        }
    }

    fn metric_label(self) -> &'static str {
        match self {
            Self::ErrorRate => "agent_error_rate",
            Self::ResponseTime => "response_time",
        }
    }
}

/// The window's figures, judged against the settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub window_minutes: u32,
    pub finished: i64,
    pub failed: i64,
    pub p95: Option<f64>,
    pub min_jobs: i64,
    pub error_rate_threshold: f64,
    pub p95_threshold: f64,
}

impl Evaluation {
    pub fn of(window: &StatsSnapshot, settings: &SchedulerSettings) -> Self {
        Self {
            window_minutes: settings.health_window_minutes.get(),
            finished: window.total_finished(),
            failed: window.finished("failed"),
            p95: window.duration_quantile(0.95),
            min_jobs: i64::from(settings.health_min_jobs),
            error_rate_threshold: settings.error_rate_threshold,
            p95_threshold: settings.latency_p95_threshold_secs,
        }
    }

    /// Enough finished jobs in the window to judge.
    pub fn enough_traffic(&self) -> bool {
        self.finished > 0 && self.finished >= self.min_jobs
    }

    pub fn holds(&self, alert: HealthAlert) -> bool {
        self.enough_traffic()
            && match alert {
                HealthAlert::ErrorRate => {
                    self.failed as f64 / self.finished as f64 > self.error_rate_threshold
                }
                HealthAlert::ResponseTime => self.p95.is_some_and(|p95| p95 > self.p95_threshold),
            }
    }

    fn threshold(&self, alert: HealthAlert) -> String {
        match alert {
            HealthAlert::ErrorRate => {
                // Settings are ratios such as 0.05; shown to a tenth of a percent.
                percent((self.error_rate_threshold * 1000.0).round() as i64)
            }
            HealthAlert::ResponseTime => seconds(Some(self.p95_threshold)),
        }
    }

    fn figure(&self, alert: HealthAlert) -> String {
        match alert {
            HealthAlert::ErrorRate => ratio(self.failed, self.finished),
            HealthAlert::ResponseTime => seconds(self.p95),
        }
    }

    fn what(alert: HealthAlert) -> &'static str {
        match alert {
            HealthAlert::ErrorRate => "agent error rate",
            HealthAlert::ResponseTime => "p95 response time",
        }
    }

    /// The firing message (`repeat`: the alert was announced before).
    pub fn firing(
        &self,
        alert: HealthAlert,
        since: DateTime<Utc>,
        repeat: bool,
        runbook_base_url: &str,
    ) -> Message {
        let state = if repeat { "STILL FIRING" } else { "FIRING" };
        let title = format!(
            "{state}: {} {} over the last {} minutes (threshold {})",
            Self::what(alert),
            self.figure(alert),
            self.window_minutes,
            self.threshold(alert)
        );
        let mut doc = Doc::new(title.clone());
        doc.push(Block::Facts(vec![
            self.detail(alert),
            (
                "Firing since".to_string(),
                format!("{} UTC", since.format("%Y-%m-%d %H:%M")),
            ),
        ]));
        doc.push(Block::Link {
            label: "Runbook".to_string(),
            url: runbook_url(runbook_base_url, alert.name()),
        });
        doc.push(Block::Note(
            "Sent by pictor-scheduler's health check (for deployments without Alertmanager). \
             It repeats while the alert fires and says when it resolves."
                .to_string(),
        ));
        doc.into_message(format!("[Pictor] {title}"), Vec::new())
    }

    pub fn resolved(
        &self,
        alert: HealthAlert,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
        runbook_base_url: &str,
    ) -> Message {
        let title = if self.enough_traffic() {
            format!(
                "RESOLVED: {} back to {} (threshold {})",
                Self::what(alert),
                self.figure(alert),
                self.threshold(alert)
            )
        } else {
            format!(
                "RESOLVED: {} alert cleared, {} jobs in {} minutes are too few to judge",
                Self::what(alert),
                self.finished,
                self.window_minutes
            )
        };
        let mut doc = Doc::new(title.clone());
        doc.push(Block::Facts(vec![
            self.detail(alert),
            (
                "Fired".to_string(),
                format!(
                    "from {} to {} UTC ({} minutes)",
                    since.format("%Y-%m-%d %H:%M"),
                    now.format("%H:%M"),
                    (now - since).num_minutes()
                ),
            ),
        ]));
        doc.push(Block::Link {
            label: "Runbook".to_string(),
            url: runbook_url(runbook_base_url, alert.name()),
        });
        doc.into_message(format!("[Pictor] {title}"), Vec::new())
    }

    fn detail(&self, alert: HealthAlert) -> (String, String) {
        match alert {
            HealthAlert::ErrorRate => (
                "Failed jobs".to_string(),
                format!(
                    "{} of {} finished in the last {} minutes",
                    self.failed, self.finished, self.window_minutes
                ),
            ),
            HealthAlert::ResponseTime => (
                "Jobs".to_string(),
                format!(
                    "{} finished in the last {} minutes, p95 {}",
                    self.finished,
                    self.window_minutes,
                    seconds(self.p95)
                ),
            ),
        }
    }
}

/// One minute's health check.
pub async fn run(
    context: &Context,
    now: DateTime<Utc>,
    out: &Dispatcher<'_>,
) -> anyhow::Result<RunOutcome> {
    let settings = &context.settings;
    let window = context
        .stats
        .window(now, settings.health_window_minutes.get())
        .await?;
    let evaluation = Evaluation::of(&window, settings);
    let repeat = Duration::from_secs(u64::from(settings.alert_repeat_minutes.get()) * 60);
    let base = &settings.runbook_base_url;
    for alert in HealthAlert::ALL {
        let holds = evaluation.holds(alert);
        let transition = if out.dry_run() {
            // Say what a real check would announce, without changing the alert's state.
            match (holds, context.state.health_since(alert.name()).await?) {
                (true, None) => HealthTransition::Fire { since: now },
                (true, Some(since)) => HealthTransition::Repeat { since },
                (false, Some(since)) => HealthTransition::Resolve { since },
                (false, None) => HealthTransition::Clear,
            }
        } else {
            context
                .state
                .health_transition(alert.name(), holds, now, repeat, Duration::ZERO)
                .await?
        };
        tracing::debug!(
            alert = alert.name(),
            finished = evaluation.finished,
            failed = evaluation.failed,
            holds,
            ?transition,
            "Health check"
        );
        let (message, kind) = match transition {
            HealthTransition::Fire { .. } => (evaluation.firing(alert, now, false, base), "firing"),
            HealthTransition::Repeat { since } => {
                (evaluation.firing(alert, since, true, base), "repeat")
            }
            HealthTransition::Resolve { since } => {
                (evaluation.resolved(alert, since, now, base), "resolved")
            }
            HealthTransition::Pending { .. }
            | HealthTransition::Quiet
            | HealthTransition::Clear => {
                continue;
            }
        };
        tracing::info!(alert = alert.name(), kind, "Sending a health alert");
        crate::metrics::alert(alert.metric_label(), kind);
        // A lost firing message is sent again at the next repeat; the state has moved on, so
        // there is nothing to retry here.
        out.send(message).await;
    }
    crate::alerts::run(context, now, out).await?;
    Ok(RunOutcome::Complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluation(finished: i64, failed: i64, p95: Option<f64>) -> Evaluation {
        Evaluation {
            window_minutes: 10,
            finished,
            failed,
            p95,
            min_jobs: 20,
            error_rate_threshold: 0.05,
            p95_threshold: 20.0,
        }
    }

    #[test]
    fn alerts_hold_over_the_threshold_with_enough_traffic_only() {
        assert!(evaluation(40, 3, Some(1.0)).holds(HealthAlert::ErrorRate));
        assert!(
            !evaluation(40, 2, Some(1.0)).holds(HealthAlert::ErrorRate),
            "5% is not over 5%"
        );
        assert!(
            !evaluation(10, 5, Some(60.0)).holds(HealthAlert::ErrorRate),
            "too few jobs"
        );
        assert!(!evaluation(10, 5, Some(60.0)).holds(HealthAlert::ResponseTime));
        assert!(evaluation(40, 0, Some(30.0)).holds(HealthAlert::ResponseTime));
        assert!(!evaluation(40, 0, Some(20.0)).holds(HealthAlert::ResponseTime));
    }

    #[test]
    fn the_firing_message_states_the_figure_and_links_the_runbook() {
        let since = DateTime::parse_from_rfc3339("2026-11-06T08:01:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let message = evaluation(40, 3, Some(1.0)).firing(
            HealthAlert::ErrorRate,
            since,
            false,
            "https://example.com/runbooks",
        );
        assert_eq!(
            message.subject,
            "[Pictor] FIRING: agent error rate 7.5% over the last 10 minutes (threshold 5.0%)"
        );
        assert!(
            message
                .text
                .contains("  Failed jobs: 3 of 40 finished in the last 10 minutes")
        );
        assert!(
            message
                .text
                .contains("  Firing since: 2026-11-06 08:01 UTC")
        );
        assert!(
            message
                .text
                .contains("Runbook: https://example.com/runbooks/agent-error-rate-high.md")
        );
        let slow = evaluation(40, 0, Some(30.0)).firing(
            HealthAlert::ResponseTime,
            since,
            true,
            "https://example.com/runbooks",
        );
        assert_eq!(
            slow.subject,
            "[Pictor] STILL FIRING: p95 response time 30 s over the last 10 minutes (threshold 20 s)"
        );
        assert!(slow.text.contains("response-time-high.md"));
    }
}
