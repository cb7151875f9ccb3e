//! A real Redis primary, two replicas and three sentinels (`scripts/redis-sentinel.sh`), failed
//! over under load: first a planned `SENTINEL FAILOVER`, then a SIGKILL of the primary. The
//! fleet (an api and two workers) is given the sentinels and follows the primary they name.
//! Every `202` job ends `succeeded`, none is paid for twice, the api answers only `202` or `503`
//! with `Retry-After`, and it is back within 10 s of each fault; a scheduler runs each report
//! once across both failovers; and a primary left with no replica in sync takes no job until one
//! follows it again (`docs/scaling.md`, "Redis with Sentinel").

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tests::harness::{ALICE, Options, TestApp, spawn_app_with};
use tests::load::{UnlimitedConfig, unbounded, while_loaded};
use tests::mocks::Arrivals;
use tests::scripted::Scripted;

use crate::scheduler::{World, at, daily_runs};

/// A primary, two replicas and three sentinels on this host, stopped and deleted on drop.
struct SentinelSet {
    setup: Scripted,
    /// The sentinels' `host:port` list, as `PICTOR_REDIS_SENTINELS` takes it.
    sentinels: String,
}

impl SentinelSet {
    async fn start() -> Self {
        // Data nodes on base..base+2, sentinels on base+10..base+12.
        let (setup, sentinels) =
            Scripted::start("redis-sentinel.sh", 31_000, 8_000, &[0, 1, 2, 10, 11, 12]).await;
        Self { setup, sentinels }
    }

    async fn run(&self, args: &[&str]) -> String {
        self.setup.run(args).await
    }

    async fn primary(&self) -> String {
        self.run(&["primary"]).await
    }

    /// An api and a worker following these sentinels, their limits far above any load, the
    /// mock's router and image model answering at once; and the image calls that arrive.
    async fn fleet(&self) -> (TestApp, Arrivals) {
        let sentinels = self.sentinels.clone();
        let app = spawn_app_with(Options::default(), |s| {
            s.redis.sentinels = sentinels.split(',').map(str::to_string).collect();
            unbounded(s);
        })
        .await;
        let openai = app.openai.as_ref().unwrap();
        openai
            .router_answers("create", 0.9, "a lighthouse", None)
            .await;
        let images = openai.images_generate_ok_after(Duration::ZERO).await;
        (app, images)
    }

    /// Waits until the sentinels name a primary other than `old`, and answers it.
    async fn switched_from(&self, old: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.primary().await;
            if now != old {
                return now;
            }
            assert!(Instant::now() < deadline, "the sentinels kept {old}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn a_redis_failover_and_a_killed_primary_under_load_lose_no_job_and_pay_none_twice() {
    let set = SentinelSet::start().await;
    let (app, images) = set.fleet().await;
    // The second worker is a process of its own, its limits far above the load.
    let limits = UnlimitedConfig::write();
    let _second_worker = app.worker_process(&[
        ("PICTOR_REDIS_SENTINELS", &set.sentinels),
        ("PICTOR_CONFIG", limits.path()),
    ]);

    let drill = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        // 1. A planned switch.
        let first = set.primary().await;
        let planned = Instant::now();
        set.run(&["failover"]).await;
        let second = set.switched_from(&first).await;
        let planned_took = planned.elapsed();
        tokio::time::sleep(Duration::from_secs(10)).await;
        // 2. The primary crashes.
        let crashed = Instant::now();
        let killed = set.run(&["kill-primary"]).await;
        assert_eq!(killed, second);
        set.switched_from(&second).await;
        let crash_took = crashed.elapsed();
        tokio::time::sleep(Duration::from_secs(10)).await;
        set.run(&["restart", &killed]).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        (planned, planned_took, crashed, crash_took)
    };
    let (seen, (planned, planned_took, crashed, crash_took)) =
        while_loaded(&app, 50, 30, drill).await;
    let summary = seen.assert_recovered(&[
        ("SENTINEL FAILOVER", planned),
        ("a killed primary", crashed),
    ]);
    eprintln!(
        "sentinel: {summary}; the sentinels switched in {planned_took:?} (planned) and \
         {crash_took:?} (crash)"
    );
    seen.assert_each_succeeded_once(&app, &images).await;
}

#[tokio::test]
async fn two_schedulers_whose_redis_fails_over_twice_run_each_report_once() {
    let set = SentinelSet::start().await;
    let sentinels = set.sentinels.clone();
    let world = World::start("2026-11-06T08:00:00Z", |s| {
        s.redis.sentinels = sentinels.split(',').map(str::to_string).collect();
    })
    .await;
    world.slack_ok().await;
    world.seed_november_fifth().await;
    let (first, second) = (world.scheduler().await, world.scheduler().await);
    let mut runs = Vec::new();
    let tick_at = |moment: chrono::DateTime<chrono::Utc>| {
        world.clock.set(moment);
        let (first, second) = (&first, &second);
        async move {
            let (a, b) = tokio::join!(first.tick(), second.tick());
            [daily_runs(&a), daily_runs(&b)].concat()
        }
    };
    runs.extend(tick_at(at("2026-11-06T08:00:05Z")).await);

    // A planned switch, ticking all through it: the 5th's report is done and stays done.
    let before = set.primary().await;
    set.run(&["failover"]).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        runs.extend(tick_at(at("2026-11-06T08:30:00Z")).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = set.switched_from(&before).await;
    // The next day's report, then the primary crashes, ticking all through it.
    runs.extend(tick_at(at("2026-11-07T08:00:05Z")).await);
    assert_eq!(set.run(&["kill-primary"]).await, after);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        runs.extend(tick_at(at("2026-11-07T09:00:00Z")).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    set.switched_from(&after).await;
    runs.extend(tick_at(at("2026-11-07T10:00:00Z")).await);

    assert_eq!(runs, ["2026-11-05", "2026-11-06"]);
    assert_eq!(
        world.emails_about("Daily report").len(),
        2,
        "{:?}",
        world.subjects()
    );
}

/// A write the primary alone holds is lost if the sentinels then promote another node (after a
/// crash under load they once held two elections in a row). So a primary with no replica in
/// sync answers every job `503` with `Retry-After`, also once the replicas it had are older than
/// the 5 s window that counts them (`PICTOR_REDIS_MIN_REPLICAS`, default 1), and takes jobs
/// again once a replica follows it.
#[tokio::test]
async fn a_primary_without_a_replica_in_sync_takes_no_job_until_one_follows_it_again() {
    let set = SentinelSet::start().await;
    let (app, _images) = set.fleet().await;
    let before = app.submit(ALICE, json!({"prompt": "before"})).await;
    assert_eq!(
        app.wait_until_terminal(ALICE, &before).await["status"],
        "succeeded"
    );

    let killed = set.run(&["kill-replicas"]).await;
    assert_eq!(killed.split_whitespace().count(), 2, "{killed}");
    let alone = Instant::now();
    let mut refused = 0;
    while alone.elapsed() < Duration::from_secs(8) {
        let response = app.post_job(ALICE, json!({"prompt": "alone"})).await;
        assert_eq!(
            response.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "{:.1?} after the replicas went",
            alone.elapsed()
        );
        assert!(response.headers().contains_key("retry-after"));
        refused += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(refused >= 10, "{refused}");

    for port in killed.split_whitespace() {
        set.run(&["restart", port]).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let response = app.post_job(ALICE, json!({"prompt": "after"})).await;
        if response.status() == StatusCode::ACCEPTED {
            let body: serde_json::Value = response.json().await.expect("json body");
            break body["id"].as_str().expect("id").to_string();
        }
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            Instant::now() < deadline,
            "no job taken once the replicas were back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        app.wait_until_terminal(ALICE, &after).await["status"],
        "succeeded"
    );
}
