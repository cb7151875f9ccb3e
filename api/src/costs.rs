//! What Pictor has spent, for operators: `GET /v1/costs/summary` (one month's totals,
//! breakdowns and budget state as JSON) and `GET /v1/costs/export.csv` (the month's billed calls,
//! or its day × provider × agent cells, as a FOCUS-style CSV). Both read the cost ledger
//! (`shared::ledger`) and never touch a job; both are for the `ops` role only.
//!
//! The summary is computed by a pure function, [`summarize`], from the month's aggregate hash, so
//! it costs one Redis read however busy the month was. The per-call CSV is streamed from the
//! ledger stream in batches, so a month of any size never sits in memory.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use shared::domain::{Principal, Role};
use shared::ledger::{BudgetPolicy, LedgerEntry, Month, MonthCosts, project_month_end};
use shared::pricing::format_usd;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use crate::view::micros_to_dollars;

/// Ledger entries read (and CSV rows written) per Redis round trip of the per-call export.
const EXPORT_BATCH: usize = 500;

/// The providers every summary names, spent or not, so a dashboard's series never disappear.
const KNOWN_PROVIDERS: [&str; 2] = ["openai", "gemini"];

#[derive(Debug, Deserialize)]
pub struct CostQuery {
    month: Option<String>,
    granularity: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Summary
// ---------------------------------------------------------------------------------------------

/// The JSON of `GET /v1/costs/summary`. Dollars are `f64` converted from integer micro-dollars
/// at the edge (exact to six decimals); the `_micros` twins are the exact values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostSummary {
    pub month: String,
    pub currency: &'static str,
    pub openai_usd: f64,
    pub gemini_usd: f64,
    pub total_usd: f64,
    pub openai_micros: i64,
    pub gemini_micros: i64,
    pub total_micros: i64,
    /// Billed provider calls.
    pub calls: i64,
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
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DayCost {
    /// `YYYY-MM-DD`.
    pub date: String,
    pub usd: f64,
    pub by_provider: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserCost {
    pub user: String,
    pub usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
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

pub async fn summary(
    State(app): State<AppState>,
    Caller(caller): Caller,
    Query(query): Query<CostQuery>,
) -> Result<Json<CostSummary>, ApiError> {
    require_ops(&caller)?;
    let month = month_of(query.month.as_deref())?;
    let costs = app.ledger.month(month).await?;
    let reserved = app.ledger.reserved(month).await?;
    let today = Utc::now().date_naive();
    Ok(Json(summarize(
        &costs,
        month,
        today,
        reserved,
        app.ledger.policy(),
    )))
}

/// Turns a month's aggregates into the summary as seen on `today`. Pure, so it is tested with a
/// fixed month and date.
pub fn summarize(
    costs: &MonthCosts,
    month: Month,
    today: NaiveDate,
    reserved_micros: i64,
    policy: &BudgetPolicy,
) -> CostSummary {
    let total = costs.total();
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
    }
}

/// The days of `month` shown on `today`: all of a past month, up to today of the current one,
/// none of a future one.
fn by_day(costs: &MonthCosts, month: Month, today: NaiveDate) -> Vec<DayCost> {
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
fn percent_of(spent: i64, budget: i64) -> f64 {
    let budget = i128::from(budget.max(1));
    let tenths = (i128::from(spent) * 1000 + budget / 2).div_euclid(budget);
    // Tenths of a percent of any real spend are far below 2^53, so the cast is exact.
    tenths as f64 / 10.0
}

/// The spend at which `threshold` percent is reached; the same floor as the ledger's record
/// script, so `thresholds_crossed` agrees with the budget events raised.
fn threshold_micros(budget: i64, threshold: u32) -> i64 {
    i64::try_from(i128::from(budget) * i128::from(threshold) / 100).unwrap_or(i64::MAX)
}

/// One day × provider × agent cell of the month's aggregates.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cell {
    day: u32,
    provider: String,
    agent: String,
    micros: i64,
    calls: i64,
}

/// The month's non-empty cells, by day, then provider, then agent.
fn cells(costs: &MonthCosts) -> Vec<Cell> {
    costs
        .family("cell")
        .into_iter()
        .filter_map(|(key, micros)| {
            let mut parts = key.splitn(3, ':');
            let day = parts.next()?.parse::<u32>().ok()?;
            let provider = parts.next()?.to_string();
            let agent = parts.next()?.to_string();
            let calls = costs.get(&format!("cellcalls:{key}"));
            Some(Cell {
                day,
                provider,
                agent,
                micros,
                calls,
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
/// provider-reported token counts, images, size and quality, and the exact integer
/// micro-dollars (`x_CostMicros`), which add up without rounding.
pub const CALL_COLUMNS: [&str; 23] = [
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
];

/// Columns of the daily export: one row per day × provider × agent with any billed call. The
/// charge period is the UTC day (`ChargePeriodEnd` is exclusive, the next midnight, as in FOCUS);
/// the FOCUS columns mean what they mean in [`CALL_COLUMNS`].
pub const DAY_COLUMNS: [&str; 11] = [
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
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Granularity {
    Call,
    Day,
}

impl Granularity {
    fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        match raw.map(str::trim) {
            None | Some("" | "call") => Ok(Self::Call),
            Some("day") => Ok(Self::Day),
            Some(_) => Err(ApiError::unprocessable(
                "invalid_query",
                "granularity must be `call` or `day`",
            )),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Call => "call",
            Self::Day => "day",
        }
    }
}

pub async fn export_csv(
    State(app): State<AppState>,
    Caller(caller): Caller,
    Query(query): Query<CostQuery>,
) -> Result<Response, ApiError> {
    require_ops(&caller)?;
    let month = month_of(query.month.as_deref())?;
    let granularity = Granularity::parse(query.granularity.as_deref())?;
    let body = match granularity {
        Granularity::Call => call_csv(&app, month).await?,
        Granularity::Day => day_csv(&app, month).await?,
    };
    let disposition = format!(
        "attachment; filename=\"pictor-costs-{month}-{}.csv\"",
        granularity.as_str()
    );
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&disposition)
            .map_err(|error| ApiError::Internal(format!("content-disposition: {error}")))?,
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The per-call CSV, streamed: the ledger is read [`EXPORT_BATCH`] entries at a time and each
/// batch becomes one chunk of the body. The first batch is read before answering, so an
/// unreachable Redis is a clean `503` rather than a truncated download; a failure later can only
/// cut the body short, which the client sees as an incomplete transfer.
async fn call_csv(app: &AppState, month: Month) -> Result<Body, ApiError> {
    let ledger = app.ledger.clone();
    let (first, after) = ledger.entries(month, None, EXPORT_BATCH).await?;
    let head = encode(Some(&CALL_COLUMNS), first.iter().map(call_row))
        .map_err(|error| ApiError::Internal(format!("cannot write the csv: {error}")))?;
    // The state is the last stream id read; `None` once the ledger has nothing more.
    let rest = futures::stream::try_unfold(after, move |after| {
        let ledger = ledger.clone();
        async move {
            let Some(after) = after else {
                return Ok(None);
            };
            let (entries, last) = ledger
                .entries(month, Some(&after), EXPORT_BATCH)
                .await
                .inspect_err(|error| {
                    tracing::error!(%error, %month, "Cost export cut short: cannot read the ledger");
                })
                .map_err(std::io::Error::other)?;
            if last.is_none() {
                return Ok(None);
            }
            let chunk =
                encode(None, entries.iter().map(call_row)).map_err(std::io::Error::other)?;
            Ok(Some((chunk, last)))
        }
    });
    let stream =
        futures::stream::once(async move { Ok::<Bytes, std::io::Error>(head) }).chain(rest);
    Ok(Body::from_stream(stream))
}

/// The daily CSV, from the month's aggregates: at most days × providers × agents rows, so it is
/// built in one piece.
async fn day_csv(app: &AppState, month: Month) -> Result<Body, ApiError> {
    let costs = app.ledger.month(month).await?;
    let rows = cells(&costs)
        .into_iter()
        .filter_map(|cell| day_row(month, &cell));
    let bytes = encode(Some(&DAY_COLUMNS), rows)
        .map_err(|error| ApiError::Internal(format!("cannot write the csv: {error}")))?;
    Ok(Body::from(bytes))
}

fn call_row(entry: &LedgerEntry) -> Vec<String> {
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
    ]
}

fn day_row(month: Month, cell: &Cell) -> Option<Vec<String>> {
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
    ])
}

/// The provider's name as people write it, for FOCUS's `ServiceName`.
fn service_name(provider: &str) -> String {
    match provider {
        "openai" => "OpenAI".to_string(),
        "gemini" => "Gemini".to_string(),
        other => other.to_string(),
    }
}

/// Rows (and the header, when given) as RFC 4180 CSV bytes: quoted where needed, CRLF line ends.
fn encode(
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

// ---------------------------------------------------------------------------------------------
// Shared
// ---------------------------------------------------------------------------------------------

fn require_ops(caller: &Principal) -> Result<(), ApiError> {
    if caller.role == Role::Ops {
        Ok(())
    } else {
        Err(ApiError::client(
            StatusCode::FORBIDDEN,
            "forbidden",
            "costs are visible to operators only",
        ))
    }
}

/// `YYYY-MM` (exactly), or the current UTC month when absent.
fn month_of(raw: Option<&str>) -> Result<Month, ApiError> {
    let raw = match raw.map(str::trim) {
        None | Some("") => return Ok(Month::of(Utc::now())),
        Some(raw) => raw,
    };
    let well_formed = raw.len() == 7
        && raw.char_indices().all(|(index, c)| {
            if index == 4 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        });
    well_formed
        .then(|| Month::parse(raw))
        .flatten()
        .ok_or_else(|| {
            ApiError::unprocessable(
                "invalid_query",
                format!("month must be a calendar month written YYYY-MM, not {raw:?}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::domain::{JobId, Usage, UserId};

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
        let summary = summarize(
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
        let past = summarize(
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

        let future = summarize(
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
        let summary = summarize(&exactly, month, date(2026, 11, 30), 0, &policy(false));
        assert_eq!(summary.budget.thresholds_crossed, [50, 80]);
        assert_eq!(summary.budget.percent, 80.0);
        let over = costs(&[("total", 70_000_001)]);
        let summary = summarize(&over, month, date(2026, 11, 30), 0, &policy(false));
        assert_eq!(summary.budget.thresholds_crossed, [50, 80, 100]);
        assert_eq!(summary.budget.percent, 100.0);
    }

    #[test]
    fn months_must_be_written_yyyy_mm() {
        assert_eq!(
            month_of(Some("2026-11")).unwrap(),
            Month::parse("2026-11").unwrap()
        );
        assert_eq!(month_of(None).unwrap(), Month::of(Utc::now()));
        assert_eq!(month_of(Some("")).unwrap(), Month::of(Utc::now()));
        for bad in [
            "2026-13", "2026-00", "2026-1", "26-11", "november", "2026/11", "+2026-1",
        ] {
            assert_eq!(
                month_of(Some(bad)).unwrap_err().code(),
                "invalid_query",
                "{bad}"
            );
        }
    }

    #[test]
    fn only_operators_may_read_costs() {
        let principal = |role| Principal {
            user: UserId::parse("someone").unwrap(),
            role,
        };
        assert!(require_ops(&principal(Role::Ops)).is_ok());
        assert_eq!(
            require_ops(&principal(Role::User)).unwrap_err().code(),
            "forbidden"
        );
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
                "9000000"
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
}
