//! [`Worker`]: everything one worker process runs, under one cancellation
//! token: its membership entry, its share of the command consumer, the async
//! runtime and the daemon runtime. Shutdown order matters: the daemon runtime
//! releases its claims first, then the membership entry goes, so peers take
//! over at once. The streams and buckets must be provisioned already (the
//! process roles in `crate::service` do it once per process).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::command::{CommandConsumer, CommandHandler};
use crate::config::Config;
use crate::daemon::{
    ClaimError, ClaimStore, DaemonRuntime, RetryPolicy, maintainer::MaintainerSettings,
};
use crate::events::EventPublisher;
use crate::membership::{Leases, Membership, WorkerStats, new_worker_id};
use crate::nats::{Nats, NatsError};
use crate::ops::Operations;
use crate::queue::{AsyncRuntime, AttemptEnv, Backoff};
use crate::registry::Registry;

/// Time a stop may take beyond `--grace` for the daemon runtime, the worker
/// entry's removal and the async and command loops together: releasing the
/// claims is bounded by `maintainer::HANDOVER_WAIT` and the rest by this.
const STOP_SLACK: Duration = Duration::from_secs(3);
/// The last flush of the connection, after everything else stopped.
const FINAL_FLUSH_WAIT: Duration = Duration::from_secs(1);

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// NATS failed at start.
    #[error("worker start: {0}")]
    Nats(#[from] NatsError),
    /// The claims bucket could not be opened.
    #[error("worker start: {0}")]
    Claims(#[from] ClaimError),
}

/// One worker process's task machinery.
#[derive(Debug)]
pub struct Worker {
    nats: Nats,
    config: Config,
    registry: Arc<Registry>,
    ops: Option<Operations>,
    worker_id: String,
}

impl Worker {
    /// A worker with a fresh id; it opens its stores when it runs.
    pub fn new(nats: Nats, config: Config, registry: Arc<Registry>) -> Self {
        Worker {
            nats,
            config,
            registry,
            ops: None,
            worker_id: new_worker_id(),
        }
    }

    /// A worker sharing the stores a process opened already (`bmw run`).
    pub fn with_operations(nats: Nats, config: Config, ops: Operations) -> Self {
        Worker {
            nats,
            config,
            registry: ops.registry().clone(),
            ops: Some(ops),
            worker_id: new_worker_id(),
        }
    }

    /// This worker's id (`hostname-pid-uuid`).
    pub fn id(&self) -> &str {
        &self.worker_id
    }

    /// Registers and runs until `token` fires, then stops gracefully (claims
    /// released, worker entry removed).
    pub async fn run(self, token: CancellationToken) -> Result<(), WorkerError> {
        let Worker {
            nats,
            config,
            registry,
            ops,
            worker_id,
        } = self;
        let ops = match ops {
            Some(ops) => ops,
            None => Operations::open_with(&nats, registry.clone(), &config).await?,
        };
        let events = EventPublisher::new(nats.client.clone(), &worker_id);
        let leases = Leases::open(&nats.js).await?;
        let claims = ClaimStore::open(&nats.js, leases.clone(), config.claim_ttl).await?;
        let stats = Arc::new(WorkerStats::default());
        let mut membership = Membership::new(
            nats.js.clone(),
            leases,
            &worker_id,
            config.queue_names(),
            registry.kinds(),
            config.claim_ttl,
            stats.clone(),
        )
        .with_async_capacity(&config.queues, config.concurrency);
        membership.register().await?;
        tracing::info!(worker_id = %worker_id, queues = ?config.queue_names(), concurrency = config.concurrency, "worker started");
        for kind in registry.kinds() {
            crate::metrics::task_registered(&kind);
        }

        let tracker = TaskTracker::new();
        let membership_token = CancellationToken::new();
        let lease = membership.lease();
        tracker.spawn(membership.run(config.heartbeat, membership_token.clone()));
        let periodic = ops.periodic().store().clone();
        if let Err(e) = crate::periodic::reconcile(&periodic, registry.declared_periodic()).await {
            tracing::error!(cause = %e, "declared periodic tasks not reconciled");
        }
        let async_runtime = async_runtime(
            &nats, &config, &registry, &ops, &events, &worker_id, &stats, periodic,
        );
        tracker.spawn(async_runtime.run(token.child_token()));
        tracker.spawn(watch_storage(nats.js.clone(), token.child_token()));
        let handler = CommandHandler::new(ops.clone(), nats.client.clone(), events.clone());
        tracker.spawn(CommandConsumer::new(nats.clone(), handler).run(token.child_token()));
        let runtime = daemon_runtime(
            &nats, &config, &registry, &ops, events, &worker_id, stats, claims, lease,
        );
        run_then_stop(&nats, &config, runtime, tracker, membership_token, &token).await;
        tracing::info!(worker_id = %worker_id, "worker stopped");
        Ok(())
    }
}

/// The async runtime of a worker, from its settings.
#[allow(clippy::too_many_arguments)]
fn async_runtime(
    nats: &Nats,
    config: &Config,
    registry: &Registry,
    ops: &Operations,
    events: &EventPublisher,
    worker_id: &str,
    stats: &Arc<WorkerStats>,
    periodic: crate::periodic::PeriodicStore,
) -> AsyncRuntime {
    AsyncRuntime {
        env: AttemptEnv {
            nats: nats.clone(),
            handlers: registry.handlers().clone(),
            records: ops.queue().records().clone(),
            events: events.clone(),
            backoff: Backoff {
                base: config.async_retry_base,
                max: config.async_retry_max,
            },
            ack_wait: config.async_ack_wait,
            worker_id: worker_id.to_owned(),
            stats: stats.clone(),
            ticks: Some(Arc::new(periodic)),
            default_timeout: (!config.async_default_timeout.is_zero())
                .then_some(config.async_default_timeout),
        },
        queues: config.queues.clone(),
        concurrency: config.concurrency,
        grace: config.grace,
    }
}

/// The daemon runtime of a worker, from its settings.
#[allow(clippy::too_many_arguments)]
fn daemon_runtime(
    nats: &Nats,
    config: &Config,
    registry: &Registry,
    ops: &Operations,
    events: EventPublisher,
    worker_id: &str,
    stats: Arc<WorkerStats>,
    claims: ClaimStore,
    lease: tokio::sync::watch::Receiver<crate::membership::Lease>,
) -> DaemonRuntime {
    DaemonRuntime {
        operators: registry.operators().clone(),
        specs: ops.daemon().specs().clone(),
        claims: Arc::new(claims),
        workers: ops.workers().clone(),
        events,
        settings: Arc::new(MaintainerSettings {
            worker_id: worker_id.to_owned(),
            heartbeat: config.heartbeat,
            claim_ttl: config.claim_ttl,
            grace: config.grace,
            policy: RetryPolicy {
                base: config.retry_base,
                threshold: config.retry_threshold,
                max: config.retry_max,
            },
        }),
        queues: config.queue_names(),
        stats,
        connections: nats.connections.clone(),
        link: crate::nats::link::Link::new(&nats.client),
        resync_every: crate::daemon::runtime::RESYNC_EVERY,
        lease,
    }
}

/// Runs the daemon runtime until `token` fires, then stops the worker:
/// every step bounded by one deadline, taken when the token fires. With
/// NATS gone, what cannot be released or removed expires with its TTL, and
/// unacknowledged async tasks are redelivered after their ack wait.
async fn run_then_stop(
    nats: &Nats,
    config: &Config,
    runtime: DaemonRuntime,
    tracker: TaskTracker,
    membership_token: CancellationToken,
    token: &CancellationToken,
) {
    let daemons = runtime.run(token.child_token());
    tokio::pin!(daemons);
    let daemons_done = tokio::select! {
        () = &mut daemons => true,
        () = token.cancelled() => false,
    };
    let stop_by = Instant::now() + config.grace + STOP_SLACK;
    if !daemons_done && tokio::time::timeout_at(stop_by, daemons).await.is_err() {
        tracing::warn!("daemon runtime not stopped in time; its claims expire with their TTL");
    }
    membership_token.cancel();
    tracker.close();
    if tokio::time::timeout_at(stop_by, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("worker tasks not stopped in time (NATS unreachable?); leaving them");
    }
    // Make sure the releases and removal reach the server before we go.
    match tokio::time::timeout(FINAL_FLUSH_WAIT, nats.client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(cause = %e, "final flush failed"),
        Err(_) => tracing::warn!("final flush timed out; NATS unreachable"),
    }
}

/// Sets the storage gauges every `storage::WATCH_EVERY` until `token` fires, and
/// warns once each time a stream comes near full.
async fn watch_storage(js: async_nats::jetstream::Context, token: CancellationToken) {
    let mut warned = std::collections::HashSet::new();
    loop {
        match crate::nats::storage::usage(&js).await {
            Ok(all) => {
                for stream in all {
                    crate::metrics::storage_used(&stream.stream, stream.used_ratio, stream.bytes);
                    if stream.near_full && warned.insert(stream.stream.clone()) {
                        tracing::warn!(
                            stream = %stream.stream,
                            bytes = stream.bytes,
                            max_bytes = stream.max_bytes,
                            messages = stream.messages,
                            max_messages = stream.max_messages,
                            when_full = stream.when_full,
                            "a stream is near its storage limit (--storage-max-bytes, bmw provision)"
                        );
                    } else if !stream.near_full {
                        warned.remove(&stream.stream);
                    }
                }
            }
            Err(e) => tracing::debug!(cause = %e, "storage not read"),
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(crate::nats::storage::WATCH_EVERY) => {}
        }
    }
}
