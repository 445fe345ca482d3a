//! The hostile-producer suite (issue 21): what a program allowed to publish
//! on bmw's producer subjects (`bmw.task.*`, `bmw.async.>`) could do to the
//! tasks of others, each attack tried for real against a real nats-server
//! and a real worker, and each shown refused with nothing of other
//! producers' work lost.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage as Publish;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, TestEnv, publish_command};

/// Every subject a producer may publish on: the command subjects and the
/// queue subjects (bare and per task).
const PRODUCER_SUBJECTS: &[&str] = &[
    "bmw.task.create",
    "bmw.task.delete",
    "bmw.task.reload",
    "bmw.task.other",
    "bmw.async.default",
    "bmw.async.default.t-hostile",
    "bmw.async.other",
    "bmw.async.other.t-hostile",
];

/// How many messages each of bmw's streams holds.
async fn stream_counts(env: &TestEnv) -> Vec<(String, u64)> {
    let mut counts = Vec::new();
    for name in bmw::nats::names::ALL_STREAMS {
        let mut stream = env.nats.js.get_stream(*name).await.unwrap();
        counts.push((
            name.to_string(),
            stream.info().await.unwrap().state.messages,
        ));
    }
    counts
}

/// Async tasks waiting on queue `other` (no worker listens there), a delayed
/// one and a periodic schedule: what a rollup would erase.
async fn work_of_others(env: &TestEnv) {
    let mut creates: Vec<Value> = (0..5)
        .map(|n| json!({"kind": "async:demo:noop", "payload": {"n": n}, "options": {"queue": "other"}}))
        .collect();
    creates.push(
        json!({"kind": "async:demo:noop", "options": {"queue": "other", "process_in": "1h"}}),
    );
    creates
        .push(json!({"kind": "periodic:demo:tick", "options": {"every": "1h", "queue": "other"}}));
    for body in creates {
        env.client
            .submit_json(
                bmw::nats::names::SUBJECT_CREATE,
                body.to_string().as_bytes(),
            )
            .await
            .unwrap_or_else(|e| panic!("{body}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_producer_subject_takes_a_rollup() {
    let env = TestEnv::start().await;
    work_of_others(&env).await;
    let before = stream_counts(&env).await;
    let queued = env.client.queue_stats().await.unwrap();
    for subject in PRODUCER_SUBJECTS {
        for rollup in ["all", "sub"] {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Rollup", rollup);
            let publish = Publish::build()
                .payload(br#"{"kind": "async:demo:noop"}"#.to_vec().into())
                .headers(headers);
            let stored = env
                .nats
                .js
                .send_publish(subject.to_string(), publish)
                .await
                .unwrap()
                .await;
            assert!(
                stored.is_err(),
                "Nats-Rollup: {rollup} on {subject} was stored: {stored:?}"
            );
        }
    }
    assert_eq!(
        stream_counts(&env).await,
        before,
        "a rollup removed messages"
    );
    assert_eq!(env.client.queue_stats().await.unwrap(), queued);
    assert_eq!(env.client.list_periodic().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_producer_subject_takes_a_schedule_or_ttl() {
    let env = TestEnv::start().await;
    for subject in PRODUCER_SUBJECTS {
        for (header, value) in [
            ("Nats-Schedule", "@every 1s"),
            ("Nats-TTL", "1s"),
            ("Nats-Schedule-Next", "purge"),
        ] {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(header, value);
            headers.insert("Nats-Schedule-Target", "bmw.async.default.t-fired");
            headers.insert("Nats-Scheduler", "bmw.schedule.periodic:demo:tick");
            let publish = Publish::build()
                .payload(br#"{"kind": "async:demo:noop"}"#.to_vec().into())
                .headers(headers);
            let stored = env
                .nats
                .js
                .send_publish(subject.to_string(), publish)
                .await
                .unwrap()
                .await;
            assert!(
                stored.is_err(),
                "{header}: {value} on {subject} was stored: {stored:?}"
            );
        }
    }
}

/// Reply targets a producer may not name: bmw's own subjects and buckets,
/// the server's API, wildcards, and malformed subjects.
const HOSTILE_REPLY_TARGETS: &[&str] = &[
    "bmw.event.daemon.x.error",
    "bmw.dead.default.t1",
    "bmw.task.create",
    "bmw.async.default",
    "$JS.API.STREAM.DELETE.BMW_ASYNC",
    "$KV.bmw_workers.w1",
    "_INBOX.>",
    "_INBOX.*",
    "_INBOX",
    "_INBOX.",
    "_INBOX..x",
    "_INBOX.a b",
    "",
];

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_goes_only_to_an_inbox() {
    let env = TestEnv::start().await;
    let worker = BmwProcess::worker(&env.url(), &[]);
    worker.worker_id().await;
    let create = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok"}});
    let outcome = publish_command(&env, "bmw.task.create", create.to_string().as_bytes()).await;
    assert_eq!(outcome["result"], true, "{outcome}");
    let uni_id = outcome["data"]["uni_id"].as_str().unwrap().to_owned();
    let key = bmw::task::UniId::from_raw(uni_id.clone()).key();
    let spec_subject = format!("$KV.bmw_daemon_tasks.{key}");
    let claim_subject = format!("$KV.bmw_daemon_claims.{key}");

    // Everything published on a literal target is seen here.
    let mut seen = env.nats.client.subscribe(">").await.unwrap();
    let mut errors = env
        .nats
        .client
        .subscribe("bmw.event.command.>")
        .await
        .unwrap();
    let mut targets: Vec<&str> = HOSTILE_REPLY_TARGETS.to_vec();
    targets.push(&spec_subject);
    targets.push(&claim_subject);
    for target in &targets {
        // A command bmw refuses (no such task): its outcome would be written
        // to the target.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(bmw::nats::names::HEADER_REPLY, *target);
        let body = json!({"task_type": "daemon", "task_uni_id": "daemon:demo:demo-none"});
        let publish = Publish::build()
            .payload(body.to_string().into_bytes().into())
            .headers(headers);
        crate::harness::publish_stored(&env, "bmw.task.delete", publish).await;
        let event = tokio::time::timeout(Duration::from_secs(10), errors.next())
            .await
            .unwrap_or_else(|_| panic!("no error event for Bmw-Reply {target:?}"))
            .unwrap();
        let event: Value = serde_json::from_slice(&event.payload).unwrap();
        assert!(
            event["error"].as_str().unwrap_or("").contains("Bmw-Reply"),
            "{target:?}: {event}"
        );
    }
    // A good inbox (a per-user prefix) still gets its outcome, and nothing
    // was published on any hostile target meanwhile.
    let inbox = "_INBOX_alice.reply1";
    let mut replies = env.nats.client.subscribe(inbox).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(bmw::nats::names::HEADER_REPLY, inbox);
    let body = json!({"task_type": "daemon", "task_uni_id": "daemon:demo:demo-none"});
    let publish = Publish::build()
        .payload(body.to_string().into_bytes().into())
        .headers(headers);
    crate::harness::publish_stored(&env, "bmw.task.delete", publish).await;
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("the outcome on a per-user inbox")
        .unwrap();
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["code"], 404, "{reply}");
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), seen.next()).await {
        let subject = m.subject.as_str();
        if targets.contains(&subject) && subject != claim_subject {
            panic!("a reply was published on {subject}: {:?}", m.payload);
        }
        if subject == claim_subject {
            // Claim renewals are the worker's own; an outcome is not one.
            assert!(
                !String::from_utf8_lossy(&m.payload).contains("\"code\""),
                "an outcome was written over the claim"
            );
        }
    }
    // The task is still there and still held.
    assert_eq!(
        env.bindings().await.get(&uni_id).map(String::is_empty),
        Some(false),
        "the task left the listing or lost its worker"
    );
    assert!(!worker.has_log("reason=removed"), "the task was stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_async_stream_of_bmw_0_1_is_refused_with_the_way_out() {
    let server = crate::harness::NatsServer::start().await;
    let nats = bmw::nats::Nats::connect(&server.url(), "bmw-test")
        .await
        .unwrap();
    // bmw 0.1's BMW_ASYNC: queues and schedules in one stream, rollups on.
    nats.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "BMW_ASYNC".into(),
            subjects: vec!["bmw.async.>".into(), "bmw.schedule.>".into()],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            allow_message_schedules: true,
            allow_rollup: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = bmw::nats::provision::provision(&nats.js, &bmw::nats::provision::Settings::new(1))
        .await
        .unwrap_err()
        .to_string();
    for needle in [
        "BMW_ASYNC",
        "rollup",
        "nats stream rm BMW_ASYNC",
        "0 messages",
    ] {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    // Nothing was changed or made: the old stream is as it was.
    let mut stream = nats.js.get_stream("BMW_ASYNC").await.unwrap();
    assert!(stream.info().await.unwrap().config.allow_rollup);
    assert!(nats.js.get_stream("BMW_SCHEDULES").await.is_err());
}
