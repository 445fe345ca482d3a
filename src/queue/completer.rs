//! [`Completer`]: acks successful attempts in batches, each batch after the
//! `succeeded` events that report it.
//!
//! Success is the hot path, so it does not cost an event per task: finished
//! tasks queue up while the previous batch is being sent, and each batch is
//! reported by one `succeeded` event per kind listing its tasks
//! (`{"count": n, "tasks": [{"task_id", "queue", "attempt"}, ...]}`), then
//! acked. Batches are as large as the load makes them (one task when idle,
//! up to [`MAX_BATCH`] under load), so nothing waits for a timer. The events
//! go out before the acks on the same connection: if an ack reached the
//! server, so did the event that reports it.

use std::collections::BTreeMap;

use async_nats::jetstream::Message;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::events::EventPublisher;

/// Most tasks in one batch (one event stays a few KiB).
const MAX_BATCH: usize = 256;

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

/// The handle tasks report success to; cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct Completer {
    tx: mpsc::Sender<Item>,
}

impl Completer {
    /// Starts the batching loop; it ends when every handle is dropped.
    pub(super) fn start(events: EventPublisher) -> Completer {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(run(rx, events));
        Completer { tx }
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

async fn run(mut rx: mpsc::Receiver<Item>, events: EventPublisher) {
    let mut items = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut items, MAX_BATCH).await > 0 {
        let mut by_kind: BTreeMap<&str, Vec<&Completion>> = BTreeMap::new();
        for item in &items {
            if let Item::Done(done) = item {
                by_kind.entry(done.kind.as_str()).or_default().push(done);
            }
        }
        for (kind, done) in by_kind {
            let tasks: Vec<_> = done
                .iter()
                .map(|d| json!({"task_id": d.task_id, "queue": d.queue, "attempt": d.attempt}))
                .collect();
            events
                .emit(
                    "async",
                    kind,
                    "succeeded",
                    json!({"count": tasks.len(), "tasks": tasks}),
                )
                .await;
        }
        for item in items.drain(..) {
            match item {
                Item::Done(done) => {
                    let _ = done.message.ack().await;
                }
                Item::Flush(tx) => {
                    let _ = tx.send(());
                }
            }
        }
    }
}
