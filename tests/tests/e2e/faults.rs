//! Faults under load: RabbitMQ and Redis going away and coming back, and a worker killed with
//! SIGKILL, while jobs are in flight. Every accepted job must end in a terminal state, exactly
//! once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use shared::store::JobEvent;
use tests::harness::{ALICE, Options, TestApp, spawn_app_with};
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
