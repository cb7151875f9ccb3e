//! The `router` agent: classifies a request as create, edit or unclear with a text model's
//! structured output, and hands off to the agent that serves that intent. Anything it cannot
//! route with confidence becomes a question for the user instead of a guess.

use std::sync::Arc;

use async_trait::async_trait;
use shared::domain::{Clarification, Intent};

use super::{Agent, AgentContext, CallSpec, JobError, JobInput, Outcome, create, edit};
use crate::providers::{Classifier, ClassifyRequest};

pub const NAME: &str = "router";

/// The intents a clarification may be answered with.
pub fn clarify_options() -> Vec<String> {
    vec![
        Intent::Create.as_str().to_string(),
        Intent::Edit.as_str().to_string(),
    ]
}

pub struct Router {
    classifier: Arc<dyn Classifier>,
    min_confidence: f64,
}

impl Router {
    pub fn new(classifier: Arc<dyn Classifier>, min_confidence: f64) -> Self {
        Self {
            classifier,
            min_confidence,
        }
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
        };
        let classifier = &self.classifier;
        let spec = CallSpec {
            provider: classifier.provider(),
            billing_provider: classifier.billing_provider(),
            model: classifier.model(),
            prompt: &job.prompt,
            images: 0,
            // A rough token estimate for the tokens-per-minute budget: prompt plus instructions.
            tokens: u32::try_from(job.prompt.chars().count() / 4 + 200).unwrap_or(u32::MAX),
            breaker: false,
        };
        let verdict = match cx
            .call(
                &spec,
                || classifier.classify(&request),
                |verdict| verdict.usage.clone(),
            )
            .await
        {
            Ok(verdict) => verdict,
            // A router that cannot decide (errors exhausted, a refusal, an answer that breaks
            // the schema) must not fail the job: the user can tell us instead.
            Err(JobError::Permanent(failure)) => {
                tracing::warn!(code = %failure.code, detail = %failure.detail, "Router failed; asking the user");
                return Ok(Outcome::Clarify(Clarification {
                    question: "We could not work out automatically what you would like. Should we create a new image from your prompt, or edit an image you attach?".to_string(),
                    options: clarify_options(),
                }));
            }
            Err(other) => return Err(other),
        };
        tracing::info!(
            intent = verdict.intent.as_str(),
            confidence = verdict.confidence,
            "Request classified"
        );
        // The job shows what the router understood, even when it then asks the user.
        cx.apply(shared::store::JobUpdate {
            intent: Some(verdict.intent),
            ..shared::store::JobUpdate::default()
        })
        .await?;
        Ok(decide(
            &verdict.intent,
            verdict.confidence,
            self.min_confidence,
            job.image.is_some(),
        )
        .map_or_else(
            |question| {
                Outcome::Clarify(Clarification {
                    question: verdict
                        .question
                        .clone()
                        .filter(|q| !q.trim().is_empty() && verdict.intent == Intent::Unclear)
                        .unwrap_or(question),
                    options: clarify_options(),
                })
            },
            |(to, intent)| Outcome::Handoff {
                to,
                intent,
                prompt: if verdict.prompt.trim().is_empty() {
                    job.prompt.clone()
                } else {
                    verdict.prompt.clone()
                },
            },
        ))
    }
}

/// The routing rule: where a verdict goes, or the question to ask instead.
fn decide(
    intent: &Intent,
    confidence: f64,
    min_confidence: f64,
    has_image: bool,
) -> Result<(&'static str, Intent), String> {
    match intent {
        _ if confidence < min_confidence => Err(
            "We are not sure what you would like. Should we create a new image from your prompt, or edit an image you attach?".to_string(),
        ),
        Intent::Create => Ok((create::NAME, Intent::Create)),
        Intent::Edit if has_image => Ok((edit::NAME, Intent::Edit)),
        Intent::Edit => Err(
            "Your request sounds like an edit, but no image was attached. Attach the image to edit, or ask us to create a new one.".to_string(),
        ),
        Intent::Unclear => Err(
            "Could you tell us more? Should we create a new image, or edit one you attach?".to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confident_create_goes_to_the_create_agent() {
        assert_eq!(
            decide(&Intent::Create, 0.9, 0.5, false),
            Ok((create::NAME, Intent::Create))
        );
    }

    #[test]
    fn edit_with_an_image_goes_to_the_edit_agent() {
        assert_eq!(
            decide(&Intent::Edit, 0.9, 0.5, true),
            Ok((edit::NAME, Intent::Edit))
        );
    }

    #[test]
    fn edit_without_an_image_asks_for_one() {
        let question = decide(&Intent::Edit, 0.9, 0.5, false).unwrap_err();
        assert!(question.contains("no image was attached"), "{question}");
    }

    #[test]
    fn unclear_or_unsure_verdicts_ask_the_user() {
        assert!(decide(&Intent::Unclear, 0.9, 0.5, false).is_err());
        assert!(decide(&Intent::Create, 0.2, 0.5, false).is_err());
    }
}
