//! What the api refuses, and how: every bad input gets its own status and code, and nobody sees
//! another user's jobs.

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::harness::{ALICE, BOB, OPS, Options, TestApp, spawn_app_with};
use tests::mocks::{jpeg, png};

async fn app_without_worker() -> TestApp {
    spawn_app_with(
        Options {
            worker: false,
            ..Options::default()
        },
        |s| {
            s.api.max_body_bytes = std::num::NonZeroUsize::new(1024 * 1024).unwrap();
        },
    )
    .await
}

async fn error_of(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("errors are JSON");
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn each_bad_input_gets_its_own_status_and_code() {
    let app = app_without_worker().await;
    let cases: Vec<(&str, reqwest::Response, StatusCode, &str)> = vec![
        ("malformed json", app.post_raw(ALICE, "application/json", b"{\"prompt\": ".to_vec()).await, StatusCode::BAD_REQUEST, "malformed_json"),
        ("missing prompt", app.post_job(ALICE, json!({"size": "1024x1024"})).await, StatusCode::UNPROCESSABLE_ENTITY, "prompt_required"),
        ("empty prompt", app.post_job(ALICE, json!({"prompt": "   "})).await, StatusCode::UNPROCESSABLE_ENTITY, "prompt_required"),
        ("prompt too long", app.post_job(ALICE, json!({"prompt": "x".repeat(32_001)})).await, StatusCode::UNPROCESSABLE_ENTITY, "prompt_too_long"),
        ("unknown size", app.post_job(ALICE, json!({"prompt": "a cat", "size": "800x600"})).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_size"),
        ("n zero", app.post_job(ALICE, json!({"prompt": "a cat", "n": 0})).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_n"),
        ("wrong field type", app.post_job(ALICE, json!({"prompt": 42})).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"),
        ("bad base64", app.post_job(ALICE, json!({"prompt": "edit", "image": {"data": "@@not base64@@", "mime_type": "image/png"}})).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_base64"),
        ("gif claimed as png", app.post_job(ALICE, json!({"prompt": "edit", "image": {"data": b64(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"), "mime_type": "image/png"}})).await, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image_type"),
        ("body over the limit", app.post_job(ALICE, json!({"prompt": "x", "image": {"data": b64(&vec![0u8; 1024 * 1024]), "mime_type": "image/png"}})).await, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ("plain text body", app.post_raw(ALICE, "text/plain", b"draw a cat".to_vec()).await, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
    ];
    for (name, response, status, code) in cases {
        let (got_status, got_code, message) = error_of(response).await;
        assert_eq!(
            (got_status, got_code.as_str()),
            (status, code),
            "{name}: {message}"
        );
        assert!(!message.is_empty(), "{name} explains itself");
    }
    // None of them left a job behind.
    let listed: Value = app.get(ALICE, "/v1/jobs").await.json().await.unwrap();
    assert_eq!(listed["jobs"], json!([]));
}

#[tokio::test]
async fn multipart_uploads_are_checked_by_their_bytes_and_size() {
    let app = app_without_worker().await;
    let form = |bytes: Vec<u8>| {
        reqwest::multipart::Form::new()
            .text("prompt", "make it blue")
            .part(
                "image",
                reqwest::multipart::Part::bytes(bytes)
                    .file_name("x.png")
                    .mime_str("image/png")
                    .unwrap(),
            )
    };
    let (status, code, _) = error_of(
        app.post_multipart(ALICE, form(b"%PDF-1.7 not an image".to_vec()))
            .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image_type")
    );

    let mut huge = png(8, 8, 1);
    huge.resize(2 * 1024 * 1024, 0);
    let (status, code, _) = error_of(app.post_multipart(ALICE, form(huge)).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );

    let ok = app.post_multipart(ALICE, form(jpeg(16, 16, 3))).await;
    assert_eq!(
        ok.status(),
        StatusCode::ACCEPTED,
        "a JPEG sent as image/png is still a JPEG"
    );
}

#[tokio::test]
async fn requests_without_a_valid_key_get_401() {
    let app = app_without_worker().await;
    let missing = app
        .client
        .post(app.url("/v1/jobs"))
        .json(&json!({"prompt": "a cat"}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let (status, code, _) = error_of(missing).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let (status, _, _) =
        error_of(app.post_job("wrong-key", json!({"prompt": "a cat"})).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = error_of(app.get("wrong-key", "/v1/jobs").await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn another_users_job_answers_404_exactly_like_an_unknown_one() {
    let app = app_without_worker().await;
    let id = app
        .submit(ALICE, json!({"prompt": "alice's secret garden"}))
        .await;
    let unknown = shared::domain::JobId::new().to_string();
    for key in [BOB, OPS] {
        for path in [
            format!("/v1/jobs/{id}"),
            format!("/v1/jobs/{id}/images/0"),
            format!("/v1/jobs/{id}/events"),
        ] {
            let theirs = error_of(app.get(key, &path).await).await;
            let nobodys = error_of(app.get(key, &path.replace(&id, &unknown)).await).await;
            assert_eq!(theirs.0, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(
                theirs, nobodys,
                "{path}: indistinguishable from an unknown id"
            );
        }
        let (status, _, _) = error_of(app.delete(key, &format!("/v1/jobs/{id}")).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    assert_eq!(
        app.job(ALICE, &id).await["status"],
        "queued",
        "Bob's cancel did not touch it"
    );
    let (status, code, _) = error_of(app.get(ALICE, "/v1/jobs/not-a-uuid").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_errors() {
    let app = app_without_worker().await;
    let (status, code, _) = error_of(app.get(ALICE, "/v2/nothing").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let put = app
        .client
        .put(app.url("/v1/jobs"))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(put).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
}
