//! The `/v1/jobs` handlers. Each extracts, calls one function, and maps the result.
//!
//! Submitting a job (admission, Idempotency-Key, acceptance) is `crate::submit`, and answering
//! a job's question is `crate::clarify`; the handlers here turn their outcomes into responses.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::{Deserialize, Serialize};
use shared::codes::NoticeKind;
use shared::domain::{JobId, JobStatus, Notice};
use shared::images::ImageStore;
use shared::store::{Guard, JobRecord, JobUpdate, UpdateOutcome};
use tokio::sync::broadcast::error::RecvError;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::events::HubEvent;
use crate::extract::{Path, Query};
use crate::intake;
use crate::openapi::{
    ClarifyJson, CreateJobForm, CreateJobJson, InternalError, NotFound, StatusEvent,
    TooManyRequests, Unauthorized, Unavailable, UnavailableOrFull,
};
use crate::state::{AppState, retry_after_secs};
use crate::view::JobView;
use crate::{clarify, inputs, observe, submit};

/// The answer to an accepted job (or a replayed Idempotency-Key, or an answered question).
#[derive(Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    pub id: String,
    /// Always `queued`.
    pub status: JobStatus,
    /// Where to poll the job (also in `Location`).
    pub status_url: String,
}

/// A page of the caller's jobs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    operation_id = "create_job",
    summary = "Submit a job",
    description = "Accepts a prompt and, to edit an image, the image: as JSON (the image as \
        base64) or as `multipart/form-data` (the image as a file part). `202` means the job is \
        stored and queued; poll `status_url` or follow `/v1/jobs/{id}/events`.",
    security(("api_key" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII \
            characters. The same key from the same user within 24 h answers the same job (with \
            `Idempotent-Replayed: true`) instead of creating another; the same key with a \
            different request is `422 idempotency_key_reused`."),
    ),
    request_body(
        description = "The job, as JSON or as a multipart form.",
        content(
            (CreateJobJson = "application/json"),
            (CreateJobForm = "multipart/form-data"),
        ),
    ),
    responses(
        (status = 202, description = "Accepted: the job is stored and queued.", body = JobAccepted,
            headers(
                ("Location" = String, description = "The job's URL (`status_url`)."),
                ("Idempotent-Replayed" = Option<String>, description = "`true` when an \
                    Idempotency-Key answered an existing job."),
            )),
        (status = 400, description = "`malformed_json` (the body is not JSON) or \
            `invalid_request` (a broken multipart body, or a bad Idempotency-Key).", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 402, description = "`budget_exhausted`: the monthly budget is used up and the \
            budget policy is `block`.", body = ErrorBody),
        (status = 409, description = "`idempotency_key_in_use`: the first request with this \
            Idempotency-Key is still being accepted, or did not complete; retry.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over \
            `PICTOR_MAX_BODY_BYTES` (20 MiB by default).", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type` (neither JSON nor multipart) or \
            `unsupported_image_type` (the image is not PNG, JPEG or WebP).", body = ErrorBody),
        (status = 422, description = "`prompt_required`, `prompt_too_long`, `invalid_base64`, \
            `invalid_size`, `invalid_n`, `invalid_field`, `invalid_image` or `idempotency_key_reused`.", body = ErrorBody),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = UnavailableOrFull),
    ),
)]
pub async fn create(
    State(app): State<AppState>,
    Caller(caller): Caller,
    request: Request,
) -> Result<Response, ApiError> {
    let submitted = submit::submit(&app, &caller.user, request).await?;
    Ok(accepted_response(&app, submitted.id, submitted.replayed))
}

fn accepted_response(app: &AppState, id: JobId, replayed: bool) -> Response {
    let status_url = app.url(&format!("/v1/jobs/{id}"));
    let body = JobAccepted {
        id: id.to_string(),
        status: JobStatus::Queued,
        status_url: status_url.clone(),
    };
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&status_url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// Loads a job the caller may see; another user's job is indistinguishable from a missing one.
async fn load_own(app: &AppState, caller: &Caller, raw_id: &str) -> Result<JobRecord, ApiError> {
    let id = JobId::parse(raw_id).ok_or_else(ApiError::not_found)?;
    match app.store.get(id).await? {
        Some(job) if job.accepted && (job.user == caller.0.user) => Ok(job),
        _ => Err(ApiError::not_found()),
    }
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    operation_id = "get_job",
    summary = "Read a job",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "The job.", body = JobView),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = InternalError),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn get(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = load_own(&app, &caller, &id).await?;
    let mut view = JobView::new(&job, &app);
    view.queue = crate::view::queue_place(&app, &job).await;
    Ok(Json(view))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    operation_id = "list_jobs",
    summary = "List your jobs",
    description = "The caller's jobs, newest first, a page at a time.",
    security(("api_key" = [])),
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100,
            description = "Jobs per page, 1 to 100 (20 by default)."),
        ("cursor" = Option<String>, Query,
            description = "The `next_cursor` of the previous page."),
    ),
    responses(
        (status = 200, description = "A page of jobs.", body = JobList),
        (status = 401, response = Unauthorized),
        (status = 422, description = "`invalid_query`: a bad `limit` or `cursor`.", body = ErrorBody),
        (status = 500, response = InternalError),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn list(
    State(app): State<AppState>,
    Caller(caller): Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<JobList>, ApiError> {
    let limit = match query.limit.as_deref() {
        None | Some("") => 20,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=100).contains(limit))
            .ok_or_else(|| {
                ApiError::client(ErrorCode::InvalidQuery, "limit must be between 1 and 100")
            })?,
    };
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(JobId::parse(raw).ok_or_else(|| {
            ApiError::client(
                ErrorCode::InvalidQuery,
                "cursor is not a value this api returned",
            )
        })?),
    };
    let (jobs, next) = app.store.list(&caller.user, limit, cursor).await?;
    let views: Vec<JobView> = jobs.iter().map(|job| JobView::new(job, &app)).collect();
    Ok(Json(JobList {
        jobs: views,
        next_cursor: next.map(|id| id.to_string()),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/images/{n}",
    tag = "jobs",
    operation_id = "get_job_image",
    summary = "Download an image",
    description = "The bytes of a succeeded job's image `n` (counting from 0), with their \
        content type.",
    security(("api_key" = [])),
    params(
        ("id" = String, Path, description = "The job's id."),
        ("n" = u32, Path, description = "The image's index in `result.images`."),
    ),
    responses(
        (status = 200, description = "The image.",
            content(("image/png"), ("image/jpeg"), ("image/webp")),
            headers(("Cache-Control" = String, description = "Images never change."))),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = InternalError),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn image(
    State(app): State<AppState>,
    caller: Caller,
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let job = load_own(&app, &caller, &id).await?;
    let index: usize = index.parse().map_err(|_| ApiError::not_found())?;
    let stored = job
        .images
        .get(index)
        .filter(|_| job.status == JobStatus::Succeeded)
        .ok_or_else(ApiError::not_found)?;
    let reader = app
        .images
        .open_read(&ImageStore::output_path(job.id, index, stored.mime_type))
        .await
        .map_err(|error| match error {
            shared::images::ImageStoreError::NotFound => ApiError::not_found(),
            other => ApiError::unavailable(other, retry_after_secs()),
        })?;
    Ok((
        [
            (header::CONTENT_TYPE, stored.mime_type.as_str()),
            (header::CACHE_CONTROL, "private, max-age=86400, immutable"),
        ],
        [(header::CONTENT_LENGTH, reader.size.to_string())],
        Body::from_stream(reader.chunks),
    )
        .into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    operation_id = "cancel_job",
    summary = "Cancel a job",
    description = "Cancels a job that has not finished; a worker that is running it discards \
        its result. The job's images (its input, any outputs) are deleted at once.",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "The canceled job.", body = JobView),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, description = "`job_finished`: the job already ended.", body = ErrorBody),
        (status = 500, response = InternalError),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn cancel(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = load_own(&app, &caller, &id).await?;
    let update = JobUpdate {
        status: Some(JobStatus::Canceled),
        add_notices: vec![Notice::now(
            NoticeKind::Canceled,
            "The job was canceled at your request.",
        )],
        ..JobUpdate::default()
    };
    match app.store.update(job.id, Guard::Active, &update).await? {
        UpdateOutcome::Applied { .. } => {
            tracing::info!(job_id = %job.id, "Job canceled");
            // Nothing of a canceled job is ever shown again: its images go now. A worker still
            // running it discards what it makes (`Pipeline::finish`), and the schedule the
            // cancel wrote takes whatever is left.
            inputs::remove_all(&app.images, job.id).await;
            let lived = (chrono::Utc::now() - job.created_at)
                .to_std()
                .unwrap_or_default();
            observe::job_canceled(job.intent, lived);
            let recorded = app
                .stats
                .job_finished(chrono::Utc::now(), JobStatus::Canceled, job.intent, lived)
                .await;
            if let Err(error) = recorded {
                tracing::warn!(%error, "Could not record the cancel in the daily statistics");
            }
            let job = app
                .store
                .get(job.id)
                .await?
                .ok_or_else(ApiError::not_found)?;
            Ok(Json(JobView::new(&job, &app)))
        }
        UpdateOutcome::Refused(status) => Err(ApiError::client(
            ErrorCode::JobFinished,
            format!("the job already ended with status {}", status.as_str()),
        )),
        UpdateOutcome::Missing => Err(ApiError::not_found()),
    }
}

/// `POST /v1/jobs/{id}/clarify`: the user answers the question of a job that
/// `needs_clarification`; the same job resumes at the agent for the chosen intent.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/clarify",
    tag = "jobs",
    operation_id = "clarify_job",
    summary = "Answer a job's question",
    description = "Answers the `clarification` of a job in `needs_clarification`: the same job \
        goes back to `queued` and resumes with the chosen intent.",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The job's id.")),
    request_body(content = ClarifyJson, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted: the job is queued again.", body = JobAccepted,
            headers(("Location" = String, description = "The job's URL."))),
        (status = 400, description = "`malformed_json`: the body is not JSON.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, description = "`not_awaiting_clarification`: the job is not asking a \
            question.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`.", body = ErrorBody),
        (status = 415, description = "`unsupported_image_type`: the image is not PNG, JPEG or \
            WebP.", body = ErrorBody),
        (status = 422, description = "`invalid_intent`, `prompt_required`, `prompt_too_long`, \
            `invalid_base64`, `invalid_field`, `invalid_image` or `image_required`.", body = ErrorBody),
        (status = 500, response = InternalError),
        (status = 503, response = UnavailableOrFull),
    ),
)]
pub async fn clarify(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let job = load_own(&app, &caller, &id).await?;
    clarify::precheck(&app, &job).await?;
    let answer = intake::parse_clarification(request, &app.settings).await?;
    let id = clarify::resume(&app, &job, &answer).await?;
    Ok(accepted_response(&app, id, false))
}

/// Server-Sent Events: the current state first, then one `status` event per status change,
/// ending after a terminal status.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    operation_id = "follow_job",
    summary = "Follow a job (Server-Sent Events)",
    description = "A `text/event-stream`: one `status` event with the job (the JSON of \
        `GET /v1/jobs/{id}`, `id` = the job's version) now, then one per status change; the \
        stream ends after a terminal status (`succeeded`, `failed`, `needs_clarification`, \
        `canceled`). While the job waits (`queued`), a `position` event (a `QueuePlace`: its \
        position and estimated start) whenever either changes noticeably. Comments keep the \
        connection alive. A stream lasts at most \
        `PICTOR_STREAM_LIFETIME_SECS`, then ends with a `retry:` hint: reconnect to go on \
        following the job. A user may hold `PICTOR_MAX_STREAMS_PER_USER` streams at once.",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "The event stream; each event's `data` is a `JobView`.",
            body = StatusEvent, content_type = "text/event-stream"),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 429, description = "`too_many_streams`: the user holds the most streams \
            allowed.", body = ErrorBody),
        (status = 500, response = InternalError),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn events(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Subscribe before reading, so no change can slip between the read and the subscription.
    let receiver = app.events.subscribe();
    let job = load_own(&app, &caller, &id).await?;
    let slot = app.streams.open(&caller.0.user).ok_or_else(|| {
        ApiError::client(
            ErrorCode::TooManyStreams,
            format!(
                "you already have {} event streams open; close one (or poll the job) first",
                app.settings.api.max_streams_per_user
            ),
        )
    })?;
    let lifetime = app.settings.api.stream_lifetime;
    let stream = async_stream(move |sender| async move {
        follow(app, job, receiver, sender, lifetime).await;
        drop(slot);
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Feeds one event stream: the job now, then each status change, until the job ends, the
/// client leaves (the stream's receiver is dropped: the task ends at once, without waiting for
/// a change), or the stream's lifetime is up (it then ends with a `retry:` hint so the client
/// reconnects).
async fn follow(
    app: AppState,
    job: JobRecord,
    mut receiver: tokio::sync::broadcast::Receiver<HubEvent>,
    sender: tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
    lifetime: Duration,
) {
    let job_id = job.id;
    let mut last_status = job.status;
    let mut view = JobView::new(&job, &app);
    view.queue = crate::view::queue_place(&app, &job).await;
    let mut last_place = view.queue;
    if sender.send(status_event(&view, job.version)).await.is_err() || last_status.is_terminal() {
        return;
    }
    let deadline = tokio::time::sleep(lifetime);
    tokio::pin!(deadline);
    // A waiting job's place is looked at every few seconds; a noticeable change is sent.
    let mut places = tokio::time::interval(PLACE_EVERY);
    places.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    places.tick().await;
    loop {
        let event = tokio::select! {
            () = sender.closed() => return,
            _ = places.tick(), if last_status == JobStatus::Queued => {
                let Ok(Some(job)) = app.store.get(job_id).await else { continue };
                let place = crate::view::queue_place(&app, &job).await;
                let noticeable = match (&last_place, &place) {
                    (Some(before), Some(after)) => before.differs_noticeably(after),
                    (before, after) => before.is_some() != after.is_some(),
                };
                if noticeable {
                    last_place = place;
                    if let Some(place) = place
                        && sender.send(position_event(&place)).await.is_err()
                    {
                        return;
                    }
                }
                continue;
            }
            () = &mut deadline => {
                let hint = Event::default()
                    .retry(Duration::from_secs(1))
                    .comment("this stream reached its lifetime; reconnect to follow the job");
                let _ = sender.send(Ok(hint)).await;
                return;
            }
            event = receiver.recv() => event,
        };
        let refresh = match event {
            Ok(HubEvent::Job(event)) => event.job_id == job_id && event.status != last_status,
            Ok(HubEvent::Resync) | Err(RecvError::Lagged(_)) => true,
            Err(RecvError::Closed) => return,
        };
        if !refresh {
            continue;
        }
        let job = match app.store.get(job_id).await {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "SSE stream could not re-read its job");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if job.status == last_status {
            continue;
        }
        last_status = job.status;
        let mut view = JobView::new(&job, &app);
        view.queue = crate::view::queue_place(&app, &job).await;
        last_place = view.queue;
        if sender.send(status_event(&view, job.version)).await.is_err() || last_status.is_terminal()
        {
            return;
        }
    }
}

/// How often a stream looks at its waiting job's place.
const PLACE_EVERY: Duration = Duration::from_secs(5);

fn position_event(place: &crate::view::QueuePlace) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event("position")
        .json_data(place)
        .unwrap_or_else(|_| Event::default().event("position")))
}

fn status_event(view: &JobView, version: u64) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event("status")
        .id(version.to_string())
        .json_data(view)
        .unwrap_or_else(|_| Event::default().event("status")))
}

/// A stream fed by a task through a small channel; the task stops when the client goes away.
fn async_stream<F, Fut>(producer: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    tokio::spawn(producer(sender));
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}
