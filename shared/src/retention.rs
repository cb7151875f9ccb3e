//! How long image bytes live, kept in Redis: the schedule of jobs whose images are to be deleted,
//! and the measured size of the image store. The bytes themselves are in `images`; the worker's
//! sweeper deletes them when their time comes, and the api refuses new uploads past the bound.
//!
//! **The schedule.** `{p}image-expiry` is a sorted set of job ids scored by when (Unix ms, on
//! Redis's clock) the job's images may go. A job is put there before its input is stored (so no
//! stored input is ever unscheduled, even if the api dies right after), and again, later, by the
//! update script whenever the job ends (`store::update`): its end plus the retention, which by
//! default is the job TTL, so the images and the job hash expire together. Scores only ever move
//! later (`ZADD GT`). The sweeper reads what is due; a job it finds still running is postponed
//! by one retention (it is scheduled again when it ends), any other is deleted and forgotten.
//!
//! **The size.** `{p}image-usage` holds `bytes` and `objects` as last measured by listing the
//! store (`measured_at`, Unix ms), and `uploaded_bytes` and `uploaded_objects`, the uploads the
//! api stored that no measurement has accounted for yet; the figure is their sum. Between
//! measurements it errs on the high side for uploads and deletions, and misses outputs, which the
//! providers' rate limits and the budget bound anyway.

use std::time::Duration;

use crate::connection::RedisConnection;

use crate::domain::JobId;
use crate::keys::Keys;
use crate::store::StoreError;

/// The image store's size as Pictor knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    pub bytes: u64,
    pub objects: u64,
}

/// The images' schedule and the store's size in Redis. Cheap to clone.
#[derive(Clone)]
pub struct Retention {
    connection: RedisConnection,
    keys: Keys,
    retention: Duration,
}

/// `KEYS[1]` schedule; `ARGV[1]` delay in ms; `ARGV[2..]` job ids. Scores are Redis's time plus
/// the delay, and only ever move later.
const SCHEDULE_SCRIPT: &str = r"
local now = redis.call('TIME')
local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[1])
local score = string.format('%d', at)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'GT', score, ARGV[i])
end
return #ARGV - 1
";

/// `KEYS[1]` schedule; `ARGV[1]` most ids to answer: the ids due now (Redis's time).
const DUE_SCRIPT: &str = r"
local now = redis.call('TIME')
local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', at), 'LIMIT', 0, ARGV[1])
";

/// `KEYS[1]` schedule; `ARGV` job ids: removes those still due, so a job scheduled again
/// meanwhile (it ran again and ended later) keeps its new time.
const FORGET_SCRIPT: &str = r"
local now = redis.call('TIME')
local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local removed = 0
for i = 1, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= at then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
";

impl Retention {
    /// The schedule and size on `connection`, deleting images `retention` after their job's
    /// last change.
    pub fn new(connection: RedisConnection, keys: Keys, retention: Duration) -> Self {
        Self {
            connection,
            keys,
            retention,
        }
    }

    pub fn retention(&self) -> Duration {
        self.retention
    }

    fn retention_ms(&self) -> u64 {
        u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX)
    }

    /// Schedules the images of `jobs` for deletion one retention from now (or later, if they
    /// already are).
    pub async fn schedule(&self, jobs: &[JobId]) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut connection = self.connection.clone();
        let script = redis::Script::new(SCHEDULE_SCRIPT);
        let mut invocation = script.key(self.keys.image_expiry());
        invocation.arg(self.retention_ms());
        for job in jobs {
            invocation.arg(job.to_string());
        }
        invocation.invoke_async::<i64>(&mut connection).await?;
        Ok(())
    }

    /// Up to `limit` jobs whose images are due for deletion.
    pub async fn due(&self, limit: usize) -> Result<Vec<JobId>, StoreError> {
        let mut connection = self.connection.clone();
        let ids: Vec<String> = redis::Script::new(DUE_SCRIPT)
            .key(self.keys.image_expiry())
            .arg(limit)
            .invoke_async(&mut connection)
            .await?;
        Ok(ids.iter().filter_map(|id| JobId::parse(id)).collect())
    }

    /// Takes `jobs`, whose images are deleted, off the schedule (unless they were scheduled
    /// again meanwhile). Answers how many were taken off.
    pub async fn forget(&self, jobs: &[JobId]) -> Result<u64, StoreError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let mut connection = self.connection.clone();
        let script = redis::Script::new(FORGET_SCRIPT);
        let mut invocation = script.key(self.keys.image_expiry());
        for job in jobs {
            invocation.arg(job.to_string());
        }
        let removed: i64 = invocation.invoke_async(&mut connection).await?;
        Ok(u64::try_from(removed).unwrap_or(0))
    }

    /// When `job`'s images are due (Unix ms), if they are scheduled.
    pub async fn due_at(&self, job: JobId) -> Result<Option<i64>, StoreError> {
        let mut connection = self.connection.clone();
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(self.keys.image_expiry())
            .arg(job.to_string())
            .query_async(&mut connection)
            .await?;
        Ok(score.map(|score| score as i64))
    }

    /// The store's size: the last measurement plus the uploads counted since it started.
    pub async fn usage(&self) -> Result<StoreUsage, StoreError> {
        let mut connection = self.connection.clone();
        let fields: Vec<Option<i64>> = redis::cmd("HMGET")
            .arg(self.keys.image_usage())
            .arg("bytes")
            .arg("objects")
            .arg("uploaded_bytes")
            .arg("uploaded_objects")
            .query_async(&mut connection)
            .await?;
        let field = |index: usize| {
            fields
                .get(index)
                .copied()
                .flatten()
                .and_then(|value| u64::try_from(value).ok())
                .unwrap_or(0)
        };
        Ok(StoreUsage {
            bytes: field(0) + field(2),
            objects: field(1) + field(3),
        })
    }

    /// Counts an upload of `bytes` until a measurement that started after it.
    pub async fn add_upload(&self, bytes: u64) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let key = self.keys.image_usage();
        redis::pipe()
            .atomic()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("uploaded_bytes")
            .arg(i64::try_from(bytes).unwrap_or(i64::MAX))
            .ignore()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("uploaded_objects")
            .arg(1)
            .ignore()
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }

    /// The uploads counted so far: what a measurement starting now will account for.
    pub async fn uploads(&self) -> Result<StoreUsage, StoreError> {
        let mut connection = self.connection.clone();
        let (bytes, objects): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.keys.image_usage())
            .arg("uploaded_bytes")
            .arg("uploaded_objects")
            .query_async(&mut connection)
            .await?;
        let count = |value: Option<i64>| value.and_then(|value| u64::try_from(value).ok());
        Ok(StoreUsage {
            bytes: count(bytes).unwrap_or(0),
            objects: count(objects).unwrap_or(0),
        })
    }

    /// Replaces the measured size with `measured`, from a listing that started after the
    /// `counted` uploads (from [`Retention::uploads`]): those leave the upload count, and the
    /// ones made during the listing stay in it, so an upload is never lost from the figure
    /// (one the listing saw too is counted twice until the next measurement).
    pub async fn record_measurement(
        &self,
        measured: StoreUsage,
        counted: StoreUsage,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let key = self.keys.image_usage();
        let minus = |value: u64| -i64::try_from(value).unwrap_or(i64::MAX);
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("bytes")
            .arg(measured.bytes)
            .arg("objects")
            .arg(measured.objects)
            .arg("measured_at")
            .arg(at.timestamp_millis())
            .ignore()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("uploaded_bytes")
            .arg(minus(counted.bytes))
            .ignore()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("uploaded_objects")
            .arg(minus(counted.objects))
            .ignore()
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_redis::{connect, with_redis};

    async fn retention(keys: Keys, retention: Duration) -> Retention {
        Retention::new(connect().await, keys, retention)
    }

    #[tokio::test]
    async fn a_job_is_due_once_its_retention_has_passed_and_forgotten_after_deletion() {
        with_redis(|keys| async move {
            let instant = retention(keys.clone(), Duration::ZERO).await;
            let later = retention(keys, Duration::from_secs(3600)).await;
            let (gone, kept) = (JobId::new(), JobId::new());
            instant.schedule(&[gone]).await.unwrap();
            later.schedule(&[kept]).await.unwrap();

            assert_eq!(instant.due(10).await.unwrap(), vec![gone]);
            assert_eq!(instant.forget(&[gone]).await.unwrap(), 1);
            assert!(instant.due(10).await.unwrap().is_empty());
            assert!(later.due_at(kept).await.unwrap().is_some());
        })
        .await;
    }

    #[tokio::test]
    async fn a_schedule_only_moves_later_and_a_rescheduled_job_is_not_forgotten() {
        with_redis(|keys| async move {
            let instant = retention(keys.clone(), Duration::ZERO).await;
            let later = retention(keys, Duration::from_secs(3600)).await;
            let job = JobId::new();
            later.schedule(&[job]).await.unwrap();
            let scheduled = later.due_at(job).await.unwrap().unwrap();

            instant.schedule(&[job]).await.unwrap();
            assert_eq!(later.due_at(job).await.unwrap(), Some(scheduled));
            assert_eq!(instant.forget(&[job]).await.unwrap(), 0, "not due yet");
            assert!(instant.due(10).await.unwrap().is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn uploads_add_to_the_last_measurement_and_only_those_it_saw_leave_the_count() {
        with_redis(|keys| async move {
            let usage = retention(keys, Duration::ZERO).await;
            assert_eq!(usage.usage().await.unwrap(), StoreUsage::default());
            usage.add_upload(700).await.unwrap();
            usage.add_upload(300).await.unwrap();
            assert_eq!(
                usage.usage().await.unwrap(),
                StoreUsage {
                    bytes: 1000,
                    objects: 2
                }
            );

            // A measurement starts, an upload lands while it lists, then it records.
            let counted = usage.uploads().await.unwrap();
            usage.add_upload(50).await.unwrap();
            let measured = StoreUsage {
                bytes: 640,
                objects: 1,
            };
            usage
                .record_measurement(measured, counted, chrono::Utc::now())
                .await
                .unwrap();
            assert_eq!(
                usage.usage().await.unwrap(),
                StoreUsage {
                    bytes: 690,
                    objects: 2
                }
            );
        })
        .await;
    }
}
