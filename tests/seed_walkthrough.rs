//! The daemon-task walkthrough of `bmw-seed.md`, through the HTTP bridge of a
//! `bmw run` process: create `ok` and `not_ok`, list, the `[RETRY]` line,
//! reload, delete, and the running-task metric.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::harness::{BmwProcess, TestEnv, api, http};

const OK: &str = "daemon:demo:demo-7b22636f6e74656e74223a226f6b227d";
const NOT_OK: &str = "daemon:demo:demo-7b22636f6e74656e74223a226e6f745f6f6b227d";

async fn list(base: &str) -> Vec<Value> {
    let (status, body) = http(
        Method::GET,
        &format!("{base}/bmw/task/?task_type=daemon"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], true);
    body["data"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_walkthrough_through_the_bridge() {
    let env = TestEnv::start().await;
    // Default retry delays (10 s): the first [RETRY] line is logged at once.
    let bmw = BmwProcess::run(&env.url(), &["--retry-base", "10s"]).await;
    let base = bmw.base_url();
    let worker_id = bmw.worker_id().await;

    // The seed's create, exactly as written.
    let create = |content: &str| {
        format!(
            r#"{{"kind": "daemon:demo:demo", "payload": {{"content": "{content}"}}, "options": {{"queue": "default"}}}}"#
        )
    };
    let (status, body) = http(
        Method::POST,
        &format!("{base}/bmw/task/"),
        Some(&create("ok")),
    )
    .await;
    assert_eq!(
        (status, &body["result"], &body["code"]),
        (200, &Value::Bool(true), &Value::from(0)),
        "{body}"
    );
    assert_eq!(body["data"]["uni_id"], OK);
    bmw.wait_log(
        Duration::from_secs(10),
        &["start task instance, payload: map[content:ok] "],
    )
    .await;

    let (status, body) = http(
        Method::POST,
        &format!("{base}/bmw/task/"),
        Some(&create("not_ok")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["uni_id"], NOT_OK);
    bmw.wait_log(Duration::from_secs(10), &[&format!("Binding({NOT_OK} <------> {worker_id}) is discovered, task is started, payload: {{\"content\":\"not_ok\"}}")]).await;
    let retry = bmw
        .wait_log(Duration::from_secs(10), &[&format!("[RETRY] receive ERROR: receive abnormal payload. Task: {NOT_OK}, retryCount: 1 reloadCount: 0 The retry time of the next attempt is: ")])
        .await;
    assert!(retry.contains("(10.00 seconds later)"), "{retry}");

    // The list has both, bound to this live worker.
    let rows = list(&base).await;
    let ids: Vec<&str> = rows.iter().map(|r| r["uni_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [NOT_OK, OK]);
    for row in &rows {
        assert_eq!(row["kind"], "daemon:demo:demo");
        assert_eq!(row["options"]["queue"], "default");
        // BMW lists asynq's options with Go field names; older clients read `Queue`.
        assert_eq!(row["options"]["Queue"], "default", "{row}");
        assert_eq!(row["options"]["Retry"], 10, "{row}");
        assert_eq!(row["options"]["Timeout"], 0, "{row}");
        assert_eq!(row["options"]["Deadline"], "0001-01-01T00:00:00Z", "{row}");
        assert_eq!(row["binding"]["worker_id"], worker_id.as_str(), "{row}");
        assert_eq!(row["binding"]["worker_is_normal"], true);
    }
    assert_eq!(rows[1]["payload"], serde_json::json!({"content": "ok"}));

    // The metric reports the running instance, labelled with its uni_id.
    let metrics = api::get(format!("{base}/metrics")).send().await.text;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("daemon_running_task_count") && l.contains(OK))
        .unwrap_or_else(|| panic!("no running metric for the ok task:\n{metrics}"));
    assert!(line.ends_with(" 1"), "{line}");

    // Reload restarts not_ok with reloadCount: 1.
    let reload = format!(r#"{{"task_uni_id": "{NOT_OK}"}}"#);
    let (status, body) = http(
        Method::POST,
        &format!("{base}/bmw/task/daemon/reload"),
        Some(&reload),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    bmw.wait_log(
        Duration::from_secs(10),
        &[&format!("Task: {NOT_OK}, retryCount: 1 reloadCount: 1 ")],
    )
    .await;

    // Delete stops ok.
    let delete = format!(r#"{{"task_type": "daemon", "task_uni_id": "{OK}"}}"#);
    let (status, body) = http(Method::DELETE, &format!("{base}/bmw/task/"), Some(&delete)).await;
    assert_eq!(status, 200, "{body}");
    bmw.wait_log(
        Duration::from_secs(10),
        &["receive task instance done, return"],
    )
    .await;
    let rows = list(&base).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["uni_id"], NOT_OK);
    assert_eventually!(
        Duration::from_secs(5),
        env.bindings().await.len() == 1,
        "deleted task still listed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn create_is_idempotent_and_a_new_payload_replaces_it() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let body = r#"{"kind": "daemon:demo:demo", "payload": {"content": "ok"}}"#;
    let (_, first) = http(Method::POST, &format!("{base}/bmw/task/"), Some(body)).await;
    let (_, again) = http(Method::POST, &format!("{base}/bmw/task/"), Some(body)).await;
    assert_eq!(first["data"]["created"], true);
    assert_eq!(again["data"]["created"], false);
    assert_eq!(again["data"]["replaced"], false);
    assert_eq!(first["data"]["uni_id"], again["data"]["uni_id"]);
    bmw.wait_log(
        Duration::from_secs(10),
        &["start task instance, payload: map[content:ok] "],
    )
    .await;
    // Same payload, other options: replaced, and the instance reloads.
    let other =
        r#"{"kind": "daemon:demo:demo", "payload": {"content": "ok"}, "options": {"retry": 3}}"#;
    let (_, replaced) = http(Method::POST, &format!("{base}/bmw/task/"), Some(other)).await;
    assert_eq!(replaced["data"]["replaced"], true, "{replaced}");
    bmw.wait_log(
        Duration::from_secs(10),
        &["daemon task reloaded", "reload_count=1"],
    )
    .await;
    assert_eq!(env.bindings().await.len(), 1);
}
