//! The environment layer of the settings: which variable overrides which setting, and how a
//! variable's text goes into the settings tree (typed like the default it replaces). Errors
//! name the setting and its variable, so a person knows what to change.

use super::ConfigError;

/// Environment variables and the setting each one overrides.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("PICTOR_API_ADDR", "api.addr"),
    ("PICTOR_API_METRICS_ADDR", "api.metrics_addr"),
    (
        "PICTOR_HEADER_READ_TIMEOUT_SECS",
        "api.header_read_timeout_secs",
    ),
    ("PICTOR_REQUEST_TIMEOUT_SECS", "api.request_timeout_secs"),
    ("PICTOR_MAX_CONNECTIONS", "api.max_connections"),
    ("PICTOR_MAX_IN_FLIGHT", "api.max_in_flight"),
    ("PICTOR_MAX_STREAMS_PER_USER", "api.max_streams_per_user"),
    ("PICTOR_STREAM_LIFETIME_SECS", "api.stream_lifetime_secs"),
    ("PICTOR_PUBLIC_URL", "api.public_url"),
    ("PICTOR_MAX_BODY_BYTES", "api.max_body_bytes"),
    ("PICTOR_CORS_ORIGINS", "api.cors_origins"),
    ("PICTOR_API_KEYS", "api.api_keys"),
    ("PICTOR_API_KEYS_FILE", "api.api_keys_file"),
    ("PICTOR_RETRY_AFTER_SECS", "api.retry_after_secs"),
    ("PICTOR_PUBLISH_TIMEOUT_MS", "api.publish_timeout_ms"),
    ("PICTOR_USER_JOBS_PER_MINUTE", "api.user_jobs_per_minute"),
    ("PICTOR_USER_BURST", "api.user_burst"),
    ("PICTOR_AMQP_URL", "amqp.url"),
    (
        "PICTOR_QUORUM_INITIAL_GROUP_SIZE",
        "amqp.quorum_initial_group_size",
    ),
    ("PICTOR_QUEUE_PREFIX", "amqp.queue_prefix"),
    ("PICTOR_DELIVERY_LIMIT", "amqp.delivery_limit"),
    ("PICTOR_AMQP_CONNECT_TIMEOUT_MS", "amqp.connect_timeout_ms"),
    ("PICTOR_REDIS_URL", "redis.url"),
    ("PICTOR_REDIS_PREFIX", "redis.prefix"),
    ("PICTOR_REDIS_TIMEOUT_MS", "redis.timeout_ms"),
    ("PICTOR_REDIS_SENTINELS", "redis.sentinels"),
    ("PICTOR_REDIS_SENTINEL_SERVICE", "redis.sentinel_service"),
    ("PICTOR_REDIS_REPLICA_WAIT_MS", "redis.replica_wait_ms"),
    ("PICTOR_REDIS_MIN_REPLICAS", "redis.min_replicas"),
    ("PICTOR_JOB_TTL_SECS", "jobs.ttl_secs"),
    ("PICTOR_MAX_PROMPT_CHARS", "jobs.max_prompt_chars"),
    ("PICTOR_MAX_IMAGES", "jobs.max_images"),
    ("PICTOR_MAX_IMAGE_SIDE", "jobs.max_image_side"),
    (
        "PICTOR_MAX_PENDING_PER_USER",
        "backlog.max_pending_per_user",
    ),
    ("PICTOR_MAX_PENDING_JOBS", "backlog.max_pending"),
    ("PICTOR_FAIR_SLACK", "backlog.fair_slack"),
    ("PICTOR_FAIR_WINDOW_SECS", "backlog.fair_window_secs"),
    ("PICTOR_FAIR_WEIGHTS", "backlog.fair_weights"),
    ("PICTOR_IMAGE_STORE", "images.store"),
    ("PICTOR_IMAGE_RETENTION_SECS", "images.retention_secs"),
    (
        "PICTOR_IMAGE_SWEEP_INTERVAL_SECS",
        "images.sweep_interval_secs",
    ),
    (
        "PICTOR_IMAGE_MEASURE_INTERVAL_SECS",
        "images.measure_interval_secs",
    ),
    ("PICTOR_IMAGE_STORE_MAX_MIB", "images.max_store_mib"),
    ("PICTOR_WORKER_CONCURRENCY", "worker.concurrency"),
    (
        "PICTOR_WORKER_MAX_INFRA_ATTEMPTS",
        "worker.max_infra_attempts",
    ),
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
    ("PICTOR_ALERTS_VIA", "scheduler.alerts_via"),
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
    ("OPENAI_ADMIN_KEY", "openai.admin_key"),
    (
        "PICTOR_RECONCILE_TOLERANCE_PERCENT",
        "reconcile.tolerance_percent",
    ),
    ("PICTOR_ROUTER_MODEL", "openai.router_model"),
    ("PICTOR_OPENAI_IMAGE_MODEL", "openai.image_model"),
    ("PICTOR_OPENAI_IMAGE_QUALITY", "openai.image_quality"),
    ("PICTOR_UPSCALE_MAX_SIZE", "openai.upscale_max_size"),
    ("PICTOR_OPENAI_TIMEOUT_SECS", "openai.timeout_secs"),
    (
        "PICTOR_OPENAI_CONNECT_TIMEOUT_SECS",
        "openai.connect_timeout_secs",
    ),
    ("PICTOR_OPENAI_MAX_RESPONSE_MIB", "openai.max_response_mib"),
    ("GEMINI_BASE_URL", "gemini.base_url"),
    ("GEMINI_API_KEY", "gemini.api_key"),
    ("PICTOR_GEMINI_IMAGE_MODEL", "gemini.image_model"),
    ("PICTOR_GEMINI_TIMEOUT_SECS", "gemini.timeout_secs"),
    (
        "PICTOR_GEMINI_CONNECT_TIMEOUT_SECS",
        "gemini.connect_timeout_secs",
    ),
    ("PICTOR_GEMINI_MAX_RESPONSE_MIB", "gemini.max_response_mib"),
    ("PICTOR_SIMULATED_DELAY_MS", "simulated.delay_ms"),
    ("PICTOR_PRICING_FILE", "pricing.file"),
    ("PICTOR_LOG_FORMAT", "telemetry.log_format"),
    ("PICTOR_METRICS", "telemetry.metrics"),
    ("PICTOR_THREADS", "runtime.threads"),
    ("PICTOR_OPENAI_TRACES", "traces.openai_enabled"),
    ("PICTOR_TRACES_ENDPOINT", "traces.endpoint"),
    ("PICTOR_TRACES_WORKFLOW", "traces.workflow_name"),
    ("PICTOR_TRACES_REDACT", "traces.redact"),
    ("PICTOR_TRACES_QUEUE_SIZE", "traces.queue_size"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "traces.otlp_endpoint"),
];

/// "api.addr" → "api.addr (PICTOR_API_ADDR)", so an error names what to change.
pub(super) fn describe(path: &str) -> String {
    match ENV_VARS.iter().find(|(_, p)| *p == path) {
        Some((var, _)) => format!("{path} ({var})"),
        None => path.to_string(),
    }
}

pub(super) fn merge(base: &mut toml::Table, overlay: toml::Table) {
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
pub(super) fn set_from_env(
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
