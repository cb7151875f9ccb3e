//! What a provider call cost, in integer micro-dollars, from the usage the provider reported.
//!
//! Prices live in a TOML table: the shipped one, `pricing.toml` beside this file (its header
//! documents the format and cites the sources), or an operator's replacement named by the
//! `pricing.file` setting. A model with no entry is an error, never a free call, so
//! [`PriceTable::ensure_priced`] lets each process refuse to start with a model it cannot price.
//!
//! Money is exact. Rates are written as decimal dollars per 1M tokens, which is numerically
//! micro-dollars per token; they are read from their decimal text, never through float
//! arithmetic, into integer pico-dollars per token (at most 6 decimals), and per-image prices
//! into pico-dollars per image (at most 12 decimals). A TOML float is turned back into text with
//! Rust's shortest round-trip formatting, which reproduces what was written for any rate of up to
//! 15 significant digits, so `0.075` is exactly 75,000 pico-dollars per token. A call's cost is
//! summed in pico-dollars and rounded up once to whole micro-dollars, so a call that used any
//! billed tokens never costs $0; a ledger of many calls overstates by under 1 µ$ per call.
//!
//! Cached input tokens are part of the input counts, as OpenAI and Gemini report them
//! (`cached_input_tokens` ⊆ `input_text_tokens` + `input_image_tokens`). They are charged at the
//! cached rate, or the uncached one when the table has none, and counted against text input
//! first, image input second. A simulated call carries the provider and model it stands in for
//! and is priced as that model, so demo ledgers show what the real call would have cost.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use crate::domain::Usage;

/// The shipped price table, embedded so every binary can price calls without any file.
pub const DEFAULT_PRICING_TOML: &str = include_str!("pricing.toml");

/// Decimals a per-token rate may have: dollars per 1M tokens to pico-dollars per token.
const TOKEN_RATE_DECIMALS: u32 = 6;
/// Decimals a per-image price may have: dollars to pico-dollars.
const IMAGE_PRICE_DECIMALS: u32 = 12;
const PICO_PER_MICRO: u128 = 1_000_000;

/// Why a price table could not be read or a call could not be priced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("invalid price table: {message}")]
    Syntax { message: String },
    #[error("invalid price entry for {provider} model {model}: {message}")]
    Invalid {
        provider: String,
        model: String,
        message: String,
    },
    #[error(
        "no price entry for {provider} model {model}: add it to the pricing file \
         (shared/src/pricing.toml, or the file named by pricing.file)"
    )]
    UnknownModel { provider: String, model: String },
    #[error(
        "the {provider} model {model} used tokens billed at its {rate} rate, which it lacks: \
         add it to the model's entry in the pricing file"
    )]
    MissingRate {
        provider: String,
        model: String,
        rate: &'static str,
    },
    #[error("the cost of a {provider} model {model} call is too large to represent")]
    Overflow { provider: String, model: String },
}

/// Prices of every known model, keyed by billing provider then model name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    providers: BTreeMap<String, BTreeMap<String, ModelPrices>>,
    /// The optional `name` of each model, as people call it ("GPT Image 2"), for dashboards.
    names: BTreeMap<(String, String), String>,
}

/// One model's rates: pico-dollars per token (micro-dollars per 1M tokens), and pico-dollars per
/// image for `per_image`. `None` means the model has no such rate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ModelPrices {
    input_text: Option<u64>,
    cached_input_text: Option<u64>,
    input_image: Option<u64>,
    cached_input_image: Option<u64>,
    output_text: Option<u64>,
    output_image: Option<u64>,
    per_image: Option<u64>,
}

impl PriceTable {
    /// Reads a price table in the format of `pricing.toml`.
    pub fn parse(toml: &str) -> Result<Self, PricingError> {
        let raw: BTreeMap<String, BTreeMap<String, RawEntry>> =
            toml::from_str(toml).map_err(|error| PricingError::Syntax {
                message: error.to_string().trim_end().to_string(),
            })?;
        let mut providers = BTreeMap::new();
        let mut names = BTreeMap::new();
        for (provider, models) in raw {
            let mut priced = BTreeMap::new();
            for (model, mut entry) in models {
                if let Some(name) = entry.name.take().map(|name| name.trim().to_string())
                    && !name.is_empty()
                {
                    names.insert((provider.clone(), model.clone()), name);
                }
                let prices = entry
                    .into_prices()
                    .map_err(|message| PricingError::Invalid {
                        provider: provider.clone(),
                        model: model.clone(),
                        message,
                    })?;
                priced.insert(model, prices);
            }
            providers.insert(provider, priced);
        }
        Ok(Self { providers, names })
    }

    /// The model's name as people call it, when its entry gives one (`name = "GPT Image 2"`).
    pub fn model_name(&self, provider: &str, model: &str) -> Option<&str> {
        self.names
            .get(&(provider.to_string(), model.to_string()))
            .map(String::as_str)
    }

    /// The embedded table, [`DEFAULT_PRICING_TOML`]. Its tests guarantee it parses.
    pub fn shipped() -> Result<Self, PricingError> {
        Self::parse(DEFAULT_PRICING_TOML)
    }

    /// Fails unless `model` of `provider` has an entry: the startup check for configured models.
    pub fn ensure_priced(&self, provider: &str, model: &str) -> Result<(), PricingError> {
        self.prices(provider, model).map(|_| ())
    }

    /// Every `(provider, model)` the table prices, in order.
    pub fn models(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.providers.iter().flat_map(|(provider, models)| {
            models
                .keys()
                .map(move |model| (provider.as_str(), model.as_str()))
        })
    }

    /// The cost of one call in micro-dollars, rounded up from the exact pico-dollar sum.
    pub fn cost_micros(&self, usage: &Usage) -> Result<i64, PricingError> {
        let (provider, model) = (usage.provider.as_str(), usage.model.as_str());
        let prices = self.prices(provider, model)?;
        let cached_text = usage.cached_input_tokens.min(usage.input_text_tokens);
        let cached_image = (usage.cached_input_tokens - cached_text).min(usage.input_image_tokens);
        let lines = [
            (
                "input_text",
                usage.input_text_tokens - cached_text,
                prices.input_text,
            ),
            (
                "cached_input_text",
                cached_text,
                prices.cached_input_text.or(prices.input_text),
            ),
            (
                "input_image",
                usage.input_image_tokens - cached_image,
                prices.input_image,
            ),
            (
                "cached_input_image",
                cached_image,
                prices.cached_input_image.or(prices.input_image),
            ),
            ("output_text", usage.output_text_tokens, prices.output_text),
            (
                "output_image",
                usage.output_image_tokens,
                prices.output_image,
            ),
        ];
        let overflow = || PricingError::Overflow {
            provider: provider.to_string(),
            model: model.to_string(),
        };
        let mut pico: u128 = 0;
        for (rate_name, tokens, rate) in lines {
            if tokens == 0 {
                continue;
            }
            let rate = rate.ok_or_else(|| PricingError::MissingRate {
                provider: provider.to_string(),
                model: model.to_string(),
                rate: rate_name,
            })?;
            pico = pico
                .checked_add(u128::from(tokens) * u128::from(rate))
                .ok_or_else(overflow)?;
        }
        if let Some(per_image) = prices.per_image {
            pico = pico
                .checked_add(u128::from(usage.images) * u128::from(per_image))
                .ok_or_else(overflow)?;
        }
        i64::try_from(pico.div_ceil(PICO_PER_MICRO)).map_err(|_| overflow())
    }

    fn prices(&self, provider: &str, model: &str) -> Result<&ModelPrices, PricingError> {
        self.providers
            .get(provider)
            .and_then(|models| models.get(model))
            .ok_or_else(|| PricingError::UnknownModel {
                provider: provider.to_string(),
                model: model.to_string(),
            })
    }
}

/// Micro-dollars as dollars with six decimals and no currency sign: 41000 → "0.041000".
pub fn format_usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let magnitude = micros.unsigned_abs();
    format!(
        "{sign}{}.{:06}",
        magnitude / 1_000_000,
        magnitude % 1_000_000
    )
}

/// A model entry as written; rates stay text until [`RawEntry::into_prices`] reads them exactly.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    /// The model's name for people; not a rate.
    name: Option<String>,
    input_text: Option<DecimalText>,
    cached_input_text: Option<DecimalText>,
    input_image: Option<DecimalText>,
    cached_input_image: Option<DecimalText>,
    output_text: Option<DecimalText>,
    output_image: Option<DecimalText>,
    per_image: Option<DecimalText>,
}

impl RawEntry {
    fn into_prices(self) -> Result<ModelPrices, String> {
        let token_rate = |name: &str, value: Option<DecimalText>| {
            value
                .map(|text| parse_decimal(&text.0, TOKEN_RATE_DECIMALS))
                .transpose()
                .map_err(|message| format!("{name}: {message}"))
        };
        let prices = ModelPrices {
            input_text: token_rate("input_text", self.input_text)?,
            cached_input_text: token_rate("cached_input_text", self.cached_input_text)?,
            input_image: token_rate("input_image", self.input_image)?,
            cached_input_image: token_rate("cached_input_image", self.cached_input_image)?,
            output_text: token_rate("output_text", self.output_text)?,
            output_image: token_rate("output_image", self.output_image)?,
            per_image: self
                .per_image
                .map(|text| parse_decimal(&text.0, IMAGE_PRICE_DECIMALS))
                .transpose()
                .map_err(|message| format!("per_image: {message}"))?,
        };
        if prices == ModelPrices::default() {
            return Err("it has no rates".to_string());
        }
        Ok(prices)
    }
}

/// The decimal text of a rate, whether TOML holds it as a float, an integer or a string.
struct DecimalText(String);

impl<'de> Deserialize<'de> for DecimalText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DecimalText;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a decimal number of US dollars, such as 0.40 or \"0.40\"")
            }

            // Display prints the shortest text that reads back as the same f64, without an
            // exponent: the decimal that was written, for any rate of up to 15 digits.
            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<DecimalText, E> {
                Ok(DecimalText(value.to_string()))
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<DecimalText, E> {
                Ok(DecimalText(value.to_string()))
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<DecimalText, E> {
                Ok(DecimalText(value.to_string()))
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<DecimalText, E> {
                Ok(DecimalText(value.trim().to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Parses a dollar amount such as `"70"` or `"70.50"` into micro-dollars, exactly.
pub fn parse_usd_micros(text: &str) -> Result<i64, String> {
    let micros = parse_decimal(text.trim().trim_start_matches('$'), 6)?;
    i64::try_from(micros).map_err(|_| format!("{text} is too large"))
}

/// Reads a non-negative decimal such as "0.075" as an integer count of 10^-`decimals` units,
/// exactly; more significant decimals than that is an error rather than a silent rounding.
fn parse_decimal(text: &str, decimals: u32) -> Result<u64, String> {
    if text.starts_with('-') {
        return Err(format!("{text} is negative"));
    }
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let is_digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
    if whole.is_empty() || !is_digits(whole) || !is_digits(fraction) || text.ends_with('.') {
        return Err(format!("{text:?} is not a decimal number"));
    }
    let fraction = fraction.trim_end_matches('0');
    let fraction_len = u32::try_from(fraction.len()).unwrap_or(u32::MAX);
    if fraction_len > decimals {
        return Err(format!(
            "{text} has more than {decimals} decimals, finer than Pictor can count"
        ));
    }
    let too_large = || format!("{text} is too large");
    let scale = 10u64.pow(decimals);
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let fraction: u64 = if fraction.is_empty() {
        0
    } else {
        // At most `decimals` (≤ 12) digits, so this fits.
        fraction.parse::<u64>().map_err(|_| too_large())? * 10u64.pow(decimals - fraction_len)
    };
    whole
        .checked_mul(scale)
        .and_then(|scaled| scaled.checked_add(fraction))
        .ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> PriceTable {
        PriceTable::shipped().unwrap()
    }

    fn usage(provider: &str, model: &str) -> Usage {
        Usage {
            agent: "create".to_string(),
            provider: provider.to_string(),
            model: model.to_string(),
            ..Usage::default()
        }
    }

    #[test]
    fn the_shipped_table_parses_and_prices_every_model_it_lists() {
        let table = shipped();
        for (provider, model) in [
            ("openai", "gpt-image-2"),
            ("openai", "gpt-image-1.5"),
            ("openai", "gpt-image-1-mini"),
            ("openai", "gpt-image-1"),
            ("openai", "gpt-4.1-mini"),
            ("openai", "gpt-4o-mini"),
            ("gemini", "gemini-3.1-flash-image"),
            ("gemini", "gemini-2.5-flash-image"),
            ("gemini", "gemini-3-pro-image"),
        ] {
            table.ensure_priced(provider, model).unwrap();
        }
        for (provider, model) in table.models() {
            let is_image_model = model.contains("image");
            let call = Usage {
                input_text_tokens: 1_000,
                output_text_tokens: if is_image_model { 0 } else { 100 },
                output_image_tokens: if is_image_model { 1_056 } else { 0 },
                images: u32::from(is_image_model),
                ..usage(provider, model)
            };
            let cost = table.cost_micros(&call).unwrap();
            assert!(cost > 0, "{provider} {model} cost {cost}");
        }
    }

    #[test]
    fn the_default_configured_models_are_priced() {
        let settings = crate::config::Settings::defaults().unwrap();
        let table = shipped();
        table
            .ensure_priced("openai", &settings.openai.router_model)
            .unwrap();
        table
            .ensure_priced("openai", &settings.openai.image_model)
            .unwrap();
        table
            .ensure_priced("gemini", &settings.gemini.image_model)
            .unwrap();
    }

    #[test]
    fn a_medium_square_gpt_image_2_create_costs_its_exact_token_price() {
        // 50 × $5/1M = 250 µ$, plus 1056 × $30/1M = 31,680 µ$.
        let call = Usage {
            input_text_tokens: 50,
            output_image_tokens: 1_056,
            images: 1,
            size: Some("1024x1024".to_string()),
            quality: Some("medium".to_string()),
            ..usage("openai", "gpt-image-2")
        };
        let cost = shipped().cost_micros(&call).unwrap();
        assert_eq!(cost, 31_930);
        assert_eq!(format_usd(cost), "0.031930");
    }

    #[test]
    fn cached_input_tokens_are_charged_at_the_cached_rate() {
        let table = shipped();
        // gpt-4.1-mini: 976 uncached × 0.40 = 390.4 µ$, 1024 cached × 0.10 = 102.4 µ$,
        // 24 out × 1.60 = 38.4 µ$; 531.2 µ$ rounds up to 532.
        let cached = Usage {
            agent: "router".to_string(),
            input_text_tokens: 2_000,
            cached_input_tokens: 1_024,
            output_text_tokens: 24,
            ..usage("openai", "gpt-4.1-mini")
        };
        assert_eq!(table.cost_micros(&cached).unwrap(), 532);
        // The same call with nothing cached: 2000 × 0.40 + 38.4 = 838.4 µ$ → 839.
        let uncached = Usage {
            cached_input_tokens: 0,
            ..cached
        };
        assert_eq!(table.cost_micros(&uncached).unwrap(), 839);
    }

    #[test]
    fn cached_tokens_beyond_the_text_input_are_charged_as_cached_image_input() {
        // gpt-image-1: 10 cached text × 1.25 = 12.5 µ$, 50 cached image × 2.50 = 125 µ$,
        // 50 uncached image × 10 = 500 µ$; 637.5 µ$ rounds up to 638.
        let call = Usage {
            input_text_tokens: 10,
            input_image_tokens: 100,
            cached_input_tokens: 60,
            ..usage("openai", "gpt-image-1")
        };
        assert_eq!(shipped().cost_micros(&call).unwrap(), 638);
    }

    #[test]
    fn cached_tokens_without_a_cached_rate_are_charged_at_the_input_rate() {
        let table = shipped();
        let plain = Usage {
            input_text_tokens: 100,
            ..usage("gemini", "gemini-3.1-flash-image")
        };
        let cached = Usage {
            cached_input_tokens: 100,
            ..plain.clone()
        };
        assert_eq!(table.cost_micros(&plain).unwrap(), 50);
        assert_eq!(table.cost_micros(&cached).unwrap(), 50);
    }

    #[test]
    fn a_gemini_edit_is_priced_by_modality() {
        let table = shipped();
        // gemini-3.1-flash-image: 10 text × 0.50 = 5 µ$, 1290 image in × 0.50 = 645 µ$,
        // 1290 image out × 60 = 77,400 µ$.
        let edit = Usage {
            agent: "edit".to_string(),
            input_text_tokens: 10,
            input_image_tokens: 1_290,
            output_image_tokens: 1_290,
            images: 1,
            ..usage("gemini", "gemini-3.1-flash-image")
        };
        assert_eq!(table.cost_micros(&edit).unwrap(), 78_050);
        // gemini-2.5-flash-image's published "1290 tokens ≈ $0.039" per image: 38,700 µ$.
        let output_only = Usage {
            output_image_tokens: 1_290,
            ..usage("gemini", "gemini-2.5-flash-image")
        };
        assert_eq!(table.cost_micros(&output_only).unwrap(), 38_700);
    }

    #[test]
    fn a_simulated_call_is_priced_as_the_model_it_stands_in_for() {
        let real = Usage {
            input_text_tokens: 50,
            output_image_tokens: 1_056,
            ..usage("openai", "gpt-image-2")
        };
        let simulated = Usage {
            simulated: true,
            ..real.clone()
        };
        let table = shipped();
        assert_eq!(
            table.cost_micros(&simulated).unwrap(),
            table.cost_micros(&real).unwrap()
        );
    }

    #[test]
    fn an_unknown_model_is_an_error_naming_it() {
        let table = shipped();
        let error = table
            .cost_micros(&usage("openai", "gpt-9-image"))
            .unwrap_err();
        assert_eq!(
            error,
            PricingError::UnknownModel {
                provider: "openai".to_string(),
                model: "gpt-9-image".to_string()
            }
        );
        let message = error.to_string();
        assert!(message.contains("openai model gpt-9-image"), "{message}");
        assert!(message.contains("pricing file"), "{message}");
        assert!(table.ensure_priced("gemini", "gpt-image-2").is_err());
    }

    #[test]
    fn tokens_of_a_modality_without_a_rate_are_an_error_not_free() {
        let table =
            PriceTable::parse("[openai.\"image-only\"]\ninput_text = 5.00\noutput_image = 30.00\n")
                .unwrap();
        let call = Usage {
            output_text_tokens: 5,
            ..usage("openai", "image-only")
        };
        let error = table.cost_micros(&call).unwrap_err();
        assert!(
            matches!(
                error,
                PricingError::MissingRate {
                    rate: "output_text",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_tiny_call_rounds_up_to_one_micro_dollar_and_an_empty_one_is_free() {
        let table = shipped();
        // One gpt-4o-mini input token is 0.15 µ$.
        let tiny = Usage {
            input_text_tokens: 1,
            ..usage("openai", "gpt-4o-mini")
        };
        assert_eq!(table.cost_micros(&tiny).unwrap(), 1);
        assert_eq!(
            table.cost_micros(&usage("openai", "gpt-4o-mini")).unwrap(),
            0
        );
    }

    #[test]
    fn rates_are_read_exactly_from_their_decimal_text() {
        let table = PriceTable::parse(
            r#"
            [openai."m"]
            input_text = 0.075
            cached_input_text = "0.005"
            output_text = 3
            input_image = 0.1
            output_image = 0.000001
            "#,
        )
        .unwrap();
        let prices = table.prices("openai", "m").unwrap();
        assert_eq!(prices.input_text, Some(75_000));
        assert_eq!(prices.cached_input_text, Some(5_000));
        assert_eq!(prices.output_text, Some(3_000_000));
        assert_eq!(prices.input_image, Some(100_000));
        assert_eq!(prices.output_image, Some(1));
        // 1M cached gpt-4o-mini tokens at $0.075/1M are exactly 75,000 µ$.
        let cached = Usage {
            input_text_tokens: 1_000_000,
            cached_input_tokens: 1_000_000,
            ..usage("openai", "gpt-4o-mini")
        };
        assert_eq!(shipped().cost_micros(&cached).unwrap(), 75_000);
    }

    #[test]
    fn per_image_prices_are_added_per_image() {
        let table = PriceTable::parse(
            "[openai.\"dall-e-3\"]\nper_image = 0.04\n[openai.\"mixed\"]\n\
             input_text = 5\nper_image = \"0.0000005\"\n",
        )
        .unwrap();
        let two_images = Usage {
            images: 2,
            ..usage("openai", "dall-e-3")
        };
        assert_eq!(table.cost_micros(&two_images).unwrap(), 80_000);
        // 100 × 5 µ$ + 3 × 0.5 µ$ = 501.5 µ$ → 502.
        let mixed = Usage {
            input_text_tokens: 100,
            images: 3,
            ..usage("openai", "mixed")
        };
        assert_eq!(table.cost_micros(&mixed).unwrap(), 502);
    }

    #[test]
    fn malformed_tables_are_rejected_with_the_entry_named() {
        for (toml, expected) in [
            (
                "[openai.m]\ninput_text = 0.0000001\n",
                "more than 6 decimals",
            ),
            ("[openai.m]\ninput_text = -1.0\n", "negative"),
            ("[openai.m]\ninput_text = \"1,5\"\n", "not a decimal number"),
            ("[openai.m]\ninput_text = \"1.\"\n", "not a decimal number"),
            ("[openai.m]\n", "no rates"),
        ] {
            let error = PriceTable::parse(toml).unwrap_err().to_string();
            assert!(error.contains("openai model m"), "{error}");
            assert!(error.contains(expected), "{error}");
        }
        let error = PriceTable::parse("[openai.m]\ninput_txt = 1.0\n").unwrap_err();
        assert!(error.to_string().contains("input_txt"), "{error}");
        assert!(PriceTable::parse("[openai.m]\ninput_text = true\n").is_err());
        assert!(PriceTable::parse("not toml").is_err());
    }

    #[test]
    fn decimals_are_parsed_without_rounding() {
        assert_eq!(parse_decimal("0.075", 6), Ok(75_000));
        assert_eq!(parse_decimal("0.40", 6), Ok(400_000));
        assert_eq!(parse_decimal("30", 6), Ok(30_000_000));
        assert_eq!(parse_decimal("1.2500000", 6), Ok(1_250_000));
        assert_eq!(parse_decimal("0.04", 12), Ok(40_000_000_000));
        assert!(parse_decimal("0.0000001", 6).is_err());
        assert!(parse_decimal(".5", 6).is_err());
        assert!(parse_decimal("99999999999999999999", 6).is_err());
    }

    #[test]
    fn usd_is_formatted_with_six_exact_decimals() {
        assert_eq!(format_usd(0), "0.000000");
        assert_eq!(format_usd(41_000), "0.041000");
        assert_eq!(format_usd(1_234_567), "1.234567");
        assert_eq!(format_usd(-41_000), "-0.041000");
        assert_eq!(format_usd(i64::MIN), "-9223372036854.775808");
    }

    #[test]
    fn models_may_carry_a_name_for_people() {
        let table = shipped();
        assert_eq!(
            table.model_name("openai", "gpt-image-2"),
            Some("GPT Image 2")
        );
        assert_eq!(table.model_name("openai", "no-such-model"), None);
        let table = PriceTable::parse(
            "[openai.\"custom\"]\ninput_text = 1\n[openai.\"named\"]\nname = \" Named \"\ninput_text = 1\n",
        )
        .unwrap();
        assert_eq!(table.model_name("openai", "custom"), None);
        assert_eq!(table.model_name("openai", "named"), Some("Named"));
        assert!(table.ensure_priced("openai", "named").is_ok());
    }
}
