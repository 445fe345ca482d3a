//! The runtime's view of the three buckets it follows: the specs, the held
//! claims and their holders, the free tasks and since when, the live
//! workers, and what this worker holds, maintains and is acquiring; and how
//! each entry of a watch changes it.

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

#[derive(Default)]
pub(super) struct State {
    /// Shared with the maintainers: one copy of each spec in the worker.
    pub(super) specs: HashMap<Key, Arc<DaemonSpec>>,
    /// Held claims only, by key: their holder (one shared string per worker,
    /// see `holders`); the rest of a claim is read by its maintainer only.
    pub(super) claims: HashMap<Key, Arc<str>>,
    /// The holders named by `claims`, each stored once.
    pub(super) holders: HashSet<Arc<str>>,
    /// Specs with no held claim: since when, and who held them last.
    pub(super) free_since: HashMap<Key, Free>,
    pub(super) workers: HashMap<String, WorkerEntry>,
    pub(super) held: HashMap<Key, Held>,
    /// The key of each running maintainer task, to clean up after one that
    /// panicked.
    pub(super) maintained: HashMap<tokio::task::Id, Arc<str>>,
    pub(super) acquiring: HashSet<Key>,
}

impl State {
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
    // Forget the holders no claim names any more (workers gone).
    let named: HashSet<&str> = state.claims.values().map(|w| &**w).collect();
    state.holders.retain(|w| named.contains(&**w));
}

/// A claim was released or expired: its task is free (if it still exists),
/// and its last holder is remembered for the `moved` event.
pub(super) fn claim_gone(state: &mut State, key: &str) {
    let previous = state.claims.remove(key).map(|w| w.to_string());
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
    match claim {
        Some(claim) => {
            state.free_since.remove(entry.key.as_str());
            let holder = match state.holders.get(claim.worker_id.as_str()) {
                Some(holder) => holder.clone(),
                None => {
                    let holder: Arc<str> = claim.worker_id.into();
                    state.holders.insert(holder.clone());
                    holder
                }
            };
            let key = state.key(&entry.key);
            state.claims.insert(key, holder);
        }
        None => claim_gone(state, &entry.key),
    }
}

pub(super) fn on_worker(state: &mut State, entry: Option<Entry>) {
    let Some(entry) = entry else { return };
    let worker = (entry.operation == Operation::Put)
        .then(|| serde_json::from_slice::<WorkerEntry>(&entry.value).ok())
        .flatten();
    match worker {
        Some(w) => state.workers.insert(entry.key, w),
        None => state.workers.remove(&entry.key),
    };
}
