//! The BMW envelope `{"result", "code", "message", "data"}` every bridge
//! response uses: the operations' own [`Outcome`], sent with the HTTP status
//! its code names ([`Reply`]). [`ApiError`] turns any failure into one, so no
//! handler lets a bare error out.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub use crate::task::Outcome as Envelope;
use crate::task::{OpError, Outcome, ValidationError};

/// A response: status plus envelope.
#[derive(Debug)]
pub struct Reply(pub StatusCode, pub Envelope);

impl Reply {
    /// 200 with data.
    pub fn ok(data: serde_json::Value) -> Self {
        Reply(StatusCode::OK, Outcome::ok(data))
    }

    /// An outcome, with the status its code names (200 for code 0).
    pub fn from_outcome(outcome: Outcome) -> Self {
        let status = match outcome.code {
            0 => StatusCode::OK,
            code => StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        };
        Reply(status, outcome)
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(self.1)).into_response();
        // A full queue or an unavailable NATS may be fine a moment later.
        if matches!(
            self.0,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

/// 200 with `data` of any serializable type, written straight into the
/// body: no JSON tree is built first (a batch's 10,000 outcomes would be
/// copied into one, then written).
#[derive(Debug)]
pub struct OkWith<T>(pub T);

impl<T: Serialize> IntoResponse for OkWith<T> {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body<'a, T> {
            result: bool,
            code: u16,
            message: &'a str,
            data: &'a T,
        }
        Json(Body {
            result: true,
            code: 0,
            message: "ok",
            data: &self.0,
        })
        .into_response()
    }
}

/// A failed request, answered with the envelope.
#[derive(Debug)]
pub struct ApiError(Outcome);

impl ApiError {
    /// `status` with a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(Outcome::err(status.as_u16(), message))
    }

    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError(Outcome::err(400, message))
    }

    /// 404 with a message.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError(Outcome::err(404, message))
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        Reply::from_outcome(self.0).into_response()
    }
}
