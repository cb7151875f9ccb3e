//! The failure-handling rules as a client sees them: which provider errors are retried and how
//! often, what a poller sees meanwhile (`retrying`, `queued` again after a rate limit), when an
//! edit falls back from Gemini to OpenAI, when the router asks the user instead, and what a
//! failed job tells its user (a stable code and a sentence without technical detail).

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::config::RateLimitSettings;
use shared::domain::Notice;
use tests::harness::{ALICE, Options, TestApp, spawn_app, spawn_app_with};
use tests::mocks::{MOCK_IMAGE_SIDE, png};
use wiremock::matchers::{header_exists, method, path, path_regex};
use wiremock::{Mock, ResponseTemplate};
use worker::breaker::{BreakerPolicy, CircuitBreaker};

const TERMINAL: [&str; 4] = ["succeeded", "failed", "needs_clarification", "canceled"];

/// Polls the job every 10 ms until it is terminal and returns the statuses seen, with
/// consecutive repeats collapsed (e.g. `["queued", "running", "retrying", "running", ...]`).
async fn statuses_seen(app: &TestApp, key: &str, id: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen: Vec<String> = Vec::new();
    loop {
        let job = app.job(key, id).await;
        let status = job["status"].as_str().unwrap().to_string();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if TERMINAL.contains(&status.as_str()) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not end; statuses so far: {seen:?}; last: {job:#}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `later` was seen at some point after `earlier`.
fn seen_after(statuses: &[String], earlier: &str, later: &str) -> bool {
    statuses
        .iter()
        .position(|status| status == earlier)
        .is_some_and(|first| statuses[first + 1..].iter().any(|status| status == later))
}

/// The job's notices with this code, oldest first.
fn notices(job: &Value, code: &str) -> Vec<Notice> {
    job["notices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|notice| notice["code"] == code)
        .map(|notice| serde_json::from_value(notice.clone()).unwrap())
        .collect()
}

/// A user-facing sentence: present, and free of status codes, provider error codes, request ids,
/// keys and raw provider text.
fn assert_friendly(message: &str) {
    assert!(!message.trim().is_empty(), "a message is shown");
    let lower = message.to_lowercase();
    for technical in [
        "http",
        "400",
        "401",
        "429",
        "500",
        "503",
        "req_",
        "sk-",
        "secret",
        "invalid_request_error",
        "invalid_api_key",
        "insufficient_quota",
        "rate_limit_exceeded",
        "server_error",
        "resource_exhausted",
        "timed out",
        "images/generations",
        "{",
    ] {
        assert!(
            !lower.contains(technical),
            "the user message carries technical detail ({technical}): {message}"
        );
    }
}

/// The failed job's `error.code`, after checking its message is friendly.
fn failure_code(job: &Value) -> &str {
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_friendly(job["error"]["message"].as_str().unwrap());
    job["error"]["code"].as_str().unwrap()
}

/// A JSON job body with an image attached, so the router may send it to `edit`.
fn edit_request(prompt: &str) -> Value {
    json!({
        "prompt": prompt,
        "image": {"data": BASE64.encode(png(16, 16, 9)), "mime_type": "image/png"},
    })
}

/// A minimal, valid OpenAI images answer (one PNG, no usage) for hand-mounted mocks.
fn openai_images_body() -> Value {
    json!({
        "created": 1,
        "data": [{"b64_json": BASE64.encode(png(MOCK_IMAGE_SIDE, MOCK_IMAGE_SIDE, 1))}],
    })
}

/// Mounts a slow answer on `POST /v1/images/generations`.
async fn slow_image_generation(app: &TestApp, delay: Duration) {
    Mock::given(method("POST"))
        .and(path("/v1/images/generations"))
        .and(header_exists("authorization"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(delay)
                .set_body_json(openai_images_body()),
        )
        .named("slow openai images generate")
        .mount(&app.openai.as_ref().unwrap().server)
        .await;
}

/// Mounts a router that answers `create` with confidence 0.9 after `delay`, so a poller has
/// time to see the job `running` before its first image call.
async fn slow_router(app: &TestApp, delay: Duration) {
    let content =
        json!({"intent": "create", "confidence": 0.9, "prompt": "a fox", "question": null});
    let body = json!({
        "id": "chatcmpl-slow",
        "object": "chat.completion",
        "created": 1,
        "model": app.settings.openai.router_model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content.to_string(), "refusal": null},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 120, "completion_tokens": 24, "total_tokens": 144},
    });
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header_exists("authorization"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(delay)
                .set_body_json(body),
        )
        .named("slow openai router")
        .mount(&app.openai.as_ref().unwrap().server)
        .await;
}

// ---------------------------------------------------------------------------------------------
// Retries of the image model
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_503_from_the_image_model_is_retried_with_a_notice_per_attempt_and_the_job_then_succeeds()
{
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a fox", None).await;
    openai
        .error(
            "images/generations",
            503,
            "service_unavailable_error",
            Some("server_is_overloaded"),
            "The server is overloaded. Please try again later.",
            &[],
            Some(3),
        )
        .await;
    openai.images_generate_ok().await;

    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let statuses = statuses_seen(&app, ALICE, &id).await;
    let job = app.job(ALICE, &id).await;

    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(openai.received("images/generations").await.len(), 4);
    assert_eq!(job["attempts"], 5, "one router call and four image calls");
    let retrying = notices(&job, "retrying");
    assert_eq!(retrying.len(), 3, "{job:#}");
    for (index, notice) in retrying.iter().enumerate() {
        let attempt = format!("Attempt {} of 4", index + 1);
        assert!(notice.message.contains(&attempt), "{}", notice.message);
        assert_friendly(&notice.message);
    }
    assert!(
        statuses.iter().any(|status| status == "retrying"),
        "a poller saw the job retrying: {statuses:?}"
    );
    assert_eq!(statuses.last().map(String::as_str), Some("succeeded"));
}

#[tokio::test]
async fn an_image_model_that_always_answers_500_fails_the_job_after_four_attempts_with_a_friendly_message()
 {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a fox", None).await;
    openai.server_error("images/generations", None).await;
    openai.images_generate_ok().await;

    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;

    assert_eq!(failure_code(&job), "provider_unavailable");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.to_lowercase().contains("try again"),
        "says to try again later: {message}"
    );
    assert_eq!(openai.received("images/generations").await.len(), 4);
    assert_eq!(job["attempts"], 5, "one router call and four image calls");
    assert_eq!(notices(&job, "retrying").len(), 3);
    assert!(job.get("result").is_none());
}

#[tokio::test]
async fn bad_requests_auth_failures_and_exhausted_quotas_fail_at_once_without_a_retry() {
    // (status, type, code, provider message, the job's error code)
    let cases = [
        (
            400,
            "invalid_request_error",
            Some("invalid_value"),
            "Invalid value for 'size': '999x999'. request id req_abc123",
            "invalid_request",
        ),
        (
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided: sk-test-secret-openai-key. You can find your API key at https://platform.openai.com/account/api-keys.",
            "provider_auth_failed",
        ),
        (
            429,
            "insufficient_quota",
            Some("insufficient_quota"),
            "You exceeded your current quota, please check your plan and billing details.",
            "quota_exceeded",
        ),
    ];
    for (status, error_type, code, provider_message, expected) in cases {
        let app = spawn_app().await;
        let openai = app.openai.as_ref().unwrap();
        openai.router_answers("create", 0.9, "a fox", None).await;
        openai
            .error(
                "images/generations",
                status,
                error_type,
                code,
                provider_message,
                &[],
                None,
            )
            .await;
        openai.images_generate_ok().await;

        let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
        let job = app.wait_until_terminal(ALICE, &id).await;

        assert_eq!(failure_code(&job), expected, "HTTP {status}: {job:#}");
        assert_eq!(
            openai.received("images/generations").await.len(),
            1,
            "HTTP {status} is not retried"
        );
        assert_eq!(
            job["attempts"], 2,
            "HTTP {status}: router and one image call"
        );
        assert!(
            notices(&job, "retrying").is_empty(),
            "HTTP {status}: {job:#}"
        );
        assert!(
            !job.to_string().contains("sk-test-secret-openai-key"),
            "HTTP {status}: the key never reaches the job"
        );
    }
}

#[tokio::test]
async fn a_400_the_server_marks_x_should_retry_true_is_retried() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a fox", None).await;
    openai
        .error(
            "images/generations",
            400,
            "invalid_request_error",
            None,
            "Lock timeout, please retry.",
            &[("x-should-retry", "true")],
            Some(1),
        )
        .await;
    openai.images_generate_ok().await;

    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;

    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(
        openai.received("images/generations").await.len(),
        2,
        "the 400 was retried"
    );
    assert_eq!(job["attempts"], 3);
    assert_eq!(notices(&job, "retrying").len(), 1, "{job:#}");
}

#[tokio::test]
async fn an_image_call_that_times_out_is_retried_and_then_fails_as_a_provider_timeout() {
    let app = spawn_app_with(Options::default(), |s| {
        s.openai.timeout = Duration::from_secs(1);
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a fox", None).await;
    slow_image_generation(&app, Duration::from_secs(3)).await;

    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let statuses = statuses_seen(&app, ALICE, &id).await;
    let job = app.job(ALICE, &id).await;

    assert_eq!(failure_code(&job), "provider_timeout", "{job:#}");
    assert_eq!(openai.received("images/generations").await.len(), 4);
    assert_eq!(job["attempts"], 5, "one router call and four image calls");
    assert!(
        statuses.iter().any(|status| status == "retrying"),
        "a poller saw the job retrying: {statuses:?}"
    );
    let retrying = notices(&job, "retrying");
    assert_eq!(retrying.len(), 3, "{job:#}");
    assert!(
        retrying[0].message.contains("too long"),
        "the retry notice names the timeout: {}",
        retrying[0].message
    );
}

// ---------------------------------------------------------------------------------------------
// Rate limits: the provider's and our own fleet-wide budget
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_provider_rate_limit_puts_the_job_back_in_the_queue_with_a_retry_time_and_it_then_succeeds()
 {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    slow_router(&app, Duration::from_millis(300)).await;
    openai
        .rate_limited("images/generations", 200, Some(1))
        .await;
    openai.images_generate_ok().await;

    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let statuses = statuses_seen(&app, ALICE, &id).await;
    let job = app.job(ALICE, &id).await;

    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(openai.received("images/generations").await.len(), 2);
    assert_eq!(job["attempts"], 3, "one router call and two image calls");
    let limited = notices(&job, "rate_limited");
    assert_eq!(limited.len(), 1, "{job:#}");
    let retry_at = limited[0]
        .retry_at
        .expect("a rate_limited notice has retry_at");
    let wait = (retry_at - limited[0].at).num_milliseconds();
    assert!(
        (0..=1_000).contains(&wait),
        "retry_at honours the 200 ms the provider asked for: {wait} ms"
    );
    assert_friendly(&limited[0].message);
    assert!(
        seen_after(&statuses, "running", "queued"),
        "a poller saw the job queued again after running: {statuses:?}"
    );
    assert!(
        notices(&job, "retrying").is_empty(),
        "a rate limit defers instead of retrying in place: {job:#}"
    );
}

#[tokio::test]
async fn a_job_over_the_fleet_wide_image_budget_waits_in_the_queue_until_the_budget_refills() {
    // 60 images a minute refill one image a second and allow a burst of max(60 / 10, n) = 6:
    // the first job (n = 4) leaves 2, so the second (n = 4) is denied for about 2 s.
    let app = spawn_app_with(Options::default(), |s| {
        s.rate_limits.insert(
            format!("openai:{}", s.openai.image_model),
            RateLimitSettings {
                requests_per_minute: NonZeroU32::new(600).unwrap(),
                images_per_minute: NonZeroU32::new(60),
                tokens_per_minute: None,
            },
        );
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    slow_router(&app, Duration::from_millis(300)).await;
    openai.images_generate_ok().await;

    let first = app.submit(ALICE, json!({"prompt": "a fox", "n": 4})).await;
    let first = app.wait_until_terminal(ALICE, &first).await;
    assert_eq!(first["status"], "succeeded", "{first:#}");
    assert!(notices(&first, "rate_limited").is_empty(), "{first:#}");

    let started = Instant::now();
    let second = app.submit(ALICE, json!({"prompt": "a fox", "n": 4})).await;
    let statuses = statuses_seen(&app, ALICE, &second).await;
    let second = app.job(ALICE, &second).await;

    assert_eq!(second["status"], "succeeded", "{second:#}");
    assert_eq!(second["result"]["images"].as_array().unwrap().len(), 4);
    let limited = notices(&second, "rate_limited");
    assert_eq!(limited.len(), 1, "{second:#}");
    let retry_at = limited[0]
        .retry_at
        .expect("a rate_limited notice has retry_at");
    let wait = (retry_at - limited[0].at).num_milliseconds();
    assert!(
        (1..=3_000).contains(&wait),
        "retry_at is when the budget has room again: {wait} ms"
    );
    assert!(
        seen_after(&statuses, "running", "queued"),
        "a poller saw the job queued again after running: {statuses:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the job waited for the budget"
    );
    assert_eq!(
        openai.received("images/generations").await.len(),
        2,
        "a denied call never reaches the provider"
    );
    assert_eq!(
        openai.received("chat/completions").await.len(),
        2,
        "the deferred job resumes at its image call without asking the router again"
    );
    assert_eq!(
        second["attempts"], 2,
        "one router call and one image call; the denial is not an attempt"
    );
}

// ---------------------------------------------------------------------------------------------
// Edits: Gemini first, OpenAI as the fallback, a circuit breaker in between
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_edit_falls_back_to_openai_when_gemini_keeps_answering_503() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    let gemini = app.gemini.as_ref().unwrap();
    openai
        .router_answers("edit", 0.9, "make it blue", None)
        .await;
    openai.images_edit_ok().await;
    gemini.unavailable(None).await;
    gemini.edit_ok().await;

    let id = app.submit(ALICE, edit_request("make it blue")).await;
    let job = app.wait_until_terminal(ALICE, &id).await;

    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["provider"], "openai");
    assert_eq!(
        gemini.received().await.len(),
        4,
        "Gemini had its four attempts"
    );
    assert_eq!(openai.received("images/edits").await.len(), 1);
    assert_eq!(
        job["attempts"], 6,
        "router, four Gemini calls, one OpenAI edit"
    );
    let fallback = notices(&job, "fallback_provider");
    assert_eq!(fallback.len(), 1, "{job:#}");
    assert!(
        fallback[0].message.to_lowercase().contains("openai"),
        "the notice names the service that made the edit: {}",
        fallback[0].message
    );
    assert_friendly(&fallback[0].message);
    assert_eq!(job["result"]["images"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_gemini_safety_block_fails_the_edit_without_trying_the_fallback() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    let gemini = app.gemini.as_ref().unwrap();
    openai
        .router_answers("edit", 0.9, "make it blue", None)
        .await;
    openai.images_edit_ok().await;
    gemini.blocked().await;

    let id = app.submit(ALICE, edit_request("make it blue")).await;
    let job = app.wait_until_terminal(ALICE, &id).await;

    assert_eq!(failure_code(&job), "content_blocked");
    assert_eq!(gemini.received().await.len(), 1, "a block is not retried");
    assert!(
        openai.received("images/edits").await.is_empty(),
        "a block is not sent to the fallback"
    );
    assert!(notices(&job, "fallback_provider").is_empty(), "{job:#}");
    assert_eq!(job["attempts"], 2);
}

#[tokio::test]
async fn after_repeated_gemini_failures_the_breaker_sends_edits_straight_to_the_fallback() {
    let app = spawn_app_with(Options::default(), |s| {
        s.breaker.failure_threshold = NonZeroU32::new(2).unwrap();
        s.breaker.cooldown = Duration::from_secs(60);
        s.worker.provider_max_attempts = NonZeroU32::new(1).unwrap();
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    let gemini = app.gemini.as_ref().unwrap();
    openai
        .router_answers("edit", 0.9, "make it blue", None)
        .await;
    openai.images_edit_ok().await;
    gemini.unavailable(None).await;

    let mut jobs = Vec::new();
    let mut gemini_calls = Vec::new();
    for _ in 0..3 {
        let id = app.submit(ALICE, edit_request("make it blue")).await;
        jobs.push(app.wait_until_terminal(ALICE, &id).await);
        gemini_calls.push(gemini.received().await.len());
    }

    for job in &jobs {
        assert_eq!(job["status"], "succeeded", "{job:#}");
        assert_eq!(job["provider"], "openai");
        assert_eq!(notices(job, "fallback_provider").len(), 1, "{job:#}");
    }
    assert_eq!(
        gemini_calls,
        [1, 2, 2],
        "two failures open the breaker; the third edit does not call Gemini"
    );
    assert_eq!(openai.received("images/edits").await.len(), 3);
    assert_eq!(jobs[0]["attempts"], 3, "router, Gemini, OpenAI");
    assert_eq!(jobs[2]["attempts"], 2, "router, OpenAI");
    let first = &notices(&jobs[0], "fallback_provider")[0].message;
    assert!(first.contains("unavailable"), "{first}");
    let third = &notices(&jobs[2], "fallback_provider")[0].message;
    assert!(
        third.contains("recovering") && third.to_lowercase().contains("gemini"),
        "the notice says Gemini is recovering: {third}"
    );
    assert_friendly(third);

    let breaker = CircuitBreaker::new(
        app.store.redis().connection(),
        app.store.keys().clone(),
        BreakerPolicy {
            failure_threshold: 2,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(120),
        },
    );
    assert!(
        breaker
            .is_open(worker::providers::gemini::NAME)
            .await
            .unwrap()
    );
    assert!(
        !breaker
            .is_open(worker::providers::openai::NAME)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_gemini_daily_quota_is_not_waited_out_but_sent_to_the_fallback() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    let gemini = app.gemini.as_ref().unwrap();
    openai
        .router_answers("edit", 0.9, "make it blue", None)
        .await;
    openai.images_edit_ok().await;
    let daily_quota = json!({
        "error": {
            "code": 429,
            "message": "You exceeded your current quota, please check your plan and billing \
                        details. Please retry in 3s.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [{
                        "quotaMetric":
                            "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                        "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                        "quotaDimensions": {"model": "gemini-3.1-flash-image", "location": "global"},
                        "quotaValue": "100",
                    }],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"},
            ],
        },
    });
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1beta/models/[^/]+:generateContent$"))
        .and(header_exists("x-goog-api-key"))
        .respond_with(ResponseTemplate::new(429).set_body_json(daily_quota))
        .named("gemini daily quota exhausted")
        .mount(&gemini.server)
        .await;

    let id = app.submit(ALICE, edit_request("make it blue")).await;
    let statuses = statuses_seen(&app, ALICE, &id).await;
    let job = app.job(ALICE, &id).await;

    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["provider"], "openai");
    assert_eq!(
        gemini.received().await.len(),
        1,
        "a daily quota is not retried"
    );
    assert_eq!(openai.received("images/edits").await.len(), 1);
    assert_eq!(notices(&job, "fallback_provider").len(), 1, "{job:#}");
    assert!(
        notices(&job, "rate_limited").is_empty(),
        "not deferred: {job:#}"
    );
    assert!(
        !seen_after(&statuses, "running", "queued"),
        "the job never went back to the queue: {statuses:?}"
    );
    assert_eq!(job["attempts"], 3, "router, Gemini, OpenAI");
}

// ---------------------------------------------------------------------------------------------
// The router: when it cannot decide, the user is asked
// ---------------------------------------------------------------------------------------------

fn assert_asks_create_or_edit(job: &Value) {
    assert_eq!(job["status"], "needs_clarification", "{job:#}");
    assert_eq!(job["clarification"]["options"], json!(["create", "edit"]));
    let question = job["clarification"]["question"].as_str().unwrap();
    assert!(question.ends_with('?'), "a question: {question}");
    assert_friendly(question);
    assert!(job.get("error").is_none(), "{job:#}");
    assert!(job.get("result").is_none(), "{job:#}");
}

#[tokio::test]
async fn a_router_refusal_asks_the_user_whether_to_create_or_edit() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_refuses().await;
    openai.images_generate_ok().await;

    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;

    assert_asks_create_or_edit(&job);
    assert_eq!(openai.received("chat/completions").await.len(), 1);
    assert!(openai.received("images/generations").await.is_empty());
    assert_eq!(job["attempts"], 1);
}

#[tokio::test]
async fn a_router_that_keeps_failing_asks_the_user_after_four_attempts() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai.server_error("chat/completions", None).await;
    openai.router_answers("create", 0.9, "a fox", None).await;
    openai.images_generate_ok().await;

    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;

    assert_asks_create_or_edit(&job);
    assert_eq!(openai.received("chat/completions").await.len(), 4);
    assert!(openai.received("images/generations").await.is_empty());
    assert_eq!(job["attempts"], 4);
    assert_eq!(notices(&job, "retrying").len(), 3, "{job:#}");
}

#[tokio::test]
async fn a_low_confidence_verdict_asks_the_user_instead_of_guessing() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.2, "a fox", None).await;
    openai.images_generate_ok().await;

    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;

    assert_asks_create_or_edit(&job);
    assert!(
        openai.received("images/generations").await.is_empty(),
        "no image is made on a guess"
    );
    assert_eq!(job["attempts"], 1);
}

// ---------------------------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_job_canceled_during_its_image_call_stays_canceled_and_stores_no_image() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a fox", None).await;
    slow_image_generation(&app, Duration::from_secs(2)).await;

    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    app.wait_for(ALICE, &id, |job| job["status"] == "running")
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while openai.received("images/generations").await.is_empty() {
        assert!(Instant::now() < deadline, "the image call never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let canceled = app.delete(ALICE, &format!("/v1/jobs/{id}")).await;
    assert_eq!(canceled.status(), StatusCode::OK);
    assert_eq!(
        canceled.json::<Value>().await.unwrap()["status"],
        "canceled"
    );

    // The slow answer arrives 2 s after the call started; watch for well past that.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let job = app.job(ALICE, &id).await;
        assert_eq!(job["status"], "canceled", "{job:#}");
        assert!(job.get("result").is_none(), "{job:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = app.job(ALICE, &id).await;
    assert_eq!(job["attempts"], 2, "router and the one image call");
    assert_eq!(openai.received("images/generations").await.len(), 1);
    let image = app.get(ALICE, &format!("/v1/jobs/{id}/images/0")).await;
    assert_eq!(image.status(), StatusCode::NOT_FOUND);
    let outputs = std::path::Path::new(&app.settings.images.store)
        .join("outputs")
        .join(&id);
    assert!(
        !outputs.exists(),
        "the late image was not stored: {}",
        outputs.display()
    );
}
