//! Reconciliation of the cost ledger with the providers' own bills. OpenAI publishes its bill
//! through the organization Costs API (`GET /v1/organization/costs`, an admin key, daily buckets
//! grouped by line item; `docs/providers.md`, section 8); [`OpenAiCosts`] reads it, and
//! [`compare`] sets it beside the ledger's spend per day and model and flags the days that
//! differ by more than the tolerance. Gemini has no costs API, so its spend is not compared
//! here (its bill is in Google Cloud Billing).
//!
//! OpenAI's line items are free text such as `"gpt-image-2-2026-04-21 image, output"`;
//! [`model_of_line_item`] reduces them to the model as Pictor's price table names it, which is
//! the best that can be done with a format OpenAI does not document.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::ledger::{Month, MonthCosts};

/// Differences below this many micro-dollars (a cent) are never flagged: OpenAI's float
/// amounts and rounding on tiny days would otherwise raise noise.
const NOISE_MICROS: i64 = 10_000;

/// Buckets (days) asked for per page: a month fits in one.
const PAGE_DAYS: u32 = 31;

/// Pages read at most (a month is one or two; a broken cursor must not loop for ever).
const MAX_PAGES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("the OpenAI Costs API is unreachable: {0}")]
    Unreachable(String),
    #[error("the OpenAI Costs API refused the admin key (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the OpenAI Costs API answered HTTP {status}: {message}")]
    Failed { status: u16, message: String },
    #[error("the OpenAI Costs API answer does not read: {0}")]
    Malformed(String),
}

/// The client of OpenAI's organization Costs API.
pub struct OpenAiCosts {
    http: reqwest::Client,
    /// E.g. `https://api.openai.com/v1`, without a trailing slash.
    base_url: String,
    admin_key: SecretString,
}

impl OpenAiCosts {
    pub fn new(base_url: &url::Url, admin_key: SecretString) -> Result<Self, ReconcileError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|error| ReconcileError::Unreachable(error.to_string()))?;
        Ok(Self {
            http,
            base_url: base_url.as_str().trim_end_matches('/').to_string(),
            admin_key,
        })
    }

    /// OpenAI's cost per UTC day and model from `from` to `until` (exclusive), in micro-dollars.
    pub async fn by_day_and_model(
        &self,
        from: NaiveDate,
        until: NaiveDate,
    ) -> Result<BTreeMap<(NaiveDate, String), i64>, ReconcileError> {
        let start = midnight(from).timestamp();
        let end = midnight(until).timestamp();
        let mut costs = BTreeMap::new();
        let mut page: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let answer = self.page(start, end, page.as_deref()).await?;
            let empty = answer.data.is_empty();
            for bucket in answer.data {
                let Some(day) = Utc.timestamp_opt(bucket.start_time, 0).single() else {
                    continue;
                };
                for result in bucket.results {
                    let model = result
                        .line_item
                        .as_deref()
                        .map_or_else(|| "(no line item)".to_string(), model_of_line_item);
                    *costs.entry((day.date_naive(), model)).or_insert(0) +=
                        result.amount.micros()?;
                }
            }
            // An empty page may still say `has_more` with a cursor that then fails: stop.
            match answer.next_page {
                Some(next) if answer.has_more && !empty => page = Some(next),
                _ => return Ok(costs),
            }
        }
        Ok(costs)
    }

    async fn page(
        &self,
        start: i64,
        end: i64,
        page: Option<&str>,
    ) -> Result<CostsPage, ReconcileError> {
        let mut query: Vec<(&str, String)> = vec![
            ("start_time", start.to_string()),
            ("end_time", end.to_string()),
            ("bucket_width", "1d".to_string()),
            ("group_by[]", "line_item".to_string()),
            ("limit", PAGE_DAYS.to_string()),
        ];
        if let Some(page) = page {
            query.push(("page", page.to_string()));
        }
        let mut url = url::Url::parse(&format!("{}/organization/costs", self.base_url))
            .map_err(|error| ReconcileError::Unreachable(error.to_string()))?;
        url.query_pairs_mut().extend_pairs(&query);
        let response = self
            .http
            .get(url)
            .bearer_auth(self.admin_key.expose_secret())
            .send()
            .await
            .map_err(|error| ReconcileError::Unreachable(error.to_string()))?;
        let status = response.status().as_u16();
        let body = read_capped(response).await?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<ErrorBody>(&body)
                .map(|error| error.error.message)
                .unwrap_or_else(|_| body.chars().take(300).collect())
                .replace(self.admin_key.expose_secret(), "[redacted]");
            return Err(if matches!(status, 401 | 403) {
                ReconcileError::Refused { status, message }
            } else {
                ReconcileError::Failed { status, message }
            });
        }
        serde_json::from_str(&body).map_err(|error| ReconcileError::Malformed(error.to_string()))
    }
}

/// The most of an answer read: a month of days grouped by line item is a few hundred KiB.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// The answer's body as text, refusing one larger than [`MAX_ANSWER_BYTES`].
async fn read_capped(mut response: reqwest::Response) -> Result<String, ReconcileError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|error| ReconcileError::Unreachable(error.to_string()))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(ReconcileError::Malformed(format!(
                "the answer is larger than {MAX_ANSWER_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn midnight(date: NaiveDate) -> DateTime<Utc> {
    date.and_time(chrono::NaiveTime::MIN).and_utc()
}

#[derive(Debug, Deserialize)]
struct CostsPage {
    #[serde(default)]
    data: Vec<Bucket>,
    #[serde(default)]
    has_more: bool,
    next_page: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Bucket {
    start_time: i64,
    #[serde(default)]
    results: Vec<CostResult>,
}

#[derive(Debug, Deserialize)]
struct CostResult {
    amount: Amount,
    line_item: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Amount {
    /// Dollars, as a JSON number (some answers carry a numeric string).
    value: serde_json::Value,
}

impl Amount {
    fn micros(&self) -> Result<i64, ReconcileError> {
        let dollars = match &self.value {
            serde_json::Value::Number(number) => number.as_f64(),
            serde_json::Value::String(text) => text.trim().parse::<f64>().ok(),
            _ => None,
        }
        .filter(|dollars| dollars.is_finite() && dollars.abs() < 1e12)
        .ok_or_else(|| ReconcileError::Malformed(format!("amount {} is not a sum", self.value)))?;
        // Bounded above, so the product fits an i64 exactly enough for a comparison in cents.
        Ok((dollars * 1_000_000.0).round() as i64)
    }
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorMessage,
}

#[derive(Debug, Deserialize)]
struct ErrorMessage {
    message: String,
}

/// The model a line item bills, as the price table names it: `"batch | gpt-4.1-mini-2025-04-14,
/// cached input"` is `gpt-4.1-mini`, `"gpt-image-2 image, output"` is `gpt-image-2`. An item that
/// is not a model's (`"web search tool calls"`) stays as it is.
pub fn model_of_line_item(item: &str) -> String {
    let item = item.rsplit(" | ").next().unwrap_or(item);
    let item = item.split(',').next().unwrap_or(item).trim();
    let item = ["image", "text", "audio"]
        .iter()
        .find_map(|modality| item.strip_suffix(&format!(" {modality}")))
        .unwrap_or(item);
    strip_date(item).to_string()
}

/// `gpt-4.1-mini-2025-04-14` → `gpt-4.1-mini`.
fn strip_date(model: &str) -> &str {
    let bytes = model.as_bytes();
    if bytes.len() > 11 {
        let (head, tail) = model.split_at(model.len() - 11);
        let tail = tail.as_bytes();
        let digits = |range: std::ops::Range<usize>| tail[range].iter().all(u8::is_ascii_digit);
        if tail[0] == b'-'
            && tail[5] == b'-'
            && tail[8] == b'-'
            && digits(1..5)
            && digits(6..8)
            && digits(9..11)
        {
            return head;
        }
    }
    model
}

/// The ledger's spend on `provider` per day and model (calls the simulated provider served are
/// not in it: nobody bills them).
pub fn ledger_by_day_and_model(
    costs: &MonthCosts,
    month: Month,
    provider: &str,
) -> BTreeMap<(NaiveDate, String), i64> {
    costs
        .family("daymodel")
        .into_iter()
        .filter_map(|(key, micros)| {
            let mut parts = key.splitn(3, ':');
            let day = parts.next()?.parse::<u32>().ok()?;
            (parts.next()? == provider).then_some(())?;
            let model = parts.next()?.to_string();
            let date = NaiveDate::from_ymd_opt(month.year, month.month, day)?;
            Some(((date, model), micros))
        })
        .collect()
}

/// One model's spend on one day, as each side sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub model: String,
    pub ledger_micros: i64,
    pub provider_micros: i64,
}

/// One day of the comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Day {
    pub date: NaiveDate,
    pub ledger_micros: i64,
    pub provider_micros: i64,
    pub lines: Vec<Line>,
    /// The day's totals differ by more than the tolerance (and a cent).
    pub differs: bool,
}

/// Sets the ledger beside the provider's bill, day by day (days where either side spent).
pub fn compare(
    ledger: &BTreeMap<(NaiveDate, String), i64>,
    provider: &BTreeMap<(NaiveDate, String), i64>,
    tolerance_percent: f64,
) -> Vec<Day> {
    let mut days: BTreeMap<NaiveDate, BTreeMap<String, Line>> = BTreeMap::new();
    for ((date, model), micros) in ledger {
        line(&mut days, *date, model).ledger_micros += micros;
    }
    for ((date, model), micros) in provider {
        line(&mut days, *date, model).provider_micros += micros;
    }
    days.into_iter()
        .map(|(date, lines)| {
            let lines: Vec<Line> = lines.into_values().collect();
            let ledger_micros = lines.iter().map(|line| line.ledger_micros).sum();
            let provider_micros = lines.iter().map(|line| line.provider_micros).sum();
            Day {
                date,
                ledger_micros,
                provider_micros,
                differs: differs(ledger_micros, provider_micros, tolerance_percent),
                lines,
            }
        })
        .collect()
}

fn line<'a>(
    days: &'a mut BTreeMap<NaiveDate, BTreeMap<String, Line>>,
    date: NaiveDate,
    model: &str,
) -> &'a mut Line {
    days.entry(date)
        .or_default()
        .entry(model.to_string())
        .or_insert_with(|| Line {
            model: model.to_string(),
            ledger_micros: 0,
            provider_micros: 0,
        })
}

/// Whether two amounts differ by more than `tolerance_percent` of the larger, and by a cent.
pub fn differs(ledger: i64, provider: i64, tolerance_percent: f64) -> bool {
    let gap = (ledger - provider).abs();
    let larger = ledger.abs().max(provider.abs());
    gap >= NOISE_MICROS && (gap as f64) * 100.0 > tolerance_percent * (larger as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_items_reduce_to_the_model_the_price_table_names() {
        assert_eq!(
            model_of_line_item("gpt-image-2 image, output"),
            "gpt-image-2"
        );
        assert_eq!(
            model_of_line_item("gpt-image-2-2026-04-21 image, output"),
            "gpt-image-2"
        );
        assert_eq!(
            model_of_line_item("gpt-4.1-mini-2025-04-14, cached input"),
            "gpt-4.1-mini"
        );
        assert_eq!(
            model_of_line_item("priority | gpt-5.6-sol, output, long context"),
            "gpt-5.6-sol"
        );
        assert_eq!(model_of_line_item("gpt-4.1-mini, output"), "gpt-4.1-mini");
        assert_eq!(
            model_of_line_item("web search tool calls"),
            "web search tool calls"
        );
    }

    #[test]
    fn a_day_is_flagged_past_the_tolerance_and_a_cent() {
        assert!(!differs(1_000_000, 1_019_000, 2.0));
        assert!(differs(1_000_000, 1_030_000, 2.0));
        // Tiny days are noise: 50% of half a cent is not flagged.
        assert!(!differs(5_000, 2_500, 2.0));
        // Spend the ledger never saw is flagged.
        assert!(differs(0, 50_000, 2.0));
    }

    #[test]
    fn the_comparison_lines_up_days_and_models_from_both_sides() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 3).unwrap();
        let ledger = BTreeMap::from([
            ((day, "gpt-image-2".to_string()), 400_000),
            ((day, "gpt-4.1-mini".to_string()), 1_000),
        ]);
        let openai = BTreeMap::from([
            ((day, "gpt-image-2".to_string()), 440_000),
            ((day, "gpt-4.1-mini".to_string()), 1_000),
        ]);
        let days = compare(&ledger, &openai, 2.0);
        assert_eq!(days.len(), 1);
        assert_eq!(days[0].ledger_micros, 401_000);
        assert_eq!(days[0].provider_micros, 441_000);
        assert!(days[0].differs);
        assert_eq!(days[0].lines.len(), 2);
    }

    #[test]
    fn amounts_read_as_numbers_or_numeric_strings() {
        let number = Amount {
            value: serde_json::json!(0.130_804_383),
        };
        assert_eq!(number.micros().unwrap(), 130_804);
        let text = Amount {
            value: serde_json::json!("0.8958740000000000"),
        };
        assert_eq!(text.micros().unwrap(), 895_874);
        assert!(
            Amount {
                value: serde_json::json!("1e300")
            }
            .micros()
            .is_err()
        );
    }
}
