//! Metrics as Prometheus scrapes them: real `pictor-api` and `pictor-worker` processes (each
//! with its own recorder, as in production), real jobs, then `/metrics` checked for the counters
//! and histograms that should have moved, and linted by `promtool check metrics`.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tests::harness::{ALICE, OPS, TestApp, metric_sample, spawn_api, workspace_binary};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn scrape(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

async fn wait_until_up(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reqwest::get(url)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "{url} never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn promtool_accepts(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/services.sh");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn process(app: &TestApp, binary: &str, extra: &[(&str, String)]) -> tokio::process::Child {
    tokio::process::Command::new(workspace_binary(binary))
        .envs(app.worker_env())
        .env(
            "PICTOR_API_KEYS",
            format!("alice:user:{ALICE},ops:ops:{OPS}"),
        )
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("process starts")
}

#[tokio::test]
async fn real_jobs_move_the_api_and_worker_metrics() {
    let app = spawn_api().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.9, "a kite", None).await;
    openai.images_generate_ok().await;
    let (api_port, api_metrics_port, worker_port) = (free_port(), free_port(), free_port());
    let api = format!("http://127.0.0.1:{api_port}");
    let api_metrics = format!("http://127.0.0.1:{api_metrics_port}/metrics");
    let worker_metrics = format!("http://127.0.0.1:{worker_port}/metrics");
    let _api = process(
        &app,
        "pictor-api",
        &[
            ("PICTOR_API_ADDR", format!("127.0.0.1:{api_port}")),
            (
                "PICTOR_API_METRICS_ADDR",
                format!("127.0.0.1:{api_metrics_port}"),
            ),
        ],
    );
    let _worker = process(
        &app,
        "pictor-worker",
        &[(
            "PICTOR_WORKER_METRICS_ADDR",
            format!("127.0.0.1:{worker_port}"),
        )],
    );
    wait_until_up(&format!("{api}/healthz")).await;
    wait_until_up(&worker_metrics).await;

    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let response = client
            .post(format!("{api}/v1/jobs"))
            .bearer_auth(ALICE)
            .json(&json!({"prompt": "a kite"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        ids.push(
            response.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let bad = client
        .post(format!("{api}/v1/jobs"))
        .bearer_auth(ALICE)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    for id in &ids {
        app.wait_until_terminal(ALICE, id).await;
    }

    // Prometheus scrapes the private address; the public port shows them to operators only.
    let text = scrape(&api_metrics).await;
    promtool_accepts(&text);
    let anonymous = client.get(format!("{api}/metrics")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let user = client
        .get(format!("{api}/metrics"))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(user.status(), 403);
    let ops = client
        .get(format!("{api}/metrics"))
        .bearer_auth(tests::harness::OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(ops.status(), 200);
    assert!(
        ops.text()
            .await
            .unwrap()
            .contains("pictor_jobs_accepted_total")
    );
    assert_eq!(
        metric_sample(&text, "pictor_jobs_accepted_total", &[]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric_sample(
            &text,
            "pictor_jobs_rejected_total",
            &[("reason", "prompt_required")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_sample(
            &text,
            "pictor_http_requests_total",
            &[
                ("route", "/v1/jobs"),
                ("method", "POST"),
                ("status_class", "2xx")
            ]
        ),
        Some(2.0)
    );
    assert!(!text.contains(&ids[0]), "no job id in any label");

    // The worker's gauges are sampled every 5 s; counters move as jobs finish. A sample reads
    // the queues before the budget, so the first one to see the jobs' spend may have read the
    // queue before the consumer was registered: wait for a sample that saw both.
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape(&worker_metrics).await;
        let sampled_after_the_jobs =
            metric_sample(&text, "pictor_budget_spent_ratio", &[]).is_some_and(|ratio| ratio > 0.0);
        if metric_sample(&text, "pictor_queue_consumers", &[("queue", "jobs")]) == Some(1.0)
            && sampled_after_the_jobs
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "queue gauges never appeared: {text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    promtool_accepts(&text);
    let finished = [("outcome", "succeeded"), ("intent", "create")];
    assert_eq!(
        metric_sample(&text, "pictor_jobs_finished_total", &finished),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric_sample(
            &text,
            "pictor_job_duration_seconds_count",
            &[("outcome", "succeeded")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_sample(
            &text,
            "pictor_agent_runs_total",
            &[("agent", "router"), ("outcome", "handoff")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_sample(
            &text,
            "pictor_agent_runs_total",
            &[("agent", "create"), ("outcome", "ok")]
        ),
        Some(2.0)
    );
    let image_calls = [
        ("provider", "openai"),
        ("model", "gpt-image-2"),
        ("status_class", "2xx"),
    ];
    assert_eq!(
        metric_sample(&text, "pictor_provider_requests_total", &image_calls),
        Some(2.0)
    );
    // Two creates at 31,730 micro-dollars (10 text tokens at $5 + 1,056 image tokens at $30 per
    // 1M) and two router calls at 87.
    assert_eq!(
        metric_sample(
            &text,
            "pictor_cost_microdollars_total",
            &[("agent", "create")]
        ),
        Some(63_460.0)
    );
    assert_eq!(
        metric_sample(
            &text,
            "pictor_cost_microdollars_total",
            &[("agent", "router")]
        ),
        Some(174.0)
    );
    assert_eq!(
        metric_sample(&text, "pictor_queue_consumers", &[("queue", "jobs")]),
        Some(1.0)
    );
    assert_eq!(
        metric_sample(&text, "pictor_jobs_in_flight", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric_sample(&text, "pictor_provider_cooldown", &[("provider", "gemini")]),
        Some(0.0)
    );
    assert!(metric_sample(&text, "pictor_budget_spent_ratio", &[]).unwrap() > 0.0);
    let bucket = metric_sample(
        &text,
        "pictor_job_duration_seconds_bucket",
        &[("outcome", "succeeded"), ("le", "120")],
    );
    assert_eq!(bucket, Some(2.0), "histograms have the documented buckets");
}
