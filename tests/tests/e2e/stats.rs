//! The daily and per-minute statistics the scheduler reports from.

use serde_json::json;
use tests::harness::{ALICE, Options, spawn_app_with};

#[tokio::test]
async fn finished_jobs_fallbacks_and_cancels_are_counted_per_day_and_minute() {
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
    let image = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        tests::mocks::png(8, 8, 3),
    );
    let edit =
        json!({"prompt": "make it blue", "image": {"data": image, "mime_type": "image/png"}});
    for _ in 0..2 {
        let id = app.submit(ALICE, edit.clone()).await;
        assert_eq!(
            app.wait_until_terminal(ALICE, &id).await["status"],
            "succeeded"
        );
    }
    // An edit without an image ends asking for one.
    let id = app
        .submit(ALICE, json!({"prompt": "make my photo blue"}))
        .await;
    assert_eq!(
        app.wait_until_terminal(ALICE, &id).await["status"],
        "needs_clarification"
    );

    // Each job's end, its count and its lease's release are one write: a job that shows its
    // end is counted and holds no lease.
    let mut connection = app.store.redis().connection();
    let leased: u64 = redis::cmd("ZCARD")
        .arg(app.store.redis().keys().leases())
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(leased, 0, "a job that shows its end holds no lease");

    let stats = app.store.redis().stats();
    let now = chrono::Utc::now();
    let day = stats.day(now.date_naive()).await.unwrap();
    assert_eq!(day.get("finished:succeeded:edit"), 2);
    assert_eq!(day.get("finished:needs_clarification:edit"), 1);
    assert_eq!(day.finished("succeeded"), 2);
    assert_eq!(day.total_finished(), 3);
    assert_eq!(day.get("fallbacks"), 2);
    assert!(day.duration_quantile(0.95).is_some_and(|p95| p95 <= 30.0));
    let window = stats.window(now, 10).await.unwrap();
    assert_eq!(
        window.total_finished(),
        3,
        "the last ten minutes saw all three"
    );
}
