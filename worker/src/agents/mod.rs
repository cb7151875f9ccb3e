//! Agents: one file per agent type, all behind the [`Agent`] trait, registered in [`registry`].
//!
//! A job runs as a chain: it starts at the `router`, and each agent either hands off to another
//! agent by name, produces images, or asks the user to clarify. Adding an agent type is one new
//! file here plus one line in [`registry`]; the pipeline never names a concrete agent except the
//! entry point. An agent that serves an intent declares its [`Route`] and is named after the
//! intent; the router's choices (the classifier's schema enum and instructions, the simulated
//! classifier's keywords, and where each verdict goes) are built from those routes:
//! `docs/adding-an-agent.md` walks through it.
//!
//! Agents never touch Redis or RabbitMQ. Everything they need from the outside world (provider
//! calls with retries, usage recording, status changes) goes through [`AgentContext`].

pub mod create;
pub mod edit;
pub mod router;
pub mod upscale;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use shared::config::Settings;
use shared::domain::{Clarification, ImageMime, ImageSize, Intent, JobId, StoredImage};

pub use crate::context::{AgentContext, CallSpec};
pub use crate::error::{Failure, JobError};
use crate::providers::Providers;
pub use crate::providers::{Keywords, Route};

/// The agent every job starts with.
pub const ENTRY_AGENT: &str = router::NAME;

/// The job as agents see it: the request, already loaded (image bytes included).
#[derive(Debug, Clone)]
pub struct JobInput {
    pub id: JobId,
    /// The agent to start with; none means [`ENTRY_AGENT`].
    pub start: Option<String>,
    pub prompt: String,
    pub size: ImageSize,
    pub n: u32,
    pub image: Option<(Bytes, ImageMime)>,
}

/// What an agent decided.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Continue with another agent (by its registry name), with a possibly rewritten prompt.
    Handoff {
        to: &'static str,
        intent: Intent,
        prompt: String,
    },
    /// Final images, already kept in the object store by the call that paid for them.
    Images(Vec<StoredImage>),
    /// Ask the user; the job ends `needs_clarification`.
    Clarify(Clarification),
}

/// One agent type.
#[async_trait]
pub trait Agent: Send + Sync {
    /// How the router reaches this agent; `None` for an agent that is not a router destination
    /// (the router itself).
    fn route(&self) -> Option<Route> {
        None
    }
    /// Wire name: used in handoffs, usage records, logs and metric labels. An agent with a
    /// route is named after its intent (the api resumes a clarified job at the agent named like
    /// the chosen intent); an agent without one must say its name.
    fn name(&self) -> &'static str {
        self.route()
            .map_or("unnamed", |route| route.intent.as_str())
    }
    async fn run(&self, job: &JobInput, cx: &AgentContext) -> Result<Outcome, JobError>;
}

/// All agent types by name. One line per agent; the router is built last, from the others'
/// routes.
pub fn registry(
    providers: &Providers,
    settings: &Settings,
) -> HashMap<&'static str, Arc<dyn Agent>> {
    let mut agents: Vec<Arc<dyn Agent>> = vec![
        Arc::new(create::Create::new(providers.generator.clone())),
        Arc::new(edit::Edit::new(
            providers.editor.clone(),
            providers.fallback_editor.clone(),
        )),
        Arc::new(upscale::Upscale::new(providers.upscaler.clone())),
    ];
    let routes = agents.iter().filter_map(|agent| agent.route()).collect();
    agents.push(Arc::new(router::Router::new(
        providers.classifier.clone(),
        settings.worker.min_router_confidence,
        routes,
    )));
    agents
        .into_iter()
        .map(|agent| (agent.name(), agent))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_intent_but_unclear_has_one_agent_named_after_it() {
        let mut settings = Settings::defaults().unwrap();
        settings.openai.api_key = None;
        settings.gemini.api_key = None;
        let providers = Providers::from_settings(&settings).unwrap();
        let agents = registry(&providers, &settings);

        assert!(agents.contains_key(ENTRY_AGENT));
        assert!(
            !agents.contains_key("unnamed"),
            "an agent without a route has no name"
        );
        for intent in Intent::ALL {
            let serving: Vec<&str> = agents
                .values()
                .filter(|agent| agent.route().is_some_and(|route| route.intent == intent))
                .map(|agent| agent.name())
                .collect();
            if intent == Intent::Unclear {
                assert!(serving.is_empty(), "{serving:?} serve unclear");
            } else {
                // The api resumes a clarified job at the agent named like the chosen intent.
                assert_eq!(serving, [intent.as_str()], "agents serving {intent:?}");
            }
        }
    }
}
