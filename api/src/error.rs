//! Every error the api answers, with its status and stable code, turned into a response in one
//! place. Clients branch on `error.code`; `error.message` is for people.
//!
//! | status | code                         | when                                              |
//! |--------|------------------------------|---------------------------------------------------|
//! | 400    | `malformed_json`             | the body is not JSON                              |
//! | 400    | `invalid_request`            | a broken multipart body or a bad header           |
//! | 401    | `unauthorized`               | missing or unknown bearer key                     |
//! | 402    | `budget_exhausted`           | a blocking monthly budget is used up              |
//! | 403    | `forbidden`                  | the key's role may not do this                    |
//! | 404    | `not_found`                  | no such route, job or image (or not yours)        |
//! | 405    | `method_not_allowed`         |                                                   |
//! | 408    | `request_timeout`            | the request took longer than `api.request_timeout_secs` |
//! | 409    | `job_finished`               | cancel of a job that already ended                |
//! | 409    | `idempotency_key_in_use`     | the same key's first request is still in flight   |
//! | 409    | `not_awaiting_clarification` | clarify on a job that is not asking a question    |
//! | 410    | `endpoint_retired`           | the retired LangGraph service (`/api/langgraph/…`) |
//! | 413    | `payload_too_large`          | body over `api.max_body_bytes`                    |
//! | 415    | `unsupported_media_type`     | body neither JSON nor multipart                   |
//! | 415    | `unsupported_image_type`     | image bytes are not PNG, JPEG or WebP             |
//! | 422    | `prompt_required`            | prompt missing or empty                           |
//! | 422    | `prompt_too_long`            | prompt over `jobs.max_prompt_chars`               |
//! | 422    | `invalid_base64`             | `image.data` is not base64                        |
//! | 422    | `invalid_size`               | size not one of the supported sizes               |
//! | 422    | `invalid_n`                  | n outside 1..=`jobs.max_images`                   |
//! | 422    | `invalid_field`              | a field of the wrong type, or an empty image      |
//! | 422    | `invalid_image`              | image header unreadable (truncated, corrupt) or a side over `jobs.max_image_side` |
//! | 422    | `invalid_query`              | bad `limit`, `cursor`, `month` or `granularity`   |
//! | 422    | `idempotency_key_reused`     | same key, different request                       |
//! | 422    | `invalid_intent`             | clarify with an unknown intent, or `unclear`      |
//! | 422    | `image_required`             | clarify as edit/upscale, no image on job or sent  |
//! | 429    | `rate_limited`               | over the per-user job rate (with Retry-After)     |
//! | 429    | `too_many_pending`           | the user has `backlog.max_pending_per_user` jobs pending (Retry-After) |
//! | 429    | `queue_full`                 | the fleet has `backlog.max_pending` jobs pending (Retry-After) |
//! | 429    | `too_many_streams`           | the user holds `api.max_streams_per_user` event streams |
//! | 503    | `service_unavailable`        | Redis or RabbitMQ unreachable (with Retry-After)  |
//! | 503    | `image_store_full`           | images over `images.max_store_mib` (Retry-After)  |
//! | 500    | `internal_error`             | a bug; details are logged, never returned         |

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use strum::{IntoStaticStr, VariantArray};
use utoipa::ToSchema;

/// Every code the api answers with, each with its one status (the table above).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum ErrorCode {
    MalformedJson,
    InvalidRequest,
    Unauthorized,
    BudgetExhausted,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    JobFinished,
    IdempotencyKeyInUse,
    NotAwaitingClarification,
    EndpointRetired,
    PayloadTooLarge,
    UnsupportedMediaType,
    UnsupportedImageType,
    InvalidImage,
    PromptRequired,
    PromptTooLong,
    InvalidBase64,
    InvalidSize,
    InvalidN,
    InvalidField,
    InvalidQuery,
    IdempotencyKeyReused,
    InvalidIntent,
    ImageRequired,
    RateLimited,
    TooManyPending,
    QueueFull,
    TooManyStreams,
    ServiceUnavailable,
    ImageStoreFull,
    InternalError,
}

impl ErrorCode {
    /// Every code, for the error guide's check and exhaustive tests.
    pub const ALL: &'static [Self] = Self::VARIANTS;

    /// The wire name clients branch on, e.g. `prompt_required`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The HTTP status this code is always answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::MalformedJson | Self::InvalidRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::BudgetExhausted => StatusCode::PAYMENT_REQUIRED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::JobFinished | Self::IdempotencyKeyInUse | Self::NotAwaitingClarification => {
                StatusCode::CONFLICT
            }
            Self::EndpointRetired => StatusCode::GONE,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType | Self::UnsupportedImageType => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Self::PromptRequired
            | Self::PromptTooLong
            | Self::InvalidBase64
            | Self::InvalidSize
            | Self::InvalidN
            | Self::InvalidField
            | Self::InvalidImage
            | Self::InvalidQuery
            | Self::IdempotencyKeyReused
            | Self::InvalidIntent
            | Self::ImageRequired => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited | Self::TooManyPending | Self::QueueFull | Self::TooManyStreams => {
                StatusCode::TOO_MANY_REQUESTS
            }
            // 503, not 507: the store is full for the service, not too small for this request,
            // and it frees up as images expire; generic clients retry a 503 after Retry-After.
            Self::ServiceUnavailable | Self::ImageStoreFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A 4xx whose status comes from its code.
    #[error("{message}")]
    Client { code: ErrorCode, message: String },
    /// An error with `Retry-After`: the client is over its rate or the service at capacity
    /// (429), the same request is still being handled (409), or the image store is full (503).
    #[error("{message}")]
    RetryLater {
        code: ErrorCode,
        message: String,
        retry_after: std::time::Duration,
    },
    #[error("a dependency is unavailable: {cause}")]
    Unavailable { cause: String, retry_after: u32 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn client(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Client {
            code,
            message: message.into(),
        }
    }

    pub fn not_found() -> Self {
        Self::client(ErrorCode::NotFound, "no such resource")
    }

    pub fn too_many(
        code: ErrorCode,
        message: impl Into<String>,
        retry_after: std::time::Duration,
    ) -> Self {
        Self::retry_later(code, message, retry_after)
    }

    /// A client error whose request may succeed after `retry_after` (sent as `Retry-After`).
    pub fn retry_later(
        code: ErrorCode,
        message: impl Into<String>,
        retry_after: std::time::Duration,
    ) -> Self {
        Self::RetryLater {
            code,
            message: message.into(),
            retry_after,
        }
    }

    pub fn unavailable(cause: impl std::fmt::Display, retry_after: u32) -> Self {
        Self::Unavailable {
            cause: cause.to_string(),
            retry_after,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Client { code, .. } | Self::RetryLater { code, .. } => *code,
            Self::Unavailable { .. } => ErrorCode::ServiceUnavailable,
            Self::Internal(_) => ErrorCode::InternalError,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Client { code, message } => {
                let mut response = body(code, &message);
                if code == ErrorCode::Unauthorized {
                    response
                        .headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                response
            }
            Self::RetryLater {
                code,
                message,
                retry_after,
            } => {
                let mut response = body(code, &message);
                // Whole seconds, rounded up: never tell a client to come back too early.
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
                response
            }
            Self::Unavailable { cause, retry_after } => {
                tracing::warn!(%cause, "Answering 503: a dependency is unavailable");
                let mut response = body(
                    ErrorCode::ServiceUnavailable,
                    "the service is temporarily unavailable; retry after the delay in Retry-After",
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                response
            }
            Self::Internal(cause) => {
                tracing::error!(%cause, "Answering 500: internal error");
                body(ErrorCode::InternalError, "something went wrong on our side")
            }
        }
    }
}

fn body(code: ErrorCode, message: &str) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.as_str().to_string(),
            message: message.to_string(),
        },
    };
    (code.status(), Json(body)).into_response()
}

/// The body of every error response: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": {"code": "not_found", "message": "no such resource"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable code from the table in `api/src/error.rs` (for example `prompt_required`);
    /// clients branch on it.
    pub code: String,
    /// A sentence for people; its wording may change.
    pub message: String,
}

impl From<shared::store::StoreError> for ApiError {
    fn from(error: shared::store::StoreError) -> Self {
        match error {
            shared::store::StoreError::Unavailable(cause) => Self::Unavailable {
                cause: cause.to_string(),
                retry_after: crate::state::retry_after_secs(),
            },
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<shared::ledger::LedgerError> for ApiError {
    fn from(error: shared::ledger::LedgerError) -> Self {
        match error {
            shared::ledger::LedgerError::Unavailable(cause) => Self::Unavailable {
                cause: cause.to_string(),
                retry_after: crate::state::retry_after_secs(),
            },
        }
    }
}
