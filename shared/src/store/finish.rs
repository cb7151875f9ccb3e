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
            let end = |status| JobUpdate::status(status);
            let counted = |status| {
                stats.job_finished_part(now, status, Some(Intent::Create), Duration::from_secs(3))
            };

            let job = claimed_job(&store, "w1.a").await;
            let succeeded = end(JobStatus::Succeeded);
            let outcome = store
                .finish_run(
                    job.id,
                    RunEnd {
                        update: &succeeded,
                        stats: Some(counted(JobStatus::Succeeded)),
                        release: Some(store.release_part(job.id, "w1.a")),
                    },
                )
                .await
                .unwrap();
            assert!(
                matches!(outcome, UpdateOutcome::Applied { .. }),
                "{outcome:?}"
            );
            let read = store.get(job.id).await.unwrap().unwrap();
            assert_eq!(read.status, JobStatus::Succeeded);
            // The lease is free: another run of the job may claim it (and finds it ended).
            let until = Utc::now() + chrono::Duration::seconds(60);
            let (_, claim) = store
                .get_and_claim(job.id, "w1.b", until, true)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(claim, Claim::NotTried, "an ended job is not claimed");
            let mut connection = redis.connection();
            let leased: Option<f64> = redis::cmd("ZSCORE")
                .arg(keys.leases())
                .arg(job.id.to_string())
                .query_async(&mut connection)
                .await
                .unwrap();
            assert_eq!(leased, None, "the run's lease is given back");

            // The same end again (a redelivered copy finishing too) is refused: not counted.
            let second = claimed_job(&store, "w2.a").await;
            store
                .update(second.id, Guard::Active, &end(JobStatus::Canceled))
                .await
                .unwrap();
            let refused = store
                .finish_run(
                    second.id,
                    RunEnd {
                        update: &succeeded,
                        stats: Some(counted(JobStatus::Succeeded)),
                        release: Some(store.release_part(second.id, "w2.a")),
                    },
                )
                .await
                .unwrap();
            assert_eq!(refused, UpdateOutcome::Refused(JobStatus::Canceled));
            let leased: Option<f64> = redis::cmd("ZSCORE")
                .arg(keys.leases())
                .arg(second.id.to_string())
                .query_async(&mut connection)
                .await
                .unwrap();
            assert_eq!(leased, None, "a refused end gives the lease back too");

            let day = stats.day(now.date_naive()).await.unwrap();
            assert_eq!(day.get("finished:succeeded:create"), 1, "{day:?}");
            assert_eq!(day.get("dur:5"), 1, "{day:?}");
            let minute_ttl: i64 = redis::cmd("TTL")
                .arg(keys.stats_minute(&now.format("%Y-%m-%dT%H:%M").to_string()))
                .query_async(&mut connection)
                .await
                .unwrap();
            assert!((1..=7200).contains(&minute_ttl), "{minute_ttl}");

            // A job gone from Redis: nothing written or counted, the lease entry cleared.
            let gone = JobId::new();
            let missing = store
                .finish_run(
                    gone,
                    RunEnd {
                        update: &succeeded,
                        stats: Some(counted(JobStatus::Succeeded)),
                        release: Some(store.release_part(gone, "w3.a")),
                    },
                )
                .await
                .unwrap();
            assert_eq!(missing, UpdateOutcome::Missing);
            assert_eq!(
                stats.day(now.date_naive()).await.unwrap().total_finished(),
                1
            );
        })
        .await;
    }
}
