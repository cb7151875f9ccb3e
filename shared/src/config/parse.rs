//! How setting values are read from the tree into domain types: durations from whole seconds
//! or milliseconds, dollars into micro-dollars, percentages, pixel sizes, lists, and optional
//! values for which an empty string means "not set". Used by the settings' `deserialize_with`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};
use url::Url;

use crate::auth::ApiKeys;

pub(super) fn millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_millis)
}

pub(super) fn secs<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_secs)
}

pub(super) fn usd<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let raw = String::deserialize(deserializer)?;
    let micros = crate::pricing::parse_usd_micros(&raw).map_err(serde::de::Error::custom)?;
    if micros <= 0 {
        return Err(serde::de::Error::custom("the budget must be above zero"));
    }
    Ok(micros)
}

pub(super) fn percent_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<u32>, D::Error> {
    let raw = String::deserialize(deserializer)?;
    let mut list = raw
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.trim_end_matches('%')
                .parse::<u32>()
                .ok()
                .filter(|percent| (1..=1000).contains(percent))
                .ok_or_else(|| serde::de::Error::custom(format!("{item:?} is not a percentage")))
        })
        .collect::<Result<Vec<u32>, D::Error>>()?;
    list.sort_unstable();
    list.dedup();
    Ok(list)
}

/// "3840x2160": two sides in pixels, each a positive multiple of 16 (what GPT image models accept).
pub(super) fn pixel_size<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<(u32, u32), D::Error> {
    let raw = String::deserialize(deserializer)?;
    let side = |text: &str| {
        text.trim()
            .parse::<u32>()
            .ok()
            .filter(|side| *side >= 16 && side % 16 == 0)
    };
    raw.split_once('x')
        .and_then(|(width, height)| Some((side(width)?, side(height)?)))
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{raw:?} is not WIDTHxHEIGHT with sides that are positive multiples of 16"
            ))
        })
}

pub(super) fn comma_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    let raw = String::deserialize(deserializer)?;
    Ok(raw
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect())
}

pub(super) fn optional_secret<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SecretString>, D::Error> {
    let raw = String::deserialize(deserializer)?;
    Ok((!raw.trim().is_empty()).then(|| SecretString::from(raw.trim().to_string())))
}

pub(super) fn optional_addr<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let raw = String::deserialize(deserializer)?;
    if raw.trim().is_empty() {
        return Ok(None);
    }
    raw.trim()
        .parse()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

pub(super) fn optional_url<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Url>, D::Error> {
    let raw = String::deserialize(deserializer)?;
    if raw.trim().is_empty() {
        return Ok(None);
    }
    Url::parse(raw.trim())
        .map(Some)
        .map_err(|error| serde::de::Error::custom(format!("{raw:?} is not a URL: {error}")))
}

pub(super) fn optional_path<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<PathBuf>, D::Error> {
    let raw = String::deserialize(deserializer)?;
    Ok((!raw.trim().is_empty()).then(|| PathBuf::from(raw.trim())))
}

pub(super) fn dev_api_keys<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<ApiKeys, D::Error> {
    let raw = String::deserialize(deserializer)?;
    ApiKeys::parse_plain(&raw).map_err(serde::de::Error::custom)
}

pub(super) fn fair_weights<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<crate::fair::Weights, D::Error> {
    let raw = String::deserialize(deserializer)?;
    crate::fair::Weights::parse(&raw).map_err(serde::de::Error::custom)
}

/// `true`, `false` (as booleans in a file, or as text) or `auto`, in any case.
pub(super) fn openai_traces_mode<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<super::OpenAiTracesMode, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Flag(bool),
        Text(String),
    }
    let mode = match Raw::deserialize(deserializer)? {
        Raw::Flag(true) => super::OpenAiTracesMode::On,
        Raw::Flag(false) => super::OpenAiTracesMode::Off,
        Raw::Text(text) => match text.trim().to_ascii_lowercase().as_str() {
            "true" => super::OpenAiTracesMode::On,
            "false" => super::OpenAiTracesMode::Off,
            "auto" => super::OpenAiTracesMode::Auto,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "expected true, false or auto, got {text:?}"
                )));
            }
        },
    };
    Ok(mode)
}
