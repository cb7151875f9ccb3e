//! What is due when: the scheduler's jobs, their periods, and the catch-up rule.
//!
//! Each job runs once per **period**: `daily-report` once per reported day, `monthly-export`
//! once per exported month, `budget-alerts` and `health-alerts` once per minute. A period's key
//! (`2026-11-05`, `2026-11`, `2026-11-05T08:01`) names its lock and done markers in Redis.
//!
//! Report figures come from per-UTC-day statistics and ledger aggregates, so the reported day
//! is a UTC day and a report is never sent before that day has ended in UTC: the report of day
//! `D` is due at `report_time` on local date `D + 1` in `report_timezone`, or at UTC midnight
//! after `D` if that is later (zones east of UTC). The monthly export of month `M` is due at
//! `export_time` on the local 1st of the next month, by the same rule.
//!
//! **Catch-up.** Given the latest period done, every period after it that is due now runs,
//! oldest first, each once; at most [`CATCH_UP_DAYS`] days or [`CATCH_UP_MONTHS`] months back,
//! so a scheduler that was down for a month sends a week of reports, not thirty. With no record
//! of a done period (a new deployment), only the latest due period runs. Minute jobs never
//! catch up: an alert about a past minute is worth nothing.

use chrono::{
    DateTime, Datelike, Days, LocalResult, NaiveDate, NaiveTime, TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;
use shared::config::SchedulerSettings;
use shared::ledger::Month;

/// Most days of reports a scheduler sends after downtime.
pub const CATCH_UP_DAYS: u32 = 7;
/// Most monthly exports a scheduler sends after downtime.
pub const CATCH_UP_MONTHS: u32 = 2;

/// The scheduler's periodic jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Job {
    DailyReport,
    MonthlyExport,
    BudgetAlerts,
    HealthAlerts,
}

impl Job {
    pub const ALL: [Job; 4] = [
        Job::DailyReport,
        Job::MonthlyExport,
        Job::BudgetAlerts,
        Job::HealthAlerts,
    ];

    /// The job's name in Redis keys, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DailyReport => "daily-report",
            Self::MonthlyExport => "monthly-export",
            Self::BudgetAlerts => "budget-alerts",
            Self::HealthAlerts => "health-alerts",
        }
    }

    /// How long a replica may hold a run's lock before another may presume it dead. Longer than
    /// a run can take: reading Redis plus every delivery retry of every channel.
    pub fn lock_ttl(self) -> std::time::Duration {
        match self {
            Self::DailyReport | Self::MonthlyExport => std::time::Duration::from_secs(15 * 60),
            Self::BudgetAlerts | Self::HealthAlerts => std::time::Duration::from_secs(5 * 60),
        }
    }

    /// How long a done marker is kept: beyond the catch-up window, so a done period is never
    /// mistaken for a missed one.
    pub fn done_ttl(self) -> std::time::Duration {
        const DAY: u64 = 24 * 3600;
        match self {
            Self::DailyReport => std::time::Duration::from_secs(40 * DAY),
            Self::MonthlyExport => std::time::Duration::from_secs(400 * DAY),
            Self::BudgetAlerts | Self::HealthAlerts => std::time::Duration::from_secs(2 * 3600),
        }
    }
}

impl std::fmt::Display for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One run's worth of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// The UTC day a daily report is about.
    Day(NaiveDate),
    /// The UTC month a monthly export holds.
    Month(Month),
    /// The minute (UTC, seconds dropped) an alert check runs in.
    Minute(DateTime<Utc>),
}

impl Period {
    /// The key of the period in Redis; keys of one job sort in time order.
    pub fn key(&self) -> String {
        match self {
            Self::Day(date) => date.format("%Y-%m-%d").to_string(),
            Self::Month(month) => month.to_string(),
            Self::Minute(at) => at.format("%Y-%m-%dT%H:%M").to_string(),
        }
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// A setting of `[scheduler]` that cannot be used, named with its variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting scheduler.{setting} ({variable}): {message}")]
pub struct ScheduleError {
    setting: &'static str,
    variable: &'static str,
    message: String,
}

/// When the daily report and the monthly export are due, parsed from the settings once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub report_time: NaiveTime,
    pub export_time: NaiveTime,
    pub zone: Tz,
}

impl Schedule {
    pub fn from_settings(settings: &SchedulerSettings) -> Result<Self, ScheduleError> {
        let time = |raw: &str, setting, variable| {
            NaiveTime::parse_from_str(raw.trim(), "%H:%M").map_err(|_| ScheduleError {
                setting,
                variable,
                message: format!("expected a local time written HH:MM, got {raw:?}"),
            })
        };
        let zone = settings
            .report_timezone
            .trim()
            .parse::<Tz>()
            .map_err(|_| ScheduleError {
                setting: "report_timezone",
                variable: "PICTOR_REPORT_TIMEZONE",
                message: format!(
                    "expected an IANA time zone such as UTC or Europe/Paris, got {:?}",
                    settings.report_timezone
                ),
            })?;
        Ok(Self {
            report_time: time(&settings.report_time, "report_time", "PICTOR_REPORT_TIME")?,
            export_time: time(&settings.export_time, "export_time", "PICTOR_EXPORT_TIME")?,
            zone,
        })
    }

    /// The periods of `job` to run at `now`, oldest first, given the latest period done
    /// (its key) if any.
    pub fn due(&self, job: Job, now: DateTime<Utc>, last_done: Option<&str>) -> Vec<Period> {
        match job {
            Job::DailyReport => {
                let Some(latest) = self.latest_report_day(now) else {
                    return Vec::new();
                };
                let last =
                    last_done.and_then(|key| NaiveDate::parse_from_str(key, "%Y-%m-%d").ok());
                catch_up(latest, last, CATCH_UP_DAYS, |date| date.pred_opt())
                    .into_iter()
                    .map(Period::Day)
                    .collect()
            }
            Job::MonthlyExport => {
                let Some(latest) = self.latest_export_month(now) else {
                    return Vec::new();
                };
                let last = last_done.and_then(Month::parse);
                catch_up(latest, last, CATCH_UP_MONTHS, previous_month)
                    .into_iter()
                    .map(Period::Month)
                    .collect()
            }
            Job::BudgetAlerts | Job::HealthAlerts => {
                let minute = Period::Minute(minute_of(now));
                if last_done == Some(minute.key().as_str()) {
                    Vec::new()
                } else {
                    vec![minute]
                }
            }
        }
    }

    /// When the report of `day` is due.
    pub fn report_due(&self, day: NaiveDate) -> Option<DateTime<Utc>> {
        let next = day.succ_opt()?;
        let local = local_instant(self.zone, next, self.report_time)?;
        Some(local.max(next.and_time(NaiveTime::MIN).and_utc()))
    }

    /// When the export of `month` is due.
    pub fn export_due(&self, month: Month) -> Option<DateTime<Utc>> {
        let next = next_month(month)?.first_day();
        let local = local_instant(self.zone, next, self.export_time)?;
        Some(local.max(next.and_time(NaiveTime::MIN).and_utc()))
    }

    /// The latest day whose report is due at `now`.
    fn latest_report_day(&self, now: DateTime<Utc>) -> Option<NaiveDate> {
        // Due instants rise with the day; the answer is within a few days of the local date.
        let today = now.with_timezone(&self.zone).date_naive();
        let mut day = today;
        for _ in 0..4 {
            if self.report_due(day).is_some_and(|due| due <= now) {
                return Some(day);
            }
            day = day.pred_opt()?;
        }
        None
    }

    /// The latest month whose export is due at `now`.
    fn latest_export_month(&self, now: DateTime<Utc>) -> Option<Month> {
        let mut month = Month::of(now);
        for _ in 0..3 {
            if self.export_due(month).is_some_and(|due| due <= now) {
                return Some(month);
            }
            month = previous_month(month)?;
        }
        None
    }
}

/// `latest` and the periods before it back to (not including) `last`, at most `bound` of them,
/// oldest first; only `latest` without a `last`, nothing when `last` is not older.
fn catch_up<P: Copy + Ord>(
    latest: P,
    last: Option<P>,
    bound: u32,
    previous: impl Fn(P) -> Option<P>,
) -> Vec<P> {
    let Some(last) = last else {
        return vec![latest];
    };
    let mut periods = Vec::new();
    let mut period = latest;
    while period > last && periods.len() < bound as usize {
        periods.push(period);
        match previous(period) {
            Some(before) => period = before,
            None => break,
        }
    }
    periods.reverse();
    periods
}

/// `date` at `time` in `zone`: the earlier instant when the clock repeats an hour, and the first
/// instant after the gap when it skips one.
fn local_instant(zone: Tz, date: NaiveDate, time: NaiveTime) -> Option<DateTime<Utc>> {
    let mut naive = date.and_time(time);
    for _ in 0..4 {
        match zone.from_local_datetime(&naive) {
            LocalResult::Single(at) | LocalResult::Ambiguous(at, _) => {
                return Some(at.with_timezone(&Utc));
            }
            LocalResult::None => naive += chrono::Duration::minutes(30),
        }
    }
    None
}

fn minute_of(now: DateTime<Utc>) -> DateTime<Utc> {
    now.with_second(0)
        .and_then(|at| at.with_nanosecond(0))
        .unwrap_or(now)
}

pub fn previous_month(month: Month) -> Option<Month> {
    let first = month.first_day().checked_sub_days(Days::new(1))?;
    Some(Month {
        year: first.year(),
        month: first.month(),
    })
}

fn next_month(month: Month) -> Option<Month> {
    let first = month
        .first_day()
        .checked_add_days(Days::new(u64::from(month.days())))?;
    Some(Month {
        year: first.year(),
        month: first.month(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(raw: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(raw)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn day(raw: &str) -> NaiveDate {
        NaiveDate::parse_from_str(raw, "%Y-%m-%d").unwrap()
    }

    fn schedule(report: &str, export: &str, zone: &str) -> Schedule {
        let mut settings = shared::config::Settings::defaults().unwrap().scheduler;
        settings.report_time = report.into();
        settings.export_time = export.into();
        settings.report_timezone = zone.into();
        Schedule::from_settings(&settings).unwrap()
    }

    fn keys(periods: &[Period]) -> Vec<String> {
        periods.iter().map(Period::key).collect()
    }

    #[test]
    fn the_report_of_yesterday_is_due_from_the_report_time_on() {
        let utc = schedule("08:00", "08:00", "UTC");
        assert!(
            utc.due(
                Job::DailyReport,
                at("2026-11-06T07:59:59Z"),
                Some("2026-11-04")
            )
            .is_empty()
        );
        assert_eq!(
            keys(&utc.due(
                Job::DailyReport,
                at("2026-11-06T08:00:00Z"),
                Some("2026-11-04")
            )),
            ["2026-11-05"]
        );
        assert!(
            utc.due(
                Job::DailyReport,
                at("2026-11-06T09:00:00Z"),
                Some("2026-11-05")
            )
            .is_empty()
        );
    }

    #[test]
    fn a_local_report_time_follows_the_zone_and_its_summer_time() {
        let paris = schedule("08:00", "08:00", "Europe/Paris");
        // Winter: 08:00 in Paris is 07:00 UTC; summer: 06:00 UTC.
        assert_eq!(
            paris.report_due(day("2026-11-05")),
            Some(at("2026-11-06T07:00:00Z"))
        );
        assert_eq!(
            paris.report_due(day("2026-07-05")),
            Some(at("2026-07-06T06:00:00Z"))
        );
        let new_york = schedule("08:00", "08:00", "America/New_York");
        assert_eq!(
            new_york.report_due(day("2026-11-05")),
            Some(at("2026-11-06T13:00:00Z"))
        );
    }

    #[test]
    fn east_of_utc_a_report_waits_for_the_utc_day_to_end() {
        // 08:00 in Tokyo is 23:00 UTC the day before: the UTC day is not over yet.
        let tokyo = schedule("08:00", "08:00", "Asia/Tokyo");
        assert_eq!(
            tokyo.report_due(day("2026-11-05")),
            Some(at("2026-11-06T00:00:00Z"))
        );
        assert_eq!(
            tokyo.export_due(Month::parse("2026-11").unwrap()),
            Some(at("2026-12-01T00:00:00Z"))
        );
    }

    #[test]
    fn a_report_time_in_a_skipped_hour_moves_past_the_gap() {
        // Paris skips 02:00-03:00 on 2026-03-29.
        let paris = schedule("02:30", "02:30", "Europe/Paris");
        assert_eq!(
            paris.report_due(day("2026-03-28")),
            Some(at("2026-03-29T01:00:00Z"))
        );
    }

    #[test]
    fn missed_reports_are_caught_up_oldest_first_within_a_week() {
        let utc = schedule("08:00", "08:00", "UTC");
        let now = at("2026-11-08T10:00:00Z");
        assert_eq!(
            keys(&utc.due(Job::DailyReport, now, Some("2026-11-04"))),
            ["2026-11-05", "2026-11-06", "2026-11-07"]
        );
        let after_a_month = utc.due(Job::DailyReport, now, Some("2026-10-01"));
        assert_eq!(after_a_month.len(), 7);
        assert_eq!(after_a_month[0].key(), "2026-11-01");
        assert_eq!(after_a_month[6].key(), "2026-11-07");
        // A new deployment sends only the latest report.
        assert_eq!(keys(&utc.due(Job::DailyReport, now, None)), ["2026-11-07"]);
    }

    #[test]
    fn the_export_of_last_month_is_due_on_the_first_at_the_export_time() {
        let utc = schedule("08:00", "09:30", "UTC");
        assert!(
            utc.due(
                Job::MonthlyExport,
                at("2026-12-01T09:29:00Z"),
                Some("2026-10")
            )
            .is_empty()
        );
        assert_eq!(
            keys(&utc.due(
                Job::MonthlyExport,
                at("2026-12-01T09:30:00Z"),
                Some("2026-10")
            )),
            ["2026-11"]
        );
        assert_eq!(
            keys(&utc.due(
                Job::MonthlyExport,
                at("2027-01-15T00:00:00Z"),
                Some("2026-06")
            )),
            ["2026-11", "2026-12"]
        );
        assert_eq!(
            keys(&utc.due(Job::MonthlyExport, at("2026-12-20T00:00:00Z"), None)),
            ["2026-11"]
        );
    }

    #[test]
    fn minute_jobs_run_once_per_minute_and_never_catch_up() {
        let utc = schedule("08:00", "08:00", "UTC");
        let now = at("2026-11-06T08:01:42Z");
        assert_eq!(
            keys(&utc.due(Job::HealthAlerts, now, Some("2026-11-06T07:00"))),
            ["2026-11-06T08:01"]
        );
        assert!(
            utc.due(Job::HealthAlerts, now, Some("2026-11-06T08:01"))
                .is_empty()
        );
    }

    #[test]
    fn bad_times_and_zones_name_their_variable() {
        let mut settings = shared::config::Settings::defaults().unwrap().scheduler;
        settings.report_time = "8am".into();
        let error = Schedule::from_settings(&settings).unwrap_err().to_string();
        assert!(error.contains("PICTOR_REPORT_TIME"), "{error}");
        let mut settings = shared::config::Settings::defaults().unwrap().scheduler;
        settings.report_timezone = "Mars/Olympus".into();
        let error = Schedule::from_settings(&settings).unwrap_err().to_string();
        assert!(error.contains("PICTOR_REPORT_TIMEZONE"), "{error}");
    }

    #[test]
    fn months_step_across_years() {
        let january = Month::parse("2027-01").unwrap();
        assert_eq!(previous_month(january), Month::parse("2026-12"));
        assert_eq!(next_month(Month::parse("2026-12").unwrap()), Some(january));
    }
}
