//! Async tasks against a real server: every option has a test that could
//! fail (retries, timeout, unique, delay, retention, dead letters and
//! re-enqueue, deletes), bad input is refused, a panic is survived, and the
//! fast path (raw publishes on `bmw.async.<queue>`) works.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, TestEnv, http, wait_until};

/// Fast retries and ack timeouts for tests.
pub(crate) const ASYNC_FAST: &[&str] = &[
    "--async-retry-base",
    "100ms",
    "--async-retry-max",
    "1s",
    "--async-ack-wait",
    "3s",
];

/// Collects async events.
pub(crate) fn collect_events(env: &TestEnv) -> Arc<Mutex<Vec<Value>>> {
    crate::harness::collect_events(env, "bmw.event.async.>")
}

/// Waits (bounded) until `id` has `n` events `what`.
async fn wait_count(
    events: &Arc<Mutex<Vec<Value>>>,
    id: &str,
    what: &str,
    n: usize,
    seconds: u64,
) -> bool {
    wait_until(Duration::from_secs(seconds), async || {
        count(events, id, what) == n
    })
    .await
}

fn count(events: &Arc<Mutex<Vec<Value>>>, task_id: &str, what: &str) -> usize {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["task_id"] == task_id && e["what"] == what)
        .count()
}

async fn create(bmw: &BmwProcess, body: Value) -> (u16, Value) {
    http(
        Method::POST,
        &format!("{}/bmw/task/", bmw.base_url()),
        Some(&body.to_string()),
    )
    .await
}

async fn get(bmw: &BmwProcess, task_id: &str) -> (u16, Value) {
    http(
        Method::GET,
        &format!(
            "{}/bmw/task/?task_type=async&task_id={task_id}",
            bmw.base_url()
        ),
        None,
    )
    .await
}

async fn start() -> (TestEnv, BmwProcess, Arc<Mutex<Vec<Value>>>) {
    let env = TestEnv::start().await;
    let events = collect_events(&env);
    // Make sure the subscription is in place before anything happens.
    env.nats.client.flush().await.unwrap();
    let bmw = BmwProcess::run(&env.url(), ASYNC_FAST).await;
    (env, bmw, events)
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_count_exactly_and_retention_keeps_then_expires_the_record() {
    let (_env, bmw, events) = start().await;
    let (status, body) = create(&bmw, json!({"kind": "async:demo:fail", "payload": {"fail_times": 2}, "options": {"retry": 5, "retention": "2s"}})).await;
    assert_eq!(status, 200, "{body}");
    let id = body["data"]["task_id"].as_str().unwrap().to_owned();
    assert!(
        wait_count(&events, &id, "succeeded", 1, 10).await,
        "task succeeds on its third attempt"
    );
    assert_eq!(
        (count(&events, &id, "failed"), count(&events, &id, "retry")),
        (2, 2)
    );
    let (status, record) = get(&bmw, &id).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(
        (
            record["data"]["state"].as_str(),
            record["data"]["attempts"].as_u64()
        ),
        (Some("completed"), Some(3)),
        "{record}"
    );
    // The retention (2 s) expires the record.
    assert!(
        wait_until(Duration::from_secs(8), async || get(&bmw, &id).await.0
            == 404)
        .await,
        "completed record expires after its retention"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn used_up_retries_go_to_the_dead_letters_and_can_be_requeued() {
    let (env, bmw, events) = start().await;
    let (status, body) = create(
        &bmw,
        json!({"kind": "async:demo:fail", "payload": {"fail_times": 100}, "options": {"retry": 2}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["data"]["task_id"].as_str().unwrap().to_owned();
    assert!(
        wait_count(&events, &id, "archived", 1, 10).await,
        "archived after 3 attempts"
    );
    assert_eq!(count(&events, &id, "failed"), 3, "1 attempt + 2 retries");
    let (_, record) = get(&bmw, &id).await;
    assert_eq!(record["data"]["state"], "archived", "{record}");
    assert_eq!(
        record["data"]["errors"].as_array().map(Vec::len),
        Some(3),
        "history of every attempt: {record}"
    );
    let dead = env.nats.js.get_stream("BMW_DEAD").await.unwrap();
    let letter = dead
        .get_last_raw_message_by_subject(&format!("bmw.dead.default.{id}"))
        .await
        .expect("dead letter");
    let letter: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(letter["errors"].as_array().map(Vec::len), Some(3));

    // Re-enqueue: the task runs again (and, failing, is archived again).
    let (status, body) = http(
        Method::POST,
        &format!("{}/bmw/task/async/requeue", bmw.base_url()),
        Some(&json!({"task_id": id}).to_string()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        wait_count(&events, &id, "archived", 2, 10).await,
        "re-enqueued task ran its attempts again"
    );
    assert_eq!(count(&events, &id, "failed"), 6);
    let (status, _) = http(
        Method::POST,
        &format!("{}/bmw/task/async/requeue", bmw.base_url()),
        Some(r#"{"task_id": "nope"}"#),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_cancels_the_attempt_and_a_panic_is_retried() {
    let (_env, bmw, events) = start().await;
    let (_, body) = create(&bmw, json!({"kind": "async:demo:sleep", "payload": {"seconds": 30}, "options": {"timeout": 1, "retry": 0}})).await;
    let slow = body["data"]["task_id"].as_str().unwrap().to_owned();
    let (_, body) = create(
        &bmw,
        json!({"kind": "async:demo:fail", "payload": {"panic": true, "fail_times": 0}}),
    )
    .await;
    let panicky = body["data"]["task_id"].as_str().unwrap().to_owned();
    let start = std::time::Instant::now();
    assert!(
        wait_count(&events, &slow, "archived", 1, 10).await,
        "timed-out task archived"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the 1 s timeout cancelled the 30 s sleep"
    );
    let (_, record) = get(&bmw, &slow).await;
    assert!(
        record["data"]["last_error"]
            .as_str()
            .unwrap()
            .contains("timeout"),
        "{record}"
    );
    assert!(
        wait_count(&events, &panicky, "succeeded", 1, 10).await,
        "panic fails the attempt, the retry succeeds"
    );
    assert_eq!(count(&events, &panicky, "failed"), 1);
    let (status, _) = http(Method::GET, &format!("{}/health", bmw.base_url()), None).await;
    assert_eq!(status, 200, "the worker survived the panic");
}

#[tokio::test(flavor = "multi_thread")]
async fn unique_refuses_then_accepts_after_the_window() {
    let (_env, bmw, _events) = start().await;
    let task =
        json!({"kind": "async:demo:echo", "payload": {"x": 1}, "options": {"unique_ttl": "2s"}});
    let (status, first) = create(&bmw, task.clone()).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = create(&bmw, task.clone()).await;
    assert_eq!(status, 409, "{second}");
    assert_eq!(
        second["data"]["task_id"], first["data"]["task_id"],
        "409 names the existing task"
    );
    // Another payload is another task.
    let (status, _) = create(
        &bmw,
        json!({"kind": "async:demo:echo", "payload": {"x": 2}, "options": {"unique_ttl": "2s"}}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        wait_until(Duration::from_secs(8), async || create(&bmw, task.clone())
            .await
            .0
            == 200)
        .await,
        "accepted after the window"
    );
    // A caller's task_id is refused when in use.
    let (status, _) = create(&bmw, json!({"kind": "async:demo:sleep", "payload": {"seconds": 5}, "options": {"task_id": "mine-1"}})).await;
    assert_eq!(status, 200);
    let (status, body) = create(
        &bmw,
        json!({"kind": "async:demo:echo", "options": {"task_id": "mine-1"}}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delayed_task_runs_at_its_time_not_before() {
    let (_env, bmw, events) = start().await;
    let (status, body) = create(
        &bmw,
        json!({"kind": "async:demo:echo", "payload": {}, "options": {"process_in": "3s"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["state"], "scheduled");
    let id = body["data"]["task_id"].as_str().unwrap().to_owned();
    let due =
        chrono::DateTime::parse_from_rfc3339(body["data"]["process_at"].as_str().unwrap()).unwrap();
    let (_, record) = get(&bmw, &id).await;
    assert_eq!(record["data"]["state"], "scheduled", "{record}");
    assert!(
        wait_count(&events, &id, "succeeded", 1, 10).await,
        "delayed task ran"
    );
    let ran = events
        .lock()
        .unwrap()
        .iter()
        .find(|e| e["task_id"] == id.as_str() && e["what"] == "succeeded")
        .unwrap()["time"]
        .as_str()
        .unwrap()
        .to_owned();
    let ran = chrono::DateTime::parse_from_rfc3339(&ran).unwrap();
    let late = (ran - due).num_milliseconds();
    // The schedule fires on whole seconds: at most 1 s early in sub-second terms, within 1 s after.
    assert!(
        (-1000..=1000).contains(&late),
        "ran {late} ms after its due time"
    );
    // A process_at in the past runs at once.
    let past = (chrono::Utc::now() - chrono::Duration::seconds(5)).to_rfc3339();
    let (status, body) = create(
        &bmw,
        json!({"kind": "async:demo:echo", "options": {"process_at": past}}),
    )
    .await;
    assert_eq!(
        (status, body["data"]["state"].as_str()),
        (200, Some("pending")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_and_nothing_enqueued() {
    let (_env, bmw, _events) = start().await;
    let past = (chrono::Utc::now() - chrono::Duration::seconds(5)).to_rfc3339();
    let cases = [
        (json!({"kind": "async:demo:nope"}), "not registered"),
        (
            json!({"kind": "async:demo:echo", "options": {"retry": "x"}}),
            "`options.retry`",
        ),
        (
            json!({"kind": "async:demo:echo", "options": {"timeout": -1}}),
            "`options.timeout`",
        ),
        (
            json!({"kind": "async:demo:echo", "options": {"deadline": past}}),
            "`options.deadline`",
        ),
        (
            json!({"kind": "async:demo:echo", "options": {"process_at": "tomorrow"}}),
            "`options.process_at`",
        ),
        (
            json!({"kind": "async:demo:echo", "options": {"process_in": "soon"}}),
            "`options.process_in`",
        ),
        (
            json!({"kind": "async:demo:echo", "options": {"task_id": "a b"}}),
            "`options.task_id`",
        ),
        (
            json!({"kind": "async:demo:echo", "options": {"unique_ttl": 0}}),
            "`options.unique_ttl`",
        ),
    ];
    crate::harness::assert_refused(&bmw.base_url(), &cases).await;
    let list = crate::harness::list_tasks(&bmw.base_url(), "async").await;
    assert!(list.is_empty(), "nothing was enqueued: {list:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_cancels_pending_scheduled_and_running_tasks() {
    let (env, bmw, events) = start().await;
    let delete = |id: String| {
        let url = format!("{}/bmw/task/", bmw.base_url());
        async move {
            http(
                Method::DELETE,
                &url,
                Some(&json!({"task_type": "async", "task_id": id}).to_string()),
            )
            .await
        }
    };
    // Scheduled.
    let (_, body) = create(
        &bmw,
        json!({"kind": "async:demo:echo", "options": {"process_in": "3s"}}),
    )
    .await;
    let scheduled = body["data"]["task_id"].as_str().unwrap().to_owned();
    assert_eq!(delete(scheduled.clone()).await.0, 200);
    // Running.
    let (_, body) = create(
        &bmw,
        json!({"kind": "async:demo:sleep", "payload": {"seconds": 30}}),
    )
    .await;
    let running = body["data"]["task_id"].as_str().unwrap().to_owned();
    assert!(
        wait_until(Duration::from_secs(5), async || get(&bmw, &running).await.1
            ["data"]["state"]
            == "active")
        .await,
        "long task shows active"
    );
    assert_eq!(delete(running.clone()).await.0, 200);
    bmw.wait_log(
        Duration::from_secs(5),
        &["async task deleted while running", &running],
    )
    .await;
    // Pending (no worker listens on this queue).
    let (_, body) = create(
        &bmw,
        json!({"kind": "async:demo:echo", "options": {"queue": "nobody"}}),
    )
    .await;
    let pending = body["data"]["task_id"].as_str().unwrap().to_owned();
    assert_eq!(get(&bmw, &pending).await.1["data"]["state"], "pending");
    assert_eq!(delete(pending.clone()).await.0, 200);
    for id in [&scheduled, &running, &pending] {
        assert_eq!(get(&bmw, id).await.0, 404, "{id} gone");
    }
    assert_eq!(delete(pending).await.0, 404);
    // The scheduled one never runs.
    tokio::time::sleep(Duration::from_secs(4)).await; // past its due time
    assert_eq!(count(&events, &scheduled, "succeeded"), 0);
    assert_eq!(
        count(&events, &running, "succeeded") + count(&events, &running, "failed"),
        0
    );
    drop(env);
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_publishes_and_commands_enqueue_too() {
    let (env, bmw, events) = start().await;
    // Fastest path: a task message straight on bmw.async.<queue>.
    let body = json!({"kind": "async:demo:echo", "payload": {"raw": true}});
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(body.to_string().into())
        .message_id("raw-1");
    crate::harness::publish_stored(&env, "bmw.async.default", publish).await;
    assert!(
        wait_until(Duration::from_secs(5), async || count(
            &events,
            "raw-1",
            "succeeded"
        ) == 1)
        .await,
        "raw task ran with its Nats-Msg-Id as id"
    );
    // A bmw.task.create command with an async kind, answered on Bmw-Reply.
    let submitted = env
        .client
        .submit_json(
            "bmw.task.create",
            json!({"kind": "async:demo:echo", "payload": {}})
                .to_string()
                .as_bytes(),
        )
        .await
        .unwrap();
    let bmw::client::Submitted::Done(outcome) = submitted else {
        panic!("no outcome")
    };
    let id = outcome.data["task_id"].as_str().unwrap().to_owned();
    assert!(wait_count(&events, &id, "succeeded", 1, 5).await);
    // Queue stats count what was processed.
    let (status, stats) = http(Method::GET, &format!("{}/bmw/queue/", bmw.base_url()), None).await;
    assert_eq!(status, 200);
    let default = stats["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "default")
        .cloned()
        .unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), async || {
            let (_, s) = http(Method::GET, &format!("{}/bmw/queue/", bmw.base_url()), None).await;
            s["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|q| q["queue"] == "default" && q["processed"].as_u64() >= Some(2))
        })
        .await,
        "processed count reaches 2: {default}"
    );
}

/// A task with neither `timeout` nor `deadline` is held to the worker's
/// default limit (asynq's 30 minutes; here 1 s), so a hung handler does not
/// hold its slot for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_without_limits_is_held_to_the_default_timeout() {
    let env = TestEnv::start().await;
    let events = collect_events(&env);
    env.nats.client.flush().await.unwrap();
    let _worker = BmwProcess::worker(&env.url(), &["--async-default-timeout", "1s"]);
    let body = json!({"kind": "async:demo:sleep", "payload": {"seconds": 30},
                      "options": {"task_id": "hung-1", "retry": 0}});
    env.client
        .submit_json("bmw.task.create", body.to_string().as_bytes())
        .await
        .unwrap();
    let failed = || {
        events
            .lock()
            .unwrap()
            .iter()
            .find(|e| e["task_id"] == "hung-1" && e["what"] == "failed")
            .cloned()
    };
    assert_eventually!(
        Duration::from_secs(10),
        failed().is_some(),
        "the attempt is cut off"
    );
    let error = failed().unwrap()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.starts_with("timeout after 1s"), "{error}");
}

/// A requeued task that fails again at once is archived again, whatever the
/// requeue still had to do: its new record and its new dead letter stay (the
/// requeue once purged every dead letter of the task and removed its record
/// after publishing it, racing the new run's archive).
#[tokio::test(flavor = "multi_thread")]
async fn a_requeued_task_failing_at_once_is_archived_again_every_time() {
    let (env, bmw, events) = start().await;
    let (status, body) = create(
        &bmw,
        json!({"kind": "async:demo:fail", "payload": {"fail_times": 1000}, "options": {"retry": 0}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["data"]["task_id"].as_str().unwrap().to_owned();
    assert!(wait_count(&events, &id, "archived", 1, 10).await);
    let dead = env.nats.js.get_stream("BMW_DEAD").await.unwrap();
    for round in 2..=12 {
        let (status, body) = http(
            Method::POST,
            &format!("{}/bmw/task/async/requeue", bmw.base_url()),
            Some(&json!({"task_id": id}).to_string()),
        )
        .await;
        assert_eq!(status, 200, "round {round}: {body}");
        assert!(
            wait_count(&events, &id, "archived", round, 10).await,
            "round {round}: archived again"
        );
        // The archive is done once its event is out; the requeue's own
        // clean-up must not undo it, however late it comes.
        assert_eventually!(
            Duration::from_secs(5),
            get(&bmw, &id).await.1["data"]["state"] == "archived",
            "round {round}: the record says archived"
        );
        assert!(
            dead.get_last_raw_message_by_subject(&format!("bmw.dead.default.{id}"))
                .await
                .is_ok(),
            "round {round}: the new dead letter is kept"
        );
    }
}
