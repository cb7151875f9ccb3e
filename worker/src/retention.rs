//! The image sweeper: deletes the images of jobs whose retention ran out, and measures the
//! image store, so that images do not pile up forever and their volume is known (the schedule
//! and the figure are `shared::retention`; `docs/storage.md` has the whole policy).
//!
//! Every worker runs one, but Redis locks let only one worker sweep per round
//! (`{p}image-sweep:lock`, held for the interval) and only one measure per measurement interval
//! (`{p}image-measure:lock`, never released, so it marks the interval). A round takes the due
//! jobs a batch at a time: a job still running (replayed, or answered after a question) is
//! postponed by one retention, since it is scheduled again when it ends; the others have both
//! their folders listed and deleted in one stream, then leave the schedule. A round stops when
//! nothing is due or half its interval has passed, so a large backlog is worked off over
//! several rounds without two workers sweeping at once.

use std::time::{Duration, Instant};

use shared::domain::JobId;
use shared::images::ImageStore;
use shared::retention::{Retention, StoreUsage};
use shared::store::JobStore;
use tokio::sync::watch;

/// Jobs taken off the schedule at a time.
const BATCH: usize = 100;

pub struct Sweeper {
    pub store: JobStore,
    pub images: ImageStore,
    pub retention: Retention,
    pub interval: Duration,
    pub measure_interval: Duration,
}

impl Sweeper {
    /// Sweeps every interval and measures every measurement interval, until `shutdown`.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        tokio::join!(
            self.sweep_loop(shutdown.clone()),
            self.measure_loop(shutdown)
        );
    }

    async fn sweep_loop(&self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {},
                _ = shutdown.changed() => return,
            }
            match self.round().await {
                Ok(0) => {}
                Ok(swept) => tracing::info!(jobs = swept, "Deleted the images of expired jobs"),
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "Image sweep failed; trying again next round");
                }
            }
        }
    }

    /// Measures first, so a worker that starts shows the store's size soon.
    async fn measure_loop(&self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(error) = self.measure().await {
                tracing::warn!(error = %format!("{error:#}"), "Measuring the image store failed; trying again next interval");
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval.min(self.measure_interval)) => {},
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One pass over the due jobs. Returns how many jobs' images it deleted.
    pub async fn round(&self) -> anyhow::Result<usize> {
        let lock = self.store.keys().image_sweep_lock();
        if !self.store.try_lock(&lock, self.interval).await? {
            return Ok(0);
        }
        let started = Instant::now();
        let mut swept = 0;
        loop {
            let due = self.retention.due(BATCH).await?;
            if due.is_empty() {
                break;
            }
            let statuses = self.store.statuses(&due).await?;
            let (running, ended): (Vec<_>, Vec<_>) = due
                .iter()
                .zip(statuses)
                .partition(|(_, presence)| presence.is_active());
            let running: Vec<JobId> = running.into_iter().map(|(id, _)| *id).collect();
            let ended: Vec<JobId> = ended.into_iter().map(|(id, _)| *id).collect();
            // Scheduled again when it ends; until then, out of the way of this round.
            self.retention.schedule(&running).await?;
            swept += self.delete(&ended).await?;
            if due.len() < BATCH || started.elapsed() >= self.interval / 2 {
                break;
            }
        }
        Ok(swept)
    }

    /// Deletes the images of `jobs` and takes them off the schedule. When the batch as a whole
    /// fails, each job is tried alone, and one that still fails is postponed by a retention (and
    /// logged), so it cannot hold up every round after it.
    async fn delete(&self, jobs: &[JobId]) -> anyhow::Result<usize> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let deleted = match self.images.delete_jobs(jobs).await {
            Ok(deleted) => {
                self.retention.forget(jobs).await?;
                deleted
            }
            Err(error) => {
                tracing::warn!(%error, jobs = jobs.len(), "Deleting a batch of expired images failed; trying each job alone");
                let mut deleted = StoreUsage::default();
                for job in jobs {
                    match self.images.delete_jobs(&[*job]).await {
                        Ok(one) => {
                            self.retention.forget(&[*job]).await?;
                            deleted.bytes += one.bytes;
                            deleted.objects += one.objects;
                        }
                        Err(error) => {
                            tracing::warn!(job_id = %job, %error, "Could not delete an expired job's images; trying again after another retention");
                            self.retention.schedule(&[*job]).await?;
                        }
                    }
                }
                deleted
            }
        };
        if deleted.objects > 0 {
            crate::metrics::images_deleted("expired", deleted.objects);
        }
        Ok(jobs.len())
    }

    /// Lists the store and records its size, if no worker did in this measurement interval.
    pub async fn measure(&self) -> anyhow::Result<Option<StoreUsage>> {
        let lock = self.store.keys().image_measure_lock();
        if !self.store.try_lock(&lock, self.measure_interval).await? {
            return Ok(None);
        }
        let started = Instant::now();
        let counted = self.retention.uploads().await?;
        let measured = self.images.measure().await?;
        self.retention
            .record_measurement(measured, counted, chrono::Utc::now())
            .await?;
        let usage = self.retention.usage().await?;
        crate::metrics::image_store(usage);
        tracing::debug!(
            bytes = measured.bytes,
            objects = measured.objects,
            took_ms = started.elapsed().as_millis() as u64,
            "Measured the image store"
        );
        Ok(Some(usage))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use shared::config::Settings;
    use shared::domain::{ImageMime, ImageSize, JobStatus, UserId};
    use shared::store::{Guard, JobRecord, JobUpdate};
    use shared::test_redis::with_redis;

    use super::*;

    async fn job(store: &JobStore, status: JobStatus) -> JobId {
        let record = JobRecord::new(
            JobId::new(),
            UserId::parse("alice").unwrap(),
            "a fox".to_string(),
            ImageSize::Auto,
            1,
            None,
            chrono::Utc::now(),
        );
        store.insert_pending(&record).await.unwrap();
        store
            .update(record.id, Guard::Active, &JobUpdate::status(status))
            .await
            .unwrap();
        record.id
    }

    #[tokio::test]
    async fn a_round_deletes_the_images_of_ended_and_vanished_jobs_and_postpones_running_ones() {
        with_redis(|keys| async move {
            let mut settings = Settings::defaults().unwrap();
            settings.redis.prefix = keys.prefix().to_string();
            if let Ok(url) = std::env::var("PICTOR_REDIS_URL") {
                settings.redis.url = url.into();
            }
            // Jobs end due at once; the sweeper postpones by an hour.
            let store = JobStore::connect(&settings.redis, Duration::from_secs(60))
                .await
                .unwrap()
                .with_image_retention(Duration::ZERO);
            let uploads = store.redis().image_retention(Duration::ZERO);
            let dir = std::env::temp_dir().join(format!("pictor-sweep-{}", JobId::new()));
            let images = ImageStore::open(dir.to_str().unwrap()).unwrap();
            let sweeper = Sweeper {
                store: store.clone(),
                images: images.clone(),
                retention: store.redis().image_retention(Duration::from_secs(3600)),
                interval: Duration::from_secs(10),
                measure_interval: Duration::from_secs(10),
            };

            let ended = job(&store, JobStatus::Succeeded).await;
            let running = job(&store, JobStatus::Running).await;
            let vanished = JobId::new();
            uploads.schedule(&[running, vanished]).await.unwrap();
            for id in [ended, running, vanished] {
                let input = ImageStore::input_path(id, ImageMime::Png);
                images
                    .put(&input, Bytes::from_static(b"png"))
                    .await
                    .unwrap();
            }
            let output = ImageStore::output_path(ended, 0, ImageMime::Png);
            images
                .put(&output, Bytes::from_static(b"out"))
                .await
                .unwrap();

            assert_eq!(sweeper.round().await.unwrap(), 2);
            assert!(!images.exists(&output).await.unwrap());
            for id in [ended, vanished] {
                let input = ImageStore::input_path(id, ImageMime::Png);
                assert!(!images.exists(&input).await.unwrap(), "{id}");
                assert_eq!(uploads.due_at(id).await.unwrap(), None, "{id}");
            }
            let kept = ImageStore::input_path(running, ImageMime::Png);
            assert!(images.exists(&kept).await.unwrap());
            let postponed = uploads.due_at(running).await.unwrap().unwrap();
            let half_an_hour = chrono::Utc::now().timestamp_millis() + 1_800_000;
            assert!(postponed > half_an_hour, "{postponed}");

            let measured = sweeper.measure().await.unwrap();
            assert_eq!(
                measured,
                Some(StoreUsage {
                    bytes: 3,
                    objects: 1
                })
            );
            assert_eq!(sweeper.measure().await.unwrap(), None, "once an interval");
            let _ = std::fs::remove_dir_all(dir);
        })
        .await;
    }
}
