//! The dead-letter queue for operators (`cli::dlq`, `pictor admin dlq`): a listing takes
//! nothing out; a replay puts failed jobs back in line, drops dead letters that need no retry and
//! leaves the rest for a person.

use std::time::{Duration, Instant};

use cli::dlq::{Discarded, ReplayReport};
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicRejectOptions};
use serde_json::json;
use shared::domain::{JobId, JobStatus, UserError};
use shared::queue::JobMessage;
use shared::store::{Guard, JobUpdate, UpdateOutcome};
use tests::harness::{ALICE, Options, TestApp, spawn_app_with, spawn_simulated, workspace_binary};

/// An app without an in-process worker, running the simulated providers.
async fn app_without_worker() -> TestApp {
    spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await
}

/// The app's image store, where a replay looks for a failed job's input.
fn images(app: &TestApp) -> shared::images::ImageStore {
    shared::images::ImageStore::open(&app.settings.images.store).unwrap()
}

/// Polls until `queue` holds exactly `depth` ready messages, failing after 20 s.
async fn wait_for_depth(app: &TestApp, queue: &str, depth: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = app.queue_depth(queue).await;
        if now == depth {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue} holds {now} messages, expected {depth}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `body` straight into `queue` (by the default exchange), declaring the topology
/// first so that nothing is dropped for want of a queue.
async fn publish_raw(app: &TestApp, queue: &str, body: &[u8]) {
    let (connection, channel) = app.amqp_channel().await;
    app.topology.declare(&channel).await.unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
}

/// Takes the next `count` messages off the work queue and rejects them, so the broker
/// dead-letters them exactly as it does a worker's rejection.
async fn dead_letter_from_jobs_queue(app: &TestApp, count: usize) {
    let (connection, channel) = app.amqp_channel().await;
    for _ in 0..count {
        let message = channel
            .basic_get(
                app.topology.jobs_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap()
            .expect("a job message waits in the work queue");
        message
            .delivery
            .reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
    let _ = connection.close(200, "done".into()).await;
}

/// Ends a job as `failed`, as the pipeline does at the delivery limit.
async fn fail_job(app: &TestApp, id: JobId) {
    let update = JobUpdate {
        status: Some(JobStatus::Failed),
        error: Some(UserError {
            code: "processing_failed".to_string(),
            message: "We could not process this job after several tries.".to_string(),
        }),
        error_detail: Some("delivered 6 times; giving up at the delivery limit".to_string()),
        step_attempts: Some(3),
        ..JobUpdate::default()
    };
    let outcome = app.store.update(id, Guard::Active, &update).await.unwrap();
    assert!(
        matches!(outcome, UpdateOutcome::Applied { .. }),
        "{outcome:?}"
    );
}

async fn submit(app: &TestApp, prompt: &str) -> JobId {
    let id = app.submit(ALICE, json!({ "prompt": prompt })).await;
    JobId::parse(&id).unwrap()
}

#[tokio::test]
async fn listing_the_dead_letter_queue_shows_its_messages_without_taking_them_out() {
    let app = spawn_simulated().await;
    // The worker rejects what it cannot read, and the broker dead-letters it.
    let junk = [
        r#"{"type":"mystery","v":99}"#.to_string(),
        "not json at all".to_string(),
    ];
    for body in &junk {
        publish_raw(&app, &app.topology.jobs_queue, body.as_bytes()).await;
    }
    wait_for_depth(&app, &app.topology.dead_letter_queue, 2).await;

    for _ in 0..2 {
        let letters = cli::dlq::list(&app.settings.amqp, 10).await.unwrap();
        assert_eq!(letters.len(), 2, "{letters:#?}");
        let mut bodies: Vec<&str> = letters.iter().map(|l| l.body.as_str()).collect();
        bodies.sort_unstable();
        let mut expected: Vec<&str> = junk.iter().map(String::as_str).collect();
        expected.sort_unstable();
        assert_eq!(bodies, expected);
        for letter in &letters {
            assert_eq!(letter.reason, "rejected");
            assert_eq!(letter.queue, app.topology.jobs_queue);
            assert_eq!(letter.deaths, 1);
            assert_eq!(letter.job_id, None);
        }
    }
    let first = cli::dlq::list(&app.settings.amqp, 1).await.unwrap();
    assert_eq!(first.len(), 1, "the limit caps the listing");
    wait_for_depth(&app, &app.topology.dead_letter_queue, 2).await;
}

#[tokio::test]
async fn a_replayed_failed_job_runs_again_and_succeeds() {
    let app = app_without_worker().await;
    let id = submit(&app, "a lighthouse at dawn").await;
    // The job's message dies and the job ends failed, as after too many deliveries.
    dead_letter_from_jobs_queue(&app, 1).await;
    wait_for_depth(&app, &app.topology.dead_letter_queue, 1).await;
    fail_job(&app, id).await;

    let worker = worker::Worker::build(app.settings.clone())
        .await
        .expect("worker builds");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker_task = tokio::spawn(worker.run_until_stopped(async move {
        let _ = stopped.await;
    }));

    let report = cli::dlq::replay(&app.settings.amqp, &app.store, &images(&app), 10, None)
        .await
        .unwrap();
    assert_eq!(
        report,
        ReplayReport {
            replayed: vec![id],
            ..ReplayReport::default()
        }
    );
    let job = app.wait_until_terminal(ALICE, &id.to_string()).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let record = app.store.get(id).await.unwrap().unwrap();
    assert_eq!(record.error, None);
    assert_eq!(record.error_detail, None);
    assert!(
        record.notices.iter().any(|n| n.code == "replayed"),
        "{:?}",
        record.notices
    );
    wait_for_depth(&app, &app.topology.dead_letter_queue, 0).await;
    wait_for_depth(&app, &app.topology.jobs_queue, 0).await;

    let _ = stop.send(());
    let _ = worker_task.await;
}

#[tokio::test]
async fn a_replay_keeps_what_needs_a_person_and_drops_what_needs_no_retry() {
    let app = app_without_worker().await;
    let failed = submit(&app, "failed").await;
    let succeeded = submit(&app, "succeeded meanwhile").await;
    let active = submit(&app, "still queued").await;
    dead_letter_from_jobs_queue(&app, 3).await;
    fail_job(&app, failed).await;
    let done = app
        .store
        .update(
            succeeded,
            Guard::Active,
            &JobUpdate::status(JobStatus::Succeeded),
        )
        .await
        .unwrap();
    assert!(matches!(done, UpdateOutcome::Applied { .. }));
    let gone = JobId::new();
    let dead = &app.topology.dead_letter_queue;
    publish_raw(&app, dead, &JobMessage::run(gone).encode()).await;
    publish_raw(&app, dead, b"\xff not a job message").await;
    wait_for_depth(&app, dead, 5).await;

    // Only the job asked for; everything else stays where it is.
    let only = cli::dlq::replay(
        &app.settings.amqp,
        &app.store,
        &images(&app),
        10,
        Some(failed),
    )
    .await
    .unwrap();
    assert_eq!(
        only,
        ReplayReport {
            replayed: vec![failed],
            undecodable: 1,
            left: 3,
            ..ReplayReport::default()
        }
    );
    wait_for_depth(&app, dead, 4).await;
    wait_for_depth(&app, &app.topology.jobs_queue, 1).await;
    let record = app.store.get(failed).await.unwrap().unwrap();
    assert_eq!(record.status, JobStatus::Queued);
    assert_eq!(record.error, None);
    assert_eq!(record.step_attempts, 0);

    let mut rest = cli::dlq::replay(&app.settings.amqp, &app.store, &images(&app), 10, None)
        .await
        .unwrap();
    rest.discarded.sort_by_key(|d| d.job_id.to_string());
    let mut discarded = vec![
        Discarded {
            job_id: succeeded,
            status: Some(JobStatus::Succeeded),
        },
        Discarded {
            job_id: gone,
            status: None,
        },
    ];
    discarded.sort_by_key(|d| d.job_id.to_string());
    assert_eq!(
        rest,
        ReplayReport {
            discarded,
            active: vec![active],
            undecodable: 1,
            ..ReplayReport::default()
        }
    );
    assert_eq!(rest.skipped(), 2);
    wait_for_depth(&app, dead, 2).await;
    wait_for_depth(&app, &app.topology.jobs_queue, 1).await;
}

#[tokio::test]
async fn the_pictor_cli_lists_and_replays_dead_letters() {
    let app = app_without_worker().await;
    let id = submit(&app, "a fox in the snow").await;
    dead_letter_from_jobs_queue(&app, 1).await;
    wait_for_depth(&app, &app.topology.dead_letter_queue, 1).await;
    fail_job(&app, id).await;

    let pictor = |args: &[&str]| {
        tokio::process::Command::new(workspace_binary("pictor"))
            .args(args)
            .envs(app.worker_env())
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output()
    };
    let listed = pictor(&["admin", "dlq", "list"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let line = stdout
        .lines()
        .find(|line| line.contains(&id.to_string()))
        .unwrap_or_else(|| panic!("the listing names the job: {stdout}"));
    assert!(line.contains("reason=rejected"), "{line}");
    assert!(line.contains(&app.topology.jobs_queue), "{line}");

    let replayed = pictor(&["admin", "dlq", "replay", "--job", &id.to_string()])
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&replayed.stdout);
    assert!(
        replayed.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    assert!(stdout.contains("replayed 1 job"), "{stdout}");
    assert!(stdout.contains(&id.to_string()), "{stdout}");
    let record = app.store.get(id).await.unwrap().unwrap();
    assert_eq!(record.status, JobStatus::Queued);
    wait_for_depth(&app, &app.topology.jobs_queue, 1).await;

    let empty = pictor(&["admin", "dlq", "list"]).await.unwrap();
    assert!(
        String::from_utf8_lossy(&empty.stdout).contains("the dead-letter queue is empty"),
        "{}",
        String::from_utf8_lossy(&empty.stdout)
    );

    let bad = pictor(&["admin", "dlq", "replay", "--job", "nope"])
        .await
        .unwrap();
    assert!(!bad.status.success(), "a malformed job id is refused");
}
