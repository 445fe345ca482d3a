//! [`DaemonRuntime`]: decides which daemon tasks this worker holds.
//!
//! It follows three buckets with `watch_with_history` (specs, claims, workers),
//! keeps their current state in memory (`view`), and after each change
//! (debounced) tallies each queue and asks the `balancer` what to claim or
//! release (`plan`). Claims are
//! acquired concurrently (compare-and-set, so exactly one worker wins); each
//! won claim gets a `Maintainer`. Expired claims arrive as `Purge` entries,
//! so take-over after a crash is driven by events, not by polling. Each watch
//! is restarted from its bucket on every reconnect, every resync period, and
//! when it errs (`watch.rs`); nothing is reconciled until all three have
//! replayed on the connection that is still up (`nats::link`), and what
//! the replay no longer has is dropped (a deleted spec stops its instance
//! here). A maintainer task that panics is forgotten and
//! its claim freed.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Entry, Operation};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::claim::{Claim, ClaimError, ClaimStore};
use super::maintainer::{Control, Exit, Maintainer, MaintainerSettings, control_channel};
use super::spec::{DaemonSpec, SpecStore};
use super::watch::Watcher;

mod handback;
mod plan;
mod view;

use crate::events::EventPublisher;
use crate::membership::{Lease, WorkerStats};
use crate::nats::link::{Epoch, Link};
use view::{Free, Held, Key, State, on_claim, on_worker, prune_claims, spec_gone};

/// Acquisitions in flight at once (each is one read and one write).
const MAX_ACQUIRING: usize = 512;
/// How often a pending change is acted on, at least.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often every watched bucket is re-read in full (a safety net: watches
/// are also restarted on every reconnect and when they err).
pub(crate) const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// Everything the runtime needs, built by the worker.
#[derive(Debug)]
pub struct DaemonRuntime {
    pub(crate) operators: super::Operators,
    pub(crate) specs: SpecStore,
    pub(crate) claims: Arc<ClaimStore>,
    pub(crate) workers: kv::Store,
    pub(crate) events: EventPublisher,
    pub(crate) settings: Arc<MaintainerSettings>,
    pub(crate) queues: Vec<String>,
    /// Live numbers (held instances), read by the membership heartbeat.
    pub(crate) stats: Arc<WorkerStats>,
    /// The client's connection count: each change (a reconnect) restarts
    /// every watch from its bucket.
    pub(crate) connections: watch::Receiver<u64>,
    /// Which connection is up, read before each reconcile: the count above
    /// changes only once the event reaches the callback, later than the
    /// watches resume after a reconnect.
    pub(crate) link: Link,
    /// How often every watch is restarted from its bucket anyway.
    pub(crate) resync_every: Duration,
    /// The worker's lease, under which every claim is taken and held.
    pub(crate) lease: watch::Receiver<Lease>,
}

/// An interval from `start`, every `period`, that delays its ticks after a
/// busy spell instead of bursting them.
fn delayed_interval(start: Instant, period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval_at(start, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// A key, its last holder known when the acquisition started, the lease it
/// was taken under, and the outcome.
type Acquired = (
    Key,
    Option<String>,
    Lease,
    Result<(Claim, u64, Option<String>), ClaimError>,
);

impl DaemonRuntime {
    /// Runs until `token` fires, then releases every held task (waiting up to
    /// the grace period for the operators to stop).
    pub async fn run(self, token: CancellationToken) {
        let mut lease = self.lease.clone();
        lease.mark_unchanged();
        let mut state = State::new(&self.settings.worker_id, lease.borrow().id.clone());
        let mut w = self.watchers();
        let mut maintainers: JoinSet<(Arc<str>, Exit)> = JoinSet::new();
        let mut acquisitions: JoinSet<Acquired> = JoinSet::new();
        let mut forced = delayed_interval(Instant::now(), self.settings.heartbeat);
        // A full re-read of every bucket, in case a watch missed entries
        // without erring (design-notes: how watches resync).
        let mut resync = delayed_interval(Instant::now() + self.resync_every, self.resync_every);
        let mut connections = self.connections.clone();
        connections.mark_unchanged();
        // The connection the watches (re)started on: the view is acted on
        // only while that connection is still the one up.
        let mut replayed_on = self.link.current();
        let mut dirty = true;
        // Reconciling costs O(tasks): it runs at most every `pace`, which grows
        // with its own cost, so a burst of events is absorbed first.
        let mut next_reconcile = Instant::now();
        loop {
            // Until every watch has replayed there is nothing to reconcile:
            // no wake-up for it (a passed `next_reconcile` would spin the loop
            // for as long as a watch cannot be opened, a whole outage).
            let synced = w.synced();
            tokio::select! {
                biased;
                () = token.cancelled() => break,
                () = renewed(&mut lease) => {
                    // A new lease after a lapse: claims are taken again under it.
                    dirty = true;
                    state.lease = lease.borrow_and_update().id.clone();
                }
                () = reconnected(&mut connections) => {
                    tracing::info!("reconnected to NATS; re-reading the specs, claims and workers");
                    replayed_on = w.restart(&self.link);
                }
                entry = w.specs.next() => {
                    dirty = true;
                    self.on_spec(&mut state, entry);
                    if let Some(present) = w.specs.take_replayed() {
                        self.prune_specs(&mut state, &present);
                    }
                }
                entry = w.claims.next() => {
                    dirty = true;
                    on_claim(&mut state, entry);
                    if let Some(present) = w.claims.take_replayed() {
                        prune_claims(&mut state, &present);
                    }
                }
                entry = w.workers.next() => {
                    dirty = true;
                    on_worker(&mut state, entry);
                    if let Some(present) = w.workers.take_replayed() {
                        state.workers.retain(|key, _| present.contains(key));
                    }
                }
                Some(done) = acquisitions.join_next(), if !acquisitions.is_empty() => {
                    dirty = true;
                    if let Ok(acquired) = done {
                        self.on_acquired(&mut state, acquired, &mut maintainers, &token);
                    }
                    // On the view the plan was made from only (as reconcile).
                    let on = self.link.current();
                    if w.synced() && on.is_some() && on == replayed_on {
                        self.claim_planned(&mut state, &mut acquisitions);
                    }
                }
                Some(done) = maintainers.join_next_with_id(), if !maintainers.is_empty() => {
                    dirty = true;
                    self.on_maintainer_ended(&mut state, done);
                }
                () = tokio::time::sleep_until(next_reconcile), if dirty && synced => {}
                _ = forced.tick() => dirty = true,
                _ = resync.tick() => replayed_on = w.restart(&self.link),
            }
            self.reconcile_when_due(
                &mut state,
                &mut w,
                &mut acquisitions,
                &mut replayed_on,
                &mut dirty,
                &mut next_reconcile,
            );
        }
        self.stop_maintainers(maintainers, acquisitions).await;
    }

    /// Reconciles when the view is whole, changed and the pace allows it,
    /// and only on the connection the watches replayed on (else they are
    /// replayed first). Reconciling costs O(tasks): it runs at most every
    /// `next_reconcile`, which grows with its own cost, so a burst of events
    /// is absorbed first.
    fn reconcile_when_due(
        &self,
        state: &mut State,
        w: &mut Watchers,
        acquisitions: &mut JoinSet<Acquired>,
        replayed_on: &mut Option<Epoch>,
        dirty: &mut bool,
        next_reconcile: &mut Instant,
    ) {
        if !(w.synced() && *dirty && Instant::now() >= *next_reconcile) {
            return;
        }
        let now = self.link.current();
        if now.is_none() {
            // Disconnected: a claim sent now would be buffered and
            // acted on after the reconnect, on this (by then old) view.
            *next_reconcile = Instant::now() + DEBOUNCE;
        } else if now != *replayed_on {
            // Reconnected since the watches were restarted: each has
            // resumed on its own, so the view mixes the buckets at
            // different moments (claims seen expired, the deletion of
            // their specs not yet). Replay all three first.
            tracing::info!(
                "reconnected to NATS; re-reading the specs, claims and workers before acting"
            );
            *replayed_on = w.restart(&self.link);
        } else {
            *dirty = false;
            let started = Instant::now();
            self.reconcile(state, acquisitions);
            *next_reconcile = Instant::now() + (started.elapsed() * 4).max(DEBOUNCE);
        }
    }

    /// Watches on the specs, claims and workers buckets.
    fn watchers(&self) -> Watchers {
        Watchers {
            specs: Watcher::new(self.specs.kv().clone()),
            claims: Watcher::new(self.claims.kv().clone()),
            workers: Watcher::new(self.workers.clone()),
        }
    }

    /// A maintainer ended (its instance stopped, its claim released or
    /// lost) or failed: the task is no longer held here.
    fn on_maintainer_ended(
        &self,
        state: &mut State,
        done: Result<(tokio::task::Id, (Arc<str>, Exit)), tokio::task::JoinError>,
    ) {
        match done {
            Ok((id, (key, exit))) => {
                state.maintained.remove(&id);
                state.held.remove(&*key);
                state.unrun.insert(key.clone(), Instant::now());
                tracing::debug!(key = &*key, ?exit, "maintainer ended");
            }
            Err(e) => self.on_maintainer_failed(state, e),
        }
        self.stats
            .daemon_running
            .store(state.held.len(), Ordering::Relaxed);
    }

    /// Shutdown: maintainers see the same token and release their claims,
    /// waited for up to the grace period.
    async fn stop_maintainers(
        &self,
        mut maintainers: JoinSet<(Arc<str>, Exit)>,
        mut acquisitions: JoinSet<Acquired>,
    ) {
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

    /// A maintainer task that panicked (or was aborted): its instance is no
    /// longer run here, so forget it, free its claim for the next holder
    /// (else it expires with its TTL), and say so.
    fn on_maintainer_failed(&self, state: &mut State, error: tokio::task::JoinError) {
        let Some(key) = state.maintained.remove(&error.id()) else {
            return tracing::error!(cause = %error, "a daemon maintainer failed");
        };
        state.held.remove(&*key);
        state.unrun.insert(key.clone(), Instant::now());
        if state.specs.contains_key(&*key) {
            state
                .free_since
                .entry(key.clone())
                .or_insert_with(Free::now);
        }
        let spec = state.specs.get(&*key);
        tracing::error!(key = &*key, uni_id = spec.map(|s| s.uni_id.as_str()), cause = %error, "daemon maintainer failed; freeing its claim");
        let Some(spec) = spec else { return };
        crate::metrics::daemon_running(spec.kind.as_str(), &spec.dimension, false);
        let (claims, events, me) = (
            self.claims.clone(),
            self.events.clone(),
            self.settings.worker_id.clone(),
        );
        let (kind, detail) = (
            spec.kind.to_string(),
            json!({"uni_id": spec.uni_id, "error": format!("maintainer failed: {error}")}),
        );
        let bound = self
            .settings
            .heartbeat
            .min(super::maintainer::HANDOVER_WAIT);
        tokio::spawn(async move {
            events.emit("daemon", &kind, "error", detail).await;
            let release = async {
                if let Ok(Some((claim, revision))) = claims.get(&key).await
                    && claim.worker_id == me
                {
                    claims.release(&key, &claim, revision).await.map(|_| ())
                } else {
                    Ok(())
                }
            };
            if !matches!(tokio::time::timeout(bound, release).await, Ok(Ok(()))) {
                tracing::warn!(
                    key = &*key,
                    "claim of a failed maintainer not released; it expires after its TTL"
                );
            }
        });
    }

    fn on_spec(&self, state: &mut State, entry: Option<Entry>) {
        let Some(entry) = entry else { return };
        let key = state.key(&entry.key);
        let spec = (entry.operation == Operation::Put)
            .then(|| serde_json::from_slice::<DaemonSpec>(&entry.value).ok())
            .flatten()
            .map(Arc::new);
        match spec {
            Some(spec) => {
                if let Some(held) = state.held.get_mut(&key)
                    && held.generation != spec.generation
                    && !held.releasing
                {
                    held.generation = spec.generation;
                    if self.listens_on(spec.options.queue()) {
                        held.control.send(Control::Reload(spec.clone()));
                    } else {
                        // Moved to a queue this worker does not listen on: a
                        // worker of that queue takes it (no restart here first).
                        tracing::info!(uni_id = %spec.uni_id, queue = spec.options.queue(), "releasing a daemon task moved to a queue this worker does not listen on");
                        held.releasing = true;
                        held.control.send(Control::Release);
                    }
                }
                if !state.claims.contains_key(&key) {
                    state
                        .free_since
                        .entry(key.clone())
                        .or_insert_with(Free::now);
                }
                state.specs.insert(key, spec);
            }
            None => spec_gone(state, &key),
        }
    }

    /// After a replay of the specs: a spec this worker still knows but the
    /// bucket no longer has was deleted while the watch could not see it.
    fn prune_specs(&self, state: &mut State, present: &HashSet<String>) {
        let gone: Vec<Key> = state
            .specs
            .keys()
            .filter(|key| !present.contains(&***key))
            .cloned()
            .collect();
        for key in gone {
            tracing::info!(
                key = &*key,
                "daemon task deleted while the specs watch was stalled"
            );
            spec_gone(state, &key);
        }
    }

    fn listens_on(&self, queue: &str) -> bool {
        self.queues.iter().any(|q| q == queue)
    }

    fn reconcile(&self, state: &mut State, acquisitions: &mut JoinSet<Acquired>) {
        let mut plan = self.plan(state);
        plan.claim.reverse();
        state.planned = plan.claim;
        self.claim_planned(state, acquisitions);
        for (key, revision) in plan.purge {
            state.purging.insert(key.clone());
            let claims = self.claims.clone();
            tokio::spawn(async move {
                if let Err(e) = claims.remove(&key, revision).await {
                    tracing::debug!(key = &*key, cause = %e, "claim of a deleted task not removed");
                }
            });
        }
        for key in plan.hand_back {
            state.purging.insert(key.clone());
            self.hand_back(key);
        }
        for key in plan.release {
            if let Some(held) = state.held.get_mut(&key) {
                tracing::info!(key = &*key, "releasing a daemon task to rebalance");
                held.releasing = true;
                held.control.send(Control::Release);
            }
        }
    }

    /// Starts the claims the last plan chose, while fewer than
    /// `MAX_ACQUIRING` are in flight, skipping those taken since.
    fn claim_planned(&self, state: &mut State, acquisitions: &mut JoinSet<Acquired>) {
        if !self.lease.borrow().is_live() {
            return state.planned.clear();
        }
        while state.acquiring.len() < MAX_ACQUIRING
            && let Some(key) = state.planned.pop()
        {
            if state.still_claimable(&key) {
                self.spawn_acquire(state, key, acquisitions);
            }
        }
    }

    fn spawn_acquire(&self, state: &mut State, key: Key, acquisitions: &mut JoinSet<Acquired>) {
        let Some(spec) = state.specs.get(&key) else {
            return;
        };
        // No claim is taken while the lease is lost: the next one is
        // registered once the old one has surely expired.
        let lease = self.lease.borrow().clone();
        if !lease.is_live() {
            return;
        }
        state.acquiring.insert(key.clone());
        let (claims, uni_id, generation) =
            (self.claims.clone(), spec.uni_id.clone(), spec.generation);
        let worker_id = self.settings.worker_id.clone();
        let previous = state.free_since.get(&key).and_then(|f| f.previous.clone());
        acquisitions.spawn(async move {
            let result = claims
                .acquire(&key, &uni_id, &worker_id, &lease.id, generation)
                .await;
            (key, previous, lease, result)
        });
    }

    fn on_acquired(
        &self,
        state: &mut State,
        acquired: Acquired,
        maintainers: &mut JoinSet<(Arc<str>, Exit)>,
        token: &CancellationToken,
    ) {
        let (key, previous, lease, result) = acquired;
        state.acquiring.remove(&key);
        let (mut claim, revision, released_by) = match result {
            Ok(won) => won,
            Err(ClaimError::AlreadyHeld(_)) => return,
            Err(e) => return tracing::warn!(key = &*key, cause = %e, "claim not acquired"),
        };
        let Some(spec) = state.specs.get(&key).cloned() else {
            // Deleted while we were acquiring: drop the claim at once.
            let claims = self.claims.clone();
            tokio::spawn(async move { claims.remove(&key, revision).await });
            return;
        };
        // The releasing worker named in the claim we replaced, else the holder
        // whose claim we saw expire.
        let me = &self.settings.worker_id;
        if let Some(from) = released_by.or(previous).filter(|p| p != me) {
            tracing::debug!(uni_id = %spec.uni_id, from, "daemon task moved here");
            let (events, kind) = (self.events.clone(), spec.kind.to_string());
            let detail = json!({"uni_id": spec.uni_id, "from": from, "to": me});
            tokio::spawn(async move { events.emit("daemon", &kind, "moved", detail).await });
        }
        // Taken under a lease lost since: nothing runs under it (the claim
        // is free for anyone, this worker too under its next lease).
        if !lease.is_live() {
            return;
        }
        let operator = match self.operators.get(&spec.kind) {
            Some(Ok(op)) => op,
            Some(Err(e)) => {
                state.unrun.insert(key.clone(), Instant::now());
                return self.cannot_run(spec, key, claim, revision, &e);
            }
            None => return,
        };
        claim.generation = spec.generation;
        let (tx, rx) = control_channel();
        state.free_since.remove(&key);
        state.unrun.remove(&key);
        state.held.insert(
            key.clone(),
            Held {
                control: tx,
                generation: spec.generation,
                releasing: false,
                revision,
            },
        );
        self.stats
            .daemon_running
            .store(state.held.len(), Ordering::Relaxed);
        let maintainer = Maintainer {
            key: key.clone(),
            spec,
            operator,
            claims: self.claims.clone(),
            claim,
            revision,
            lease,
            settings: self.settings.clone(),
            events: self.events.clone(),
            control: rx,
        };
        // The maintainer only waits on the token: a clone, not a child token
        // (an allocation per instance).
        let task = maintainers.spawn(Box::new(maintainer).run(token.clone()));
        state.maintained.insert(task.id(), key);
    }
}

/// The runtime's three watches.
struct Watchers {
    specs: Watcher,
    claims: Watcher,
    workers: Watcher,
}

impl Watchers {
    /// Whether all three have replayed their buckets since their last restart.
    fn synced(&self) -> bool {
        self.specs.synced() && self.claims.synced() && self.workers.synced()
    }

    /// Restarts every watch from its bucket; returns the connection they
    /// start on.
    fn restart(&mut self, link: &Link) -> Option<Epoch> {
        let on = link.current();
        for w in [&mut self.specs, &mut self.claims, &mut self.workers] {
            w.restart();
        }
        on
    }
}

/// Resolves when the worker has a new lease; never once the membership is
/// gone (the worker is stopping).
async fn renewed(lease: &mut watch::Receiver<Lease>) {
    if lease.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves when the client has reconnected since last time; never if the
/// connection count is gone (the client was dropped).
async fn reconnected(connections: &mut watch::Receiver<u64>) {
    if connections.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}
