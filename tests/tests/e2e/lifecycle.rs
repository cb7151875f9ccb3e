//! A job's life around the happy path: answering a clarification, admission control at the
//! ingress, the watchdog for stuck jobs, and graceful shutdown.

use std::time::Duration;

use base64::Engine;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::domain::{JobId, JobStatus};
use shared::store::{Guard, JobUpdate};
use tests::harness::{ALICE, Options, TestApp, spawn_app, spawn_app_with, stop_gracefully};
use tests::mocks::png;

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
async fn answering_a_clarification_resumes_the_same_job_without_asking_the_router_again() {
    let app = spawn_app().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("unclear", 0.9, "", Some("New picture or an edit?"))
        .await;
    openai.images_generate_ok().await;
    let id = app.submit(ALICE, json!({"prompt": "sunset thing"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "needs_clarification");

    let response = clarify(
        &app,
        &id,
        json!({"intent": "create", "prompt": "a sunset over the sea"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        response.json::<Value>().await.unwrap()["id"],
        id.as_str(),
        "the same job id"
    );

    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["intent"], "create");
    assert!(job.get("clarification").is_none());
    assert_eq!(
        openai.received("chat/completions").await.len(),
        1,
        "the router ran once"
    );
    let generated = openai.received("images/generations").await;
    assert_eq!(generated[0]["prompt"], "a sunset over the sea");
    let codes: Vec<&str> = job["notices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"clarified"), "{codes:?}");

    let again = clarify(&app, &id, json!({"intent": "create"})).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(
        again.json::<Value>().await.unwrap()["error"]["code"],
        "not_awaiting_clarification"
    );
}

#[tokio::test]
async fn a_clarification_can_turn_a_job_into_an_edit_by_adding_the_image() {
    let app = spawn_app().await;
    app.openai
        .as_ref()
        .unwrap()
        .router_answers("edit", 0.9, "remove the hat", None)
        .await;
    let gemini = app.gemini.as_ref().unwrap();
    gemini.edit_ok().await;
    let id = app
        .submit(ALICE, json!({"prompt": "remove the hat from my photo"}))
        .await;
    assert_eq!(
        app.wait_until_terminal(ALICE, &id).await["status"],
        "needs_clarification"
    );

    let no_image = clarify(&app, &id, json!({"intent": "edit"})).await;
    assert_eq!(no_image.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        no_image.json::<Value>().await.unwrap()["error"]["code"],
        "image_required"
    );
    let bad_intent = clarify(&app, &id, json!({"intent": "paint"})).await;
    assert_eq!(bad_intent.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let image = base64::engine::general_purpose::STANDARD.encode(png(32, 32, 4));
    let response = clarify(
        &app,
        &id,
        json!({"intent": "edit", "image": {"data": image, "mime_type": "image/png"}}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["provider"], "gemini");
    assert_eq!(gemini.received().await.len(), 1);
}

/// Takes the job's message off the queue, so only the watchdog can bring the job back.
async fn lose_the_message_of_a_running_job(app: &TestApp, id: &str) {
    let (connection, channel) = app.amqp_channel().await;
    let message = channel
        .basic_get(
            app.topology.jobs_queue.as_str().into(),
            BasicGetOptions::default(),
        )
        .await
        .unwrap()
        .expect("the job's message is queued");
    message
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    let id = JobId::parse(id).unwrap();
    app.store
        .update(id, Guard::Active, &JobUpdate::status(JobStatus::Running))
        .await
        .unwrap();
    app.store
        .set_lease(id, chrono::Utc::now() - chrono::Duration::seconds(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_watchdog_requeues_a_job_stuck_in_running_and_it_completes() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let id = app
        .submit(ALICE, json!({"prompt": "a job whose worker vanished"}))
        .await;
    lose_the_message_of_a_running_job(&app, &id).await;
    let _worker = app.worker_process(&[
        ("PICTOR_WATCHDOG_INTERVAL_SECS", "1"),
        ("PICTOR_SIMULATED_DELAY_MS", "50"),
    ]);
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let codes: Vec<&str> = job["notices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["requeued"]);
}

#[tokio::test]
async fn the_watchdog_fails_a_job_that_stays_stuck() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let id = app
        .submit(ALICE, json!({"prompt": "a job that never moves"}))
        .await;
    lose_the_message_of_a_running_job(&app, &id).await;
    let _worker = app.worker_process(&[
        ("PICTOR_WATCHDOG_INTERVAL_SECS", "1"),
        ("PICTOR_WATCHDOG_MAX_REQUEUES", "0"),
    ]);
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "processing_failed");
}

#[tokio::test]
async fn sigterm_lets_the_worker_finish_its_job_then_exit() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let mut worker = app.worker_process(&[("PICTOR_SIMULATED_DELAY_MS", "1000")]);
    let id = app
        .submit(ALICE, json!({"prompt": "finish me before you go"}))
        .await;
    app.wait_for(ALICE, &id, |job| job["status"] == "running")
        .await;
    let exit = stop_gracefully(&mut worker).await;
    assert!(exit.success(), "{exit:?}");
    assert_eq!(app.job(ALICE, &id).await["status"], "succeeded");
    assert_eq!(app.queue_depth(&app.topology.jobs_queue).await, 0);
}

#[tokio::test]
async fn after_the_cooldown_one_probe_lets_a_recovered_gemini_back_in() {
    let app = spawn_app_with(Options::default(), |s| {
        s.breaker.failure_threshold = std::num::NonZeroU32::new(2).unwrap();
        s.breaker.cooldown = Duration::from_millis(500);
        s.worker.provider_max_attempts = std::num::NonZeroU32::new(1).unwrap();
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    let gemini = app.gemini.as_ref().unwrap();
    openai
        .router_answers("edit", 0.9, "make it blue", None)
        .await;
    openai.images_edit_ok().await;
    // Two failures (which open the circuit), then Gemini is healthy again.
    gemini.unavailable(Some(2)).await;
    gemini.edit_ok().await;
    let image = base64::engine::general_purpose::STANDARD.encode(png(16, 16, 2));
    let edit =
        || json!({"prompt": "make it blue", "image": {"data": image, "mime_type": "image/png"}});

    let mut providers = Vec::new();
    for _ in 0..3 {
        let id = app.submit(ALICE, edit()).await;
        providers.push(app.wait_until_terminal(ALICE, &id).await["provider"].clone());
    }
    assert_eq!(
        providers,
        [json!("openai"), json!("openai"), json!("openai")]
    );
    assert_eq!(
        gemini.received().await.len(),
        2,
        "the open circuit kept the third edit away"
    );

    // The cooldown is a wall-clock policy, so the test waits it out.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let id = app.submit(ALICE, edit()).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(
        job["provider"], "gemini",
        "the probe reached the recovered Gemini"
    );
    assert!(job["notices"].as_array().unwrap().is_empty(), "{job:#}");
    assert_eq!(gemini.received().await.len(), 3);
}

#[tokio::test]
async fn a_message_over_the_delivery_limit_fails_its_job_and_is_dead_lettered() {
    use lapin::BasicProperties;
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable};

    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let id = app
        .submit(
            ALICE,
            json!({"prompt": "a job that keeps crashing workers"}),
        )
        .await;
    // Replace its message with one the broker has (by its header) delivered too often already,
    // as if workers had crashed on it again and again.
    let (connection, channel) = app.amqp_channel().await;
    let original = channel
        .basic_get(
            app.topology.jobs_queue.as_str().into(),
            BasicGetOptions::default(),
        )
        .await
        .unwrap()
        .expect("queued message");
    let mut headers = FieldTable::default();
    headers.insert(
        "x-delivery-count".into(),
        AMQPValue::LongLongInt(i64::from(app.topology.delivery_limit)),
    );
    channel
        .basic_publish(
            "".into(),
            app.topology.jobs_queue.as_str().into(),
            BasicPublishOptions::default(),
            &original.delivery.data,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    original
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;

    let _worker = app.worker_process(&[("PICTOR_SIMULATED_DELAY_MS", "50")]);
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "processing_failed");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.queue_depth(&app.topology.dead_letter_queue).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the message was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.queue_depth(&app.topology.jobs_queue).await, 0);
}

/// A job record that vanished before the api marked it accepted (its short pending TTL ran out,
/// or a Redis failover lost it) stays gone, for the worker to recreate whole from its message,
/// instead of coming back as a hash of one field that every read of the job rejects.
#[tokio::test]
async fn marking_a_vanished_job_accepted_does_not_bring_back_a_fragment_of_it() {
    use secrecy::ExposeSecret;
    let app = tests::harness::spawn_api().await;
    let id = shared::domain::JobId::new();
    app.store
        .mark_accepted(id, None)
        .await
        .expect("marking a missing job is no error");
    let mut redis = redis::Client::open(app.settings.redis.url.expose_secret())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg(format!("{}job:{id}", app.settings.redis.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!exists, "a one-field fragment of the job was written");
    assert_eq!(
        app.get(ALICE, &format!("/v1/jobs/{id}")).await.status(),
        reqwest::StatusCode::NOT_FOUND
    );
}
