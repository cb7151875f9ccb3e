//! Gemini client for image edits: one `generateContent` call carrying the prompt and the user's
//! image inline, on the shared reqwest stack (no Gemini SDK, so one HTTP stack and one retry
//! policy, as `crates.md` recommends).
//!
//! The wire format follows `docs/providers.md` section 4. Gemini reports trouble in three places
//! and all three are read here: the HTTP status with a `google.rpc` error body (rate limits carry
//! their delay in a `RetryInfo` detail, not a header), a 200 whose `promptFeedback` says the
//! prompt was blocked, and a 200 whose candidate stopped for safety or stopped without producing
//! an image. Image models answer with one candidate only (`candidateCount` above 1 is rejected),
//! so a request for `n` images still makes exactly one call and returns what came back; the
//! caller sees the count in [`ImageOutput::images`] and in [`Usage::images`].

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::Client;
use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::codes::FailureCode;
use shared::config::GeminiSettings;
use shared::domain::{ImageMime, Usage};
use shared::retry::{parse_proto_duration, parse_seconds};

use super::budget::{Base64Field, Encoded, HeldBody, ResponseBudget, cap_bytes};
use super::{Connections, JsonBody, http_client};
use super::{
    EditRequest, GeneratedImage, ImageEditor, ImageOutput, ProviderError, ProviderInfo, Retry,
    redact, truncate,
};

pub const NAME: &str = "gemini";

/// Finish reasons that mean a safety, policy or recitation filter stopped the answer.
const BLOCKING_FINISH_REASONS: &[&str] = &[
    "SAFETY",
    "IMAGE_SAFETY",
    "PROHIBITED_CONTENT",
    "IMAGE_PROHIBITED_CONTENT",
    "BLOCKLIST",
    "SPII",
    "RECITATION",
    "IMAGE_RECITATION",
];

/// The Gemini Developer API, serving image edits.
#[derive(Debug)]
pub struct Gemini {
    http: Client,
    api_key: SecretString,
    /// The `x-goog-api-key` header, built once (marked sensitive: never printed).
    key_header: HeaderValue,
    /// `{base_url}/v1beta/models/{model}:generateContent`, parsed once.
    url: reqwest::Url,
    model: String,
    budget: ResponseBudget,
    /// The largest answer body read (`gemini.max_response_mib`).
    max_response_bytes: u64,
}

/// The setting that caps an answer's size, named in the error of an answer above it.
const MAX_RESPONSE_SETTING: &str = "gemini.max_response_mib, PICTOR_GEMINI_MAX_RESPONSE_MIB";

impl Gemini {
    /// `connections`: how its client treats them ([`super::image_connections`]).
    pub fn new(
        settings: &GeminiSettings,
        api_key: SecretString,
        connections: Connections,
    ) -> Result<Self, ProviderError> {
        let key_header = api_key_header(&api_key)?;
        let url = super::endpoint_url(
            NAME,
            settings.base_url.as_str(),
            &format!("v1beta/models/{}:generateContent", settings.image_model),
        )?;
        // Every answer is an image (see `Connections::Images`).
        let http = http_client(
            NAME,
            settings.timeout,
            settings.connect_timeout,
            connections,
        )?;
        Ok(Self {
            http,
            api_key,
            key_header,
            url,
            model: settings.image_model.clone(),
            budget: ResponseBudget::default(),
            max_response_bytes: cap_bytes(settings.max_response_mib),
        })
    }

    /// Reads response bodies under `budget` (the worker's, shared with its other clients).
    #[must_use]
    pub fn with_budget(mut self, budget: ResponseBudget) -> Self {
        self.budget = budget;
        self
    }
}

impl ProviderInfo for Gemini {
    fn provider(&self) -> &'static str {
        NAME
    }

    fn model(&self) -> &str {
        &self.model
    }
}

#[async_trait]
impl ImageEditor for Gemini {
    fn estimate(&self, request: &EditRequest) -> Usage {
        Usage {
            provider: NAME.to_string(),
            model: self.model.clone(),
            ..worst_case(request.n, &request.prompt)
        }
    }

    async fn edit(&self, request: &EditRequest) -> Result<ImageOutput, ProviderError> {
        let body = JsonBody::new(json!({
            "contents": [{"role": "user", "parts": [
                {"text": request.prompt},
                {"inline_data": {
                    "mime_type": request.mime_type.as_str(),
                    "data": BASE64.encode(&request.image),
                }},
            ]}],
            "generationConfig": {
                "responseModalities": ["TEXT", "IMAGE"],
                "imageConfig": {"aspectRatio": request.size.aspect_ratio()},
            },
        }));
        let post = self
            .http
            .post(self.url.clone())
            .header("x-goog-api-key", self.key_header.clone());
        let response = body
            .attach(post)
            .send()
            .await
            .map_err(|error| transport_error(&error))?;
        let status = response.status().as_u16();
        // Held (with its share of the worker's response budget) until the images are decoded.
        let held = self
            .budget
            .read(response, self.max_response_bytes)
            .await
            .map_err(|error| {
                ProviderError::unread(
                    NAME,
                    "generateContent",
                    status,
                    MAX_RESPONSE_SETTING,
                    &error,
                )
            })?;
        if !(200..300).contains(&status) {
            let text = redact(&String::from_utf8_lossy(held.bytes()), &self.api_key);
            return Err(classify_error(status, &text));
        }
        let parsed: GenerateContentResponse<'_> =
            serde_json::from_slice(held.bytes()).map_err(|error| {
                provider_error(
                    FailureCode::BadResponse,
                    Retry::No,
                    format!("generateContent: http {status} body does not parse: {error}"),
                    Some(status),
                )
            })?;
        let answer = read_response(parsed, &held, &self.model, request.size.as_str())?;
        answer.decode(held)
    }
}

/// A 200 answer read: where its images are in the body, still in base64.
struct Answer {
    images: Vec<Encoded>,
    /// The `mimeType` each image part declared, for the error when it is not an image.
    declared: Vec<Option<String>>,
    text: Option<String>,
    usage: Usage,
}

impl Answer {
    /// Decodes the images in place, inside the body they arrived in.
    fn decode(self, held: HeldBody) -> Result<ImageOutput, ProviderError> {
        let bad = |index: usize, what: String| {
            provider_error(
                FailureCode::BadResponse,
                Retry::No,
                format!("generateContent: image {index} {what}"),
                Some(200),
            )
        };
        let share = held.share();
        let decoded = held
            .decode(self.images)
            .map_err(|(index, error)| bad(index, format!("is not base64: {error}")))?;
        let images = decoded
            .into_iter()
            .zip(self.declared)
            .enumerate()
            .map(|(index, (bytes, declared))| {
                let mime_type = ImageMime::sniff(&bytes).ok_or_else(|| {
                    bad(
                        index,
                        format!(
                            "is not a png, jpeg or webp image (declared {})",
                            declared.as_deref().unwrap_or("nothing")
                        ),
                    )
                })?;
                Ok(GeneratedImage {
                    bytes,
                    mime_type,
                    budget: share.clone(),
                })
            })
            .collect::<Result<Vec<_>, ProviderError>>()?;
        Ok(ImageOutput {
            images,
            text: self.text,
            usage: self.usage,
        })
    }
}

/// Reads a 200 answer of `held`: where its images are, or the error it really is (blocked, or
/// no image).
fn read_response(
    response: GenerateContentResponse<'_>,
    held: &HeldBody,
    model: &str,
    size: &str,
) -> Result<Answer, ProviderError> {
    let blocked =
        |detail: String| provider_error(FailureCode::ContentBlocked, Retry::No, detail, Some(200));
    if let Some(reason) = response
        .prompt_feedback
        .as_ref()
        .and_then(|feedback| feedback.block_reason.as_deref())
    {
        return Err(blocked(format!(
            "generateContent: prompt blocked, blockReason {reason}"
        )));
    }
    if response.candidates.is_empty() {
        return Err(blocked(
            "generateContent: no candidates and no blockReason".to_string(),
        ));
    }
    let finish_reasons: Vec<&str> = response
        .candidates
        .iter()
        .filter_map(|candidate| candidate.finish_reason.as_deref())
        .collect();
    if let Some(reason) = finish_reasons
        .iter()
        .find(|reason| BLOCKING_FINISH_REASONS.contains(reason))
    {
        return Err(blocked(format!(
            "generateContent: candidate stopped, finishReason {reason}"
        )));
    }

    let mut images = Vec::new();
    let mut declared = Vec::new();
    let mut texts = Vec::new();
    // Thinking models may send interim "thought" parts (text, or draft images); only the final
    // answer is the result.
    let parts = response
        .candidates
        .iter()
        .filter_map(|candidate| candidate.content.as_ref())
        .flat_map(|content| content.parts.iter())
        .filter(|part| !part.thought.unwrap_or(false));
    for part in parts {
        if let Some(text) = part.text.as_deref().filter(|text| !text.trim().is_empty()) {
            texts.push(text.trim().to_string());
        }
        if let Some(inline) = &part.inline_data {
            images.push(held.locate(&inline.data));
            declared.push(inline.mime_type.clone());
        }
    }
    let text = (!texts.is_empty()).then(|| texts.join("\n"));
    if images.is_empty() {
        return Err(provider_error(
            FailureCode::NoImageReturned,
            Retry::No,
            format!(
                "generateContent: finishReason {} with no image part; model said: {}",
                finish_reasons.first().copied().unwrap_or("(none)"),
                truncate(text.as_deref().unwrap_or("(nothing)"))
            ),
            Some(200),
        ));
    }
    let usage = usage(
        response.usage_metadata.unwrap_or_default(),
        model,
        size,
        images.len(),
    );
    Ok(Answer {
        images,
        declared,
        text,
        usage,
    })
}

/// Splits Gemini's token counts by modality. Any field may be missing: without a per-modality
/// breakdown the prompt is counted as text and the answer as image, which is what an edit mostly
/// is; thinking tokens are billed as text output.
fn usage(metadata: UsageMetadata, model: &str, size: &str, images: usize) -> Usage {
    let (mut input_text_tokens, mut input_image_tokens) = (0, 0);
    match &metadata.prompt_tokens_details {
        Some(details) => {
            for detail in details {
                match detail.modality.as_deref() {
                    Some("IMAGE") => input_image_tokens += detail.token_count.unwrap_or(0),
                    _ => input_text_tokens += detail.token_count.unwrap_or(0),
                }
            }
        }
        None => input_text_tokens = metadata.prompt_token_count.unwrap_or(0),
    }
    let (mut output_text_tokens, mut output_image_tokens) = (0, 0);
    match &metadata.candidates_tokens_details {
        Some(details) => {
            for detail in details {
                match detail.modality.as_deref() {
                    Some("IMAGE") => output_image_tokens += detail.token_count.unwrap_or(0),
                    _ => output_text_tokens += detail.token_count.unwrap_or(0),
                }
            }
        }
        None => output_image_tokens = metadata.candidates_token_count.unwrap_or(0),
    }
    output_text_tokens += metadata.thoughts_token_count.unwrap_or(0);
    // The call path adds the agent.
    Usage {
        agent: String::new(),
        provider: NAME.to_string(),
        model: model.to_string(),
        simulated: false,
        input_text_tokens,
        input_image_tokens,
        cached_input_tokens: metadata.cached_content_token_count.unwrap_or(0),
        output_text_tokens,
        output_image_tokens,
        images: u32::try_from(images).unwrap_or(u32::MAX),
        size: Some(size.to_string()),
        quality: None,
    }
}

/// Decides code and retry for a non-2xx answer from its status and `google.rpc` details.
fn classify_error(status: u16, body: &str) -> ProviderError {
    let error = serde_json::from_str::<ErrorBody>(body)
        .ok()
        .map(|parsed| parsed.error)
        .unwrap_or_default();
    let detail_of = |suffix: &str| {
        error.details.iter().find(|detail| {
            detail
                .get("@type")
                .and_then(Value::as_str)
                .is_some_and(|kind| kind.ends_with(suffix))
        })
    };
    let retry_delay = detail_of("google.rpc.RetryInfo")
        .and_then(|info| info.get("retryDelay"))
        .and_then(Value::as_str)
        .and_then(parse_proto_duration)
        .or_else(|| error.message.as_deref().and_then(retry_hint_in_message));
    // A daily quota does not reset within any retry window. Real ids put "PerDay" before a tier
    // suffix ("GenerateRequestsPerDayPerProjectPerModel-FreeTier"), so match it anywhere.
    let daily_quota = detail_of("google.rpc.QuotaFailure")
        .and_then(|failure| failure.get("violations"))
        .and_then(Value::as_array)
        .is_some_and(|violations| {
            violations.iter().any(|violation| {
                violation
                    .get("quotaId")
                    .and_then(Value::as_str)
                    .is_some_and(|id| id.contains("PerDay"))
            })
        });
    let reason = detail_of("google.rpc.ErrorInfo")
        .and_then(|info| info.get("reason"))
        .and_then(Value::as_str)
        .unwrap_or_default();

    let retryable = Retry::Yes { after: retry_delay };
    let (code, retry) = match status {
        429 if daily_quota => (FailureCode::QuotaExceeded, Retry::No),
        429 => (FailureCode::RateLimited, retryable),
        402 => (FailureCode::QuotaExceeded, Retry::No),
        408 | 499 | 500.. => (FailureCode::ProviderUnavailable, retryable),
        400 if reason == "API_KEY_INVALID" => (FailureCode::ProviderAuthFailed, Retry::No),
        401 | 403 => (FailureCode::ProviderAuthFailed, Retry::No),
        _ => (FailureCode::InvalidRequest, Retry::No),
    };

    let mut detail = format!("generateContent: http {status}");
    if let Some(rpc_status) = &error.status {
        detail.push_str(&format!(", status {rpc_status}"));
    }
    if !reason.is_empty() {
        detail.push_str(&format!(", reason {reason}"));
    }
    let message = error.message.as_deref().unwrap_or(body).trim();
    if !message.is_empty() {
        detail.push_str(&format!(": {}", truncate(message)));
    }
    provider_error(code, retry, detail, Some(status))
}

/// Reads "Please retry in 20.9s." from an error message, for 429s without a `RetryInfo` detail.
fn retry_hint_in_message(message: &str) -> Option<Duration> {
    let (_, rest) = message.split_once("retry in ")?;
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    rest[number.len()..]
        .starts_with('s')
        .then(|| parse_seconds(&number))
        .flatten()
}

fn transport_error(error: &reqwest::Error) -> ProviderError {
    ProviderError::transport(NAME, "generateContent", error)
}

fn api_key_header(api_key: &SecretString) -> Result<HeaderValue, ProviderError> {
    let mut value = HeaderValue::from_str(api_key.expose_secret()).map_err(|_| {
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
    error: RpcError,
}

#[derive(Debug, Default, Deserialize)]
struct RpcError {
    message: Option<String>,
    status: Option<String>,
    #[serde(default)]
    details: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentResponse<'a> {
    #[serde(default, borrow)]
    candidates: Vec<Candidate<'a>>,
    prompt_feedback: Option<PromptFeedback>,
    usage_metadata: Option<UsageMetadata>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    #[serde(borrow)]
    content: Option<Content<'a>>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Content<'a> {
    #[serde(default, borrow)]
    parts: Vec<Part<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part<'a> {
    text: Option<String>,
    #[serde(alias = "inline_data", borrow)]
    inline_data: Option<InlineData<'a>>,
    thought: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InlineData<'a> {
    #[serde(alias = "mime_type")]
    mime_type: Option<String>,
    /// The image in base64, left in the body.
    #[serde(borrow)]
    data: Base64Field<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    prompt_tokens_details: Option<Vec<ModalityTokenCount>>,
    candidates_tokens_details: Option<Vec<ModalityTokenCount>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModalityTokenCount {
    modality: Option<String>,
    token_count: Option<u64>,
}

fn provider_error(
    code: FailureCode,
    retry: Retry,
    detail: String,
    status: Option<u16>,
) -> ProviderError {
    ProviderError::new(NAME, code, retry, detail, status)
}

/// Tokens one image bills at most, in or out (about 1,290 for a megapixel; larger outputs of
/// the pro models bill up to 2,000).
const IMAGE_TOKENS_MAX: u64 = 2_000;

/// The most an edit asking for `n` images can bill, without provider and model.
pub fn worst_case(n: u32, prompt: &str) -> Usage {
    Usage {
        input_image_tokens: IMAGE_TOKENS_MAX,
        output_image_tokens: IMAGE_TOKENS_MAX * u64::from(n),
        images: n,
        ..super::text_worst_case(prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::config::Settings;
    use shared::domain::ImageSize;
    use wiremock::matchers::{body_partial_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const KEY: &str = "AIzaSyTEST-0123456789-SECRET";
    const MODEL: &str = "gemini-2.5-flash-image";
    const ENDPOINT: &str = "/v1beta/models/gemini-2.5-flash-image:generateContent";

    fn client(server: &MockServer) -> Gemini {
        let mut settings = Settings::defaults().unwrap().gemini;
        settings.base_url = server.uri().parse().unwrap();
        settings.image_model = MODEL.to_string();
        Gemini::new(&settings, SecretString::from(KEY), Connections::Images).unwrap()
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbImage::from_pixel(width, height, image::Rgb([10, 120, 220]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        bytes.into_inner()
    }

    fn edit_request() -> EditRequest {
        EditRequest {
            prompt: "Replace the background with a beach".to_string(),
            image: bytes::Bytes::from(png(2, 2)),
            mime_type: ImageMime::Png,
            size: ImageSize::Landscape,
            n: 1,
        }
    }

    async fn answer(
        response: ResponseTemplate,
    ) -> (MockServer, Result<ImageOutput, ProviderError>) {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(ENDPOINT))
            .respond_with(response)
            .mount(&server)
            .await;
        let result = client(&server).edit(&edit_request()).await;
        (server, result)
    }

    fn rpc_error(code: u16, status: &str, message: &str, details: Value) -> Value {
        json!({"error": {"code": code, "message": message, "status": status, "details": details}})
    }

    fn assert_no_key(error: &ProviderError) {
        assert!(!format!("{error}").contains(KEY), "key in Display: {error}");
        assert!(
            !format!("{error:?}").contains(KEY),
            "key in Debug: {error:?}"
        );
    }

    #[tokio::test]
    async fn the_client_built_once_never_prints_its_key() {
        let server = MockServer::start().await;
        let gemini = client(&server);
        assert!(!format!("{gemini:?}").contains(KEY), "{gemini:?}");
    }

    #[tokio::test]
    async fn edit_sends_the_image_inline_and_reads_images_text_and_usage() {
        let server = MockServer::start().await;
        let request = edit_request();
        let output_image = png(3, 2);
        Mock::given(method("POST"))
            .and(path(ENDPOINT))
            .and(header("x-goog-api-key", KEY))
            .and(body_partial_json(json!({
                "contents": [{"role": "user", "parts": [
                    {"text": "Replace the background with a beach"},
                    {"inline_data": {"mime_type": "image/png",
                        "data": BASE64.encode(&request.image)}},
                ]}],
                "generationConfig": {"responseModalities": ["TEXT", "IMAGE"],
                    "imageConfig": {"aspectRatio": "3:2"}},
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "candidates": [{"content": {"role": "model", "parts": [
                    {"text": "Here it is"},
                    {"inlineData": {"mimeType": "image/png", "data": BASE64.encode(&output_image)}},
                ]}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 1300, "candidatesTokenCount": 1290,
                    "totalTokenCount": 2590,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 10},
                        {"modality": "IMAGE", "tokenCount": 1290}],
                    "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290}]},
                "modelVersion": MODEL, "responseId": "abc",
            })))
            .expect(1)
            .mount(&server)
            .await;

        let output = client(&server).edit(&request).await.unwrap();

        assert_eq!(output.images.len(), 1);
        assert_eq!(output.images[0].bytes.as_ref(), output_image.as_slice());
        assert_eq!(output.images[0].mime_type, ImageMime::Png);
        assert_eq!(output.text.as_deref(), Some("Here it is"));
        assert_eq!(
            output.usage,
            Usage {
                agent: String::new(),
                provider: "gemini".to_string(),
                model: MODEL.to_string(),
                simulated: false,
                input_text_tokens: 10,
                input_image_tokens: 1290,
                cached_input_tokens: 0,
                output_text_tokens: 0,
                output_image_tokens: 1290,
                images: 1,
                size: Some("1536x1024".to_string()),
                quality: None,
            }
        );
    }

    #[test]
    fn usage_without_modality_details_falls_back_to_the_totals() {
        let metadata: UsageMetadata = serde_json::from_value(json!({
            "promptTokenCount": 1300, "candidatesTokenCount": 1290, "thoughtsTokenCount": 200,
        }))
        .unwrap();
        let usage = usage(metadata, MODEL, "1024x1024", 1);
        assert_eq!(usage.input_text_tokens, 1300);
        assert_eq!(usage.input_image_tokens, 0);
        assert_eq!(usage.output_image_tokens, 1290);
        assert_eq!(usage.output_text_tokens, 200);

        let empty = usage_of(json!({}));
        assert_eq!((empty.input_text_tokens, empty.output_image_tokens), (0, 0));
    }

    fn usage_of(metadata: Value) -> Usage {
        usage(
            serde_json::from_value(metadata).unwrap(),
            MODEL,
            "1024x1024",
            1,
        )
    }

    #[test]
    fn thought_parts_are_not_part_of_the_result() {
        let draft = BASE64.encode(png(1, 1));
        let last = BASE64.encode(png(2, 1));
        let body = json!({
            "candidates": [{"content": {"parts": [
                {"text": "planning the composition", "thought": true},
                {"inlineData": {"mimeType": "image/png", "data": draft}, "thought": true},
                {"inlineData": {"mimeType": "image/png", "data": last}},
            ]}, "finishReason": "STOP"}],
        })
        .to_string();
        let held = HeldBody::unbudgeted(body.into_bytes());
        let response: GenerateContentResponse<'_> = serde_json::from_slice(held.bytes()).unwrap();
        let answer = read_response(response, &held, MODEL, "1024x1024").unwrap();
        let output = answer.decode(held).unwrap();
        assert_eq!(output.images.len(), 1);
        assert_eq!(output.images[0].bytes.as_ref(), png(2, 1).as_slice());
        assert_eq!(output.text, None);
    }

    #[tokio::test]
    async fn rate_limited_429_is_retryable_with_the_retry_info_delay() {
        let (_server, result) = answer(ResponseTemplate::new(429).set_body_json(rpc_error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota. Please retry in 20.9s.",
            json!([
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "quotaDimensions": {"model": MODEL, "location": "global"},
                    "quotaValue": "10"}]},
                {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                    "description": "Learn more", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "22s"},
            ]),
        )))
        .await;

        let error = result.unwrap_err();
        assert_eq!(error.code, FailureCode::RateLimited);
        assert_eq!(
            error.retry,
            Retry::Yes {
                after: Some(Duration::from_secs(22))
            }
        );
        assert_eq!(error.status, Some(429));
        assert!(
            error.detail.contains("RESOURCE_EXHAUSTED"),
            "{}",
            error.detail
        );
    }

    #[test]
    fn a_429_without_retry_info_uses_the_delay_in_its_message() {
        let body = rpc_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Please retry in 20.9s.",
            json!([]),
        );
        let error = classify_error(429, &body.to_string());
        assert_eq!(
            error.retry,
            Retry::Yes {
                after: Some(Duration::from_millis(20_900))
            }
        );
    }

    #[tokio::test]
    async fn an_answer_past_the_cap_is_a_bad_response_naming_its_size_and_setting() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(ENDPOINT))
            .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![b' '; (1 << 20) + 1]))
            .mount(&server)
            .await;
        let mut settings = Settings::defaults().unwrap().gemini;
        settings.base_url = server.uri().parse().unwrap();
        settings.image_model = MODEL.to_string();
        settings.max_response_mib = std::num::NonZeroU32::new(1).unwrap();
        let gemini = Gemini::new(&settings, SecretString::from(KEY), Connections::Images).unwrap();

        let error = gemini.edit(&edit_request()).await.unwrap_err();

        assert_eq!(error.code, FailureCode::BadResponse);
        assert_eq!(error.retry, Retry::No);
        assert_eq!(error.status, Some(200));
        assert!(error.possibly_billed, "a 200 may have been billed");
        assert!(error.detail.contains("1048577 bytes"), "{}", error.detail);
        assert!(
            error.detail.contains("PICTOR_GEMINI_MAX_RESPONSE_MIB"),
            "{}",
            error.detail
        );
    }

    #[test]
    fn a_hostile_retry_delay_is_clamped_to_the_policy_maximum_and_never_panics() {
        let clamped = Retry::Yes {
            after: Some(shared::retry::MAX_SERVER_DELAY),
        };
        for delay in ["1e20s", "1e300s", "86400s"] {
            let body = rpc_error(
                429,
                "RESOURCE_EXHAUSTED",
                "Slow down.",
                json!([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]),
            );
            let error = classify_error(429, &body.to_string());
            assert_eq!(error.code, FailureCode::RateLimited);
            assert_eq!(error.retry, clamped, "{delay}");
        }
        for ignored in ["-5s", "NaNs", "infs"] {
            let body = rpc_error(
                503,
                "UNAVAILABLE",
                "Overloaded.",
                json!([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": ignored}]),
            );
            let error = classify_error(503, &body.to_string());
            assert_eq!(error.retry, Retry::Yes { after: None }, "{ignored}");
        }
        let body = rpc_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Please retry in 99999999999999999999999.5s.",
            json!([]),
        );
        assert_eq!(classify_error(429, &body.to_string()).retry, clamped);
    }

    #[tokio::test]
    async fn a_per_day_quota_429_is_permanent_quota_exceeded() {
        let (_server, result) = answer(ResponseTemplate::new(429).set_body_json(rpc_error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota.",
            json!([
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                    "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "40s"},
            ]),
        )))
        .await;

        let error = result.unwrap_err();
        assert_eq!(error.code, FailureCode::QuotaExceeded);
        assert_eq!(error.retry, Retry::No);
    }

    #[tokio::test]
    async fn an_overloaded_503_is_retryable() {
        let (_server, result) = answer(ResponseTemplate::new(503).set_body_json(rpc_error(
            503,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
            json!([]),
        )))
        .await;

        let error = result.unwrap_err();
        assert_eq!(error.code, FailureCode::ProviderUnavailable);
        assert_eq!(error.retry, Retry::Yes { after: None });
        assert!(error.user_message.contains("temporarily unavailable"));
    }

    #[tokio::test]
    async fn an_invalid_key_400_is_an_auth_failure_that_never_shows_the_key() {
        let (_server, result) = answer(ResponseTemplate::new(400).set_body_json(rpc_error(
            400,
            "INVALID_ARGUMENT",
            &format!("API key not valid: {KEY}. Please pass a valid API key."),
            json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]),
        )))
        .await;

        let error = result.unwrap_err();
        assert_eq!(error.code, FailureCode::ProviderAuthFailed);
        assert_eq!(error.retry, Retry::No);
        assert!(error.detail.contains("API_KEY_INVALID"), "{}", error.detail);
        assert_no_key(&error);
    }

    #[test]
    fn statuses_map_to_codes_and_retry_decisions() {
        let cases: [(u16, FailureCode, bool); 9] = [
            (402, FailureCode::QuotaExceeded, false),
            (408, FailureCode::ProviderUnavailable, true),
            (499, FailureCode::ProviderUnavailable, true),
            (500, FailureCode::ProviderUnavailable, true),
            (504, FailureCode::ProviderUnavailable, true),
            (401, FailureCode::ProviderAuthFailed, false),
            (403, FailureCode::ProviderAuthFailed, false),
            (400, FailureCode::InvalidRequest, false),
            (404, FailureCode::InvalidRequest, false),
        ];
        for (status, code, retryable) in cases {
            let error = classify_error(status, "not json");
            assert_eq!(error.code, code, "status {status}");
            assert_eq!(
                matches!(error.retry, Retry::Yes { .. }),
                retryable,
                "status {status}"
            );
            assert_no_key(&error);
        }
    }

    #[tokio::test]
    async fn a_blocked_prompt_is_content_blocked() {
        let (_server, result) = answer(ResponseTemplate::new(200).set_body_json(json!({
            "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
            "usageMetadata": {"promptTokenCount": 1300, "totalTokenCount": 1300},
        })))
        .await;

        let error = result.unwrap_err();
        assert_eq!(error.code, FailureCode::ContentBlocked);
        assert_eq!(error.retry, Retry::No);
        assert!(
            error.detail.contains("PROHIBITED_CONTENT"),
            "{}",
            error.detail
        );
        assert!(error.user_message.contains("safety system"));
    }

    #[tokio::test]
    async fn an_image_safety_stop_is_content_blocked() {
        let (_server, result) = answer(ResponseTemplate::new(200).set_body_json(json!({
            "candidates": [{"finishReason": "IMAGE_SAFETY", "index": 0}],
        })))
        .await;

        let error = result.unwrap_err();
        assert_eq!(error.code, FailureCode::ContentBlocked);
        assert!(error.detail.contains("IMAGE_SAFETY"), "{}", error.detail);
    }

    #[tokio::test]
    async fn a_stop_with_only_text_is_no_image_returned() {
        let (_server, result) = answer(ResponseTemplate::new(200).set_body_json(json!({
            "candidates": [{"content": {"role": "model", "parts": [
                {"text": "I can describe a beach, but I cannot change this photo."}]},
                "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 1300, "candidatesTokenCount": 14},
        })))
        .await;

        let error = result.unwrap_err();
        assert_eq!(error.code, FailureCode::NoImageReturned);
        assert_eq!(error.retry, Retry::No);
        assert!(
            error.detail.contains("cannot change this photo"),
            "{}",
            error.detail
        );
        assert!(!error.user_message.contains("cannot change this photo"));
        assert!(error.user_message.contains("without producing an image"));
    }

    #[tokio::test]
    async fn a_refused_connection_is_retryable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let mut settings = Settings::defaults().unwrap().gemini;
        settings.base_url = format!("http://{address}").parse().unwrap();
        let gemini = Gemini::new(&settings, SecretString::from(KEY), Connections::Images).unwrap();

        let error = gemini.edit(&edit_request()).await.unwrap_err();

        assert_eq!(error.code, FailureCode::ProviderUnavailable);
        assert_eq!(error.retry, Retry::Yes { after: None });
        assert_no_key(&error);
    }
}
