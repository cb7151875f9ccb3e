//! Hostile upstreams, each written as the attack: a provider that announces a terabyte, one
//! that streams without end, one that asks to be retried in 10^297 seconds, a job whose run
//! panics, an input image that decodes to a quarter of a gigabyte. Every one of them must leave
//! the worker healthy and taking jobs (`docs/security-upstreams.md`).
//!
//! The workers here are real `pictor worker` processes: an attack that aborts the process (as a
//! terabyte allocation does) must not take the test binary with it, and `/healthz` is what an
//! orchestrator would see.

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tests::harness::{ALICE, Options, PictorProcess, TestApp, spawn_api, spawn_app_with};
use tests::mocks::{HostileAnswer, HostileServer, png};

/// An edit job's body: `prompt` and a small PNG.
fn edit(prompt: &str) -> Value {
    let image = base64::engine::general_purpose::STANDARD.encode(png(16, 16, 3));
    json!({"prompt": prompt, "image": {"data": image, "mime_type": "image/png"}})
}

/// The worker's `/healthz`: its status and body.
async fn health(app: &TestApp, worker: &PictorProcess) -> (u16, String) {
    match app
        .client
        .get(format!("{}/healthz", worker.base))
        .send()
        .await
    {
        Ok(response) => (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        ),
        Err(error) => (0, error.to_string()),
    }
}

/// Polls `/healthz` until it answers `status` (20 s at most); answers the body.
async fn wait_for_health(app: &TestApp, worker: &PictorProcess, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (seen, body) = health(app, worker).await;
        if seen == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz stayed {seen} ({body}), not {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts the worker is alive, says so, and runs a job to the end.
async fn assert_healthy_and_taking_jobs(app: &TestApp, worker: &mut PictorProcess, job: Value) {
    assert!(worker.is_running(), "the worker process survived");
    assert_eq!(health(app, worker).await, (200, "ok".to_string()));
    let id = app.submit(ALICE, job).await;
    let done = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
}

fn has_notice(job: &Value, code: &str) -> bool {
    job["notices"]
        .as_array()
        .is_some_and(|notices| notices.iter().any(|notice| notice["code"] == code))
}

#[tokio::test]
async fn a_terabyte_content_length_fails_the_call_and_the_worker_stays_healthy_and_taking_jobs() {
    let app = spawn_api().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("edit", 0.9, "make the sky purple", None)
        .await;
    openai.images_edit_ok().await;
    let gemini = HostileServer::start(HostileAnswer::Announced(1 << 40)).await;
    let mut worker = app
        .spawn_process("worker", &[("GEMINI_BASE_URL", gemini.url.clone())])
        .await;

    let id = app.submit(ALICE, edit("make the sky purple")).await;
    let job = app.wait_until_terminal(ALICE, &id).await;

    // Gemini's answer was refused unread (bad_response is a provider failure), and OpenAI's
    // edit took over.
    assert_eq!(gemini.requests(), 1, "refused, not retried");
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["provider"], "openai", "{job:#}");
    assert!(has_notice(&job, "fallback_provider"), "{job:#}");
    assert_healthy_and_taking_jobs(&app, &mut worker, edit("make the sky purple")).await;
}

#[tokio::test]
async fn a_chunked_answer_past_the_cap_stops_being_read_and_the_worker_keeps_taking_jobs() {
    let app = spawn_api().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("edit", 0.9, "make the sky purple", None)
        .await;
    openai.images_edit_ok().await;
    let gemini = HostileServer::start(HostileAnswer::EndlessChunks).await;
    let mut worker = app
        .spawn_process(
            "worker",
            &[
                ("GEMINI_BASE_URL", gemini.url.clone()),
                ("PICTOR_GEMINI_MAX_RESPONSE_MIB", "1".to_string()),
            ],
        )
        .await;

    let id = app.submit(ALICE, edit("make the sky purple")).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["provider"], "openai", "{job:#}");
    assert_eq!(gemini.requests(), 1);

    // The worker hung up a little past the cap: the server can push no more than what the
    // sockets' buffers hold on top of the 1 MiB read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = gemini.body_bytes_written();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gemini.body_bytes_written(), taken, "nobody reads any more");
    assert!(taken < 16 << 20, "the worker took {taken} bytes");
    assert_healthy_and_taking_jobs(&app, &mut worker, edit("make the sky purple")).await;
}

/// Waits for the job's `rate_limited` notice and asserts it waits the longest delay the retry
/// policy honours (60 s), not what the server asked for.
async fn assert_deferred_for_the_longest_honoured_delay(app: &TestApp, id: &str) {
    let job = app
        .wait_for(ALICE, id, |job| has_notice(job, "rate_limited"))
        .await;
    let notice = job["notices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|notice| notice["code"] == "rate_limited")
        .unwrap();
    let at: chrono::DateTime<chrono::Utc> = notice["at"].as_str().unwrap().parse().unwrap();
    let retry_at: chrono::DateTime<chrono::Utc> =
        notice["retry_at"].as_str().unwrap().parse().unwrap();
    let wait = (retry_at - at).num_seconds();
    assert!(
        (55..=61).contains(&wait),
        "clamped to the 60 s maximum: {wait} s ({job:#})"
    );
}

#[tokio::test]
async fn absurd_retry_hints_are_clamped_and_the_worker_stays_healthy_and_taking_jobs() {
    let app = spawn_api().await;
    let openai = app.openai.as_ref().unwrap();
    let gemini = app.gemini.as_ref().unwrap();
    openai.router_answers("create", 0.95, "a fox", None).await;
    openai
        .rate_limited_hinting(
            "images/generations",
            &[("retry-after-ms", "1e300"), ("retry-after", "1e20")],
            Some(1),
        )
        .await;
    openai.images_generate_ok().await;
    let mut worker = app.spawn_process("worker", &[]).await;

    // OpenAI asks for 10^297 seconds: a Duration overflows, and the job is deferred for the
    // longest delay the retry policy honours instead.
    let created = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    assert_deferred_for_the_longest_honoured_delay(&app, &created).await;

    // Gemini asks for 10^20 seconds in its RetryInfo.
    openai.server.reset().await;
    openai
        .router_answers("edit", 0.9, "make the sky purple", None)
        .await;
    openai.images_generate_ok().await;
    gemini.rate_limited_times("1e20s", Some(1)).await;
    gemini.edit_ok().await;
    let edited = app.submit(ALICE, edit("make the sky purple")).await;
    assert_deferred_for_the_longest_honoured_delay(&app, &edited).await;

    assert_healthy_and_taking_jobs(&app, &mut worker, edit("make the sky purple")).await;
}

#[tokio::test]
async fn a_job_whose_run_keeps_panicking_ends_failed_and_dead_lettered_and_the_worker_keeps_taking_jobs()
 {
    let app = spawn_api().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.95, "a fox", None).await;
    openai.images_generate_ok().await;
    // Two slots: before the fix, two panics left both taken for good.
    let mut worker = app
        .spawn_process(
            "worker",
            &[
                ("PICTOR_FAILPOINTS", "after_answer:create=panic".to_string()),
                ("PICTOR_WORKER_CONCURRENCY", "2".to_string()),
                ("PICTOR_WORKER_MAX_INFRA_ATTEMPTS", "3".to_string()),
            ],
        )
        .await;

    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.submit(ALICE, json!({"prompt": "a fox"})).await);
    }
    for id in &ids {
        let job = app.wait_until_terminal(ALICE, id).await;
        assert_eq!(job["status"], "failed", "{job:#}");
        assert_eq!(job["error"]["code"], "processing_failed", "{job:#}");
    }
    // Each job's create call was made once per run: three runs, three panics, then the end.
    assert_eq!(
        openai.received("images/generations").await.len(),
        9,
        "PICTOR_WORKER_MAX_INFRA_ATTEMPTS=3 runs per job"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.queue_depth(&app.topology.dead_letter_queue).await < 3 {
        assert!(
            Instant::now() < deadline,
            "the three messages were dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.queue_depth(&app.topology.jobs_queue).await, 0);

    // Only `create` panics: an edit still runs, on the two slots the panics did not keep.
    openai.server.reset().await;
    openai
        .router_answers("edit", 0.9, "make the sky purple", None)
        .await;
    app.gemini.as_ref().unwrap().edit_ok().await;
    for _ in 0..2 {
        assert_healthy_and_taking_jobs(&app, &mut worker, edit("make the sky purple")).await;
    }
}

#[tokio::test]
async fn healthz_answers_503_while_the_worker_cannot_consume_and_ok_once_it_is_back() {
    let app = spawn_app_with(
        Options {
            worker: false,
            amqp_proxy: true,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let proxy = app.amqp_proxy.as_ref().unwrap();
    let worker = app
        .spawn_process(
            "worker",
            &[(
                "PICTOR_AMQP_URL",
                format!("amqp://guest:guest@{}/%2f", proxy.addr),
            )],
        )
        .await;
    assert_eq!(health(&app, &worker).await, (200, "ok".to_string()));

    proxy.cut().await;
    let reason = wait_for_health(&app, &worker, 503).await;
    assert!(reason.contains("not consuming"), "{reason}");

    proxy.restore();
    assert_eq!(wait_for_health(&app, &worker, 200).await, "ok");
}

#[tokio::test]
async fn healthz_answers_503_when_every_job_slot_is_wedged() {
    let app = spawn_api().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.95, "a fox", None).await;
    openai.images_generate_ok().await;
    // One slot, and a job that never goes on: wedged once it has held the slot for twice the
    // job deadline.
    let worker = app
        .spawn_process(
            "worker",
            &[
                ("PICTOR_FAILPOINTS", "after_answer:create=hang".to_string()),
                ("PICTOR_WORKER_CONCURRENCY", "1".to_string()),
                ("PICTOR_JOB_DEADLINE_SECS", "1".to_string()),
            ],
        )
        .await;
    app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let reason = wait_for_health(&app, &worker, 503).await;
    assert!(reason.contains("wedged: all 1 job slots"), "{reason}");
}

/// A PNG of one colour: a few hundred KiB on the wire, `width * height * 4` bytes decoded.
fn flat_png(side: u32) -> Vec<u8> {
    let image = image::RgbaImage::from_pixel(side, side, image::Rgba([40, 90, 200, 255]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, image::ImageFormat::Png)
        .expect("encodes");
    bytes.into_inner()
}

#[tokio::test]
async fn an_8192_square_png_is_refused_by_the_simulated_worker_without_decoding_it() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let mut worker = app
        .spawn_process("worker", &[("PICTOR_SIMULATED_DELAY_MS", "10".to_string())])
        .await;
    let image = flat_png(8192);
    assert!(image.len() < 2 << 20, "{} bytes on the wire", image.len());
    let before = worker.memory_kib("VmHWM") * 1024;

    let body = json!({
        "prompt": "make this photo blue",
        "n": 4,
        "image": {
            "data": base64::engine::general_purpose::STANDARD.encode(&image),
            "mime_type": "image/png",
        },
    });
    let id = app.submit(ALICE, body).await;
    let job = app.wait_until_terminal(ALICE, &id).await;

    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "invalid_request", "{job:#}");
    // Decoded, the image alone is 256 MiB (and as much again per copy the edit makes).
    let peak = worker.memory_kib("VmHWM") * 1024;
    assert!(
        peak < before + (128 << 20),
        "the worker's peak memory went from {} MiB to {} MiB",
        before >> 20,
        peak >> 20
    );
    assert!(worker.is_running());
    assert_eq!(health(&app, &worker).await, (200, "ok".to_string()));
    let small = json!({
        "prompt": "make this photo blue",
        "image": {
            "data": base64::engine::general_purpose::STANDARD.encode(flat_png(64)),
            "mime_type": "image/png",
        },
    });
    let id = app.submit(ALICE, small).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
}
