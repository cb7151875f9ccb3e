//! A lean stand-in for the OpenAI API, fast enough not to be the bottleneck it measures: the
//! router's chat completion, the Images API (generations and edits) and the traces ingest
//! endpoint, each answering after a fixed delay with the real wire format. The image reply is
//! built once (base64 of one PNG) and shared by every answer, so a thousand concurrent answers
//! cost a thousand pointer copies, not a thousand encodings.
//!
//! The e2e tests' `tests::mocks` are strict wiremock servers that record every request; that
//! bookkeeping is what a benchmark must not pay, hence this one.

use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use image::{ImageFormat, RgbImage};
use serde_json::json;
use tokio::net::TcpListener;

/// What the mock answers and how fast.
#[derive(Debug, Clone, Copy)]
pub struct MockSpec {
    /// Time every answer waits before it is sent.
    pub delay: Duration,
    /// Side of the square PNG the Images API returns.
    pub image_side: u32,
}

pub struct Mock {
    pub addr: SocketAddr,
    pub image_bytes: usize,
    state: Arc<MockState>,
    server: Server,
}

enum Server {
    /// A task on the bench's own runtime.
    Task(tokio::task::JoinHandle<()>),
    /// A thread of its own running a current-thread runtime, so that its CPU time can be told
    /// apart from the load generator's (`/proc/self/task/<tid>/stat`).
    Thread {
        tid: u32,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

struct MockState {
    delay: Duration,
    image_reply: Bytes,
    router_calls: AtomicU64,
    image_calls: AtomicU64,
    trace_posts: AtomicU64,
}

impl Mock {
    pub async fn start(spec: MockSpec) -> anyhow::Result<Self> {
        let (state, router, image_bytes) = Self::build(spec)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self {
            addr,
            image_bytes,
            state,
            server: Server::Task(server),
        })
    }

    /// The same mock on a thread of its own (one core at most), whose CPU time
    /// [`Mock::cpu_seconds`] reads: for the scenario that reports every process' CPU per job.
    pub async fn start_on_own_thread(spec: MockSpec) -> anyhow::Result<Self> {
        let (state, router, image_bytes) = Self::build(spec)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (started, on_start) = tokio::sync::oneshot::channel();
        let (stop, on_stop) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("bench-mock".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = started.send(Err(anyhow::Error::from(error)));
                        return;
                    }
                };
                let _ = started.send(own_tid());
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    // Dropping the runtime afterwards cancels the connections still open.
                    tokio::select! {
                        _ = async { axum::serve(listener, router).await } => {}
                        _ = on_stop => {}
                    }
                });
            })?;
        let tid = on_start.await??;
        Ok(Self {
            addr,
            image_bytes,
            state,
            server: Server::Thread {
                tid,
                stop: Some(stop),
            },
        })
    }

    fn build(spec: MockSpec) -> anyhow::Result<(Arc<MockState>, Router, usize)> {
        let png = realistic_png(spec.image_side)?;
        let image_bytes = png.len();
        let image_reply = image_reply(&png, spec.image_side);
        let state = Arc::new(MockState {
            delay: spec.delay,
            image_reply,
            router_calls: AtomicU64::new(0),
            image_calls: AtomicU64::new(0),
            trace_posts: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/v1/chat/completions", post(chat_completion))
            .route("/v1/images/generations", post(images))
            .route("/v1/images/edits", post(images))
            .route("/v1/traces/ingest", post(traces))
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(state.clone());
        Ok((state, router, image_bytes))
    }

    /// CPU time (user + system) the mock's thread has spent, in seconds; `None` for a mock
    /// started on the bench's runtime, whose time is mixed with everything else the bench does.
    pub fn cpu_seconds(&self) -> Option<f64> {
        match &self.server {
            Server::Task(_) => None,
            Server::Thread { tid, .. } => {
                crate::fleet::cpu_seconds(&format!("/proc/self/task/{tid}/stat"))
            }
        }
    }

    /// The base URL to configure as `OPENAI_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn calls(&self) -> (u64, u64, u64) {
        (
            self.state.router_calls.load(Ordering::Relaxed),
            self.state.image_calls.load(Ordering::Relaxed),
            self.state.trace_posts.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        match &mut self.server {
            Server::Task(server) => server.abort(),
            Server::Thread { stop, .. } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
            }
        }
    }
}

/// The calling thread's id, from the `/proc/thread-self` link (`<pid>/task/<tid>`).
fn own_tid() -> anyhow::Result<u32> {
    let link = std::fs::read_link("/proc/thread-self")?;
    let tid = link
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.parse().ok());
    tid.ok_or_else(|| anyhow::anyhow!("cannot read this thread's id from {}", link.display()))
}

fn json_response(body: Bytes) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-request-id", HeaderValue::from_static("req_bench"));
    headers.insert("openai-processing-ms", HeaderValue::from_static("1"));
    response
}

/// The router's structured answer: a clear `create` with high confidence.
async fn chat_completion(State(state): State<Arc<MockState>>, _body: Bytes) -> Response {
    state.router_calls.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(state.delay).await;
    let content = json!({
        "intent": "create",
        "confidence": 0.97,
        "prompt": "a red fox in fresh snow, morning light",
        "question": null,
    })
    .to_string();
    let body = json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": "gpt-4.1-mini-2025-04-14",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": 412,
            "completion_tokens": 38,
            "total_tokens": 450,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": null,
    });
    json_response(Bytes::from(body.to_string()))
}

async fn images(State(state): State<Arc<MockState>>, _body: Bytes) -> Response {
    state.image_calls.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(state.delay).await;
    json_response(state.image_reply.clone())
}

async fn traces(State(state): State<Arc<MockState>>, _body: Bytes) -> Response {
    state.trace_posts.fetch_add(1, Ordering::Relaxed);
    json_response(Bytes::from_static(b"{}"))
}

/// An Images API reply holding one PNG, with the usage gpt-image models report for a
/// medium-quality square image.
fn image_reply(png: &[u8], side: u32) -> Bytes {
    let body = json!({
        "created": chrono::Utc::now().timestamp(),
        "data": [{"b64_json": BASE64.encode(png)}],
        "background": "opaque",
        "output_format": "png",
        "size": format!("{side}x{side}"),
        "quality": "medium",
        "usage": {
            "input_tokens": 50,
            "input_tokens_details": {"text_tokens": 50, "image_tokens": 0},
            "output_tokens": 1056,
            "output_tokens_details": {"image_tokens": 1056, "text_tokens": 0},
            "total_tokens": 1106,
        },
    });
    Bytes::from(body.to_string())
}

/// A PNG that compresses like a photograph rather than like a flat test card: a smooth
/// gradient with per-pixel noise, which lands a 1024×1024 image near 1.5 MB, the size the
/// image APIs send for a medium-quality square.
fn realistic_png(side: u32) -> anyhow::Result<Vec<u8>> {
    let mut seed: u32 = 0x9e37_79b9;
    let image = RgbImage::from_fn(side, side, |x, y| {
        // xorshift32: cheap, deterministic noise.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let noise = seed.to_le_bytes();
        let shade = |base: u32, noise: u8| {
            u8::try_from((base + u32::from(noise % 24)).min(255)).unwrap_or(u8::MAX)
        };
        let side = side.max(1);
        image::Rgb([
            shade(x * 220 / side, noise[0]),
            shade(y * 220 / side, noise[1]),
            shade((x + y) * 110 / side, noise[2]),
        ])
    });
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, ImageFormat::Png)?;
    Ok(bytes.into_inner())
}
