//! How a non-2xx OpenAI answer becomes a [`ProviderError`]: the failure code, whether and
//! when to retry, and a detail for the logs (`docs/providers.md`, section 3).

use std::time::Duration;

use chrono::Utc;
use reqwest::header::HeaderMap;
use serde::Deserialize;
use shared::codes::FailureCode;
use shared::retry::{MAX_SERVER_DELAY, parse_seconds, server_delay};

use super::provider_error;
use crate::providers::{ProviderError, Retry, truncate};

/// 429 codes (or types) that mean money or quota ran out: waiting minutes will not help.
const QUOTA_CODES: &[&str] = &[
    "insufficient_quota",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
];

/// Decides code and retry for a non-2xx answer. The body is the `Error` shape when the API
/// produced it, but proxies may answer with anything, so every field is optional.
///
/// `x-should-retry` overrides what the status alone implies, in either direction, as the official
/// SDK does; a code taken from the body that means "permanent" (an exhausted quota, a moderation
/// block) stays permanent whatever the header says, because retrying those only costs money.
pub(super) fn classify_error(status: u16, headers: &HeaderMap, body: &str) -> ProviderError {
    let api_error = serde_json::from_str::<ErrorBody>(body)
        .ok()
        .map(|parsed| parsed.error)
        .unwrap_or_default();
    let error_code = api_error.code.as_deref().unwrap_or_default();
    let error_type = api_error.kind.as_deref().unwrap_or_default();
    let is_quota = QUOTA_CODES.contains(&error_code) || QUOTA_CODES.contains(&error_type);
    let code = match status {
        429 if is_quota => FailureCode::QuotaExceeded,
        429 => FailureCode::RateLimited,
        408 | 409 => FailureCode::ProviderUnavailable,
        500.. => FailureCode::ProviderUnavailable,
        400 if error_code == "moderation_blocked" => FailureCode::ContentBlocked,
        401 | 403 => FailureCode::ProviderAuthFailed,
        _ => FailureCode::InvalidRequest,
    };
    let permanent_by_body = matches!(
        code,
        FailureCode::QuotaExceeded | FailureCode::ContentBlocked
    );
    let retryable_by_status = matches!(
        code,
        FailureCode::RateLimited | FailureCode::ProviderUnavailable
    );
    let should_retry = headers
        .get("x-should-retry")
        .and_then(|value| value.to_str().ok())
        .map(|value| value.trim().to_ascii_lowercase());
    let retryable = !permanent_by_body
        && match should_retry.as_deref() {
            Some("true") => true,
            Some("false") => false,
            _ => retryable_by_status,
        };
    let retry = if retryable {
        Retry::Yes {
            after: retry_after(headers),
        }
    } else {
        Retry::No
    };

    let mut detail = format!("http {status}");
    if !error_type.is_empty() {
        detail.push_str(&format!(", type {error_type}"));
    }
    if !error_code.is_empty() {
        detail.push_str(&format!(", code {error_code}"));
    }
    let message = api_error.message.as_deref().unwrap_or(body).trim();
    if !message.is_empty() {
        detail.push_str(&format!(": {}", truncate(message)));
    }
    provider_error(code, retry, detail, Some(status))
}

/// The delay the server asked for: `retry-after-ms` first, then `retry-after` in seconds or as an
/// HTTP date; clamped to the retry policy's longest server delay, and ignored when negative or
/// not a number.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if let Some(delay) = header("retry-after-ms")
        .and_then(|raw| raw.trim().parse::<f64>().ok())
        .and_then(|millis| server_delay(millis / 1000.0))
    {
        return Some(delay);
    }
    let raw = header("retry-after")?;
    parse_seconds(raw).or_else(|| {
        let at = chrono::DateTime::parse_from_rfc2822(raw.trim()).ok()?;
        let delay = (at.with_timezone(&Utc) - Utc::now()).to_std().ok()?;
        Some(delay.min(MAX_SERVER_DELAY))
    })
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: ApiError,
}

#[derive(Debug, Default, Deserialize)]
struct ApiError {
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::openai::test_support::*;
    use crate::providers::{Classifier, ClassifyRequest, ImageGenerator};

    #[tokio::test]
    async fn rate_limited_429_is_retryable_with_the_servers_delay() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(429)
                .insert_header("retry-after-ms", "1500")
                .insert_header("retry-after", "2")
                .set_body_json(openai_error(
                    "Rate limit reached for gpt-image-1.5 on requests per min (RPM): Limit 3, \
                     Used 3, Requested 1. Please try again in 20s.",
                    "requests",
                    Some("rate_limit_exceeded"),
                )),
        )
        .await;

        let error = images(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::RateLimited);
        assert_eq!(
            error.retry,
            Retry::Yes {
                after: Some(Duration::from_millis(1500))
            }
        );
        assert_eq!(error.status, Some(429));
        assert!(
            error.detail.contains("rate_limit_exceeded"),
            "{}",
            error.detail
        );
        assert!(
            error.detail.contains("images/generations"),
            "{}",
            error.detail
        );
        assert_no_key(&error);
    }

    #[tokio::test]
    async fn insufficient_quota_429_is_permanent() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(429).set_body_json(openai_error(
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                Some("insufficient_quota"),
            )),
        )
        .await;

        let error = images(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::QuotaExceeded);
        assert_eq!(error.retry, Retry::No);
        assert!(
            error.user_message.contains("usage limit"),
            "{}",
            error.user_message
        );
    }

    #[test]
    fn newer_spend_limit_codes_are_quota_even_when_the_server_says_retry() {
        let body = openai_error(
            "Spend limit reached",
            "requests",
            Some("project_spend_limit_exceeded"),
        );
        let error = classify_error(
            429,
            &headers(&[("x-should-retry", "true")]),
            &body.to_string(),
        );
        assert_eq!(error.code, FailureCode::QuotaExceeded);
        assert_eq!(error.retry, Retry::No);
    }

    #[tokio::test]
    async fn service_unavailable_503_is_retryable_and_honours_retry_after() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(503)
                .insert_header("retry-after", "2.5")
                .set_body_json(openai_error(
                    "The server is overloaded.",
                    "service_unavailable_error",
                    Some("server_is_overloaded"),
                )),
        )
        .await;

        let error = images(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::ProviderUnavailable);
        assert_eq!(
            error.retry,
            Retry::Yes {
                after: Some(Duration::from_millis(2500))
            }
        );
        assert!(error.user_message.contains("temporarily unavailable"));
    }

    #[tokio::test]
    async fn moderation_blocked_400_is_content_blocked_and_permanent() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(400).set_body_json(json!({"error": {
                "type": "image_generation_user_error", "code": "moderation_blocked",
                "message": "Your request was rejected by the safety system.", "param": null,
                "moderation_details": {"moderation_stage": "input"}}})),
        )
        .await;

        let error = images(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::ContentBlocked);
        assert_eq!(error.retry, Retry::No);
        assert!(error.user_message.contains("safety system"));
    }

    #[tokio::test]
    async fn x_should_retry_false_overrides_a_retryable_status() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(500)
                .insert_header("x-should-retry", "false")
                .set_body_json(openai_error("boom", "server_error", None)),
        )
        .await;

        let error = images(&server)
            .generate(&generate_request())
            .await
            .unwrap_err();

        assert_eq!(error.retry, Retry::No);
        assert_eq!(error.status, Some(500));
    }

    #[test]
    fn x_should_retry_true_makes_a_client_error_retryable() {
        let body = openai_error("Lock timeout", "invalid_request_error", None);
        let error = classify_error(
            400,
            &headers(&[("x-should-retry", "true"), ("retry-after-ms", "250")]),
            &body.to_string(),
        );
        assert_eq!(
            error.retry,
            Retry::Yes {
                after: Some(Duration::from_millis(250))
            }
        );
    }

    #[test]
    fn statuses_map_to_codes_and_retry_decisions() {
        let cases: [(u16, FailureCode, bool); 8] = [
            (408, FailureCode::ProviderUnavailable, true),
            (409, FailureCode::ProviderUnavailable, true),
            (500, FailureCode::ProviderUnavailable, true),
            (502, FailureCode::ProviderUnavailable, true),
            (401, FailureCode::ProviderAuthFailed, false),
            (403, FailureCode::ProviderAuthFailed, false),
            (404, FailureCode::InvalidRequest, false),
            (422, FailureCode::InvalidRequest, false),
        ];
        for (status, code, retryable) in cases {
            let error = classify_error(status, &HeaderMap::new(), "");
            assert_eq!(error.code, code, "status {status}");
            assert_eq!(
                matches!(error.retry, Retry::Yes { .. }),
                retryable,
                "status {status}"
            );
        }
    }

    #[test]
    fn retry_after_accepts_an_http_date() {
        let at = (Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let mut map = HeaderMap::new();
        map.insert("retry-after", HeaderValue::from_str(&at).unwrap());
        let after = retry_after(&map).unwrap();
        assert!(
            after > Duration::from_secs(25) && after <= Duration::from_secs(30),
            "{after:?}"
        );
        assert_eq!(
            retry_after(&headers(&[(
                "retry-after",
                "Wed, 21 Oct 2015 07:28:00 GMT"
            )])),
            None
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(
            retry_after(&headers(&[(
                "retry-after",
                "Fri, 31 Dec 9999 23:59:59 GMT"
            )])),
            Some(MAX_SERVER_DELAY)
        );
    }

    #[test]
    fn hostile_retry_hints_are_clamped_to_the_policy_maximum_and_never_panic() {
        let clamped = Some(MAX_SERVER_DELAY);
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "1e300")])),
            clamped
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "1e20")])), clamped);
        assert_eq!(
            retry_after(&headers(&[
                ("retry-after-ms", "1e300"),
                ("retry-after", "1e20")
            ])),
            clamped
        );
        // Nonsense in the first header falls through to the second.
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "NaN"), ("retry-after", "2")])),
            Some(Duration::from_secs(2))
        );
        for ignored in ["-5", "NaN", "inf", "-inf"] {
            let mut map = HeaderMap::new();
            map.insert("retry-after-ms", HeaderValue::from_static(ignored));
            map.insert("retry-after", HeaderValue::from_static(ignored));
            assert_eq!(retry_after(&map), None, "{ignored}");
        }
        let error = classify_error(
            429,
            &headers(&[("retry-after-ms", "1e300")]),
            &openai_error("slow down", "requests", Some("rate_limit_exceeded")).to_string(),
        );
        assert_eq!(error.retry, Retry::Yes { after: clamped });
    }

    #[test]
    fn a_non_json_error_body_is_kept_truncated_in_the_detail() {
        let body = format!("<html>{}</html>", "x".repeat(1000));
        let error = classify_error(502, &HeaderMap::new(), &body);
        assert_eq!(error.code, FailureCode::ProviderUnavailable);
        assert!(
            error.detail.starts_with("http 502: <html>"),
            "{}",
            error.detail
        );
        assert!(error.detail.chars().count() < 340, "{}", error.detail.len());
    }

    #[tokio::test]
    async fn unauthorized_401_is_an_auth_failure_that_never_shows_the_key() {
        let server = MockServer::start().await;
        mount(
            &server,
            "chat/completions",
            ResponseTemplate::new(401).set_body_json(openai_error(
                &format!("Incorrect API key provided: {KEY}. You can find your API key at ..."),
                "invalid_request_error",
                Some("invalid_api_key"),
            )),
        )
        .await;

        let error = router(&server)
            .classify(&ClassifyRequest {
                prompt: "a cat".to_string(),
                has_image: false,
                intents: intents(),
            })
            .await
            .unwrap_err();

        assert_eq!(error.code, FailureCode::ProviderAuthFailed);
        assert_eq!(error.retry, Retry::No);
        assert!(error.detail.contains("[redacted]"), "{}", error.detail);
        assert_no_key(&error);
    }

    #[tokio::test]
    async fn a_refused_connection_is_retryable_without_a_delay() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let mut settings = Settings::defaults().unwrap().openai;
        settings.base_url = format!("http://{address}/v1").parse().unwrap();
        let openai = images_with(&settings);

        let error = openai.generate(&generate_request()).await.unwrap_err();

        assert_eq!(error.code, FailureCode::ProviderUnavailable);
        assert_eq!(error.retry, Retry::Yes { after: None });
        assert_eq!(error.status, None);
        assert!(
            error.detail.contains("connection failed"),
            "{}",
            error.detail
        );
        assert_no_key(&error);
    }

    #[tokio::test]
    async fn an_answer_past_the_cap_is_a_bad_response_that_is_not_retried() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(200).set_body_bytes(vec![b' '; 3 << 20]),
        )
        .await;
        mount(
            &server,
            "chat/completions",
            ResponseTemplate::new(500).set_body_bytes(vec![b' '; 3 << 20]),
        )
        .await;
        let mut settings = settings(&server);
        settings.max_response_mib = std::num::NonZeroU32::new(2).unwrap();

        let error = images_with(&settings)
            .generate(&generate_request())
            .await
            .unwrap_err();
        assert_eq!(error.code, FailureCode::BadResponse);
        assert_eq!(error.retry, Retry::No);
        assert!(error.possibly_billed, "a 200 may have been billed");
        assert!(
            error.detail.starts_with("images/generations: http 200: "),
            "{}",
            error.detail
        );
        assert!(error.detail.contains("3145728 bytes"), "{}", error.detail);
        assert!(error.detail.contains("2 MiB"), "{}", error.detail);
        assert!(
            error.detail.contains("openai.max_response_mib"),
            "{}",
            error.detail
        );

        // An error status with a huge body: not billed, and still not read.
        let error = router_with(&settings)
            .classify(&ClassifyRequest {
                prompt: "a cat".to_string(),
                has_image: false,
                intents: intents(),
            })
            .await
            .unwrap_err();
        assert_eq!(error.code, FailureCode::BadResponse);
        assert_eq!(error.status, Some(500));
        assert!(!error.possibly_billed);
    }

    #[tokio::test]
    async fn a_timeout_is_retryable() {
        let server = MockServer::start().await;
        mount(
            &server,
            "images/generations",
            ResponseTemplate::new(200).set_delay(Duration::from_secs(5)),
        )
        .await;
        let mut settings = settings(&server);
        settings.timeout = Duration::from_millis(200);
        let openai = images_with(&settings);

        let error = openai.generate(&generate_request()).await.unwrap_err();

        assert_eq!(error.code, FailureCode::ProviderTimeout);
        assert_eq!(error.retry, Retry::Yes { after: None });
        assert!(error.detail.contains("timed out"), "{}", error.detail);
    }
}
