//! The playground at `/` in a real browser (headless Chromium through chromedriver, see
//! `tests::browser`): a user signs in with their key, submits a prompt (and an image to edit),
//! and the page follows the job over its SSE stream to the image, showing the clarification
//! question, notices, errors and cancel along the way, as `docs/error-handling.md` describes.

use std::time::{Duration, Instant};

use base64::Engine;

use tests::browser::{Browser, WAIT, self_contained_page, with_browser};
use tests::harness::{ALICE, TestApp, spawn_api, spawn_app, spawn_simulated};
use tests::mocks::{MOCK_IMAGE_SIDE, png};

/// Runs `check` in a fresh browser on the playground, signed in as Alice.
async fn with_playground(app: &TestApp, check: impl AsyncFnOnce(&Browser)) {
    with_browser(async |browser| {
        browser.client.goto(&app.url("/")).await.unwrap();
        browser.sign_in(ALICE).await;
        browser.wait_for("#workspace:not([hidden])").await;
        check(browser).await;
    })
    .await;
}

/// Types the prompt, optionally attaches the file at `image`, and submits; returns the job id
/// the page follows.
async fn submit(browser: &Browser, prompt: &str, image: Option<&std::path::Path>) -> String {
    browser
        .wait_for("#prompt")
        .await
        .send_keys(prompt)
        .await
        .unwrap();
    if let Some(path) = image {
        // A file input takes the path of the file to upload as its keys.
        let input = browser.wait_for("input[type=file]#image").await;
        input.send_keys(&path.display().to_string()).await.unwrap();
        browser.wait_for("#preview-row:not([hidden])").await;
    }
    browser.wait_for("#submit").await.click().await.unwrap();
    browser.wait_for("#job[data-job-id]").await;
    browser.attr("#job", "data-job-id").await
}

/// Waits until the job section shows `status`.
async fn wait_for_status(browser: &Browser, status: &str) {
    browser
        .wait_for(&format!("#job[data-status='{status}']"))
        .await;
}

/// Waits until the page shows `count` result images that the browser really decoded, and
/// returns their natural widths.
async fn loaded_images(browser: &Browser, count: usize) -> Vec<u64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let widths = browser
            .client
            .execute(
                "return [...document.querySelectorAll('#images img.result')]
                    .map((img) => (img.complete ? img.naturalWidth : 0));",
                vec![],
            )
            .await
            .unwrap();
        let widths: Vec<u64> = widths
            .as_array()
            .unwrap()
            .iter()
            .map(|width| width.as_u64().unwrap())
            .collect();
        if widths.len() == count && widths.iter().all(|width| *width > 0) {
            return widths;
        }
        assert!(
            Instant::now() < deadline,
            "the result images never loaded: natural widths {widths:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The codes of the notices the page lists, oldest first.
async fn notice_codes(browser: &Browser) -> Vec<String> {
    let codes = browser
        .client
        .execute(
            "return [...document.querySelectorAll('#notices li[data-code]')].map((li) => li.dataset.code);",
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(codes).unwrap()
}

#[tokio::test]
async fn a_user_submits_a_prompt_and_watches_the_job_to_its_image() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("create", 0.95, "a lighthouse at dawn", None)
        .await;
    openai.images_generate_ok().await;

    with_playground(&app, async |browser| {
        let id = submit(browser, "a lighthouse at dawn, watercolor", None).await;
        wait_for_status(browser, "succeeded").await;
        let widths = loaded_images(browser, 1).await;
        assert_eq!(widths, [u64::from(MOCK_IMAGE_SIDE)]);

        let job = app.job(ALICE, &id).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
        assert_eq!(browser.text("#job-id").await, id);
        assert_eq!(browser.text("#status").await, "succeeded");
        assert_eq!(browser.text("#status-text").await, "Done.");
        assert_eq!(browser.text("#intent").await, "create");
        assert!(browser.text("#provider").await.starts_with("openai"));
        assert_eq!(browser.text("#attempts").await, job["attempts"].to_string());
        assert!(
            browser
                .wait_for("#simulated")
                .await
                .attr("hidden")
                .await
                .unwrap()
                .is_some(),
            "a real provider made this image"
        );
        // The live log is the SSE stream: it ended with the terminal status.
        let events = browser.text("#events").await;
        assert!(events.contains("status: succeeded"), "{events}");
        assert!(events.contains("stream ended"), "{events}");
        let generated = openai.received("images/generations").await;
        assert_eq!(generated.len(), 1);
        assert_eq!(generated[0]["prompt"], "a lighthouse at dawn");
        browser.save_screenshot("playground.png").await;

        // A reload keeps the key (session storage) and follows the same job again.
        browser.client.refresh().await.unwrap();
        browser
            .wait_for(&format!(
                "#job[data-job-id='{id}'][data-status='succeeded']"
            ))
            .await;
        loaded_images(browser, 1).await;
    })
    .await;
}

#[tokio::test]
async fn an_unclear_request_shows_the_question_and_an_answer_resumes_the_job() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("unclear", 0.9, "", Some("New picture or an edit?"))
        .await;
    openai.images_generate_ok().await;

    with_playground(&app, async |browser| {
        let id = submit(browser, "sunset thing", None).await;
        wait_for_status(browser, "needs_clarification").await;
        assert_eq!(browser.text("#question").await, "New picture or an edit?");
        let intents = browser
            .client
            .execute(
                "return [...document.querySelectorAll('#options button.option')].map((b) => b.dataset.intent);",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(intents, serde_json::json!(["create", "edit"]));
        browser.save_screenshot("playground-clarification.png").await;

        browser
            .wait_for("#options button[data-intent='create']")
            .await
            .click()
            .await
            .unwrap();
        wait_for_status(browser, "succeeded").await;
        loaded_images(browser, 1).await;
        assert_eq!(browser.attr("#job", "data-job-id").await, id, "the same job");
        assert!(
            browser
                .wait_for("#clarification")
                .await
                .attr("hidden")
                .await
                .unwrap()
                .is_some(),
            "the question is gone"
        );
        assert!(notice_codes(browser).await.contains(&"clarified".to_string()));
        assert_eq!(browser.text("#intent").await, "create");
        assert_eq!(
            openai.received("chat/completions").await.len(),
            1,
            "the router ran once"
        );
    })
    .await;
}

#[tokio::test]
async fn retries_of_the_image_model_are_shown_as_notices() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a fox", None).await;
    openai.server_error("images/generations", Some(2)).await;
    openai.images_generate_ok().await;

    with_playground(&app, async |browser| {
        submit(browser, "a fox", None).await;
        wait_for_status(browser, "succeeded").await;
        loaded_images(browser, 1).await;
        let codes = notice_codes(browser).await;
        assert_eq!(codes, ["retrying", "retrying"], "{codes:?}");
        let notices = browser.text("#notices").await;
        assert!(notices.contains("Attempt 1 of 4"), "{notices}");
        assert!(notices.contains("Attempt 2 of 4"), "{notices}");
        assert_eq!(
            browser.text("#attempts").await,
            "4",
            "router and three image calls"
        );
    })
    .await;
}

#[tokio::test]
async fn an_edit_with_an_attached_image_falls_back_to_openai_and_says_so() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    let gemini = app.gemini.as_ref().unwrap();
    openai
        .router_answers("edit", 0.9, "make the sky purple", None)
        .await;
    openai.images_edit_ok().await;
    gemini.unavailable(None).await;

    let source = png(48, 32, 5);
    let file = std::env::temp_dir().join(format!("pictor-upload-{}.png", uuid::Uuid::new_v4()));
    std::fs::write(&file, &source).unwrap();

    with_playground(&app, async |browser| {
        submit(browser, "make the sky purple", Some(&file)).await;
        wait_for_status(browser, "succeeded").await;
        loaded_images(browser, 1).await;
        assert_eq!(browser.text("#intent").await, "edit");
        assert!(browser.text("#provider").await.starts_with("openai"));
        assert!(
            notice_codes(browser)
                .await
                .contains(&"fallback_provider".to_string())
        );
        // The hint next to the status is the latest notice: the fallback.
        assert_eq!(
            browser.attr("#hint", "data-code").await,
            "fallback_provider"
        );
        let hint = browser.text("#hint").await;
        assert!(hint.to_lowercase().contains("openai"), "{hint}");
        browser
            .save_screenshot("playground-edit-fallback.png")
            .await;
    })
    .await;

    // The multipart upload carried the very bytes of the file to the edit model.
    let sent = gemini.received().await;
    assert!(!sent.is_empty(), "Gemini was tried first");
    let inline = &sent[0]["contents"][0]["parts"];
    let encoded = base64::engine::general_purpose::STANDARD.encode(&source);
    assert!(
        inline
            .as_array()
            .unwrap()
            .iter()
            .any(|part| part["inline_data"]["data"] == encoded.as_str()),
        "the uploaded image reached the provider: {inline:#}"
    );
    let _ = std::fs::remove_file(&file);
}

#[tokio::test]
async fn the_playground_says_when_the_simulated_provider_made_the_image() {
    let app = spawn_simulated().await;
    with_playground(&app, async |browser| {
        submit(browser, "a paper boat on a pond", None).await;
        wait_for_status(browser, "succeeded").await;
        loaded_images(browser, 1).await;
        browser.wait_for("#simulated:not([hidden])").await;
        assert!(browser.text("#provider").await.starts_with("simulated"));
    })
    .await;
}

#[tokio::test]
async fn the_playground_shows_api_errors_and_cancels_a_waiting_job() {
    // No worker: a job stays queued until it is canceled.
    let app = spawn_api().await;
    let not_an_image =
        std::env::temp_dir().join(format!("pictor-upload-{}.png", uuid::Uuid::new_v4()));
    std::fs::write(&not_an_image, b"this is text, not a picture").unwrap();

    with_browser(async |browser| {
        browser.client.goto(&app.url("/")).await.unwrap();

        // A wrong key is refused by the api at the first request, and the page asks again.
        browser.sign_in("not-a-key").await;
        browser
            .wait_for("#prompt")
            .await
            .send_keys("a fox")
            .await
            .unwrap();
        browser.wait_for("#submit").await.click().await.unwrap();
        let error = browser.wait_for_text("#error", "(401 unauthorized)").await;
        assert!(error.contains("not accepted"), "{error}");
        browser.wait_for("#sign-in-form:not([hidden])").await;

        // A file that is not an image: the api's own message and code, and no job.
        browser.sign_in(ALICE).await;
        browser.wait_for("#workspace:not([hidden])").await;
        let file_input = browser.wait_for("input[type=file]#image").await;
        file_input
            .send_keys(&not_an_image.display().to_string())
            .await
            .unwrap();
        browser.wait_for("#submit").await.click().await.unwrap();
        let error = browser
            .wait_for_text("#error", "(415 unsupported_image_type)")
            .await;
        assert!(error.contains("PNG, JPEG or WebP"), "{error}");
        assert!(
            browser
                .wait_for("#job")
                .await
                .attr("hidden")
                .await
                .unwrap()
                .is_some(),
            "no job is shown"
        );

        // Without the image the job is accepted and waits for a worker; cancel ends it.
        browser
            .wait_for("#clear-image")
            .await
            .click()
            .await
            .unwrap();
        browser.wait_for("#submit").await.click().await.unwrap();
        wait_for_status(browser, "queued").await;
        let id = browser.attr("#job", "data-job-id").await;
        assert!(
            browser
                .wait_for("#error")
                .await
                .attr("hidden")
                .await
                .unwrap()
                .is_some(),
            "the accepted job clears the error"
        );
        assert_eq!(browser.text("#status-text").await, "Waiting for a worker…");
        browser.save_screenshot("playground-queued.png").await;
        browser
            .wait_for("#cancel:not([hidden])")
            .await
            .click()
            .await
            .unwrap();
        wait_for_status(browser, "canceled").await;
        assert!(
            notice_codes(browser)
                .await
                .contains(&"canceled".to_string())
        );
        assert_eq!(app.job(ALICE, &id).await["status"], "canceled");
        browser.wait_for_text("#events", "stream ended").await;
    })
    .await;
    let _ = std::fs::remove_file(&not_an_image);
}

#[tokio::test]
async fn a_waiting_job_shows_its_place_in_line_and_moves_up_without_a_click() {
    // No worker: every job waits, so the places are exact.
    let app = spawn_api().await;
    let mut earlier = Vec::new();
    for index in 0..4 {
        earlier.push(
            app.submit(
                ALICE,
                serde_json::json!({"prompt": format!("earlier {index}")}),
            )
            .await,
        );
    }
    with_playground(&app, async |browser| {
        let id = submit(browser, "a lighthouse at dusk", None).await;
        assert!(!earlier.contains(&id));
        let text = browser
            .wait_for_text("#place:not([hidden])", "in line")
            .await;
        assert!(text.contains("Number 5 in line"), "{text}");
        assert_eq!(browser.attr("#place", "data-position").await, "5");

        // Two of the earlier jobs are canceled elsewhere: the page's stream hears that the
        // job moved up, and shows it.
        for id in &earlier[..2] {
            assert_eq!(
                app.delete(ALICE, &format!("/v1/jobs/{id}")).await.status(),
                reqwest::StatusCode::OK
            );
        }
        let text = browser
            .wait_for_text("#place:not([hidden])", "Number 3 in line")
            .await;
        assert!(!text.contains("Number 5"), "{text}");
        let events = browser.text("#events").await;
        assert!(events.contains("event: position"), "{events}");

        // Canceled from the page, it no longer waits: no place shown.
        browser.wait_for("#cancel").await.click().await.unwrap();
        wait_for_status(browser, "canceled").await;
        browser.wait_for("#place[hidden]").await;
    })
    .await;
}

#[tokio::test]
async fn the_playground_page_is_self_contained() {
    let app = spawn_api().await;
    let html = self_contained_page(&app, "/").await;
    for id in [
        "key",
        "sign-in",
        "prompt",
        "image",
        "submit",
        "job",
        "status",
        "notices",
        "question",
        "options",
        "job-error",
        "cancel",
        "images",
        "events",
        "simulated",
        "error",
    ] {
        assert!(
            html.contains(&format!("id=\"{id}\"")),
            "the page lacks #{id}"
        );
    }
    // The page only talks to the public api, with the key in a header, never in a URL.
    assert!(
        !html.contains("new EventSource"),
        "EventSource cannot send the key"
    );
    assert!(html.contains("\"Authorization\", \"Bearer \""));
}
