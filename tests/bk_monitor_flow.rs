//! bk-monitor's whole flow, as its APM pre-calculation code plays it over
//! HTTP (issue 12), against `bmw run` and against a bridge with two workers
//! on different queues, both running the `bk_monitor_apm` example (bmw with
//! `daemon:apm:pre_calculate` registered): create with a string `data_id`,
//! find the task by `str(payload["data_id"])` in the list, reload with a
//! payload (the instance restarts with it; a dimension change is refused),
//! rebalance by creating it again on another queue, remove. Each worker's
//! `/bmw/metrics` is scraped: `daemon_running_task_count{task_dimension=
//! "<data_id>"}` exists on exactly the worker that runs the task, and on
//! none once it is removed.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, NatsServer, api, free_port, http, wait_until};

const KIND: &str = "daemon:apm:pre_calculate";
const DATA_ID: &str = "1573001";
/// How long a move, a start or a stop may take (claim TTL 3 s, heartbeat 1 s).
const SETTLE: Duration = Duration::from_secs(20);

/// A process of the example and where its metrics are scraped.
struct Node {
    process: BmwProcess,
    metrics_url: String,
    queue: Option<&'static str>,
}

/// Writes a TOML config for the example and starts it as `role`.
fn start(dir: &tempfile::TempDir, role: &str, settings: &str) -> BmwProcess {
    let path = dir.path().join(format!("{role}-{}.toml", free_port()));
    let fast = "claim-ttl = \"3s\"\nheartbeat = \"1s\"\ngrace = \"2s\"\nreply-timeout = \"5s\"\n";
    std::fs::write(&path, format!("{fast}{settings}")).unwrap();
    BmwProcess::spawn_example("bk_monitor_apm", &[role, path.to_str().unwrap()])
}

async fn wait_http(url: &str, process: &BmwProcess) {
    let up = wait_until(SETTLE, async || reqwest::get(url).await.is_ok()).await;
    assert!(
        up,
        "{url} did not answer; logs:\n{}",
        process.logs().join("\n")
    );
}

/// Whether the Prometheus text at `url` has the running series of `data_id`.
async fn runs(url: &str, data_id: &str) -> bool {
    let Ok(response) = api::get(url).try_send().await else {
        return false;
    };
    let text = response.text;
    let label = format!("task_dimension=\"{data_id}\"");
    text.lines()
        .any(|l| l.starts_with("daemon_running_task_count{") && l.contains(&label))
}

/// The nodes whose metrics show `DATA_ID` running.
async fn running_on(nodes: &[Node]) -> Vec<usize> {
    let mut on = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        if runs(&node.metrics_url, DATA_ID).await {
            on.push(i);
        }
    }
    on
}

/// bk-monitor's `result` check: the envelope's `result` must be true.
fn expect_ok(status: u16, body: &Value, what: &str) {
    assert!(
        status == 200 && body["result"] == true,
        "{what}: {status} {body}"
    );
}

/// The listed daemon task whose `str(payload["data_id"])` is `data_id`.
async fn find(base: &str, data_id: &str) -> Option<Value> {
    let (status, body) = http(
        Method::GET,
        &format!("{base}/bmw/task/?task_type=daemon"),
        None,
    )
    .await;
    expect_ok(status, &body, "list");
    body["data"].as_array()?.iter().find_map(|task| {
        let id = &task["payload"]["data_id"];
        let text = id
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| id.to_string());
        (text == data_id).then(|| task.clone())
    })
}

/// Plays the flow through the bridge at `base`; `nodes` are the workers
/// (with the queue each listens on, when they differ).
async fn play(base: &str, nodes: &[Node]) {
    // Create, as bk-monitor does: a string data_id and a queue.
    let create = |queue: &str| {
        json!({"kind": KIND, "payload": {"data_id": DATA_ID, "app_name": "shop"},
               "options": {"queue": queue}})
        .to_string()
    };
    let (status, body) = http(
        Method::POST,
        &format!("{base}/bmw/task/"),
        Some(&create("apm-q1")),
    )
    .await;
    expect_ok(status, &body, "create");

    // Find it by data id in the list; the uni_id comes from there.
    let task = find(base, DATA_ID)
        .await
        .expect("the created task is listed");
    let uni_id = task["uni_id"].as_str().unwrap().to_owned();
    assert_eq!(task["options"]["Queue"], "apm-q1", "{task}");

    // It runs on exactly one worker (of queue apm-q1 when queues differ).
    let one = wait_until(SETTLE, async || running_on(nodes).await.len() == 1).await;
    assert!(
        one,
        "the running series is on {:?}",
        running_on(nodes).await
    );
    let holder = running_on(nodes).await[0];
    if let Some(queue) = nodes[holder].queue {
        assert_eq!(queue, "apm-q1");
    }

    // Reload with a payload without data_id: the instance restarts with it.
    let reload = json!({"task_uni_id": uni_id, "payload": {"app_name": "shop-v2"}}).to_string();
    let (status, body) = http(
        Method::POST,
        &format!("{base}/bmw/task/daemon/reload"),
        Some(&reload),
    )
    .await;
    expect_ok(status, &body, "reload");
    let process = &nodes[holder].process;
    process
        .wait_log(SETTLE, &["pre-calculation started", "shop-v2", DATA_ID])
        .await;
    let task = find(base, DATA_ID).await.expect("still listed");
    assert_eq!(task["payload"]["app_name"], "shop-v2", "{task}");
    assert_eq!(task["uni_id"], uni_id.as_str(), "the uni_id is kept");

    // A reload that would change the dimension is refused, and changes nothing.
    let moved = json!({"task_uni_id": uni_id, "payload": {"data_id": "999"}}).to_string();
    let (status, body) = http(
        Method::POST,
        &format!("{base}/bmw/task/daemon/reload"),
        Some(&moved),
    )
    .await;
    assert_eq!((status, &body["result"]), (400, &json!(false)), "{body}");
    assert!(find(base, "999").await.is_none());

    // Rebalance: the same task created again on another queue.
    let (status, body) = http(
        Method::POST,
        &format!("{base}/bmw/task/"),
        Some(&create("apm-q2")),
    )
    .await;
    expect_ok(status, &body, "re-create on apm-q2");
    let task = find(base, DATA_ID).await.expect("still listed");
    assert_eq!(task["options"]["Queue"], "apm-q2", "{task}");
    if let Some(q2) = nodes.iter().position(|n| n.queue == Some("apm-q2")) {
        let moved = wait_until(SETTLE, async || running_on(nodes).await == [q2]).await;
        assert!(
            moved,
            "after the move the series is on {:?}",
            running_on(nodes).await
        );
        let worker_id = nodes[q2].process.worker_id().await;
        let bound = wait_until(SETTLE, async || {
            find(base, DATA_ID)
                .await
                .map(|t| t["binding"]["worker_id"].clone())
                == Some(json!(worker_id))
        })
        .await;
        assert!(
            bound,
            "the list shows the apm-q2 worker: {:?}",
            find(base, DATA_ID).await
        );
    } else {
        let one = wait_until(SETTLE, async || running_on(nodes).await.len() == 1).await;
        assert!(one, "the series is on {:?}", running_on(nodes).await);
    }

    // Remove: the series is gone from every worker.
    let delete = json!({"task_type": "daemon", "task_uni_id": uni_id}).to_string();
    let (status, body) = http(Method::DELETE, &format!("{base}/bmw/task/"), Some(&delete)).await;
    expect_ok(status, &body, "delete");
    let gone = wait_until(SETTLE, async || running_on(nodes).await.is_empty()).await;
    assert!(
        gone,
        "after the delete the series is on {:?}",
        running_on(nodes).await
    );
    assert!(
        find(base, DATA_ID).await.is_none(),
        "the task is no longer listed"
    );
}

#[tokio::test]
async fn the_bk_monitor_flow_runs_against_bmw_run() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let settings = format!(
        "nats-url = \"{}\"\nhttp-addr = \"127.0.0.1:{port}\"\nqueues = [\"apm-q1\", \"apm-q2\"]\n",
        nats.url()
    );
    let process = start(&dir, "run", &settings);
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&format!("{base}/health"), &process).await;
    let nodes = [Node {
        process,
        metrics_url: format!("{base}/bmw/metrics"),
        queue: None,
    }];
    play(&base, &nodes).await;
}

#[tokio::test]
async fn the_bk_monitor_flow_runs_against_a_bridge_and_two_workers_on_different_queues() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for queue in ["apm-q1", "apm-q2"] {
        let port = free_port();
        let settings = format!(
            "nats-url = \"{}\"\nmetrics-addr = \"127.0.0.1:{port}\"\nqueues = [\"{queue}\"]\n",
            nats.url()
        );
        let process = start(&dir, "worker", &settings);
        let metrics_url = format!("http://127.0.0.1:{port}/bmw/metrics");
        wait_http(&metrics_url, &process).await;
        process.worker_id().await;
        nodes.push(Node {
            process,
            metrics_url,
            queue: Some(queue),
        });
    }
    let port = free_port();
    let settings = format!(
        "nats-url = \"{}\"\nhttp-addr = \"127.0.0.1:{port}\"\n",
        nats.url()
    );
    let bridge = start(&dir, "bridge", &settings);
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&format!("{base}/health"), &bridge).await;
    play(&base, &nodes).await;
}
