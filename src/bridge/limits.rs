//! How much the bridge takes on: [`RequestLimits`], a concurrency limit with
//! load shedding (a request past it is answered 503 with `Retry-After` at
//! once, not queued) and a timeout on each request (504), one middleware
//! answering with the envelope. The body size limit is applied where bodies
//! are read (`routes`); the time a client may take to send a request head is
//! bounded where connections are served ([`super::serve`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::http::header::RETRY_AFTER;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::envelope::ApiError;

/// Seconds a shed client is told to wait before trying again.
const RETRY_AFTER_SECONDS: &str = "1";

/// The bridge's limits on requests, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Requests served at once; more are answered 503.
    pub max_concurrent: usize,
    /// Longest a request may take, body included; then 504.
    pub timeout: Duration,
}

impl RequestLimits {
    /// The answer to a request past the concurrency limit: 503 at once.
    fn overloaded(&self) -> Response {
        let message = format!(
            "overloaded: {} requests are being served (--max-concurrent-requests); try again shortly",
            self.max_concurrent
        );
        (
            [(RETRY_AFTER, RETRY_AFTER_SECONDS)],
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message),
        )
            .into_response()
    }

    /// The answer to a request that took longer than the timeout: 504.
    fn timed_out(&self) -> Response {
        let message = format!(
            "timed out: no answer within --request-timeout ({})",
            humantime::format_duration(self.timeout)
        );
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, message).into_response()
    }
}

/// The limits and the permits of the requests being served: one semaphore
/// for all routes.
#[derive(Debug)]
pub(crate) struct Limiter {
    permits: Arc<Semaphore>,
    limits: RequestLimits,
}

impl Limiter {
    /// Permits for `limits.max_concurrent` requests at once.
    pub(crate) fn new(limits: RequestLimits) -> Self {
        Limiter {
            permits: Arc::new(Semaphore::new(limits.max_concurrent)),
            limits,
        }
    }

    /// Serves `request` if a permit is free (else 503 at once), within the
    /// timeout (else 504); the permit is held until the response is ready.
    pub(crate) async fn serve(&self, mut request: Request, next: Next) -> Response {
        let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
            return self.limits.overloaded();
        };
        // A route that does many things (a batch) answers before this.
        let deadline = Deadline(tokio::time::Instant::now() + self.limits.timeout);
        request.extensions_mut().insert(deadline);
        match tokio::time::timeout(self.limits.timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => self.limits.timed_out(),
        }
    }
}

/// When the request limit ends a request (a request extension): a route
/// that does many things answers with what it finished before then.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub tokio::time::Instant);
