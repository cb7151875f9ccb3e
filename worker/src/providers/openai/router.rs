//! The router's classifier on OpenAI: Chat Completions with a strict JSON schema built from the
//! agents' routes, and the checks on its answer (`docs/providers.md`, section 2).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};
use shared::codes::FailureCode;
use shared::config::OpenAiSettings;
use shared::domain::{Intent, Usage};

use super::{NAME, OpenAi, provider_error};
use crate::providers::{
    Classification, Classifier, ClassifyRequest, JsonBody, ProviderError, ProviderInfo, Retry,
    Route, text_worst_case, truncate,
};

/// The router's instructions are these sentences around one line per intent the registry offers
/// (see [`router_instructions`]), so a new agent's route reaches the model without an edit here.
const ROUTER_PREAMBLE: &str = "You are the router of an image service. Read the user's request \
and decide what they want.";
const ROUTER_UNCLEAR: &str = "\"unclear\": the request is too vague to act on, or it is not about \
an image.";
const ROUTER_FIELDS: &str = "Set \"prompt\" to the request rewritten as a clear instruction for an \
image model: keep every visual detail and instruction, drop greetings and chatter, and keep the \
user's language. Set \"confidence\" between 0 and 1. Set \"question\" to one short question to \
ask the user when the intent is \"unclear\", otherwise null.";

/// The question asked when the model said `unclear` but gave no question of its own.
const DEFAULT_QUESTION: &str =
    "What would you like me to do: create a new image, or edit an image you attach?";

/// The router's text model on the OpenAI transport.
#[derive(Debug)]
pub struct OpenAiRouter {
    api: Arc<OpenAi>,
    model: String,
}

impl OpenAiRouter {
    pub fn new(api: Arc<OpenAi>, settings: &OpenAiSettings) -> Self {
        Self {
            api,
            model: settings.router_model.clone(),
        }
    }
}

impl ProviderInfo for OpenAiRouter {
    fn provider(&self) -> &'static str {
        NAME
    }

    fn model(&self) -> &str {
        &self.model
    }
}

#[async_trait]
impl Classifier for OpenAiRouter {
    fn estimate(&self, request: &ClassifyRequest) -> Usage {
        Usage {
            provider: NAME.to_string(),
            model: self.model.clone(),
            ..text_worst_case(&request.prompt)
        }
    }

    async fn classify(&self, request: &ClassifyRequest) -> Result<Classification, ProviderError> {
        let attached = if request.has_image {
            "An image is attached to this request."
        } else {
            "No image is attached to this request."
        };
        let body = JsonBody::new(json!({
            "model": self.model,
            "messages": [
                {"role": "system", "content": router_instructions(&request.intents)},
                {"role": "user", "content": format!("{attached}\n\nRequest:\n{}", request.prompt)},
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "intent", "strict": true, "schema": intent_schema(&request.intents)},
            },
        }));
        let completion: ChatCompletion = self.api.post("chat/completions", body).await?;
        let usage = completion.usage.unwrap_or_default();
        let usage = Usage {
            provider: NAME.to_string(),
            model: self.model.clone(),
            simulated: false,
            // Chat Completions counts cached tokens inside `prompt_tokens`; both are kept as
            // reported so the cost ledger can price the cached share at its own rate.
            input_text_tokens: usage.prompt_tokens.unwrap_or(0),
            cached_input_tokens: usage
                .prompt_tokens_details
                .and_then(|details| details.cached_tokens)
                .unwrap_or(0),
            output_text_tokens: usage.completion_tokens.unwrap_or(0),
            ..Usage::default()
        };
        let verdict = read_verdict(completion.choices.into_iter().next())?;
        let prompt = match verdict.prompt.trim() {
            "" => request.prompt.trim().to_string(),
            cleaned => cleaned.to_string(),
        };
        let question = verdict
            .question
            .map(|question| question.trim().to_string())
            .filter(|question| !question.is_empty())
            .or_else(|| (verdict.intent == Intent::Unclear).then(|| DEFAULT_QUESTION.to_string()));
        Ok(Classification {
            intent: verdict.intent,
            confidence: verdict.confidence.clamp(0.0, 1.0),
            prompt,
            question,
            usage,
        })
    }
}

/// The router's system message: the preamble, one line per offered intent, then `unclear` and
/// what to put in the other fields.
fn router_instructions(intents: &[Route]) -> String {
    let mut text = ROUTER_PREAMBLE.to_string();
    for choice in intents {
        text.push_str(&format!(
            " \"{}\": {}",
            choice.intent.as_str(),
            choice.description
        ));
    }
    text.push(' ');
    text.push_str(ROUTER_UNCLEAR);
    text.push(' ');
    text.push_str(ROUTER_FIELDS);
    text
}

/// The strict schema of the router's answer; every property is required, as strict mode demands,
/// and `question` is nullable instead of optional. The intent enum is the offered intents plus
/// `unclear`.
fn intent_schema(intents: &[Route]) -> Value {
    let mut names: Vec<&str> = intents
        .iter()
        .map(|choice| choice.intent.as_str())
        .collect();
    names.push(Intent::Unclear.as_str());
    json!({
        "type": "object",
        "properties": {
            "intent": {"type": "string", "enum": names},
            "confidence": {"type": "number"},
            "prompt": {"type": "string"},
            "question": {"type": ["string", "null"]},
        },
        "required": ["intent", "confidence", "prompt", "question"],
        "additionalProperties": false,
    })
}

/// Checks the first choice for a refusal, a truncated or filtered answer, or content that does
/// not match the schema.
fn read_verdict(choice: Option<Choice>) -> Result<Verdict, ProviderError> {
    let bad =
        |detail: String| provider_error(FailureCode::BadResponse, Retry::No, detail, Some(200));
    let choice = choice.ok_or_else(|| bad("chat/completions: no choices".to_string()))?;
    if let Some(refusal) = choice
        .message
        .refusal
        .filter(|text| !text.trim().is_empty())
    {
        return Err(provider_error(
            FailureCode::Refused,
            Retry::No,
            format!("chat/completions: refused: {}", truncate(&refusal)),
            Some(200),
        ));
    }
    let finish_reason = choice.finish_reason.unwrap_or_default();
    if finish_reason != "stop" {
        return Err(bad(format!(
            "chat/completions: finish_reason {finish_reason:?}, expected \"stop\""
        )));
    }
    let content = choice
        .message
        .content
        .ok_or_else(|| bad("chat/completions: message has no content".to_string()))?;
    let verdict: Verdict = serde_json::from_str(&content).map_err(|error| {
        bad(format!(
            "chat/completions: content does not match the intent schema ({error}): {}",
            truncate(&content)
        ))
    })?;
    if !verdict.confidence.is_finite() {
        return Err(bad(
            "chat/completions: confidence is not a number".to_string()
        ));
    }
    Ok(verdict)
}

#[derive(Debug, Deserialize)]
struct ChatCompletion {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<ChatUsage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    finish_reason: Option<String>,
    message: ChatMessage,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    content: Option<String>,
    refusal: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ChatUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Deserialize)]
struct PromptTokensDetails {
    cached_tokens: Option<u64>,
}

/// The router's answer, as the strict schema describes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Verdict {
    intent: Intent,
    confidence: f64,
    prompt: String,
    question: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::openai::test_support::*;

    #[test]
    fn the_router_schema_and_instructions_follow_the_offered_intents() {
        let schema = intent_schema(&intents());
        assert_eq!(
            schema["properties"]["intent"]["enum"],
            json!(["create", "edit", "upscale", "unclear"])
        );
        let instructions = router_instructions(&intents());
        assert!(
            instructions.contains("\"upscale\": a larger version of the user's image."),
            "{instructions}"
        );
        assert!(instructions.contains("\"unclear\": "), "{instructions}");
        let only_create = router_instructions(&intents()[..1]);
        assert!(!only_create.contains("\"edit\""), "{only_create}");
        assert_eq!(
            intent_schema(&intents()[..1])["properties"]["intent"]["enum"],
            json!(["create", "unclear"])
        );
    }

    #[tokio::test]
    async fn classify_sends_a_strict_schema_and_reads_the_verdict_and_usage() {
        let server = MockServer::start().await;
        let content = json!({"intent": "edit", "confidence": 0.93,
            "prompt": "Make the sky purple", "question": null})
        .to_string();
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .and(header("authorization", format!("Bearer {KEY}").as_str()))
            .and(body_partial_json(json!({
                "model": "gpt-4.1-mini",
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "intent", "strict": true,
                    "schema": {"required": ["intent", "confidence", "prompt", "question"],
                        "additionalProperties": false}}},
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(chat_completion(
                Value::String(content),
                "stop",
                Value::Null,
            )))
            .expect(1)
            .mount(&server)
            .await;

        let classification = router(&server)
            .classify(&ClassifyRequest {
                prompt: "hey, could you make the sky purple?".to_string(),
                has_image: true,
                intents: intents(),
            })
            .await
            .unwrap();

        assert_eq!(classification.intent, Intent::Edit);
        assert_eq!(classification.confidence, 0.93);
        assert_eq!(classification.prompt, "Make the sky purple");
        assert_eq!(classification.question, None);
        assert_eq!(
            classification.usage,
            Usage {
                agent: String::new(),
                provider: "openai".to_string(),
                model: "gpt-4.1-mini".to_string(),
                simulated: false,
                input_text_tokens: 180,
                cached_input_tokens: 128,
                output_text_tokens: 24,
                ..Usage::default()
            }
        );
        let requests = server.received_requests().await.unwrap();
        let sent: Value = serde_json::from_slice(&requests[0].body).unwrap();
        let user_message = sent["messages"][1]["content"].as_str().unwrap();
        assert!(
            user_message.contains("An image is attached"),
            "{user_message}"
        );
        assert!(
            user_message.contains("make the sky purple"),
            "{user_message}"
        );
    }

    #[tokio::test]
    async fn unclear_verdict_without_a_question_gets_a_default_question() {
        let server = MockServer::start().await;
        let content = json!({"intent": "unclear", "confidence": 0.2, "prompt": "hmm",
            "question": null})
        .to_string();
        mount(
            &server,
            "chat/completions",
            ResponseTemplate::new(200).set_body_json(chat_completion(
                Value::String(content),
                "stop",
                Value::Null,
            )),
        )
        .await;

        let classification = router(&server)
            .classify(&ClassifyRequest {
                prompt: "hmm".to_string(),
                has_image: false,
                intents: intents(),
            })
            .await
            .unwrap();

        assert_eq!(classification.intent, Intent::Unclear);
        assert_eq!(classification.question.as_deref(), Some(DEFAULT_QUESTION));
    }

    #[tokio::test]
    async fn a_refusal_is_permanent_and_coded_refused() {
        let server = MockServer::start().await;
        mount(
            &server,
            "chat/completions",
            ResponseTemplate::new(200).set_body_json(chat_completion(
                Value::Null,
                "stop",
                json!("I'm sorry, I can't help with that."),
            )),
        )
        .await;

        let error = router(&server)
            .classify(&ClassifyRequest {
                prompt: "something".to_string(),
                has_image: false,
                intents: intents(),
            })
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::Refused);
        assert_eq!(error.retry, Retry::No);
        assert!(error.detail.contains("can't help"), "{}", error.detail);
    }

    #[tokio::test]
    async fn a_truncated_answer_is_a_bad_response() {
        let server = MockServer::start().await;
        mount(
            &server,
            "chat/completions",
            ResponseTemplate::new(200).set_body_json(chat_completion(
                json!("{\"intent\":\"cre"),
                "length",
                Value::Null,
            )),
        )
        .await;

        let error = router(&server)
            .classify(&ClassifyRequest {
                prompt: "a cat".to_string(),
                has_image: false,
                intents: intents(),
            })
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::BadResponse);
        assert_eq!(error.retry, Retry::No);
        assert!(error.detail.contains("length"), "{}", error.detail);
    }

    #[tokio::test]
    async fn content_that_does_not_match_the_schema_is_a_bad_response() {
        let server = MockServer::start().await;
        let content = json!({"intent": "draw", "confidence": 0.9, "prompt": "x",
            "question": null})
        .to_string();
        mount(
            &server,
            "chat/completions",
            ResponseTemplate::new(200).set_body_json(chat_completion(
                Value::String(content),
                "stop",
                Value::Null,
            )),
        )
        .await;

        let error = router(&server)
            .classify(&ClassifyRequest {
                prompt: "a cat on a mat".to_string(),
                has_image: false,
                intents: intents(),
            })
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::BadResponse);
        assert_eq!(error.retry, Retry::No);
    }
}
