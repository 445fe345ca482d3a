//! [`AsyncRuntime`]: runs the async tasks of the queues a worker listens on.
//!
//! One loop per queue shares a semaphore of `concurrency` permits. A loop
//! long-polls its queue's shared consumer for one message (holding no
//! permit while idle), then waits for its share of the permits
//! (`concurrency * weight / total weight`, at least one; the semaphore is
//! fair, so under load queues are served in proportion to their weights),
//! takes whatever else is free too, and fetches that many more without waiting. While a backlog lasts it
//! skips the long-poll. Each message runs in its own task: the hot path is a
//! share of one fetch, one ack and one `succeeded` event; records are written
//! only on failure, long runs or retention (see [`super::record`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message, consumer::pull};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handler::{Handler, TaskContext, TaskError};
use super::message::TaskMessage;
use super::outcome;
use super::record::{RECORD_TTL, RecordStore, TaskState};
use super::retry::Backoff;
use crate::events::EventPublisher;
use crate::membership::WorkerStats;
use crate::nats::{Nats, names};
use crate::registry::Registry;

/// An attempt running longer than this gets an `active` record.
const ACTIVE_RECORD_AFTER: Duration = Duration::from_secs(1);
/// Long-poll of an idle queue (short, so shutdown never abandons a pull request long).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// A queue and its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueWeight {
    /// Queue name.
    pub name: String,
    /// Relative share under load.
    pub weight: u32,
}

/// Everything the runtime needs, built by the worker.
#[derive(Debug)]
pub struct AsyncRuntime {
    pub(crate) nats: Nats,
    pub(crate) registry: Arc<Registry>,
    pub(crate) records: RecordStore,
    pub(crate) events: EventPublisher,
    pub(crate) queues: Vec<QueueWeight>,
    pub(crate) concurrency: usize,
    pub(crate) backoff: Backoff,
    pub(crate) grace: Duration,
    pub(crate) ack_wait: Duration,
    pub(crate) worker_id: String,
    pub(crate) stats: Arc<WorkerStats>,
    pub(crate) periodic: crate::periodic::PeriodicStore,
}

#[derive(Debug, Default)]
struct Running {
    /// Task id -> its attempt's token.
    tokens: HashMap<String, CancellationToken>,
    /// Tasks deleted while running: not retried.
    deleted: HashSet<String>,
}

#[derive(Debug)]
struct Shared {
    rt: AsyncRuntime,
    running: Mutex<Running>,
}

/// How an attempt ended.
enum Outcome {
    Done,
    Failed(TaskError),
    Deleted,
    Shutdown,
}

/// Creates (or finds) the shared consumer of a queue. `ack_wait` applies
/// when this call creates it; an existing consumer keeps its own.
pub async fn queue_consumer(
    js: &jetstream::Context,
    queue: &str,
    ack_wait: Duration,
) -> Result<jetstream::consumer::PullConsumer, String> {
    let stream = js
        .get_stream(names::STREAM_ASYNC)
        .await
        .map_err(|e| e.to_string())?;
    let name = names::async_consumer(queue);
    stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subjects: names::async_queue_filters(queue),
                ack_wait,
                max_deliver: -1,
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())
}

impl AsyncRuntime {
    /// Runs until `token` fires; then stops fetching, lets running attempts
    /// finish for the grace period, and returns the rest to the queue.
    pub async fn run(self, token: CancellationToken) {
        let shared = Arc::new(Shared {
            rt: self,
            running: Mutex::new(Running::default()),
        });
        let semaphore = Arc::new(Semaphore::new(shared.rt.concurrency.max(1)));
        let tasks = TaskTracker::new();
        let loops = TaskTracker::new();
        loops.spawn(cancel_listener(shared.clone(), token.clone()));
        let total: u32 = shared.rt.queues.iter().map(|q| q.weight.max(1)).sum();
        for queue in shared.rt.queues.clone() {
            let share = (shared.rt.concurrency * queue.weight.max(1) as usize
                / total.max(1) as usize)
                .max(1);
            loops.spawn(queue_loop(
                shared.clone(),
                queue,
                share,
                semaphore.clone(),
                tasks.clone(),
                token.clone(),
            ));
        }
        loops.spawn(pending_gauge(shared.clone(), token.clone()));
        token.cancelled().await;
        loops.close();
        loops.wait().await;
        tasks.close();
        if tokio::time::timeout(shared.rt.grace, tasks.wait())
            .await
            .is_err()
        {
            let running = shared.running.lock().map(|r| r.tokens.len()).unwrap_or(0);
            tracing::warn!(
                running,
                "async tasks still running after the grace period; cancelling them"
            );
            if let Ok(r) = shared.running.lock() {
                r.tokens.values().for_each(CancellationToken::cancel);
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
        }
    }
}

/// Follows deletes of running tasks (broadcast on core NATS to every worker).
async fn cancel_listener(shared: Arc<Shared>, token: CancellationToken) {
    let Ok(mut sub) = shared
        .rt
        .nats
        .client
        .subscribe(names::SUBJECT_ASYNC_CANCEL)
        .await
    else {
        return tracing::warn!("cannot follow async task deletes");
    };
    loop {
        tokio::select! {
            Some(m) = sub.next() => {
                let id = String::from_utf8_lossy(&m.payload).into_owned();
                if let Ok(mut r) = shared.running.lock()
                    && let Some(t) = r.tokens.get(&id).cloned()
                {
                    r.deleted.insert(id);
                    t.cancel();
                }
            }
            () = token.cancelled() => return,
        }
    }
}

/// Keeps `async_queue_pending{queue}` current.
async fn pending_gauge(shared: Arc<Shared>, token: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for q in &shared.rt.queues {
                    if let Ok(mut c) = queue_consumer(&shared.rt.nats.js, &q.name, shared.rt.ack_wait).await
                        && let Ok(info) = c.info().await
                    {
                        crate::metrics::async_pending(&q.name, info.num_pending);
                    }
                }
            }
            () = token.cancelled() => return,
        }
    }
}

async fn queue_loop(
    shared: Arc<Shared>,
    queue: QueueWeight,
    share: usize,
    semaphore: Arc<Semaphore>,
    tasks: TaskTracker,
    token: CancellationToken,
) {
    let consumer = loop {
        match queue_consumer(&shared.rt.nats.js, &queue.name, shared.rt.ack_wait).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(queue = queue.name, cause = %e, "queue consumer unavailable, retrying")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = token.cancelled() => return,
        }
    };
    let mut backlog = false;
    while !token.is_cancelled() {
        // Idle: wait for one message without holding a permit. The poll is
        // short and not cancelled, so no message is left in a dropped inbox.
        let mut batch: Vec<Message> = Vec::new();
        if !backlog {
            batch = collect(
                consumer
                    .batch()
                    .max_messages(1)
                    .expires(IDLE_POLL)
                    .messages()
                    .await,
            )
            .await;
            if batch.is_empty() {
                continue;
            }
        }
        // Under load, loops wait in turn (the semaphore is fair) for their
        // weighted share of the concurrency, so queues are served in proportion
        // to their weights and each fetch is a batch; whatever else is free is
        // taken too (an idle queue lends its room). Measured: waiting for the
        // share beats waiting for one permit at a time (small fetches).
        let mut permits = tokio::select! {
            p = semaphore.clone().acquire_many_owned(share as u32) => match p { Ok(p) => p, Err(_) => break },
            () = token.cancelled() => { return_all(batch).await; break; }
        };
        let extra = semaphore.available_permits();
        if extra > 0
            && let Ok(more) = semaphore.clone().try_acquire_many_owned(extra as u32)
        {
            permits.merge(more);
        }
        if token.is_cancelled() {
            return_all(batch).await;
            break;
        }
        let want = permits.num_permits() - batch.len();
        if want > 0 {
            let more = collect(consumer.fetch().max_messages(want).messages().await).await;
            backlog = more.len() == want;
            batch.extend(more);
        }
        for message in batch {
            let Some(permit) = permits.split(1) else {
                break;
            };
            tasks.spawn(execute(shared.clone(), message, permit));
        }
    }
}

async fn collect<S, E, F>(batch: Result<S, E>) -> Vec<Message>
where
    S: futures::Stream<Item = Result<Message, F>> + Unpin,
    E: std::fmt::Display,
{
    match batch {
        Ok(stream) => stream.filter_map(|m| async move { m.ok() }).collect().await,
        Err(e) => {
            tracing::debug!(cause = %e, "fetch failed");
            tokio::time::sleep(Duration::from_millis(200)).await;
            Vec::new()
        }
    }
}

async fn return_all(batch: Vec<Message>) {
    for m in batch {
        let _ = m.ack_with(AckKind::Nak(None)).await;
    }
}

/// The task id: from the body, else `Nats-Msg-Id`, else the stream sequence.
fn task_id(task: &TaskMessage, message: &Message, seq: u64) -> String {
    if !task.id.is_empty() {
        return task.id.clone();
    }
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| format!("seq-{seq}"))
}

fn queue_of(subject: &str) -> String {
    subject
        .strip_prefix("bmw.async.")
        .and_then(|s| s.split('.').next())
        .unwrap_or("default")
        .to_owned()
}

async fn execute(shared: Arc<Shared>, message: Message, _permit: OwnedSemaphorePermit) {
    let rt = &shared.rt;
    let (attempt, seq) = match message.info() {
        Ok(info) => (info.delivered.max(1) as u32, info.stream_sequence),
        Err(_) => (1, 0),
    };
    let queue = queue_of(message.subject.as_str());
    let mut task: TaskMessage = match serde_json::from_slice(&message.payload) {
        Ok(t) => t,
        Err(e) => {
            let task = TaskMessage {
                id: format!("seq-{seq}"),
                kind: "unknown".into(),
                payload: json!(String::from_utf8_lossy(&message.payload)),
                options: Default::default(),
                enqueued_at: None,
                errors: vec![],
            };
            return outcome::archive(
                &shared.rt,
                &message,
                task,
                &queue,
                attempt,
                &format!("not a task message: {e}"),
            )
            .await;
        }
    };
    task.id = task_id(&task, &message, seq);
    let handler = match crate::task::Kind::parse(&task.kind)
        .ok()
        .and_then(|k| rt.registry.handler(&k))
    {
        Some(h) => h,
        None => {
            let error = format!(
                "kind `{}` is not registered on worker {}",
                task.kind, rt.worker_id
            );
            return outcome::archive(&shared.rt, &message, task, &queue, attempt, &error).await;
        }
    };
    let periodic = task.kind.starts_with("periodic:");
    if periodic && attempt == 1 {
        crate::metrics::periodic_enqueued(&task.kind);
        // When the server's scheduler stored this tick: its fire time.
        let fired_at = message.info().ok().map(|i| {
            let t = i.published;
            chrono::DateTime::from_timestamp(t.unix_timestamp(), t.nanosecond())
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        });
        rt.events
            .emit(
                "periodic",
                &task.kind,
                "enqueued",
                json!({"task_id": task.id, "queue": queue, "fired_at": fired_at.flatten()}),
            )
            .await;
    }
    let started = Instant::now();
    let outcome = run_attempt(&shared, &message, &task, &queue, attempt, handler).await;
    let seconds = started.elapsed().as_secs_f64();
    if periodic {
        let next = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_SCHEDULE_NEXT))
            .map(|v| v.as_str().to_owned());
        let label = match &outcome {
            Outcome::Done => "succeeded",
            Outcome::Failed(e) if e.skips_retry() || attempt > task.max_retry() => "archived",
            Outcome::Failed(_) => "retry",
            Outcome::Deleted => "deleted",
            Outcome::Shutdown => "interrupted",
        };
        rt.periodic.record_run(&task.kind, label, next).await;
    }
    match outcome {
        Outcome::Done => {
            // The event goes out before the ack on the same connection: if the
            // ack reaches the server, so did the event.
            rt.events
                .emit(
                    "async",
                    &task.kind,
                    "succeeded",
                    json!({"task_id": task.id, "queue": queue, "attempt": attempt}),
                )
                .await;
            let _ = message.ack().await;
            crate::metrics::async_processed(&task.kind, &queue, "succeeded", seconds);
            rt.stats.count_async(&queue, true);
            outcome::finish_record(
                rt,
                &task,
                &queue,
                attempt,
                attempt > 1 || seconds >= ACTIVE_RECORD_AFTER.as_secs_f64(),
            )
            .await;
        }
        Outcome::Deleted => {
            let _ = message.ack().await;
            let _ = rt.records.remove(&task.id).await;
            tracing::info!(task_id = task.id, "async task deleted while running");
        }
        Outcome::Shutdown => {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
        Outcome::Failed(error) => {
            crate::metrics::async_processed(&task.kind, &queue, "failed", seconds);
            rt.stats.count_async(&queue, false);
            rt.events.emit("async", &task.kind, "failed", json!({"task_id": task.id, "queue": queue, "attempt": attempt, "error": error.to_string()})).await;
            if error.skips_retry() || attempt > task.max_retry() {
                outcome::archive(
                    &shared.rt,
                    &message,
                    task,
                    &queue,
                    attempt,
                    &error.to_string(),
                )
                .await;
            } else {
                outcome::retry(rt, &message, &task, &queue, attempt, &error).await;
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
) -> Outcome {
    let rt = &shared.rt;
    let mut limit = task.options.timeout;
    if let Some(deadline) = task
        .options
        .deadline
        .as_deref()
        .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok())
    {
        match (deadline.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std() {
            Ok(left) => limit = Some(limit.map_or(left, |l| l.min(left))),
            Err(_) => return Outcome::Failed(TaskError::skip_retry("deadline exceeded")),
        }
    }
    let token = CancellationToken::new();
    if let Ok(mut r) = shared.running.lock() {
        if r.deleted.remove(&task.id) {
            return Outcome::Deleted;
        }
        r.tokens.insert(task.id.clone(), token.clone());
    }
    let ctx = TaskContext {
        task_id: task.id.clone(),
        kind: task.kind.clone(),
        queue: queue.to_owned(),
        attempt,
        max_retry: task.max_retry(),
        token: token.clone(),
    };
    let payload = task.payload.clone();
    let mut join = tokio::spawn(async move { handler.handle(ctx, &payload).await });
    let timeout = tokio::time::sleep(limit.unwrap_or(Duration::MAX / 4));
    tokio::pin!(timeout);
    let mut progress = tokio::time::interval_at(Instant::now() + rt.ack_wait / 3, rt.ack_wait / 3);
    let active_at = tokio::time::sleep(ACTIVE_RECORD_AFTER);
    tokio::pin!(active_at);
    let mut active_written = false;
    let result = loop {
        tokio::select! {
            r = &mut join => break r,
            () = &mut timeout => {
                token.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut join).await;
                join.abort();
                let what = if task.options.timeout.is_some_and(|t| Some(t) == limit) { "timeout" } else { "deadline exceeded" };
                break Ok(Err(TaskError::new(format!("{what} after {:?}", limit.unwrap_or_default()))));
            }
            _ = progress.tick() => { let _ = message.ack_with(AckKind::Progress).await; }
            () = &mut active_at, if !active_written => {
                active_written = true;
                let _ = rt.records.put(&outcome::record(task, queue, TaskState::Active, attempt, None), RECORD_TTL).await;
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
    match result {
        Ok(Ok(())) => Outcome::Done,
        Ok(Err(e))
            if token.is_cancelled()
                && !e.to_string().starts_with("timeout")
                && !e.to_string().starts_with("deadline") =>
        {
            Outcome::Shutdown
        }
        Ok(Err(e)) => Outcome::Failed(e),
        Err(e) if e.is_panic() => Outcome::Failed(TaskError::new(format!(
            "handler panicked: {}",
            panic_text(e)
        ))),
        Err(e) => Outcome::Failed(TaskError::new(format!("handler task failed: {e}"))),
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    let p = e.into_panic();
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
