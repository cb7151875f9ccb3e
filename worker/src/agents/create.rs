//! The `create` agent: a new image from the prompt, through the configured image generator
//! (the OpenAI image model, or its simulated stand-in).

use std::sync::Arc;

use async_trait::async_trait;
use shared::domain::Intent;

use super::{Agent, AgentContext, CallSpec, JobError, JobInput, Outcome, Route};
use crate::providers::{GenerateRequest, ImageGenerator};

pub const NAME: &str = "create";

pub struct Create {
    generator: Arc<dyn ImageGenerator>,
}

impl Create {
    pub fn new(generator: Arc<dyn ImageGenerator>) -> Self {
        Self { generator }
    }
}

#[async_trait]
impl Agent for Create {
    fn name(&self) -> &'static str {
        NAME
    }

    fn route(&self) -> Option<Route> {
        Some(Route {
            intent: Intent::Create,
            description: "a new image from a description.",
            offered: true,
        })
    }

    async fn run(&self, job: &JobInput, cx: &AgentContext) -> Result<Outcome, JobError> {
        let request = GenerateRequest {
            prompt: job.prompt.clone(),
            size: job.size,
            n: job.n,
        };
        let generator = &self.generator;
        let spec = CallSpec {
            provider: generator.provider(),
            billing_provider: generator.billing_provider(),
            model: generator.model(),
            prompt: &request.prompt,
            images: job.n,
            tokens: 0,
            breaker: false,
        };
        let output = cx
            .call(
                &spec,
                || generator.generate(&request),
                |output| output.usage.clone(),
            )
            .await?;
        Ok(Outcome::Images(output.images))
    }
}
