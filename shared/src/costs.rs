//! The cost figures and CSV rows that both the api (`GET /v1/costs/summary`, `GET
//! /v1/costs/export.csv`) and the scheduler (daily report, monthly export) produce from the
//! cost ledger (`crate::ledger`). Everything here is a pure function of ledger data, so the two
//! cannot disagree about a total, a column or a rounding, and each is tested with fixed inputs.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, Utc};
use serde::Serialize;

use crate::delivery::DeliveryStatus;
use crate::ledger::{BudgetPolicy, LedgerEntry, Month, MonthCosts, project_month_end};
use crate::pricing::{PriceTable, format_usd};

/// The providers every summary names, spent or not, so a dashboard's series never disappear.
pub const KNOWN_PROVIDERS: [&str; 2] = ["openai", "gemini"];

/// Converts integer micro-dollars to a dollar amount for display only.
pub fn micros_to_dollars(micros: i64) -> f64 {
    // Every micro-dollar amount below 2^53 is exactly representable after division rounding to
    // six decimals, which is all JSON consumers will print.
    (micros as f64) / 1_000_000.0
}

// ---------------------------------------------------------------------------------------------
// Summary
// ---------------------------------------------------------------------------------------------

/// The JSON of `GET /v1/costs/summary`. Dollars are `f64` converted from integer micro-dollars
/// at the edge (exact to six decimals); the `_micros` twins are the exact values.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CostSummary {
    pub month: String,
    pub currency: &'static str,
    pub openai_usd: f64,
    pub gemini_usd: f64,
    pub total_usd: f64,
    pub openai_micros: i64,
    pub gemini_micros: i64,
    pub total_micros: i64,
    /// Billed provider calls, the possibly billed ones included.
    pub calls: i64,
    /// Calls whose outcome is unknown (a timeout after the request left, a worker lost with
    /// the call in flight), counted in every total at their estimate.
    pub possibly_billed_calls: i64,
    pub possibly_billed_usd: f64,
    pub possibly_billed_micros: i64,
    pub by_agent: BTreeMap<String, f64>,
    pub by_provider: BTreeMap<String, f64>,
    pub by_model: BTreeMap<String, f64>,
    /// Every day of the month up to today (every day for a past month), zero-filled.
    pub by_day: Vec<DayCost>,
    /// Most expensive first.
    pub by_user: Vec<UserCost>,
    /// Users with at least one billed call this month.
    pub active_users: usize,
    pub average_per_active_user_usd: f64,
    pub budget: BudgetView,
    /// `current` (the month to date) or `ended` (the whole month).
    pub period: &'static str,
    /// Spend by the simulated provider (demo and test runs): priced as the model it stands in
    /// for, counted in every total above, but never billed by OpenAI or Gemini.
    pub simulated_usd: f64,
    pub simulated_micros: i64,
    /// Each provider with its name for people and its simulated share, most expensive first.
    pub providers: Vec<Breakdown>,
    /// Each agent with its name for people, most expensive first.
    pub agents: Vec<Breakdown>,
    /// Each model with its name for people (from the price table's `name`, when it has one)
    /// and its simulated share, most expensive first.
    pub models: Vec<Breakdown>,
    /// Whether the scheduler's reports and alerts reach anyone.
    pub delivery: DeliveryView,
}

/// One row of a breakdown: what people call it next to its id, and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Breakdown {
    /// The id as configured and stored (`gpt-image-2`, `create`, `openai`).
    pub id: String,
    /// Its name for people, when one is known (`GPT Image 2`).
    pub name: Option<String>,
    /// `Name (id)`, or the id alone when it has no name.
    pub label: String,
    /// The billing provider, for models.
    pub provider: Option<String>,
    pub usd: f64,
    pub micros: i64,
    /// The part of `micros` the simulated provider spent.
    pub simulated_micros: i64,
    pub simulated_usd: f64,
}

/// Where the scheduler's reports and alerts go, as its replicas last reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryView {
    /// `ok` (email or Slack is configured, or a `pictor dev` outbox), `outbox_only` (reports
    /// and alerts are only written to the outbox folder) or `no_scheduler` (no scheduler has
    /// reported lately: nothing is sent at all).
    pub status: &'static str,
    pub email: bool,
    pub slack: bool,
    pub dev: bool,
    /// When a scheduler last reported (RFC 3339), if one did lately.
    pub reported_at: Option<String>,
    /// How long a scheduler's report counts: `no_scheduler` means none within this.
    pub silence_minutes: u64,
}

impl DeliveryView {
    /// The view of the latest status, `None` when no scheduler reported within `silence`.
    pub fn of(status: Option<&DeliveryStatus>, silence: std::time::Duration) -> Self {
        let silence_minutes = silence.as_secs().div_ceil(60).max(1);
        match status {
            None => Self {
                status: "no_scheduler",
                email: false,
                slack: false,
                dev: false,
                reported_at: None,
                silence_minutes,
            },
            Some(status) => Self {
                status: if status.silent() { "outbox_only" } else { "ok" },
                email: status.email,
                slack: status.slack,
                dev: status.dev,
                reported_at: Some(status.at.to_rfc3339_opts(SecondsFormat::Secs, true)),
                silence_minutes,
            },
        }
    }
}

/// An agent's name for people.
pub fn agent_name(agent: &str) -> Option<&'static str> {
    match agent {
        "router" => Some("Prompt router"),
        "create" => Some("Image creation"),
        "edit" => Some("Image editing"),
        _ => None,
    }
}

fn label(id: &str, name: Option<&str>) -> String {
    match name {
        Some(name) if name != id => format!("{name} ({id})"),
        _ => id.to_string(),
    }
}

/// What real providers billed per `provider:model`: the `daymodel` fields, which the ledger
/// writes for every call except the simulated provider's (`crate::ledger`).
fn real_by_model(costs: &MonthCosts) -> BTreeMap<String, i64> {
    let mut real = BTreeMap::new();
    for (key, micros) in costs.family("daymodel") {
        // `{DD}:{provider}:{model}`
        if let Some((_, model)) = key.split_once(':') {
            *real.entry(model.to_string()).or_insert(0) += micros;
        }
    }
    real
}

/// The month's simulated spend: everything not billed by a real provider.
pub fn simulated_micros(costs: &MonthCosts) -> i64 {
    let real: i64 = real_by_model(costs).values().sum();
    (costs.total() - real).max(0)
}

fn breakdowns(costs: &MonthCosts, prices: &PriceTable) -> [Vec<Breakdown>; 3] {
    let real = real_by_model(costs);
    let row = |id: String,
               name: Option<String>,
               provider: Option<String>,
               micros: i64,
               simulated: i64| Breakdown {
        label: label(&id, name.as_deref()),
        id,
        name,
        provider,
        usd: micros_to_dollars(micros),
        micros,
        simulated_micros: simulated,
        simulated_usd: micros_to_dollars(simulated),
    };
    let mut models = Vec::new();
    let mut simulated_by_provider: BTreeMap<String, i64> = BTreeMap::new();
    for (key, micros) in costs.family("model") {
        let Some((provider, model)) = key.split_once(':') else {
            continue;
        };
        let simulated = (micros - real.get(&key).copied().unwrap_or(0)).max(0);
        *simulated_by_provider
            .entry(provider.to_string())
            .or_insert(0) += simulated;
        let name = prices.model_name(provider, model).map(str::to_string);
        models.push(row(
            model.to_string(),
            name,
            Some(provider.to_string()),
            micros,
            simulated,
        ));
    }
    let mut providers_spent = costs.family("provider");
    for provider in KNOWN_PROVIDERS {
        providers_spent.entry(provider.to_string()).or_insert(0);
    }
    let mut providers: Vec<Breakdown> = providers_spent
        .into_iter()
        .map(|(provider, micros)| {
            let simulated = simulated_by_provider.get(&provider).copied().unwrap_or(0);
            let name = service_name(&provider);
            row(provider.clone(), Some(name), None, micros, simulated)
        })
        .collect();
    let mut agents: Vec<Breakdown> = costs
        .family("agent")
        .into_iter()
        .map(|(agent, micros)| {
            let name = agent_name(&agent).map(str::to_string);
            row(agent, name, None, micros, 0)
        })
        .collect();
    for rows in [&mut models, &mut providers, &mut agents] {
        rows.sort_by(|a, b| b.micros.cmp(&a.micros).then_with(|| a.id.cmp(&b.id)));
    }
    [providers, agents, models]
}

// ---------------------------------------------------------------------------------------------
// Month over month
// ---------------------------------------------------------------------------------------------

/// The JSON of `GET /v1/costs/months`: one total per month, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MonthsView {
    pub currency: &'static str,
    /// Today's monthly budget (past months are shown against it too).
    pub budget_usd: f64,
    pub budget_micros: i64,
    /// Oldest first, ending with the month asked for.
    pub months: Vec<MonthTotal>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MonthTotal {
    /// `YYYY-MM`.
    pub month: String,
    pub total_usd: f64,
    pub total_micros: i64,
    pub calls: i64,
    pub openai_micros: i64,
    pub gemini_micros: i64,
    /// The simulated provider's part of the total.
    pub simulated_micros: i64,
    /// The part of the total whose calls may or may not have been billed.
    pub possibly_billed_micros: i64,
}

/// The `count` months ending with `last`, oldest first.
pub fn months_ending(last: Month, count: u32) -> Vec<Month> {
    let mut months = Vec::new();
    let mut month = last;
    for _ in 0..count {
        months.push(month);
        month = if month.month == 1 {
            Month {
                year: month.year - 1,
                month: 12,
            }
        } else {
            Month {
                year: month.year,
                month: month.month - 1,
            }
        };
    }
    months.reverse();
    months
}

/// One month's line of [`MonthsView`].
pub fn month_total(costs: &MonthCosts, month: Month) -> MonthTotal {
    MonthTotal {
        month: month.to_string(),
        total_usd: micros_to_dollars(costs.total()),
        total_micros: costs.total(),
        calls: costs.get("calls"),
        openai_micros: costs.get("provider:openai"),
        gemini_micros: costs.get("provider:gemini"),
        simulated_micros: simulated_micros(costs),
        possibly_billed_micros: costs.get("possibly:total"),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DayCost {
    /// `YYYY-MM-DD`.
    pub date: String,
    pub usd: f64,
    pub by_provider: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserCost {
    pub user: String,
    pub usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BudgetView {
    pub budget_usd: f64,
    pub spent_usd: f64,
    /// Held for provider calls in flight.
    pub reserved_usd: f64,
    /// Spent as a percentage of the budget, to one decimal.
    pub percent: f64,
    pub projected_month_end_usd: f64,
    pub budget_micros: i64,
    pub spent_micros: i64,
    pub reserved_micros: i64,
    pub projected_month_end_micros: i64,
    /// The configured alert thresholds, in percent of the budget.
    pub thresholds: Vec<u32>,
    /// The thresholds that spending has reached, by the same rule that raises budget events.
    pub thresholds_crossed: Vec<u32>,
    /// `alert` or `block`.
    pub policy: &'static str,
}

/// Turns a month's aggregates into the summary as seen on `today`. Pure, so it is tested with a
/// fixed month and date.
pub fn summarize(
    costs: &MonthCosts,
    month: Month,
    today: NaiveDate,
    reserved_micros: i64,
    policy: &BudgetPolicy,
    prices: &PriceTable,
    delivery: DeliveryView,
) -> CostSummary {
    let total = costs.total();
    let [providers, agents, models] = breakdowns(costs, prices);
    let simulated = simulated_micros(costs);
    let ended = (today.year(), today.month()) > (month.year, month.month);
    let usd_map = |family: &str| -> BTreeMap<String, f64> {
        costs
            .family(family)
            .into_iter()
            .map(|(name, micros)| (name, micros_to_dollars(micros)))
            .collect()
    };

    let mut by_provider = usd_map("provider");
    for provider in KNOWN_PROVIDERS {
        by_provider.entry(provider.to_string()).or_insert(0.0);
    }
    // Aggregates are keyed `model:{provider}:{model}`; clients want the model's name.
    let mut by_model: BTreeMap<String, f64> = BTreeMap::new();
    for (key, micros) in costs.family("model") {
        let model = key.split_once(':').map_or(key.as_str(), |(_, model)| model);
        *by_model.entry(model.to_string()).or_insert(0.0) += micros_to_dollars(micros);
    }

    let users = costs.family("user");
    let active_users = users.len();
    let mut by_user: Vec<(String, i64)> = users.into_iter().collect();
    by_user.sort_by(|(a_user, a_cost), (b_user, b_cost)| {
        b_cost.cmp(a_cost).then_with(|| a_user.cmp(b_user))
    });
    let average = match i64::try_from(active_users) {
        Ok(active) if active > 0 => (total + active / 2) / active,
        _ => 0,
    };

    let budget = policy.monthly_micros;
    let projected = project_month_end(total, month, today);
    CostSummary {
        month: month.to_string(),
        currency: "USD",
        openai_usd: micros_to_dollars(costs.get("provider:openai")),
        gemini_usd: micros_to_dollars(costs.get("provider:gemini")),
        total_usd: micros_to_dollars(total),
        openai_micros: costs.get("provider:openai"),
        gemini_micros: costs.get("provider:gemini"),
        total_micros: total,
        calls: costs.get("calls"),
        possibly_billed_calls: costs.get("possibly:calls"),
        possibly_billed_usd: micros_to_dollars(costs.get("possibly:total")),
        possibly_billed_micros: costs.get("possibly:total"),
        by_agent: usd_map("agent"),
        by_provider,
        by_model,
        by_day: by_day(costs, month, today),
        by_user: by_user
            .into_iter()
            .map(|(user, micros)| UserCost {
                user,
                usd: micros_to_dollars(micros),
            })
            .collect(),
        active_users,
        average_per_active_user_usd: micros_to_dollars(average),
        budget: BudgetView {
            budget_usd: micros_to_dollars(budget),
            spent_usd: micros_to_dollars(total),
            reserved_usd: micros_to_dollars(reserved_micros),
            percent: percent_of(total, budget),
            projected_month_end_usd: micros_to_dollars(projected),
            budget_micros: budget,
            spent_micros: total,
            reserved_micros,
            projected_month_end_micros: projected,
            thresholds: policy.thresholds.clone(),
            thresholds_crossed: policy
                .thresholds
                .iter()
                .copied()
                .filter(|&threshold| total >= threshold_micros(budget, threshold))
                .collect(),
            policy: if policy.block { "block" } else { "alert" },
        },
        period: if ended { "ended" } else { "current" },
        simulated_usd: micros_to_dollars(simulated),
        simulated_micros: simulated,
        providers,
        agents,
        models,
        delivery,
    }
}

/// The days of `month` shown on `today`: all of a past month, up to today of the current one,
/// none of a future one.
pub fn by_day(costs: &MonthCosts, month: Month, today: NaiveDate) -> Vec<DayCost> {
    let first = month.first_day();
    let shown = if today < first {
        0
    } else if (today.year(), today.month()) == (month.year, month.month) {
        today.day()
    } else {
        month.days()
    };
    let mut per_provider: BTreeMap<u32, BTreeMap<String, i64>> = BTreeMap::new();
    for cell in cells(costs) {
        *per_provider
            .entry(cell.day)
            .or_default()
            .entry(cell.provider)
            .or_insert(0) += cell.micros;
    }
    (1..=shown)
        .filter_map(|day| {
            let date = NaiveDate::from_ymd_opt(month.year, month.month, day)?;
            let mut by_provider: BTreeMap<String, f64> = KNOWN_PROVIDERS
                .iter()
                .map(|provider| ((*provider).to_string(), 0.0))
                .collect();
            for (provider, micros) in per_provider.remove(&day).unwrap_or_default() {
                by_provider.insert(provider, micros_to_dollars(micros));
            }
            Some(DayCost {
                date: date.format("%Y-%m-%d").to_string(),
                usd: micros_to_dollars(costs.get(&format!("day:{day:02}"))),
                by_provider,
            })
        })
        .collect()
}

/// `spent / budget` in percent, rounded half up to one decimal.
pub fn percent_of(spent: i64, budget: i64) -> f64 {
    let budget = i128::from(budget.max(1));
    let tenths = (i128::from(spent) * 1000 + budget / 2).div_euclid(budget);
    // Tenths of a percent of any real spend are far below 2^53, so the cast is exact.
    tenths as f64 / 10.0
}

/// The spend at which `threshold` percent is reached; the same floor as the ledger's record
/// script, so `thresholds_crossed` agrees with the budget events raised.
pub fn threshold_micros(budget: i64, threshold: u32) -> i64 {
    i64::try_from(i128::from(budget) * i128::from(threshold) / 100).unwrap_or(i64::MAX)
}

/// One day × provider × agent cell of the month's aggregates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub day: u32,
    pub provider: String,
    pub agent: String,
    pub micros: i64,
    pub calls: i64,
    /// The share of `micros` that is possibly billed.
    pub possibly_micros: i64,
}

/// The month's non-empty cells, by day, then provider, then agent.
pub fn cells(costs: &MonthCosts) -> Vec<Cell> {
    costs
        .family("cell")
        .into_iter()
        .filter_map(|(key, micros)| {
            let mut parts = key.splitn(3, ':');
            let day = parts.next()?.parse::<u32>().ok()?;
            let provider = parts.next()?.to_string();
            let agent = parts.next()?.to_string();
            let calls = costs.get(&format!("cellcalls:{key}"));
            let possibly_micros = costs.get(&format!("cellpossibly:{key}"));
            Some(Cell {
                day,
                provider,
                agent,
                micros,
                calls,
                possibly_micros,
            })
        })
        .filter(|cell| cell.micros != 0 || cell.calls != 0)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// CSV export
// ---------------------------------------------------------------------------------------------

/// Columns of the per-call export.
///
/// The names follow the FinOps Open Cost and Usage Specification (FOCUS) where one fits, so the
/// file loads into FinOps tools next to cloud bills:
///
/// - `ChargePeriodStart` / `ChargePeriodEnd`: the instant of the call (both the same: a call
///   is a point in time), UTC, `YYYY-MM-DDTHH:MM:SSZ` as FOCUS asks.
/// - `BillingCurrency`: always `USD`, the currency of the price table.
/// - `BilledCost` and `EffectiveCost`: the call's cost in dollars with six decimals. Pictor
///   prices at list rates with no discounts or commitments, so both are the same amount.
/// - `ServiceName`: the provider as people name it (`OpenAI`, `Gemini`).
/// - `ResourceId`: the model called, the billed resource.
/// - `ChargeCategory`: always `Usage` (Pictor has no purchases, taxes or credits).
/// - `ChargeDescription`: which agent made the call, e.g. `create call`.
///
/// The rest are Pictor's own columns, prefixed `x_` as FOCUS requires of custom columns: the
/// job, user, agent and provider of the call, whether the simulated provider stood in, the
/// provider-reported token counts, images, size and quality, the exact integer micro-dollars
/// (`x_CostMicros`), which add up without rounding, and `x_Billing`: `billed`, or
/// `possibly_billed` for a call whose outcome is unknown, costed at its estimate.
pub const CALL_COLUMNS: [&str; 24] = [
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "BillingCurrency",
    "BilledCost",
    "EffectiveCost",
    "ServiceName",
    "ResourceId",
    "ChargeCategory",
    "ChargeDescription",
    "x_JobId",
    "x_User",
    "x_Agent",
    "x_Provider",
    "x_Simulated",
    "x_InputTextTokens",
    "x_InputImageTokens",
    "x_CachedInputTokens",
    "x_OutputTextTokens",
    "x_OutputImageTokens",
    "x_Images",
    "x_Size",
    "x_Quality",
    "x_CostMicros",
    "x_Billing",
];

/// Columns of the daily export: one row per day × provider × agent with any billed call. The
/// charge period is the UTC day (`ChargePeriodEnd` is exclusive, the next midnight, as in FOCUS);
/// the FOCUS columns mean what they mean in [`CALL_COLUMNS`]; `x_PossiblyBilledMicros` is the
/// share of the cost that is possibly billed.
pub const DAY_COLUMNS: [&str; 12] = [
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "BillingCurrency",
    "BilledCost",
    "EffectiveCost",
    "ServiceName",
    "ChargeCategory",
    "x_Provider",
    "x_Agent",
    "x_Calls",
    "x_CostMicros",
    "x_PossiblyBilledMicros",
];

pub fn call_row(entry: &LedgerEntry) -> Vec<String> {
    let usage = &entry.usage;
    let at = entry.at.to_rfc3339_opts(SecondsFormat::Secs, true);
    let cost = format_usd(entry.cost_micros);
    vec![
        at.clone(),
        at,
        "USD".to_string(),
        cost.clone(),
        cost,
        service_name(&usage.provider),
        usage.model.clone(),
        "Usage".to_string(),
        format!("{} call", usage.agent),
        entry.job_id.to_string(),
        entry.user.to_string(),
        usage.agent.clone(),
        usage.provider.clone(),
        usage.simulated.to_string(),
        usage.input_text_tokens.to_string(),
        usage.input_image_tokens.to_string(),
        usage.cached_input_tokens.to_string(),
        usage.output_text_tokens.to_string(),
        usage.output_image_tokens.to_string(),
        usage.images.to_string(),
        usage.size.clone().unwrap_or_default(),
        usage.quality.clone().unwrap_or_default(),
        entry.cost_micros.to_string(),
        entry.billing.as_str().to_string(),
    ]
}

pub fn day_row(month: Month, cell: &Cell) -> Option<Vec<String>> {
    let date = NaiveDate::from_ymd_opt(month.year, month.month, cell.day)?;
    let midnight = |date: NaiveDate| -> Option<String> {
        let at: DateTime<Utc> = date.and_hms_opt(0, 0, 0)?.and_utc();
        Some(at.to_rfc3339_opts(SecondsFormat::Secs, true))
    };
    let cost = format_usd(cell.micros);
    Some(vec![
        midnight(date)?,
        midnight(date.succ_opt()?)?,
        "USD".to_string(),
        cost.clone(),
        cost,
        service_name(&cell.provider),
        "Usage".to_string(),
        cell.provider.clone(),
        cell.agent.clone(),
        cell.calls.to_string(),
        cell.micros.to_string(),
        cell.possibly_micros.to_string(),
    ])
}

/// The provider's name as people write it, for FOCUS's `ServiceName`.
pub fn service_name(provider: &str) -> String {
    match provider {
        "openai" => "OpenAI".to_string(),
        "gemini" => "Gemini".to_string(),
        other => other.to_string(),
    }
}

/// Rows (and the header, when given) as RFC 4180 CSV bytes: quoted where needed, CRLF line ends.
pub fn encode(
    header: Option<&[&str]>,
    rows: impl Iterator<Item = Vec<String>>,
) -> Result<Bytes, csv::Error> {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    if let Some(header) = header {
        writer.write_record(header)?;
    }
    for row in rows {
        writer.write_record(&row)?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|error| csv::Error::from(error.into_error()))?;
    Ok(Bytes::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{JobId, Usage, UserId};
    use crate::ledger::Billing;

    fn costs(fields: &[(&str, i64)]) -> MonthCosts {
        MonthCosts {
            fields: fields
                .iter()
                .map(|(field, value)| ((*field).to_string(), *value))
                .collect(),
        }
    }

    fn november() -> MonthCosts {
        costs(&[
            ("total", 60_000_000),
            ("calls", 5),
            ("day:02", 10_000_000),
            ("day:05", 50_000_000),
            ("provider:openai", 45_000_000),
            ("provider:gemini", 15_000_000),
            ("agent:router", 1_000_000),
            ("agent:create", 44_000_000),
            ("agent:edit", 15_000_000),
            ("model:openai:gpt-4.1-mini", 1_000_000),
            ("model:openai:gpt-image-2", 44_000_000),
            ("model:gemini:gemini-2.5-flash-image", 15_000_000),
            ("user:alice", 20_000_000),
            ("user:bob", 40_000_000),
            ("user:carol", 0),
            ("cell:02:openai:router", 1_000_000),
            ("cell:02:openai:create", 9_000_000),
            ("cellcalls:02:openai:router", 1),
            ("cellcalls:02:openai:create", 1),
            ("cell:05:openai:create", 35_000_000),
            ("cell:05:gemini:edit", 15_000_000),
            ("cellcalls:05:openai:create", 2),
            ("cellcalls:05:gemini:edit", 1),
        ])
    }

    fn summary_of(
        costs: &MonthCosts,
        month: Month,
        today: NaiveDate,
        reserved: i64,
        policy: &BudgetPolicy,
    ) -> CostSummary {
        let delivery = DeliveryView::of(None, std::time::Duration::from_secs(60));
        summarize(
            costs,
            month,
            today,
            reserved,
            policy,
            &PriceTable::shipped().unwrap(),
            delivery,
        )
    }

    fn policy(block: bool) -> BudgetPolicy {
        BudgetPolicy {
            monthly_micros: 70_000_000,
            thresholds: vec![50, 80, 100],
            block,
        }
    }

    fn date(year: i32, month: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(year, month, day).unwrap()
    }

    #[test]
    fn a_summary_totals_and_breaks_down_the_month_as_of_today() {
        let month = Month::parse("2026-11").unwrap();
        let summary = summary_of(
            &november(),
            month,
            date(2026, 11, 10),
            250_000,
            &policy(false),
        );

        assert_eq!(summary.month, "2026-11");
        assert_eq!(summary.currency, "USD");
        assert_eq!(summary.total_micros, 60_000_000);
        assert_eq!(summary.total_usd, 60.0);
        assert_eq!(summary.openai_usd, 45.0);
        assert_eq!(summary.gemini_micros, 15_000_000);
        assert_eq!(summary.calls, 5);
        assert_eq!(summary.by_agent["create"], 44.0);
        assert_eq!(summary.by_provider.len(), 2);
        assert_eq!(summary.by_model["gpt-image-2"], 44.0);
        assert_eq!(summary.by_model["gemini-2.5-flash-image"], 15.0);

        // Ten days shown, zero-filled, each split by provider.
        assert_eq!(summary.by_day.len(), 10);
        assert_eq!(summary.by_day[0].date, "2026-11-01");
        assert_eq!(summary.by_day[0].usd, 0.0);
        assert_eq!(summary.by_day[0].by_provider["gemini"], 0.0);
        assert_eq!(summary.by_day[1].usd, 10.0);
        assert_eq!(summary.by_day[1].by_provider["openai"], 10.0);
        assert_eq!(summary.by_day[4].by_provider["openai"], 35.0);
        assert_eq!(summary.by_day[4].by_provider["gemini"], 15.0);
        assert_eq!(summary.by_day[9].date, "2026-11-10");

        let users: Vec<(&str, f64)> = summary
            .by_user
            .iter()
            .map(|u| (u.user.as_str(), u.usd))
            .collect();
        assert_eq!(users, [("bob", 40.0), ("alice", 20.0), ("carol", 0.0)]);
        assert_eq!(summary.active_users, 3);
        assert_eq!(summary.average_per_active_user_usd, 20.0);

        let budget = &summary.budget;
        assert_eq!(budget.budget_usd, 70.0);
        assert_eq!(budget.spent_usd, 60.0);
        assert_eq!(budget.reserved_usd, 0.25);
        // 60 / 70 = 85.714...%
        assert_eq!(budget.percent, 85.7);
        // $60 in 10 of 30 days -> $180.
        assert_eq!(budget.projected_month_end_micros, 180_000_000);
        assert_eq!(budget.thresholds, [50, 80, 100]);
        assert_eq!(budget.thresholds_crossed, [50, 80]);
        assert_eq!(budget.policy, "alert");
    }

    #[test]
    fn a_past_month_shows_every_day_and_a_future_month_none() {
        let month = Month::parse("2026-02").unwrap();
        let past = summary_of(
            &MonthCosts::default(),
            month,
            date(2026, 5, 1),
            0,
            &policy(true),
        );
        assert_eq!(past.by_day.len(), 28);
        assert_eq!(past.by_day[27].date, "2026-02-28");
        assert_eq!(past.budget.policy, "block");
        assert_eq!(past.budget.percent, 0.0);
        assert!(past.budget.thresholds_crossed.is_empty());
        assert_eq!(past.by_provider["openai"], 0.0);
        assert_eq!(past.by_provider["gemini"], 0.0);
        assert_eq!(past.active_users, 0);
        assert_eq!(past.average_per_active_user_usd, 0.0);

        let future = summary_of(
            &MonthCosts::default(),
            month,
            date(2026, 1, 31),
            0,
            &policy(false),
        );
        assert!(future.by_day.is_empty());
        assert_eq!(future.budget.projected_month_end_micros, 0);
    }

    #[test]
    fn a_threshold_counts_as_crossed_exactly_at_its_share_of_the_budget() {
        let month = Month::parse("2026-11").unwrap();
        let exactly = costs(&[("total", 56_000_000)]);
        let summary = summary_of(&exactly, month, date(2026, 11, 30), 0, &policy(false));
        assert_eq!(summary.budget.thresholds_crossed, [50, 80]);
        assert_eq!(summary.budget.percent, 80.0);
        let over = costs(&[("total", 70_000_001)]);
        let summary = summary_of(&over, month, date(2026, 11, 30), 0, &policy(false));
        assert_eq!(summary.budget.thresholds_crossed, [50, 80, 100]);
        assert_eq!(summary.budget.percent, 100.0);
    }

    #[test]
    fn a_call_row_maps_a_ledger_entry_to_focus_columns() {
        let entry = LedgerEntry {
            at: DateTime::parse_from_rfc3339("2026-11-05T09:30:12.345678Z")
                .unwrap()
                .with_timezone(&Utc),
            job_id: JobId::new(),
            user: UserId::parse("alice").unwrap(),
            usage: Usage {
                agent: "create".into(),
                provider: "openai".into(),
                model: "gpt-image-2".into(),
                input_text_tokens: 10,
                output_image_tokens: 2112,
                images: 2,
                size: Some("1024x1024".into()),
                quality: Some("medium".into()),
                ..Usage::default()
            },
            cost_micros: 63_410,
            billing: Billing::Billed,
        };
        let bytes = encode(Some(&CALL_COLUMNS), std::iter::once(call_row(&entry))).unwrap();
        let mut reader = csv::Reader::from_reader(bytes.as_ref());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(header, CALL_COLUMNS);
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 1);
        let field = |name: &str| {
            let index = CALL_COLUMNS.iter().position(|c| *c == name).unwrap();
            rows[0][index].to_string()
        };
        assert_eq!(field("ChargePeriodStart"), "2026-11-05T09:30:12Z");
        assert_eq!(field("ChargePeriodEnd"), "2026-11-05T09:30:12Z");
        assert_eq!(field("BillingCurrency"), "USD");
        assert_eq!(field("BilledCost"), "0.063410");
        assert_eq!(field("EffectiveCost"), "0.063410");
        assert_eq!(field("ServiceName"), "OpenAI");
        assert_eq!(field("ResourceId"), "gpt-image-2");
        assert_eq!(field("ChargeCategory"), "Usage");
        assert_eq!(field("ChargeDescription"), "create call");
        assert_eq!(field("x_JobId"), entry.job_id.to_string());
        assert_eq!(field("x_Simulated"), "false");
        assert_eq!(field("x_OutputImageTokens"), "2112");
        assert_eq!(field("x_Size"), "1024x1024");
        assert_eq!(field("x_CostMicros"), "63410");
        assert!(bytes.ends_with(b"\r\n"), "RFC 4180 lines end in CRLF");
    }

    #[test]
    fn day_rows_cover_each_non_empty_cell_and_end_at_the_next_midnight() {
        let month = Month::parse("2026-11").unwrap();
        let mut fields = november();
        fields.fields.insert("cell:30:gemini:edit".into(), 5);
        fields.fields.insert("cellcalls:30:gemini:edit".into(), 1);
        fields.fields.insert("cell:06:gemini:edit".into(), 0);
        fields.fields.insert("cellcalls:06:gemini:edit".into(), 0);
        let rows: Vec<Vec<String>> = cells(&fields)
            .iter()
            .filter_map(|cell| day_row(month, cell))
            .collect();
        assert_eq!(rows.len(), 5, "the empty cell of the 6th is left out");
        assert_eq!(
            rows[0],
            [
                "2026-11-02T00:00:00Z",
                "2026-11-03T00:00:00Z",
                "USD",
                "9.000000",
                "9.000000",
                "OpenAI",
                "Usage",
                "openai",
                "create",
                "1",
                "9000000",
                "0"
            ]
        );
        let last = rows.last().unwrap();
        assert_eq!(last[0], "2026-11-30T00:00:00Z");
        assert_eq!(last[1], "2026-12-01T00:00:00Z");
        assert_eq!(last[5], "Gemini");
        let total: i64 = rows.iter().map(|row| row[10].parse::<i64>().unwrap()).sum();
        assert_eq!(total, 60_000_005);
    }

    #[test]
    fn a_batch_without_a_header_is_only_rows() {
        let bytes = encode(None, std::iter::once(vec!["a,b".to_string(), "c".into()])).unwrap();
        assert_eq!(bytes.as_ref(), b"\"a,b\",c\r\n");
        let empty = encode(Some(&DAY_COLUMNS), std::iter::empty()).unwrap();
        assert_eq!(
            empty.as_ref(),
            format!("{}\r\n", DAY_COLUMNS.join(",")).as_bytes()
        );
    }

    #[test]
    fn breakdowns_name_what_they_can_and_flag_simulated_spend() {
        let month = Month::parse("2026-11").unwrap();
        let mut fields = november();
        // Of gpt-image-2's $44, $40 was billed by OpenAI itself; the rest was simulated. The
        // router and Gemini calls were all simulated.
        fields
            .fields
            .insert("daymodel:05:openai:gpt-image-2".into(), 30_000_000);
        fields
            .fields
            .insert("daymodel:02:openai:gpt-image-2".into(), 10_000_000);
        fields.fields.insert("model:openai:my-own-model".into(), 0);
        let summary = summary_of(&fields, month, date(2026, 11, 10), 0, &policy(false));
        assert_eq!(summary.simulated_micros, 20_000_000);
        assert_eq!(summary.period, "current");

        let model = |id: &str| summary.models.iter().find(|m| m.id == id).unwrap().clone();
        let image = model("gpt-image-2");
        assert_eq!(image.label, "GPT Image 2 (gpt-image-2)");
        assert_eq!(image.provider.as_deref(), Some("openai"));
        assert_eq!(image.micros, 44_000_000);
        assert_eq!(image.simulated_micros, 4_000_000);
        assert_eq!(model("gemini-2.5-flash-image").simulated_micros, 15_000_000);
        let unnamed = model("my-own-model");
        assert_eq!(
            (unnamed.name, unnamed.label.as_str()),
            (None, "my-own-model")
        );
        assert_eq!(summary.models[0].id, "gpt-image-2", "most expensive first");

        let openai = &summary.providers[0];
        assert_eq!(
            (openai.id.as_str(), openai.label.as_str()),
            ("openai", "OpenAI (openai)")
        );
        assert_eq!(openai.simulated_micros, 5_000_000);
        assert_eq!(summary.providers[1].simulated_micros, 15_000_000);
        let agents: Vec<&str> = summary.agents.iter().map(|a| a.label.as_str()).collect();
        assert_eq!(
            agents,
            [
                "Image creation (create)",
                "Image editing (edit)",
                "Prompt router (router)"
            ]
        );

        let ended = summary_of(&fields, month, date(2026, 12, 1), 0, &policy(false));
        assert_eq!(ended.period, "ended");
    }

    #[test]
    fn delivery_says_whether_anyone_is_told() {
        let minute = std::time::Duration::from_secs(60);
        let status = |email, slack, dev| DeliveryStatus {
            email,
            slack,
            dev,
            at: DateTime::parse_from_rfc3339("2026-11-05T09:30:12Z")
                .unwrap()
                .with_timezone(&Utc),
        };
        let none = DeliveryView::of(None, minute);
        assert_eq!((none.status, none.silence_minutes), ("no_scheduler", 1));
        let outbox = DeliveryView::of(Some(&status(false, false, false)), minute * 4);
        assert_eq!(outbox.status, "outbox_only");
        assert_eq!(outbox.silence_minutes, 4);
        assert_eq!(outbox.reported_at.as_deref(), Some("2026-11-05T09:30:12Z"));
        for (email, slack, dev) in [
            (true, false, false),
            (false, true, false),
            (false, false, true),
        ] {
            let view = DeliveryView::of(Some(&status(email, slack, dev)), minute);
            assert_eq!(view.status, "ok");
        }
    }

    #[test]
    fn month_over_month_counts_back_across_a_year_end() {
        let months: Vec<String> = months_ending(Month::parse("2027-02").unwrap(), 4)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(months, ["2026-11", "2026-12", "2027-01", "2027-02"]);
        let total = month_total(&november(), Month::parse("2026-11").unwrap());
        assert_eq!(total.month, "2026-11");
        assert_eq!(total.total_micros, 60_000_000);
        assert_eq!(total.calls, 5);
        assert_eq!(
            total.simulated_micros, 60_000_000,
            "no daymodel: all simulated"
        );
    }
}
