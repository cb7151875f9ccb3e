//! One typed settings tree for every Pictor process.
//!
//! Layers, last wins: the commented defaults in `config.default.toml` (embedded, so the binary
//! always has a complete tree), an optional TOML file named by `PICTOR_CONFIG`, then the
//! environment variables in [`ENV_VARS`]. Values become domain types here, at load time, so a bad
//! value stops the process at start with a message naming the setting and its variable.
//! Tests build a [`Settings`] with [`Settings::defaults`] and change fields directly instead of
//! touching the process environment.

mod env;
mod parse;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use crate::auth::ApiKeys;
use crate::pricing::PriceTable;
pub use env::ENV_VARS;
use env::{describe, merge, set_from_env};
use parse::{
    comma_list, dev_api_keys, fair_weights, millis, openai_traces_mode, optional_addr,
    optional_path, optional_secret, optional_url, percent_list, pixel_size, secs, usd,
};

/// The embedded defaults; also the reference documentation of every key.
pub const DEFAULT_TOML: &str = include_str!("../config.default.toml");

/// A setting that could not be loaded, named so a person can fix it.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

impl ConfigError {
    pub(super) fn new(setting: impl Into<String>, message: impl Into<String>) -> Self {
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
    pub backlog: BacklogSettings,
    pub images: ImageSettings,
    pub worker: WorkerSettings,
    pub budget: BudgetSettings,
    pub scheduler: SchedulerSettings,
    pub breaker: BreakerSettings,
    /// Keyed by "provider:model".
    pub rate_limits: HashMap<String, RateLimitSettings>,
    pub openai: OpenAiSettings,
    pub reconcile: ReconcileSettings,
    pub gemini: GeminiSettings,
    pub simulated: SimulatedSettings,
    pub pricing: PricingSettings,
    pub telemetry: TelemetrySettings,
    pub traces: TracesSettings,
    pub runtime: RuntimeSettings,
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
    pub user_jobs_per_minute: NonZeroU32,
    pub user_burst: NonZeroU32,
    /// Where the api serves `/metrics` for Prometheus, apart from the public port (which shows
    /// them to the ops role only); `None` serves no such listener.
    #[serde(deserialize_with = "optional_addr")]
    pub metrics_addr: Option<SocketAddr>,
    /// How long a client may take to send a request's headers before its connection is closed.
    #[serde(rename = "header_read_timeout_secs", deserialize_with = "secs")]
    pub header_read_timeout: Duration,
    /// How long a request (its body included) may take, streams excepted.
    #[serde(rename = "request_timeout_secs", deserialize_with = "secs")]
    pub request_timeout: Duration,
    /// Open connections at most; past it a connection gets 503 and is closed.
    pub max_connections: NonZeroUsize,
    /// Requests handled at once at most (streams not counted); past it, 503.
    pub max_in_flight: NonZeroUsize,
    /// Event streams (`/v1/jobs/{id}/events`) one user may hold open at once; past it, 429.
    pub max_streams_per_user: NonZeroU32,
    /// How long one event stream stays open before it ends with a reconnect hint.
    #[serde(rename = "stream_lifetime_secs", deserialize_with = "secs")]
    pub stream_lifetime: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: SecretString,
    pub queue_prefix: String,
    pub delivery_limit: NonZeroU32,
    #[serde(rename = "connect_timeout_ms", deserialize_with = "millis")]
    pub connect_timeout: Duration,
    /// Nodes each quorum queue is replicated on when first declared; 0: the broker's default.
    pub quorum_initial_group_size: u32,
}

/// The most replicas `redis.min_replicas` may ask for: more than a Sentinel set would run is
/// a typo, which would refuse every job.
pub const MAX_MIN_REPLICAS: u32 = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: SecretString,
    pub prefix: String,
    #[serde(rename = "timeout_ms", deserialize_with = "millis")]
    pub timeout: Duration,
    /// Sentinel addresses (`host:port` or `redis://…`); when set, the primary is the one they
    /// name for `sentinel_service`, and the URL gives only credentials and database.
    #[serde(deserialize_with = "comma_list")]
    pub sentinels: Vec<String>,
    pub sentinel_service: String,
    /// Under Sentinel, how long a write Pictor relies on may wait for the replicas (`WAIT`);
    /// zero relies on writes the primary alone has.
    #[serde(rename = "replica_wait_ms", deserialize_with = "millis")]
    pub replica_wait: Duration,
    /// Under Sentinel, the fewest replicas such a write must reach, even on a primary that has
    /// not yet been seen with any in sync (one just promoted); 0 trusts such a primary alone.
    pub min_replicas: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSettings {
    #[serde(rename = "ttl_secs", deserialize_with = "secs")]
    pub ttl: Duration,
    pub max_prompt_chars: NonZeroUsize,
    pub max_images: NonZeroU32,
    /// Widest and tallest uploaded image accepted, in pixels (read from its header).
    pub max_image_side: NonZeroU32,
}

/// The backlog's bounds and its fair sharing (`crate::fair`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BacklogSettings {
    /// Jobs one user may have pending (accepted and not ended); past it, 429.
    pub max_pending_per_user: NonZeroU32,
    /// Jobs the whole fleet may have pending; past it, 429.
    pub max_pending: NonZeroU32,
    /// Calls a user may be ahead of the least served user waiting for the same model; 0 turns
    /// fair sharing off (first come, first served).
    pub fair_slack: u32,
    /// How long a user who asked for a model counts as waiting for it.
    #[serde(rename = "fair_window_secs", deserialize_with = "secs")]
    pub fair_window: Duration,
    #[serde(deserialize_with = "fair_weights")]
    pub fair_weights: crate::fair::Weights,
}

impl BacklogSettings {
    /// The gate's tuning.
    pub fn fair_policy(&self) -> crate::fair::FairPolicy {
        crate::fair::FairPolicy {
            slack: self.fair_slack,
            window: self.fair_window,
            weights: self.fair_weights.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSettings {
    pub store: String,
    /// How long a job's images are kept after the job's last change (its end, for a job that
    /// ended). `0` in the file means the job TTL, which [`Settings::check`] fills in, so the
    /// images expire with their job.
    #[serde(rename = "retention_secs", deserialize_with = "secs")]
    pub retention: Duration,
    /// How often a worker looks for jobs whose images expired (one worker at a time does it).
    #[serde(rename = "sweep_interval_secs", deserialize_with = "secs")]
    pub sweep_interval: Duration,
    /// How often the store's size is measured by listing it (once in the fleet per interval).
    #[serde(rename = "measure_interval_secs", deserialize_with = "secs")]
    pub measure_interval: Duration,
    /// MiB of images above which the api refuses new jobs that bring an image; 0: no bound.
    pub max_store_mib: u64,
}

impl ImageSettings {
    /// The bound on the stored images in bytes, if there is one.
    pub fn max_store_bytes(&self) -> Option<u64> {
        (self.max_store_mib > 0).then(|| self.max_store_mib.saturating_mul(1024 * 1024))
    }
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
    /// Infrastructure failures (Redis, object store, broker) a job may meet, across all its
    /// deliveries, before it ends failed and its message is dead-lettered.
    pub max_infra_attempts: NonZeroU32,
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
    /// Who sends the alerts that `infra/prometheus/alerts.yml` defines.
    pub alerts_via: AlertsVia,
    pub runbook_base_url: String,
    #[serde(deserialize_with = "optional_addr")]
    pub metrics_addr: Option<SocketAddr>,
}

/// Who sends the alerts of `infra/prometheus/alerts.yml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertsVia {
    /// The scheduler evaluates every rule itself (no Prometheus stack needed).
    Scheduler,
    /// Prometheus evaluates them and Alertmanager delivers; the scheduler leaves them alone.
    Alertmanager,
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
    /// An admin key for the organization Costs API (reconciliation); never used for calls.
    #[serde(deserialize_with = "optional_secret")]
    pub admin_key: Option<SecretString>,
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
    /// MiB of one answer's body at most; a larger answer fails the call (`bad_response`)
    /// before it is allocated or read whole.
    pub max_response_mib: NonZeroU32,
}

/// How the cost ledger is compared with the providers' own bills.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSettings {
    /// Percent by which a day may differ before it is flagged.
    pub tolerance_percent: f64,
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
    /// MiB of one answer's body at most; a larger answer fails the call (`bad_response`)
    /// before it is allocated or read whole.
    pub max_response_mib: NonZeroU32,
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

/// The most runtime threads a process may be given: far past any machine's cores, so a larger
/// value is a typo.
pub const MAX_THREADS: usize = 1024;

/// How a process runs its tasks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Threads running the process' tasks (tokio's workers); 0: one per CPU the process may
    /// use, cgroup quotas counted.
    pub threads: usize,
}

impl Settings {
    /// Runs `main` with these settings on a runtime built as `runtime.threads` says: how every
    /// binary starts.
    pub fn block_on<F, Fut>(self, main: F) -> std::io::Result<Fut::Output>
    where
        F: FnOnce(Self) -> Fut,
        Fut: std::future::Future,
    {
        let runtime = self.runtime.build()?;
        Ok(runtime.block_on(main(self)))
    }
}

impl RuntimeSettings {
    /// A tokio runtime with [`Self::threads`] workers (0: one per CPU the process may use, a
    /// cgroup's quota counted). One thread is a current-thread runtime: the process' main future
    /// (a worker's consume loop, the api's accept loop) and its tasks then share that thread,
    /// where a multi-threaded runtime with one worker would run the main future on a second
    /// thread and wake one from the other for every message.
    pub fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let threads = match self.threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            threads => threads,
        };
        let mut builder = if threads == 1 {
            // Its only other threads are the blocking pool's (files, DNS), named for `top -H`.
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder.thread_name("pictor-blocking");
            builder
        } else {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        };
        builder.enable_all();
        builder.build()
    }
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
    /// Export each job as an OpenAI Agents trace (needs `openai.api_key`): what
    /// [`Self::openai_mode`] says, resolved at load (`auto`: whether an OpenAI key is set).
    #[serde(skip)]
    pub openai_enabled: bool,
    /// The setting as written: `true`, `false` or `auto`.
    #[serde(rename = "openai_enabled", deserialize_with = "openai_traces_mode")]
    pub openai_mode: OpenAiTracesMode,
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

/// `traces.openai_enabled`: OpenAI traces on, off, or on exactly when an OpenAI key is set
/// (`auto`, what the compose file and the Kubernetes manifests use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAiTracesMode {
    Off,
    On,
    Auto,
}

impl OpenAiTracesMode {
    /// The value as written in the settings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "false",
            Self::On => "true",
            Self::Auto => "auto",
        }
    }
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
        if !(0.0..=100.0).contains(&self.reconcile.tolerance_percent) {
            return Err(ConfigError::new(
                describe("reconcile.tolerance_percent"),
                "must be between 0 and 100",
            ));
        }
        self.traces.openai_enabled = match self.traces.openai_mode {
            OpenAiTracesMode::On => true,
            OpenAiTracesMode::Off => false,
            OpenAiTracesMode::Auto => self.openai.api_key.is_some(),
        };
        if self.traces.workflow_name.trim().is_empty() {
            return Err(ConfigError::new(
                describe("traces.workflow_name"),
                "must not be empty",
            ));
        }
        if self.images.retention.is_zero() {
            self.images.retention = self.jobs.ttl;
        }
        for (interval, key) in [
            (self.images.sweep_interval, "images.sweep_interval_secs"),
            (self.images.measure_interval, "images.measure_interval_secs"),
        ] {
            if interval.is_zero() {
                return Err(ConfigError::new(describe(key), "must be at least 1 second"));
            }
        }
        if self.runtime.threads > MAX_THREADS {
            return Err(ConfigError::new(
                describe("runtime.threads"),
                format!("must be at most {MAX_THREADS} (0: one per CPU)"),
            ));
        }
        if self.redis.min_replicas > MAX_MIN_REPLICAS {
            return Err(ConfigError::new(
                describe("redis.min_replicas"),
                format!("must be at most {MAX_MIN_REPLICAS}"),
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
            // The file replaces the development keys: a production deployment must not keep
            // accepting a demo key someone left in the environment.
            self.api.dev_api_keys = ApiKeys::parse_hashed(&text)
                .map_err(|message| ConfigError::new(describe("api.api_keys_file"), message))?;
        }
        Ok(self)
    }

    /// The keys the api accepts: the hashed production file when one is configured, else the
    /// development keys.
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
    fn runtime_threads_past_any_machine_are_refused_naming_the_variable() {
        let of = |raw: &str| Settings::from_layers(None, &env(&[("PICTOR_THREADS", raw)]));
        assert_eq!(Settings::defaults().unwrap().runtime.threads, 0);
        assert_eq!(of("1").unwrap().runtime.threads, 1);
        assert_eq!(of("1024").unwrap().runtime.threads, MAX_THREADS);
        for bad in ["1025", "4294967296", "-1", "1e300", "two"] {
            let error = of(bad).unwrap_err();
            assert!(
                error.to_string().contains("PICTOR_THREADS"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn one_runtime_thread_is_a_current_thread_runtime_and_more_are_that_many_workers() {
        use tokio::runtime::RuntimeFlavor;
        let of = |threads| RuntimeSettings { threads }.build().unwrap();
        assert_eq!(
            of(1).handle().runtime_flavor(),
            RuntimeFlavor::CurrentThread
        );
        let two = of(2);
        assert_eq!(two.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(two.metrics().num_workers(), 2);
        let cpus = std::thread::available_parallelism().unwrap().get();
        let zero = of(0);
        if cpus == 1 {
            assert_eq!(zero.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        } else {
            assert_eq!(zero.metrics().num_workers(), cpus, "one per CPU");
        }
    }

    #[test]
    fn a_replica_minimum_past_any_sentinel_set_is_refused() {
        let of =
            |raw: &str| Settings::from_layers(None, &env(&[("PICTOR_REDIS_MIN_REPLICAS", raw)]));
        assert_eq!(Settings::defaults().unwrap().redis.min_replicas, 1);
        assert_eq!(of("0").unwrap().redis.min_replicas, 0);
        assert_eq!(of("16").unwrap().redis.min_replicas, 16);
        for raw in ["17", "4294967296", "-1", "1e300"] {
            let error = of(raw).unwrap_err();
            assert!(
                error.to_string().contains("PICTOR_REDIS_MIN_REPLICAS"),
                "{raw}: {error}"
            );
        }
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error() {
        let error =
            Settings::from_layers(Some("[api]\nadress = \"x\"\n"), &HashMap::new()).unwrap_err();
        assert!(error.to_string().contains("adress"), "{error}");
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
    fn auto_openai_traces_are_on_exactly_when_an_openai_key_is_set() {
        let auto = |extra: &[(&str, &str)]| {
            let mut pairs = vec![("PICTOR_OPENAI_TRACES", "auto")];
            pairs.extend_from_slice(extra);
            Settings::from_layers(None, &env(&pairs)).unwrap().traces
        };
        let without_key = auto(&[]);
        assert_eq!(without_key.openai_mode, OpenAiTracesMode::Auto);
        assert!(!without_key.openai_enabled);
        // An empty key (compose's `${OPENAI_API_KEY:-}`) is no key.
        assert!(!auto(&[("OPENAI_API_KEY", "")]).openai_enabled);
        let with_key = auto(&[("OPENAI_API_KEY", "sk-test")]);
        assert!(with_key.openai_enabled);
        assert!(with_key.redact, "auto keeps redaction on by default");

        // `true` and `false` mean what they always meant, whatever the key; a file may write
        // them as booleans or strings.
        let on = Settings::from_layers(None, &env(&[("PICTOR_OPENAI_TRACES", "true")])).unwrap();
        assert_eq!(on.traces.openai_mode, OpenAiTracesMode::On);
        assert!(on.traces.openai_enabled);
        let off = Settings::from_layers(
            None,
            &env(&[
                ("PICTOR_OPENAI_TRACES", "false"),
                ("OPENAI_API_KEY", "sk-test"),
            ]),
        )
        .unwrap();
        assert!(!off.traces.openai_enabled);
        for (file, enabled) in [
            ("[traces]\nopenai_enabled = true\n", true),
            ("[traces]\nopenai_enabled = false\n", false),
            ("[traces]\nopenai_enabled = \"Auto\"\n", false),
        ] {
            let settings = Settings::from_layers(Some(file), &HashMap::new()).unwrap();
            assert_eq!(settings.traces.openai_enabled, enabled, "{file}");
        }
        let error = Settings::from_layers(None, &env(&[("PICTOR_OPENAI_TRACES", "yes")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("PICTOR_OPENAI_TRACES"), "{error}");
        assert!(error.contains("auto"), "{error}");
    }

    #[test]
    fn images_are_kept_as_long_as_their_job_unless_a_retention_is_set() {
        let settings = Settings::defaults().unwrap();
        assert_eq!(settings.images.retention, settings.jobs.ttl);
        assert_eq!(settings.images.max_store_bytes(), None);
        let settings =
            Settings::from_layers(None, &env(&[("PICTOR_JOB_TTL_SECS", "3600")])).unwrap();
        assert_eq!(settings.images.retention, Duration::from_secs(3600));

        let settings = Settings::from_layers(
            None,
            &env(&[
                ("PICTOR_IMAGE_RETENTION_SECS", "60"),
                ("PICTOR_IMAGE_STORE_MAX_MIB", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.images.retention, Duration::from_secs(60));
        assert_eq!(settings.images.max_store_bytes(), Some(2 * 1024 * 1024));

        let error = Settings::from_layers(None, &env(&[("PICTOR_IMAGE_SWEEP_INTERVAL_SECS", "0")]))
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("PICTOR_IMAGE_SWEEP_INTERVAL_SECS"),
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
    fn a_key_file_replaces_the_development_keys() {
        use sha2::Digest;
        let file = std::env::temp_dir().join(format!("pictor-keys-{}", uuid::Uuid::new_v4()));
        let digest = format!("{:x}", sha2::Sha256::digest(b"prod-secret"));
        std::fs::write(&file, format!("carol:ops:{digest}\n")).unwrap();
        let settings = Settings::from_layers(
            None,
            &env(&[
                ("PICTOR_API_KEYS", "demo:user:demo-key"),
                ("PICTOR_API_KEYS_FILE", file.to_str().unwrap()),
            ]),
        )
        .unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(settings.api_keys().authenticate("prod-secret").is_some());
        assert!(
            settings.api_keys().authenticate("demo-key").is_none(),
            "the demo key is gone"
        );
    }

    #[test]
    fn malformed_dev_keys_are_rejected_at_load() {
        let error =
            Settings::from_layers(None, &env(&[("PICTOR_API_KEYS", "alice:admin:x")])).unwrap_err();
        assert!(error.to_string().contains("PICTOR_API_KEYS"), "{error}");
    }
}
