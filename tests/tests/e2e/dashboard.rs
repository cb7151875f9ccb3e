//! The ops dashboard in a real browser: Debian's headless Chromium, driven through chromedriver
//! with fantoccini, signs in with the ops key and must show the same money as the summary api
//! and the jobs themselves, to the cent on screen and to the micro-dollar in its attributes. It
//! refreshes itself (and pauses while hidden), flags simulated spend, warns when over budget,
//! when reports reach nobody, and fits a phone: each page is checked at 1280 and 390 px wide.
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

/// The ids (`data-id`) of the rows of one of the dashboard's tables.
async fn column(browser: &Browser, table: &str) -> Vec<String> {
    let rows = browser
        .client
        .find_all(Locator::Css(&format!("#{table} tbody tr[data-id]")))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for row in rows {
        ids.push(row.attr("data-id").await.unwrap().unwrap_or_default());
    }
    ids
}

/// The text of the first cell of the row of `id` in one of the dashboard's tables.
async fn row_label(browser: &Browser, table: &str, id: &str) -> String {
    browser
        .text(&format!("#{table} tbody tr[data-id='{id}'] td:first-child"))
        .await
}

/// The page's widths that matter: a laptop and a phone.
const WIDTHS: [u32; 2] = [1280, 390];

/// Bounding boxes `[left, top, right, bottom]` of the elements `css` selects.
async fn boxes(browser: &Browser, css: &str) -> Vec<[f64; 4]> {
    let found = browser
        .client
        .execute(
            "return [...document.querySelectorAll(arguments[0])].map(e => { \
               const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })",
            vec![json!(css)],
        )
        .await
        .unwrap();
    found
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let b = b.as_array().unwrap();
            [0, 1, 2, 3].map(|i| b[i].as_f64().unwrap())
        })
        .collect()
}

/// No two of the elements `css` selects overprint each other.
async fn assert_apart(browser: &Browser, css: &str, width: u32) {
    let found = boxes(browser, css).await;
    for (i, a) in found.iter().enumerate() {
        for b in &found[i + 1..] {
            let overlap = a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3];
            assert!(!overlap, "{css} overprint at {width} px: {a:?} and {b:?}");
        }
    }
}

/// Sets the page's month picker as a person would, and waits for that month to be shown.
async fn pick_month(browser: &Browser, month: &str) {
    browser
        .client
        .execute(
            "const input = document.getElementById('month'); input.value = arguments[0]; \
             input.dispatchEvent(new Event('change'))",
            vec![json!(month)],
        )
        .await
        .unwrap();
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

    // Breakdowns, with names for people next to the ids.
    let agents = column(browser, "by-agent").await;
    for agent in ["router", "create", "edit"] {
        assert!(agents.iter().any(|name| name == agent), "{agents:?}");
    }
    assert!(
        row_label(browser, "by-agent", "create")
            .await
            .starts_with("Image creation (create)")
    );
    assert!(
        row_label(browser, "by-provider", "openai")
            .await
            .starts_with("OpenAI (openai)")
    );
    let models = summary["models"].as_array().unwrap();
    assert!(!models.is_empty(), "{summary:#}");
    for model in models {
        let id = model["id"].as_str().unwrap();
        let label = row_label(browser, "by-model", id).await;
        match model["name"].as_str() {
            Some(name) => assert!(label.starts_with(&format!("{name} ({id})")), "{label}"),
            None => assert!(label.starts_with(id), "{label}"),
        }
    }
    assert!(
        row_label(browser, "by-model", "gpt-image-2")
            .await
            .starts_with("GPT Image 2 (gpt-image-2)")
    );
    // Every call here was the simulated provider's: said so, and not as OpenAI's or Gemini's bill.
    assert_eq!(summary["simulated_micros"].as_i64(), Some(total));
    let note = browser.text("#simulated-note").await;
    assert!(
        note.contains("simulated") && note.contains("Nobody was billed"),
        "{note}"
    );
    for provider in ["openai", "gemini"] {
        let tag = browser.text(&format!("#{provider}-simulated")).await;
        assert_eq!(tag, "Simulated: not billed");
    }
    let model_row = browser
        .text("#by-model tbody tr[data-id='gpt-image-2']")
        .await;
    assert!(model_row.contains("simulated"), "{model_row}");
    // Month over month: this month's bar and row hold this month's total.
    let bar = format!("#months-chart g.month.selected[data-month='{month}']");
    assert_eq!(browser.attr(&bar, "data-micros").await, total.to_string());
    assert_eq!(
        browser
            .attr(
                &format!("#by-month tbody tr[data-month='{month}'] td.num"),
                "data-micros"
            )
            .await,
        total.to_string()
    );
    // No scheduler runs here: nobody is told, and the page says so.
    let banner = browser.text("#delivery-banner").await;
    assert!(banner.contains("No scheduler has reported"), "{banner}");
    // Links to the other pages.
    assert_eq!(browser.attr("#nav-playground", "href").await, "/");
    assert_eq!(browser.attr("#nav-docs", "href").await, "/docs/");
    for width in WIDTHS {
        browser.set_width(width).await;
        browser
            .assert_no_horizontal_overflow(width, "the dashboard")
            .await;
        assert_apart(browser, "#budget-meter .label", width).await;
        assert_apart(browser, "#pace-chart text[data-kind]", width).await;
        browser.save_screenshot_at("dashboard", width).await;
    }
    browser.set_width(1280).await;
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
        browser.click("#download-csv").await;
        let filename = format!("pictor-costs-{month}-{granularity}.csv");
        let status = browser.wait_for_text("#download-status", "Saved").await;
        assert!(status.contains(&filename), "{status}");
        let saved = wait_for_file(&browser.downloads.join(&filename)).await;
        assert!(saved.starts_with("ChargePeriodStart,"), "{saved}");
    }

    // Signing out forgets the key: a reload asks for it again.
    browser.click("#sign-out").await;
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
        browser.click("#refresh").await;
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
            browser.click("#refresh").await;
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
        "updated",
        "delivery-banner",
        "pace-chart",
        "months-chart",
        "by-month",
        "by-provider",
        "by-model",
        "nav-docs",
    ] {
        assert!(
            html.contains(&format!("id=\"{id}\"")),
            "the page lacks #{id}"
        );
    }
}

/// Publishes a scheduler's delivery status as the scheduler would.
async fn publish_delivery(app: &TestApp, email: bool, slack: bool) {
    let redis = app.store.redis();
    shared::delivery::DeliveryStatus {
        email,
        slack,
        dev: false,
        at: chrono::Utc::now(),
    }
    .publish(&redis.connection(), redis.keys(), Duration::from_secs(120))
    .await
    .unwrap();
}

async fn loads(browser: &Browser) -> u64 {
    browser
        .attr("#dashboard", "data-loads")
        .await
        .parse()
        .unwrap()
}

/// Polls an element's attribute until `done` holds for it.
async fn wait_for_attr(
    browser: &Browser,
    css: &str,
    name: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = browser.attr(css, name).await;
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name} of {css} never changed as expected; last: {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_dashboard_refreshes_itself_pauses_while_hidden_and_warns_when_nobody_is_told() {
    let app = spawn_simulated().await;
    with_browser(async |browser| {
        browser
            .client
            .goto(&app.url("/dashboard?refresh=1"))
            .await
            .unwrap();
        browser.sign_in(OPS).await;
        browser.wait_for("#dashboard[data-state='ready']").await;
        assert_eq!(browser.attr("#total", "data-micros").await, "0");
        let updated = browser.text("#updated").await;
        let clock = updated
            .strip_prefix("Updated ")
            .and_then(|rest| rest.get(..8))
            .unwrap_or_else(|| panic!("{updated}"));
        assert!(
            chrono::NaiveTime::parse_from_str(clock, "%H:%M:%S").is_ok(),
            "{updated}"
        );
        assert!(updated.contains("every 1 s"), "{updated}");

        // Jobs run; the figures follow on screen with no click.
        let id = app
            .submit(ALICE, json!({"prompt": "a watercolor fox in the snow"}))
            .await;
        let job = app.wait_until_terminal(ALICE, &id).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
        let cost = micros(&job["cost_usd"]);
        assert!(cost > 0);
        wait_for_attr(browser, "#total", "data-micros", |value| {
            value == cost.to_string()
        })
        .await;
        assert_eq!(browser.text("#total").await, cents(cost));

        // Reports that only reach the outbox, then no scheduler at all, then email: each shows
        // within a refresh.
        publish_delivery(&app, false, false).await;
        let banner = browser
            .wait_for_text("#delivery-banner", "only written to the scheduler's outbox")
            .await;
        assert!(banner.contains("PICTOR_SMTP_URL"), "{banner}");
        assert!(banner.contains("PICTOR_SLACK_WEBHOOK_URL"), "{banner}");
        for width in WIDTHS {
            browser.set_width(width).await;
            browser.assert_no_horizontal_overflow(width, "the outbox banner").await;
        }
        browser.set_width(1280).await;
        publish_delivery(&app, true, false).await;
        wait_for_attr(browser, "#delivery-banner", "data-status", |s| s == "ok").await;
        assert!(
            browser
                .wait_for("#delivery-banner")
                .await
                .attr("hidden")
                .await
                .unwrap()
                .is_some()
        );
        let response = app.get(OPS, "/v1/costs/summary").await;
        let summary: Value = response.json().await.unwrap();
        assert_eq!(summary["delivery"]["status"], "ok");
        assert_eq!(summary["delivery"]["email"], true);
        let redis = app.store.redis();
        let mut connection = redis.connection();
        redis::cmd("DEL")
            .arg(redis.keys().scheduler_delivery())
            .query_async::<()>(&mut connection)
            .await
            .unwrap();
        browser
            .wait_for_text("#delivery-banner", "No scheduler has reported in the last minute")
            .await;

        // Hidden: no more requests, and the page says it is paused; shown again: it catches up.
        browser
            .client
            .execute(
                "Object.defineProperty(document, 'hidden', { configurable: true, get: () => true }); \
                 document.dispatchEvent(new Event('visibilitychange'))",
                vec![],
            )
            .await
            .unwrap();
        browser.wait_for_text("#updated", "paused while this tab is hidden").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = loads(browser).await;
        tokio::time::sleep(Duration::from_millis(3000)).await;
        assert_eq!(loads(browser).await, before, "it refreshed while hidden");
        browser
            .client
            .execute(
                "Object.defineProperty(document, 'hidden', { configurable: true, get: () => false }); \
                 document.dispatchEvent(new Event('visibilitychange'))",
                vec![],
            )
            .await
            .unwrap();
        wait_for_attr(browser, "#dashboard", "data-loads", |n| {
            n.parse::<u64>().unwrap() > before + 1
        })
        .await;
        assert!(browser.text("#updated").await.contains("refreshes every 1 s"));
    })
    .await;
}

#[tokio::test]
async fn over_budget_the_budget_card_warns_and_the_labels_stay_apart() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            ..Options::default()
        },
        |settings| {
            // A budget a single job passes many times over, so the 80% and 100% marks and the
            // projection crowd together.
            settings.budget.monthly_micros = 2_000;
            settings.budget.thresholds = vec![50, 80, 100];
            settings.budget.policy = shared::config::BudgetPolicyKind::Alert;
        },
    )
    .await;
    let id = app
        .submit(BOB, json!({"prompt": "a paper boat on a pond"}))
        .await;
    let job = app.wait_until_terminal(BOB, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    with_browser(async |browser| {
        browser.client.goto(&app.url("/dashboard")).await.unwrap();
        browser.sign_in(OPS).await;
        browser.wait_for("#dashboard[data-state='ready']").await;
        assert_eq!(browser.attr("#budget-card", "data-level").await, "over");
        assert_eq!(
            browser.text("#budget-title").await.to_lowercase(),
            "over budget"
        );
        let percent = browser.text("#budget-percent").await;
        assert!(percent.ends_with("% used"), "{percent}");
        let value: f64 = percent.trim_end_matches("% used").parse().unwrap();
        assert!(value > 100.0, "{percent}");
        // The card is red, not the grey of a budget within bounds.
        let colour = browser
            .client
            .execute(
                "return getComputedStyle(document.getElementById('budget-card')).backgroundColor",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(colour, json!("rgb(254, 243, 242)"));
        let used = browser.text("#budget-used").await;
        assert!(
            used.contains("over") && used.contains("Soft limit"),
            "{used}"
        );
        // Plain words: which alert levels were passed.
        let levels = browser.text("#thresholds").await;
        assert!(levels.contains("80% of the budget"), "{levels}");
        assert!(levels.contains("passed, operators alerted"), "{levels}");
        // The projection is drawn large enough to see.
        let dot = browser
            .attr("#pace-chart g.projection circle.projection-dot", "r")
            .await;
        assert!(dot.parse::<f64>().unwrap() >= 5.0);
        browser
            .wait_for("#pace-chart g.projection text[data-kind='projected']")
            .await;
        for width in WIDTHS {
            browser.set_width(width).await;
            browser
                .assert_no_horizontal_overflow(width, "the over-budget dashboard")
                .await;
            assert_apart(browser, "#budget-meter .label", width).await;
            assert_apart(browser, "#pace-chart text[data-kind]", width).await;
            browser
                .save_screenshot_at("dashboard-over-budget", width)
                .await;
        }
    })
    .await;
}

fn month_before(month: &str) -> String {
    let (year, month) = month.split_once('-').unwrap();
    let (year, month): (i32, u32) = (year.parse().unwrap(), month.parse().unwrap());
    if month == 1 {
        format!("{}-12", year - 1)
    } else {
        format!("{year}-{:02}", month - 1)
    }
}

#[tokio::test]
async fn an_ended_month_says_so_a_future_one_is_refused_and_a_download_message_does_not_linger() {
    let app = spawn_api().await;
    let current = chrono::Utc::now().format("%Y-%m").to_string();
    let previous = month_before(&current);
    let next_year = chrono::Utc::now()
        .format("%Y")
        .to_string()
        .parse::<i32>()
        .unwrap()
        + 1;
    let future = format!("{next_year}-01");

    // The api refuses a month still to come, saying why, on every cost endpoint.
    for path in [
        format!("/v1/costs/summary?month={future}"),
        format!("/v1/costs/months?month={future}"),
        format!("/v1/costs/export.csv?month={future}"),
    ] {
        let response = app.get(OPS, &path).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_query", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&future) && message.contains("has not begun"),
            "{message}"
        );
    }
    // Month over month: twelve months by default, ending with the one asked for; ops only.
    let response = app
        .get(OPS, &format!("/v1/costs/months?month={previous}"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let months: Value = response.json().await.unwrap();
    let listed = months["months"].as_array().unwrap();
    assert_eq!(listed.len(), 12);
    assert_eq!(listed[11]["month"], previous.as_str());
    assert_eq!(listed[10]["month"], month_before(&previous).as_str());
    let response = app.get(OPS, "/v1/costs/months?count=3").await;
    let months: Value = response.json().await.unwrap();
    assert_eq!(months["months"].as_array().unwrap().len(), 3);
    assert_eq!(months["months"][2]["month"], current.as_str());
    for count in ["0", "37", "x"] {
        let response = app
            .get(OPS, &format!("/v1/costs/months?count={count}"))
            .await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{count}"
        );
    }
    assert_eq!(
        app.get(ALICE, "/v1/costs/months").await.status(),
        StatusCode::FORBIDDEN
    );

    with_browser(async |browser| {
        browser.client.goto(&app.url("/dashboard")).await.unwrap();
        browser.sign_in(OPS).await;
        browser.wait_for("#dashboard[data-state='ready']").await;
        // The picker offers no month after this one.
        assert_eq!(browser.attr("#month", "max").await, current);

        // A download's message belongs to its month.
        browser.click("#download-csv").await;
        browser.wait_for_text("#download-status", "Saved").await;
        pick_month(browser, &previous).await;
        browser
            .wait_for(&format!(
                "#dashboard[data-state='ready'][data-month='{previous}']"
            ))
            .await;
        assert_eq!(browser.text("#download-status").await, "");

        // An ended month with nothing billed says so in the past tense, naming the month.
        let name = chrono::NaiveDate::parse_from_str(&format!("{previous}-01"), "%Y-%m-%d")
            .unwrap()
            .format("%B %Y")
            .to_string();
        assert_eq!(browser.text("#period").await, "Whole month");
        let chart = browser.text("#daily-chart").await;
        assert!(
            chart.contains(&format!("Nothing was billed in {name}")),
            "{chart}"
        );
        assert!(!chart.contains("this month yet"), "{chart}");
        let agents = browser.text("#by-agent tbody").await;
        assert!(
            agents.contains(&format!("Nothing was billed in {name}")),
            "{agents}"
        );
        let projection = browser.text("#projection").await;
        assert!(
            projection.starts_with(&format!("{name} ended at")),
            "{projection}"
        );
        for width in WIDTHS {
            browser.set_width(width).await;
            browser
                .assert_no_horizontal_overflow(width, "an ended month")
                .await;
        }
        browser.set_width(1280).await;

        // A month still to come is not shown: the picker goes back to this month and says why.
        pick_month(browser, &future).await;
        let error = browser.wait_for_text("#error", "has not begun yet").await;
        assert!(error.contains(&format!("January {next_year}")), "{error}");
        browser
            .wait_for(&format!(
                "#dashboard[data-state='ready'][data-month='{current}']"
            ))
            .await;
        let picked = browser
            .wait_for("#month")
            .await
            .prop("value")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(picked, current);
        assert_eq!(browser.text("#period").await, "Month to date");
    })
    .await;
}

#[tokio::test]
async fn real_spend_is_not_flagged_as_simulated_possibly_billed_calls_are_explained_and_a_nearly_spent_budget_warns()
 {
    let app = spawn_api().await;
    let now = chrono::Utc::now();
    let month = now.format("%Y-%m").to_string();
    let day = now.format("%d").to_string();
    // A month as the ledger writes it for real providers' calls (`daymodel` marks a call a real
    // provider served), one of them possibly billed, and a model the price table gives no name.
    let fields: Vec<(String, i64)> = vec![
        ("total".into(), 60_000_000),
        ("calls".into(), 4),
        (format!("day:{day}"), 60_000_000),
        ("provider:openai".into(), 60_000_000),
        ("agent:create".into(), 60_000_000),
        ("model:openai:gpt-image-2".into(), 59_900_000),
        ("model:openai:my-tuned-model".into(), 100_000),
        (format!("daymodel:{day}:openai:gpt-image-2"), 59_900_000),
        (format!("daymodel:{day}:openai:my-tuned-model"), 100_000),
        ("user:alice".into(), 60_000_000),
        (format!("cell:{day}:openai:create"), 60_000_000),
        (format!("cellcalls:{day}:openai:create"), 4),
        ("possibly:total".into(), 500_000),
        ("possibly:calls".into(), 1),
    ];
    let redis = app.store.redis();
    let mut connection = redis.connection();
    redis::cmd("HSET")
        .arg(redis.keys().costs(&month))
        .arg(&fields)
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
    let summary: Value = app
        .get(OPS, "/v1/costs/summary")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(summary["simulated_micros"], 0, "{summary:#}");
    with_browser(async |browser| {
        browser.client.goto(&app.url("/dashboard")).await.unwrap();
        browser.sign_in(OPS).await;
        browser.wait_for("#dashboard[data-state='ready']").await;
        assert_eq!(browser.text("#total").await, "$60.00");
        // $60 of the default $70 budget is past its 80% alert level: amber, not yet red.
        assert_eq!(browser.attr("#budget-card", "data-level").await, "warn");
        assert_eq!(
            browser.text("#budget-title").await.to_lowercase(),
            "budget nearly used"
        );
        assert_eq!(browser.text("#budget-percent").await, "85.7% used");
        let colour = browser
            .client
            .execute(
                "return getComputedStyle(document.getElementById('budget-card')).backgroundColor",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(colour, json!("rgb(255, 248, 197)"));
        let possibly = browser.text("#possibly-billed").await;
        assert!(
            possibly
                .starts_with("Includes $0.500000 for 1 call that may or may not have been billed"),
            "{possibly}"
        );
        for hidden in ["#simulated-note", "#openai-simulated", "#gemini-simulated"] {
            assert!(
                browser
                    .wait_for(hidden)
                    .await
                    .attr("hidden")
                    .await
                    .unwrap()
                    .is_some(),
                "{hidden} is shown for real spend"
            );
        }
        let models = browser.text("#by-model tbody").await;
        assert!(!models.contains("simulated"), "{models}");
        assert!(
            row_label(browser, "by-model", "my-tuned-model").await == "my-tuned-model",
            "a model without a name is shown by its id alone"
        );
        for width in WIDTHS {
            browser.set_width(width).await;
            browser
                .assert_no_horizontal_overflow(width, "real spend")
                .await;
        }
    })
    .await;
}
