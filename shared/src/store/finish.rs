//! The end of a job's run, in one script and one round trip: the job's final update
//! ([`JobStore::update`], guarded by [`Guard::Active`]), the statistics of its end
//! ([`crate::stats`]), counted only when that update applied, and the release of the run's
//! lease ([`JobStore::release_run`]), which the run gives back whatever the update said: a job
//! that ended (now, or before in another run) or is gone has nothing left to run. Each step is
//! the script that runs it alone, as a Lua function ([`crate::script`]).

use super::{Guard, JobStore, JobUpdate, StoreError, UpdateOutcome};
use crate::domain::JobId;
use crate::script::{Part, lua_function, split_parts};

/// The final write's script. KEYS and ARGV: [`Part::compose`] of the update, the statistics
/// (empty: none) and the release (empty: none).
const FINISH_SCRIPT: &str = concat!(
    lua_function!("job_update", super::update::update_body!()),
    lua_function!("stats_add", crate::stats::add_body!()),
    lua_function!("run_release", super::release_run_body!()),
    split_parts!(),
    r#"
local update, stats, release = PARTS[1], PARTS[2], PARTS[3]
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
        let mut connection = self.connection.pinned();
        let reply = Part::compose([
            update,
            end.stats.unwrap_or_default(),
            end.release.unwrap_or_default(),
        ])
        .invoke_async(&self.finish_script, &mut connection)
        .await?;
        self.after_update(id, end.update, reply, &mut connection)
            .await
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
            let mut settings = crate::config::Settings::defaults().unwrap();
            settings.redis.prefix = keys.prefix().to_string();
            let redis = Redis::connect(&settings.redis).await.unwrap();
            let store = JobStore::new(redis.clone(), Duration::from_secs(600));
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
}
