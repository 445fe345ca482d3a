//! [`DaemonRuntime`]: decides which daemon tasks this worker holds.
//!
//! It follows three buckets with `watch_with_history` (specs, claims, workers),
//! keeps their current state in memory, and after each change (debounced)
//! asks the `balancer` what to claim or release. Claims are
//! acquired concurrently (compare-and-set, so exactly one worker wins); each
//! won claim gets a `Maintainer`. Expired claims arrive as `Purge` entries,
//! so take-over after a crash is driven by events, not by polling.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Entry, Operation};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::balancer::{self, View};
use super::claim::{Claim, ClaimError, ClaimStore};
use super::maintainer::{Control, Exit, Maintainer, MaintainerSettings};
use super::spec::{DaemonSpec, SpecStore};
use crate::events::EventPublisher;
use crate::membership::{WorkerEntry, WorkerStats};
use crate::registry::Registry;

/// Acquisitions in flight at once (each is one read and one write).
const MAX_ACQUIRING: usize = 512;
/// How often a pending change is acted on.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Everything the runtime needs, built by the worker.
#[derive(Debug)]
pub struct DaemonRuntime {
    pub(crate) registry: Arc<Registry>,
    pub(crate) specs: SpecStore,
    pub(crate) claims: ClaimStore,
    pub(crate) workers: kv::Store,
    pub(crate) events: EventPublisher,
    pub(crate) settings: Arc<MaintainerSettings>,
    pub(crate) queues: Vec<String>,
    /// Live numbers (held instances), read by the membership heartbeat.
    pub(crate) stats: Arc<WorkerStats>,
}

struct Held {
    control: mpsc::UnboundedSender<Control>,
    generation: u64,
    releasing: bool,
}

#[derive(Default)]
struct State {
    specs: HashMap<String, DaemonSpec>,
    /// Held claims only, by key.
    claims: HashMap<String, Claim>,
    /// Specs with no held claim, and since when.
    free_since: HashMap<String, Instant>,
    workers: HashMap<String, WorkerEntry>,
    held: HashMap<String, Held>,
    acquiring: HashSet<String>,
    synced: [bool; 3],
}

type Acquired = (String, Option<String>, Result<(Claim, u64), ClaimError>);

impl DaemonRuntime {
    /// Runs until `token` fires, then releases every held task (waiting up to
    /// the grace period for the operators to stop).
    pub async fn run(self, token: CancellationToken) {
        let mut state = State::default();
        let mut watches = [
            Watcher::new(self.specs.kv().clone()),
            Watcher::new(self.claims.kv().clone()),
            Watcher::new(self.workers.clone()),
        ];
        for (i, w) in watches.iter_mut().enumerate() {
            state.synced[i] = w.start().await;
        }
        let mut maintainers: JoinSet<(String, Exit)> = JoinSet::new();
        let mut acquisitions: JoinSet<Acquired> = JoinSet::new();
        let mut debounce = tokio::time::interval(DEBOUNCE);
        let mut forced = tokio::time::interval(self.settings.heartbeat);
        let mut dirty = true;
        let [specs_w, claims_w, workers_w] = &mut watches;
        loop {
            tokio::select! {
                entry = specs_w.next() => { dirty = true; self.on_spec(&mut state, entry) }
                entry = claims_w.next() => { dirty = true; on_claim(&mut state, entry) }
                entry = workers_w.next() => { dirty = true; on_worker(&mut state, entry) }
                Some(done) = acquisitions.join_next(), if !acquisitions.is_empty() => {
                    dirty = true;
                    if let Ok(acquired) = done {
                        self.on_acquired(&mut state, acquired, &mut maintainers, &token);
                    }
                }
                Some(done) = maintainers.join_next(), if !maintainers.is_empty() => {
                    dirty = true;
                    if let Ok((key, exit)) = done {
                        state.held.remove(&key);
                        tracing::debug!(key, ?exit, "maintainer ended");
                    }
                    self.stats.daemon_running.store(state.held.len(), Ordering::Relaxed);
                }
                _ = debounce.tick() => {
                    if dirty {
                        dirty = false;
                        self.reconcile(&mut state, &mut acquisitions);
                    }
                }
                _ = forced.tick() => dirty = true,
                () = token.cancelled() => break,
            }
            for (i, w) in [&*specs_w, &*claims_w, &*workers_w].iter().enumerate() {
                state.synced[i] = w.synced;
            }
        }
        // Maintainers see the same token and release their claims.
        let grace = self.settings.grace + Duration::from_secs(2);
        if tokio::time::timeout(grace, async {
            while maintainers.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!(
                left = maintainers.len(),
                "daemon instances still stopping after the grace period"
            );
        }
        acquisitions.abort_all();
        self.stats.daemon_running.store(0, Ordering::Relaxed);
    }

    fn on_spec(&self, state: &mut State, entry: Option<Entry>) {
        let Some(entry) = entry else { return };
        let key = entry.key.clone();
        let spec = (entry.operation == Operation::Put)
            .then(|| serde_json::from_slice::<DaemonSpec>(&entry.value).ok())
            .flatten();
        match spec {
            Some(spec) => {
                if let Some(held) = state.held.get_mut(&key)
                    && held.generation != spec.generation
                    && !held.releasing
                {
                    held.generation = spec.generation;
                    let _ = held.control.send(Control::Reload(Box::new(spec.clone())));
                }
                if !state.claims.contains_key(&key) {
                    state
                        .free_since
                        .entry(key.clone())
                        .or_insert_with(Instant::now);
                }
                state.specs.insert(key, spec);
            }
            None => {
                state.specs.remove(&key);
                state.free_since.remove(&key);
                if let Some(held) = state.held.get_mut(&key) {
                    held.releasing = true;
                    let _ = held.control.send(Control::Remove);
                }
            }
        }
    }

    fn eligible(&self, spec: &DaemonSpec) -> bool {
        self.queues.iter().any(|q| q == spec.options.queue())
            && self.registry.is_registered(&spec.kind)
    }

    fn reconcile(&self, state: &mut State, acquisitions: &mut JoinSet<Acquired>) {
        if !state.synced.iter().all(|s| *s) {
            return;
        }
        let mut to_claim = Vec::new();
        let mut to_release = Vec::new();
        for queue in &self.queues {
            let (claim, release) = self.plan_queue(state, queue);
            to_claim.extend(claim);
            to_release.extend(release);
        }
        let budget = MAX_ACQUIRING.saturating_sub(state.acquiring.len());
        for key in to_claim.into_iter().take(budget) {
            self.spawn_acquire(state, key, acquisitions);
        }
        for key in to_release {
            if let Some(held) = state.held.get_mut(&key) {
                tracing::info!(key, "releasing a daemon task to rebalance");
                held.releasing = true;
                let _ = held.control.send(Control::Release);
            }
        }
    }

    /// Balances one queue among the live workers that listen on it: which free
    /// tasks to claim and which held ones to release.
    fn plan_queue(&self, state: &State, queue: &str) -> (Vec<String>, Vec<String>) {
        let in_queue = |key: &str| {
            state
                .specs
                .get(key)
                .is_some_and(|s| s.options.queue() == queue && self.eligible(s))
        };
        let eligible = state.specs.keys().filter(|k| in_queue(k)).count();
        if eligible == 0 {
            return (Vec::new(), Vec::new());
        }
        let me = self.settings.worker_id.as_str();
        let mut loads: HashMap<&str, usize> = state
            .workers
            .values()
            .filter(|w| w.worker_id != me && w.queues.iter().any(|q| q == queue))
            .map(|w| (w.worker_id.as_str(), 0))
            .collect();
        for (key, claim) in &state.claims {
            if let Some(n) = loads.get_mut(claim.worker_id.as_str())
                && in_queue(key)
            {
                *n += 1;
            }
        }
        let now = Instant::now();
        let (mut long, mut fresh) = (Vec::new(), Vec::new());
        for (key, since) in &state.free_since {
            if in_queue(key) && !state.held.contains_key(key) && !state.acquiring.contains(key) {
                let list = if now.duration_since(*since) > self.settings.heartbeat {
                    &mut long
                } else {
                    &mut fresh
                };
                list.push(key.clone());
            }
        }
        let held: Vec<&String> = state
            .held
            .iter()
            .filter(|(k, h)| !h.releasing && in_queue(k))
            .map(|(k, _)| k)
            .collect();
        let mine = held.len() + state.acquiring.iter().filter(|k| in_queue(k)).count();
        let peer_loads: Vec<usize> = loads.values().copied().collect();
        let plan = balancer::plan(&View {
            eligible,
            peers: loads.len() + 1,
            mine,
            peer_loads: &peer_loads,
            free_fresh: fresh.len(),
            free_long: long.len(),
        });
        let claim = long
            .into_iter()
            .take(plan.claim_long)
            .chain(fresh.into_iter().take(plan.claim_fresh))
            .collect();
        let release = held.into_iter().take(plan.release).cloned().collect();
        (claim, release)
    }

    fn spawn_acquire(&self, state: &mut State, key: String, acquisitions: &mut JoinSet<Acquired>) {
        let Some(spec) = state.specs.get(&key) else {
            return;
        };
        state.acquiring.insert(key.clone());
        let (claims, uni_id, generation) =
            (self.claims.clone(), spec.uni_id.clone(), spec.generation);
        let worker_id = self.settings.worker_id.clone();
        let previous = state.claims.get(&key).map(|c| c.worker_id.clone());
        acquisitions.spawn(async move {
            let result = claims.acquire(&key, &uni_id, &worker_id, generation).await;
            (key, previous, result)
        });
    }

    fn on_acquired(
        &self,
        state: &mut State,
        acquired: Acquired,
        maintainers: &mut JoinSet<(String, Exit)>,
        token: &CancellationToken,
    ) {
        let (key, previous, result) = acquired;
        state.acquiring.remove(&key);
        let (mut claim, revision) = match result {
            Ok(won) => won,
            Err(ClaimError::AlreadyHeld(_)) => return,
            Err(e) => return tracing::warn!(key, cause = %e, "claim not acquired"),
        };
        let Some(spec) = state.specs.get(&key).cloned() else {
            // Deleted while we were acquiring: drop the claim at once.
            let claims = self.claims.clone();
            tokio::spawn(async move { claims.remove(&key, revision).await });
            return;
        };
        if let Some(from) = previous.filter(|p| p != &self.settings.worker_id) {
            let (events, kind) = (self.events.clone(), spec.kind.to_string());
            let detail = json!({"uni_id": spec.uni_id, "from": from});
            tokio::spawn(async move { events.emit("daemon", &kind, "moved", detail).await });
        }
        let operator = match self.registry.operator(&spec.kind) {
            Some(Ok(op)) => op,
            Some(Err(e)) => {
                return tracing::error!(kind = %spec.kind, cause = %e, "operator factory failed");
            }
            None => return,
        };
        claim.generation = spec.generation;
        let (tx, rx) = mpsc::unbounded_channel();
        state.held.insert(
            key.clone(),
            Held {
                control: tx,
                generation: spec.generation,
                releasing: false,
            },
        );
        state.free_since.remove(&key);
        self.stats
            .daemon_running
            .store(state.held.len(), Ordering::Relaxed);
        let maintainer = Maintainer {
            key,
            spec,
            operator,
            claims: self.claims.clone(),
            claim,
            revision,
            settings: self.settings.clone(),
            events: self.events.clone(),
            control: rx,
        };
        maintainers.spawn(maintainer.run(token.child_token()));
    }
}

fn on_claim(state: &mut State, entry: Option<Entry>) {
    let Some(entry) = entry else { return };
    let claim = (entry.operation == Operation::Put)
        .then(|| serde_json::from_slice::<Claim>(&entry.value).ok())
        .flatten()
        .filter(Claim::is_held);
    match claim {
        Some(claim) => {
            state.free_since.remove(&entry.key);
            state.claims.insert(entry.key, claim);
        }
        None => {
            state.claims.remove(&entry.key);
            if state.specs.contains_key(&entry.key) {
                state
                    .free_since
                    .entry(entry.key)
                    .or_insert_with(Instant::now);
            }
        }
    }
}

fn on_worker(state: &mut State, entry: Option<Entry>) {
    let Some(entry) = entry else { return };
    let worker = (entry.operation == Operation::Put)
        .then(|| serde_json::from_slice::<WorkerEntry>(&entry.value).ok())
        .flatten();
    match worker {
        Some(w) => state.workers.insert(entry.key, w),
        None => state.workers.remove(&entry.key),
    };
}

/// A `watch_with_history` that survives errors and re-creates itself if the
/// stream ends (e.g. after a server restart).
struct Watcher {
    kv: kv::Store,
    watch: Option<kv::Watch>,
    synced: bool,
}

impl Watcher {
    fn new(kv: kv::Store) -> Self {
        Watcher {
            kv,
            watch: None,
            synced: false,
        }
    }

    /// Opens the watch; returns whether the bucket was empty (already synced).
    async fn start(&mut self) -> bool {
        match self.kv.watch_with_history(">").await {
            Ok(w) => self.watch = Some(w),
            Err(e) => tracing::warn!(cause = %e, "cannot watch bucket, will retry"),
        }
        self.synced = matches!(crate::nats::bucket_is_empty(&self.kv).await, Ok(true));
        self.synced
    }

    /// The next entry; `None` after an error (the caller just loops).
    async fn next(&mut self) -> Option<Entry> {
        let Some(watch) = self.watch.as_mut() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.start().await;
            return None;
        };
        match watch.next().await {
            Some(Ok(entry)) => {
                if entry.delta == 0 {
                    self.synced = true;
                }
                Some(entry)
            }
            Some(Err(e)) => {
                tracing::warn!(cause = %e, "bucket watch error");
                None
            }
            None => {
                tracing::warn!("bucket watch ended; re-creating it");
                self.watch = None;
                None
            }
        }
    }
}
