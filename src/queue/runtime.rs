//! [`AsyncRuntime`]: runs the async tasks of the queues a worker listens on.
//!
//! One loop per queue shares a semaphore of `concurrency` permits. A loop
//! keeps a window of messages in hand or on the way (the `fetcher` module:
//! pipelined long-poll pulls sized by the pace of the tasks, no permit held
//! while idle), and starts each message once it has a permit: under load the
//! loops wait in turn on the fair semaphore for `weight` permits each, so
//! queues are served in proportion to their weights, and a queue takes
//! whatever nobody waits for. Each message runs in its own task (the
//! `attempt` module): the hot path is a share of one pull, one ack and a
//! share of one `succeeded` event (the `completer` module); records are
//! written only on failure, long runs or retention (see [`super::record`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message, consumer::pull};
use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::attempt;
use super::completer::Completer;
use super::fetcher::{Fetcher, Pace, Slot};
use super::shared::{AttemptEnv, Running, Shared};
use crate::config::QueueWeight;
use crate::nats::link::{Epoch, Link};
use crate::nats::{NatsError, names};

/// At shutdown, after the grace period: how long cancelled attempts get to
/// end, and then how long the last completions get to be sent.
const AFTER_GRACE: Duration = Duration::from_secs(2);

/// Runs the async tasks of a worker's queues: built by the worker.
#[derive(Debug)]
pub struct AsyncRuntime {
    /// What every attempt needs.
    pub env: AttemptEnv,
    /// The queues and their weights.
    pub queues: Vec<QueueWeight>,
    /// Tasks run at once, over all queues.
    pub concurrency: usize,
    /// Time running tasks get to finish on shutdown.
    pub grace: Duration,
}

/// Creates (or finds) the shared consumer of a queue. `ack_wait` applies
/// when this call creates it; an existing consumer keeps its own.
pub async fn queue_consumer(
    js: &jetstream::Context,
    queue: &str,
    ack_wait: Duration,
) -> Result<jetstream::consumer::PullConsumer, NatsError> {
    shared_consumer(
        js,
        names::STREAM_ASYNC,
        names::async_consumer(queue),
        names::async_queue_filters(queue),
        ack_wait,
    )
    .await
}

/// Creates (or finds) the shared consumer of the messages a queue's
/// schedules fire (`bmw.fired.<queue>.>` in `BMW_SCHEDULES`).
pub async fn fired_consumer(
    js: &jetstream::Context,
    queue: &str,
    ack_wait: Duration,
) -> Result<jetstream::consumer::PullConsumer, NatsError> {
    shared_consumer(
        js,
        names::STREAM_SCHEDULES,
        names::fired_consumer(queue),
        vec![names::fired_queue_filter(queue)],
        ack_wait,
    )
    .await
}

async fn shared_consumer(
    js: &jetstream::Context,
    stream: &str,
    name: String,
    filter_subjects: Vec<String>,
    ack_wait: Duration,
) -> Result<jetstream::consumer::PullConsumer, NatsError> {
    let stream = js.get_stream(stream).await?;
    stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subjects,
                ack_wait,
                max_deliver: -1,
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(NatsError::from)
}

impl AsyncRuntime {
    /// Runs until `token` fires; then stops fetching, lets running attempts
    /// finish for the grace period, and returns the rest to the queue.
    pub async fn run(self, token: CancellationToken) {
        let AsyncRuntime {
            env,
            queues,
            concurrency,
            grace,
        } = self;
        let shared = Arc::new(Shared {
            completer: Completer::start(
                env.nats.js.clone(),
                env.events.clone(),
                concurrency,
                env.ack_wait,
            ),
            rt: env,
            running: Mutex::new(Running::default()),
        });
        let semaphore = Arc::new(Semaphore::new(concurrency.max(1)));
        // The worker's entry counts the permits taken as attempts running.
        let _ = shared.rt.stats.async_permits.set(semaphore.clone());
        let tasks = TaskTracker::new();
        let loops = TaskTracker::new();
        loops.spawn(cancel_listener(shared.clone(), token.clone()));
        let total: u32 = queues.iter().map(|q| q.weight.max(1)).sum();
        for queue in queues.clone() {
            let share = (concurrency * queue.weight.max(1) as usize / total.max(1) as usize).max(1);
            loops.spawn(queue_loop(
                shared.clone(),
                queue,
                share,
                semaphore.clone(),
                tasks.clone(),
                token.clone(),
            ));
        }
        let names: Vec<String> = queues.into_iter().map(|q| q.name).collect();
        loops.spawn(pending_gauge(shared.clone(), names, token.clone()));
        token.cancelled().await;
        // The grace period runs from the signal and bounds every wait below
        // (plus `AFTER_GRACE`), NATS reachable or not: what is not handed
        // back is redelivered after its ack wait.
        let stop_by = Instant::now() + grace;
        loops.close();
        if tokio::time::timeout_at(stop_by, loops.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "queue loops still returning messages after the grace period; the rest are redelivered after their ack wait"
            );
        }
        tasks.close();
        if tokio::time::timeout_at(stop_by, tasks.wait())
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
            let _ = tokio::time::timeout(AFTER_GRACE, tasks.wait()).await;
        }
        if tokio::time::timeout(AFTER_GRACE, shared.completer.flush())
            .await
            .is_err()
        {
            tracing::warn!("async completions not flushed in time (NATS unreachable?)");
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
async fn pending_gauge(shared: Arc<Shared>, queues: Vec<String>, token: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let update = async {
                    for q in &queues {
                        let js = &shared.rt.nats.js;
                        let mut pending = None;
                        if let Ok(mut c) = queue_consumer(js, q, shared.rt.ack_wait).await
                            && let Ok(info) = c.info().await
                        {
                            pending = Some(info.num_pending);
                        }
                        if let Some(n) = pending
                            && let Ok(mut c) = fired_consumer(js, q, shared.rt.ack_wait).await
                            && let Ok(info) = c.info().await
                        {
                            pending = Some(n + info.num_pending);
                        }
                        if let Some(n) = pending {
                            crate::metrics::async_pending(q, n);
                        }
                    }
                };
                tokio::select! {
                    () = update => {}
                    () = token.cancelled() => return,
                }
            }
            () = token.cancelled() => return,
        }
    }
}

/// The first message in hand that came on the connection `now` (`None`:
/// disconnected); those before it, from a lost connection, are dropped and
/// counted in `dropped`.
fn take_current(
    held: &mut VecDeque<(Message, Instant, Option<Epoch>)>,
    now: Option<Epoch>,
    dropped: &mut usize,
) -> Option<Message> {
    while let Some((message, _, epoch)) = held.pop_front() {
        if now.is_some() && epoch == now {
            return Some(message);
        }
        *dropped += 1;
    }
    None
}

async fn queue_loop(
    shared: Arc<Shared>,
    queue: QueueWeight,
    share: usize,
    semaphore: Arc<Semaphore>,
    tasks: TaskTracker,
    token: CancellationToken,
) {
    let Some((consumer, fired)) = open_consumers(&shared, &queue.name, &token).await else {
        return;
    };
    // The consumer keeps the ack wait of the worker that created it, which may
    // not be ours: messages are kept alive at a third of the consumer's own.
    let keep_alive = (consumer.cached_info().config.ack_wait / 3).max(Duration::from_millis(100));
    let mut fetcher = Fetcher::new(consumer, fired);
    let link = Link::new(&shared.rt.nats.client);
    // Messages in hand, waiting for permits, with when they came (or were
    // last kept alive) and on which connection.
    let mut held: VecDeque<(Message, Instant, Option<Epoch>)> = VecDeque::new();
    let mut acquire: Option<BoxFuture<'static, Result<OwnedSemaphorePermit, AcquireError>>> = None;
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
                    held.push_back((message, Instant::now(), link.current()));
                }
            }
            () = pace.finished() => {}
            permits = async { acquire.as_mut().expect("guarded").await }, if acquire.is_some() => {
                acquire = None;
                let Ok(permits) = permits else { break };
                let started = Started { shared: &shared, tasks: &tasks, pace: &pace, keep_alive };
                start_held(permits, &semaphore, &mut held, link.current(), started, &queue.name);
            }
            _ = aging.tick() => {
                // Messages waiting long for a permit are kept from redelivery.
                for (message, since, _) in held.iter_mut().filter(|(_, t, _)| t.elapsed() >= keep_alive) {
                    let _ = message.ack_with(AckKind::Progress).await;
                    *since = Instant::now();
                }
            }
        }
    }
    drop(acquire);
    give_back(fetcher, held).await;
}

/// The queue's two shared consumers (its queue and its fired messages),
/// tried again every second until they open; `None` once `token` fires.
async fn open_consumers(
    shared: &Shared,
    queue: &str,
    token: &CancellationToken,
) -> Option<(
    async_nats::jetstream::consumer::PullConsumer,
    async_nats::jetstream::consumer::PullConsumer,
)> {
    let js = &shared.rt.nats.js;
    loop {
        let opened = async {
            let consumer = queue_consumer(js, queue, shared.rt.ack_wait).await?;
            Ok::<_, NatsError>((
                consumer,
                fired_consumer(js, queue, shared.rt.ack_wait).await?,
            ))
        };
        match opened.await {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::warn!(queue, cause = %e, "queue consumer unavailable, retrying")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = token.cancelled() => return None,
        }
    }
}

/// What starting a task needs from its queue loop.
struct Started<'a> {
    shared: &'a Arc<Shared>,
    tasks: &'a TaskTracker,
    pace: &'a Arc<Pace>,
    keep_alive: Duration,
}

/// Starts a task for each permit (and for whatever else is free, which
/// nobody waits for) from the messages in hand. Only messages of the
/// connection that is up `now` are started (see `Link`); the others are
/// delivered again after their ack wait.
fn start_held(
    mut permits: OwnedSemaphorePermit,
    semaphore: &Arc<Semaphore>,
    held: &mut VecDeque<(Message, Instant, Option<Epoch>)>,
    now: Option<Epoch>,
    started: Started<'_>,
    queue: &str,
) {
    let extra = held
        .len()
        .saturating_sub(permits.num_permits())
        .min(semaphore.available_permits());
    if extra > 0
        && let Ok(more) = semaphore.clone().try_acquire_many_owned(extra as u32)
    {
        permits.merge(more);
    }
    let mut dropped = 0usize;
    while let Some(permit) = permits.split(1) {
        let Some(message) = take_current(held, now, &mut dropped) else {
            break;
        };
        let slot = Slot::new(permit, started.pace, started.keep_alive);
        started.tasks.spawn(Box::pin(attempt::execute(
            started.shared.clone(),
            message,
            slot,
        )));
    }
    if dropped > 0 {
        tracing::warn!(
            queue,
            dropped,
            "connection to nats-server lost: messages in hand not started; they are delivered again after their ack wait"
        );
    }
}

/// Shutdown: what is in hand and what the open pulls still bring go back to
/// the queue at once (a `nak`), for another worker.
async fn give_back(mut fetcher: Fetcher, held: VecDeque<(Message, Instant, Option<Epoch>)>) {
    fetcher.close();
    for (message, _, _) in held {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
    while !fetcher.is_idle() {
        if let Some(message) = fetcher.next().await {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }
}
