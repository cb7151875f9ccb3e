//! The api's OpenAPI 3.1 document, generated from the code: every public route is registered
//! through `utoipa_axum`'s `routes!` (see `crate::api_routes`), so the router and the document
//! are built from the same list and cannot drift apart. This module adds what the handlers'
//! `#[utoipa::path]` attributes cannot say on their own: the document's info and tags, the
//! bearer-key security scheme, the shared error responses, and the request bodies that
//! `crate::intake` parses by hand. `GET /openapi.json` serves the document and `GET /docs/` a
//! vendored Swagger UI (nothing is fetched from outside), whose page is our own `docs.html`: a
//! proper title, links to the playground and the dashboard, and no Swagger "Explore" bar.

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response as HttpResponse};
use serde::Serialize;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr};
use utoipa::{Modify, OpenApi, ToResponse, ToSchema};
use utoipa_swagger_ui::{Config, SwaggerUi};

use crate::state::AppState;

/// Where the document is served.
pub const SPEC_PATH: &str = "/openapi.json";
/// Where the browsable reference is served (`/docs` redirects to `/docs/`).
pub const DOCS_PATH: &str = "/docs";
/// The name of the bearer-key security scheme in the document.
pub const SECURITY_SCHEME: &str = "api_key";

/// The Swagger UI's page, in place of the vendored `index.html`: the same stylesheets and
/// scripts (all under `/docs/`), with Pictor's title, header links and a narrow-screen fit.
pub(crate) const DOCS_PAGE: &str = include_str!("docs.html");

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Pictor API",
        description = "Turns a prompt (and maybe an image to edit) into images. Submit a job, \
            get `202 Accepted` with its id at once, then poll it or follow it as Server-Sent \
            Events.\n\nAuthenticate with `Authorization: Bearer <key>`. Every error body is \
            `{\"error\": {\"code\", \"message\"}}`; clients branch on `code`. A `429` or `503` \
            carries `Retry-After` (seconds).",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    paths(legacy_execute),
    modifiers(&SecurityAddon),
    tags(
        (name = "jobs", description = "Submit, follow, download and cancel image jobs."),
        (name = "costs", description = "What Pictor has spent (keys with the `ops` role only)."),
        (name = "operations", description = "Health, readiness, metrics and the ops dashboard."),
        (name = "legacy", description = "Retired endpoints that answer `410 Gone`.")
    ),
    components(
        schemas(crate::error::ErrorBody),
        responses(
            Unauthorized,
            NotFound,
            TooManyRequests,
            Unavailable,
            UnavailableOrFull,
            InternalError
        )
    )
)]
struct ApiDoc;

/// The document's base (info, tags, shared components) that `crate::api_routes` fills with the
/// routes.
pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// `GET /openapi.json` and the Swagger UI under `/docs/`, for the given document.
pub fn routes(document: utoipa::openapi::OpenApi) -> Router<AppState> {
    // `validatorUrl: none`: Swagger UI would otherwise send the document to an outside
    // validator and show its badge.
    let config = Config::new([SPEC_PATH])
        .validator_url("none")
        // Never: a bearer key in localStorage outlives the tab and is readable by any script
        // of this origin.
        .persist_authorization(false)
        .try_it_out_enabled(true)
        // The base layout has no top bar: Swagger's "Explore" box would load any URL typed in.
        .use_base_layout();
    Router::from(
        SwaggerUi::new(DOCS_PATH)
            .url(SPEC_PATH, document)
            .config(config),
    )
    .layer(axum::middleware::from_fn(docs_page))
}

/// Middleware on the Swagger UI's routes: its page is [`DOCS_PAGE`]; its other files pass.
async fn docs_page(request: Request, next: Next) -> HttpResponse {
    let path = request.uri().path();
    if path == format!("{DOCS_PATH}/") || path == format!("{DOCS_PATH}/index.html") {
        return Html(DOCS_PAGE).into_response();
    }
    next.run(request).await
}

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key: `Authorization: Bearer <key>`. Keys have the role `user` \
                         (jobs) or `ops` (jobs, and costs).",
                    ))
                    .build(),
            ),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Request bodies parsed by hand in `crate::intake` (documentation only)
// ---------------------------------------------------------------------------------------------

/// `POST /v1/jobs` as JSON.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"prompt": "a lighthouse at dawn, watercolor", "size": "1536x1024"}))]
pub struct CreateJobJson {
    /// What to draw, or how to change the image. Trimmed; must not be empty; at most
    /// `PICTOR_MAX_PROMPT_CHARS` characters (32000 by default).
    pub prompt: String,
    /// An image to edit.
    pub image: Option<ImageJson>,
    /// Output size; `auto` when absent.
    pub size: Option<shared::domain::ImageSize>,
    /// How many images, 1 to `PICTOR_MAX_IMAGES` (4 by default); 1 when absent.
    #[schema(minimum = 1)]
    pub n: Option<u32>,
}

/// An image sent inside JSON.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageJson {
    /// Standard base64 of the file's bytes, with or without a `data:…;base64,` prefix. The
    /// bytes must be a PNG, JPEG or WebP file (the type is read from the bytes).
    pub data: String,
    /// Accepted for compatibility and ignored: the type is read from the bytes.
    pub mime_type: Option<String>,
}

/// `POST /v1/jobs` as `multipart/form-data`: the same fields as text parts, and the image as a
/// file part. Unknown parts are ignored.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreateJobForm {
    pub prompt: String,
    /// A PNG, JPEG or WebP file.
    #[schema(value_type = Option<String>, content_media_type = "application/octet-stream")]
    pub image: Option<Vec<u8>>,
    pub size: Option<shared::domain::ImageSize>,
    #[schema(minimum = 1)]
    pub n: Option<u32>,
}

/// `POST /v1/jobs/{id}/clarify`: the answer to a job's clarification question.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"intent": "create"}))]
pub struct ClarifyJson {
    /// What the user wants, e.g. a new image (`create`) or a change to their image (`edit`);
    /// any intent but `unclear`.
    pub intent: shared::domain::Intent,
    /// A replacement prompt; the job's prompt is kept when absent.
    pub prompt: Option<String>,
    /// An image to edit, when the job has none yet.
    pub image: Option<ImageJson>,
}

/// One Server-Sent Event of `GET /v1/jobs/{id}/events`, as OpenAPI 3.1 describes an event
/// stream: the schema of each event's fields.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusEvent {
    /// `status` (the job changed) or `position` (a waiting job's `QueuePlace` changed).
    pub event: String,
    /// The job's version: it grows with every change.
    pub id: String,
    /// For `status`, the job: the JSON of `GET /v1/jobs/{id}` (a `JobView`); for `position`,
    /// a `QueuePlace`.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

// ---------------------------------------------------------------------------------------------
// The retired LangGraph endpoint
// ---------------------------------------------------------------------------------------------

/// The operation of `crate::legacy`'s execute endpoint. Its router is built by hand there, since
/// it answers any method on every path under `/api/langgraph`; only the one endpoint that old
/// clients called is documented, so they can find where it went.
#[utoipa::path(
    post,
    path = "/api/langgraph/agents/execute",
    tag = "legacy",
    operation_id = "legacy_execute",
    summary = "Retired: the LangGraph service's execute endpoint",
    description = "Retired with the LangGraph service: every call (any method, any path under \
        `/api/langgraph/`) answers `410 Gone`, with no key needed. Submit jobs with \
        `POST /v1/jobs` instead; `error.migration_guide` says how.",
    responses((status = 410, description = "`endpoint_retired`.", body = RetiredBody)),
)]
#[deprecated = "retired: submit jobs with POST /v1/jobs"]
#[expect(
    dead_code,
    reason = "documentation only: crate::legacy serves the endpoint"
)]
fn legacy_execute() {}

/// The 410 body of the retired endpoints: the usual error shape and where to go instead.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetiredBody {
    pub error: RetiredDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RetiredDetail {
    /// `endpoint_retired`.
    pub code: String,
    pub message: String,
    /// `POST /v1/jobs`.
    pub replacement: String,
    /// The migration guide's address.
    pub migration_guide: String,
}

// ---------------------------------------------------------------------------------------------
// Shared error responses
// ---------------------------------------------------------------------------------------------

fn error_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        Content::new(Some(Ref::from_schema_name("ErrorBody"))),
    )
}

fn retry_after_header() -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1)),
        ))
        .description(Some("Seconds to wait before trying again."))
        .build()
}

/// 401 `unauthorized`, with `WWW-Authenticate: Bearer`.
pub struct Unauthorized;

impl<'r> ToResponse<'r> for Unauthorized {
    fn response() -> (&'r str, RefOr<Response>) {
        let response = error_response("`unauthorized`: the bearer key is missing or unknown.")
            .header(
                "WWW-Authenticate",
                HeaderBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .description(Some("`Bearer`"))
                    .build(),
            )
            .build();
        ("Unauthorized", response.into())
    }
}

/// 404 `not_found`.
pub struct NotFound;

impl<'r> ToResponse<'r> for NotFound {
    fn response() -> (&'r str, RefOr<Response>) {
        let response = error_response(
            "`not_found`: no such job or image, or it belongs to another user (the two are \
             indistinguishable).",
        )
        .build();
        ("NotFound", response.into())
    }
}

/// 429 `rate_limited` or `queue_full`, with `Retry-After`.
pub struct TooManyRequests;

impl<'r> ToResponse<'r> for TooManyRequests {
    fn response() -> (&'r str, RefOr<Response>) {
        let response = error_response(
            "`rate_limited` (over your jobs per minute) or `queue_full` (the service is busy); \
             retry after `Retry-After` seconds.",
        )
        .header("Retry-After", retry_after_header())
        .build();
        ("TooManyRequests", response.into())
    }
}

/// 503 `service_unavailable`, with `Retry-After`.
pub struct Unavailable;

impl<'r> ToResponse<'r> for Unavailable {
    fn response() -> (&'r str, RefOr<Response>) {
        let response = error_response(
            "`service_unavailable`: Redis, RabbitMQ or the image store is unreachable; nothing \
             was changed. Retry after `Retry-After` seconds.",
        )
        .header("Retry-After", retry_after_header())
        .build();
        ("Unavailable", response.into())
    }
}

/// 503 `service_unavailable` or `image_store_full`, with `Retry-After`: the answer of the
/// operations that may store an image.
pub struct UnavailableOrFull;

impl<'r> ToResponse<'r> for UnavailableOrFull {
    fn response() -> (&'r str, RefOr<Response>) {
        let response = error_response(
            "`service_unavailable`: Redis, RabbitMQ or the image store is unreachable; or              `image_store_full`: the request brings an image while the stored images are over              the operator's bound. Nothing was changed. Retry after `Retry-After` seconds.",
        )
        .header("Retry-After", retry_after_header())
        .build();
        ("UnavailableOrFull", response.into())
    }
}

/// 500 `internal_error`.
pub struct InternalError;

impl<'r> ToResponse<'r> for InternalError {
    fn response() -> (&'r str, RefOr<Response>) {
        let response =
            error_response("`internal_error`: a bug on our side; the details are logged.").build();
        ("InternalError", response.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_the_bearer_scheme() {
        let document = serde_json::to_value(base()).unwrap();
        assert!(document["openapi"].as_str().unwrap().starts_with("3.1."));
        assert_eq!(
            document["components"]["securitySchemes"][SECURITY_SCHEME]["scheme"],
            "bearer"
        );
    }
}
