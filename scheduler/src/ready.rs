//! Whether the scheduler's reports and alerts reach a person, said where operators look: the
//! `/readyz` body, a gauge, a warning in the log every hour, and a status in Redis that the
//! dashboard reads (`shared::delivery`).
//!
//! With neither email (SMTP with recipients) nor Slack configured, everything lands in the
//! outbox folder and nobody is told. Outside `pictor dev` that is a mistake worth saying loudly,
//! but not a reason to be unready: the scheduler serves no traffic, and a `503` would block
//! every rollout of the shipped default configuration. So `/readyz` stays `200` and its JSON
//! says `"delivery": "outbox_only"` with the settings to set.

use std::net::SocketAddr;
use std::sync::Mutex;

use axum::http::StatusCode;
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::watch;

/// How often a silent scheduler repeats its warning in the log.
pub const WARNING_INTERVAL: chrono::Duration = chrono::Duration::hours(1);

/// The settings to set so that someone is told.
pub const SETTINGS_HINT: &str = "No SMTP server with recipients (PICTOR_SMTP_URL and \
     PICTOR_EMAIL_TO) and no Slack webhook (PICTOR_SLACK_WEBHOOK_URL) are configured: reports \
     and alerts only land in the outbox folder (PICTOR_OUTBOX_DIR) and reach nobody. Set one of \
     them.";

/// The channels a replica delivers through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channels {
    pub email: bool,
    pub slack: bool,
    /// Inside `pictor dev`, where the outbox is the expected place.
    pub dev: bool,
}

impl Channels {
    /// Channels that reach a person.
    pub fn count(self) -> u32 {
        u32::from(self.email) + u32::from(self.slack)
    }

    /// Nobody is told, and this is not `pictor dev`.
    pub fn silent(self) -> bool {
        self.count() == 0 && !self.dev
    }

    /// The `/readyz` body.
    pub fn readiness(self) -> Value {
        let delivery = match (self.email, self.slack) {
            (true, true) => "email+slack",
            (true, false) => "email",
            (false, true) => "slack",
            (false, false) if self.dev => "outbox_dev",
            (false, false) => "outbox_only",
        };
        let mut body = json!({
            "status": "ready",
            "delivery": delivery,
            "channels": self.count(),
            "email": self.email,
            "slack": self.slack,
            "dev": self.dev,
        });
        if self.silent() {
            body["message"] = Value::String(SETTINGS_HINT.to_string());
        }
        body
    }
}

/// When to repeat the warning of a silent scheduler: at the first check, then every
/// [`WARNING_INTERVAL`].
#[derive(Debug, Default)]
pub struct SilentWarning {
    last: Mutex<Option<DateTime<Utc>>>,
}

impl SilentWarning {
    /// True when a warning is due at `now` (and counts it as given).
    pub fn due(&self, now: DateTime<Utc>) -> bool {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|last| now - last < WARNING_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Serves `/metrics`, `/healthz` (always `ok`: the process answers) and `/readyz` (always `200`,
/// the JSON of [`Channels::readiness`]) on `addr` until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    channels: Channels,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(|| async {
                shared::telemetry::metrics::handle()
                    .map(|handle| handle.render())
                    .unwrap_or_default()
            }),
        )
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .route(
            "/readyz",
            get(move || async move { (StatusCode::OK, axum::Json(channels.readiness())) }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(service = "scheduler", %addr, "Metrics listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_no_channel_outside_dev_is_outbox_only_with_the_settings_named() {
        let silent = Channels {
            email: false,
            slack: false,
            dev: false,
        };
        let body = silent.readiness();
        assert_eq!(body["delivery"], "outbox_only");
        assert_eq!(body["channels"], 0);
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains("PICTOR_SMTP_URL"), "{message}");
        assert!(message.contains("PICTOR_SLACK_WEBHOOK_URL"), "{message}");
        let dev = Channels {
            dev: true,
            ..silent
        };
        assert_eq!(dev.readiness()["delivery"], "outbox_dev");
        assert!(dev.readiness().get("message").is_none());
        let both = Channels {
            email: true,
            slack: true,
            dev: false,
        };
        assert_eq!(both.readiness()["delivery"], "email+slack");
        assert_eq!(both.count(), 2);
    }

    #[test]
    fn the_silent_warning_repeats_every_hour() {
        let start = DateTime::parse_from_rfc3339("2026-11-06T10:00:00Z")
            .map(|at| at.with_timezone(&Utc))
            .unwrap_or_default();
        let warning = SilentWarning::default();
        assert!(warning.due(start));
        assert!(!warning.due(start + chrono::Duration::seconds(15)));
        assert!(!warning.due(start + chrono::Duration::minutes(59)));
        assert!(warning.due(start + chrono::Duration::minutes(60)));
        assert!(!warning.due(start + chrono::Duration::minutes(61)));
        assert!(warning.due(start + chrono::Duration::minutes(125)));
    }
}
