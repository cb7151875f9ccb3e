//! Budget alerts: 80% and 100% of the monthly budget (the configured thresholds), and a month
//! projected to end over budget, each delivered once per month to Slack and email.
//!
//! Two sources raise them. Workers raise threshold events on the `budget-events` stream as the
//! call that crosses a threshold is recorded (`shared::ledger`); the scheduler reads the stream
//! from its stored cursor every minute. The scheduler also checks the month's spend itself
//! every minute, which covers a threshold lowered mid-month and the projection, which no call
//! raises. Both go through one claim per month and alert (`SET NX` in [`SchedulerState`]), so
//! an alert raised by both, or seen by two replicas, is delivered once. A claim whose delivery
//! failed on a transient error is given back, and the next minute tries again.
//!
//! [`SchedulerState`]: crate::state::SchedulerState

use chrono::{DateTime, Utc};
use shared::config::AlertsVia;
use shared::costs::threshold_micros;
use shared::ledger::{BudgetEvent, Month, project_month_end};

use crate::deliver::Message;
use crate::render::{Block, Doc, ratio, usd};
use crate::schedule::previous_month;
use crate::{Context, Dispatcher, RunOutcome, Sent};

/// Budget events read per round trip.
const EVENT_BATCH: usize = 100;

/// One budget alert of a month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetAlert {
    /// Spend reached this percentage of the budget.
    Threshold(u32),
    /// The month-end projection passed the budget.
    Projected,
}

impl BudgetAlert {
    /// The alert's name in its delivery marker.
    fn key(self) -> String {
        match self {
            Self::Threshold(percent) => percent.to_string(),
            Self::Projected => "projected".to_string(),
        }
    }

    fn runbook(self) -> &'static str {
        match self {
            Self::Threshold(percent) if percent >= 100 => "budget-exhausted",
            _ => "budget-80-percent",
        }
    }
}

/// What an alert says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub alert: BudgetAlert,
    pub month: String,
    pub spent: i64,
    pub budget: i64,
    /// The month-end projection, for the current month.
    pub projected: Option<i64>,
    /// When a worker's call crossed the threshold; `None` when the scheduler's check found it.
    pub raised_at: Option<DateTime<Utc>>,
    pub block: bool,
}

impl Facts {
    pub fn message(&self, runbook_base_url: &str) -> Message {
        let spent = format!(
            "{} of {} ({})",
            usd(self.spent),
            usd(self.budget),
            ratio(self.spent, self.budget)
        );
        let (title, subject) = match self.alert {
            BudgetAlert::Threshold(percent) if percent >= 100 => (
                format!("Budget {}: the monthly budget is spent", self.month),
                format!(
                    "[Pictor] Budget {}: {percent}% reached, {spent}",
                    self.month
                ),
            ),
            BudgetAlert::Threshold(percent) => (
                format!(
                    "Budget {}: {percent}% of the monthly budget reached",
                    self.month
                ),
                format!(
                    "[Pictor] Budget {}: {percent}% reached, {spent}",
                    self.month
                ),
            ),
            BudgetAlert::Projected => (
                format!(
                    "Budget {}: the month is projected to end over budget",
                    self.month
                ),
                format!(
                    "[Pictor] Budget {}: projected month-end {} is over the {} budget",
                    self.month,
                    usd(self.projected.unwrap_or(self.spent)),
                    usd(self.budget)
                ),
            ),
        };
        let mut doc = Doc::new(title);
        let mut facts = vec![("Spent".to_string(), spent)];
        if let Some(projected) = self.projected {
            facts.push((
                "Projected month-end".to_string(),
                format!(
                    "{} ({} of the budget)",
                    usd(projected),
                    ratio(projected, self.budget)
                ),
            ));
        }
        facts.push((
            "Policy at 100%".to_string(),
            if self.block {
                "block: new jobs are refused (402 budget_exhausted)".to_string()
            } else {
                "alert: Pictor keeps serving and spending".to_string()
            },
        ));
        facts.push((
            "Raised".to_string(),
            match self.raised_at {
                Some(at) => format!("by a worker at {} UTC", at.format("%Y-%m-%d %H:%M")),
                None => "by the scheduler's budget check".to_string(),
            },
        ));
        doc.push(Block::Facts(facts));
        doc.push(Block::Link {
            label: "Runbook".to_string(),
            url: runbook_url(runbook_base_url, self.alert.runbook()),
        });
        doc.push(Block::Note(
            "Each budget alert is sent once per month. Spend counts settled provider calls at \
             list prices (UTC month)."
                .to_string(),
        ));
        doc.into_message(subject, Vec::new())
    }
}

pub fn runbook_url(base: &str, name: &str) -> String {
    format!("{}/{name}.md", base.trim_end_matches('/'))
}

/// One minute's budget alerts: the stream's new events, then the scheduler's own check.
pub async fn run(
    context: &Context,
    now: DateTime<Utc>,
    out: &Dispatcher<'_>,
) -> anyhow::Result<RunOutcome> {
    let month = Month::of(now);
    let recent = [Some(month), previous_month(month)].map(|m| m.map(|m| m.to_string()));
    let block = context.policy.block;

    let mut cursor = context.state.budget_cursor().await?;
    loop {
        let events = context
            .ledger
            .budget_events_after(cursor.as_deref(), EVENT_BATCH)
            .await?;
        for (id, event) in &events {
            if recent.contains(&Some(event.month.clone())) {
                let facts = from_event(event, now, block);
                if deliver(context, &facts, out).await? == Sent::Retry {
                    return Ok(RunOutcome::RetryLater);
                }
            } else {
                tracing::info!(month = %event.month, threshold = event.threshold, "Skipping a budget event of an old month");
            }
            if !out.dry_run() {
                context.state.set_budget_cursor(id).await?;
            }
            cursor = Some(id.clone());
        }
        if events.len() < EVENT_BATCH {
            break;
        }
    }

    let spent = context.ledger.spent(month).await?;
    let budget = context.policy.monthly_micros;
    let projected = project_month_end(spent, month, now.date_naive());
    let mut alerts: Vec<BudgetAlert> = context
        .policy
        .thresholds
        .iter()
        .filter(|threshold| spent >= threshold_micros(budget, **threshold))
        .map(|threshold| BudgetAlert::Threshold(*threshold))
        .collect();
    // Once the budget is spent, the projection has nothing left to warn about.
    if projected > budget && spent < budget {
        alerts.push(BudgetAlert::Projected);
    }
    for alert in alerts {
        let facts = Facts {
            alert,
            month: month.to_string(),
            spent,
            budget,
            projected: Some(projected),
            raised_at: None,
            block,
        };
        if deliver(context, &facts, out).await? == Sent::Retry {
            return Ok(RunOutcome::RetryLater);
        }
    }
    Ok(RunOutcome::Complete)
}

/// An event's alert; the projection (for the current month) is as of `now`, like the
/// scheduler's own check, so the two agree.
fn from_event(event: &BudgetEvent, now: DateTime<Utc>, block: bool) -> Facts {
    let current = Month::of(now);
    let projected = (Month::parse(&event.month) == Some(current))
        .then(|| project_month_end(event.spent_micros, current, now.date_naive()));
    Facts {
        alert: BudgetAlert::Threshold(event.threshold),
        month: event.month.clone(),
        spent: event.spent_micros,
        budget: event.budget_micros,
        projected,
        raised_at: Some(event.at),
        block,
    }
}

/// Claims the alert and sends it; an alert claimed before is skipped.
async fn deliver(context: &Context, facts: &Facts, out: &Dispatcher<'_>) -> anyhow::Result<Sent> {
    if let BudgetAlert::Threshold(percent) = facts.alert
        && context.settings.alerts_via == AlertsVia::Alertmanager
        && crate::alerts::budget_rule_covers(percent)
    {
        // Prometheus' rule on `pictor_budget_spent_ratio` announces it through Alertmanager.
        return Ok(Sent::Skipped);
    }
    let key = facts.alert.key();
    let state = &context.state;
    if out.dry_run() {
        if state.budget_alert_claimed(&facts.month, &key).await? {
            return Ok(Sent::Skipped);
        }
    } else if !state.claim_budget_alert(&facts.month, &key).await? {
        return Ok(Sent::Skipped);
    }
    let sent = out
        .send(facts.message(&context.settings.runbook_base_url))
        .await;
    match sent {
        Sent::Retry => {
            state.unclaim_budget_alert(&facts.month, &key).await?;
        }
        Sent::Delivered | Sent::GaveUp => crate::metrics::alert("budget", kind(facts.alert)),
        Sent::Skipped => {}
    }
    Ok(sent)
}

/// The alert's `kind` metric label.
fn kind(alert: BudgetAlert) -> &'static str {
    match alert {
        BudgetAlert::Threshold(_) => "threshold",
        BudgetAlert::Projected => "projected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(alert: BudgetAlert) -> Facts {
        Facts {
            alert,
            month: "2026-11".into(),
            spent: 56_000_000,
            budget: 70_000_000,
            projected: Some(84_000_000),
            raised_at: None,
            block: false,
        }
    }

    #[test]
    fn a_threshold_alert_names_the_spend_and_links_its_runbook() {
        let message = facts(BudgetAlert::Threshold(80)).message("https://example.com/runbooks/");
        assert_eq!(
            message.subject,
            "[Pictor] Budget 2026-11: 80% reached, $56.00 of $70.00 (80.0%)"
        );
        assert!(
            message
                .text
                .contains("  Projected month-end: $84.00 (120.0% of the budget)")
        );
        assert!(
            message
                .text
                .contains("Runbook: https://example.com/runbooks/budget-80-percent.md"),
            "{}",
            message.text
        );
        let exhausted = facts(BudgetAlert::Threshold(100)).message("https://example.com/runbooks");
        assert!(exhausted.text.contains("budget-exhausted.md"));
        assert!(
            exhausted
                .text
                .starts_with("Budget 2026-11: the monthly budget is spent")
        );
    }

    #[test]
    fn a_projection_alert_names_the_projected_amount() {
        let message = facts(BudgetAlert::Projected).message("https://example.com");
        assert_eq!(
            message.subject,
            "[Pictor] Budget 2026-11: projected month-end $84.00 is over the $70.00 budget"
        );
    }
}
