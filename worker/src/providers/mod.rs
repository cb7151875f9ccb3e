//! Providers: thin HTTP clients for the model APIs, one file each, behind four capability
//! traits. Agents hold `Arc<dyn Capability>` and never know which provider (or the simulated
//! stand-in) serves them.
//!
//! A provider makes exactly one HTTP request per call: retries, backoff and fallback are decided
//! by the caller from [`ProviderError::retry`], so attempts, costs and logs stay truthful.

pub mod budget;
pub mod gemini;
pub mod gpt_image;
pub mod openai;
pub mod simulated;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shared::codes::FailureCode;
use shared::config::Settings;
use shared::domain::{ImageMime, ImageSize, Intent, JobId, StoredImage, Usage, image_dimensions};
use shared::images::ImageStore;

/// Whether and when a failed call may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Transient: connection error, timeout, 408/409/429 rate limit, 5xx, `x-should-retry: true`.
    /// `after` is the delay the provider asked for, if it said one.
    Yes { after: Option<Duration> },
    /// Permanent: bad request, auth, quota or spend limit, moderation or safety block.
    No,
}

/// A failed provider call, split into what the user may read and what only logs may read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{provider} call failed ({code}): {detail}")]
pub struct ProviderError {
    pub provider: &'static str,
    pub retry: Retry,
    /// Stable machine code shown to users.
    pub code: FailureCode,
    /// One friendly sentence for the user: what happened, and whether trying later may help.
    pub user_message: String,
    /// Technical detail for logs and the job's internal record (status, provider error code and
    /// message). Never contains the API key.
    pub detail: String,
    /// HTTP status, when there was a response.
    pub status: Option<u16>,
    /// The request may have reached the provider and been billed although no answer came back
    /// (a timeout or a connection cut after it was sent). The call path records such a call in
    /// the ledger as possibly billed, at its estimate.
    pub possibly_billed: bool,
}

/// One image as a provider returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedImage {
    pub bytes: Bytes,
    pub mime_type: ImageMime,
    /// The share of the worker's response budget the image was decoded under, given back when
    /// the image is dropped (after it is stored).
    pub budget: budget::BudgetShare,
}

/// The router's verdict on a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    pub intent: Intent,
    /// 0.0 to 1.0.
    pub confidence: f64,
    /// The prompt cleaned up for the image model (instructions kept, chatter removed).
    pub prompt: String,
    /// For `unclear`: the question to ask the user.
    pub question: Option<String>,
    pub usage: Usage,
}

#[derive(Debug, Clone)]
pub struct ClassifyRequest {
    pub prompt: String,
    pub has_image: bool,
    /// The intents the router may answer besides `unclear`, with when each applies: the
    /// agents' routes, so the classifier's schema and instructions follow the registry.
    pub intents: Vec<Route>,
}

/// How the router reaches an agent: the intent it serves and when a request has that intent.
/// An agent declares one (`Agent::route`); the classifier is told every registered agent's
/// route, and the agent is named after the route's intent, because the api resumes a clarified
/// job at the agent named by the intent the user chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub intent: Intent,
    /// When a request has this intent, in one sentence for the classifier's instructions.
    pub description: &'static str,
    /// Offered as an option of the router's general question ("create or edit?"). A narrow
    /// intent (upscale) is offered only when the router asks about that intent itself.
    pub offered: bool,
    /// How the simulated classifier recognises the intent without a model.
    pub keywords: Keywords,
}

/// Words by which the simulated classifier recognises an intent (a real model reads the
/// description instead). Phrases match on whole words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keywords {
    pub words: &'static [&'static str],
    pub phrases: &'static [&'static str],
    /// Phrases that ask for the intent only when an image is attached ("a castle in 4k" is a
    /// new image, "this in 4k" with an image an upscale).
    pub phrases_with_image: &'static [&'static str],
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub size: ImageSize,
    pub n: u32,
}

#[derive(Debug, Clone)]
pub struct EditRequest {
    pub prompt: String,
    pub image: Bytes,
    pub mime_type: ImageMime,
    pub size: ImageSize,
    pub n: u32,
}

/// A larger version of the user's image: `width` x `height` pixels, chosen by the caller within
/// [`ImageUpscaler::max_size`].
#[derive(Debug, Clone)]
pub struct UpscaleRequest {
    /// The instruction sent with the image.
    pub prompt: String,
    pub image: Bytes,
    pub mime_type: ImageMime,
    pub width: u32,
    pub height: u32,
}

/// What an image call produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOutput {
    pub images: Vec<GeneratedImage>,
    /// Text the model returned alongside (Gemini may explain itself).
    pub text: Option<String>,
    pub usage: Usage,
}

/// Who serves a capability: the names and model every call through it is shown, limited,
/// billed and traced under. Each capability trait below extends it, so a provider states them
/// once per capability it serves.
pub trait ProviderInfo: Send + Sync {
    /// Provider name shown on the job and used in logs (`openai`, `gemini`, `simulated`).
    fn provider(&self) -> &'static str;
    /// The provider whose prices, rate limits and circuit breaker apply: the real one, even
    /// when simulated.
    fn billing_provider(&self) -> &'static str {
        self.provider()
    }
    /// The model the calls go to, as priced in the price table.
    fn model(&self) -> &str;
}

/// A provider's answer as the call path keeps it. The call path makes the answer durable
/// (`keep`) and records the step in the same atomic write as its ledger entry before anything
/// else can fail; the agent gets what was kept, and so does every later run of the step,
/// instead of calling the provider again.
#[async_trait]
pub trait Answer: Send + Sync + Sized {
    /// What the step keeps (in the job's hash, so small) and what the agent gets back.
    type Kept: Serialize + DeserializeOwned + Send + Sync;
    fn usage_mut(&mut self) -> &mut Usage;
    /// Writes what must outlive the process (images, to the object store) and answers what the
    /// step keeps. Writing again after a failure overwrites the same objects.
    async fn keep(&self, images: &ImageStore, job: JobId) -> anyhow::Result<Self::Kept>;
}

#[async_trait]
impl Answer for Classification {
    type Kept = Classification;

    fn usage_mut(&mut self) -> &mut Usage {
        &mut self.usage
    }

    async fn keep(&self, _: &ImageStore, _: JobId) -> anyhow::Result<Classification> {
        Ok(self.clone())
    }
}

/// The images of an answer, as kept: where they are and what they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptImages {
    pub images: Vec<StoredImage>,
    /// Text the model returned alongside.
    pub text: Option<String>,
}

#[async_trait]
impl Answer for ImageOutput {
    type Kept = KeptImages;

    fn usage_mut(&mut self) -> &mut Usage {
        &mut self.usage
    }

    /// Puts each image at the job's output path, which is where clients download it from.
    async fn keep(&self, store: &ImageStore, job: JobId) -> anyhow::Result<KeptImages> {
        let mut images = Vec::with_capacity(self.images.len());
        for (index, image) in self.images.iter().enumerate() {
            let (width, height) = image_dimensions(&image.bytes).unwrap_or((0, 0));
            store
                .put(
                    &ImageStore::output_path(job, index, image.mime_type),
                    image.bytes.clone(),
                )
                .await?;
            images.push(StoredImage {
                mime_type: image.mime_type,
                width,
                height,
            });
        }
        Ok(KeptImages {
            images,
            text: self.text.clone(),
        })
    }
}

/// Intent classification with structured output.
#[async_trait]
pub trait Classifier: ProviderInfo {
    /// The most the call can bill (its budget hold), as usage to price.
    fn estimate(&self, request: &ClassifyRequest) -> Usage;
    async fn classify(&self, request: &ClassifyRequest) -> Result<Classification, ProviderError>;
}

/// New images from a prompt.
#[async_trait]
pub trait ImageGenerator: ProviderInfo {
    /// The most the call can bill (its budget hold), as usage to price.
    fn estimate(&self, request: &GenerateRequest) -> Usage;
    async fn generate(&self, request: &GenerateRequest) -> Result<ImageOutput, ProviderError>;
}

/// Edits of a user's image.
#[async_trait]
pub trait ImageEditor: ProviderInfo {
    /// The most the call can bill (its budget hold), as usage to price.
    fn estimate(&self, request: &EditRequest) -> Usage;
    async fn edit(&self, request: &EditRequest) -> Result<ImageOutput, ProviderError>;
}

/// Higher-resolution versions of a user's image.
#[async_trait]
pub trait ImageUpscaler: ProviderInfo {
    /// The largest output, (width, height) in landscape orientation; turned for portrait images.
    fn max_size(&self) -> (u32, u32);
    /// The output size for an input of `input` pixels under the model's sizing rules, or `None`
    /// when the model cannot make it any larger.
    fn target_size(&self, input: (u32, u32)) -> Option<(u32, u32)>;
    /// The most the call can bill (its budget hold), as usage to price.
    fn estimate(&self, request: &UpscaleRequest) -> Usage;
    async fn upscale(&self, request: &UpscaleRequest) -> Result<ImageOutput, ProviderError>;
}

/// The capabilities the agents use, each served by a real provider or the simulated one.
#[derive(Clone)]
pub struct Providers {
    pub classifier: Arc<dyn Classifier>,
    pub generator: Arc<dyn ImageGenerator>,
    pub editor: Arc<dyn ImageEditor>,
    /// Takes over edits when the editor fails or is in cooldown (OpenAI's image edits).
    pub fallback_editor: Arc<dyn ImageEditor>,
    /// Serves the `upscale` agent (OpenAI's image edits at a custom size).
    pub upscaler: Arc<dyn ImageUpscaler>,
    /// Names of the providers running simulated, for the start-up banner.
    pub simulated: Vec<&'static str>,
}

impl Providers {
    /// Real clients where a key is set, the simulated provider where it is not.
    pub fn from_settings(settings: &Settings) -> Result<Self, ProviderError> {
        let mut simulated = Vec::new();
        let budget = budget::ResponseBudget::new(settings.worker.response_buffer_mib);
        let image_links = image_connections(
            u32::try_from(settings.worker.concurrency.get()).unwrap_or(u32::MAX),
            settings.worker.response_buffer_mib.get(),
        );
        let (classifier, images): (Arc<dyn Classifier>, _) = match &settings.openai.api_key {
            Some(key) => {
                let api = Arc::new(
                    openai::OpenAi::new(&settings.openai, key.clone(), image_links)?
                        .with_budget(budget.clone()),
                );
                (
                    Arc::new(openai::OpenAiRouter::new(api.clone(), &settings.openai)),
                    ImageCapabilities::of(Arc::new(openai::OpenAiImages::new(
                        api,
                        &settings.openai,
                    ))),
                )
            }
            None => {
                simulated.push(openai::NAME);
                (
                    Arc::new(simulated::Simulated::openai_router(settings)),
                    ImageCapabilities::of(Arc::new(simulated::Simulated::openai_images(settings))),
                )
            }
        };
        let editor: Arc<dyn ImageEditor> = match &settings.gemini.api_key {
            Some(key) => Arc::new(
                gemini::Gemini::new(&settings.gemini, key.clone(), image_links)?
                    .with_budget(budget),
            ),
            None => {
                simulated.push(gemini::NAME);
                Arc::new(simulated::Simulated::gemini(settings))
            }
        };
        Ok(Self {
            classifier,
            generator: images.generator,
            editor,
            fallback_editor: images.fallback_editor,
            upscaler: images.upscaler,
            simulated,
        })
    }
}

/// The image capabilities one OpenAI image client (or its simulated stand-in) serves.
struct ImageCapabilities {
    generator: Arc<dyn ImageGenerator>,
    fallback_editor: Arc<dyn ImageEditor>,
    upscaler: Arc<dyn ImageUpscaler>,
}

impl ImageCapabilities {
    fn of<P>(provider: Arc<P>) -> Self
    where
        P: ImageGenerator + ImageEditor + ImageUpscaler + 'static,
    {
        Self {
            generator: provider.clone(),
            fallback_editor: provider.clone(),
            upscaler: provider,
        }
    }
}

/// Tokens the API adds to a prompt at most (instructions, a schema, formatting).
const PROMPT_OVERHEAD_TOKENS: u64 = 2_000;

/// Text tokens a call may answer with at most.
const OUTPUT_TEXT_TOKENS: u64 = 1_000;

/// The text part of a call's worst case: the prompt at about four characters a token plus the
/// API's own additions, and a generous answer. The caller adds provider, model and images.
pub fn text_worst_case(prompt: &str) -> Usage {
    let prompt_tokens = u64::try_from(prompt.chars().count().div_ceil(4)).unwrap_or(u64::MAX);
    Usage {
        input_text_tokens: prompt_tokens.saturating_add(PROMPT_OVERHEAD_TOKENS),
        output_text_tokens: OUTPUT_TEXT_TOKENS,
        ..Usage::default()
    }
}

/// A provider's name as users read it in notices.
pub fn display_name(provider: &str) -> &str {
    match provider {
        openai::NAME => "OpenAI",
        gemini::NAME => "Gemini",
        other => other,
    }
}

/// Longest provider error message kept in a failure's detail.
const DETAIL_MESSAGE_CHARS: usize = 300;

/// A request's JSON, serialized before it is sent. It consumes the `serde_json::Value` it is
/// made from, so the value (for an edit, the input image as base64) is not kept beside the
/// bytes on the wire for as long as the provider takes to answer.
pub(crate) struct JsonBody(Vec<u8>);

impl JsonBody {
    pub(crate) fn new(value: serde_json::Value) -> Self {
        Self(value.to_string().into_bytes())
    }

    /// `request` with this body and its `Content-Type`.
    pub(crate) fn attach(self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(self.0)
    }
}

/// `{base_url}/{path}`, parsed once when a client is built: each request clones it rather
/// than formatting and parsing it again.
pub(crate) fn endpoint_url(
    provider: &'static str,
    base_url: &str,
    path: &str,
) -> Result<reqwest::Url, ProviderError> {
    let url = format!("{}/{path}", base_url.trim_end_matches('/'));
    reqwest::Url::parse(&url).map_err(|error| {
        ProviderError::new(
            provider,
            FailureCode::ProviderUnavailable,
            Retry::No,
            format!("{path}: the URL does not parse: {error}"),
            None,
        )
    })
}

impl ProviderError {
    /// A failure of `provider` with the standard user message for `code`.
    pub fn new(
        provider: &'static str,
        code: FailureCode,
        retry: Retry,
        detail: String,
        status: Option<u16>,
    ) -> Self {
        Self {
            provider,
            retry,
            code,
            user_message: code.user_message().to_string(),
            detail,
            status,
            possibly_billed: false,
        }
    }

    /// A failure before any HTTP status: connection refused, DNS, TLS, timeout, a cut body.
    pub fn transport(provider: &'static str, endpoint: &str, error: &reqwest::Error) -> Self {
        if error.is_builder() {
            return Self::new(
                provider,
                FailureCode::InvalidRequest,
                Retry::No,
                format!("{endpoint}: cannot build request: {}", error_chain(error)),
                None,
            );
        }
        // A connection that never opened sent nothing; anything later (a timeout while
        // waiting for the answer, a reset, a body cut short) may have been billed.
        let code = if error.is_timeout() {
            FailureCode::ProviderTimeout
        } else {
            FailureCode::ProviderUnavailable
        };
        let (what, possibly_billed) = if error.is_connect() {
            ("connection failed", false)
        } else if error.is_timeout() {
            ("timed out", true)
        } else {
            ("transport error", true)
        };
        Self {
            possibly_billed,
            ..Self::new(
                provider,
                code,
                Retry::Yes { after: None },
                format!("{endpoint}: {what}: {}", error_chain(error)),
                error.status().map(|status| status.as_u16()),
            )
        }
    }
}

impl ProviderError {
    /// A body that could not be read after `endpoint` answered `status`: a transport failure
    /// (see [`ProviderError::transport`]), or an answer larger than the provider's cap
    /// (`setting`), which is a bad response that no retry would fix. A success status whose
    /// body was refused may have been billed.
    pub fn unread(
        provider: &'static str,
        endpoint: &str,
        status: u16,
        setting: &str,
        error: &budget::ReadError,
    ) -> Self {
        match error {
            budget::ReadError::Transport(error) => Self::transport(provider, endpoint, error),
            too_large @ budget::ReadError::TooLarge { .. } => Self {
                possibly_billed: (200..300).contains(&status),
                ..Self::new(
                    provider,
                    FailureCode::BadResponse,
                    Retry::No,
                    format!("{endpoint}: http {status}: {too_large} ({setting})"),
                    Some(status),
                )
            },
        }
    }
}

/// How a provider client treats its connections once a call is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connections {
    /// Keep up to 64 open for the next calls (small answers: the router's).
    Pooled,
    /// Keep a few open, for a short while (image answers). An HTTP/1.1 connection keeps the
    /// read buffer its largest answer grew (up to ~400 KiB) for as long as it lives, which
    /// across hundreds of pooled connections was hundreds of MiB at concurrency 1,024; a
    /// handful idle bounds that to a few MiB, while calls that follow one another (the usual
    /// case) reuse a connection instead of paying a TCP (and TLS) handshake each. A reused
    /// connection reserves that grown buffer again before each read, the wait for its next
    /// answer included, so it is only for a concurrency whose calls could all hold one within
    /// the response budget ([`image_connections`]).
    Images,
    /// Keep none: every image call opens its own connection, which starts with an 8 KiB buffer.
    Closed,
}

/// Read buffer a connection that carried an image answer can reserve for its next read
/// (hyper's adaptive read strategy grows to 8 KiB + 100 × 4 KiB).
const GROWN_READ_BUFFER_BYTES: u64 = 408 << 10;

/// How image clients treat their connections for a worker running `concurrency` calls with a
/// response budget of `budget_mib`: kept ([`Connections::Images`]) when every call in flight
/// could hold a grown read buffer within the budget (up to 80 calls for 32 MiB), else closed
/// after each call. Reuse saves a handshake per call; above that concurrency its buffers cost
/// more memory than the budget that bounds the answers themselves (docs/benchmarks.md,
/// scenario 2's peak).
pub fn image_connections(concurrency: u32, budget_mib: u32) -> Connections {
    let held = u64::from(concurrency) * GROWN_READ_BUFFER_BYTES;
    if held <= u64::from(budget_mib) << 20 {
        Connections::Images
    } else {
        Connections::Closed
    }
}

/// Idle connections a pooled client keeps: enough for the default concurrency's router calls,
/// and no more, since each one keeps its buffers.
const IDLE_CONNECTIONS: usize = 64;

/// Idle connections an image client keeps: at most 16 × ~400 KiB of read buffers.
const IDLE_IMAGE_CONNECTIONS: usize = 16;

/// How long an idle image connection (and its buffer) is kept for the next call.
const IDLE_IMAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP client `provider` calls through.
pub fn http_client(
    provider: &'static str,
    timeout: Duration,
    connect_timeout: Duration,
    connections: Connections,
) -> Result<reqwest::Client, ProviderError> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(connect_timeout);
    builder = match connections {
        Connections::Pooled => builder.pool_max_idle_per_host(IDLE_CONNECTIONS),
        Connections::Images => builder
            .pool_max_idle_per_host(IDLE_IMAGE_CONNECTIONS)
            .pool_idle_timeout(IDLE_IMAGE_TIMEOUT),
        Connections::Closed => builder.pool_max_idle_per_host(0),
    };
    builder.build().map_err(|error| ProviderError {
        provider,
        retry: Retry::No,
        code: FailureCode::ProviderUnavailable,
        user_message: "The image service is unavailable right now. Please try again later."
            .to_string(),
        detail: format!("cannot build http client: {}", error_chain(&error)),
        status: None,
        possibly_billed: false,
    })
}

/// An error and its sources on one line, e.g. "error sending request: connection refused".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Removes the key from text a provider sent back (a 401 may echo it).
pub fn redact(text: &str, api_key: &secrecy::SecretString) -> String {
    use secrecy::ExposeSecret;
    let key = api_key.expose_secret();
    if key.is_empty() {
        text.to_string()
    } else {
        text.replace(key, "[redacted]")
    }
}

/// Cuts a provider message to a size fit for logs.
pub fn truncate(text: &str) -> String {
    match text.char_indices().nth(DETAIL_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_body_goes_out_as_the_values_json_with_its_content_type() {
        let image = "A".repeat(1024);
        let body = JsonBody::new(serde_json::json!({"prompt": "a \"quoted\" fox", "image": image}));
        let request = body
            .attach(reqwest::Client::new().post("http://127.0.0.1:9/v1/images/edits"))
            .build()
            .unwrap();
        assert_eq!(
            request.headers()[reqwest::header::CONTENT_TYPE],
            "application/json"
        );
        let sent: serde_json::Value =
            serde_json::from_slice(request.body().unwrap().as_bytes().unwrap()).unwrap();
        assert_eq!(sent["prompt"], "a \"quoted\" fox");
        assert_eq!(sent["image"].as_str().map(str::len), Some(1024));
    }

    #[test]
    fn image_connections_are_kept_only_while_every_call_could_hold_a_grown_buffer_in_budget() {
        // 32 MiB holds 80 buffers of 408 KiB.
        assert_eq!(image_connections(64, 32), Connections::Images);
        assert_eq!(image_connections(80, 32), Connections::Images);
        assert_eq!(image_connections(81, 32), Connections::Closed);
        assert_eq!(image_connections(1024, 32), Connections::Closed);
        // A larger budget allows more.
        assert_eq!(image_connections(1024, 512), Connections::Images);
        assert_eq!(image_connections(u32::MAX, 1), Connections::Closed);
    }
}
