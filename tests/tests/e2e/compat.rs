//! Rollback safety: what one release writes, the release before and the release after can read.
//!
//! The fixtures under `tests/fixtures/` are the data that crosses versions (see
//! `tests/fixtures/README.md` and `docs/runbooks/rollback.md`): job messages of every version
//! in the read window and one beyond it, and the job hash in Redis as this release writes it and
//! as the next release may write it. These tests decode them with the current code, prove that
//! this release still writes what the fixtures say, and run them through a real worker.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::Value;
use shared::domain::JobId;
use shared::queue::{JobMessage, MESSAGE_VERSION, MessageError, readable_versions};
use tests::harness::{ALICE, Options, TestApp, spawn_api, spawn_app_with};

/// The message types this release knows (the `type` tags of `JobMessage`).
const KNOWN_TYPES: [&str; 1] = ["run_job"];

fn fixtures(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(kind)
}

/// A message fixture: `v{version}.{type}.json`.
struct MessageFixture {
    name: String,
    version: u32,
    kind: String,
    bytes: Vec<u8>,
}

fn message_fixtures() -> Vec<MessageFixture> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(fixtures("messages")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        let (version, kind) = stem
            .strip_prefix('v')
            .and_then(|rest| rest.split_once('.'))
            .unwrap_or_else(|| panic!("{name} is not named v{{version}}.{{type}}.json"));
        found.push(MessageFixture {
            version: version
                .parse()
                .unwrap_or_else(|_| panic!("{name}: bad version")),
            kind: kind.to_string(),
            bytes: std::fs::read(&path).unwrap(),
            name,
        });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

fn fixture_path(version: u32, kind: &str) -> PathBuf {
    fixtures("messages").join(format!("v{version}.{kind}.json"))
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn every_message_fixture_decodes_exactly_when_its_type_and_version_are_readable() {
    let all = message_fixtures();
    assert!(
        all.len() >= 4,
        "{:?}",
        all.iter().map(|f| &f.name).collect::<Vec<_>>()
    );
    for fixture in &all {
        let value: Value = serde_json::from_slice(&fixture.bytes).unwrap();
        assert_eq!(
            value["v"], fixture.version,
            "{}: name and v disagree",
            fixture.name
        );
        assert_eq!(
            value["type"],
            fixture.kind.as_str(),
            "{}: name and type disagree",
            fixture.name
        );
        let readable = KNOWN_TYPES.contains(&fixture.kind.as_str())
            && readable_versions().contains(&fixture.version);
        match JobMessage::decode(&fixture.bytes) {
            Ok(message) => {
                assert!(readable, "{} decoded but must be refused", fixture.name);
                assert_eq!(message.version(), fixture.version);
                assert_eq!(
                    Some(message.job_id()),
                    value["job_id"].as_str().and_then(JobId::parse),
                    "{}",
                    fixture.name
                );
                // Republishing (a deferral) must not lose the fields a newer release added.
                let again: Value = serde_json::from_slice(&message.encode()).unwrap();
                assert_eq!(again, value, "{} changed on re-encoding", fixture.name);
            }
            Err(error) => {
                assert!(!readable, "{} must decode: {error}", fixture.name);
                if KNOWN_TYPES.contains(&fixture.kind.as_str()) {
                    assert!(
                        matches!(error, MessageError::UnknownVersion(v) if v == fixture.version),
                        "{}: {error}",
                        fixture.name
                    );
                }
            }
        }
    }
}

#[test]
fn there_is_a_message_fixture_for_every_readable_version_and_one_too_new() {
    for version in readable_versions().chain([readable_versions().end() + 1]) {
        let path = fixture_path(version, "run_job");
        assert!(
            path.is_file(),
            "MESSAGE_VERSION is {MESSAGE_VERSION}, so the release reads versions {:?} and must \
             refuse {}: add {} (see tests/fixtures/README.md)",
            readable_versions(),
            readable_versions().end() + 1,
            path.display()
        );
    }
    assert!(
        message_fixtures()
            .iter()
            .any(|fixture| !KNOWN_TYPES.contains(&fixture.kind.as_str())),
        "keep a fixture of an unknown message type, which must be refused"
    );
}

#[test]
fn the_current_version_fixture_has_exactly_the_fields_this_release_writes() {
    let written: Value = serde_json::from_slice(&JobMessage::run(JobId::new()).encode()).unwrap();
    let fixture: Value =
        serde_json::from_slice(&std::fs::read(fixture_path(MESSAGE_VERSION, "run_job")).unwrap())
            .unwrap();
    assert_eq!(written["v"], MESSAGE_VERSION);
    assert_eq!(
        keys(&written),
        keys(&fixture),
        "the writer's fields changed without a new MESSAGE_VERSION and fixture"
    );
}

#[test]
fn the_next_version_only_adds_fields() {
    let read = |version| -> Value {
        serde_json::from_slice(&std::fs::read(fixture_path(version, "run_job")).unwrap()).unwrap()
    };
    let current = keys(&read(MESSAGE_VERSION));
    let next = keys(&read(MESSAGE_VERSION + 1));
    assert!(
        next.is_superset(&current) && next.len() > current.len(),
        "the next version must keep every field and add at least one: {current:?} -> {next:?}"
    );
}

/// A Redis job hash fixture, as `HGETALL` answers it.
fn job_hash(name: &str) -> HashMap<String, String> {
    serde_json::from_slice(&std::fs::read(fixtures("redis").join(name)).unwrap()).unwrap()
}

/// Writes a hash fixture as a new job of this test's Redis prefix; answers its id.
async fn insert_job(app: &TestApp, name: &str) -> JobId {
    let id = JobId::new();
    let mut fields = job_hash(name);
    fields.insert("id".to_string(), id.to_string());
    let fields: Vec<(String, String)> = fields.into_iter().collect();
    let mut connection = app.store.redis().connection();
    redis::cmd("HSET")
        .arg(app.store.keys().job(id))
        .arg(&fields)
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
    id
}

async fn hash_fields(app: &TestApp, id: &str) -> BTreeSet<String> {
    let mut connection = app.store.redis().connection();
    let map: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(app.store.keys().job(JobId::parse(id).unwrap()))
        .query_async(&mut connection)
        .await
        .unwrap();
    map.into_keys().collect()
}

fn simulated() -> Options {
    Options {
        mock_providers: false,
        ..Options::default()
    }
}

#[tokio::test]
async fn job_hashes_of_this_release_and_the_next_read_back_through_the_api() {
    let app = spawn_api().await;
    for (name, status) in [
        ("job.queued.json", "queued"),
        ("job.succeeded.json", "succeeded"),
        ("job.next-release.json", "succeeded"),
    ] {
        let id = insert_job(&app, name).await;
        let job = app.job(ALICE, &id.to_string()).await;
        assert_eq!(job["status"], status, "{name}: {job:#}");
        assert_eq!(job["id"], id.to_string(), "{name}");
        if status == "succeeded" {
            assert_eq!(job["result"]["images"][0]["width"], 1536, "{name}: {job:#}");
            assert_eq!(job["intent"], "create", "{name}");
        }
    }
}

#[tokio::test]
async fn the_job_hash_fixtures_have_the_fields_this_release_writes() {
    let api_only = spawn_app_with(
        Options {
            worker: false,
            ..simulated()
        },
        |_| {},
    )
    .await;
    let body =
        serde_json::json!({"prompt": "a lighthouse at dawn, watercolor", "size": "1536x1024"});
    let queued = api_only.submit(ALICE, body.clone()).await;
    let fixture: BTreeSet<String> = job_hash("job.queued.json").into_keys().collect();
    assert_eq!(
        hash_fields(&api_only, &queued).await,
        fixture,
        "the api writes other job hash fields than tests/fixtures/redis/job.queued.json: \
         update the fixture and check a rolled-back worker can read them"
    );

    let app = spawn_app_with(simulated(), |_| {}).await;
    let done = app.submit(ALICE, body).await;
    let job = app.wait_until_terminal(ALICE, &done).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let fixture: BTreeSet<String> = job_hash("job.succeeded.json").into_keys().collect();
    // The run's lease (`runner`) is let go just after the final write: read the hash at rest.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fields = hash_fields(&app, &done).await;
    while fields.contains("runner") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        fields = hash_fields(&app, &done).await;
    }
    assert_eq!(
        fields, fixture,
        "a worker writes other job hash fields than tests/fixtures/redis/job.succeeded.json: \
         update the fixture and check a rolled-back release can read them"
    );
}

/// Publishes a message fixture for `job` (its `job_id` replaced) straight onto the work queue.
async fn publish_fixture(app: &TestApp, name: &str, job: JobId) {
    let mut value: Value =
        serde_json::from_slice(&std::fs::read(fixtures("messages").join(name)).unwrap()).unwrap();
    if value.get("job_id").is_some() {
        value["job_id"] = Value::String(job.to_string());
    }
    let (connection, channel) = app.amqp_channel().await;
    app.topology.declare(&channel).await.unwrap();
    channel
        .basic_publish(
            "".into(),
            app.topology.jobs_queue.as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&value).unwrap(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
}

async fn wait_for_dead_letters(app: &TestApp, count: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dead = app.queue_depth(&app.topology.dead_letter_queue).await;
        if dead >= count {
            assert_eq!(dead, count);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {dead} of {count} messages were dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_worker_runs_a_job_the_next_release_enqueued_and_dead_letters_what_it_cannot_read() {
    let app = spawn_app_with(simulated(), |_| {}).await;

    // The next release's api wrote the job hash and a v(current + 1) message.
    let next = insert_job(&app, "job.queued.json").await;
    publish_fixture(
        &app,
        &format!("v{}.run_job.json", MESSAGE_VERSION + 1),
        next,
    )
    .await;
    let job = app.wait_until_terminal(ALICE, &next.to_string()).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");

    // Too new a version and an unknown type are refused and kept for ops, their jobs untouched.
    let too_new = insert_job(&app, "job.queued.json").await;
    publish_fixture(
        &app,
        &format!("v{}.run_job.json", MESSAGE_VERSION + 2),
        too_new,
    )
    .await;
    let unknown = message_fixtures()
        .into_iter()
        .find(|fixture| !KNOWN_TYPES.contains(&fixture.kind.as_str()))
        .unwrap();
    publish_fixture(&app, &unknown.name, too_new).await;
    wait_for_dead_letters(&app, 2).await;
    assert_eq!(
        app.job(ALICE, &too_new.to_string()).await["status"],
        "queued"
    );
}
