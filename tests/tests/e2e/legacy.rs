//! The retired LangGraph service stays retired: no LangGraph or LangChain dependency anywhere
//! (lockfile, manifests, docs, infra), its old endpoint answers `410 Gone` pointing to
//! `POST /v1/jobs` and is counted per caller, and `pictor admin purge-langgraph-checkpoints`
//! finds and deletes exactly its checkpoint keys in a real Redis.
//!
//! The purge tests own Redis databases no other test uses (14 for the purge, 13 for the binary's
//! dry run), and every key they write carries a unique thread id that the purge is limited to,
//! so two runs of this suite at once cannot delete each other's keys either. They delete what
//! they wrote afterwards, also when they fail.

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cli::legacy::{Checkpoints, FAMILIES, PurgeOptions};
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::Value;
use tests::harness::{ALICE, BOB, OPS, Options, metric_sample, spawn_app_with, workspace_binary};

// ---------------------------------------------------------------------------------------------
// 1. No dependency on LangGraph or LangChain.
// ---------------------------------------------------------------------------------------------

/// The retired framework's package names, as they appear in every ecosystem (`langgraph`,
/// `langgraph-checkpoint-redis`, `langchain_core`, `@langchain/langgraph`, `langchain-rust`).
const RETIRED: [&str; 2] = ["langgraph", "langchain"];

fn names_retired(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    RETIRED.iter().any(|retired| name.contains(retired))
}

/// The package name at the start of a requirement-like token: quotes and backticks stripped,
/// then cut at extras, a version operator, a separator or whitespace (`"langgraph>=0.2"` →
/// `langgraph`; `@langchain/core@0.3` → `@langchain/core`). Paths and URLs are not packages.
fn package_of(token: &str) -> Option<&str> {
    let token = token.trim_matches(|c| matches!(c, '"' | '\'' | '`' | ',' | '(' | ')' | ';'));
    if token.is_empty()
        || token.starts_with(['/', '.', '-', '$'])
        || token.contains("://")
        || token.contains('=') && !token.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        return None;
    }
    let body = token.strip_prefix('@').unwrap_or(token);
    let end = body
        .find(['[', '<', '>', '=', '!', '~', ';', '@', ' ', ','])
        .unwrap_or(body.len());
    let name = &token[..end + (token.len() - body.len())];
    (!name.is_empty()).then_some(name)
}

/// Install commands: the words that start one, and the verb that must follow.
const INSTALLERS: [(&str, &[&str]); 11] = [
    ("pip", &["install"]),
    ("pip3", &["install"]),
    ("uv", &["add"]),
    ("poetry", &["add"]),
    ("pipenv", &["install"]),
    ("conda", &["install"]),
    ("npm", &["install", "i", "add"]),
    ("yarn", &["add"]),
    ("pnpm", &["add", "install", "i"]),
    ("bun", &["add"]),
    ("cargo", &["add", "install"]),
];

/// Why `line` installs, imports or declares a LangGraph/LangChain package, or None when it
/// does not (a mere mention, such as "the retired LangGraph service" or the old endpoint's path
/// `/api/langgraph/agents/execute`, is fine).
fn dependency_reference(line: &str) -> Option<&'static str> {
    let trimmed = line.trim();

    // `pip install -U "langgraph>=0.2"`, `npm i @langchain/langgraph`, `cargo add langchain-rust`.
    for command in trimmed.split(['&', ';', '|']) {
        let words: Vec<&str> = command.split_whitespace().collect();
        for (at, word) in words.iter().enumerate() {
            let word = word.trim_start_matches('`');
            let Some((_, verbs)) = INSTALLERS.iter().find(|(installer, _)| *installer == word)
            else {
                continue;
            };
            let rest = &words[at + 1..];
            if let Some(verb_at) = rest.iter().position(|w| verbs.contains(w)) {
                let installs = rest[verb_at + 1..]
                    .iter()
                    .filter(|w| !w.starts_with('-'))
                    .filter_map(|w| package_of(w))
                    .any(names_retired);
                if installs {
                    return Some("installs it");
                }
            }
        }
    }

    // Python, Rust and JavaScript imports.
    for keyword in ["from ", "import ", "use ", "extern crate "] {
        if let Some(rest) = trimmed.strip_prefix(keyword) {
            let module = rest
                .split([' ', '.', ':', ';', ',', '{'])
                .next()
                .unwrap_or("");
            if RETIRED.iter().any(|retired| module.starts_with(retired)) {
                return Some("imports it");
            }
        }
    }
    for opener in [
        "from \"",
        "from '",
        "require(\"",
        "require('",
        "import(\"",
        "import('",
    ] {
        for piece in trimmed.split(opener).skip(1) {
            let module = piece.split(['"', '\'']).next().unwrap_or("");
            if package_of(module).is_some_and(names_retired) {
                return Some("imports it");
            }
        }
    }

    // `[dependencies.langchain-rust]`.
    if trimmed.starts_with('[') && trimmed.contains("dependencies.") && names_retired(trimmed) {
        return Some("declares it as a dependency");
    }

    // Manifest entries: `langchain-rust = "4"`, `langgraph = { path = … }`,
    // `"@langchain/core": "^0.3.0"` — a package-named key with a version-like value.
    if let Some((key, value)) = trimmed
        .split_once(" = ")
        .or_else(|| trimmed.split_once("\": "))
        .or_else(|| trimmed.split_once('='))
    {
        let key = key.trim().trim_matches('"');
        let value = value.trim().trim_start_matches(['"', '\'']);
        let versionish = value.starts_with(|c: char| {
            c.is_ascii_digit() || matches!(c, '^' | '~' | '>' | '<' | '=' | '*' | '{')
        }) || value.starts_with("workspace")
            || value.starts_with("latest")
            || key.ends_with(".workspace");
        let is_key = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '@' | '/' | '.'));
        if is_key && versionish && names_retired(key) {
            return Some("declares it as a dependency");
        }
    }

    // Requirement lines: `langgraph==0.2.60`, `  - langchain-core`, `"langgraph>=0.2",`.
    let requirement = trimmed
        .trim_start_matches("- ")
        .trim_end_matches(',')
        .trim_matches(['"', '\'']);
    let name_end = requirement
        .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-[]".contains(c)))
        .unwrap_or(requirement.len());
    let (name, tail) = requirement.split_at(name_end);
    let tail = tail.trim_start();
    let is_spec = tail.is_empty()
        || ["==", ">=", "<=", "~=", "!=", ">", "<", ";", "@ "]
            .iter()
            .any(|operator| tail.starts_with(operator));
    if !name.is_empty() && is_spec && names_retired(name) {
        return Some("lists it as a requirement");
    }
    None
}

/// Every dependency reference in a file's text, as `path:line: why: text`.
fn violations_in(path: &str, text: &str) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter_map(|(number, line)| {
            dependency_reference(line)
                .map(|why| format!("{path}:{}: {why}: {}", number + 1, line.trim()))
        })
        .collect()
}

/// The package names in a Cargo.lock.
fn lock_package_names(lock: &str) -> Vec<String> {
    lock.lines()
        .filter_map(|line| line.strip_prefix("name = \""))
        .filter_map(|rest| rest.strip_suffix('"'))
        .map(str::to_string)
        .collect()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// Files under `dir`, skipping build output, VCS data and vendored packages.
fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !matches!(name.as_str(), "target" | ".git" | "node_modules" | "var") {
                walk(&path, found);
            }
        } else {
            found.push(path);
        }
    }
}

/// What the check reads: README.md, docs/**/*.md, everything in infra/, and anywhere in the
/// tree every Cargo.toml and every Python or JavaScript manifest, requirements file or
/// Dockerfile.
fn scanned_files(root: &Path) -> Vec<PathBuf> {
    let mut everything = Vec::new();
    walk(root, &mut everything);
    everything
        .into_iter()
        .filter(|path| {
            let relative = path.strip_prefix(root).unwrap_or(path);
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            relative == Path::new("README.md")
                || relative.starts_with("docs") && name.ends_with(".md")
                || relative.starts_with("infra")
                || matches!(
                    name.as_str(),
                    "Cargo.toml"
                        | "pyproject.toml"
                        | "package.json"
                        | "Pipfile"
                        | "setup.py"
                        | "setup.cfg"
                        | "environment.yml"
                )
                || name.starts_with("requirements") && name.ends_with(".txt")
                || name.starts_with("Dockerfile")
        })
        .collect()
}

#[test]
fn no_langgraph_or_langchain_dependency_in_the_lockfile_manifests_docs_or_infra() {
    let root = root();
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).expect("Cargo.lock");
    let names = lock_package_names(&lock);
    assert!(names.len() > 100, "the lockfile was read: {names:?}");
    let locked: Vec<&String> = names.iter().filter(|name| names_retired(name)).collect();
    assert!(locked.is_empty(), "Cargo.lock locks {locked:?}");

    let files = scanned_files(&root);
    let manifests = files
        .iter()
        .filter(|path| path.ends_with("Cargo.toml"))
        .count();
    assert!(manifests >= 7, "every Cargo.toml is read: {files:?}");
    assert!(
        files.iter().any(|path| path.ends_with("docs/migration.md")),
        "{files:?}"
    );
    let mut violations = Vec::new();
    for path in &files {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue; // not text
        };
        let relative = path.strip_prefix(&root).unwrap_or(path);
        violations.extend(violations_in(&relative.to_string_lossy(), &text));
    }
    assert!(
        violations.is_empty(),
        "LangGraph/LangChain is retired; remove these:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_matcher_flags_installs_imports_and_manifest_entries() {
    let dependencies = [
        "pip install langgraph",
        "RUN pip install --no-cache-dir -U \"langgraph>=0.2\" redis",
        "python -m pip install langchain-openai==0.3.1",
        "uv add langgraph-checkpoint-redis",
        "npm install @langchain/langgraph",
        "yarn add @langchain/core@0.3.0",
        "cargo add langchain-rust",
        "from langgraph.graph import StateGraph",
        "from langchain_openai import ChatOpenAI",
        "import langgraph",
        "import { StateGraph } from \"@langchain/langgraph\";",
        "const lg = require('langgraph');",
        "use langchain_rust::llm::OpenAI;",
        "    \"langgraph\": \"^0.2.1\",",
        "    \"@langchain/core\": \"0.3.0\",",
        "langchain-rust = \"4.6\"",
        "langchain-rust = { version = \"4\", features = [\"ollama\"] }",
        "langgraph.workspace = true",
        "[dependencies.langchain-rust]",
        "langgraph==0.2.60",
        "langgraph-checkpoint-redis>=0.1,<0.2",
        "langchain-core",
        "  - langchain-core",
        "    \"langgraph>=0.2\",",
    ];
    for line in dependencies {
        assert!(dependency_reference(line).is_some(), "missed: {line}");
    }
    let mentions = [
        "The retired LangGraph service answered `POST /api/langgraph/agents/execute`.",
        "curl -X POST localhost:8080/api/langgraph/agents/execute -d '{\"assistant_id\": \"agent\"}'",
        "pictor admin purge-langgraph-checkpoints --execute",
        "It used the `langgraph-checkpoint-redis` package (keys `checkpoint:*`).",
        "  \"langgraph_url\": \"http://old-service:8000\",",
        "- LangGraph",
        "## Rolling back to LangGraph",
        "from the LangGraph service, import nothing: jobs start fresh",
        "pip install pictor-client && curl /api/langgraph/agents/execute",
        "| `POST /api/langgraph/agents/execute` | `POST /v1/jobs` |",
        "  - path: /api/langgraph/",
    ];
    for line in mentions {
        assert_eq!(
            dependency_reference(line),
            None,
            "a mention flagged: {line}"
        );
    }
    // The whole check, not only the matcher, fails on such a line.
    let text = "# Setup\n\nInstall the old tools:\n\n    pip install -U langgraph\n";
    let found = violations_in("docs/setup.md", text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("docs/setup.md:5: installs it"),
        "{found:?}"
    );
    let lock = "[[package]]\nname = \"langchain-rust\"\nversion = \"4.6.0\"\n";
    assert!(
        lock_package_names(lock)
            .iter()
            .any(|name| names_retired(name))
    );
}

#[test]
fn the_migration_guide_names_the_retired_service_without_depending_on_it() {
    let guide = std::fs::read_to_string(root().join("docs/migration.md")).expect("the guide");
    assert!(guide.contains("LangGraph"));
    assert!(guide.contains("/api/langgraph/agents/execute"));
    assert!(guide.contains("pictor admin purge-langgraph-checkpoints"));
    assert_eq!(
        violations_in("docs/migration.md", &guide),
        Vec::<String>::new()
    );
    let readme = std::fs::read_to_string(root().join("README.md")).expect("the readme");
    assert!(
        readme.contains("(docs/migration.md)"),
        "README links the guide"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The old endpoint answers 410 Gone.
// ---------------------------------------------------------------------------------------------

const EXECUTE: &str = "/api/langgraph/agents/execute";

fn assert_gone(status: StatusCode, content_type: Option<&str>, body: &Value) {
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert!(
        content_type.is_some_and(|t| t.starts_with("application/json")),
        "{content_type:?}"
    );
    let error = &body["error"];
    assert_eq!(error["code"], "endpoint_retired", "{body}");
    assert_eq!(error["replacement"], "POST /v1/jobs", "{body}");
    let guide = error["migration_guide"].as_str().expect("a guide");
    assert!(guide.ends_with("docs/migration.md"), "{guide}");
    let message = error["message"].as_str().expect("a message");
    assert!(
        message.contains("POST /v1/jobs") && message.contains(guide),
        "{message}"
    );
}

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
) -> (StatusCode, Option<String>, Value) {
    let mut request = client.request(method, url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request
        .header("content-type", "application/json")
        .body(r#"{"assistant_id": "agent", "input": {"messages": [{"role": "user""#)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, content_type, body)
}

#[tokio::test]
async fn every_method_and_path_of_the_old_service_is_gone_without_a_key() {
    let app = spawn_app_with(
        Options {
            worker: false,
            mock_providers: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    use reqwest::Method;
    let cases = [
        (Method::POST, EXECUTE, None),
        (Method::POST, EXECUTE, Some(ALICE)),
        (Method::POST, EXECUTE, Some("not-a-key")),
        (Method::GET, EXECUTE, None),
        (Method::GET, "/api/langgraph", None),
        (Method::PUT, "/api/langgraph/", None),
        (Method::DELETE, "/api/langgraph/threads/t-1", Some(BOB)),
        (Method::POST, "/api/langgraph/threads/t-1/runs/stream", None),
    ];
    for (method, path, key) in cases {
        let (status, content_type, body) =
            call(&app.client, method.clone(), &app.url(path), key).await;
        assert_gone(status, content_type.as_deref(), &body);
    }
    // Neighbours are not swallowed by the retired prefix.
    let response = app
        .client
        .get(app.url("/api/langgraphs"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = app.client.post(app.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn calls_to_the_old_endpoint_are_counted_per_caller_on_metrics() {
    // A real pictor-api process: it installs its own metrics recorder, as in production.
    let app = spawn_app_with(
        Options {
            worker: false,
            mock_providers: false,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let _api = tokio::process::Command::new(workspace_binary("pictor-api"))
        .envs(app.worker_env())
        .env(
            "PICTOR_API_KEYS",
            format!("alice:user:{ALICE},bob:user:{BOB},ops:ops:{OPS}"),
        )
        .env("PICTOR_API_ADDR", format!("127.0.0.1:{port}"))
        .env("PICTOR_API_METRICS_ADDR", "")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("pictor-api starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reqwest::get(format!("{base}/healthz"))
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "pictor-api never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let client = reqwest::Client::new();
    let execute = format!("{base}{EXECUTE}");
    use reqwest::Method;
    for key in [Some(ALICE), None, Some("wrong-secret-key")] {
        let (status, content_type, body) = call(&client, Method::POST, &execute, key).await;
        assert_gone(status, content_type.as_deref(), &body);
    }
    let (status, ..) = call(
        &client,
        Method::GET,
        &format!("{base}/api/langgraph/threads/t-9/state"),
        Some(BOB),
    )
    .await;
    assert_eq!(status, StatusCode::GONE);

    let text = client
        .get(format!("{base}/metrics"))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let name = "pictor_legacy_requests_total";
    let execute_by = |caller| {
        metric_sample(
            &text,
            name,
            &[
                ("endpoint", EXECUTE),
                ("method", "POST"),
                ("caller", caller),
            ],
        )
    };
    assert_eq!(execute_by("alice"), Some(1.0), "{text}");
    assert_eq!(execute_by("anonymous"), Some(2.0), "{text}");
    assert_eq!(
        metric_sample(
            &text,
            name,
            &[
                ("endpoint", "/api/langgraph/{*rest}"),
                ("method", "GET"),
                ("caller", "bob")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(text.contains(&format!("# HELP {name}")), "{text}");
    for secret in [ALICE, BOB, "wrong-secret-key"] {
        assert!(!text.contains(secret), "a key reached the metrics");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Purging the old checkpoints.
// ---------------------------------------------------------------------------------------------

/// The test Redis with its logical database set to `db`.
fn redis_url(db: u8) -> String {
    let base =
        std::env::var("PICTOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut url = url::Url::parse(&base).expect("redis url");
    url.set_path(&format!("/{db}"));
    url.to_string()
}

async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Seeds `keys` as strings, except the write-key registries, which are sorted sets as in
/// LangGraph. (The real checkpoints are RedisJSON documents; this Redis has no JSON module, and
/// the purge never looks at a value.)
async fn seed(url: &str, keys: &[String]) {
    let mut connection = redis(url).await;
    for key in keys {
        if key.starts_with("write_keys_zset:") {
            redis::cmd("ZADD")
                .arg(key)
                .arg(0)
                .arg("checkpoint_write:x")
                .query_async::<()>(&mut connection)
                .await
                .unwrap();
        } else {
            redis::cmd("SET")
                .arg(key)
                .arg(format!("{{\"payload\": \"{}\"}}", "x".repeat(200)))
                .query_async::<()>(&mut connection)
                .await
                .unwrap();
        }
    }
}

async fn existing(url: &str, keys: &[String]) -> BTreeSet<String> {
    let mut connection = redis(url).await;
    let mut found = BTreeSet::new();
    for key in keys {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap();
        if exists {
            found.insert(key.clone());
        }
    }
    found
}

/// Runs `test`, then deletes `keys` from `url` whatever happened.
async fn with_keys<F>(url: String, keys: Vec<String>, test: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(test).await;
    let mut connection = redis(&url).await;
    let _: Result<u64, _> = redis::cmd("UNLINK")
        .arg(&keys)
        .query_async(&mut connection)
        .await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

/// The old checkpointer's keys for one thread: 3 checkpoints (one in a subgraph namespace),
/// 2 blobs, 2 writes, 1 write-key registry and 1 latest pointer.
fn langgraph_keys(thread: &str) -> Vec<String> {
    let (c1, c2) = (
        "1ef4f797-8335-6428-8001-8a1503f9b875",
        "1ef4f797-8335-6428-8002-000000000000",
    );
    vec![
        format!("checkpoint:{thread}:__empty__:{c1}"),
        format!("checkpoint:{thread}:__empty__:{c2}"),
        format!("checkpoint:{thread}:tools:{c2}"),
        format!(
            "checkpoint_blob:{thread}:__empty__:messages:00000000000000000000000000000001.0.42"
        ),
        format!(
            "checkpoint_blob:{thread}:__empty__:messages:00000000000000000000000000000002.0.17"
        ),
        format!("checkpoint_write:{thread}:__empty__:{c2}:task-1:0"),
        format!("checkpoint_write:{thread}:__empty__:{c2}:task-1:1"),
        format!("write_keys_zset:{thread}:__empty__:{c2}"),
        format!("checkpoint_latest:{thread}:__empty__"),
    ]
}

#[tokio::test]
async fn the_purge_counts_without_deleting_then_deletes_exactly_the_langgraph_keys() {
    let url = redis_url(14);
    let thread = format!("legacy-test-{}", uuid::Uuid::new_v4().simple());
    // A Pictor prefix that itself matches the checkpoint pattern: its keys must survive anyway.
    let pictor_prefix = format!("checkpoint:{thread}-pictor:");
    let langgraph = langgraph_keys(&thread);
    let pictor = vec![
        format!("{pictor_prefix}job:019ab9c1"),
        format!("{pictor_prefix}leases"),
    ];
    let other_thread = langgraph_keys(&format!("other-{}", uuid::Uuid::new_v4().simple()));
    let unrelated = vec![
        format!("checkpointer:{thread}"),
        format!("my_checkpoint:{thread}:x"),
        format!("{thread}:checkpoint:x"),
        format!("checkpoint_blob_{thread}"),
    ];
    let everything: Vec<String> = [&langgraph, &pictor, &other_thread, &unrelated]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    seed(&url, &everything).await;

    let test_url = url.clone();
    let all = everything.clone();
    with_keys(url, everything, async move {
        let url = test_url;
        let mut checkpoints =
            Checkpoints::connect(&SecretString::from(url.clone()), Duration::from_secs(5))
                .await
                .unwrap();
        let options = PurgeOptions {
            batch_size: NonZeroUsize::new(2).unwrap(),
            protected_prefix: pictor_prefix.clone(),
            thread_prefix: Some(thread.clone()),
        };

        let mut heard = 0;
        let survey = checkpoints.survey(&options, |n| heard += n).await.unwrap();
        let counts: Vec<(&str, u64)> = survey
            .families
            .iter()
            .map(|family| (family.family.name, family.keys))
            .collect();
        assert_eq!(
            counts,
            [
                ("checkpoints", 3),
                ("checkpoint_blobs", 2),
                ("checkpoint_writes", 2),
                ("write_key_registries", 1),
                ("latest_pointers", 1)
            ]
        );
        assert_eq!(heard, 9);
        assert_eq!(
            survey.protected(),
            2,
            "Pictor's keys are counted as protected"
        );
        assert!(
            survey.families.iter().all(|family| family.bytes > 0),
            "every family is measured: {survey:?}"
        );
        assert_eq!(survey.families[0].pattern, format!("checkpoint:{thread}*"));
        assert_eq!(
            existing(&url, &all).await.len(),
            all.len(),
            "a survey deletes nothing"
        );
        // No RediSearch here: reported, not an error.
        checkpoints.indexes().await.unwrap();

        let mut deleted = 0;
        let purged = checkpoints.purge(&options, |n| deleted += n).await.unwrap();
        assert_eq!((purged.keys(), deleted, purged.protected()), (9, 9, 2));
        let left = existing(&url, &all).await;
        let expected: BTreeSet<String> = [&pictor, &other_thread, &unrelated]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        assert_eq!(
            left, expected,
            "exactly the thread's LangGraph keys are gone"
        );

        let again = checkpoints.survey(&options, |_| {}).await.unwrap();
        assert_eq!((again.keys(), again.protected()), (0, 2));
    })
    .await;
}

#[tokio::test]
async fn pictor_admin_purge_langgraph_checkpoints_is_a_dry_run_by_default() {
    let url = redis_url(13);
    let thread = format!("legacy-cli-{}", uuid::Uuid::new_v4().simple());
    let pictor_prefix = format!("pictor-test-{}:", uuid::Uuid::new_v4().simple());
    let mut keys = langgraph_keys(&thread);
    keys.push(format!("{pictor_prefix}job:019ab9c1"));
    seed(&url, &keys).await;

    let test_url = url.clone();
    let all = keys.clone();
    with_keys(url, keys, async move {
        let output = tokio::process::Command::new(workspace_binary("pictor"))
            .args([
                "admin",
                "purge-langgraph-checkpoints",
                "--thread-prefix",
                &thread,
                "--batch-size",
                "3",
            ])
            .env("PICTOR_REDIS_URL", &test_url)
            .env("PICTOR_REDIS_PREFIX", &pictor_prefix)
            .env("RUST_LOG", "warn")
            .output()
            .await
            .expect("pictor runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("dry run: nothing deleted"), "{stdout}");
        assert!(stdout.contains("--execute"), "{stdout}");
        let count_of = |family: &str| {
            stdout
                .lines()
                .find(|line| line.starts_with(&format!("{family} ")))
                .and_then(|line| line.split_whitespace().nth(2))
                .and_then(|count| count.parse::<u64>().ok())
        };
        let expected = [3, 2, 2, 1, 1];
        for (family, count) in FAMILIES.iter().zip(expected) {
            assert_eq!(
                count_of(family.name),
                Some(count),
                "{}: {stdout}",
                family.name
            );
        }
        assert_eq!(count_of("total"), None, "the total has no pattern column");
        let total = stdout
            .lines()
            .find(|line| line.starts_with("total"))
            .expect("a total line");
        assert_eq!(total.split_whitespace().nth(1), Some("9"), "{stdout}");
        assert!(
            stdout.contains(&pictor_prefix),
            "names the protected prefix: {stdout}"
        );
        assert!(!stdout.contains("redis://"), "the URL is never printed");
        assert_eq!(
            existing(&test_url, &all).await.len(),
            all.len(),
            "nothing deleted"
        );
    })
    .await;
}
