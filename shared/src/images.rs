//! Image bytes live in an object store (the `object_store` crate): a local directory by default,
//! or S3-compatible storage when `images.store` is an `s3://bucket/prefix` URL.
//!
//! Only bytes live here; what they are (type, size) is on the job in Redis. Paths are
//! deterministic per job, so a redelivered job that runs twice overwrites instead of piling up,
//! and everything of one job is under its two folders (`inputs/{job}/`, `outputs/{job}/`), which
//! is how its images are deleted (`delete_jobs`) and the store measured (`measure`) by listing.
//! When they are deleted is `retention`'s business.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::domain::{ImageMime, JobId};
use crate::retention::StoreUsage;

/// The folders under which job images live; anything else in the store (cost exports) is not
/// an image.
const IMAGE_FOLDERS: [&str; 2] = ["inputs", "outputs"];

#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    #[error("image store is misconfigured: {0}")]
    Config(String),
    #[error("image not found")]
    NotFound,
    #[error("image store is unavailable: {0}")]
    Unavailable(#[from] object_store::Error),
}

/// A stored image being read: its size in bytes and its chunks.
pub struct ImageReader {
    pub size: u64,
    pub chunks: BoxStream<'static, Result<Bytes, ImageStoreError>>,
}

#[derive(Clone, Debug)]
pub struct ImageStore {
    inner: Arc<dyn ObjectStore>,
}

impl ImageStore {
    /// Opens the store described by `images.store` (a directory, or `s3://bucket/prefix`).
    pub fn open(location: &str) -> Result<Self, ImageStoreError> {
        let inner: Arc<dyn ObjectStore> = if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(ImageStoreError::Config(format!(
                    "{location} names no bucket"
                )));
            }
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                builder = builder
                    .with_endpoint(endpoint.clone())
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            let s3 = builder
                .build()
                .map_err(|error| ImageStoreError::Config(error.to_string()))?;
            if prefix.trim_matches('/').is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix.trim_matches('/')))
            }
        } else {
            std::fs::create_dir_all(location).map_err(|error| {
                ImageStoreError::Config(format!("cannot create {location}: {error}"))
            })?;
            Arc::new(
                // Deleting a job's last image removes its folder too.
                LocalFileSystem::new_with_prefix(location)
                    .map_err(|error| ImageStoreError::Config(error.to_string()))?
                    .with_automatic_cleanup(true),
            )
        };
        Ok(Self { inner })
    }

    /// Where `input`, the input image of `job`, is stored.
    pub fn input_of(job: JobId, input: &crate::domain::InputImage) -> Path {
        match &input.name {
            Some(name) => Path::from(format!("inputs/{job}/{name}")),
            None => Self::input_path(job, input.mime_type),
        }
    }

    pub fn input_path(job: JobId, mime: ImageMime) -> Path {
        Path::from(format!("inputs/{job}/source.{}", mime.extension()))
    }

    pub fn output_path(job: JobId, index: usize, mime: ImageMime) -> Path {
        Path::from(format!("outputs/{job}/{index}.{}", mime.extension()))
    }

    pub async fn put(&self, path: &Path, bytes: Bytes) -> Result<(), ImageStoreError> {
        self.inner.put(path, PutPayload::from(bytes)).await?;
        Ok(())
    }

    pub async fn get(&self, path: &Path) -> Result<Bytes, ImageStoreError> {
        match self.inner.get(path).await {
            Ok(result) => Ok(result.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(ImageStoreError::NotFound),
            Err(error) => Err(error.into()),
        }
    }

    /// Opens `path` for reading without loading it: its size and a stream of its chunks, so a
    /// download costs a chunk of memory rather than the whole image.
    pub async fn open_read(&self, path: &Path) -> Result<ImageReader, ImageStoreError> {
        match self.inner.get(path).await {
            Ok(result) => Ok(ImageReader {
                size: result.meta.size,
                chunks: result
                    .into_stream()
                    .map_err(ImageStoreError::Unavailable)
                    .boxed(),
            }),
            Err(object_store::Error::NotFound { .. }) => Err(ImageStoreError::NotFound),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn delete(&self, path: &Path) -> Result<(), ImageStoreError> {
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Whether an object is at `path`.
    pub async fn exists(&self, path: &Path) -> Result<bool, ImageStoreError> {
        match self.inner.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Deletes every image of `jobs` (inputs and outputs, whatever their names): one listing per
    /// folder, then the deletions as one stream, which S3 sends as bulk requests of up to 1,000
    /// keys. Answers what was deleted. Deleting what is not there is no error.
    pub async fn delete_jobs(&self, jobs: &[JobId]) -> Result<StoreUsage, ImageStoreError> {
        let mut found = Vec::new();
        for job in jobs {
            for folder in IMAGE_FOLDERS {
                let prefix = Path::from(format!("{folder}/{job}"));
                let mut listed = self.inner.list(Some(&prefix));
                while let Some(meta) = listed.try_next().await? {
                    found.push(meta);
                }
            }
        }
        let mut deleted = StoreUsage::default();
        if found.is_empty() {
            return Ok(deleted);
        }
        for meta in &found {
            deleted.bytes += meta.size;
            deleted.objects += 1;
        }
        let locations = futures::stream::iter(found.into_iter().map(|meta| Ok(meta.location)));
        let mut results = self.inner.delete_stream(locations.boxed());
        while let Some(result) = results.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(deleted)
    }

    /// The images in the store, counted by listing `inputs/` and `outputs/`: one LIST request per
    /// 1,000 objects on S3, a directory walk on a local store.
    pub async fn measure(&self) -> Result<StoreUsage, ImageStoreError> {
        let mut usage = StoreUsage::default();
        for folder in IMAGE_FOLDERS {
            let prefix = Path::from(folder);
            let mut listed = self.inner.list(Some(&prefix));
            while let Some(meta) = listed.try_next().await? {
                usage.bytes += meta.size;
                usage.objects += 1;
            }
        }
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_round_trip_through_a_local_directory() {
        let dir = std::env::temp_dir().join(format!("pictor-images-{}", JobId::new()));
        let store = ImageStore::open(dir.to_str().unwrap()).unwrap();
        let job = JobId::new();
        let path = ImageStore::output_path(job, 0, ImageMime::Png);
        store.put(&path, Bytes::from_static(b"png")).await.unwrap();
        assert_eq!(store.get(&path).await.unwrap(), Bytes::from_static(b"png"));
        store.delete(&path).await.unwrap();
        assert!(matches!(
            store.get(&path).await,
            Err(ImageStoreError::NotFound)
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_jobs_images_are_deleted_by_listing_its_folders_and_the_store_is_measured() {
        let dir = std::env::temp_dir().join(format!("pictor-images-{}", JobId::new()));
        let store = ImageStore::open(dir.to_str().unwrap()).unwrap();
        let (gone, kept) = (JobId::new(), JobId::new());
        for (path, bytes) in [
            (ImageStore::input_path(gone, ImageMime::Png), &b"input"[..]),
            // A clarification may bring an image of another type: both go.
            (ImageStore::input_path(gone, ImageMime::Jpeg), b"second"),
            (ImageStore::output_path(gone, 0, ImageMime::Png), b"out0"),
            (ImageStore::output_path(gone, 1, ImageMime::Png), b"out1"),
            (ImageStore::output_path(kept, 0, ImageMime::Webp), b"kept"),
        ] {
            store.put(&path, Bytes::from_static(bytes)).await.unwrap();
        }
        // Not an image: the cost exports share the store and are never counted or deleted.
        store
            .put(&Path::from("exports/costs.csv"), Bytes::from_static(b"csv"))
            .await
            .unwrap();
        assert_eq!(
            store.measure().await.unwrap(),
            StoreUsage {
                bytes: 23,
                objects: 5
            }
        );

        let deleted = store.delete_jobs(&[gone, JobId::new()]).await.unwrap();
        assert_eq!(
            deleted,
            StoreUsage {
                bytes: 19,
                objects: 4
            }
        );
        assert!(!dir.join(format!("inputs/{gone}")).exists());
        assert!(!dir.join(format!("outputs/{gone}")).exists());
        assert!(
            store
                .exists(&ImageStore::output_path(kept, 0, ImageMime::Webp))
                .await
                .unwrap()
        );
        assert!(
            !store
                .exists(&ImageStore::input_path(gone, ImageMime::Png))
                .await
                .unwrap()
        );
        assert_eq!(
            store.measure().await.unwrap(),
            StoreUsage {
                bytes: 4,
                objects: 1
            }
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
