//! The faults, one function each. Each returns when the fault is over (the
//! server restarted, the worker resumed, the cut healed...) with when it
//! began, so the scenario can time the recovery from there. The fault's
//! length is a sleep on purpose: it is the outage being simulated.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::harness::proxy::Mode;
use crate::harness::wait_until;
use crate::world::{Servers, World};

/// `kill -9` of the single server, down for `outage`, restarted on the same store.
pub(crate) async fn kill_and_restart_server(world: &mut World, outage: Duration) -> DateTime<Utc> {
    let Servers::Single(server) = &mut world.servers else {
        panic!("a single-node scenario")
    };
    let began = Utc::now();
    server.server.kill().await;
    tokio::time::sleep(outage).await;
    server.server.restart().await.expect("nats-server restarts");
    began
}

/// `kill -9` of the bridge, a new one on its port after `outage`.
pub(crate) async fn kill_and_restart_bridge(world: &mut World, outage: Duration) -> DateTime<Utc> {
    let began = Utc::now();
    world.kill_and_restart_bridge(outage).await;
    began
}

/// SIGSTOP of worker `index` for `pause`, then SIGCONT.
pub(crate) async fn freeze_worker(
    world: &mut World,
    index: usize,
    pause: Duration,
) -> DateTime<Utc> {
    let slot = &mut world.workers[index];
    let pid = slot.process.as_ref().expect("a running worker").pid() as i32;
    let began = Utc::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    tokio::time::sleep(pause).await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    slot.frozen.push((began, Utc::now()));
    began
}

/// Worker 0 (behind the proxy) cut off in `mode` for `cut`, then healed.
pub(crate) async fn partition_worker(
    world: &mut World,
    mode: Mode,
    cut: Duration,
) -> DateTime<Utc> {
    let proxy = world.proxy.as_ref().expect("worker 0 behind a proxy");
    let began = Utc::now();
    proxy.set(mode);
    tokio::time::sleep(cut).await;
    proxy.set(Mode::Pass);
    began
}

/// SIGTERM each worker in turn, wait for its exit, start a new one in its place.
pub(crate) async fn rolling_restart(world: &mut World) -> DateTime<Utc> {
    let began = Utc::now();
    for index in 0..world.workers.len() {
        let mut slot = std::mem::replace(
            &mut world.workers[index],
            crate::world::Worker {
                process: None,
                frozen: Vec::new(),
                past: Vec::new(),
                url: String::new(),
            },
        );
        let exited = slot.process.as_mut().expect("a running worker").sigterm();
        assert!(exited, "worker {index} exits on SIGTERM");
        slot.retire();
        world.spawn_worker(&mut slot).await;
        world.workers[index] = slot;
    }
    began
}

/// The stream names of bmw's streams and KV buckets.
pub(crate) fn bmw_streams() -> Vec<String> {
    use bmw::nats::names::*;
    let mut streams: Vec<String> = ALL_STREAMS.iter().map(|s| (*s).to_owned()).collect();
    streams.extend(
        [
            BUCKET_DAEMON_TASKS,
            BUCKET_DAEMON_CLAIMS,
            BUCKET_WORKERS,
            BUCKET_ASYNC_TASKS,
            BUCKET_UNIQUE,
            BUCKET_PERIODIC,
        ]
        .iter()
        .map(|b| format!("KV_{b}")),
    );
    streams
}

/// The leader of `stream` (`n<i>`) per node `monitor`'s `/jsz`.
async fn leader_of(monitor: u16, stream: &str) -> Option<usize> {
    let url = format!("http://127.0.0.1:{monitor}/jsz?accounts=true&streams=true");
    let jsz: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
    jsz["account_details"]
        .as_array()?
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .find(|s| s["name"] == stream)?["cluster"]["leader"]
        .as_str()?
        .strip_prefix('n')?
        .parse()
        .ok()
}

/// Node `i`'s `/healthz` answers ok (JetStream current).
async fn healthy(monitor: u16) -> bool {
    let url = format!("http://127.0.0.1:{monitor}/healthz");
    matches!(reqwest::get(url).await, Ok(r) if r.status().is_success())
}

/// For each bmw stream and bucket in turn: find its leader through a live
/// node's monitoring endpoint, kill that node, wait for a new leader, restart
/// the node and wait until it is healthy. Returns the kills made.
pub(crate) async fn kill_each_leader(world: &mut World) -> (DateTime<Utc>, Vec<String>) {
    let Servers::Cluster(cluster) = &mut world.servers else {
        panic!("a cluster scenario")
    };
    let monitors = cluster.monitor_ports.clone();
    let began = Utc::now();
    let mut kills = Vec::new();
    for stream in bmw_streams() {
        let mut leader = None;
        wait_until(Duration::from_secs(30), async || {
            leader = leader_of(monitors[0], &stream).await;
            leader.is_some()
        })
        .await;
        let leader = leader.unwrap_or_else(|| panic!("{stream} has a leader"));
        let killed = Instant::now();
        cluster.nodes[leader].kill().await;
        let other = monitors[(leader + 1) % monitors.len()];
        let elected = wait_until(Duration::from_secs(30), async || {
            leader_of(other, &stream).await.is_some_and(|l| l != leader)
        })
        .await;
        let election = killed.elapsed();
        cluster.nodes[leader]
            .restart()
            .await
            .expect("node restarts");
        let back = wait_until(Duration::from_secs(60), async || {
            healthy(monitors[leader]).await
        })
        .await;
        assert!(back, "n{leader} healthy again after its restart");
        kills.push(format!(
            "{stream}: n{leader} killed, {}",
            if elected {
                format!("new leader in {election:.1?}")
            } else {
                "no new leader in 30 s".into()
            }
        ));
    }
    (began, kills)
}

/// Kill 2 of the 3 nodes (quorum lost) for `outage`, then restart both.
pub(crate) async fn lose_quorum(world: &mut World, outage: Duration) -> DateTime<Utc> {
    let Servers::Cluster(cluster) = &mut world.servers else {
        panic!("a cluster scenario")
    };
    let began = Utc::now();
    cluster.nodes[1].kill().await;
    cluster.nodes[2].kill().await;
    tokio::time::sleep(outage).await;
    let (first, rest) = cluster.nodes.split_at_mut(2);
    let (_, second) = first.split_at_mut(1);
    let (a, b) = futures::join!(second[0].restart(), rest[0].restart());
    a.expect("n1 restarts");
    b.expect("n2 restarts");
    began
}

/// How one node of the cluster is taken down.
#[derive(Clone, Copy, Debug)]
pub(crate) enum NodeStop {
    /// `kill -9`: power, OOM, a crash.
    Kill,
    /// `SIGTERM`: a plain stop, no lame duck.
    Term,
}

/// The node leading the daemon claims bucket, per the first live node's `/jsz`.
async fn claims_leader(monitors: &[u16]) -> usize {
    let stream = format!("KV_{}", bmw::nats::names::BUCKET_DAEMON_CLAIMS);
    let mut leader = None;
    wait_until(Duration::from_secs(30), async || {
        for monitor in monitors {
            leader = leader_of(*monitor, &stream).await;
            if leader.is_some() {
                return true;
            }
        }
        false
    })
    .await;
    leader.unwrap_or_else(|| panic!("{stream} has a leader"))
}

/// Waits until node `index` answers `/healthz` ok again after its restart.
async fn back_healthy(monitors: &[u16], index: usize) {
    let back = wait_until(Duration::from_secs(60), async || {
        healthy(monitors[index]).await
    })
    .await;
    assert!(back, "n{index} healthy again after its restart");
}

/// Stops the node leading the claims bucket (`how`), leaves it down for
/// `outage`, restarts it on its store and waits until it is healthy.
/// Returns when the fault began and which node it was.
pub(crate) async fn stop_claims_leader(
    world: &mut World,
    how: NodeStop,
    outage: Duration,
) -> (DateTime<Utc>, Vec<String>) {
    let Servers::Cluster(cluster) = &mut world.servers else {
        panic!("a cluster scenario")
    };
    let monitors = cluster.monitor_ports.clone();
    let leader = claims_leader(&monitors).await;
    let began = Utc::now();
    match how {
        NodeStop::Kill => cluster.nodes[leader].kill().await,
        NodeStop::Term => cluster.nodes[leader].stop().await,
    }
    tokio::time::sleep(outage).await;
    cluster.nodes[leader]
        .restart()
        .await
        .expect("node restarts");
    back_healthy(&monitors, leader).await;
    (
        began,
        vec![format!("n{leader} (claims leader) stopped: {how:?}")],
    )
}

/// Each node in turn as an operator upgrades NATS: lame-duck mode (nats-
/// server's defaults: a 10 s grace period, then its clients closed one by
/// one), restarted once it has exited, the next one only once it is healthy.
pub(crate) async fn rolling_node_restart(world: &mut World) -> (DateTime<Utc>, Vec<String>) {
    let Servers::Cluster(cluster) = &mut world.servers else {
        panic!("a cluster scenario")
    };
    let monitors = cluster.monitor_ports.clone();
    let began = Utc::now();
    let mut notes = Vec::new();
    for index in 0..cluster.nodes.len() {
        let stopping = Instant::now();
        cluster.nodes[index]
            .lame_duck(Duration::from_secs(150))
            .await;
        let exited = stopping.elapsed();
        cluster.nodes[index].restart().await.expect("node restarts");
        back_healthy(&monitors, index).await;
        notes.push(format!(
            "n{index}: lame duck for {exited:.1?}, healthy again {:.1?} after it began",
            stopping.elapsed()
        ));
    }
    (began, notes)
}
