//! [`plan`]: how many daemon tasks this worker should hold, and what to claim
//! or release to get there. Pure, so it is tested without a server.
//!
//! Balancing is per queue. Every worker knows the live workers and the claims;
//! for each of its queues it holds at most `quota = ceil(tasks / peers)`, where
//! peers are the live workers listening on that queue. A free task is claimed while under quota, or by
//! anyone once it has been free for longer than a heartbeat (so a task never
//! stays orphaned while a dead worker still counts as live). A worker over
//! quota releases its surplus only while some peer is under quota, so a
//! release always has a taker.

/// What the runtime knows at one moment.
#[derive(Debug)]
pub(crate) struct View<'a> {
    /// Tasks this worker may run (queue and kind match).
    pub(crate) eligible: usize,
    /// Live workers sharing a queue with this one, this one included.
    pub(crate) peers: usize,
    /// How many tasks this worker holds (running or being acquired).
    pub(crate) mine: usize,
    /// How many tasks each other peer holds.
    pub(crate) peer_loads: &'a [usize],
    /// Free tasks this worker may claim that became free recently.
    pub(crate) free_fresh: usize,
    /// Free tasks this worker may claim that have been free for over a heartbeat.
    pub(crate) free_long: usize,
}

/// What to do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The quota.
    pub(crate) quota: usize,
    /// How many recently freed tasks to try to claim.
    pub(crate) claim_fresh: usize,
    /// How many long-free tasks to try to claim (all of them: rescue).
    pub(crate) claim_long: usize,
    /// How many held tasks to release.
    pub(crate) release: usize,
}

pub(crate) fn plan(view: &View<'_>) -> Plan {
    let peers = view.peers.max(1);
    let quota = view.eligible.div_ceil(peers);
    let room = quota.saturating_sub(view.mine);
    // Rescue: beyond the quota, take at most a fair share of the long-free
    // tasks, so that the live workers racing for them do not each take all.
    let claim_long = view.free_long.min(view.free_long.div_ceil(peers) + room);
    let claim_fresh = room.saturating_sub(claim_long).min(view.free_fresh);
    // Release only what peers lack beyond the free tasks they can still take.
    let deficit: usize = view
        .peer_loads
        .iter()
        .map(|l| quota.saturating_sub(*l))
        .sum();
    let free = view.free_fresh + view.free_long;
    let release = view
        .mine
        .saturating_sub(quota)
        .min(deficit.saturating_sub(free));
    Plan {
        quota,
        claim_fresh,
        claim_long,
        release,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(
        eligible: usize,
        peers: usize,
        mine: usize,
        peer_loads: &[usize],
        fresh: usize,
        long: usize,
    ) -> Plan {
        plan(&View {
            eligible,
            peers,
            mine,
            peer_loads,
            free_fresh: fresh,
            free_long: long,
        })
    }

    #[test]
    fn a_lone_worker_takes_everything() {
        assert_eq!(
            view(10, 1, 0, &[], 10, 0),
            Plan {
                quota: 10,
                claim_fresh: 10,
                claim_long: 0,
                release: 0
            }
        );
    }

    #[test]
    fn a_newcomer_gets_a_share() {
        // The old worker holds 10, a newcomer joined: the old one releases 5.
        assert_eq!(
            view(10, 2, 10, &[0], 0, 0),
            Plan {
                quota: 5,
                claim_fresh: 0,
                claim_long: 0,
                release: 5
            }
        );
        // The newcomer claims up to its quota of what was released.
        assert_eq!(view(10, 2, 0, &[5], 5, 0).claim_fresh, 5);
        // Three workers, 10 tasks: quota 4, so 6 of 10 go.
        assert_eq!(view(10, 3, 10, &[0, 0], 0, 0).release, 6);
    }

    #[test]
    fn no_release_without_a_taker() {
        assert_eq!(view(9, 3, 4, &[3, 3], 0, 0).release, 0);
        assert_eq!(view(9, 3, 4, &[3, 2], 0, 0).release, 1);
    }

    #[test]
    fn long_free_tasks_are_rescued_beyond_quota_but_shared() {
        let p = view(10, 2, 5, &[3], 1, 1);
        assert_eq!((p.claim_fresh, p.claim_long), (0, 1));
        // A dead worker still counts as live: its 100 tasks are long free, and
        // each of the 3 live workers at quota takes a quarter of them per round.
        let p = view(400, 4, 100, &[100, 100, 0], 0, 100);
        assert_eq!(p.claim_long, 25);
    }

    #[test]
    fn no_release_while_free_tasks_remain_for_the_peers() {
        // A peer lacks 5, but 5 tasks are free for it: nothing to release.
        assert_eq!(view(20, 2, 10, &[5], 5, 0).release, 0);
        assert_eq!(view(20, 2, 12, &[3], 5, 0).release, 2);
    }
}
