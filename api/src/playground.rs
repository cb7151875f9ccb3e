//! The playground at `GET /`: one self-contained HTML page (no CDN, nothing fetched from
//! outside) where a person submits a job with their API key and watches it live. It is also the
//! reference client for frontend teams: it uses only the public `/v1/jobs` api, authenticates
//! every request with the bearer key (the SSE stream too, read with `fetch` because
//! `EventSource` cannot send headers), and shows each status, notice and error as
//! `docs/error-handling.md` says a client should: plain sentences for people, with the api's
//! codes small beside them.
//!
//! Beyond one job it offers what a person expects of such a page: the key checked when it is
//! entered, the job history (`GET /v1/jobs`), downloading a result, editing or upscaling a result
//! without saving it first, the source image beside an edit, the elapsed time, and a layout that
//! fits a phone. The browser tests in `tests/tests/e2e/playground.rs` run it at 1280 and 390 px.

use axum::Router;
use axum::response::Html;
use axum::routing::get;

use crate::state::AppState;

pub(crate) const PAGE: &str = include_str!("playground.html");

pub fn routes() -> Router<AppState> {
    Router::new().route("/", get(|| async { Html(PAGE) }))
}
