//! How much the bridge takes on: [`RequestLimits`], a concurrency limit with
//! load shedding (a request past it is answered 503 with `Retry-After` at
//! once, not queued) and a timeout on each request (504), both tower layers
//! answered with the envelope. The body size limit is applied where bodies
//! are read (`routes`); the time a client may take to send a request head is
//! bounded where connections are served ([`super::serve`]).

use std::time::Duration;

use axum::BoxError;
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::http::header::RETRY_AFTER;
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;

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
    /// `router` with every one of its routes (and its fallback) under the
    /// limits. The concurrency limit is one semaphore for all routes
    /// (`Router::layer` wraps each route separately, so a per-service limit
    /// would count each route on its own).
    pub(crate) fn apply(self, router: Router) -> Router {
        let limits = self;
        router.layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(move |error: BoxError| async move {
                    limits.refusal(&error)
                }))
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::new(self.max_concurrent))
                .timeout(self.timeout),
        )
    }

    /// The answer to a request the layers stopped.
    fn refusal(&self, error: &BoxError) -> Response {
        if error.is::<tower::load_shed::error::Overloaded>() {
            let message = format!(
                "overloaded: {} requests are being served (--max-concurrent-requests); try again shortly",
                self.max_concurrent
            );
            return (
                [(RETRY_AFTER, RETRY_AFTER_SECONDS)],
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message),
            )
                .into_response();
        }
        if error.is::<tower::timeout::error::Elapsed>() {
            let message = format!(
                "timed out: no answer within --request-timeout ({})",
                humantime::format_duration(self.timeout)
            );
            return ApiError::new(StatusCode::GATEWAY_TIMEOUT, message).into_response();
        }
        tracing::error!(error = %error, "bridge request failed in a layer");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {error}"),
        )
        .into_response()
    }
}
