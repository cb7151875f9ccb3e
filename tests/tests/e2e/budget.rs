//! Money: every billed call lands in the ledger at its exact price, a blocking budget holds
//! under concurrency, and each threshold is announced exactly once.

use std::time::Duration;

use base64::Engine;
use serde_json::json;
use shared::config::BudgetPolicyKind;
use shared::ledger::{BudgetPolicy, Ledger, Month};
use tests::harness::{ALICE, BOB, Options, TestApp, spawn_app_with, spawn_simulated};

fn ledger(app: &TestApp) -> Ledger {
    app.store
        .redis()
        .ledger(BudgetPolicy::from(&app.settings.budget))
}

async fn ledger_entries(app: &TestApp) -> Vec<shared::ledger::LedgerEntry> {
    app.ledger_entries().await
}

#[tokio::test]
async fn every_billed_call_of_an_edit_with_fallback_is_in_the_ledger_at_its_exact_price() {
    let app = spawn_app_with(Options::default(), |s| {
        s.worker.provider_max_attempts = std::num::NonZeroU32::new(1).unwrap();
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("edit", 0.9, "make it blue", None)
        .await;
    openai.images_edit_ok().await;
    app.gemini.as_ref().unwrap().unavailable(None).await;
    let image = base64::engine::general_purpose::STANDARD.encode(tests::mocks::png(16, 16, 1));
    let id = app
        .submit(
            ALICE,
            json!({"prompt": "make it blue", "image": {"data": image, "mime_type": "image/png"}}),
        )
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");

    let entries = ledger_entries(&app).await;
    let agents: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e.usage.agent.as_str(), e.usage.provider.as_str()))
        .collect();
    // The failed Gemini call billed nothing; the router and the OpenAI fallback did.
    assert_eq!(agents, [("router", "openai"), ("edit", "openai")]);
    // Router: 120 prompt + 24 completion tokens on gpt-4.1-mini ($0.40 / $1.60 per 1M)
    // = 86.4 -> 87 micro-dollars. Fallback edit on gpt-image-2: 10 text tokens at $5 + 388 image
    // tokens at $8 + 1,056 output image tokens at $30 per 1M = 50 + 3,104 + 31,680 = 34,834.
    assert_eq!(tests::mocks::OPENAI_EDIT_IMAGE_INPUT_TOKENS_PER_IMAGE, 388);
    assert_eq!(entries[0].cost_micros, 87);
    assert_eq!(entries[1].cost_micros, 34_834);
    assert!(
        entries
            .iter()
            .all(|e| e.job_id.to_string() == id && e.user.as_str() == "alice")
    );
    assert!(
        (job["cost_usd"].as_f64().unwrap() - 0.034_921).abs() < 1e-9,
        "{}",
        job["cost_usd"]
    );

    let month = ledger(&app)
        .month(Month::of(chrono::Utc::now()))
        .await
        .unwrap();
    assert_eq!(month.total(), 87 + 34_834);
    assert_eq!(month.get("agent:edit"), 34_834);
    assert_eq!(month.get("agent:router"), 87);
    assert_eq!(month.get("provider:openai"), 87 + 34_834);
    assert_eq!(month.get("user:alice"), 87 + 34_834);
    assert_eq!(month.get("calls"), 2);
}

#[tokio::test]
async fn the_aggregates_always_equal_the_ledger_and_the_jobs() {
    let app = spawn_simulated().await;
    let mut ids = Vec::new();
    for (key, prompt) in [
        (ALICE, "a red kite"),
        (BOB, "a blue boat"),
        (ALICE, "a green hill"),
    ] {
        ids.push((
            key,
            app.submit(key, json!({"prompt": prompt, "n": 2})).await,
        ));
    }
    let mut job_total = 0.0;
    for (key, id) in &ids {
        job_total += app.wait_until_terminal(key, id).await["cost_usd"]
            .as_f64()
            .unwrap();
    }
    let entries = ledger_entries(&app).await;
    assert_eq!(entries.len(), 6, "a router and a create call per job");
    assert!(
        entries.iter().all(|e| e.usage.simulated),
        "simulated calls are flagged"
    );
    let ledger_total: i64 = entries.iter().map(|e| e.cost_micros).sum();
    assert!(
        ledger_total > 0,
        "simulated calls are priced as the models they stand in for"
    );
    let month = ledger(&app)
        .month(Month::of(chrono::Utc::now()))
        .await
        .unwrap();
    assert_eq!(month.total(), ledger_total);
    assert!((job_total - ledger_total as f64 / 1e6).abs() < 1e-9);
    let by_user: i64 = month.family("user").values().sum();
    let by_agent: i64 = month.family("agent").values().sum();
    let by_model: i64 = month.family("model").values().sum();
    assert_eq!(
        (by_user, by_agent, by_model),
        (ledger_total, ledger_total, ledger_total)
    );
}

#[tokio::test]
async fn a_blocking_budget_holds_under_concurrent_workers_and_each_threshold_fires_once() {
    // $1.00 a month, blocking; thresholds at 25% and 50%. Each simulated create costs about
    // $0.032 but reserves its worst case (about $0.21) while in flight, so spending stops short
    // of the budget by at most one worst case.
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            ..Options::default()
        },
        |s| {
            s.budget.monthly_micros = 1_000_000;
            s.budget.thresholds = vec![25, 50];
            // Provider rate limits would only slow this test down.
            s.rate_limits.clear();
            s.budget.policy = BudgetPolicyKind::Block;
            s.simulated.delay = Duration::from_millis(100);
            s.worker.concurrency = std::num::NonZeroUsize::new(8).unwrap();
            s.api.user_burst = std::num::NonZeroU32::new(100).unwrap();
        },
    )
    .await;
    // A second worker process's worth of competition: another worker in-process.
    let second = worker::Worker::build(app.settings.clone()).await.unwrap();
    let stop = app.stop_signal();
    tokio::spawn(second.run_until_stopped(stop));

    let mut ids = Vec::new();
    for index in 0..40 {
        let response = app
            .post_job(ALICE, json!({"prompt": format!("budget test {index}")}))
            .await;
        if response.status() == reqwest::StatusCode::PAYMENT_REQUIRED {
            break;
        }
        assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
        ids.push(
            response.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut succeeded = 0;
    let mut refused = 0;
    for id in &ids {
        let job = app.wait_until_terminal(ALICE, id).await;
        match job["status"].as_str() {
            Some("succeeded") => succeeded += 1,
            Some("failed") => {
                assert_eq!(job["error"]["code"], "budget_exhausted", "{job:#}");
                refused += 1;
            }
            other => panic!("unexpected status {other:?}"),
        }
    }
    let ledger = ledger(&app);
    let month = Month::of(chrono::Utc::now());
    let spent = ledger.month(month).await.unwrap().total();
    assert!(
        succeeded > 10,
        "the budget paid for real work ({succeeded} jobs)"
    );
    assert!(refused > 0, "the budget stopped some work");
    assert!(
        spent <= 1_000_000,
        "spent {spent} micro-dollars of a 1,000,000 budget"
    );
    assert!(
        spent >= 500_000,
        "the budget was used, not refused early: spent {spent}"
    );
    assert_eq!(
        ledger.reserved(month).await.unwrap(),
        0,
        "every hold was settled or released"
    );

    let events = ledger.budget_events().await.unwrap();
    let thresholds: Vec<u32> = events.iter().map(|e| e.threshold).collect();
    assert_eq!(
        thresholds,
        [25, 50],
        "each crossed threshold fired exactly once"
    );
    assert!(
        events
            .iter()
            .all(|e| e.month == month.to_string() && e.budget_micros == 1_000_000)
    );
}

#[tokio::test]
async fn a_spent_blocking_budget_refuses_new_jobs_with_402() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |s| {
            s.budget.monthly_micros = 1;
            s.budget.policy = BudgetPolicyKind::Block;
        },
    )
    .await;
    // Spend the whole budget through the ledger, as a worker would.
    let entry = shared::ledger::LedgerEntry {
        at: chrono::Utc::now(),
        job_id: shared::domain::JobId::new(),
        user: shared::domain::UserId::parse("alice").unwrap(),
        usage: shared::domain::Usage {
            agent: "router".into(),
            provider: "openai".into(),
            model: "gpt-4.1-mini".into(),
            input_text_tokens: 10,
            ..Default::default()
        },
        cost_micros: 5,
        billing: shared::ledger::Billing::Billed,
    };
    ledger(&app).record(&entry, None).await.unwrap();
    let response = app
        .post_job(ALICE, json!({"prompt": "one more picture"}))
        .await;
    assert_eq!(response.status(), reqwest::StatusCode::PAYMENT_REQUIRED);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exhausted");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("budget")
    );
    // That small body was refused by the intake, after it was read; a body that is not small
    // is refused before it is read: this one is not even JSON, and still gets the 402.
    let response = app
        .post_raw(ALICE, "application/json", vec![b'x'; 100 * 1024])
        .await;
    assert_eq!(response.status(), reqwest::StatusCode::PAYMENT_REQUIRED);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exhausted");
    // Nothing of either refused job was kept.
    let listed: serde_json::Value = app.get(ALICE, "/v1/jobs").await.json().await.unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 0, "{listed:#}");
}

#[tokio::test]
async fn an_alerting_budget_keeps_serving_past_100_percent_and_announces_each_threshold_once() {
    let app = spawn_app_with(Options::default(), |s| {
        s.budget.monthly_micros = 1_000;
        s.budget.thresholds = vec![80, 100];
        s.budget.policy = BudgetPolicyKind::Alert;
    })
    .await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a fox", None).await;
    openai.images_generate_ok().await;
    for _ in 0..3 {
        let id = app.submit(ALICE, json!({"prompt": "a fox"})).await;
        assert_eq!(
            app.wait_until_terminal(ALICE, &id).await["status"],
            "succeeded"
        );
    }
    let events = ledger(&app).budget_events().await.unwrap();
    let thresholds: Vec<u32> = events.iter().map(|e| e.threshold).collect();
    assert_eq!(
        thresholds,
        [80, 100],
        "both crossed by the first job, announced once each"
    );
    assert!(events[1].spent_micros >= 1_000);
}
