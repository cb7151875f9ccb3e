//! The `s3://bucket/prefix` image store against a real S3-compatible server: moto's server
//! (`scripts/s3-server.sh`, one per test on a port of its own, killed when the test ends), which
//! speaks the S3 wire protocol (path-style requests, ListObjectsV2, bulk DeleteObjects) but does
//! not check signatures. `pictor api` and `pictor worker` processes get the store the way an
//! operator configures it: `PICTOR_IMAGE_STORE`, credentials in `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` and a custom endpoint in `AWS_ENDPOINT_URL`. What a user
//! sees is checked through the api; what is in the bucket by listing it over plain HTTP, as an
//! operator would with `aws s3 ls` (`docs/storage.md`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::harness::{ALICE, PictorProcess, TestApp, free_port, metric_sample, spawn_api};
use tests::mocks::{MOCK_IMAGE_SIDE, png};

use crate::retention::edits_succeed;

/// Where in each test's bucket Pictor keeps its images: a nested prefix, as
/// `s3://bucket/e2e/pictor`.
const PREFIX: &str = "e2e/pictor";

/// How long moto may take to answer: the first start may install it into its virtualenv.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The credentials the `pictor` processes sign with (moto takes any).
const ACCESS_KEY_ID: &str = "pictor-test-access-key";
const SECRET_ACCESS_KEY: &str = "pictor-test-secret-key";

/// What the test's own requests to moto carry: a SigV4 `Authorization` header whose signature
/// moto does not check. Without one moto treats a request as anonymous, and an anonymous GET of
/// a (private) object is refused with 403, though an anonymous listing is not.
const UNCHECKED_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 \
    Credential=pictor-test-access-key/20260101/us-east-1/s3/aws4_request, \
    SignedHeaders=host, Signature=0000";

/// A moto server started with `scripts/s3-server.sh` on a free port. Dropping it kills the
/// script's process group (the server, or an install still running) and reaps it.
struct S3Server {
    /// `http://127.0.0.1:{port}`.
    endpoint: String,
    client: reqwest::Client,
    child: Child,
    log: PathBuf,
}

impl S3Server {
    async fn start() -> Self {
        let port = free_port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/s3-server.sh");
        let log =
            std::env::temp_dir().join(format!("pictor-moto-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).unwrap();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new("bash")
                .arg(script)
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                // Its own process group, so that a drop ends pip too if it is still installing.
                .process_group(0)
                .spawn()
                .expect("scripts/s3-server.sh starts")
        };
        let mut server = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::builder()
                .default_headers(reqwest::header::HeaderMap::from_iter([(
                    reqwest::header::AUTHORIZATION,
                    reqwest::header::HeaderValue::from_static(UNCHECKED_AUTHORIZATION),
                )]))
                .build()
                .unwrap(),
            child,
            log,
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "the S3 server exited at start ({status}):\n{}",
                    server.output()
                );
            }
            // ListBuckets: moto answers it once it listens.
            let answer = server.client.get(&server.endpoint).send().await;
            if answer.is_ok_and(|response| response.status().is_success()) {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "the S3 server did not answer on {} within {START_DEADLINE:?}:\n{}",
                server.endpoint,
                server.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Creates a bucket of this test's own (`PUT /{bucket}`) and answers its name.
    async fn create_bucket(&self) -> String {
        let bucket = format!("pictor-test-{}", uuid::Uuid::new_v4().simple());
        let response = self
            .client
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "creating bucket {bucket}: {}",
            response.status()
        );
        bucket
    }

    /// The keys in `bucket` under `prefix` (ListObjectsV2, following continuation tokens).
    async fn keys(&self, bucket: &str, prefix: &str) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = url::Url::parse(&format!("{}/{bucket}", self.endpoint)).unwrap();
            url.query_pairs_mut()
                .append_pair("list-type", "2")
                .append_pair("prefix", prefix);
            if let Some(token) = &token {
                url.query_pairs_mut()
                    .append_pair("continuation-token", token);
            }
            let response = self.client.get(url).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "listing {bucket}");
            let xml = response.text().await.unwrap();
            keys.extend(elements(&xml, "Key"));
            token = elements(&xml, "NextContinuationToken").into_iter().next();
            if token.is_none() {
                return keys;
            }
        }
    }

    /// The bytes of object `key` in `bucket`.
    async fn object(&self, bucket: &str, key: &str) -> Vec<u8> {
        let response = self
            .client
            .get(format!("{}/{bucket}/{key}", self.endpoint))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {bucket}/{key}");
        response.bytes().await.unwrap().to_vec()
    }

    /// Polls the listing of `bucket` under `prefix` until it is empty, failing after `within`.
    async fn wait_until_empty(&self, bucket: &str, prefix: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let keys = self.keys(bucket, prefix).await;
            if keys.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{bucket}/{prefix} still holds {keys:?} after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // The group's id is the script's pid (`process_group(0)`); moto is the script after exec.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The text of every `<name>…</name>` element in `xml` (S3's listings are flat enough).
fn elements(xml: &str, name: &str) -> Vec<String> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    xml.split(open.as_str())
        .skip(1)
        .filter_map(|rest| rest.split_once(close.as_str()))
        .map(|(text, _)| text.to_string())
        .collect()
}

/// What a `pictor` process needs to keep its images in `bucket` under [`PREFIX`] on `s3`, with
/// `extra` settings after.
fn s3_env(
    s3: &S3Server,
    bucket: &str,
    extra: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("PICTOR_IMAGE_STORE", format!("s3://{bucket}/{PREFIX}")),
        ("AWS_ENDPOINT_URL", s3.endpoint.clone()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    env.extend(
        extra
            .iter()
            .map(|(name, value)| (*name, (*value).to_string())),
    );
    env
}

/// A job editing `image` (PNG bytes): the api stores it as the job's input.
fn edit_request(image: &[u8]) -> Value {
    json!({
        "prompt": "make the sky purple",
        "image": {
            "data": base64::engine::general_purpose::STANDARD.encode(image),
            "mime_type": "image/png",
        },
    })
}

fn input_key(id: &str) -> String {
    format!("{PREFIX}/inputs/{id}/source.png")
}

fn output_key(id: &str) -> String {
    format!("{PREFIX}/outputs/{id}/0.png")
}

async fn get_at(app: &TestApp, process: &PictorProcess, path: &str) -> reqwest::Response {
    app.client
        .get(format!("{}{path}", process.base))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap()
}

/// The worker's `/metrics` text.
async fn metrics_of(worker: &PictorProcess) -> String {
    reqwest::get(format!("{}/metrics", worker.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_edit_keeps_its_input_and_output_in_the_bucket_and_serves_the_output() {
    let s3 = S3Server::start().await;
    let bucket = s3.create_bucket().await;
    let app = spawn_api().await;
    edits_succeed(&app).await;
    let env = s3_env(&s3, &bucket, &[("PICTOR_IMAGE_MEASURE_INTERVAL_SECS", "1")]);
    let api = app.spawn_process("api", &env).await;
    let worker = app.spawn_process("worker", &env).await;

    let input = png(32, 32, 3);
    let id = app.submit_at(&api.base, ALICE, edit_request(&input)).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");

    // The user downloads the edit from the api on S3: the very PNG the provider returned.
    let image = get_at(&app, &api, &format!("/v1/jobs/{id}/images/0")).await;
    assert_eq!(image.status(), StatusCode::OK);
    assert_eq!(image.headers()["content-type"], "image/png");
    let expected = png(MOCK_IMAGE_SIDE, MOCK_IMAGE_SIDE, 7);
    assert_eq!(
        image.bytes().await.unwrap().as_ref(),
        expected.as_slice(),
        "the downloaded image is the provider's"
    );

    // In the bucket, under the prefix and nowhere else: the input as uploaded, and the output.
    let keys = s3.keys(&bucket, "").await;
    assert_eq!(
        keys,
        BTreeSet::from([input_key(&id), output_key(&id)]),
        "the whole bucket"
    );
    assert_eq!(s3.object(&bucket, &input_key(&id)).await, input);
    assert_eq!(s3.object(&bucket, &output_key(&id)).await, expected);

    // The worker measures the store by listing the bucket: it shows both objects and their bytes.
    let bytes = (input.len() + expected.len()) as f64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics_of(&worker).await;
        let measured = (
            metric_sample(&text, "pictor_image_store_bytes", &[]),
            metric_sample(&text, "pictor_image_store_objects", &[]),
        );
        if measured == (Some(bytes), Some(2.0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never showed {bytes} bytes in 2 objects; last {measured:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn expired_images_are_deleted_from_the_bucket_by_the_sweeper() {
    let s3 = S3Server::start().await;
    let bucket = s3.create_bucket().await;
    let app = spawn_api().await;
    edits_succeed(&app).await;
    let env = s3_env(
        &s3,
        &bucket,
        &[
            ("PICTOR_IMAGE_RETENTION_SECS", "1"),
            ("PICTOR_IMAGE_SWEEP_INTERVAL_SECS", "1"),
        ],
    );
    let api = app.spawn_process("api", &env).await;

    let id = app
        .submit_at(&api.base, ALICE, edit_request(&png(32, 32, 3)))
        .await;
    // No worker yet, so nothing sweeps: the input waits in the bucket with its job.
    assert_eq!(
        s3.keys(&bucket, &format!("{PREFIX}/")).await,
        BTreeSet::from([input_key(&id)])
    );
    let worker = app.spawn_process("worker", &env).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");

    // A second after the job ended, and a sweep later, the bucket holds nothing of it.
    s3.wait_until_empty(&bucket, &format!("{PREFIX}/"), Duration::from_secs(30))
        .await;
    assert!(s3.keys(&bucket, "").await.is_empty(), "the whole bucket");
    // The image URL answers as for any expired image (docs/storage.md): 404, while the job
    // itself lives its own TTL.
    let image = get_at(&app, &api, &format!("/v1/jobs/{id}/images/0")).await;
    assert_eq!(image.status(), StatusCode::NOT_FOUND);
    let job: Value = get_at(&app, &api, &format!("/v1/jobs/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "succeeded", "{job:#}");
    // The sweeper deleted both, the input and the output.
    let text = metrics_of(&worker).await;
    assert_eq!(
        metric_sample(
            &text,
            "pictor_images_deleted_total",
            &[("reason", "expired")]
        ),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_canceled_jobs_input_leaves_the_bucket_before_the_cancel_answers() {
    let s3 = S3Server::start().await;
    let bucket = s3.create_bucket().await;
    let app = spawn_api().await;
    // No worker: the job waits in the queue with its input in the bucket.
    let api = app.spawn_process("api", &s3_env(&s3, &bucket, &[])).await;
    let input = png(32, 32, 3);
    let id = app.submit_at(&api.base, ALICE, edit_request(&input)).await;
    assert_eq!(s3.keys(&bucket, "").await, BTreeSet::from([input_key(&id)]));
    assert_eq!(s3.object(&bucket, &input_key(&id)).await, input);

    let canceled = app
        .client
        .delete(format!("{}/v1/jobs/{id}", api.base))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(canceled.status(), StatusCode::OK);
    let body: Value = canceled.json().await.unwrap();
    assert_eq!(body["status"], "canceled", "{body:#}");

    assert!(
        s3.keys(&bucket, "").await.is_empty(),
        "the input is gone from the bucket when the cancel answers"
    );
    let image = get_at(&app, &api, &format!("/v1/jobs/{id}/images/0")).await;
    assert_eq!(image.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_job_that_fails_for_good_leaves_nothing_in_the_bucket() {
    let s3 = S3Server::start().await;
    let bucket = s3.create_bucket().await;
    let app = spawn_api().await;
    app.openai
        .as_ref()
        .unwrap()
        .router_answers("edit", 0.9, "make the sky purple", None)
        .await;
    app.gemini.as_ref().unwrap().blocked().await;
    let env = s3_env(&s3, &bucket, &[]);
    let api = app.spawn_process("api", &env).await;
    let id = app
        .submit_at(&api.base, ALICE, edit_request(&png(32, 32, 3)))
        .await;
    assert_eq!(s3.keys(&bucket, "").await, BTreeSet::from([input_key(&id)]));

    let worker = app.spawn_process("worker", &env).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "content_blocked", "{job:#}");

    // Deleted by the worker as it writes the failure (the retention is the job TTL here).
    s3.wait_until_empty(&bucket, "", Duration::from_secs(5))
        .await;
    let text = metrics_of(&worker).await;
    assert_eq!(
        metric_sample(
            &text,
            "pictor_images_deleted_total",
            &[("reason", "failed")]
        ),
        Some(1.0),
        "{text}"
    );
}
