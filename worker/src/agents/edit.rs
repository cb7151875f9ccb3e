//! The `edit` agent: changes the user's attached image as the prompt says, through the
//! configured image editor (Gemini), falling back to OpenAI's image edits when Gemini fails or
//! is in cooldown. A refusal about the request itself (a safety block) is reported to the user,
//! never sent to the fallback.

use std::sync::Arc;

use async_trait::async_trait;
use shared::codes::{FailureCode, NoticeKind};
use shared::domain::{Intent, Notice};

use super::{Agent, AgentContext, CallSpec, Failure, JobError, JobInput, Keywords, Outcome, Route};
use crate::providers::{EditRequest, ImageEditor, display_name};

pub const ROUTE: Route = Route {
    intent: Intent::Edit,
    description: "a change to an image the user has (attached, or referred to as their photo or \
                  this picture).",
    offered: true,
    keywords: Keywords {
        words: &[
            "edit",
            "change",
            "replace",
            "remove",
            "add",
            "turn",
            "recolor",
            "recolour",
            "background",
            "crop",
            "erase",
            "adjust",
            "modify",
            "brighten",
            "darken",
            "blur",
            "sharpen",
            "retouch",
            "colorize",
            "colourize",
            "swap",
            "fix",
            "enhance",
            "restyle",
        ],
        phrases: &["make it", "make me", "make the", "put a", "put the"],
        phrases_with_image: &[],
    },
};

pub struct Edit {
    editor: Arc<dyn ImageEditor>,
    fallback: Arc<dyn ImageEditor>,
}

impl Edit {
    pub fn new(editor: Arc<dyn ImageEditor>, fallback: Arc<dyn ImageEditor>) -> Self {
        Self { editor, fallback }
    }

    async fn run_with(
        &self,
        editor: &Arc<dyn ImageEditor>,
        request: &EditRequest,
        cx: &AgentContext,
        breaker: bool,
    ) -> Result<Outcome, JobError> {
        let spec = CallSpec::new(&**editor, &request.prompt)
            .images(request.n)
            .estimate(editor.estimate(request));
        let spec = if breaker { spec.with_breaker() } else { spec };
        let output = cx.call(&spec, || editor.edit(request)).await?;
        Ok(Outcome::Images(output.images))
    }
}

#[async_trait]
impl Agent for Edit {
    fn route(&self) -> Option<Route> {
        Some(ROUTE)
    }

    async fn run(&self, job: &JobInput, cx: &AgentContext) -> Result<Outcome, JobError> {
        let Some((image, mime_type)) = job.image.clone() else {
            return Err(JobError::Permanent(Failure::with_message(
                FailureCode::ImageRequired,
                "An edit needs an image: attach the image you want changed.",
                "edit agent reached without an input image",
            )));
        };
        let request = EditRequest {
            prompt: job.prompt.clone(),
            image,
            mime_type,
            size: job.size,
            n: job.n,
        };
        let primary = self.editor.billing_provider();
        let why = if cx.circuit_allows(primary).await? {
            match self.run_with(&self.editor, &request, cx, true).await {
                Err(JobError::Permanent(failure)) if failure.is_provider_failure() => {
                    tracing::warn!(code = %failure.code, detail = %failure.detail, "Edit provider failed; falling back");
                    "was unavailable"
                }
                other => return other,
            }
        } else {
            tracing::info!(
                provider = primary,
                "Edit provider in cooldown; going straight to the fallback"
            );
            "is recovering from errors"
        };
        cx.reset_step();
        crate::metrics::fallback(primary, self.fallback.billing_provider());
        if let Err(error) = cx.services.stats.fallback(chrono::Utc::now()).await {
            tracing::warn!(%error, "Could not record the fallback in the daily statistics");
        }
        tracing::info!(
            trace_event = "fallback",
            from = primary,
            to = self.fallback.billing_provider(),
            "Falling back to another provider"
        );
        cx.notice(Notice::now(
            NoticeKind::FallbackProvider,
            format!(
                "The usual editing service ({}) {why}, so this edit was made by {} instead.",
                display_name(primary),
                display_name(self.fallback.billing_provider())
            ),
        ))
        .await?;
        self.run_with(&self.fallback, &request, cx, false).await
    }
}
