//! Bearer-key authentication: `Authorization: Bearer <key>` becomes a [`Caller`], or a 401.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use shared::domain::Principal;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let unauthorized = || {
            ApiError::client(
                ErrorCode::Unauthorized,
                "send a valid API key as `Authorization: Bearer <key>`",
            )
        };
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(unauthorized)?;
        let (scheme, secret) = value.trim().split_once(' ').ok_or_else(unauthorized)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(unauthorized());
        }
        app.authenticate(secret.trim())
            .map(Caller)
            .ok_or_else(unauthorized)
    }
}
