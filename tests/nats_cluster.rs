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
    let nats = bmw::nats::Nats::connect(&url, "bmw-test").await.unwrap();
    // JetStream needs its meta leader before streams can be created.
    let ready = wait_until(Duration::from_secs(20), async || {
        bmw::nats::provision::provision(&nats.js, 3).await.is_ok()
    })
    .await;
    assert!(ready, "cluster did not become ready");
    let registry = std::sync::Arc::new(bmw::builtin::registry());
    let client = bmw::client::TaskClient::new(nats.clone(), registry, Duration::from_secs(10))
        .await
        .unwrap();
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
    for n in 0..4 {
        let body = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": n}});
        client
            .submit_json("bmw.task.create", body.to_string().as_bytes())
            .await
            .unwrap();
    }
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
