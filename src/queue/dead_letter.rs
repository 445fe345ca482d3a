//! The dead-letter stream `BMW_DEAD`, stored and taken back once: a dead
//! letter's `Nats-Msg-Id` names the task message it came from (its stream
//! and sequence: [`origin`]), so archiving one delivery twice (the ack of the first
//! lost) stores it once; a requeue's names the dead letter it came from, so
//! two requeues of it at once enqueue one copy.

use async_nats::jetstream::{self, message::PublishMessage};

use super::message::TaskMessage;
use crate::nats::{NatsError, names};

/// Where a delivered task message is stored: `<stream>-<sequence>`
/// (`BMW_ASYNC-5`, `BMW_SCHEDULES-5`: the two streams number their
/// messages each on its own), or `0` without stream info.
pub fn origin(message: &jetstream::Message) -> String {
    match message.info() {
        Ok(info) => format!("{}-{}", info.stream, info.stream_sequence),
        Err(_) => "0".into(),
    }
}

/// The `Nats-Msg-Id` of the dead letter of the task message stored at
/// `origin` ([`origin`]; a requeued copy is another message, so archiving
/// it again is not taken for a duplicate).
pub fn message_id(task_id: &str, origin: &str) -> String {
    format!("{task_id}-dead-{origin}")
}

/// The `Nats-Msg-Id` of the task message a requeue of the dead letter
/// stored at `dead_sequence` in `BMW_DEAD` publishes.
pub fn requeue_message_id(task_id: &str, dead_sequence: u64) -> String {
    format!("{task_id}-requeue-{dead_sequence}")
}

/// Stores `task` on `bmw.dead.<queue>.<id>`, once per task message
/// (`origin`) within the stream's duplicate window.
pub async fn store(
    js: &jetstream::Context,
    queue: &str,
    task: &TaskMessage,
    origin: &str,
) -> Result<(), NatsError> {
    let publish = PublishMessage::build()
        .payload(crate::nats::to_json_bytes(task))
        .message_id(message_id(&task.id, origin));
    js.send_publish(names::dead_subject(queue, &task.id), publish)
        .await?
        .await?;
    Ok(())
}
