//! Bad input at the bridge: every case answers 400 (or 404) with the BMW
//! envelope naming the field, nothing is stored, and the bridge keeps serving.

use reqwest::Method;

use crate::harness::{BmwProcess, TestEnv, http};

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_400_naming_the_field() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let task = format!("{base}/bmw/task/");
    let cases: Vec<(&str, String, &str)> = vec![
        ("not json", "{not json".into(), "`body`"),
        ("missing kind", r#"{"payload": {}}"#.into(), "`kind`"),
        ("kind not a string", r#"{"kind": 7}"#.into(), "`kind`"),
        (
            "unknown type prefix",
            r#"{"kind": "cron:demo:demo"}"#.into(),
            "unknown type prefix",
        ),
        (
            "unregistered kind",
            r#"{"kind": "daemon:demo:nope"}"#.into(),
            "not registered",
        ),
        (
            "wrong option type",
            r#"{"kind": "daemon:demo:demo", "options": {"retry": "ten"}}"#.into(),
            "`options.retry`",
        ),
        (
            "bad duration",
            r#"{"kind": "daemon:demo:demo", "options": {"timeout": "soon"}}"#.into(),
            "`options.timeout`",
        ),
        (
            "unknown option",
            r#"{"kind": "daemon:demo:demo", "options": {"queu": "x"}}"#.into(),
            "`options.queu`",
        ),
        (
            "options not an object",
            r#"{"kind": "daemon:demo:demo", "options": []}"#.into(),
            "`options`",
        ),
    ];
    for (name, body, needle) in cases {
        let (status, envelope) = http(Method::POST, &task, Some(&body)).await;
        assert_eq!(status, 400, "{name}: {envelope}");
        assert_eq!(envelope["result"], false, "{name}");
        assert_eq!(envelope["code"], 400, "{name}");
        let message = envelope["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{name}: {message:?} should mention {needle}"
        );
    }
    // Unknown uni_ids: 404 for reload and delete.
    let (status, envelope) = http(
        Method::POST,
        &format!("{base}/bmw/task/daemon/reload"),
        Some(r#"{"task_uni_id": "daemon:demo:demo-00"}"#),
    )
    .await;
    assert_eq!(
        (status, &envelope["code"]),
        (404, &serde_json::json!(404)),
        "{envelope}"
    );
    let (status, _) = http(
        Method::DELETE,
        &task,
        Some(r#"{"task_type": "daemon", "task_uni_id": "daemon:demo:demo-00"}"#),
    )
    .await;
    assert_eq!(status, 404);
    let (status, envelope) = http(Method::DELETE, &task, Some(r#"{"task_type": "daemon"}"#)).await;
    assert_eq!(status, 400);
    assert!(
        envelope["message"]
            .as_str()
            .unwrap()
            .contains("`task_uni_id`")
    );
    let (status, _) = http(
        Method::GET,
        &format!("{base}/bmw/task/?task_type=cron"),
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = http(Method::GET, &format!("{base}/bmw/nope"), None).await;
    assert_eq!(status, 404);

    // Nothing was stored, and the bridge still serves a good request.
    assert!(env.bindings().await.is_empty());
    let (status, envelope) = http(
        Method::POST,
        &task,
        Some(r#"{"kind": "daemon:demo:demo", "payload": {"content": "ok"}}"#),
    )
    .await;
    assert_eq!(status, 200, "{envelope}");
    let (status, _) = http(Method::GET, &format!("{base}/health"), None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_worker_a_create_is_stored_and_answered_202() {
    let env = TestEnv::start().await;
    let bridge = {
        let port = crate::harness::free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut p = BmwProcess::spawn(
            &env.url(),
            &[
                "bridge",
                "--demo-kinds",
                "--http-addr",
                &addr,
                "--reply-timeout",
                "1s",
            ],
        );
        p.http_port = Some(port);
        assert_eventually!(
            std::time::Duration::from_secs(20),
            reqwest::get(format!("http://{addr}/ready")).await.is_ok(),
            "bridge up"
        );
        p
    };
    let (status, envelope) = http(
        Method::POST,
        &format!("{}/bmw/task/", bridge.base_url()),
        Some(r#"{"kind": "daemon:demo:demo", "payload": {"content": "ok"}}"#),
    )
    .await;
    assert_eq!(status, 202, "{envelope}");
    assert_eq!(
        envelope["data"]["uni_id"],
        "daemon:demo:demo-7b22636f6e74656e74223a226f6b227d"
    );
    // A worker started later applies the stored command and runs the task.
    let worker = BmwProcess::worker(&env.url(), &[]);
    worker
        .wait_log(
            std::time::Duration::from_secs(20),
            &["start task instance, payload: map[content:ok] "],
        )
        .await;
    let (status, envelope) = http(
        Method::GET,
        &format!("{}/bmw/worker/", bridge.base_url()),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(envelope["data"].as_array().unwrap().len(), 1, "{envelope}");
}

/// A custom operator that runs until cancelled.
struct Idle;

impl bmw::daemon::Operator for Idle {
    fn start<'a>(
        &'a self,
        ctx: bmw::daemon::OperatorContext,
        _payload: &'a serde_json::Value,
    ) -> futures::future::BoxFuture<'a, Result<(), bmw::daemon::OperatorError>> {
        Box::pin(async move {
            ctx.cancelled().await;
            Ok(())
        })
    }

    fn task_dimension(&self, payload: &serde_json::Value) -> String {
        payload["data_id"].to_string()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kind_only_a_worker_knows_is_accepted_by_the_bridge() {
    use std::sync::Arc;
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let task = format!("{}/bmw/task/", bmw.base_url());
    let body = r#"{"kind": "daemon:custom:idle", "payload": {"data_id": 42, "x": 1}}"#;
    // Unknown everywhere: refused.
    let (status, _) = http(Method::POST, &task, Some(body)).await;
    assert_eq!(status, 400);

    // An in-process worker built with the custom kind advertises it.
    let mut registry = bmw::builtin::registry();
    registry
        .register_daemon("daemon:custom:idle", || {
            Ok(Arc::new(Idle) as Arc<dyn bmw::daemon::Operator>)
        })
        .unwrap();
    let config = bmw::Config {
        nats_url: Some(env.url()),
        ..bmw::Config::default()
    };
    let token = tokio_util::sync::CancellationToken::new();
    let worker = bmw::worker::Worker::new(env.nats.clone(), config, Arc::new(registry));
    let handle = tokio::spawn(worker.run(token.clone()));
    assert_eventually!(
        std::time::Duration::from_secs(10),
        env.client
            .list_workers()
            .await
            .unwrap()
            .iter()
            .any(|w| w.kinds.iter().any(|k| k == "daemon:custom:idle")),
        "the worker advertises its kind"
    );
    let (status, envelope) = http(Method::POST, &task, Some(body)).await;
    assert_eq!(status, 200, "{envelope}");
    // The dimension (data_id) decides the uni_id: hex of "42".
    assert_eq!(envelope["data"]["uni_id"], "daemon:custom:idle-3432");
    assert_eventually!(
        std::time::Duration::from_secs(10),
        !env.bindings()
            .await
            .get("daemon:custom:idle-3432")
            .is_none_or(String::is_empty),
        "the custom task runs"
    );
    token.cancel();
    handle.await.unwrap().unwrap();
}

/// Seconds that overflow a date when added to now (about 317,000 years).
const OVERFLOWING_SECONDS: u64 = 10_000_000_000_000;

#[tokio::test(flavor = "multi_thread")]
async fn out_of_range_durations_and_times_are_400_and_the_bridge_keeps_serving() {
    use serde_json::json;
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let huge = OVERFLOWING_SECONDS;
    let far = "9999-12-31T23:59:59Z";
    crate::harness::assert_refused(
        &base,
        &[
            // The issue's body: this request's task panicked (an empty reply).
            (
                json!({"kind": "async:demo:echo", "options": {"process_in": huge}}),
                "`options.process_in`",
            ),
            (
                json!({"kind": "async:demo:echo", "options": {"process_in": "400000years"}}),
                "`options.process_in`",
            ),
            (
                json!({"kind": "async:demo:echo", "options": {"process_at": far}}),
                "`options.process_at`",
            ),
            (
                json!({"kind": "async:demo:echo", "options": {"deadline": far}}),
                "`options.deadline`",
            ),
            (
                json!({"kind": "async:demo:echo", "options": {"timeout": huge}}),
                "`options.timeout`",
            ),
            (
                json!({"kind": "async:demo:echo", "options": {"retention": huge}}),
                "`options.retention`",
            ),
            (
                json!({"kind": "async:demo:echo", "options": {"unique_ttl": huge}}),
                "`options.unique_ttl`",
            ),
            (
                json!({"kind": "periodic:demo:tick", "options": {"every": huge}}),
                "`options.every`",
            ),
            (
                json!({"kind": "daemon:demo:demo", "options": {"timeout": huge}}),
                "`options.timeout`",
            ),
        ],
    )
    .await;
    // Then ordinary creates of every type still answer 200.
    for body in [
        json!({"kind": "async:demo:echo", "payload": {"n": 1}, "options": {"process_in": "1h"}}),
        json!({"kind": "periodic:demo:tick", "options": {"every": "1h"}}),
        json!({"kind": "daemon:demo:demo", "payload": {"content": "ok"}}),
    ] {
        let (status, envelope) = http(
            Method::POST,
            &format!("{base}/bmw/task/"),
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, 200, "{body}: {envelope}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_configured_bounds_of_task_options_are_enforced() {
    use serde_json::json;
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(
        &env.url(),
        &[
            "--max-task-delay",
            "1h",
            "--max-task-timeout",
            "1m",
            "--max-retention",
            "1h",
            "--max-unique-ttl",
            "1h",
        ],
    )
    .await;
    let base = bmw.base_url();
    let in_two_hours = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    crate::harness::assert_refused(
        &base,
        &[
            (
                json!({"kind": "async:demo:echo", "options": {"process_in": "2h"}}),
                "`options.process_in`: 2h is over the limit of 1h (--max-task-delay)",
            ),
            (
                json!({"kind": "async:demo:echo", "options": {"process_at": in_two_hours}}),
                "`options.process_at`",
            ),
            (
                json!({"kind": "async:demo:echo", "options": {"deadline": in_two_hours}}),
                "`options.deadline`",
            ),
            (
                json!({"kind": "async:demo:echo", "options": {"timeout": "2m"}}),
                "--max-task-timeout",
            ),
            (
                json!({"kind": "async:demo:echo", "options": {"retention": "2h"}}),
                "--max-retention",
            ),
            (
                json!({"kind": "async:demo:echo", "options": {"unique_ttl": "2h"}}),
                "--max-unique-ttl",
            ),
            (
                json!({"kind": "periodic:demo:tick", "options": {"every": "1m", "timeout": "2m"}}),
                "`options.timeout`",
            ),
        ],
    )
    .await;
    // Within the bounds: accepted.
    let (status, envelope) = http(
        Method::POST,
        &format!("{base}/bmw/task/"),
        Some(
            &json!({"kind": "async:demo:echo", "options": {
                "process_in": "59m", "timeout": "1m", "retention": "1h", "unique_ttl": "1h"}})
            .to_string(),
        ),
    )
    .await;
    assert_eq!(status, 200, "{envelope}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_while_handling_a_request_answers_500_and_the_bridge_keeps_serving() {
    use std::sync::Arc;
    let env = TestEnv::start().await;
    let registry = crate::harness::explosive_registry();
    let ops = bmw::ops::Operations::open(&env.nats, Arc::new(registry))
        .await
        .unwrap();
    let client = bmw::client::TaskClient::with_operations(
        env.nats.clone(),
        ops,
        std::time::Duration::from_secs(1),
    );
    let state = bmw::bridge::BridgeState {
        client: Arc::new(client),
        nats: env.nats.client.clone(),
        max_body: 4096,
        shutdown: tokio_util::sync::CancellationToken::new(),
        feeds: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let config = bmw::Config::default();
    tokio::spawn(bmw::bridge::serve_on(
        listener,
        bmw::bridge::router(state, &bmw::bridge::Guards::from_config(&config)),
        bmw::bridge::ListenOptions::plain(config.request_timeout),
        token.clone(),
    ));
    let task = format!("http://{addr}/bmw/task/");
    // The bridge computes a daemon task's uni_id: the operator's code runs here.
    let (status, envelope) = http(
        Method::POST,
        &task,
        Some(r#"{"kind": "daemon:custom:explosive", "payload": {"explode": "routing"}}"#),
    )
    .await;
    assert_eq!((status, &envelope["code"]), (500, &serde_json::json!(500)));
    assert!(
        envelope["message"]
            .as_str()
            .unwrap()
            .contains("told to explode while routing"),
        "{envelope}"
    );
    // The next request is served (stored for a worker: none runs, so 202).
    let (status, envelope) = http(
        Method::POST,
        &task,
        Some(r#"{"kind": "daemon:custom:explosive", "payload": {"n": 1}}"#),
    )
    .await;
    assert_eq!(status, 202, "{envelope}");
    token.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_and_kinds_no_task_can_have_are_refused_or_not_found() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let task = format!("{base}/bmw/task/");
    // Each once reached a KV key or subject as given: a NATS error, 503.
    let cases: Vec<(Method, String, Option<&str>, u16, &str)> = vec![
        (
            Method::GET,
            format!("{task}?task_type=async&task_id=a%20b"),
            None,
            400,
            "`task_id`",
        ),
        (
            Method::GET,
            format!("{task}?task_type=async&queue=%3E"),
            None,
            400,
            "`queue`",
        ),
        (
            Method::DELETE,
            task.clone(),
            Some(r#"{"task_type": "async", "task_id": "*"}"#),
            400,
            "`task_id`",
        ),
        (
            Method::POST,
            format!("{base}/bmw/task/async/requeue"),
            Some(r#"{"task_id": "a..b"}"#),
            400,
            "`task_id`",
        ),
        (
            Method::DELETE,
            task.clone(),
            Some(r#"{"task_type": "periodic", "kind": "periodic:a:b c"}"#),
            400,
            "`kind`",
        ),
        (
            Method::POST,
            format!("{base}/bmw/task/periodic/pause"),
            Some(r#"{"kind": "daemon:demo:demo"}"#),
            400,
            "`kind`",
        ),
        (
            Method::DELETE,
            task.clone(),
            Some(r#"{"task_type": "daemon", "task_uni_id": "."}"#),
            404,
            "",
        ),
        (
            Method::POST,
            format!("{base}/bmw/task/daemon/reload"),
            Some(r#"{"task_uni_id": "daemon:demo:demo-..x"}"#),
            404,
            "",
        ),
    ];
    for (method, url, body, want, needle) in cases {
        let (status, envelope) = http(method.clone(), &url, body).await;
        assert_eq!(status, want, "{method} {url} {body:?}: {envelope}");
        assert!(
            envelope["message"].as_str().unwrap().contains(needle),
            "{method} {url} {body:?}: {envelope}"
        );
    }
}

/// Query parameters the OpenAPI document constrains are refused when
/// invalid, whatever else the request says (found by schemathesis: a bad
/// `?task_type=` beside a good body deleted everything of the body's type,
/// and `?state=` or `?limit=` that were not numbers or states were ignored on
/// a daemon listing).
#[tokio::test(flavor = "multi_thread")]
async fn invalid_query_parameters_are_400_whatever_the_body_or_type() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let (status, envelope) = http(
        Method::POST,
        &format!("{base}/bmw/task/"),
        Some(r#"{"kind": "daemon:demo:demo", "payload": {"content": "ok"}}"#),
    )
    .await;
    assert_eq!(status, 200, "{envelope}");
    let (status, envelope) = http(
        Method::DELETE,
        &format!("{base}/bmw/task/all?task_type=AAA"),
        Some(r#"{"task_type": "daemon"}"#),
    )
    .await;
    assert_eq!(status, 400, "{envelope}");
    assert!(
        envelope["message"].as_str().unwrap().contains("task_type"),
        "{envelope}"
    );
    assert_eq!(env.bindings().await.len(), 1, "nothing was deleted");
    for (query, field) in [
        ("state=AAA", "`state`"),
        ("task_type=daemon&state=AAA", "`state`"),
        ("limit=x", "`limit`"),
        ("task_type=periodic&offset=-1", "`offset`"),
        ("task_type=async&offset=4294967296", "`offset`"),
    ] {
        let (status, envelope) =
            http(Method::GET, &format!("{base}/bmw/task/?{query}"), None).await;
        assert_eq!(status, 400, "{query}: {envelope}");
        assert!(
            envelope["message"].as_str().unwrap().contains(field),
            "{query}: {envelope}"
        );
    }
}
