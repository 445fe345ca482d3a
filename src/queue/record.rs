//! [`RecordStore`]: the inspectable state of async tasks in `bmw_async_tasks`.
//!
//! Records are written only when they matter (a retry, a long-running attempt,
//! completion with a retention, archiving), never on the hot path of a task
//! that succeeds at once without retention: `pending` and `active` otherwise
//! come from the stream and its consumer. Every record has a per-key TTL.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::nats::{NatsError, names};

/// Life of a record without a retention (retry, active, archived).
pub const RECORD_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting in its queue.
    Pending,
    /// Waiting for its `process_at`.
    Scheduled,
    /// Running.
    Active,
    /// Failed, waiting for its next attempt.
    Retry,
    /// Succeeded (kept for its retention).
    Completed,
    /// Used up its retries or skipped them: in the dead-letter stream.
    Archived,
}

impl TaskState {
    /// Parses a state name.
    pub fn parse(s: &str) -> Option<TaskState> {
        serde_json::from_value(Value::String(s.to_owned())).ok()
    }
}

/// A task's inspectable state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskRecord {
    /// Task id.
    pub task_id: String,
    /// Kind.
    pub kind: String,
    /// Queue.
    pub queue: String,
    /// State.
    pub state: TaskState,
    /// Attempts so far.
    pub attempts: u32,
    /// Retries allowed.
    pub max_retry: u32,
    /// The last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Errors of the attempts so far (the last ten).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Payload.
    pub payload: Value,
    /// Options.
    #[serde(default)]
    pub options: Value,
    /// When it was enqueued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueued_at: Option<String>,
    /// When the next attempt is due (retry) or the task is due (scheduled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_process_at: Option<String>,
    /// When it finished (completed or archived).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// Last change.
    pub updated_at: String,
}

/// The records bucket.
#[derive(Debug, Clone)]
pub struct RecordStore {
    js: jetstream::Context,
    kv: kv::Store,
}

impl RecordStore {
    /// Opens the (provisioned) bucket.
    pub async fn open(js: &jetstream::Context) -> Result<RecordStore, NatsError> {
        let kv = js.get_key_value(names::BUCKET_ASYNC_TASKS).await?;
        Ok(RecordStore { js: js.clone(), kv })
    }

    /// Writes a record that expires after `ttl` (whole seconds, at least 1 s).
    pub async fn put(&self, record: &TaskRecord, ttl: Duration) -> Result<(), NatsError> {
        let body = crate::nats::to_json_bytes(record);
        crate::nats::put_with_ttl(
            &self.js,
            names::BUCKET_ASYNC_TASKS,
            &record.task_id,
            body,
            ttl,
        )
        .await
    }

    /// The record of a task, if any.
    pub async fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, NatsError> {
        match self.kv.entry(task_id).await? {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(serde_json::from_slice(&e.value).ok())
            }
            _ => Ok(None),
        }
    }

    /// Removes a task's record (leaving a short-lived marker, no tombstone).
    pub async fn remove(&self, task_id: &str) -> Result<(), NatsError> {
        self.kv
            .purge_with_ttl(task_id, Duration::from_secs(60))
            .await?;
        Ok(())
    }

    /// The bucket's stream (listings page through it).
    pub(crate) fn stream(&self) -> &async_nats::jetstream::stream::Stream {
        &self.kv.stream
    }

    /// Every record.
    pub async fn all(&self) -> Result<Vec<TaskRecord>, NatsError> {
        Ok(crate::nats::read_all::<TaskRecord>(&self.kv)
            .await?
            .into_values()
            .collect())
    }
}

/// The record a message of the records bucket holds; `None` for a delete or
/// purge marker, or anything that is not a record.
pub(crate) fn from_message(
    message: &async_nats::jetstream::message::StreamMessage,
) -> Option<TaskRecord> {
    if message.headers.get("KV-Operation").is_some() {
        return None;
    }
    serde_json::from_slice(&message.payload).ok()
}
