//! Deferrals that cost nothing extra (`docs/architecture.md`, "A fair backlog"): a job that a
//! provider's rate limit sends back to a delay queue again and again carries one `rate_limited`
//! notice, kept up to date in place, and its Redis hash does not grow from cycle to cycle.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use secrecy::ExposeSecret;
use serde_json::json;
use shared::config::RateLimitSettings;
use tests::harness::{ALICE, Options, TestApp, spawn_app_with};

/// Every field of the job's hash with its length in bytes, read straight from Redis.
async fn hash_sizes(
    redis: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> HashMap<String, usize> {
    let fields: HashMap<String, String> = redis.hgetall(key).await.unwrap();
    fields
        .into_iter()
        .map(|(field, value)| (field, value.len()))
        .collect()
}

/// The job's hash as it is once it has been deferred `cycles` times.
async fn after_cycles(
    app: &TestApp,
    redis: &mut redis::aio::MultiplexedConnection,
    key: &str,
    cycles: usize,
) -> HashMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let deferrals: Option<usize> = redis.hget(key, "deferrals").await.unwrap();
        let status: Option<String> = redis.hget(key, "status").await.unwrap();
        if deferrals == Some(cycles) && status.as_deref() == Some("queued") {
            return hash_sizes(redis, key).await;
        }
        assert!(
            deferrals.unwrap_or(0) <= cycles,
            "missed cycle {cycles} (now {deferrals:?}); poll faster"
        );
        assert!(
            Instant::now() < deadline,
            "the job was not deferred {cycles} times: {:#}",
            app.job(ALICE, key.rsplit(':').next().unwrap()).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_job_deferred_fifty_times_carries_one_notice_and_a_hash_that_does_not_grow() {
    const CYCLES: u64 = 50;
    let app = spawn_app_with(Options::default(), |s| {
        s.worker.provider_max_attempts = NonZeroU32::new(CYCLES as u32 + 5).unwrap();
        // Only the provider's 429s defer the job here, not the fleet's own image budget (51
        // calls in under a minute would pass the default 50 a minute).
        s.rate_limits.insert(
            format!("openai:{}", s.openai.image_model),
            RateLimitSettings {
                requests_per_minute: NonZeroU32::new(6_000).unwrap(),
                images_per_minute: NonZeroU32::new(6_000),
                tokens_per_minute: None,
            },
        );
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a fox", None).await;
    // 429 asking for 1 ms, 50 times: each sends the job to the shortest delay queue (1 s).
    openai
        .rate_limited("images/generations", 1, Some(CYCLES))
        .await;
    openai.images_generate_ok().await;
    let mut redis = redis::Client::open(app.settings.redis.url.expose_secret())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
    let key = format!("{}job:{id}", app.settings.redis.prefix);
    let early = after_cycles(&app, &mut redis, &key, 10).await;
    let late = after_cycles(&app, &mut redis, &key, 50).await;

    // The notice is rewritten in place: the same length at cycle 10 and cycle 50 (its count has
    // two digits both times), give or take its two times' fractions of a second, which RFC 3339
    // writes with 9, 6 or 3 digits as the nanoseconds fall (3 bytes each). With one notice per
    // cycle it would have grown by ~40 notices (~10 KB).
    assert!(
        early["notices"].abs_diff(late["notices"]) <= 6,
        "the notices field grew from {} to {} bytes",
        early["notices"],
        late["notices"]
    );
    let total = |sizes: &HashMap<String, usize>| sizes.values().sum::<usize>();
    // Only counters' digits may grow (the version passes 100 between the two reads), and times'
    // fractions of a second (3 bytes each, as above).
    assert!(
        total(&late) <= total(&early) + 16,
        "the hash grew from {} to {} bytes: {early:?} -> {late:?}",
        total(&early),
        total(&late)
    );
    let mut fields: Vec<_> = late.keys().collect();
    fields.sort();
    let mut before: Vec<_> = early.keys().collect();
    before.sort();
    assert_eq!(fields, before, "no field was added between the two reads");

    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let limited: Vec<_> = job["notices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|notice| notice["code"] == "rate_limited")
        .collect();
    assert_eq!(limited.len(), 1, "one rate-limit notice: {job:#}");
    assert_eq!(limited[0]["count"], CYCLES, "{job:#}");
    assert!(
        limited[0]["retry_at"].is_string(),
        "the notice keeps the latest retry time: {job:#}"
    );
    assert_eq!(
        openai.received("images/generations").await.len() as u64,
        CYCLES + 1,
        "each cycle made one image call, and the last one succeeded"
    );
}
