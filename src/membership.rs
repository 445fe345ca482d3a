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

use async_nats::jetstream::{self, message::PublishMessage, stream::LastRawMessageErrorKind};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::QueueWeight;
use crate::nats::{NatsError, NatsErrorKind, names};

/// The longest the entry's removal at shutdown may take.
const REMOVE_WAIT: Duration = Duration::from_secs(1);
/// The longest one registration of a new lease may take before it is tried again.
const REGISTER_WAIT: Duration = Duration::from_secs(2);
/// The pause before a failed renewal is tried again (the deadline permitting).
const RENEW_RETRY_GAP: Duration = Duration::from_millis(250);

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
    /// The lease its daemon claims name (design-notes, 88); empty from a
    /// worker older than leases, whose claims expire with their own TTL.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lease: String,
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

/// This worker's right to hold daemon claims (design-notes, 88): the id its
/// claims name, and a token fired once the lease may lapse before it is
/// renewed, when every instance held under it must stop at once. A lapsed
/// lease is never renewed: the worker takes a new one with a new id, so the
/// claims that name the old one are free for any worker to take over.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Named by the worker entry and by every claim taken under the lease.
    pub id: Arc<str>,
    /// Fired when the lease is lost (not renewed in time, or replaced).
    pub lost: CancellationToken,
}

impl Lease {
    fn new() -> Lease {
        Lease {
            id: uuid::Uuid::new_v4().simple().to_string().into(),
            lost: CancellationToken::new(),
        }
    }

    /// Whether claims may still be taken and run under it.
    pub fn is_live(&self) -> bool {
        !self.lost.is_cancelled()
    }
}

/// Keeps this worker's entry, and with it its [`Lease`], alive.
#[derive(Debug)]
pub struct Membership {
    js: jetstream::Context,
    entry: WorkerEntry,
    ttl: Duration,
    stats: Arc<WorkerStats>,
    /// The entry's revision, which each renewal expects.
    revision: u64,
    /// When the last write that the server stored was sent: the entry
    /// expires no sooner than `ttl` after it.
    last_sent: Instant,
    lease: watch::Sender<Lease>,
    /// Where a refused renewal looks at what the bucket holds.
    leases: Leases,
}

/// Why a renewal failed.
enum Renewal {
    /// The entry is no longer ours (expired, deleted or overwritten).
    Gone,
    /// No answer or an error: the outcome is unknown.
    Failed(NatsError),
}

impl Membership {
    /// A membership for `worker_id`; `stats` are read at each renewal.
    pub fn new(
        js: jetstream::Context,
        leases: Leases,
        worker_id: &str,
        queues: Vec<String>,
        kinds: Vec<String>,
        ttl: Duration,
        stats: Arc<WorkerStats>,
    ) -> Self {
        let lease = Lease::new();
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
            lease: lease.id.to_string(),
        };
        Membership {
            js,
            entry,
            ttl,
            stats,
            revision: 0,
            last_sent: Instant::now(),
            lease: watch::channel(lease).0,
            leases,
        }
    }

    /// The entry with the worker's async capacity: its queues' weights and
    /// `--concurrency`.
    pub fn with_async_capacity(mut self, queues: &[QueueWeight], concurrency: usize) -> Self {
        self.entry.queue_weights = queues.iter().map(|q| (q.name.clone(), q.weight)).collect();
        self.entry.concurrency = concurrency;
        self
    }

    /// The current lease, and each new one after a lapse.
    pub fn lease(&self) -> watch::Receiver<Lease> {
        self.lease.subscribe()
    }

    /// Writes the entry under the current lease, whatever the bucket holds
    /// (so the worker counts, and its lease exists, before it claims anything).
    pub async fn register(&mut self) -> Result<(), NatsError> {
        let sent = Instant::now();
        self.revision = self.write(None).await?;
        self.last_sent = sent;
        Ok(())
    }

    /// The entry with this moment's numbers, published under `expected`
    /// (a compare-and-set on the entry's revision) or unconditionally.
    async fn write(&mut self, expected: Option<u64>) -> Result<u64, NatsError> {
        self.refresh();
        let body = crate::nats::to_json_bytes(&self.entry);
        let key = worker_key(&self.entry.worker_id);
        let mut publish = PublishMessage::build()
            .payload(body)
            .ttl(crate::nats::whole_seconds(self.ttl));
        if let Some(expected) = expected {
            publish = publish.expected_last_subject_sequence(expected);
        }
        let subject = names::kv_subject(names::BUCKET_WORKERS, &key);
        let ack = self.js.send_publish(subject, publish).await?.await?;
        Ok(ack.sequence)
    }

    fn refresh(&mut self) {
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
    }

    /// One renewal: a compare-and-set on the entry's revision. A refused one
    /// is looked at again (read from the stream's leader): a renewal that
    /// timed out may have been stored, which leaves the revision behind.
    async fn renew(&mut self) -> Result<(), Renewal> {
        let sent = Instant::now();
        let error = match self.write(Some(self.revision)).await {
            Ok(revision) => {
                self.revision = revision;
                self.last_sent = sent;
                return Ok(());
            }
            Err(e) => e,
        };
        if error.kind() != NatsErrorKind::Conflict {
            return Err(Renewal::Failed(error));
        }
        match self.stored_revision().await {
            Ok(Some(revision)) => {
                self.revision = revision;
                let sent = Instant::now();
                let revision = self
                    .write(Some(revision))
                    .await
                    .map_err(|e| match e.kind() {
                        NatsErrorKind::Conflict => Renewal::Gone,
                        _ => Renewal::Failed(e),
                    })?;
                self.revision = revision;
                self.last_sent = sent;
                Ok(())
            }
            Ok(None) => Err(Renewal::Gone),
            Err(e) => Err(Renewal::Failed(e)),
        }
    }

    /// The revision of our entry if the bucket holds it under our lease.
    async fn stored_revision(&self) -> Result<Option<u64>, NatsError> {
        let found = self.leases.of(&self.entry.worker_id).await?;
        Ok(found
            .filter(|(id, _)| *id == self.entry.lease)
            .map(|(_, rev)| rev))
    }

    /// Renews every `heartbeat` until `token` fires, then deletes the entry.
    /// Each renewal is a compare-and-set; a failed one is tried again soon,
    /// and if none succeeds before the lease's deadline (a margin of
    /// `min(heartbeat, ttl / 3)` before the entry may expire), the lease is
    /// lost: its instances stop, and once the old entry has surely expired
    /// the worker registers a new lease.
    pub async fn run(mut self, heartbeat: Duration, token: CancellationToken) {
        let margin = heartbeat.min(self.ttl / 3);
        let attempt_limit = (heartbeat / 2).max(Duration::from_millis(500));
        let mut next_beat = Instant::now() + heartbeat;
        let mut retry_at: Option<Instant> = None;
        loop {
            let deadline = self.last_sent + self.ttl - margin;
            let due = retry_at.unwrap_or(next_beat).min(deadline);
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = token.cancelled() => break,
            }
            let now = Instant::now();
            if now >= deadline {
                self.lapse("no renewal before the lease's deadline", &token)
                    .await;
                (next_beat, retry_at) = (Instant::now() + heartbeat, None);
                continue;
            }
            if now >= next_beat {
                next_beat = now.max(next_beat) + heartbeat;
            }
            let limit = deadline.min(now + attempt_limit);
            let renewed = tokio::select! {
                renewed = tokio::time::timeout_at(limit, self.renew()) => renewed,
                () = token.cancelled() => break,
            };
            retry_at = match renewed {
                Ok(Ok(())) => None,
                Ok(Err(Renewal::Gone)) => {
                    self.lapse("the entry is no longer this lease's", &token)
                        .await;
                    (next_beat, retry_at) = (Instant::now() + heartbeat, None);
                    continue;
                }
                Ok(Err(Renewal::Failed(e))) => {
                    tracing::warn!(cause = %e, "worker entry not renewed, will retry");
                    Some(Instant::now() + RENEW_RETRY_GAP)
                }
                Err(_) => {
                    tracing::warn!(waited = ?attempt_limit, "worker entry not renewed in time, will retry");
                    Some(Instant::now() + RENEW_RETRY_GAP)
                }
            };
        }
        self.remove().await;
    }

    /// The lease is lost: its instances are told to stop now; once the old
    /// entry has expired for sure (so that no other worker can start one
    /// of them while it still runs here), a new lease is registered.
    async fn lapse(&mut self, why: &str, token: &CancellationToken) {
        tracing::warn!(
            reason = why,
            "worker lease lapsed; stopping its daemon instances"
        );
        self.lease.borrow().lost.cancel();
        let expired = self.last_sent + self.ttl;
        tokio::select! {
            () = tokio::time::sleep_until(expired) => {}
            () = token.cancelled() => return,
        }
        let lease = Lease::new();
        self.entry.lease = lease.id.to_string();
        loop {
            let registered = tokio::select! {
                r = tokio::time::timeout(REGISTER_WAIT, self.register()) => r,
                () = token.cancelled() => return,
            };
            match registered {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    tracing::warn!(cause = %e, "new worker lease not registered, will retry")
                }
                Err(_) => tracing::warn!("new worker lease not registered in time, will retry"),
            }
            tokio::select! {
                () = tokio::time::sleep(RENEW_RETRY_GAP) => {}
                () = token.cancelled() => return,
            }
        }
        tracing::info!(lease = %lease.id, "worker registered a new lease");
        self.lease.send_replace(lease);
    }

    /// Deletes the entry at shutdown; bounded: with NATS gone the entry
    /// expires with its TTL instead.
    async fn remove(&self) {
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

/// Reads which lease a worker holds, from the workers stream's leader (a
/// direct get may answer from a replica behind it, which could miss a lease
/// just taken). Opening it costs no round trip.
#[derive(Debug, Clone)]
pub struct Leases {
    stream: jetstream::stream::Stream<()>,
}

impl Leases {
    /// The reader of the (provisioned) workers bucket.
    pub async fn open(js: &jetstream::Context) -> Result<Leases, NatsError> {
        let stream = js
            .get_stream_no_info(names::kv_stream(names::BUCKET_WORKERS))
            .await?;
        Ok(Leases { stream })
    }

    /// The lease `worker_id` holds now and its entry's revision; `None` if
    /// it holds none.
    pub async fn of(&self, worker_id: &str) -> Result<Option<(String, u64)>, NatsError> {
        let subject = names::kv_subject(names::BUCKET_WORKERS, &worker_key(worker_id));
        let message = match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // A delete, purge or expiry marker carries a header and no entry.
        let marked = message.headers.get("KV-Operation").is_some()
            || message.headers.get("Nats-Marker-Reason").is_some();
        if marked {
            return Ok(None);
        }
        let entry: Option<WorkerEntry> = serde_json::from_slice(&message.payload).ok();
        Ok(entry.map(|e| (e.lease, message.sequence)))
    }
}
