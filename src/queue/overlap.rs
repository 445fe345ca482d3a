//! The overlap rule of periodic tasks: a tick of a task with `overlap: skip`
//! (the default, as BMW) does not start while another run of that task may
//! be active.
//!
//! Each attempt of such a tick takes its kind's run lock in `bmw_unique`
//! (create-if-absent, holding the tick's task id, with a TTL of the
//! attempt's time limit plus a margin: a worker that dies or is cut off
//! mid-run leaves a lock that lasts as long as its run could have) and
//! releases it as soon as the attempt ends. An attempt that finds the lock
//! held is skipped: its message is acknowledged (a skipped tick is not
//! retried: the next tick does the work), logged, counted
//! (`periodic_task_skipped_total{kind}`) and told as
//! `bmw.event.periodic.<kind>.skipped` with the id of the run in the way.

use std::time::Duration;

use async_nats::jetstream::Message;
use serde_json::json;

use super::message::TaskMessage;
use super::shared::AttemptEnv;
use crate::nats::{TtlCreate, create_with_ttl, names};

/// Added to an attempt's time limit: a lock outlives the run it guards.
const MARGIN: Duration = Duration::from_secs(5);
/// The lock's life when an attempt has no time limit at all.
const UNLIMITED: Duration = Duration::from_secs(24 * 3600);

/// A run lock this attempt holds: its key and the revision it wrote.
pub(super) struct RunLock {
    key: String,
    revision: u64,
}

/// What taking the run lock found.
pub(super) enum Taken {
    /// Ours until the attempt ends.
    Held(RunLock),
    /// Another run holds it (its task id): skip this tick.
    Busy(String),
    /// NATS failed: the tick runs (a lost tick is worse than a rare overlap).
    Unchecked,
}

/// Takes the run lock of `task`'s kind for an attempt limited to `limit`.
pub(super) async fn take(rt: &AttemptEnv, task: &TaskMessage, limit: Option<Duration>) -> Taken {
    let key = names::periodic_run_lock_key(&task.kind);
    let ttl = limit.map_or(UNLIMITED, |l| l.saturating_add(MARGIN));
    let kv = match rt.nats.js.get_key_value(names::BUCKET_UNIQUE).await {
        Ok(kv) => kv,
        Err(e) => {
            tracing::warn!(kind = task.kind, cause = %e, "periodic run lock not checked; the tick runs");
            return Taken::Unchecked;
        }
    };
    let body = task.id.clone().into_bytes().into();
    match create_with_ttl(&rt.nats.js, &kv, &key, body, ttl).await {
        Ok(TtlCreate::Created(revision)) => Taken::Held(RunLock { key, revision }),
        Ok(TtlCreate::Exists(running)) => {
            Taken::Busy(String::from_utf8_lossy(&running).into_owned())
        }
        Err(e) => {
            tracing::warn!(kind = task.kind, cause = %e, "periodic run lock not checked; the tick runs");
            Taken::Unchecked
        }
    }
}

/// Releases a run lock, unless a newer one replaced it (it expired first).
/// A failure is logged: the lock then lasts its TTL.
pub(super) async fn release(rt: &AttemptEnv, lock: RunLock) {
    let released = match rt.nats.js.get_key_value(names::BUCKET_UNIQUE).await {
        Ok(kv) => kv
            .delete_expect_revision(&lock.key, Some(lock.revision))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(cause) = released {
        tracing::warn!(
            key = lock.key,
            cause,
            "periodic run lock not released; it expires with its TTL"
        );
    }
}

/// Skips a tick whose task has a run active (`running`): acknowledged,
/// logged, counted and told.
pub(super) async fn skip(
    rt: &AttemptEnv,
    message: Message,
    task: &TaskMessage,
    queue: &str,
    attempt: u32,
    running: &str,
) {
    tracing::info!(
        kind = task.kind,
        task_id = task.id,
        running,
        "periodic tick skipped: the previous run of its task is still active (overlap: skip)"
    );
    crate::metrics::periodic_skipped(&task.kind);
    let detail =
        json!({"task_id": task.id, "queue": queue, "attempt": attempt, "running": running});
    rt.events
        .emit("periodic", &task.kind, "skipped", detail)
        .await;
    if attempt > 1 {
        // A retry's record would otherwise say `retry` until it expires.
        let _ = rt.records.remove(&task.id).await;
    }
    if let Err(e) = message.ack().await {
        tracing::warn!(task_id = task.id, cause = %e, "skipped tick not acknowledged; it comes again");
    }
}
