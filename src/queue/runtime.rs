//! [`AsyncRuntime`]: runs the async tasks of the queues a worker listens on.
//!
//! One loop per queue shares a semaphore of `concurrency` permits. A loop
//! keeps a window of messages in hand or on the way (the `fetcher` module:
//! pipelined long-poll pulls sized by the pace of the tasks, no permit held
//! while idle), and starts each message once it has a permit: under load the
//! loops wait in turn on the fair semaphore for `weight` permits each, so
//! queues are served in proportion to their weights, and a queue takes
//! whatever nobody waits for. Each message runs in its own task: the hot path
//! is a share of one pull, one ack and a share of one `succeeded` event (the
//! `completer` module); records are written only on failure, long runs or
//! retention (see [`super::record`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message, consumer::pull};
use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt};
use serde_json::json;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::completer::{Completer, Completion};
use super::fetcher::{Fetcher, Pace};
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
    completer: Completer,
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
            completer: Completer::start(self.events.clone()),
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
        shared.completer.flush().await;
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
    let mut fetcher = Fetcher::new(consumer);
    // Messages in hand, waiting for permits, with when they came (or were
    // last kept alive).
    let mut held: VecDeque<(Message, Instant)> = VecDeque::new();
    let mut acquire: Option<BoxFuture<'static, Result<OwnedSemaphorePermit, AcquireError>>> = None;
    let keep_alive = shared.rt.ack_wait / 3;
    let mut aging = tokio::time::interval_at(Instant::now() + keep_alive, keep_alive);
    aging.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let chunk = queue.weight.max(1) as usize;
    // How fast this queue's tasks run; wakes the loop when one ends.
    let pace = Arc::new(Pace::new());
    loop {
        // The window follows the pace of the tasks (see `Pace::window`).
        // Sizing it by the free permits instead starved fast tasks (the
        // window shrank to one while a batch ran: 0.7x the throughput).
        fetcher.top_up(pace.window(share), held.len());
        if acquire.is_none() && !held.is_empty() {
            // Under load, loops wait in turn (the semaphore is fair) for
            // `weight` permits each, so queues are served in proportion to
            // their weights; an idle queue waits for none.
            let n = held.len().min(chunk) as u32;
            acquire = Some(semaphore.clone().acquire_many_owned(n).boxed());
        }
        tokio::select! {
            biased;
            () = token.cancelled() => break,
            fetched = fetcher.next() => {
                if let Some(message) = fetched {
                    held.push_back((message, Instant::now()));
                }
            }
            () = pace.finished() => {}
            permits = async { acquire.as_mut().expect("guarded").await }, if acquire.is_some() => {
                acquire = None;
                let Ok(mut permits) = permits else { break };
                // Whatever else is free is taken too (nobody waits for it).
                let extra = held
                    .len()
                    .saturating_sub(permits.num_permits())
                    .min(semaphore.available_permits());
                if extra > 0
                    && let Ok(more) = semaphore.clone().try_acquire_many_owned(extra as u32)
                {
                    permits.merge(more);
                }
                while let Some(permit) = permits.split(1) {
                    let Some((message, _)) = held.pop_front() else { break };
                    tasks.spawn(Box::pin(execute(shared.clone(), message, Slot::new(permit, &pace))));
                }
            }
            _ = aging.tick() => {
                // Messages waiting long for a permit are kept from redelivery.
                for (message, since) in held.iter_mut().filter(|(_, t)| t.elapsed() >= keep_alive) {
                    let _ = message.ack_with(AckKind::Progress).await;
                    *since = Instant::now();
                }
            }
        }
    }
    // Shutdown: return what is in hand and what the open pulls still bring.
    drop(acquire);
    fetcher.close();
    for (message, _) in held {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
    while !fetcher.is_idle() {
        if let Some(message) = fetcher.next().await {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }
}

/// A running task's permit; when the task ends, the permit goes back and
/// its queue's [`Pace`] learns how long it was held.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    pace: Arc<Pace>,
    since: Instant,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, pace: &Arc<Pace>) -> Self {
        Slot {
            permit: Some(permit),
            pace: pace.clone(),
            since: Instant::now(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.pace.record(self.since.elapsed());
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

async fn execute(shared: Arc<Shared>, message: Message, _slot: Slot) {
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
            let error = format!("not a task message: {e}");
            return Box::pin(outcome::archive(
                rt, &message, task, &queue, attempt, &error,
            ))
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
            return Box::pin(outcome::archive(
                rt, &message, task, &queue, attempt, &error,
            ))
            .await;
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
        let detail = json!({"task_id": task.id, "queue": queue, "fired_at": fired_at.flatten()});
        Box::pin(rt.events.emit("periodic", &task.kind, "enqueued", detail)).await;
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
        Box::pin(rt.periodic.record_run(&task.kind, label, next)).await;
    }
    // The hot path stays in this future; everything else is boxed, so the
    // future spawned per task stays small (it was 5 KiB, copied several
    // times by every spawn).
    if let Outcome::Done = outcome {
        let done = Completion {
            message,
            task_id: task.id.clone(),
            kind: task.kind.clone(),
            queue: queue.clone(),
            attempt,
        };
        if let Err(done) = shared.completer.try_complete(done) {
            Box::pin(shared.completer.complete(done)).await;
        }
        crate::metrics::async_processed(&task.kind, &queue, "succeeded", seconds);
        rt.stats.count_async(&queue, true);
        let left_record = attempt > 1 || seconds >= ACTIVE_RECORD_AFTER.as_secs_f64();
        if left_record || task.options.retention.is_some() {
            Box::pin(outcome::finish_record(
                rt,
                &task,
                &queue,
                attempt,
                left_record,
            ))
            .await;
        }
    } else {
        Box::pin(settle(rt, message, task, &queue, attempt, seconds, outcome)).await;
    }
}

/// After an attempt that did not succeed: delete, shutdown, retry or archive.
async fn settle(
    rt: &AsyncRuntime,
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
            crate::metrics::async_processed(&task.kind, queue, "failed", seconds);
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
    // One timer: the `active` record after a while, then progress acks.
    let keep_alive = rt.ack_wait / 3;
    let wake = tokio::time::sleep(ACTIVE_RECORD_AFTER.min(keep_alive));
    tokio::pin!(wake);
    let mut active_written = false;
    let result = loop {
        tokio::select! {
            biased;
            r = &mut work => break r,
            () = &mut timeout => {
                token.cancel();
                let finished = Box::pin(tokio::time::timeout(Duration::from_secs(1), &mut work)).await;
                if finished.is_err() {
                    tracing::warn!(task_id = task.id, "handler ignored its cancellation; dropped");
                }
                let what = if task.options.timeout.is_some_and(|t| Some(t) == limit) { "timeout" } else { "deadline exceeded" };
                break Ok(Err(TaskError::new(format!("{what} after {:?}", limit.unwrap_or_default()))));
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
        Err(panic) => Outcome::Failed(TaskError::new(format!(
            "handler panicked: {}",
            panic_text(panic)
        ))),
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
