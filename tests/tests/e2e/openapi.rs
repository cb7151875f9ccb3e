//! The API reference stays true to the router: the OpenAPI document served at `/openapi.json`
//! is OpenAPI 3.1, every operation in it is routed (and enforces the security it declares),
//! every route the api's code registers is in it (or is one of the few known non-API pages),
//! and the Swagger UI at `/docs/` loads nothing from outside the api, is titled for Pictor, links
//! to the playground and the dashboard, has no "Explore" bar and fits a phone.
//!
//! The api builds its router and the document from one list (`utoipa_axum::routes!`), so these
//! tests mostly guard against a route added around that list. `scripts/schemathesis.sh` then
//! fuzzes the api against the same document.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tests::harness::{OPS, Options, TestApp, spawn_app_with};

/// Routes the api serves that are deliberately not operations of the document, and why.
const NOT_IN_THE_DOCUMENT: [(&str, &str); 7] = [
    ("/openapi.json", "the document itself"),
    ("/docs", "the Swagger UI (redirects to /docs/)"),
    ("/", "the playground page for people, not an API"),
    (
        "/api/langgraph",
        "retired catch-all; the documented legacy operation says so",
    ),
    (
        "/api/langgraph/",
        "retired catch-all; the documented legacy operation says so",
    ),
    (
        "/api/langgraph/{*rest}",
        "retired catch-all; the documented legacy operation says so",
    ),
    ("/docs/{*rest}", "the Swagger UI's files"),
];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

async fn app() -> TestApp {
    spawn_app_with(
        Options {
            mock_providers: false,
            worker: false,
            ..Options::default()
        },
        |_| {},
    )
    .await
}

async fn served_document(app: &TestApp) -> Value {
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    response.json().await.unwrap()
}

/// `(method, path template)` of every operation in the document.
fn operations(document: &Value) -> Vec<(String, String, Value)> {
    let mut found = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                found.push((method.to_string(), path.clone(), operation.clone()));
            }
        }
    }
    found
}

/// A concrete path for a template: integers become `0`, anything else a fresh job id.
fn concrete(path: &str, operation: &Value) -> String {
    let mut types = BTreeMap::new();
    for parameter in operation["parameters"].as_array().into_iter().flatten() {
        if parameter["in"] == "path" {
            let kind = parameter["schema"]["type"].as_str().unwrap_or("string");
            types.insert(parameter["name"].as_str().unwrap().to_string(), kind);
        }
    }
    path.split('/')
        .map(
            |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) if types.get(name) == Some(&"integer") => "0".to_string(),
                Some(_) => uuid::Uuid::now_v7().to_string(),
                None => segment.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn the_served_document_is_openapi_3_1_and_the_one_the_code_generates() {
    let app = app().await;
    let served = served_document(&app).await;
    let version = served["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "openapi is {version}");
    assert_eq!(
        served,
        serde_json::to_value(api::openapi_document()).unwrap()
    );
    assert_eq!(served["info"]["title"], "Pictor API");
    let scheme = &served["components"]["securitySchemes"]["api_key"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    // Every operation is named, tagged and answers at least one documented status.
    for (method, path, operation) in operations(&served) {
        assert!(operation["operationId"].is_string(), "{method} {path}");
        assert!(
            operation["tags"].as_array().is_some_and(|t| !t.is_empty()),
            "{method} {path}"
        );
        assert!(
            !operation["responses"].as_object().unwrap().is_empty(),
            "{method} {path}"
        );
    }
    // The routes the README promises are all there.
    let paths = served["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/v1/jobs", &["get", "post"][..]),
        ("/v1/jobs/{id}", &["get", "delete"]),
        ("/v1/jobs/{id}/images/{n}", &["get"]),
        ("/v1/jobs/{id}/events", &["get"]),
        ("/v1/jobs/{id}/clarify", &["post"]),
        ("/v1/costs/summary", &["get"]),
        ("/v1/costs/months", &["get"]),
        ("/v1/costs/export.csv", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
        ("/dashboard", &["get"]),
    ] {
        for method in methods {
            assert!(
                paths[path].get(*method).is_some(),
                "{method} {path} is not documented"
            );
        }
    }
    let create = &paths["/v1/jobs"]["post"];
    let bodies = create["requestBody"]["content"].as_object().unwrap();
    assert!(bodies.contains_key("application/json"));
    assert!(bodies.contains_key("multipart/form-data"));
    assert!(
        create["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header")
    );
    let events = &paths["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"];
    assert!(events.get("text/event-stream").is_some());
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_enforces_its_security() {
    let app = app().await;
    let document = served_document(&app).await;
    let operations = operations(&document);
    assert!(
        operations.len() >= 12,
        "only {} operations",
        operations.len()
    );
    for (method, path, operation) in operations {
        let url = app.url(&concrete(&path, &operation));
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        // No credentials: a routed, secured operation answers 401 before looking at anything
        // else, while the router's fallback would answer 404 (or 405 for a wrong method).
        let response = app
            .client
            .request(method.clone(), &url)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let secured = operation["security"]
            .as_array()
            .is_some_and(|requirements| !requirements.is_empty());
        if secured {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        } else {
            assert!(
                status != StatusCode::NOT_FOUND
                    && status != StatusCode::METHOD_NOT_ALLOWED
                    && status != StatusCode::UNAUTHORIZED,
                "{method} {path} answered {status}"
            );
        }
        let documented = operation["responses"].as_object().unwrap();
        assert!(
            documented.contains_key(status.as_str()),
            "{method} {path} answered {status}, which it does not document"
        );
    }
    // The probe does tell the fallback apart: an unknown path is a 404 even with a key.
    let response = app.get(OPS, "/v1/no-such-route").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

/// The first argument of every `.route(..)`, `.route_service(..)`, `.nest(..)` and
/// `.nest_service(..)` call in the api's source, string literals and `const`s resolved.
fn routes_in_the_source() -> BTreeSet<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/src");
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let consts = string_consts(&source);
        for call in [".route(", ".route_service(", ".nest(", ".nest_service("] {
            for (index, _) in source.match_indices(call) {
                let rest = source[index + call.len()..].trim_start();
                let argument = if let Some(literal) = rest.strip_prefix('"') {
                    literal.split('"').next().unwrap().to_string()
                } else {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                        .collect();
                    let name = name.rsplit("::").next().unwrap().to_string();
                    consts.get(&name).cloned().unwrap_or_else(|| {
                        panic!("{}: cannot resolve the route {name:?}", path.display())
                    })
                };
                found.insert(argument);
            }
        }
    }
    found
}

/// `const NAME: &str = "value";` in a source file.
fn string_consts(source: &str) -> BTreeMap<String, String> {
    let mut consts = BTreeMap::new();
    for line in source.lines() {
        let line = line.trim_start().trim_start_matches("pub ");
        let Some(rest) = line.strip_prefix("const ") else {
            continue;
        };
        let Some((name, value)) = rest.split_once(": &str = \"") else {
            continue;
        };
        if let Some(value) = value.split('"').next() {
            consts.insert(name.trim().to_string(), value.to_string());
        }
    }
    consts
}

#[tokio::test]
async fn every_route_in_the_code_is_documented_or_a_known_page() {
    let app = app().await;
    let document = served_document(&app).await;
    let documented: BTreeSet<&str> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let known: BTreeMap<&str, &str> = NOT_IN_THE_DOCUMENT.into_iter().collect();
    for route in routes_in_the_source() {
        assert!(
            documented.contains(route.as_str()) || known.contains_key(route.as_str()),
            "the api routes {route} but the OpenAPI document does not describe it: register \
             the handler with utoipa_axum's routes!() in api/src/lib.rs"
        );
    }
    // The known pages that exist answer, so the list names real routes.
    for (path, expected) in [
        ("/openapi.json", StatusCode::OK),
        ("/docs/", StatusCode::OK),
        ("/docs", StatusCode::SEE_OTHER),
    ] {
        let response = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .get(app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "{path}");
    }
}

/// `src` and `href` attribute values of an HTML page.
fn references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attribute in ["src=\"", "href=\"", "src='", "href='"] {
        let quote = attribute.chars().last().unwrap();
        for (index, _) in html.match_indices(attribute) {
            let rest = &html[index + attribute.len()..];
            found.push(rest.split(quote).next().unwrap().to_string());
        }
    }
    found
}

#[tokio::test]
async fn the_docs_page_loads_nothing_from_outside_the_api() {
    let app = app().await;
    let response = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let html = response.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "not the Swagger UI page");
    assert!(
        html.contains("<title>Pictor API reference</title>"),
        "{html}"
    );
    let same = app
        .client
        .get(app.url("/docs/index.html"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        same.text().await.unwrap(),
        html,
        "index.html is the same page"
    );
    let references = references(&html);
    assert!(
        references.iter().any(|r| r.ends_with(".js")),
        "no script on the page: {references:?}"
    );
    for reference in &references {
        assert!(
            !reference.contains("//"),
            "the docs page references {reference}, outside the api"
        );
        // `./x` and `x` are the UI's own files; `/x` another page of the api.
        let url = if reference.starts_with('/') {
            app.url(reference)
        } else {
            app.url(&format!("/docs/{}", reference.trim_start_matches("./")))
        };
        let response = app.client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        let body = response.text().await.unwrap_or_default();
        if reference.ends_with(".css") {
            assert!(!body.contains("url(http"), "{reference} loads from outside");
            assert!(
                !body.contains("@import"),
                "{reference} imports from outside"
            );
        }
    }
    // The initializer points the UI at our document only, with the outside validator off.
    let initializer = app
        .client
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(initializer.contains("\"/openapi.json\""), "{initializer}");
    assert!(
        initializer.contains("\"validatorUrl\": \"none\""),
        "{initializer}"
    );
    // The base layout: no top bar with an "Explore" box that loads any URL typed in.
    assert!(
        initializer.contains("\"layout\": \"BaseLayout\""),
        "{initializer}"
    );
    assert!(
        !initializer.contains("http://") && !initializer.contains("https://"),
        "{initializer}"
    );
}

#[tokio::test]
async fn the_docs_page_renders_every_operation_in_a_browser_from_the_api_alone() {
    let app = app().await;
    let document = served_document(&app).await;
    let expected = operations(&document).len();
    tests::browser::with_browser(async |browser| {
        browser.client.goto(&app.url("/docs/")).await.unwrap();
        browser.wait_for(".opblock").await;
        let rendered = browser
            .client
            .execute(
                "return document.querySelectorAll('.opblock').length",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(rendered.as_u64(), Some(expected as u64), "operations shown");
        let title = browser.text(".info .title").await;
        assert!(title.contains("Pictor API"), "{title}");
        assert_eq!(
            browser.client.title().await.unwrap(),
            "Pictor API reference"
        );
        let topbars = browser
            .client
            .execute(
                "return document.querySelectorAll('.topbar, .download-url-wrapper').length",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(topbars.as_u64(), Some(0), "the Explore bar is shown");
        assert_eq!(browser.attr("#nav-playground", "href").await, "/");
        assert_eq!(browser.attr("#nav-dashboard", "href").await, "/dashboard");
        // Every resource the page loaded (scripts, styles, images, the document) came from
        // the api.
        let loaded = browser
            .client
            .execute(
                "return performance.getEntriesByType('resource').map(e => e.name)",
                vec![],
            )
            .await
            .unwrap();
        let loaded = loaded.as_array().unwrap();
        assert!(
            loaded
                .iter()
                .any(|url| url.as_str().unwrap().ends_with("/openapi.json")),
            "{loaded:?}"
        );
        for url in loaded {
            let url = url.as_str().unwrap();
            assert!(url.starts_with(&app.base), "the docs page loaded {url}");
        }
        // Open every operation, then check the page fits a laptop and a phone.
        browser
            .client
            .execute(
                "document.querySelectorAll('.opblock-summary-control').forEach(b => b.click())",
                vec![],
            )
            .await
            .unwrap();
        browser.wait_for(".opblock.is-open .opblock-body").await;
        for width in [1280u32, 390] {
            browser.set_width(width).await;
            browser
                .assert_no_horizontal_overflow(width, "the docs page")
                .await;
            browser.save_screenshot_at("openapi-docs", width).await;
        }
        // The header's links lead to the other pages.
        browser.client.set_window_size(1280, 1000).await.unwrap();
        browser.click("#nav-dashboard").await;
        browser.wait_for("#sign-in-form").await;
        assert_eq!(
            browser.client.title().await.unwrap(),
            "Pictor ops dashboard"
        );
        browser.click("#nav-docs").await;
        browser.wait_for(".opblock").await;
        assert_eq!(
            browser.client.title().await.unwrap(),
            "Pictor API reference"
        );
    })
    .await;
}
