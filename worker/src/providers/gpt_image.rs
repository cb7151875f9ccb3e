//! The rules of OpenAI's GPT image models that Pictor relies on outside the HTTP call: which
//! custom sizes they accept (for upscales) and how many output tokens an image of a size and
//! quality bills (`docs/providers.md`, section 1.4). The OpenAI client and its simulated
//! stand-in both follow them, so an upscale or a bill looks the same on either.

use shared::domain::{ImageSize, Usage};

/// Sides of a custom size must be multiples of this.
const SIDE_STEP: u32 = 16;

/// The widest aspect ratio the models accept (3:1, either way).
const MAX_ASPECT: u32 = 3;

/// The largest size within `max_size` (landscape; turned for portrait inputs) with the input's
/// aspect ratio, each side rounded down to a multiple of 16. A ratio beyond 3:1, the model's
/// limit, is fitted as 3:1 (the model pads or crops). `None` when that is not larger than the
/// input.
pub fn target_size(input: (u32, u32), max_size: (u32, u32)) -> Option<(u32, u32)> {
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

/// Output tokens billed for one image of a fixed size; `auto` counts as square, and any
/// quality but `low` and `high` as `medium`.
pub fn output_tokens(quality: &str, size: ImageSize) -> u64 {
    let (square, portrait, landscape) = match quality {
        "low" => (272, 408, 400),
        "high" => (4160, 6240, 6208),
        _ => (1056, 1584, 1568),
    };
    match size {
        ImageSize::Square | ImageSize::Auto => square,
        ImageSize::Portrait => portrait,
        ImageSize::Landscape => landscape,
    }
}

/// Output tokens billed for one image of a custom size: the square figure for the quality,
/// scaled by pixel area (the fixed sizes' table grows about that way), rounded up.
pub fn output_tokens_at(quality: &str, width: u32, height: u32) -> u64 {
    let square = output_tokens(quality, ImageSize::Square);
    let pixels = u64::from(width) * u64::from(height);
    (square * pixels).div_ceil(1024 * 1024)
}

/// Input tokens one input image bills at most (high input fidelity).
const INPUT_IMAGE_TOKENS: u64 = 4_160;

/// What an image call asks for, for its worst case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Fixed(ImageSize),
    Custom { width: u32, height: u32 },
}

/// The most an image call can bill, as usage to price: each of `n` images at the largest
/// output its size allows for `quality` (`auto` counts as high, an `auto` size as the largest
/// fixed size), the prompt's text with room for what the API adds, and each input image at the
/// most one bills. Budget holds are priced from this, so a hold is never below the bill.
pub fn worst_case(quality: &str, output: Output, n: u32, prompt: &str, input_images: u32) -> Usage {
    let quality = if quality == "auto" { "high" } else { quality };
    let per_image = match output {
        Output::Fixed(ImageSize::Auto) => {
            [ImageSize::Square, ImageSize::Portrait, ImageSize::Landscape]
                .into_iter()
                .map(|size| output_tokens(quality, size))
                .max()
                .unwrap_or(0)
        }
        Output::Fixed(size) => output_tokens(quality, size),
        Output::Custom { width, height } => output_tokens_at(quality, width, height),
    };
    Usage {
        output_image_tokens: per_image * u64::from(n),
        images: n,
        input_image_tokens: INPUT_IMAGE_TOKENS * u64::from(input_images),
        ..super::text_worst_case(prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: (u32, u32) = (3840, 2160);

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
    fn output_tokens_follow_the_published_table_and_scale_by_area() {
        assert_eq!(output_tokens("high", ImageSize::Portrait), 6240);
        assert_eq!(output_tokens("medium", ImageSize::Landscape), 1568);
        assert_eq!(output_tokens("low", ImageSize::Auto), 272);
        assert_eq!(output_tokens_at("medium", 1024, 1024), 1056);
        // An upscale to 3840x2160 at high quality bills about 33,000 tokens.
        assert_eq!(output_tokens_at("high", 3840, 2160), 32_907);
    }

    #[test]
    fn the_worst_case_covers_every_image_at_the_largest_size_it_may_come_in() {
        let auto = worst_case("auto", Output::Fixed(ImageSize::Auto), 2, "a fox", 0);
        assert_eq!(auto.output_image_tokens, 2 * 6_240);
        assert_eq!(auto.images, 2);
        assert_eq!(auto.input_image_tokens, 0);
        let upscale = worst_case(
            "high",
            Output::Custom {
                width: 3840,
                height: 2160,
            },
            1,
            "upscale",
            1,
        );
        assert_eq!(upscale.output_image_tokens, 32_907);
        assert_eq!(upscale.input_image_tokens, 4_160);
        assert!(upscale.input_text_tokens >= 2_000);
    }
}
