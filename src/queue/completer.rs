//! [`Completer`]: acks successful attempts in batches, each batch after the
//! `succeeded` events that report it, and has the server confirm the acks.
//!
//! Success is the hot path, so it does not cost an event per task: finished
//! tasks queue up while the previous batch is being sent, and each batch is
//! reported by one `succeeded` event per kind listing its tasks
//! (`{"count": n, "tasks": [{"task_id", "queue", "attempt"}, ...]}`), then
//! acked. Batches are as large as the load makes them (one task when idle,
//! up to the worker's concurrency and at most [`MAX_BATCH`] under load), so
//! nothing waits for a timer. The events go out before the acks on the same
//! connection: if an ack reached the server, so did the event that reports it.
//!
//! Acks are confirmed: the last ack of each consumer in a batch is a
//! request, which the server answers once it has applied it, and a consumer
//! applies the acks it receives in order, so that answer confirms the acks
//! before it too (one round trip a batch, not one per task). A batch is sent
//! while the one before is being confirmed, and the next waits for that
//! confirmation; the queue in front holds one batch, and a task that finds it
//! full waits with its permit. So a worker has at most about four times its
//! concurrency of tasks in doubt (running, queued, or acked without a
//! confirmation) when the server crashes, all of which may run again, instead
//! of every ack written since the server last saved its state (fire and
//! forget, a crash ran 250-1,900 of 3,000 tasks twice: issue 11). A batch
//! whose confirmation does not come because the connection was lost is acked
//! again once connected, until confirmed or until its ack wait has passed.
//!
//! An ack again is not enough when the server itself restarted: it saves a
//! consumer's state at most ten times a second, a restarted server ignores
//! acks past the last delivery it saved, and it hands out again messages
//! whose acks it had confirmed in its last moments (measured: tasks acked
//! and confirmed half a second before a `kill -9` came back). So once
//! connected again, the messages of an unconfirmed batch are also deleted
//! from their stream by sequence, and the worker remembers the stream
//! sequences of its last [`RECENT`] successes: one handed back to this
//! worker is acked and not run again ([`Completer::succeeded_before`];
//! issue 22, part 3). One handed to another worker still runs again.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::hash::BuildHasher as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::events::EventPublisher;
use crate::nats::link::Link;

/// Most tasks in one batch (one event stays a few KiB).
const MAX_BATCH: usize = 256;
/// How long the confirmation of a batch's acks is waited for: a round trip
/// on a busy server takes milliseconds; after a reconnect, the acks are sent
/// again this often until the server's JetStream is back and answers.
const CONFIRM_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a lost connection is looked at before acking again.
const RECONNECT_POLL: Duration = Duration::from_millis(50);

/// A successful attempt, waiting for its ack.
pub(super) struct Completion {
    pub(super) message: Message,
    pub(super) task_id: String,
    pub(super) kind: String,
    pub(super) queue: String,
    pub(super) attempt: u32,
}

#[allow(
    clippy::large_enum_variant,
    reason = "nearly every item is a completion; flushes are rare"
)]
enum Item {
    Done(Completion),
    Flush(oneshot::Sender<()>),
}

/// How many of its last successes a worker remembers (by stream sequence):
/// more than the acks a server can forget in its last moments at full speed.
const RECENT: usize = 16_384;

/// The stream sequences of a worker's last [`RECENT`] successes.
#[derive(Debug, Default)]
struct Recent {
    order: VecDeque<Key>,
    set: HashSet<Key>,
    streams: std::hash::RandomState,
}

/// A stream (by a hash of its name) and a sequence in it.
type Key = (u64, u64);

impl Recent {
    fn key(&self, message: &Message) -> Option<Key> {
        let info = message.info().ok()?;
        Some((self.streams.hash_one(info.stream), info.stream_sequence))
    }

    fn insert(&mut self, message: &Message) {
        if let Some(key) = self.key(message) {
            self.insert_key(key);
        }
    }

    fn insert_key(&mut self, key: Key) {
        if self.set.insert(key) {
            self.order.push_back(key);
        }
        while self.order.len() > RECENT {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// [`Recent`], shared by the handle (which checks it) and the batcher.
type SharedRecent = Arc<Mutex<Recent>>;

/// The handle tasks report success to; cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct Completer {
    tx: mpsc::Sender<Item>,
    recent: SharedRecent,
}

/// What the batching loop needs.
#[derive(Clone)]
struct Batcher {
    client: async_nats::Client,
    js: jetstream::Context,
    link: Link,
    recent: SharedRecent,
    events: EventPublisher,
    /// Most tasks in one batch: the worker's concurrency, at most [`MAX_BATCH`].
    max_batch: usize,
    /// The consumers' ack wait: a batch unconfirmed this long is given up.
    ack_wait: Duration,
}

impl Completer {
    /// Starts the batching loop, with batches of at most `concurrency`
    /// tasks; it ends when every handle is dropped.
    pub(super) fn start(
        js: jetstream::Context,
        events: EventPublisher,
        concurrency: usize,
        ack_wait: Duration,
    ) -> Completer {
        let max_batch = concurrency.clamp(1, MAX_BATCH);
        // Room for one batch while two are sent and confirmed, and no more:
        // a task that finds it full waits, holding its permit.
        let (tx, rx) = mpsc::channel(max_batch);
        let recent = SharedRecent::default();
        let client = js.client();
        let batcher = Batcher {
            link: Link::new(&client),
            client,
            js,
            recent: recent.clone(),
            events,
            max_batch,
            ack_wait,
        };
        tokio::spawn(batcher.run(rx));
        Completer { tx, recent }
    }

    /// Whether `message` is one of this worker's last successes, handed
    /// out again by a restarted server: then it is to be acked, not run.
    pub(super) fn succeeded_before(&self, message: &Message) -> bool {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .key(message)
            .is_some_and(|key| recent.set.contains(&key))
    }

    /// Queues a success for its event and ack if there is room at once;
    /// hands it back otherwise (then [`Completer::complete`] waits for room).
    /// A plain call on the hot path keeps each task's future small.
    #[allow(
        clippy::result_large_err,
        reason = "the completion is handed back, not an error to propagate"
    )]
    pub(super) fn try_complete(&self, done: Completion) -> Result<(), Completion> {
        match self.tx.try_send(Item::Done(done)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Item::Done(done))) => Err(done),
            Err(mpsc::error::TrySendError::Closed(Item::Done(done))) => Err(done),
            Err(_) => Ok(()),
        }
    }

    /// Queues a success for its event and ack, waiting for room.
    pub(super) async fn complete(&self, done: Completion) {
        if let Err(mpsc::error::SendError(Item::Done(done))) = self.tx.send(Item::Done(done)).await
        {
            // The loop is gone (cannot happen while a handle lives): ack here.
            let _ = done.message.ack().await;
        }
    }

    /// Waits until everything queued before this call is acked.
    pub(super) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Item::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

impl Batcher {
    async fn run(self, mut rx: mpsc::Receiver<Item>) {
        let mut items = Vec::with_capacity(self.max_batch);
        // The batch before, still being confirmed: two batches are in doubt
        // at most, so the next one is sent while the last is confirmed.
        let mut previous: Option<JoinHandle<Vec<Item>>> = None;
        while rx.recv_many(&mut items, self.max_batch).await > 0 {
            self.remember(&items);
            self.report(&items).await;
            let flushing = items.iter().any(|i| matches!(i, Item::Flush(_)));
            let batch = std::mem::replace(&mut items, Vec::with_capacity(self.max_batch));
            let batcher = self.clone();
            let current = tokio::spawn(async move {
                let messages: Vec<&Message> = batch
                    .iter()
                    .filter_map(|item| match item {
                        Item::Done(done) => Some(&done.message),
                        Item::Flush(_) => None,
                    })
                    .collect();
                batcher.ack_confirmed(&messages).await;
                batch
            });
            if let Some(previous) = previous.take() {
                answer_flushes(previous.await);
            }
            if flushing {
                answer_flushes(current.await);
            } else {
                previous = Some(current);
            }
        }
        if let Some(previous) = previous {
            answer_flushes(previous.await);
        }
    }

    /// Sends the `succeeded` events of a batch, one per kind.
    async fn report(&self, items: &[Item]) {
        let mut by_kind: BTreeMap<&str, Vec<&Completion>> = BTreeMap::new();
        for item in items {
            if let Item::Done(done) = item {
                by_kind.entry(done.kind.as_str()).or_default().push(done);
            }
        }
        for (kind, done) in by_kind {
            let tasks: Vec<_> = done
                .iter()
                .map(|d| json!({"task_id": d.task_id, "queue": d.queue, "attempt": d.attempt}))
                .collect();
            self.events
                .emit(
                    "async",
                    kind,
                    "succeeded",
                    json!({"count": tasks.len(), "tasks": tasks}),
                )
                .await;
        }
    }

    /// Acks `messages` until the server confirms it applied them. When the
    /// confirmation does not come because the connection was lost, they are
    /// all acked again once connected, until their ack wait has passed; when
    /// it does not come on a connection still up (a slow server), the acks
    /// went out and are left at that.
    async fn ack_confirmed(&self, messages: &[&Message]) {
        if messages.is_empty() {
            return;
        }
        let give_up = Instant::now() + self.ack_wait;
        loop {
            let sent_on = self.link.current();
            let cause = match self.ack(messages).await {
                Ok(()) => return,
                Err(cause) => cause,
            };
            let mut now = self.link.current();
            while now.is_none() && Instant::now() < give_up {
                tokio::time::sleep(RECONNECT_POLL).await;
                now = self.link.current();
            }
            if now.is_some() && now == sent_on {
                return tracing::debug!(count = messages.len(), %cause, "acks sent, not confirmed");
            }
            if Instant::now() >= give_up {
                return tracing::warn!(
                    count = messages.len(),
                    %cause,
                    "acks of successful async tasks not confirmed within their ack wait; these tasks may run again"
                );
            }
            tracing::info!(count = messages.len(), %cause, "connection lost before the acks were confirmed; deleting the messages and acking again");
            self.delete(messages).await;
        }
    }

    /// Remembers the successes of a batch (see [`Recent`]).
    fn remember(&self, items: &[Item]) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        for item in items {
            if let Item::Done(done) = item {
                recent.insert(&done.message);
            }
        }
    }

    /// Deletes `messages` from their streams by sequence: a restarted server
    /// ignores acks past the deliveries it saved.
    async fn delete(&self, messages: &[&Message]) {
        let targets: Vec<(String, u64)> = messages
            .iter()
            .filter_map(|m| m.info().ok())
            .map(|info| (info.stream.to_owned(), info.stream_sequence))
            .collect();
        let deletes = targets.iter().map(|(stream, seq)| async move {
            let stream = self.js.get_stream_no_info(stream).await?;
            stream.delete_message(*seq).await?;
            Ok::<_, async_nats::Error>(())
        });
        let failed = futures::future::join_all(deletes)
            .await
            .into_iter()
            .filter(Result::is_err)
            .count();
        // A message already acked or deleted is not found: not an error here.
        tracing::debug!(
            count = targets.len(),
            failed,
            "messages of unconfirmed acks deleted"
        );
    }

    /// Sends the acks of `messages`, the last one of each consumer as a
    /// request, and waits for those answers. (Not `Message::double_ack`,
    /// which subscribes a fresh inbox per call and waits the JetStream
    /// timeout: these requests share the client's inbox and wait
    /// [`CONFIRM_TIMEOUT`].)
    async fn ack(&self, messages: &[&Message]) -> Result<(), async_nats::Error> {
        // The last message of each consumer in the batch.
        let mut last: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, message) in messages.iter().enumerate() {
            if let Ok(info) = message.info() {
                last.insert(info.consumer, i);
            }
        }
        let mut confirmations = Vec::with_capacity(last.len());
        for (i, message) in messages.iter().enumerate() {
            let confirmed = last.values().any(|&l| l == i);
            match (&message.reply, confirmed) {
                (Some(reply), true) => {
                    let request = async_nats::Request::new()
                        .payload(AckKind::Ack.into())
                        .timeout(Some(CONFIRM_TIMEOUT));
                    confirmations.push(self.client.send_request(reply.clone(), request));
                }
                _ => message.ack().await?,
            }
        }
        for answer in futures::future::join_all(confirmations).await {
            answer?;
        }
        Ok(())
    }
}

/// Tells the callers of [`Completer::flush`] in a confirmed batch (a batch
/// whose task panicked has nobody to tell: its flushes end unanswered).
fn answer_flushes(batch: Result<Vec<Item>, tokio::task::JoinError>) {
    for item in batch.into_iter().flatten() {
        if let Item::Flush(tx) = item {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_successes_keep_the_last_ones_only() {
        let mut recent = Recent::default();
        for seq in 0..(RECENT as u64 + 10) {
            recent.insert_key((7, seq));
        }
        // A repeat is not counted twice.
        recent.insert_key((7, RECENT as u64 + 9));
        assert_eq!(recent.order.len(), RECENT);
        assert_eq!(recent.set.len(), RECENT);
        assert!(!recent.set.contains(&(7, 9)), "the oldest are forgotten");
        assert!(recent.set.contains(&(7, 10)));
        assert!(recent.set.contains(&(7, RECENT as u64 + 9)));
        assert!(!recent.set.contains(&(8, 20)), "another stream's sequence");
    }
}
