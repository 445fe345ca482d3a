//! nats-server restarts during a run: workers reconnect and every task is
//! running again afterwards.

use std::time::Duration;

use serde_json::json;

use crate::harness::{BmwProcess, TestEnv};

#[tokio::test(flavor = "multi_thread")]
async fn tasks_run_again_after_a_server_restart() {
    let mut env = TestEnv::start().await;
    let worker = BmwProcess::worker(&env.url(), &[]);
    let id = worker.worker_id().await;
    crate::harness::create_demos(&env.client, 3).await;
    assert_eventually!(
        Duration::from_secs(10),
        env.loads().await.get(&id) == Some(&3),
        "three tasks running"
    );

    // Kill the server (as a crash would), keep it down past the claim TTL, restart it.
    env.server.server.kill().await;
    tokio::time::sleep(Duration::from_secs(4)).await; // an outage longer than the 3 s claim TTL
    env.server.server.restart().await.expect("server restarts");

    assert_eventually!(
        Duration::from_secs(30),
        env.loads().await.get(&id) == Some(&3),
        "tasks running again after the restart; logs:\n{}",
        worker.logs().join("\n")
    );
    // And the worker still takes new commands.
    let body = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": 99}});
    env.client
        .submit_json("bmw.task.create", body.to_string().as_bytes())
        .await
        .unwrap();
    assert_eventually!(
        Duration::from_secs(15),
        env.loads().await.get(&id) == Some(&4),
        "a new task runs after the restart"
    );
}

/// While nats-server is down, a create is "try again later" (503), never a
/// refusal of the caller's input (400): a schedule whose ack times out was
/// answered 400 "invalid options" before NATS errors were typed.
#[tokio::test(flavor = "multi_thread")]
async fn an_outage_answers_503_not_400() {
    let mut env = TestEnv::start().await;
    env.server.server.kill().await;
    let creates = [
        json!({"kind": "periodic:demo:tick", "options": {"every": "10s"}}),
        json!({"kind": "async:demo:echo", "payload": {"n": 1}}),
    ];
    for body in &creates {
        let err = env
            .client
            .submit_json("bmw.task.create", body.to_string().as_bytes())
            .await
            .expect_err("nothing can be stored while the server is down");
        assert_eq!(err.status(), 503, "{body}: {err}");
        assert!(err.is_transient(), "{body}: {err}");
        let outcome = bmw::task::Outcome::from(err);
        assert_eq!((outcome.result, outcome.code), (false, 503));
    }
    env.server.server.restart().await.expect("server restarts");
    assert_eventually!(
        Duration::from_secs(20),
        env.client
            .submit_json("bmw.task.create", creates[0].to_string().as_bytes())
            .await
            .is_ok(),
        "the same create works once the server is back"
    );
}
