//! The `upscale` agent: a larger, higher-resolution version of the user's attached image, made by
//! the configured image upscaler (OpenAI's image edits with the configured image model at a
//! custom size, or the simulated stand-in). The output keeps the input's aspect ratio and is as
//! large as the model allows (`openai.upscale_max_size`); the instruction asks the model to change
//! nothing but resolution and detail.
//!
//! It is the worked example of `docs/adding-an-agent.md`. Without an image the router asks for
//! one (its route's intent needs an image); reached without one anyway, the job fails with
//! `image_required`. An image already at the largest size fails with `image_at_max_size` before
//! any billed call.

use std::sync::Arc;

use async_trait::async_trait;
use shared::codes::FailureCode;
use shared::domain::{Intent, image_dimensions};

use super::{Agent, AgentContext, CallSpec, Failure, JobError, JobInput, Outcome, Route};
use crate::providers::{ImageUpscaler, UpscaleRequest};

pub const NAME: &str = "upscale";

/// Sides of a custom size must be multiples of this (GPT image models' rule).
const SIDE_STEP: u32 = 16;

/// The widest aspect ratio GPT image models accept (3:1, either way).
const MAX_ASPECT: u32 = 3;

/// What the model is told; the user's own words follow it.
const INSTRUCTION: &str = "Upscale this image to a higher resolution. Reproduce it exactly: the \
same content, composition, framing, colours, lighting and style. Add only fine detail and \
sharpness; do not add, remove or change anything.";

pub struct Upscale {
    upscaler: Arc<dyn ImageUpscaler>,
}

impl Upscale {
    pub fn new(upscaler: Arc<dyn ImageUpscaler>) -> Self {
        Self { upscaler }
    }
}

#[async_trait]
impl Agent for Upscale {
    fn name(&self) -> &'static str {
        NAME
    }

    fn route(&self) -> Option<Route> {
        Some(Route {
            intent: Intent::Upscale,
            description: "a larger or higher-resolution version of the user's image with nothing \
                          else changed (upscale, enlarge, increase the resolution, make it 4K); \
                          any other change to the image is an edit.",
            offered: false,
        })
    }

    async fn run(&self, job: &JobInput, cx: &AgentContext) -> Result<Outcome, JobError> {
        let request =
            upscale_request(job, self.upscaler.max_size()).map_err(JobError::Permanent)?;
        let upscaler = &self.upscaler;
        let spec = CallSpec {
            provider: upscaler.provider(),
            billing_provider: upscaler.billing_provider(),
            model: upscaler.model(),
            prompt: &request.prompt,
            images: 1,
            tokens: 0,
            breaker: false,
        };
        let output = cx
            .call(
                &spec,
                || upscaler.upscale(&request),
                |output| output.usage.clone(),
            )
            .await?;
        Ok(Outcome::Images(output.images))
    }
}

/// The provider request for a job: its image, the instruction with the user's words, and the
/// target size for the image's dimensions. Fails, before any billed call, without an image, with
/// an image whose size cannot be read, or with one that is already as large as the model allows.
fn upscale_request(job: &JobInput, max_size: (u32, u32)) -> Result<UpscaleRequest, Failure> {
    let Some((image, mime_type)) = job.image.clone() else {
        return Err(Failure {
            code: FailureCode::ImageRequired,
            message: "An upscale needs an image: attach the image you want enlarged.".to_string(),
            detail: "upscale agent reached without an input image".to_string(),
        });
    };
    let input = image_dimensions(&image).ok_or_else(|| Failure {
        code: FailureCode::InvalidRequest,
        message: "The image could not be read. Please attach a PNG, JPEG or WebP image and try \
                  again."
            .to_string(),
        detail: "upscale: cannot read the input image's dimensions".to_string(),
    })?;
    let (width, height) = target_size(input, max_size).ok_or_else(|| Failure {
        code: FailureCode::ImageAtMaxSize,
        message: format!(
            "Your image ({}x{}) is already as large as we can make it.",
            input.0, input.1
        ),
        detail: format!(
            "upscale: input {}x{} is not smaller than the largest output within {}x{}",
            input.0, input.1, max_size.0, max_size.1
        ),
    })?;
    let prompt = match job.prompt.trim() {
        "" => INSTRUCTION.to_string(),
        words => format!("{INSTRUCTION}\n\nThe user asked: {words}"),
    };
    Ok(UpscaleRequest {
        prompt,
        image,
        mime_type,
        width,
        height,
    })
}

/// The largest size within `max_size` (landscape; turned for portrait inputs) with the input's
/// aspect ratio, each side rounded down to a multiple of 16. A ratio beyond 3:1, the model's
/// limit, is fitted as 3:1 (the model pads or crops). `None` when that is not larger than the
/// input.
fn target_size(input: (u32, u32), max_size: (u32, u32)) -> Option<(u32, u32)> {
    let (width, height) = (input.0.max(1), input.1.max(1));
    let ratio_width = width.min(height.saturating_mul(MAX_ASPECT));
    let ratio_height = height.min(width.saturating_mul(MAX_ASPECT));
    let (long_max, short_max) = (max_size.0.max(max_size.1), max_size.0.min(max_size.1));
    let (box_width, box_height) = if ratio_height > ratio_width {
        (short_max, long_max)
    } else {
        (long_max, short_max)
    };
    // Scale = min(box_width / width, box_height / height), in exact integer arithmetic.
    let (target_width, target_height) = if u64::from(box_width) * u64::from(ratio_height)
        <= u64::from(box_height) * u64::from(ratio_width)
    {
        let scaled = u64::from(ratio_height) * u64::from(box_width) / u64::from(ratio_width);
        (box_width, u32::try_from(scaled).unwrap_or(box_height))
    } else {
        let scaled = u64::from(ratio_width) * u64::from(box_height) / u64::from(ratio_height);
        (u32::try_from(scaled).unwrap_or(box_width), box_height)
    };
    let step = |side: u32| (side / SIDE_STEP * SIDE_STEP).max(SIDE_STEP);
    let (mut target_width, mut target_height) = (step(target_width), step(target_height));
    // Rounding each side down on its own may tip a 3:1 image just past 3:1; both sides are
    // multiples of 16 here, so these minimums are too.
    target_width = target_width.min(target_height.saturating_mul(MAX_ASPECT));
    target_height = target_height.min(target_width.saturating_mul(MAX_ASPECT));
    let larger =
        u64::from(target_width) * u64::from(target_height) > u64::from(width) * u64::from(height);
    larger.then_some((target_width, target_height))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shared::domain::{ImageMime, ImageSize, JobId};

    const MAX: (u32, u32) = (3840, 2160);

    fn png(width: u32, height: u32) -> Bytes {
        let image = image::RgbImage::from_pixel(width, height, image::Rgb([10, 120, 200]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        Bytes::from(bytes.into_inner())
    }

    fn job(prompt: &str, image: Option<Bytes>) -> JobInput {
        JobInput {
            id: JobId::new(),
            start: None,
            prompt: prompt.to_string(),
            size: ImageSize::Auto,
            n: 2,
            image: image.map(|bytes| (bytes, ImageMime::Png)),
        }
    }

    #[test]
    fn targets_fill_the_largest_size_in_the_images_orientation() {
        assert_eq!(target_size((32, 32), MAX), Some((2160, 2160)));
        // 1536x1024 scaled by 2160/1024 is 3240 wide, rounded down to a multiple of 16.
        assert_eq!(target_size((1536, 1024), MAX), Some((3232, 2160)));
        assert_eq!(target_size((1024, 1536), MAX), Some((2160, 3232)));
        // Wider than the box's ratio: the width is the limit.
        assert_eq!(target_size((1600, 600), MAX), Some((3840, 1440)));
        // Beyond 3:1 the output is 3:1, as large as fits.
        assert_eq!(target_size((1000, 100), MAX), Some((3840, 1280)));
        assert_eq!(target_size((100, 4000), MAX), Some((1280, 3840)));
        // The configured maximum may be written either way round.
        assert_eq!(target_size((600, 400), (2160, 3840)), Some((3232, 2160)));
    }

    #[test]
    fn every_target_side_is_a_multiple_of_16_within_3_to_1() {
        for input in [
            (33, 17),
            (641, 479),
            (4000, 100),
            (100, 4000),
            (1, 1),
            (3001, 1999),
        ] {
            let (width, height) = target_size(input, MAX).unwrap();
            assert_eq!(width % 16, 0, "{input:?}");
            assert_eq!(height % 16, 0, "{input:?}");
            assert!(width <= 3840 && height <= 3840, "{input:?}");
            assert!(width <= 3 * height && height <= 3 * width, "{input:?}");
        }
    }

    #[test]
    fn an_image_at_the_largest_size_has_no_target() {
        assert_eq!(target_size((3840, 2160), MAX), None);
        assert_eq!(target_size((2160, 3840), MAX), None);
        assert_eq!(target_size((5000, 5000), MAX), None);
    }

    #[test]
    fn the_request_carries_the_image_the_instruction_and_the_target_size() {
        let image = png(48, 32);
        let request =
            upscale_request(&job("Upscale this photo", Some(image.clone())), MAX).unwrap();

        assert_eq!(request.image, image);
        assert_eq!(request.mime_type, ImageMime::Png);
        assert_eq!((request.width, request.height), (3232, 2160));
        assert!(
            request.prompt.starts_with(INSTRUCTION),
            "{}",
            request.prompt
        );
        assert!(
            request
                .prompt
                .ends_with("The user asked: Upscale this photo"),
            "{}",
            request.prompt
        );
        assert_eq!(
            upscale_request(&job("  ", Some(image)), MAX)
                .unwrap()
                .prompt,
            INSTRUCTION
        );
    }

    #[test]
    fn without_an_image_the_job_fails_asking_for_one() {
        let failure = upscale_request(&job("upscale this", None), MAX).unwrap_err();
        assert_eq!(failure.code, FailureCode::ImageRequired);
        assert!(
            failure.message.contains("attach the image"),
            "{}",
            failure.message
        );
        assert!(!failure.is_provider_failure());
    }

    #[test]
    fn an_image_already_at_the_largest_size_fails_before_any_call() {
        let failure =
            upscale_request(&job("upscale this", Some(png(64, 64))), (64, 64)).unwrap_err();
        assert_eq!(failure.code, FailureCode::ImageAtMaxSize);
        assert!(failure.message.contains("64x64"), "{}", failure.message);
    }

    #[test]
    fn unreadable_bytes_are_an_invalid_request() {
        let bytes = Bytes::from_static(b"\x89PNG\r\n\x1a\nbroken");
        let failure = upscale_request(&job("upscale this", Some(bytes)), MAX).unwrap_err();
        assert_eq!(failure.code, FailureCode::InvalidRequest);
    }
}
