//! A 3-node cluster with replicated streams and buckets: killing a node
//! (whichever leads) does not stop or restart running daemon tasks, and
//! commands keep working.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::harness::{BmwProcess, NatsCluster, wait_until};

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_cluster_node_keeps_tasks_running() {
    let mut cluster = NatsCluster::start(3).await;
    let url = cluster.url();
    let (nats, client) = cluster.client().await;
    // Default claim TTL (15 s) and heartbeat (5 s): a leader election (about 5 s)
    // must be ridden out by retried renewals, not by moving tasks.
    let args = [
        "worker",
        "--demo-kinds",
        "--replicas",
        "3",
        "--claim-ttl",
        "15s",
        "--heartbeat",
        "5s",
    ];
    let w1 = BmwProcess::spawn(&url, &args);
    let w2 = BmwProcess::spawn(&url, &args);
    w1.worker_id().await;
    w2.worker_id().await;
    let mut started = nats
        .client
        .subscribe("bmw.event.daemon.*.started")
        .await
        .unwrap();
    crate::harness::create_demos(&client, 4).await;
    let all_bound = async || {
        let rows = client.list_daemon().await.unwrap_or_default();
        rows.len() == 4 && rows.iter().all(|r| r.binding.worker_is_normal)
    };
    assert!(
        wait_until(Duration::from_secs(20), all_bound).await,
        "tasks running on the cluster"
    );
    let mut starts = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), started.next()).await {
        starts += 1;
    }
    assert_eq!(starts, 4, "each task started once");

    cluster.nodes[0].kill().await;
    // Over two claim renewals after the kill, every task stays bound and none restarts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), started.next()).await
        {
            panic!(
                "a task restarted after a node was killed: {}",
                String::from_utf8_lossy(&m.payload)
            );
        }
    }
    assert!(
        wait_until(Duration::from_secs(10), all_bound).await,
        "tasks still bound after the kill"
    );
    assert!(
        !w1.has_log("claim lost") && !w2.has_log("claim lost"),
        "a claim was lost:\n{}",
        w1.logs().join("\n")
    );
    let body = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": 99}});
    assert!(
        client
            .submit_json("bmw.task.create", body.to_string().as_bytes())
            .await
            .is_ok()
    );
    assert!(
        wait_until(Duration::from_secs(20), async || client
            .list_daemon()
            .await
            .is_ok_and(
                |r| r.len() == 5 && r.iter().all(|r| r.binding.worker_is_normal)
            ))
        .await,
        "a task created after the kill runs"
    );
}

/// The leader of `BMW_ASYNC` is killed while creates arrive at 20/s: the
/// election (about 5 s) must not reach the caller. Each create is retried
/// inside its request with the same `Nats-Msg-Id`, so none fails and none is
/// stored twice.
#[tokio::test(flavor = "multi_thread")]
async fn creates_ride_out_a_stream_leader_election() {
    let mut cluster = NatsCluster::start(3).await;
    let (nats, client) = cluster.client().await;
    let client = std::sync::Arc::new(client);
    let mut stream = nats.js.get_stream("BMW_ASYNC").await.unwrap();
    let leader = leader_of(&stream);

    // 20 creates a second for 12 s on a queue no worker takes.
    let sender = client.clone();
    let failed = creates_through_a_leader_kill(&mut cluster, leader, 240, move |n| {
        let client = sender.clone();
        async move {
            let body = json!({"kind": "async:demo:echo", "payload": {"n": n},
                              "options": {"queue": "held", "task_id": format!("t-{n}")}});
            client
                .submit_json("bmw.task.create", body.to_string().as_bytes())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    assert!(
        failed.is_empty(),
        "creates failed during the election: {failed:?}"
    );
    // Every task is stored once.
    let info = stream.info().await.unwrap();
    let held = wait_until(Duration::from_secs(10), async || {
        client
            .list_async(&bmw::queue::ListQuery {
                queue: Some("held".into()),
                limit: 1000,
                ..Default::default()
            })
            .await
            .is_ok_and(|page| page.tasks.len() == 240)
    })
    .await;
    assert!(
        held,
        "240 tasks pending once each (stream: {:?})",
        info.state
    );
}

/// The leader of the daemon specs bucket is killed while daemon creates are
/// applied at 20/s (what a worker does with a `bmw.task.create` for a daemon
/// kind): the election must not fail them (the chaos suite saw 503s `no
/// stream found for given subject` here), and each task is stored once.
#[tokio::test(flavor = "multi_thread")]
async fn daemon_creates_ride_out_a_bucket_leader_election() {
    let mut cluster = NatsCluster::start(3).await;
    let (nats, _client) = cluster.client().await;
    let ops = bmw::ops::Operations::open(&nats, std::sync::Arc::new(bmw::builtin::registry()))
        .await
        .unwrap();
    let bucket = format!("KV_{}", bmw::nats::names::BUCKET_DAEMON_TASKS);
    let leader = leader_of(&nats.js.get_stream(&bucket).await.unwrap());

    let applier = ops.clone();
    let failed = creates_through_a_leader_kill(&mut cluster, leader, 200, move |n| {
        let ops = applier.clone();
        async move {
            let body = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": n}});
            let command =
                bmw::command::wire::parse("bmw.task.create", body.to_string().as_bytes()).unwrap();
            ops.apply(&command)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    assert!(
        failed.is_empty(),
        "creates failed during the election: {failed:?}"
    );
    let specs = bmw::daemon::spec::SpecStore::open(&nats.js).await.unwrap();
    assert_eq!(
        specs.list().await.unwrap().len(),
        200,
        "each task stored once"
    );
}

/// The index of the node (`n<i>`) leading `stream` when it was looked up.
fn leader_of(stream: &async_nats::jetstream::stream::Stream) -> usize {
    stream
        .cached_info()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.as_deref())
        .and_then(|l| l.strip_prefix('n'))
        .and_then(|n| n.parse().ok())
        .expect("the stream has a leader n<i>")
}

/// Sends `count` creates at 20 a second with `create`, kills node `leader`
/// once 40 have been answered, and returns the creates that failed (with
/// their error), after printing how many and the slowest answer.
async fn creates_through_a_leader_kill<F, Fut>(
    cluster: &mut NatsCluster,
    leader: usize,
    count: usize,
    create: F,
) -> Vec<(usize, String)>
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let answered = std::sync::Arc::new(AtomicUsize::new(0));
    let sender = {
        let answered = answered.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(50));
            let mut sends = Vec::new();
            for n in 0..count {
                ticker.tick().await;
                let (done, answered) = (create(n), answered.clone());
                sends.push(tokio::spawn(async move {
                    let started = tokio::time::Instant::now();
                    let result = done.await;
                    answered.fetch_add(1, Ordering::Relaxed);
                    (n, result, started.elapsed())
                }));
            }
            futures::future::join_all(sends).await
        })
    };
    let loaded = wait_until(Duration::from_secs(10), async || {
        answered.load(Ordering::Relaxed) >= 40
    })
    .await;
    assert!(loaded, "creates are answered before the kill");
    cluster.nodes[leader].kill().await;
    let results: Vec<_> = sender
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let slowest = results.iter().map(|(_, _, t)| *t).max().unwrap_or_default();
    let failed: Vec<(usize, String)> = results
        .into_iter()
        .filter_map(|(n, r, _)| r.err().map(|e| (n, e)))
        .collect();
    eprintln!(
        "leader n{leader} killed: {count} creates, {} failed, slowest answered in {slowest:?}",
        failed.len()
    );
    failed
}

/// Issue 27: `kill -9` of the node leading the claims bucket, restarted 15 s
/// later, with default claim TTL and heartbeat, stops no daemon instance:
/// a leader election and a connection moving to another node are ridden
/// out by renewals retried within the claim's deadline.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_claims_leader_and_restarting_it_stops_no_daemon_task() {
    const TASKS: usize = 60;
    let mut cluster = NatsCluster::start(3).await;
    let url = cluster.url();
    let (nats, client) = cluster.client().await;
    let args = ["worker", "--demo-kinds", "--replicas", "3"];
    let w1 = BmwProcess::spawn(&url, &args);
    let w2 = BmwProcess::spawn(&url, &args);
    w1.worker_id().await;
    w2.worker_id().await;
    let mut started = nats
        .client
        .subscribe("bmw.event.daemon.*.started")
        .await
        .unwrap();
    crate::harness::create_demos(&client, TASKS).await;
    let all_bound = async || {
        let rows = client.list_daemon().await.unwrap_or_default();
        rows.len() == TASKS && rows.iter().all(|r| r.binding.worker_is_normal)
    };
    assert!(
        wait_until(Duration::from_secs(30), all_bound).await,
        "tasks running on the cluster"
    );
    let mut starts = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), started.next()).await {
        starts += 1;
    }
    assert_eq!(starts, TASKS, "each task started once");

    let claims = nats.js.get_stream("KV_bmw_daemon_claims").await.unwrap();
    let leader = leader_of(&claims);
    cluster.nodes[leader].kill().await;
    let mut restarts = Vec::new();
    let mut collect = async |restarts: &mut Vec<String>, for_: Duration| {
        let until = tokio::time::Instant::now() + for_;
        while let Ok(Some(m)) = tokio::time::timeout_at(until, started.next()).await {
            restarts.push(String::from_utf8_lossy(&m.payload).into_owned());
        }
    };
    collect(&mut restarts, Duration::from_secs(15)).await;
    cluster.nodes[leader].restart().await.unwrap();
    collect(&mut restarts, Duration::from_secs(15)).await;
    let stopped = |w: &BmwProcess| {
        w.logs()
            .iter()
            .filter(|l| l.contains("daemon instance stopped"))
            .count()
    };
    assert!(
        restarts.is_empty() && stopped(&w1) + stopped(&w2) == 0,
        "n{leader} (claims leader) killed and restarted: {} instances started again, {} stopped",
        restarts.len(),
        stopped(&w1) + stopped(&w2)
    );
    assert!(
        wait_until(Duration::from_secs(10), all_bound).await,
        "tasks still bound"
    );
}
