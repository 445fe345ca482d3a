//! [`Worker`]: everything one worker process runs, under one cancellation
//! token: its membership entry, its share of the command consumer, and the
//! daemon runtime. Shutdown order matters: the runtime releases its claims
//! first, then the membership entry goes, so peers take over at once.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::command::{CommandConsumer, CommandHandler};
use crate::config::Config;
use crate::daemon::{
    ClaimStore, DaemonRuntime, RetryPolicy, SpecStore, maintainer::MaintainerSettings,
};
use crate::events::EventPublisher;
use crate::membership::{Membership, WorkerStats, new_worker_id};
use crate::nats::{Nats, names, provision};
use crate::periodic::PeriodicStore;
use crate::queue::{AsyncRuntime, Backoff, RecordStore};
use crate::registry::Registry;

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Streams or buckets could not be provisioned.
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
    /// NATS failed at start.
    #[error("worker start: {0}")]
    Nats(String),
}

/// One worker process's task machinery.
#[derive(Debug)]
pub struct Worker {
    nats: Nats,
    config: Config,
    registry: Arc<Registry>,
    worker_id: String,
}

impl Worker {
    /// A worker with a fresh id.
    pub fn new(nats: Nats, config: Config, registry: Arc<Registry>) -> Self {
        Worker {
            nats,
            config,
            registry,
            worker_id: new_worker_id(),
        }
    }

    /// This worker's id (`hostname-pid-uuid`).
    pub fn id(&self) -> &str {
        &self.worker_id
    }

    /// Provisions, registers and runs until `token` fires, then stops
    /// gracefully (claims released, worker entry removed).
    pub async fn run(self, token: CancellationToken) -> Result<(), WorkerError> {
        let nats_err = |e: &dyn std::fmt::Display| WorkerError::Nats(e.to_string());
        provision::provision(&self.nats.js, self.config.replicas).await?;
        let events = EventPublisher::new(self.nats.client.clone(), &self.worker_id);
        let specs = SpecStore::open(&self.nats.js)
            .await
            .map_err(|e| nats_err(&e))?;
        let claims = ClaimStore::open(&self.nats.js, self.config.claim_ttl)
            .await
            .map_err(|e| nats_err(&e))?;
        let workers = self
            .nats
            .js
            .get_key_value(names::BUCKET_WORKERS)
            .await
            .map_err(|e| nats_err(&e))?;
        let stats = Arc::new(WorkerStats::default());
        let mut membership = Membership::new(
            self.nats.js.clone(),
            &self.worker_id,
            self.config.queue_names(),
            self.registry.kinds(),
            self.config.claim_ttl,
            stats.clone(),
        );
        membership.register().await.map_err(|e| nats_err(&e))?;
        tracing::info!(worker_id = %self.worker_id, queues = ?self.config.queue_names(), concurrency = self.config.concurrency, "worker started");

        let tracker = TaskTracker::new();
        let membership_token = CancellationToken::new();
        tracker.spawn(membership.run(self.config.heartbeat, membership_token.clone()));
        let handler = CommandHandler::open(&self.nats, self.registry.clone())
            .await
            .map_err(|e| nats_err(&e))?;
        let periodic = PeriodicStore::open(&self.nats.js)
            .await
            .map_err(|e| nats_err(&e))?;
        if let Err(e) =
            crate::periodic::reconcile(&periodic, self.registry.declared_periodic()).await
        {
            tracing::error!(cause = %e, "declared periodic tasks not reconciled");
        }
        let records = RecordStore::open(&self.nats.js)
            .await
            .map_err(|e| nats_err(&e))?;
        let async_runtime = AsyncRuntime {
            nats: self.nats.clone(),
            registry: self.registry.clone(),
            records,
            events: events.clone(),
            queues: self.config.queues.clone(),
            concurrency: self.config.concurrency,
            backoff: Backoff {
                base: self.config.async_retry_base,
                max: self.config.async_retry_max,
            },
            grace: self.config.grace,
            ack_wait: self.config.async_ack_wait,
            worker_id: self.worker_id.clone(),
            stats: stats.clone(),
            periodic: periodic.clone(),
        };
        let async_token = token.child_token();
        tracker.spawn(async_runtime.run(async_token));
        tracker.spawn(
            CommandConsumer::new(self.nats.clone(), handler, events.clone())
                .run(token.child_token()),
        );
        let runtime = DaemonRuntime {
            registry: self.registry.clone(),
            specs,
            claims: Arc::new(claims),
            workers,
            events,
            settings: Arc::new(MaintainerSettings {
                worker_id: self.worker_id.clone(),
                heartbeat: self.config.heartbeat,
                claim_ttl: self.config.claim_ttl,
                grace: self.config.grace,
                policy: RetryPolicy {
                    base: self.config.retry_base,
                    threshold: self.config.retry_threshold,
                    max: self.config.retry_max,
                },
            }),
            queues: self.config.queue_names(),
            stats,
        };
        runtime.run(token.child_token()).await;
        membership_token.cancel();
        tracker.close();
        tracker.wait().await;
        // Make sure the releases and removal reach the server before we go.
        if let Err(e) = self.nats.client.flush().await {
            tracing::warn!(cause = %e, "final flush failed");
        }
        tracing::info!(worker_id = %self.worker_id, "worker stopped");
        Ok(())
    }
}
