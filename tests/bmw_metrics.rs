//! What BMW's clients read from bmw: `daemon_running_task_count` on the worker
//! that runs an instance and only while it runs (bk-monitor calls a task
//! running when any datapoint exists), each worker's metrics address
//! (`/bmw/metrics` and `/metrics`, `--metrics-addr off`, a taken port), the
//! bridge's `/bmw/metrics`, BMW's metric names, and the run-time log level
//! (`POST /bmw/log/level`).

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{BmwProcess, TestEnv, api, create_ok, free_port, http, wait_until};

/// The kind whose `task_dimension` is `payload.data_id`.
const DIMENSION_KIND: &str = "daemon:demo:dimension";

/// The Prometheus text at `url`, or `None` when nothing answers 200.
async fn scrape(url: &str) -> Option<String> {
    let answer = api::get(url).try_send().await.ok()?;
    (answer.status == 200).then_some(answer.text)
}

/// Whether `text` has a `name{...}` series carrying `label`.
fn has_series(text: &str, name: &str, label: &str) -> bool {
    text.lines()
        .any(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
}

/// A worker serving its metrics on a free loopback port; its base URL.
fn worker_with_metrics(env: &TestEnv) -> (BmwProcess, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let worker = BmwProcess::worker(&env.url(), &["--metrics-addr", &addr]);
    (worker, format!("http://{addr}"))
}

#[tokio::test]
async fn the_running_series_is_on_the_worker_that_runs_the_instance_and_only_while_it_runs() {
    let env = TestEnv::start().await;
    let (_a, a) = worker_with_metrics(&env);
    let (_b, b) = worker_with_metrics(&env);
    for base in [&a, &b] {
        assert!(
            wait_until(Duration::from_secs(20), async || {
                scrape(&format!("{base}/bmw/metrics")).await.is_some()
                    && scrape(&format!("{base}/metrics")).await.is_some()
            })
            .await,
            "{base}: /bmw/metrics and /metrics answer"
        );
    }
    let body = json!({"kind": DIMENSION_KIND, "payload": {"data_id": "1573001"}});
    let uni_id = env.create_daemon(&body).await;
    let label = r#"task_dimension="1573001""#;
    let running_on = async |base: &str| {
        scrape(&format!("{base}/bmw/metrics"))
            .await
            .is_some_and(|t| has_series(&t, "daemon_running_task_count", label))
    };
    // On exactly one worker: the one holding the claim.
    assert!(
        wait_until(Duration::from_secs(20), async || {
            running_on(&a).await != running_on(&b).await
        })
        .await,
        "the series appears on one worker"
    );
    let (holder, other) = if running_on(&a).await {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let text = scrape(&format!("{holder}/metrics")).await.unwrap();
    assert!(
        has_series(&text, "daemon_running_task_count", label),
        "/metrics serves it too: {text}"
    );
    assert!(!running_on(other).await, "not on the other worker");

    let (status, envelope) =
        env.client
            .submit_json(
                bmw::nats::names::SUBJECT_DELETE,
                json!({"task_type": "daemon", "task_uni_id": uni_id})
                    .to_string()
                    .as_bytes(),
            )
            .await
            .map(|s| match s {
                bmw::client::Submitted::Done(o) => (o.result, o),
                bmw::client::Submitted::Accepted { .. }
                | bmw::client::Submitted::Duplicate { .. } => panic!("delete not answered"),
            })
            .expect("delete");
    assert!(status, "delete: {envelope:?}");
    assert!(
        wait_until(Duration::from_secs(5), async || !running_on(holder).await).await,
        "the series is gone once the task is deleted: {}",
        scrape(&format!("{holder}/bmw/metrics"))
            .await
            .unwrap_or_default()
    );
    assert!(!running_on(other).await, "and not on the other worker");
}

/// Inodes of the TCP sockets `pid` listens on (`/proc/<pid>/fd` matched
/// against the listening entries of `/proc/net/tcp` and `tcp6`).
fn listening_sockets(pid: u32) -> Vec<String> {
    let owned: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|target| {
                    let t = target.to_string_lossy().into_owned();
                    t.strip_prefix("socket:[")
                        .and_then(|s| s.strip_suffix(']'))
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut listening = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // st 0A = LISTEN; the inode is the tenth field.
            if fields.get(3) == Some(&"0A")
                && fields.get(9).is_some_and(|i| owned.iter().any(|o| o == i))
            {
                listening.push(fields[9].to_owned());
            }
        }
    }
    listening
}

#[tokio::test]
async fn metrics_addr_off_serves_nothing_and_a_taken_port_stops_the_start_naming_the_flag() {
    let env = TestEnv::start().await;
    let off = BmwProcess::worker(&env.url(), &["--metrics-addr", "off"]);
    off.wait_log(Duration::from_secs(20), &["worker started"])
        .await;
    assert_eq!(
        listening_sockets(off.pid()),
        Vec::<String>::new(),
        "a worker with --metrics-addr off listens on no port"
    );
    // The same check sees the socket of a worker that serves its metrics.
    let (serving, base) = worker_with_metrics(&env);
    assert!(
        wait_until(Duration::from_secs(20), async || {
            scrape(&format!("{base}/bmw/metrics")).await.is_some()
        })
        .await
    );
    assert_eq!(listening_sockets(serving.pid()).len(), 1);

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut refused = BmwProcess::worker(&env.url(), &["--metrics-addr", &addr]);
    let status = refused
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("a worker whose metrics port is taken exits");
    assert!(!status.success());
    let logs = refused.logs().join("\n");
    assert!(
        logs.contains("--metrics-addr") && logs.contains(&addr),
        "the error names the flag and the address: {logs}"
    );
}

#[tokio::test]
async fn the_bridge_serves_bmw_metrics_with_bmw_names() {
    let env = TestEnv::start().await;
    let run = BmwProcess::run(&env.url(), &["--retry-base", "1s"]).await;
    let base = run.base_url();
    let data = create_ok(
        &base,
        &json!({"kind": "async:demo:echo", "payload": {"hello": 1}}),
    )
    .await;
    assert!(data["task_id"].is_string(), "{data}");
    create_ok(
        &base,
        &json!({"kind": DIMENSION_KIND, "payload": {"data_id": "7", "fail": true}}),
    )
    .await;
    // Hostile label values do not become series of their own: any token is
    // an HTTP method, and the command stream takes any `bmw.task.<token>`.
    let odd = reqwest::Client::new()
        .request(
            reqwest::Method::from_bytes(b"FROBNICATE").unwrap(),
            format!("{base}/bmw/task/"),
        )
        .send()
        .await
        .unwrap();
    assert!(odd.status().is_client_error(), "{}", odd.status());
    env.nats
        .js
        .publish("bmw.task.frobnicate", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let wanted = [
        r#"bmw_api_request_total{method="OTHER",path="/bmw/task/",status="405"}"#,
        r#"bmw_commands_total{subject="other",outcome="poison"}"#,
        r#"bmw_api_request_total{method="POST",path="/bmw/task/",status="200"}"#,
        r#"bmw_api_request_cost{method="POST",path="/bmw/task/"}"#,
        r#"bmw_task_total{name="async:demo:echo",module="worker",status="received"}"#,
        r#"bmw_task_total{name="async:demo:echo",module="worker",status="success"}"#,
        r#"bmw_task_total{name="async:demo:echo",module="scheduler",status="enqueue"}"#,
        r#"bmw_task_duration_seconds_bucket{name="async:demo:echo",le="0.1"}"#,
        "# TYPE bmw_task_duration_seconds histogram",
        "# TYPE daemon_task_retry_count gauge",
        r#"daemon_task_retry_count{task_dimension="7"}"#,
        // bmw's own names stay.
        "bridge_requests_total{",
        "async_task_processed_total{",
        "daemon_task_retry_total{",
    ];
    let mut last = String::new();
    let all_there = wait_until(Duration::from_secs(20), async || {
        last = scrape(&format!("{base}/bmw/metrics"))
            .await
            .unwrap_or_default();
        wanted.iter().all(|w| last.contains(w))
    })
    .await;
    let missing: Vec<_> = wanted.iter().filter(|w| !last.contains(*w)).collect();
    assert!(all_there, "missing {missing:?} in:\n{last}");
    assert!(
        !last.contains("FROBNICATE") && !last.contains("frobnicate"),
        "a hostile label value is a series of its own:\n{last}"
    );
    assert!(
        scrape(&format!("{base}/metrics")).await.is_some(),
        "/metrics still answers"
    );

    // The bridge alone serves them too.
    let bridge = BmwProcess::bridge(&env.url(), &[]).await;
    assert!(
        scrape(&format!("{}/bmw/metrics", bridge.base_url()))
            .await
            .is_some(),
        "bmw bridge serves /bmw/metrics"
    );
}

async fn set_level(base: &str, level: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    api::request(
        reqwest::Method::POST,
        format!("{base}/bmw/log/level?log_level={level}"),
    )
    .token(token)
    .envelope()
    .await
}

#[tokio::test]
async fn the_log_level_changes_at_run_time_and_a_bad_level_is_refused() {
    let env = TestEnv::start().await;
    let run = BmwProcess::run(&env.url(), &[]).await;
    let base = run.base_url();
    let debug_line = "request served";
    http(Method::GET, &format!("{base}/bmw/worker/"), None).await;
    assert!(!run.has_log(debug_line), "no debug lines at info");

    let (status, envelope) = set_level(&base, "debug", None).await;
    assert_eq!(status, 200, "{envelope}");
    assert_eq!(envelope["result"], true, "{envelope}");
    http(Method::GET, &format!("{base}/bmw/worker/"), None).await;
    run.wait_log(Duration::from_secs(5), &[debug_line]).await;

    for bad in ["verbose", "", "debug;rm"] {
        let (status, envelope) = set_level(&base, bad, None).await;
        assert_eq!(status, 400, "{bad:?}: {envelope}");
        assert_eq!(envelope["result"], false);
        assert_eq!(envelope["code"], 400);
        assert!(
            envelope["message"].as_str().unwrap().contains("log_level"),
            "{envelope}"
        );
        assert_eq!(envelope["data"], serde_json::Value::Null);
    }
    let (status, _) = http(Method::POST, &format!("{base}/bmw/log/level"), None).await;
    assert_eq!(status, 400, "no log_level at all");

    // Back to info: the debug line stops.
    let (status, _) = set_level(&base, "INFO", None).await;
    assert_eq!(status, 200);
    let before = run.logs().iter().filter(|l| l.contains(debug_line)).count();
    http(Method::GET, &format!("{base}/bmw/worker/"), None).await;
    http(Method::GET, &format!("{base}/bmw/worker/"), None).await;
    let after = run.logs().iter().filter(|l| l.contains(debug_line)).count();
    assert_eq!(before, after, "no debug lines once back at info");

    // With tokens, only a read-write token may change it.
    let guarded = BmwProcess::run(&env.url(), &["--api-token", "rw:writer,ro:reader"]).await;
    let base = guarded.base_url();
    assert_eq!(set_level(&base, "debug", None).await.0, 401);
    assert_eq!(set_level(&base, "debug", Some("reader")).await.0, 403);
    assert_eq!(set_level(&base, "debug", Some("writer")).await.0, 200);
}

/// Creates a `daemon:demo:dimension` task for `data_id` through the client.
async fn create_by_data_id(env: &TestEnv, data_id: &str) {
    let body = json!({"kind": DIMENSION_KIND, "payload": {"data_id": data_id}});
    match env
        .client
        .submit_json(
            bmw::nats::names::SUBJECT_CREATE,
            body.to_string().as_bytes(),
        )
        .await
        .expect("create")
    {
        bmw::client::Submitted::Done(o) => assert!(o.result, "create refused: {o:?}"),
        bmw::client::Submitted::Accepted { .. } | bmw::client::Submitted::Duplicate { .. } => {}
    }
}

#[tokio::test]
async fn a_series_moves_with_its_instance_when_a_worker_joins() {
    let env = TestEnv::start().await;
    let (_a, a) = worker_with_metrics(&env);
    for data_id in ["11", "22"] {
        create_by_data_id(&env, data_id).await;
    }
    let running = async |base: &str| -> Vec<&'static str> {
        let text = scrape(&format!("{base}/bmw/metrics"))
            .await
            .unwrap_or_default();
        ["11", "22"]
            .into_iter()
            .filter(|d| {
                has_series(
                    &text,
                    "daemon_running_task_count",
                    &format!(r#"task_dimension="{d}""#),
                )
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(20), async || running(&a).await
            == ["11", "22"])
        .await,
        "the lone worker runs both"
    );
    // A second worker joins: the first hands one task over (ceil(2 / 2) each).
    let (_b, b) = worker_with_metrics(&env);
    assert!(
        wait_until(Duration::from_secs(20), async || {
            let (on_a, on_b) = (running(&a).await, running(&b).await);
            on_a.len() == 1 && on_b.len() == 1 && on_a != on_b
        })
        .await,
        "one series each, none on both: a {:?}, b {:?}",
        running(&a).await,
        running(&b).await
    );
}
