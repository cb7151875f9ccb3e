//! Faults under load: RabbitMQ and Redis going away and coming back, and a worker killed with
//! SIGKILL, while jobs are in flight. Every accepted job must end in a terminal state, exactly
//! once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use shared::store::JobEvent;
use tests::harness::{ALICE, BOB, Options, TestApp, spawn_app_with};
use tests::proxy::CuttableProxy;

/// Counts, per job, the terminal status changes published on the events channel.
struct TerminalCounter {
    counts: Arc<Mutex<HashMap<String, u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TerminalCounter {
    async fn start(app: &TestApp) -> Self {
        let mut pubsub = app.store.redis().client().get_async_pubsub().await.unwrap();
        pubsub
            .subscribe(app.store.keys().events_channel())
            .await
            .unwrap();
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let task = tokio::spawn({
            let counts = counts.clone();
            async move {
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let payload: String = message.get_payload().unwrap();
                    let event: JobEvent = serde_json::from_str(&payload).unwrap();
                    if event.status.is_terminal() {
                        *counts
                            .lock()
                            .unwrap()
                            .entry(event.job_id.to_string())
                            .or_insert(0) += 1;
                    }
                }
            }
        });
        Self { counts, task }
    }

    fn of(&self, id: &str) -> u32 {
        self.counts.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

impl Drop for TerminalCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn submit_many(app: &TestApp, count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for index in 0..count {
        ids.push(
            app.submit(
                ALICE,
                json!({"prompt": format!("load test picture {index}")}),
            )
            .await,
        );
    }
    ids
}

async fn assert_all_succeeded_once(app: &TestApp, counter: &TerminalCounter, ids: &[String]) {
    for id in ids {
        let job = app.wait_until_terminal(ALICE, id).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
        assert_eq!(job["result"]["images"].as_array().unwrap().len(), 1);
    }
    // Let the last events arrive, then check nothing ended twice.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for id in ids {
        assert_eq!(
            counter.of(id),
            1,
            "job {id} reached a terminal state exactly once"
        );
    }
}

/// An app on the simulated providers with 20 jobs under way (the first already done), and a
/// counter of terminal events started before them.
async fn loaded_app(options: Options) -> (TestApp, TerminalCounter, Vec<String>) {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            ..options
        },
        |s| {
            s.simulated.delay = Duration::from_millis(150);
            s.worker.concurrency = std::num::NonZeroUsize::new(4).unwrap();
        },
    )
    .await;
    let counter = TerminalCounter::start(&app).await;
    let ids = submit_many(&app, 20).await;
    app.wait_for(ALICE, &ids[0], |job| job["status"] == "succeeded")
        .await;
    (app, counter, ids)
}

#[tokio::test]
async fn a_rabbitmq_outage_under_load_loses_no_job_and_finishes_none_twice() {
    let (app, counter, ids) = loaded_app(Options {
        amqp_proxy: true,
        ..Options::default()
    })
    .await;

    let proxy = app.amqp_proxy.as_ref().unwrap();
    proxy.cut().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();

    assert_all_succeeded_once(&app, &counter, &ids).await;
}

/// Two "nodes" of the broker (two cuttable proxies to the one RabbitMQ): every process is given
/// both, and when the node it uses goes away it moves to the other, first one way and then the
/// other. The api answers only `202` or `503` with `Retry-After` meanwhile, and every accepted
/// job ends `succeeded`, once.
#[tokio::test]
async fn given_two_broker_nodes_the_fleet_moves_to_the_other_when_one_goes_and_loses_nothing() {
    use secrecy::ExposeSecret;
    let real = url::Url::parse(tests::harness::test_settings().amqp.url.expose_secret()).unwrap();
    let upstream: std::net::SocketAddr = format!(
        "{}:{}",
        real.host_str().unwrap_or("127.0.0.1"),
        real.port().unwrap_or(5672)
    )
    .parse()
    .unwrap();
    let nodes = [
        CuttableProxy::start(upstream).await,
        CuttableProxy::start(upstream).await,
    ];
    let list = nodes
        .iter()
        .map(|node| format!("amqp://guest:guest@{}{}", node.addr, real.path()))
        .collect::<Vec<_>>()
        .join(",");
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            ..Options::default()
        },
        |s| {
            s.simulated.delay = Duration::from_millis(150);
            s.worker.concurrency = std::num::NonZeroUsize::new(4).unwrap();
            s.amqp.url = list.into();
        },
    )
    .await;
    let counter = TerminalCounter::start(&app).await;
    let mut ids = submit_many(&app, 10).await;
    for (lost, _) in [(0, 1), (1, 0)] {
        nodes[lost].cut().await;
        let mut accepted = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while accepted < 10 {
            let response = app
                .post_job(ALICE, json!({"prompt": format!("after node {lost} went")}))
                .await;
            match response.status() {
                reqwest::StatusCode::ACCEPTED => {
                    let body: serde_json::Value = response.json().await.unwrap();
                    ids.push(body["id"].as_str().unwrap().to_string());
                    accepted += 1;
                }
                reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                    assert!(response.headers().contains_key("retry-after"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("answered {other} while a node was down"),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the api did not move to the other node"
            );
        }
        nodes[lost].restore();
    }
    assert_all_succeeded_once(&app, &counter, &ids).await;
}

#[tokio::test]
async fn a_redis_outage_under_load_loses_no_job_and_finishes_none_twice() {
    let (app, counter, ids) = loaded_app(Options {
        redis_proxy: true,
        ..Options::default()
    })
    .await;

    let proxy = app.redis_proxy.as_ref().unwrap();
    proxy.cut().await;
    // While Redis is away the api refuses new work rather than accepting what it cannot track.
    let refused = app
        .post_job(ALICE, json!({"prompt": "during the outage"}))
        .await;
    assert_eq!(refused.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();

    assert_all_succeeded_once(&app, &counter, &ids).await;
}

#[tokio::test]
async fn a_worker_killed_under_load_loses_no_job_and_finishes_none_twice() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let counter = TerminalCounter::start(&app).await;
    let spawn_worker = |delay: &str| {
        app.worker_process(&[
            ("PICTOR_SIMULATED_DELAY_MS", delay),
            ("PICTOR_WORKER_CONCURRENCY", "4"),
        ])
    };
    let mut doomed = spawn_worker("300");
    let ids = submit_many(&app, 12).await;
    app.wait_for(ALICE, &ids[0], |job| job["status"] == "succeeded")
        .await;
    doomed.kill().await.unwrap();

    let _rescuer = spawn_worker("50");
    assert_all_succeeded_once(&app, &counter, &ids).await;
}

/// Posts a job for `key` with an Idempotency-Key.
async fn post_keyed(app: &TestApp, key: &str, idempotency_key: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/jobs"))
        .bearer_auth(key)
        .header("idempotency-key", idempotency_key)
        .json(&json!({"prompt": "a kite over the dunes"}))
        .send()
        .await
        .expect("request sent")
}

/// The OpenAI mock's router and image calls so far, once they have stopped changing for a
/// second (a job the worker would wrongly run shows up within that).
async fn settled_calls(app: &TestApp) -> (usize, usize) {
    let openai = app.openai.as_ref().unwrap();
    let count = || async {
        (
            openai.received("chat/completions").await.len(),
            openai.received("images/generations").await.len(),
        )
    };
    let mut last = count().await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = count().await;
        if now == last {
            return now;
        }
        last = now;
    }
}

/// An app whose api reaches RabbitMQ through a proxy and gives up on a confirm after 3 s (time
/// enough for a worker already running to start a job on a loaded machine), with no worker.
async fn app_behind_a_mutable_broker() -> TestApp {
    spawn_app_with(
        Options {
            amqp_proxy: true,
            worker: false,
            ..Options::default()
        },
        |s| s.api.publish_timeout = Duration::from_secs(3),
    )
    .await
}

/// [`app_behind_a_mutable_broker`] with the OpenAI mock answering and the api's publisher
/// connected (by a first job of Bob's, whose id is returned).
async fn app_with_a_mutable_broker() -> (TestApp, String) {
    let app = app_behind_a_mutable_broker().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a kite", None).await;
    openai.images_generate_ok().await;
    let first = app.submit(BOB, json!({"prompt": "a first kite"})).await;
    (app, first)
}

/// The broker takes a job's message but its confirm never reaches the api (the connection
/// goes first). The api answers `503` ("nothing was created"), so the job is withdrawn: the
/// message the broker kept is dropped by the worker instead of recreating the job from it, and
/// the client's retry with the same Idempotency-Key is the one job that runs and is paid for.
#[tokio::test]
async fn a_job_whose_confirm_was_lost_is_withdrawn_so_its_503_holds_and_only_its_retry_is_paid() {
    let (app, first) = app_with_a_mutable_broker().await;
    let proxy = app.amqp_proxy.as_ref().unwrap();

    proxy.mute();
    let refused = post_keyed(&app, ALICE, "kite-1").await;
    assert_eq!(refused.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    // The broker has the message all the same, beside Bob's.
    assert_eq!(app.queue_depth(&app.topology.jobs_queue).await, 2);
    proxy.cut().await;
    proxy.unmute();
    proxy.restore();

    let retried = post_keyed(&app, ALICE, "kite-1").await;
    assert_eq!(retried.status(), reqwest::StatusCode::ACCEPTED);
    let retried: serde_json::Value = retried.json().await.unwrap();
    let retried = retried["id"].as_str().unwrap().to_string();

    let _worker = app.worker_process(&[]);
    for (key, id) in [(BOB, &first), (ALICE, &retried)] {
        let job = app.wait_until_terminal(key, id).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.queue_depth(&app.topology.jobs_queue).await > 0 {
        assert!(std::time::Instant::now() < deadline, "the queue drains");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two jobs ran, each with one router call and one image call; the withdrawn one did not.
    assert_eq!(settled_calls(&app).await, (2, 2));
    let listed: serde_json::Value = app.get(ALICE, "/v1/jobs").await.json().await.unwrap();
    let listed: Vec<&str> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [retried.as_str()]);
    let paid: std::collections::HashSet<String> = app
        .ledger_entries()
        .await
        .iter()
        .map(|entry| entry.job_id.to_string())
        .collect();
    assert_eq!(paid, [first, retried].into_iter().collect());
}

/// The broker delivers a job to a worker, which starts it, while the confirm is still on its
/// way back to the api and is then lost. The worker's start proves the broker had the job, so
/// the api answers `202` after all, and the job runs once.
#[tokio::test]
async fn a_job_a_worker_started_before_its_confirm_was_lost_is_accepted_after_all() {
    let (app, first) = app_with_a_mutable_broker().await;
    let proxy = app.amqp_proxy.as_ref().unwrap();
    let _worker = app.worker_process(&[]);
    app.wait_until_terminal(BOB, &first).await;

    proxy.mute();
    let accepted = post_keyed(&app, ALICE, "kite-2").await;
    assert_eq!(accepted.status(), reqwest::StatusCode::ACCEPTED);
    let accepted: serde_json::Value = accepted.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap();
    proxy.cut().await;
    proxy.unmute();
    proxy.restore();

    let job = app.wait_until_terminal(ALICE, id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(settled_calls(&app).await, (2, 2));
    // The same key answers the same job.
    let replayed = post_keyed(&app, ALICE, "kite-2").await;
    assert_eq!(replayed.status(), reqwest::StatusCode::ACCEPTED);
    let replayed: serde_json::Value = replayed.json().await.unwrap();
    assert_eq!(replayed["id"], id);
}

/// A question's answer whose resumed job the broker delivers while its confirm is lost: the
/// worker that started the job proves the broker had it, so the answer stands (`202`, not a
/// `503` for a job that is running) and the job runs once.
#[tokio::test]
async fn an_answer_whose_confirm_was_lost_stands_once_a_worker_has_started_the_job() {
    let app = app_behind_a_mutable_broker().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("unclear", 0.9, "", Some("New picture or an edit?"))
        .await;
    openai.images_generate_ok().await;
    let _worker = app.worker_process(&[]);
    let id = app.submit(ALICE, json!({"prompt": "sunset thing"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "needs_clarification", "{job:#}");

    let proxy = app.amqp_proxy.as_ref().unwrap();
    proxy.mute();
    let answered = app
        .client
        .post(app.url(&format!("/v1/jobs/{id}/clarify")))
        .bearer_auth(ALICE)
        .json(&json!({"intent": "create", "prompt": "a sunset over the sea"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), reqwest::StatusCode::ACCEPTED);
    proxy.cut().await;
    proxy.unmute();
    proxy.restore();

    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(settled_calls(&app).await, (1, 1));
}

/// Deletes job `id`'s record, as Redis losing it would.
async fn lose_record(app: &TestApp, id: &str) {
    let key = app
        .store
        .keys()
        .job(shared::domain::JobId::parse(id).unwrap());
    let deleted: i64 = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut app.store.redis().connection())
        .await
        .unwrap();
    assert_eq!(deleted, 1);
}

/// Waits for the first call `arrivals` records.
async fn first_arrival(arrivals: &tests::mocks::Arrivals) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while arrivals.times().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the call goes out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls job `id` until it has succeeded, through the `404`s of a record Redis lost.
async fn succeeded_after_loss(app: &TestApp, id: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let response = app.get(ALICE, &format!("/v1/jobs/{id}")).await;
        if response.status() == reqwest::StatusCode::OK {
            let job: serde_json::Value = response.json().await.unwrap();
            if job["status"] == "succeeded" {
                return job;
            }
            assert!(
                !matches!(job["status"].as_str(), Some("failed" | "canceled")),
                "{job:#}"
            );
        }
        assert!(std::time::Instant::now() < deadline, "the job comes back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Redis loses a running job's record (a restart without persistence, a failover that dropped
/// writes) while its image call is in flight. Nothing deletes a started job, so this is no
/// cancel: the run holds the job's end, so the job is written again from its message with it
/// and ends `succeeded`, nothing paid twice, the image call's cost on it.
#[tokio::test]
async fn a_job_whose_record_redis_lost_before_its_end_is_written_again_with_it() {
    let app = spawn_app_with(Options::default(), |_| {}).await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a kite", None).await;
    let arrivals = openai
        .images_generate_ok_after(Duration::from_millis(1500))
        .await;
    let id = app.submit(ALICE, json!({"prompt": "a kite"})).await;
    first_arrival(&arrivals).await;
    lose_record(&app, &id).await;

    let job = succeeded_after_loss(&app, &id).await;
    assert_eq!(job["result"]["images"].as_array().unwrap().len(), 1);
    assert_eq!(settled_calls(&app).await, (1, 1));
    let image_cost: i64 = app
        .ledger_entries()
        .await
        .iter()
        .filter(|entry| entry.usage.agent == "create")
        .map(|entry| entry.cost_micros)
        .sum();
    assert!(image_cost > 0);
    assert_eq!(
        job["cost_usd"].as_f64(),
        Some(shared::costs::micros_to_dollars(image_cost)),
        "{job:#}"
    );
}

/// The same loss between the router's answer and the image call: the answer Redis lost with
/// the record is gone, so the job runs again from its message (the router is asked again) and
/// ends `succeeded`, not a `404` for ever.
#[tokio::test]
async fn a_job_whose_record_redis_lost_mid_run_runs_again_from_its_message_and_succeeds() {
    let app = spawn_app_with(Options::default(), |_| {}).await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers_after(Duration::from_millis(1500), "create", 0.9, "a kite", None)
        .await;
    openai.images_generate_ok().await;
    let id = app.submit(ALICE, json!({"prompt": "a kite"})).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while openai.received("chat/completions").await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the router is asked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lose_record(&app, &id).await;

    let job = succeeded_after_loss(&app, &id).await;
    assert_eq!(job["result"]["images"].as_array().unwrap().len(), 1);
    assert_eq!(settled_calls(&app).await, (2, 1));
}
