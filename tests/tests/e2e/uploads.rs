//! Uploads as an attacker sends them (`docs/security.md`): what schemathesis does not generate
//! (truncated images, polyglots, zero-byte and surplus multipart parts, JSON built to hurt the
//! parser), a flood of 20 MiB answers to one question, and two answers racing for it.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use tests::harness::{ALICE, Options, TestApp, spawn_app, spawn_app_with};
use tests::mocks::{jpeg, png, webp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn api_only() -> TestApp {
    spawn_app_with(
        Options {
            worker: false,
            ..Options::default()
        },
        |s| s.api.user_burst = std::num::NonZeroU32::new(1000).unwrap(),
    )
    .await
}

/// Status and `error.code` of an answer that must be a JSON error.
async fn refusal(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("errors are JSON");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    (status, body["error"]["code"].as_str().unwrap().to_string())
}

fn image_form(bytes: Vec<u8>) -> Form {
    Form::new().text("prompt", "make it blue").part(
        "image",
        Part::bytes(bytes)
            .file_name("x.png")
            .mime_str("image/png")
            .unwrap(),
    )
}

/// A PNG whose IHDR claims `width` x `height` (the CRC fixed, so only the size is wrong).
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = png(1, 1, 0);
    // 8 bytes of signature, 4 of length, then "IHDR", width, height, ...
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

/// CRC-32 (IEEE), as PNG chunks use it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn broken_and_disguised_images_are_refused_with_a_clear_code() {
    let app = api_only().await;
    let mut html_after_magic = b"\x89PNG\r\n\x1a\n".to_vec();
    html_after_magic.extend_from_slice(b"<html><script>alert(document.cookie)</script></html>");
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        (
            "a PNG cut after its magic",
            png(64, 64, 1)[..20].to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
        ),
        (
            "a JPEG cut in its header",
            jpeg(64, 64, 1)[..12].to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
        ),
        (
            "a WebP cut in its header",
            webp(64, 64, 1)[..14].to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
        ),
        (
            "HTML behind a PNG signature",
            html_after_magic,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
        ),
        (
            "a GIF/JavaScript polyglot",
            b"GIF89a/*\x01\x00\x01\x00\x00\x00\x00*/=alert(1);".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_image_type",
        ),
        (
            "an SVG",
            b"<svg xmlns=\"http://www.w3.org/2000/svg\" onload=\"alert(1)\"/>".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_image_type",
        ),
        (
            "a PNG claiming 100000x100000 pixels",
            png_claiming(100_000, 100_000),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
        ),
        (
            "a PNG one pixel wider than allowed",
            png(16_385, 1, 1),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
        ),
        (
            "a PNG claiming zero width",
            png_claiming(0, 10),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_image",
        ),
        (
            "a zero-byte image part",
            Vec::new(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
    ];
    for (name, bytes, status, code) in cases {
        let as_json = app
            .post_job(
                ALICE,
                json!({"prompt": "edit", "image": {"data": b64(&bytes)}}),
            )
            .await;
        assert_eq!(
            refusal(as_json).await,
            (status, code.to_string()),
            "{name} (JSON)"
        );
        let as_part = app.post_multipart(ALICE, image_form(bytes)).await;
        assert_eq!(
            refusal(as_part).await,
            (status, code.to_string()),
            "{name} (multipart)"
        );
    }
    // A real image with a script appended after its end is an image: it is accepted, and is
    // only ever served back as an image (with `nosniff` and a sandboxing policy).
    let mut trailing = png(8, 8, 2);
    trailing.extend_from_slice(b"<script>alert(1)</script>");
    let accepted = app.post_multipart(ALICE, image_form(trailing)).await;
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);

    let listed: Value = app.get(ALICE, "/v1/jobs").await.json().await.unwrap();
    assert_eq!(
        listed["jobs"].as_array().unwrap().len(),
        1,
        "only the real image made a job"
    );
}

#[tokio::test]
async fn multipart_bodies_built_to_hurt_get_a_4xx_json_error() {
    let app = api_only().await;
    // Zero-byte parts.
    let empty_prompt = Form::new().text("prompt", "");
    assert_eq!(
        refusal(app.post_multipart(ALICE, empty_prompt).await).await,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "prompt_required".to_string()
        )
    );
    // More parts than the form has fields: a few, then thousands.
    for count in [17, 5000] {
        let mut form = Form::new().text("prompt", "a cat");
        for index in 0..count {
            form = form.text(format!("junk{index}"), "x");
        }
        assert_eq!(
            refusal(app.post_multipart(ALICE, form).await).await,
            (StatusCode::BAD_REQUEST, "invalid_request".to_string()),
            "{count} extra parts"
        );
    }
    // The same field many times within the bound: the last wins, nothing is kept twice.
    let mut repeated = Form::new();
    for _ in 0..8 {
        repeated = repeated.text("prompt", "a cat");
    }
    assert_eq!(
        app.post_multipart(ALICE, repeated).await.status(),
        StatusCode::ACCEPTED
    );
    // A body that is not multipart at all, and one cut before its closing boundary.
    for (name, body) in [
        ("no boundary in the body", b"this is not multipart".to_vec()),
        (
            "no closing boundary",
            b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na cat".to_vec(),
        ),
    ] {
        let response = app
            .post_raw(ALICE, "multipart/form-data; boundary=b", body)
            .await;
        let (status, code) = refusal(response).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{name}"
        );
    }
    let no_boundary = app
        .post_raw(ALICE, "multipart/form-data", b"--x\r\n".to_vec())
        .await;
    assert_eq!(refusal(no_boundary).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn json_built_to_hurt_the_parser_gets_a_4xx_json_error() {
    let app = api_only().await;
    let deep = format!("{{\"junk\": {}", "[".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        (
            "nested 100,000 deep",
            deep.into_bytes(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "n = 1e300",
            br#"{"prompt": "a cat", "n": 1e300}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "n = -1",
            br#"{"prompt": "a cat", "n": -1}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "a lone surrogate",
            br#"{"prompt": "\ud800"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "invalid UTF-8",
            b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "an empty body",
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "image as a string",
            br#"{"prompt": "a", "image": "AAAA"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
    ];
    for (name, body, status, code) in cases {
        let response = app.post_raw(ALICE, "application/json", body).await;
        assert_eq!(
            refusal(response).await,
            (status, code.to_string()),
            "{name}"
        );
    }
    // Base64 wrapped at 76 columns, and with `/` escaped as `\/` (both legal): accepted, and
    // the job keeps the exact image.
    let image = png(40, 40, 7);
    let encoded = b64(&image);
    let wrapped: String = encoded
        .as_bytes()
        .chunks(76)
        .map(|line| std::str::from_utf8(line).unwrap())
        .collect::<Vec<_>>()
        .join("\r\n");
    let escaped = format!(
        r#"{{"prompt": "edit", "image": {{"data": "{}"}}}}"#,
        encoded.replace('/', "\\/")
    );
    for body in [
        json!({"prompt": "edit", "image": {"data": wrapped}}).to_string(),
        escaped,
    ] {
        let response = app
            .post_raw(ALICE, "application/json", body.into_bytes())
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let id = response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let stored = std::path::Path::new(&app.settings.images.store)
            .join("inputs")
            .join(&id)
            .join("source.png");
        assert_eq!(std::fs::read(&stored).unwrap(), image, "the image as sent");
    }
}

/// Posts `body` to `path` as `key` on a raw socket, writing it while reading the answer, and
/// returns the answer's status as soon as it arrives (the api may answer before the body is
/// sent, and close). Every caller shares one `body`.
async fn post_while_reading(addr: SocketAddr, key: &str, path: &str, body: Bytes) -> u16 {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: pictor\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = socket.split();
    let write = async {
        for chunk in body.chunks(256 * 1024) {
            if writer.write_all(chunk).await.is_err() {
                break;
            }
        }
        // Sent (or refused): wait for the answer.
        std::future::pending::<()>().await;
    };
    let read = async {
        let mut said = Vec::new();
        let mut buffer = [0u8; 1024];
        while !said.windows(2).any(|w| w == b"\r\n") {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => said.extend_from_slice(&buffer[..read]),
            }
        }
        let line = String::from_utf8_lossy(&said).into_owned();
        line.split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP answer: {line:?}"))
    };
    tokio::time::timeout(Duration::from_secs(120), async {
        tokio::select! {
            status = read => status,
            () = write => unreachable!(),
        }
    })
    .await
    .expect("an answer within two minutes")
}

/// A job (made through `app`) that is asking its question.
async fn asking_job(app: &TestApp) -> String {
    app.openai
        .as_ref()
        .unwrap()
        .router_answers("unclear", 0.9, "", Some("New picture or an edit?"))
        .await;
    app.gemini.as_ref().unwrap().edit_ok().await;
    let id = app.submit(ALICE, json!({"prompt": "do the thing"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "needs_clarification", "{job:#}");
    id
}

#[tokio::test]
async fn two_hundred_concurrent_20_mib_answers_are_refused_without_a_memory_spike() {
    let app = spawn_app_with(Options::default(), |s| {
        s.api.user_burst = std::num::NonZeroU32::new(4).unwrap();
        s.api.user_jobs_per_minute = std::num::NonZeroU32::new(1).unwrap();
    })
    .await;
    let id = asking_job(&app).await;
    // The admitted answers' uploads take 2 s, so every answer arrives while the job is asking.
    let api = app
        .spawn_process(
            "api",
            &[("PICTOR_FAILPOINTS", "store_input=sleep(2000)".to_string())],
        )
        .await;
    let addr: SocketAddr = api.base.trim_start_matches("http://").parse().unwrap();

    // A real image padded to ~14 MiB: about 19 MiB as base64 JSON, under the 20 MiB limit.
    let mut image = png(64, 64, 9);
    image.resize(14 * 1024 * 1024, 0);
    let body = Bytes::from(
        json!({"intent": "edit", "image": {"data": b64(&image)}})
            .to_string()
            .into_bytes(),
    );
    drop(image);
    let peak_before = api.memory_kib("VmHWM");
    let path = format!("/v1/jobs/{id}/clarify");
    let answers = (0..200).map(|_| post_while_reading(addr, ALICE, &path, body.clone()));
    let statuses = futures::future::join_all(answers).await;
    let peak_after = api.memory_kib("VmHWM");

    let count = |status: u16| statuses.iter().filter(|s| **s == status).count();
    assert_eq!(count(202), 1, "one answer resumes the job: {statuses:?}");
    // Alice's burst of 4 had 3 left: 3 answers are read (and held by their slow upload) while
    // the job is still asking, one of them wins, two lose the race; every other one is over the
    // rate and refused before its body is read.
    assert_eq!(count(429), 197, "{statuses:?}");
    assert_eq!(count(409), 2, "{statuses:?}");
    // Without the cheap checks first, 200 bodies of 19 MiB, held several times each, would
    // take gigabytes; the few admitted ones take tens of megabytes.
    let grown_mib = peak_after.saturating_sub(peak_before) / 1024;
    assert!(
        grown_mib < 256,
        "the api's peak memory grew by {grown_mib} MiB ({peak_before} kB to {peak_after} kB)"
    );
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
}

#[tokio::test]
async fn of_two_racing_answers_only_the_winners_image_is_kept_and_used() {
    let app = spawn_app().await;
    let id = asking_job(&app).await;
    // Each answer's upload takes half a second, so both are past the cheap checks before
    // either changes the job.
    let api = app
        .spawn_process(
            "api",
            &[("PICTOR_FAILPOINTS", "store_input=sleep(500)".to_string())],
        )
        .await;
    let images = [png(24, 24, 1), png(24, 24, 2)];
    let answer = |image: &Vec<u8>| {
        app.client
            .post(format!("{}/v1/jobs/{id}/clarify", api.base))
            .bearer_auth(ALICE)
            .json(&json!({"intent": "edit", "image": {"data": b64(image)}}))
            .send()
    };
    let (first, second) = tokio::join!(answer(&images[0]), answer(&images[1]));
    let statuses = [first.unwrap().status(), second.unwrap().status()];
    let winner = match statuses {
        [StatusCode::ACCEPTED, StatusCode::CONFLICT] => &images[0],
        [StatusCode::CONFLICT, StatusCode::ACCEPTED] => &images[1],
        other => panic!("one answer wins, the other gets 409: {other:?}"),
    };

    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let sent = app.gemini.as_ref().unwrap().received().await;
    assert_eq!(sent.len(), 1);
    let sent = sent[0].to_string();
    assert!(
        sent.contains(&b64(winner)),
        "the edit used the winner's image"
    );
    let loser = if std::ptr::eq(winner, &images[0]) {
        &images[1]
    } else {
        &images[0]
    };
    assert!(!sent.contains(&b64(loser)));

    // The store holds the winner's upload only.
    let folder = std::path::Path::new(&app.settings.images.store)
        .join("inputs")
        .join(&id);
    let kept: Vec<Vec<u8>> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    assert_eq!(
        kept,
        vec![winner.clone()],
        "inputs of the job: {}",
        kept.len()
    );
}
