//! The ops dashboard at `GET /dashboard`: one self-contained HTML page (no CDN, nothing fetched
//! from outside) that reads `/v1/costs/summary` with the ops key and draws its charts as SVG.

use axum::Router;
use axum::response::Html;
use axum::routing::get;

use crate::state::AppState;

const PAGE: &str = include_str!("dashboard.html");

pub fn routes() -> Router<AppState> {
    Router::new().route("/dashboard", get(|| async { Html(PAGE) }))
}
