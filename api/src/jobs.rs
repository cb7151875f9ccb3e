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
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use shared::domain::{InputImage, Intent, JobId, JobStatus, Notice};
use shared::images::ImageStore;
use shared::queue::JobMessage;
use shared::ratelimit::Admission;
use shared::store::{Guard, IdempotencyClaim, JobRecord, JobUpdate, UpdateOutcome};
use tokio::sync::broadcast::error::RecvError;
use tracing::Instrument;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::events::HubEvent;
use crate::intake::{self, JobRequest};
use crate::observe;
use crate::state::{AppState, retry_after_secs};
use crate::view::JobView;

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

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
        Err(error) => observe::job_rejected(error.code()),
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
                    return Err(ApiError::unprocessable(
                        "idempotency_key_reused",
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
            "rate_limited",
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
                StatusCode::PAYMENT_REQUIRED,
                "budget_exhausted",
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
            "queue_full",
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
            StatusCode::CONFLICT,
            "idempotency_key_in_use",
            "a request with this Idempotency-Key is still being accepted; retry shortly",
        )),
        None => {
            // The first request died before finishing and its job expired: free the key so
            // the client's retry can go through.
            app.store.release_idempotency(user, digest).await?;
            Err(ApiError::client(
                StatusCode::CONFLICT,
                "idempotency_key_in_use",
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
                StatusCode::BAD_REQUEST,
                "invalid_request",
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
    let mut response = (
        StatusCode::ACCEPTED,
        Json(json!({"id": id.to_string(), "status": "queued", "status_url": status_url})),
    )
        .into_response();
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

pub async fn list(
    State(app): State<AppState>,
    Caller(caller): Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = match query.limit.as_deref() {
        None | Some("") => 20,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=100).contains(limit))
            .ok_or_else(|| {
                ApiError::unprocessable("invalid_query", "limit must be between 1 and 100")
            })?,
    };
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(JobId::parse(raw).ok_or_else(|| {
            ApiError::unprocessable("invalid_query", "cursor is not a value this api returned")
        })?),
    };
    let (jobs, next) = app.store.list(&caller.user, limit, cursor).await?;
    let views: Vec<JobView> = jobs.iter().map(|job| JobView::new(job, &app)).collect();
    Ok(Json(json!({
        "jobs": views,
        "next_cursor": next.map(|id| id.to_string()),
    })))
}

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

pub async fn cancel(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = load_own(&app, &caller, &id).await?;
    let update = JobUpdate {
        status: Some(JobStatus::Canceled),
        add_notices: vec![Notice::now(
            "canceled",
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
            StatusCode::CONFLICT,
            "job_finished",
            format!("the job already ended with status {}", status.as_str()),
        )),
        UpdateOutcome::Missing => Err(ApiError::not_found()),
    }
}

/// `POST /v1/jobs/{id}/clarify`: the user answers the question of a job that
/// `needs_clarification`; the same job resumes at the agent for the chosen intent.
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
    if answer.intent == Intent::Edit && answer.image.is_none() && job.input_image.is_none() {
        return Err(ApiError::unprocessable(
            "image_required",
            "an edit needs an image: send it as image.data (base64)",
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
    // The agents' wire names are the intents they serve ("create", "edit").
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
            "clarified",
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
        StatusCode::CONFLICT,
        "not_awaiting_clarification",
        format!(
            "the job is {}, not waiting for a clarification",
            status.as_str()
        ),
    )
}

/// Server-Sent Events: the current state first, then one `status` event per status change,
/// ending after a terminal status.
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
