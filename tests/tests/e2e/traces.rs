//! Jobs as OpenAI Agents traces: a real `pictor-worker` process exports each job it runs to a
//! mock traces ingest endpoint that is as strict as the real one (any key it does not know is a
//! 400 `unknown_parameter` naming the key's path), and a dead endpoint costs the jobs nothing.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use shared::domain::JobId;
use tests::harness::{ALICE, TestApp, spawn_api, workspace_binary};
use tests::mocks::png;
use tokio::io::AsyncBufReadExt;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

// ---------------------------------------------------------------------------------------------
// A strict ingest endpoint
// ---------------------------------------------------------------------------------------------

const TRACE_KEYS: &[&str] = &["object", "id", "workflow_name", "group_id", "metadata"];
const SPAN_KEYS: &[&str] = &[
    "object",
    "id",
    "trace_id",
    "parent_id",
    "started_at",
    "ended_at",
    "span_data",
    "error",
    "metadata",
];
const ERROR_KEYS: &[&str] = &["message", "data"];
const USAGE_KEYS: &[&str] = &["input_tokens", "output_tokens", "details"];

/// The keys `span_data` may have, by its `type` (`docs/providers.md`, section 5).
fn span_data_keys(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "agent" => &["type", "name", "handoffs", "tools", "output_type"],
        "generation" => &["type", "input", "output", "model", "model_config", "usage"],
        "handoff" => &["type", "from_agent", "to_agent"],
        "custom" => &["type", "name", "data"],
        "function" => &["type", "name", "input", "output", "mcp_data"],
        "response" => &["type", "response_id", "usage"],
        "guardrail" => &["type", "name", "triggered"],
        _ => return None,
    })
}

/// Why the endpoint refuses a body: the `param` path and the error `code`.
#[derive(Debug)]
struct Refusal {
    param: String,
    code: &'static str,
    message: String,
}

fn unknown(param: String) -> Refusal {
    Refusal {
        message: format!("Unknown parameter: '{param}'."),
        param,
        code: "unknown_parameter",
    }
}

fn invalid(param: String, what: &str) -> Refusal {
    Refusal {
        message: format!("Invalid value for '{param}': {what}."),
        param,
        code: "invalid_value",
    }
}

/// Refuses any key of `value` (an object) outside `allowed`.
fn only(value: &Value, allowed: &[&str], at: &str) -> Result<(), Refusal> {
    let object = value
        .as_object()
        .ok_or_else(|| invalid(at.to_string(), "expected an object"))?;
    match object.keys().find(|key| !allowed.contains(&key.as_str())) {
        Some(key) => Err(unknown(format!("{at}.{key}"))),
        None => Ok(()),
    }
}

fn hex_id(value: &Value, prefix: &str, digits: usize, at: String) -> Result<(), Refusal> {
    let ok = value
        .as_str()
        .and_then(|id| id.strip_prefix(prefix))
        .is_some_and(|hex| hex.len() == digits && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(invalid(at, &format!("expected {prefix}<{digits} hex>")))
    }
}

fn timestamp(value: &Value, at: String) -> Result<(), Refusal> {
    match value.as_str().map(chrono::DateTime::parse_from_rfc3339) {
        Some(Ok(_)) => Ok(()),
        _ => Err(invalid(at, "expected an ISO-8601 timestamp")),
    }
}

/// What the real endpoint is known to check, and a little more (formats of ids and times).
fn validate(body: &Value) -> Result<(), Refusal> {
    only(body, &["data"], "body").map_err(|refusal| Refusal {
        param: refusal.param.trim_start_matches("body.").to_string(),
        ..refusal
    })?;
    let data = body["data"]
        .as_array()
        .ok_or_else(|| invalid("data".to_string(), "expected an array"))?;
    if data.len() > 128 {
        return Err(invalid("data".to_string(), "at most 128 items"));
    }
    for (index, item) in data.iter().enumerate() {
        let at = format!("data[{index}]");
        match item["object"].as_str() {
            Some("trace") => {
                only(item, TRACE_KEYS, &at)?;
                hex_id(&item["id"], "trace_", 32, format!("{at}.id"))?;
                if !item["workflow_name"].is_string() {
                    return Err(invalid(format!("{at}.workflow_name"), "expected a string"));
                }
            }
            Some("trace.span") => {
                only(item, SPAN_KEYS, &at)?;
                hex_id(&item["id"], "span_", 24, format!("{at}.id"))?;
                hex_id(&item["trace_id"], "trace_", 32, format!("{at}.trace_id"))?;
                if !item["parent_id"].is_null() {
                    hex_id(&item["parent_id"], "span_", 24, format!("{at}.parent_id"))?;
                }
                timestamp(&item["started_at"], format!("{at}.started_at"))?;
                timestamp(&item["ended_at"], format!("{at}.ended_at"))?;
                if !item["error"].is_null() {
                    only(&item["error"], ERROR_KEYS, &format!("{at}.error"))?;
                }
                let span_data = &item["span_data"];
                let kind = span_data["type"].as_str().unwrap_or_default();
                let allowed = span_data_keys(kind)
                    .ok_or_else(|| invalid(format!("{at}.span_data.type"), "unknown span type"))?;
                only(span_data, allowed, &format!("{at}.span_data"))?;
                if !span_data["usage"].is_null() {
                    if kind != "generation" {
                        return Err(unknown(format!("{at}.span_data.usage")));
                    }
                    only(
                        &span_data["usage"],
                        USAGE_KEYS,
                        &format!("{at}.span_data.usage"),
                    )?;
                }
            }
            _ => {
                return Err(invalid(
                    format!("{at}.object"),
                    "expected trace or trace.span",
                ));
            }
        }
    }
    Ok(())
}

/// The endpoint's verdict on a request: `Err` holds the status and error body it answers.
/// 401 without a bearer key, 400 without `OpenAI-Beta: traces=v1` or on any refused body.
fn verdict(request: &Request) -> Result<(), (u16, Value)> {
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let bearer = header("authorization");
    if bearer.strip_prefix("Bearer ").is_none_or(str::is_empty) {
        return Err((
            401,
            json!({"error": {
                "message": "Missing bearer authentication in header",
                "type": "invalid_request_error", "param": null, "code": "invalid_api_key",
            }}),
        ));
    }
    if header("openai-beta") != "traces=v1" {
        return Err((
            400,
            json!({"error": {
                "message": "The traces API requires the header OpenAI-Beta: traces=v1.",
                "type": "invalid_request_error", "param": null, "code": "missing_beta_header",
            }}),
        ));
    }
    serde_json::from_slice::<Value>(&request.body)
        .map_err(|error| invalid("body".to_string(), &error.to_string()))
        .and_then(|body| validate(&body))
        .map_err(|refusal| {
            (
                400,
                json!({"error": {
                    "message": refusal.message,
                    "type": "invalid_request_error",
                    "param": refusal.param,
                    "code": refusal.code,
                }}),
            )
        })
}

/// The mock's answer: the verdict, or 200 `{}`.
struct StrictIngest;

impl Respond for StrictIngest {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        match verdict(request) {
            Ok(()) => ResponseTemplate::new(200).set_body_json(json!({})),
            Err((status, body)) => ResponseTemplate::new(status).set_body_json(body),
        }
    }
}

struct Ingest {
    server: MockServer,
}

impl Ingest {
    async fn start() -> Self {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/traces/ingest"))
            .respond_with(StrictIngest)
            .mount(&server)
            .await;
        Self { server }
    }

    fn url(&self) -> String {
        format!("{}/v1/traces/ingest", self.server.uri())
    }

    /// Every item posted so far, asserting that every POST was one the endpoint accepted.
    async fn items(&self) -> Vec<Value> {
        let mut items = Vec::new();
        for request in self.server.received_requests().await.unwrap_or_default() {
            if let Err((status, error)) = verdict(&request) {
                panic!("the ingest endpoint answered {status}: {error}");
            }
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            items.extend(body["data"].as_array().unwrap().iter().cloned());
        }
        items
    }

    /// The items of one trace, once `complete` says they have all arrived (30 s at most).
    async fn trace(&self, trace_id: &str, complete: impl Fn(&Trace) -> bool) -> Trace {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let trace = Trace::of(trace_id, &self.items().await);
            if complete(&trace) {
                return trace;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id} did not arrive complete; got {:#?}",
                trace.spans
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One trace as the ingest endpoint received it.
struct Trace {
    traces: Vec<Value>,
    spans: Vec<Value>,
}

impl Trace {
    fn of(trace_id: &str, items: &[Value]) -> Self {
        Self {
            traces: items
                .iter()
                .filter(|item| item["object"] == "trace" && item["id"] == trace_id)
                .cloned()
                .collect(),
            spans: items
                .iter()
                .filter(|item| item["object"] == "trace.span" && item["trace_id"] == trace_id)
                .cloned()
                .collect(),
        }
    }

    fn of_type(&self, kind: &str) -> Vec<&Value> {
        self.spans
            .iter()
            .filter(|span| span["span_data"]["type"] == kind)
            .collect()
    }

    fn agent(&self, name: &str) -> &Value {
        self.of_type("agent")
            .into_iter()
            .find(|agent| agent["span_data"]["name"] == name)
            .unwrap_or_else(|| panic!("no {name} agent span in {:#?}", self.spans))
    }

    fn generations_of(&self, model: &str) -> Vec<&Value> {
        self.of_type("generation")
            .into_iter()
            .filter(|span| span["span_data"]["model"] == model)
            .collect()
    }

    /// Every parent id names a span of this trace, and the span ids are unique.
    fn assert_a_tree(&self) {
        let ids: BTreeSet<&str> = self
            .spans
            .iter()
            .map(|span| span["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), self.spans.len(), "span ids are unique");
        for span in &self.spans {
            if let Some(parent) = span["parent_id"].as_str() {
                assert!(ids.contains(parent), "dangling parent of {span:#}");
            }
            assert!(span["started_at"].as_str() <= span["ended_at"].as_str());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn app_without_worker() -> TestApp {
    spawn_api().await
}

/// A `pictor-worker` process for `app` exporting traces to `endpoint`, prompts included.
fn traced_worker(app: &TestApp, endpoint: &str, extra: &[(&str, String)]) -> tokio::process::Child {
    tokio::process::Command::new(workspace_binary("pictor-worker"))
        .envs(app.worker_env())
        .env("PICTOR_OPENAI_TRACES", "true")
        .env("PICTOR_TRACES_ENDPOINT", endpoint)
        .env("PICTOR_TRACES_REDACT", "false")
        .env("PICTOR_WORKER_METRICS_ADDR", "")
        .env("PICTOR_PROVIDER_MAX_ATTEMPTS", "2")
        // The traces do not depend on the log filter.
        .env("RUST_LOG", "warn")
        .envs(extra.iter().map(|(name, value)| (*name, value.as_str())))
        .kill_on_drop(true)
        .spawn()
        .expect("worker starts")
}

fn trace_id_of(job: &str) -> String {
    shared::telemetry::trace_id(JobId::parse(job).unwrap())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_create_job_arrives_as_one_trace_that_the_strict_ingest_accepts() {
    let app = app_without_worker().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("create", 0.95, "a lighthouse at dawn", None)
        .await;
    openai.images_generate_ok().await;
    let ingest = Ingest::start().await;
    let _worker = traced_worker(&app, &ingest.url(), &[]);

    let id = app
        .submit(ALICE, json!({"prompt": "please draw a lighthouse at dawn"}))
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");

    let trace_id = trace_id_of(&id);
    let trace = ingest
        .trace(&trace_id, |trace| {
            !trace.traces.is_empty() && trace.spans.len() >= 5
        })
        .await;
    assert_eq!(trace.traces.len(), 1, "one trace per job");
    assert_eq!(trace.traces[0]["workflow_name"], "Pictor job");
    assert_eq!(trace.traces[0]["metadata"], json!({"job_id": id}));
    assert_eq!(trace.spans.len(), 5, "{:#?}", trace.spans);
    trace.assert_a_tree();

    let router = trace.agent("router");
    let create = trace.agent("create");
    assert_eq!(router["parent_id"], Value::Null);
    assert_eq!(create["parent_id"], Value::Null);
    assert_eq!(router["span_data"]["handoffs"], json!(["create"]));

    let handoffs = trace.of_type("handoff");
    assert_eq!(handoffs.len(), 1);
    assert_eq!(handoffs[0]["parent_id"], router["id"]);
    assert_eq!(
        handoffs[0]["span_data"],
        json!({"type": "handoff", "from_agent": "router", "to_agent": "create"})
    );

    let routing = trace.generations_of(&app.settings.openai.router_model);
    assert_eq!(routing.len(), 1);
    assert_eq!(routing[0]["parent_id"], router["id"]);
    assert_eq!(
        routing[0]["span_data"]["input"],
        json!([{"role": "user", "content": "please draw a lighthouse at dawn"}])
    );
    assert_eq!(
        routing[0]["span_data"]["usage"],
        json!({"input_tokens": 120, "output_tokens": 24})
    );
    let drawing = trace.generations_of(&app.settings.openai.image_model);
    assert_eq!(drawing.len(), 1);
    assert_eq!(drawing[0]["parent_id"], create["id"]);
    assert_eq!(drawing[0]["error"], Value::Null);
    assert_eq!(
        drawing[0]["span_data"]["input"],
        json!([{"role": "user", "content": "a lighthouse at dawn"}]),
        "the image model's span shows the router's cleaned prompt"
    );
    assert_eq!(
        drawing[0]["span_data"]["output"],
        json!([{"role": "assistant", "content": "1 image"}])
    );
    assert_eq!(
        drawing[0]["span_data"]["usage"],
        json!({"input_tokens": 10, "output_tokens": 1056})
    );
}

#[tokio::test]
async fn an_edit_that_falls_back_to_openai_shows_the_failed_gemini_calls_and_the_fallback() {
    let app = app_without_worker().await;
    let openai = app.openai.as_ref().unwrap();
    let gemini = app.gemini.as_ref().unwrap();
    openai
        .router_answers("edit", 0.9, "make the sky purple", None)
        .await;
    openai.images_edit_ok().await;
    gemini.unavailable(None).await;
    let ingest = Ingest::start().await;
    let _worker = traced_worker(&app, &ingest.url(), &[]);

    let image = base64::engine::general_purpose::STANDARD.encode(png(16, 16, 3));
    let id = app
        .submit(
            ALICE,
            json!({
                "prompt": "make the sky purple",
                "image": {"data": image, "mime_type": "image/png"},
            }),
        )
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["provider"], "openai");
    let gemini_calls = gemini.received().await.len();
    assert_eq!(gemini_calls, 2, "PICTOR_PROVIDER_MAX_ATTEMPTS=2");

    // Two agents, the router's call, Gemini's failed calls, OpenAI's edit, the handoff and
    // the fallback.
    let expected = 2 + 1 + gemini_calls + 1 + 1 + 1;
    let trace = ingest
        .trace(&trace_id_of(&id), |trace| trace.spans.len() >= expected)
        .await;
    assert_eq!(trace.traces.len(), 1);
    assert_eq!(trace.spans.len(), expected, "{:#?}", trace.spans);
    trace.assert_a_tree();

    let edit = trace.agent("edit");
    assert_eq!(edit["parent_id"], Value::Null);
    assert_eq!(
        trace.agent("router")["span_data"]["handoffs"],
        json!(["edit"])
    );

    let failed = trace.generations_of(&app.settings.gemini.image_model);
    assert_eq!(failed.len(), gemini_calls);
    for call in &failed {
        assert_eq!(call["parent_id"], edit["id"]);
        assert_eq!(
            call["error"],
            json!({"message": "provider_unavailable", "data": null})
        );
        assert_eq!(call["span_data"]["output"], json!([]));
    }

    let fallbacks = trace.of_type("custom");
    assert_eq!(fallbacks.len(), 1);
    assert_eq!(fallbacks[0]["parent_id"], edit["id"]);
    assert_eq!(
        fallbacks[0]["span_data"],
        json!({"type": "custom", "name": "fallback", "data": {"from": "gemini", "to": "openai"}})
    );
    // The fallback comes after the failed calls.
    let last_failure = failed
        .iter()
        .map(|call| call["ended_at"].as_str().unwrap())
        .max()
        .unwrap();
    assert!(fallbacks[0]["started_at"].as_str().unwrap() >= last_failure);

    let edits = trace.generations_of(&app.settings.openai.image_model);
    assert_eq!(edits.len(), 1);
    assert_eq!(edits[0]["parent_id"], edit["id"]);
    assert_eq!(edits[0]["error"], Value::Null);
}

#[tokio::test]
async fn a_job_refused_by_moderation_shows_a_generation_with_an_error() {
    let app = app_without_worker().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("create", 0.95, "something forbidden", None)
        .await;
    openai
        .error(
            "images/generations",
            400,
            "image_generation_user_error",
            Some("moderation_blocked"),
            "Your request was rejected by the safety system.",
            &[],
            None,
        )
        .await;
    let ingest = Ingest::start().await;
    let _worker = traced_worker(&app, &ingest.url(), &[]);

    let id = app
        .submit(ALICE, json!({"prompt": "something forbidden"}))
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    let code = job["error"]["code"].as_str().unwrap().to_string();

    let trace = ingest
        .trace(&trace_id_of(&id), |trace| trace.spans.len() >= 5)
        .await;
    assert_eq!(trace.traces.len(), 1);
    assert_eq!(trace.spans.len(), 5, "{:#?}", trace.spans);
    trace.assert_a_tree();
    let create = trace.agent("create");
    let refused = trace.generations_of(&app.settings.openai.image_model);
    assert_eq!(refused.len(), 1, "a refusal is not retried");
    assert_eq!(refused[0]["parent_id"], create["id"]);
    assert_eq!(refused[0]["error"], json!({"message": code, "data": null}));
    assert_eq!(
        create["error"],
        json!({"message": code, "data": null}),
        "the agent that failed the job carries its error"
    );
    assert_eq!(trace.agent("router")["error"], Value::Null);
}

#[tokio::test]
async fn a_dead_ingest_endpoint_neither_slows_nor_stops_the_jobs() {
    let app = app_without_worker().await;
    let openai = app.openai.as_ref().unwrap();
    openai.router_answers("create", 0.95, "a kite", None).await;
    openai.images_generate_ok().await;
    // A port nobody listens on: every POST fails to connect.
    let dead = format!("http://127.0.0.1:{}/v1/traces/ingest", free_port());
    let metrics_port = free_port();
    let mut worker = tokio::process::Command::new(workspace_binary("pictor-worker"))
        .envs(app.worker_env())
        .env("PICTOR_OPENAI_TRACES", "true")
        .env("PICTOR_TRACES_ENDPOINT", &dead)
        .env(
            "PICTOR_WORKER_METRICS_ADDR",
            format!("127.0.0.1:{metrics_port}"),
        )
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("worker starts");
    // Keep reading the worker's log so it can never block on a full pipe.
    let output = worker.stdout.take().unwrap();
    let (lines, mut log) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(output).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let _ = lines.send(line);
        }
    });

    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.submit(ALICE, json!({"prompt": "a kite"})).await);
    }
    for id in &ids {
        let job = app.wait_until_terminal(ALICE, id).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
    }

    // The exporter gives up on its batches (three attempts each) and says so, in the metric
    // and in the log, while the worker keeps running.
    let client = reqwest::Client::new();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = match client.get(&metrics_url).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let dropped = text.lines().any(|line| {
            line.starts_with("pictor_trace_items_dropped_total{reason=\"export_failed\"}")
        });
        if dropped {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no export failure counted; metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut logged = Vec::new();
    let said_so = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = log.recv().await {
            let found = line.contains("Trace export failed");
            logged.push(line);
            if found {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(said_so, Ok(true), "{logged:#?}");
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker is still running"
    );

    // And it still takes work.
    let id = app.submit(ALICE, json!({"prompt": "a kite"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
}

/// Every line a child process writes to `stream`, collected until it closes.
fn collect_lines(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(stream).lines();
        let mut lines = Vec::new();
        while let Ok(Some(line)) = reader.next_line().await {
            lines.push(line);
        }
        lines
    })
}

#[tokio::test]
async fn with_redaction_on_a_canary_prompt_reaches_no_exported_byte_and_no_log_line() {
    const CANARY: &str = "zebracanary4417";
    let app = app_without_worker().await;
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("create", 0.95, &format!("a {CANARY} lighthouse"), None)
        .await;
    // One failed attempt first, so the failure and retry paths log too.
    openai.server_error("images/generations", Some(1)).await;
    openai.images_generate_ok().await;
    let ingest = Ingest::start().await;
    let collector = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&collector)
        .await;
    // Credentials in the endpoint must not reach the logs either.
    let otlp_endpoint = format!("http://collector:{CANARY}@{}", collector.address());
    let mut worker = tokio::process::Command::new(workspace_binary("pictor-worker"))
        .envs(app.worker_env())
        .env("PICTOR_OPENAI_TRACES", "true")
        .env("PICTOR_TRACES_ENDPOINT", ingest.url())
        .env("PICTOR_TRACES_REDACT", "true")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp_endpoint)
        .env("PICTOR_WORKER_METRICS_ADDR", "")
        .env("PICTOR_PROVIDER_MAX_ATTEMPTS", "2")
        .env("PICTOR_LOG_FORMAT", "json")
        // As verbose as an operator chasing a problem would make it.
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("worker starts");
    let stdout = collect_lines(worker.stdout.take().unwrap());
    let stderr = collect_lines(worker.stderr.take().unwrap());

    let id = app
        .submit(
            ALICE,
            json!({"prompt": format!("please draw a {CANARY} lighthouse at dawn")}),
        )
        .await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");

    // Both exporters have the job's calls before the worker stops.
    let trace = ingest
        .trace(&trace_id_of(&id), |trace| {
            trace.of_type("generation").len() >= 3
        })
        .await;
    for generation in trace.of_type("generation") {
        assert_eq!(
            generation["span_data"]["input"],
            json!([]),
            "{generation:#}"
        );
    }
    let otlp_bodies = || async {
        collector
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|request| request.body)
            .collect::<Vec<_>>()
    };
    let contains = |haystack: &[u8], needle: &str| {
        haystack
            .windows(needle.len())
            .any(|window| window == needle.as_bytes())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let bodies = otlp_bodies().await;
        let calls = bodies
            .iter()
            .filter(|body| contains(body, "provider_call"))
            .count();
        if calls > 0 && bodies.iter().any(|body| contains(body, &id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the OTLP collector did not get the job's spans"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = tests::harness::stop_gracefully(&mut worker).await;
    assert!(status.success(), "{status}");
    let logs: Vec<String> = [stdout.await.unwrap(), stderr.await.unwrap()].concat();

    // The endpoint's credentials reach the collector as a header, not in the URL.
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("collector:{CANARY}"))
    );
    let requests = collector.received_requests().await.unwrap_or_default();
    assert!(
        requests.iter().all(|request| request
            .headers
            .get("authorization")
            .is_some_and(|value| value.to_str().unwrap() == expected)),
        "every export is authorized with the endpoint's credentials"
    );
    // Not one exported byte carries the prompt...
    for body in otlp_bodies().await {
        assert!(
            !contains(&body, CANARY),
            "the OTLP export carries the prompt"
        );
    }
    for request in ingest.server.received_requests().await.unwrap_or_default() {
        assert!(
            !contains(&request.body, CANARY),
            "the OpenAI traces export carries the prompt"
        );
    }
    // ... nor one log line, the OTLP endpoint's credentials included.
    assert!(
        logs.iter()
            .any(|line| line.contains("Provider call succeeded")),
        "the logs were read: {logs:#?}"
    );
    let leaks: Vec<&String> = logs.iter().filter(|line| line.contains(CANARY)).collect();
    assert!(leaks.is_empty(), "log lines carry the canary: {leaks:#?}");
    let announced = logs
        .iter()
        .find(|line| line.contains("OTLP trace export on"))
        .unwrap_or_else(|| panic!("OTLP export was on: {logs:#?}"));
    assert!(
        announced.contains(&format!("http://{}", collector.address())),
        "{announced}"
    );
}
