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
    /// Where the job stands while it waits to run (`queued`): its position under the fair
    /// share and an estimated start. Absent for jobs that are not waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub queue: Option<QueuePlace>,
    /// Dollars, from integer micro-dollars; exact to six decimals.
    pub cost_usd: f64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A waiting job's place in the backlog (`docs/architecture.md`, "A fair backlog").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct QueuePlace {
    /// 1 when the job is next: its user's earlier jobs plus, for every other user with work
    /// waiting, as many of theirs as the fair share lets run first.
    pub position: u64,
    /// When it should start at the fleet's recent pace (and not before its own start time, for
    /// a job sent faster than its user's pace); `null` when nothing finished lately to measure
    /// the pace by.
    pub estimated_start_at: Option<DateTime<Utc>>,
}

impl QueuePlace {
    /// Whether a follower should hear of the change from `self` to `next`: a position that
    /// moved by a tenth (at least one place), or an estimate that moved by 30 s or more.
    pub fn differs_noticeably(&self, next: &QueuePlace) -> bool {
        let moved = self.position.abs_diff(next.position);
        let start_moved = match (self.estimated_start_at, next.estimated_start_at) {
            (Some(before), Some(after)) => (after - before).num_seconds().abs() >= 30,
            (before, after) => before.is_some() != after.is_some(),
        };
        moved >= (self.position / 10).max(1) || start_moved
    }
}

/// Where `job` stands, if it is waiting; `None` for other jobs, and when the backlog cannot be
/// read (the view is still worth answering without it).
pub async fn queue_place(app: &AppState, job: &JobRecord) -> Option<QueuePlace> {
    if job.status != JobStatus::Queued {
        return None;
    }
    let place = match app.fair.place(&job.user, job.id).await {
        Ok(place) => place?,
        Err(error) => {
            tracing::warn!(%error, "Could not read the job's place in the backlog");
            return None;
        }
    };
    let now = Utc::now();
    // A job sent faster than its user's pace does not start before its turn.
    let paced = job
        .notices
        .iter()
        .rev()
        .find(|notice| notice.code == shared::codes::NoticeKind::RateLimited.as_str())
        .and_then(|notice| notice.retry_at)
        .filter(|at| *at > now);
    let estimated = place
        .estimated_wait()
        .map(|wait| now + chrono::Duration::from_std(wait).unwrap_or_default());
    Some(QueuePlace {
        position: place.position(),
        estimated_start_at: match (estimated, paced) {
            (Some(at), Some(turn)) => Some(at.max(turn)),
            (at, turn) => at.or(turn),
        },
    })
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
            queue: None,
            cost_usd: micros_to_dollars(job.cost_micros),
            created_at: job.created_at,
            updated_at: job.updated_at,
        }
    }
}
