//! What Pictor has spent, for operators: `GET /v1/costs/summary` (one month's totals,
//! breakdowns and budget state as JSON, and whether the scheduler's reports reach anyone),
//! `GET /v1/costs/months` (month-over-month totals) and `GET /v1/costs/export.csv` (the month's
//! billed calls, or its day × provider × agent cells, as a FOCUS-style CSV). All read the cost
//! ledger (`shared::ledger`) and never touch a job; all are for the `ops` role only. A month
//! still to come is refused (`422 invalid_query`): it has no costs, and asking for one is a
//! mistake worth saying.
//!
//! The figures and rows themselves are pure functions in `shared::costs`, which the scheduler's
//! reports and monthly export use too. The summary costs one Redis read however busy the month
//! was; the per-call CSV is streamed from the ledger stream in batches, so a month of any size
//! never sits in memory.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::StreamExt;
use serde::Deserialize;
use shared::costs::{
    CALL_COLUMNS, CostSummary, DAY_COLUMNS, DeliveryView, MonthsView, call_row, cells, day_row,
    encode, month_total, months_ending, summarize,
};
use shared::delivery::DeliveryStatus;
use shared::domain::{Principal, Role};
use shared::ledger::Month;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::extract::Query;
use crate::openapi::{InternalError, Unauthorized, Unavailable};
use crate::state::AppState;

/// Ledger entries read (and CSV rows written) per Redis round trip of the per-call export.
const EXPORT_BATCH: usize = 500;

/// The scheduler's default tick: its delivery status lapses after [`DeliveryStatus::ttl`] of it.
const SCHEDULER_TICK: std::time::Duration = std::time::Duration::from_secs(15);

/// Months `GET /v1/costs/months` shows at most.
const MAX_MONTHS: u32 = 36;

#[derive(Debug, Deserialize)]
pub struct CostQuery {
    month: Option<String>,
    granularity: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct MonthsQuery {
    month: Option<String>,
    count: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/costs/summary",
    tag = "costs",
    operation_id = "costs_summary",
    summary = "A month's costs",
    description = "One month's spending: totals, breakdowns by agent, provider, model, day and \
        user (with names for people next to the ids), the simulated provider's share, the \
        budget's state, and whether the scheduler's reports and alerts reach anyone \
        (`delivery`). Needs a key with the `ops` role.",
    security(("api_key" = [])),
    params(
        ("month" = Option<String>, Query, pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$",
            description = "`YYYY-MM` (UTC); the current month when absent. Not a month to come."),
    ),
    responses(
        (status = 200, description = "The month's costs.", body = CostSummary),
        (status = 401, response = Unauthorized),
        (status = 403, description = "`forbidden`: the key's role is not `ops`.", body = ErrorBody),
        (status = 422, description = "`invalid_query`: a bad `month`, or one still to come.", body = ErrorBody),
        (status = 500, response = InternalError),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn summary(
    State(app): State<AppState>,
    Caller(caller): Caller,
    Query(query): Query<CostQuery>,
) -> Result<Json<CostSummary>, ApiError> {
    require_ops(&caller)?;
    let month = month_of(query.month.as_deref())?;
    let costs = app.ledger.month(month).await?;
    let reserved = app.ledger.reserved(month).await?;
    let redis = app.store.redis();
    let delivery = DeliveryStatus::read(&redis.connection(), redis.keys())
        .await
        .map_err(|error| ApiError::from(shared::ledger::LedgerError::from(error)))?;
    let today = Utc::now().date_naive();
    Ok(Json(summarize(
        &costs,
        month,
        today,
        reserved,
        app.ledger.policy(),
        &app.prices,
        DeliveryView::of(delivery.as_ref(), DeliveryStatus::ttl(SCHEDULER_TICK)),
    )))
}

#[utoipa::path(
    get,
    path = "/v1/costs/months",
    tag = "costs",
    operation_id = "costs_months",
    summary = "Month-over-month totals",
    description = "The total of each of the last `count` months (12 by default, at most 36), \
        oldest first, ending with `month`, with the simulated and possibly billed parts, \
        against today's monthly budget. Needs a key with the `ops` role.",
    security(("api_key" = [])),
    params(
        ("month" = Option<String>, Query, pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$",
            description = "The last month shown, `YYYY-MM` (UTC); the current month when absent. \
                Not a month to come."),
        ("count" = Option<u32>, Query, minimum = 1, maximum = 36,
            description = "How many months; 12 when absent."),
    ),
    responses(
        (status = 200, description = "One total per month, oldest first.", body = MonthsView),
        (status = 401, response = Unauthorized),
        (status = 403, description = "`forbidden`: the key's role is not `ops`.", body = ErrorBody),
        (status = 422, description = "`invalid_query`: a bad `month` or `count`.", body = ErrorBody),
        (status = 500, response = InternalError),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn months(
    State(app): State<AppState>,
    Caller(caller): Caller,
    Query(query): Query<MonthsQuery>,
) -> Result<Json<MonthsView>, ApiError> {
    require_ops(&caller)?;
    let last = month_of(query.month.as_deref())?;
    let count = count_of(query.count.as_deref())?;
    let months = months_ending(last, count);
    let costs =
        futures::future::try_join_all(months.iter().map(|month| app.ledger.month(*month))).await?;
    let budget = app.ledger.policy().monthly_micros;
    Ok(Json(MonthsView {
        currency: "USD",
        budget_usd: shared::costs::micros_to_dollars(budget),
        budget_micros: budget,
        months: months
            .iter()
            .zip(&costs)
            .map(|(month, costs)| month_total(costs, *month))
            .collect(),
    }))
}

/// `1..=MAX_MONTHS`, 12 when absent.
fn count_of(raw: Option<&str>) -> Result<u32, ApiError> {
    match raw.map(str::trim) {
        None | Some("") => Ok(12),
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|count| (1..=MAX_MONTHS).contains(count))
            .ok_or_else(|| {
                ApiError::client(
                    ErrorCode::InvalidQuery,
                    format!("count must be a whole number from 1 to {MAX_MONTHS}, not {raw:?}"),
                )
            }),
    }
}

// ---------------------------------------------------------------------------------------------
// CSV export
// ---------------------------------------------------------------------------------------------

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
            Some(_) => Err(ApiError::client(
                ErrorCode::InvalidQuery,
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

#[utoipa::path(
    get,
    path = "/v1/costs/export.csv",
    tag = "costs",
    operation_id = "costs_export",
    summary = "Export a month's costs as CSV",
    description = "The month's billed provider calls (`granularity=call`, streamed) or its \
        day × provider × agent cells (`granularity=day`) as a FOCUS-style CSV. Needs a key with \
        the `ops` role.",
    security(("api_key" = [])),
    params(
        ("month" = Option<String>, Query, pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$",
            description = "`YYYY-MM` (UTC); the current month when absent. Not a month to come."),
        ("granularity" = Option<String>, Query, pattern = "^(call|day)$",
            description = "`call` (default) or `day`."),
    ),
    responses(
        (status = 200, description = "The CSV.", body = String, content_type = "text/csv",
            headers(
                ("Content-Disposition" = String, description = "`attachment` with a file name."),
                ("Cache-Control" = String, description = "`no-store`."),
            )),
        (status = 401, response = Unauthorized),
        (status = 403, description = "`forbidden`: the key's role is not `ops`.", body = ErrorBody),
        (status = 422, description = "`invalid_query`: a bad `month` (or one still to come) or `granularity`.", body = ErrorBody),
        (status = 500, response = InternalError),
        (status = 503, response = Unavailable),
    ),
)]
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

// ---------------------------------------------------------------------------------------------
// Shared
// ---------------------------------------------------------------------------------------------

fn require_ops(caller: &Principal) -> Result<(), ApiError> {
    if caller.role == Role::Ops {
        Ok(())
    } else {
        Err(ApiError::client(
            ErrorCode::Forbidden,
            "costs are visible to operators only",
        ))
    }
}

/// `YYYY-MM` (exactly) and not after the current UTC month, or the current month when absent.
fn month_of(raw: Option<&str>) -> Result<Month, ApiError> {
    let current = Month::of(Utc::now());
    let raw = match raw.map(str::trim) {
        None | Some("") => return Ok(current),
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
    let month = well_formed
        .then(|| Month::parse(raw))
        .flatten()
        .ok_or_else(|| {
            ApiError::client(
                ErrorCode::InvalidQuery,
                format!("month must be a calendar month written YYYY-MM, not {raw:?}"),
            )
        })?;
    if month > current {
        return Err(ApiError::client(
            ErrorCode::InvalidQuery,
            format!(
                "month {month} has not begun yet: costs exist up to the current month, {current}"
            ),
        ));
    }
    Ok(month)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::domain::UserId;

    #[test]
    fn months_must_be_written_yyyy_mm() {
        assert_eq!(
            month_of(Some("2026-11")).unwrap(),
            Month::parse("2026-11").unwrap()
        );
        assert_eq!(month_of(None).unwrap(), Month::of(Utc::now()));
        assert_eq!(month_of(Some("")).unwrap(), Month::of(Utc::now()));
        let next_year = Month::of(Utc::now()).year + 1;
        let future = format!("{next_year}-01");
        let error = month_of(Some(&future)).unwrap_err();
        assert_eq!(error.code(), ErrorCode::InvalidQuery);
        assert!(error.to_string().contains("has not begun"), "{error}");
        for bad in [
            "2026-13", "2026-00", "2026-1", "26-11", "november", "2026/11", "+2026-1",
        ] {
            assert_eq!(
                month_of(Some(bad)).unwrap_err().code(),
                ErrorCode::InvalidQuery,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_count_of_months_is_bounded() {
        assert_eq!(count_of(None).unwrap(), 12);
        assert_eq!(count_of(Some("1")).unwrap(), 1);
        assert_eq!(count_of(Some("36")).unwrap(), 36);
        for bad in ["0", "37", "-1", "twelve", "1.5"] {
            assert_eq!(
                count_of(Some(bad)).unwrap_err().code(),
                ErrorCode::InvalidQuery
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
            ErrorCode::Forbidden
        );
    }
}
