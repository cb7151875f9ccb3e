//! New images, edits and upscales on OpenAI's image model (`/images/generations` and the JSON
//! form of `/images/edits`), decoded in place inside the answer's body (`docs/providers.md`,
//! section 1).

use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::json;
use shared::codes::FailureCode;
use shared::config::OpenAiSettings;
use shared::domain::{ImageMime, Usage};

use super::{NAME, OpenAi, parse, provider_error};
use crate::providers::budget::{Base64Field, Encoded, HeldBody};
use crate::providers::gpt_image::Output;
use crate::providers::{
    EditRequest, GenerateRequest, GeneratedImage, ImageEditor, ImageGenerator, ImageOutput,
    ImageUpscaler, JsonBody, ProviderError, ProviderInfo, Retry, UpscaleRequest, gpt_image,
};

/// The image model on the OpenAI transport: new images, the edit fallback and upscales.
#[derive(Debug)]
pub struct OpenAiImages {
    api: Arc<OpenAi>,
    model: String,
    quality: String,
    upscale_max_size: (u32, u32),
}

impl OpenAiImages {
    pub fn new(api: Arc<OpenAi>, settings: &OpenAiSettings) -> Self {
        Self {
            api,
            model: settings.image_model.clone(),
            quality: settings.image_quality.clone(),
            upscale_max_size: settings.upscale_max_size,
        }
    }

    /// The most a call of this model at its quality can bill.
    fn worst_case(&self, output: Output, n: u32, prompt: &str, inputs: u32) -> Usage {
        Usage {
            provider: NAME.to_string(),
            model: self.model.clone(),
            ..gpt_image::worst_case(&self.quality, output, n, prompt, inputs)
        }
    }

    /// POSTs an images request and decodes the answer. The base64 is decoded in place, inside
    /// the body it arrived in, and the body is released (with its share of the budget) only
    /// once the images are stored.
    async fn post_images(
        &self,
        endpoint: &str,
        body: JsonBody,
        requested_size: &str,
    ) -> Result<ImageOutput, ProviderError> {
        let held = self
            .api
            .post_raw(&self.api.image_http, endpoint, body)
            .await?;
        let ImagesResponse {
            data,
            usage,
            size,
            quality,
        } = parse(endpoint, held.bytes())?;
        let encoded = locate_images(&held, &data)?;
        drop(data);
        let images = decode_images(held, encoded)?;
        self.image_output(images, usage, size, quality, requested_size)
    }

    /// Turns the decoded images and the answer's usage into the output to bill.
    fn image_output(
        &self,
        images: Vec<GeneratedImage>,
        usage: Option<ImageUsage>,
        size: Option<String>,
        quality: Option<String>,
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
            // The call path adds the agent.
            agent: String::new(),
            provider: NAME.to_string(),
            model: self.model.clone(),
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
            quality: Some(quality.unwrap_or_else(|| self.quality.clone())),
        };
        Ok(ImageOutput {
            images,
            text: None,
            usage,
        })
    }
}

impl ProviderInfo for OpenAiImages {
    fn provider(&self) -> &'static str {
        NAME
    }

    fn model(&self) -> &str {
        &self.model
    }
}

#[async_trait]
impl ImageGenerator for OpenAiImages {
    fn estimate(&self, request: &GenerateRequest) -> Usage {
        self.worst_case(Output::Fixed(request.size), request.n, &request.prompt, 0)
    }

    async fn generate(&self, request: &GenerateRequest) -> Result<ImageOutput, ProviderError> {
        let body = JsonBody::new(json!({
            "model": self.model,
            "prompt": request.prompt,
            "n": request.n,
            "size": request.size.as_str(),
            "quality": self.quality,
            "output_format": "png",
        }));
        self.post_images("images/generations", body, request.size.as_str())
            .await
    }
}

#[async_trait]
impl ImageEditor for OpenAiImages {
    fn estimate(&self, request: &EditRequest) -> Usage {
        self.worst_case(Output::Fixed(request.size), request.n, &request.prompt, 1)
    }

    /// Uses the JSON form of `/images/edits` (GPT image models only): the input travels as a
    /// base64 data URL, which saves building a multipart body.
    async fn edit(&self, request: &EditRequest) -> Result<ImageOutput, ProviderError> {
        let data_url = format!(
            "data:{};base64,{}",
            request.mime_type.as_str(),
            BASE64.encode(&request.image)
        );
        let body = JsonBody::new(json!({
            "model": self.model,
            "prompt": request.prompt,
            "images": [{"image_url": data_url}],
            "n": request.n,
            "size": request.size.as_str(),
            "quality": self.quality,
            "output_format": "png",
        }));
        self.post_images("images/edits", body, request.size.as_str())
            .await
    }
}

#[async_trait]
impl ImageUpscaler for OpenAiImages {
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
        self.worst_case(output, 1, &request.prompt, 1)
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
        let body = JsonBody::new(json!({
            "model": self.model,
            "prompt": request.prompt,
            "images": [{"image_url": data_url}],
            "n": 1,
            "size": size,
            "quality": self.quality,
            "output_format": "png",
        }));
        self.post_images("images/edits", body, &size).await
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::openai::test_support::*;

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

        let openai = images(&server);
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
        assert_eq!(output.usage.model, "gpt-image-1.5");
        assert_eq!(output.usage.input_image_tokens, 388);
        assert_eq!(output.usage.output_image_tokens, 3168);
        // No size in the answer: the requested one is what was billed.
        assert_eq!(output.usage.size.as_deref(), Some("2048x1536"));
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

        let output = images(&server)
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
                agent: String::new(),
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

        let output = images(&server).generate(&generate_request()).await.unwrap();

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

        let error = images(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::BadResponse);
        assert_eq!(error.retry, Retry::No);
    }

    #[tokio::test]
    async fn edit_sends_the_image_as_a_json_data_url() {
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

        let output = images(&server)
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
        assert_eq!(output.usage.input_image_tokens, 323);
        assert_eq!(output.usage.output_image_tokens, 1056);
    }
}
