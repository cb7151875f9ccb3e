//! OpenAI client: the router's intent classifier (Chat Completions with a strict JSON schema),
//! new images (`/images/generations`), image edits and upscales (`/images/edits`, the JSON form;
//! an upscale is an edit at a larger custom size), all on one reqwest client with the API key sent
//! as a bearer token.
//!
//! The wire formats follow `provider-apis.md` sections 1 to 3. Each call is exactly one HTTP
//! request; a failure becomes a [`ProviderError`] whose [`Retry`] is decided in one place,
//! [`classify_error`], from the status, the `x-should-retry` and `retry-after(-ms)` headers and
//! the error body's `code`/`type`, so the caller's retry policy sees what the server meant (a 429
//! for an exhausted quota is permanent, a 429 for a rate limit is not). The API key is never
//! written into an error: bodies are redacted before they reach `detail`.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::Utc;
use reqwest::Client;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use shared::codes::FailureCode;
use shared::config::OpenAiSettings;
use shared::domain::{ImageMime, Intent, Usage};
use shared::retry::parse_seconds;

use super::budget::{Base64Field, Encoded, HeldBody, ResponseBudget};
use super::{
    Classification, Classifier, ClassifyRequest, EditRequest, GenerateRequest, GeneratedImage,
    ImageEditor, ImageGenerator, ImageOutput, ImageUpscaler, IntentChoice, ProviderError, Retry,
    UpscaleRequest, redact, truncate,
};
use super::{Connections, http_client};

pub const NAME: &str = "openai";

/// 429 codes (or types) that mean money or quota ran out: waiting minutes will not help.
const QUOTA_CODES: &[&str] = &[
    "insufficient_quota",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
];

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

/// The OpenAI API, serving the classifier, the generator and the edit fallback.
#[derive(Debug)]
pub struct OpenAi {
    /// For the router's small answers.
    http: Client,
    /// For image answers (see [`Connections::Closed`]).
    image_http: Client,
    api_key: SecretString,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    base_url: String,
    router_model: String,
    image_model: String,
    image_quality: String,
    upscale_max_size: (u32, u32),
    budget: ResponseBudget,
}

impl OpenAi {
    pub fn new(settings: &OpenAiSettings, api_key: SecretString) -> Result<Self, ProviderError> {
        bearer(&api_key)?;
        let http = http_client(
            NAME,
            settings.timeout,
            settings.connect_timeout,
            Connections::Pooled,
        )?;
        let image_http = http_client(
            NAME,
            settings.timeout,
            settings.connect_timeout,
            Connections::Closed,
        )?;
        Ok(Self {
            http,
            image_http,
            api_key,
            base_url: settings.base_url.as_str().trim_end_matches('/').to_string(),
            router_model: settings.router_model.clone(),
            image_model: settings.image_model.clone(),
            image_quality: settings.image_quality.clone(),
            upscale_max_size: settings.upscale_max_size,
            budget: ResponseBudget::default(),
        })
    }

    /// Reads response bodies under `budget` (the worker's, shared with its other clients).
    #[must_use]
    pub fn with_budget(mut self, budget: ResponseBudget) -> Self {
        self.budget = budget;
        self
    }

    /// POSTs `body` as JSON to `{base_url}/{endpoint}` and parses a 2xx answer as `T`.
    async fn post<T: DeserializeOwned>(
        &self,
        endpoint: &str,
        body: &Value,
    ) -> Result<T, ProviderError> {
        let held = self.post_raw(&self.http, endpoint, body).await?;
        parse(endpoint, held.bytes())
    }

    /// POSTs `body` as JSON to `{base_url}/{endpoint}` and answers a 2xx body, read under the
    /// worker's response budget.
    async fn post_raw(
        &self,
        http: &Client,
        endpoint: &str,
        body: &Value,
    ) -> Result<HeldBody, ProviderError> {
        let url = format!("{}/{endpoint}", self.base_url);
        let response = http
            .post(&url)
            .header(AUTHORIZATION, bearer(&self.api_key)?)
            .json(body)
            .send()
            .await
            .map_err(|error| transport_error(endpoint, &error))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let held = self
            .budget
            .read(response)
            .await
            .map_err(|error| transport_error(endpoint, &error))?;
        if !(200..300).contains(&status) {
            let text = redact(&String::from_utf8_lossy(held.bytes()), &self.api_key);
            let mut error = classify_error(status, &headers, &text);
            error.detail = format!("{endpoint}: {}", error.detail);
            return Err(error);
        }
        Ok(held)
    }

    /// POSTs an images request and decodes the answer. The base64 is decoded in place, inside
    /// the body it arrived in, and the body is released (with its share of the budget) only
    /// once the images are stored.
    async fn post_images(
        &self,
        endpoint: &str,
        body: &Value,
        agent: &str,
        requested_size: &str,
    ) -> Result<ImageOutput, ProviderError> {
        let held = self.post_raw(&self.image_http, endpoint, body).await?;
        let ImagesResponse {
            data,
            usage,
            size,
            quality,
        } = parse(endpoint, held.bytes())?;
        let encoded = locate_images(&held, &data)?;
        drop(data);
        let images = decode_images(held, encoded)?;
        self.image_output(images, usage, size, quality, agent, requested_size)
    }

    /// Turns the decoded images and the answer's usage into the output to bill.
    fn image_output(
        &self,
        images: Vec<GeneratedImage>,
        usage: Option<ImageUsage>,
        size: Option<String>,
        quality: Option<String>,
        agent: &str,
        requested_size: &str,
    ) -> Result<ImageOutput, ProviderError> {
        let usage = usage.unwrap_or_default();
        let input = usage.input_tokens_details;
        let output = usage.output_tokens_details;
        let input_text_tokens = input
            .as_ref()
            .and_then(|details| details.text_tokens)
            .or(usage.input_tokens)
            .unwrap_or(0);
        let usage = Usage {
            agent: agent.to_string(),
            provider: NAME.to_string(),
            model: self.image_model.clone(),
            simulated: false,
            input_text_tokens,
            input_image_tokens: input.and_then(|details| details.image_tokens).unwrap_or(0),
            cached_input_tokens: 0,
            output_text_tokens: output
                .as_ref()
                .and_then(|details| details.text_tokens)
                .unwrap_or(0),
            output_image_tokens: output
                .and_then(|details| details.image_tokens)
                .or(usage.output_tokens)
                .unwrap_or(0),
            images: u32::try_from(images.len()).unwrap_or(u32::MAX),
            size: Some(size.unwrap_or_else(|| requested_size.to_string())),
            quality: Some(quality.unwrap_or_else(|| self.image_quality.clone())),
        };
        Ok(ImageOutput {
            images,
            text: None,
            usage,
        })
    }
}

#[async_trait]
impl Classifier for OpenAi {
    fn provider(&self) -> &'static str {
        NAME
    }

    fn model(&self) -> &str {
        &self.router_model
    }

    async fn classify(&self, request: &ClassifyRequest) -> Result<Classification, ProviderError> {
        let attached = if request.has_image {
            "An image is attached to this request."
        } else {
            "No image is attached to this request."
        };
        let body = json!({
            "model": self.router_model,
            "messages": [
                {"role": "system", "content": router_instructions(&request.intents)},
                {"role": "user", "content": format!("{attached}\n\nRequest:\n{}", request.prompt)},
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "intent", "strict": true, "schema": intent_schema(&request.intents)},
            },
        });
        let completion: ChatCompletion = self.post("chat/completions", &body).await?;
        let usage = completion.usage.unwrap_or_default();
        let usage = Usage {
            agent: "router".to_string(),
            provider: NAME.to_string(),
            model: self.router_model.clone(),
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

#[async_trait]
impl ImageGenerator for OpenAi {
    fn provider(&self) -> &'static str {
        NAME
    }

    fn model(&self) -> &str {
        &self.image_model
    }

    async fn generate(&self, request: &GenerateRequest) -> Result<ImageOutput, ProviderError> {
        let body = json!({
            "model": self.image_model,
            "prompt": request.prompt,
            "n": request.n,
            "size": request.size.as_str(),
            "quality": self.image_quality,
            "output_format": "png",
        });
        self.post_images("images/generations", &body, "create", request.size.as_str())
            .await
    }
}

#[async_trait]
impl ImageEditor for OpenAi {
    fn provider(&self) -> &'static str {
        NAME
    }

    fn model(&self) -> &str {
        &self.image_model
    }

    /// Uses the JSON form of `/images/edits` (GPT image models only): the input travels as a
    /// base64 data URL, which saves building a multipart body.
    async fn edit(&self, request: &EditRequest) -> Result<ImageOutput, ProviderError> {
        let data_url = format!(
            "data:{};base64,{}",
            request.mime_type.as_str(),
            BASE64.encode(&request.image)
        );
        let body = json!({
            "model": self.image_model,
            "prompt": request.prompt,
            "images": [{"image_url": data_url}],
            "n": request.n,
            "size": request.size.as_str(),
            "quality": self.image_quality,
            "output_format": "png",
        });
        self.post_images("images/edits", &body, "edit", request.size.as_str())
            .await
    }
}

#[async_trait]
impl ImageUpscaler for OpenAi {
    fn provider(&self) -> &'static str {
        NAME
    }

    fn model(&self) -> &str {
        &self.image_model
    }

    fn max_size(&self) -> (u32, u32) {
        self.upscale_max_size
    }

    /// An edit of the user's image at a larger custom `size` (gpt-image-2 accepts any
    /// multiple of 16 up to its maximum), asking for the same picture with more detail. One image:
    /// an upscale has one right answer.
    async fn upscale(&self, request: &UpscaleRequest) -> Result<ImageOutput, ProviderError> {
        let data_url = format!(
            "data:{};base64,{}",
            request.mime_type.as_str(),
            BASE64.encode(&request.image)
        );
        let size = format!("{}x{}", request.width, request.height);
        let body = json!({
            "model": self.image_model,
            "prompt": request.prompt,
            "images": [{"image_url": data_url}],
            "n": 1,
            "size": size,
            "quality": self.image_quality,
            "output_format": "png",
        });
        self.post_images("images/edits", &body, "upscale", &size)
            .await
    }
}

/// The router's system message: the preamble, one line per offered intent, then `unclear` and
/// what to put in the other fields.
fn router_instructions(intents: &[IntentChoice]) -> String {
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
fn intent_schema(intents: &[IntentChoice]) -> Value {
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

/// Parses a 2xx body of `endpoint`.
fn parse<'a, T: Deserialize<'a>>(endpoint: &str, bytes: &'a [u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(bytes).map_err(|error| {
        provider_error(
            FailureCode::BadResponse,
            Retry::No,
            format!("{endpoint}: the 2xx body does not parse: {error}"),
            Some(200),
        )
    })
}

fn bad_image(index: usize, what: &str) -> ProviderError {
    provider_error(
        FailureCode::BadResponse,
        Retry::No,
        format!("images: data[{index}] {what}"),
        Some(200),
    )
}

/// Where each image's base64 is in the body.
fn locate_images(held: &HeldBody, data: &[ImageDatum<'_>]) -> Result<Vec<Encoded>, ProviderError> {
    if data.is_empty() {
        return Err(provider_error(
            FailureCode::NoImageReturned,
            Retry::No,
            "images: response has no data".to_string(),
            Some(200),
        ));
    }
    data.iter()
        .enumerate()
        .map(|(index, datum)| {
            datum
                .b64_json
                .as_ref()
                .map(|field| held.locate(field))
                .ok_or_else(|| bad_image(index, "has no b64_json"))
        })
        .collect()
}

fn decode_images(
    held: HeldBody,
    encoded: Vec<Encoded>,
) -> Result<Vec<GeneratedImage>, ProviderError> {
    let share = held.share();
    let decoded = held
        .decode(encoded)
        .map_err(|(index, error)| bad_image(index, &format!("is not base64: {error}")))?;
    decoded
        .into_iter()
        .enumerate()
        .map(|(index, bytes)| {
            let mime_type = ImageMime::sniff(&bytes)
                .ok_or_else(|| bad_image(index, "is not a png, jpeg or webp image"))?;
            Ok(GeneratedImage {
                bytes,
                mime_type,
                budget: share.clone(),
            })
        })
        .collect()
}

/// Decides code and retry for a non-2xx answer. The body is the `Error` shape when the API
/// produced it, but proxies may answer with anything, so every field is optional.
///
/// `x-should-retry` overrides what the status alone implies, in either direction, as the official
/// SDK does; a code taken from the body that means "permanent" (an exhausted quota, a moderation
/// block) stays permanent whatever the header says, because retrying those only costs money.
fn classify_error(status: u16, headers: &HeaderMap, body: &str) -> ProviderError {
    let api_error = serde_json::from_str::<ErrorBody>(body)
        .ok()
        .map(|parsed| parsed.error)
        .unwrap_or_default();
    let error_code = api_error.code.as_deref().unwrap_or_default();
    let error_type = api_error.kind.as_deref().unwrap_or_default();
    let is_quota = QUOTA_CODES.contains(&error_code) || QUOTA_CODES.contains(&error_type);
    let code = match status {
        429 if is_quota => FailureCode::QuotaExceeded,
        429 => FailureCode::RateLimited,
        408 | 409 => FailureCode::ProviderUnavailable,
        500.. => FailureCode::ProviderUnavailable,
        400 if error_code == "moderation_blocked" => FailureCode::ContentBlocked,
        401 | 403 => FailureCode::ProviderAuthFailed,
        _ => FailureCode::InvalidRequest,
    };
    let permanent_by_body = matches!(
        code,
        FailureCode::QuotaExceeded | FailureCode::ContentBlocked
    );
    let retryable_by_status = matches!(
        code,
        FailureCode::RateLimited | FailureCode::ProviderUnavailable
    );
    let should_retry = headers
        .get("x-should-retry")
        .and_then(|value| value.to_str().ok())
        .map(|value| value.trim().to_ascii_lowercase());
    let retryable = !permanent_by_body
        && match should_retry.as_deref() {
            Some("true") => true,
            Some("false") => false,
            _ => retryable_by_status,
        };
    let retry = if retryable {
        Retry::Yes {
            after: retry_after(headers),
        }
    } else {
        Retry::No
    };

    let mut detail = format!("http {status}");
    if !error_type.is_empty() {
        detail.push_str(&format!(", type {error_type}"));
    }
    if !error_code.is_empty() {
        detail.push_str(&format!(", code {error_code}"));
    }
    let message = api_error.message.as_deref().unwrap_or(body).trim();
    if !message.is_empty() {
        detail.push_str(&format!(": {}", truncate(message)));
    }
    provider_error(code, retry, detail, Some(status))
}

/// The delay the server asked for: `retry-after-ms` first, then `retry-after` in seconds or as an
/// HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if let Some(millis) = header("retry-after-ms")
        .and_then(|raw| raw.trim().parse::<f64>().ok())
        .filter(|millis| millis.is_finite() && *millis >= 0.0)
    {
        return Some(Duration::from_secs_f64(millis / 1000.0));
    }
    let raw = header("retry-after")?;
    parse_seconds(raw).or_else(|| {
        let at = chrono::DateTime::parse_from_rfc2822(raw.trim()).ok()?;
        (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
    })
}

fn transport_error(endpoint: &str, error: &reqwest::Error) -> ProviderError {
    ProviderError::transport(NAME, endpoint, error)
}

fn bearer(api_key: &SecretString) -> Result<HeaderValue, ProviderError> {
    let mut value =
        HeaderValue::from_str(&format!("Bearer {}", api_key.expose_secret())).map_err(|_| {
            provider_error(
                FailureCode::ProviderAuthFailed,
                Retry::No,
                "api key contains characters not allowed in an http header".to_string(),
                None,
            )
        })?;
    value.set_sensitive(true);
    Ok(value)
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: ApiError,
}

#[derive(Debug, Default, Deserialize)]
struct ApiError {
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<String>,
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

#[derive(Debug, Deserialize)]
struct ImagesResponse<'a> {
    #[serde(default, borrow)]
    data: Vec<ImageDatum<'a>>,
    usage: Option<ImageUsage>,
    size: Option<String>,
    quality: Option<String>,
}

/// One image of an images answer; its base64 stays in the body.
#[derive(Debug, Deserialize)]
struct ImageDatum<'a> {
    #[serde(borrow)]
    b64_json: Option<Base64Field<'a>>,
}

#[derive(Debug, Default, Deserialize)]
struct ImageUsage {
    input_tokens: Option<u64>,
    input_tokens_details: Option<TokenDetails>,
    output_tokens: Option<u64>,
    output_tokens_details: Option<TokenDetails>,
}

#[derive(Debug, Deserialize)]
struct TokenDetails {
    text_tokens: Option<u64>,
    image_tokens: Option<u64>,
}

fn provider_error(
    code: FailureCode,
    retry: Retry,
    detail: String,
    status: Option<u16>,
) -> ProviderError {
    ProviderError::new(NAME, code, retry, detail, status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_images_answer_is_decoded_inside_its_body() {
        let image = png(2, 2);
        let body = json!({"created": 1, "data": [{"b64_json": BASE64.encode(&image)}]});
        let held = HeldBody::unbudgeted(body.to_string().into_bytes());
        let body_at = held.bytes().as_ptr() as usize;
        let body_range = body_at..body_at + held.bytes().len();
        let response: ImagesResponse<'_> = parse("images/generations", held.bytes()).unwrap();
        let encoded = locate_images(&held, &response.data).unwrap();
        drop(response);
        let images = decode_images(held, encoded).unwrap();
        assert_eq!(images[0].bytes.as_ref(), image.as_slice());
        let image_at = images[0].bytes.as_ptr() as usize;
        assert!(
            body_range.contains(&image_at),
            "the image was decoded out of its body"
        );
    }

    use shared::config::Settings;
    use shared::domain::ImageSize;
    use wiremock::matchers::{body_partial_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const KEY: &str = "sk-test-0123456789abcdefSECRET";

    fn settings(server: &MockServer) -> OpenAiSettings {
        let mut settings = Settings::defaults().unwrap().openai;
        settings.base_url = format!("{}/v1", server.uri()).parse().unwrap();
        settings.router_model = "gpt-4.1-mini".to_string();
        settings.image_model = "gpt-image-1.5".to_string();
        settings.image_quality = "medium".to_string();
        settings
    }

    fn client(server: &MockServer) -> OpenAi {
        OpenAi::new(&settings(server), SecretString::from(KEY)).unwrap()
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbImage::from_pixel(width, height, image::Rgb([200, 30, 60]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        bytes.into_inner()
    }

    fn chat_completion(content: Value, finish_reason: &str, refusal: Value) -> Value {
        json!({
            "id": "chatcmpl-123", "object": "chat.completion", "created": 1,
            "model": "gpt-4.1-mini-2025-04-14",
            "choices": [{"index": 0, "finish_reason": finish_reason,
                "message": {"role": "assistant", "content": content, "refusal": refusal}}],
            "usage": {"prompt_tokens": 180, "completion_tokens": 24, "total_tokens": 204,
                "prompt_tokens_details": {"cached_tokens": 128, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                    "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
        })
    }

    fn openai_error(message: &str, kind: &str, code: Option<&str>) -> Value {
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
    }

    async fn mount(server: &MockServer, endpoint: &str, response: ResponseTemplate) {
        Mock::given(method("POST"))
            .and(path(format!("/v1/{endpoint}")))
            .respond_with(response)
            .mount(server)
            .await;
    }

    /// The intents the registry offers today, as the router sends them.
    fn intents() -> Vec<IntentChoice> {
        vec![
            IntentChoice {
                intent: Intent::Create,
                description: "a new image from a description.",
            },
            IntentChoice {
                intent: Intent::Edit,
                description: "a change to an image the user has.",
            },
            IntentChoice {
                intent: Intent::Upscale,
                description: "a larger version of the user's image.",
            },
        ]
    }

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
    async fn upscale_sends_the_image_to_the_edits_endpoint_at_the_requested_custom_size() {
        let server = MockServer::start().await;
        let input = png(4, 3);
        let output_image = png(8, 6);
        Mock::given(method("POST"))
            .and(path("/v1/images/edits"))
            .and(body_partial_json(json!({
                "model": "gpt-image-1.5", "prompt": "Upscale this image.", "n": 1,
                "size": "2048x1536", "quality": "medium", "output_format": "png",
                "images": [{"image_url": format!("data:image/png;base64,{}", BASE64.encode(&input))}],
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "created": 1, "data": [{"b64_json": BASE64.encode(&output_image)}],
                "usage": {"input_tokens": 400,
                    "input_tokens_details": {"text_tokens": 12, "image_tokens": 388},
                    "output_tokens": 3168, "total_tokens": 3568,
                    "output_tokens_details": {"image_tokens": 3168, "text_tokens": 0}},
            })))
            .expect(1)
            .mount(&server)
            .await;

        let openai = client(&server);
        assert_eq!(openai.max_size(), (3840, 2160));
        let output = openai
            .upscale(&UpscaleRequest {
                prompt: "Upscale this image.".to_string(),
                image: bytes::Bytes::from(input),
                mime_type: ImageMime::Png,
                width: 2048,
                height: 1536,
            })
            .await
            .unwrap();

        assert_eq!(output.images.len(), 1);
        assert_eq!(output.images[0].bytes.as_ref(), output_image.as_slice());
        assert_eq!(output.usage.agent, "upscale");
        assert_eq!(output.usage.model, "gpt-image-1.5");
        assert_eq!(output.usage.input_image_tokens, 388);
        assert_eq!(output.usage.output_image_tokens, 3168);
        // No size in the answer: the requested one is what was billed.
        assert_eq!(output.usage.size.as_deref(), Some("2048x1536"));
    }

    fn generate_request() -> GenerateRequest {
        GenerateRequest {
            prompt: "a red fox in the snow".to_string(),
            size: ImageSize::Square,
            n: 1,
        }
    }

    fn assert_no_key(error: &ProviderError) {
        assert!(!format!("{error}").contains(KEY), "key in Display: {error}");
        assert!(
            !format!("{error:?}").contains(KEY),
            "key in Debug: {error:?}"
        );
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
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

        let classification = client(&server)
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
                agent: "router".to_string(),
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

        let classification = client(&server)
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

        let error = client(&server)
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

        let error = client(&server)
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

        let error = client(&server)
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

    #[tokio::test]
    async fn generate_sends_the_configured_model_and_decodes_images_with_usage() {
        let server = MockServer::start().await;
        let image = png(4, 3);
        Mock::given(method("POST"))
            .and(path("/v1/images/generations"))
            .and(header("authorization", format!("Bearer {KEY}").as_str()))
            .and(body_partial_json(json!({
                "model": "gpt-image-1.5", "prompt": "a red fox in the snow", "n": 2,
                "size": "1536x1024", "quality": "medium", "output_format": "png",
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "created": 1713833628,
                "data": [{"b64_json": BASE64.encode(&image)}, {"b64_json": BASE64.encode(&image)}],
                "background": "opaque", "output_format": "png", "size": "1536x1024",
                "quality": "medium",
                "usage": {"input_tokens": 50,
                    "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
                    "output_tokens": 3136, "total_tokens": 3186,
                    "output_tokens_details": {"image_tokens": 3136, "text_tokens": 0}},
            })))
            .expect(1)
            .mount(&server)
            .await;

        let output = client(&server)
            .generate(&GenerateRequest {
                prompt: "a red fox in the snow".to_string(),
                size: ImageSize::Landscape,
                n: 2,
            })
            .await
            .unwrap();

        assert_eq!(output.images.len(), 2);
        assert_eq!(output.images[0].mime_type, ImageMime::Png);
        assert_eq!(output.images[0].bytes.as_ref(), image.as_slice());
        assert_eq!(
            output.usage,
            Usage {
                agent: "create".to_string(),
                provider: "openai".to_string(),
                model: "gpt-image-1.5".to_string(),
                simulated: false,
                input_text_tokens: 10,
                input_image_tokens: 40,
                cached_input_tokens: 0,
                output_text_tokens: 0,
                output_image_tokens: 3136,
                images: 2,
                size: Some("1536x1024".to_string()),
                quality: Some("medium".to_string()),
            }
        );
    }

    #[tokio::test]
    async fn output_tokens_stand_in_for_image_tokens_when_details_are_missing() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(200).set_body_json(json!({
                "created": 1,
                "data": [{"b64_json": BASE64.encode(png(2, 2))}],
                "usage": {"input_tokens": 12,
                    "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
                    "output_tokens": 1056, "total_tokens": 1068},
            })),
        )
        .await;

        let output = client(&server).generate(&generate_request()).await.unwrap();

        assert_eq!(output.usage.output_image_tokens, 1056);
        assert_eq!(output.usage.input_text_tokens, 12);
        assert_eq!(output.usage.size.as_deref(), Some("1024x1024"));
        assert_eq!(output.usage.quality.as_deref(), Some("medium"));
    }

    #[tokio::test]
    async fn bytes_that_are_not_an_image_are_a_bad_response() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(200).set_body_json(json!({
                "created": 1, "data": [{"b64_json": BASE64.encode(b"not an image")}],
            })),
        )
        .await;

        let error = client(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::BadResponse);
        assert_eq!(error.retry, Retry::No);
    }

    #[tokio::test]
    async fn edit_sends_the_image_as_a_json_data_url_and_bills_the_edit_agent() {
        let server = MockServer::start().await;
        let input = png(3, 3);
        let output_image = png(5, 5);
        Mock::given(method("POST"))
            .and(path("/v1/images/edits"))
            .and(header("content-type", "application/json"))
            .and(body_partial_json(json!({
                "model": "gpt-image-1.5", "prompt": "make it blue", "n": 1,
                "size": "1024x1024", "quality": "medium",
                "images": [{"image_url": format!("data:image/png;base64,{}", BASE64.encode(&input))}],
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "created": 1, "data": [{"b64_json": BASE64.encode(&output_image)}],
                "usage": {"input_tokens": 330,
                    "input_tokens_details": {"text_tokens": 7, "image_tokens": 323},
                    "output_tokens": 1056, "total_tokens": 1386,
                    "output_tokens_details": {"image_tokens": 1056, "text_tokens": 0}},
            })))
            .expect(1)
            .mount(&server)
            .await;

        let output = client(&server)
            .edit(&EditRequest {
                prompt: "make it blue".to_string(),
                image: bytes::Bytes::from(input),
                mime_type: ImageMime::Png,
                size: ImageSize::Square,
                n: 1,
            })
            .await
            .unwrap();

        assert_eq!(output.images[0].bytes.as_ref(), output_image.as_slice());
        assert_eq!(output.usage.agent, "edit");
        assert_eq!(output.usage.input_image_tokens, 323);
        assert_eq!(output.usage.output_image_tokens, 1056);
    }

    #[tokio::test]
    async fn rate_limited_429_is_retryable_with_the_servers_delay() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(429)
                .insert_header("retry-after-ms", "1500")
                .insert_header("retry-after", "2")
                .set_body_json(openai_error(
                    "Rate limit reached for gpt-image-1.5 on requests per min (RPM): Limit 3, \
                     Used 3, Requested 1. Please try again in 20s.",
                    "requests",
                    Some("rate_limit_exceeded"),
                )),
        )
        .await;

        let error = client(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::RateLimited);
        assert_eq!(
            error.retry,
            Retry::Yes {
                after: Some(Duration::from_millis(1500))
            }
        );
        assert_eq!(error.status, Some(429));
        assert!(
            error.detail.contains("rate_limit_exceeded"),
            "{}",
            error.detail
        );
        assert!(
            error.detail.contains("images/generations"),
            "{}",
            error.detail
        );
        assert_no_key(&error);
    }

    #[tokio::test]
    async fn insufficient_quota_429_is_permanent() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(429).set_body_json(openai_error(
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                Some("insufficient_quota"),
            )),
        )
        .await;

        let error = client(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::QuotaExceeded);
        assert_eq!(error.retry, Retry::No);
        assert!(
            error.user_message.contains("usage limit"),
            "{}",
            error.user_message
        );
    }

    #[test]
    fn newer_spend_limit_codes_are_quota_even_when_the_server_says_retry() {
        let body = openai_error(
            "Spend limit reached",
            "requests",
            Some("project_spend_limit_exceeded"),
        );
        let error = classify_error(
            429,
            &headers(&[("x-should-retry", "true")]),
            &body.to_string(),
        );
        assert_eq!(error.code, FailureCode::QuotaExceeded);
        assert_eq!(error.retry, Retry::No);
    }

    #[tokio::test]
    async fn service_unavailable_503_is_retryable_and_honours_retry_after() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(503)
                .insert_header("retry-after", "2.5")
                .set_body_json(openai_error(
                    "The server is overloaded.",
                    "service_unavailable_error",
                    Some("server_is_overloaded"),
                )),
        )
        .await;

        let error = client(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::ProviderUnavailable);
        assert_eq!(
            error.retry,
            Retry::Yes {
                after: Some(Duration::from_millis(2500))
            }
        );
        assert!(error.user_message.contains("temporarily unavailable"));
    }

    #[tokio::test]
    async fn moderation_blocked_400_is_content_blocked_and_permanent() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(400).set_body_json(json!({"error": {
                "type": "image_generation_user_error", "code": "moderation_blocked",
                "message": "Your request was rejected by the safety system.", "param": null,
                "moderation_details": {"moderation_stage": "input"}}})),
        )
        .await;

        let error = client(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::ContentBlocked);
        assert_eq!(error.retry, Retry::No);
        assert!(error.user_message.contains("safety system"));
    }

    #[tokio::test]
    async fn x_should_retry_false_overrides_a_retryable_status() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(500)
                .insert_header("x-should-retry", "false")
                .set_body_json(openai_error("boom", "server_error", None)),
        )
        .await;

        let error = client(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.retry, Retry::No);
        assert_eq!(error.status, Some(500));
    }

    #[test]
    fn x_should_retry_true_makes_a_client_error_retryable() {
        let body = openai_error("Lock timeout", "invalid_request_error", None);
        let error = classify_error(
            400,
            &headers(&[("x-should-retry", "true"), ("retry-after-ms", "250")]),
            &body.to_string(),
        );
        assert_eq!(
            error.retry,
            Retry::Yes {
                after: Some(Duration::from_millis(250))
            }
        );
    }

    #[test]
    fn statuses_map_to_codes_and_retry_decisions() {
        let cases: [(u16, FailureCode, bool); 8] = [
            (408, FailureCode::ProviderUnavailable, true),
            (409, FailureCode::ProviderUnavailable, true),
            (500, FailureCode::ProviderUnavailable, true),
            (502, FailureCode::ProviderUnavailable, true),
            (401, FailureCode::ProviderAuthFailed, false),
            (403, FailureCode::ProviderAuthFailed, false),
            (404, FailureCode::InvalidRequest, false),
            (422, FailureCode::InvalidRequest, false),
        ];
        for (status, code, retryable) in cases {
            let error = classify_error(status, &HeaderMap::new(), "");
            assert_eq!(error.code, code, "status {status}");
            assert_eq!(
                matches!(error.retry, Retry::Yes { .. }),
                retryable,
                "status {status}"
            );
        }
    }

    #[test]
    fn retry_after_accepts_an_http_date() {
        let at = (Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let mut map = HeaderMap::new();
        map.insert("retry-after", HeaderValue::from_str(&at).unwrap());
        let after = retry_after(&map).unwrap();
        assert!(
            after > Duration::from_secs(25) && after <= Duration::from_secs(30),
            "{after:?}"
        );
        assert_eq!(
            retry_after(&headers(&[(
                "retry-after",
                "Wed, 21 Oct 2015 07:28:00 GMT"
            )])),
            None
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
    }

    #[test]
    fn a_non_json_error_body_is_kept_truncated_in_the_detail() {
        let body = format!("<html>{}</html>", "x".repeat(1000));
        let error = classify_error(502, &HeaderMap::new(), &body);
        assert_eq!(error.code, FailureCode::ProviderUnavailable);
        assert!(
            error.detail.starts_with("http 502: <html>"),
            "{}",
            error.detail
        );
        assert!(error.detail.chars().count() < 340, "{}", error.detail.len());
    }

    #[tokio::test]
    async fn unauthorized_401_is_an_auth_failure_that_never_shows_the_key() {
        let server = MockServer::start().await;
        mount(
            &server,
            "chat/completions",
            ResponseTemplate::new(401).set_body_json(openai_error(
                &format!("Incorrect API key provided: {KEY}. You can find your API key at ..."),
                "invalid_request_error",
                Some("invalid_api_key"),
            )),
        )
        .await;

        let error = client(&server)
            .classify(&ClassifyRequest {
                prompt: "a cat".to_string(),
                has_image: false,
                intents: intents(),
            })
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::ProviderAuthFailed);
        assert_eq!(error.retry, Retry::No);
        assert!(error.detail.contains("[redacted]"), "{}", error.detail);
        assert_no_key(&error);
    }

    #[tokio::test]
    async fn a_refused_connection_is_retryable_without_a_delay() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let mut settings = Settings::defaults().unwrap().openai;
        settings.base_url = format!("http://{address}/v1").parse().unwrap();
        let openai = OpenAi::new(&settings, SecretString::from(KEY)).unwrap();

        let error = openai.generate(&generate_request()).await.unwrap_err();

        assert_eq!(error.code, FailureCode::ProviderUnavailable);
        assert_eq!(error.retry, Retry::Yes { after: None });
        assert_eq!(error.status, None);
        assert!(
            error.detail.contains("connection failed"),
            "{}",
            error.detail
        );
        assert_no_key(&error);
    }

    #[tokio::test]
    async fn a_timeout_is_retryable() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(200).set_delay(Duration::from_secs(5)),
        )
        .await;
        let mut settings = settings(&server);
        settings.timeout = Duration::from_millis(200);
        let openai = OpenAi::new(&settings, SecretString::from(KEY)).unwrap();

        let error = openai.generate(&generate_request()).await.unwrap_err();

        assert_eq!(error.code, FailureCode::ProviderTimeout);
        assert_eq!(error.retry, Retry::Yes { after: None });
        assert!(error.detail.contains("timed out"), "{}", error.detail);
    }

    #[test]
    fn the_client_debug_output_hides_the_key() {
        let settings = Settings::defaults().unwrap().openai;
        let openai = OpenAi::new(&settings, SecretString::from(KEY)).unwrap();
        assert!(!format!("{openai:?}").contains(KEY));
    }
}
