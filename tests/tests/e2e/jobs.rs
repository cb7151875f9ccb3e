//! The happy paths a frontend relies on: create, edit, clarification, SSE, cancel, listing,
//! idempotency, and the simulated providers.

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::harness::{ALICE, BOB, Options, spawn_api, spawn_app, spawn_app_with, spawn_simulated};
use tests::mocks::{self, png};

#[tokio::test]
async fn a_create_request_is_routed_to_the_openai_image_model_and_its_image_is_served() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("create", 0.95, "a lighthouse at dawn, watercolor", None)
        .await;
    openai.images_generate_ok().await;

    let response = app
        .post_job(ALICE, json!({"prompt": "please draw a lighthouse at dawn, watercolor", "size": "1024x1024", "n": 2}))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let accepted: Value = response.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap();
    assert_eq!(accepted["status"], "queued");
    assert_eq!(accepted["status_url"], format!("/v1/jobs/{id}"));
    assert_eq!(location, format!("/v1/jobs/{id}"));

    let job = app.wait_until_terminal(ALICE, id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["intent"], "create");
    assert_eq!(job["provider"], "openai");
    assert_eq!(job["model"], app.settings.openai.image_model);
    assert!(
        job["attempts"].as_u64().unwrap() >= 2,
        "router and create each made a call"
    );
    let images = job["result"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0]["mime_type"], "image/png");
    assert!(images[0]["width"].as_u64().unwrap() > 0);

    // The image model got the router's cleaned prompt, the size and n.
    let requests = openai.received("images/generations").await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0]["prompt"], "a lighthouse at dawn, watercolor");
    assert_eq!(requests[0]["size"], "1024x1024");
    assert_eq!(requests[0]["n"], 2);
    assert_eq!(requests[0]["model"], app.settings.openai.image_model);
    // The router was told no image is attached and asked for strict structured output.
    let router = openai.received("chat/completions").await;
    assert_eq!(router[0]["response_format"]["type"], "json_schema");
    assert_eq!(router[0]["response_format"]["json_schema"]["strict"], true);

    let image = app.get(ALICE, images[1]["url"].as_str().unwrap()).await;
    assert_eq!(image.status(), StatusCode::OK);
    assert_eq!(image.headers()["content-type"], "image/png");
    let bytes = image.bytes().await.unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    // Provider-reported usage is stored on the job for the cost ledger.
    let stored = app
        .store
        .get(shared::domain::JobId::parse(id).unwrap())
        .await
        .unwrap()
        .unwrap();
    let agents: Vec<&str> = stored.usage.iter().map(|u| u.agent.as_str()).collect();
    assert_eq!(agents, ["router", "create"]);
    assert!(stored.usage[1].output_image_tokens > 0);

    // Each billed call is priced from its reported usage at the shipped list prices, rounded up
    // to a whole micro-dollar per call: the router's 120 prompt + 24 completion tokens on
    // gpt-4.1-mini ($0.40 / $1.60 per 1M) = 86.4 -> 87 micro-dollars; two medium 1024x1024
    // images on gpt-image-2 = 10 text tokens at $5 + 2 x 1056 image tokens at $30 per 1M
    // = 63,410 micro-dollars.
    assert_eq!(mocks::ROUTER_PROMPT_TOKENS, 120);
    assert_eq!(
        mocks::openai_output_tokens_per_image("medium", "1024x1024"),
        1056
    );
    assert_eq!(stored.cost_micros, 87 + 63_410);
    assert!(
        (job["cost_usd"].as_f64().unwrap() - 0.063_497).abs() < 1e-9,
        "{}",
        job["cost_usd"]
    );
}

#[tokio::test]
async fn an_edit_uploaded_as_multipart_goes_to_gemini_with_the_image_inline() {
    let app = spawn_app().await;
    app.openai
        .as_ref()
        .unwrap()
        .router_answers("edit", 0.9, "make the sky purple", None)
        .await;
    let gemini = app.gemini.as_ref().unwrap();
    gemini.edit_ok().await;
    let upload = png(64, 48, 7);

    let form = reqwest::multipart::Form::new()
        .text("prompt", "make the sky purple")
        .part(
            "image",
            reqwest::multipart::Part::bytes(upload.clone())
                .file_name("photo.png")
                // A wrong claimed type: the bytes decide.
                .mime_str("application/octet-stream")
                .unwrap(),
        );
    let response = app.post_multipart(ALICE, form).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["intent"], "edit");
    assert_eq!(job["provider"], "gemini");
    assert_eq!(job["model"], app.settings.gemini.image_model);

    let requests = gemini.received().await;
    assert_eq!(requests.len(), 1);
    let parts = requests[0]["contents"][0]["parts"].as_array().unwrap();
    let inline = parts
        .iter()
        .find_map(|p| p.get("inline_data").or_else(|| p.get("inlineData")))
        .unwrap();
    let sent = base64::engine::general_purpose::STANDARD
        .decode(inline["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        sent, upload,
        "the user's image reaches Gemini byte for byte"
    );
    assert_eq!(
        requests[0]["generationConfig"]["responseModalities"],
        json!(["TEXT", "IMAGE"])
    );
}

#[tokio::test]
async fn an_unclear_request_asks_the_user_a_question() {
    let app = spawn_app().await;
    app.openai
        .as_ref()
        .unwrap()
        .router_answers(
            "unclear",
            0.8,
            "",
            Some("Do you want a new picture of a cat, or to edit a photo of yours?"),
        )
        .await;
    let id = app.submit(ALICE, json!({"prompt": "cat thing"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "needs_clarification");
    assert_eq!(
        job["clarification"]["question"],
        "Do you want a new picture of a cat, or to edit a photo of yours?"
    );
    assert_eq!(job["clarification"]["options"], json!(["create", "edit"]));
    assert!(job.get("result").is_none());
}

#[tokio::test]
async fn an_edit_request_without_an_image_asks_for_the_image() {
    let app = spawn_app().await;
    app.openai
        .as_ref()
        .unwrap()
        .router_answers("edit", 0.95, "remove the background", None)
        .await;
    let id = app
        .submit(
            ALICE,
            json!({"prompt": "remove the background of my photo"}),
        )
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "needs_clarification");
    let question = job["clarification"]["question"].as_str().unwrap();
    assert!(question.contains("no image was attached"), "{question}");
    assert!(
        app.gemini.as_ref().unwrap().received().await.is_empty(),
        "no edit was attempted"
    );
}

/// An app on the simulated providers, each of whose calls takes `delay`: time to watch a job.
async fn spawn_simulated_taking(delay: std::time::Duration) -> tests::harness::TestApp {
    spawn_app_with(
        Options {
            mock_providers: false,
            ..Options::default()
        },
        |s| s.simulated.delay = delay,
    )
    .await
}

#[tokio::test]
async fn server_sent_events_follow_the_job_to_its_terminal_status_and_end() {
    let app = spawn_simulated_taking(std::time::Duration::from_millis(300)).await;
    let id = app
        .submit(ALICE, json!({"prompt": "a red bicycle in the rain"}))
        .await;
    let response = app.get(ALICE, &format!("/v1/jobs/{id}/events")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    // The stream ends by itself after the terminal event, so reading it to the end terminates.
    let body = tokio::time::timeout(std::time::Duration::from_secs(30), response.text())
        .await
        .expect("the stream ends after the terminal status")
        .unwrap();
    let statuses: Vec<String> = body
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| {
            serde_json::from_str::<Value>(data.trim()).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("succeeded"),
        "{body}"
    );
    assert!(statuses.iter().any(|s| s == "running"), "{statuses:?}");
    // One event per status change: no status repeats back to back.
    assert!(
        statuses.windows(2).all(|pair| pair[0] != pair[1]),
        "{statuses:?}"
    );
    assert!(body.contains("event: status"));
}

/// Subscribers of the api's job events channel, as Redis counts them.
async fn event_subscribers(app: &tests::harness::TestApp) -> i64 {
    use secrecy::ExposeSecret;
    let mut redis = redis::Client::open(app.settings.redis.url.expose_secret())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let channel = format!("{}events", app.settings.redis.prefix);
    let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channel)
        .query_async(&mut redis)
        .await
        .unwrap();
    counts[0].1
}

#[tokio::test]
async fn the_api_takes_job_events_from_redis_only_while_a_stream_follows_a_job() {
    let app = spawn_simulated_taking(std::time::Duration::from_millis(1500)).await;
    // Jobs run, and no one streams: Redis sends their events to no api.
    let first = app
        .submit(ALICE, json!({"prompt": "a red bicycle in the rain"}))
        .await;
    assert_eq!(
        app.wait_until_terminal(ALICE, &first).await["status"],
        "succeeded"
    );
    assert_eq!(event_subscribers(&app).await, 0);

    // A stream subscribes, and still sees every change of its job.
    let id = app
        .submit(ALICE, json!({"prompt": "a blue kite over the sea"}))
        .await;
    let response = app.get(ALICE, &format!("/v1/jobs/{id}/events")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut subscribed = 0;
    for _ in 0..50 {
        subscribed = event_subscribers(&app).await;
        if subscribed == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        subscribed, 1,
        "one subscription for the api while its stream is open"
    );
    let body = tokio::time::timeout(std::time::Duration::from_secs(30), response.text())
        .await
        .expect("the stream ends after the terminal status")
        .unwrap();
    assert!(body.contains("\"status\":\"running\""), "{body}");
    assert!(body.contains("\"status\":\"succeeded\""), "{body}");
}

#[tokio::test]
async fn a_running_job_can_be_canceled_and_its_late_result_is_discarded() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            ..Options::default()
        },
        |s| {
            s.simulated.delay = std::time::Duration::from_millis(1500);
        },
    )
    .await;
    let id = app
        .submit(ALICE, json!({"prompt": "a slow sunrise over hills"}))
        .await;
    app.wait_for(ALICE, &id, |job| job["status"] == "running")
        .await;

    let response = app.delete(ALICE, &format!("/v1/jobs/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let canceled: Value = response.json().await.unwrap();
    assert_eq!(canceled["status"], "canceled");
    assert_eq!(canceled["notices"][0]["code"], "canceled");

    // The simulated provider answers after 1.5 s per call; for well past that, the job stays
    // canceled with no result.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(4);
    while std::time::Instant::now() < until {
        let job = app.job(ALICE, &id).await;
        assert_eq!(job["status"], "canceled");
        assert!(job.get("result").is_none());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let again = app.delete(ALICE, &format!("/v1/jobs/{id}")).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(
        again.json::<Value>().await.unwrap()["error"]["code"],
        "job_finished"
    );
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_job() {
    let app = spawn_simulated().await;
    let send = |key: &'static str, prompt: &'static str, idem: &'static str| {
        app.client
            .post(app.url("/v1/jobs"))
            .bearer_auth(key)
            .header("idempotency-key", idem)
            .json(&json!({"prompt": prompt}))
            .send()
    };
    let first = send(ALICE, "a paper crane", "order-42").await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();

    let again = send(ALICE, "a paper crane", "order-42").await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);

    let different = send(ALICE, "a paper boat", "order-42").await.unwrap();
    assert_eq!(different.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        different.json::<Value>().await.unwrap()["error"]["code"],
        "idempotency_key_reused"
    );

    // Keys are per user: Bob's identical key makes Bob's own job.
    let bob = send(BOB, "a paper crane", "order-42").await.unwrap();
    assert_eq!(bob.status(), StatusCode::ACCEPTED);
    assert_ne!(bob.json::<Value>().await.unwrap()["id"], first["id"]);

    let listed: Value = app.get(ALICE, "/v1/jobs").await.json().await.unwrap();
    assert_eq!(
        listed["jobs"].as_array().unwrap().len(),
        1,
        "only one job was created for Alice"
    );
}

#[tokio::test]
async fn listing_shows_only_the_callers_jobs_newest_first_in_pages() {
    let app = spawn_api().await;
    let mut ids = Vec::new();
    for index in 0..5 {
        ids.push(
            app.submit(ALICE, json!({"prompt": format!("picture number {index}")}))
                .await,
        );
    }
    app.submit(BOB, json!({"prompt": "bob's picture"})).await;

    let first: Value = app
        .get(ALICE, "/v1/jobs?limit=2")
        .await
        .json()
        .await
        .unwrap();
    let page_ids = |page: &Value| -> Vec<String> {
        page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(page_ids(&first), vec![ids[4].clone(), ids[3].clone()]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let second: Value = app
        .get(ALICE, &format!("/v1/jobs?limit=2&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page_ids(&second), vec![ids[2].clone(), ids[1].clone()]);
    let cursor = second["next_cursor"].as_str().unwrap();
    let last: Value = app
        .get(ALICE, &format!("/v1/jobs?limit=2&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page_ids(&last), vec![ids[0].clone()]);
    assert!(last["next_cursor"].is_null());

    let bad = app.get(ALICE, "/v1/jobs?limit=0").await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let bad = app.get(ALICE, "/v1/jobs?cursor=nonsense").await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn without_provider_keys_the_simulated_provider_makes_a_real_png() {
    let app = spawn_simulated().await;
    let id = app
        .submit(
            ALICE,
            json!({"prompt": "a teal whale made of stars", "size": "1536x1024"}),
        )
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["provider"], "simulated");
    let image = &job["result"]["images"][0];
    assert_eq!(
        (image["width"].as_u64(), image["height"].as_u64()),
        (Some(1536), Some(1024))
    );
    let bytes = app
        .get(ALICE, image["url"].as_str().unwrap())
        .await
        .bytes()
        .await
        .unwrap();
    let decoded = image::load_from_memory(&bytes).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (1536, 1024));

    // Simulated calls are priced as the models they stand in for, and flagged.
    assert!(job["cost_usd"].as_f64().unwrap() > 0.0);
    let stored = app
        .store
        .get(shared::domain::JobId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored
            .usage
            .iter()
            .all(|usage| usage.simulated && usage.provider == "openai")
    );
}
