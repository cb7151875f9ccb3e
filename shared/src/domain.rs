//! Domain types shared by the api and the worker, parsed once at the edge.
//!
//! A value of one of these types is valid by construction: a `Prompt` is never empty or too long,
//! an `ImageMime` was read from the bytes rather than believed from a header, and so on. Handlers
//! and agents take these types, never raw strings, so validation lives in exactly one place.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A job's id: a UUIDv7, so ids sort by creation time (the per-user index relies on this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Uuid::parse_str(raw).ok().map(Self)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The smallest id that could have been minted at `at`; used to prune old index entries.
    pub fn floor_at(at: DateTime<Utc>) -> Self {
        let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0);
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
        bytes[6] = 0x70;
        bytes[8] = 0x80;
        Self(Uuid::from_bytes(bytes))
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A user id as it appears in API keys: short, and safe inside Redis keys and log fields.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let valid = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
        if valid {
            Ok(Self(raw.to_string()))
        } else {
            Err(format!(
                "user id {raw:?} must be 1 to 64 letters, digits or - _ . @"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Ops,
}

/// Who is calling: established by the api from the bearer key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: UserId,
    pub role: Role,
}

/// A non-empty prompt of at most the configured number of characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Prompt(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("prompt must not be empty")]
    Empty,
    #[error("prompt is {chars} characters long; the limit is {max}")]
    TooLong { chars: usize, max: usize },
}

impl Prompt {
    pub fn parse(raw: &str, max_chars: usize) -> Result<Self, PromptError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(PromptError::Empty);
        }
        let chars = trimmed.chars().count();
        if chars > max_chars {
            return Err(PromptError::TooLong {
                chars,
                max: max_chars,
            });
        }
        Ok(Self(trimmed.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Output size of an image, as the OpenAI image API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ImageSize {
    #[serde(rename = "1024x1024")]
    Square,
    #[serde(rename = "1536x1024")]
    Landscape,
    #[serde(rename = "1024x1536")]
    Portrait,
    #[serde(rename = "auto")]
    Auto,
}

impl ImageSize {
    pub const ALL: [ImageSize; 4] = [Self::Square, Self::Landscape, Self::Portrait, Self::Auto];

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|size| size.as_str() == raw)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Square => "1024x1024",
            Self::Landscape => "1536x1024",
            Self::Portrait => "1024x1536",
            Self::Auto => "auto",
        }
    }

    /// Pixel dimensions; `auto` is treated as square where a concrete size is needed.
    pub fn dimensions(&self) -> (u32, u32) {
        match self {
            Self::Square | Self::Auto => (1024, 1024),
            Self::Landscape => (1536, 1024),
            Self::Portrait => (1024, 1536),
        }
    }

    /// Gemini's aspect-ratio name for the same shape.
    pub fn aspect_ratio(&self) -> &'static str {
        match self {
            Self::Square | Self::Auto => "1:1",
            Self::Landscape => "3:2",
            Self::Portrait => "2:3",
        }
    }
}

/// An image format Pictor accepts and produces, decided from the bytes themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageMime {
    #[serde(rename = "image/png")]
    Png,
    #[serde(rename = "image/jpeg")]
    Jpeg,
    #[serde(rename = "image/webp")]
    Webp,
}

impl ImageMime {
    /// Sniffs the magic bytes; the claimed type of an upload is never trusted.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        match image::guess_format(bytes).ok()? {
            image::ImageFormat::Png => Some(Self::Png),
            image::ImageFormat::Jpeg => Some(Self::Jpeg),
            image::ImageFormat::WebP => Some(Self::Webp),
            _ => None,
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "image/png" => Some(Self::Png),
            "image/jpeg" | "image/jpg" => Some(Self::Jpeg),
            "image/webp" => Some(Self::Webp),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    pub fn extension(&self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Webp => "webp",
        }
    }
}

/// Reads width and height from an image header without decoding the pixels.
pub fn image_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Retrying,
    Succeeded,
    Failed,
    NeedsClarification,
    Canceled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        Self::Queued,
        Self::Running,
        Self::Retrying,
        Self::Succeeded,
        Self::Failed,
        Self::NeedsClarification,
        Self::Canceled,
    ];

    /// A terminal status never changes again (clarification is resumed by a new request).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::NeedsClarification | Self::Canceled
        )
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::NeedsClarification => "needs_clarification",
            Self::Canceled => "canceled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == raw)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Intent {
    Create,
    Edit,
    /// A larger, higher-resolution version of the user's image.
    Upscale,
    Unclear,
}

impl Intent {
    pub const ALL: [Intent; 4] = [Self::Create, Self::Edit, Self::Upscale, Self::Unclear];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Edit => "edit",
            Self::Upscale => "upscale",
            Self::Unclear => "unclear",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|intent| intent.as_str() == raw)
    }

    /// Whether serving this intent needs an image from the user. The router asks for one, and the
    /// api refuses a clarification answer without one, from this single answer.
    pub fn needs_image(&self) -> bool {
        matches!(self, Self::Edit | Self::Upscale)
    }
}

/// Something the user should know about their job that is not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Notice {
    pub code: String,
    pub message: String,
    pub at: DateTime<Utc>,
    /// When the job will be tried again (rate-limit notices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    /// How many times this notice was given, for a notice kept up to date in place (a job
    /// deferred again and again carries one `rate_limited` notice, its `message`, `at` and
    /// `retry_at` those of the latest deferral, instead of one notice per deferral).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

impl Notice {
    pub fn now(kind: crate::codes::NoticeKind, message: impl Into<String>) -> Self {
        Self {
            code: kind.as_str().to_string(),
            message: message.into(),
            at: Utc::now(),
            retry_at: None,
            count: None,
        }
    }

    /// A notice that replaces the job's earlier notice of the same code instead of adding
    /// another (the job store counts how often it was given): the rate-limit notice of a job
    /// deferred many times.
    #[must_use]
    pub fn in_place(mut self) -> Self {
        self.count = Some(1);
        self
    }
}

/// A failure as the user sees it: a stable code and a sentence that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserError {
    pub code: String,
    pub message: String,
}

impl UserError {
    pub fn new(code: crate::codes::FailureCode, message: impl Into<String>) -> Self {
        Self {
            code: code.as_str().to_string(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Clarification {
    pub question: String,
    pub options: Vec<String>,
}

/// One stored output image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredImage {
    pub mime_type: ImageMime,
    pub width: u32,
    pub height: u32,
}

/// The image a user attached, as stored for the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputImage {
    pub mime_type: ImageMime,
    pub bytes_len: usize,
    /// The object's name under the job's input folder when it is not `source.{ext}` (an image
    /// sent with a clarification gets a name of its own, so a losing answer's upload cannot
    /// replace the winner's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What the provider reported for one billed call, kept on the job for the cost ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Agent that made the call: `router`, `create`, `edit`.
    pub agent: String,
    /// Provider that served it (`openai`, `gemini`), even when simulated.
    pub provider: String,
    pub model: String,
    /// True when the simulated provider stood in for the real one.
    #[serde(default)]
    pub simulated: bool,
    #[serde(default)]
    pub input_text_tokens: u64,
    #[serde(default)]
    pub input_image_tokens: u64,
    #[serde(default)]
    pub cached_input_tokens: u64,
    #[serde(default)]
    pub output_text_tokens: u64,
    #[serde(default)]
    pub output_image_tokens: u64,
    #[serde(default)]
    pub images: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_is_trimmed_and_bounded() {
        assert_eq!(Prompt::parse("  a cat ", 10).unwrap().as_str(), "a cat");
        assert_eq!(Prompt::parse("   ", 10), Err(PromptError::Empty));
        assert!(matches!(
            Prompt::parse(&"x".repeat(11), 10),
            Err(PromptError::TooLong { chars: 11, max: 10 })
        ));
        // Characters, not bytes: ten snowmen fit a ten-character limit.
        assert!(Prompt::parse(&"☃".repeat(10), 10).is_ok());
    }

    #[test]
    fn image_mime_is_read_from_bytes_not_claims() {
        assert_eq!(
            ImageMime::sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"),
            Some(ImageMime::Png)
        );
        assert_eq!(
            ImageMime::sniff(b"\xFF\xD8\xFF\xE0rest"),
            Some(ImageMime::Jpeg)
        );
        assert_eq!(
            ImageMime::sniff(b"RIFF\x10\0\0\0WEBPVP8 "),
            Some(ImageMime::Webp)
        );
        assert_eq!(ImageMime::sniff(b"GIF89a......"), None);
        assert_eq!(ImageMime::sniff(b"%PDF-1.7"), None);
    }

    #[test]
    fn job_ids_sort_by_creation_and_floor_is_below_later_ids() {
        let floor = JobId::floor_at(Utc::now() - chrono::Duration::seconds(1));
        let first = JobId::new();
        let second = JobId::new();
        assert!(floor.to_string() < first.to_string());
        assert!(first.to_string() <= second.to_string());
    }

    #[test]
    fn statuses_round_trip_and_know_which_are_terminal() {
        for status in JobStatus::ALL {
            assert_eq!(JobStatus::parse(status.as_str()), Some(status));
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert!(!JobStatus::Retrying.is_terminal());
        assert!(JobStatus::NeedsClarification.is_terminal());
    }

    #[test]
    fn intents_round_trip_and_know_which_need_an_image() {
        for intent in Intent::ALL {
            assert_eq!(Intent::parse(intent.as_str()), Some(intent));
            let json = serde_json::to_string(&intent).unwrap();
            assert_eq!(json, format!("\"{}\"", intent.as_str()));
        }
        assert!(Intent::Upscale.needs_image());
        assert!(Intent::Edit.needs_image());
        assert!(!Intent::Create.needs_image());
        assert_eq!(Intent::parse("enhance"), None);
    }

    #[test]
    fn sizes_parse_only_known_names() {
        assert_eq!(ImageSize::parse("1536x1024"), Some(ImageSize::Landscape));
        assert_eq!(ImageSize::parse("512x512"), None);
    }
}
