//! The BMW envelope `{"result", "code", "message", "data"}` every bridge
//! response uses, and [`ApiError`], which turns any failure into one with the
//! right HTTP status (so no handler lets a bare error out).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use crate::client::ClientError;
use crate::task::ValidationError;

/// BMW's response body.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    /// Success.
    pub result: bool,
    /// 0 on success, else the HTTP status.
    pub code: u16,
    /// `ok` or what went wrong.
    pub message: String,
    /// The answer.
    pub data: Value,
}

impl Envelope {
    /// A success.
    pub fn ok(data: Value) -> Self {
        Envelope {
            result: true,
            code: 0,
            message: "ok".into(),
            data,
        }
    }
}

/// A response: status plus envelope.
#[derive(Debug)]
pub struct Reply(pub StatusCode, pub Envelope);

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

/// A failed request, answered with the envelope.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message naming what was wrong.
    pub message: String,
}

impl ApiError {
    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let status = match &e {
            ClientError::Invalid(_) => StatusCode::BAD_REQUEST,
            ClientError::NotFound(_) => StatusCode::NOT_FOUND,
            ClientError::Nats(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let envelope = Envelope {
            result: false,
            code: self.status.as_u16(),
            message: self.message,
            data: Value::Null,
        };
        (self.status, Json(envelope)).into_response()
    }
}
