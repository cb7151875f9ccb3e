//! Security headers on every response: `X-Content-Type-Options: nosniff` and
//! `Referrer-Policy: no-referrer` everywhere, and a Content-Security-Policy that fits what the
//! response is (`docs/security.md`):
//!
//! - the two pages (`/`, `/dashboard`) run only their own inline script and style, allowed by
//!   hash (computed from the embedded pages at start, so an edit of a page cannot forget it),
//!   talk only to this origin and show images only from it, `data:` and `blob:`;
//! - Swagger UI (`/docs/`) runs only its vendored scripts from this origin (it sets styles
//!   inline, so styles may be inline);
//! - everything else, images included, may run nothing and be framed by nothing.
//!
//! `X-Frame-Options: DENY` says the same to browsers older than `frame-ancestors`.
//!
//! Every one of them forbids framing (`frame-ancestors 'none'`).

use std::sync::OnceLock;

use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Everything else: an API answer or an image is data, never something to run or frame.
const DATA_POLICY: &str = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; sandbox";

/// Swagger UI's vendored files.
const DOCS_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' \
'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; connect-src 'self'; \
frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The policy of a self-contained page: its inline `<script>` and `<style>` by hash.
fn page_policy(page: &str) -> String {
    let hashes = |tag: &str| {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        page.split(&open)
            .skip(1)
            .filter_map(|rest| rest.split(&close).next())
            .map(|body| {
                let digest = Sha256::digest(body.as_bytes());
                format!(
                    "'sha256-{}'",
                    base64::engine::general_purpose::STANDARD.encode(digest)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; img-src 'self' data: blob:; \
         connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        hashes("script"),
        hashes("style")
    )
}

fn policy_of(path: &str) -> &'static str {
    static PLAYGROUND: OnceLock<String> = OnceLock::new();
    static DASHBOARD: OnceLock<String> = OnceLock::new();
    match path {
        "/" => PLAYGROUND.get_or_init(|| page_policy(crate::playground::PAGE)),
        "/dashboard" => DASHBOARD.get_or_init(|| page_policy(crate::dashboard::PAGE)),
        docs if docs.starts_with(crate::DOCS_PATH) => DOCS_POLICY,
        _ => DATA_POLICY,
    }
}

/// Middleware: the headers above on every response.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let policy = policy_of(request.uri().path());
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // For browsers older than `frame-ancestors`.
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if let Ok(value) = HeaderValue::from_str(policy) {
        headers.insert(header::CONTENT_SECURITY_POLICY, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_policy_allows_exactly_its_own_inline_script_and_style() {
        let page = "<style>b{}</style><p>x</p><script>go()</script>";
        let policy = page_policy(page);
        let hash = |body: &str| {
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body.as_bytes()))
        };
        assert!(
            policy.contains(&format!("script-src 'sha256-{}'", hash("go()"))),
            "{policy}"
        );
        assert!(
            policy.contains(&format!("style-src 'sha256-{}'", hash("b{}"))),
            "{policy}"
        );
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        assert!(policy.contains("frame-ancestors 'none'"));
    }

    #[test]
    fn the_shipped_pages_have_an_inline_script_and_style_to_allow() {
        for page in [crate::playground::PAGE, crate::dashboard::PAGE] {
            let policy = page_policy(page);
            assert!(policy.contains("script-src 'sha256-"), "{policy}");
            assert!(policy.contains("style-src 'sha256-"), "{policy}");
        }
        assert_eq!(policy_of("/v1/jobs/x/images/0"), DATA_POLICY);
        assert_eq!(policy_of("/docs/"), DOCS_POLICY);
    }
}
