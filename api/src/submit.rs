//! Submitting a job, the work behind `POST /v1/jobs`: admission control, the Idempotency-Key,
//! and the acceptance sequence. The handler in `crate::jobs` only turns the outcome into a `202`.
//!
//! Acceptance order is what makes a `202` trustworthy: the input image goes to the object store
//! (unless the store is over its bound), the job hash to Redis (with a short TTL), then the
//! message to RabbitMQ with a publisher confirm; only then is the job marked accepted and kept
//! for the full TTL. If any step fails the earlier ones are undone and the client gets a 503 with
//! `Retry-After`.

use std::time::Duration;

use axum::extract::Request;
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use shared::codes::NoticeKind;
use shared::domain::{JobId, Notice, UserId};
use shared::fair::Reservation;
use shared::queue::JobMessage;
use shared::ratelimit::Admission;
use shared::store::{IdempotencyClaim, Intake, JobRecord, Taken, Withdrawal};
use tracing::Instrument;

use crate::error::{ApiError, ErrorCode};
use crate::inputs;
use crate::intake::{self, JobRequest};
use crate::observe;
use crate::state::{AppState, retry_after_secs};

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// A job the api has taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    pub id: JobId,
    /// True when an Idempotency-Key answered the job it created earlier instead of a new one.
    pub replayed: bool,
}

/// Submits the job in `request` for `user`, and counts the outcome: a new job as accepted, a
/// refusal as rejected under its error code, a replay as neither.
pub async fn submit(
    app: &AppState,
    user: &UserId,
    request: Request,
) -> Result<Submitted, ApiError> {
    let result = admit_and_accept(app, user, request).await;
    match &result {
        Ok(submitted) if !submitted.replayed => observe::job_accepted(),
        Ok(_) => {}
        Err(error) => observe::job_rejected(error.code().as_str()),
    }
    result
}

/// The whole request goes in, not a parsed [`JobRequest`], because the order of the checks is
/// part of the contract: a bad Idempotency-Key and, for a body that is not small, admission
/// control are answered before the body (up to `api.max_body_bytes`) is read, so a client over
/// the budget or its backlog cap costs us no upload.
async fn admit_and_accept(
    app: &AppState,
    user: &UserId,
    request: Request,
) -> Result<Submitted, ApiError> {
    let idempotency_key = IdempotencyKey::from_headers(request.headers())?;
    admit_job(app, user, declared_small(request.headers())).await?;
    let job_request = intake::parse(request, &app.settings).await?;
    let id = JobId::new();
    let span = tracing::info_span!(
        "create_job",
        job_id = %id,
        trace_id = %shared::telemetry::trace_id(id),
        user = %user
    );
    async move {
        if let Some(key) = &idempotency_key
            && let Some(existing) = claim(app, user, key, &job_request, id).await?
        {
            return replay(app, existing).await;
        }
        match accept(app, user, id, &job_request, idempotency_key.as_ref()).await {
            Ok(()) => {
                tracing::info!("Job accepted");
                Ok(Submitted {
                    id,
                    replayed: false,
                })
            }
            Err(error) => {
                // Free the key, so that the client's retry is a new attempt and not a 409: only
                // this request's own claim, never one a later request took.
                if let Some(key) = &idempotency_key {
                    let _ = app.store.release_idempotency(user, key.digest(), id).await;
                }
                Err(error)
            }
        }
    }
    .instrument(span)
    .await
}

/// Admission of an answer to a question (`clarify`): the caller's own pace, strictly (an
/// answer over it gets `429 rate_limited` with `Retry-After`), and the monthly budget.
pub(crate) async fn admit(app: &AppState, user: &UserId) -> Result<(), ApiError> {
    let api = &app.settings.api;
    let admission = app
        .limiter
        .acquire(
            &pace_bucket(user),
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
                "you may send {} jobs or answers per minute; retry after the delay in Retry-After",
                api.user_jobs_per_minute
            ),
            retry_after,
        ));
    }
    within_budget(app).await
}

/// A body at most this large is read before the budget and the backlog's caps are checked:
/// reading it costs less than the round trip that would refuse it early, and the intake checks
/// both anyway.
const SMALL_BODY_BYTES: u64 = 64 * 1024;

/// Whether the request declares a body of at most [`SMALL_BODY_BYTES`] (`Content-Length`; a
/// chunked body declares nothing and is not small).
fn declared_small(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok())
        .is_some_and(|length| length <= SMALL_BODY_BYTES)
}

/// The checks made before a new job's body is read, for a body that is not small: the monthly
/// budget and the backlog's caps as they stand, so that a refused upload is never read (the
/// intake after the body checks both exactly, whatever the size, in the round trip it makes
/// anyway).
async fn admit_job(app: &AppState, user: &UserId, small_body: bool) -> Result<(), ApiError> {
    if small_body {
        return Ok(());
    }
    within_budget(app).await?;
    let (mine, total) = app
        .fair
        .pending(user)
        .await
        .map_err(|error| ApiError::unavailable(error, retry_after_secs()))?;
    let backlog = &app.settings.backlog;
    if mine >= u64::from(backlog.max_pending_per_user.get()) {
        return Err(backlog_full(app, Reservation::UserFull { pending: mine }).await);
    }
    if total >= u64::from(backlog.max_pending.get()) {
        return Err(backlog_full(app, Reservation::FleetFull { pending: total }).await);
    }
    Ok(())
}

/// A blocking budget that is used up refuses new work.
async fn within_budget(app: &AppState) -> Result<(), ApiError> {
    if app.ledger.policy().block {
        let month = shared::ledger::Month::of(chrono::Utc::now());
        let spent = app.ledger.spent(month).await?;
        if spent >= app.ledger.policy().monthly_micros {
            return Err(budget_exhausted(app));
        }
    }
    Ok(())
}

/// The 402 for a blocking budget that is used up.
fn budget_exhausted(app: &AppState) -> ApiError {
    ApiError::client(
        ErrorCode::BudgetExhausted,
        format!(
            "this month's budget of ${} is used up; new jobs are refused until next month",
            shared::pricing::format_usd(app.ledger.policy().monthly_micros)
        ),
    )
}

/// The 429 for a full backlog, with a `Retry-After` from the fleet's recent completion rate:
/// the user's share of it for their own cap, one completion for the fleet's.
async fn backlog_full(app: &AppState, full: Reservation) -> ApiError {
    let backlog = app.fair.backlog().await.ok();
    let fallback = Duration::from_secs(u64::from(retry_after_secs()));
    match full {
        Reservation::UserFull { pending } => ApiError::too_many(
            ErrorCode::TooManyPending,
            format!(
                "you have {pending} jobs waiting or running, the most one user may have; \
                 retry after the delay in Retry-After, when one of them is likely done"
            ),
            backlog.and_then(|b| b.user_wait()).unwrap_or(fallback),
        ),
        _ => ApiError::too_many(
            ErrorCode::QueueFull,
            "the service is at capacity with other jobs; retry after the delay in Retry-After",
            backlog.and_then(|b| b.fleet_wait()).unwrap_or(fallback),
        ),
    }
}

/// The bucket of a user's pace (`api.user_jobs_per_minute`, `api.user_burst`).
fn pace_bucket(user: &UserId) -> String {
    format!("user-jobs:{user}")
}

/// Where a new job stands against its user's pace: a burst starts at once, then one job per
/// interval; a job that would wait at least this long for its turn is accepted and starts at
/// it (within the delay tiers' longest wait), with a notice saying when.
const PACED_AFTER: Duration = Duration::from_millis(500);

/// A valid `Idempotency-Key` header, kept as the SHA-256 of its value: that is what the store
/// files it under, whatever the client chose to send.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IdempotencyKey(String);

impl IdempotencyKey {
    /// `None` without the header; a 400 when it is not 1 to 255 visible ASCII characters.
    fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, ApiError> {
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
        Ok(Some(Self(format!("{:x}", Sha256::digest(key.as_bytes())))))
    }

    fn digest(&self) -> &str {
        &self.0
    }
}

/// Claims `key` for the new job `id`. `Some` names the job the same key and the same request
/// created before; the same key with a different request is refused.
async fn claim(
    app: &AppState,
    user: &UserId,
    key: &IdempotencyKey,
    request: &JobRequest,
    id: JobId,
) -> Result<Option<JobId>, ApiError> {
    let fingerprint = request.fingerprint();
    match app
        .store
        .claim_idempotency(user, key.digest(), &fingerprint, id)
        .await?
    {
        IdempotencyClaim::Claimed => Ok(None),
        IdempotencyClaim::Existing(existing) => Ok(Some(existing)),
        IdempotencyClaim::Mismatch => Err(ApiError::client(
            ErrorCode::IdempotencyKeyReused,
            "this Idempotency-Key was already used for a different request",
        )),
    }
}

/// How long a retry with the same Idempotency-Key waits for the first request to finish.
const IDEMPOTENCY_WAIT: Duration = Duration::from_secs(3);

/// Answers a repeated Idempotency-Key with the job it created, once that job is accepted.
/// While the first request is still in flight (uploading its image, waiting for the broker),
/// the retry waits for it a little, then answers `409` with `Retry-After`; it never frees the
/// claim, which belongs to the first request (and runs out by itself if that request died).
async fn replay(app: &AppState, existing: JobId) -> Result<Submitted, ApiError> {
    let deadline = tokio::time::Instant::now() + IDEMPOTENCY_WAIT;
    loop {
        if let Some(job) = app.store.get(existing).await?
            && job.accepted
        {
            return Ok(Submitted {
                id: existing,
                replayed: true,
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::retry_later(
                ErrorCode::IdempotencyKeyInUse,
                "a request with this Idempotency-Key is still being accepted; retry after the \
                 delay in Retry-After",
                Duration::from_secs(1),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The acceptance sequence described at the top of this file, with its undo steps.
async fn accept(
    app: &AppState,
    user: &UserId,
    id: JobId,
    request: &JobRequest,
    idempotency: Option<&IdempotencyKey>,
) -> Result<(), ApiError> {
    let now = chrono::Utc::now();
    let input_image = inputs::store(app, id, request.image.as_ref()).await?;
    let record = JobRecord::new(
        id,
        user.clone(),
        request.prompt.as_str().to_string(),
        request.size,
        request.n,
        input_image,
        now,
    );
    let accepted = accept_stored(app, user, record, idempotency).await;
    if accepted.is_err() {
        inputs::remove(&app.images, id, request.image.as_ref()).await;
        // The backlog place, if the intake took it (a no-op when it did not).
        if let Err(error) = app.fair.remove(user, id, false).await {
            tracing::warn!(%error, "Could not free the backlog slot of a refused job; the sweep will");
        }
    }
    accepted
}

/// [`accept`] once the job's input is stored: the intake (its backlog place, its user's pace
/// and its record in one script, [`shared::store::JobStore::take_in`]), the broker's confirm,
/// then the accepted mark. On an error the caller gives the input and the place back.
async fn accept_stored(
    app: &AppState,
    user: &UserId,
    mut record: JobRecord,
    idempotency: Option<&IdempotencyKey>,
) -> Result<(), ApiError> {
    let (id, now) = (record.id, record.created_at);
    let backlog = &app.settings.backlog;
    let api = &app.settings.api;
    let unavailable = |error| ApiError::unavailable(error, retry_after_secs());
    let intake = Intake {
        budget: app.ledger.within_part(now),
        reserve: app.fair.reserve_part(
            user,
            id,
            now,
            backlog.max_pending_per_user.get(),
            backlog.max_pending.get(),
        ),
        pace: app
            .limiter
            .schedule_part(
                &pace_bucket(user),
                api.user_jobs_per_minute.get(),
                api.user_burst.get(),
            )
            .map_err(unavailable)?,
        record: &record,
        paced_after: PACED_AFTER,
    };
    let starts_at = match app.store.take_in(intake).await? {
        Taken::Exhausted { .. } => return Err(budget_exhausted(app)),
        Taken::Full(full) => return Err(backlog_full(app, full).await),
        Taken::Inserted => None,
        Taken::Paced(wait) => {
            let longest =
                Duration::from_secs(*shared::queue::DELAY_TIERS_SECS.last().unwrap_or(&900));
            let at = now + chrono::Duration::from_std(wait.min(longest)).unwrap_or_default();
            let mut notice = Notice::now(
                NoticeKind::RateLimited,
                format!(
                    "You are sending jobs faster than {} a minute, so this one waits its turn: it \
                     starts at about {}.",
                    api.user_jobs_per_minute,
                    at.format("%H:%M:%S UTC")
                ),
            );
            notice.retry_at = Some(at);
            record.notices.push(notice.in_place());
            record.deferrals = 1;
            app.store.insert_pending(&record).await?;
            Some(at)
        }
    };
    let message = JobMessage::for_job(&record);
    let published = match starts_at {
        None => {
            app.publisher
                .publish(&message, shared::telemetry::trace_headers(id))
                .await
        }
        Some(at) => {
            let wait = (at - now).to_std().unwrap_or_default();
            app.publisher
                .publish_delayed_at_most(&message.not_before(at), wait)
                .await
                .map(|_| ())
        }
    };
    if let Err(error) = published {
        if !error.may_have_arrived() {
            // Nothing reached the broker, and nothing may be left behind.
            if let Err(cleanup) = app.store.discard(id, user).await {
                tracing::warn!(%cleanup, "Could not discard an unconfirmed job; its short TTL will");
            }
            return Err(ApiError::unavailable(error, retry_after_secs()));
        }
        // The broker may hold the message without having said so: the job is withdrawn, so
        // that the client's `503` holds (no worker runs it and bills for it while the client
        // retries), unless a worker has started it already, which proves the broker had it.
        if !withdraw(app, id, user).await {
            return Err(ApiError::unavailable(error, retry_after_secs()));
        }
        tracing::warn!(
            %error,
            "The broker did not confirm the job but a worker has started it: accepted"
        );
    }
    let claim = idempotency.map(|key| key.digest().to_string());
    // A Redis blip here would hide a job the client was told exists (its record is only shown
    // once accepted): a few quick tries before answering, then background ones.
    let mark = || mark_accepted(app, id, user, claim.as_deref());
    if let Err(error) = quick_tries(mark).await {
        tracing::warn!(%error, "Could not mark a confirmed job accepted");
        // The broker has the job, whose message carries its request: the worker marks it
        // accepted when it starts, or recreates it if its short-lived record expired first. So
        // this is not a failure the client should retry (that would run the job twice).
        let (app, user) = (app.clone(), user.clone());
        keep_trying(
            move || {
                let (app, user, claim) = (app.clone(), user.clone(), claim.clone());
                async move {
                    mark_accepted(&app, id, &user, claim.as_deref())
                        .await
                        .is_ok()
                }
            },
            move || {
                tracing::warn!(job_id = %id, "Could not mark a confirmed job accepted; the worker will");
            },
        );
    }
    Ok(())
}

/// Withdraws a job whose publish is in doubt ([`shared::store::JobStore::withdraw`]); answers
/// whether a worker had started it, so that it stands. A Redis blip gets a few quick tries,
/// then background ones while the client has its `503`: a record that expires first
/// (`PENDING_TTL`) would let a worker recreate the job from a message the broker did keep.
async fn withdraw(app: &AppState, id: JobId, user: &UserId) -> bool {
    match quick_tries(|| app.store.withdraw(id, user)).await {
        Ok(withdrawal) => return withdrawal == Withdrawal::Taken,
        Err(error) => tracing::warn!(%error, "Could not withdraw an unconfirmed job"),
    }
    let (app, user) = (app.clone(), user.clone());
    keep_trying(
        move || {
            let (app, user) = (app.clone(), user.clone());
            async move {
                match app.store.withdraw(id, &user).await {
                    Ok(Withdrawal::Withdrawn) => true,
                    Ok(Withdrawal::Taken) => {
                        tracing::error!(
                            job_id = %id,
                            "A job answered 503 was started by a worker before it could be \
                             withdrawn (Redis was unreachable meanwhile); it runs"
                        );
                        true
                    }
                    Err(_) => false,
                }
            }
        },
        move || {
            tracing::error!(
                job_id = %id,
                "Could not withdraw a job answered 503 whose message the broker may hold; a \
                 worker may still run it"
            );
        },
    );
    false
}

/// A write the client's answer depends on, tried at once and again after 50 and 200 ms (a
/// Redis blip): the first success, or the last failure.
async fn quick_tries<T, E, F, Fut>(mut write: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    // The first try goes at once: a zero sleep still takes the timer's lock twice.
    let mut outcome = write().await;
    for pause_ms in [50, 200] {
        if outcome.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
        outcome = write().await;
    }
    outcome
}

/// Goes on with a write the quick tries could not make, once a second for a minute after the
/// client has its answer, in the background, until `write` says it is done; `gave_up` runs if
/// it never is.
fn keep_trying<F, Fut>(mut write: F, gave_up: impl FnOnce() + Send + 'static)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    tokio::spawn(async move {
        for _ in 0..BACKGROUND_TRIES {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            if write().await {
                return;
            }
        }
        gave_up();
    });
}

/// Seconds (one try each) the api goes on with a write after the client's answer.
const BACKGROUND_TRIES: u32 = 60;

async fn mark_accepted(
    app: &AppState,
    id: JobId,
    user: &UserId,
    claim: Option<&str>,
) -> Result<(), String> {
    if shared::failpoint::fails("mark_accepted") {
        return Err("failpoint mark_accepted".to_string());
    }
    app.store
        .mark_accepted(id, claim.map(|digest| (user, digest)))
        .await
        .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers_with_key(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_HEADER, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn only_a_declared_length_within_the_bound_is_a_small_body() {
        let with_length = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                axum::http::header::CONTENT_LENGTH,
                HeaderValue::from_str(value).unwrap(),
            );
            declared_small(&headers)
        };
        assert!(with_length("0"));
        assert!(with_length("65536"));
        assert!(!with_length("65537"));
        assert!(!with_length("18446744073709551616"), "past u64");
        assert!(!with_length("-1"));
        assert!(!with_length("1e3"));
        assert!(!declared_small(&HeaderMap::new()), "chunked: no length");
    }

    #[test]
    fn a_request_without_an_idempotency_key_has_none() {
        assert_eq!(
            IdempotencyKey::from_headers(&HeaderMap::new()).unwrap(),
            None
        );
    }

    #[test]
    fn an_idempotency_key_is_kept_as_the_digest_of_its_trimmed_value() {
        let key = IdempotencyKey::from_headers(&headers_with_key(" order-42 "))
            .unwrap()
            .unwrap();
        assert_eq!(
            key.digest(),
            format!("{:x}", Sha256::digest(b"order-42")).as_str()
        );
    }

    #[test]
    fn an_empty_or_overlong_idempotency_key_is_an_invalid_request() {
        for bad in ["", "   ", &"k".repeat(256)] {
            let error = IdempotencyKey::from_headers(&headers_with_key(bad)).unwrap_err();
            assert_eq!(error.code(), ErrorCode::InvalidRequest, "{bad:?}");
        }
        assert!(
            IdempotencyKey::from_headers(&headers_with_key(&"k".repeat(255)))
                .unwrap()
                .is_some()
        );
    }
}
