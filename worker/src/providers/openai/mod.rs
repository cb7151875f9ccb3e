//! OpenAI client: the router's intent classifier (Chat Completions with a strict JSON schema,
//! `router`), new images (`/images/generations`), image edits and upscales (`/images/edits`, the
//! JSON form; an upscale is an edit at a larger custom size, `images`), all on one transport
//! ([`OpenAi`]) with the API key sent as a bearer token.
//!
//! The wire formats follow `docs/providers.md` sections 1 to 3. Each call is exactly one HTTP
//! request; a failure becomes a [`ProviderError`] whose [`Retry`] is decided in one place,
//! `errors::classify_error`, from the status, the `x-should-retry` and `retry-after(-ms)`
//! headers and the error body's `code`/`type`, so the caller's retry policy sees what the server
//! meant (a 429 for an exhausted quota is permanent, a 429 for a rate limit is not). The API key
//! is never written into an error: bodies are redacted before they reach `detail`.

mod errors;
mod images;
mod router;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Client, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use shared::codes::FailureCode;
use shared::config::OpenAiSettings;

use super::budget::{HeldBody, ResponseBudget, cap_bytes};
use super::{Connections, JsonBody, ProviderError, Retry, http_client, redact};

pub use images::OpenAiImages;
pub use router::OpenAiRouter;

pub const NAME: &str = "openai";

/// The transport to the OpenAI API that the router and the image clients share: two
/// connection pools, the key, the base URL and the worker's response budget.
#[derive(Debug)]
pub struct OpenAi {
    /// For the router's small answers.
    http: Client,
    /// For image answers (see [`Connections::Images`]).
    image_http: Client,
    api_key: SecretString,
    /// The `Authorization` header, built once (marked sensitive: never printed).
    auth: HeaderValue,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    base_url: String,
    /// The URLs of [`ENDPOINTS`], parsed once: a request clones its URL instead of parsing it.
    endpoints: Vec<(&'static str, Url)>,
    budget: ResponseBudget,
    /// The largest answer body read (`openai.max_response_mib`).
    max_response_bytes: u64,
}

/// The setting that caps an answer's size, named in the error of an answer above it.
const MAX_RESPONSE_SETTING: &str = "openai.max_response_mib, PICTOR_OPENAI_MAX_RESPONSE_MIB";

impl OpenAi {
    /// `images`: how the image client treats its connections ([`super::image_connections`]).
    pub fn new(
        settings: &OpenAiSettings,
        api_key: SecretString,
        images: Connections,
    ) -> Result<Self, ProviderError> {
        let auth = bearer(&api_key)?;
        let base_url = settings.base_url.as_str().trim_end_matches('/').to_string();
        let endpoints = ENDPOINTS
            .iter()
            .map(|endpoint| Ok((*endpoint, super::endpoint_url(NAME, &base_url, endpoint)?)))
            .collect::<Result<_, ProviderError>>()?;
        let http = http_client(
            NAME,
            settings.timeout,
            settings.connect_timeout,
            Connections::Pooled,
        )?;
        let image_http = http_client(NAME, settings.timeout, settings.connect_timeout, images)?;
        Ok(Self {
            http,
            image_http,
            api_key,
            auth,
            base_url,
            endpoints,
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

    /// POSTs `body` as JSON to `{base_url}/{endpoint}` on the pooled client and parses a 2xx
    /// answer as `T`.
    async fn post<T: DeserializeOwned>(
        &self,
        endpoint: &str,
        body: JsonBody,
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
        body: JsonBody,
    ) -> Result<HeldBody, ProviderError> {
        let url = match self.endpoints.iter().find(|(name, _)| *name == endpoint) {
            Some((_, url)) => url.clone(),
            None => super::endpoint_url(NAME, &self.base_url, endpoint)?,
        };
        let request = http.post(url).header(AUTHORIZATION, self.auth.clone());
        let response = body
            .attach(request)
            .send()
            .await
            .map_err(|error| transport_error(endpoint, &error))?;
        let status = response.status().as_u16();
        // An error's headers say whether and when to retry; a success's are not read.
        let headers = (!(200..300).contains(&status)).then(|| response.headers().clone());
        let held = self
            .budget
            .read(response, self.max_response_bytes)
            .await
            .map_err(|error| {
                ProviderError::unread(NAME, endpoint, status, MAX_RESPONSE_SETTING, &error)
            })?;
        if !(200..300).contains(&status) {
            let text = redact(&String::from_utf8_lossy(held.bytes()), &self.api_key);
            let mut error = errors::classify_error(status, &headers.unwrap_or_default(), &text);
            error.detail = format!("{endpoint}: {}", error.detail);
            return Err(error);
        }
        Ok(held)
    }
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

pub(super) fn transport_error(endpoint: &str, error: &reqwest::Error) -> ProviderError {
    ProviderError::transport(NAME, endpoint, error)
}

/// The endpoints the clients call.
const ENDPOINTS: [&str; 3] = ["chat/completions", "images/generations", "images/edits"];

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

pub(super) fn provider_error(
    code: FailureCode,
    retry: Retry,
    detail: String,
    status: Option<u16>,
) -> ProviderError {
    ProviderError::new(NAME, code, retry, detail, status)
}

/// What the tests of the client's parts share: a mock server's settings and the clients on it.
#[cfg(test)]
mod test_support {
    pub use crate::providers::Connections;
    pub use reqwest::header::{HeaderMap, HeaderValue};
    pub use secrecy::SecretString;
    pub use serde_json::{Value, json};
    pub use shared::config::{OpenAiSettings, Settings};
    pub use shared::domain::{ImageSize, Intent};
    pub use std::sync::Arc;
    pub use wiremock::matchers::{body_partial_json, header, method, path};
    pub use wiremock::{Mock, MockServer, ResponseTemplate};

    pub use super::{OpenAi, OpenAiImages, OpenAiRouter};
    pub use crate::providers::{GenerateRequest, Keywords, ProviderError, Route};

    pub const KEY: &str = "sk-test-0123456789abcdefSECRET";

    /// The router on a transport whose settings are `settings`.
    pub fn router_with(settings: &OpenAiSettings) -> OpenAiRouter {
        let api =
            Arc::new(OpenAi::new(settings, SecretString::from(KEY), Connections::Images).unwrap());
        OpenAiRouter::new(api, settings)
    }

    /// The image client on a transport whose settings are `settings`.
    pub fn images_with(settings: &OpenAiSettings) -> OpenAiImages {
        let api =
            Arc::new(OpenAi::new(settings, SecretString::from(KEY), Connections::Images).unwrap());
        OpenAiImages::new(api, settings)
    }

    pub fn router(server: &MockServer) -> OpenAiRouter {
        router_with(&settings(server))
    }

    pub fn images(server: &MockServer) -> OpenAiImages {
        images_with(&settings(server))
    }

    pub fn settings(server: &MockServer) -> OpenAiSettings {
        let mut settings = Settings::defaults().unwrap().openai;
        settings.base_url = format!("{}/v1", server.uri()).parse().unwrap();
        settings.router_model = "gpt-4.1-mini".to_string();
        settings.image_model = "gpt-image-1.5".to_string();
        settings.image_quality = "medium".to_string();
        settings
    }

    pub fn png(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbImage::from_pixel(width, height, image::Rgb([200, 30, 60]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        bytes.into_inner()
    }

    pub fn chat_completion(content: Value, finish_reason: &str, refusal: Value) -> Value {
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

    pub fn openai_error(message: &str, kind: &str, code: Option<&str>) -> Value {
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
    }

    pub async fn mount(server: &MockServer, endpoint: &str, response: ResponseTemplate) {
        Mock::given(method("POST"))
            .and(path(format!("/v1/{endpoint}")))
            .respond_with(response)
            .mount(server)
            .await;
    }

    /// The intents the registry offers today, as the router sends them.
    pub fn intents() -> Vec<Route> {
        vec![
            Route {
                intent: Intent::Create,
                description: "a new image from a description.",
                offered: true,
                keywords: Keywords::default(),
            },
            Route {
                intent: Intent::Edit,
                description: "a change to an image the user has.",
                offered: true,
                keywords: Keywords::default(),
            },
            Route {
                intent: Intent::Upscale,
                description: "a larger version of the user's image.",
                offered: false,
                keywords: Keywords::default(),
            },
        ]
    }

    pub fn generate_request() -> GenerateRequest {
        GenerateRequest {
            prompt: "a red fox in the snow".to_string(),
            size: ImageSize::Square,
            n: 1,
        }
    }

    pub fn assert_no_key(error: &ProviderError) {
        assert!(!format!("{error}").contains(KEY), "key in Display: {error}");
        assert!(
            !format!("{error:?}").contains(KEY),
            "key in Debug: {error:?}"
        );
    }

    pub fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::openai::test_support::*;

    #[test]
    fn the_client_debug_output_hides_the_key() {
        let settings = Settings::defaults().unwrap().openai;
        let openai = OpenAi::new(&settings, SecretString::from(KEY), Connections::Images).unwrap();
        assert!(!format!("{openai:?}").contains(KEY));
    }
}
