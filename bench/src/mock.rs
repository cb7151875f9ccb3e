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
    server: tokio::task::JoinHandle<()>,
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
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self {
            addr,
            image_bytes,
            state,
            server,
        })
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
        self.server.abort();
    }
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
