//! A job's input image in the object store: stored when a job is accepted and when the answer to
//! its question sends a new image, removed when an acceptance is undone, and with everything else
//! of its job when the job is canceled. Both paths store it the same way, so the worker always
//! finds it at `ImageStore::input_of` with what the job hash says about it. An image sent with an
//! answer gets a name of its own (`clarified-{random}.{ext}`), so of two racing answers the
//! loser's upload never replaces the winner's.
//!
//! Storing is also where the image store's bound is enforced: an upload while the stored images
//! are over `images.max_store_mib` is refused with `503 image_store_full`, and every upload is
//! scheduled for deletion (see `shared::retention`) before its bytes are written, so no input is
//! ever stored without a time to go.

use std::time::Duration;

use bytes::Bytes;
use shared::domain::{ImageMime, InputImage, JobId};
use shared::images::ImageStore;

use crate::error::{ApiError, ErrorCode};
use crate::state::{AppState, retry_after_secs};

/// Stores `image` as the input of job `id` and returns what the job hash records about it, or
/// `None` when there is no image: refused when the store is over its bound, scheduled for
/// deletion, stored, and counted in the store's size. An object store that cannot take it is a
/// 503, like any other dependency that is down while a job is accepted.
pub async fn store(
    app: &AppState,
    id: JobId,
    image: Option<&(Bytes, ImageMime)>,
) -> Result<Option<InputImage>, ApiError> {
    admit_and_put(app, id, image, None).await
}

/// Like [`store`], under a name of its own: for an image sent with a clarification.
pub async fn store_answer(
    app: &AppState,
    id: JobId,
    image: Option<&(Bytes, ImageMime)>,
) -> Result<Option<InputImage>, ApiError> {
    let name = image.map(|(_, mime)| {
        format!(
            "clarified-{}.{}",
            uuid::Uuid::new_v4().simple(),
            mime.extension()
        )
    });
    admit_and_put(app, id, image, name).await
}

async fn admit_and_put(
    app: &AppState,
    id: JobId,
    image: Option<&(Bytes, ImageMime)>,
    name: Option<String>,
) -> Result<Option<InputImage>, ApiError> {
    let Some((bytes, _)) = image else {
        return Ok(None);
    };
    ensure_room(app).await?;
    app.retention.schedule(&[id]).await?;
    let stored = store_named(&app.images, id, image, name).await?;
    let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if let Err(error) = app.retention.add_upload(size).await {
        // The next measurement counts it; the figure is an estimate between measurements.
        tracing::warn!(%error, "Could not count an upload in the image store's size");
    }
    Ok(stored)
}

/// Refuses an upload while the stored images are over `images.max_store_mib`. The figure is
/// the last measurement plus the uploads since; it falls when a measurement sees what expired,
/// hence the measurement interval as `Retry-After`.
async fn ensure_room(app: &AppState) -> Result<(), ApiError> {
    let settings = &app.settings.images;
    let Some(max_bytes) = settings.max_store_bytes() else {
        return Ok(());
    };
    let usage = app.retention.usage().await?;
    if usage.bytes < max_bytes {
        return Ok(());
    }
    tracing::warn!(
        stored_bytes = usage.bytes,
        max_bytes,
        "Image store over its bound; refusing an upload"
    );
    Err(ApiError::retry_later(
        ErrorCode::ImageStoreFull,
        format!(
            "the image store is full ({} MiB); jobs with an image are refused until older \
             images expire; retry after the delay in Retry-After",
            settings.max_store_mib
        ),
        settings.measure_interval.max(Duration::from_secs(1)),
    ))
}

/// Deletes everything job `id` has in the object store (its input, and any outputs), as when it
/// is canceled. Best effort, and bounded in time: what is left goes when the job's images
/// expire.
pub async fn remove_all(images: &ImageStore, id: JobId) {
    let deleted = tokio::time::timeout(Duration::from_secs(5), images.delete_jobs(&[id])).await;
    match deleted {
        Ok(Ok(deleted)) => {
            if deleted.objects > 0 {
                crate::observe::images_deleted("canceled", deleted.objects);
            }
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "Could not delete a canceled job's images; they go when they expire");
        }
        Err(_) => {
            tracing::warn!("Deleting a canceled job's images timed out; they go when they expire");
        }
    }
}

async fn store_named(
    images: &ImageStore,
    id: JobId,
    image: Option<&(Bytes, ImageMime)>,
    name: Option<String>,
) -> Result<Option<InputImage>, ApiError> {
    let Some((bytes, mime)) = image else {
        return Ok(None);
    };
    shared::failpoint::hit("store_input", "").await;
    let input = InputImage {
        mime_type: *mime,
        bytes_len: bytes.len(),
        name,
    };
    images
        .put(&ImageStore::input_of(id, &input), bytes.clone())
        .await
        .map_err(|error| ApiError::unavailable(error, retry_after_secs()))?;
    Ok(Some(input))
}

/// Deletes a stored input image no job refers to (best effort: what is left expires with the
/// job's images).
pub async fn discard(images: &ImageStore, id: JobId, input: &InputImage) {
    let _ = images.delete(&ImageStore::input_of(id, input)).await;
}

/// Removes what [`store`] stored for job `id`. Best effort: it only runs while a failed
/// acceptance is being undone, and the client is already getting that failure's 503.
pub async fn remove(images: &ImageStore, id: JobId, image: Option<&(Bytes, ImageMime)>) {
    if let Some((_, mime)) = image {
        let _ = images.delete(&ImageStore::input_path(id, *mime)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The eight-byte PNG signature is all `ImageMime::sniff` needs; the store never decodes.
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";

    fn scratch_store() -> (ImageStore, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("pictor-api-inputs-{}", JobId::new()));
        let store = ImageStore::open(dir.to_str().unwrap()).unwrap();
        (store, dir)
    }

    #[tokio::test]
    async fn an_image_is_stored_where_the_worker_reads_it_and_removed_again() {
        let (images, dir) = scratch_store();
        let id = JobId::new();
        let image = (Bytes::from_static(PNG), ImageMime::Png);

        let stored = store_named(&images, id, Some(&image), None).await.unwrap();
        assert_eq!(
            stored,
            Some(InputImage {
                mime_type: ImageMime::Png,
                bytes_len: PNG.len(),
                name: None,
            })
        );
        let path = ImageStore::input_path(id, ImageMime::Png);
        assert_eq!(images.get(&path).await.unwrap().as_ref(), PNG);

        remove(&images, id, Some(&image)).await;
        assert!(matches!(
            images.get(&path).await,
            Err(shared::images::ImageStoreError::NotFound)
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn without_an_image_nothing_is_stored() {
        let (images, dir) = scratch_store();
        assert_eq!(
            store_named(&images, JobId::new(), None, None)
                .await
                .unwrap(),
            None
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
