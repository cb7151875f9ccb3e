//! `pictor admin costs reconcile --month YYYY-MM`: the cost ledger's OpenAI spend per day and
//! model beside OpenAI's own bill (the organization Costs API, with `OPENAI_ADMIN_KEY`). Days
//! that differ by more than `reconcile.tolerance_percent` are flagged, and the command then
//! exits with status 1, so a scheduled check can alert on it. Gemini has no costs API: the
//! command says so rather than pretending to check it.

use anyhow::Context;
use shared::config::Settings;
use shared::ledger::{BudgetPolicy, Month};
use shared::pricing::format_usd;
use shared::reconcile::{self, Day, OpenAiCosts};
use shared::store::JobStore;

/// Runs the comparison and prints it; answers whether any day differs.
pub async fn run(settings: &Settings, month: Month) -> anyhow::Result<bool> {
    let admin_key = settings.openai.admin_key.clone().context(
        "OPENAI_ADMIN_KEY is not set: the Costs API needs an OpenAI admin key (sk-admin-…)",
    )?;
    let store = JobStore::connect(&settings.redis, settings.jobs.ttl)
        .await
        .context("cannot connect to redis")?;
    let costs = store
        .redis()
        .ledger(BudgetPolicy::from(&settings.budget))
        .month(month)
        .await
        .with_context(|| format!("cannot read the costs of {month}"))?;
    let ledger = reconcile::ledger_by_day_and_model(&costs, month, "openai");
    let today = chrono::Utc::now().date_naive();
    let next_month = month.first_day() + chrono::Days::new(u64::from(month.days()));
    let until = next_month.min(today.succ_opt().unwrap_or(today));
    let bill = OpenAiCosts::new(&settings.openai.base_url, admin_key)?
        .by_day_and_model(month.first_day(), until)
        .await?;
    let tolerance = settings.reconcile.tolerance_percent;
    let days = reconcile::compare(&ledger, &bill, tolerance);
    print!("{}", table(month, tolerance, &days));
    let possibly = costs.get("possibly:calls");
    if possibly > 0 {
        println!(
            "The ledger counts {possibly} possibly billed call(s) at their estimate (${}).",
            format_usd(costs.get("possibly:total"))
        );
    }
    println!(
        "Gemini: Google offers no costs API for the Gemini API; compare its spend with Google Cloud Billing."
    );
    Ok(days.iter().any(|day| day.differs))
}

/// `+$0.010000` or `-$0.010000`.
fn signed_usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "+" };
    format!("{sign}${}", format_usd(micros.abs()))
}

/// The comparison as text: a line per day and model, the days that differ flagged.
fn table(month: Month, tolerance: f64, days: &[Day]) -> String {
    let mut out = format!(
        "OpenAI spend in {month}: the ledger against OpenAI's Costs API (tolerance {tolerance}%)\n"
    );
    out.push_str(&format!(
        "{:<10}  {:<28} {:>14} {:>14} {:>14}\n",
        "day", "model", "ledger", "openai", "difference"
    ));
    for day in days {
        for line in &day.lines {
            out.push_str(&format!(
                "{:<10}  {:<28} {:>14} {:>14} {:>14}\n",
                day.date,
                line.model,
                format!("${}", format_usd(line.ledger_micros)),
                format!("${}", format_usd(line.provider_micros)),
                signed_usd(line.ledger_micros - line.provider_micros),
            ));
        }
        out.push_str(&format!(
            "{:<10}  {:<28} {:>14} {:>14} {:>14}{}\n",
            day.date,
            "(day)",
            format!("${}", format_usd(day.ledger_micros)),
            format!("${}", format_usd(day.provider_micros)),
            signed_usd(day.ledger_micros - day.provider_micros),
            if day.differs { "  DIFFERS" } else { "" }
        ));
    }
    let differing = days.iter().filter(|day| day.differs).count();
    out.push_str(&format!(
        "{differing} of {} day(s) with spend differ by more than {tolerance}%.\n",
        days.len()
    ));
    out
}
