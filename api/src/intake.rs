//! Turns a `POST /v1/jobs` body, JSON or multipart, into a [`JobRequest`] of domain types, or
//! into the exact 4xx that names what is wrong with it.

use std::borrow::Cow;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart};
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use shared::config::Settings;
use shared::domain::{ImageMime, ImageSize, Intent, Prompt, PromptError, image_dimensions};

use crate::error::{ApiError, ErrorCode};

/// A validated job request.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub prompt: Prompt,
    pub size: ImageSize,
    pub n: u32,
    pub image: Option<(Bytes, ImageMime)>,
}

impl JobRequest {
    /// A digest of everything that defines the request, to tell a true retry (same key, same
    /// request) from a reused Idempotency-Key.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.prompt.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(self.size.as_str().as_bytes());
        hasher.update(self.n.to_be_bytes());
        if let Some((bytes, _)) = &self.image {
            hasher.update(bytes);
        }
        format!("{:x}", hasher.finalize())
    }
}

/// The JSON body as sent; every field optional so that a missing one gets its own error code.
/// Strings borrow from the body where they can, so a 20 MiB base64 image is not copied.
#[derive(Debug, Default, Deserialize)]
struct RawJob<'a> {
    #[serde(borrow)]
    prompt: Option<Cow<'a, str>>,
    #[serde(borrow)]
    image: Option<RawImage<'a>>,
    #[serde(borrow)]
    size: Option<Cow<'a, str>>,
    n: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct RawImage<'a> {
    /// Base64 never needs a JSON escape, so this borrows unless a client escaped `/` as `\/`.
    #[serde(borrow)]
    data: Cow<'a, str>,
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "the claimed type is accepted for compatibility but never trusted"
    )]
    mime_type: Option<String>,
}

pub async fn parse(request: Request<Body>, settings: &Settings) -> Result<JobRequest, ApiError> {
    let limit = settings.api.max_body_bytes.get();
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared_length.is_some_and(|length| length > limit) {
        return Err(too_large(limit));
    }
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase();
    if content_type.starts_with("multipart/form-data") {
        let (raw, image) = from_multipart(request).await?;
        validate(raw, image, settings)
    } else if content_type.starts_with("application/json") || content_type.contains("+json") {
        // The body is held once; the base64 text is borrowed from it and decoded once.
        let bytes = read_body(request, limit).await?;
        let raw: RawJob<'_> = parse_json(&bytes)?;
        let image = raw
            .image
            .as_ref()
            .map(|image| decode_base64(&image.data))
            .transpose()?;
        validate(raw, image, settings)
    } else {
        Err(ApiError::client(
            ErrorCode::UnsupportedMediaType,
            "send the job as application/json or multipart/form-data",
        ))
    }
}

async fn read_body(request: Request<Body>, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| too_large(limit))
}

fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => ApiError::client(
            ErrorCode::InvalidField,
            format!("a field has the wrong type: {error}"),
        ),
        _ => ApiError::client(
            ErrorCode::MalformedJson,
            format!("the body is not valid JSON: {error}"),
        ),
    })
}

fn too_large(limit: usize) -> ApiError {
    ApiError::client(
        ErrorCode::PayloadTooLarge,
        format!("the request body is larger than the limit of {limit} bytes"),
    )
}

/// Standard base64, with or without a `data:...;base64,` prefix, whitespace tolerated.
fn decode_base64(data: &str) -> Result<Bytes, ApiError> {
    let payload = match data.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => data,
    };
    // Wrapped base64 (MIME style) is tolerated; only then is a compact copy made.
    let compact: Cow<'_, [u8]> = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        Cow::Owned(
            payload
                .bytes()
                .filter(|b| !b.is_ascii_whitespace())
                .collect(),
        )
    } else {
        Cow::Borrowed(payload.as_bytes())
    };
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map(Bytes::from)
        .map_err(|error| {
            ApiError::client(
                ErrorCode::InvalidBase64,
                format!("image.data is not valid base64: {error}"),
            )
        })
}

/// At most this many parts in a multipart job: the form has four fields.
const MAX_PARTS: usize = 16;

async fn from_multipart(
    request: Request<Body>,
) -> Result<(RawJob<'static>, Option<Bytes>), ApiError> {
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|rejection| {
            ApiError::client(
                ErrorCode::InvalidRequest,
                format!("the multipart body cannot be read: {rejection}"),
            )
        })?;
    let mut raw = RawJob::default();
    let mut image = None;
    let mut parts = 0;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(error) => return Err(multipart_error(error)),
        };
        parts += 1;
        if parts > MAX_PARTS {
            return Err(ApiError::client(
                ErrorCode::InvalidRequest,
                format!("the multipart body has more than {MAX_PARTS} parts"),
            ));
        }
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" => image = Some(field.bytes().await.map_err(multipart_error)?),
            "prompt" | "size" | "n" => {
                let text = field.text().await.map_err(multipart_error)?;
                match name.as_str() {
                    "prompt" => raw.prompt = Some(Cow::Owned(text)),
                    "size" => raw.size = Some(Cow::Owned(text)),
                    _ => {
                        raw.n = Some(text.trim().parse().map_err(|_| {
                            ApiError::client(ErrorCode::InvalidN, "n must be a whole number")
                        })?)
                    }
                }
            }
            // Unknown parts are drained and ignored, like unknown JSON fields.
            _ => {
                field.bytes().await.map_err(multipart_error)?;
            }
        }
    }
    Ok((raw, image))
}

fn multipart_error(error: axum::extract::multipart::MultipartError) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::client(
            ErrorCode::PayloadTooLarge,
            "the request body is larger than the limit",
        )
    } else {
        ApiError::client(
            ErrorCode::InvalidRequest,
            format!("the multipart body cannot be read: {}", error.body_text()),
        )
    }
}

fn validate(
    raw: RawJob<'_>,
    image: Option<Bytes>,
    settings: &Settings,
) -> Result<JobRequest, ApiError> {
    let prompt = Prompt::parse(
        raw.prompt.as_deref().unwrap_or_default(),
        settings.jobs.max_prompt_chars.get(),
    )
    .map_err(|error| match error {
        PromptError::Empty => {
            ApiError::client(ErrorCode::PromptRequired, "a non-empty prompt is required")
        }
        PromptError::TooLong { .. } => {
            ApiError::client(ErrorCode::PromptTooLong, error.to_string())
        }
    })?;
    let size = match raw.size.as_deref().map(str::trim) {
        None | Some("") => ImageSize::Auto,
        Some(text) => ImageSize::parse(text).ok_or_else(|| {
            let known: Vec<&str> = ImageSize::ALL.iter().map(ImageSize::as_str).collect();
            ApiError::client(
                ErrorCode::InvalidSize,
                format!("unknown size {text:?}; use one of {}", known.join(", ")),
            )
        })?,
    };
    let max_images = settings.jobs.max_images.get();
    let n = raw.n.unwrap_or(1);
    if !(1..=max_images).contains(&n) {
        return Err(ApiError::client(
            ErrorCode::InvalidN,
            format!("n must be between 1 and {max_images}"),
        ));
    }
    let image = image
        .map(|bytes| checked_image(bytes, settings))
        .transpose()?;
    Ok(JobRequest {
        prompt,
        size,
        n,
        image,
    })
}

/// An answer to a clarification question.
#[derive(Debug, Clone)]
pub struct ClarifyRequest {
    pub intent: Intent,
    pub prompt: Option<Prompt>,
    pub image: Option<(Bytes, ImageMime)>,
}

#[derive(Debug, Default, Deserialize)]
struct RawClarify<'a> {
    #[serde(borrow)]
    intent: Option<Cow<'a, str>>,
    #[serde(borrow)]
    prompt: Option<Cow<'a, str>>,
    #[serde(borrow)]
    image: Option<RawImage<'a>>,
}

/// Parses `POST /v1/jobs/{id}/clarify`: `{"intent": "create"|"edit"|"upscale", "prompt"?,
/// "image"?}`: any intent but `unclear`.
pub async fn parse_clarification(
    request: Request<Body>,
    settings: &Settings,
) -> Result<ClarifyRequest, ApiError> {
    let limit = settings.api.max_body_bytes.get();
    let bytes = read_body(request, limit).await?;
    let raw: RawClarify<'_> = parse_json(&bytes)?;
    let intent = match raw.intent.as_deref().map(str::trim).and_then(Intent::parse) {
        Some(intent) if intent != Intent::Unclear => intent,
        _ => {
            return Err(ApiError::client(
                ErrorCode::InvalidIntent,
                "intent must be \"create\", \"edit\" or \"upscale\"",
            ));
        }
    };
    let prompt = match raw.prompt {
        None => None,
        Some(text) => Some(
            Prompt::parse(&text, settings.jobs.max_prompt_chars.get()).map_err(
                |error| match error {
                    PromptError::Empty => ApiError::client(
                        ErrorCode::PromptRequired,
                        "the prompt, when given, must not be empty",
                    ),
                    PromptError::TooLong { .. } => {
                        ApiError::client(ErrorCode::PromptTooLong, error.to_string())
                    }
                },
            )?,
        ),
    };
    let image = match raw.image {
        None => None,
        Some(image) => Some(checked_image(decode_base64(&image.data)?, settings)?),
    };
    Ok(ClarifyRequest {
        intent,
        prompt,
        image,
    })
}

/// An uploaded image, accepted only if its bytes are a PNG, JPEG or WebP whose header can be
/// read and whose sides are within `jobs.max_image_side`; no pixel is decoded here.
fn checked_image(bytes: Bytes, settings: &Settings) -> Result<(Bytes, ImageMime), ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::client(
            ErrorCode::InvalidField,
            "the image is empty",
        ));
    }
    let mime = ImageMime::sniff(&bytes).ok_or_else(|| {
        ApiError::client(
            ErrorCode::UnsupportedImageType,
            "the image must be a PNG, JPEG or WebP file",
        )
    })?;
    let (width, height) = image_dimensions(&bytes).ok_or_else(|| {
        ApiError::client(
            ErrorCode::InvalidImage,
            format!(
                "the image's {} header cannot be read: the file is truncated or corrupt",
                mime.extension().to_uppercase()
            ),
        )
    })?;
    let max_side = settings.jobs.max_image_side.get();
    if width == 0 || height == 0 || width > max_side || height > max_side {
        return Err(ApiError::client(
            ErrorCode::InvalidImage,
            format!("the image is {width}x{height} pixels; each side must be 1 to {max_side}"),
        ));
    }
    Ok((bytes, mime))
}
