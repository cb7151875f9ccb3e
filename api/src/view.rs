//! The job as clients see it: the JSON of `GET /v1/jobs/{id}`, list entries and SSE events.
//! Internal fields (technical error detail, raw usage, the owner) are deliberately absent.

use chrono::{DateTime, Utc};
use serde::Serialize;
pub use shared::costs::micros_to_dollars;
use shared::domain::{Clarification, Intent, JobStatus, Notice, UserError};
use shared::store::JobRecord;
use utoipa::ToSchema;

use crate::state::AppState;

/// A job as its owner sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    pub prompt: String,
    #[schema(value_type = shared::domain::ImageSize)]
    pub size: &'static str,
    pub n: u32,
    /// What the router decided (the agent it chose, or `unclear`); `null` until it decided.
    pub intent: Option<Intent>,
    /// The provider that made the images (`openai`, `gemini` or `simulated`).
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Provider calls made so far.
    pub attempts: u32,
    pub notices: Vec<Notice>,
    /// Present when the job `succeeded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub result: Option<ResultView>,
    /// Present when the job `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<UserError>,
    /// The question, when the job `needs_clarification`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub clarification: Option<Clarification>,
    /// Dollars, from integer micro-dollars; exact to six decimals.
    pub cost_usd: f64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResultView {
    pub images: Vec<ImageView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageView {
    /// Where to download the image (`GET /v1/jobs/{id}/images/{n}`).
    pub url: String,
    /// `image/png`, `image/jpeg` or `image/webp`.
    pub mime_type: &'static str,
    pub width: u32,
    pub height: u32,
}

impl JobView {
    pub fn new(job: &JobRecord, app: &AppState) -> Self {
        let result = (job.status == JobStatus::Succeeded).then(|| ResultView {
            images: job
                .images
                .iter()
                .enumerate()
                .map(|(index, image)| ImageView {
                    url: app.url(&format!("/v1/jobs/{}/images/{index}", job.id)),
                    mime_type: image.mime_type.as_str(),
                    width: image.width,
                    height: image.height,
                })
                .collect(),
        });
        Self {
            id: job.id.to_string(),
            status: job.status,
            prompt: job.prompt.clone(),
            size: job.size.as_str(),
            n: job.n,
            intent: job.intent,
            provider: job.provider.clone(),
            model: job.model.clone(),
            attempts: job.attempts,
            notices: job.notices.clone(),
            result,
            error: job.error.clone(),
            clarification: job.clarification.clone(),
            cost_usd: micros_to_dollars(job.cost_micros),
            created_at: job.created_at,
            updated_at: job.updated_at,
        }
    }
}
