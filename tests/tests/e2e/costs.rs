//! The operators' cost reports: `GET /v1/costs/summary` and `GET /v1/costs/export.csv` agree
//! with the jobs and with each other to the micro-dollar, the CSV is real RFC 4180 with FOCUS
//! column names, and `pictor admin costs rebuild` restores damaged aggregates from the ledger.
//!
//! Ledger entries carry the wall-clock time of the call, so a test whose jobs straddle a UTC
//! month boundary reads every month its jobs touched instead of assuming one.

use std::collections::BTreeMap;

use base64::Engine;
use chrono::{DateTime, Datelike, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::domain::{JobId, Usage, UserId};
use shared::ledger::{Billing, BudgetPolicy, Ledger, LedgerEntry, Month, MonthCosts};
use shared::pricing::parse_usd_micros;
use tests::harness::{
    ALICE, BOB, OPS, Options, TestApp, spawn_api, spawn_app, spawn_app_with, spawn_simulated,
};

const CALL_HEADER: [&str; 24] = [
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "BillingCurrency",
    "BilledCost",
    "EffectiveCost",
    "ServiceName",
    "ResourceId",
    "ChargeCategory",
    "ChargeDescription",
    "x_JobId",
    "x_User",
    "x_Agent",
    "x_Provider",
    "x_Simulated",
    "x_InputTextTokens",
    "x_InputImageTokens",
    "x_CachedInputTokens",
    "x_OutputTextTokens",
    "x_OutputImageTokens",
    "x_Images",
    "x_Size",
    "x_Quality",
    "x_CostMicros",
    "x_Billing",
];

const DAY_HEADER: [&str; 12] = [
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "BillingCurrency",
    "BilledCost",
    "EffectiveCost",
    "ServiceName",
    "ChargeCategory",
    "x_Provider",
    "x_Agent",
    "x_Calls",
    "x_CostMicros",
    "x_PossiblyBilledMicros",
];

fn ledger(app: &TestApp) -> Ledger {
    app.store
        .redis()
        .ledger(BudgetPolicy::from(&app.settings.budget))
}

/// The months between two instants, one or two of them.
fn months_between(start: DateTime<Utc>, end: DateTime<Utc>) -> Vec<Month> {
    let mut months = vec![Month::of(start)];
    if Month::of(end) != months[0] {
        months.push(Month::of(end));
    }
    months
}

/// A finished job and what it cost.
struct Billed {
    id: String,
    user: &'static str,
    agent: &'static str,
    cost_micros: i64,
    cost_usd: f64,
}

/// Runs, against the mock providers, a create of two images for alice, a create of one image
/// for bob, and an edit on Gemini for alice: six billed calls (a router call and an image call
/// per job).
async fn run_mocked_jobs(app: &TestApp) -> Vec<Billed> {
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("create", 0.95, "a lighthouse at dawn", None)
        .await;
    openai.images_generate_ok().await;
    let mut submitted = vec![
        (
            app.submit(
                ALICE,
                json!({"prompt": "a lighthouse at dawn", "size": "1024x1024", "n": 2}),
            )
            .await,
            "alice",
            ALICE,
            "create",
        ),
        (
            app.submit(
                BOB,
                json!({"prompt": "a red barn", "size": "1024x1024", "n": 1}),
            )
            .await,
            "bob",
            BOB,
            "create",
        ),
    ];
    for (id, _, key, _) in &submitted {
        let job = app.wait_until_terminal(key, id).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
    }
    // The router mock answers one intent; the creates are done, so swap it for an edit.
    openai.server.reset().await;
    openai
        .router_answers("edit", 0.9, "make the sky purple", None)
        .await;
    app.gemini.as_ref().unwrap().edit_ok().await;
    let image = base64::engine::general_purpose::STANDARD.encode(tests::mocks::png(16, 16, 3));
    let edit = app
        .submit(
            ALICE,
            json!({"prompt": "make the sky purple", "image": {"data": image, "mime_type": "image/png"}}),
        )
        .await;
    submitted.push((edit, "alice", ALICE, "edit"));

    let mut billed = Vec::new();
    for (id, user, key, agent) in submitted {
        let job = app.wait_until_terminal(key, &id).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
        let stored = app
            .store
            .get(JobId::parse(&id).unwrap())
            .await
            .unwrap()
            .unwrap();
        billed.push(Billed {
            id,
            user,
            agent,
            cost_micros: stored.cost_micros,
            cost_usd: job["cost_usd"].as_f64().unwrap(),
        });
    }
    billed
}

async fn summary(app: &TestApp, month: Month) -> Value {
    let response = app
        .get(OPS, &format!("/v1/costs/summary?month={month}"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// The export's body, asserting the download headers.
async fn export(app: &TestApp, month: Month, granularity: &str) -> String {
    let response = app
        .get(
            OPS,
            &format!("/v1/costs/export.csv?month={month}&granularity={granularity}"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    assert_eq!(
        response.headers()["content-disposition"],
        format!("attachment; filename=\"pictor-costs-{month}-{granularity}.csv\"").as_str()
    );
    response.text().await.unwrap()
}

/// Parses RFC 4180 CSV (strictly: every record as long as the header) into named rows.
fn parse_csv(body: &str, expected_header: &[&str]) -> Vec<BTreeMap<String, String>> {
    assert!(body.ends_with("\r\n"), "RFC 4180 records end in CRLF");
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(body.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header, expected_header);
    reader
        .records()
        .map(|record| {
            let record = record.unwrap();
            header
                .iter()
                .cloned()
                .zip(record.iter().map(String::from))
                .collect()
        })
        .collect()
}

fn micros_of(row: &BTreeMap<String, String>, column: &str) -> i64 {
    parse_usd_micros(&row[column]).unwrap()
}

fn usd_sum(object: &Value) -> f64 {
    object
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test]
async fn cost_reports_are_for_operators_only() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    for path in [
        "/v1/costs/summary",
        "/v1/costs/export.csv",
        "/v1/costs/export.csv?granularity=day",
    ] {
        let response = app.get(ALICE, path).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "forbidden", "{path}");

        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{path}");

        assert_eq!(app.get(OPS, path).await.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn a_month_that_is_not_yyyy_mm_or_an_unknown_granularity_is_refused_with_422() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    for path in [
        "/v1/costs/summary?month=2026-13",
        "/v1/costs/summary?month=last",
        "/v1/costs/export.csv?month=2026-13",
        "/v1/costs/export.csv?granularity=week",
    ] {
        let response = app.get(OPS, path).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_query", "{path}");
    }
}

#[tokio::test]
async fn an_empty_month_summarises_to_zero_with_every_day_listed() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let before = Utc::now();
    let response = app.get(OPS, "/v1/costs/summary").await;
    assert_eq!(response.status(), StatusCode::OK);
    let current: Value = response.json().await.unwrap();
    let after = Utc::now();
    // Without `month`, the current UTC month up to today.
    let today = if current["month"] == Month::of(before).to_string() {
        before
    } else {
        after
    };
    assert_eq!(current["month"], Month::of(today).to_string());
    assert_eq!(
        current["by_day"].as_array().unwrap().len(),
        today.day() as usize
    );

    let past = summary(&app, Month::parse("2024-02").unwrap()).await;
    assert_eq!(past["total_usd"], 0.0);
    assert_eq!(past["calls"], 0);
    assert_eq!(past["by_provider"], json!({"openai": 0.0, "gemini": 0.0}));
    let days = past["by_day"].as_array().unwrap();
    assert_eq!(days.len(), 29, "a leap February, every day");
    assert_eq!(
        days[28],
        json!({"date": "2024-02-29", "usd": 0.0, "by_provider": {"openai": 0.0, "gemini": 0.0}})
    );
    assert_eq!(past["budget"]["thresholds"], json!([80, 100]));
    assert_eq!(past["budget"]["thresholds_crossed"], json!([]));
    assert_eq!(
        past["budget"]["policy"], "block",
        "budgets block by default"
    );

    let empty = export(&app, Month::parse("2024-02").unwrap(), "call").await;
    assert!(parse_csv(&empty, &CALL_HEADER).is_empty());
    let empty = export(&app, Month::parse("2024-02").unwrap(), "day").await;
    assert!(parse_csv(&empty, &DAY_HEADER).is_empty());
}

#[tokio::test]
async fn the_summary_and_both_exports_agree_with_the_jobs_to_the_micro_dollar() {
    // A $0.20 budget, so these jobs (about $0.17) cross the 80% threshold but not 100%. Under
    // the default blocking policy the last calls' worst-case holds would not fit; this test is
    // about the figures, so the budget only alerts.
    let app = spawn_app_with(Options::default(), |s| {
        s.budget.monthly_micros = 200_000;
        s.budget.policy = shared::config::BudgetPolicyKind::Alert;
    })
    .await;
    let started = Utc::now();
    let jobs = run_mocked_jobs(&app).await;
    let months = months_between(started, Utc::now());

    // Router: 87 micro-dollars a call (see jobs.rs). Creates on gpt-image-2: 63,410 for two
    // images, 31,730 for one. The Gemini edit on gemini-3.1-flash-image: 10 text tokens at
    // $0.50 + 1,290 image tokens at $0.50 + 8 text tokens at $3 + 1,290 image tokens at $60 per
    // 1M = 5 + 645 + 24 + 77,400 = 78,074.
    let expected = 3 * 87 + 63_410 + 31_730 + 78_074;
    let job_micros: i64 = jobs.iter().map(|job| job.cost_micros).sum();
    let job_usd: f64 = jobs.iter().map(|job| job.cost_usd).sum();
    assert_eq!(job_micros, expected);
    assert!(close(job_usd, 0.173_475), "{job_usd}");

    let (mut summary_micros, mut summary_usd, mut calls) = (0, 0.0, 0);
    let (mut call_csv_micros, mut day_csv_micros, mut day_csv_calls) = (0, 0, 0);
    let mut by_user: BTreeMap<String, f64> = BTreeMap::new();
    for month in &months {
        let summary = summary(&app, *month).await;
        assert_eq!(summary["month"], month.to_string());
        assert_eq!(summary["currency"], "USD");
        let total = summary["total_usd"].as_f64().unwrap();
        summary_micros += summary["total_micros"].as_i64().unwrap();
        summary_usd += total;
        calls += summary["calls"].as_i64().unwrap();
        assert!(
            close(usd_sum(&summary["by_provider"]), total),
            "{summary:#}"
        );
        assert!(close(usd_sum(&summary["by_agent"]), total), "{summary:#}");
        assert!(close(usd_sum(&summary["by_model"]), total), "{summary:#}");
        assert!(close(
            summary["openai_usd"].as_f64().unwrap() + summary["gemini_usd"].as_f64().unwrap(),
            total
        ));
        let days = summary["by_day"].as_array().unwrap();
        let day_total: f64 = days.iter().map(|day| day["usd"].as_f64().unwrap()).sum();
        assert!(close(day_total, total), "{summary:#}");
        for day in days {
            assert!(close(
                usd_sum(&day["by_provider"]),
                day["usd"].as_f64().unwrap()
            ));
        }
        for user in summary["by_user"].as_array().unwrap() {
            *by_user
                .entry(user["user"].as_str().unwrap().to_string())
                .or_insert(0.0) += user["usd"].as_f64().unwrap();
        }
        if months.len() == 1 {
            assert_eq!(summary["gemini_micros"], 78_074);
            assert!(close(
                summary["by_agent"]["edit"].as_f64().unwrap(),
                0.078_074
            ));
            assert!(close(
                summary["by_model"]["gpt-image-2"].as_f64().unwrap(),
                0.095_140
            ));
            assert_eq!(summary["active_users"], 2);
            assert_eq!(
                summary["by_user"][0]["user"], "alice",
                "most expensive first"
            );
            let budget = &summary["budget"];
            assert!(close(budget["spent_usd"].as_f64().unwrap(), 0.173_475));
            assert_eq!(budget["reserved_usd"], 0.0, "every hold was settled");
            // 173,475 / 200,000 = 86.7375%.
            assert_eq!(budget["percent"], 86.7);
            assert_eq!(budget["thresholds_crossed"], json!([80]));
        }

        let call_rows = parse_csv(&export(&app, *month, "call").await, &CALL_HEADER);
        for row in &call_rows {
            assert_eq!(
                micros_of(row, "BilledCost"),
                micros_of(row, "EffectiveCost")
            );
            assert_eq!(
                micros_of(row, "BilledCost"),
                row["x_CostMicros"].parse::<i64>().unwrap()
            );
            call_csv_micros += micros_of(row, "BilledCost");
        }
        let day_rows = parse_csv(&export(&app, *month, "day").await, &DAY_HEADER);
        for row in &day_rows {
            assert_eq!(
                micros_of(row, "BilledCost"),
                row["x_CostMicros"].parse::<i64>().unwrap()
            );
            day_csv_micros += micros_of(row, "BilledCost");
            day_csv_calls += row["x_Calls"].parse::<i64>().unwrap();
        }
    }
    assert_eq!(summary_micros, job_micros);
    assert!(close(summary_usd, job_usd));
    assert_eq!(calls, 6, "a router call and an image call per job");
    assert_eq!(call_csv_micros, job_micros);
    assert_eq!((day_csv_micros, day_csv_calls), (job_micros, 6));
    let user_cost = |user: &str| -> f64 {
        jobs.iter()
            .filter(|job| job.user == user)
            .map(|job| job.cost_usd)
            .sum()
    };
    assert!(close(by_user["alice"], user_cost("alice")));
    assert!(close(by_user["bob"], user_cost("bob")));

    if months.len() == 1 {
        // The summary's crossed thresholds are the ones the ledger announced.
        let announced: Vec<u32> = ledger(&app)
            .budget_events()
            .await
            .unwrap()
            .iter()
            .map(|event| event.threshold)
            .collect();
        assert_eq!(announced, [80]);
    }
}

#[tokio::test]
async fn the_call_export_is_rfc_4180_with_one_row_per_billed_call() {
    let app = spawn_app().await;
    let started = Utc::now();
    let jobs = run_mocked_jobs(&app).await;
    let mut rows = Vec::new();
    for month in months_between(started, Utc::now()) {
        rows.extend(parse_csv(&export(&app, month, "call").await, &CALL_HEADER));
    }
    assert_eq!(rows.len(), 6, "a router call and an image call per job");

    for job in &jobs {
        let own: Vec<&BTreeMap<String, String>> =
            rows.iter().filter(|row| row["x_JobId"] == job.id).collect();
        let agents: Vec<&str> = own.iter().map(|row| row["x_Agent"].as_str()).collect();
        assert_eq!(agents, ["router", job.agent], "job {}", job.id);
        let cost: i64 = own.iter().map(|row| micros_of(row, "BilledCost")).sum();
        assert_eq!(cost, job.cost_micros, "job {}", job.id);
        for row in &own {
            assert_eq!(row["x_User"], job.user);
            assert_eq!(row["BillingCurrency"], "USD");
            assert_eq!(row["ChargeCategory"], "Usage");
            assert_eq!(row["x_Simulated"], "false");
            assert_eq!(row["ChargeDescription"], format!("{} call", row["x_Agent"]));
            let at = DateTime::parse_from_rfc3339(&row["ChargePeriodStart"]).unwrap();
            assert!(row["ChargePeriodStart"].ends_with('Z'), "UTC");
            assert_eq!(row["ChargePeriodEnd"], row["ChargePeriodStart"]);
            assert!(at.with_timezone(&Utc) >= started - chrono::Duration::seconds(1));
        }
        let router = own[0];
        assert_eq!(router["ServiceName"], "OpenAI");
        assert_eq!(router["x_Provider"], "openai");
        assert_eq!(router["ResourceId"], app.settings.openai.router_model);
        assert_eq!(router["x_CostMicros"], "87");
        assert_eq!(router["x_InputTextTokens"], "120");
        let image = own[1];
        if job.agent == "edit" {
            assert_eq!(image["ServiceName"], "Gemini");
            assert_eq!(image["x_Provider"], "gemini");
            assert_eq!(image["ResourceId"], app.settings.gemini.image_model);
            assert_eq!(image["x_OutputImageTokens"], "1290");
        } else {
            assert_eq!(image["ServiceName"], "OpenAI");
            assert_eq!(image["ResourceId"], app.settings.openai.image_model);
            assert_eq!(image["x_Quality"], "medium");
            assert_eq!(image["x_Size"], "1024x1024");
        }
    }
    let alice_two_images = &jobs[0];
    let image = rows
        .iter()
        .find(|row| row["x_JobId"] == alice_two_images.id && row["x_Agent"] == "create")
        .unwrap();
    assert_eq!(image["x_Images"], "2");
    assert_eq!(image["BilledCost"], "0.063410");
}

#[tokio::test]
async fn the_call_export_streams_a_month_larger_than_one_batch_with_a_single_header() {
    let app = spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    // 1,203 calls in a past month: more than two batches of the export, and a ragged last one.
    let ledger = ledger(&app);
    let start = DateTime::parse_from_rfc3339("2025-03-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let user = UserId::parse("alice").unwrap();
    let calls = 1_203;
    let mut ids = Vec::new();
    for index in 0..calls {
        let entry = LedgerEntry {
            at: start + chrono::Duration::minutes(index * 30),
            job_id: JobId::new(),
            user: user.clone(),
            usage: Usage {
                agent: "router".into(),
                provider: "openai".into(),
                model: "gpt-4.1-mini".into(),
                input_text_tokens: 120,
                output_text_tokens: 24,
                ..Usage::default()
            },
            cost_micros: 87 + index,
            billing: Billing::Billed,
        };
        ids.push(entry.job_id.to_string());
        ledger.record(&entry, None).await.unwrap();
    }
    let month = Month::parse("2025-03").unwrap();

    let body = export(&app, month, "call").await;
    assert_eq!(
        body.matches("ChargePeriodStart").count(),
        1,
        "one header row"
    );
    let rows = parse_csv(&body, &CALL_HEADER);
    let exported: Vec<&str> = rows.iter().map(|row| row["x_JobId"].as_str()).collect();
    assert_eq!(exported, ids, "every call once, in ledger order");
    let total: i64 = rows.iter().map(|row| micros_of(row, "BilledCost")).sum();
    assert_eq!(total, calls * 87 + calls * (calls - 1) / 2);
    assert_eq!(rows[0]["ChargePeriodStart"], "2025-03-01T00:00:00Z");

    // 48 calls a day for 25 days and 3 on the 26th: one daily row each, summing to the same.
    let days = parse_csv(&export(&app, month, "day").await, &DAY_HEADER);
    assert_eq!(days.len(), 26);
    assert_eq!(days[0]["ChargePeriodStart"], "2025-03-01T00:00:00Z");
    assert_eq!(days[0]["ChargePeriodEnd"], "2025-03-02T00:00:00Z");
    assert_eq!(days[0]["x_Calls"], "48");
    assert_eq!(days[25]["x_Calls"], "3");
    let day_total: i64 = days.iter().map(|row| micros_of(row, "BilledCost")).sum();
    assert_eq!(day_total, total);

    let summary = summary(&app, month).await;
    assert_eq!(summary["total_micros"], total);
    assert_eq!(summary["calls"], calls);
    assert_eq!(summary["by_day"].as_array().unwrap().len(), 31);
}

/// A month whose first calls were entered before ledger entries were packed (one stream field
/// per value) and the rest after (one `entry` field) exports every call, in order, to the cent.
#[tokio::test]
async fn a_month_that_spans_the_packing_of_ledger_entries_exports_every_call() {
    let app = spawn_api().await;
    let month = Month::parse("2025-04").unwrap();
    let stream = app.store.keys().ledger(&month.to_string());
    let old_job = JobId::new();
    let mut connection = app.store.redis().connection();
    // As the release before the packing wrote it.
    redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&[
            ("at", "2025-04-02T08:00:00.250000Z".to_string()),
            ("job_id", old_job.to_string()),
            ("user", "alice".to_string()),
            ("agent", "create".to_string()),
            ("provider", "openai".to_string()),
            ("model", "gpt-image-2".to_string()),
            ("simulated", "0".to_string()),
            ("input_text_tokens", "50".to_string()),
            ("input_image_tokens", "0".to_string()),
            ("cached_input_tokens", "0".to_string()),
            ("output_text_tokens", "0".to_string()),
            ("output_image_tokens", "1056".to_string()),
            ("images", "1".to_string()),
            ("size", "1024x1024".to_string()),
            ("quality", "medium".to_string()),
            ("cost_micros", "31930".to_string()),
            ("billing", "billed".to_string()),
        ])
        .query_async::<String>(&mut connection)
        .await
        .unwrap();
    let new = LedgerEntry {
        at: DateTime::parse_from_rfc3339("2025-04-03T09:30:00Z")
            .unwrap()
            .with_timezone(&Utc),
        job_id: JobId::new(),
        user: UserId::parse("bob").unwrap(),
        usage: Usage {
            agent: "router".into(),
            provider: "openai".into(),
            model: "gpt-4.1-mini".into(),
            input_text_tokens: 412,
            output_text_tokens: 38,
            ..Usage::default()
        },
        cost_micros: 226,
        billing: Billing::PossiblyBilled,
    };
    ledger(&app).record(&new, None).await.unwrap();
    let fields: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await
        .unwrap();
    let names: Vec<usize> = fields.iter().map(|(_, entry)| entry.len()).collect();
    assert_eq!(names, [17, 1], "the new entry is one field");

    let rows = parse_csv(&export(&app, month, "call").await, &CALL_HEADER);
    let jobs: Vec<&str> = rows.iter().map(|row| row["x_JobId"].as_str()).collect();
    assert_eq!(jobs, [old_job.to_string(), new.job_id.to_string()]);
    assert_eq!(micros_of(&rows[0], "BilledCost"), 31_930);
    assert_eq!(rows[0]["ChargePeriodStart"], "2025-04-02T08:00:00Z");
    assert_eq!(micros_of(&rows[1], "BilledCost"), 226);
    assert_eq!(rows[1]["x_Billing"], "possibly_billed");
    assert_eq!(rows[1]["ChargePeriodStart"], "2025-04-03T09:30:00Z");
}

#[tokio::test]
async fn rebuilding_a_months_costs_from_the_ledger_restores_its_aggregates() {
    let app = spawn_simulated().await;
    let started = Utc::now();
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
    for (key, id) in &ids {
        let job = app.wait_until_terminal(key, id).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
    }
    let months = months_between(started, Utc::now());
    let ledger = ledger(&app);
    let mut originals: Vec<(Month, MonthCosts)> = Vec::new();
    for month in &months {
        originals.push((*month, ledger.month(*month).await.unwrap()));
    }
    let calls: i64 = originals.iter().map(|(_, costs)| costs.get("calls")).sum();
    assert_eq!(calls, 6, "a router and a create call per job");

    let pictor = |month: Month| {
        tokio::process::Command::new(tests::harness::workspace_binary("pictor"))
            .args(["admin", "costs", "rebuild", "--month", &month.to_string()])
            .envs(app.worker_env())
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output()
    };
    let mut connection = app.store.redis().connection();
    for (month, original) in &originals {
        let key = app.store.keys().costs(&month.to_string());
        // Damage: a total that drifted, and a user's line lost.
        let _: i64 = redis::cmd("HINCRBY")
            .arg(&key)
            .arg("total")
            .arg(1_000_000)
            .query_async(&mut connection)
            .await
            .unwrap();
        let _: i64 = redis::cmd("HDEL")
            .arg(&key)
            .arg("user:alice")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_ne!(&ledger.month(*month).await.unwrap(), original);

        let output = pictor(*month).await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("from {} ledger entries", original.get("calls"))),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("({} micro-dollars)", original.total())),
            "{stdout}"
        );
        assert_eq!(&ledger.month(*month).await.unwrap(), original);

        // Lost altogether: the same again.
        let _: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(ledger.month(*month).await.unwrap().fields.is_empty());
        let output = pictor(*month).await.unwrap();
        assert!(output.status.success());
        assert_eq!(&ledger.month(*month).await.unwrap(), original);
    }
}
