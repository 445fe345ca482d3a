//! [`Admin`]: deleting and re-enqueueing async tasks, wherever they are.
//!
//! Delete of a pending or scheduled task removes its message (or schedule)
//! from the stream; delete of a running task is broadcast to every worker on
//! `bmw.cancel.async`, and the one running it cancels the handler and drops
//! the task. Re-enqueue takes an archived task out of `bmw.dead.<queue>` and
//! puts it back in its queue with fresh attempts.

use async_nats::jetstream::{
    self,
    message::PublishMessage,
    stream::{DeleteMessageErrorKind, LastRawMessageErrorKind, Stream},
};
use serde_json::{Value, json};

use super::inspect::{Inspector, subjects};
use super::message::TaskMessage;
use super::record::TaskState;
use crate::nats::{NatsError, names};
use crate::task::{OpError, ValidationError};

fn nats(e: impl Into<NatsError>) -> OpError {
    OpError::Nats(e.into())
}

/// Deletes and re-enqueues async tasks.
#[derive(Debug, Clone)]
pub struct Admin {
    js: jetstream::Context,
    client: async_nats::Client,
    /// Also holds the stream, dead-letter stream and records handles.
    inspector: Inspector,
}

impl Admin {
    /// Opens the streams and records.
    pub async fn open(nats: &crate::nats::Nats) -> Result<Admin, NatsError> {
        let js = &nats.js;
        Ok(Admin {
            js: js.clone(),
            client: nats.client.clone(),
            inspector: Inspector::open(js).await?,
        })
    }

    /// The inspector over the same streams.
    pub fn inspector(&self) -> &Inspector {
        &self.inspector
    }

    /// Deletes a task in any state; running handlers are cancelled.
    pub async fn delete(&self, task_id: &str) -> Result<Value, OpError> {
        let Some(record) = self.inspector.get(task_id).await? else {
            return Err(OpError::NotFound(format!(
                "async task `{task_id}` does not exist"
            )));
        };
        let queue = &record.queue;
        match record.state {
            TaskState::Scheduled => {
                self.purge(
                    &self.inspector.schedules,
                    &names::delayed_subject(queue, task_id),
                )
                .await?;
                // Fired an instant ago: the message it fired.
                self.purge(
                    &self.inspector.schedules,
                    &names::fired_subject(queue, task_id),
                )
                .await?
            }
            TaskState::Archived => {
                self.purge(&self.inspector.dead, &names::dead_subject(queue, task_id))
                    .await?
            }
            TaskState::Completed => {}
            TaskState::Pending | TaskState::Active | TaskState::Retry => {
                // Tell whoever runs it to stop, then drop the message itself.
                self.client
                    .publish(names::SUBJECT_ASYNC_CANCEL, task_id.to_owned().into())
                    .await
                    .map_err(nats)?;
                self.client.flush().await.map_err(nats)?;
                self.purge(
                    &self.inspector.stream,
                    &names::async_subject(queue, task_id),
                )
                .await?;
                // A task waiting for its next attempt waits as a schedule,
                // and a retry or delayed start that fired as a fired message.
                self.purge(
                    &self.inspector.schedules,
                    &names::retry_subject(queue, task_id),
                )
                .await?;
                self.purge(
                    &self.inspector.schedules,
                    &names::fired_subject(queue, task_id),
                )
                .await?;
            }
        }
        self.inspector.records.remove(task_id).await?;
        Ok(json!({"task_id": task_id, "state": record.state}))
    }

    async fn purge(&self, stream: &Stream, subject: &str) -> Result<(), OpError> {
        stream
            .purge()
            .filter(subject)
            .await
            .map(|_| ())
            .map_err(nats)
    }

    /// Puts an archived task back in its queue with fresh attempts.
    pub async fn requeue(&self, task_id: &str) -> Result<Value, OpError> {
        let filter = names::dead_subject(names::ANY, task_id);
        let not_found = || OpError::NotFound(format!("no archived async task `{task_id}`"));
        let Some(subject) = subjects(&self.inspector.dead, &filter).await?.next() else {
            return Err(not_found());
        };
        let message = match self
            .inspector
            .dead
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(message) => message,
            // Gone since it was listed: a concurrent requeue or delete took it.
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Err(not_found());
            }
            Err(e) => return Err(nats(e)),
        };
        let mut task: TaskMessage = serde_json::from_slice(&message.payload).map_err(|e| {
            ValidationError::new(
                "task_id",
                format!("archived task `{task_id}` is not a task message: {e}"),
            )
        })?;
        task.errors.clear();
        let queue = names::queue_of(&subject)
            .unwrap_or(crate::task::DEFAULT_QUEUE)
            .to_owned();
        let body = crate::nats::to_json_bytes(&task);
        // Not the original message id (it may still be in the dedup window),
        // but one per dead letter: a concurrent requeue of it is a duplicate.
        let msg_id = super::dead_letter::requeue_message_id(task_id, message.sequence);
        let publish = PublishMessage::build().payload(body).message_id(msg_id);
        // The old record goes before the task is back in its queue: after,
        // it could be the new run's (a task failing at once is archived
        // again within milliseconds). Meanwhile the dead letter finds it.
        self.inspector.records.remove(task_id).await?;
        let ack = self
            .js
            .send_publish(names::async_subject(&queue, task_id), publish)
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        if ack.duplicate {
            // Another requeue did it (and clears the dead letter and record;
            // the record may already be the new run's).
            return Ok(json!({"task_id": task_id, "queue": queue, "state": "pending"}));
        }
        // This dead letter only: the new run may have left another one.
        match self.inspector.dead.delete_message(message.sequence).await {
            Ok(_) => {}
            // Gone already (a concurrent requeue or delete took it).
            Err(e) if matches!(e.kind(), DeleteMessageErrorKind::JetStream(j) if j.code() == 404) =>
                {}
            Err(e) => return Err(nats(e)),
        }
        tracing::info!(task_id, queue, "archived async task re-enqueued");
        Ok(json!({"task_id": task_id, "queue": queue, "state": "pending"}))
    }
}
