//! Issue 14: a burst of mixed daemon and async creates published straight
//! on `bmw.task.create`, applied by three worker processes, one of them
//! `kill -9`'d mid-burst. Every command is answered, and applied exactly
//! once: each async task is stored once and run once, each daemon task
//! stored once and bound to a live worker.
//!
//! The async tasks run on a queue only the first worker listens to and the
//! killed worker is another one, so the kill tests the command path alone
//! (a task killed while it ran would legitimately run again).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, TestEnv, collect_events};

const ASYNC: usize = 1500;
const DAEMON: usize = 500;

/// Whether command `i` of the burst is a daemon create (one in four).
fn is_daemon(i: usize) -> bool {
    i.is_multiple_of(4)
}

fn command(i: usize) -> Value {
    if is_daemon(i) {
        json!({"id": format!("burst-{i}"), "kind": "daemon:demo:demo",
               "payload": {"content": "ok", "n": i}})
    } else {
        json!({"id": format!("burst-{i}"), "kind": "async:demo:noop",
               "payload": {"n": i}, "options": {"queue": "burst"}})
    }
}

/// The last sequence of a stream: how many messages it ever stored.
async fn stored(env: &TestEnv, stream: &str) -> u64 {
    let mut stream = env.nats.js.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.last_sequence
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_creates_with_a_worker_killed_is_applied_once_and_answered() {
    const TOTAL: usize = ASYNC + DAEMON;
    let env = TestEnv::start().await;
    let runner = BmwProcess::worker(&env.url(), &["--queues", "default,burst"]);
    let mut victim = BmwProcess::worker(&env.url(), &["--queues", "default"]);
    let survivor = BmwProcess::worker(&env.url(), &["--queues", "default"]);
    let live: HashSet<String> = [runner.worker_id().await, survivor.worker_id().await].into();
    victim.worker_id().await;
    // What the streams held before (the async stream's anchor message).
    let specs_stream = format!("KV_{}", bmw::nats::names::BUCKET_DAEMON_TASKS);
    let async_before = stored(&env, bmw::nats::names::STREAM_ASYNC).await;
    let specs_before = stored(&env, &specs_stream).await;

    let events = collect_events(&env, "bmw.event.async.>");
    let replies: std::sync::Arc<std::sync::Mutex<HashMap<usize, Vec<Value>>>> =
        std::sync::Arc::default();
    let mut inbox = env
        .nats
        .client
        .subscribe("_INBOX.burst.reply.>")
        .await
        .unwrap();
    env.nats.client.flush().await.unwrap();
    let sink = replies.clone();
    tokio::spawn(async move {
        while let Some(m) = inbox.next().await {
            let i: usize = m.subject.as_str()["_INBOX.burst.reply.".len()..]
                .parse()
                .unwrap();
            let outcome: Value = serde_json::from_slice(&m.payload).unwrap();
            sink.lock().unwrap().entry(i).or_default().push(outcome);
        }
    });
    let answered = || replies.lock().unwrap().len();

    // The burst, 256 publish acks outstanding; the victim dies once a third
    // of the commands are answered.
    let mut acks = FuturesUnordered::new();
    let mut killed_at = None;
    for i in 0..TOTAL {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            bmw::nats::names::HEADER_REPLY,
            format!("_INBOX.burst.reply.{i}").as_str(),
        );
        let publish = PublishMessage::build()
            .payload(bmw::nats::to_json_bytes(&command(i)))
            .headers(headers)
            .message_id(format!("burst-{i}").as_str());
        let ack = env
            .nats
            .js
            .send_publish(bmw::nats::names::SUBJECT_CREATE, publish)
            .await
            .unwrap();
        acks.push(ack.into_future());
        while acks.len() >= 256 {
            acks.next().await.unwrap().unwrap();
        }
        if killed_at.is_none() && answered() >= TOTAL / 3 {
            victim.kill9();
            killed_at = Some(i);
        }
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    if killed_at.is_none() {
        assert_eventually!(
            Duration::from_secs(30),
            answered() >= TOTAL / 3,
            "a third of the burst answered"
        );
        victim.kill9();
    }
    eprintln!(
        "command burst: victim killed after {:?} of {TOTAL} published, {} answered",
        killed_at,
        answered()
    );

    // Every command answered (what the victim held comes back after the
    // consumer's ack wait, 30 s), each time the same way.
    assert_eventually!(
        Duration::from_secs(60),
        answered() == TOTAL,
        "every command answered: {} of {TOTAL}",
        answered()
    );
    let replies = replies.lock().unwrap().clone();
    let mut task_ids = HashSet::new();
    let mut uni_ids = HashSet::new();
    for (i, outcomes) in &replies {
        for outcome in outcomes {
            assert_eq!(outcome["result"], true, "command {i}: {outcome}");
            let (key, id) = if is_daemon(*i) {
                ("uni_id", &mut uni_ids)
            } else {
                ("task_id", &mut task_ids)
            };
            let first = &outcomes[0]["data"][key];
            assert_eq!(&outcome["data"][key], first, "command {i}: {outcomes:?}");
            id.insert(first.as_str().unwrap().to_owned());
        }
    }
    assert_eq!((task_ids.len(), uni_ids.len()), (ASYNC, DAEMON));

    // Async: each task stored once (a redelivered command is deduplicated by
    // its derived id) and run once, on the worker that was never killed.
    assert_eq!(
        stored(&env, bmw::nats::names::STREAM_ASYNC).await - async_before,
        ASYNC as u64
    );
    let runs = || {
        let mut runs: HashMap<String, usize> = HashMap::new();
        for e in events.lock().unwrap().iter() {
            if e["what"] == "succeeded"
                && let Some(id) = e["task_id"].as_str()
            {
                *runs.entry(id.to_owned()).or_default() += 1;
            }
        }
        runs
    };
    assert_eventually!(
        Duration::from_secs(30),
        runs().len() == ASYNC,
        "every async task ran: {} of {ASYNC}",
        runs().len()
    );
    let runs = runs();
    assert_eq!(runs.keys().cloned().collect::<HashSet<_>>(), task_ids);
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "tasks run more than once: {twice:?}");

    // Daemon: each spec stored once, every task bound to a live worker.
    assert_eq!(
        stored(&env, &specs_stream).await - specs_before,
        DAEMON as u64
    );
    assert_eventually!(
        Duration::from_secs(30),
        {
            let bindings = env.bindings().await;
            bindings.len() == DAEMON && bindings.values().all(|w| live.contains(w))
        },
        "every daemon task bound to a live worker"
    );
    let bindings = env.bindings().await;
    assert_eq!(bindings.keys().cloned().collect::<HashSet<_>>(), uni_ids);
    drop((runner, survivor));
}

/// Publishes `body` on `subject` with the reply inbox `_INBOX.burst.order.<i>`;
/// the ack to await.
async fn publish_numbered(
    env: &TestEnv,
    subject: &str,
    i: usize,
    body: &Value,
) -> async_nats::jetstream::context::PublishAckFuture {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        bmw::nats::names::HEADER_REPLY,
        format!("_INBOX.burst.order.{i}").as_str(),
    );
    let publish = PublishMessage::build()
        .payload(bmw::nats::to_json_bytes(body))
        .headers(headers);
    env.nats
        .js
        .send_publish(subject.to_owned(), publish)
        .await
        .unwrap()
}

/// Commands on one daemon task published back to back (create, delete,
/// create with other options), for many tasks at once so that they share
/// the worker's batches: each task's commands apply in order, so every task
/// ends up existing, with the last create's options. One worker: across
/// workers sharing the consumer, order was never kept (design-notes 16).
#[tokio::test(flavor = "multi_thread")]
async fn commands_on_one_daemon_task_apply_in_order_within_batches() {
    const TASKS: usize = 200;
    let env = TestEnv::start().await;
    let worker = BmwProcess::worker(&env.url(), &[]);
    worker.worker_id().await;
    let mut inbox = env
        .nats
        .client
        .subscribe("_INBOX.burst.order.>")
        .await
        .unwrap();
    env.nats.client.flush().await.unwrap();
    let kind = bmw::task::Kind::parse("daemon:demo:demo").unwrap();
    let mut uni_ids = Vec::new();
    // Published back to back, the acks awaited at the end: the commands
    // arrive faster than they are applied, so the lanes' batches fill.
    let mut acks = Vec::new();
    for n in 0..TASKS {
        let payload = json!({"content": "ok", "n": n});
        let uni_id = bmw::task::UniId::new(&kind, "", &payload);
        let create = json!({"kind": "daemon:demo:demo", "payload": payload});
        let delete = json!({"task_type": "daemon", "task_uni_id": uni_id});
        let again =
            json!({"kind": "daemon:demo:demo", "payload": payload, "options": {"retry": 7}});
        acks.push(publish_numbered(&env, bmw::nats::names::SUBJECT_CREATE, 3 * n, &create).await);
        acks.push(
            publish_numbered(&env, bmw::nats::names::SUBJECT_DELETE, 3 * n + 1, &delete).await,
        );
        acks.push(
            publish_numbered(&env, bmw::nats::names::SUBJECT_CREATE, 3 * n + 2, &again).await,
        );
        uni_ids.push(uni_id);
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let mut answered = HashSet::new();
    while answered.len() < 3 * TASKS {
        let m = tokio::time::timeout(Duration::from_secs(30), inbox.next())
            .await
            .expect("every command answered")
            .unwrap();
        let outcome: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(outcome["result"], true, "{}: {outcome}", m.subject);
        answered.insert(m.subject.to_string());
    }
    let specs = env.bucket(bmw::nats::names::BUCKET_DAEMON_TASKS).await;
    for uni_id in &uni_ids {
        let entry = specs.get(uni_id.key()).await.unwrap();
        let spec: Value = serde_json::from_slice(&entry.expect("the task exists")).unwrap();
        assert_eq!(spec["options"]["retry"], 7, "{uni_id}: {spec}");
    }
}
