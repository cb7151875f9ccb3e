//! The Slack channel: one POST of `{"text", "blocks"}` to an incoming webhook.
//!
//! Slack answers `200` with the plain-text body `ok`, and errors as plain-text codes: `400
//! invalid_payload`, `403 action_prohibited`, `404 channel_not_found` / `no_service`, `410
//! channel_is_archived`, `500 rollup_error`, and `429` with `Retry-After` (seconds) when over
//! its rate limit of about one message per second. Only 429 (after `Retry-After`, clamped by
//! the retry policy) and 5xx or network errors are retried; any other status is permanent,
//! because the same payload to the same webhook will fail the same way. Keeping on sending while
//! limited can get the app disabled, so a 429 is always waited out, never hurried.
//!
//! The webhook URL is the credential: it is never logged, and transport errors are stripped of
//! it (`reqwest::Error::without_url`) before they reach a log or an [`Outcome`].

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use secrecy::{ExposeSecret, SecretString};
use shared::retry::{RetryPolicy, parse_seconds};

use super::{DeliveryError, Message, Outcome, back_off, excerpt};

/// Longest wait for one webhook call, connect included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub(super) struct Slack {
    client: reqwest::Client,
    /// Kept secret: the URL is the webhook's credential.
    url: SecretString,
    pub(super) retry: RetryPolicy,
}

/// What one webhook call came to.
enum Attempt {
    Sent,
    Permanent(String),
    Transient {
        error: String,
        server_hint: Option<Duration>,
    },
}

impl Slack {
    pub(super) fn new(url: &SecretString, retry: RetryPolicy) -> Result<Self, DeliveryError> {
        // Parse once at start so a typo fails loudly; url's errors never quote the input.
        let parsed = reqwest::Url::parse(url.expose_secret())
            .map_err(|error| DeliveryError::SlackUrl(error.to_string()))?;
        if !matches!(parsed.scheme(), "https" | "http") {
            return Err(DeliveryError::SlackUrl(format!(
                "the scheme must be https, not {:?}",
                parsed.scheme()
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|error| DeliveryError::SlackUrl(error.without_url().to_string()))?;
        tracing::info!(
            host = parsed.host_str().unwrap_or("?"),
            "Slack reports are on"
        );
        Ok(Self {
            client,
            url: url.clone(),
            retry,
        })
    }

    pub(super) async fn send(&self, message: &Message) -> Outcome {
        let payload = payload(message);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (error, server_hint) = match self.post(&payload).await {
                Attempt::Sent => return Outcome::Sent,
                Attempt::Permanent(error) => return Outcome::permanent(error),
                Attempt::Transient { error, server_hint } => (error, server_hint),
            };
            if !self.retry.allows_another(attempts) {
                return Outcome::transient(format!("{error} (gave up after {attempts} attempts)"));
            }
            tracing::warn!(
                attempt = attempts,
                error = %error,
                retry_after_secs = server_hint.map(|hint| hint.as_secs_f64()),
                "Slack attempt failed, retrying"
            );
            back_off(&self.retry, attempts - 1, server_hint).await;
        }
    }

    async fn post(&self, payload: &serde_json::Value) -> Attempt {
        let response = match self
            .client
            .post(self.url.expose_secret())
            .json(payload)
            .send()
            .await
        {
            Ok(response) => response,
            Err(error) => {
                return Attempt::Transient {
                    error: error.without_url().to_string(),
                    server_hint: None,
                };
            }
        };
        let status = response.status();
        let server_hint = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(parse_seconds);
        // A body that cannot be read still leaves the status to decide on.
        let body = response.text().await.unwrap_or_default();
        if status.is_success() {
            if body.trim() != "ok" {
                tracing::debug!(%status, body = %excerpt(&body), "Slack accepted with an unusual body");
            }
            return Attempt::Sent;
        }
        let error = format!("{} {}", status.as_u16(), excerpt(&body));
        if status == StatusCode::TOO_MANY_REQUESTS {
            Attempt::Transient { error, server_hint }
        } else if status.is_server_error() {
            Attempt::Transient {
                error,
                server_hint: None,
            }
        } else {
            Attempt::Permanent(error)
        }
    }
}

/// The webhook body. Slack shows the blocks and uses `text` as the notification fallback; it
/// cannot carry files, so attachments are named in both.
fn payload(message: &Message) -> serde_json::Value {
    if message.attachments.is_empty() {
        return serde_json::json!({ "text": message.text, "blocks": message.slack_blocks });
    }
    let names = message
        .attachments
        .iter()
        .map(|attachment| attachment.filename.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let note = format!("Attachments (sent by email only): {names}");
    let mut blocks = message.slack_blocks.clone();
    if let Some(blocks) = blocks.as_array_mut() {
        blocks.push(serde_json::json!({
            "type": "context",
            "elements": [{ "type": "mrkdwn", "text": note }]
        }));
    }
    serde_json::json!({ "text": format!("{}\n\n{note}", message.text), "blocks": blocks })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::super::tests::{fast_retry, sample_message};
    use super::*;

    const HOOK: &str = "/services/T000/B000/XXXX";

    fn slack_answer(status: u16, body: &str) -> ResponseTemplate {
        ResponseTemplate::new(status).set_body_raw(body.as_bytes().to_vec(), "text/plain")
    }

    fn slack_for(server: &MockServer, retry: RetryPolicy) -> Slack {
        Slack::new(
            &SecretString::from(format!("{}{HOOK}", server.uri())),
            retry,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn an_ok_answer_is_sent_with_text_and_blocks_as_json() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(HOOK))
            .and(header("content-type", "application/json"))
            .respond_with(slack_answer(200, "ok"))
            .expect(1)
            .mount(&server)
            .await;
        let mut message = sample_message();
        message.attachments.clear();

        let outcome = slack_for(&server, fast_retry(3)).send(&message).await;

        assert_eq!(outcome, Outcome::Sent);
        let requests = server.received_requests().await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&requests[0].body).unwrap();
        assert_eq!(body["text"], message.text);
        assert_eq!(body["blocks"], message.slack_blocks);
    }

    #[tokio::test]
    async fn attachments_are_named_in_the_text_and_a_context_block() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(slack_answer(200, "ok"))
            .mount(&server)
            .await;

        let outcome = slack_for(&server, fast_retry(3))
            .send(&sample_message())
            .await;

        assert_eq!(outcome, Outcome::Sent);
        let requests = server.received_requests().await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&requests[0].body).unwrap();
        let text = body["text"].as_str().unwrap();
        assert!(text.starts_with("42 jobs, 2 failed"), "{text}");
        assert!(text.contains("jobs-2026-11-24.csv"), "{text}");
        let blocks = body["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[1]["type"], "context");
    }

    #[tokio::test]
    async fn a_rate_limit_is_waited_out_as_retry_after_says_then_sent() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(slack_answer(429, "rate_limited").insert_header("retry-after", "1"))
            .up_to_n_times(1)
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(slack_answer(200, "ok"))
            .expect(1)
            .mount(&server)
            .await;
        let started = Instant::now();

        let outcome = slack_for(&server, fast_retry(3))
            .send(&sample_message())
            .await;

        assert_eq!(outcome, Outcome::Sent);
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "retried after {:?}, before Retry-After",
            started.elapsed()
        );
        assert_eq!(server.received_requests().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_invalid_payload_is_permanent_after_exactly_one_request() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(slack_answer(400, "invalid_payload"))
            .expect(1)
            .mount(&server)
            .await;

        let outcome = slack_for(&server, fast_retry(3))
            .send(&sample_message())
            .await;

        assert_eq!(
            outcome,
            Outcome::Failed {
                permanent: true,
                error: "400 invalid_payload".to_string()
            }
        );
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_revoked_or_archived_webhook_is_permanent() {
        for (status, body) in [
            (403, "action_prohibited"),
            (404, "no_service"),
            (410, "channel_is_archived"),
        ] {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(slack_answer(status, body))
                .expect(1)
                .mount(&server)
                .await;
            let outcome = slack_for(&server, fast_retry(3))
                .send(&sample_message())
                .await;
            assert_eq!(
                outcome,
                Outcome::Failed {
                    permanent: true,
                    error: format!("{status} {body}")
                }
            );
        }
    }

    #[tokio::test]
    async fn server_errors_are_retried_until_slack_answers_ok() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(slack_answer(500, "rollup_error"))
            .up_to_n_times(2)
            .expect(2)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(slack_answer(200, "ok"))
            .expect(1)
            .mount(&server)
            .await;

        let outcome = slack_for(&server, fast_retry(4))
            .send(&sample_message())
            .await;

        assert_eq!(outcome, Outcome::Sent);
        assert_eq!(server.received_requests().await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn server_errors_that_persist_are_a_transient_failure() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(slack_answer(500, "rollup_error"))
            .expect(3)
            .mount(&server)
            .await;

        let outcome = slack_for(&server, fast_retry(3))
            .send(&sample_message())
            .await;

        let Outcome::Failed { permanent, error } = outcome else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert!(!permanent);
        assert!(error.starts_with("500 rollup_error"), "{error}");
    }

    #[tokio::test]
    async fn network_errors_never_reveal_the_webhook_url() {
        // Bind then drop: nothing listens on the port any more, so connecting is refused.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let slack = Slack::new(
            &SecretString::from(format!("http://127.0.0.1:{port}/services/T/B/XSECRET")),
            fast_retry(2),
        )
        .unwrap();

        let outcome = slack.send(&sample_message()).await;

        let Outcome::Failed { permanent, error } = outcome else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert!(!permanent);
        assert!(!error.contains("XSECRET"), "{error}");
    }
}
