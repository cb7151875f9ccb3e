//! The `/v1/jobs` handlers. Each extracts, calls one function, and maps the result.
//!
//! Acceptance order is what makes a `202` trustworthy: the input image goes to the object store,
//! the job hash to Redis (with a short TTL), then the message to RabbitMQ with a publisher
//! confirm; only then is the job marked accepted and kept for the full TTL. If any step fails
//! the earlier ones are undone and the client gets a 503 with `Retry-After`.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::codes::NoticeKind;
use shared::domain::{InputImage, JobId, JobStatus, Notice};
use shared::images::ImageStore;
use shared::queue::JobMessage;
use shared::ratelimit::Admission;
use shared::store::{Guard, IdempotencyClaim, JobRecord, JobUpdate, UpdateOutcome};
use tokio::sync::broadcast::error::RecvError;
use tracing::Instrument;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::events::HubEvent;
use crate::extract::{Path, Query};
use crate::intake::{self, JobRequest};
use crate::observe;
use crate::openapi::{
    ClarifyJson, CreateJobForm, CreateJobJson, InternalError, NotFound, StatusEvent,
    TooManyRequests, Unauthorized, Unavailable,
};
use crate::state::{AppState, retry_after_secs};
use crate::view::JobView;

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

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
            `invalid_size`, `invalid_n`, `invalid_field` or `idempotency_key_reused`.", body = ErrorBody),
        (status = 429, response = TooManyRequests),
        (status = 500, response = InternalError),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn create(
    State(app): State<AppState>,
    Caller(caller): Caller,
    request: Request,
) -> Result<Response, ApiError> {
    let result = create_job(app, caller, request).await;
    match &result {
        Ok(response) if !response.headers().contains_key("idempotent-replayed") => {
            observe::job_accepted()
        }
        Ok(_) => {}
        Err(error) => observe::job_rejected(error.code().as_str()),
    }
    result
}

async fn create_job(
    app: AppState,
    caller: shared::domain::Principal,
    request: Request,
) -> Result<Response, ApiError> {
    let idempotency_key = idempotency_digest(request.headers())?;
    admit(&app, &caller.user).await?;
    let job_request = intake::parse(request, &app.settings).await?;
    let id = JobId::new();
    let span = tracing::info_span!(
        "create_job",
        job_id = %id,
        trace_id = %shared::telemetry::trace_id(id),
        user = %caller.user
    );
    async move {
        if let Some(digest) = &idempotency_key {
            let fingerprint = job_request.fingerprint();
            match app
                .store
                .claim_idempotency(&caller.user, digest, &fingerprint, id)
                .await?
            {
                IdempotencyClaim::Claimed => {}
                IdempotencyClaim::Existing(existing) => {
                    return replay(&app, &caller.user, digest, existing).await;
                }
                IdempotencyClaim::Mismatch => {
                    return Err(ApiError::client(
                        ErrorCode::IdempotencyKeyReused,
                        "this Idempotency-Key was already used for a different request",
                    ));
                }
            }
        }
        match accept(&app, &caller.user, id, job_request).await {
            Ok(()) => {
                tracing::info!("Job accepted");
                Ok(accepted_response(&app, id, false))
            }
            Err(error) => {
                if let Some(digest) = &idempotency_key {
                    let _ = app.store.release_idempotency(&caller.user, digest).await;
                }
                Err(error)
            }
        }
    }
    .instrument(span)
    .await
}

/// Admission control: the caller's own rate, then the depth of the work queue. Both answer 429
/// with `Retry-After`, so well-behaved clients slow down instead of piling work up.
async fn admit(app: &AppState, user: &shared::domain::UserId) -> Result<(), ApiError> {
    let api = &app.settings.api;
    let admission = app
        .limiter
        .acquire(
            &format!("user-jobs:{user}"),
            1,
            api.user_jobs_per_minute.get(),
            api.user_burst.get(),
        )
        .await
        .map_err(|error| ApiError::unavailable(error, retry_after_secs()))?;
    if let Admission::Denied { retry_after } = admission {
        return Err(ApiError::too_many(
            ErrorCode::RateLimited,
            format!(
                "you may submit {} jobs per minute; retry after the delay in Retry-After",
                api.user_jobs_per_minute
            ),
            retry_after,
        ));
    }
    if app.ledger.policy().block {
        let month = shared::ledger::Month::of(chrono::Utc::now());
        let spent = app.ledger.spent(month).await?;
        if spent >= app.ledger.policy().monthly_micros {
            return Err(ApiError::client(
                ErrorCode::BudgetExhausted,
                format!(
                    "this month's budget of ${} is used up; new jobs are refused until next month",
                    shared::pricing::format_usd(app.ledger.policy().monthly_micros)
                ),
            ));
        }
    }
    let depth = app.queue_depth.load(std::sync::atomic::Ordering::Relaxed);
    if depth > api.max_queue_depth {
        return Err(ApiError::too_many(
            ErrorCode::QueueFull,
            "the service is busy with other jobs; retry after the delay in Retry-After",
            Duration::from_secs(u64::from(retry_after_secs())),
        ));
    }
    Ok(())
}

/// Answers a repeated Idempotency-Key with the job it created.
async fn replay(
    app: &AppState,
    user: &shared::domain::UserId,
    digest: &str,
    existing: JobId,
) -> Result<Response, ApiError> {
    match app.store.get(existing).await? {
        Some(job) if job.accepted => Ok(accepted_response(app, existing, true)),
        Some(_) => Err(ApiError::client(
            ErrorCode::IdempotencyKeyInUse,
            "a request with this Idempotency-Key is still being accepted; retry shortly",
        )),
        None => {
            // The first request died before finishing and its job expired: free the key so
            // the client's retry can go through.
            app.store.release_idempotency(user, digest).await?;
            Err(ApiError::client(
                ErrorCode::IdempotencyKeyInUse,
                "the earlier request with this Idempotency-Key did not complete; retry now",
            ))
        }
    }
}

fn idempotency_digest(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|key| !key.is_empty() && key.len() <= 255)
        .ok_or_else(|| {
            ApiError::client(
                ErrorCode::InvalidRequest,
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
        })?;
    Ok(Some(format!("{:x}", Sha256::digest(key.as_bytes()))))
}

async fn accept(
    app: &AppState,
    user: &shared::domain::UserId,
    id: JobId,
    request: JobRequest,
) -> Result<(), ApiError> {
    let retry_after = retry_after_secs();
    let input_image = match &request.image {
        Some((bytes, mime)) => {
            app.images
                .put(&ImageStore::input_path(id, *mime), bytes.clone())
                .await
                .map_err(|error| ApiError::unavailable(error, retry_after))?;
            Some(shared::domain::InputImage {
                mime_type: *mime,
                bytes_len: bytes.len(),
            })
        }
        None => None,
    };
    let record = JobRecord::new(
        id,
        user.clone(),
        request.prompt.as_str().to_string(),
        request.size,
        request.n,
        input_image,
        chrono::Utc::now(),
    );
    if let Err(error) = app.store.insert_pending(&record).await {
        remove_input(app, id, &request).await;
        return Err(error.into());
    }
    if let Err(error) = app
        .publisher
        .publish(&JobMessage::run(id), shared::telemetry::trace_headers(id))
        .await
    {
        // Nothing may be left behind of a job the broker never confirmed.
        if let Err(cleanup) = app.store.discard(id, user).await {
            tracing::warn!(%cleanup, "Could not discard an unconfirmed job; its short TTL will");
        }
        remove_input(app, id, &request).await;
        return Err(ApiError::unavailable(error, retry_after));
    }
    if let Err(error) = app.store.mark_accepted(id).await {
        // The broker has the job and the worker marks it accepted when it starts, so this is
        // not a failure the client should retry (that would run the job twice).
        tracing::warn!(%error, "Could not mark a confirmed job accepted; the worker will");
    }
    Ok(())
}

async fn remove_input(app: &AppState, id: JobId, request: &JobRequest) {
    if let Some((_, mime)) = &request.image {
        let _ = app.images.delete(&ImageStore::input_path(id, *mime)).await;
    }
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
    Ok(Json(JobView::new(&job, &app)))
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
    let bytes = app
        .images
        .get(&ImageStore::output_path(job.id, index, stored.mime_type))
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
        Body::from(bytes),
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
        its result.",
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
            `invalid_base64`, `invalid_field` or `image_required`.", body = ErrorBody),
        (status = 500, response = InternalError),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn clarify(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let job = load_own(&app, &caller, &id).await?;
    let answer = intake::parse_clarification(request, &app.settings).await?;
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
    let input_image = match &answer.image {
        Some((bytes, mime)) => {
            app.images
                .put(&ImageStore::input_path(job.id, *mime), bytes.clone())
                .await
                .map_err(|error| ApiError::unavailable(error, retry_after_secs()))?;
            Some(InputImage {
                mime_type: *mime,
                bytes_len: bytes.len(),
            })
        }
        None => None,
    };
    let prompt = answer
        .prompt
        .as_ref()
        .map_or_else(|| job.prompt.clone(), |prompt| prompt.as_str().to_string());
    // The agents' wire names are the intents they serve ("create", "edit", "upscale").
    let update = JobUpdate {
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
    };
    match app
        .store
        .update(
            job.id,
            Guard::Status(JobStatus::NeedsClarification),
            &update,
        )
        .await?
    {
        UpdateOutcome::Applied { .. } => {}
        UpdateOutcome::Refused(status) => return Err(not_awaiting(status)),
        UpdateOutcome::Missing => return Err(ApiError::not_found()),
    }
    if let Err(error) = app
        .publisher
        .publish(
            &JobMessage::run(job.id),
            shared::telemetry::trace_headers(job.id),
        )
        .await
    {
        // Put the question back, so the user can answer again when the broker is back.
        let revert = JobUpdate {
            status: Some(JobStatus::NeedsClarification),
            clarification: job.clarification.clone(),
            ..JobUpdate::default()
        };
        let _ = app
            .store
            .update(job.id, Guard::Status(JobStatus::Queued), &revert)
            .await;
        return Err(ApiError::unavailable(error, retry_after_secs()));
    }
    tracing::info!(job_id = %job.id, intent = answer.intent.as_str(), "Clarification answered; job resumed");
    Ok(accepted_response(&app, job.id, false))
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
        `canceled`). Comments keep the connection alive.",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "The event stream; each event's `data` is a `JobView`.",
            body = StatusEvent, content_type = "text/event-stream"),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
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
    let mut receiver = app.events.subscribe();
    let job = load_own(&app, &caller, &id).await?;
    let job_id = job.id;
    let stream = async_stream(move |sender| async move {
        let mut last_status = job.status;
        if sender
            .send(status_event(&JobView::new(&job, &app), job.version))
            .await
            .is_err()
        {
            return;
        }
        if last_status.is_terminal() {
            return;
        }
        loop {
            let refresh = match receiver.recv().await {
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
            if sender
                .send(status_event(&JobView::new(&job, &app), job.version))
                .await
                .is_err()
            {
                return;
            }
            if last_status.is_terminal() {
                return;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
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
