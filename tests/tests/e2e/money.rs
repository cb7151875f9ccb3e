//! Money safety (`docs/costs.md`, "Paying once"): a provider call is paid for at most once per
//! step, whatever fails after it answered; every billed call is in the ledger, a call whose
//! outcome is unknown as possibly billed; infrastructure trouble ends a job after a bounded
//! number of attempts; a `202` never ends as a 404. Each test counts the calls the provider mock
//! saw and reads the ledger.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::domain::JobId;
use shared::ledger::{Billing, LedgerEntry};
use tests::harness::{ALICE, OPS, Options, TestApp, spawn_api, spawn_app_with, stop_gracefully};
use wiremock::matchers::{header_exists, method, path};
use wiremock::{Mock, ResponseTemplate};

/// Ledger entries of `job` made by `agent`.
fn entries_of<'a>(entries: &'a [LedgerEntry], job: &str, agent: &str) -> Vec<&'a LedgerEntry> {
    entries
        .iter()
        .filter(|entry| entry.job_id.to_string() == job && entry.usage.agent == agent)
        .collect()
}

/// Waits until the image mock has received `count` calls (a test acts at that moment).
async fn wait_for_image_calls(app: &TestApp, count: usize) {
    let openai = app.openai.as_ref().expect("mock providers");
    let deadline = Instant::now() + Duration::from_secs(20);
    while openai.received("images/generations").await.len() < count {
        assert!(Instant::now() < deadline, "the image call never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A router that says `create`, and an image model that answers after `delay`.
async fn create_answered_after(app: &TestApp, delay: Duration) {
    let openai = app.openai.as_ref().expect("mock providers");
    openai.router_answers("create", 0.9, "a fox", None).await;
    openai.images_generate_ok_after(delay).await;
}

async fn image_calls(app: &TestApp) -> usize {
    app.openai
        .as_ref()
        .expect("mock providers")
        .received("images/generations")
        .await
        .len()
}

/// The job's output folder in the directory image store.
fn outputs_of(app: &TestApp, id: &str) -> PathBuf {
    PathBuf::from(&app.settings.images.store)
        .join("outputs")
        .join(id)
}

/// Makes the image store refuse the job's outputs: a file where its folder must go.
fn block_outputs(app: &TestApp, id: &str) {
    std::fs::create_dir_all(outputs_of(app, id).parent().unwrap()).unwrap();
    std::fs::write(outputs_of(app, id), b"not a folder").unwrap();
}

fn unblock_outputs(app: &TestApp, id: &str) {
    std::fs::remove_file(outputs_of(app, id)).unwrap();
}

/// Submits a job whose id is known before it reaches the image model: the router answers at
/// once, the image model after `delay`.
async fn submit_slow_create(app: &TestApp, delay: Duration) -> String {
    create_answered_after(app, delay).await;
    app.submit(ALICE, json!({"prompt": "a fox"})).await
}

#[tokio::test]
async fn a_second_copy_of_a_running_jobs_message_waits_for_the_first_run_and_pays_nothing() {
    // Two workers: the copy may reach either, as a redelivery after a closed channel does.
    let app = spawn_app_with(Options::default(), |_| {}).await;
    let second = worker::Worker::build(app.settings.clone()).await.unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut second_stop = stopped.clone();
    tokio::spawn(second.run_until_stopped(async move {
        let _ = second_stop.wait_for(|stop| *stop).await;
    }));
    let id = submit_slow_create(&app, Duration::from_secs(2)).await;
    wait_for_image_calls(&app, 1).await;

    // While the first run waits for the image, its message is delivered again.
    let job = app
        .store
        .get(JobId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    let (connection, channel) = app.amqp_channel().await;
    channel
        .basic_publish(
            "".into(),
            app.topology.jobs_queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            &shared::queue::JobMessage::for_job(&job).encode(),
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;

    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    // The copy comes back from its delay queue after the first run ended, and stops there.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(image_calls(&app).await, 1, "the image model was paid once");
    let entries = app.ledger_entries().await;
    let create = entries_of(&entries, &id, "create");
    assert_eq!(create.len(), 1, "{entries:#?}");
    assert_eq!(create[0].billing, Billing::Billed, "{entries:#?}");
    let _ = stop.send(true);
}

#[tokio::test]
async fn a_paid_image_is_kept_through_an_object_store_outage_and_paid_for_once() {
    let app = spawn_app_with(Options::default(), |_| {}).await;
    let id = submit_slow_create(&app, Duration::from_secs(1)).await;
    wait_for_image_calls(&app, 1).await;
    block_outputs(&app, &id);

    // The answer arrives while the store refuses it; the worker holds it and tries again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = app.job(ALICE, &id).await;
    assert_eq!(waiting["status"], "running", "{waiting:#}");
    unblock_outputs(&app, &id);

    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(image_calls(&app).await, 1, "the image model was paid once");
    let entries = app.ledger_entries().await;
    assert_eq!(entries_of(&entries, &id, "create").len(), 1, "{entries:#?}");
    assert_eq!(entries_of(&entries, &id, "router").len(), 1);
    let image = app.get(ALICE, &format!("/v1/jobs/{id}/images/0")).await;
    assert_eq!(image.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_object_store_that_never_recovers_fails_the_job_after_the_attempt_limit_and_the_bill_stays_recorded()
 {
    let app = spawn_app_with(Options::default(), |s| {
        s.worker.max_infra_attempts = std::num::NonZeroU32::new(3).unwrap();
    })
    .await;
    let id = submit_slow_create(&app, Duration::from_millis(500)).await;
    wait_for_image_calls(&app, 1).await;
    block_outputs(&app, &id);

    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "processing_failed", "{job:#}");
    assert_eq!(image_calls(&app).await, 1, "never paid twice");
    let entries = app.ledger_entries().await;
    let create = entries_of(&entries, &id, "create");
    assert_eq!(
        create.len(),
        1,
        "the billed call is in the ledger: {entries:#?}"
    );
    assert_eq!(create[0].billing, Billing::Billed);
    assert!(create[0].cost_micros > 0);
    // Its message went to the dead-letter queue, for ops to replay once the store is fixed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.queue_depth(&app.topology.dead_letter_queue).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the message was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unblock_outputs(&app, &id);
}

#[tokio::test]
async fn redis_unreachable_for_ten_seconds_right_after_the_answer_is_waited_out_without_paying_again()
 {
    let app = spawn_app_with(
        Options {
            redis_proxy: true,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let id = submit_slow_create(&app, Duration::from_secs(1)).await;
    wait_for_image_calls(&app, 1).await;
    let proxy = app.redis_proxy.as_ref().unwrap();
    proxy.cut().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    proxy.restore();

    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(image_calls(&app).await, 1, "the image model was paid once");
    let entries = app.ledger_entries().await;
    assert_eq!(entries_of(&entries, &id, "create").len(), 1, "{entries:#?}");
    assert_eq!(entries_of(&entries, &id, "router").len(), 1);
}

/// An app whose worker is a separate process started with `failpoints`.
async fn app_with_worker_process(failpoints: &str) -> (TestApp, tokio::process::Child) {
    let app = spawn_api().await;
    let worker = app.worker_process(&[("PICTOR_FAILPOINTS", failpoints)]);
    (app, worker)
}

#[tokio::test]
async fn a_ledger_write_that_fails_after_the_answer_is_retried_without_calling_again() {
    let (app, mut worker) = app_with_worker_process("settle_step=fail(2)").await;
    let id = submit_slow_create(&app, Duration::ZERO).await;

    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(image_calls(&app).await, 1);
    let entries = app.ledger_entries().await;
    assert_eq!(entries_of(&entries, &id, "create").len(), 1, "{entries:#?}");
    assert_eq!(entries_of(&entries, &id, "router").len(), 1, "{entries:#?}");
    stop_gracefully(&mut worker).await;
}

#[tokio::test]
async fn a_final_write_that_fails_is_retried_without_calling_again() {
    let (app, mut worker) = app_with_worker_process("before_final_write=fail(3)").await;
    let id = submit_slow_create(&app, Duration::ZERO).await;

    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(
        image_calls(&app).await,
        1,
        "the final write's retries paid nothing"
    );
    assert_eq!(
        router_calls(&app).await,
        1,
        "nor did they ask the router again"
    );
    let entries = app.ledger_entries().await;
    assert_eq!(entries_of(&entries, &id, "create").len(), 1, "{entries:#?}");
    stop_gracefully(&mut worker).await;
}

/// Calls the router model (chat completions) received.
async fn router_calls(app: &TestApp) -> usize {
    app.openai
        .as_ref()
        .unwrap()
        .received("chat/completions")
        .await
        .len()
}

/// Waits until `agent`'s step of job `id` has its answer kept.
async fn wait_for_kept_step(app: &TestApp, id: &str, agent: &str) {
    let job_id = JobId::parse(id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !app
        .store
        .get(job_id)
        .await
        .unwrap()
        .unwrap()
        .steps
        .contains_key(agent)
    {
        assert!(
            Instant::now() < deadline,
            "the {agent} answer was never kept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// A job's last answer (the image model's) is kept by the job's final write itself, so a run
// can only stop between a kept answer and the job's end after the router's: that is where the
// two tests below stop theirs.
#[tokio::test]
async fn a_worker_sigkilled_right_after_its_answer_was_kept_leaves_a_job_another_finishes_without_paying()
 {
    let (app, mut killed) = app_with_worker_process("after_step_kept:router=hang").await;
    let id = submit_slow_create(&app, Duration::ZERO).await;
    // The router's answer and its ledger entry are durable, and the worker has gone no further.
    wait_for_kept_step(&app, &id, "router").await;
    killed.kill().await.unwrap();
    assert_eq!(
        image_calls(&app).await,
        0,
        "the worker stopped before the image call"
    );

    // The broker redelivers the unacked message to the next worker.
    let mut rescuer = app.worker_process(&[]);
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(
        router_calls(&app).await,
        1,
        "the kept answer was not paid again"
    );
    assert_eq!(image_calls(&app).await, 1);
    let entries = app.ledger_entries().await;
    assert_eq!(entries_of(&entries, &id, "router").len(), 1, "{entries:#?}");
    assert_eq!(entries_of(&entries, &id, "create").len(), 1, "{entries:#?}");
    assert!(
        entries.iter().all(|entry| entry.billing == Billing::Billed),
        "nothing was in doubt: {entries:#?}"
    );
    stop_gracefully(&mut rescuer).await;
}

#[tokio::test]
async fn a_worker_sigkilled_with_its_answer_in_hand_is_recorded_as_possibly_billed_and_shown_as_such()
 {
    let (app, mut killed) = app_with_worker_process("after_answer:create=hang").await;
    let id = submit_slow_create(&app, Duration::ZERO).await;
    // The answer reached the worker, which holds it and goes no further: SIGKILL it there.
    wait_for_image_calls(&app, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    killed.kill().await.unwrap();

    let mut rescuer = app.worker_process(&[]);
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    // The first answer died with its worker: nothing could keep it, so the step ran again.
    assert_eq!(image_calls(&app).await, 2);
    let entries = app.ledger_entries().await;
    let create = entries_of(&entries, &id, "create");
    assert_eq!(create.len(), 2, "{entries:#?}");
    let possibly: Vec<_> = create
        .iter()
        .filter(|entry| entry.billing == Billing::PossiblyBilled)
        .collect();
    assert_eq!(
        possibly.len(),
        1,
        "the lost call is possibly billed: {create:#?}"
    );
    assert!(
        possibly[0].cost_micros >= create[1].cost_micros.min(create[0].cost_micros),
        "an estimate is never below the bill: {create:#?}"
    );

    // The summary, the per-call CSV and the daily report show it apart.
    let month = shared::ledger::Month::of(chrono::Utc::now());
    let summary: Value = app
        .get(OPS, &format!("/v1/costs/summary?month={month}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(summary["possibly_billed_calls"], 1, "{summary:#}");
    assert_eq!(
        summary["possibly_billed_micros"].as_i64().unwrap(),
        possibly[0].cost_micros
    );
    let csv = app
        .get(
            OPS,
            &format!("/v1/costs/export.csv?month={month}&granularity=call"),
        )
        .await
        .text()
        .await
        .unwrap();
    assert!(csv.lines().next().unwrap().ends_with(",x_Billing"), "{csv}");
    assert_eq!(
        csv.lines()
            .filter(|line| line.ends_with(",possibly_billed"))
            .count(),
        1,
        "{csv}"
    );
    let report = daily_report_dry_run(&app, &[]).await;
    assert!(
        report.contains("Possibly billed: 1 call at an estimated"),
        "{report}"
    );
    stop_gracefully(&mut rescuer).await;
}

/// The daily report of today, printed by `pictor-scheduler run daily-report --dry-run`.
async fn daily_report_dry_run(app: &TestApp, extra: &[(&str, &str)]) -> String {
    let output = tokio::process::Command::new(tests::harness::workspace_binary("pictor-scheduler"))
        .args([
            "run",
            "daily-report",
            "--date",
            &chrono::Utc::now().date_naive().to_string(),
            "--dry-run",
        ])
        .envs(app.worker_env())
        .envs(extra.iter().copied())
        .env("PICTOR_SCHEDULER_METRICS_ADDR", "")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_watchdog_requeues_a_job_whose_worker_hangs_after_the_call_and_nothing_is_paid_twice() {
    // Jobs are stuck 2 s after their last call started; watchdogs look every second.
    let deadline = [
        ("PICTOR_JOB_DEADLINE_SECS", "2"),
        ("PICTOR_WATCHDOG_INTERVAL_SECS", "1"),
    ];
    let app = spawn_api().await;
    let mut hung = app.worker_process(
        &[
            &deadline[..],
            &[("PICTOR_FAILPOINTS", "after_step_kept:router=hang")],
        ]
        .concat(),
    );
    let id = submit_slow_create(&app, Duration::ZERO).await;
    wait_for_kept_step(&app, &id, "router").await;
    let mut watcher = app.worker_process(&deadline);
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert!(
        job["notices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|notice| notice["code"] == "requeued"),
        "{job:#}"
    );
    assert_eq!(
        router_calls(&app).await,
        1,
        "the requeued run used the kept answer"
    );
    assert_eq!(image_calls(&app).await, 1);
    let entries = app.ledger_entries().await;
    assert_eq!(entries_of(&entries, &id, "router").len(), 1, "{entries:#?}");
    assert_eq!(entries_of(&entries, &id, "create").len(), 1, "{entries:#?}");
    hung.kill().await.unwrap();
    stop_gracefully(&mut watcher).await;
}

#[tokio::test]
async fn a_call_cut_by_our_timeout_is_recorded_as_possibly_billed_and_the_retry_as_billed() {
    let app = spawn_app_with(Options::default(), |s| {
        s.openai.timeout = Duration::from_secs(1);
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a fox", None).await;
    // The first image answer comes too late; the next one at once.
    Mock::given(method("POST"))
        .and(path("/v1/images/generations"))
        .and(header_exists("authorization"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .up_to_n_times(1)
        .mount(&openai.server)
        .await;
    openai.images_generate_ok().await;

    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let entries = app.ledger_entries().await;
    let create = entries_of(&entries, &id, "create");
    let billing: Vec<Billing> = create.iter().map(|entry| entry.billing).collect();
    assert_eq!(
        billing,
        [Billing::PossiblyBilled, Billing::Billed],
        "{create:#?}"
    );
}

#[tokio::test]
async fn a_job_whose_record_redis_lost_after_its_202_is_recreated_from_its_message() {
    let app = spawn_api().await;
    create_answered_after(&app, Duration::ZERO).await;
    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    // As if the accept had failed and the pending TTL had run out, or a failover had lost it.
    let mut connection = app.store.redis().connection();
    let _: i64 = redis::cmd("DEL")
        .arg(app.store.keys().job(JobId::parse(&id).unwrap()))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(
        app.get(ALICE, &format!("/v1/jobs/{id}")).await.status(),
        StatusCode::NOT_FOUND
    );

    let mut worker = app.worker_process(&[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.get(ALICE, &format!("/v1/jobs/{id}")).await.status() == StatusCode::NOT_FOUND {
        assert!(Instant::now() < deadline, "the job was never recreated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["prompt"], "a fox");
    let listed: Value = app.get(ALICE, "/v1/jobs").await.json().await.unwrap();
    assert!(
        listed["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|job| job["id"] == id.as_str()),
        "{listed:#}"
    );
    stop_gracefully(&mut worker).await;
}

/// `image` as the JSON form of an attached image.
fn image_json(bytes: &[u8]) -> Value {
    use base64::Engine;
    json!({
        "data": base64::engine::general_purpose::STANDARD.encode(bytes),
        "mime_type": "image/png",
    })
}

/// Submits "upscale this" with a 1536x1024 image (upscaled to 3232x2160).
async fn submit_upscale(app: &TestApp) -> String {
    app.submit(
        ALICE,
        json!({"prompt": "upscale this", "image": image_json(&tests::mocks::png(1536, 1024, 7))}),
    )
    .await
}

#[tokio::test]
async fn concurrent_high_quality_upscales_under_a_blocking_budget_never_spend_past_it() {
    let high = |s: &mut shared::config::Settings| {
        s.openai.image_quality = "high".to_string();
    };
    // What one upscale job costs, measured on an app that only alerts.
    let probe = spawn_app_with(Options::default(), |s| {
        high(s);
        s.budget.policy = shared::config::BudgetPolicyKind::Alert;
    })
    .await;
    let openai = probe.openai.as_ref().unwrap();
    openai
        .router_answers("upscale", 0.95, "Upscale this image", None)
        .await;
    openai.images_edit_ok().await;
    let id = submit_upscale(&probe).await;
    assert_eq!(
        probe.wait_until_terminal(ALICE, &id).await["status"],
        "succeeded"
    );
    let one_job: i64 = probe
        .ledger_entries()
        .await
        .iter()
        .map(|entry| entry.cost_micros)
        .sum();
    assert!(
        one_job > 200_000,
        "a 4K high-quality upscale is dear: {one_job}"
    );

    // Room for two and a half jobs, six asked for at once.
    let budget = one_job * 5 / 2;
    let app = spawn_app_with(Options::default(), |s| {
        high(s);
        s.budget.monthly_micros = budget;
        s.budget.policy = shared::config::BudgetPolicyKind::Block;
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("upscale", 0.95, "Upscale this image", None)
        .await;
    openai.images_edit_ok().await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(submit_upscale(&app).await);
    }
    let mut outcomes = Vec::new();
    for id in &ids {
        let job = app.wait_until_terminal(ALICE, id).await;
        outcomes.push((
            job["status"].as_str().unwrap().to_string(),
            job["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ));
    }
    let spent: i64 = app
        .ledger_entries()
        .await
        .iter()
        .map(|entry| entry.cost_micros)
        .sum();
    assert!(
        spent <= budget,
        "spent {spent} of a {budget} budget: {outcomes:?}"
    );
    let succeeded = outcomes
        .iter()
        .filter(|(status, _)| status == "succeeded")
        .count();
    assert!((1..=2).contains(&succeeded), "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .any(|(status, code)| status == "failed" && code == "budget_exhausted"),
        "{outcomes:?}"
    );
}

#[tokio::test]
async fn an_idempotent_retry_during_a_slow_upload_never_creates_a_second_job() {
    let app = spawn_app_with(
        Options {
            worker: false,
            mock_providers: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    // An api whose object store takes 5 s to take an input image.
    let api = app
        .spawn_process(
            "api",
            &[("PICTOR_FAILPOINTS", "store_input=sleep(5000)".into())],
        )
        .await;
    let body = json!({"prompt": "make the sky purple", "image": image_json(&tests::mocks::png(64, 64, 1))});
    let post = |body: Value| {
        app.client
            .post(format!("{}/v1/jobs", api.base))
            .bearer_auth(ALICE)
            .header("Idempotency-Key", "order-42")
            .json(&body)
            .send()
    };
    let first = tokio::spawn(post(body.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // While the first is uploading: the same request waits, then is told to come back.
    let retry = post(body.clone()).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    assert_eq!(retry.headers()["retry-after"], "1");
    let error: Value = retry.json().await.unwrap();
    assert_eq!(error["error"]["code"], "idempotency_key_in_use");
    // Another request under the same key is refused outright.
    let other = post(json!({"prompt": "a different request"}))
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let created: Value = first.json().await.unwrap();
    let again = post(body).await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let replayed: Value = again.json().await.unwrap();
    assert_eq!(replayed["id"], created["id"], "the same job, not a second");
    let listed: Value = app
        .client
        .get(format!("{}/v1/jobs", api.base))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1, "{listed:#}");
}

/// `pictor admin costs reconcile --month <this month>` with an admin key.
async fn reconcile(app: &TestApp) -> std::process::Output {
    tokio::process::Command::new(tests::harness::workspace_binary("pictor"))
        .args([
            "admin",
            "costs",
            "reconcile",
            "--month",
            &shared::ledger::Month::of(chrono::Utc::now()).to_string(),
        ])
        .envs(app.worker_env())
        .env("OPENAI_ADMIN_KEY", "sk-admin-test-0123456789")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn reconciliation_flags_a_day_whose_openai_bill_differs_from_the_ledger() {
    let app = spawn_app_with(Options::default(), |_| {}).await;
    create_answered_after(&app, Duration::ZERO).await;
    for _ in 0..2 {
        let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
        assert_eq!(
            app.wait_until_terminal(ALICE, &id).await["status"],
            "succeeded"
        );
    }
    let entries = app.ledger_entries().await;
    let spent = |model: &str| -> f64 {
        entries
            .iter()
            .filter(|entry| entry.usage.model == model)
            .map(|entry| entry.cost_micros)
            .sum::<i64>() as f64
            / 1e6
    };
    let (router, image) = (
        app.settings.openai.router_model.clone(),
        app.settings.openai.image_model.clone(),
    );
    let today = chrono::Utc::now().date_naive();
    let openai = app.openai.as_ref().unwrap();
    // OpenAI's line items carry dated model names; the image line bills half as much again.
    openai
        .organization_costs(vec![
            (today, format!("{router}-2025-04-14, input"), spent(&router)),
            (today, format!("{image} image, output"), spent(&image) * 1.5),
        ])
        .await;

    let output = reconcile(&app).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("DIFFERS"), "{stdout}");
    assert!(
        stdout.contains("1 of 1 day(s) with spend differ"),
        "{stdout}"
    );
    assert!(stdout.contains(&image), "{stdout}");
    assert!(
        stdout.contains("no costs API for the Gemini API"),
        "{stdout}"
    );
    let report =
        daily_report_dry_run(&app, &[("OPENAI_ADMIN_KEY", "sk-admin-test-0123456789")]).await;
    assert!(report.contains("DIFFERS by more than 2%"), "{report}");

    // The same day billed as the ledger says: nothing to flag.
    openai.server.reset().await;
    openai
        .organization_costs(vec![
            (today, format!("{router}, input"), spent(&router)),
            (
                today,
                format!("{image}-2026-04-21 image, output"),
                spent(&image),
            ),
        ])
        .await;
    let output = reconcile(&app).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("0 of 1 day(s) with spend differ"),
        "{stdout}"
    );

    // A key without the admin scope is named as the problem.
    openai.server.reset().await;
    openai.organization_costs_refuses().await;
    let output = reconcile(&app).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("refused the admin key (HTTP 403)"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("sk-admin-test"),
        "the key is never printed: {stderr}"
    );
}

#[tokio::test]
async fn a_redis_blip_between_the_brokers_confirm_and_the_accept_never_turns_a_202_into_a_404() {
    let app = spawn_app_with(Options::default(), |_| {}).await;
    create_answered_after(&app, Duration::ZERO).await;
    let api = app
        .spawn_process(
            "api",
            &[("PICTOR_FAILPOINTS", "mark_accepted=fail(1)".into())],
        )
        .await;
    let id = app
        .submit_at(&api.base, ALICE, json!({"prompt": "a fox"}))
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let stored = app
        .store
        .get(JobId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored.accepted,
        "the worker accepted what the api could not"
    );
}
