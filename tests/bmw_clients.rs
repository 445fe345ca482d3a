//! BMW's real clients (bk-monitor) work unchanged: kinds with one name part
//! after the type (`async:collect_es_task`), reload with a payload, a task
//! moved by re-creating it on another queue, `DELETE /bmw/task/all`, and
//! periodic tasks with 5-field cron and the overlap rule.
//!
//! The kinds bk-monitor uses are not built in: these tests run a worker and
//! a bridge in this process with a registry of their own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bmw::daemon::{Operator, OperatorContext, OperatorError};
use futures::future::BoxFuture;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{BmwProcess, TestEnv, create_ok, http, list_tasks, wait_until};

/// A daemon operator like bk-monitor's `daemon:apm:pre_calculate`: its
/// dimension is the payload's `data_id`; it records the payload of every
/// start and runs until told to stop.
#[derive(Default)]
struct Recorder {
    starts: Mutex<Vec<Value>>,
}

impl Operator for Recorder {
    fn start<'a>(
        &'a self,
        ctx: OperatorContext,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        self.starts.lock().unwrap().push(payload.clone());
        Box::pin(async move {
            ctx.cancelled().await;
            Ok(())
        })
    }

    fn task_dimension(&self, payload: &Value) -> String {
        bmw::daemon::operator::field_text(payload, "data_id")
    }
}

/// The kinds of these tests, as bk-monitor names them.
struct Kinds {
    recorder: Arc<Recorder>,
    collected: Arc<Mutex<Vec<Value>>>,
}

fn registry() -> (bmw::Registry, Kinds) {
    let recorder = Arc::new(Recorder::default());
    let collected = Arc::new(Mutex::new(Vec::new()));
    let mut registry = bmw::Registry::new();
    for kind in ["daemon:apm:pre_calculate", "daemon:foo"] {
        let op = recorder.clone();
        registry
            .register_daemon(kind, move || Ok(op.clone() as Arc<dyn Operator>))
            .unwrap();
    }
    let sink = collected.clone();
    registry
        .register_async(
            "async:collect_es_task",
            move |_: bmw::queue::TaskContext, payload: Value| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push(payload);
                    Ok(())
                }
            },
        )
        .unwrap();
    registry
        .register_periodic(
            "periodic:refresh_es",
            None,
            |_: bmw::queue::TaskContext, _: Value| async { Ok(()) },
        )
        .unwrap();
    (
        registry,
        Kinds {
            recorder,
            collected,
        },
    )
}

/// A worker and a bridge in this process, sharing `registry`; stopped on drop.
struct InProcess {
    base: String,
    token: CancellationToken,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

fn fast_config(env: &TestEnv, queues: &[&str]) -> bmw::Config {
    let overrides = bmw::config::ConfigOverrides {
        nats_url: Some(env.url()),
        queues: Some(queues.iter().map(|q| (*q).to_owned()).collect()),
        claim_ttl: Some("3s".into()),
        heartbeat: Some("1s".into()),
        grace: Some("2s".into()),
        ..Default::default()
    };
    bmw::Config::resolve(overrides).expect("a valid config")
}

async fn in_process(env: &TestEnv, registry: bmw::Registry, queues: &[&str]) -> InProcess {
    let registry = Arc::new(registry);
    let token = CancellationToken::new();
    let config = fast_config(env, queues);
    let worker = bmw::worker::Worker::new(env.nats.clone(), config.clone(), registry.clone());
    tokio::spawn(worker.run(token.clone()));
    let ops = bmw::ops::Operations::open(&env.nats, registry)
        .await
        .unwrap();
    let client =
        bmw::client::TaskClient::with_operations(env.nats.clone(), ops, Duration::from_secs(5));
    let state = bmw::bridge::BridgeState {
        client: Arc::new(client),
        nats: env.nats.client.clone(),
        max_body: 1 << 20,
        shutdown: tokio_util::sync::CancellationToken::new(),
        feeds: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(bmw::bridge::serve_on(
        listener,
        bmw::bridge::router(state, &bmw::bridge::Guards::from_config(&config)),
        bmw::bridge::ListenOptions::plain(config.request_timeout),
        token.clone(),
    ));
    InProcess {
        base: format!("http://{addr}"),
        token,
    }
}

async fn delete(base: &str, body: Value) -> (u16, Value) {
    http(
        Method::DELETE,
        &format!("{base}/bmw/task/"),
        Some(&body.to_string()),
    )
    .await
}

async fn reload(base: &str, body: Value) -> (u16, Value) {
    http(
        Method::POST,
        &format!("{base}/bmw/task/daemon/reload"),
        Some(&body.to_string()),
    )
    .await
}

/// The daemon row of `uni_id` in the listing, once `condition` holds for it.
async fn wait_row(base: &str, uni_id: &str, condition: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let found = wait_until(Duration::from_secs(15), async || {
        last = list_tasks(base, "daemon")
            .await
            .into_iter()
            .find(|r| r["uni_id"] == uni_id)
            .unwrap_or(Value::Null);
        condition(&last)
    })
    .await;
    assert!(
        found,
        "{uni_id}: the row never met the condition; last {last}"
    );
    last
}

#[tokio::test(flavor = "multi_thread")]
async fn kinds_with_one_name_part_work_everywhere() {
    let env = TestEnv::start().await;
    let (registry, kinds) = registry();
    let bmw = in_process(&env, registry, &["default"]).await;
    let base = &bmw.base;

    // Daemon: create, list, delete.
    let data = create_ok(
        base,
        &json!({"kind": "daemon:foo", "payload": {"data_id": 7}}),
    )
    .await;
    let uni_id = data["uni_id"].as_str().expect("a uni_id").to_owned();
    assert!(uni_id.starts_with("daemon:foo-"), "{uni_id}");
    let row = wait_row(base, &uni_id, |r| r["binding"]["worker_is_normal"] == true).await;
    assert_eq!(row["kind"], "daemon:foo");
    let (status, envelope) =
        delete(base, json!({"task_type": "daemon", "task_uni_id": uni_id})).await;
    assert_eq!(status, 200, "{envelope}");

    // Async: runs.
    let data = create_ok(
        base,
        &json!({"kind": "async:collect_es_task", "payload": {"cluster": 1}}),
    )
    .await;
    assert!(data["task_id"].is_string(), "{data}");
    let ran = wait_until(Duration::from_secs(15), async || {
        !kinds.collected.lock().unwrap().is_empty()
    })
    .await;
    assert!(ran, "async:collect_es_task never ran");

    // Periodic: create, list, delete.
    create_ok(
        base,
        &json!({"kind": "periodic:refresh_es", "options": {"every": "1h"}}),
    )
    .await;
    let rows = list_tasks(base, "periodic").await;
    assert!(
        rows.iter().any(|r| r["kind"] == "periodic:refresh_es"),
        "{rows:?}"
    );
    let (status, envelope) = delete(
        base,
        json!({"task_type": "periodic", "kind": "periodic:refresh_es"}),
    )
    .await;
    assert_eq!(status, 200, "{envelope}");
    drop(kinds.recorder);
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_with_a_payload_restarts_the_instance_with_the_merged_payload() {
    let env = TestEnv::start().await;
    let (registry, kinds) = registry();
    let bmw = in_process(&env, registry, &["apm-q1"]).await;
    let base = &bmw.base;
    let create = json!({"kind": "daemon:apm:pre_calculate",
        "payload": {"data_id": "1573001", "token": "a", "keep": 1},
        "options": {"queue": "apm-q1"}});
    let uni_id = create_ok(base, &create).await["uni_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_row(base, &uni_id, |r| r["binding"]["worker_is_normal"] == true).await;

    // bk-monitor's reload: the payload without data_id, merged key by key.
    let (status, envelope) = reload(
        base,
        json!({"task_uni_id": uni_id, "payload": {"token": "b", "extra": [1]}}),
    )
    .await;
    assert_eq!(status, 200, "{envelope}");
    let merged = json!({"data_id": "1573001", "token": "b", "keep": 1, "extra": [1]});
    let row = wait_row(base, &uni_id, |r| r["binding"]["reload_count"] == 1).await;
    assert_eq!(row["payload"], merged, "{row}");
    let restarted = wait_until(Duration::from_secs(10), async || {
        kinds.recorder.starts.lock().unwrap().last() == Some(&merged)
    })
    .await;
    assert!(
        restarted,
        "the instance was not restarted with the merged payload: {:?}",
        kinds.recorder.starts.lock().unwrap()
    );

    // A merge that changes the dimension (so the uni_id) is refused; nothing changes.
    let (status, envelope) = reload(
        base,
        json!({"task_uni_id": uni_id, "payload": {"data_id": "999"}}),
    )
    .await;
    assert_eq!(status, 400, "{envelope}");
    let message = envelope["message"].as_str().unwrap_or_default();
    assert!(message.contains("uni_id"), "{envelope}");
    // A payload that is not an object is refused too.
    let (status, envelope) = reload(base, json!({"task_uni_id": uni_id, "payload": [1, 2]})).await;
    assert_eq!(status, 400, "{envelope}");
    assert!(
        envelope["message"]
            .as_str()
            .unwrap_or_default()
            .contains("payload"),
        "{envelope}"
    );
    let row = wait_row(base, &uni_id, |_| true).await;
    assert_eq!(row["payload"], merged, "{row}");
    assert_eq!(row["binding"]["reload_count"], 1, "{row}");

    // The same over the command subject.
    let body = json!({"task_uni_id": uni_id, "payload": {"token": "c"}});
    let outcome =
        crate::harness::publish_command(&env, "bmw.task.reload", body.to_string().as_bytes()).await;
    assert_eq!(outcome["result"], true, "{outcome}");
    let row = wait_row(base, &uni_id, |r| r["binding"]["reload_count"] == 2).await;
    assert_eq!(row["payload"]["token"], "c", "{row}");
    let body = json!({"task_uni_id": uni_id, "payload": {"data_id": 1}});
    let outcome =
        crate::harness::publish_command(&env, "bmw.task.reload", body.to_string().as_bytes()).await;
    crate::harness::assert_refused_outcome(&outcome, 400, "uni_id");

    // A reload without a payload still just restarts it.
    let (status, envelope) = reload(base, json!({"task_uni_id": uni_id})).await;
    assert_eq!(status, 200, "{envelope}");
    let row = wait_row(base, &uni_id, |r| r["binding"]["reload_count"] == 3).await;
    assert_eq!(row["payload"]["token"], "c", "{row}");

    // And from `bmw task reload <uni_id> <keys>` (a binary without the kind:
    // the worker here merges).
    let url = env.url();
    let mut cli = BmwProcess::spawn(&url, &["task", "reload", &uni_id, r#"{"token": "d"}"#]);
    let status = cli.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        cli.logs().join("\n")
    );
    let row = wait_row(base, &uni_id, |r| r["binding"]["reload_count"] == 4).await;
    assert_eq!(row["payload"]["token"], "d", "{row}");
}

#[tokio::test(flavor = "multi_thread")]
async fn recreating_a_task_on_another_queue_moves_it_to_a_worker_of_that_queue() {
    let env = TestEnv::start().await;
    let q1 = BmwProcess::worker(&env.url(), &["--queues", "apm-q1"]);
    let q2 = BmwProcess::worker(&env.url(), &["--queues", "apm-q2"]);
    let (w1, w2) = (q1.worker_id().await, q2.worker_id().await);
    let bridge = BmwProcess::bridge(&env.url(), &[]).await;
    let base = bridge.base_url();
    let body = |queue: &str| json!({"kind": "daemon:demo:demo", "payload": {"content": "ok"}, "options": {"queue": queue}});
    let uni_id = create_ok(&base, &body("apm-q1")).await["uni_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_row(&base, &uni_id, |r| r["binding"]["worker_id"] == w1).await;

    // bk-monitor's rebalance: the same task created again with another queue.
    create_ok(&base, &body("apm-q2")).await;
    let row = wait_row(&base, &uni_id, |r| {
        r["binding"]["worker_id"] == w2 && r["binding"]["worker_is_normal"] == true
    })
    .await;
    assert_eq!(row["options"]["queue"], "apm-q2", "{row}");
    assert_eq!(row["options"]["Queue"], "apm-q2", "{row}");
    q1.wait_log(Duration::from_secs(10), &["releasing", "apm-q2"])
        .await;

    // And back.
    create_ok(&base, &body("apm-q1")).await;
    wait_row(&base, &uni_id, |r| {
        r["binding"]["worker_id"] == w1 && r["binding"]["worker_is_normal"] == true
    })
    .await;
}

async fn delete_all(base: &str, body: Value) -> (u16, Value) {
    http(
        Method::DELETE,
        &format!("{base}/bmw/task/all"),
        Some(&body.to_string()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_all_removes_every_task_of_a_type() {
    let env = TestEnv::start().await;
    let (registry, _kinds) = registry();
    let bmw = in_process(&env, registry, &["default"]).await;
    let base = &bmw.base;
    for n in 0..3 {
        create_ok(
            base,
            &json!({"kind": "daemon:apm:pre_calculate", "payload": {"data_id": n}}),
        )
        .await;
    }
    create_ok(
        base,
        &json!({"kind": "periodic:refresh_es", "options": {"every": "1h"}}),
    )
    .await;
    for n in 0..2 {
        create_ok(
            base,
            &json!({"kind": "async:collect_es_task", "payload": {"n": n},
                    "options": {"process_in": "1h"}}),
        )
        .await;
    }

    // Daemon tasks only: the periodic and async ones stay.
    let (status, envelope) = delete_all(base, json!({"task_type": "daemon"})).await;
    assert_eq!(status, 200, "{envelope}");
    assert_eq!(envelope["data"]["deleted"], 3, "{envelope}");
    assert!(list_tasks(base, "daemon").await.is_empty());
    assert_eq!(list_tasks(base, "periodic").await.len(), 1);
    assert_eq!(list_tasks(base, "async").await.len(), 2);
    // Nothing left: 0, not an error.
    let (status, envelope) = delete_all(base, json!({"task_type": "daemon"})).await;
    assert_eq!((status, &envelope["data"]["deleted"]), (200, &json!(0)));

    let (status, envelope) = delete_all(base, json!({"task_type": "async"})).await;
    assert_eq!(status, 200, "{envelope}");
    assert_eq!(envelope["data"]["deleted"], 2, "{envelope}");
    assert!(list_tasks(base, "async").await.is_empty());
    assert_eq!(list_tasks(base, "periodic").await.len(), 1);

    // The type in the query works too.
    let (status, envelope) = http(
        Method::DELETE,
        &format!("{base}/bmw/task/all?task_type=periodic"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{envelope}");
    assert_eq!(envelope["data"]["deleted"], 1, "{envelope}");
    assert!(list_tasks(base, "periodic").await.is_empty());

    // Bad input: 400 naming the field.
    for body in [json!({}), json!({"task_type": "cron"})] {
        let (status, envelope) = delete_all(base, body.clone()).await;
        assert_eq!(status, 400, "{body}: {envelope}");
        assert!(
            envelope["message"]
                .as_str()
                .unwrap_or_default()
                .contains("task_type"),
            "{envelope}"
        );
    }

    // The same over the command subject.
    create_ok(
        base,
        &json!({"kind": "daemon:apm:pre_calculate", "payload": {"data_id": 9}}),
    )
    .await;
    let body = json!({"task_type": "daemon", "all": true});
    let outcome =
        crate::harness::publish_command(&env, "bmw.task.delete", body.to_string().as_bytes()).await;
    assert_eq!(outcome["data"]["deleted"], 1, "{outcome}");
    assert!(list_tasks(base, "daemon").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn periodic_tasks_take_standard_five_field_cron() {
    let env = TestEnv::start().await;
    let (registry, _kinds) = registry();
    let bmw = in_process(&env, registry, &["default"]).await;
    let base = &bmw.base;
    let data = create_ok(
        base,
        &json!({"kind": "periodic:refresh_es", "options": {"cron": "*/5 * * * *"}}),
    )
    .await;
    assert_eq!(data["schedule"], "*/5 * * * *", "{data}");
    // Minute-hour-day-month-weekday: on a minute divisible by 5, at second 0.
    let next = chrono::DateTime::parse_from_rfc3339(data["next_run_at"].as_str().unwrap()).unwrap();
    use chrono::Timelike;
    assert_eq!((next.minute() % 5, next.second()), (0, 0), "{data}");
    // Six fields (seconds first) still work; seven do not.
    create_ok(
        base,
        &json!({"kind": "periodic:refresh_es", "options": {"cron": "*/5 * * * * *"}}),
    )
    .await;
    crate::harness::assert_refused(
        base,
        &[(
            json!({"kind": "periodic:refresh_es", "options": {"cron": "0 * * * * * 2030"}}),
            "options.cron",
        )],
    )
    .await;
}

/// How many runs of a kind are going at once, and the most there were.
#[derive(Default)]
struct Overlaps {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    runs: std::sync::atomic::AtomicUsize,
}

fn register_slow(registry: &mut bmw::Registry, kind: &str) -> Arc<Overlaps> {
    use std::sync::atomic::Ordering::SeqCst;
    let overlaps = Arc::new(Overlaps::default());
    let o = overlaps.clone();
    registry
        .register_periodic(kind, None, move |_: bmw::queue::TaskContext, _: Value| {
            let o = o.clone();
            async move {
                let now = o.now.fetch_add(1, SeqCst) + 1;
                o.most.fetch_max(now, SeqCst);
                tokio::time::sleep(Duration::from_millis(2500)).await;
                o.now.fetch_sub(1, SeqCst);
                o.runs.fetch_add(1, SeqCst);
                Ok(())
            }
        })
        .unwrap();
    overlaps
}

#[tokio::test(flavor = "multi_thread")]
async fn a_periodic_tick_does_not_start_while_the_previous_run_is_active_unless_allowed() {
    use std::sync::atomic::Ordering::SeqCst;
    let env = TestEnv::start().await;
    let (mut registry, _kinds) = registry();
    let skip = register_slow(&mut registry, "periodic:slow_skip");
    let allow = register_slow(&mut registry, "periodic:slow_allow");
    let bmw = in_process(&env, registry, &["default"]).await;
    let base = &bmw.base;
    let events = crate::harness::collect_events(&env, "bmw.event.periodic.>");
    env.nats.client.flush().await.unwrap();

    // Bad values are refused by name; the option is for periodic tasks only.
    crate::harness::assert_refused(
        base,
        &[
            (
                json!({"kind": "periodic:slow_skip", "options": {"every": "1s", "overlap": "sometimes"}}),
                "options.overlap",
            ),
            (
                json!({"kind": "async:collect_es_task", "options": {"overlap": "allow"}}),
                "options.overlap",
            ),
        ],
    )
    .await;

    // Every second, each run 2.5 s: skip is the default.
    create_ok(
        base,
        &json!({"kind": "periodic:slow_skip", "options": {"every": "1s"}}),
    )
    .await;
    create_ok(
        base,
        &json!({"kind": "periodic:slow_allow", "options": {"every": "1s", "overlap": "allow"}}),
    )
    .await;
    let enough = wait_until(Duration::from_secs(20), async || {
        skip.runs.load(SeqCst) >= 2 && allow.most.load(SeqCst) >= 2
    })
    .await;
    assert!(
        enough,
        "skip ran {} times, allow had at most {} at once",
        skip.runs.load(SeqCst),
        allow.most.load(SeqCst)
    );
    assert_eq!(
        skip.most.load(SeqCst),
        1,
        "runs of periodic:slow_skip overlapped"
    );
    // The ticks skipped meanwhile are told.
    let skipped: Vec<Value> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "periodic:slow_skip" && e["what"] == "skipped")
        .cloned()
        .collect();
    assert!(
        !skipped.is_empty(),
        "no skipped event: {:?}",
        events.lock().unwrap()
    );
    assert!(skipped[0]["running"].is_string(), "{}", skipped[0]);
    let listed = list_tasks(base, "periodic").await;
    let row = listed
        .iter()
        .find(|r| r["kind"] == "periodic:slow_allow")
        .expect("listed");
    assert_eq!(row["options"]["overlap"], "allow", "{row}");
}
