//! The ops dashboard in a real browser: Debian's headless Chromium, driven through chromedriver
//! with fantoccini, signs in with the ops key and must show the same money as the summary api
//! and the jobs themselves, to the cent on screen and to the micro-dollar in its attributes.
//! `scripts/services.sh` installs Chromium and chromedriver where they are missing.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use fantoccini::Locator;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::browser::{Browser, WAIT, self_contained_page, with_browser};
use tests::harness::{
    ALICE, BOB, OPS, Options, TestApp, spawn_api, spawn_app_with, spawn_simulated,
};

/// The names in the first column of one of the dashboard's tables.
async fn column(browser: &Browser, table: &str) -> Vec<String> {
    let cells = browser
        .client
        .find_all(Locator::Css(&format!("#{table} tbody tr td:first-child")))
        .await
        .unwrap();
    let mut names = Vec::new();
    for cell in cells {
        names.push(cell.text().await.unwrap());
    }
    names
}

/// Dollars as the dashboard's headline shows them: rounded half up to the cent.
fn cents(micros: i64) -> String {
    let cents = (micros + 5_000) / 10_000;
    format!("${}.{:02}", cents / 100, cents % 100)
}

/// Dollars exact to the micro-dollar, as in the figures' `title`.
fn exact(micros: i64) -> String {
    format!("${}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

fn micros(usd: &Value) -> i64 {
    (usd.as_f64().unwrap() * 1e6).round() as i64
}

#[tokio::test]
async fn the_dashboard_shows_the_same_month_to_date_costs_as_the_summary_and_the_jobs() {
    let app = spawn_simulated().await;
    let image = base64::engine::general_purpose::STANDARD.encode(tests::mocks::png(64, 64, 3));
    let submitted = [
        (ALICE, json!({"prompt": "a watercolor fox in the snow"})),
        (
            ALICE,
            json!({"prompt": "a lighthouse at dusk, oil painting"}),
        ),
        (BOB, json!({"prompt": "a paper boat on a pond"})),
        (
            BOB,
            json!({"prompt": "make the sky purple", "image": {"data": image, "mime_type": "image/png"}}),
        ),
    ];
    let mut jobs = Vec::new();
    for (key, body) in submitted {
        let id = app.submit(key, body).await;
        jobs.push(app.wait_until_terminal(key, &id).await);
    }
    for job in &jobs {
        assert_eq!(job["status"], "succeeded", "{job:#}");
    }
    let jobs_micros: i64 = jobs.iter().map(|job| micros(&job["cost_usd"])).sum();
    assert!(jobs_micros > 0, "simulated providers bill real prices");

    with_browser(async |browser| check_dashboard(browser, &app, &jobs, jobs_micros).await).await;
}

async fn check_dashboard(browser: &Browser, app: &TestApp, jobs: &[Value], jobs_micros: i64) {
    browser.client.goto(&app.url("/dashboard")).await.unwrap();

    // A wrong key and a user's key are refused with a message that says which.
    browser.sign_in("not-the-ops-key").await;
    let error = browser.wait_for_text("#error", "(401)").await;
    assert!(error.contains("not accepted"), "{error}");
    browser.sign_in(ALICE).await;
    let error = browser.wait_for_text("#error", "(403)").await;
    assert!(error.contains("not an ops key"), "{error}");
    browser.save_screenshot("dashboard-refused.png").await;

    browser.sign_in(OPS).await;
    browser.wait_for("#dashboard[data-state='ready']").await;
    assert!(
        browser
            .wait_for("#error")
            .await
            .text()
            .await
            .unwrap()
            .is_empty(),
        "a successful sign-in clears the error"
    );
    let month = browser
        .wait_for("#month")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    let response = app
        .get(OPS, &format!("/v1/costs/summary?month={month}"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let summary: Value = response.json().await.unwrap();
    let total = summary["total_micros"].as_i64().unwrap();
    assert_eq!(micros(&summary["total_usd"]), total);
    assert_eq!(
        total, jobs_micros,
        "the ledger bills exactly what the jobs cost"
    );

    // Headline figures: cents on screen, exact micro-dollars in the attributes.
    assert_eq!(browser.text("#total").await, cents(total));
    assert_eq!(
        browser.attr("#total", "data-micros").await,
        total.to_string()
    );
    assert_eq!(browser.attr("#total", "title").await, exact(total));
    for provider in ["openai", "gemini"] {
        let expected = summary[format!("{provider}_micros")].as_i64().unwrap();
        assert!(expected > 0, "{provider} billed something: {summary:#}");
        let css = format!("#{provider}");
        assert_eq!(browser.text(&css).await, cents(expected));
        assert_eq!(
            browser.attr(&css, "data-micros").await,
            expected.to_string()
        );
    }
    let budget = summary["budget"]["budget_micros"].as_i64().unwrap();
    assert_eq!(browser.text("#budget").await, cents(budget));
    let projection = browser.wait_for("#projection").await;
    assert!(
        projection
            .text()
            .await
            .unwrap()
            .starts_with("Projected month-end spend:")
    );
    assert_eq!(
        projection.attr("class").await.unwrap().unwrap_or_default(),
        "",
        "a few cents are not projected over budget"
    );

    // The daily chart has today's bar, worth what the summary says today cost.
    let last_update = jobs
        .iter()
        .filter_map(|job| job["updated_at"].as_str())
        .max()
        .unwrap();
    let today = &last_update[..10];
    let day = summary["by_day"]
        .as_array()
        .unwrap()
        .iter()
        .find(|day| day["date"] == today)
        .unwrap_or_else(|| panic!("{today} is in by_day: {summary:#}"));
    let bar = format!("#daily-chart g.day[data-date='{today}']");
    assert_eq!(
        browser.attr(&bar, "data-micros").await,
        micros(&day["usd"]).to_string()
    );
    browser.wait_for(&format!("{bar} rect.bar.openai")).await;
    browser.wait_for(&format!("{bar} rect.bar.gemini")).await;

    // Breakdowns.
    let agents = column(browser, "by-agent").await;
    for agent in ["router", "create", "edit"] {
        assert!(agents.iter().any(|name| name == agent), "{agents:?}");
    }
    let users = column(browser, "by-user").await;
    assert_eq!(users.len(), 2, "{users:?}");
    assert!(users.contains(&"alice".to_string()) && users.contains(&"bob".to_string()));
    let average = micros(&summary["average_per_active_user_usd"]);
    assert_eq!(
        browser.attr("#average-per-user", "data-micros").await,
        average.to_string()
    );

    // The CSV is fetched with the key and saved through a Blob, both granularities.
    for granularity in ["call", "day"] {
        browser
            .wait_for("#granularity")
            .await
            .select_by_value(granularity)
            .await
            .unwrap();
        browser
            .wait_for("#download-csv")
            .await
            .click()
            .await
            .unwrap();
        let filename = format!("pictor-costs-{month}-{granularity}.csv");
        let status = browser.wait_for_text("#download-status", "Saved").await;
        assert!(status.contains(&filename), "{status}");
        let saved = wait_for_file(&browser.downloads.join(&filename)).await;
        assert!(saved.starts_with("ChargePeriodStart,"), "{saved}");
    }

    browser.save_screenshot("dashboard.png").await;

    // Signing out forgets the key: a reload asks for it again.
    browser.wait_for("#sign-out").await.click().await.unwrap();
    browser.client.refresh().await.unwrap();
    browser.wait_for("#sign-in-form:not([hidden])").await;
    assert!(
        browser
            .wait_for("#dashboard")
            .await
            .attr("hidden")
            .await
            .unwrap()
            .is_some()
    );
}

async fn wait_for_file(path: &Path) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} was never saved",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_dashboard_says_so_when_the_cost_ledger_is_unavailable() {
    let app = spawn_app_with(
        Options {
            worker: false,
            redis_proxy: true,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    with_browser(async |browser| {
        browser.client.goto(&app.url("/dashboard")).await.unwrap();
        browser.sign_in(OPS).await;
        browser.wait_for("#dashboard[data-state='ready']").await;
        assert_eq!(browser.text("#total").await, "$0.00");
        assert_eq!(browser.attr("#total", "data-micros").await, "0");
        let chart = browser.text("#daily-chart").await;
        assert!(chart.contains("Nothing billed this month yet"), "{chart}");

        app.redis_proxy.as_ref().unwrap().cut().await;
        browser.wait_for("#refresh").await.click().await.unwrap();
        let error = browser.wait_for_text("#error", "(503)").await;
        assert!(error.contains("unavailable"), "{error}");
        // The last figures stay on screen; the key is kept for the next try.
        browser.wait_for("#dashboard[data-state='error']").await;
        assert_eq!(browser.text("#total").await, "$0.00");

        app.redis_proxy.as_ref().unwrap().restore();
        // The api reconnects to Redis by itself, but a refresh in the moment before it has may
        // still see the outage: like a user, click again until the figures are back.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            browser.wait_for("#refresh").await.click().await.unwrap();
            let state = loop {
                let state = browser.attr("#dashboard", "data-state").await;
                if state != "loading" {
                    break state;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if state == "ready" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the dashboard never recovered after Redis came back (state {state})"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(
            browser
                .wait_for("#error")
                .await
                .text()
                .await
                .unwrap()
                .is_empty()
        );
    })
    .await;
}

#[tokio::test]
async fn the_dashboard_page_is_self_contained() {
    let app = spawn_api().await;
    let html = self_contained_page(&app, "/dashboard").await;
    for id in [
        "key",
        "sign-in",
        "month",
        "total",
        "openai",
        "gemini",
        "budget",
        "daily-chart",
        "by-agent",
        "by-user",
        "projection",
        "download-csv",
        "refresh",
        "error",
    ] {
        assert!(
            html.contains(&format!("id=\"{id}\"")),
            "the page lacks #{id}"
        );
    }
}
