//! [`Membership`]: this worker's entry in the `bmw_workers` bucket.
//!
//! The entry (host, pid, queues and weights, daemon tasks held and quota,
//! async attempts running and capacity, heartbeat time) is written with a per-key TTL
//! and renewed every heartbeat, so a dead worker disappears by itself; the
//! daemon runtime counts live workers from it to balance tasks, and the bridge
//! lists it at `GET /bmw/worker/`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::QueueWeight;
use crate::nats::{NatsError, names};

/// The longest the entry's removal at shutdown may take.
const REMOVE_WAIT: Duration = Duration::from_secs(1);

/// A worker as seen by everyone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerEntry {
    /// `hostname-pid-uuid`.
    pub worker_id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Start time (RFC 3339).
    pub started_at: String,
    /// bmw version.
    pub version: String,
    /// Queues it takes tasks from.
    pub queues: Vec<String>,
    /// Daemon instances it holds.
    pub running: usize,
    /// Kinds it can run (so a bridge built without them still accepts them).
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Async tasks succeeded since start, by queue.
    #[serde(default)]
    pub async_processed: BTreeMap<String, u64>,
    /// Async attempts failed since start, by queue.
    #[serde(default)]
    pub async_failed: BTreeMap<String, u64>,
    /// Each queue's weight: its share of `concurrency` under load.
    #[serde(default)]
    pub queue_weights: BTreeMap<String, u32>,
    /// Async attempts it runs at once at most (`--concurrency`).
    #[serde(default)]
    pub concurrency: usize,
    /// Async attempts running at the last heartbeat.
    #[serde(default)]
    pub async_active: usize,
    /// Daemon tasks it aims to hold at most at the last heartbeat: its
    /// balancing quota, summed over its queues (0 while no task is eligible).
    #[serde(default)]
    pub daemon_quota: usize,
    /// When the entry was last written (RFC 3339): its last heartbeat.
    #[serde(default)]
    pub heartbeat_at: String,
}

/// Live numbers of this worker, published with its entry every heartbeat.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Daemon instances held.
    pub daemon_running: AtomicUsize,
    /// Async tasks succeeded, by queue.
    pub async_processed: Mutex<BTreeMap<String, u64>>,
    /// Async attempts failed, by queue.
    pub async_failed: Mutex<BTreeMap<String, u64>>,
    /// The daemon balancing quota (summed over the worker's queues).
    pub daemon_quota: AtomicUsize,
    /// The async runtime's permits, one per attempt that may run at once
    /// (set when it starts): those taken are the attempts running.
    pub async_permits: OnceLock<Arc<Semaphore>>,
}

impl WorkerStats {
    /// Counts one async outcome.
    pub fn count_async(&self, queue: &str, ok: bool) {
        let map = if ok {
            &self.async_processed
        } else {
            &self.async_failed
        };
        if let Ok(mut map) = map.lock() {
            *map.entry(queue.to_owned()).or_default() += 1;
        }
    }
}

/// A new worker id: `hostname-pid-uuid_simple`.
pub fn new_worker_id() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    format!(
        "{}-{}-{}",
        host,
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The KV key of a worker id (host names may hold characters keys do not allow).
pub fn worker_key(worker_id: &str) -> String {
    worker_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Keeps this worker's entry alive.
#[derive(Debug)]
pub struct Membership {
    js: jetstream::Context,
    entry: WorkerEntry,
    ttl: Duration,
    stats: Arc<WorkerStats>,
}

impl Membership {
    /// A membership for `worker_id`; `stats` are read at each renewal.
    pub fn new(
        js: jetstream::Context,
        worker_id: &str,
        queues: Vec<String>,
        kinds: Vec<String>,
        ttl: Duration,
        stats: Arc<WorkerStats>,
    ) -> Self {
        let entry = WorkerEntry {
            worker_id: worker_id.to_owned(),
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            pid: std::process::id(),
            started_at: chrono::Utc::now().to_rfc3339(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            queues,
            running: 0,
            kinds,
            async_processed: BTreeMap::new(),
            async_failed: BTreeMap::new(),
            queue_weights: BTreeMap::new(),
            concurrency: 0,
            async_active: 0,
            daemon_quota: 0,
            heartbeat_at: String::new(),
        };
        Membership {
            js,
            entry,
            ttl,
            stats,
        }
    }

    /// The entry with the worker's async capacity: its queues' weights and
    /// `--concurrency`.
    pub fn with_async_capacity(mut self, queues: &[QueueWeight], concurrency: usize) -> Self {
        self.entry.queue_weights = queues.iter().map(|q| (q.name.clone(), q.weight)).collect();
        self.entry.concurrency = concurrency;
        self
    }

    /// Writes the entry once (so the worker counts before it claims anything).
    pub async fn register(&mut self) -> Result<(), NatsError> {
        self.entry.running = self.stats.daemon_running.load(Ordering::Relaxed);
        self.entry.daemon_quota = self.stats.daemon_quota.load(Ordering::Relaxed);
        self.entry.async_active = self.stats.async_permits.get().map_or(0, |permits| {
            self.entry
                .concurrency
                .saturating_sub(permits.available_permits())
        });
        self.entry.heartbeat_at = chrono::Utc::now().to_rfc3339();
        self.entry.async_processed = self
            .stats
            .async_processed
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        self.entry.async_failed = self
            .stats
            .async_failed
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let body = crate::nats::to_json_bytes(&self.entry);
        let key = worker_key(&self.entry.worker_id);
        crate::nats::put_with_ttl(&self.js, names::BUCKET_WORKERS, &key, body, self.ttl).await
    }

    /// Renews every `heartbeat` until `token` fires, then deletes the entry.
    pub async fn run(mut self, heartbeat: Duration, token: CancellationToken) {
        let mut tick = tokio::time::interval(heartbeat);
        loop {
            tokio::select! {
                _ = tick.tick() => tokio::select! {
                    renewed = self.register() => if let Err(e) = renewed {
                        tracing::warn!(cause = %e, "worker entry not renewed");
                    },
                    () = token.cancelled() => break,
                },
                () = token.cancelled() => break,
            }
        }
        // Bounded: with NATS gone the entry expires with its TTL instead.
        let remove = async {
            let kv = self.js.get_key_value(names::BUCKET_WORKERS).await?;
            kv.purge_with_ttl(worker_key(&self.entry.worker_id), self.ttl)
                .await
                .map_err(NatsError::from)
        };
        match tokio::time::timeout(REMOVE_WAIT, remove).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(cause = %e, "worker entry not removed; it expires after its TTL");
            }
            Err(_) => tracing::warn!("worker entry not removed in time; it expires after its TTL"),
        }
    }
}
