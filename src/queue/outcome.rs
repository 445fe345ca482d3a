//! What happens after an attempt: the record of a retry, a completion or an
//! archive, the next attempt after a back-off delay, and the dead letter.
//! Used by [`super::attempt`], which runs an attempt and settles it.
//!
//! A retry of an async task is a new message: a one-shot `@at` schedule on
//! `bmw.schedule.retry.<queue>.<id>` that nats-server fires onto the task's
//! subject when the delay is over, carrying the attempts made so far
//! (`Bmw-Attempts`); the failed message is acked once the schedule is
//! stored. A `nak` with the delay would keep the message pending on the
//! queue's consumer for the whole delay, and enough of those (its
//! `max_ack_pending`) stop the queue (issue 11). The schedule's
//! `Nats-Msg-Id` names the failed message, so a worker that dies between
//! the two steps leaves one schedule when the message is run again (and the
//! attempt itself runs twice). Delays under [`SCHEDULE_FROM`] (the
//! schedule's time has whole seconds) and periodic ticks (whose queued ticks
//! a delete or pause drops by their subject) keep the `nak`.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{AckKind, Message, message::PublishMessage};
use serde_json::json;

use super::handler::TaskError;
use super::message::TaskMessage;
use super::record::{RECORD_TTL, TaskRecord, TaskState};
use super::shared::AttemptEnv;
use crate::nats::{NatsError, names};

/// Retry delays from this long on are scheduled as new messages; shorter
/// ones are `nak`s with the delay.
const SCHEDULE_FROM: Duration = Duration::from_secs(2);

/// The attempts a task made before this message (`Bmw-Attempts` of a
/// scheduled retry; 0 otherwise).
pub(super) fn earlier_attempts(message: &Message) -> u32 {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(names::HEADER_ATTEMPTS))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0)
}

/// Stores the next attempt of `task` (`attempts` made so far) as a one-shot
/// schedule that fires after `delay`, once per failed message.
async fn schedule_retry(
    rt: &AttemptEnv,
    message: &Message,
    task: &TaskMessage,
    queue: &str,
    attempts: u32,
    delay: Duration,
) -> Result<(), NatsError> {
    // Whole seconds, rounded up: never earlier than the delay.
    let due = chrono::TimeDelta::from_std(delay + Duration::from_millis(999))
        .ok()
        .and_then(|d| chrono::Utc::now().checked_add_signed(d))
        .ok_or_else(|| NatsError::new(std::io::Error::other("retry time out of range")))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_SCHEDULE,
        format!(
            "@at {}",
            due.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
        .as_str(),
    );
    headers.insert(
        async_nats::header::NATS_SCHEDULE_TARGET,
        names::fired_subject(queue, &task.id).as_str(),
    );
    headers.insert(names::HEADER_ATTEMPTS, attempts.to_string().as_str());
    // Every attempt continues the trace of the task's first publish.
    crate::traces::carry(message.headers.as_ref(), &mut headers);
    // Once per failed message: its stream and sequence (a retry that fired
    // in BMW_SCHEDULES may share a sequence number with one in BMW_ASYNC).
    let origin = super::dead_letter::origin(message);
    let publish = PublishMessage::build()
        .payload(crate::nats::to_json_bytes(task))
        .headers(headers)
        .message_id(format!("{}-retry-{origin}", task.id));
    rt.nats
        .js
        .send_publish(names::retry_subject(queue, &task.id), publish)
        .await?
        .await?;
    Ok(())
}

pub(super) fn record(
    task: &TaskMessage,
    queue: &str,
    state: TaskState,
    attempts: u32,
    error: Option<&str>,
) -> TaskRecord {
    TaskRecord {
        task_id: task.id.clone(),
        kind: task.kind.clone(),
        queue: queue.to_owned(),
        state,
        attempts,
        max_retry: task.max_retry(),
        last_error: error.map(str::to_owned),
        errors: task.errors.clone(),
        payload: task.payload.clone(),
        options: serde_json::to_value(&task.options).unwrap_or_default(),
        enqueued_at: task.enqueued_at.clone(),
        next_process_at: None,
        completed_at: None,
        updated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    }
}

/// After success: a `completed` record for the retention, or none at all
/// (clearing one an earlier attempt or a long run left).
pub(super) async fn finish_record(
    rt: &AttemptEnv,
    task: &TaskMessage,
    queue: &str,
    attempt: u32,
    left_record: bool,
) {
    if let Some(retention) = task.options.retention.filter(|r| !r.is_zero()) {
        let mut r = record(task, queue, TaskState::Completed, attempt, None);
        r.completed_at = Some(r.updated_at.clone());
        if let Err(e) = rt.records.put(&r, retention).await {
            tracing::warn!(task_id = task.id, cause = %e, "completed record not written");
        }
    } else if left_record {
        let _ = rt.records.remove(&task.id).await;
    }
}

pub(super) async fn retry(
    rt: &AttemptEnv,
    message: &Message,
    task: &TaskMessage,
    queue: &str,
    attempt: u32,
    error: &TaskError,
) {
    let delay = match error.delay() {
        Some(chosen) => rt.backoff.capped(chosen),
        None => rt.backoff.delay(attempt),
    };
    let mut errors = match rt.records.get(&task.id).await {
        Ok(Some(r)) => r.errors,
        _ => Vec::new(),
    };
    errors.push(error.to_string());
    let keep = errors.len().saturating_sub(10);
    errors.drain(..keep);
    let mut r = record(
        task,
        queue,
        TaskState::Retry,
        attempt,
        Some(&error.to_string()),
    );
    r.errors = errors;
    r.next_process_at = chrono::TimeDelta::from_std(delay)
        .ok()
        .and_then(|d| chrono::Utc::now().checked_add_signed(d))
        .map(|at| at.to_rfc3339());
    if let Err(e) = rt.records.put(&r, RECORD_TTL).await {
        tracing::warn!(task_id = task.id, cause = %e, "retry record not written");
    }
    tracing::warn!(task_id = task.id, kind = task.kind, attempt, delay = ?delay, error = %error, "async task failed, will retry");
    rt.events.emit("async", &task.kind, "retry", json!({"task_id": task.id, "queue": queue, "attempt": attempt, "error": error.to_string(), "delay_seconds": delay.as_secs_f64()})).await;
    if delay >= SCHEDULE_FROM && !task.kind.starts_with("periodic:") {
        match schedule_retry(rt, message, task, queue, attempt, delay).await {
            Ok(()) => {
                let _ = message.ack().await;
                return;
            }
            Err(e) => {
                // Not lost: the message waits for its retry on the consumer.
                tracing::warn!(task_id = task.id, cause = %e, "retry not scheduled; the message waits for it instead");
            }
        }
    }
    let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
}

/// Moves a task to `bmw.dead.<queue>.<id>` with its error history, records it
/// as archived, and removes it from its queue.
pub(super) async fn archive(
    rt: &AttemptEnv,
    message: &Message,
    mut task: TaskMessage,
    queue: &str,
    attempt: u32,
    error: &str,
) {
    if let Ok(Some(previous)) = rt.records.get(&task.id).await {
        task.errors = previous.errors;
    }
    task.errors.push(error.to_owned());
    // The same delivery archived again (the ack of the first lost) is the
    // same dead letter; a message without stream info cannot be.
    let origin = super::dead_letter::origin(message);
    if let Err(e) = super::dead_letter::store(&rt.nats.js, queue, &task, &origin).await {
        // Not lost: leave it for redelivery and try again later.
        tracing::error!(task_id = task.id, cause = %e, "dead letter not stored; task returned to its queue");
        let _ = message
            .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
            .await;
        return;
    }
    let mut r = record(&task, queue, TaskState::Archived, attempt, Some(error));
    r.completed_at = Some(r.updated_at.clone());
    let _ = rt.records.put(&r, RECORD_TTL).await;
    rt.events
        .emit(
            "async",
            &task.kind,
            "archived",
            json!({"task_id": task.id, "queue": queue, "attempt": attempt, "error": error}),
        )
        .await;
    let _ = message.ack().await;
    tracing::error!(
        task_id = task.id,
        kind = task.kind,
        attempt,
        error,
        "async task archived"
    );
}
