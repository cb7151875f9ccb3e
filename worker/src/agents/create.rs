//! The `create` agent: a new image from the prompt, through the configured image generator
//! (the OpenAI image model, or its simulated stand-in).

use std::sync::Arc;

use async_trait::async_trait;
use shared::domain::Intent;

use super::{Agent, AgentContext, CallSpec, JobError, JobInput, Keywords, Outcome, Route};
use crate::providers::{GenerateRequest, ImageGenerator};

pub const ROUTE: Route = Route {
    intent: Intent::Create,
    description: "a new image from a description.",
    offered: true,
    // What is not another intent is a new image: no words of its own.
    keywords: Keywords {
        words: &[],
        phrases: &[],
        phrases_with_image: &[],
    },
};

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
    fn route(&self) -> Option<Route> {
        Some(ROUTE)
    }

    async fn run(&self, job: &JobInput, cx: &AgentContext) -> Result<Outcome, JobError> {
        let request = GenerateRequest {
            prompt: job.prompt.clone(),
            size: job.size,
            n: job.n,
        };
        let spec = CallSpec::new(&*self.generator, &request.prompt)
            .images(job.n)
            .estimate(self.generator.estimate(&request));
        let output = cx.call(&spec, || self.generator.generate(&request)).await?;
        Ok(Outcome::Images(output.images))
    }
}
