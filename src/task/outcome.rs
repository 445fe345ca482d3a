//! What an operation answers: [`Outcome`], BMW's envelope `{"result", "code",
//! "message", "data"}`, which is at once the body of a command's reply on
//! `Bmw-Reply`, what `bmw task` prints and what the bridge sends; and
//! [`OpError`], why an operation did not happen, which decides the code.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ValidationError;
use crate::nats::{NatsError, NatsErrorKind};

/// The outcome of an operation. `code` is 0 on success, else the HTTP status
/// the bridge answers with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Envelope)]
pub struct Outcome {
    /// Success.
    pub result: bool,
    /// 0, or an HTTP status (400, 404, 409, 503...).
    pub code: u16,
    /// `ok` or what went wrong.
    pub message: String,
    /// The task (uni_id, task_id...), or null.
    pub data: Value,
}

impl Outcome {
    /// Success with data.
    pub fn ok(data: Value) -> Self {
        Outcome {
            result: true,
            code: 0,
            message: "ok".into(),
            data,
        }
    }

    /// Failure with a status and message.
    pub fn err(code: u16, message: impl Into<String>) -> Self {
        Outcome {
            result: false,
            code,
            message: message.into(),
            data: Value::Null,
        }
    }
}

/// Why an operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The input is invalid (400).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The task does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// A duplicate: a task id in use, or the same task within its unique
    /// window (409, with the existing task's id).
    #[error("{message}")]
    Conflict {
        /// What conflicts.
        message: String,
        /// The existing task's id.
        task_id: String,
    },
    /// What would be stored does not fit in a NATS message (413; 400 when the
    /// request came as a message on a subject).
    #[error(
        "the stored {what} would be {size} bytes, over the {limit} bytes nats-server takes in one message (its max_payload less room for headers); send a smaller payload"
    )]
    TooLarge {
        /// What would be stored (`daemon task`, `async task`...).
        what: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The most that fits.
        limit: usize,
    },
    /// The queue holds as many tasks as it may (429).
    #[error(
        "queue `{queue}` holds {limit} tasks or more (--max-queue-pending); try again when workers have caught up"
    )]
    QueueFull {
        /// The queue.
        queue: String,
        /// Its limit.
        limit: u64,
    },
    /// A stream is at its storage limit (507): it refuses new work until
    /// it drains; nothing it holds was dropped for it.
    #[error(
        "stream `{stream}` is full ({detail}): it takes no new task until workers drain it; \
         or raise --storage-max-bytes and run `bmw provision`"
    )]
    StorageFull {
        /// The stream.
        stream: String,
        /// What is full.
        detail: String,
    },
    /// NATS failed: 503 when it may work later (timeout, outage), 500 when not.
    #[error(transparent)]
    Nats(#[from] NatsError),
}

/// Room for the headers JetStream and bmw add to a stored message.
const HEADER_ROOM: usize = 4096;

/// Refuses a stored form of `size` bytes that would not fit in one NATS
/// message of at most `max_payload` bytes (the server's), headers included.
pub fn check_fits(what: &'static str, size: usize, max_payload: usize) -> Result<(), OpError> {
    let limit = max_payload.saturating_sub(HEADER_ROOM);
    if size > limit {
        return Err(OpError::TooLarge { what, size, limit });
    }
    Ok(())
}

impl OpError {
    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        match self {
            OpError::Invalid(_) => 400,
            OpError::NotFound(_) => 404,
            OpError::Conflict { .. } => 409,
            OpError::TooLarge { .. } => 413,
            OpError::QueueFull { .. } => 429,
            OpError::Nats(e) if e.kind() == NatsErrorKind::Full => 507,
            OpError::StorageFull { .. } => 507,
            OpError::Nats(e) if e.is_transient() => 503,
            // The server refused what bmw sent, or something bmw did not expect.
            OpError::Nats(e) if e.kind() == NatsErrorKind::Refused => 500,
            OpError::Nats(_) => 503,
        }
    }

    /// Whether trying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            OpError::QueueFull { .. } | OpError::StorageFull { .. }
        ) || matches!(self, OpError::Nats(e) if e.kind() == NatsErrorKind::Full)
            || matches!(self, OpError::Nats(e) if e.is_transient())
    }
}

impl From<OpError> for Outcome {
    fn from(e: OpError) -> Self {
        let mut outcome = Outcome::err(e.status(), e.to_string());
        if let OpError::Conflict { task_id, .. } = &e {
            outcome.data = json!({"task_id": task_id});
        }
        outcome
    }
}

impl From<Result<Value, OpError>> for Outcome {
    fn from(r: Result<Value, OpError>) -> Self {
        match r {
            Ok(data) => Outcome::ok(data),
            Err(e) => e.into(),
        }
    }
}
