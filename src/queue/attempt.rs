//! One message of a queue, from delivery to ack: parse it, find its handler,
//! run the attempt under its timeout and deadline (the handler inline, a
//! panic caught as a failure, the message kept alive while it runs), then
//! settle it: success to the completer, a `nak` with back-off, or the dead
//! letters. Split from [`super::runtime`], which fetches and schedules.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use futures::FutureExt;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::completer::Completion;
use super::fetcher::Slot;
use super::handler::{Handler, TaskContext, TaskError};
use super::message::TaskMessage;
use super::outcome;
use super::overlap::{self, Taken};
use super::record::{RECORD_TTL, TaskState};
use super::shared::{AttemptEnv, Shared};
use crate::task::Overlap;

/// An attempt running longer than this gets an `active` record.
const ACTIVE_RECORD_AFTER: Duration = Duration::from_secs(1);

/// How long an attempt may run at `now`: the task's `timeout`, cut to what is
/// left until its `deadline`; an error (not retried) once the deadline has
/// passed. A deadline that is not RFC 3339 is ignored (options are checked
/// when decoded, so only a bug could make one).
fn attempt_limit(
    options: &crate::task::Options,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<Duration>, TaskError> {
    let deadline = options
        .deadline
        .as_deref()
        .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok());
    let Some(deadline) = deadline else {
        return Ok(options.timeout);
    };
    // Both ends are dates chrono holds, so the difference cannot overflow.
    match (deadline.with_timezone(&chrono::Utc) - now).to_std() {
        Ok(left) => Ok(Some(options.timeout.map_or(left, |t| t.min(left)))),
        Err(_) => Err(TaskError::skip_retry("deadline exceeded")),
    }
}

/// How an attempt ended.
enum Outcome {
    Done,
    Failed(TaskError),
    Deleted,
    Shutdown,
}

/// The task id: from the body, else `Nats-Msg-Id`, else the stream sequence.
///
/// An id a producer chose that cannot be a subject token or a key (spaces,
/// wildcards, dots...) is replaced by `x-` and a digest of it, so the task
/// can still be recorded, dead-lettered, found and deleted.
fn task_id(task: &TaskMessage, message: &Message, seq: u64) -> String {
    let given = if !task.id.is_empty() {
        Some(task.id.clone())
    } else {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_owned())
    };
    match given {
        None => format!("seq-{seq}"),
        Some(id) if crate::task::check_task_id("task_id", &id).is_ok() => id,
        Some(id) => {
            use sha2::{Digest, Sha256};
            let safe = format!(
                "x-{}",
                &crate::task::to_hex(&Sha256::digest(id.as_bytes()))[..32]
            );
            tracing::warn!(
                given = id,
                task_id = safe,
                "a task id unfit for subjects and keys was replaced"
            );
            safe
        }
    }
}

fn queue_of(subject: &str) -> String {
    crate::nats::names::queue_of(subject)
        .unwrap_or(crate::task::DEFAULT_QUEUE)
        .to_owned()
}

/// Runs one delivered message to its end, in named steps: [`decode`] it,
/// [`begin_tick`] for a periodic tick (its `enqueued` event and overlap
/// lock), [`run_attempt`] under its span, [`end_tick`], then [`succeeded`]
/// or [`settle`].
pub(super) async fn execute(shared: Arc<Shared>, message: Message, slot: Slot) {
    let rt = &shared.rt;
    if shared.completer.succeeded_before(&message) {
        tracing::info!(subject = %message.subject, "task already succeeded here before the connection was lost; acked, not run again");
        let _ = Box::pin(message.ack()).await;
        return;
    }
    let (attempt, seq) = match message.info() {
        Ok(info) => (info.delivered.max(1) as u32, info.stream_sequence),
        Err(_) => (1, 0),
    };
    // A retry scheduled after earlier attempts says how many there were.
    let attempt = attempt.saturating_add(outcome::earlier_attempts(&message));
    let queue = queue_of(message.subject.as_str());
    let Some((task, handler)) = decode(rt, &message, &queue, attempt, seq).await else {
        return;
    };
    let periodic = task.kind.starts_with("periodic:");
    let run_lock = if periodic {
        match begin_tick(rt, &message, &task, &queue, attempt).await {
            Taken::Held(lock) => Some(lock),
            Taken::Busy(running) => {
                return Box::pin(overlap::skip(rt, message, &task, &queue, attempt, &running))
                    .await;
            }
            Taken::Unchecked => None,
        }
    } else {
        None
    };
    crate::metrics::task_received(&task.kind);
    let span = crate::traces::attempt_span(
        &task.id,
        &task.kind,
        &queue,
        attempt,
        message.headers.as_ref(),
    );
    let started = Instant::now();
    let outcome = tracing::Instrument::instrument(
        run_attempt(
            &shared,
            &message,
            &task,
            &queue,
            attempt,
            handler,
            slot.keep_alive,
        ),
        span.clone(),
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    record_outcome(&span, &outcome);
    if let Some(lock) = run_lock {
        Box::pin(overlap::release(rt, lock)).await;
    }
    if periodic {
        Box::pin(end_tick(rt, &message, &task, attempt, &outcome)).await;
    }
    // The hot path stays in this future; everything else is boxed, so the
    // future spawned per task stays small (it was 5 KiB, copied several
    // times by every spawn).
    if let Outcome::Done = outcome {
        succeeded(&shared, message, &task, queue, attempt, seconds).await;
    } else {
        Box::pin(settle(rt, message, task, &queue, attempt, seconds, outcome)).await;
    }
}

/// The task a message holds and the handler of its kind; `None` when it has
/// neither (not a task message, or a kind this worker does not run): then
/// it is dead-lettered here, under its `Nats-Msg-Id` (else its sequence),
/// with the kind it names, if any, and the body as it came.
async fn decode(
    rt: &AttemptEnv,
    message: &Message,
    queue: &str,
    attempt: u32,
    seq: u64,
) -> Option<(TaskMessage, Arc<dyn Handler>)> {
    let mut task: TaskMessage = match serde_json::from_slice(&message.payload) {
        Ok(t) => t,
        Err(e) => {
            let body = serde_json::from_slice::<serde_json::Value>(&message.payload).ok();
            let text = |field: &str| {
                body.as_ref()
                    .and_then(|b| b.get(field)?.as_str().map(str::to_owned))
            };
            let mut task = TaskMessage {
                id: String::new(),
                kind: text("kind").unwrap_or_else(|| "unknown".into()),
                payload: body.unwrap_or_else(|| json!(String::from_utf8_lossy(&message.payload))),
                options: Default::default(),
                enqueued_at: None,
                errors: vec![],
            };
            task.id = task_id(&task, message, seq);
            let error = format!("not a task message: {e}");
            Box::pin(outcome::archive(rt, message, task, queue, attempt, &error)).await;
            return None;
        }
    };
    task.id = task_id(&task, message, seq);
    let handler = crate::task::Kind::parse(&task.kind)
        .ok()
        .and_then(|k| rt.handlers.get(&k));
    match handler {
        Some(handler) => Some((task, handler)),
        None => {
            let error = format!(
                "kind `{}` is not registered on worker {}",
                task.kind, rt.worker_id
            );
            Box::pin(outcome::archive(rt, message, task, queue, attempt, &error)).await;
            None
        }
    }
}

/// The start of a periodic tick: its `enqueued` event (first attempt only,
/// with the time the server's scheduler stored it), then its overlap lock
/// when the kind skips overlapping runs.
async fn begin_tick(
    rt: &AttemptEnv,
    message: &Message,
    task: &TaskMessage,
    queue: &str,
    attempt: u32,
) -> Taken {
    if attempt == 1 {
        crate::metrics::periodic_enqueued(&task.kind);
        let fired_at = message.info().ok().map(|i| {
            let t = i.published;
            chrono::DateTime::from_timestamp(t.unix_timestamp(), t.nanosecond())
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        });
        let detail = json!({"task_id": task.id, "queue": queue, "fired_at": fired_at.flatten()});
        Box::pin(rt.events.emit("periodic", &task.kind, "enqueued", detail)).await;
    }
    if task.options.overlap.unwrap_or_default() != Overlap::Skip {
        return Taken::Unchecked;
    }
    let limit = attempt_limit(&task.options, chrono::Utc::now())
        .ok()
        .flatten()
        .or(rt.default_timeout);
    Box::pin(overlap::take(rt, task, limit)).await
}

/// The end of a periodic tick: how it ended and when the next is due, for
/// the schedule's run history.
async fn end_tick(
    rt: &AttemptEnv,
    message: &Message,
    task: &TaskMessage,
    attempt: u32,
    outcome: &Outcome,
) {
    let next = message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_SCHEDULE_NEXT))
        .map(|v| v.as_str().to_owned());
    let label = match outcome {
        Outcome::Done => "succeeded",
        Outcome::Failed(e) if e.skips_retry() || attempt > task.max_retry() => "archived",
        Outcome::Failed(_) => "retry",
        Outcome::Deleted => "deleted",
        Outcome::Shutdown => "interrupted",
    };
    if let Some(ticks) = &rt.ticks {
        ticks.record_run(&task.kind, label, next).await;
    }
}

/// A success: handed to the completer (acked with its batch), counted, and
/// its record left or finished where it has one.
async fn succeeded(
    shared: &Shared,
    message: Message,
    task: &TaskMessage,
    queue: String,
    attempt: u32,
    seconds: f64,
) {
    let rt = &shared.rt;
    let left_record = attempt > 1 || seconds >= ACTIVE_RECORD_AFTER.as_secs_f64();
    let finish = left_record || task.options.retention.is_some();
    let done = Completion {
        message,
        task_id: task.id.clone(),
        kind: task.kind.clone(),
        queue,
        attempt,
    };
    let queue_name = done.queue.clone();
    if let Err(done) = shared.completer.try_complete(done) {
        Box::pin(shared.completer.complete(done)).await;
    }
    crate::metrics::async_processed(&task.kind, &queue_name, true, seconds);
    rt.stats.count_async(&queue_name, true);
    if finish {
        Box::pin(outcome::finish_record(
            rt,
            task,
            &queue_name,
            attempt,
            left_record,
        ))
        .await;
    }
}

/// After an attempt that did not succeed: delete, shutdown, retry or archive.
/// How the attempt ended, on its span (nothing when traces are off).
fn record_outcome(span: &tracing::Span, outcome: &Outcome) {
    if span.is_disabled() {
        return;
    }
    let label = match outcome {
        Outcome::Done => "succeeded",
        Outcome::Failed(_) => "failed",
        Outcome::Deleted => "deleted",
        Outcome::Shutdown => "interrupted",
    };
    span.record("outcome", label);
    if let Outcome::Failed(error) = outcome {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", error.to_string());
    }
}

async fn settle(
    rt: &AttemptEnv,
    message: Message,
    task: TaskMessage,
    queue: &str,
    attempt: u32,
    seconds: f64,
    outcome: Outcome,
) {
    match outcome {
        Outcome::Done => {}
        Outcome::Deleted => {
            let _ = message.ack().await;
            let _ = rt.records.remove(&task.id).await;
            tracing::info!(task_id = task.id, "async task deleted while running");
        }
        Outcome::Shutdown => {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
        Outcome::Failed(error) => {
            crate::metrics::async_processed(&task.kind, queue, false, seconds);
            rt.stats.count_async(queue, false);
            rt.events.emit("async", &task.kind, "failed", json!({"task_id": task.id, "queue": queue, "attempt": attempt, "error": error.to_string()})).await;
            if error.skips_retry() || attempt > task.max_retry() {
                outcome::archive(rt, &message, task, queue, attempt, &error.to_string()).await;
            } else {
                outcome::retry(rt, &message, &task, queue, attempt, &error).await;
            }
        }
    }
}

/// Runs one attempt with its timeout and deadline, keeping the message alive.
async fn run_attempt(
    shared: &Arc<Shared>,
    message: &Message,
    task: &TaskMessage,
    queue: &str,
    attempt: u32,
    handler: Arc<dyn Handler>,
    keep_alive: Duration,
) -> Outcome {
    let rt = &shared.rt;
    let limit = match attempt_limit(&task.options, chrono::Utc::now()) {
        // A task with no limit of its own is held to the worker's default (as
        // asynq caps such runs at 30 minutes), so a hung handler frees its slot.
        Ok(limit) => limit.or(rt.default_timeout),
        Err(e) => return Outcome::Failed(e),
    };
    let token = CancellationToken::new();
    if let Ok(mut r) = shared.running.lock() {
        if r.deleted.remove(&task.id) {
            return Outcome::Deleted;
        }
        r.tokens.insert(task.id.clone(), token.clone());
    }
    let ctx = task_context(rt, task, queue, attempt, &token, limit);
    // The handler runs inline (a panic is caught as the failure of this
    // attempt) and is polled first: a task that finishes at once never
    // arms a timer.
    let work = AssertUnwindSafe(handler.handle(ctx, &task.payload)).catch_unwind();
    tokio::pin!(work);
    let timeout = async {
        match limit {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timeout);
    // One timer: the `active` record after a while, then progress acks (a
    // third of the consumer's ack wait apart).
    let wake = tokio::time::sleep(ACTIVE_RECORD_AFTER.min(keep_alive));
    tokio::pin!(wake);
    let mut active_written = false;
    let result = loop {
        tokio::select! {
            biased;
            r = &mut work => break Ended::Handler(r),
            () = &mut timeout => {
                token.cancel();
                let finished = Box::pin(tokio::time::timeout(Duration::from_secs(1), &mut work)).await;
                if finished.is_err() {
                    tracing::warn!(task_id = task.id, "handler ignored its cancellation; dropped");
                }
                let what = if task.options.deadline.is_some() && task.options.timeout.is_none_or(|t| Some(t) != limit) { "deadline exceeded" } else { "timeout" };
                break Ended::TimedOut(TaskError::new(format!("{what} after {:?}", limit.unwrap_or_default())));
            }
            () = &mut wake => {
                if active_written {
                    let _ = Box::pin(message.ack_with(AckKind::Progress)).await;
                } else {
                    active_written = true;
                    let record = outcome::record(task, queue, TaskState::Active, attempt, None);
                    let _ = Box::pin(rt.records.put(&record, RECORD_TTL)).await;
                }
                wake.as_mut().reset(Instant::now() + keep_alive);
            }
        }
    };
    let deleted = shared.running.lock().map(|mut r| {
        r.tokens.remove(&task.id);
        r.deleted.remove(&task.id)
    });
    if deleted.unwrap_or(false) {
        return Outcome::Deleted;
    }
    outcome_of(result, &token)
}

/// What a handler sees of its attempt.
fn task_context(
    rt: &AttemptEnv,
    task: &TaskMessage,
    queue: &str,
    attempt: u32,
    token: &CancellationToken,
    limit: Option<Duration>,
) -> TaskContext {
    TaskContext {
        task_id: task.id.clone(),
        kind: task.kind.clone(),
        queue: queue.to_owned(),
        attempt,
        worker_id: rt.worker_id.clone(),
        max_retry: task.max_retry(),
        token: token.clone(),
        deadline: limit.and_then(|l| {
            chrono::Utc::now().checked_add_signed(chrono::TimeDelta::from_std(l).ok()?)
        }),
        nats: rt.nats.client.clone(),
    }
}

/// How an attempt that was not deleted meanwhile ended.
fn outcome_of(result: Ended, token: &CancellationToken) -> Outcome {
    match result {
        Ended::TimedOut(e) => Outcome::Failed(e),
        Ended::Handler(Ok(Ok(()))) => Outcome::Done,
        // Cancelled by shutdown (a timeout ends as `TimedOut`, a delete as `Deleted`).
        Ended::Handler(Ok(Err(_))) if token.is_cancelled() => Outcome::Shutdown,
        Ended::Handler(Ok(Err(e))) => Outcome::Failed(e),
        Ended::Handler(Err(panic)) => Outcome::Failed(TaskError::new(format!(
            "handler panicked: {}",
            super::handler::panic_message(panic.as_ref())
        ))),
    }
}

/// How the handler's future ended: by itself (maybe by a panic), or cut off
/// by the task's timeout or deadline.
enum Ended {
    Handler(std::thread::Result<Result<(), TaskError>>),
    TimedOut(TaskError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::arbitrary;
    use chrono::{DateTime, Utc};
    use proptest::prelude::*;
    use serde_json::Value;

    /// A task-message-shaped body: the fields a producer sends, with any values.
    fn task_body() -> impl Strategy<Value = Value> {
        let options = arbitrary::options_object();
        (
            arbitrary::id_text(),
            arbitrary::kind_text(),
            arbitrary::json(),
            prop_oneof![options, arbitrary::json()],
        )
            .prop_map(|(id, kind, payload, options)| {
                json!({"id": id, "kind": kind, "payload": payload, "options": options})
            })
    }

    fn instant() -> impl Strategy<Value = DateTime<Utc>> {
        prop_oneof![
            (0i64..=253_402_300_799).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
            Just(Utc::now()),
        ]
    }

    proptest! {
        #![proptest_config(arbitrary::config())]

        #[test]
        fn any_body_decodes_or_is_refused(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = serde_json::from_slice::<TaskMessage>(&body);
        }

        #[test]
        fn decoded_tasks_get_a_limit_and_a_record(body in task_body(), now in instant()) {
            let Ok(task) = serde_json::from_value::<TaskMessage>(body) else {
                return Ok(());
            };
            let _ = task.max_retry();
            match attempt_limit(&task.options, now) {
                Ok(Some(limit)) => {
                    prop_assert!(task.options.timeout.is_none_or(|t| limit <= t));
                    prop_assert!(task.options.deadline.is_some() || task.options.timeout == Some(limit));
                }
                Ok(None) => prop_assert!(task.options.timeout.is_none()),
                Err(e) => prop_assert!(e.skips_retry() && task.options.deadline.is_some()),
            }
            // The record of any attempt can be written.
            let r = outcome::record(&task, "default", TaskState::Retry, 1, Some("x"));
            prop_assert!(serde_json::to_vec(&r).is_ok());
        }
    }

    #[test]
    fn a_passed_deadline_ends_the_task_and_a_near_one_cuts_the_timeout() {
        let now = Utc::now();
        let options = |deadline: DateTime<Utc>, timeout: u64| crate::task::Options {
            deadline: Some(deadline.to_rfc3339()),
            timeout: Some(Duration::from_secs(timeout)),
            ..Default::default()
        };
        let passed = attempt_limit(&options(now - chrono::Duration::seconds(1), 60), now);
        assert!(passed.unwrap_err().skips_retry());
        let near = attempt_limit(&options(now + chrono::Duration::seconds(10), 60), now);
        assert_eq!(near.unwrap(), Some(Duration::from_secs(10)));
        let far = attempt_limit(&options(now + chrono::Duration::days(3650), 60), now);
        assert_eq!(far.unwrap(), Some(Duration::from_secs(60)));
    }
}
