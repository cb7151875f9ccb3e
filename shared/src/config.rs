//! One typed settings tree for every Pictor process.
//!
//! Layers, last wins: the commented defaults in `config.default.toml` (embedded, so the binary
//! always has a complete tree), an optional TOML file named by `PICTOR_CONFIG`, then the
//! environment variables in [`ENV_VARS`]. Values become domain types here, at load time, so a bad
//! value stops the process at start with a message naming the setting and its variable.
//! Tests build a [`Settings`] with [`Settings::defaults`] and change fields directly instead of
//! touching the process environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use url::Url;

use crate::domain::{Principal, Role, UserId};
use crate::pricing::PriceTable;

/// The embedded defaults; also the reference documentation of every key.
pub const DEFAULT_TOML: &str = include_str!("config.default.toml");

/// Environment variables and the setting each one overrides.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("PICTOR_API_ADDR", "api.addr"),
    ("PICTOR_PUBLIC_URL", "api.public_url"),
    ("PICTOR_MAX_BODY_BYTES", "api.max_body_bytes"),
    ("PICTOR_CORS_ORIGINS", "api.cors_origins"),
    ("PICTOR_API_KEYS", "api.api_keys"),
    ("PICTOR_API_KEYS_FILE", "api.api_keys_file"),
    ("PICTOR_RETRY_AFTER_SECS", "api.retry_after_secs"),
    ("PICTOR_PUBLISH_TIMEOUT_MS", "api.publish_timeout_ms"),
    ("PICTOR_MAX_QUEUE_DEPTH", "api.max_queue_depth"),
    ("PICTOR_USER_JOBS_PER_MINUTE", "api.user_jobs_per_minute"),
    ("PICTOR_USER_BURST", "api.user_burst"),
    ("PICTOR_AMQP_URL", "amqp.url"),
    ("PICTOR_QUEUE_PREFIX", "amqp.queue_prefix"),
    ("PICTOR_DELIVERY_LIMIT", "amqp.delivery_limit"),
    ("PICTOR_AMQP_CONNECT_TIMEOUT_MS", "amqp.connect_timeout_ms"),
    ("PICTOR_REDIS_URL", "redis.url"),
    ("PICTOR_REDIS_PREFIX", "redis.prefix"),
    ("PICTOR_REDIS_TIMEOUT_MS", "redis.timeout_ms"),
    ("PICTOR_JOB_TTL_SECS", "jobs.ttl_secs"),
    ("PICTOR_MAX_PROMPT_CHARS", "jobs.max_prompt_chars"),
    ("PICTOR_MAX_IMAGES", "jobs.max_images"),
    ("PICTOR_IMAGE_STORE", "images.store"),
    ("PICTOR_WORKER_CONCURRENCY", "worker.concurrency"),
    (
        "PICTOR_WORKER_RESPONSE_BUFFER_MIB",
        "worker.response_buffer_mib",
    ),
    ("PICTOR_WORKER_METRICS_ADDR", "worker.metrics_addr"),
    (
        "PICTOR_WORKER_SHUTDOWN_GRACE_SECS",
        "worker.shutdown_grace_secs",
    ),
    (
        "PICTOR_PROVIDER_MAX_ATTEMPTS",
        "worker.provider_max_attempts",
    ),
    (
        "PICTOR_MIN_ROUTER_CONFIDENCE",
        "worker.min_router_confidence",
    ),
    ("PICTOR_JOB_DEADLINE_SECS", "worker.job_deadline_secs"),
    (
        "PICTOR_WATCHDOG_INTERVAL_SECS",
        "worker.watchdog_interval_secs",
    ),
    (
        "PICTOR_WATCHDOG_MAX_REQUEUES",
        "worker.watchdog_max_requeues",
    ),
    ("PICTOR_REPORT_TIME", "scheduler.report_time"),
    ("PICTOR_REPORT_TIMEZONE", "scheduler.report_timezone"),
    ("PICTOR_EXPORT_TIME", "scheduler.export_time"),
    ("PICTOR_SMTP_URL", "scheduler.smtp_url"),
    ("PICTOR_EMAIL_FROM", "scheduler.email_from"),
    ("PICTOR_EMAIL_TO", "scheduler.email_to"),
    ("PICTOR_SLACK_WEBHOOK_URL", "scheduler.slack_webhook_url"),
    ("PICTOR_OUTBOX_DIR", "scheduler.outbox_dir"),
    (
        "PICTOR_HEALTH_WINDOW_MINUTES",
        "scheduler.health_window_minutes",
    ),
    ("PICTOR_HEALTH_MIN_JOBS", "scheduler.health_min_jobs"),
    ("PICTOR_ALERT_ERROR_RATE", "scheduler.error_rate_threshold"),
    (
        "PICTOR_ALERT_P95_SECS",
        "scheduler.latency_p95_threshold_secs",
    ),
    (
        "PICTOR_ALERT_REPEAT_MINUTES",
        "scheduler.alert_repeat_minutes",
    ),
    ("PICTOR_RUNBOOK_BASE_URL", "scheduler.runbook_base_url"),
    ("PICTOR_SCHEDULER_METRICS_ADDR", "scheduler.metrics_addr"),
    ("PICTOR_BUDGET_MONTHLY_USD", "budget.monthly_usd"),
    ("PICTOR_BUDGET_THRESHOLDS", "budget.thresholds"),
    ("PICTOR_BUDGET_POLICY", "budget.policy"),
    ("PICTOR_BREAKER_FAILURES", "breaker.failure_threshold"),
    ("PICTOR_BREAKER_WINDOW_SECS", "breaker.window_secs"),
    ("PICTOR_BREAKER_COOLDOWN_SECS", "breaker.cooldown_secs"),
    (
        "PICTOR_BREAKER_PROBE_TIMEOUT_SECS",
        "breaker.probe_timeout_secs",
    ),
    ("OPENAI_BASE_URL", "openai.base_url"),
    ("OPENAI_API_KEY", "openai.api_key"),
    ("PICTOR_ROUTER_MODEL", "openai.router_model"),
    ("PICTOR_OPENAI_IMAGE_MODEL", "openai.image_model"),
    ("PICTOR_OPENAI_IMAGE_QUALITY", "openai.image_quality"),
    ("PICTOR_UPSCALE_MAX_SIZE", "openai.upscale_max_size"),
    ("PICTOR_OPENAI_TIMEOUT_SECS", "openai.timeout_secs"),
    (
        "PICTOR_OPENAI_CONNECT_TIMEOUT_SECS",
        "openai.connect_timeout_secs",
    ),
    ("GEMINI_BASE_URL", "gemini.base_url"),
    ("GEMINI_API_KEY", "gemini.api_key"),
    ("PICTOR_GEMINI_IMAGE_MODEL", "gemini.image_model"),
    ("PICTOR_GEMINI_TIMEOUT_SECS", "gemini.timeout_secs"),
    (
        "PICTOR_GEMINI_CONNECT_TIMEOUT_SECS",
        "gemini.connect_timeout_secs",
    ),
    ("PICTOR_SIMULATED_DELAY_MS", "simulated.delay_ms"),
    ("PICTOR_PRICING_FILE", "pricing.file"),
    ("PICTOR_LOG_FORMAT", "telemetry.log_format"),
    ("PICTOR_METRICS", "telemetry.metrics"),
    ("PICTOR_OPENAI_TRACES", "traces.openai_enabled"),
    ("PICTOR_TRACES_ENDPOINT", "traces.endpoint"),
    ("PICTOR_TRACES_WORKFLOW", "traces.workflow_name"),
    ("PICTOR_TRACES_REDACT", "traces.redact"),
    ("PICTOR_TRACES_QUEUE_SIZE", "traces.queue_size"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "traces.otlp_endpoint"),
];

/// A setting that could not be loaded, named so a person can fix it.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

impl ConfigError {
    fn new(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub api: ApiSettings,
    pub amqp: AmqpSettings,
    pub redis: RedisSettings,
    pub jobs: JobSettings,
    pub images: ImageSettings,
    pub worker: WorkerSettings,
    pub budget: BudgetSettings,
    pub scheduler: SchedulerSettings,
    pub breaker: BreakerSettings,
    /// Keyed by "provider:model".
    pub rate_limits: HashMap<String, RateLimitSettings>,
    pub openai: OpenAiSettings,
    pub gemini: GeminiSettings,
    pub simulated: SimulatedSettings,
    pub pricing: PricingSettings,
    pub telemetry: TelemetrySettings,
    pub traces: TracesSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    pub addr: SocketAddr,
    pub public_url: String,
    pub max_body_bytes: NonZeroUsize,
    #[serde(deserialize_with = "comma_list")]
    pub cors_origins: Vec<String>,
    #[serde(rename = "api_keys", deserialize_with = "dev_api_keys")]
    pub dev_api_keys: ApiKeys,
    #[serde(deserialize_with = "optional_path")]
    pub api_keys_file: Option<PathBuf>,
    pub retry_after_secs: u32,
    #[serde(rename = "publish_timeout_ms", deserialize_with = "millis")]
    pub publish_timeout: Duration,
    pub max_queue_depth: u32,
    pub user_jobs_per_minute: NonZeroU32,
    pub user_burst: NonZeroU32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: SecretString,
    pub queue_prefix: String,
    pub delivery_limit: NonZeroU32,
    #[serde(rename = "connect_timeout_ms", deserialize_with = "millis")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: SecretString,
    pub prefix: String,
    #[serde(rename = "timeout_ms", deserialize_with = "millis")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSettings {
    #[serde(rename = "ttl_secs", deserialize_with = "secs")]
    pub ttl: Duration,
    pub max_prompt_chars: NonZeroUsize,
    pub max_images: NonZeroU32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSettings {
    pub store: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: NonZeroUsize,
    /// MiB of provider response bodies (and the images decoded from them) one worker holds at
    /// once; further responses wait in their sockets.
    pub response_buffer_mib: NonZeroU32,
    #[serde(deserialize_with = "optional_addr")]
    pub metrics_addr: Option<SocketAddr>,
    #[serde(rename = "shutdown_grace_secs", deserialize_with = "secs")]
    pub shutdown_grace: Duration,
    pub provider_max_attempts: NonZeroU32,
    pub min_router_confidence: f64,
    #[serde(rename = "job_deadline_secs", deserialize_with = "secs")]
    pub job_deadline: Duration,
    #[serde(rename = "watchdog_interval_secs", deserialize_with = "secs")]
    pub watchdog_interval: Duration,
    pub watchdog_max_requeues: u32,
}

/// The scheduler's jobs and where it delivers. Times are local to `report_timezone`; the
/// scheduler parses them (and the zone) at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    pub report_time: String,
    pub report_timezone: String,
    pub export_time: String,
    #[serde(deserialize_with = "optional_secret")]
    pub smtp_url: Option<SecretString>,
    pub email_from: String,
    #[serde(deserialize_with = "comma_list")]
    pub email_to: Vec<String>,
    #[serde(deserialize_with = "optional_secret")]
    pub slack_webhook_url: Option<SecretString>,
    pub outbox_dir: PathBuf,
    pub health_window_minutes: NonZeroU32,
    pub health_min_jobs: u32,
    pub error_rate_threshold: f64,
    pub latency_p95_threshold_secs: f64,
    pub alert_repeat_minutes: NonZeroU32,
    pub runbook_base_url: String,
    #[serde(deserialize_with = "optional_addr")]
    pub metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPolicyKind {
    Alert,
    Block,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    #[serde(rename = "monthly_usd", deserialize_with = "usd")]
    pub monthly_micros: i64,
    #[serde(deserialize_with = "percent_list")]
    pub thresholds: Vec<u32>,
    pub policy: BudgetPolicyKind,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    pub failure_threshold: NonZeroU32,
    #[serde(rename = "window_secs", deserialize_with = "secs")]
    pub window: Duration,
    #[serde(rename = "cooldown_secs", deserialize_with = "secs")]
    pub cooldown: Duration,
    #[serde(rename = "probe_timeout_secs", deserialize_with = "secs")]
    pub probe_timeout: Duration,
}

/// Limits of one provider model, per minute, fleet-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub requests_per_minute: NonZeroU32,
    pub images_per_minute: Option<NonZeroU32>,
    pub tokens_per_minute: Option<NonZeroU32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiSettings {
    pub base_url: Url,
    #[serde(deserialize_with = "optional_secret")]
    pub api_key: Option<SecretString>,
    pub router_model: String,
    pub image_model: String,
    pub image_quality: String,
    /// The largest output of the `upscale` agent as (width, height) in landscape orientation
    /// (turned for portrait inputs): what the image model accepts as a custom `size`.
    #[serde(deserialize_with = "pixel_size")]
    pub upscale_max_size: (u32, u32),
    #[serde(rename = "timeout_secs", deserialize_with = "secs")]
    pub timeout: Duration,
    #[serde(rename = "connect_timeout_secs", deserialize_with = "secs")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeminiSettings {
    pub base_url: Url,
    #[serde(deserialize_with = "optional_secret")]
    pub api_key: Option<SecretString>,
    pub image_model: String,
    #[serde(rename = "timeout_secs", deserialize_with = "secs")]
    pub timeout: Duration,
    #[serde(rename = "connect_timeout_secs", deserialize_with = "secs")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedSettings {
    #[serde(rename = "delay_ms", deserialize_with = "millis")]
    pub delay: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingSettings {
    /// A price table replacing the shipped one; `None` means the shipped table.
    #[serde(deserialize_with = "optional_path")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// Record Prometheus metrics and serve them on `/metrics` (off only to measure their cost).
    pub metrics: bool,
}

/// Where job traces go besides the logs: OpenAI's traces dashboard and/or an OTLP collector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracesSettings {
    /// Export each job as an OpenAI Agents trace (needs `openai.api_key`).
    pub openai_enabled: bool,
    /// The ingest URL; `None` means `{openai.base_url}/traces/ingest`.
    #[serde(deserialize_with = "optional_url")]
    pub endpoint: Option<Url>,
    pub workflow_name: String,
    /// Never send prompts or outputs, only the shape, timing and token counts of a job.
    pub redact: bool,
    /// Trace items waiting for export; beyond it items are dropped and counted.
    pub queue_size: NonZeroUsize,
    /// Base URL of an OTLP/HTTP collector (`/v1/traces` is appended); `None` turns OTLP off.
    #[serde(deserialize_with = "optional_url")]
    pub otlp_endpoint: Option<Url>,
}

impl TracesSettings {
    /// The OpenAI ingest URL: the configured one, else the OpenAI base URL's `/traces/ingest`.
    pub fn ingest_url(&self, openai: &OpenAiSettings) -> String {
        match &self.endpoint {
            Some(endpoint) => endpoint.to_string(),
            None => format!(
                "{}/traces/ingest",
                openai.base_url.as_str().trim_end_matches('/')
            ),
        }
    }
}

impl Settings {
    /// The configured limits of one provider model, if any.
    pub fn rate_limit(&self, provider: &str, model: &str) -> Option<RateLimitSettings> {
        self.rate_limits
            .get(&format!("{provider}:{model}"))
            .copied()
    }

    /// The built-in defaults alone, with no file and no environment.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::from_layers(None, &HashMap::new())
    }

    /// Defaults, then `PICTOR_CONFIG`'s file if set, then the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let file = match env.get("PICTOR_CONFIG").filter(|path| !path.is_empty()) {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|error| {
                ConfigError::new(
                    "PICTOR_CONFIG",
                    format!("cannot read config file {path}: {error}"),
                )
            })?),
            None => None,
        };
        Self::from_layers(file.as_deref(), &env)
    }

    /// Builds settings from the defaults, an optional TOML document and an environment map.
    pub fn from_layers(
        file: Option<&str>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut tree: toml::Table = DEFAULT_TOML
            .parse()
            .map_err(|error| ConfigError::new("built-in defaults", format!("{error}")))?;
        if let Some(file) = file {
            let overlay: toml::Table = file
                .parse()
                .map_err(|error| ConfigError::new("PICTOR_CONFIG", format!("{error}")))?;
            merge(&mut tree, overlay);
        }
        for (var, path) in ENV_VARS {
            if let Some(raw) = env.get(*var) {
                set_from_env(&mut tree, path, var, raw)?;
            }
        }
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|error| {
                let path = error.path().to_string();
                ConfigError::new(describe(&path), error.into_inner().to_string())
            })?;
        settings.check()
    }

    fn check(mut self) -> Result<Self, ConfigError> {
        if !(0.0..=1.0).contains(&self.worker.min_router_confidence) {
            return Err(ConfigError::new(
                describe("worker.min_router_confidence"),
                "must be between 0.0 and 1.0",
            ));
        }
        if !matches!(
            self.openai.image_quality.as_str(),
            "low" | "medium" | "high" | "auto"
        ) {
            return Err(ConfigError::new(
                describe("openai.image_quality"),
                "must be one of low, medium, high, auto",
            ));
        }
        if self.traces.workflow_name.trim().is_empty() {
            return Err(ConfigError::new(
                describe("traces.workflow_name"),
                "must not be empty",
            ));
        }
        if self.redis.prefix.is_empty() || self.amqp.queue_prefix.is_empty() {
            return Err(ConfigError::new(
                describe("redis.prefix"),
                "prefixes must not be empty",
            ));
        }
        if let Some(path) = &self.api.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|error| {
                ConfigError::new(
                    describe("api.api_keys_file"),
                    format!("cannot read {}: {error}", path.display()),
                )
            })?;
            let hashed = ApiKeys::parse_hashed(&text)
                .map_err(|message| ConfigError::new(describe("api.api_keys_file"), message))?;
            self.api.dev_api_keys.extend(hashed);
        }
        Ok(self)
    }

    /// The keys the api accepts: development keys and the hashed production file together.
    pub fn api_keys(&self) -> &ApiKeys {
        &self.api.dev_api_keys
    }

    /// The price table: the file named by `pricing.file` if set, else the shipped one.
    pub fn price_table(&self) -> Result<PriceTable, ConfigError> {
        let Some(path) = &self.pricing.file else {
            return PriceTable::shipped()
                .map_err(|error| ConfigError::new("built-in price table", error.to_string()));
        };
        let setting = describe("pricing.file");
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError::new(
                setting.clone(),
                format!("cannot read {}: {error}", path.display()),
            )
        })?;
        PriceTable::parse(&text)
            .map_err(|error| ConfigError::new(setting, format!("in {}: {error}", path.display())))
    }
}

/// "api.addr" → "api.addr (PICTOR_API_ADDR)", so an error names what to change.
fn describe(path: &str) -> String {
    match ENV_VARS.iter().find(|(_, p)| *p == path) {
        Some((var, _)) => format!("{path} ({var})"),
        None => path.to_string(),
    }
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(overlay_table)) => {
                merge(base_table, overlay_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Puts an environment string into the tree, typed like the default it replaces.
fn set_from_env(
    tree: &mut toml::Table,
    path: &str,
    var: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    let (section, key) = path
        .split_once('.')
        .ok_or_else(|| ConfigError::new(var, "setting path has no section"))?;
    let table = tree
        .get_mut(section)
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| ConfigError::new(var, format!("unknown section {section}")))?;
    let bad =
        |what: &str| ConfigError::new(describe(path), format!("expected {what}, got {raw:?}"));
    let value = match table.get(key) {
        Some(toml::Value::Integer(_)) => {
            toml::Value::Integer(raw.trim().parse().map_err(|_| bad("an integer"))?)
        }
        Some(toml::Value::Float(_)) => {
            toml::Value::Float(raw.trim().parse().map_err(|_| bad("a number"))?)
        }
        Some(toml::Value::Boolean(_)) => {
            toml::Value::Boolean(raw.trim().parse().map_err(|_| bad("true or false"))?)
        }
        _ => toml::Value::String(raw.to_string()),
    };
    table.insert(key.to_string(), value);
    Ok(())
}

fn millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_millis)
}

fn secs<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_secs)
}

fn usd<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let raw = String::deserialize(deserializer)?;
    let micros = crate::pricing::parse_usd_micros(&raw).map_err(serde::de::Error::custom)?;
    if micros <= 0 {
        return Err(serde::de::Error::custom("the budget must be above zero"));
    }
    Ok(micros)
}

fn percent_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
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
fn pixel_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(u32, u32), D::Error> {
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

fn comma_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let raw = String::deserialize(deserializer)?;
    Ok(raw
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect())
}

fn optional_secret<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SecretString>, D::Error> {
    let raw = String::deserialize(deserializer)?;
    Ok((!raw.trim().is_empty()).then(|| SecretString::from(raw.trim().to_string())))
}

fn optional_addr<'de, D: Deserializer<'de>>(
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

fn optional_url<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Url>, D::Error> {
    let raw = String::deserialize(deserializer)?;
    if raw.trim().is_empty() {
        return Ok(None);
    }
    Url::parse(raw.trim())
        .map(Some)
        .map_err(|error| serde::de::Error::custom(format!("{raw:?} is not a URL: {error}")))
}

fn optional_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<PathBuf>, D::Error> {
    let raw = String::deserialize(deserializer)?;
    Ok((!raw.trim().is_empty()).then(|| PathBuf::from(raw.trim())))
}

fn dev_api_keys<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ApiKeys, D::Error> {
    let raw = String::deserialize(deserializer)?;
    ApiKeys::parse_plain(&raw).map_err(serde::de::Error::custom)
}

/// Bearer keys known to the api, held only as SHA-256 digests so that no secret stays in memory
/// longer than parsing takes and a key file never needs to hold one.
#[derive(Clone, Default)]
pub struct ApiKeys {
    by_digest: HashMap<[u8; 32], Principal>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.by_digest.len())
    }
}

impl ApiKeys {
    /// Parses "user:role:secret,user:role:secret".
    pub fn parse_plain(raw: &str) -> Result<Self, String> {
        let mut keys = Self::default();
        for (index, entry) in raw
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (principal, secret) =
                parse_entry(entry).map_err(|message| format!("entry {} {message}", index + 1))?;
            keys.by_digest
                .insert(Sha256::digest(secret.as_bytes()).into(), principal);
        }
        Ok(keys)
    }

    /// Parses lines of "user:role:sha256hex"; blank lines and '#' comments are skipped.
    pub fn parse_hashed(text: &str) -> Result<Self, String> {
        let mut keys = Self::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (principal, hex) =
                parse_entry(line).map_err(|message| format!("line {} {message}", number + 1))?;
            let digest = decode_hex32(hex).ok_or_else(|| {
                format!(
                    "line {}: the digest must be 64 hexadecimal characters",
                    number + 1
                )
            })?;
            keys.by_digest.insert(digest, principal);
        }
        Ok(keys)
    }

    pub fn extend(&mut self, other: ApiKeys) {
        self.by_digest.extend(other.by_digest);
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The principal a bearer secret belongs to, if any.
    pub fn authenticate(&self, secret: &str) -> Option<&Principal> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        self.by_digest.get(&digest)
    }
}

fn parse_entry(entry: &str) -> Result<(Principal, &str), String> {
    let mut parts = entry.splitn(3, ':');
    let (Some(user), Some(role), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("must look like user:role:secret".to_string());
    };
    let user = UserId::parse(user).map_err(|error| format!(": {error}"))?;
    let role = match role {
        "user" => Role::User,
        "ops" => Role::Ops,
        other => return Err(format!(": unknown role {other:?} (use user or ops)")),
    };
    if secret.is_empty() {
        return Err(": the secret is empty".to_string());
    }
    Ok((Principal { user, role }, secret))
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_name_the_documented_addresses() {
        let settings = Settings::defaults().unwrap();
        assert_eq!(settings.api.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.redis.prefix, "pictor:");
        assert_eq!(settings.worker.concurrency.get(), 64);
        assert_eq!(settings.api.max_body_bytes.get(), 20 * 1024 * 1024);
        assert!(settings.openai.api_key.is_none());
    }

    #[test]
    fn environment_overrides_file_which_overrides_defaults() {
        let file = "[worker]\nconcurrency = 8\n[redis]\nprefix = \"file:\"\n";
        let settings = Settings::from_layers(
            Some(file),
            &env(&[("PICTOR_REDIS_PREFIX", "env:"), ("OPENAI_API_KEY", "sk-1")]),
        )
        .unwrap();
        assert_eq!(settings.worker.concurrency.get(), 8);
        assert_eq!(settings.redis.prefix, "env:");
        assert!(settings.openai.api_key.is_some());
    }

    #[test]
    fn a_bad_value_names_the_setting_and_its_variable() {
        let error = Settings::from_layers(None, &env(&[("PICTOR_API_ADDR", "not an address")]))
            .unwrap_err();
        assert!(error.to_string().contains("PICTOR_API_ADDR"), "{error}");

        let error = Settings::from_layers(None, &env(&[("PICTOR_WORKER_CONCURRENCY", "lots")]))
            .unwrap_err();
        assert!(
            error.to_string().contains("PICTOR_WORKER_CONCURRENCY"),
            "{error}"
        );

        let error =
            Settings::from_layers(None, &env(&[("PICTOR_WORKER_CONCURRENCY", "0")])).unwrap_err();
        assert!(
            error.to_string().contains("PICTOR_WORKER_CONCURRENCY"),
            "{error}"
        );
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error() {
        let error =
            Settings::from_layers(Some("[api]\nadress = \"x\"\n"), &HashMap::new()).unwrap_err();
        assert!(error.to_string().contains("adress"), "{error}");
    }

    #[test]
    fn api_keys_authenticate_by_secret_and_carry_role() {
        let keys = ApiKeys::parse_plain("alice:user:SECRET,ops:ops:SECRET3").unwrap();
        let alice = keys.authenticate("SECRET").unwrap();
        assert_eq!(alice.user.as_str(), "alice");
        assert_eq!(alice.role, Role::User);
        assert_eq!(keys.authenticate("SECRET3").unwrap().role, Role::Ops);
        assert!(keys.authenticate("nope").is_none());
    }

    #[test]
    fn hashed_key_file_accepts_the_digest_of_the_secret() {
        let digest = format!("{:x}", Sha256::digest(b"s3cret"));
        let keys = ApiKeys::parse_hashed(&format!("# prod\nbob:user:{digest}\n")).unwrap();
        assert_eq!(keys.authenticate("s3cret").unwrap().user.as_str(), "bob");
        assert!(ApiKeys::parse_hashed("bob:user:abc").is_err());
    }

    #[test]
    fn the_price_table_is_the_shipped_one_unless_a_file_replaces_it() {
        let settings = Settings::defaults().unwrap();
        assert!(settings.pricing.file.is_none());
        settings
            .price_table()
            .unwrap()
            .ensure_priced("openai", "gpt-image-2")
            .unwrap();

        let settings = Settings::from_layers(
            None,
            &env(&[("PICTOR_PRICING_FILE", "/nonexistent/prices.toml")]),
        )
        .unwrap();
        let error = settings.price_table().unwrap_err();
        assert!(
            error
                .to_string()
                .contains("pricing.file (PICTOR_PRICING_FILE)"),
            "{error}"
        );

        let path =
            std::env::temp_dir().join(format!("pictor-prices-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&path, "[openai.\"house-model\"]\ninput_text = 1.0\n").unwrap();
        let mut settings = Settings::defaults().unwrap();
        settings.pricing.file = Some(path.clone());
        let table = settings.price_table();
        std::fs::remove_file(&path).unwrap();
        let table = table.unwrap();
        table.ensure_priced("openai", "house-model").unwrap();
        assert!(table.ensure_priced("openai", "gpt-image-2").is_err());
    }

    #[test]
    fn traces_are_off_by_default_and_their_endpoint_follows_the_openai_base_url() {
        let settings = Settings::defaults().unwrap();
        assert!(!settings.traces.openai_enabled);
        assert!(settings.traces.redact);
        assert_eq!(settings.traces.workflow_name, "Pictor job");
        assert_eq!(settings.traces.queue_size.get(), 8192);
        assert!(settings.traces.otlp_endpoint.is_none());
        assert_eq!(
            settings.traces.ingest_url(&settings.openai),
            "https://api.openai.com/v1/traces/ingest"
        );

        let settings = Settings::from_layers(
            None,
            &env(&[
                ("PICTOR_OPENAI_TRACES", "true"),
                ("PICTOR_TRACES_REDACT", "false"),
                (
                    "PICTOR_TRACES_ENDPOINT",
                    "http://127.0.0.1:9/v1/traces/ingest",
                ),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ]),
        )
        .unwrap();
        assert!(settings.traces.openai_enabled);
        assert!(!settings.traces.redact);
        assert_eq!(
            settings.traces.ingest_url(&settings.openai),
            "http://127.0.0.1:9/v1/traces/ingest"
        );
        assert!(settings.traces.otlp_endpoint.is_some());

        let error = Settings::from_layers(None, &env(&[("PICTOR_TRACES_ENDPOINT", "not a url")]))
            .unwrap_err();
        assert!(
            error.to_string().contains("PICTOR_TRACES_ENDPOINT"),
            "{error}"
        );
    }

    #[test]
    fn the_upscale_size_is_read_as_pixels_and_checked() {
        let settings = Settings::defaults().unwrap();
        assert_eq!(settings.openai.upscale_max_size, (3840, 2160));
        let settings =
            Settings::from_layers(None, &env(&[("PICTOR_UPSCALE_MAX_SIZE", "2048x1536")])).unwrap();
        assert_eq!(settings.openai.upscale_max_size, (2048, 1536));
        for bad in ["4k", "2000x1000", "0x0", "2048"] {
            let error =
                Settings::from_layers(None, &env(&[("PICTOR_UPSCALE_MAX_SIZE", bad)])).unwrap_err();
            assert!(
                error.to_string().contains("PICTOR_UPSCALE_MAX_SIZE"),
                "{error}"
            );
        }
    }

    #[test]
    fn malformed_dev_keys_are_rejected_at_load() {
        let error =
            Settings::from_layers(None, &env(&[("PICTOR_API_KEYS", "alice:admin:x")])).unwrap_err();
        assert!(error.to_string().contains("PICTOR_API_KEYS"), "{error}");
    }
}
