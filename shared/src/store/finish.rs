//! The end of a job's run, in one script and one round trip: the job's final update
//! ([`JobStore::update`], guarded by [`Guard::Active`]), the statistics of its end
//! ([`crate::stats`]), counted only when that update applied, and the release of the run's
//! lease ([`JobStore::release_run`]), which the run gives back whatever the update said: a job
//! that ended (now, or before in another run) or is gone has nothing left to run. Each step is
//! the script that runs it alone, as a Lua function ([`crate::script`]).
//!
//! The run's last paid call may ride along ([`RunEnd::settle`]): its settlement
//! ([`crate::ledger::Ledger::settle_part`]) runs first, whatever the update then says, so a
//! billed call is entered (and its answer kept) even when the job ended meanwhile.

use super::{Guard, JobStore, JobUpdate, StoreError, UpdateOutcome};
use crate::domain::JobId;
use crate::script::{Part, lua_function, split_parts};

/// The final write's script. KEYS and ARGV: [`Part::compose`] of the update, the statistics
/// (empty: none), the release (empty: none) and the settlement (empty: none).
const FINISH_SCRIPT: &str = concat!(
    lua_function!("ledger_record", crate::ledger::record_body!()),
    lua_function!("job_update", super::update::update_body!()),
    lua_function!("stats_add", crate::stats::add_body!()),
    lua_function!("run_release", super::release_run_body!()),
    split_parts!(),
    r#"
local update, stats, release, settle = PARTS[1], PARTS[2], PARTS[3], PARTS[4]
if #settle[1] > 0 then ledger_record(settle[1], settle[2]) end
local written = job_update(update[1], update[2])
if written and written[2] ~= -1 and #stats[1] > 0 then stats_add(stats[1], stats[2]) end
if #release[1] > 0 then run_release(release[1], release[2]) end
return written
"#
);

/// A run's final write: the update, and what goes with it.
pub struct RunEnd<'a> {
    pub update: &'a JobUpdate,
    /// The statistics of the job's end ([`crate::stats::Stats::job_finished_part`]), added
    /// only if the update applies.
    pub stats: Option<Part>,
    /// The run's lease to give back ([`JobStore::release_part`]).
    pub release: Option<Part>,
    /// The last paid call's settlement ([`crate::ledger::Ledger::settle_part`]), written
    /// before the update and whatever it says.
    pub settle: Option<Part>,
}

impl JobStore {
    /// Writes a run's end to job `id`: as [`JobStore::update`] with [`Guard::Active`], in the
    /// same script as its statistics and its lease's release.
    pub async fn finish_run(
        &self,
        id: JobId,
        end: RunEnd<'_>,
    ) -> Result<UpdateOutcome, StoreError> {
        let update = self.update_part(id, Guard::Active, end.update);
        let settled = end.settle.is_some();
        let mut connection = self.connection.pinned();
        let reply = Part::compose([
            update,
            end.stats.unwrap_or_default(),
            end.release.unwrap_or_default(),
            end.settle.unwrap_or_default(),
        ])
        .invoke_async(&self.finish_script, &mut connection)
        .await?;
        let outcome = self
            .after_update(id, end.update, reply, &mut connection)
            .await?;
        // A kept answer survives a failover before the run goes on, whatever the update said
        // (an end that applied has waited for the replicas already).
        let waited = matches!(outcome, UpdateOutcome::Applied { .. })
            && end.update.status.is_some_and(|status| status.is_terminal());
        if settled && !waited {
            connection.replicated().await?;
        }
        Ok(outcome)
    }

    pub(super) fn finish_script() -> redis::Script {
        redis::Script::new(FINISH_SCRIPT)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;

    use super::*;
    use crate::connection::Redis;
    use crate::domain::{ImageSize, Intent, JobStatus, UserId};
    use crate::stats::Stats;
    use crate::store::{Claim, JobRecord};
    use crate::test_redis::with_redis;

    /// The default settings under the test's key prefix, its Redis and a job store on it.
    async fn connected(keys: &crate::keys::Keys) -> (crate::config::Settings, Redis, JobStore) {
        let mut settings = crate::config::Settings::defaults().unwrap();
        settings.redis.prefix = keys.prefix().to_string();
        let redis = Redis::connect(&settings.redis).await.unwrap();
        let store = JobStore::new(redis.clone(), Duration::from_secs(600));
        (settings, redis, store)
    }

    /// A job of `user` written as the api leaves it, and claimed by run `runner`.
    async fn claimed_job(store: &JobStore, runner: &str) -> JobRecord {
        let job = JobRecord::new(
            JobId::new(),
            UserId::parse("alice").unwrap(),
            "a lighthouse at dawn".to_string(),
            ImageSize::Square,
            1,
            None,
            Utc::now(),
        );
        store.insert_pending(&job).await.unwrap();
        let until = Utc::now() + chrono::Duration::seconds(60);
        let (_, claim) = store
            .get_and_claim(job.id, runner, until, true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claim, Claim::Taken);
        job
    }

    /// Whether job `id` is in the leases' set.
    async fn leased(redis: &Redis, id: JobId) -> bool {
        let mut connection = redis.connection();
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(redis.keys().leases())
            .arg(id.to_string())
            .query_async(&mut connection)
            .await
            .unwrap();
        score.is_some()
    }

    /// Run `runner` of job `id` ends it `succeeded` at `at`, counted as a create that took 3 s.
    async fn end_run(
        store: &JobStore,
        stats: &Stats,
        at: chrono::DateTime<Utc>,
        id: JobId,
        runner: &str,
    ) -> UpdateOutcome {
        let succeeded = JobUpdate::status(JobStatus::Succeeded);
        let counted = stats.job_finished_part(
            at,
            JobStatus::Succeeded,
            Some(Intent::Create),
            Duration::from_secs(3),
        );
        store
            .finish_run(
                id,
                RunEnd {
                    update: &succeeded,
                    stats: Some(counted),
                    release: Some(store.release_part(id, runner)),
                    settle: None,
                },
            )
            .await
            .unwrap()
    }

    /// The end of a run writes the job's end, counts it once, and gives its lease back; an
    /// end refused (the job ended meanwhile) counts nothing and still gives the lease back.
    #[tokio::test]
    async fn a_run_ends_its_job_counts_it_once_and_lets_its_lease_go() {
        with_redis(|keys| async move {
            let (_, redis, store) = connected(&keys).await;
            let stats = Stats::new(redis.connection(), keys.clone());
            let now = Utc::now();

            let job = claimed_job(&store, "w1.a").await;
            let outcome = end_run(&store, &stats, now, job.id, "w1.a").await;
            assert!(
                matches!(outcome, UpdateOutcome::Applied { .. }),
                "{outcome:?}"
            );
            let read = store.get(job.id).await.unwrap().unwrap();
            assert_eq!(read.status, JobStatus::Succeeded);
            assert!(
                !leased(&redis, job.id).await,
                "the run's lease is given back"
            );
            // Another run of the job reads it ended and claims nothing.
            let until = Utc::now() + chrono::Duration::seconds(60);
            let (_, claim) = store
                .get_and_claim(job.id, "w1.b", until, true)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(claim, Claim::NotTried, "an ended job is not claimed");

            // An end refused (the job was canceled meanwhile) is not counted.
            let second = claimed_job(&store, "w2.a").await;
            let canceled = JobUpdate::status(JobStatus::Canceled);
            store
                .update(second.id, Guard::Active, &canceled)
                .await
                .unwrap();
            let refused = end_run(&store, &stats, now, second.id, "w2.a").await;
            assert_eq!(refused, UpdateOutcome::Refused(JobStatus::Canceled));
            assert!(
                !leased(&redis, second.id).await,
                "a refused end gives the lease back too"
            );

            // A job gone from Redis: nothing written or counted.
            let missing = end_run(&store, &stats, now, JobId::new(), "w3.a").await;
            assert_eq!(missing, UpdateOutcome::Missing);

            let day = stats.day(now.date_naive()).await.unwrap();
            assert_eq!(day.get("finished:succeeded:create"), 1, "{day:?}");
            assert_eq!(day.get("dur:5"), 1, "{day:?}");
            assert_eq!(day.total_finished(), 1, "{day:?}");
            let mut connection = redis.connection();
            let minute_ttl: i64 = redis::cmd("TTL")
                .arg(keys.stats_minute(&now.format("%Y-%m-%dT%H:%M").to_string()))
                .query_async(&mut connection)
                .await
                .unwrap();
            assert!((1..=7200).contains(&minute_ttl), "{minute_ttl}");
        })
        .await;
    }

    /// The run's last paid call rides in its final write: the job ends with the call's entry,
    /// its cost and its kept answer in the same script, and the hold is given back. A job
    /// canceled meanwhile keeps its end, and the call is still entered: it was billed.
    #[tokio::test]
    async fn a_run_s_last_call_is_entered_with_its_end_even_when_the_job_ended_meanwhile() {
        use crate::domain::Usage;
        use crate::ledger::{Billing, BudgetPolicy, LedgerEntry, Month, Settlement};
        use crate::store::{StepRecord, step_field};

        with_redis(|keys| async move {
            let (settings, redis, store) = connected(&keys).await;
            let ledger = redis.ledger(BudgetPolicy::from(&settings.budget));
            let month = Month::of(Utc::now());
            let field = step_field("create");

            let mut ends = Vec::new();
            for canceled in [false, true] {
                let job = claimed_job(&store, "w1.a").await;
                if canceled {
                    let cancel = JobUpdate::status(JobStatus::Canceled);
                    store.update(job.id, Guard::Active, &cancel).await.unwrap();
                }
                let (reserve, hold) = ledger.reserve_part(40_000);
                let mut connection = redis.connection();
                let held: (i64, i64, i64) = reserve
                    .invoke_async(
                        &redis::Script::new(concat!(crate::ledger::reserve_body!())),
                        &mut connection,
                    )
                    .await
                    .unwrap();
                assert_eq!(held.0, 1, "the hold is taken");
                let entry = LedgerEntry {
                    at: Utc::now(),
                    job_id: job.id,
                    user: job.user.clone(),
                    usage: Usage {
                        agent: "create".into(),
                        provider: "openai".into(),
                        model: "gpt-image-2".into(),
                        images: 1,
                        ..Usage::default()
                    },
                    cost_micros: 31_730,
                    billing: Billing::Billed,
                };
                let record = serde_json::to_string(&StepRecord {
                    call_id: "c0ffee".into(),
                    answer: serde_json::json!({"images": ["a.png"]}),
                    usage: entry.usage.clone(),
                    cost_micros: entry.cost_micros,
                    at: entry.at,
                })
                .unwrap();
                let settle = ledger
                    .settle_part(
                        &entry,
                        Settlement {
                            hold: Some(&hold),
                            step: Some((&field, &record)),
                            call_id: Some("c0ffee"),
                            only_if_in_flight: false,
                            usage_on_job: true,
                        },
                    )
                    .expect("a hold of this month rides along");
                let succeeded = JobUpdate::status(JobStatus::Succeeded);
                let outcome = store
                    .finish_run(
                        job.id,
                        RunEnd {
                            update: &succeeded,
                            stats: None,
                            release: Some(store.release_part(job.id, "w1.a")),
                            settle: Some(settle),
                        },
                    )
                    .await
                    .unwrap();
                let read = store.get(job.id).await.unwrap().unwrap();
                assert!(read.steps.contains_key("create"), "the answer is kept");
                assert_eq!(read.cost_micros, 31_730);
                ends.push((outcome, read.status));
            }
            assert!(
                matches!(ends[0].0, UpdateOutcome::Applied { .. }),
                "{ends:?}"
            );
            assert_eq!(ends[0].1, JobStatus::Succeeded);
            assert_eq!(ends[1].0, UpdateOutcome::Refused(JobStatus::Canceled));
            assert_eq!(ends[1].1, JobStatus::Canceled);

            let (entries, _) = ledger.entries(month, None, 10).await.unwrap();
            assert_eq!(entries.len(), 2, "both calls are entered: {entries:?}");
            assert_eq!(ledger.month(month).await.unwrap().total(), 2 * 31_730);
            assert_eq!(
                ledger.reserved(month).await.unwrap(),
                0,
                "the holds are given back"
            );
        })
        .await;
    }
}
