//! The api against clients that mean harm (`docs/security.md`): each test is an attack, made
//! with raw sockets where a polite HTTP client would not misbehave enough, against a real
//! `pictor api` process where the process's own file descriptors, tasks or memory are what the
//! attack goes after.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::harness::{
    ALICE, BOB, OPS, Options, PictorProcess, TestApp, metric_sample, spawn_api, spawn_app_with,
    spawn_simulated,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn socket_addr(base: &str) -> SocketAddr {
    base.trim_start_matches("http://").parse().unwrap()
}

/// Reads from `socket` until the server closes it (end of stream or a reset), for at most
/// `within`; whatever the server said on the way is returned. `None`: still open.
async fn read_until_closed(socket: &mut TcpStream, within: Duration) -> Option<String> {
    let mut said = Vec::new();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => said.extend_from_slice(&buffer[..read]),
            }
        }
    })
    .await
    .ok()
    .map(|()| String::from_utf8_lossy(&said).into_owned())
}

/// The status code of a raw HTTP/1.1 response.
fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

/// The JSON body of a raw HTTP/1.1 response (not chunked).
fn json_of(response: &str) -> Value {
    let (_, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    serde_json::from_str(body).unwrap_or_else(|_| panic!("a JSON body: {response:?}"))
}

/// The process's `/metrics`, read with the ops key.
async fn scrape(app: &TestApp, api: &PictorProcess) -> String {
    let response = app
        .client
        .get(format!("{}/metrics", api.base))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap()
}

async fn gauge(app: &TestApp, api: &PictorProcess, name: &str) -> f64 {
    metric_sample(&scrape(app, api).await, name, &[])
        .unwrap_or_else(|| panic!("{name} is on /metrics"))
}

/// Polls `gauge` until `holds`, for at most `within`; its last value otherwise.
async fn gauge_until(
    app: &TestApp,
    api: &PictorProcess,
    name: &str,
    within: Duration,
    holds: impl Fn(f64) -> bool,
) -> Result<f64, f64> {
    let deadline = Instant::now() + within;
    loop {
        let value = gauge(app, api, name).await;
        if holds(value) {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(value);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn slowloris_sockets_are_closed_within_the_header_timeout() {
    let app = spawn_api().await;
    let api = app
        .spawn_process(
            "api",
            &[("PICTOR_HEADER_READ_TIMEOUT_SECS", "2".to_string())],
        )
        .await;
    let addr = socket_addr(&api.base);
    // Three kinds of slow client: one that never sends a byte, one that stops halfway through
    // its headers, one that keeps trickling a header byte every 300 ms.
    let mut silent = Vec::new();
    let mut stalled = Vec::new();
    for index in 0..100 {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        if index % 2 == 0 {
            socket
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: pictor\r\nX-Slow: ")
                .await
                .unwrap();
            stalled.push(socket);
        } else {
            silent.push(socket);
        }
    }
    let trickler = tokio::spawn(async move {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket.write_all(b"GET /readyz HTTP/1.1\r\n").await.unwrap();
        let started = Instant::now();
        while socket.write_all(b"X").await.is_ok() {
            if Instant::now() - started > Duration::from_secs(10) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Some(started.elapsed())
    });
    // And one that asked once and then sits on its keep-alive connection.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /readyz HTTP/1.1\r\nHost: pictor\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 1024];
    assert!(
        idle.read(&mut answer).await.unwrap() > 0,
        "the first request is answered"
    );
    silent.push(idle);
    let started = Instant::now();

    // The api keeps answering others while they hang.
    let ready = app
        .client
        .get(format!("{}/readyz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    let waits = silent
        .iter_mut()
        .chain(stalled.iter_mut())
        .map(|socket| read_until_closed(socket, Duration::from_secs(6)));
    let closed = futures::future::join_all(waits).await;
    let open = closed.iter().filter(|closed| closed.is_none()).count();
    assert_eq!(open, 0, "{open} of 101 slow sockets still open after 6 s");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed by the header timeout, not at once"
    );
    let trickled = trickler.await.unwrap();
    assert!(
        trickled.is_some_and(|elapsed| elapsed < Duration::from_secs(6)),
        "a socket trickling header bytes is closed too: {trickled:?}"
    );
}

#[tokio::test]
async fn connections_past_the_cap_get_a_503_with_retry_after_and_are_closed() {
    let app = spawn_api().await;
    let api = app
        .spawn_process(
            "api",
            &[
                ("PICTOR_MAX_CONNECTIONS", "10".to_string()),
                ("PICTOR_HEADER_READ_TIMEOUT_SECS", "30".to_string()),
            ],
        )
        .await;
    let addr = socket_addr(&api.base);
    // Ten idle sockets hold every connection the api allows (the probe's own keep-alive
    // connection may hold one of them: only the count matters).
    let mut holders = Vec::new();
    for _ in 0..10 {
        holders.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut extra = TcpStream::connect(addr).await.unwrap();
    extra
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: pictor\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut extra, Duration::from_secs(3))
        .await
        .expect("a refused connection is closed");
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{answer}"
    );
    assert_eq!(json_of(&answer)["error"]["code"], "service_unavailable");

    // Once the holders go, the api takes connections again; it counted what it refused.
    drop(holders);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let probe = reqwest::Client::new()
            .get(format!("{}/readyz", api.base))
            .send()
            .await;
        if probe.is_ok_and(|response| response.status() == StatusCode::OK) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the api never took connections again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = metric_sample(
        &scrape(&app, &api).await,
        "pictor_http_connections_refused_total",
        &[],
    );
    assert!(refused.is_some_and(|count| count >= 1.0), "{refused:?}");
}

/// Opens a `POST /v1/jobs` as `key` that declares `length` body bytes and sends only `sent` of
/// them: a request the api holds while it waits for the rest.
async fn half_sent_job(addr: SocketAddr, key: &str, length: usize, sent: &[u8]) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: pictor\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(sent).await.unwrap();
    socket
}

#[tokio::test]
async fn requests_past_the_in_flight_cap_get_a_503_with_retry_after() {
    let app = spawn_api().await;
    let api = app
        .spawn_process("api", &[("PICTOR_MAX_IN_FLIGHT", "2".to_string())])
        .await;
    let addr = socket_addr(&api.base);
    // Two uploads that never finish hold both in-flight slots.
    let holders = vec![
        half_sent_job(addr, ALICE, 1000, b"{\"prompt\":").await,
        half_sent_job(addr, BOB, 1000, b"{\"prompt\":").await,
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shed = app
        .client
        .get(format!("{}/v1/jobs", api.base))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u64 = shed.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(
        shed.json::<Value>().await.unwrap()["error"]["code"],
        "service_unavailable"
    );

    drop(holders);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listed = app
            .client
            .get(format!("{}/v1/jobs", api.base))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        if listed.status() == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slots never freed: {}",
            listed.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shed_total = metric_sample(
        &scrape(&app, &api).await,
        "pictor_http_requests_shed_total",
        &[],
    );
    assert!(
        shed_total.is_some_and(|count| count >= 1.0),
        "{shed_total:?}"
    );
}

#[tokio::test]
async fn a_body_that_trickles_in_is_cut_off_with_408() {
    let app = spawn_api().await;
    let api = app
        .spawn_process("api", &[("PICTOR_REQUEST_TIMEOUT_SECS", "2".to_string())])
        .await;
    let addr = socket_addr(&api.base);
    let mut socket = half_sent_job(addr, ALICE, 10_000, b"{\"prompt\": \"a").await;
    let started = Instant::now();
    // One byte every 200 ms: far below any real upload's rate.
    let (mut reader, mut writer) = socket.split();
    let trickle = async {
        while writer.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let mut said = Vec::new();
    let read = async {
        let mut buffer = [0u8; 4096];
        while let Ok(read) = reader.read(&mut buffer).await {
            if read == 0 {
                break;
            }
            said.extend_from_slice(&buffer[..read]);
            if said.windows(4).any(|w| w == b"\r\n\r\n") && said.ends_with(b"}}") {
                break;
            }
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(8), async {
        tokio::select! {
            () = trickle => {},
            () = read => {},
        }
    })
    .await;
    assert!(done.is_ok(), "the slow upload was never cut off");
    let answer = String::from_utf8_lossy(&said).into_owned();
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert_eq!(json_of(&answer)["error"]["code"], "request_timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "cut off by the request timeout"
    );
    // Nothing was queued for it.
    let listed: Value = app
        .client
        .get(format!("{}/v1/jobs", api.base))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 0, "{listed}");
}

/// Opens `GET /v1/jobs/{id}/events` as `key` on a raw socket and waits for its first event.
async fn open_stream(addr: SocketAddr, key: &str, id: &str) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: pictor\r\nAuthorization: Bearer {key}\r\n\
         Accept: text/event-stream\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut said = Vec::new();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&said).contains("event: status") {
            let read = socket.read(&mut buffer).await.unwrap();
            assert!(
                read > 0,
                "the stream closed: {}",
                String::from_utf8_lossy(&said)
            );
            said.extend_from_slice(&buffer[..read]);
        }
    })
    .await
    .expect("the first event arrives");
    let head = String::from_utf8_lossy(&said);
    assert_eq!(status_of(&head), 200, "{head}");
    socket
}

#[tokio::test]
async fn a_thousand_abandoned_event_streams_leave_no_task_and_no_memory_behind() {
    let app = spawn_api().await;
    let api = app
        .spawn_process(
            "api",
            &[
                ("PICTOR_MAX_STREAMS_PER_USER", "2000".to_string()),
                ("PICTOR_USER_BURST", "10".to_string()),
            ],
        )
        .await;
    let addr = socket_addr(&api.base);
    // No worker: the job stays queued, so nothing in it ever wakes its streams.
    let id = app
        .submit_at(&api.base, ALICE, json!({"prompt": "a lighthouse"}))
        .await;
    // The task gauge is sampled every second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tasks_before = gauge(&app, &api, "pictor_api_tasks").await;
    let memory_before = api.memory_kib("VmRSS");

    let mut streams = Vec::new();
    for _ in 0..10 {
        let batch = (0..100).map(|_| open_stream(addr, ALICE, &id));
        streams.extend(futures::future::join_all(batch).await);
    }
    assert_eq!(gauge(&app, &api, "pictor_http_streams_open").await, 1000.0);
    let tasks_open = gauge_until(
        &app,
        &api,
        "pictor_api_tasks",
        Duration::from_secs(3),
        |tasks| tasks >= tasks_before + 1000.0,
    )
    .await;
    assert!(
        tasks_open.is_ok(),
        "1000 streams hold tasks: {tasks_open:?}"
    );

    // Every client leaves without a word; the job never changes.
    drop(streams);
    let open = gauge_until(
        &app,
        &api,
        "pictor_http_streams_open",
        Duration::from_secs(2),
        |open| open == 0.0,
    )
    .await;
    assert_eq!(
        open,
        Ok(0.0),
        "streams end within a second or two of their clients"
    );
    let tasks = gauge_until(
        &app,
        &api,
        "pictor_api_tasks",
        Duration::from_secs(3),
        |tasks| tasks <= tasks_before + 5.0,
    )
    .await;
    assert!(
        tasks.is_ok(),
        "tasks back to {tasks_before} after the clients left: {tasks:?}"
    );
    let memory_after = api.memory_kib("VmRSS");
    assert!(
        memory_after < memory_before + 64 * 1024,
        "RSS grew from {memory_before} kB to {memory_after} kB"
    );
}

#[tokio::test]
async fn a_user_holding_the_most_streams_gets_429_and_others_do_not() {
    let app = spawn_app_with(
        Options {
            worker: false,
            ..Options::default()
        },
        |s| s.api.max_streams_per_user = std::num::NonZeroU32::new(2).unwrap(),
    )
    .await;
    let id = app.submit(ALICE, json!({"prompt": "a kite"})).await;
    let mut first = open_stream(app.addr, ALICE, &id).await;
    let _second = open_stream(app.addr, ALICE, &id).await;

    let third = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        third.json::<Value>().await.unwrap()["error"]["code"],
        "too_many_streams"
    );
    // The cap is per user: it does not stop Bob (who gets a 404 for Alice's job, not a 429).
    let bob = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(bob.status(), StatusCode::NOT_FOUND);

    // A stream that ends gives its slot back.
    first.shutdown().await.unwrap();
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let again = app
            .client
            .get(app.url(&format!("/v1/jobs/{id}/events")))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        if again.status() == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_stream_past_its_lifetime_ends_with_a_retry_hint() {
    let app = spawn_app_with(
        Options {
            worker: false,
            ..Options::default()
        },
        |s| s.api.stream_lifetime = Duration::from_secs(2),
    )
    .await;
    let id = app.submit(ALICE, json!({"prompt": "a kite"})).await;
    let started = Instant::now();
    let response = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(10), response.text())
        .await
        .expect("the stream ends at its lifetime")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert!(body.starts_with("event: status"), "{body}");
    assert!(
        body.contains("\nretry: 1000\n") || body.contains("retry: 1000"),
        "{body}"
    );
}

/// The headers every page, document and image must carry.
fn assert_locked_down(response: &reqwest::Response, what: &str) {
    let headers = response.headers();
    let policy = headers
        .get("content-security-policy")
        .unwrap_or_else(|| panic!("{what} has no Content-Security-Policy"))
        .to_str()
        .unwrap();
    assert!(
        policy.contains("frame-ancestors 'none'"),
        "{what}: {policy}"
    );
    assert!(policy.contains("default-src 'none'"), "{what}: {policy}");
    // Inline styles may be allowed (the Swagger UI needs them); scripts never.
    let scripts = policy
        .split(';')
        .find(|directive| directive.trim().starts_with("script-src"))
        .unwrap_or_default();
    assert!(!scripts.contains("unsafe"), "{what}: {policy}");
    assert_eq!(headers["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(headers["x-frame-options"], "DENY", "{what}");
    assert_eq!(headers["referrer-policy"], "no-referrer", "{what}");
}

#[tokio::test]
async fn pages_documents_and_images_forbid_framing_sniffing_and_foreign_scripts() {
    let app = spawn_simulated().await;
    let id = app.submit(ALICE, json!({"prompt": "a red fox"})).await;
    let job = app.wait_until_terminal(ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    for path in ["/", "/dashboard", "/docs/", "/openapi.json", "/healthz"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_locked_down(&response, path);
    }
    let image = app.get(ALICE, &format!("/v1/jobs/{id}/images/0")).await;
    assert_eq!(image.status(), StatusCode::OK);
    assert_locked_down(&image, "an image");
    let policy = image.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        policy.contains("sandbox"),
        "an image runs nothing: {policy}"
    );
    let length: usize = image.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(image.bytes().await.unwrap().len(), length);

    // The Swagger UI keeps a key typed into it for the page's life only.
    let initializer = app
        .client
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        initializer.contains("\"persistAuthorization\": false"),
        "{initializer}"
    );

    // In a browser, a script injected into the dashboard (as a stored XSS would) does not run,
    // while the page's own script does.
    tests::browser::with_browser(async |browser| {
        browser.client.goto(&app.url("/dashboard")).await.unwrap();
        browser.sign_in(OPS).await;
        let injected = browser
            .client
            .execute(
                "const blocked = [];
                 document.addEventListener('securitypolicyviolation',
                     e => blocked.push(e.effectiveDirective));
                 const s = document.createElement('script');
                 s.textContent = 'window.pwned = true';
                 document.body.appendChild(s);
                 const i = document.createElement('img');
                 i.src = 'https://attacker.example/pixel.png';
                 document.body.appendChild(i);
                 return new Promise(done => setTimeout(() => done({
                     pwned: window.pwned === true,
                     blocked,
                 }), 500));",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(injected["pwned"], false, "an injected inline script ran");
        let blocked: Vec<&str> = injected["blocked"]
            .as_array()
            .unwrap()
            .iter()
            .map(|directive| directive.as_str().unwrap())
            .collect();
        assert!(
            blocked.iter().any(|d| d.starts_with("script-src"))
                && blocked.iter().any(|d| d.starts_with("img-src")),
            "the policy blocked the script and the foreign image: {blocked:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn public_metrics_are_for_the_ops_role_only() {
    let app = spawn_api().await;
    let api = app.spawn_process("api", &[]).await;
    // A legacy call leaves a per-caller series behind.
    let legacy = app
        .client
        .post(format!("{}/api/langgraph/agents/execute", api.base))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(legacy.status(), StatusCode::GONE);

    let anonymous = app
        .client
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let anonymous = anonymous.text().await.unwrap();
    assert!(!anonymous.contains("caller"), "{anonymous}");
    let user = app
        .client
        .get(format!("{}/metrics", api.base))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(user.status(), StatusCode::FORBIDDEN);
    let ops = scrape(&app, &api).await;
    assert_eq!(
        metric_sample(&ops, "pictor_legacy_requests_total", &[("caller", "alice")]),
        Some(1.0),
        "{ops}"
    );
}

#[tokio::test]
async fn cors_star_allows_any_origin_without_credentials_and_a_mixed_list_refuses_to_start() {
    let app = spawn_api().await;
    let api = app
        .spawn_process("api", &[("PICTOR_CORS_ORIGINS", "*".to_string())])
        .await;
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/v1/jobs", api.base))
        .header("Origin", "https://anyone.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    assert!(
        preflight
            .headers()
            .get("access-control-allow-credentials")
            .is_none(),
        "credentials are never allowed with '*'"
    );

    for (origins, complaint) in [
        ("*,https://app.example", "PICTOR_CORS_ORIGINS"),
        ("not a url", "PICTOR_CORS_ORIGINS"),
    ] {
        let output = app
            .process_command("api", &[("PICTOR_CORS_ORIGINS", origins.to_string())])
            .env("PICTOR_API_ADDR", "127.0.0.1:0")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{origins:?} started");
        let said = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        assert!(said.contains(complaint), "{origins:?}: {said}");
        assert!(!said.contains("panicked"), "{origins:?}: {said}");
    }
}

/// `user:role:sha256(secret)` lines, the key file's format.
fn key_line(user: &str, role: &str, secret: &str) -> String {
    use sha2::Digest;
    format!(
        "{user}:{role}:{:x}\n",
        sha2::Sha256::digest(secret.as_bytes())
    )
}

async fn status_with(app: &TestApp, api: &PictorProcess, key: &str) -> StatusCode {
    app.client
        .get(format!("{}/v1/jobs", api.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn a_key_file_replaces_the_demo_keys_and_a_sighup_revokes_a_key() {
    let app = spawn_api().await;
    let file = std::env::temp_dir().join(format!("pictor-keys-{}", uuid::Uuid::new_v4()));
    std::fs::write(
        &file,
        key_line("carol", "user", "carol-secret") + &key_line("dave", "user", "dave-secret"),
    )
    .unwrap();
    let api = app
        .spawn_process(
            "api",
            &[("PICTOR_API_KEYS_FILE", file.display().to_string())],
        )
        .await;
    assert_eq!(
        status_with(&app, &api, "carol-secret").await,
        StatusCode::OK
    );
    assert_eq!(status_with(&app, &api, "dave-secret").await, StatusCode::OK);
    assert_eq!(
        status_with(&app, &api, ALICE).await,
        StatusCode::UNAUTHORIZED,
        "the development keys in PICTOR_API_KEYS are not accepted beside the file"
    );

    // Dave's key is revoked: the file loses his line, the api gets a SIGHUP.
    std::fs::write(&file, key_line("carol", "user", "carol-secret")).unwrap();
    api.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_with(&app, &api, "dave-secret").await != StatusCode::UNAUTHORIZED {
        assert!(Instant::now() < deadline, "the revoked key still works");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status_with(&app, &api, "carol-secret").await,
        StatusCode::OK
    );

    // A broken file on reload keeps the keys in force rather than locking everyone out.
    std::fs::write(&file, "carol:user:not-a-digest\n").unwrap();
    api.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status_with(&app, &api, "carol-secret").await,
        StatusCode::OK
    );
    std::fs::remove_file(&file).unwrap();
}

#[tokio::test]
async fn a_key_file_with_a_duplicate_key_refuses_to_start() {
    let app = spawn_api().await;
    let file = std::env::temp_dir().join(format!("pictor-keys-{}", uuid::Uuid::new_v4()));
    std::fs::write(
        &file,
        key_line("carol", "user", "same-secret") + &key_line("erin", "ops", "same-secret"),
    )
    .unwrap();
    let output = app
        .process_command(
            "api",
            &[("PICTOR_API_KEYS_FILE", file.display().to_string())],
        )
        .env("PICTOR_API_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(!output.status.success(), "an ambiguous key file started");
    let said = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("listed twice"), "{said}");
    assert!(
        !said.contains("same-secret"),
        "the secret is never printed: {said}"
    );
}

#[tokio::test]
async fn anonymous_calls_to_the_retired_endpoint_cannot_flood_the_log() {
    let app = spawn_api().await;
    let api = app.spawn_process_logged("api", &[]).await;
    let started = Instant::now();
    let calls = (0..500).map(|index| {
        app.client
            .post(format!("{}/api/langgraph/agents/execute/{index}", api.base))
            .send()
    });
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.unwrap().status(), StatusCode::GONE);
    }
    let seconds = started.elapsed().as_secs() + 1;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // One more after a second: its line reports how many were held back.
    app.client
        .post(format!("{}/api/langgraph/agents/execute", api.base))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = api.output().await;
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("Retired LangGraph endpoint called"))
        .collect();
    assert!(
        !lines.is_empty() && lines.len() as u64 <= seconds + 2,
        "{} lines for 501 calls over {seconds} s",
        lines.len()
    );
    let suppressed: u64 = lines
        .iter()
        .filter_map(|line| {
            // The field, after the message (which mentions the word too).
            let (_, rest) = line.rsplit_once("suppressed")?;
            rest.trim_start_matches(['=', ':', '"', ' '])
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(
        suppressed + lines.len() as u64,
        501,
        "every call is either logged or counted in a later line: {lines:#?}"
    );
    // The counter still counts them all.
    let counted = metric_sample(
        &scrape(&app, &api).await,
        "pictor_legacy_requests_total",
        &[
            ("caller", "anonymous"),
            ("endpoint", "/api/langgraph/{*rest}"),
        ],
    );
    assert!(counted.is_some_and(|count| count >= 500.0), "{counted:?}");
}
