//! The daily report: one UTC day's jobs, response times, detours and costs, the month's budget
//! so far, and the change from the day before.
//!
//! [`load`] reads what it needs (the day's and the day before's statistics, the month's cost
//! aggregates, the day's ledger entries for the cost per user); [`DailyReport::compute`] turns it
//! into figures with no I/O, and [`DailyReport::doc`] lays them out, so tests check the figures
//! and their rendering without Redis. Figures for a past day never change, so a report caught up
//! after downtime says what it would have said on time.

use std::collections::BTreeMap;

use chrono::{Datelike, NaiveDate};
use shared::costs::cells;
use shared::ledger::LedgerError;
use shared::ledger::{BudgetPolicy, Ledger, Month, MonthCosts, project_month_end};
use shared::reconcile::{self, OpenAiCosts};
use shared::stats::{Stats, StatsSnapshot};
use shared::store::StoreError;

use crate::render::{
    Block, Doc, count_delta, count_of, points_delta, ratio, seconds, tenths_of_percent, usd,
    usd_delta,
};

/// Users listed by name in the report.
pub const TOP_USERS: usize = 5;
/// Ledger entries read per round trip when totalling the day's cost per user.
const LEDGER_BATCH: usize = 1000;

/// Outcomes of finished jobs, in the order the report shows them.
const OUTCOMES: [(&str, &str); 4] = [
    ("succeeded", "succeeded"),
    ("failed", "failed"),
    ("needs_clarification", "needs clarification"),
    ("canceled", "canceled"),
];

/// What the report is computed from.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub day: StatsSnapshot,
    pub previous_day: StatsSnapshot,
    /// The aggregates of the day's month.
    pub month_costs: MonthCosts,
    /// The aggregates of the day before's month (the same as `month_costs` except on the 1st).
    pub previous_month_costs: MonthCosts,
    /// The day's cost and calls per user, from the ledger.
    pub users: BTreeMap<String, UserDay>,
    /// OpenAI's own bill for the day, per model, to reconcile the ledger with.
    pub openai_bill: OpenAiBill,
    /// How far the ledger and the bill may differ before the day is flagged, in percent.
    pub tolerance_percent: f64,
}

/// OpenAI's bill for the report's day, as far as it could be read.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum OpenAiBill {
    /// No admin key is configured (`OPENAI_ADMIN_KEY`).
    #[default]
    NotConfigured,
    /// The Costs API could not be read; why.
    Unavailable(String),
    /// Cost per (day, model), micro-dollars.
    Read(BTreeMap<(NaiveDate, String), i64>),
}

/// Reads OpenAI's bill for `date` (`None`: no admin key configured).
pub async fn load_openai_bill(client: Option<&OpenAiCosts>, date: NaiveDate) -> OpenAiBill {
    let Some(client) = client else {
        return OpenAiBill::NotConfigured;
    };
    let until = date.succ_opt().unwrap_or(date);
    match client.by_day_and_model(date, until).await {
        Ok(bill) => OpenAiBill::Read(bill),
        Err(error) => {
            tracing::warn!(%error, "Cannot read OpenAI's bill for the daily report");
            OpenAiBill::Unavailable(error.to_string())
        }
    }
}

/// The report's comparison of the ledger with OpenAI's bill.
#[derive(Debug, Clone, PartialEq)]
pub enum Reconciliation {
    NotConfigured,
    Unavailable(String),
    /// The day compared (`None`: nothing spent on either side).
    Compared(Option<reconcile::Day>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserDay {
    pub micros: i64,
    pub calls: i64,
}

/// Job figures of one day.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFigures {
    pub finished: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub clarifications: i64,
    pub canceled: i64,
    pub fallbacks: i64,
    pub deferrals: i64,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    /// Finished jobs by intent, then outcome.
    pub by_intent: BTreeMap<String, BTreeMap<String, i64>>,
}

impl JobFigures {
    fn from_stats(stats: &StatsSnapshot) -> Self {
        let mut by_intent: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        for ((intent, outcome), count) in stats.by_intent() {
            *by_intent
                .entry(intent)
                .or_default()
                .entry(outcome)
                .or_insert(0) += count;
        }
        Self {
            finished: stats.total_finished(),
            succeeded: stats.finished("succeeded"),
            failed: stats.finished("failed"),
            clarifications: stats.finished("needs_clarification"),
            canceled: stats.finished("canceled"),
            fallbacks: stats.get("fallbacks"),
            deferrals: stats.get("deferrals"),
            p50: stats.duration_quantile(0.5),
            p95: stats.duration_quantile(0.95),
            by_intent,
        }
    }
}

/// Cost figures of one day.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CostFigures {
    pub total: i64,
    pub calls: i64,
    /// (micro-dollars, calls) by provider and by agent.
    pub by_provider: BTreeMap<String, (i64, i64)>,
    pub by_agent: BTreeMap<String, (i64, i64)>,
    /// The share of `total` and `calls` that is possibly billed (outcome unknown, costed at
    /// its estimate).
    pub possibly_micros: i64,
    pub possibly_calls: i64,
}

impl CostFigures {
    fn of_day(costs: &MonthCosts, day: u32) -> Self {
        let mut figures = Self {
            total: costs.get(&format!("day:{day:02}")),
            possibly_micros: costs.get(&format!("possibly:day:{day:02}")),
            possibly_calls: costs.get(&format!("possibly:daycalls:{day:02}")),
            ..Self::default()
        };
        for cell in cells(costs).into_iter().filter(|cell| cell.day == day) {
            figures.calls += cell.calls;
            let provider = figures.by_provider.entry(cell.provider).or_default();
            provider.0 += cell.micros;
            provider.1 += cell.calls;
            let agent = figures.by_agent.entry(cell.agent).or_default();
            agent.0 += cell.micros;
            agent.1 += cell.calls;
        }
        figures
    }
}

/// Every figure of one daily report.
#[derive(Debug, Clone, PartialEq)]
pub struct DailyReport {
    pub date: NaiveDate,
    pub jobs: JobFigures,
    pub previous_jobs: JobFigures,
    pub costs: CostFigures,
    pub previous_costs: CostFigures,
    /// The most expensive users of the day, most expensive first (ties by name).
    pub top_users: Vec<(String, UserDay)>,
    /// Users with a billed call that day.
    pub users: usize,
    pub month: Month,
    /// Spent from the 1st to the end of the day.
    pub month_to_date: i64,
    pub projected_month_end: i64,
    pub budget: i64,
    pub reconciliation: Reconciliation,
    pub tolerance_percent: f64,
}

impl DailyReport {
    pub fn compute(date: NaiveDate, inputs: &Inputs, policy: &BudgetPolicy) -> Self {
        let month = Month::of(date.and_time(chrono::NaiveTime::MIN).and_utc());
        let month_to_date = (1..=date.day())
            .map(|day| inputs.month_costs.get(&format!("day:{day:02}")))
            .sum();
        let previous_costs = date
            .pred_opt()
            .map(|previous| CostFigures::of_day(&inputs.previous_month_costs, previous.day()))
            .unwrap_or_default();
        let mut top_users: Vec<(String, UserDay)> = inputs
            .users
            .iter()
            .map(|(user, day)| (user.clone(), *day))
            .collect();
        top_users.sort_by(|(a_user, a), (b_user, b)| {
            b.micros.cmp(&a.micros).then_with(|| a_user.cmp(b_user))
        });
        top_users.truncate(TOP_USERS);
        Self {
            date,
            jobs: JobFigures::from_stats(&inputs.day),
            previous_jobs: JobFigures::from_stats(&inputs.previous_day),
            costs: CostFigures::of_day(&inputs.month_costs, date.day()),
            previous_costs,
            top_users,
            users: inputs.users.len(),
            month,
            month_to_date,
            projected_month_end: project_month_end(month_to_date, month, date),
            budget: policy.monthly_micros,
            reconciliation: reconciliation(date, month, inputs),
            tolerance_percent: inputs.tolerance_percent,
        }
    }

    pub fn subject(&self) -> String {
        format!(
            "[Pictor] Daily report {}: {} jobs, {} succeeded, {} spent",
            self.date,
            self.jobs.finished,
            ratio(self.jobs.succeeded, self.jobs.finished),
            usd(self.costs.total)
        )
    }

    pub fn doc(&self) -> Doc {
        let mut doc = Doc::new(format!(
            "Pictor daily report for {} (UTC)",
            self.date.format("%A %Y-%m-%d")
        ));
        self.jobs_section(&mut doc);
        self.intents_section(&mut doc);
        self.costs_section(&mut doc);
        self.users_section(&mut doc);
        self.budget_section(&mut doc);
        self.reconciliation_section(&mut doc);
        doc.push(Block::Note(format!(
            "Figures are for the UTC day {}. Response times are end to end (accepted to \
             finished), as histogram bucket bounds. Costs are the providers' list prices from \
             the cost ledger.",
            self.date
        )));
        doc
    }

    /// The day's jobs beside the day before's.
    fn jobs_section(&self, doc: &mut Doc) {
        let (jobs, before) = (&self.jobs, &self.previous_jobs);
        doc.push(Block::Heading("Jobs".into()));
        let rate_change = |part: i64, before_part: i64| -> String {
            match (
                tenths_of_percent(part, jobs.finished),
                tenths_of_percent(before_part, before.finished),
            ) {
                (Some(now), Some(then)) => {
                    format!(
                        "day before: {}, {}",
                        ratio(before_part, before.finished),
                        points_delta(now - then)
                    )
                }
                _ => format!("day before: {}", ratio(before_part, before.finished)),
            }
        };
        let count = |now: i64, then: i64| {
            format!("{now} (day before: {then}, {})", count_delta(now - then))
        };
        doc.push(Block::Facts(vec![
            ("Finished".into(), count(jobs.finished, before.finished)),
            (
                "Success rate".into(),
                format!(
                    "{} ({})",
                    ratio(jobs.succeeded, jobs.finished),
                    rate_change(jobs.succeeded, before.succeeded)
                ),
            ),
            (
                "Error rate".into(),
                format!(
                    "{} ({})",
                    ratio(jobs.failed, jobs.finished),
                    rate_change(jobs.failed, before.failed)
                ),
            ),
            (
                "Response time p50".into(),
                format!(
                    "{} (day before: {})",
                    seconds(jobs.p50),
                    seconds(before.p50)
                ),
            ),
            (
                "Response time p95".into(),
                format!(
                    "{} (day before: {})",
                    seconds(jobs.p95),
                    seconds(before.p95)
                ),
            ),
            (
                "Clarifications asked".into(),
                count(jobs.clarifications, before.clarifications),
            ),
            ("Fallbacks".into(), count(jobs.fallbacks, before.fallbacks)),
            (
                "Rate-limit deferrals".into(),
                count(jobs.deferrals, before.deferrals),
            ),
        ]));
    }

    /// Finished jobs by intent and outcome.
    fn intents_section(&self, doc: &mut Doc) {
        doc.push(Block::Heading("Jobs by intent and outcome".into()));
        let mut intents: Vec<String> = ["create", "edit"].map(String::from).to_vec();
        for intent in self.jobs.by_intent.keys() {
            if !intents.contains(intent) {
                intents.push(intent.clone());
            }
        }
        let mut columns = vec!["intent".to_string()];
        columns.extend(OUTCOMES.iter().map(|(_, label)| (*label).to_string()));
        columns.push("total".into());
        let rows =
            intents
                .iter()
                .map(|intent| {
                    let outcomes = self.jobs.by_intent.get(intent).cloned().unwrap_or_default();
                    let mut row = vec![intent.clone()];
                    row.extend(OUTCOMES.iter().map(|(outcome, _)| {
                        outcomes.get(*outcome).copied().unwrap_or(0).to_string()
                    }));
                    row.push(outcomes.values().sum::<i64>().to_string());
                    row
                })
                .collect();
        doc.push(Block::Table { columns, rows });
    }

    /// What the day cost, by provider and agent.
    fn costs_section(&self, doc: &mut Doc) {
        doc.push(Block::Heading("Costs".into()));
        doc.push(Block::Facts(vec![
            (
                "Spent".into(),
                format!(
                    "{} in {} (day before: {}, {})",
                    usd(self.costs.total),
                    count_of(self.costs.calls, "call"),
                    usd(self.previous_costs.total),
                    usd_delta(self.costs.total - self.previous_costs.total)
                ),
            ),
            (
                "Cost per finished job".into(),
                per_job(self.costs.total, self.jobs.finished),
            ),
            (
                "Possibly billed".into(),
                if self.costs.possibly_calls == 0 {
                    "none".to_string()
                } else {
                    format!(
                        "{} at an estimated {}, included above (calls whose outcome is unknown: \
                         a timeout after the request left, or a worker lost mid-call)",
                        count_of(self.costs.possibly_calls, "call"),
                        usd(self.costs.possibly_micros)
                    )
                },
            ),
        ]));
        if !self.costs.by_provider.is_empty() {
            doc.push(cost_table("provider", &self.costs.by_provider));
            doc.push(cost_table("agent", &self.costs.by_agent));
        }
    }

    /// The users who spent most.
    fn users_section(&self, doc: &mut Doc) {
        doc.push(Block::Heading(format!(
            "Top users ({} with billed calls)",
            self.users
        )));
        if self.top_users.is_empty() {
            doc.push(Block::Text("No billed calls.".into()));
        } else {
            doc.push(Block::Table {
                columns: vec!["user".into(), "calls".into(), "cost".into()],
                rows: self
                    .top_users
                    .iter()
                    .map(|(user, day)| vec![user.clone(), day.calls.to_string(), usd(day.micros)])
                    .collect(),
            });
        }
    }

    /// The month against its budget.
    fn budget_section(&self, doc: &mut Doc) {
        doc.push(Block::Heading(format!("Budget {}", self.month)));
        doc.push(Block::Facts(vec![
            (
                "Month to date".into(),
                format!(
                    "{} of {} ({})",
                    usd(self.month_to_date),
                    usd(self.budget),
                    ratio(self.month_to_date, self.budget)
                ),
            ),
            (
                "Projected month-end".into(),
                format!(
                    "{} ({} of the budget)",
                    usd(self.projected_month_end),
                    ratio(self.projected_month_end, self.budget)
                ),
            ),
        ]));
    }
}

/// The day's OpenAI spend in the ledger beside OpenAI's bill.
fn reconciliation(date: NaiveDate, month: Month, inputs: &Inputs) -> Reconciliation {
    let bill = match &inputs.openai_bill {
        OpenAiBill::NotConfigured => return Reconciliation::NotConfigured,
        OpenAiBill::Unavailable(why) => return Reconciliation::Unavailable(why.clone()),
        OpenAiBill::Read(bill) => bill,
    };
    let ledger: BTreeMap<_, _> =
        reconcile::ledger_by_day_and_model(&inputs.month_costs, month, "openai")
            .into_iter()
            .filter(|((day, _), _)| *day == date)
            .collect();
    let bill: BTreeMap<_, _> = bill
        .iter()
        .filter(|((day, _), _)| *day == date)
        .map(|(key, micros)| (key.clone(), *micros))
        .collect();
    Reconciliation::Compared(
        reconcile::compare(&ledger, &bill, inputs.tolerance_percent)
            .into_iter()
            .next(),
    )
}

impl DailyReport {
    /// The ledger against the providers' own bills.
    fn reconciliation_section(&self, doc: &mut Doc) {
        doc.push(Block::Heading(
            "Reconciliation with the providers' bills".into(),
        ));
        match &self.reconciliation {
            Reconciliation::NotConfigured => {
                doc.push(Block::Text(
                    "OpenAI: not compared; set OPENAI_ADMIN_KEY (an admin key) to compare the \
                     ledger with OpenAI's Costs API."
                        .into(),
                ));
            }
            Reconciliation::Unavailable(why) => {
                doc.push(Block::Text(format!(
                    "OpenAI: could not be compared: {why}."
                )));
            }
            Reconciliation::Compared(None) => {
                doc.push(Block::Text(
                    "OpenAI: nothing spent that day, by the ledger or by OpenAI's bill.".into(),
                ));
            }
            Reconciliation::Compared(Some(day)) => {
                let verdict = if day.differs {
                    format!("DIFFERS by more than {}%", self.tolerance_percent)
                } else {
                    format!("within {}%", self.tolerance_percent)
                };
                doc.push(Block::Facts(vec![
                    ("OpenAI, by the ledger".into(), usd(day.ledger_micros)),
                    ("OpenAI, by its bill".into(), usd(day.provider_micros)),
                    (
                        "Difference".into(),
                        format!(
                            "{} ({verdict})",
                            usd_delta(day.ledger_micros - day.provider_micros)
                        ),
                    ),
                ]));
                doc.push(Block::Table {
                    columns: vec!["model".into(), "ledger".into(), "OpenAI's bill".into()],
                    rows: day
                        .lines
                        .iter()
                        .map(|line| {
                            vec![
                                line.model.clone(),
                                usd(line.ledger_micros),
                                usd(line.provider_micros),
                            ]
                        })
                        .collect(),
                });
            }
        }
        doc.push(Block::Text(
            "Gemini: Google offers no costs API for the Gemini API, so its spend is not compared \
             here; compare it with Google Cloud Billing."
                .into(),
        ));
        doc.push(Block::Note(
            "OpenAI publishes its costs with a delay; the most recent day may still be incomplete \
             there. The ledger counts possibly billed calls at their estimate."
                .into(),
        ));
    }
}

fn per_job(micros: i64, jobs: i64) -> String {
    if jobs == 0 {
        return "n/a".to_string();
    }
    // Rounded up to the micro-dollar, like every cost in the ledger.
    usd((micros + jobs - 1).div_euclid(jobs))
}

fn cost_table(name: &str, figures: &BTreeMap<String, (i64, i64)>) -> Block {
    Block::Table {
        columns: vec![name.to_string(), "calls".into(), "cost".into()],
        rows: figures
            .iter()
            .map(|(key, (micros, calls))| vec![key.clone(), calls.to_string(), usd(*micros)])
            .collect(),
    }
}

/// The report's figures could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the daily statistics: {0}")]
    Stats(#[from] StoreError),
    #[error("cannot read the cost ledger: {0}")]
    Ledger(#[from] LedgerError),
}

/// Reads everything the report of `date` needs.
pub async fn load(stats: &Stats, ledger: &Ledger, date: NaiveDate) -> Result<Inputs, LoadError> {
    let previous = date.pred_opt().unwrap_or(date);
    let month = Month::of(date.and_time(chrono::NaiveTime::MIN).and_utc());
    let previous_month = Month::of(previous.and_time(chrono::NaiveTime::MIN).and_utc());
    let month_costs = ledger.month(month).await?;
    let previous_month_costs = if previous_month == month {
        month_costs.clone()
    } else {
        ledger.month(previous_month).await?
    };
    Ok(Inputs {
        day: stats.day(date).await?,
        previous_day: stats.day(previous).await?,
        month_costs,
        previous_month_costs,
        users: users_of_day(ledger, month, date).await?,
        ..Inputs::default()
    })
}

/// The day's cost and calls per user. The aggregates keep users per month only, so this reads
/// the month's ledger stream; entries are filtered on their own time, not the stream id, so
/// backfilled or rebuilt ledgers count right too.
async fn users_of_day(
    ledger: &Ledger,
    month: Month,
    date: NaiveDate,
) -> Result<BTreeMap<String, UserDay>, LedgerError> {
    let mut users: BTreeMap<String, UserDay> = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let (entries, last) = ledger
            .entries(month, after.as_deref(), LEDGER_BATCH)
            .await?;
        for entry in entries.iter().filter(|entry| entry.at.date_naive() == date) {
            let user = users.entry(entry.user.to_string()).or_default();
            user.micros += entry.cost_micros;
            user.calls += 1;
        }
        match last {
            Some(last) => after = Some(last),
            None => break,
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(pairs: &[(&str, i64)]) -> StatsSnapshot {
        StatsSnapshot {
            fields: pairs.iter().map(|(k, v)| ((*k).to_string(), *v)).collect(),
        }
    }

    fn costs(pairs: &[(&str, i64)]) -> MonthCosts {
        MonthCosts {
            fields: pairs.iter().map(|(k, v)| ((*k).to_string(), *v)).collect(),
        }
    }

    fn policy() -> BudgetPolicy {
        BudgetPolicy {
            monthly_micros: 70_000_000,
            thresholds: vec![80, 100],
            block: false,
        }
    }

    fn inputs() -> Inputs {
        let november = costs(&[
            ("day:04", 100_000),
            ("day:05", 173_475),
            ("cell:04:openai:create", 100_000),
            ("cellcalls:04:openai:create", 2),
            ("cell:05:openai:router", 3_475),
            ("cellcalls:05:openai:router", 3),
            ("cell:05:openai:create", 120_000),
            ("cellcalls:05:openai:create", 2),
            ("cell:05:gemini:edit", 50_000),
            ("cellcalls:05:gemini:edit", 1),
        ]);
        Inputs {
            day: stats(&[
                ("finished:succeeded:create", 5),
                ("finished:succeeded:edit", 1),
                ("finished:failed:create", 1),
                ("finished:needs_clarification:unclear", 1),
                ("fallbacks", 1),
                ("deferrals", 2),
                ("dur:1", 4),
                ("dur:2.5", 3),
                ("dur:30", 1),
            ]),
            previous_day: stats(&[("finished:succeeded:create", 4), ("dur:1", 4)]),
            month_costs: november.clone(),
            previous_month_costs: november,
            users: [
                ("alice", 120_000, 2),
                ("bob", 50_000, 1),
                ("carol<script>", 3_475, 3),
            ]
            .into_iter()
            .map(|(user, micros, calls)| (user.to_string(), UserDay { micros, calls }))
            .collect(),
            openai_bill: OpenAiBill::NotConfigured,
            tolerance_percent: 2.0,
        }
    }

    #[test]
    fn the_report_sets_the_ledger_beside_openais_bill_and_flags_a_day_that_differs() {
        let date = NaiveDate::from_ymd_opt(2026, 11, 5).unwrap();
        let mut inputs = inputs();
        inputs.month_costs.fields.extend([
            ("daymodel:05:openai:gpt-image-2".to_string(), 120_000),
            ("daymodel:05:openai:gpt-4.1-mini".to_string(), 3_475),
            ("daymodel:04:openai:gpt-image-2".to_string(), 100_000),
        ]);
        inputs.openai_bill = OpenAiBill::Read(BTreeMap::from([
            ((date, "gpt-image-2".to_string()), 150_000),
            ((date, "gpt-4.1-mini".to_string()), 3_475),
        ]));
        let report = DailyReport::compute(date, &inputs, &policy());
        let Reconciliation::Compared(Some(day)) = &report.reconciliation else {
            panic!("compared: {:?}", report.reconciliation);
        };
        assert_eq!((day.ledger_micros, day.provider_micros), (123_475, 153_475));
        assert!(day.differs);
        let text = report.doc().text();
        assert!(text.contains("DIFFERS by more than 2%"), "{text}");
        assert!(text.contains("no costs API for the Gemini API"), "{text}");

        inputs.openai_bill = OpenAiBill::NotConfigured;
        let text = DailyReport::compute(date, &inputs, &policy()).doc().text();
        assert!(text.contains("set OPENAI_ADMIN_KEY"), "{text}");
    }

    #[test]
    fn the_figures_of_a_day_come_from_its_stats_and_ledger_aggregates() {
        let date = NaiveDate::from_ymd_opt(2026, 11, 5).unwrap();
        let report = DailyReport::compute(date, &inputs(), &policy());
        assert_eq!(report.jobs.finished, 8);
        assert_eq!(report.jobs.succeeded, 6);
        assert_eq!(report.jobs.p50, Some(1.0), "4 of 8 within 1 s");
        assert_eq!(report.jobs.p95, Some(30.0));
        assert_eq!(report.costs.total, 173_475);
        assert_eq!(report.costs.calls, 6);
        assert_eq!(report.costs.by_provider["openai"], (123_475, 5));
        assert_eq!(report.previous_costs.total, 100_000);
        assert_eq!(report.month_to_date, 273_475);
        // 273,475 over 5 of 30 days, rounded up: 1,640,850.
        assert_eq!(report.projected_month_end, 1_640_850);
        assert_eq!(report.top_users[0].0, "alice");
    }

    #[test]
    fn the_text_states_each_figure_with_the_day_before() {
        let date = NaiveDate::from_ymd_opt(2026, 11, 5).unwrap();
        let text = DailyReport::compute(date, &inputs(), &policy())
            .doc()
            .text();
        for line in [
            "Pictor daily report for Thursday 2026-11-05 (UTC)",
            "  Finished: 8 (day before: 4, +4)",
            "  Success rate: 75.0% (day before: 100.0%, -25.0 pts)",
            "  Error rate: 12.5% (day before: 0.0%, +12.5 pts)",
            "  Response time p50: 1 s (day before: 1 s)",
            "  Response time p95: 30 s (day before: 1 s)",
            "  Clarifications asked: 1 (day before: 0, +1)",
            "  Fallbacks: 1 (day before: 0, +1)",
            "  Rate-limit deferrals: 2 (day before: 0, +2)",
            "  intent   succeeded  failed  needs clarification  canceled  total",
            "  create           5       1                    0         0      6",
            "  edit             1       0                    0         0      1",
            "  unclear          0       0                    1         0      1",
            "  Spent: $0.173475 in 6 calls (day before: $0.10, +$0.073475)",
            "  Cost per finished job: $0.021685",
            "  provider  calls       cost",
            "  gemini        1      $0.05",
            "  openai        5  $0.123475",
            "  router      3  $0.003475",
            "Top users (3 with billed calls)",
            "  alice              2      $0.12",
            "  carol<script>      3  $0.003475",
            "Budget 2026-11",
            "  Month to date: $0.273475 of $70.00 (0.4%)",
            "  Projected month-end: $1.640850 (2.3% of the budget)",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn a_quiet_day_says_so_instead_of_dividing_by_zero() {
        let date = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        let report = DailyReport::compute(date, &Inputs::default(), &policy());
        let text = report.doc().text();
        assert!(
            text.contains("  Success rate: n/a (day before: n/a)"),
            "{text}"
        );
        assert!(
            text.contains("  Response time p95: n/a (day before: n/a)"),
            "{text}"
        );
        assert!(text.contains("No billed calls."), "{text}");
        assert_eq!(
            report.subject(),
            "[Pictor] Daily report 2026-11-01: 0 jobs, n/a succeeded, $0.00 spent"
        );
    }
}
