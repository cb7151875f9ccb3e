//! The `router` agent: classifies a request with a text model's structured output and hands off
//! to the agent that serves that intent. Anything it cannot route with confidence becomes a
//! question for the user instead of a guess.
//!
//! The router knows no agent by name: the registry gives it every other agent's [`Route`], and
//! the classifier's choices, the handoff targets and the clarification options all come from
//! those routes. A new agent type that declares a route is routable without an edit here.

use std::sync::Arc;

use async_trait::async_trait;
use shared::domain::{Clarification, Intent};

use super::{Agent, AgentContext, CallSpec, JobError, JobInput, Outcome, Route};
use crate::providers::{Classifier, ClassifyRequest};

pub const NAME: &str = "router";

/// The general question, asked when the router cannot tell what the user wants.
const GENERAL_QUESTION: &str = "We are not sure what you would like. Should we create a new image from your prompt, or edit an image you attach?";
const ROUTER_FAILED_QUESTION: &str = "We could not work out automatically what you would like. Should we create a new image from your prompt, or edit an image you attach?";
const UNCLEAR_QUESTION: &str =
    "Could you tell us more? Should we create a new image, or edit one you attach?";

pub struct Router {
    classifier: Arc<dyn Classifier>,
    min_confidence: f64,
    /// Where each intent goes, in registry order.
    routes: Vec<Route>,
}

impl Router {
    pub fn new(classifier: Arc<dyn Classifier>, min_confidence: f64, routes: Vec<Route>) -> Self {
        Self {
            classifier,
            min_confidence,
            routes,
        }
    }

    /// The intents a general clarification may be answered with.
    fn clarify_options(&self) -> Vec<String> {
        self.routes
            .iter()
            .filter(|route| route.offered)
            .map(|route| route.intent.as_str().to_string())
            .collect()
    }
}

#[async_trait]
impl Agent for Router {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn run(&self, job: &JobInput, cx: &AgentContext) -> Result<Outcome, JobError> {
        let request = ClassifyRequest {
            prompt: job.prompt.clone(),
            has_image: job.image.is_some(),
            intents: self.routes.clone(),
        };
        let classifier = &*self.classifier;
        // A rough token estimate for the tokens-per-minute budget: prompt plus instructions.
        let tokens = u32::try_from(job.prompt.chars().count() / 4 + 200).unwrap_or(u32::MAX);
        let spec = CallSpec::new(classifier, &job.prompt)
            .tokens(tokens)
            .estimate(classifier.estimate(&request));
        let verdict = match cx.call(&spec, || classifier.classify(&request)).await {
            Ok(verdict) => verdict,
            // A router that cannot decide (errors exhausted, a refusal, an answer that breaks
            // the schema) must not fail the job: the user can tell us instead.
            Err(JobError::Permanent(failure)) => {
                tracing::warn!(code = %failure.code, detail = %failure.detail, "Router failed; asking the user");
                return Ok(Outcome::Clarify(Clarification {
                    question: ROUTER_FAILED_QUESTION.to_string(),
                    options: self.clarify_options(),
                }));
            }
            Err(other) => return Err(other),
        };
        tracing::info!(
            intent = verdict.intent.as_str(),
            confidence = verdict.confidence,
            "Request classified"
        );
        let outcome = match decide(
            &self.routes,
            verdict.intent,
            verdict.confidence,
            self.min_confidence,
            job.image.is_some(),
        ) {
            Ok(intent) => Outcome::Handoff {
                // Agents are named after the intent they serve (checked by a registry test).
                to: intent.as_str(),
                intent,
                prompt: if verdict.prompt.trim().is_empty() {
                    job.prompt.clone()
                } else {
                    verdict.prompt.clone()
                },
            },
            Err(Ask {
                question,
                also_offer,
            }) => {
                let mut options = self.clarify_options();
                if let Some(intent) = also_offer {
                    let name = intent.as_str().to_string();
                    if !options.contains(&name) {
                        options.push(name);
                    }
                }
                Outcome::Clarify(Clarification {
                    question: verdict
                        .question
                        .clone()
                        .filter(|q| !q.trim().is_empty() && verdict.intent == Intent::Unclear)
                        .unwrap_or(question),
                    options,
                })
            }
        };
        // The job shows what the router understood, even when it then asks the user. A
        // handoff records the intent itself, in the same write as the next step.
        if matches!(outcome, Outcome::Clarify(_)) {
            cx.apply(shared::store::JobUpdate {
                intent: Some(verdict.intent),
                ..shared::store::JobUpdate::default()
            })
            .await?;
        }
        Ok(outcome)
    }
}

/// The question to ask instead of handing off, and an intent to offer besides the general ones.
#[derive(Debug, PartialEq)]
struct Ask {
    question: String,
    also_offer: Option<Intent>,
}

/// The routing rule: the intent (and so the agent) a verdict goes to, or what to ask instead.
fn decide(
    routes: &[Route],
    intent: Intent,
    confidence: f64,
    min_confidence: f64,
    has_image: bool,
) -> Result<Intent, Ask> {
    let ask = |question: String, also_offer: Option<Intent>| {
        Err(Ask {
            question,
            also_offer,
        })
    };
    if confidence < min_confidence {
        return ask(GENERAL_QUESTION.to_string(), None);
    }
    if !routes.iter().any(|route| route.intent == intent) {
        // `unclear`, or an intent no registered agent serves.
        return ask(UNCLEAR_QUESTION.to_string(), None);
    }
    if intent.needs_image() && !has_image {
        let name = intent.as_str();
        let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        return ask(
            format!(
                "Your request sounds like {article} {name}, but no image was attached. Attach the image to {name}, or ask us to create a new one."
            ),
            Some(intent),
        );
    }
    Ok(intent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Vec<Route> {
        let route = |intent, offered| Route {
            intent,
            description: "",
            offered,
            keywords: super::super::Keywords::default(),
        };
        vec![
            route(Intent::Create, true),
            route(Intent::Edit, true),
            route(Intent::Upscale, false),
        ]
    }

    #[test]
    fn confident_create_goes_to_the_create_agent() {
        assert_eq!(
            decide(&routes(), Intent::Create, 0.9, 0.5, false),
            Ok(Intent::Create)
        );
        assert_eq!(super::super::create::ROUTE.intent, Intent::Create);
    }

    #[test]
    fn edit_with_an_image_goes_to_the_edit_agent() {
        assert_eq!(
            decide(&routes(), Intent::Edit, 0.9, 0.5, true),
            Ok(Intent::Edit)
        );
    }

    #[test]
    fn edit_without_an_image_asks_for_one() {
        let ask = decide(&routes(), Intent::Edit, 0.9, 0.5, false).unwrap_err();
        assert_eq!(
            ask.question,
            "Your request sounds like an edit, but no image was attached. Attach the image to edit, or ask us to create a new one."
        );
        assert_eq!(ask.also_offer, Some(Intent::Edit));
    }

    #[test]
    fn upscale_with_an_image_goes_to_the_upscale_agent() {
        assert_eq!(
            decide(&routes(), Intent::Upscale, 0.9, 0.5, true),
            Ok(Intent::Upscale)
        );
        assert_eq!(super::super::upscale::ROUTE.intent, Intent::Upscale);
    }

    #[test]
    fn upscale_without_an_image_asks_for_one_and_offers_upscale() {
        let ask = decide(&routes(), Intent::Upscale, 0.9, 0.5, false).unwrap_err();
        assert!(
            ask.question
                .starts_with("Your request sounds like an upscale, but no image was attached."),
            "{}",
            ask.question
        );
        assert_eq!(ask.also_offer, Some(Intent::Upscale));
    }

    #[test]
    fn unclear_or_unsure_verdicts_ask_the_user() {
        assert!(decide(&routes(), Intent::Unclear, 0.9, 0.5, false).is_err());
        assert!(decide(&routes(), Intent::Create, 0.2, 0.5, false).is_err());
    }

    #[test]
    fn an_intent_no_agent_serves_is_a_question_not_a_handoff() {
        let without_upscale = &routes()[..2];
        let ask = decide(without_upscale, Intent::Upscale, 0.9, 0.5, true).unwrap_err();
        assert_eq!(ask.also_offer, None);
    }
}
