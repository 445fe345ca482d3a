//! Async tasks over several worker processes: weighted queues (a busy low
//! queue does not starve critical), at-least-once across a `kill -9` (no task
//! of 1,000 is lost), graceful shutdown that hands fetched tasks back at
//! once instead of leaving them to the ack timeout, and slow tasks not
//! fetched ahead of a worker that joins.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::async_tasks::{ASYNC_FAST, collect_events};
use crate::harness::{BmwProcess, TestEnv, wait_until};

/// Publishes `n` tasks straight on `bmw.async.<queue>` with a window of
/// outstanding acks; returns their ids.
async fn publish_many(
    env: &TestEnv,
    queue: &str,
    prefix: &str,
    n: usize,
    task: Value,
) -> Vec<String> {
    let mut acks = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let mut body = task.clone();
        body["id"] = json!(id);
        let publish = PublishMessage::build()
            .payload(body.to_string().into())
            .message_id(&id);
        acks.push(
            env.nats
                .js
                .send_publish(format!("bmw.async.{queue}.{id}"), publish)
                .await
                .unwrap(),
        );
        ids.push(id);
    }
    for ack in acks {
        ack.await.unwrap();
    }
    ids
}

fn succeeded(events: &std::sync::Mutex<Vec<Value>>, prefix: &str) -> HashSet<String> {
    succeeded_on(events, prefix, None)
}

/// Ids (starting with `prefix`) of tasks that succeeded, on `worker` if given.
fn succeeded_on(
    events: &std::sync::Mutex<Vec<Value>>,
    prefix: &str,
    worker: Option<&str>,
) -> HashSet<String> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == "succeeded")
        .filter(|e| worker.is_none_or(|w| e["worker_id"] == w))
        .filter_map(|e| {
            e["task_id"]
                .as_str()
                .filter(|id| id.starts_with(prefix))
                .map(str::to_owned)
        })
        .collect()
}

/// Worker arguments: `extra`, then the fast retry and claim settings.
fn worker_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    extra.iter().chain(ASYNC_FAST).copied().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_low_queue_does_not_starve_critical() {
    let env = TestEnv::start().await;
    let events = collect_events(&env);
    env.nats.client.flush().await.unwrap();
    let args = worker_args(&["--queues", "critical=6,low=1", "--concurrency", "7"]);
    let worker = BmwProcess::worker(&env.url(), &args);
    worker.worker_id().await;
    let sleep = json!({"kind": "async:demo:sleep", "payload": {"seconds": 0.3}});
    publish_many(&env, "low", "low", 40, sleep.clone()).await;
    // Let the low queue saturate the worker first.
    assert!(
        wait_until(Duration::from_secs(5), async || !succeeded(&events, "low")
            .is_empty())
        .await
    );
    publish_many(&env, "critical", "crit", 12, sleep).await;
    assert!(
        wait_until(Duration::from_secs(15), async || succeeded(&events, "crit")
            .len()
            == 12)
        .await,
        "critical tasks ran"
    );
    let low_done = succeeded(&events, "low").len();
    // Alone, 12 critical tasks on 6 of 7 slots take about 0.6 s; starved behind
    // 40 low tasks they would wait for most of them.
    assert!(
        low_done < 30,
        "critical waited behind {low_done} of 40 low tasks"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_task_is_lost_when_a_worker_is_killed_mid_run() {
    let env = TestEnv::start().await;
    let events = collect_events(&env);
    // The events as sent: one per batch of completions.
    let mut batches = env
        .nats
        .client
        .subscribe("bmw.event.async.*.succeeded")
        .await
        .unwrap();
    env.nats.client.flush().await.unwrap();
    let args = worker_args(&["--concurrency", "16"]);
    let mut doomed = BmwProcess::worker(&env.url(), &args);
    let survivor = BmwProcess::worker(&env.url(), &args);
    doomed.worker_id().await;
    survivor.worker_id().await;
    const N: usize = 1000;
    let ids = publish_many(
        &env,
        "default",
        "t",
        N,
        json!({"kind": "async:demo:sleep", "payload": {"seconds": 0.02}}),
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(20), async || succeeded(&events, "t-")
            .len()
            >= N / 4)
        .await,
        "work started"
    );
    doomed.kill9();
    let killed = Instant::now();
    let all = wait_until(Duration::from_secs(60), async || {
        succeeded(&events, "t-").len() == N
    })
    .await;
    let done = succeeded(&events, "t-");
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !done.contains(*id))
        .take(5)
        .collect();
    assert!(
        all,
        "{} of {N} tasks ran; missing e.g. {missing:?}",
        done.len()
    );
    eprintln!(
        "1000 tasks, a worker killed mid-run: all ran {:?} after the kill",
        killed.elapsed()
    );
    // Each `succeeded` event lists its tasks, and says how many.
    let (mut sent, mut listed) = (0, 0);
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), batches.next()).await {
        let event: Value = serde_json::from_slice(&m.payload).unwrap();
        let tasks = event["tasks"].as_array().expect("a tasks list");
        assert_eq!(event["count"], tasks.len(), "{event}");
        assert!(
            tasks
                .iter()
                .all(|t| t["task_id"].is_string() && t["attempt"].is_u64()),
            "{event}"
        );
        (sent, listed) = (sent + 1, listed + tasks.len());
    }
    assert!(listed >= N, "{listed} tasks listed in {sent} events");
    eprintln!("{listed} completions reported in {sent} succeeded events");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_returns_fetched_tasks_at_once() {
    let env = TestEnv::start().await;
    let events = collect_events(&env);
    env.nats.client.flush().await.unwrap();
    // Default ack wait (30 s): a task left to it would take 30 s to move.
    let mut first = BmwProcess::worker(&env.url(), &["--concurrency", "2"]);
    first.worker_id().await;
    publish_many(
        &env,
        "default",
        "g",
        6,
        json!({"kind": "async:demo:sleep", "payload": {"seconds": 1}}),
    )
    .await;
    // Wait until the worker holds its two tasks (fetched, not yet acked).
    let stream = env.nats.js.get_stream("BMW_ASYNC").await.unwrap();
    let running = async || {
        let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
            stream.get_consumer("bmw-async-default").await;
        match consumer {
            Ok(mut c) => c.info().await.is_ok_and(|i| i.num_ack_pending == 2),
            Err(_) => false,
        }
    };
    assert!(
        wait_until(Duration::from_secs(5), running).await,
        "the first two tasks are running"
    );
    assert!(first.sigterm(), "worker exits on SIGTERM");
    let stopped = Instant::now();
    // The running ones finished within the grace period.
    assert!(
        succeeded(&events, "g-").len() >= 2,
        "running tasks finished before exit"
    );
    let second = BmwProcess::worker(&env.url(), &["--concurrency", "4"]);
    second.worker_id().await;
    assert!(
        wait_until(Duration::from_secs(15), async || succeeded(&events, "g-")
            .len()
            == 6)
        .await,
        "the rest ran on the next worker"
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(20),
        "nothing waited for the 30 s ack timeout"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_tasks_are_not_fetched_ahead_of_other_workers() {
    let env = TestEnv::start().await;
    let events = collect_events(&env);
    env.nats.client.flush().await.unwrap();
    let args = worker_args(&["--concurrency", "2", "--queues", "slow"]);
    const N: usize = 8;
    // A burst of one-second tasks waits for a first worker.
    publish_many(
        &env,
        "slow",
        "s",
        N,
        json!({"kind": "async:demo:sleep", "payload": {"seconds": 1}}),
    )
    .await;
    let first = BmwProcess::worker(&env.url(), &args);
    let first_id = first.worker_id().await;
    // It takes its 2 slots and fetches 2 ahead (one-second tasks), no more.
    let consumer_name = bmw::nats::names::async_consumer("slow");
    let taken = async || {
        let stream = env.nats.js.get_stream("BMW_ASYNC").await.unwrap();
        // Not there until the worker creates it.
        let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
            stream.get_consumer(&consumer_name).await;
        match consumer {
            Ok(mut c) => c.info().await.map(|i| i.num_ack_pending).unwrap_or(0),
            Err(_) => 0,
        }
    };
    assert!(
        wait_until(Duration::from_secs(10), async || taken().await >= 4).await,
        "the first worker started"
    );
    let second = BmwProcess::worker(&env.url(), &args);
    let second_id = second.worker_id().await;
    assert!(
        wait_until(Duration::from_secs(30), async || succeeded(&events, "s-")
            .len()
            == N)
        .await,
        "all slow tasks ran"
    );
    let counts = [&first_id, &second_id].map(|w| succeeded_on(&events, "s-", Some(w)).len());
    assert!(
        counts[1] >= 2,
        "the second worker got part of the burst: {counts:?}"
    );
}
