//! What the attempts of one worker share: the [`AttemptEnv`] the worker
//! builds (connection, handlers, records, events, back-off), the tasks
//! running now (for deletes and shutdown), and the completer. Lower than
//! both the runtime, which starts attempts, and the attempt itself, so
//! neither imports the other's internals.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::completer::Completer;
use super::handler::Handlers;
use super::record::RecordStore;
use super::retry::Backoff;
use crate::events::EventPublisher;
use crate::membership::WorkerStats;
use crate::nats::Nats;

/// Told how each periodic tick's attempt ended, so the periodic module can
/// show a kind's last run; implemented by `PeriodicStore`.
pub trait TickObserver: Send + Sync + fmt::Debug {
    /// Records a tick's run: `outcome` is `succeeded`, `retry`, `archived`,
    /// `deleted` or `interrupted`; `next_run_at` is the server's next fire time.
    fn record_run<'a>(
        &'a self,
        kind: &'a str,
        outcome: &'a str,
        next_run_at: Option<String>,
    ) -> BoxFuture<'a, ()>;
}

/// What every attempt needs from its worker.
#[derive(Debug)]
pub struct AttemptEnv {
    /// The connection.
    pub nats: Nats,
    /// Handlers by kind.
    pub handlers: Handlers,
    /// Task records.
    pub records: RecordStore,
    /// Events.
    pub events: EventPublisher,
    /// Retry delays.
    pub backoff: Backoff,
    /// The consumers' ack wait: long attempts send progress acks a third of it apart.
    pub ack_wait: Duration,
    /// This worker.
    pub worker_id: String,
    /// Counts for the worker entry.
    pub stats: Arc<WorkerStats>,
    /// Told about periodic ticks.
    pub ticks: Option<Arc<dyn TickObserver>>,
    /// The time limit of an attempt whose task gives neither `timeout` nor
    /// `deadline` (`None`: unlimited).
    pub default_timeout: Option<Duration>,
}

/// Tasks running on this worker, for deletes and shutdown.
#[derive(Debug, Default)]
pub(super) struct Running {
    /// Task id -> its attempt's token.
    pub(super) tokens: HashMap<String, CancellationToken>,
    /// Tasks deleted while running: not retried.
    pub(super) deleted: HashSet<String>,
}

/// What every task of the runtime shares.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) rt: AttemptEnv,
    pub(super) running: Mutex<Running>,
    pub(super) completer: Completer,
}
