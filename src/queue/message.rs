//! [`TaskMessage`]: the body of an async task message on `bmw.async.<queue>`
//! (and of its schedule and dead letter). A producer that wants the fastest
//! path publishes this JSON itself; `id` and `options` may be left out.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::task::Options;

/// One async task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMessage {
    /// Task id (a UUID, or the caller's `task_id`). Empty when a raw producer
    /// left it out: the worker then uses the `Nats-Msg-Id` or the stream sequence.
    #[serde(default)]
    pub id: String,
    /// The kind (`async:...` or `periodic:...`).
    pub kind: String,
    /// The payload.
    #[serde(default)]
    pub payload: Value,
    /// Options (retry, timeout, deadline, retention...).
    #[serde(default)]
    pub options: Options,
    /// When it was enqueued (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueued_at: Option<String>,
    /// Errors of earlier attempts (set on dead letters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Default max retries of an async task (asynq's).
pub const DEFAULT_RETRY: u32 = 10;

impl TaskMessage {
    /// Retries allowed after the first attempt.
    pub fn max_retry(&self) -> u32 {
        self.options.retry.unwrap_or(DEFAULT_RETRY)
    }
}
