//! Pictor's keyspace on a real Redis Cluster (`scripts/redis-cluster.sh`): with a hash tag in
//! `PICTOR_REDIS_PREFIX`, every key is in one slot, so the node serving that slot runs the whole
//! job path, the ledger, the limiter, the fair backlog and the scheduler. A key in another slot
//! would be answered `MOVED`, and two keys of one script or transaction in different slots
//! `CROSSSLOT`, either of which fails these tests (`docs/scaling.md`, "Redis Cluster").

use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::harness::{ALICE, OPS, Options, spawn_app_with};
use tests::scripted::Scripted;

use crate::scheduler::{World, at, daily_runs};

struct RedisCluster {
    setup: Scripted,
}

impl RedisCluster {
    async fn start() -> Self {
        // Three ports and their cluster-bus ports (10,000 above), all free.
        let (setup, _) = Scripted::start(
            "redis-cluster.sh",
            40_000,
            15_000,
            &[0, 1, 2, 10_000, 10_001, 10_002],
        )
        .await;
        Self { setup }
    }

    /// A hash-tagged prefix, and the URL of the node serving its slot.
    fn tagged(&self, prefix: &str) -> (String, String) {
        let tag = prefix.trim_end_matches(':');
        let tagged = format!("{{{tag}}}:");
        let port = self
            .setup
            .run_blocking(&["owner", &format!("{tagged}probe")]);
        (tagged, format!("redis://127.0.0.1:{port}"))
    }
}

async fn accepted_id(response: reqwest::Response) -> String {
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn the_job_path_runs_on_the_node_serving_the_prefixs_slot_of_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let app = spawn_app_with(Options::default(), |s| {
        let (tagged, url) = cluster.tagged(&s.redis.prefix);
        s.redis.prefix = tagged;
        s.redis.url = url.into();
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("create", 0.9, "a red kite", None)
        .await;
    let images = openai
        .images_generate_ok_after(std::time::Duration::ZERO)
        .await;

    // Jobs through admission (the fair backlog and the limiter's buckets), the router, the image
    // model, the ledger and the job's end; one with an idempotency key, sent twice.
    let mut ids = Vec::new();
    for index in 0..5 {
        ids.push(
            accepted_id(
                app.post_job(ALICE, json!({"prompt": format!("a red kite {index}")}))
                    .await,
            )
            .await,
        );
    }
    let keyed = || {
        app.client
            .post(app.url("/v1/jobs"))
            .bearer_auth(ALICE)
            .header("Idempotency-Key", "kite-42")
            .json(&json!({"prompt": "one kite"}))
            .send()
    };
    let first = keyed().await.unwrap();
    let first_id = accepted_id(first).await;
    let again: Value = keyed().await.unwrap().json().await.unwrap();
    assert_eq!(
        again["id"],
        first_id.as_str(),
        "the key answers its job again"
    );
    ids.push(first_id);

    for id in &ids {
        let job = app.wait_until_terminal(ALICE, id).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
        assert!(job["cost_usd"].as_f64().unwrap() > 0.0, "{job:#}");
    }
    assert_eq!(images.times().len(), ids.len());

    // The user's list, and the operators' costs of the month.
    let listed: Value = app.get(ALICE, "/v1/jobs").await.json().await.unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), ids.len());
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let summary = app
        .get(OPS, &format!("/v1/costs/summary?month={month}"))
        .await;
    assert_eq!(summary.status(), StatusCode::OK);
    let summary: Value = summary.json().await.unwrap();
    assert!(summary["total_usd"].as_f64().unwrap() > 0.0, "{summary:#}");
}

#[tokio::test]
async fn a_job_is_visible_as_soon_as_it_is_accepted_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    // No worker: what the client sees comes from the api's own writes.
    let app = spawn_app_with(
        Options {
            worker: false,
            ..Options::default()
        },
        |s| {
            let (tagged, url) = cluster.tagged(&s.redis.prefix);
            s.redis.prefix = tagged;
            s.redis.url = url.into();
        },
    )
    .await;
    let id = accepted_id(app.post_job(ALICE, json!({"prompt": "a kite"})).await).await;
    let job = app.get(ALICE, &format!("/v1/jobs/{id}")).await;
    assert_eq!(job.status(), StatusCode::OK);
    let job: Value = job.json().await.unwrap();
    assert_eq!(job["status"], "queued", "{job:#}");
}

#[tokio::test]
async fn the_scheduler_runs_on_the_node_serving_the_prefixs_slot_of_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let world = World::start("2026-11-06T08:00:05Z", |s| {
        let (tagged, url) = cluster.tagged(&s.redis.prefix);
        s.redis.prefix = tagged;
        s.redis.url = url.into();
    })
    .await;
    world.slack_ok().await;
    world.seed_november_fifth().await;
    let scheduler = world.scheduler().await;

    assert_eq!(daily_runs(&scheduler.tick().await), ["2026-11-05"]);
    world.clock.set(at("2026-11-06T09:00:00Z"));
    assert!(daily_runs(&scheduler.tick().await).is_empty());
    assert_eq!(world.emails_about("Daily report").len(), 1);
}
