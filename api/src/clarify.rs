//! Answering a job's question, the work behind `POST /v1/jobs/{id}/clarify`: a job that
//! `needs_clarification` goes back to `queued` with the intent the user chose, and the same job
//! resumes at that intent's agent. The handler in `crate::jobs` finds the caller's job and parses
//! the answer; everything after that happens here.

use shared::codes::NoticeKind;
use shared::domain::{InputImage, JobId, JobStatus, Notice};
use shared::images::ImageStore;
use shared::queue::JobMessage;
use shared::store::{Guard, JobRecord, JobUpdate, UpdateOutcome};

use crate::error::{ApiError, ErrorCode};
use crate::inputs;
use crate::intake::ClarifyRequest;
use crate::state::{AppState, retry_after_secs};

/// Resumes `job` with `answer`: stores a new input image if one came with it, puts the job back
/// in the queue as the chosen intent, and publishes it again. Returns the job's id for the `202`.
pub async fn resume(
    app: &AppState,
    job: &JobRecord,
    answer: &ClarifyRequest,
) -> Result<JobId, ApiError> {
    check_answerable(job, answer)?;
    check_kept_image(app, job, answer).await?;
    let input_image = inputs::store_answer(app, job.id, answer.image.as_ref()).await?;
    let update = resumption(job, answer, input_image.clone());
    // Guarded on the status, so that of two answers racing for the same question only one
    // resumes the job; the other sees that the job is no longer asking, and its image (stored
    // under a name of its own) goes.
    let outcome = app
        .store
        .update(
            job.id,
            Guard::Status(JobStatus::NeedsClarification),
            &update,
        )
        .await;
    let lost = match outcome {
        Ok(UpdateOutcome::Applied { .. }) => None,
        Ok(UpdateOutcome::Refused(status)) => Some(not_awaiting(status)),
        Ok(UpdateOutcome::Missing) => Some(ApiError::not_found()),
        Err(error) => Some(error.into()),
    };
    if let Some(error) = lost {
        if let Some(input) = &input_image {
            inputs::discard(&app.images, job.id, input).await;
        }
        return Err(error);
    }
    // The image the answer replaced is no job's any more.
    if let (Some(_), Some(previous)) = (&input_image, &job.input_image) {
        inputs::discard(&app.images, job.id, previous).await;
    }
    republish(app, job).await?;
    tracing::info!(job_id = %job.id, intent = answer.intent.as_str(), "Clarification answered; job resumed");
    Ok(job.id)
}

/// The checks that cost nothing, made before the answer's body (up to `api.max_body_bytes`) is
/// read: the job must be asking, and the caller within their rate.
pub async fn precheck(app: &AppState, job: &JobRecord) -> Result<(), ApiError> {
    if job.status != JobStatus::NeedsClarification {
        return Err(not_awaiting(job.status));
    }
    crate::submit::admit(app, &job.user).await
}

/// Whether `answer` can resume `job` at all: the job must be asking, and an intent that works
/// on an image needs one, sent now or kept from the original request.
fn check_answerable(job: &JobRecord, answer: &ClarifyRequest) -> Result<(), ApiError> {
    if job.status != JobStatus::NeedsClarification {
        return Err(not_awaiting(job.status));
    }
    if answer.intent.needs_image() && answer.image.is_none() && job.input_image.is_none() {
        return Err(ApiError::client(
            ErrorCode::ImageRequired,
            format!(
                "{} needs an image: send it as image.data (base64)",
                answer.intent.as_str()
            ),
        ));
    }
    Ok(())
}

/// An answer that relies on the image sent with the original request needs that image still
/// kept: when the retention is shorter than the job TTL, a question left open that long outlives
/// its image, and the user is asked to send it again instead of resuming a job that must fail.
async fn check_kept_image(
    app: &AppState,
    job: &JobRecord,
    answer: &ClarifyRequest,
) -> Result<(), ApiError> {
    let Some(input) = &job.input_image else {
        return Ok(());
    };
    if !answer.intent.needs_image() || answer.image.is_some() {
        return Ok(());
    }
    let kept = app
        .images
        .exists(&ImageStore::input_of(job.id, input))
        .await
        .map_err(|error| ApiError::unavailable(error, retry_after_secs()))?;
    if kept {
        return Ok(());
    }
    Err(ApiError::client(
        ErrorCode::ImageRequired,
        format!(
            "the image sent with this job is no longer kept; send it again to {} it",
            answer.intent.as_str()
        ),
    ))
}

/// The change that resumes `job`: queued again, at the chosen intent's agent, with a fresh
/// attempt count for that step and the question cleared. Without a new prompt the original one
/// is kept.
fn resumption(
    job: &JobRecord,
    answer: &ClarifyRequest,
    input_image: Option<InputImage>,
) -> JobUpdate {
    let prompt = answer
        .prompt
        .as_ref()
        .map_or_else(|| job.prompt.clone(), |prompt| prompt.as_str().to_string());
    // The agents' wire names are the intents they serve ("create", "edit", "upscale").
    JobUpdate {
        status: Some(JobStatus::Queued),
        intent: Some(answer.intent),
        prompt: Some(prompt.clone()),
        input_image,
        next_agent: Some(Some(answer.intent.as_str().to_string())),
        agent_prompt: Some(Some(prompt)),
        step_attempts: Some(0),
        clear_clarification: true,
        add_notices: vec![Notice::now(
            NoticeKind::Clarified,
            format!(
                "Thanks! We will {} the image as you asked.",
                answer.intent.as_str()
            ),
        )],
        ..JobUpdate::default()
    }
}

/// Publishes the resumed job. When the broker does not confirm, the question is put back, so the
/// user can answer again once the broker is back instead of holding a job nothing will run.
async fn republish(app: &AppState, job: &JobRecord) -> Result<(), ApiError> {
    let published = app
        .publisher
        .publish(
            &JobMessage::run(job.id),
            shared::telemetry::trace_headers(job.id),
        )
        .await;
    if let Err(error) = published {
        let revert = JobUpdate {
            status: Some(JobStatus::NeedsClarification),
            clarification: job.clarification.clone(),
            ..JobUpdate::default()
        };
        let reverted = app
            .store
            .update(job.id, Guard::Status(JobStatus::Queued), &revert)
            .await;
        // A message the broker did not confirm may still have been delivered: a worker that
        // has moved the job on since had it, so the answer stands.
        if error.may_have_arrived() && matches!(reverted, Ok(UpdateOutcome::Refused(_))) {
            tracing::warn!(
                %error,
                "The broker did not confirm the resumed job but a worker has started it"
            );
            return Ok(());
        }
        return Err(ApiError::unavailable(error, retry_after_secs()));
    }
    Ok(())
}

fn not_awaiting(status: JobStatus) -> ApiError {
    ApiError::client(
        ErrorCode::NotAwaitingClarification,
        format!(
            "the job is {}, not waiting for a clarification",
            status.as_str()
        ),
    )
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use shared::domain::{ImageMime, ImageSize, Intent, Prompt, UserId};

    use super::*;

    fn asking_job(input_image: Option<InputImage>) -> JobRecord {
        let mut job = JobRecord::new(
            JobId::new(),
            UserId::parse("someone").unwrap(),
            "a cat on a sofa".to_string(),
            ImageSize::Auto,
            1,
            input_image,
            chrono::Utc::now(),
        );
        job.status = JobStatus::NeedsClarification;
        job
    }

    fn answer(intent: Intent) -> ClarifyRequest {
        ClarifyRequest {
            intent,
            prompt: None,
            image: None,
        }
    }

    #[test]
    fn only_a_job_that_is_asking_can_be_answered() {
        let mut job = asking_job(None);
        assert!(check_answerable(&job, &answer(Intent::Create)).is_ok());
        job.status = JobStatus::Queued;
        let error = check_answerable(&job, &answer(Intent::Create)).unwrap_err();
        assert_eq!(error.code(), ErrorCode::NotAwaitingClarification);
    }

    #[test]
    fn an_edit_needs_an_image_sent_now_or_kept_from_the_request() {
        let error = check_answerable(&asking_job(None), &answer(Intent::Edit)).unwrap_err();
        assert_eq!(error.code(), ErrorCode::ImageRequired);

        let kept = InputImage {
            mime_type: ImageMime::Png,
            bytes_len: 8,
            name: None,
        };
        assert!(check_answerable(&asking_job(Some(kept)), &answer(Intent::Edit)).is_ok());

        let sent = ClarifyRequest {
            image: Some((Bytes::from_static(b"\x89PNG\r\n\x1a\n"), ImageMime::Png)),
            ..answer(Intent::Upscale)
        };
        assert!(check_answerable(&asking_job(None), &sent).is_ok());
    }

    #[test]
    fn the_resumed_job_is_queued_at_the_chosen_agent_with_the_original_prompt() {
        let job = asking_job(None);
        let update = resumption(&job, &answer(Intent::Create), None);
        assert_eq!(update.status, Some(JobStatus::Queued));
        assert_eq!(update.intent, Some(Intent::Create));
        assert_eq!(update.next_agent, Some(Some("create".to_string())));
        assert_eq!(update.prompt.as_deref(), Some("a cat on a sofa"));
        assert_eq!(
            update.agent_prompt,
            Some(Some("a cat on a sofa".to_string()))
        );
        assert_eq!(update.step_attempts, Some(0));
        assert!(update.clear_clarification);
        assert_eq!(update.add_notices.len(), 1);
        assert_eq!(update.add_notices[0].code, NoticeKind::Clarified.as_str());
    }

    #[test]
    fn a_new_prompt_in_the_answer_replaces_the_original() {
        let job = asking_job(None);
        let with_prompt = ClarifyRequest {
            prompt: Some(Prompt::parse("a dog instead", 100).unwrap()),
            ..answer(Intent::Create)
        };
        let update = resumption(&job, &with_prompt, None);
        assert_eq!(update.prompt.as_deref(), Some("a dog instead"));
        assert_eq!(update.agent_prompt, Some(Some("a dog instead".to_string())));
    }
}
