//! Which free tasks this worker claims and which held ones it releases:
//! one pass over the view tallies each queue ([`Tally`]), and
//! [`balancer::plan`] decides per queue.

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::DaemonRuntime;
use super::view::{Key, Map, State};
use crate::daemon::balancer::{self, View};

/// What a worker counts in one queue to balance its daemon tasks
/// ([`balancer::plan`]).
#[derive(Default)]
pub(super) struct Tally<'a> {
    /// Tasks of the queue this worker may run.
    eligible: usize,
    /// Of those, held or being acquired here.
    mine: usize,
    /// The tasks each other worker of the queue holds.
    loads: Map<&'a str, usize>,
    /// Free tasks, free for up to a heartbeat / for longer.
    fresh: Vec<&'a Key>,
    long: Vec<&'a Key>,
    /// Tasks held here (not being released).
    held: Vec<&'a Key>,
}

/// The tally of the queue of `key`, if this worker may run it.
pub(super) fn tally_of<'m, 'a>(
    queue_of: &Map<&'a str, &'a str>,
    tallies: &'m mut Map<&'a str, Tally<'a>>,
    key: &str,
) -> Option<&'m mut Tally<'a>> {
    queue_of.get(key).and_then(|q| tallies.get_mut(q))
}

impl Tally<'_> {
    pub(super) fn plan(&self) -> balancer::Plan {
        let peer_loads: Vec<usize> = self.loads.values().copied().collect();
        balancer::plan(&View {
            eligible: self.eligible,
            peers: self.loads.len() + 1,
            mine: self.mine,
            peer_loads: &peer_loads,
            free_fresh: self.fresh.len(),
            free_long: self.long.len(),
        })
    }
}

/// What one reconcile does.
pub(super) struct Plan {
    /// Free tasks to claim (some held by a worker whose lease is gone).
    pub(super) claim: Vec<Key>,
    /// Held tasks to hand over.
    pub(super) release: Vec<Key>,
    /// Claims of deleted tasks left by a gone holder, with their revision.
    pub(super) purge: Vec<(Key, u64)>,
    /// Claims of ours for tasks this worker may not run, not handed over.
    pub(super) hand_back: Vec<Key>,
}

impl DaemonRuntime {
    /// Balances each queue among the live workers that listen on it: which
    /// free tasks to claim and which held ones to release. One pass over the
    /// specs, claims and free tasks, whatever the number of queues.
    pub(super) fn plan(&self, state: &State) -> Plan {
        let mut tallies = self.tallies(state);
        let queue_of = self.count_eligible(state, &mut tallies);
        let now = Instant::now();
        let (mut purge, mut hand_back) = (Vec::new(), Vec::new());
        for (key, seen) in &state.claims {
            if state.held.contains_key(key) || state.acquiring.contains(key) {
                continue;
            }
            let holder = &seen.holder;
            let alive = state.alive(holder);
            // Ours under the live lease but not run here: a hand-over not
            // seen yet, or one whose write failed; acted on after a heartbeat.
            let mine = alive && *holder.worker_id == *state.me;
            let stale = mine
                && state
                    .unrun
                    .get(key)
                    .is_some_and(|since| now.duration_since(*since) > self.settings.heartbeat);
            if mine && !stale {
                continue;
            }
            let taken_over = !alive || stale;
            match tally_of(&queue_of, &mut tallies, key) {
                // Free: its holder's lease ended just now (shared out as
                // released tasks are), a while ago, or it is ours and idle.
                Some(t) if taken_over => {
                    let fresh = !stale
                        && state
                            .lapsed
                            .get(&*holder.worker_key)
                            .is_some_and(|at| now.duration_since(*at) <= self.settings.heartbeat);
                    if fresh { &mut t.fresh } else { &mut t.long }.push(key);
                }
                Some(t) => {
                    if let Some(n) = t.loads.get_mut(&*holder.worker_id) {
                        *n += 1;
                    }
                }
                None if !taken_over || state.purging.contains(key) => {}
                // A deleted task's claim that nobody else would remove.
                None if !state.specs.contains_key(key) => purge.push((key.clone(), seen.revision)),
                // Ours, for a task this worker may not run: handed back.
                None if stale => hand_back.push(key.clone()),
                None => {}
            }
        }
        for (key, free) in &state.free_since {
            if state.held.contains_key(key)
                || state.acquiring.contains(key)
                || state.claims.contains_key(key)
            {
                continue;
            }
            if let Some(t) = tally_of(&queue_of, &mut tallies, key) {
                let long = now.duration_since(free.since) > self.settings.heartbeat;
                let list = if long { &mut t.long } else { &mut t.fresh };
                list.push(key);
            }
        }
        let (mut claim, mut release) = (Vec::new(), Vec::new());
        for (key, _) in state.held.iter().filter(|(_, h)| !h.releasing) {
            match tally_of(&queue_of, &mut tallies, key) {
                Some(t) => {
                    t.mine += 1;
                    t.held.push(key);
                }
                // Its spec moved to a queue this worker does not listen on (or
                // to a kind it cannot run): released, so that one that does takes it.
                None if state.specs.contains_key(key) => release.push(key.clone()),
                None => {}
            }
        }
        for key in &state.acquiring {
            if let Some(t) = tally_of(&queue_of, &mut tallies, key) {
                t.mine += 1;
            }
        }
        let mut quota = 0;
        for t in tallies.into_values().filter(|t| t.eligible > 0) {
            let plan = t.plan();
            quota += plan.quota;
            claim.extend(t.long.into_iter().take(plan.claim_long).cloned());
            claim.extend(t.fresh.into_iter().take(plan.claim_fresh).cloned());
            release.extend(t.held.into_iter().take(plan.release).cloned());
        }
        self.stats.daemon_quota.store(quota, Ordering::Relaxed);
        Plan {
            claim,
            release,
            purge,
            hand_back,
        }
    }

    /// An empty tally for each queue this worker listens on, with every
    /// other live worker of that queue at load 0.
    pub(super) fn tallies<'a>(&'a self, state: &'a State) -> Map<&'a str, Tally<'a>> {
        let me = self.settings.worker_id.as_str();
        self.queues
            .iter()
            .map(|queue| {
                let loads = state
                    .workers
                    .values()
                    .filter(|w| w.worker_id != me && w.queues.iter().any(|q| q == queue))
                    .map(|w| (w.worker_id.as_str(), 0))
                    .collect();
                let tally = Tally {
                    loads,
                    ..Tally::default()
                };
                (queue.as_str(), tally)
            })
            .collect()
    }

    /// Counts the tasks this worker may run in each queue's tally; returns
    /// the queue of each of them.
    pub(super) fn count_eligible<'a>(
        &self,
        state: &'a State,
        tallies: &mut Map<&'a str, Tally<'a>>,
    ) -> Map<&'a str, &'a str> {
        let mut queue_of = Map::with_capacity_and_hasher(state.specs.len(), Default::default());
        for (key, spec) in &state.specs {
            if let Some(t) = tallies.get_mut(spec.options.queue())
                && self.operators.can_run(&spec.kind)
            {
                t.eligible += 1;
                queue_of.insert(&**key, spec.options.queue());
            }
        }
        queue_of
    }
}
