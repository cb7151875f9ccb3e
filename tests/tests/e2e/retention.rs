//! Images do not stay forever (`docs/storage.md`): a canceled job's input is gone at once, a job
//! that failed for good keeps nothing while one that failed in the infrastructure keeps its
//! input for a replay, a succeeded job's images go when their retention runs out, and the
//! store's bound refuses new uploads past it while the workers' gauges show its size. Checked as
//! a user (the API) and an operator (the image directory, `/metrics`, `dlq replay`) see it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::domain::{JobId, JobStatus, UserError};
use shared::images::ImageStore;
use shared::store::{Guard, JobUpdate, UpdateOutcome};
use tests::harness::{ALICE, Options, TestApp, spawn_api, spawn_app, spawn_app_with};

/// A job editing `image` (PNG bytes).
fn edit_request(image: &[u8]) -> Value {
    json!({
        "prompt": "make the sky purple",
        "image": {
            "data": base64::engine::general_purpose::STANDARD.encode(image),
            "mime_type": "image/png",
        },
    })
}

fn small_png() -> Vec<u8> {
    tests::mocks::png(32, 32, 3)
}

/// A PNG of noise, which does not compress: about `side * side * 3` bytes.
fn incompressible_png(side: u32, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    let pixels = image::RgbImage::from_fn(side, side, |_, _| {
        let mut channel = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state.to_le_bytes()[0]
        };
        image::Rgb([channel(), channel(), channel()])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    pixels
        .write_to(&mut bytes, image::ImageFormat::Png)
        .unwrap();
    bytes.into_inner()
}

fn store_dir(app: &TestApp) -> PathBuf {
    PathBuf::from(&app.settings.images.store)
}

fn inputs_of(app: &TestApp, id: &str) -> PathBuf {
    store_dir(app).join("inputs").join(id)
}

fn outputs_of(app: &TestApp, id: &str) -> PathBuf {
    store_dir(app).join("outputs").join(id)
}

/// Waits (at most `within`) until `path` no longer exists.
async fn wait_until_gone(path: &std::path::Path, within: Duration) {
    let deadline = Instant::now() + within;
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} is still there after {within:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A router that says `edit` and a Gemini that edits (answering `png(64, 64, 7)`).
pub(crate) async fn edits_succeed(app: &TestApp) {
    app.openai
        .as_ref()
        .unwrap()
        .router_answers("edit", 0.9, "make the sky purple", None)
        .await;
    app.gemini.as_ref().unwrap().edit_ok().await;
}

#[tokio::test]
async fn a_canceled_jobs_input_is_deleted_at_once() {
    // No worker: the job waits in the queue with its input stored.
    let app = spawn_api().await;
    let id = app.submit(ALICE, edit_request(&small_png())).await;
    let input = inputs_of(&app, &id).join("source.png");
    assert!(input.exists(), "{} was stored", input.display());

    let canceled = app.delete(ALICE, &format!("/v1/jobs/{id}")).await;
    assert_eq!(canceled.status(), StatusCode::OK);

    assert!(
        !inputs_of(&app, &id).exists(),
        "the input is gone when the cancel answers"
    );
}

#[tokio::test]
async fn a_job_that_fails_for_good_keeps_no_input() {
    let app = spawn_app().await;
    app.openai
        .as_ref()
        .unwrap()
        .router_answers("edit", 0.9, "make the sky purple", None)
        .await;
    app.gemini.as_ref().unwrap().blocked().await;

    let id = app.submit(ALICE, edit_request(&small_png())).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "content_blocked", "{job:#}");

    // Deleted as the failure is written: nothing will use the image again.
    wait_until_gone(&inputs_of(&app, &id), Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_infrastructure_failure_keeps_the_input_so_a_replay_can_finish_the_edit() {
    let app = spawn_app_with(Options::default(), |settings| {
        settings.worker.max_infra_attempts = std::num::NonZeroU32::new(3).unwrap();
    })
    .await;
    edits_succeed(&app).await;
    // The store refuses every output: a file where the outputs folder must go.
    let outputs = store_dir(&app).join("outputs");
    std::fs::create_dir_all(store_dir(&app)).unwrap();
    std::fs::write(&outputs, b"not a folder").unwrap();

    let id = app.submit(ALICE, edit_request(&small_png())).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "processing_failed", "{job:#}");
    let dead = &app.topology.dead_letter_queue;
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.queue_depth(dead).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the message was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        inputs_of(&app, &id).join("source.png").exists(),
        "a processing_failed job keeps its input for a replay"
    );

    // Ops fix the store and replay: the edit runs again from the kept input.
    std::fs::remove_file(&outputs).unwrap();
    let images = ImageStore::open(&app.settings.images.store).unwrap();
    let job_id = JobId::parse(&id).unwrap();
    let report = cli::dlq::replay(&app.settings.amqp, &app.store, &images, 10, Some(job_id))
        .await
        .unwrap();
    assert_eq!(report.replayed, vec![job_id], "{report:?}");
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let image = app.get(ALICE, &format!("/v1/jobs/{id}/images/0")).await;
    assert_eq!(image.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_replay_of_a_failed_job_whose_input_is_gone_is_refused_and_explained() {
    let app = spawn_api().await;
    let id = app.submit(ALICE, edit_request(&small_png())).await;
    let job_id = JobId::parse(&id).unwrap();
    // Its message is dead-lettered and the job failed in the infrastructure...
    let (connection, channel) = app.amqp_channel().await;
    let message = channel
        .basic_get(
            app.topology.jobs_queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("the job's message waits in the work queue");
    message
        .delivery
        .reject(lapin::options::BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    let failed = JobUpdate {
        status: Some(JobStatus::Failed),
        error: Some(UserError {
            code: "processing_failed".to_string(),
            message: "We could not process this job after several tries.".to_string(),
        }),
        ..JobUpdate::default()
    };
    let outcome = app
        .store
        .update(job_id, Guard::Active, &failed)
        .await
        .unwrap();
    assert!(matches!(outcome, UpdateOutcome::Applied { .. }));
    // ...and its input expired before anyone replayed it (a retention shorter than the TTL).
    std::fs::remove_dir_all(inputs_of(&app, &id)).unwrap();
    let dead = &app.topology.dead_letter_queue;
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.queue_depth(dead).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the message was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let images = ImageStore::open(&app.settings.images.store).unwrap();
    let report = cli::dlq::replay(&app.settings.amqp, &app.store, &images, 10, None)
        .await
        .unwrap();
    assert_eq!(report.input_gone, vec![job_id], "{report:?}");
    assert!(report.replayed.is_empty(), "{report:?}");
    let job = app.job(ALICE, &id).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(
        app.queue_depth(dead).await,
        0,
        "nothing is left to retry: the dead letter is acked"
    );
    assert_eq!(app.queue_depth(&app.topology.jobs_queue).await, 0);
}

#[tokio::test]
async fn a_job_whose_input_is_gone_fails_with_image_required_instead_of_retrying() {
    let app = spawn_api().await;
    edits_succeed(&app).await;
    let id = app.submit(ALICE, edit_request(&small_png())).await;
    std::fs::remove_dir_all(inputs_of(&app, &id)).unwrap();

    let worker = worker::Worker::build(app.settings.clone()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker_task = tokio::spawn(worker.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "image_required", "{job:#}");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no longer kept"),
        "{job:#}"
    );
    assert!(
        app.gemini.as_ref().unwrap().received().await.is_empty(),
        "nothing was sent to a provider"
    );
    let _ = stop.send(());
    let _ = worker_task.await;
}

#[tokio::test]
async fn a_succeeded_jobs_images_are_deleted_when_their_retention_runs_out() {
    let app = spawn_app_with(Options::default(), |settings| {
        settings.images.retention = Duration::from_secs(2);
        settings.images.sweep_interval = Duration::from_secs(1);
    })
    .await;
    edits_succeed(&app).await;
    let id = app.submit(ALICE, edit_request(&small_png())).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let image_url = format!("/v1/jobs/{id}/images/0");
    assert_eq!(app.get(ALICE, &image_url).await.status(), StatusCode::OK);
    assert!(inputs_of(&app, &id).exists());
    assert!(outputs_of(&app, &id).exists());

    // Two seconds after the job ended, and a sweep later, both folders are gone.
    wait_until_gone(&inputs_of(&app, &id), Duration::from_secs(15)).await;
    wait_until_gone(&outputs_of(&app, &id), Duration::from_secs(5)).await;
    assert_eq!(
        app.get(ALICE, &image_url).await.status(),
        StatusCode::NOT_FOUND
    );
    // The job itself lives its own TTL; only its bytes went.
    assert_eq!(app.job(ALICE, &id).await["status"], "succeeded");
}

#[tokio::test]
async fn a_question_left_open_past_the_retention_asks_for_the_image_again() {
    let app = spawn_app_with(Options::default(), |settings| {
        settings.images.retention = Duration::from_secs(2);
        settings.images.sweep_interval = Duration::from_secs(1);
    })
    .await;
    app.openai
        .as_ref()
        .unwrap()
        .router_answers(
            "unclear",
            0.9,
            "",
            Some("Edit this photo or make a new one?"),
        )
        .await;
    app.gemini.as_ref().unwrap().edit_ok().await;
    let id = app.submit(ALICE, edit_request(&small_png())).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "needs_clarification", "{job:#}");
    wait_until_gone(&inputs_of(&app, &id), Duration::from_secs(15)).await;

    let clarify = |body: Value| {
        app.client
            .post(app.url(&format!("/v1/jobs/{id}/clarify")))
            .bearer_auth(ALICE)
            .json(&body)
            .send()
    };
    let refused = clarify(json!({"intent": "edit"})).await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "image_required", "{body:#}");
    assert_eq!(app.job(ALICE, &id).await["status"], "needs_clarification");

    let image = base64::engine::general_purpose::STANDARD.encode(small_png());
    let resumed = clarify(json!({
        "intent": "edit",
        "image": {"data": image, "mime_type": "image/png"},
    }))
    .await
    .unwrap();
    assert_eq!(resumed.status(), StatusCode::ACCEPTED);
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
}

#[tokio::test]
async fn uploads_past_the_store_bound_are_refused_and_the_workers_show_the_stores_size() {
    let app = spawn_app_with(
        Options {
            worker: false,
            ..Options::default()
        },
        |settings| settings.images.max_store_mib = 1,
    )
    .await;
    edits_succeed(&app).await;
    let openai = app.openai.as_ref().unwrap();
    openai.images_generate_ok().await;
    let worker = app
        .spawn_process(
            "worker",
            &[
                ("PICTOR_IMAGE_MEASURE_INTERVAL_SECS", "1".to_string()),
                ("PICTOR_IMAGE_SWEEP_INTERVAL_SECS", "1".to_string()),
            ],
        )
        .await;

    // About 0.6 MiB each: the first two fit under 1 MiB, the third finds the store full.
    let (first, second, third) = (
        incompressible_png(450, 1),
        incompressible_png(450, 2),
        incompressible_png(450, 3),
    );
    assert!(first.len() > 512 * 1024, "{} bytes", first.len());
    app.submit(ALICE, edit_request(&first)).await;
    app.submit(ALICE, edit_request(&second)).await;
    let refused = app.post_job(ALICE, edit_request(&third)).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after = refused
        .headers()
        .get("retry-after")
        .expect("a Retry-After header")
        .to_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "image_store_full", "{body:#}");
    // A job that brings no image still gets in.
    app.submit(ALICE, json!({"prompt": "a lighthouse at dusk"}))
        .await;

    let uploaded = (first.len() + second.len()) as f64;
    let metrics = format!("{}/metrics", worker.base);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        let bytes = gauge(&text, "pictor_image_store_bytes");
        let objects = gauge(&text, "pictor_image_store_objects");
        if bytes.is_some_and(|bytes| bytes >= uploaded)
            && objects.is_some_and(|objects| objects >= 2.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never showed the {uploaded} bytes uploaded: bytes {bytes:?}, objects {objects:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Measured by listing, the store is still over its bound: the refusal holds.
    let refused = app.post_job(ALICE, edit_request(&third)).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    drop(worker);
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (series == name).then(|| value.parse().ok()).flatten()
        })
}
