//! Provider failures as the user sees them: retried when transient, explained when not, and
//! never a technical message or a secret in the job.

use serde_json::json;
use tests::harness::{ALICE, spawn_app};

#[tokio::test]
async fn a_transient_image_failure_is_retried_and_the_job_succeeds() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a fox", None).await;
    openai.server_error("images/generations", Some(2)).await;
    openai.images_generate_ok().await;
    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(openai.received("images/generations").await.len(), 3);
    assert_eq!(
        job["attempts"], 4,
        "one router call and three image attempts"
    );
}

#[tokio::test]
async fn a_moderation_block_fails_the_job_with_a_friendly_message_and_no_retry() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("create", 0.9, "something forbidden", None)
        .await;
    openai
        .error(
            "images/generations",
            400,
            "image_generation_user_error",
            Some("moderation_blocked"),
            "Your request was rejected by the safety system. request id req_123",
            &[],
            None,
        )
        .await;
    let id = app
        .submit(ALICE, json!({"prompt": "something forbidden"}))
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "content_blocked");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("req_123") && !message.contains("400"),
        "no technical detail: {message}"
    );
    assert_eq!(
        openai.received("images/generations").await.len(),
        1,
        "not retried"
    );
    let rendered = job.to_string();
    assert!(!rendered.contains("sk-test-secret-openai-key"));
}

#[tokio::test]
async fn a_gemini_safety_block_is_reported_to_the_user() {
    let app = spawn_app().await;
    app.openai
        .as_ref()
        .unwrap()
        .router_answers("edit", 0.9, "edit it", None)
        .await;
    app.gemini.as_ref().unwrap().blocked().await;
    let image = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        tests::mocks::png(16, 16, 9),
    );
    let id = app
        .submit(
            ALICE,
            json!({"prompt": "edit it", "image": {"data": image, "mime_type": "image/png"}}),
        )
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "content_blocked");
}

#[tokio::test]
async fn a_gemini_answer_without_an_image_is_a_clear_failure() {
    let app = spawn_app().await;
    app.openai
        .as_ref()
        .unwrap()
        .router_answers("edit", 0.9, "edit it", None)
        .await;
    app.gemini.as_ref().unwrap().text_only().await;
    let image = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        tests::mocks::png(16, 16, 9),
    );
    let id = app
        .submit(
            ALICE,
            json!({"prompt": "edit it", "image": {"data": image, "mime_type": "image/png"}}),
        )
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "no_image_returned");
    assert!(!job["error"]["message"].as_str().unwrap().is_empty());
}
