//! Nothing enqueued twice, nothing locked for nothing (issue 11, item 6): a
//! redelivered create command enqueues its task once, a unique lock is
//! released when its task could not be published, a dead letter stored twice
//! is stored once, two requeues at once make one copy, and a deleted or
//! paused periodic task leaves none of its queued ticks to run.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use bmw::nats::names;
use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};

use crate::harness::{TestEnv, wait_until};

/// How many messages `BMW_<stream>` holds on subjects matching `filter`.
async fn count_on(env: &TestEnv, stream: &str, filter: &str) -> usize {
    let stream = env.nats.js.get_stream(stream).await.unwrap();
    let found: Vec<(String, usize)> = stream
        .info_with_subjects(filter)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    found.into_iter().map(|(_, n)| n).sum()
}

async fn submit(env: &TestEnv, subject: &str, body: &Value) -> Result<Value, bmw::task::OpError> {
    match env
        .client
        .submit_json(subject, body.to_string().as_bytes())
        .await?
    {
        bmw::client::Submitted::Done(o) => {
            assert!(o.result, "{o:?}");
            Ok(o.data)
        }
        bmw::client::Submitted::Accepted { .. } | bmw::client::Submitted::Duplicate { .. } => {
            panic!("applied directly")
        }
    }
}

#[tokio::test]
async fn a_redelivered_create_command_enqueues_its_task_once() {
    let env = TestEnv::start().await;
    let ops = bmw::ops::Operations::open(&env.nats, Arc::new(bmw::builtin::registry()))
        .await
        .unwrap();
    // The workers' shared consumer (no worker runs): this test is the worker.
    let consumer = env
        .nats
        .js
        .get_stream(names::STREAM_TASKS)
        .await
        .unwrap()
        .get_or_create_consumer(
            names::CONSUMER_COMMANDS,
            pull::Config {
                durable_name: Some(names::CONSUMER_COMMANDS.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // No `id` and no `Nats-Msg-Id`: only the delivery itself is stable.
    let body = json!({"kind": "async:demo:noop", "payload": {"n": 1},
                      "options": {"queue": "redelivered", "unique_ttl": "1h"}});
    let body = bmw::nats::to_json_bytes(&body);
    env.nats
        .js
        .publish(names::SUBJECT_CREATE, body)
        .await
        .unwrap()
        .await
        .unwrap();
    let mut answers = Vec::new();
    for _ in 0..3 {
        let message: jetstream::Message = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap()
            .next()
            .await
            .expect("the command, delivered again")
            .unwrap();
        let command = bmw::command::wire::parse_delivered(&message).unwrap();
        // Applied, and its ack lost: delivered again.
        answers.push(ops.apply(&command).await.unwrap().unwrap());
        message.ack_with(AckKind::Nak(None)).await.unwrap();
    }
    let task_id = &answers[0]["task_id"];
    for again in &answers[1..] {
        assert_eq!(&again["task_id"], task_id, "{answers:?}");
        assert_eq!(again["duplicate"], true, "{again}");
    }
    assert_eq!(
        count_on(&env, names::STREAM_ASYNC, "bmw.async.redelivered.>").await,
        1,
        "{answers:?}"
    );
}

#[tokio::test]
async fn creates_through_the_bridge_path_keep_a_fresh_id_each() {
    let env = TestEnv::start().await;
    // The same body, with the same command id, twice: two tasks.
    let body = json!({"id": "same", "kind": "async:demo:noop", "options": {"queue": "direct"}});
    let first = submit(&env, names::SUBJECT_CREATE, &body).await.unwrap();
    let second = submit(&env, names::SUBJECT_CREATE, &body).await.unwrap();
    assert_ne!(first["task_id"], second["task_id"]);
    assert_eq!(
        count_on(&env, names::STREAM_ASYNC, "bmw.async.direct.>").await,
        2
    );
}

#[tokio::test]
async fn a_unique_lock_is_released_when_its_task_is_not_published() {
    let env = TestEnv::start().await;
    let body = json!({"kind": "async:demo:noop", "payload": {"n": 2},
                      "options": {"unique_ttl": "1h"}});
    // The stream refuses every task (too large for it) after the lock is taken.
    let mut stream = env.nats.js.get_stream(names::STREAM_ASYNC).await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    let original = config.max_message_size;
    config.max_message_size = 16;
    env.nats.js.update_stream(&config).await.unwrap();
    let refused = submit(&env, names::SUBJECT_CREATE, &body).await;
    assert!(
        matches!(refused, Err(bmw::task::OpError::Nats(_))),
        "{refused:?}"
    );
    config.max_message_size = original;
    env.nats.js.update_stream(&config).await.unwrap();
    // Not held for the hour: the same create is taken now, and holds it.
    let created = submit(&env, names::SUBJECT_CREATE, &body).await.unwrap();
    let again = submit(&env, names::SUBJECT_CREATE, &body).await;
    assert!(
        matches!(&again, Err(bmw::task::OpError::Conflict { task_id, .. }) if *task_id == created["task_id"]),
        "{again:?}"
    );
}

fn task(id: &str) -> bmw::queue::TaskMessage {
    bmw::queue::TaskMessage {
        id: id.into(),
        kind: "async:demo:noop".into(),
        payload: json!({}),
        options: bmw::task::Options::default(),
        enqueued_at: None,
        errors: vec!["failed".into()],
    }
}

#[tokio::test]
async fn a_dead_letter_stored_twice_is_stored_once() {
    let env = TestEnv::start().await;
    let js = &env.nats.js;
    // The same delivery archived twice (its ack lost): one dead letter.
    bmw::queue::dead_letter::store(js, "q", &task("t1"), "BMW_ASYNC-7")
        .await
        .unwrap();
    bmw::queue::dead_letter::store(js, "q", &task("t1"), "BMW_ASYNC-7")
        .await
        .unwrap();
    assert_eq!(count_on(&env, names::STREAM_DEAD, "bmw.dead.q.t1").await, 1);
    // A requeued copy (another message) archived again is another one.
    bmw::queue::dead_letter::store(js, "q", &task("t1"), "BMW_ASYNC-9")
        .await
        .unwrap();
    assert_eq!(count_on(&env, names::STREAM_DEAD, "bmw.dead.q.t1").await, 2);
}

#[tokio::test]
async fn requeues_at_once_enqueue_one_copy() {
    let env = TestEnv::start().await;
    bmw::queue::dead_letter::store(&env.nats.js, "requeued", &task("t2"), "BMW_ASYNC-1")
        .await
        .unwrap();
    let requeues = (0..8).map(|_| env.client.requeue("t2"));
    let answers = futures::future::join_all(requeues).await;
    // Each answers 200, or 404 once another took the dead letter; never a NATS error.
    assert!(answers.iter().any(Result::is_ok), "{answers:?}");
    for answer in &answers {
        assert!(
            matches!(answer, Ok(_) | Err(bmw::task::OpError::NotFound(_))),
            "{answers:?}"
        );
    }
    assert_eq!(
        count_on(&env, names::STREAM_ASYNC, "bmw.async.requeued.t2").await,
        1,
        "{answers:?}"
    );
    assert_eq!(
        count_on(&env, names::STREAM_DEAD, "bmw.dead.requeued.t2").await,
        0
    );
}

#[tokio::test]
async fn a_deleted_or_paused_periodic_task_leaves_no_queued_ticks() {
    let env = TestEnv::start().await;
    let ticks = names::tick_subject("nobody", "periodic:demo:tick");
    let create = json!({"kind": "periodic:demo:tick",
                        "options": {"every": "1s", "queue": "nobody"}});
    for stop in ["delete", "pause"] {
        submit(&env, names::SUBJECT_CREATE, &create).await.unwrap();
        // No worker runs the queue: the ticks wait in it.
        assert!(
            wait_until(Duration::from_secs(10), async || {
                count_on(&env, names::STREAM_SCHEDULES, &ticks).await >= 2
            })
            .await,
            "ticks queued"
        );
        if stop == "delete" {
            let body = json!({"task_type": "periodic", "kind": "periodic:demo:tick"});
            submit(&env, names::SUBJECT_DELETE, &body).await.unwrap();
        } else {
            env.client
                .pause_periodic("periodic:demo:tick", true)
                .await
                .unwrap();
        }
        assert_eq!(
            count_on(&env, names::STREAM_SCHEDULES, &ticks).await,
            0,
            "after {stop}"
        );
    }
}

/// The consumer of a queue keeps the ack wait of the worker that created it;
/// a worker configured with a longer one used to send its progress acks too
/// late, so a long task was redelivered and ran twice at once.
#[tokio::test(flavor = "multi_thread")]
async fn long_tasks_are_kept_alive_at_the_consumers_ack_wait() {
    let env = TestEnv::start().await;
    let events = crate::harness::collect_events(&env, "bmw.event.async.>");
    env.nats.client.flush().await.unwrap();
    let mut first = crate::harness::BmwProcess::worker(
        &env.url(),
        &["--queues", "slow", "--async-ack-wait", "2s"],
    );
    first.worker_id().await;
    let stream = env.nats.js.get_stream("BMW_ASYNC").await.unwrap();
    let created = wait_until(Duration::from_secs(10), async || {
        stream
            .consumer_info(names::async_consumer("slow"))
            .await
            .is_ok()
    })
    .await;
    assert!(created, "the first worker creates the queue's consumer");
    assert!(first.sigterm());
    let _second = crate::harness::BmwProcess::worker(
        &env.url(),
        &["--queues", "slow", "--async-ack-wait", "60s"],
    );
    _second.worker_id().await;
    let body = json!({"kind": "async:demo:sleep", "payload": {"seconds": 5},
                      "options": {"queue": "slow", "task_id": "long-1"}});
    submit(&env, names::SUBJECT_CREATE, &body).await.unwrap();
    let runs = || {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["task_id"] == "long-1" && e["what"] == "succeeded")
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(15), async || runs() >= 1).await,
        "the task ran"
    );
    // A second run, had it been redelivered at 2 s, ends within 2-3 s of the first.
    let twice = wait_until(Duration::from_secs(4), async || runs() >= 2).await;
    assert!(
        !twice,
        "the 5 s task ran twice: {:?}",
        events.lock().unwrap()
    );
}

/// Issue 11, item 6: tasks waiting for a retry do not hold the queue's
/// `max_ack_pending`. A `nak` with the back-off delay kept each failed
/// message pending on the consumer for the whole delay, so a queue whose
/// failed tasks filled `max_ack_pending` stopped running new ones.
#[tokio::test(flavor = "multi_thread")]
async fn tasks_waiting_for_a_retry_do_not_stop_their_queue() {
    const LIMIT: i64 = 4;
    let env = TestEnv::start().await;
    // The queue's consumer, made before any worker (which keeps it), with
    // room for 4 messages delivered and not acknowledged.
    let name = names::async_consumer("retries");
    env.nats
        .js
        .get_stream(names::STREAM_ASYNC)
        .await
        .unwrap()
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subjects: names::async_queue_filters("retries"),
                max_ack_pending: LIMIT,
                max_deliver: -1,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let events = crate::harness::collect_events(&env, "bmw.event.async.>");
    env.nats.client.flush().await.unwrap();
    let _worker = crate::harness::BmwProcess::worker(
        &env.url(),
        &["--queues", "retries", "--async-retry-base", "60s"],
    );
    // Twice as many failing tasks as the consumer may hold, each waiting
    // about a minute for its next attempt.
    for n in 0..2 * LIMIT {
        let body = json!({"kind": "async:demo:fail", "payload": {"n": n},
                          "options": {"queue": "retries", "retry": 3, "task_id": format!("failing-{n}")}});
        submit(&env, names::SUBJECT_CREATE, &body).await.unwrap();
    }
    let seen = |what: &str, prefix: &str| {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                e["what"] == what
                    && e["task_id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with(prefix))
            })
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(20), async || seen("retry", "failing-")
            >= LIMIT as usize)
        .await,
        "the first failures"
    );
    // A new task still runs, and so does every failing one's first attempt.
    let body = json!({"kind": "async:demo:noop",
                      "options": {"queue": "retries", "task_id": "after-the-failures"}});
    submit(&env, names::SUBJECT_CREATE, &body).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), async || seen(
            "succeeded",
            "after-the-failures"
        ) == 1)
        .await,
        "a new task runs while {} failed tasks wait for their retry: {:?}",
        seen("retry", "failing-"),
        events.lock().unwrap()
    );
    assert!(
        wait_until(Duration::from_secs(10), async || seen("retry", "failing-")
            == 2 * LIMIT as usize)
        .await,
        "every failing task ran once: {:?}",
        events.lock().unwrap()
    );
    // Each waits as one scheduled retry, not as a pending message, and its
    // record says so.
    assert_eq!(
        count_on(
            &env,
            names::STREAM_SCHEDULES,
            "bmw.schedule.retry.retries.>"
        )
        .await,
        2 * LIMIT as usize
    );
    let record = env.client.get_async("failing-0").await.unwrap();
    assert_eq!(
        (record.state, record.attempts),
        (bmw::queue::TaskState::Retry, 1),
        "{record:?}"
    );
    // Deleting a task that waits for its retry drops the retry too.
    let body = json!({"task_type": "async", "task_id": "failing-0"});
    submit(&env, names::SUBJECT_DELETE, &body).await.unwrap();
    assert_eq!(
        count_on(
            &env,
            names::STREAM_SCHEDULES,
            "bmw.schedule.retry.retries.>"
        )
        .await,
        2 * LIMIT as usize - 1
    );
}

/// A retry scheduled as a new message runs as the task's next attempt: the
/// attempt number, the error history and the retry limit carry over.
#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_retry_is_the_next_attempt_of_its_task() {
    let env = TestEnv::start().await;
    let events = crate::harness::collect_events(&env, "bmw.event.async.>");
    env.nats.client.flush().await.unwrap();
    // Delays of 3 s (2.25-3.75 s with the jitter): scheduled, not `nak`ed.
    let _worker = crate::harness::BmwProcess::worker(
        &env.url(),
        &["--queues", "scheduled", "--async-retry-base", "3s"],
    );
    for (id, fail_times, retry) in [("ends-well", 2, 5), ("ends-dead", 9, 1)] {
        let body = json!({"kind": "async:demo:fail", "payload": {"fail_times": fail_times},
                          "options": {"queue": "scheduled", "retry": retry, "task_id": id}});
        submit(&env, names::SUBJECT_CREATE, &body).await.unwrap();
    }
    let attempts = |id: &str, what: &str| -> Vec<u64> {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["task_id"] == id && e["what"] == what)
            .filter_map(|e| e["attempt"].as_u64())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(30), async || {
            attempts("ends-well", "succeeded").len() == 1
                && attempts("ends-dead", "archived").len() == 1
        })
        .await,
        "both tasks ended: {:?}",
        events.lock().unwrap()
    );
    assert_eq!(attempts("ends-well", "failed"), [1, 2]);
    assert_eq!(attempts("ends-well", "succeeded"), [3]);
    assert_eq!(attempts("ends-dead", "failed"), [1, 2]);
    let record = env.client.get_async("ends-dead").await.unwrap();
    assert_eq!(
        (record.state, record.attempts, record.errors.len()),
        (bmw::queue::TaskState::Archived, 2, 2),
        "{record:?}"
    );
    assert_eq!(
        count_on(&env, names::STREAM_SCHEDULES, "bmw.schedule.retry.>").await,
        0,
        "fired schedules are gone"
    );
}

#[tokio::test]
async fn a_dead_letter_without_its_record_is_found_by_id() {
    let env = TestEnv::start().await;
    bmw::queue::dead_letter::store(&env.nats.js, "gone", &task("t3"), "BMW_ASYNC-1")
        .await
        .unwrap();
    // No record (expired, or removed by a requeue an instant before): the
    // dead letter still answers for the task.
    let record = env.client.get_async("t3").await.expect("found by id");
    assert_eq!(record.state, bmw::queue::TaskState::Archived, "{record:?}");
    assert_eq!(record.queue, "gone");
}
