//! A job's input image in the object store: stored when a job is accepted and when the answer to
//! its question sends a new image, removed when an acceptance is undone. Both paths store it the
//! same way, so the worker always finds it at `ImageStore::input_of` with what the job hash
//! says about it. An image sent with an answer gets a name of its own
//! (`clarified-{random}.{ext}`), so of two racing answers the loser's upload never replaces
//! the winner's.

use bytes::Bytes;
use shared::domain::{ImageMime, InputImage, JobId};
use shared::images::ImageStore;

use crate::error::ApiError;
use crate::state::retry_after_secs;

/// Stores `image` as the input of job `id` and returns what the job hash records about it, or
/// `None` when there is no image. An object store that cannot take it is a 503, like any other
/// dependency that is down while a job is accepted.
pub async fn store(
    images: &ImageStore,
    id: JobId,
    image: Option<&(Bytes, ImageMime)>,
) -> Result<Option<InputImage>, ApiError> {
    store_named(images, id, image, None).await
}

/// Like [`store`], under a name of its own: for an image sent with a clarification.
pub async fn store_answer(
    images: &ImageStore,
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
    store_named(images, id, image, name).await
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

        let stored = store(&images, id, Some(&image)).await.unwrap();
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
        assert_eq!(store(&images, JobId::new(), None).await.unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
