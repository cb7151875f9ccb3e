//! The `upscale` agent end to end (the worked example of `docs/adding-an-agent.md`): the router
//! hands "upscale this" with an image to it, it sends the image to OpenAI's image edits at the
//! largest size for the image's shape, the call is billed through the cost ledger, retried like
//! every provider call, and a request without an image becomes a question.

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::domain::JobId;
use shared::pricing::PriceTable;
use tests::harness::{ALICE, Options, TestApp, spawn_app, spawn_app_with};
use tests::mocks::{self, png};

fn image_json(bytes: &[u8]) -> Value {
    json!({
        "data": base64::engine::general_purpose::STANDARD.encode(bytes),
        "mime_type": "image/png",
    })
}

/// Makes the mock router classify every request as an upscale.
async fn route_to_upscale(app: &TestApp) {
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("upscale", 0.95, "Upscale this image", None)
        .await;
}

/// Submits "upscale this" with `image` attached and waits for the job to end.
async fn upscale(app: &TestApp, image: &[u8]) -> (String, Value) {
    let id = app
        .submit(
            ALICE,
            json!({"prompt": "upscale this", "image": image_json(image)}),
        )
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    (id, job)
}

async fn clarify(app: &TestApp, id: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/v1/jobs/{id}/clarify")))
        .bearer_auth(ALICE)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn upscale_this_with_an_image_is_routed_to_the_upscale_agent_and_returns_a_larger_image() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    route_to_upscale(&app).await;
    openai.images_edit_ok().await;
    // Smaller than the mock's 64x64 answers, so "larger" is visible in the result.
    let upload = png(32, 24, 3);

    let id = app
        .submit(
            ALICE,
            json!({"prompt": "upscale this", "image": image_json(&upload)}),
        )
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;

    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["intent"], "upscale");
    assert_eq!(job["provider"], "openai");
    assert_eq!(job["model"], app.settings.openai.image_model);
    let images = job["result"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    assert!(
        images[0]["width"].as_u64().unwrap() > 32 && images[0]["height"].as_u64().unwrap() > 24,
        "{images:?}"
    );
    let served = app.get(ALICE, images[0]["url"].as_str().unwrap()).await;
    assert_eq!(served.status(), StatusCode::OK);

    // The router was offered the upscale intent, from the agent's route.
    let router = openai.received("chat/completions").await;
    assert_eq!(
        router[0]["response_format"]["json_schema"]["schema"]["properties"]["intent"]["enum"],
        json!(["create", "edit", "upscale", "unclear"])
    );
    let instructions = router[0]["messages"][0]["content"].as_str().unwrap();
    assert!(instructions.contains("\"upscale\": "), "{instructions}");

    // One edit call: the user's image byte for byte, at the largest 4:3 size within the
    // configured 3840x2160 (2880x2160), one image whatever n says, and the upscale instruction.
    assert_eq!(app.settings.openai.upscale_max_size, (3840, 2160));
    let edits = openai.received("images/edits").await;
    assert_eq!(edits.len(), 1);
    assert_eq!(edits[0]["model"], app.settings.openai.image_model);
    assert_eq!(edits[0]["size"], "2880x2160");
    assert_eq!(edits[0]["n"], 1);
    assert_eq!(
        edits[0]["images"][0]["image_url"],
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&upload)
        )
    );
    let prompt = edits[0]["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with("Upscale this image to a higher resolution."),
        "{prompt}"
    );
    assert!(
        prompt.ends_with("The user asked: Upscale this image"),
        "{prompt}"
    );
}

#[tokio::test]
async fn an_upscale_is_billed_at_the_configured_models_price() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    route_to_upscale(&app).await;
    openai.images_edit_ok().await;

    let (id, job) = upscale(&app, &png(32, 32, 1)).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");

    let stored = app
        .store
        .get(JobId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    let agents: Vec<&str> = stored.usage.iter().map(|u| u.agent.as_str()).collect();
    assert_eq!(agents, ["router", "upscale"]);
    let upscale = &stored.usage[1];
    assert_eq!(upscale.provider, "openai");
    assert_eq!(upscale.model, app.settings.openai.image_model);
    assert_eq!(upscale.size.as_deref(), Some("2160x2160"));
    let output_tokens = mocks::openai_output_tokens_per_image("medium", "2160x2160");
    assert_eq!(upscale.output_image_tokens, output_tokens);
    assert_eq!(
        upscale.input_image_tokens,
        mocks::OPENAI_EDIT_IMAGE_INPUT_TOKENS_PER_IMAGE
    );

    // Priced from the shipped table, like every call: gpt-image-2 at $5 text in, $8 image in,
    // $30 image out per 1M tokens: 10 x 5 + 388 x 8 + 4699 x 30 = 144,124 micro-dollars, plus
    // the router's 87.
    let prices = PriceTable::shipped().unwrap();
    let upscale_cost = prices.cost_micros(upscale).unwrap();
    assert_eq!(output_tokens, 4699);
    assert_eq!(upscale_cost, 144_124);
    let router_cost = prices.cost_micros(&stored.usage[0]).unwrap();
    assert_eq!(stored.cost_micros, router_cost + upscale_cost);
    assert!(
        (job["cost_usd"].as_f64().unwrap() - (router_cost + upscale_cost) as f64 / 1e6).abs()
            < 1e-9,
        "{}",
        job["cost_usd"]
    );
}

#[tokio::test]
async fn a_transient_upscale_failure_is_retried_like_any_provider_call() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    route_to_upscale(&app).await;
    openai.server_error("images/edits", Some(2)).await;
    openai.images_edit_ok().await;

    let (id, job) = upscale(&app, &png(32, 32, 2)).await;

    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(openai.received("images/edits").await.len(), 3);
    assert_eq!(
        job["attempts"], 4,
        "one router call and three upscale attempts"
    );
    let retrying = job["notices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|notice| notice["code"] == "retrying")
        .count();
    assert_eq!(retrying, 2, "{job:#}");
    // Only the call that succeeded is billed.
    let stored = app
        .store
        .get(JobId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.usage.len(), 2);
}

#[tokio::test]
async fn an_upscale_without_an_image_asks_for_it_and_the_answer_resumes_the_upscale() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("upscale", 0.95, "Upscale my photo", None)
        .await;
    openai.images_edit_ok().await;

    let id = app
        .submit(ALICE, json!({"prompt": "please upscale my photo"}))
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;

    assert_eq!(job["status"], "needs_clarification", "{job:#}");
    assert_eq!(job["intent"], "upscale");
    let question = job["clarification"]["question"].as_str().unwrap();
    assert!(
        question.starts_with("Your request sounds like an upscale, but no image was attached."),
        "{question}"
    );
    assert_eq!(
        job["clarification"]["options"],
        json!(["create", "edit", "upscale"])
    );
    assert!(
        openai.received("images/edits").await.is_empty(),
        "nothing was sent to the image model"
    );

    // Answering "upscale" still needs the image; with it, the same job runs the upscale.
    let no_image = clarify(&app, &id, json!({"intent": "upscale"})).await;
    assert_eq!(no_image.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        no_image.json::<Value>().await.unwrap()["error"]["code"],
        "image_required"
    );
    let answered = clarify(
        &app,
        &id,
        json!({"intent": "upscale", "image": image_json(&png(16, 16, 5))}),
    )
    .await;
    assert_eq!(answered.status(), StatusCode::ACCEPTED);
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["intent"], "upscale");
    assert_eq!(openai.received("images/edits").await.len(), 1);
    assert_eq!(
        openai.received("chat/completions").await.len(),
        1,
        "the router was not asked again"
    );
}

#[tokio::test]
async fn an_image_already_at_the_largest_size_fails_clearly_without_a_billed_call() {
    let app = spawn_app_with(Options::default(), |s| {
        s.openai.upscale_max_size = (64, 64);
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    route_to_upscale(&app).await;
    openai.images_edit_ok().await;

    let (_, job) = upscale(&app, &png(64, 64, 6)).await;

    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "image_at_max_size");
    assert!(
        job["error"]["message"].as_str().unwrap().contains("64x64"),
        "{job:#}"
    );
    assert!(openai.received("images/edits").await.is_empty());
}

#[tokio::test]
async fn without_provider_keys_the_simulated_provider_upscales_the_image() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            ..Options::default()
        },
        |s| {
            // A small maximum keeps the simulated resampling fast in a debug build.
            s.openai.upscale_max_size = (256, 192);
        },
    )
    .await;
    let (_, job) = upscale(&app, &png(40, 30, 8)).await;

    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["intent"], "upscale");
    assert_eq!(job["provider"], "simulated");
    let image = &job["result"]["images"][0];
    assert_eq!(
        (image["width"].as_u64(), image["height"].as_u64()),
        (Some(256), Some(192))
    );
    assert!(job["cost_usd"].as_f64().unwrap() > 0.0, "{job:#}");
}
