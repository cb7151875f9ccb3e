//! The backlog (`docs/architecture.md`, "A fair backlog"): a burst past a user's pace is queued,
//! not refused; the caps on pending jobs answer 429 with a `Retry-After` that holds; a user with
//! a few jobs is not stuck behind another's hundreds when a provider's rate limit is the
//! bottleneck, and that limit is still used in full; a waiting job says where it stands.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::config::RateLimitSettings;
use shared::domain::JobId;
use tests::harness::{ALICE, BOB, Options, TestApp, spawn_api, spawn_app_with};

fn limit(per_minute: u32) -> RateLimitSettings {
    RateLimitSettings {
        requests_per_minute: NonZeroU32::new(per_minute).unwrap(),
        images_per_minute: Some(NonZeroU32::new(per_minute).unwrap()),
        tokens_per_minute: None,
    }
}

/// When the job reached its terminal status (its last write), from the store.
async fn finished_at(app: &TestApp, id: &str) -> chrono::DateTime<chrono::Utc> {
    app.store
        .get(JobId::parse(id).unwrap())
        .await
        .unwrap()
        .unwrap()
        .updated_at
}

async fn wait_all(app: &TestApp, key: &str, ids: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    for id in ids {
        loop {
            let job = app.job(key, id).await;
            if job["status"] == "succeeded" {
                break;
            }
            assert!(
                !matches!(job["status"].as_str(), Some("failed" | "canceled")),
                "{job:#}"
            );
            assert!(
                Instant::now() < deadline,
                "job {id} did not finish: {job:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Posts Alice's six jobs of the burst test in a row, answering their ids; `None` when one of
/// them got the `503` (with `Retry-After`) that a dependency's blip gives, which is not what
/// the test is about.
async fn burst_of_six(app: &TestApp) -> Option<Vec<String>> {
    let mut ids = Vec::new();
    for index in 0..6 {
        let response = app
            .post_job(ALICE, json!({"prompt": format!("kite {index}")}))
            .await;
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert!(response.headers().contains_key("retry-after"));
            return None;
        }
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: Value = response.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    Some(ids)
}

#[tokio::test]
async fn a_burst_past_the_pace_is_accepted_and_each_job_starts_at_its_turn() {
    // A burst that meets a broker or Redis blip (CI's loaded start has given one `503` in a
    // few runs) is tried again on a fresh app, whose pace starts afresh; three in a row fail.
    for _ in 0..3 {
        // One job every two seconds: a job is paced once its turn is at least half a second
        // away (`PACED_AFTER`), so a submission that a loaded machine delays by up to a second
        // and a half is still paced, and a turn computed from the api's clock stays well
        // within the gap's bounds.
        let app = spawn_app_with(Options::default(), |s| {
            s.api.user_jobs_per_minute = NonZeroU32::new(30).unwrap();
            s.api.user_burst = NonZeroU32::new(3).unwrap();
        })
        .await;
        let openai = app.openai.as_ref().unwrap();
        openai.router_answers("create", 0.9, "a kite", None).await;
        openai.images_generate_ok().await;
        let submitted = Instant::now();
        if let Some(ids) = burst_of_six(&app).await {
            return each_starts_at_its_turn(&app, &ids, submitted).await;
        }
    }
    panic!("three bursts in a row met a 503");
}

/// The burst test's checks: the first three jobs start at once; the rest wait their turn, one
/// every two seconds, and are told when.
async fn each_starts_at_its_turn(app: &TestApp, ids: &[String], submitted: Instant) {
    let mut turns = Vec::new();
    for id in &ids[3..] {
        let job = app.job(ALICE, id).await;
        let notice = job["notices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|notice| notice["code"] == "rate_limited")
            .unwrap_or_else(|| panic!("a paced job says so: {job:#}"));
        let turn: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(notice["retry_at"].clone()).unwrap();
        turns.push(turn);
    }
    for pair in turns.windows(2) {
        let gap = (pair[1] - pair[0]).num_milliseconds();
        assert!(
            (1500..=2500).contains(&gap),
            "turns two seconds apart: {turns:?}"
        );
    }
    wait_all(app, ALICE, ids, Duration::from_secs(30)).await;
    for (id, turn) in ids[3..].iter().zip(&turns) {
        let done = finished_at(app, id).await;
        assert!(
            done >= *turn - chrono::Duration::milliseconds(100),
            "job {id} ran at {done}, before its turn at {turn}"
        );
    }
    assert!(submitted.elapsed() >= Duration::from_secs(5));
}

#[tokio::test]
async fn past_the_pending_caps_a_submission_gets_429_with_a_retry_after_that_holds() {
    let app = spawn_app_with(Options::default(), |s| {
        s.backlog.max_pending_per_user = NonZeroU32::new(3).unwrap();
        s.backlog.max_pending = NonZeroU32::new(5).unwrap();
        s.worker.concurrency = std::num::NonZeroUsize::new(1).unwrap();
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a kite", None).await;
    // One job at a time, each taking about half a second.
    openai
        .images_generate_ok_after(Duration::from_millis(500))
        .await;
    let mut ids = Vec::new();
    for index in 0..3 {
        ids.push(
            app.submit(ALICE, json!({"prompt": format!("kite {index}")}))
                .await,
        );
    }
    let refused = app.post_job(ALICE, json!({"prompt": "one too many"})).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error"]["code"],
        "too_many_pending"
    );
    // The cap is the user's: Bob gets in, until the fleet's cap of 5.
    for _ in 0..2 {
        app.submit(BOB, json!({"prompt": "bob's kite"})).await;
    }
    let full = app.post_job(BOB, json!({"prompt": "one more"})).await;
    assert_eq!(full.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        full.json::<Value>().await.unwrap()["error"]["code"],
        "queue_full"
    );

    // Once jobs finish at a measurable pace, the Retry-After is that pace, and waiting it out
    // is enough.
    app.wait_until_terminal(ALICE, &ids[0]).await;
    app.wait_until_terminal(ALICE, &ids[1]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let retry_after = loop {
        let response = app
            .post_job(ALICE, json!({"prompt": "when there is room"}))
            .await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let seconds: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            break seconds;
        }
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert!(
            Instant::now() < deadline,
            "Alice never reached her cap again"
        );
    };
    assert!(
        (1..=5).contains(&retry_after),
        "two users sharing jobs of about 0.6 s: {retry_after} s"
    );
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let mut accepted = false;
    for _ in 0..3 {
        let again = app
            .post_job(ALICE, json!({"prompt": "after the wait"}))
            .await;
        if again.status() == StatusCode::ACCEPTED {
            accepted = true;
            break;
        }
        // A second chance at most: the estimate is of when one job is likely done.
        tokio::time::sleep(Duration::from_secs(retry_after)).await;
    }
    assert!(accepted, "waiting out Retry-After made room");
}

#[tokio::test]
async fn a_user_with_a_few_jobs_is_not_stuck_behind_another_users_hundreds() {
    const RATE: u32 = 600;
    let app = spawn_app_with(Options::default(), |s| {
        // The image model is the bottleneck: 10 images a second for the whole fleet.
        s.rate_limits.clear();
        s.rate_limits
            .insert(format!("openai:{}", s.openai.image_model), limit(RATE));
        for user_cap in [
            &mut s.backlog.max_pending_per_user,
            &mut s.backlog.max_pending,
        ] {
            *user_cap = NonZeroU32::new(1000).unwrap();
        }
        s.api.user_jobs_per_minute = NonZeroU32::new(100_000).unwrap();
        s.api.user_burst = NonZeroU32::new(1000).unwrap();
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("create", 0.9, "a lighthouse", None)
        .await;
    let calls = openai.images_generate_ok_after(Duration::ZERO).await;

    let posts = (0..300).map(|index| {
        let app = &app;
        async move {
            app.submit(ALICE, json!({"prompt": format!("alice {index}")}))
                .await
        }
    });
    let alice: Vec<String> = futures::stream::iter(posts).buffered(16).collect().await;
    let bob_arrived = chrono::Utc::now();
    let mut bob = Vec::new();
    for index in 0..5 {
        bob.push(
            app.submit(BOB, json!({"prompt": format!("bob {index}")}))
                .await,
        );
    }
    wait_all(&app, BOB, &bob, Duration::from_secs(60)).await;
    let mut bob_done = bob_arrived;
    for id in &bob {
        bob_done = bob_done.max(finished_at(&app, id).await);
    }
    wait_all(&app, ALICE, &alice, Duration::from_secs(120)).await;
    let mut alice_meanwhile = 0;
    let mut alice_before = 0;
    for id in &alice {
        let done = finished_at(&app, id).await;
        if done > bob_arrived && done <= bob_done {
            alice_meanwhile += 1;
        } else if done <= bob_arrived {
            alice_before += 1;
        }
    }
    eprintln!(
        "fairness: Alice finished {alice_meanwhile} jobs while Bob's 5 waited \
         ({alice_before} before he came)"
    );
    // Bob's five took turns with Alice: she finished a handful meanwhile, not her backlog.
    assert!(
        alice_meanwhile <= 20,
        "Alice finished {alice_meanwhile} jobs while Bob's 5 waited \
         ({alice_before} before he came, {} after)",
        300 - alice_before - alice_meanwhile
    );
    assert!(
        300 - alice_before - alice_meanwhile >= 100,
        "Bob came while Alice had a backlog"
    );

    // The provider's rate was used in full throughout: from the end of the initial burst to
    // the last call, within 10% of the configured 10 a second.
    let times = calls.times();
    assert_eq!(times.len(), 305, "one image call per job");
    let burst = (RATE / 10) as usize;
    let steady = &times[burst..];
    let span = steady[steady.len() - 1] - steady[0];
    let per_second = (steady.len() - 1) as f64 / span.as_secs_f64();
    let configured = f64::from(RATE) / 60.0;
    assert!(
        per_second >= configured * 0.9 && per_second <= configured * 1.1,
        "{per_second:.2} calls a second against {configured} configured"
    );
    // And throughout, not just on average: every whole 5-second window used at least 80% of
    // its capacity (the bucket's burst lets a short lull be made up within a few seconds).
    let mut windows: HashMap<u64, u32> = HashMap::new();
    for time in steady {
        *windows
            .entry((*time - steady[0]).as_secs() / 5)
            .or_default() += 1;
    }
    for window in 0..span.as_secs() / 5 {
        let count = windows.get(&window).copied().unwrap_or(0);
        assert!(
            f64::from(count) >= configured * 5.0 * 0.8,
            "seconds {}-{} had {count} calls: {windows:?}",
            window * 5,
            window * 5 + 5
        );
    }
}

#[tokio::test]
async fn a_waiting_job_shows_its_place_and_its_stream_says_when_it_moves() {
    let app = spawn_api().await;
    let mut alice = Vec::new();
    for index in 0..10 {
        alice.push(
            app.submit(ALICE, json!({"prompt": format!("alice {index}")}))
                .await,
        );
    }
    let bobs = app.submit(BOB, json!({"prompt": "bob's only one"})).await;
    let place = |job: &Value| job["queue"]["position"].as_u64().unwrap();
    // Bob's one job waits for one of Alice's, not all ten; her tenth waits for her nine and
    // Bob's.
    assert_eq!(place(&app.job(BOB, &bobs).await), 2);
    let tenth = app.job(ALICE, &alice[9]).await;
    assert_eq!(place(&tenth), 11);
    assert!(
        tenth["queue"]["estimated_start_at"].is_null(),
        "nothing finished to go by"
    );

    let response = app
        .client
        .get(app.url(&format!("/v1/jobs/{}/events", alice[9])))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    let mut next_event = async || loop {
        if let Some(end) = seen.find("\n\n") {
            let event = seen[..end].to_string();
            seen.drain(..end + 2);
            if !event.starts_with(':') {
                return event;
            }
            continue;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(15), body.next())
            .await
            .expect("an event within 15 s")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    };
    let first = next_event().await;
    assert!(first.starts_with("event: status"), "{first}");
    assert!(first.contains("\"position\":11"), "{first}");

    // Half of Alice's earlier jobs are canceled: her tenth moves up, and the stream says so.
    for id in &alice[..5] {
        assert_eq!(
            app.delete(ALICE, &format!("/v1/jobs/{id}")).await.status(),
            StatusCode::OK
        );
    }
    let moved = next_event().await;
    assert!(moved.starts_with("event: position"), "{moved}");
    let data: Value = serde_json::from_str(moved.split_once("data: ").unwrap().1.trim()).unwrap();
    assert_eq!(data["position"], 6, "{moved}");
    assert_eq!(place(&app.job(ALICE, &alice[9]).await), 6);
}
