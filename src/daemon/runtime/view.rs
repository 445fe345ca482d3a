//! The runtime's view of the three buckets it follows: the specs, the held
//! claims with their holders and leases, the free tasks and since when, the
//! live workers and their leases, and what this worker holds, maintains and
//! is acquiring; and how each entry of a watch changes it. A claim whose
//! holder's lease is gone stays in the bucket until a worker takes it over:
//! the view keeps it, and the plan counts it as free ([`State::alive`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_nats::jetstream::kv::{Entry, Operation};
use tokio::time::Instant;

use crate::daemon::claim::Claim;
use crate::daemon::maintainer::{Control, ControlSender};
use crate::daemon::spec::DaemonSpec;
use crate::membership::WorkerEntry;

pub(super) struct Held {
    pub(super) control: ControlSender,
    pub(super) generation: u64,
    pub(super) releasing: bool,
    /// The claim's revision when it was won: a later write by anyone but
    /// this worker under its lease means the claim is lost.
    pub(super) revision: u64,
}

/// Who a claim names: a worker and the lease it took the claim under.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Holder {
    pub(super) worker_id: Box<str>,
    /// Its key in the workers bucket.
    pub(super) worker_key: Box<str>,
    pub(super) lease: Box<str>,
}

/// A held claim as the view keeps it.
pub(super) struct Seen {
    /// One shared value per holder (see `State::holders`).
    pub(super) holder: Arc<Holder>,
    pub(super) revision: u64,
}

/// A task nobody holds.
pub(super) struct Free {
    pub(super) since: Instant,
    /// The last holder seen (the claim expired or was released), so that the
    /// next holder can report the move; `None` if never held or not seen.
    pub(super) previous: Option<String>,
}

impl Free {
    pub(super) fn now() -> Free {
        Free {
            since: Instant::now(),
            previous: None,
        }
    }
}

/// A task's key, one string shared by every map below (and by its
/// maintainer): a key is ~70 bytes, and each instance is in several maps.
pub(super) type Key = Arc<str>;

/// The view's maps and sets: hashed with foldhash, seeded per process, not
/// SipHash. Every reconcile looks up each of up to 100,000 keys in several
/// of them, and SipHash of a ~70-byte key was the largest cost of a worker
/// binding 100,000 tasks (design-notes, 89).
pub(super) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// See [`Map`].
pub(super) type Set<K> = HashSet<K, foldhash::fast::RandomState>;

pub(super) struct State {
    /// This worker, and the lease it holds claims under now.
    pub(super) me: Arc<str>,
    pub(super) lease: Arc<str>,
    /// Shared with the maintainers: one copy of each spec in the worker.
    pub(super) specs: Map<Key, Arc<DaemonSpec>>,
    /// Held claims only, by key, alive or not: their holder and revision;
    /// the rest of a claim is read by its maintainer only.
    pub(super) claims: Map<Key, Seen>,
    /// The holders named by `claims`, each stored once, by worker and lease.
    pub(super) holders: Map<(Box<str>, Box<str>), Arc<Holder>>,
    /// Specs with no held claim: since when, and who held them last.
    pub(super) free_since: Map<Key, Free>,
    pub(super) workers: Map<String, WorkerEntry>,
    pub(super) held: Map<Key, Held>,
    /// The key of each running maintainer task, to clean up after one that
    /// panicked.
    pub(super) maintained: Map<tokio::task::Id, Arc<str>>,
    pub(super) acquiring: Set<Key>,
    /// Claims the last plan chose that are not started yet, the next one
    /// last: started as acquisitions end, up to `MAX_ACQUIRING` at once,
    /// so that binding is paced by round trips, not by how often the view
    /// is planned (each plan costs O(tasks)). Replaced by each plan.
    pub(super) planned: Vec<Key>,
    /// Tasks whose maintainer here ended, and when: a claim that still
    /// names this worker and its lease a heartbeat later (its hand-over
    /// was not written) is taken again.
    pub(super) unrun: Map<Key, Instant>,
    /// Claims of deleted tasks whose holder is gone, being removed.
    pub(super) purging: Set<Key>,
    /// When each worker's lease was last seen to end (its entry gone or
    /// naming a new lease), by worker key: its claims are then free as
    /// tasks just released are, not as long-free ones.
    pub(super) lapsed: Map<String, Instant>,
}

impl State {
    /// An empty view for worker `me`, holding claims under `lease`.
    pub(super) fn new(me: &str, lease: Arc<str>) -> State {
        State {
            me: me.into(),
            lease,
            specs: Map::default(),
            claims: Map::default(),
            holders: Map::default(),
            free_since: Map::default(),
            workers: Map::default(),
            held: Map::default(),
            maintained: Map::default(),
            acquiring: Set::default(),
            planned: Vec::new(),
            unrun: Map::default(),
            purging: Set::default(),
            lapsed: Map::default(),
        }
    }

    /// Whether `holder` still holds its claims: its worker entry names the
    /// lease they were taken under (a claim without a lease, an older
    /// worker's, is held until it expires).
    pub(super) fn alive(&self, holder: &Holder) -> bool {
        holder.lease.is_empty()
            || self
                .workers
                .get(&*holder.worker_key)
                .is_some_and(|w| *w.lease == *holder.lease)
    }

    /// Whether `holder` is this worker under its current lease.
    fn is_me(&self, holder: &Holder) -> bool {
        *holder.worker_id == *self.me && *holder.lease == *self.lease
    }

    /// Whether a claim the last plan chose may still be started: the task
    /// exists, is neither run nor being acquired here, and no live worker
    /// holds it since (but this worker's own claim, planned because it is
    /// not run here, is).
    pub(super) fn still_claimable(&self, key: &str) -> bool {
        self.specs.contains_key(key)
            && !self.held.contains_key(key)
            && !self.acquiring.contains(key)
            && self
                .claims
                .get(key)
                .is_none_or(|seen| !self.alive(&seen.holder) || *seen.holder.worker_id == *self.me)
    }

    /// The shared holder for a claim's worker and lease.
    fn holder(&mut self, claim: Claim) -> Arc<Holder> {
        let id = (
            claim.worker_id.into_boxed_str(),
            claim.lease.into_boxed_str(),
        );
        if let Some(holder) = self.holders.get(&id) {
            return holder.clone();
        }
        let holder = Arc::new(Holder {
            worker_key: crate::membership::worker_key(&id.0).into_boxed_str(),
            worker_id: id.0.clone(),
            lease: id.1.clone(),
        });
        self.holders.insert(id, holder.clone());
        holder
    }
    /// The shared string of `key` if a map has it already, else a new one.
    pub(super) fn key(&self, key: &str) -> Key {
        self.specs
            .get_key_value(key)
            .map(|(k, _)| k)
            .or_else(|| self.claims.get_key_value(key).map(|(k, _)| k))
            .cloned()
            .unwrap_or_else(|| key.into())
    }
}

/// A spec was deleted: stop its instance here if it runs here.
pub(super) fn spec_gone(state: &mut State, key: &str) {
    state.specs.remove(key);
    state.free_since.remove(key);
    if let Some(held) = state.held.get_mut(key) {
        held.releasing = true;
        held.control.send(Control::Remove);
    }
}

/// After a replay of the claims: a claim this worker still knows but the
/// bucket no longer has expired (or was released) while the watch could not
/// see it.
pub(super) fn prune_claims(state: &mut State, present: &HashSet<String>) {
    let gone: Vec<Key> = state
        .claims
        .keys()
        .filter(|key| !present.contains(&***key))
        .cloned()
        .collect();
    for key in gone {
        claim_gone(state, &key);
    }
    // Forget the holders no claim names any more (workers gone), and the
    // removals that a replay found done or not done (tried again).
    let named: HashSet<*const Holder> = state
        .claims
        .values()
        .map(|seen| Arc::as_ptr(&seen.holder))
        .collect();
    state
        .holders
        .retain(|_, holder| named.contains(&Arc::as_ptr(holder)));
    state.purging.clear();
}

/// A claim was released or expired: its task is free (if it still exists),
/// and its last holder is remembered for the `moved` event.
pub(super) fn claim_gone(state: &mut State, key: &str) {
    state.unrun.remove(key);
    state.purging.remove(key);
    let previous = state
        .claims
        .remove(key)
        .map(|seen| seen.holder.worker_id.to_string());
    if let Some((key, _)) = state.specs.get_key_value(key) {
        let free = state
            .free_since
            .entry(key.clone())
            .or_insert_with(Free::now);
        if previous.is_some() {
            free.previous = previous;
        }
    }
}

pub(super) fn on_claim(state: &mut State, entry: Option<Entry>) {
    let Some(entry) = entry else { return };
    let claim = (entry.operation == Operation::Put)
        .then(|| serde_json::from_slice::<Claim>(&entry.value).ok())
        .flatten()
        .filter(Claim::is_held);
    let holder = claim.map(|claim| state.holder(claim));
    let mine = holder.as_ref().is_some_and(|h| state.is_me(h));
    // Written over, or removed, by anyone but this worker under its lease
    // while it runs the task: stop it at once (fencing).
    if let Some(held) = state.held.get_mut(entry.key.as_str())
        && !held.releasing
        && entry.revision > held.revision
        && !mine
    {
        held.releasing = true;
        held.control.send(Control::Lost);
    }
    match holder {
        Some(holder) => {
            state.free_since.remove(entry.key.as_str());
            let key = state.key(&entry.key);
            let seen = Seen {
                holder,
                revision: entry.revision,
            };
            state.claims.insert(key, seen);
        }
        None => claim_gone(state, &entry.key),
    }
}

/// How long the end of a lease is remembered (far longer than the
/// heartbeat that it is compared with).
const LAPSE_MEMORY: std::time::Duration = std::time::Duration::from_secs(60);

pub(super) fn on_worker(state: &mut State, entry: Option<Entry>) {
    let Some(entry) = entry else { return };
    let worker = (entry.operation == Operation::Put)
        .then(|| serde_json::from_slice::<WorkerEntry>(&entry.value).ok())
        .flatten();
    let lease = worker.as_ref().map(|w| w.lease.clone());
    let before = match worker {
        Some(w) => state.workers.insert(entry.key.clone(), w),
        None => state.workers.remove(&entry.key),
    };
    if before.is_some_and(|b| Some(&b.lease) != lease.as_ref()) {
        let now = Instant::now();
        state
            .lapsed
            .retain(|_, at| now.duration_since(*at) < LAPSE_MEMORY);
        state.lapsed.insert(entry.key, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: u32) -> Arc<DaemonSpec> {
        let spec = serde_json::json!({
            "uni_id": format!("u{n}"), "kind": "daemon:demo:demo", "payload": {},
            "created_at": "2026-12-07T00:00:00Z", "generation": 1, "dimension": "d",
        });
        Arc::new(serde_json::from_value(spec).expect("a spec"))
    }

    fn claimed_by(state: &mut State, key: &str, worker: &str, lease: &str) {
        let holder = Arc::new(Holder {
            worker_id: worker.into(),
            worker_key: crate::membership::worker_key(worker).into_boxed_str(),
            lease: lease.into(),
        });
        state.claims.insert(
            key.into(),
            Seen {
                holder,
                revision: 1,
            },
        );
    }

    fn live(state: &mut State, worker: &str, lease: &str) {
        let entry = serde_json::json!({
            "worker_id": worker, "host": "h", "pid": 1, "started_at": "", "version": "",
            "queues": ["default"], "running": 0, "lease": lease,
        });
        let entry = serde_json::from_value(entry).expect("a worker entry");
        state
            .workers
            .insert(crate::membership::worker_key(worker), entry);
    }

    #[test]
    fn a_planned_claim_is_dropped_once_a_live_worker_holds_it() {
        let mut state = State::new("me", "l-me".into());
        for (n, key) in ["free", "gone-holder", "taken", "mine-unrun", "acquiring"]
            .into_iter()
            .enumerate()
        {
            state.specs.insert(key.into(), spec(n as u32));
        }
        live(&mut state, "other", "l-other");
        live(&mut state, "me", "l-me");
        claimed_by(&mut state, "gone-holder", "dead", "l-dead");
        claimed_by(&mut state, "taken", "other", "l-other");
        claimed_by(&mut state, "mine-unrun", "me", "l-me");
        state.acquiring.insert("acquiring".into());

        assert!(state.still_claimable("free"));
        assert!(
            state.still_claimable("gone-holder"),
            "its holder's lease is gone"
        );
        assert!(!state.still_claimable("taken"), "a live worker holds it");
        assert!(state.still_claimable("mine-unrun"), "ours, not run here");
        assert!(!state.still_claimable("acquiring"), "being acquired here");
        assert!(!state.still_claimable("deleted"), "no spec");
        // The other worker's lease ends: its claim is free to take over.
        live(&mut state, "other", "l-other-2");
        assert!(state.still_claimable("taken"));
    }
}
