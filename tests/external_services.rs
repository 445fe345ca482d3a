//! Async kinds answered by NATS services (`bmw::external::service`), against
//! a real nats-server and an in-process worker: a Rust responder (a
//! queue-grouped subscription in the test) and the Python example
//! (`examples/python/collect_service.py`, nats-py from PyPI in a venv that
//! `scripts/python-env` makes). Success with the request's headers, retries
//! with back-off and with the service's own delay, a 4xx dead-lettered at
//! once, retries used up, a reply slower than the timeout, no responder (the
//! task waits for a service to start), and a reply bmw cannot read.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage as Publish;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{BmwProcess, TestEnv, wait_until};

/// An in-process worker whose registry has the given service kinds; stopped on drop.
struct ServiceWorker {
    token: CancellationToken,
    registry: Arc<bmw::Registry>,
}

impl Drop for ServiceWorker {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Starts a worker with `(kind, subject)` service kinds and fast retries
/// (100 ms base, 1 s ceiling).
fn start_worker(env: &TestEnv, kinds: &[(&str, &str)]) -> ServiceWorker {
    let mut registry = bmw::Registry::new();
    for (kind, subject) in kinds {
        let handler = bmw::external::service::handler(subject).expect("a valid subject");
        registry.register_async(kind, handler).unwrap();
    }
    let config = bmw::Config {
        nats_url: Some(env.url()),
        async_retry_base: Duration::from_millis(100),
        async_retry_max: Duration::from_secs(1),
        ..bmw::Config::default()
    };
    let token = CancellationToken::new();
    let registry = Arc::new(registry);
    let worker = bmw::worker::Worker::new(env.nats.clone(), config, registry.clone());
    tokio::spawn(worker.run(token.clone()));
    ServiceWorker { token, registry }
}

/// Enqueues a task by a raw publish, with `id` as its task id.
async fn enqueue(env: &TestEnv, id: &str, kind: &str, payload: Value, options: Value) {
    let body = json!({"kind": kind, "payload": payload, "options": options});
    let publish = Publish::build()
        .payload(body.to_string().into_bytes().into())
        .message_id(id);
    env.nats
        .js
        .send_publish(bmw::nats::names::async_subject("default", id), publish)
        .await
        .unwrap()
        .await
        .unwrap();
}

type Events = Arc<Mutex<Vec<Value>>>;

fn of(events: &Events, id: &str, what: &str) -> Vec<Value> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["task_id"] == id && e["what"] == what)
        .cloned()
        .collect()
}

async fn wait_event(events: &Events, id: &str, what: &str, n: usize, seconds: u64) {
    let seen = wait_until(Duration::from_secs(seconds), async || {
        of(events, id, what).len() >= n
    })
    .await;
    assert!(
        seen,
        "{id}: {n} `{what}` event(s) within {seconds} s; events: {:#?}",
        events.lock().unwrap()
    );
}

/// What a test responder saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    headers: HeaderMap,
    payload: Value,
}

impl Seen {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    }
}

/// A reply of a test responder: headers and body.
type Reply = (Vec<(&'static str, String)>, Vec<u8>);

/// A Rust responder in the queue group `bmw` on `subject`: records each
/// request and answers what `answer` says (after `delay` when it gives one).
async fn responder(
    env: &TestEnv,
    subject: &str,
    answer: impl Fn(&Seen) -> (Option<Duration>, Reply) + Send + Sync + 'static,
) -> Arc<Mutex<Vec<Seen>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut sub = env
        .nats
        .client
        .queue_subscribe(subject.to_owned(), "bmw".into())
        .await
        .unwrap();
    env.nats.client.flush().await.unwrap();
    let client = env.nats.client.clone();
    let log = seen.clone();
    tokio::spawn(async move {
        let answer = Arc::new(answer);
        while let Some(message) = sub.next().await {
            let request = Seen {
                headers: message.headers.clone().unwrap_or_default(),
                payload: serde_json::from_slice(&message.payload).unwrap_or(Value::Null),
            };
            log.lock().unwrap().push(request.clone());
            let (delay, (headers, body)) = answer(&request);
            let client = client.clone();
            tokio::spawn(async move {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                let mut map = HeaderMap::new();
                for (name, value) in headers {
                    map.insert(name, value.as_str());
                }
                let reply = message.reply.expect("a request");
                let _ = client.publish_with_headers(reply, map, body.into()).await;
            });
        }
    });
    seen
}

fn ok(body: &str) -> (Option<Duration>, Reply) {
    (None, (vec![], body.as_bytes().to_vec()))
}

fn error(code: &str, description: &str, extra: &[(&'static str, &str)]) -> Reply {
    let mut headers = vec![
        ("Nats-Service-Error-Code", code.to_owned()),
        ("Nats-Service-Error", description.to_owned()),
    ];
    headers.extend(extra.iter().map(|(n, v)| (*n, (*v).to_owned())));
    (headers, vec![])
}

fn attempt(seen: &Seen) -> u32 {
    seen.header("Bmw-Attempt").parse().unwrap_or(0)
}

async fn start() -> (TestEnv, Events) {
    let env = TestEnv::start().await;
    let events = crate::harness::collect_events(&env, "bmw.event.async.>");
    env.nats.client.flush().await.unwrap();
    (env, events)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_gets_the_payload_and_the_attempts_headers_and_its_answer_completes_the_task() {
    let (env, events) = start().await;
    let seen = responder(&env, "svc.ok", |_| ok(r#"{"rows": 3}"#)).await;
    let _worker = start_worker(&env, &[("async:svc:ok", "svc.ok")]);
    let before = chrono::Utc::now();
    enqueue(
        &env,
        "ok-1",
        "async:svc:ok",
        json!({"data_id": 7}),
        json!({"retry": 4, "timeout": "30s"}),
    )
    .await;
    wait_event(&events, "ok-1", "succeeded", 1, 15).await;
    assert!(of(&events, "ok-1", "failed").is_empty());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one request: {seen:?}");
    let request = &seen[0];
    assert_eq!(request.payload, json!({"data_id": 7}));
    for (name, want) in [
        ("Bmw-Task-Id", "ok-1"),
        ("Bmw-Kind", "async:svc:ok"),
        ("Bmw-Queue", "default"),
        ("Bmw-Attempt", "1"),
        ("Bmw-Max-Retry", "4"),
    ] {
        assert_eq!(request.header(name), want, "{name}: {request:?}");
    }
    let deadline = chrono::DateTime::parse_from_rfc3339(&request.header("Bmw-Deadline"))
        .expect("Bmw-Deadline is RFC 3339");
    let left = deadline.with_timezone(&chrono::Utc) - before;
    assert!(
        left > chrono::TimeDelta::seconds(25) && left <= chrono::TimeDelta::seconds(31),
        "the deadline is the 30 s timeout away: {left}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_are_retried_with_back_off_or_the_services_delay_then_succeed() {
    let (env, events) = start().await;
    responder(&env, "svc.flaky", |seen| {
        let delay = seen.payload["retry_after"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match attempt(seen) {
            1 | 2 if delay.is_empty() => (None, error("500", "boom", &[])),
            1 => (None, error("503", "busy", &[("Bmw-Retry-After", &delay)])),
            _ => ok("done"),
        }
    })
    .await;
    let _worker = start_worker(&env, &[("async:svc:flaky", "svc.flaky")]);
    enqueue(
        &env,
        "flaky-1",
        "async:svc:flaky",
        json!({}),
        json!({"retry": 5}),
    )
    .await;
    enqueue(
        &env,
        "later-1",
        "async:svc:flaky",
        json!({"retry_after": "700ms"}),
        json!({"retry": 5}),
    )
    .await;
    wait_event(&events, "flaky-1", "succeeded", 1, 15).await;
    let failed = of(&events, "flaky-1", "failed");
    assert_eq!(failed.len(), 2, "two failed attempts: {failed:?}");
    for f in &failed {
        let e = f["error"].as_str().unwrap();
        assert!(e.contains("service `svc.flaky`: error 500: boom"), "{e}");
    }
    let retries = of(&events, "flaky-1", "retry");
    assert_eq!(retries.len(), 2);
    for r in &retries {
        // bmw's back-off: 100 ms doubling, ±25 %, at most 1 s.
        let d = r["delay_seconds"].as_f64().unwrap();
        assert!((0.07..=0.26).contains(&d), "back-off delay {d}: {r}");
    }
    wait_event(&events, "later-1", "succeeded", 1, 15).await;
    let retries = of(&events, "later-1", "retry");
    assert_eq!(retries.len(), 1, "{retries:?}");
    assert_eq!(
        retries[0]["delay_seconds"].as_f64(),
        Some(0.7),
        "the service's delay"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_4xx_is_dead_lettered_at_once_and_used_up_retries_are_too() {
    let (env, events) = start().await;
    let seen = responder(&env, "svc.fail", |seen| {
        match seen.payload["code"].as_str() {
            Some(code) => (None, error(code, "no good", &[])),
            None => ok(""),
        }
    })
    .await;
    let _worker = start_worker(&env, &[("async:svc:fail", "svc.fail")]);
    enqueue(
        &env,
        "bad-1",
        "async:svc:fail",
        json!({"code": "422"}),
        json!({"retry": 5}),
    )
    .await;
    enqueue(
        &env,
        "down-1",
        "async:svc:fail",
        json!({"code": "503"}),
        json!({"retry": 2}),
    )
    .await;
    wait_event(&events, "bad-1", "archived", 1, 15).await;
    wait_event(&events, "down-1", "archived", 1, 15).await;
    let failed = of(&events, "bad-1", "failed");
    assert_eq!(failed.len(), 1, "one attempt only: {failed:?}");
    let e = failed[0]["error"].as_str().unwrap();
    assert!(
        e.contains("error 422: no good") && e.contains("not retried"),
        "{e}"
    );
    assert!(of(&events, "bad-1", "retry").is_empty());
    assert_eq!(
        of(&events, "down-1", "failed").len(),
        3,
        "1 attempt + 2 retries"
    );
    let dead = env.nats.js.get_stream("BMW_DEAD").await.unwrap();
    for id in ["bad-1", "down-1"] {
        let letter = dead
            .get_last_raw_message_by_subject(&format!("bmw.dead.default.{id}"))
            .await
            .unwrap_or_else(|e| panic!("{id} is dead-lettered: {e}"));
        let body: Value = serde_json::from_slice(&letter.payload).unwrap();
        assert!(
            body["errors"].to_string().contains("svc.fail"),
            "the letter keeps the service's errors: {body}"
        );
    }
    let attempts: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.header("Bmw-Task-Id"))
        .collect();
    assert_eq!(
        attempts.iter().filter(|t| *t == "bad-1").count(),
        1,
        "{attempts:?}"
    );
    assert_eq!(
        attempts.iter().filter(|t| *t == "down-1").count(),
        3,
        "{attempts:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_slower_than_the_timeout_fails_the_attempt_and_it_is_retried() {
    let (env, events) = start().await;
    responder(&env, "svc.slow", |seen| match attempt(seen) {
        1 => (Some(Duration::from_secs(3)), (vec![], b"too late".to_vec())),
        _ => ok("in time"),
    })
    .await;
    let _worker = start_worker(&env, &[("async:svc:slow", "svc.slow")]);
    let started = std::time::Instant::now();
    enqueue(
        &env,
        "slow-1",
        "async:svc:slow",
        json!({}),
        json!({"retry": 3, "timeout": "1s"}),
    )
    .await;
    wait_event(&events, "slow-1", "succeeded", 1, 15).await;
    let failed = of(&events, "slow-1", "failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    let e = failed[0]["error"].as_str().unwrap();
    assert!(e.contains("timeout") || e.contains("time limit"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the attempt was cut at its 1 s timeout, not held for the 3 s reply"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_responder_the_task_is_retried_until_a_service_starts() {
    let (env, events) = start().await;
    let _worker = start_worker(&env, &[("async:svc:later", "svc.later")]);
    enqueue(
        &env,
        "wait-1",
        "async:svc:later",
        json!({"n": 1}),
        json!({"retry": 25}),
    )
    .await;
    wait_event(&events, "wait-1", "failed", 2, 15).await;
    let e = of(&events, "wait-1", "failed")[0]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(e.contains("svc.later") && e.contains("no responder"), "{e}");
    assert!(of(&events, "wait-1", "archived").is_empty(), "not lost");
    let seen = responder(&env, "svc.later", |_| ok("")).await;
    wait_event(&events, "wait-1", "succeeded", 1, 15).await;
    assert_eq!(seen.lock().unwrap()[0].payload, json!({"n": 1}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_bmw_cannot_read_fails_the_attempt_and_quotes_it_cut_short() {
    let (env, events) = start().await;
    responder(&env, "svc.garbage", |seen| {
        let body = "garbage ".repeat(300).into_bytes();
        match seen.payload["bad"].as_str() {
            Some("code") => (
                None,
                (vec![("Nats-Service-Error-Code", "banana".into())], body),
            ),
            _ => (
                None,
                (
                    vec![
                        ("Nats-Service-Error-Code", "503".into()),
                        ("Bmw-Retry-After", "whenever".into()),
                    ],
                    body,
                ),
            ),
        }
    })
    .await;
    let _worker = start_worker(&env, &[("async:svc:garbage", "svc.garbage")]);
    enqueue(
        &env,
        "junk-1",
        "async:svc:garbage",
        json!({"bad": "code"}),
        json!({"retry": 1}),
    )
    .await;
    enqueue(
        &env,
        "junk-2",
        "async:svc:garbage",
        json!({"bad": "delay"}),
        json!({"retry": 1}),
    )
    .await;
    for (id, needle) in [
        ("junk-1", "\"banana\" is not a number"),
        ("junk-2", "Bmw-Retry-After"),
    ] {
        wait_event(&events, id, "archived", 1, 15).await;
        let failed = of(&events, id, "failed");
        assert_eq!(failed.len(), 2, "retried like any failure: {failed:?}");
        let e = failed[0]["error"].as_str().unwrap();
        assert!(e.contains("cannot read") && e.contains(needle), "{e}");
        assert!(e.contains("garbage garbage"), "the reply is quoted: {e}");
        assert!(
            e.contains("bytes in all") && e.len() < 900,
            "cut short ({} bytes): {e}",
            e.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_periodic_kind_answered_by_a_service_gets_one_request_per_tick() {
    let (env, _events) = start().await;
    let seen = responder(&env, "svc.tick", |_| ok("")).await;
    let worker = start_worker(&env, &[("periodic:svc:tick", "svc.tick")]);
    let ops = bmw::ops::Operations::open(&env.nats, worker.registry.clone())
        .await
        .unwrap();
    let client =
        bmw::client::TaskClient::with_operations(env.nats.clone(), ops, Duration::from_secs(5));
    let body =
        json!({"kind": "periodic:svc:tick", "payload": {"n": 1}, "options": {"every": "1s"}});
    let created = client
        .submit_json(
            bmw::nats::names::SUBJECT_CREATE,
            body.to_string().as_bytes(),
        )
        .await
        .expect("the periodic task is created");
    assert!(
        matches!(&created, bmw::client::Submitted::Done(o) if o.result),
        "{created:?}"
    );
    assert_eventually!(
        Duration::from_secs(15),
        seen.lock().unwrap().len() >= 2,
        "two ticks reach the service: {:?}",
        seen.lock().unwrap()
    );
    let seen = seen.lock().unwrap().clone();
    let ticks: std::collections::HashSet<String> =
        seen.iter().map(|s| s.header("Bmw-Task-Id")).collect();
    assert!(ticks.len() >= 2, "one request per tick: {seen:?}");
    for request in &seen {
        assert_eq!(request.header("Bmw-Kind"), "periodic:svc:tick");
        assert_eq!(request.payload, json!({"n": 1}));
    }
}

#[test]
fn a_subject_that_cannot_take_a_request_is_refused_with_a_message() {
    let e = bmw::external::service::handler("apm.*").unwrap_err();
    assert!(
        e.to_string().contains("`apm.*`") && e.to_string().contains("wildcard"),
        "{e}"
    );
}

/// The Python of `scripts/python-env` (made once per test run).
fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/python-env");
            let out = Command::new(&script)
                .output()
                .expect("scripts/python-env runs");
            assert!(
                out.status.success(),
                "scripts/python-env failed (python3 with venv and pip, and PyPI, are needed): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

/// The Python example, once it says it is ready.
async fn python_service(env: &TestEnv) -> BmwProcess {
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/collect_service.py");
    let script = script.to_string_lossy().into_owned();
    let url = env.url();
    let service = BmwProcess::spawn_program(&python, &["-u", &script, "--nats-url", &url], &[]);
    service
        .wait_log(Duration::from_secs(30), &["collect_es service ready"])
        .await;
    service
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_gets_retries_timeouts_and_dead_letters_from_bmw() {
    let (env, events) = start().await;
    let service = python_service(&env).await;
    // It is a NATS service: it answers the services API's ping.
    let ping = env
        .nats
        .client
        .request("$SRV.PING.collect_es", "".into())
        .await
        .expect("the example answers $SRV.PING");
    let ping: Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "collect_es", "{ping}");
    let _worker = start_worker(&env, &[("async:collect_es_task", "apm.collect_es")]);
    let kind = "async:collect_es_task";
    enqueue(
        &env,
        "py-ok",
        kind,
        json!({"index": "apm-1"}),
        json!({"timeout": "10s"}),
    )
    .await;
    enqueue(
        &env,
        "py-busy",
        kind,
        json!({"index": "apm-2", "busy_attempts": 2}),
        json!({"retry": 5}),
    )
    .await;
    enqueue(
        &env,
        "py-bad",
        kind,
        json!({"data_id": 1}),
        json!({"retry": 5}),
    )
    .await;
    wait_event(&events, "py-ok", "succeeded", 1, 20).await;
    wait_event(&events, "py-busy", "succeeded", 1, 20).await;
    wait_event(&events, "py-bad", "archived", 1, 20).await;
    let busy = of(&events, "py-busy", "retry");
    assert_eq!(busy.len(), 2, "{busy:?}");
    assert!(
        busy.iter()
            .all(|r| r["delay_seconds"].as_f64() == Some(0.5)),
        "the service's Bmw-Retry-After: {busy:?}"
    );
    assert!(
        busy[0]["error"]
            .as_str()
            .unwrap()
            .contains("error 503: backend busy"),
        "{busy:?}"
    );
    let bad = of(&events, "py-bad", "failed");
    assert_eq!(bad.len(), 1, "a 400 is not retried: {bad:?}");
    assert!(
        bad[0]["error"]
            .as_str()
            .unwrap()
            .contains("error 400: the payload needs an index"),
        "{bad:?}"
    );
    // Slower than its timeout on the first attempt: cut, retried, done.
    enqueue(
        &env,
        "py-slow",
        kind,
        json!({"index": "apm-3", "slow_attempts": 1, "sleep": 1.5}),
        json!({"retry": 3, "timeout": "1s"}),
    )
    .await;
    wait_event(&events, "py-slow", "succeeded", 1, 20).await;
    let slow = of(&events, "py-slow", "failed");
    assert_eq!(slow.len(), 1, "{slow:?}");
    let e = slow[0]["error"].as_str().unwrap();
    assert!(e.contains("timeout") || e.contains("time limit"), "{e}");
    service
        .wait_log(
            Duration::from_secs(5),
            &["task py-ok attempt 1: collected apm-1", "deadline 20"],
        )
        .await;
}

/// The shipped binary, no Rust: `bmw run --config` with a `[[kind]]` whose
/// `service` is a subject; a create over HTTP is answered by a responder on
/// that subject, and the task completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_kind_declared_in_the_config_file_runs_in_the_shipped_binary() {
    let env = TestEnv::start().await;
    let seen = responder(&env, "test.declared.collect", |_| {
        (None, (Vec::new(), b"{\"collected\": 3}".to_vec()))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kinds.toml");
    std::fs::write(
        &config,
        "[[kind]]\nname = \"async:collect_es_task\"\nservice = \"test.declared.collect\"\n",
    )
    .unwrap();
    let bmw = BmwProcess::run(&env.url(), &["--config", config.to_str().unwrap()]).await;
    let body = json!({"kind": "async:collect_es_task", "payload": {"index": "apm-*"},
                      "options": {"retention": "1h"}});
    let data = crate::harness::create_ok(&bmw.base_url(), &body).await;
    let task_id = data["task_id"].as_str().unwrap().to_owned();
    let done = wait_until(Duration::from_secs(20), async || {
        let (_, body) = crate::harness::http(
            reqwest::Method::GET,
            &format!(
                "{}/bmw/task/?task_type=async&task_id={task_id}",
                bmw.base_url()
            ),
            None,
        )
        .await;
        body.to_string().contains("\"completed\"")
    })
    .await;
    assert!(done, "the task completes; logs:\n{}", bmw.logs().join("\n"));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "one request");
    assert_eq!(seen[0].payload, json!({"index": "apm-*"}));
    assert_eq!(seen[0].header("Bmw-Task-Id"), task_id);
}
