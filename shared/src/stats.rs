//! Job statistics kept in Redis for reports and alerts that must not depend on a Prometheus
//! server: per UTC day (kept 400 days) and per minute (kept 2 hours). Workers and the api add to
//! them as jobs end; the scheduler reads them for the daily report and the health alerts.
//!
//! Fields of `{p}stats:day:{YYYY-MM-DD}` and `{p}stats:minute:{YYYY-MM-DDTHH:MM}`:
//! `finished:{outcome}:{intent}` (jobs ending), `fallbacks`, `deferrals`, and `dur:{le}` (jobs
//! ending within `le` seconds, non-cumulative, on the buckets of
//! [`crate::telemetry::metrics::SECONDS_BUCKETS`] plus `+Inf`).

use std::collections::HashMap;
use std::time::Duration;

use crate::connection::RedisConnection;
use chrono::{DateTime, NaiveDate, Utc};

use crate::domain::{Intent, JobStatus};
use crate::keys::Keys;
use crate::script::Part;
use crate::store::StoreError;
use crate::telemetry::metrics::SECONDS_BUCKETS;

const DAY_TTL_SECS: i64 = 400 * 24 * 3600;
const MINUTE_TTL_SECS: i64 = 2 * 3600;

/// Adds counts to a day's and a minute's hash: the script's text, for [`ADD_SCRIPT`] and as
/// a step of the job's final write (`crate::store::finish`), which counts the job's end in
/// the same script.
macro_rules! add_body {
    () => {
        r#"
-- KEYS[1] the day's counts, KEYS[2] the minute's; ARGV[1] and ARGV[2] their TTLs (s),
-- ARGV[3..] field and count in turn
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"#
    };
}
pub(crate) use add_body;

const ADD_SCRIPT: &str = add_body!();

#[derive(Clone)]
pub struct Stats {
    connection: RedisConnection,
    keys: Keys,
    add: redis::Script,
}

/// Counts summed over a day or a window of minutes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub fields: HashMap<String, i64>,
}

impl StatsSnapshot {
    pub fn get(&self, field: &str) -> i64 {
        self.fields.get(field).copied().unwrap_or(0)
    }

    /// Jobs that ended with `outcome` (any intent).
    pub fn finished(&self, outcome: &str) -> i64 {
        let prefix = format!("finished:{outcome}:");
        self.fields
            .iter()
            .filter(|(field, _)| field.starts_with(&prefix))
            .map(|(_, count)| count)
            .sum()
    }

    /// Jobs that ended, by intent then outcome.
    pub fn by_intent(&self) -> HashMap<(String, String), i64> {
        self.fields
            .iter()
            .filter_map(|(field, count)| {
                let rest = field.strip_prefix("finished:")?;
                let (outcome, intent) = rest.split_once(':')?;
                Some(((intent.to_string(), outcome.to_string()), *count))
            })
            .collect()
    }

    pub fn total_finished(&self) -> i64 {
        self.fields
            .iter()
            .filter(|(field, _)| field.starts_with("finished:"))
            .map(|(_, count)| count)
            .sum()
    }

    /// The `q` quantile (0..1) of job durations, as the upper bound of the bucket it falls in
    /// (as Prometheus' `histogram_quantile` would, without interpolation); `None` without data.
    pub fn duration_quantile(&self, q: f64) -> Option<f64> {
        let mut buckets: Vec<(f64, i64)> = SECONDS_BUCKETS
            .iter()
            .map(|le| (*le, self.get(&format!("dur:{le}"))))
            .collect();
        buckets.push((f64::INFINITY, self.get("dur:+Inf")));
        let total: i64 = buckets.iter().map(|(_, count)| count).sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as i64;
        let mut seen = 0;
        for (le, count) in buckets {
            seen += count;
            if seen >= rank {
                return Some(le);
            }
        }
        None
    }

    fn add(&mut self, other: HashMap<String, i64>) {
        for (field, count) in other {
            *self.fields.entry(field).or_insert(0) += count;
        }
    }
}

impl Stats {
    pub fn new(connection: RedisConnection, keys: Keys) -> Self {
        Self {
            connection,
            keys,
            add: redis::Script::new(ADD_SCRIPT),
        }
    }

    /// A job ended at `at` after `lived` since acceptance.
    pub async fn job_finished(
        &self,
        at: DateTime<Utc>,
        status: JobStatus,
        intent: Option<Intent>,
        lived: Duration,
    ) -> Result<(), StoreError> {
        self.run(self.job_finished_part(at, status, intent, lived))
            .await
    }

    /// The keys and arguments of [`Self::job_finished`]'s script, to run it as a step of the
    /// job's final write (`crate::store::JobStore::finish_run`).
    pub fn job_finished_part(
        &self,
        at: DateTime<Utc>,
        status: JobStatus,
        intent: Option<Intent>,
        lived: Duration,
    ) -> Part {
        let intent = intent.map_or("none", |intent| intent.as_str());
        let seconds = lived.as_secs_f64();
        let bucket = SECONDS_BUCKETS
            .iter()
            .find(|le| seconds <= **le)
            .map_or_else(|| "+Inf".to_string(), f64::to_string);
        self.add_part(
            at,
            &[
                (format!("finished:{}:{intent}", status.as_str()), 1),
                (format!("dur:{bucket}"), 1),
            ],
        )
    }

    /// An edit was redone by the fallback provider.
    pub async fn fallback(&self, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.add(at, &[("fallbacks".to_string(), 1)]).await
    }

    /// A job went to a delay queue (rate limit or budget hold).
    pub async fn deferral(&self, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.add(at, &[("deferrals".to_string(), 1)]).await
    }

    async fn add(&self, at: DateTime<Utc>, fields: &[(String, i64)]) -> Result<(), StoreError> {
        self.run(self.add_part(at, fields)).await
    }

    async fn run(&self, part: Part) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        part.invoke_async::<()>(&self.add, &mut connection).await?;
        Ok(())
    }

    fn add_part(&self, at: DateTime<Utc>, fields: &[(String, i64)]) -> Part {
        let mut part = Part::default();
        part.key(self.keys.stats_day(&at.format("%Y-%m-%d").to_string()))
            .key(
                self.keys
                    .stats_minute(&at.format("%Y-%m-%dT%H:%M").to_string()),
            )
            .arg(DAY_TTL_SECS)
            .arg(MINUTE_TTL_SECS);
        for (field, count) in fields {
            part.arg(field).arg(*count);
        }
        part
    }

    /// One UTC day's counts.
    pub async fn day(&self, date: NaiveDate) -> Result<StatsSnapshot, StoreError> {
        let mut connection = self.connection.clone();
        let fields: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.keys.stats_day(&date.format("%Y-%m-%d").to_string()))
            .query_async(&mut connection)
            .await?;
        Ok(StatsSnapshot { fields })
    }

    /// The counts of the `minutes` whole minutes up to and including the one holding `until`.
    pub async fn window(
        &self,
        until: DateTime<Utc>,
        minutes: u32,
    ) -> Result<StatsSnapshot, StoreError> {
        let mut pipe = redis::pipe();
        for back in 0..i64::from(minutes) {
            let at = until - chrono::Duration::minutes(back);
            pipe.cmd("HGETALL").arg(
                self.keys
                    .stats_minute(&at.format("%Y-%m-%dT%H:%M").to_string()),
            );
        }
        let mut connection = self.connection.clone();
        let replies: Vec<HashMap<String, i64>> = pipe.query_async(&mut connection).await?;
        let mut snapshot = StatsSnapshot::default();
        for reply in replies {
            snapshot.add(reply);
        }
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(pairs: &[(&str, i64)]) -> StatsSnapshot {
        StatsSnapshot {
            fields: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn quantiles_come_from_the_bucket_holding_the_rank() {
        // 90 jobs within 1 s, 10 within 30 s: p50 is 1 s, p95 is 30 s.
        let stats = snapshot(&[("dur:1", 90), ("dur:30", 10)]);
        assert_eq!(stats.duration_quantile(0.5), Some(1.0));
        assert_eq!(stats.duration_quantile(0.95), Some(30.0));
        assert_eq!(snapshot(&[]).duration_quantile(0.5), None);
    }

    #[test]
    fn outcomes_sum_over_intents() {
        let stats = snapshot(&[
            ("finished:succeeded:create", 7),
            ("finished:succeeded:edit", 2),
            ("finished:failed:create", 1),
        ]);
        assert_eq!(stats.finished("succeeded"), 9);
        assert_eq!(stats.total_finished(), 10);
        assert_eq!(
            stats.by_intent()[&("create".to_string(), "failed".to_string())],
            1
        );
    }
}
