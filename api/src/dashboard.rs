//! The ops dashboard at `GET /dashboard`: one self-contained HTML page (no CDN, nothing fetched
//! from outside) that reads `/v1/costs/summary` with the ops key and draws its charts as SVG.

use axum::response::Html;

pub(crate) const PAGE: &str = include_str!("dashboard.html");

#[utoipa::path(
    get,
    path = "/dashboard",
    tag = "operations",
    operation_id = "dashboard",
    summary = "The ops dashboard",
    description = "A self-contained HTML page; it asks for an ops key and reads \
        `/v1/costs/summary` with it.",
    responses((status = 200, description = "The page.", body = String, content_type = "text/html")),
)]
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}
