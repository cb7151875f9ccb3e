//! The simulated provider: stands in for OpenAI or Gemini when no API key is configured, so the
//! whole service (queue, agents, storage, costs, dashboard) runs end to end offline and in tests.
//!
//! It behaves like the real thing where the rest of Pictor can tell: it waits the configured
//! delay, classifies with a keyword heuristic, returns real PNGs at the requested size (drawn
//! deterministically from the prompt, so the same prompt gives the same picture), derives edits
//! from the input image, upscales by resampling the input to the requested size, and reports plausible token usage under the name of the provider it
//! stands in for, marked `simulated` so the cost ledger can tell.

use std::io::Cursor;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::imageops::FilterType;
use image::{DynamicImage, ExtendedColorType, ImageEncoder, ImageReader, Limits, Rgb, RgbImage};
use shared::codes::FailureCode;
use shared::config::Settings;
use shared::domain::{ImageMime, ImageSize, Intent, Usage};

use super::{
    Classification, Classifier, ClassifyRequest, EditRequest, GenerateRequest, GeneratedImage,
    ImageEditor, ImageGenerator, ImageOutput, ImageUpscaler, Keywords, ProviderError, ProviderInfo,
    Retry, Route, UpscaleRequest, gemini, gpt_image, openai,
};
use gpt_image::Output;

pub const NAME: &str = "simulated";

/// Pictures are drawn at a quarter of their size and scaled up with nearest-neighbour, which
/// keeps a debug build fast while the output still has the requested dimensions.
const DRAW_SCALE: u32 = 4;

/// Edits are returned at the input's size, capped on the long side like the real models.
const MAX_EDIT_SIDE: u32 = 1536;

/// Largest input side decoded; anything bigger is refused as a real provider would.
const MAX_INPUT_SIDE: u32 = 8192;

/// Most pixels of an input decoded: 4096x4096, 64 MiB as RGBA. The real providers only read an
/// input's header in the worker (the provider decodes it), so the simulator is the one place a
/// worker decodes a user's image: an 8192x8192 PNG that compresses to a few hundred KiB would
/// take 256 MiB decoded and as much again per copy, for every such job in flight. A larger
/// input is refused from its header, before anything is decoded.
const MAX_INPUT_PIXELS: u64 = 4096 * 4096;

/// Bytes the decoder may allocate: the pixel budget at 16-bit RGBA, the widest layout decoded.
const MAX_INPUT_ALLOC: u64 = MAX_INPUT_PIXELS * 8;

/// Output tokens Gemini bills for one image of about a megapixel.
const GEMINI_IMAGE_TOKENS: u64 = 1290;

/// Phrases by which a user points at a picture of their own.
const OWN_IMAGE_PHRASES: &[&str] = &[
    "my photo",
    "my picture",
    "my image",
    "my selfie",
    "this photo",
    "this picture",
    "this image",
    "the photo",
    "the picture",
    "the image",
    "attached",
    "uploaded",
];

/// Words that carry no subject: a prompt made only of these says nothing to draw.
const FILLER_WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "help",
    "hmm",
    "hm",
    "what",
    "why",
    "how",
    "ok",
    "okay",
    "hi",
    "hello",
    "hey",
    "please",
    "pls",
    "can",
    "could",
    "you",
    "i",
    "me",
    "my",
    "do",
    "it",
    "this",
    "that",
    "something",
    "anything",
    "idea",
    "ideas",
    "want",
    "need",
    "thing",
    "stuff",
    "image",
    "picture",
    "photo",
    "some",
    "make",
    "draw",
    "create",
    "generate",
];

const UNCLEAR_QUESTION_WITH_IMAGE: &str = "What would you like me to change in your image?";
const UNCLEAR_QUESTION: &str =
    "What would you like me to create? Describe the subject, or attach an image to edit it.";

/// A stand-in for one real provider; see the module documentation.
#[derive(Debug, Clone)]
pub struct Simulated {
    /// Name of the provider stood in for, reported in `Usage::provider`.
    stands_in_for: &'static str,
    model: String,
    /// OpenAI's image quality; `None` for Gemini, which has no such setting.
    image_quality: Option<String>,
    /// The largest upscale, as the real model's setting says.
    upscale_max_size: (u32, u32),
    delay: Duration,
}

impl Simulated {
    /// Stands in for OpenAI's router model.
    pub fn openai_router(settings: &Settings) -> Self {
        Self {
            model: settings.openai.router_model.clone(),
            ..Self::openai_images(settings)
        }
    }

    /// Stands in for OpenAI's image model: new images, the edit fallback and upscales.
    pub fn openai_images(settings: &Settings) -> Self {
        Self {
            stands_in_for: openai::NAME,
            model: settings.openai.image_model.clone(),
            image_quality: Some(settings.openai.image_quality.clone()),
            upscale_max_size: settings.openai.upscale_max_size,
            delay: settings.simulated.delay,
        }
    }

    /// Stands in for Gemini's image edits.
    pub fn gemini(settings: &Settings) -> Self {
        Self {
            stands_in_for: gemini::NAME,
            model: settings.gemini.image_model.clone(),
            image_quality: None,
            upscale_max_size: settings.openai.upscale_max_size,
            delay: settings.simulated.delay,
        }
    }

    /// Usage under the stood-in provider's name; the call path adds the agent.
    fn usage(&self) -> Usage {
        Usage {
            provider: self.stands_in_for.to_string(),
            model: self.model.clone(),
            simulated: true,
            ..Usage::default()
        }
    }

    /// `usage` under the stood-in provider's name and this model.
    fn named(&self, usage: Usage) -> Usage {
        Usage {
            provider: self.stands_in_for.to_string(),
            model: self.model.clone(),
            ..usage
        }
    }

    /// The worst case of the provider stood in for (holds are sized as for the real calls).
    fn image_worst_case(&self, output: Output, n: u32, prompt: &str, inputs: u32) -> Usage {
        let usage = match &self.image_quality {
            Some(quality) => gpt_image::worst_case(quality, output, n, prompt, inputs),
            None => gemini::worst_case(n, prompt),
        };
        Usage {
            simulated: true,
            ..self.named(usage)
        }
    }

    /// Output tokens for one image: OpenAI's table by quality and size, Gemini's flat count.
    fn output_image_tokens(&self, size: ImageSize) -> u64 {
        match &self.image_quality {
            Some(quality) => gpt_image::output_tokens(quality, size),
            None => GEMINI_IMAGE_TOKENS,
        }
    }
}

impl ProviderInfo for Simulated {
    fn provider(&self) -> &'static str {
        NAME
    }

    fn billing_provider(&self) -> &'static str {
        self.stands_in_for
    }

    fn model(&self) -> &str {
        &self.model
    }
}

#[async_trait]
impl Classifier for Simulated {
    fn estimate(&self, request: &ClassifyRequest) -> Usage {
        Usage {
            simulated: true,
            ..self.named(super::text_worst_case(&request.prompt))
        }
    }

    async fn classify(&self, request: &ClassifyRequest) -> Result<Classification, ProviderError> {
        tokio::time::sleep(self.delay).await;
        let (mut intent, question) =
            heuristic_intent(&request.prompt, request.has_image, &request.intents);
        // Like the real model under its strict schema, answer only an intent that was offered.
        if intent != Intent::Unclear && !request.intents.iter().any(|c| c.intent == intent) {
            intent = if request.has_image {
                Intent::Edit
            } else {
                Intent::Create
            };
        }
        let confidence = if intent == Intent::Unclear { 0.3 } else { 0.9 };
        let prompt = request
            .prompt
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        // Roughly what the real router's instructions and schema add to the user's words.
        let usage = Usage {
            input_text_tokens: text_tokens(&prompt) + 120,
            output_text_tokens: 30,
            ..self.usage()
        };
        Ok(Classification {
            intent,
            confidence,
            prompt,
            question: question.map(str::to_string),
            usage,
        })
    }
}

#[async_trait]
impl ImageGenerator for Simulated {
    fn estimate(&self, request: &GenerateRequest) -> Usage {
        self.image_worst_case(Output::Fixed(request.size), request.n, &request.prompt, 0)
    }

    async fn generate(&self, request: &GenerateRequest) -> Result<ImageOutput, ProviderError> {
        tokio::time::sleep(self.delay).await;
        let (prompt, size, n) = (request.prompt.clone(), request.size, request.n);
        let images = blocking(move || {
            (0..n)
                .map(|index| draw(&prompt, index, size))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        let usage = Usage {
            input_text_tokens: text_tokens(&request.prompt),
            output_image_tokens: self.output_image_tokens(request.size) * u64::from(request.n),
            images: request.n,
            size: Some(request.size.as_str().to_string()),
            quality: self.image_quality.clone(),
            ..self.usage()
        };
        Ok(ImageOutput {
            images,
            text: None,
            usage,
        })
    }
}

#[async_trait]
impl ImageEditor for Simulated {
    fn estimate(&self, request: &EditRequest) -> Usage {
        self.image_worst_case(Output::Fixed(request.size), request.n, &request.prompt, 1)
    }

    async fn edit(&self, request: &EditRequest) -> Result<ImageOutput, ProviderError> {
        tokio::time::sleep(self.delay).await;
        let (input, prompt, n) = (request.image.clone(), request.prompt.clone(), request.n);
        let images = blocking(move || {
            let decoded = decode_input(&input)?;
            (0..n)
                .map(|index| tint(&decoded, &prompt, index))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        let usage = Usage {
            input_text_tokens: text_tokens(&request.prompt),
            input_image_tokens: GEMINI_IMAGE_TOKENS,
            output_image_tokens: self.output_image_tokens(request.size) * u64::from(request.n),
            images: request.n,
            size: Some(request.size.as_str().to_string()),
            quality: self.image_quality.clone(),
            ..self.usage()
        };
        let text = (self.stands_in_for == gemini::NAME)
            .then(|| "Here is your edited image (simulated).".to_string());
        Ok(ImageOutput {
            images,
            text,
            usage,
        })
    }
}

/// The router heuristic over the offered intents' keywords: a narrow intent (upscale) named by
/// its words wins; an intent that needs an image (edit), asked for with an image attached, comes
/// next; a prompt with nothing to draw is unclear; an attached image, or words asking for an
/// edit of a picture the user points at, mean the offered intent that needs an image (the agent
/// will ask for the image); anything else is a new image.
fn heuristic_intent(
    prompt: &str,
    has_image: bool,
    choices: &[Route],
) -> (Intent, Option<&'static str>) {
    let lowered = prompt.to_lowercase();
    let words: Vec<&str> = lowered
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|word| !word.is_empty())
        .collect();
    let padded = format!(" {} ", words.join(" "));
    let has_phrase = |phrases: &[&str]| {
        phrases
            .iter()
            .any(|phrase| padded.contains(&format!(" {phrase} ")))
    };
    let asks_for = |keywords: &Keywords| {
        words.iter().any(|word| keywords.words.contains(word))
            || has_phrase(keywords.phrases)
            || (has_image && has_phrase(keywords.phrases_with_image))
    };
    if let Some(narrow) = choices
        .iter()
        .find(|choice| !choice.offered && asks_for(&choice.keywords))
    {
        // Without an image the router asks for one, so this holds with or without it.
        return (narrow.intent, None);
    }
    let with_image = choices
        .iter()
        .find(|choice| choice.offered && choice.intent.needs_image());
    let asked_with_image = with_image.filter(|choice| asks_for(&choice.keywords));
    if let (true, Some(choice)) = (has_image, asked_with_image) {
        return (choice.intent, None);
    }
    let says_nothing = words.iter().all(|word| FILLER_WORDS.contains(word));
    if words.len() < 3 || says_nothing {
        let question = if has_image {
            UNCLEAR_QUESTION_WITH_IMAGE
        } else {
            UNCLEAR_QUESTION
        };
        return (Intent::Unclear, Some(question));
    }
    let points_at_own = asked_with_image.is_some() && has_phrase(OWN_IMAGE_PHRASES);
    match with_image {
        Some(choice) if has_image || points_at_own => (choice.intent, None),
        _ => (Intent::Create, None),
    }
}

/// About four characters per token, as for English text.
fn text_tokens(text: &str) -> u64 {
    u64::try_from(text.chars().count() / 4).unwrap_or(u64::MAX)
}

#[async_trait]
impl ImageUpscaler for Simulated {
    fn max_size(&self) -> (u32, u32) {
        self.upscale_max_size
    }

    fn target_size(&self, input: (u32, u32)) -> Option<(u32, u32)> {
        gpt_image::target_size(input, self.upscale_max_size)
    }

    fn estimate(&self, request: &UpscaleRequest) -> Usage {
        let output = Output::Custom {
            width: request.width,
            height: request.height,
        };
        self.image_worst_case(output, 1, &request.prompt, 1)
    }

    async fn upscale(&self, request: &UpscaleRequest) -> Result<ImageOutput, ProviderError> {
        tokio::time::sleep(self.delay).await;
        let (input, width, height) = (request.image.clone(), request.width, request.height);
        let images = blocking(move || {
            let decoded = decode_input(&input)?;
            let resized = decoded.resize_exact(width, height, FilterType::Triangle);
            let pixels = resized.to_rgba8();
            Ok(vec![encode_png(
                pixels.as_raw(),
                width,
                height,
                ExtendedColorType::Rgba8,
            )?])
        })
        .await?;
        let quality = self.image_quality.as_deref().unwrap_or("medium");
        let usage = Usage {
            input_text_tokens: text_tokens(&request.prompt),
            input_image_tokens: GEMINI_IMAGE_TOKENS,
            output_image_tokens: gpt_image::output_tokens_at(quality, width, height),
            images: 1,
            size: Some(format!("{width}x{height}")),
            quality: self.image_quality.clone(),
            ..self.usage()
        };
        Ok(ImageOutput {
            images,
            text: None,
            usage,
        })
    }
}

/// Runs CPU-bound drawing off the async threads.
async fn blocking<F>(work: F) -> Result<Vec<GeneratedImage>, ProviderError>
where
    F: FnOnce() -> Result<Vec<GeneratedImage>, ProviderError> + Send + 'static,
{
    tokio::task::spawn_blocking(work).await.map_err(|error| {
        provider_error(
            FailureCode::BadResponse,
            format!("simulated drawing task failed: {error}"),
        )
    })?
}

/// Draws picture number `index` for `prompt`: a diagonal gradient with circles and bars in
/// colours picked from the prompt's hash.
fn draw(prompt: &str, index: u32, size: ImageSize) -> Result<GeneratedImage, ProviderError> {
    let (width, height) = size.dimensions();
    let mut rng = SplitMix64::new(fnv1a(prompt.as_bytes()) ^ u64::from(index).rotate_left(32));
    let (small_width, small_height) = (width / DRAW_SCALE, height / DRAW_SCALE);
    let (from, to) = (rng.colour(), rng.colour());
    let span = (small_width + small_height).max(2) - 2;
    let mut canvas = RgbImage::from_fn(small_width, small_height, |x, y| {
        let t = f64::from(x + y) / f64::from(span.max(1));
        mix(from, to, t)
    });

    for _ in 0..1 + rng.below(2) {
        let colour = rng.colour();
        let x0 = rng.below(small_width);
        let y0 = rng.below(small_height);
        let x1 = (x0 + 8 + rng.below(small_width / 2)).min(small_width);
        let y1 = (y0 + 8 + rng.below(small_height / 3)).min(small_height);
        for y in y0..y1 {
            for x in x0..x1 {
                let pixel = canvas.get_pixel_mut(x, y);
                *pixel = mix(*pixel, colour, 0.7);
            }
        }
    }
    for _ in 0..3 + rng.below(3) {
        let colour = rng.colour();
        let radius = 10 + rng.below(small_width.min(small_height) / 4);
        let (cx, cy) = (rng.below(small_width), rng.below(small_height));
        let (x0, x1) = (cx.saturating_sub(radius), (cx + radius).min(small_width));
        let (y0, y1) = (cy.saturating_sub(radius), (cy + radius).min(small_height));
        for y in y0..y1 {
            for x in x0..x1 {
                let (dx, dy) = (x.abs_diff(cx), y.abs_diff(cy));
                if dx * dx + dy * dy <= radius * radius {
                    let pixel = canvas.get_pixel_mut(x, y);
                    *pixel = mix(*pixel, colour, 0.85);
                }
            }
        }
    }

    let full = image::imageops::resize(&canvas, width, height, FilterType::Nearest);
    encode_png(full.as_raw(), width, height, ExtendedColorType::Rgb8)
}

fn decode_input(bytes: &[u8]) -> Result<DynamicImage, ProviderError> {
    let invalid =
        |what: String| provider_error(FailureCode::InvalidRequest, format!("input image {what}"));
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|error| invalid(format!("cannot be read: {error}")))
    };
    // The header first: its size decides whether the pixels are decoded at all.
    let (width, height) = reader()?
        .into_dimensions()
        .map_err(|error| invalid(format!("cannot be read: {error}")))?;
    if u64::from(width) * u64::from(height) > MAX_INPUT_PIXELS {
        return Err(invalid(format!(
            "is {width}x{height}, more than the simulator's 4096x4096 pixels"
        )));
    }
    let mut reader = reader()?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    limits.max_alloc = Some(MAX_INPUT_ALLOC);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|error| invalid(format!("cannot be decoded: {error}")))
}

/// Edit number `index`: the input, capped in size, pulled strongly towards a colour picked from
/// the prompt and, for some prompts, inverted first, so the change is always visible.
fn tint(input: &DynamicImage, prompt: &str, index: u32) -> Result<GeneratedImage, ProviderError> {
    let mut rng = SplitMix64::new(fnv1a(prompt.as_bytes()) ^ u64::from(index).rotate_left(32));
    let capped = if input.width().max(input.height()) > MAX_EDIT_SIDE {
        input.resize(MAX_EDIT_SIDE, MAX_EDIT_SIDE, FilterType::Triangle)
    } else {
        input.clone()
    };
    let mut pixels = capped.to_rgba8();
    let colour = rng.colour();
    let invert = rng.below(2) == 0;
    // One lookup table per channel keeps the per-pixel work to three loads, even in debug builds.
    let mut tables = [[0u8; 256]; 3];
    for (value, byte) in (0..=255u8).enumerate() {
        let source = if invert { 255 - byte } else { byte };
        let tinted = mix(Rgb([source; 3]), colour, 0.45);
        for channel in 0..3 {
            tables[channel][value] = tinted[channel];
        }
    }
    for pixel in pixels.pixels_mut() {
        for channel in 0..3 {
            pixel[channel] = tables[channel][usize::from(pixel[channel])];
        }
    }
    let (width, height) = pixels.dimensions();
    encode_png(pixels.as_raw(), width, height, ExtendedColorType::Rgba8)
}

fn encode_png(
    raw: &[u8],
    width: u32,
    height: u32,
    colour_type: ExtendedColorType,
) -> Result<GeneratedImage, ProviderError> {
    let mut bytes = Vec::new();
    PngEncoder::new_with_quality(&mut bytes, CompressionType::Fast, PngFilter::Adaptive)
        .write_image(raw, width, height, colour_type)
        .map_err(|error| {
            provider_error(
                FailureCode::BadResponse,
                format!("cannot encode png: {error}"),
            )
        })?;
    Ok(GeneratedImage {
        bytes: Bytes::from(bytes),
        mime_type: ImageMime::Png,
        budget: super::budget::BudgetShare::default(),
    })
}

fn mix(from: Rgb<u8>, to: Rgb<u8>, t: f64) -> Rgb<u8> {
    let t = t.clamp(0.0, 1.0);
    let channel = |a: u8, b: u8| {
        let value = f64::from(a) + (f64::from(b) - f64::from(a)) * t;
        // The clamp keeps the value in 0..=255, so the cast cannot truncate.
        value.round().clamp(0.0, 255.0) as u8
    };
    Rgb([
        channel(from[0], to[0]),
        channel(from[1], to[1]),
        channel(from[2], to[2]),
    ])
}

/// FNV-1a: a tiny hash that is stable across Rust versions and platforms, unlike `DefaultHasher`,
/// so a prompt draws the same picture everywhere.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64, for the same reason: a seeded sequence that never changes between versions.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (0 when `bound` is 0).
    fn below(&mut self, bound: u32) -> u32 {
        if bound == 0 {
            0
        } else {
            u32::try_from(self.next() % u64::from(bound)).unwrap_or(0)
        }
    }

    fn colour(&mut self) -> Rgb<u8> {
        let [r, g, b, ..] = self.next().to_le_bytes();
        Rgb([r, g, b])
    }
}

fn provider_error(code: FailureCode, detail: String) -> ProviderError {
    let user_message = match code {
        FailureCode::InvalidRequest => {
            "The image could not be read. Please attach a PNG, JPEG or WebP image and try again."
        }
        _ => "The image service returned an unexpected answer. Please try again in a few minutes.",
    };
    ProviderError {
        provider: NAME,
        retry: Retry::No,
        code,
        user_message: user_message.to_string(),
        detail,
        status: None,
        possibly_billed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        let mut settings = Settings::defaults().unwrap();
        settings.simulated.delay = Duration::ZERO;
        settings.openai.image_quality = "medium".to_string();
        settings
    }

    /// The routes the registry offers today.
    fn offered() -> Vec<Route> {
        use crate::agents::{create, edit, upscale};
        vec![create::ROUTE, edit::ROUTE, upscale::ROUTE]
    }

    fn decode(image: &GeneratedImage) -> DynamicImage {
        image::load_from_memory(&image.bytes).unwrap()
    }

    fn gradient_png(width: u32, height: u32) -> Bytes {
        let image = RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
        });
        let mut bytes = Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        Bytes::from(bytes.into_inner())
    }

    #[tokio::test]
    async fn the_heuristic_router_tells_create_edit_and_unclear_apart() {
        let simulated = Simulated::openai_router(&settings());
        let cases = [
            ("make it blue", true, Intent::Edit),
            ("Remove the background, please", true, Intent::Edit),
            ("a cat wearing a tiny hat", true, Intent::Edit),
            ("remove the background from my photo", false, Intent::Edit),
            ("a watercolor fox in a misty forest", false, Intent::Create),
            (
                "add a lighthouse to a stormy seascape",
                false,
                Intent::Create,
            ),
            ("hmm?", false, Intent::Unclear),
            ("help", false, Intent::Unclear),
            ("can you help me?", false, Intent::Unclear),
            ("hmm?", true, Intent::Unclear),
            ("upscale this", true, Intent::Upscale),
            ("please increase the resolution", true, Intent::Upscale),
            (
                "can you make this photo 4k? i mean in 4k",
                true,
                Intent::Upscale,
            ),
            ("enlarge my photo", false, Intent::Upscale),
            ("a castle on a hill in 4k", false, Intent::Create),
        ];
        for (prompt, has_image, expected) in cases {
            let classification = simulated
                .classify(&ClassifyRequest {
                    prompt: prompt.to_string(),
                    has_image,
                    intents: offered(),
                })
                .await
                .unwrap();
            assert_eq!(
                classification.intent, expected,
                "{prompt:?} image={has_image}"
            );
            if expected == Intent::Unclear {
                assert_eq!(classification.confidence, 0.3);
                assert!(classification.question.is_some(), "{prompt:?}");
            } else {
                assert_eq!(classification.confidence, 0.9);
                assert_eq!(classification.question, None);
            }
        }
    }

    #[tokio::test]
    async fn an_intent_that_is_not_offered_is_never_answered() {
        let classification = Simulated::openai_router(&settings())
            .classify(&ClassifyRequest {
                prompt: "please upscale my holiday photo".to_string(),
                has_image: true,
                intents: offered()
                    .into_iter()
                    .filter(|choice| choice.intent != Intent::Upscale)
                    .collect(),
            })
            .await
            .unwrap();
        assert_eq!(classification.intent, Intent::Edit);
    }

    #[tokio::test]
    async fn upscales_resample_the_input_to_the_requested_size_and_bill_like_openai() {
        let settings = settings();
        let simulated = Simulated::openai_images(&settings);
        assert_eq!(simulated.max_size(), settings.openai.upscale_max_size);
        let input = gradient_png(40, 30);
        let output = simulated
            .upscale(&UpscaleRequest {
                prompt: "Upscale this image.".to_string(),
                image: input,
                mime_type: ImageMime::Png,
                width: 160,
                height: 128,
            })
            .await
            .unwrap();

        assert_eq!(output.images.len(), 1);
        let decoded = decode(&output.images[0]);
        assert_eq!((decoded.width(), decoded.height()), (160, 128));
        assert_eq!(output.usage.provider, "openai");
        assert_eq!(output.usage.model, settings.openai.image_model);
        assert!(output.usage.simulated);
        assert_eq!(output.usage.images, 1);
        assert_eq!(output.usage.size.as_deref(), Some("160x128"));
        // 1056 medium tokens per 1024x1024, scaled by area and rounded up.
        assert_eq!(
            output.usage.output_image_tokens,
            (1056u64 * 160 * 128).div_ceil(1024 * 1024)
        );
        assert_eq!(gpt_image::output_tokens_at("medium", 1024, 1024), 1056);
    }

    #[tokio::test]
    async fn router_usage_names_the_stood_in_provider_and_is_marked_simulated() {
        let settings = settings();
        let prompt = "a lighthouse on a cliff at dusk, oil painting"; // 45 characters
        let classification = Simulated::openai_router(&settings)
            .classify(&ClassifyRequest {
                prompt: format!("  {prompt}  "),
                has_image: false,
                intents: offered(),
            })
            .await
            .unwrap();
        assert_eq!(classification.prompt, prompt);
        assert_eq!(
            classification.usage,
            Usage {
                provider: "openai".to_string(),
                model: settings.openai.router_model.clone(),
                simulated: true,
                input_text_tokens: 45 / 4 + 120,
                output_text_tokens: 30,
                ..Usage::default()
            }
        );
    }

    #[tokio::test]
    async fn generated_images_are_real_pngs_of_the_requested_size() {
        let simulated = Simulated::openai_images(&settings());
        let output = simulated
            .generate(&GenerateRequest {
                prompt: "a red fox in the snow".to_string(),
                size: ImageSize::Landscape,
                n: 2,
            })
            .await
            .unwrap();

        assert_eq!(output.images.len(), 2);
        for image in &output.images {
            assert_eq!(image.mime_type, ImageMime::Png);
            assert_eq!(ImageMime::sniff(&image.bytes), Some(ImageMime::Png));
            let decoded = decode(image);
            assert_eq!((decoded.width(), decoded.height()), (1536, 1024));
        }
        assert_ne!(output.images[0].bytes, output.images[1].bytes);
        assert_eq!(output.usage.provider, "openai");
        assert!(output.usage.simulated);
        assert_eq!(output.usage.output_image_tokens, 2 * 1568);
        assert_eq!(output.usage.images, 2);
        assert_eq!(output.usage.size.as_deref(), Some("1536x1024"));
        assert_eq!(output.usage.quality.as_deref(), Some("medium"));
    }

    #[tokio::test]
    async fn the_same_prompt_draws_the_same_picture_and_another_prompt_does_not() {
        let simulated = Simulated::openai_images(&settings());
        let request = |prompt: &str| GenerateRequest {
            prompt: prompt.to_string(),
            size: ImageSize::Square,
            n: 1,
        };
        let first = simulated.generate(&request("a castle")).await.unwrap();
        let again = simulated.generate(&request("a castle")).await.unwrap();
        let other = simulated.generate(&request("a submarine")).await.unwrap();
        assert_eq!(first.images[0].bytes, again.images[0].bytes);
        assert_ne!(first.images[0].bytes, other.images[0].bytes);
        assert_eq!(first.usage.output_image_tokens, 1056);
    }

    #[tokio::test]
    async fn edits_keep_the_input_size_change_the_pixels_and_bill_like_gemini() {
        let settings = settings();
        let input = gradient_png(300, 200);
        let output = Simulated::gemini(&settings)
            .edit(&EditRequest {
                prompt: "make it look like a sunset".to_string(),
                image: input.clone(),
                mime_type: ImageMime::Png,
                size: ImageSize::Landscape,
                n: 1,
            })
            .await
            .unwrap();

        let edited = decode(&output.images[0]).to_rgb8();
        let original = image::load_from_memory(&input).unwrap().to_rgb8();
        assert_eq!(edited.dimensions(), (300, 200));
        let changed = edited
            .pixels()
            .zip(original.pixels())
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            changed > 300 * 200 * 9 / 10,
            "only {changed} pixels changed"
        );
        assert_eq!(
            output.usage,
            Usage {
                provider: "gemini".to_string(),
                model: settings.gemini.image_model.clone(),
                simulated: true,
                input_text_tokens: 6,
                input_image_tokens: 1290,
                output_image_tokens: 1290,
                images: 1,
                size: Some("1536x1024".to_string()),
                ..Usage::default()
            }
        );
        assert!(output.text.is_some());
    }

    #[tokio::test]
    async fn large_inputs_are_capped_on_the_long_side() {
        let output = Simulated::openai_images(&settings())
            .edit(&EditRequest {
                prompt: "add a rainbow".to_string(),
                image: gradient_png(2000, 1000),
                mime_type: ImageMime::Png,
                size: ImageSize::Landscape,
                n: 2,
            })
            .await
            .unwrap();
        assert_eq!(output.images.len(), 2);
        let decoded = decode(&output.images[0]);
        assert_eq!((decoded.width(), decoded.height()), (1536, 768));
        assert_eq!(output.usage.provider, "openai");
        assert_eq!(output.usage.output_image_tokens, 2 * 1568);
    }

    #[tokio::test]
    async fn an_unreadable_input_image_is_a_permanent_invalid_request() {
        let error = Simulated::gemini(&settings())
            .edit(&EditRequest {
                prompt: "make it blue".to_string(),
                image: Bytes::from_static(b"definitely not an image"),
                mime_type: ImageMime::Png,
                size: ImageSize::Square,
                n: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(error.code, FailureCode::InvalidRequest);
        assert_eq!(error.retry, Retry::No);
        assert_eq!(error.provider, "simulated");
    }

    /// A PNG of one colour: tiny on the wire, `width * height * 4` bytes decoded.
    fn flat_png(width: u32, height: u32) -> Bytes {
        let image = image::RgbaImage::from_pixel(width, height, image::Rgba([9, 9, 9, 255]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        Bytes::from(bytes.into_inner())
    }

    #[tokio::test]
    async fn an_input_above_the_pixel_budget_is_refused_from_its_header() {
        let huge = flat_png(8192, 8192);
        assert!(huge.len() < 2 << 20, "{} bytes on the wire", huge.len());
        let simulated = Simulated::gemini(&settings());
        let started = std::time::Instant::now();
        let error = simulated
            .edit(&EditRequest {
                prompt: "make it blue".to_string(),
                image: huge.clone(),
                mime_type: ImageMime::Png,
                size: ImageSize::Square,
                n: 4,
            })
            .await
            .unwrap_err();
        assert_eq!(error.code, FailureCode::InvalidRequest);
        assert_eq!(error.retry, Retry::No);
        assert!(error.detail.contains("8192x8192"), "{}", error.detail);
        let error = Simulated::openai_images(&settings())
            .upscale(&UpscaleRequest {
                prompt: "larger".to_string(),
                image: huge,
                mime_type: ImageMime::Png,
                width: 3840,
                height: 2160,
            })
            .await
            .unwrap_err();
        assert_eq!(error.code, FailureCode::InvalidRequest);
        // Nothing was decoded: refusing took the header read and the simulated delay only.
        assert!(started.elapsed() < Duration::from_secs(5));

        // A wide one within the pixel budget is decoded.
        let output = simulated
            .edit(&EditRequest {
                prompt: "make it blue".to_string(),
                image: flat_png(8192, 16),
                mime_type: ImageMime::Png,
                size: ImageSize::Landscape,
                n: 1,
            })
            .await
            .unwrap();
        assert_eq!(output.images.len(), 1);
        assert_eq!(decode_input(&flat_png(4096, 4096)).unwrap().width(), 4096);
    }

    #[tokio::test]
    async fn every_call_waits_the_configured_delay() {
        let mut settings = settings();
        settings.simulated.delay = Duration::from_millis(60);
        let started = std::time::Instant::now();
        Simulated::openai_router(&settings)
            .classify(&ClassifyRequest {
                prompt: "a quiet harbour at dawn".to_string(),
                has_image: false,
                intents: offered(),
            })
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(60));
    }

    #[test]
    fn providers_report_themselves_as_simulated() {
        let simulated = Simulated::gemini(&settings());
        assert_eq!(ProviderInfo::provider(&simulated), "simulated");
        assert_eq!(
            ProviderInfo::model(&simulated),
            settings().gemini.image_model
        );
    }
}
