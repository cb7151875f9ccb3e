//! Delivery of reports and alerts: email (SMTP), Slack, and a local outbox.
//!
//! A [`Message`] is rendered once by the caller for every channel (plain text, HTML, Slack
//! blocks, attachments); [`Delivery::send`] hands it to each configured channel and returns one
//! [`Outcome`] per channel in a [`Report`]. Email and Slack run concurrently, each with its own
//! bounded retries, so a slow or broken channel never holds up the other. The outbox (files on
//! disk, laid out in `outbox.rs`) is used only when neither email nor Slack is configured, so that a
//! fresh installation still keeps its reports somewhere a person can read them.
//!
//! Every final outcome is counted in `pictor_notifications_total{channel, outcome}` with
//! `channel` one of `email`, `slack`, `outbox` and `outcome` one of `sent`, `failed_permanent`,
//! `failed_transient`. Secrets (the SMTP password inside its URL, the Slack webhook URL) are
//! never logged nor put into an error message.

mod email;
mod outbox;
mod slack;

use std::time::Duration;

use shared::config::SchedulerSettings;
use shared::retry::RetryPolicy;

use self::email::Email;
use self::outbox::Outbox;
use self::slack::Slack;

/// A file sent along with an email (Slack only gets a note naming it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub filename: String,
    /// A MIME type such as `text/csv`; an unparsable one is sent as `application/octet-stream`.
    pub content_type: String,
    pub bytes: bytes::Bytes,
}

/// One report or alert, rendered for every channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub subject: String,
    /// Plain-text body: the email's text part and Slack's `text` (its notification fallback).
    pub text: String,
    /// The email's HTML part.
    pub html: String,
    /// A Block Kit blocks array, sent to Slack as `blocks`.
    pub slack_blocks: serde_json::Value,
    /// Email only. When there are attachments, Slack gets a line naming them, appended to
    /// `text` and (when `slack_blocks` is an array) as a trailing `context` block.
    pub attachments: Vec<Attachment>,
}

/// What happened on one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    NotConfigured,
    /// `permanent`: retrying the same message will not help (bad address, revoked webhook, …);
    /// otherwise the retries ran out on a transient error (network, SMTP 4xx, HTTP 429/5xx).
    Failed {
        permanent: bool,
        error: String,
    },
}

impl Outcome {
    fn transient(error: impl Into<String>) -> Self {
        Self::Failed {
            permanent: false,
            error: error.into(),
        }
    }

    fn permanent(error: impl Into<String>) -> Self {
        Self::Failed {
            permanent: true,
            error: error.into(),
        }
    }

    /// The `outcome` metric label; `None` for a channel that is not configured.
    fn label(&self) -> Option<&'static str> {
        match self {
            Self::Sent => Some("sent"),
            Self::NotConfigured => None,
            Self::Failed {
                permanent: true, ..
            } => Some("failed_permanent"),
            Self::Failed {
                permanent: false, ..
            } => Some("failed_transient"),
        }
    }
}

/// The outcome of one [`Delivery::send`] on every channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub email: Outcome,
    pub slack: Outcome,
    pub outbox: Outcome,
}

impl Report {
    /// Whether at least one channel took the message.
    pub fn delivered(&self) -> bool {
        [&self.email, &self.slack, &self.outbox]
            .into_iter()
            .any(|outcome| *outcome == Outcome::Sent)
    }
}

/// A setting that makes a channel unusable; the scheduler refuses to start with it.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The reason never contains the URL, which may hold a password.
    #[error("scheduler.smtp_url is not a usable SMTP URL: {0}")]
    SmtpUrl(String),
    #[error("scheduler.email_from {value:?} is not a valid mailbox: {reason}")]
    EmailFrom { value: String, reason: String },
    #[error("scheduler.email_to has an invalid address {value:?}: {reason}")]
    EmailTo { value: String, reason: String },
    /// The reason never contains the URL, which is a secret.
    #[error("scheduler.slack_webhook_url is not a usable URL: {0}")]
    SlackUrl(String),
}

/// The configured channels. Cheap to share behind an `Arc`; `send` takes `&self`.
pub struct Delivery {
    email: Option<Email>,
    slack: Option<Slack>,
    outbox: Option<Outbox>,
}

/// Attempts per message and channel by default: with the policy's backoff (0.5 s doubling,
/// capped at 8 s) a dead channel gives up within about half a minute.
const DEFAULT_MAX_ATTEMPTS: u32 = 5;

impl Delivery {
    /// Builds the channels the settings configure. Email needs both `smtp_url` and at least one
    /// `email_to` address (with a URL but no recipients it is off, with a warning); Slack needs
    /// `slack_webhook_url`; the outbox is used only when neither is on.
    pub fn from_settings(settings: &SchedulerSettings) -> Result<Self, DeliveryError> {
        let retry = RetryPolicy::new(DEFAULT_MAX_ATTEMPTS);
        let email = match &settings.smtp_url {
            Some(url) if settings.email_to.is_empty() => {
                tracing::warn!(
                    server = %email::server_for_logs(url),
                    "SMTP is configured but scheduler.email_to is empty: no email is sent"
                );
                None
            }
            Some(url) => Some(Email::new(
                url,
                &settings.email_from,
                &settings.email_to,
                retry,
            )?),
            None => None,
        };
        let slack = settings
            .slack_webhook_url
            .as_ref()
            .map(|url| Slack::new(url, retry))
            .transpose()?;
        let outbox = (email.is_none() && slack.is_none()).then(|| {
            tracing::info!(
                outbox_dir = %settings.outbox_dir.display(),
                "No SMTP or Slack configured: reports go to the outbox folder {}",
                settings.outbox_dir.display()
            );
            Outbox::new(settings.outbox_dir.clone())
        });
        Ok(Self {
            email,
            slack,
            outbox,
        })
    }

    /// Whether email (SMTP with recipients) and Slack are configured.
    pub fn channels(&self) -> (bool, bool) {
        (self.email.is_some(), self.slack.is_some())
    }

    /// Replaces the retry policy of email and Slack (tests use fast ones).
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        if let Some(email) = &mut self.email {
            email.retry = policy;
        }
        if let Some(slack) = &mut self.slack {
            slack.retry = policy;
        }
        self
    }

    /// Sends `message` on every configured channel and reports each channel's outcome. Email
    /// and Slack run concurrently; neither waits for the other's retries.
    pub async fn send(&self, message: &Message) -> Report {
        let email = async {
            match &self.email {
                Some(email) => finish("email", email.send(message).await),
                None => Outcome::NotConfigured,
            }
        };
        let slack = async {
            match &self.slack {
                Some(slack) => finish("slack", slack.send(message).await),
                None => Outcome::NotConfigured,
            }
        };
        let (email, slack) = tokio::join!(email, slack);
        let outbox = match &self.outbox {
            Some(outbox) => finish("outbox", outbox.write(message).await),
            None => Outcome::NotConfigured,
        };
        Report {
            email,
            slack,
            outbox,
        }
    }
}

/// Counts and logs a channel's final outcome.
fn finish(channel: &'static str, outcome: Outcome) -> Outcome {
    if let Some(label) = outcome.label() {
        metrics::counter!("pictor_notifications_total", "channel" => channel, "outcome" => label)
            .increment(1);
    }
    match &outcome {
        Outcome::Sent => tracing::info!(channel, "Notification delivered"),
        Outcome::NotConfigured => {}
        Outcome::Failed { permanent, error } => {
            tracing::warn!(channel, permanent, error = %error, "Notification failed");
        }
    }
    outcome
}

/// Sleeps before retry number `retry` (0 for the first) as the policy says, with the server's
/// hint when it gave one.
async fn back_off(policy: &RetryPolicy, retry: u32, server_hint: Option<Duration>) {
    tokio::time::sleep(policy.delay(retry, server_hint)).await;
}

/// Trims a remote error body to something fit for a log line and an error string.
fn excerpt(body: &str) -> String {
    const MAX_CHARS: usize = 200;
    let body = body.trim();
    match body.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &body[..cut]),
        None => body.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use secrecy::SecretString;
    use shared::config::Settings;

    use super::*;

    pub(super) fn scheduler_settings() -> SchedulerSettings {
        let mut settings = Settings::defaults().expect("defaults load").scheduler;
        settings.smtp_url = None;
        settings.slack_webhook_url = None;
        settings.email_to = Vec::new();
        settings.outbox_dir = std::env::temp_dir().join(format!(
            "pictor-outbox-test-{}",
            uuid::Uuid::new_v4().simple()
        ));
        settings
    }

    pub(super) fn fast_retry(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            max_server_delay: Duration::from_secs(60),
        }
    }

    pub(super) fn sample_message() -> Message {
        Message {
            subject: "Pictor daily report 2026-11-24".to_string(),
            text: "42 jobs, 2 failed".to_string(),
            html: "<p><b>42</b> jobs, 2 failed</p>".to_string(),
            slack_blocks: serde_json::json!([
                {"type": "section", "text": {"type": "mrkdwn", "text": "*42* jobs, 2 failed"}}
            ]),
            attachments: vec![Attachment {
                filename: "jobs-2026-11-24.csv".to_string(),
                content_type: "text/csv".to_string(),
                bytes: bytes::Bytes::from_static(b"day,jobs\n2026-11-24,42\n"),
            }],
        }
    }

    #[test]
    fn the_outbox_is_used_only_when_neither_email_nor_slack_is_configured() {
        let settings = scheduler_settings();
        let delivery = Delivery::from_settings(&settings).unwrap();
        assert!(delivery.email.is_none() && delivery.slack.is_none());
        assert!(delivery.outbox.is_some());

        let mut settings = scheduler_settings();
        settings.slack_webhook_url = Some(SecretString::from("http://127.0.0.1:9/hook"));
        let delivery = Delivery::from_settings(&settings).unwrap();
        assert!(delivery.slack.is_some());
        assert!(delivery.outbox.is_none());

        let mut settings = scheduler_settings();
        settings.smtp_url = Some(SecretString::from("smtp://127.0.0.1:2525"));
        settings.email_to = vec!["ops@example.com".to_string()];
        let delivery = Delivery::from_settings(&settings).unwrap();
        assert!(delivery.email.is_some());
        assert!(delivery.outbox.is_none());
    }

    #[test]
    fn email_without_recipients_is_not_configured_and_the_outbox_takes_over() {
        let mut settings = scheduler_settings();
        settings.smtp_url = Some(SecretString::from("smtp://127.0.0.1:2525"));
        let delivery = Delivery::from_settings(&settings).unwrap();
        assert!(delivery.email.is_none());
        assert!(delivery.outbox.is_some());
    }

    #[test]
    fn bad_settings_fail_at_start_without_echoing_secrets() {
        let mut settings = scheduler_settings();
        settings.smtp_url = Some(SecretString::from(
            "smtpx://pictor:hunter2@mail.example.com",
        ));
        settings.email_to = vec!["ops@example.com".to_string()];
        let error = Delivery::from_settings(&settings)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("scheduler.smtp_url"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");

        let mut settings = scheduler_settings();
        settings.slack_webhook_url =
            Some(SecretString::from("hooks.slack.com/services/T/B/XSECRET"));
        let error = Delivery::from_settings(&settings)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("scheduler.slack_webhook_url"), "{error}");
        assert!(!error.contains("XSECRET"), "{error}");

        let mut settings = scheduler_settings();
        settings.smtp_url = Some(SecretString::from("smtp://127.0.0.1:2525"));
        settings.email_to = vec!["not an address".to_string()];
        let error = Delivery::from_settings(&settings)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("not an address"), "{error}");
    }

    #[test]
    fn a_report_counts_as_delivered_when_any_channel_sent() {
        let failed = Outcome::permanent("403 action_prohibited");
        let report = Report {
            email: Outcome::NotConfigured,
            slack: failed.clone(),
            outbox: Outcome::NotConfigured,
        };
        assert!(!report.delivered());
        let report = Report {
            email: Outcome::Sent,
            ..report
        };
        assert!(report.delivered());
    }

    #[tokio::test]
    async fn with_nothing_configured_a_message_lands_in_the_outbox() {
        let settings = scheduler_settings();
        let delivery = Delivery::from_settings(&settings).unwrap();
        let report = delivery.send(&sample_message()).await;
        assert_eq!(report.email, Outcome::NotConfigured);
        assert_eq!(report.slack, Outcome::NotConfigured);
        assert_eq!(report.outbox, Outcome::Sent);
        assert!(report.delivered());
        let written: Vec<PathBuf> = std::fs::read_dir(&settings.outbox_dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        assert_eq!(written.len(), 1, "{written:?}");
        std::fs::remove_dir_all(&settings.outbox_dir).unwrap();
    }

    #[test]
    fn long_error_bodies_are_cut() {
        assert_eq!(excerpt("  ok \n"), "ok");
        let long = "x".repeat(500);
        assert_eq!(excerpt(&long).chars().count(), 201);
    }
}
