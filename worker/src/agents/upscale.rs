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

use super::{Agent, AgentContext, CallSpec, Failure, JobError, JobInput, Keywords, Outcome, Route};
use crate::providers::{ImageUpscaler, UpscaleRequest};

pub const ROUTE: Route = Route {
    intent: Intent::Upscale,
    description: "a larger or higher-resolution version of the user's image with nothing else \
                  changed (upscale, enlarge, increase the resolution, make it 4K); any other \
                  change to the image is an edit.",
    offered: false,
    keywords: Keywords {
        words: &[
            "upscale",
            "upscaled",
            "upscaling",
            "enlarge",
            "enlarged",
            "upsample",
            "upsampled",
            "upres",
            "uprez",
            "superresolution",
        ],
        phrases: &[
            "increase the resolution",
            "increase resolution",
            "higher resolution",
            "super resolution",
        ],
        phrases_with_image: &["in 4k", "to 4k", "high resolution", "hi res"],
    },
};

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
    fn route(&self) -> Option<Route> {
        Some(ROUTE)
    }

    async fn run(&self, job: &JobInput, cx: &AgentContext) -> Result<Outcome, JobError> {
        let upscaler = &*self.upscaler;
        let request = upscale_request(job, upscaler).map_err(JobError::Permanent)?;
        let spec = CallSpec::new(upscaler, &request.prompt)
            .images(1)
            .estimate(upscaler.estimate(&request));
        let output = cx.call(&spec, || upscaler.upscale(&request)).await?;
        Ok(Outcome::Images(output.images))
    }
}

/// The provider request for a job: its image, the instruction with the user's words, and the
/// target size the upscaler chooses for the image's dimensions. Fails, before any billed call,
/// without an image, with an image whose size cannot be read, or with one that is already as
/// large as the model allows.
fn upscale_request(
    job: &JobInput,
    upscaler: &dyn ImageUpscaler,
) -> Result<UpscaleRequest, Failure> {
    let Some((image, mime_type)) = job.image.clone() else {
        return Err(Failure::with_message(
            FailureCode::ImageRequired,
            "An upscale needs an image: attach the image you want enlarged.",
            "upscale agent reached without an input image",
        ));
    };
    let input = image_dimensions(&image).ok_or_else(|| {
        Failure::with_message(
            FailureCode::InvalidRequest,
            "The image could not be read. Please attach a PNG, JPEG or WebP image and try again.",
            "upscale: cannot read the input image's dimensions",
        )
    })?;
    let (width, height) = upscaler.target_size(input).ok_or_else(|| {
        let max_size = upscaler.max_size();
        Failure::with_message(
            FailureCode::ImageAtMaxSize,
            format!(
                "Your image ({}x{}) is already as large as we can make it.",
                input.0, input.1
            ),
            format!(
                "upscale: input {}x{} is not smaller than the largest output within {}x{}",
                input.0, input.1, max_size.0, max_size.1
            ),
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shared::domain::{ImageMime, ImageSize, JobId};

    use crate::providers::simulated::Simulated;

    const MAX: (u32, u32) = (3840, 2160);

    /// The simulated stand-in for OpenAI's image model, whose largest upscale is `max_size`.
    fn upscaler(max_size: (u32, u32)) -> Simulated {
        let mut settings = shared::config::Settings::defaults().unwrap();
        settings.openai.upscale_max_size = max_size;
        Simulated::openai_images(&settings)
    }

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
    fn the_request_carries_the_image_the_instruction_and_the_target_size() {
        let image = png(48, 32);
        let request = upscale_request(
            &job("Upscale this photo", Some(image.clone())),
            &upscaler(MAX),
        )
        .unwrap();

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
            upscale_request(&job("  ", Some(image)), &upscaler(MAX))
                .unwrap()
                .prompt,
            INSTRUCTION
        );
    }

    #[test]
    fn without_an_image_the_job_fails_asking_for_one() {
        let failure = upscale_request(&job("upscale this", None), &upscaler(MAX)).unwrap_err();
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
        let failure = upscale_request(&job("upscale this", Some(png(64, 64))), &upscaler((64, 64)))
            .unwrap_err();
        assert_eq!(failure.code, FailureCode::ImageAtMaxSize);
        assert!(failure.message.contains("64x64"), "{}", failure.message);
    }

    #[test]
    fn unreadable_bytes_are_an_invalid_request() {
        let bytes = Bytes::from_static(b"\x89PNG\r\n\x1a\nbroken");
        let failure =
            upscale_request(&job("upscale this", Some(bytes)), &upscaler(MAX)).unwrap_err();
        assert_eq!(failure.code, FailureCode::InvalidRequest);
    }
}
