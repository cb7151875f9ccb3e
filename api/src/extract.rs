//! Axum's `Path` and `Query` extractors with their rejections turned into [`ApiError`]s, so a
//! malformed path or query string gets the api's JSON error body like every other mistake, not
//! axum's plain-text 400 (which no client and no API document expects).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};

/// Path parameters. A path that does not decode (say, invalid UTF-8 in a percent-escape) cannot
/// name an existing resource: `404 not_found`, like any unknown id.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Self(value))
            .map_err(|_| ApiError::not_found())
    }
}

/// A query string. One that does not parse (a repeated parameter, a broken escape) is
/// `422 invalid_query`, the code of every other bad query parameter.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(value)| Self(value))
            .map_err(|rejection| {
                ApiError::client(
                    ErrorCode::InvalidQuery,
                    format!("the query string cannot be read: {}", rejection.body_text()),
                )
            })
    }
}
