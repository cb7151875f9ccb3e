//! The api's own accept loop and request bounds: what keeps a client from exhausting the api's
//! file descriptors, tasks or memory (`docs/security.md`).
//!
//! `axum::serve` builds hyper connections without a timer (so no header-read timeout) and with
//! no connection cap. [`serve`] accepts connections itself: each connection holds a permit of
//! `api.max_connections` (past it a connection gets a `503` with `Retry-After` and is closed), and
//! hyper's `header_read_timeout` closes a connection whose request headers do not arrive within
//! `api.header_read_timeout_secs` (a slowloris socket). [`bound_requests`] gives every request
//! but the event streams at most `api.request_timeout_secs` (body included; `408` past it) and
//! caps the requests handled at once at `api.max_in_flight` (`503` with `Retry-After` past it).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::error::{ApiError, ErrorCode};

/// How long a stopping api waits for open connections (event streams) before it closes them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The connection-level bounds.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// Seconds a refused connection is told to wait.
    pub retry_after_secs: u32,
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open connections finish
/// (at most [`SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    tracing::warn!(%error, "Cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            crate::observe::connection_refused();
            tokio::spawn(refuse(stream, limits.retry_after_secs));
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_read_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            // hyper's header timer starts only once the protocol is known, and telling HTTP/1
            // from HTTP/2 waits for bytes without a timer: a client that sends nothing (or
            // half a preface) is closed here instead.
            if !protocol_known(&stream, header_read_timeout).await {
                return;
            }
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            // A connection ends with an error when its client leaves mid-request; nothing to do.
            let _ = watcher.watch(connection).await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("Closing connections still open after the shutdown grace");
    }
    Ok(())
}

/// Whether the client sent, within `within`, enough bytes to tell HTTP/1 from HTTP/2 (any
/// byte off the HTTP/2 preface, or all of it). The bytes are peeked, not consumed.
async fn protocol_known(stream: &TcpStream, within: Duration) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    tokio::time::timeout(within, async {
        let mut buffer = [0u8; PREFACE.len()];
        loop {
            match stream.peek(&mut buffer).await {
                Ok(0) | Err(_) => return false,
                Ok(read) if read == PREFACE.len() || buffer[..read] != PREFACE[..read] => {
                    return true;
                }
                // Part of the preface: wait for the rest without spinning on what is there.
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Answers a connection past the cap with a `503` and closes it, spending at most a second on
/// a client that does not read.
async fn refuse(mut stream: TcpStream, retry_after_secs: u32) {
    let body = r#"{"error":{"code":"service_unavailable","message":"the service has too many open connections; retry after the delay in Retry-After"}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {retry_after_secs}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The request-level bounds, shared by every request.
pub struct RequestLimits {
    pub request_timeout: Duration,
    in_flight: Semaphore,
    retry_after: Duration,
}

impl RequestLimits {
    pub fn new(request_timeout: Duration, max_in_flight: usize, retry_after_secs: u32) -> Self {
        Self {
            request_timeout,
            in_flight: Semaphore::new(max_in_flight),
            retry_after: Duration::from_secs(u64::from(retry_after_secs.max(1))),
        }
    }
}

/// Whether a path is an event stream: long-lived by design, bounded by its own rules (a
/// per-user cap and a lifetime) instead.
fn is_stream(path: &str) -> bool {
    path.starts_with("/v1/jobs/") && path.ends_with("/events")
}

/// Middleware: every request but an event stream is counted against `max_in_flight` and must
/// be done (its body read included) within `request_timeout`.
pub async fn bound_requests(
    State(limits): State<Arc<RequestLimits>>,
    request: Request,
    next: Next,
) -> Response {
    if is_stream(request.uri().path()) {
        return next.run(request).await;
    }
    let Ok(_permit) = limits.in_flight.try_acquire() else {
        crate::observe::request_shed();
        return ApiError::retry_later(
            ErrorCode::ServiceUnavailable,
            "the service is handling too many requests; retry after the delay in Retry-After",
            limits.retry_after,
        )
        .into_response();
    };
    match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::client(
            ErrorCode::RequestTimeout,
            format!(
                "the request took longer than {} s (its body arrived too slowly, or the \
                 service is slow); retry",
                limits.request_timeout.as_secs()
            ),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_event_streams_escape_the_request_bounds() {
        assert!(is_stream(
            "/v1/jobs/019ab9c1-5d2e-7c3a-9f10-2b7e4c1d8a11/events"
        ));
        assert!(!is_stream("/v1/jobs/019ab9c1-5d2e-7c3a-9f10-2b7e4c1d8a11"));
        assert!(!is_stream("/v1/jobs"));
        assert!(!is_stream("/events"));
    }
}
