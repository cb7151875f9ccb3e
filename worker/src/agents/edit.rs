//! The `edit` agent: changes the user's attached image as the prompt says, through the
//! configured image editor (Gemini, or its simulated stand-in).

use std::sync::Arc;

use async_trait::async_trait;

use super::{Agent, AgentContext, Failure, JobError, JobInput, Outcome};
use crate::providers::{EditRequest, ImageEditor};

pub const NAME: &str = "edit";

pub struct Edit {
    editor: Arc<dyn ImageEditor>,
}

impl Edit {
    pub fn new(editor: Arc<dyn ImageEditor>) -> Self {
        Self { editor }
    }
}

#[async_trait]
impl Agent for Edit {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn run(&self, job: &JobInput, cx: &AgentContext) -> Result<Outcome, JobError> {
        let Some((image, mime_type)) = job.image.clone() else {
            return Err(JobError::Permanent(Failure {
                code: "image_required".to_string(),
                message: "An edit needs an image: attach the image you want changed.".to_string(),
                detail: "edit agent reached without an input image".to_string(),
            }));
        };
        let request = EditRequest {
            prompt: job.prompt.clone(),
            image,
            mime_type,
            size: job.size,
            n: job.n,
        };
        let editor = &self.editor;
        let output = cx
            .call(
                editor.provider(),
                editor.model(),
                || editor.edit(&request),
                |output| output.usage.clone(),
            )
            .await?;
        Ok(Outcome::Images(output.images))
    }
}
