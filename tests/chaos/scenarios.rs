//! The scenarios: each starts its own world, seeds it (six daemon tasks, a
//! periodic task every second), runs the mixed load, injects one fault,
//! times the recovery, lets the load run on, stops it, accounts for every
//! task and asserts: none lost, every 2xx create applied, duplicates within
//! the bound, the periodic ticks outside the outage run, and (where the
//! fault leaves a worker running while cut off or frozen) no daemon task run
//! in two processes at once for longer than one heartbeat.
//!
//! The two quick ones run with `cargo test`; the whole suite is `#[ignore]`d.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;

use crate::accounting;
use crate::faults;
use crate::harness::proxy::Mode;
use crate::harness::wait_until;
use crate::load::Load;
use crate::report::Row;
use crate::world::{CONCURRENCY, DAEMONS, HEARTBEAT, Timing, WORKERS, World};

/// Tasks a worker can have in doubt when a fault strikes (`docs/faq.md`,
/// "Stopping, and a nats-server crash"): running, or finished with acks not yet confirmed, at most
/// about 4 x its concurrency. A scenario's bound is that, for every worker,
/// for each time the fault strikes.
const IN_DOUBT_PER_STRIKE: usize = 4 * CONCURRENCY * WORKERS;

enum Fault {
    ServerKill(Duration),
    Freeze(Duration),
    Partition(Mode, Duration),
    RollingRestart,
    LeaderKills,
    QuorumLoss(Duration),
    /// The claims bucket's leader node stopped, restarted after the outage.
    NodeStop(faults::NodeStop, Duration),
    NodeRollingRestart,
    /// `kill -9` of the bridge, a new one on its port after the outage.
    BridgeKill(Duration),
}

impl Fault {
    fn describe(&self) -> String {
        match self {
            Fault::ServerKill(d) => format!("kill -9 of the nats-server, restarted after {d:?}"),
            Fault::Freeze(d) => format!("SIGSTOP of a worker for {d:?}, then SIGCONT"),
            Fault::Partition(Mode::Refuse, d) => {
                format!("a worker cut off for {d:?}, connections refused")
            }
            Fault::Partition(_, d) => format!("a worker cut off for {d:?}, traffic black-holed"),
            Fault::RollingRestart => "SIGTERM and restart of each worker in turn".into(),
            Fault::LeaderKills => {
                "kill -9 of the leader of each of the 10 bmw streams and buckets in turn, restarted after the election".into()
            }
            Fault::QuorumLoss(d) => format!("2 of 3 nodes killed for {d:?} (claim TTL 3 s), then restarted"),
            Fault::NodeStop(faults::NodeStop::Kill, d) => {
                format!("kill -9 of the claims bucket's leader node, restarted after {d:?} (claim TTL 15 s)")
            }
            Fault::NodeStop(faults::NodeStop::Term, d) => {
                format!("SIGTERM of the claims bucket's leader node, restarted after {d:?} (claim TTL 15 s)")
            }
            Fault::NodeRollingRestart => {
                "lame-duck stop and restart of each of the 3 nodes in turn (claim TTL 15 s)".into()
            }
            Fault::BridgeKill(d) => format!(
                "kill -9 of the bridge, a new one on its port after {d:?}; clients retry with their task_id"
            ),
        }
    }

    fn cluster(&self) -> bool {
        matches!(
            self,
            Fault::LeaderKills
                | Fault::QuorumLoss(_)
                | Fault::NodeStop(..)
                | Fault::NodeRollingRestart
        )
    }

    /// The workers' claim timing: bmw's defaults where the scenario is what
    /// an operator's cluster goes through (a node lost or upgraded).
    fn timing(&self) -> Timing {
        match self {
            Fault::NodeStop(..) | Fault::NodeRollingRestart => Timing::Default,
            _ => Timing::Fast,
        }
    }

    /// Whether the fault must be invisible to daemon tasks and bridge
    /// clients: no instance restarted, no create answered with a non-2xx
    /// (issue 27: one node of three lost or restarted).
    /// Whether the load is a careful client that retries with its own task ids.
    fn retrying(&self) -> bool {
        matches!(self, Fault::BridgeKill(_))
    }

    fn invisible(&self) -> bool {
        matches!(self, Fault::NodeStop(..) | Fault::NodeRollingRestart)
    }

    /// How many times the fault strikes: each can leave every worker's
    /// tasks in doubt (ten leaders killed in turn; each worker restarted).
    fn strikes(&self) -> usize {
        match self {
            Fault::LeaderKills => 10,
            Fault::RollingRestart => WORKERS,
            Fault::NodeRollingRestart => 3,
            _ => 1,
        }
    }

    /// The most duplicated runs `docs/faq.md` allows for this scenario.
    fn duplicate_bound(&self) -> usize {
        IN_DOUBT_PER_STRIKE * self.strikes()
    }

    /// Whether the scenario asserts the daemon double run (a worker keeps
    /// running while it cannot renew its claims).
    fn asserts_double_run(&self) -> bool {
        matches!(self, Fault::Freeze(_) | Fault::Partition(..))
    }
}

/// Runs one scenario: `lead` of load before the fault, `tail` after its recovery.
async fn scenario(name: &'static str, fault: Fault, lead: Duration, tail: Duration) -> Row {
    let mut world = if fault.cluster() {
        World::cluster(fault.timing()).await
    } else {
        World::single().await
    };
    world.seed().await;
    let load = Load::start(world.base_url(), world.nats.js.clone(), fault.retrying());
    let load_started = Utc::now();
    tokio::time::sleep(lead).await;
    let mut notes = Vec::new();
    let began = match &fault {
        Fault::ServerKill(d) => faults::kill_and_restart_server(&mut world, *d).await,
        Fault::Freeze(d) => faults::freeze_worker(&mut world, 0, *d).await,
        Fault::Partition(mode, d) => faults::partition_worker(&mut world, *mode, *d).await,
        Fault::RollingRestart => faults::rolling_restart(&mut world).await,
        Fault::LeaderKills => {
            let (began, kills) = faults::kill_each_leader(&mut world).await;
            notes = kills;
            began
        }
        Fault::QuorumLoss(d) => faults::lose_quorum(&mut world, *d).await,
        Fault::NodeStop(how, d) => {
            let (began, stopped) = faults::stop_claims_leader(&mut world, *how, *d).await;
            notes = stopped;
            began
        }
        Fault::NodeRollingRestart => {
            let (began, restarts) = faults::rolling_node_restart(&mut world).await;
            notes = restarts;
            began
        }
        Fault::BridgeKill(d) => faults::kill_and_restart_bridge(&mut world, *d).await,
    };
    for note in &notes {
        eprintln!("{name}: {note}");
    }
    // Recovered: a create through the bridge answers 200 and every daemon
    // task (seeded and created so far) runs on a live worker.
    let healed = Instant::now();
    let healed_at = Utc::now();
    let probe = json!({"kind": "async:demo:noop", "payload": {}}).to_string();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let recovered = wait_until(Duration::from_secs(90), async || {
        let created = http
            .post(format!("{}/bmw/task/", world.base_url()))
            .header("Content-Type", "application/json")
            .body(probe.clone())
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200);
        created
            && world
                .daemons_bound(DAEMONS + load.accepted().daemons.len())
                .await
    })
    .await;
    let recovery = healed.elapsed();
    assert!(
        recovered,
        "{name}: not recovered {recovery:?} after the fault; bridge logs:\n{}",
        world.bridge.logs().join("\n")
    );
    tokio::time::sleep(tail).await;
    let accepted = load.stop().await;
    for (status, message) in &accepted.messages {
        eprintln!("{name}: answered {status}: {message}");
    }
    let load_ended = Utc::now();
    let tally = accounting::settle(
        &world,
        &accepted,
        (load_started, load_ended),
        Duration::from_secs(90),
    )
    .await;

    let window = (load_ended - load_started).num_seconds().max(0) as usize;
    // Ticks due while the servers were reachable: the window minus the fault
    // and its recovery (a tick due while the server is down is reported, not
    // asserted).
    let fault_and_recovery = (healed_at - began).to_std().unwrap_or_default() + recovery;
    let due_outside = window.saturating_sub(fault_and_recovery.as_secs() as usize + 1);
    let row = Row {
        scenario: name,
        fault: fault.describe(),
        load: accepted.summary(),
        lost: tally.lost.len() + tally.daemons_missing.len(),
        duplicated: tally.duplicated,
        duplicate_bound: fault.duplicate_bound().to_string(),
        double_run: tally.double_run,
        daemon_runs: tally.daemon_runs,
        restarts: tally.restarts,
        recovery,
        ticks: format!(
            "{} / {window} (twice: {})",
            tally.ticks_ran, tally.ticks_twice
        ),
    };
    row.publish();

    assert!(
        tally.lost.is_empty(),
        "{name}: async tasks lost: {:?}",
        tally.lost
    );
    assert!(
        tally.daemons_missing.is_empty(),
        "{name}: daemon creates answered 2xx but not stored: {:?}",
        tally.daemons_missing
    );
    assert!(
        tally.duplicated <= fault.duplicate_bound(),
        "{name}: {} duplicated runs (bound {})",
        tally.duplicated,
        fault.duplicate_bound()
    );
    assert!(
        tally.ticks_ran + 3 >= due_outside,
        "{name}: {} periodic ticks ran in {window} s ({due_outside} due outside the fault)",
        tally.ticks_ran
    );
    if fault.asserts_double_run() {
        assert!(
            tally.double_run <= HEARTBEAT,
            "{name}: {:?} ran in two processes at once for {:?} (more than one heartbeat)",
            tally.double_run_task,
            tally.double_run
        );
    }
    if fault.retrying() {
        // The workers saw no fault: a retried create is never a second task.
        assert_eq!(tally.duplicated, 0, "{name}: a retried create ran twice");
        assert!(
            accepted.refused.is_empty(),
            "{name}: creates not accepted however often retried: {:?} {:?}",
            accepted.refused,
            accepted.messages
        );
    }
    if fault.invisible() {
        let why: Vec<String> = world
            .worker_logs()
            .iter()
            .flat_map(|log| log.lines.iter())
            .filter(|l| l.contains("claim") || l.contains("instance stopped"))
            .take(40)
            .cloned()
            .collect();
        assert_eq!(
            tally.restarts,
            0,
            "{name}: daemon instances stopped and started again; the workers said:\n{}",
            why.join("\n")
        );
        let http_refusals: Vec<_> = accepted
            .refused
            .iter()
            .filter(|(status, _)| **status != 1)
            .collect();
        assert!(
            http_refusals.is_empty(),
            "{name}: creates through the bridge not answered 2xx: {http_refusals:?} {:?}",
            accepted.messages
        );
    }
    row
}

const SECOND: Duration = Duration::from_secs(1);

/// The accounting can fail: a task accepted on a queue no worker takes, and
/// a daemon create that was never made, are reported lost.
#[tokio::test(flavor = "multi_thread")]
async fn the_accounting_reports_what_did_not_run() {
    let world = World::single().await;
    let held = json!({"kind": "async:demo:echo", "payload": {}, "options": {"queue": "nobody"}});
    let data = crate::harness::create_ok(&world.base_url(), &held).await;
    let ran = json!({"kind": "async:demo:echo", "payload": {"ran": true}});
    let ran = crate::harness::create_ok(&world.base_url(), &ran).await;
    let accepted = crate::load::Accepted {
        echo: vec![
            data["task_id"].as_str().unwrap().to_owned(),
            ran["task_id"].as_str().unwrap().to_owned(),
        ],
        daemons: vec!["daemon:demo:demo-never".into()],
        ..Default::default()
    };
    let now = Utc::now();
    let tally = accounting::settle(&world, &accepted, (now, now), 5 * SECOND).await;
    assert_eq!(tally.lost.len(), 1, "{:?}", tally.lost);
    assert!(
        tally.lost[0].starts_with(&accepted.echo[0]),
        "{:?}",
        tally.lost
    );
    assert_eq!(tally.daemons_missing, ["daemon:demo:demo-never"]);
}

// The quick subset (`cargo test`, `.ci/run`).

#[tokio::test(flavor = "multi_thread")]
async fn quick_server_kill_loses_nothing() {
    scenario(
        "quick: server kill",
        Fault::ServerKill(4 * SECOND),
        3 * SECOND,
        2 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quick_partition_loses_nothing_and_runs_daemons_once() {
    scenario(
        "quick: partition (refuse)",
        Fault::Partition(Mode::Refuse, 5 * SECOND),
        3 * SECOND,
        2 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quick_bridge_kill_loses_nothing_and_retries_make_no_second_task() {
    scenario(
        "quick: bridge kill -9",
        Fault::BridgeKill(SECOND),
        3 * SECOND,
        2 * SECOND,
    )
    .await;
}

// The whole suite: `cargo test --test chaos -- --ignored --test-threads 1 --nocapture`.

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite: run with -- --ignored --test-threads 1"]
async fn s1_server_kill_under_load() {
    scenario(
        "1 server kill",
        Fault::ServerKill(6 * SECOND),
        8 * SECOND,
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite: run with -- --ignored --test-threads 1"]
async fn s2_worker_frozen() {
    scenario(
        "2 SIGSTOP",
        Fault::Freeze(10 * SECOND),
        8 * SECOND,
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite: run with -- --ignored --test-threads 1"]
async fn s3_partition_refused() {
    scenario(
        "3 partition, refuse",
        Fault::Partition(Mode::Refuse, 8 * SECOND),
        8 * SECOND,
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite: run with -- --ignored --test-threads 1"]
async fn s4_partition_black_holed() {
    scenario(
        "4 partition, black hole",
        Fault::Partition(Mode::BlackHole, 8 * SECOND),
        8 * SECOND,
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite: run with -- --ignored --test-threads 1"]
async fn s5_rolling_restart() {
    scenario(
        "5 rolling restart",
        Fault::RollingRestart,
        8 * SECOND,
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite: run with -- --ignored --test-threads 1"]
async fn s6_cluster_leader_kills() {
    scenario(
        "6 cluster leader kills",
        Fault::LeaderKills,
        8 * SECOND,
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite: run with -- --ignored --test-threads 1"]
async fn s7_cluster_quorum_lost() {
    scenario(
        "7 cluster quorum lost",
        Fault::QuorumLoss(6 * SECOND),
        8 * SECOND,
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite: run with -- --ignored --test-threads 1"]
async fn s8_claims_leader_node_killed() {
    scenario(
        "8 node kill -9",
        Fault::NodeStop(faults::NodeStop::Kill, 15 * SECOND),
        8 * SECOND,
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite: run with -- --ignored --test-threads 1"]
async fn s9_claims_leader_node_terminated() {
    scenario(
        "9 node SIGTERM",
        Fault::NodeStop(faults::NodeStop::Term, 15 * SECOND),
        8 * SECOND,
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite: run with -- --ignored --test-threads 1"]
async fn s10_rolling_node_restart() {
    scenario(
        "10 rolling node restart",
        Fault::NodeRollingRestart,
        8 * SECOND,
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite: run with -- --ignored --test-threads 1"]
async fn s11_bridge_killed() {
    scenario(
        "11 bridge kill -9",
        Fault::BridgeKill(2 * SECOND),
        8 * SECOND,
        8 * SECOND,
    )
    .await;
}
