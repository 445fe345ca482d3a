//! The dead-letter stream `BMW_DEAD`, stored and taken back once: a dead
//! letter's `Nats-Msg-Id` names the task message it came from (its sequence
//! in `BMW_ASYNC`), so archiving one delivery twice (the ack of the first
//! lost) stores it once; a requeue's names the dead letter it came from, so
//! two requeues of it at once enqueue one copy.

use async_nats::jetstream::{self, message::PublishMessage};

use super::message::TaskMessage;
use crate::nats::{NatsError, names};

/// The `Nats-Msg-Id` of the dead letter of the task message stored at
/// `task_sequence` in `BMW_ASYNC` (a requeued copy is another message, so
/// archiving it again is not taken for a duplicate).
pub fn message_id(task_id: &str, task_sequence: u64) -> String {
    format!("{task_id}-dead-{task_sequence}")
}

/// The `Nats-Msg-Id` of the task message a requeue of the dead letter
/// stored at `dead_sequence` in `BMW_DEAD` publishes.
pub fn requeue_message_id(task_id: &str, dead_sequence: u64) -> String {
    format!("{task_id}-requeue-{dead_sequence}")
}

/// Stores `task` on `bmw.dead.<queue>.<id>`, once per task message
/// (`task_sequence`) within the stream's duplicate window.
pub async fn store(
    js: &jetstream::Context,
    queue: &str,
    task: &TaskMessage,
    task_sequence: u64,
) -> Result<(), NatsError> {
    let publish = PublishMessage::build()
        .payload(crate::nats::to_json_bytes(task))
        .message_id(message_id(&task.id, task_sequence));
    js.send_publish(names::dead_subject(queue, &task.id), publish)
        .await?
        .await?;
    Ok(())
}
