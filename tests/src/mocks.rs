//! Local stand-ins for OpenAI and Gemini, built on wiremock, that answer in the providers' real wire
//! formats (see `docs/providers.md`, section 7), plus small real images to feed them.
//!
//! The end-to-end tests point the worker at these servers instead of the real APIs, so every reply
//! here mirrors what the provider sends: the same JSON shapes and field names, the same error
//! bodies, and (for OpenAI) the `x-request-id`, `openai-processing-ms` and `x-ratelimit-*` headers
//! on every reply. Images are real PNG, JPEG or WebP files so the worker's decoding and storing
//! paths run for real; they are 64x64 to keep the tests fast, whatever `size` a request names.
//!
//! Matching rules, which the tests rely on:
//! - Answers ("ok" mocks) are mounted at wiremock's default priority; failures are mounted at
//!   priority 1, so a failure limited to `times` replies wins first and then falls through to the
//!   answer mounted for the same path, whatever order the two were mounted in. Among mocks of equal
//!   priority the first mounted wins; call `server.reset().await` to change an answer.
//! - The OpenAI mock only matches requests with an `authorization` header and the Gemini mock only
//!   requests with an `x-goog-api-key` header; anything else gets wiremock's default 404.
//! - Token counts in the replies are fixed, or derived from the request as documented on each
//!   helper, so tests can assert exact costs (see the constants below).

use std::io::Cursor;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};
use serde_json::{Value, json};
use wiremock::matchers::{header_exists, method, path, path_regex};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

/// Width and height of every image the mocks return.
pub const MOCK_IMAGE_SIDE: u32 = 64;

/// Priority of failure mocks: wins over answers, which have wiremock's default priority of 5.
const FAILURE_PRIORITY: u8 = 1;

/// `usage.prompt_tokens` of every router (chat completion) answer.
pub const ROUTER_PROMPT_TOKENS: u64 = 120;
/// `usage.completion_tokens` of every router (chat completion) answer.
pub const ROUTER_COMPLETION_TOKENS: u64 = 24;

/// `usage.input_tokens_details.text_tokens` of every OpenAI image answer.
pub const OPENAI_IMAGE_TEXT_INPUT_TOKENS: u64 = 10;
/// `usage.input_tokens_details.image_tokens` per input image of an OpenAI edit (0 for generations).
pub const OPENAI_EDIT_IMAGE_INPUT_TOKENS_PER_IMAGE: u64 = 388;

/// Gemini `promptTokensDetails` TEXT count of every answer.
pub const GEMINI_PROMPT_TEXT_TOKENS: u64 = 10;
/// Gemini `promptTokensDetails` IMAGE count per input image.
pub const GEMINI_PROMPT_IMAGE_TOKENS_PER_IMAGE: u64 = 1290;
/// Gemini `candidatesTokensDetails` TEXT count of an answer (every answer has one text part).
pub const GEMINI_OUTPUT_TEXT_TOKENS: u64 = 8;
/// Gemini `candidatesTokensDetails` IMAGE count of an answer with an image.
pub const GEMINI_OUTPUT_IMAGE_TOKENS: u64 = 1290;

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// A diagonal gradient whose colours depend on `seed`, so different seeds give different bytes.
fn gradient(width: u32, height: u32, seed: u8) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let red = u8::try_from(x * 255 / width.max(1)).unwrap_or(u8::MAX);
        let green = u8::try_from(y * 255 / height.max(1)).unwrap_or(u8::MAX);
        image::Rgb([red ^ seed, green, seed])
    })
}

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, format)
        .expect("encoding an in-memory image cannot fail");
    bytes.into_inner()
}

/// A real PNG (8-bit RGBA, opaque gradient) of the given size.
pub fn png(width: u32, height: u32, seed: u8) -> Vec<u8> {
    let rgba: RgbaImage = DynamicImage::ImageRgb8(gradient(width, height, seed)).to_rgba8();
    encode(DynamicImage::ImageRgba8(rgba), ImageFormat::Png)
}

/// A real baseline JPEG (8-bit RGB gradient) of the given size.
pub fn jpeg(width: u32, height: u32, seed: u8) -> Vec<u8> {
    encode(
        DynamicImage::ImageRgb8(gradient(width, height, seed)),
        ImageFormat::Jpeg,
    )
}

/// A real WebP of the given size; the image crate only encodes lossless WebP, which is what this is.
pub fn webp(width: u32, height: u32, seed: u8) -> Vec<u8> {
    encode(
        DynamicImage::ImageRgb8(gradient(width, height, seed)),
        ImageFormat::WebP,
    )
}

// ---------------------------------------------------------------------------------------------
// Request helpers shared by both mocks
// ---------------------------------------------------------------------------------------------

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The JSON bodies of the requests `server` received whose path satisfies `wanted`, in order.
async fn received_json(server: &MockServer, wanted: impl Fn(&str) -> bool) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|request| wanted(request.url.path()))
        .filter_map(|request| serde_json::from_slice(&request.body).ok())
        .collect()
}

/// The value of a text field of a multipart/form-data body, found by a plain byte search: enough
/// for the form fields our clients send, and the mocks never need the file parts.
fn multipart_field(body: &[u8], name: &str) -> Option<String> {
    let body = String::from_utf8_lossy(body);
    let header = format!("; name=\"{name}\"");
    let after_header = &body[body.find(&header)? + header.len()..];
    let value_start = after_header.find("\r\n\r\n")? + 4;
    let value = &after_header[value_start..];
    Some(value[..value.find("\r\n").unwrap_or(value.len())].to_owned())
}

fn is_multipart(request: &Request) -> bool {
    request
        .headers
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("multipart/form-data"))
}

/// A field of an OpenAI request as a string, from a JSON or a multipart body.
fn openai_field(request: &Request, name: &str) -> Option<String> {
    if is_multipart(request) {
        return multipart_field(&request.body, name);
    }
    let body: Value = serde_json::from_slice(&request.body).ok()?;
    match body.get(name)? {
        Value::String(text) => Some(text.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// How many input images an OpenAI edit request carries (`images` in JSON; `image`/`image[]` parts).
fn openai_edit_input_images(request: &Request) -> u64 {
    if is_multipart(request) {
        let body = String::from_utf8_lossy(&request.body);
        let count =
            body.matches("; name=\"image[]\"").count() + body.matches("; name=\"image\"").count();
        return u64::try_from(count).unwrap_or(u64::MAX);
    }
    serde_json::from_slice::<Value>(&request.body)
        .ok()
        .and_then(|body| body.get("images").and_then(Value::as_array).map(Vec::len))
        .and_then(|count| u64::try_from(count).ok())
        .unwrap_or(1)
}

// ---------------------------------------------------------------------------------------------
// OpenAI
// ---------------------------------------------------------------------------------------------

/// Output tokens OpenAI bills per image for a quality and size (gpt-image-1, 1.5 and mini share
/// them); `auto` or an unknown value counts as `medium` and `1024x1024`. A custom `WxH` size
/// (gpt-image-2 accepts multiples of 16, as upscales use) bills the square count scaled by pixel
/// area, rounded up.
pub fn openai_output_tokens_per_image(quality: &str, size: &str) -> u64 {
    let column = match size {
        "1024x1536" => 1,
        "1536x1024" => 2,
        _ => 0,
    };
    let row: [u64; 3] = match quality {
        "low" => [272, 408, 400],
        "high" => [4160, 6240, 6208],
        _ => [1056, 1584, 1568],
    };
    if let Some((width, height)) = custom_size(size) {
        return (row[0] * width * height).div_ceil(1024 * 1024);
    }
    row[column]
}

/// A `WxH` size other than the three fixed ones, with sides that are positive multiples of 16.
fn custom_size(size: &str) -> Option<(u64, u64)> {
    if matches!(size, "1024x1024" | "1024x1536" | "1536x1024") {
        return None;
    }
    let (width, height) = size.split_once('x')?;
    let side = |text: &str| {
        text.parse::<u64>()
            .ok()
            .filter(|side| *side > 0 && side % 16 == 0)
    };
    Some((side(width)?, side(height)?))
}

/// The headers OpenAI puts on every reply, with a fresh request id; `overrides` replace defaults.
fn openai_reply(status: u16, body: &Value, overrides: &[(String, String)]) -> ResponseTemplate {
    let mut template = ResponseTemplate::new(status)
        .insert_header("x-request-id", format!("req_{}", random_hex()))
        .insert_header("openai-processing-ms", "412")
        .insert_header("openai-version", "2020-10-01")
        .insert_header("openai-organization", "org-mock")
        .insert_header("x-ratelimit-limit-requests", "500")
        .insert_header("x-ratelimit-limit-tokens", "200000")
        .insert_header("x-ratelimit-remaining-requests", "499")
        .insert_header("x-ratelimit-remaining-tokens", "199000")
        .insert_header("x-ratelimit-reset-requests", "120ms")
        .insert_header("x-ratelimit-reset-tokens", "300ms")
        .set_body_json(body);
    for (name, value) in overrides {
        template = template.insert_header(name.as_str(), value.as_str());
    }
    template
}

/// The `ImagesResponse` for a generation or edit request: `n` images (default 1) in the requested
/// `output_format` (default png), with usage from [`openai_output_tokens_per_image`].
fn openai_images_reply(request: &Request, input_images: u64) -> ResponseTemplate {
    let count: u64 = openai_field(request, "n")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(1);
    let quality = match openai_field(request, "quality").as_deref() {
        Some(quality @ ("low" | "medium" | "high")) => quality.to_owned(),
        _ => "medium".to_owned(),
    };
    let size = match openai_field(request, "size").as_deref() {
        Some(size @ ("1024x1024" | "1024x1536" | "1536x1024")) => size.to_owned(),
        Some(size) if custom_size(size).is_some() => size.to_owned(),
        _ => "1024x1024".to_owned(),
    };
    let background = match openai_field(request, "background").as_deref() {
        Some("transparent") => "transparent",
        _ => "opaque",
    };
    let output_format = match openai_field(request, "output_format").as_deref() {
        Some("jpeg") => "jpeg",
        Some("webp") => "webp",
        _ => "png",
    };
    let data: Vec<Value> = (0..count)
        .map(|index| {
            let seed = u8::try_from(index % 256).unwrap_or_default();
            let bytes = match output_format {
                "jpeg" => jpeg(MOCK_IMAGE_SIDE, MOCK_IMAGE_SIDE, seed),
                "webp" => webp(MOCK_IMAGE_SIDE, MOCK_IMAGE_SIDE, seed),
                _ => png(MOCK_IMAGE_SIDE, MOCK_IMAGE_SIDE, seed),
            };
            json!({ "b64_json": BASE64.encode(bytes) })
        })
        .collect();
    let image_input_tokens = input_images * OPENAI_EDIT_IMAGE_INPUT_TOKENS_PER_IMAGE;
    let input_tokens = OPENAI_IMAGE_TEXT_INPUT_TOKENS + image_input_tokens;
    let output_tokens = count * openai_output_tokens_per_image(&quality, &size);
    let body = json!({
        "created": unix_now(),
        "data": data,
        "background": background,
        "output_format": output_format,
        "size": size,
        "quality": quality,
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {
                "text_tokens": OPENAI_IMAGE_TEXT_INPUT_TOKENS,
                "image_tokens": image_input_tokens,
            },
            "output_tokens": output_tokens,
            "output_tokens_details": { "image_tokens": output_tokens, "text_tokens": 0 },
            "total_tokens": input_tokens + output_tokens,
        },
    });
    openai_reply(200, &body, &[])
}

/// A `chat.completion` with one choice holding `message` (role assistant), echoing the model.
fn chat_completion_reply(request: &Request, message: &Value) -> ResponseTemplate {
    let model = openai_field(request, "model").unwrap_or_else(|| "gpt-4.1-mini".to_owned());
    let mut message = message.clone();
    message["role"] = json!("assistant");
    let body = json!({
        "id": format!("chatcmpl-{}", random_hex()),
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": "stop" }],
        "usage": {
            "prompt_tokens": ROUTER_PROMPT_TOKENS,
            "completion_tokens": ROUTER_COMPLETION_TOKENS,
            "total_tokens": ROUTER_PROMPT_TOKENS + ROUTER_COMPLETION_TOKENS,
            "prompt_tokens_details": { "cached_tokens": 0, "audio_tokens": 0 },
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": null,
    });
    openai_reply(200, &body, &[])
}

/// OpenAI's error body.
fn openai_error_body(message: &str, error_type: &str, code: Option<&str>) -> Value {
    json!({ "error": { "message": message, "type": error_type, "param": null, "code": code } })
}

/// One page of the Costs API for `request`'s query over the bill `lines`.
fn costs_page(request: &Request, lines: &[(chrono::NaiveDate, String, f64)]) -> ResponseTemplate {
    let query: Vec<(String, String)> = request
        .url
        .query_pairs()
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    let get = |name: &str| {
        query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let Some(start) = get("start_time").and_then(|raw| raw.parse::<i64>().ok()) else {
        let body = openai_error_body(
            "Missing required parameter: 'start_time'.",
            "invalid_request_error",
            Some("missing_required_parameter"),
        );
        return openai_reply(400, &body, &[]);
    };
    let end = get("end_time")
        .and_then(|raw| raw.parse::<i64>().ok())
        .unwrap_or_else(|| i64::try_from(unix_now()).unwrap_or(i64::MAX));
    let limit = get("limit")
        .and_then(|raw| raw.parse::<usize>().ok())
        .unwrap_or(7)
        .clamp(1, 180);
    let offset = get("page")
        .and_then(|page| {
            page.strip_prefix("page_")
                .and_then(|n| n.parse::<usize>().ok())
        })
        .unwrap_or(0);
    let by_line_item = query.iter().any(|(key, value)| {
        (key == "group_by[]" || key == "group_by") && value.split(',').any(|v| v == "line_item")
    });
    // Buckets start at the UTC midnight on or before start_time.
    let first = start - start.rem_euclid(86_400);
    let days: Vec<i64> = (0..)
        .map(|index| first + index * 86_400)
        .take_while(|day| *day < end)
        .collect();
    let result = |line_item: Option<&str>, dollars: f64| {
        json!({
            "object": "organization.costs.result",
            "amount": {"value": dollars, "currency": "usd"},
            "line_item": line_item,
            "project_id": null,
            "api_key_id": null,
            "quantity": null,
            "quantity_unit": null,
            "organization_id": "org-pictor-test",
        })
    };
    let data: Vec<Value> = days
        .iter()
        .skip(offset)
        .take(limit)
        .map(|day| {
            let date = chrono::DateTime::from_timestamp(*day, 0)
                .map(|at| at.date_naive())
                .unwrap_or_default();
            let today: Vec<&(chrono::NaiveDate, String, f64)> =
                lines.iter().filter(|(on, _, _)| *on == date).collect();
            let results: Vec<Value> = if by_line_item {
                today
                    .iter()
                    .map(|(_, item, dollars)| result(Some(item), *dollars))
                    .collect()
            } else if today.is_empty() {
                Vec::new()
            } else {
                vec![result(None, today.iter().map(|(_, _, dollars)| dollars).sum())]
            };
            json!({"object": "bucket", "start_time": day, "end_time": day + 86_400, "results": results})
        })
        .collect();
    let has_more = offset + limit < days.len();
    let body = json!({
        "object": "page",
        "data": data,
        "has_more": has_more,
        "next_page": has_more.then(|| format!("page_{}", offset + limit)),
    });
    ResponseTemplate::new(200).set_body_json(body)
}

/// `/v1` + a path suffix given with or without its leading slash.
fn openai_path(path_suffix: &str) -> String {
    format!("/v1/{}", path_suffix.trim_start_matches('/'))
}

/// A stand-in for `https://api.openai.com/v1`: chat completions (the router) and the Images API.
pub struct OpenAiMock {
    pub server: MockServer,
}

impl OpenAiMock {
    /// Starts a mock server on a random local port with nothing mounted.
    pub async fn start() -> Self {
        Self {
            server: MockServer::start().await,
        }
    }

    /// The base URL to configure as the OpenAI API base, e.g. `http://127.0.0.1:41234/v1`.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.server.uri())
    }

    fn post(&self, path_suffix: &str) -> wiremock::MockBuilder {
        Mock::given(method("POST"))
            .and(path(openai_path(path_suffix)))
            .and(header_exists("authorization"))
    }

    /// The router's classification: `POST /v1/chat/completions` answers a structured-output
    /// completion whose `content` is the JSON string `{"intent","confidence","prompt","question"}`.
    pub async fn router_answers(
        &self,
        intent: &str,
        confidence: f64,
        cleaned_prompt: &str,
        question: Option<&str>,
    ) {
        self.router_answers_after(Duration::ZERO, intent, confidence, cleaned_prompt, question)
            .await;
    }

    /// Like [`OpenAiMock::router_answers`], each answer taking `delay`.
    pub async fn router_answers_after(
        &self,
        delay: Duration,
        intent: &str,
        confidence: f64,
        cleaned_prompt: &str,
        question: Option<&str>,
    ) {
        let content = json!({
            "intent": intent,
            "confidence": confidence,
            "prompt": cleaned_prompt,
            "question": question,
        })
        .to_string();
        let message = json!({ "content": content, "refusal": null, "annotations": [] });
        self.post("chat/completions")
            .respond_with(move |request: &Request| {
                chat_completion_reply(request, &message).set_delay(delay)
            })
            .named("openai router answers")
            .mount(&self.server)
            .await;
    }

    /// The router's model refuses: `content` null and `message.refusal` a string, finish `stop`.
    pub async fn router_refuses(&self) {
        let message = json!({
            "content": null,
            "refusal": "I'm sorry, but I can't help with that request.",
            "annotations": [],
        });
        self.post("chat/completions")
            .respond_with(move |request: &Request| chat_completion_reply(request, &message))
            .named("openai router refuses")
            .mount(&self.server)
            .await;
    }

    /// `POST /v1/images/generations` answers `n` images (see [`openai_output_tokens_per_image`]
    /// for usage; input image tokens are 0).
    pub async fn images_generate_ok(&self) {
        self.post("images/generations")
            .respond_with(|request: &Request| openai_images_reply(request, 0))
            .named("openai images generate ok")
            .mount(&self.server)
            .await;
    }

    /// Like [`OpenAiMock::images_generate_ok`], but every answer takes `delay` (so calls overlap
    /// as real ones do), and the moment each request arrived is kept in the returned
    /// [`Arrivals`], for tests that check a rate as the provider sees it.
    pub async fn images_generate_ok_after(&self, delay: Duration) -> Arrivals {
        let arrivals = Arrivals::default();
        let log = arrivals.clone();
        self.post("images/generations")
            .respond_with(move |request: &Request| {
                log.record();
                openai_images_reply(request, 0).set_delay(delay)
            })
            .named("openai images generate ok, slowly")
            .mount(&self.server)
            .await;
        arrivals
    }

    /// `POST /v1/images/edits` (JSON or multipart) answers `n` images; input image tokens are
    /// [`OPENAI_EDIT_IMAGE_INPUT_TOKENS_PER_IMAGE`] per input image.
    pub async fn images_edit_ok(&self) {
        self.post("images/edits")
            .respond_with(|request: &Request| {
                openai_images_reply(request, openai_edit_input_images(request))
            })
            .named("openai images edit ok")
            .mount(&self.server)
            .await;
    }

    /// `POST /v1/<path_suffix>` fails with `status` and the OpenAI error body
    /// `{"error":{"message","type","param":null,"code"}}`; `headers` are added to (or replace) the
    /// usual ones. With `times`, only that many requests fail and later ones fall through to the
    /// answer mounted for the path.
    #[expect(
        clippy::too_many_arguments,
        reason = "mirrors the fields of an OpenAI error reply"
    )]
    pub async fn error(
        &self,
        path_suffix: &str,
        status: u16,
        error_type: &str,
        code: Option<&str>,
        message: &str,
        headers: &[(&str, &str)],
        times: Option<u64>,
    ) {
        let body = json!({
            "error": { "message": message, "type": error_type, "param": null, "code": code },
        });
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        let mut mock = self
            .post(path_suffix)
            .respond_with(move |_: &Request| openai_reply(status, &body, &headers))
            .with_priority(FAILURE_PRIORITY)
            .named(format!("openai {status} {error_type} on {path_suffix}"));
        if let Some(times) = times {
            mock = mock.up_to_n_times(times);
        }
        mock.mount(&self.server).await;
    }

    /// A 429 `rate_limit_exceeded` (type `requests`) with `retry-after-ms` and an exhausted
    /// request budget in the `x-ratelimit-*` headers.
    pub async fn rate_limited(&self, path_suffix: &str, retry_after_ms: u64, times: Option<u64>) {
        let retry_after_ms = retry_after_ms.to_string();
        let reset = format!("{retry_after_ms}ms");
        let message = format!(
            "Rate limit reached for gpt-image-1 in organization org-mock on requests per min \
             (RPM): Limit 500, Used 500, Requested 1. Please try again in {retry_after_ms}ms."
        );
        self.error(
            path_suffix,
            429,
            "requests",
            Some("rate_limit_exceeded"),
            &message,
            &[
                ("retry-after-ms", &retry_after_ms),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", &reset),
            ],
            times,
        )
        .await;
    }

    /// A 429 `rate_limit_exceeded` whose delay headers are `hints` as a hostile (or broken)
    /// server might send them, e.g. `retry-after-ms: 1e300`; with `times`, only that many.
    pub async fn rate_limited_hinting(
        &self,
        path_suffix: &str,
        hints: &[(&str, &str)],
        times: Option<u64>,
    ) {
        self.error(
            path_suffix,
            429,
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached for gpt-image-1 in organization org-mock on requests per min \
             (RPM): Limit 500, Used 500, Requested 1.",
            hints,
            times,
        )
        .await;
    }

    /// A 429 `insufficient_quota`: a billing problem, which must not be retried.
    pub async fn insufficient_quota(&self, path_suffix: &str, times: Option<u64>) {
        self.error(
            path_suffix,
            429,
            "insufficient_quota",
            Some("insufficient_quota"),
            "You exceeded your current quota, please check your plan and billing details. For \
             more information on this error, read the docs: \
             https://platform.openai.com/docs/guides/error-codes/api-errors.",
            &[],
            times,
        )
        .await;
    }

    /// A 500 `server_error` with a null code.
    pub async fn server_error(&self, path_suffix: &str, times: Option<u64>) {
        self.error(
            path_suffix,
            500,
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
            &[],
            times,
        )
        .await;
    }

    /// `GET /v1/organization/costs` (the organization Costs API, admin key) answers the bill
    /// `lines` (UTC day, line item, dollars) as the real API does (`docs/providers.md`, section
    /// 8): one `bucket` per day from `start_time` (exclusive `end_time`), `limit` buckets a page
    /// with an opaque `next_page`, results grouped by line item when `group_by[]=line_item`
    /// (or `group_by=line_item`) is asked, amounts as floats of dollars.
    pub async fn organization_costs(&self, lines: Vec<(chrono::NaiveDate, String, f64)>) {
        Mock::given(method("GET"))
            .and(path("/v1/organization/costs"))
            .and(header_exists("authorization"))
            .respond_with(move |request: &Request| costs_page(request, &lines))
            .named("openai organization costs")
            .mount(&self.server)
            .await;
    }

    /// The Costs API refuses the key as it refuses a project key: 403, missing scope.
    pub async fn organization_costs_refuses(&self) {
        let body = openai_error_body(
            "You have insufficient permissions for this operation. Missing scopes: api.usage.read. Check that you have the correct role in your organization (Reader, Writer, Owner) and project (Member, Owner), and if you're using a restricted API key, that it has the necessary scopes.",
            "invalid_request_error",
            None,
        );
        Mock::given(method("GET"))
            .and(path("/v1/organization/costs"))
            .respond_with(openai_reply(403, &body, &[]))
            .named("openai organization costs refuses")
            .mount(&self.server)
            .await;
    }

    /// The JSON bodies received on `/v1/<path_suffix>`, oldest first; non-JSON bodies (multipart
    /// edits) are left out.
    pub async fn received(&self, path_suffix: &str) -> Vec<Value> {
        let wanted = openai_path(path_suffix);
        received_json(&self.server, |request_path| request_path == wanted).await
    }
}

/// When the requests answered by one mock arrived, oldest first. wiremock keeps the requests
/// but not their times; the responder records the time as it is called, which is on arrival
/// (any answer delay comes after).
#[derive(Clone, Default)]
pub struct Arrivals(Arc<Mutex<Vec<Instant>>>);

impl Arrivals {
    fn record(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Instant::now());
    }

    /// The arrival times so far, oldest first.
    pub fn times(&self) -> Vec<Instant> {
        let mut times = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        times.sort();
        times
    }
}

// ---------------------------------------------------------------------------------------------
// Gemini
// ---------------------------------------------------------------------------------------------

const GEMINI_GENERATE_CONTENT: &str = r"^/v1beta/models/[^/]+:generateContent$";

/// The model named in a `/v1beta/models/<model>:generateContent` path.
fn gemini_model(request: &Request) -> String {
    let path = request.url.path();
    path.trim_start_matches("/v1beta/models/")
        .trim_end_matches(":generateContent")
        .to_owned()
}

/// How many inline images a generateContent request carries (snake_case or camelCase parts).
fn gemini_input_images(request: &Request) -> u64 {
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return 0;
    };
    let parts = body["contents"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|content| content["parts"].as_array().into_iter().flatten());
    let count = parts
        .filter(|part| part.get("inline_data").is_some() || part.get("inlineData").is_some())
        .count();
    u64::try_from(count).unwrap_or(u64::MAX)
}

/// A 200 generateContent reply; `parts` of `None` means a blocked prompt (no candidates).
fn gemini_reply(request: &Request, parts: Option<Vec<Value>>) -> ResponseTemplate {
    let prompt_image_tokens = gemini_input_images(request) * GEMINI_PROMPT_IMAGE_TOKENS_PER_IMAGE;
    let prompt_tokens = GEMINI_PROMPT_TEXT_TOKENS + prompt_image_tokens;
    let mut prompt_details =
        vec![json!({ "modality": "TEXT", "tokenCount": GEMINI_PROMPT_TEXT_TOKENS })];
    if prompt_image_tokens > 0 {
        prompt_details.push(json!({ "modality": "IMAGE", "tokenCount": prompt_image_tokens }));
    }
    let mut body = json!({
        "modelVersion": gemini_model(request),
        "responseId": random_hex(),
    });
    match parts {
        None => {
            body["promptFeedback"] = json!({ "blockReason": "SAFETY" });
            body["usageMetadata"] = json!({
                "promptTokenCount": prompt_tokens,
                "totalTokenCount": prompt_tokens,
                "promptTokensDetails": prompt_details,
            });
        }
        Some(parts) => {
            let has_image = parts.iter().any(|part| part.get("inlineData").is_some());
            let mut candidate_details =
                vec![json!({ "modality": "TEXT", "tokenCount": GEMINI_OUTPUT_TEXT_TOKENS })];
            let mut candidate_tokens = GEMINI_OUTPUT_TEXT_TOKENS;
            if has_image {
                candidate_details
                    .push(json!({ "modality": "IMAGE", "tokenCount": GEMINI_OUTPUT_IMAGE_TOKENS }));
                candidate_tokens += GEMINI_OUTPUT_IMAGE_TOKENS;
            }
            body["candidates"] = json!([{
                "content": { "role": "model", "parts": parts },
                "finishReason": "STOP",
                "index": 0,
            }]);
            body["usageMetadata"] = json!({
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": candidate_tokens,
                "totalTokenCount": prompt_tokens + candidate_tokens,
                "promptTokensDetails": prompt_details,
                "candidatesTokensDetails": candidate_details,
            });
        }
    }
    ResponseTemplate::new(200).set_body_json(body)
}

/// A stand-in for `https://generativelanguage.googleapis.com/`: `models/*:generateContent`.
pub struct GeminiMock {
    pub server: MockServer,
}

impl GeminiMock {
    /// Starts a mock server on a random local port with nothing mounted.
    pub async fn start() -> Self {
        Self {
            server: MockServer::start().await,
        }
    }

    /// The base URL to configure as the Gemini API base (the client adds `/v1beta/...`).
    pub fn base_url(&self) -> String {
        self.server.uri()
    }

    fn post(&self) -> wiremock::MockBuilder {
        Mock::given(method("POST"))
            .and(path_regex(GEMINI_GENERATE_CONTENT))
            .and(header_exists("x-goog-api-key"))
    }

    /// Answers with one STOP candidate holding a text part and an `inlineData` PNG part.
    pub async fn edit_ok(&self) {
        self.post()
            .respond_with(|request: &Request| {
                let image = BASE64.encode(png(MOCK_IMAGE_SIDE, MOCK_IMAGE_SIDE, 7));
                let parts = vec![
                    json!({ "text": "Here is the edited image." }),
                    json!({ "inlineData": { "mimeType": "image/png", "data": image } }),
                ];
                gemini_reply(request, Some(parts))
            })
            .named("gemini edit ok")
            .mount(&self.server)
            .await;
    }

    /// A blocked prompt: HTTP 200, `promptFeedback.blockReason` `SAFETY` and no candidates.
    pub async fn blocked(&self) {
        self.post()
            .respond_with(|request: &Request| gemini_reply(request, None))
            .named("gemini blocked")
            .mount(&self.server)
            .await;
    }

    /// A STOP candidate with only a text part and no image, which the worker must reject.
    pub async fn text_only(&self) {
        self.post()
            .respond_with(|request: &Request| {
                let text = "I can't make that change to the image, but I can describe it instead.";
                gemini_reply(request, Some(vec![json!({ "text": text })]))
            })
            .named("gemini text only")
            .mount(&self.server)
            .await;
    }

    fn failure(&self, status: u16, body: Value, times: Option<u64>, name: &str) -> Mock {
        let mut mock = self
            .post()
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .with_priority(FAILURE_PRIORITY)
            .named(name);
        if let Some(times) = times {
            mock = mock.up_to_n_times(times);
        }
        mock
    }

    /// A 503 `UNAVAILABLE` ("the model is overloaded"); with `times`, only that many requests fail.
    pub async fn unavailable(&self, times: Option<u64>) {
        let body = json!({
            "error": {
                "code": 503,
                "message": "The model is overloaded. Please try again later.",
                "status": "UNAVAILABLE",
            },
        });
        self.failure(503, body, times, "gemini unavailable")
            .mount(&self.server)
            .await;
    }

    /// A 429 `RESOURCE_EXHAUSTED` with QuotaFailure, Help and RetryInfo details, on every request.
    /// `retry_delay` is a protobuf Duration string such as `"22s"` or `"1.5s"`.
    pub async fn rate_limited(&self, retry_delay: &str) {
        self.rate_limited_times(retry_delay, None).await;
    }

    /// Like [`GeminiMock::rate_limited`], but only for `times` requests when given.
    pub async fn rate_limited_times(&self, retry_delay: &str, times: Option<u64>) {
        let body = json!({
            "error": {
                "code": 429,
                "message": format!(
                    "You exceeded your current quota, please check your plan and billing \
                     details. For more information on this error, head to: \
                     https://ai.google.dev/gemini-api/docs/rate-limits. Please retry in \
                     {retry_delay}."
                ),
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [{
                            "quotaMetric":
                                "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                            "quotaDimensions": {
                                "model": "gemini-2.5-flash-image",
                                "location": "global",
                            },
                            "quotaValue": "10",
                        }],
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.Help",
                        "links": [{
                            "description": "Learn more about Gemini API quotas",
                            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                        }],
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": retry_delay,
                    },
                ],
            },
        });
        self.failure(429, body, times, "gemini rate limited")
            .mount(&self.server)
            .await;
    }

    /// The JSON bodies of the generateContent requests received, oldest first.
    pub async fn received(&self) -> Vec<Value> {
        received_json(&self.server, is_generate_content_path).await
    }
}

/// Whether a path is a `/v1beta/models/<model>:generateContent` call: the mock's own regex as
/// plain string checks, so this crate needs no regex dependency.
fn is_generate_content_path(request_path: &str) -> bool {
    request_path
        .strip_prefix("/v1beta/models/")
        .and_then(|rest| rest.strip_suffix(":generateContent"))
        .is_some_and(|model| !model.is_empty() && !model.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_base64(text: &Value) -> Vec<u8> {
        BASE64.decode(text.as_str().unwrap()).unwrap()
    }

    #[test]
    fn generated_images_decode_in_their_own_format() {
        let cases = [
            (png(32, 16, 1), ImageFormat::Png),
            (jpeg(32, 16, 2), ImageFormat::Jpeg),
            (webp(32, 16, 3), ImageFormat::WebP),
        ];
        for (bytes, format) in cases {
            assert_eq!(image::guess_format(&bytes).unwrap(), format);
            let decoded = image::load_from_memory_with_format(&bytes, format).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (32, 16));
        }
        assert_ne!(png(8, 8, 1), png(8, 8, 2), "seeds give different images");
    }

    #[test]
    fn multipart_fields_are_found_by_name() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"image[]\"; filename=\"n\"\r\n\
                     Content-Type: image/png\r\n\r\n\x89PNG\r\n--b\r\n\
                     Content-Disposition: form-data; name=\"n\"\r\n\r\n3\r\n--b--\r\n";
        assert_eq!(multipart_field(body, "n").as_deref(), Some("3"));
        assert_eq!(multipart_field(body, "prompt"), None);
    }

    #[tokio::test]
    async fn router_content_is_json_with_the_given_intent() {
        let openai = OpenAiMock::start().await;
        openai
            .router_answers("edit", 0.92, "make it blue", None)
            .await;

        let response = reqwest::Client::new()
            .post(format!("{}/chat/completions", openai.base_url()))
            .bearer_auth("sk-test")
            .json(&json!({ "model": "gpt-4.1-mini", "messages": [] }))
            .send()
            .await
            .unwrap();

        assert_eq!(response.status(), 200);
        for header in [
            "x-request-id",
            "openai-processing-ms",
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-requests",
        ] {
            assert!(response.headers().contains_key(header), "missing {header}");
        }
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "gpt-4.1-mini");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["choices"][0]["message"]["refusal"], Value::Null);
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(
            body["usage"]["completion_tokens_details"]["reasoning_tokens"],
            0
        );
        let content: Value =
            serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap())
                .unwrap();
        assert_eq!(
            content,
            json!({ "intent": "edit", "confidence": 0.92, "prompt": "make it blue", "question": null })
        );
        assert_eq!(openai.received("chat/completions").await.len(), 1);
    }

    #[tokio::test]
    async fn router_refusal_has_null_content_and_a_refusal_string() {
        let openai = OpenAiMock::start().await;
        openai.router_refuses().await;

        let body: Value = reqwest::Client::new()
            .post(format!("{}/chat/completions", openai.base_url()))
            .bearer_auth("sk-test")
            .json(&json!({ "model": "gpt-4.1-mini", "messages": [] }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();

        let message = &body["choices"][0]["message"];
        assert_eq!(message["content"], Value::Null);
        assert!(message["refusal"].is_string());
    }

    #[tokio::test]
    async fn requests_without_credentials_are_not_answered() {
        let openai = OpenAiMock::start().await;
        openai.images_generate_ok().await;
        let gemini = GeminiMock::start().await;
        gemini.edit_ok().await;
        let client = reqwest::Client::new();

        let openai_status = client
            .post(format!("{}/images/generations", openai.base_url()))
            .json(&json!({ "prompt": "x" }))
            .send()
            .await
            .unwrap()
            .status();
        let gemini_status = client
            .post(format!(
                "{}/v1beta/models/gemini-2.5-flash-image:generateContent",
                gemini.base_url()
            ))
            .json(&json!({ "contents": [] }))
            .send()
            .await
            .unwrap()
            .status();

        assert_eq!(openai_status, 404);
        assert_eq!(gemini_status, 404);
    }

    #[tokio::test]
    async fn generation_returns_n_png_images_with_usage() {
        let openai = OpenAiMock::start().await;
        openai.images_generate_ok().await;

        let body: Value = reqwest::Client::new()
            .post(format!("{}/images/generations", openai.base_url()))
            .bearer_auth("sk-test")
            .json(&json!({ "model": "gpt-image-1", "prompt": "a lighthouse", "n": 3, "quality": "high" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();

        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        for item in data {
            let bytes = decode_base64(&item["b64_json"]);
            let decoded = image::load_from_memory_with_format(&bytes, ImageFormat::Png).unwrap();
            assert_eq!(decoded.width(), MOCK_IMAGE_SIDE);
        }
        assert_eq!(body["output_format"], "png");
        assert_eq!(body["size"], "1024x1024");
        assert_eq!(body["quality"], "high");
        assert!(body["created"].as_u64().unwrap() > 0);
        let usage = &body["usage"];
        assert_eq!(usage["output_tokens"], 3 * 4160);
        assert_eq!(usage["input_tokens_details"]["image_tokens"], 0);
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()
        );
        let received = openai.received("/images/generations").await;
        assert_eq!(received[0]["prompt"], "a lighthouse");
    }

    #[tokio::test]
    async fn edits_accept_json_and_multipart_and_honour_n_and_output_format() {
        let openai = OpenAiMock::start().await;
        openai.images_edit_ok().await;
        let client = reqwest::Client::new();
        let data_url = format!("data:image/png;base64,{}", BASE64.encode(png(8, 8, 0)));

        let json_body: Value = client
            .post(format!("{}/images/edits", openai.base_url()))
            .bearer_auth("sk-test")
            .json(&json!({
                "model": "gpt-image-1",
                "prompt": "add a boat",
                "images": [{ "image_url": data_url }, { "image_url": data_url }],
                "output_format": "jpeg",
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let form = reqwest::multipart::Form::new()
            .text("model", "gpt-image-1")
            .text("prompt", "add a boat")
            .text("n", "2")
            .part(
                "image[]",
                reqwest::multipart::Part::bytes(png(8, 8, 0))
                    .file_name("a.png")
                    .mime_str("image/png")
                    .unwrap(),
            );
        let multipart_body: Value = client
            .post(format!("{}/images/edits", openai.base_url()))
            .bearer_auth("sk-test")
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();

        assert_eq!(json_body["data"].as_array().unwrap().len(), 1);
        assert_eq!(json_body["output_format"], "jpeg");
        let jpeg_bytes = decode_base64(&json_body["data"][0]["b64_json"]);
        assert_eq!(image::guess_format(&jpeg_bytes).unwrap(), ImageFormat::Jpeg);
        assert_eq!(
            json_body["usage"]["input_tokens_details"]["image_tokens"],
            2 * OPENAI_EDIT_IMAGE_INPUT_TOKENS_PER_IMAGE
        );
        assert_eq!(multipart_body["data"].as_array().unwrap().len(), 2);
        assert_eq!(
            multipart_body["usage"]["input_tokens_details"]["image_tokens"],
            OPENAI_EDIT_IMAGE_INPUT_TOKENS_PER_IMAGE
        );
        assert_eq!(
            openai.received("images/edits").await.len(),
            1,
            "only the JSON request is reported"
        );
    }

    #[tokio::test]
    async fn rate_limit_carries_retry_after_ms_then_falls_through_to_the_answer() {
        let openai = OpenAiMock::start().await;
        openai.images_generate_ok().await;
        openai
            .rate_limited("images/generations", 1500, Some(1))
            .await;
        let client = reqwest::Client::new();
        let send = || {
            client
                .post(format!("{}/images/generations", openai.base_url()))
                .bearer_auth("sk-test")
                .json(&json!({ "prompt": "x" }))
                .send()
        };

        let limited = send().await.unwrap();
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.headers()["retry-after-ms"], "1500");
        assert_eq!(limited.headers()["x-ratelimit-remaining-requests"], "0");
        assert!(limited.headers().contains_key("x-request-id"));
        let error: Value = limited.json().await.unwrap();
        assert_eq!(error["error"]["code"], "rate_limit_exceeded");
        assert_eq!(error["error"]["type"], "requests");
        assert_eq!(error["error"]["param"], Value::Null);
        assert!(error["error"]["message"].is_string());

        assert_eq!(send().await.unwrap().status(), 200);
    }

    #[tokio::test]
    async fn quota_and_server_errors_use_the_openai_error_shape() {
        let openai = OpenAiMock::start().await;
        openai.insufficient_quota("images/generations", None).await;
        openai.server_error("chat/completions", None).await;
        let client = reqwest::Client::new();

        let quota = client
            .post(format!("{}/images/generations", openai.base_url()))
            .bearer_auth("sk-test")
            .json(&json!({ "prompt": "x" }))
            .send()
            .await
            .unwrap();
        let server = client
            .post(format!("{}/chat/completions", openai.base_url()))
            .bearer_auth("sk-test")
            .json(&json!({ "messages": [] }))
            .send()
            .await
            .unwrap();

        assert_eq!(quota.status(), 429);
        let quota: Value = quota.json().await.unwrap();
        assert_eq!(quota["error"]["type"], "insufficient_quota");
        assert_eq!(quota["error"]["code"], "insufficient_quota");
        assert_eq!(server.status(), 500);
        let server: Value = server.json().await.unwrap();
        assert_eq!(server["error"]["type"], "server_error");
        assert_eq!(server["error"]["code"], Value::Null);
    }

    async fn gemini_call(gemini: &GeminiMock) -> reqwest::Response {
        let image = BASE64.encode(png(8, 8, 0));
        reqwest::Client::new()
            .post(format!(
                "{}/v1beta/models/gemini-2.5-flash-image:generateContent",
                gemini.base_url()
            ))
            .header("x-goog-api-key", "test-key")
            .json(&json!({
                "contents": [{ "role": "user", "parts": [
                    { "text": "make it blue" },
                    { "inline_data": { "mime_type": "image/png", "data": image } },
                ]}],
                "generationConfig": { "responseModalities": ["TEXT", "IMAGE"] },
            }))
            .send()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn gemini_edit_returns_an_inline_png_with_usage_by_modality() {
        let gemini = GeminiMock::start().await;
        gemini.edit_ok().await;

        let body: Value = gemini_call(&gemini).await.json().await.unwrap();

        let candidate = &body["candidates"][0];
        assert_eq!(candidate["finishReason"], "STOP");
        assert!(candidate["content"]["parts"][0]["text"].is_string());
        let inline = &candidate["content"]["parts"][1]["inlineData"];
        assert_eq!(inline["mimeType"], "image/png");
        let bytes = decode_base64(&inline["data"]);
        image::load_from_memory_with_format(&bytes, ImageFormat::Png).unwrap();
        let usage = &body["usageMetadata"];
        assert_eq!(
            usage["promptTokensDetails"],
            json!([
                { "modality": "TEXT", "tokenCount": GEMINI_PROMPT_TEXT_TOKENS },
                { "modality": "IMAGE", "tokenCount": GEMINI_PROMPT_IMAGE_TOKENS_PER_IMAGE },
            ])
        );
        assert_eq!(usage["candidatesTokensDetails"][1]["modality"], "IMAGE");
        assert_eq!(
            usage["totalTokenCount"].as_u64().unwrap(),
            usage["promptTokenCount"].as_u64().unwrap()
                + usage["candidatesTokenCount"].as_u64().unwrap()
        );
        assert_eq!(body["modelVersion"], "gemini-2.5-flash-image");
        assert!(body["responseId"].is_string());
        let received = gemini.received().await;
        assert_eq!(received.len(), 1);
        assert_eq!(
            received[0]["contents"][0]["parts"][0]["text"],
            "make it blue"
        );
    }

    #[tokio::test]
    async fn gemini_blocked_and_text_only_answers_have_no_image() {
        let blocked = GeminiMock::start().await;
        blocked.blocked().await;
        let text_only = GeminiMock::start().await;
        text_only.text_only().await;

        let blocked: Value = gemini_call(&blocked).await.json().await.unwrap();
        let text_only: Value = gemini_call(&text_only).await.json().await.unwrap();

        assert_eq!(blocked["promptFeedback"]["blockReason"], "SAFETY");
        assert!(blocked.get("candidates").is_none());
        let parts = text_only["candidates"][0]["content"]["parts"]
            .as_array()
            .unwrap();
        assert_eq!(text_only["candidates"][0]["finishReason"], "STOP");
        assert_eq!(parts.len(), 1);
        assert!(parts[0].get("inlineData").is_none());
    }

    #[tokio::test]
    async fn gemini_failures_carry_status_and_retry_info_then_fall_through() {
        let gemini = GeminiMock::start().await;
        gemini.edit_ok().await;
        gemini.unavailable(Some(1)).await;
        gemini.rate_limited_times("22s", Some(1)).await;

        // Failures share one priority, so the first mounted (unavailable) answers first.
        let unavailable = gemini_call(&gemini).await;
        assert_eq!(unavailable.status(), 503);
        let unavailable: Value = unavailable.json().await.unwrap();
        assert_eq!(unavailable["error"]["status"], "UNAVAILABLE");

        let limited = gemini_call(&gemini).await;
        assert_eq!(limited.status(), 429);
        let limited: Value = limited.json().await.unwrap();
        assert_eq!(limited["error"]["status"], "RESOURCE_EXHAUSTED");
        let details = limited["error"]["details"].as_array().unwrap();
        let retry_info = details
            .iter()
            .find(|detail| detail["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
            .unwrap();
        assert_eq!(retry_info["retryDelay"], "22s");
        assert!(
            details
                .iter()
                .any(|d| d["@type"] == "type.googleapis.com/google.rpc.QuotaFailure")
        );

        assert_eq!(gemini_call(&gemini).await.status(), 200);
    }
}

// ---------------------------------------------------------------------------------------------
// A hostile upstream
// ---------------------------------------------------------------------------------------------

/// What a [`HostileServer`] sends after `HTTP/1.1 200 OK`.
#[derive(Debug, Clone, Copy)]
pub enum HostileAnswer {
    /// A `Content-Length` of this many bytes, and then nothing: the connection stays open and
    /// silent, so a client that waited for the body would wait.
    Announced(u64),
    /// A chunked body of 64 KiB chunks of JSON whitespace, for as long as the client reads.
    EndlessChunks,
}

/// A provider that answers every request with a [`HostileAnswer`], on raw TCP: wiremock
/// computes `Content-Length` from the body it has, so it cannot announce a terabyte.
pub struct HostileServer {
    /// The base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    requests: Arc<std::sync::atomic::AtomicU64>,
    written: Arc<std::sync::atomic::AtomicU64>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl HostileServer {
    pub async fn start(answer: HostileAnswer) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::AsyncWriteExt;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the hostile server");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        let requests = Arc::new(AtomicU64::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let accept_task = tokio::spawn({
            let (requests, written) = (requests.clone(), written.clone());
            async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    let (requests, written) = (requests.clone(), written.clone());
                    tokio::spawn(async move {
                        if read_request(&mut socket).await.is_none() {
                            return;
                        }
                        requests.fetch_add(1, Ordering::SeqCst);
                        match answer {
                            HostileAnswer::Announced(length) => {
                                let head = format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                     content-length: {length}\r\n\r\n"
                                );
                                if socket.write_all(head.as_bytes()).await.is_ok() {
                                    tokio::time::sleep(Duration::from_secs(60)).await;
                                }
                            }
                            HostileAnswer::EndlessChunks => {
                                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                            transfer-encoding: chunked\r\n\r\n";
                                if socket.write_all(head.as_bytes()).await.is_err() {
                                    return;
                                }
                                let mut chunk = b"10000\r\n".to_vec();
                                chunk.extend(std::iter::repeat_n(b' ', 0x10000));
                                chunk.extend_from_slice(b"\r\n");
                                while socket.write_all(&chunk).await.is_ok() {
                                    written.fetch_add(0x10000, Ordering::SeqCst);
                                }
                            }
                        }
                    });
                }
            }
        });
        Self {
            url,
            requests,
            written,
            accept_task,
        }
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Body bytes the clients have taken so far (as far as the sockets' buffers let the server
    /// know).
    pub fn body_bytes_written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Reads one HTTP/1.1 request (head, then a body of its `Content-Length`); `None` when the
/// client went away first.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<()> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let head_end = loop {
        let read = socket
            .read(&mut buffer)
            .await
            .ok()
            .filter(|read| *read > 0)?;
        received.extend_from_slice(&buffer[..read]);
        if let Some(at) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    while received.len() < head_end + length {
        let read = socket
            .read(&mut buffer)
            .await
            .ok()
            .filter(|read| *read > 0)?;
        received.extend_from_slice(&buffer[..read]);
    }
    Some(())
}
