//! Nothing lost, nothing silent: dependency outages answer 503 with Retry-After and leave no
//! job behind; a worker killed mid-job loses nothing; a poison message is dead-lettered.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::harness::{ALICE, Options, spawn_api, spawn_app_with, spawn_simulated, stop_gracefully};

#[tokio::test]
async fn with_the_broker_down_jobs_get_503_and_nothing_is_left_behind() {
    let app = spawn_app_with(
        Options {
            worker: false,
            amqp_proxy: true,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let kept = app
        .submit(ALICE, json!({"prompt": "before the outage"}))
        .await;
    let proxy = app.amqp_proxy.as_ref().unwrap();
    proxy.cut().await;

    let response = app
        .post_job(ALICE, json!({"prompt": "during the outage"}))
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u32 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable");

    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.headers().contains_key("retry-after"));
    assert_eq!(
        ready.json::<Value>().await.unwrap()["checks"]["rabbitmq"],
        "unavailable"
    );

    // No orphan: only the job from before the outage exists, in the api and in Redis.
    let listed: Value = app.get(ALICE, "/v1/jobs").await.json().await.unwrap();
    let ids: Vec<&str> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![kept.as_str()]);
    let mut redis = app.store.redis().connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}job:*", app.settings.redis.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        keys,
        vec![format!("{}job:{kept}", app.settings.redis.prefix)]
    );
    assert_eq!(app.queue_depth(&app.topology.jobs_queue).await, 1);

    proxy.restore();
    let recovered = app
        .post_job(ALICE, json!({"prompt": "after the outage"}))
        .await;
    assert_eq!(
        recovered.status(),
        StatusCode::ACCEPTED,
        "the api reconnects by itself"
    );
}

#[tokio::test]
async fn with_redis_down_jobs_get_503_and_no_message_is_published() {
    let app = spawn_app_with(
        Options {
            worker: false,
            redis_proxy: true,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    app.redis_proxy.as_ref().unwrap().cut().await;
    let response = tokio::time::timeout(
        Duration::from_secs(15),
        app.post_job(ALICE, json!({"prompt": "no redis"})),
    )
    .await
    .expect("answers promptly instead of hanging");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(app.queue_depth(&app.topology.jobs_queue).await, 0);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(
        ready.json::<Value>().await.unwrap()["checks"]["redis"],
        "unavailable"
    );
}

#[tokio::test]
async fn a_worker_killed_before_ack_loses_nothing_and_the_job_completes_elsewhere() {
    // No in-process worker: a real `pictor-worker` process takes the job first.
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let mut doomed = app.worker_process(&[("PICTOR_SIMULATED_DELAY_MS", "60000")]);
    let id = app
        .submit(ALICE, json!({"prompt": "a job that outlives its worker"}))
        .await;
    app.wait_for(ALICE, &id, |job| job["status"] == "running")
        .await;
    doomed.kill().await.expect("SIGKILL the worker mid-job");

    let mut rescuer = app.worker_process(&[("PICTOR_SIMULATED_DELAY_MS", "50")]);
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(
        job["result"]["images"].as_array().unwrap().len(),
        1,
        "the result is written once"
    );
    // The result is visible a moment before its message is acked: a graceful stop lets the
    // rescuer ack, and then nothing may be left to redeliver.
    assert!(stop_gracefully(&mut rescuer).await.success());
    assert_eq!(app.queue_depth(&app.topology.jobs_queue).await, 0);
}

#[tokio::test]
async fn an_unreadable_message_is_dead_lettered_not_retried_forever() {
    let app = spawn_simulated().await;
    // A job through first, so the worker is certainly consuming.
    let id = app.submit(ALICE, json!({"prompt": "warm up"})).await;
    app.wait_until_terminal(ALICE, &id).await;

    let (connection, channel) = app.amqp_channel().await;
    channel
        .basic_publish(
            "".into(),
            app.topology.jobs_queue.as_str().into(),
            BasicPublishOptions::default(),
            br#"{"type":"mystery","v":99}"#,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.queue_depth(&app.topology.dead_letter_queue).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "message never reached the dead-letter queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.queue_depth(&app.topology.dead_letter_queue).await, 1);
}

#[tokio::test]
async fn browsers_on_configured_origins_may_call_the_api() {
    let app = spawn_app_with(
        Options {
            worker: false,
            ..Options::default()
        },
        |s| {
            s.api.cors_origins = vec!["http://localhost:5173".to_string()];
        },
    )
    .await;
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/v1/jobs"))
        .header("origin", "http://localhost:5173")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,idempotency-key",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "http://localhost:5173"
    );
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("idempotency-key"),
        "{allowed}"
    );

    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(ALICE)
        .header("origin", "http://localhost:5173")
        .json(&json!({"prompt": "from the browser"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("location"), "{exposed}");

    let foreign = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/v1/jobs"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        !foreign
            .headers()
            .contains_key("access-control-allow-origin")
    );
}

#[tokio::test]
async fn health_and_readiness_report_the_dependencies() {
    let app = spawn_api().await;
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"], json!({"redis": "ok", "rabbitmq": "ok"}));
}

/// A Redis server of the test's own on a free port, with `persistence` as its command-line
/// options; stopped (and its directory removed) when dropped.
struct OwnRedis {
    child: std::process::Child,
    dir: std::path::PathBuf,
    url: String,
}

impl OwnRedis {
    async fn start(persistence: &[&str]) -> Self {
        let port = tests::harness::free_port();
        let dir = std::env::temp_dir().join(format!("pictor-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&dir)
            .args(persistence)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs");
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).unwrap();
        for _ in 0..100 {
            if client.get_multiplexed_async_connection().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, dir, url }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_process_on_a_redis_that_keeps_nothing_on_disk_says_so_loudly_and_one_with_aof_does_not()
{
    let app = spawn_api().await;
    const WARNING: &str = "Redis keeps nothing on disk";
    let volatile = OwnRedis::start(&["--save", "", "--appendonly", "no"]).await;
    let worker = app
        .spawn_process_logged("worker", &[("PICTOR_REDIS_URL", volatile.url.clone())])
        .await;
    let output = worker.output().await;
    assert!(output.contains(WARNING), "{output}");
    assert!(output.contains("ERROR"), "said as an error: {output}");
    assert!(
        output.contains("appendonly yes"),
        "says what to set: {output}"
    );
    drop(worker);

    let durable = OwnRedis::start(&["--save", "", "--appendonly", "yes"]).await;
    let worker = app
        .spawn_process_logged("worker", &[("PICTOR_REDIS_URL", durable.url.clone())])
        .await;
    let output = worker.output().await;
    assert!(!output.contains(WARNING), "{output}");
    drop(worker);
}
