//! The playground at `/` in a real browser (headless Chromium through chromedriver, see
//! `tests::browser`): a user signs in with their key, submits a prompt (and an image to edit),
//! and the page follows the job over its SSE stream to the image, showing the clarification
//! question, notices, errors and cancel along the way, as `docs/error-handling.md` describes.
//!
//! The tests of the page as a person uses it (a key checked when it is entered, a clarification
//! answered with words or an image, plain sentences for errors, the job history, downloading and
//! editing a result, before/after, and the layout) run at a desktop width and at a phone's
//! (390 px), where the page must not be wider than the screen.

use std::time::{Duration, Instant};

use base64::Engine;

use tests::browser::{Browser, WAIT, self_contained_page, with_browser};
use tests::harness::{
    ALICE, BOB, Options, TestApp, spawn_api, spawn_app, spawn_app_with, spawn_simulated,
};
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

/// Types the prompt (replacing what the field held), optionally attaches the file at `image`,
/// and submits; returns the id of the new job the page follows.
async fn submit(browser: &Browser, prompt: &str, image: Option<&std::path::Path>) -> String {
    let before = shown_job(browser).await;
    let field = browser.wait_for("#prompt").await;
    field.clear().await.unwrap();
    if !prompt.is_empty() {
        field.send_keys(prompt).await.unwrap();
    }
    if let Some(path) = image {
        // A file input takes the path of the file to upload as its keys.
        let input = browser.wait_for("input[type=file]#image").await;
        input.send_keys(&path.display().to_string()).await.unwrap();
        browser.wait_for("#preview-row:not([hidden])").await;
    }
    browser.click("#submit").await;
    let selector = match before {
        Some(id) => format!("#job[data-job-id]:not([data-job-id='{id}'])"),
        None => "#job[data-job-id]".to_string(),
    };
    browser.wait_for(&selector).await;
    browser.attr("#job", "data-job-id").await
}

/// The id of the job the page shows, if any.
async fn shown_job(browser: &Browser) -> Option<String> {
    let id = browser
        .client
        .execute(
            "const job = document.getElementById('job'); return job.hidden ? null : (job.dataset.jobId || null);",
            vec![],
        )
        .await
        .unwrap();
    id.as_str().map(str::to_string)
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
        // People read "Done"; the status name is small beside it.
        assert_eq!(browser.text("#status").await, "Done");
        assert_eq!(browser.text("#status-code").await, "succeeded");
        assert_eq!(browser.text("#status-text").await, "Your image is ready.");
        assert_eq!(browser.text("#intent-label").await, "A new image");
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
        // The router offered an edit too, but the job has no image: only what can work is
        // offered, and the box says how to edit instead.
        assert_eq!(intents, serde_json::json!(["create"]));
        let hint = browser.text("#options-hint:not([hidden])").await;
        assert!(hint.contains("attach"), "{hint}");
        browser.save_screenshot("playground-clarification.png").await;

        browser.click("#options button[data-intent='create']").await;
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

        // A wrong key is refused when it is entered: the page checks it with the api and asks
        // again, without ever saying "Signed in".
        browser.sign_in("not-a-key").await;
        let error = browser
            .wait_for_text("#error:not([hidden]) .message", "not accepted")
            .await;
        assert!(error.ends_with('.'), "a sentence: {error}");
        assert_eq!(browser.text("#error .code").await, "401 unauthorized");
        browser.wait_for("#sign-in-form:not([hidden])").await;
        browser.wait_for("#account[hidden]").await;

        // A file that is not an image: a plain sentence, the code small beside it, and no job.
        browser.sign_in(ALICE).await;
        browser.wait_for("#workspace:not([hidden])").await;
        browser
            .wait_for("#prompt")
            .await
            .send_keys("a fox")
            .await
            .unwrap();
        let file_input = browser.wait_for("input[type=file]#image").await;
        file_input
            .send_keys(&not_an_image.display().to_string())
            .await
            .unwrap();
        browser.click("#submit").await;
        let error = browser
            .wait_for_text("#error:not([hidden]) .message", "PNG, JPEG or WebP")
            .await;
        assert!(!error.contains('_'), "no code in the sentence: {error}");
        assert_eq!(
            browser.text("#error .code").await,
            "415 unsupported_image_type"
        );
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
        browser.click("#clear-image").await;
        browser.click("#submit").await;
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
        browser.click("#cancel:not([hidden])").await;
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
        browser.click("#cancel").await;
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
        "clarify-prompt",
        "clarify-image",
        "history-list",
        "elapsed",
        "job-prompt",
        "image-mode",
        "dashboard-link",
        "docs-link",
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

/// The widths every test of the page as a person uses it runs at: a desktop, and a phone.
const WIDTHS: [u32; 2] = [1280, 390];

/// Like [`with_playground`], in a window `width` CSS pixels wide.
async fn with_playground_at(app: &TestApp, width: u32, check: impl AsyncFnOnce(&Browser)) {
    with_browser(async |browser| {
        browser.set_width(width).await;
        browser.client.goto(&app.url("/")).await.unwrap();
        browser.sign_in(ALICE).await;
        browser.wait_for("#workspace:not([hidden])").await;
        check(browser).await;
    })
    .await;
}

/// Asserts that nothing makes the page wider than the window (`width` px): no horizontal
/// scrolling, nothing cut off at the right. Names the widest offenders if something does.
async fn assert_fits(browser: &Browser, width: u32, when: &str) {
    let found = browser
        .client
        .execute(
            "const limit = arguments[0];
             // Past the window, or past the right edge of the panel it is in.
             const edge = (node) => Math.min(limit, (node.parentElement.closest('#clarification, #job-error, .error, fieldset, figure, section') || document.body).getBoundingClientRect().right);
             const wide = [...document.querySelectorAll('body *')]
                 .filter((node) => node.getClientRects().length && node.getBoundingClientRect().right > edge(node) + 0.5)
                 .slice(0, 6)
                 .map((node) => `${node.tagName.toLowerCase()}#${node.id}.${node.className} right=${Math.round(node.getBoundingClientRect().right)}`);
             return [document.documentElement.scrollWidth, wide];",
            vec![serde_json::json!(width)],
        )
        .await
        .unwrap();
    let scroll_width = found[0].as_u64().unwrap();
    assert!(
        scroll_width <= u64::from(width),
        "at {width} px the page is {scroll_width} px wide {when}: {}",
        found[1]
    );
    assert_eq!(
        found[1],
        serde_json::json!([]),
        "at {width} px something is cut off at the right {when}"
    );
}

/// Runs `script` in the page and answers its value.
async fn js(browser: &Browser, script: &str) -> serde_json::Value {
    browser.client.execute(script, vec![]).await.unwrap()
}

async fn is_hidden(browser: &Browser, css: &str) -> bool {
    browser
        .wait_for(css)
        .await
        .attr("hidden")
        .await
        .unwrap()
        .is_some()
}

async fn is_disabled(browser: &Browser, css: &str) -> bool {
    js(
        browser,
        &format!("return document.querySelector(\"{css}\").disabled"),
    )
    .await
        == true
}

/// The intents of the answer buttons the clarification offers.
async fn offered(browser: &Browser) -> serde_json::Value {
    js(
        browser,
        "return [...document.querySelectorAll('#options button.option')].map((b) => b.dataset.intent);",
    )
    .await
}

/// The natural width of the decoded image `css` finds, once it has loaded.
async fn natural_width(browser: &Browser, css: &str) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let width = js(
            browser,
            &format!(
                "const img = document.querySelector(\"{css}\"); return img && img.complete ? img.naturalWidth : 0;"
            ),
        )
        .await
        .as_u64()
        .unwrap_or_default();
        if width > 0 {
            return width;
        }
        assert!(Instant::now() < deadline, "{css} never loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small PNG (48×32) in a temporary file, deleted when dropped.
struct UploadFile(std::path::PathBuf);

impl UploadFile {
    fn new(bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("pictor-upload-{}.png", uuid::Uuid::new_v4()));
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }
}

impl Drop for UploadFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn a_key_is_checked_when_it_is_entered_and_the_header_links_to_the_dashboard_and_docs() {
    let app = spawn_api().await;
    for width in WIDTHS {
        with_browser(async |browser| {
            browser.set_width(width).await;
            browser.client.goto(&app.url("/")).await.unwrap();
            let links = js(
                browser,
                "return ['dashboard-link', 'docs-link'].map((id) => document.getElementById(id).getAttribute('href'));",
            )
            .await;
            assert_eq!(links, serde_json::json!(["/dashboard", "/docs/"]));

            // A wrong key: a plain error where the key was entered, and no "Signed in".
            browser.sign_in("wrong-key").await;
            let error = browser
                .wait_for_text("#error:not([hidden]) .message", "API key was not accepted")
                .await;
            assert!(!error.contains("401"), "the code is beside the sentence: {error}");
            assert_eq!(browser.text("#error .code").await, "401 unauthorized");
            assert!(is_hidden(browser, "#account").await, "not signed in");
            assert!(is_hidden(browser, "#workspace").await);
            browser.wait_for("#sign-in-form:not([hidden])").await;
            assert_fits(browser, width, "after a wrong key").await;
            browser.save_screenshot_at("playground-wrong-key", width).await;

            // A working key signs in, and the error goes.
            browser.sign_in(ALICE).await;
            browser.wait_for("#workspace:not([hidden])").await;
            let account = browser.text("#account").await;
            assert!(account.contains("Signed in"), "{account}");
            assert!(is_hidden(browser, "#error").await);
            assert_fits(browser, width, "signed in").await;

            // The links lead to the pages, and back on the playground the key is still there.
            for (link, path) in [("#dashboard-link", "/dashboard"), ("#docs-link", "/docs/")] {
                browser.click(link).await;
                let deadline = Instant::now() + WAIT;
                while browser.client.current_url().await.unwrap().path() != path {
                    assert!(Instant::now() < deadline, "{link} did not lead to {path}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                browser.client.goto(&app.url("/")).await.unwrap();
                browser.wait_for("#workspace:not([hidden])").await;
            }
        })
        .await;
    }
}

#[tokio::test]
async fn a_question_is_answered_with_words_or_an_image_and_only_answers_that_can_work_are_offered()
{
    let app = spawn_simulated().await;
    let upload = UploadFile::new(&png(48, 32, 5));
    for width in WIDTHS {
        with_playground_at(&app, width, async |browser| {
            // Nothing to go on: Pictor asks. Without an image, editing cannot work, so it is
            // not offered; the box takes a description and an image instead.
            let first = submit(browser, "hmm?", None).await;
            wait_for_status(browser, "needs_clarification").await;
            let question = browser.text("#question").await;
            assert!(question.contains("Describe the subject"), "{question}");
            assert_eq!(offered(browser).await, serde_json::json!(["create"]));
            let hint = browser.text("#options-hint:not([hidden])").await;
            assert!(hint.contains("attach"), "{hint}");
            assert_eq!(browser.text("#status").await, "Needs your answer");
            assert_eq!(browser.text("#status-code").await, "needs_clarification");
            let sentence = browser.text("#status-text").await;
            assert!(!sentence.contains('_'), "{sentence}");
            assert_fits(browser, width, "with a question").await;
            browser
                .save_screenshot_at("playground-question", width)
                .await;

            // Described in the box: the same job makes that.
            browser
                .wait_for("#clarify-prompt")
                .await
                .send_keys("a red kite over the sea")
                .await
                .unwrap();
            browser.click("#options button[data-intent='create']").await;
            wait_for_status(browser, "succeeded").await;
            loaded_images(browser, 1).await;
            assert_eq!(browser.attr("#job", "data-job-id").await, first);
            assert_eq!(
                browser.text("#job-prompt-text").await,
                "a red kite over the sea"
            );
            assert_eq!(
                app.job(ALICE, &first).await["prompt"],
                "a red kite over the sea"
            );

            // Asked again, answered with an image: now "Edit my image" is offered, and works.
            let second = submit(browser, "hmm?", None).await;
            assert_ne!(second, first);
            wait_for_status(browser, "needs_clarification").await;
            assert_eq!(
                js(
                    browser,
                    "return document.getElementById('clarify-prompt').value"
                )
                .await,
                "",
                "a fresh answer"
            );
            assert_eq!(offered(browser).await, serde_json::json!(["create"]));
            browser.attach("#clarify-image", &upload.0).await;
            browser.wait_for("#clarify-preview-row:not([hidden])").await;
            browser
                .wait_for("#options button[data-intent='edit']")
                .await;
            assert_eq!(
                offered(browser).await,
                serde_json::json!(["create", "edit"])
            );
            assert!(is_hidden(browser, "#options-hint").await);
            browser.click("#options button[data-intent='edit']").await;
            wait_for_status(browser, "succeeded").await;
            assert_eq!(browser.text("#intent").await, "edit");
            // Before/after: the attached image beside the edit.
            assert_eq!(natural_width(browser, "#images img.before").await, 48);
            loaded_images(browser, 1).await;
            assert!(is_hidden(browser, "#clarification").await);
            assert_fits(browser, width, "after the edit").await;

            // Sent with an image from the start: editing it is offered at once, and nothing
            // more needs attaching.
            let third = submit(browser, "hmm?", Some(&upload.0)).await;
            assert_ne!(third, second);
            wait_for_status(browser, "needs_clarification").await;
            assert_eq!(
                offered(browser).await,
                serde_json::json!(["create", "edit"])
            );
            assert!(is_hidden(browser, "#clarify-attach").await);
            assert!(is_hidden(browser, "#options-hint").await);
            browser.click("#options button[data-intent='edit']").await;
            wait_for_status(browser, "succeeded").await;
            assert_eq!(browser.text("#intent").await, "edit");
            assert_eq!(natural_width(browser, "#images img.before").await, 48);
        })
        .await;
    }
}

#[tokio::test]
async fn failures_read_as_sentences_and_a_failed_submit_clears_the_earlier_job() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a fox", None).await;
    openai.insufficient_quota("images/generations", None).await;
    let not_an_image = UploadFile::new(b"this is text, not a picture");

    for width in WIDTHS {
        with_playground_at(&app, width, async |browser| {
            let id = submit(browser, "a fox", None).await;
            wait_for_status(browser, "failed").await;
            let job = app.job(ALICE, &id).await;
            assert_eq!(browser.text("#status").await, "Failed");
            assert_eq!(browser.text("#status-code").await, "failed");
            assert_eq!(
                browser.text("#status-text").await,
                "Pictor could not finish this job."
            );
            assert_eq!(
                browser.text("#job-error-message").await,
                job["error"]["message"]
            );
            assert_eq!(browser.text("#job-error-code").await, job["error"]["code"]);
            let page = browser.text("main").await;
            assert!(!page.contains("did not work out"), "{page}");
            let elapsed = browser.text("#elapsed").await;
            assert!(elapsed.starts_with("Took "), "{elapsed}");
            assert_fits(browser, width, "with a failed job").await;
            browser.save_screenshot_at("playground-failed", width).await;

            // A submit the api refuses: the sentence and its code, and the failed job is no
            // longer on screen as if it were the answer.
            browser
                .attach("input[type=file]#image", &not_an_image.0)
                .await;
            browser.click("#submit").await;
            let error = browser
                .wait_for_text("#error:not([hidden]) .message", "PNG, JPEG or WebP")
                .await;
            assert!(!error.contains("unsupported_image_type"), "{error}");
            assert_eq!(
                browser.text("#error .code").await,
                "415 unsupported_image_type"
            );
            browser.wait_for("#job[hidden]").await;
            assert_eq!(shown_job(browser).await, None);
            assert_fits(browser, width, "with an error").await;
        })
        .await;
    }
}

#[tokio::test]
async fn the_history_lists_your_jobs_with_their_prompts_and_opens_one() {
    let app = spawn_simulated().await;
    // Ten older jobs, so that the list has a second page.
    for index in 0..10 {
        app.submit(
            ALICE,
            serde_json::json!({"prompt": format!("older job {index}")}),
        )
        .await;
    }
    let earlier = app
        .submit(
            ALICE,
            serde_json::json!({"prompt": "an earlier lighthouse on a cliff"}),
        )
        .await;
    app.wait_until_terminal(ALICE, &earlier).await;
    app.submit(BOB, serde_json::json!({"prompt": "what bob asked for"}))
        .await;

    for width in WIDTHS {
        with_playground_at(&app, width, async |browser| {
            // Listed at sign-in, with its prompt and a thumbnail of its image; not Bob's.
            let item = format!("#history-list li[data-job-id='{earlier}']");
            natural_width(browser, &format!("{item} .thumb img")).await;
            let text = browser.text(&item).await;
            assert!(text.contains("an earlier lighthouse on a cliff"), "{text}");
            assert!(text.contains("Done"), "{text}");
            let list = browser.text("#history-list").await;
            assert!(!list.contains("what bob asked for"), "{list}");
            // Ten at a time, newest first; the older ones on request.
            let count = "return document.querySelectorAll('#history-list li').length";
            assert_eq!(js(browser, count).await, 10);
            assert_eq!(
                browser.attr("#history-list li:first-child", "data-job-id").await,
                newest_job(&app).await
            );
            browser.click("#history-more:not([hidden])").await;
            browser.wait_for("#history-more[hidden]").await;
            let total = app.get(ALICE, "/v1/jobs?limit=100").await.json::<serde_json::Value>().await.unwrap()["jobs"]
                .as_array()
                .unwrap()
                .len();
            assert_eq!(js(browser, count).await, total);
            assert!(total > 10);

            // A new job goes to the top of the list, and is marked as the one shown.
            let id = submit(browser, "a paper boat on a pond", None).await;
            wait_for_status(browser, "succeeded").await;
            browser
                .wait_for(&format!(
                    "#history-list li:first-child[data-job-id='{id}'][data-status='succeeded'][aria-current]"
                ))
                .await;
            assert_fits(browser, width, "with the history").await;
            browser.save_screenshot_at("playground-history", width).await;

            // Opening the earlier one shows it, with its prompt beside its image.
            browser.click(&format!("{item} button")).await;
            browser
                .wait_for(&format!("#job[data-job-id='{earlier}'][data-status='succeeded']"))
                .await;
            loaded_images(browser, 1).await;
            assert_eq!(
                browser.text("#job-prompt-text").await,
                "an earlier lighthouse on a cliff"
            );
            browser.wait_for(&format!("{item}[aria-current]")).await;
            assert_fits(browser, width, "with an earlier job open").await;
        })
        .await;
    }
}

#[tokio::test]
async fn a_result_is_downloaded_edited_without_saving_it_and_shown_beside_its_source() {
    // Upscales here are at most 256 px, to keep the simulated resampling quick.
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            ..Options::default()
        },
        |settings| settings.openai.upscale_max_size = (256, 256),
    )
    .await;
    let upload = UploadFile::new(&png(48, 32, 5));

    for width in WIDTHS {
        with_playground_at(&app, width, async |browser| {
            // A new image: size and count apply.
            assert!(is_hidden(browser, "#image-mode").await);
            assert!(!is_disabled(browser, "#size").await);
            assert!(!is_disabled(browser, "#n").await);
            let prompt = "a lighthouse at dawn, watercolor";
            let id = submit(browser, prompt, None).await;
            wait_for_status(browser, "succeeded").await;
            let widths = loaded_images(browser, 1).await;
            browser.save_screenshot_at("playground-create", width).await;

            // The prompt beside its result, and how long it took.
            assert_eq!(browser.text("#job-prompt-text").await, prompt);
            let elapsed = browser.text("#elapsed").await;
            assert!(elapsed.starts_with("Took "), "{elapsed}");
            let job = app.job(ALICE, &id).await;
            let took = chrono::DateTime::parse_from_rfc3339(job["updated_at"].as_str().unwrap())
                .unwrap()
                - chrono::DateTime::parse_from_rfc3339(job["created_at"].as_str().unwrap())
                    .unwrap();
            let shown: f64 = browser
                .attr("#elapsed", "data-seconds")
                .await
                .parse()
                .unwrap();
            assert!(
                (shown - took.as_seconds_f64()).abs() < 1.0,
                "shown {shown} s, the job took {took}"
            );

            // Download: the very bytes of the image.
            browser.click("#images a.download").await;
            let saved = browser.downloads.join(format!("pictor-{id}-1.png"));
            let deadline = Instant::now() + WAIT;
            while !saved.exists() {
                assert!(
                    Instant::now() < deadline,
                    "{} was never saved",
                    saved.display()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let served = app
                .get(ALICE, &format!("/v1/jobs/{id}/images/0"))
                .await
                .bytes()
                .await
                .unwrap();
            let deadline = Instant::now() + WAIT;
            while std::fs::read(&saved).unwrap_or_default() != served {
                assert!(
                    Instant::now() < deadline,
                    "the download differs from the image"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }

            // "Edit this image": the result is the next job's input, nothing saved or uploaded
            // by hand; size and count still apply to an edit.
            browser.click("#images button.edit-result").await;
            browser.wait_for("#preview-row:not([hidden])").await;
            browser
                .wait_for("#image-mode:not([hidden]) #mode-edit:checked")
                .await;
            assert_eq!(browser.text("#submit").await, "Edit image");
            assert!(!is_disabled(browser, "#size").await);
            assert!(!is_disabled(browser, "#n").await);
            assert_fits(browser, width, "with a result attached").await;
            let edit = submit(browser, "make the sky purple", None).await;
            assert_ne!(edit, id);
            wait_for_status(browser, "succeeded").await;
            assert_eq!(browser.text("#intent").await, "edit");
            // Before/after: the earlier result beside the edit.
            assert_eq!(
                natural_width(browser, "#images img.before").await,
                widths[0]
            );
            loaded_images(browser, 1).await;
            let captions = browser.text("#images").await;
            assert!(
                captions.contains("Before") && captions.contains("After"),
                "{captions}"
            );
            assert_fits(browser, width, "with before and after").await;
            browser
                .save_screenshot_at("playground-before-after", width)
                .await;

            // An upscale of a file of one's own: size and count do not apply, so they are off.
            browser.attach("input[type=file]#image", &upload.0).await;
            browser.click("#mode-upscale").await;
            assert!(is_disabled(browser, "#size").await);
            assert!(is_disabled(browser, "#n").await);
            let hint = browser.text("#controls-hint:not([hidden])").await;
            assert!(hint.contains("do not apply"), "{hint}");
            assert_fits(browser, width, "for an upscale").await;
            let upscale = submit(browser, "", None).await;
            wait_for_status(browser, "succeeded").await;
            assert_eq!(app.job(ALICE, &upscale).await["intent"], "upscale");
            assert_eq!(natural_width(browser, "#images img.before").await, 48);
            let widths = loaded_images(browser, 1).await;
            assert!(widths[0] > 48, "upscaled: {widths:?}");
            // A reload follows the same job, and still shows the image it was sent with.
            browser.client.refresh().await.unwrap();
            browser
                .wait_for(&format!(
                    "#job[data-job-id='{upscale}'][data-status='succeeded']"
                ))
                .await;
            assert_eq!(natural_width(browser, "#images img.before").await, 48);
            loaded_images(browser, 1).await;
            // The form starts afresh after the reload: a new image.
            assert!(is_hidden(browser, "#image-mode").await);
            browser.attach("input[type=file]#image", &upload.0).await;
            browser.click("#mode-upscale").await;
            assert!(is_disabled(browser, "#size").await);
            // Switching back to editing turns them on again.
            browser.click("#mode-edit").await;
            assert!(!is_disabled(browser, "#size").await);
            browser.click("#clear-image").await;
            assert!(is_hidden(browser, "#image-mode").await);
            assert_eq!(browser.text("#submit").await, "Create");
        })
        .await;
    }
}

/// The id of Alice's newest job, as the api lists them.
async fn newest_job(app: &TestApp) -> String {
    let page: serde_json::Value = app
        .get(ALICE, "/v1/jobs?limit=1")
        .await
        .json()
        .await
        .unwrap();
    page["jobs"][0]["id"].as_str().unwrap().to_string()
}
