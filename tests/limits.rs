//! Limits on what is accepted. What is accepted always fits what will be
//! stored: a daemon payload whose spec (payload, and its uni_id, the payload
//! in hex) would exceed the server's max_payload is refused up front — 413
//! over HTTP, 400 on the subject — never answered 202 and then dropped. A
//! queue holds at most `--max-queue-pending` tasks: creates beyond are 429.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, TestEnv, http, publish_command};

/// A payload of about 400 KB: under the bridge's 1 MiB body limit, but its
/// spec (payload + hex uni_id) is about 1.2 MB.
fn big_daemon_create() -> Value {
    json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "blob": "x".repeat(400_000)}})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_that_cannot_be_stored_is_refused_up_front() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let url = format!("{}/bmw/task/", bmw.base_url());
    let (status, out) = http(Method::POST, &url, Some(&big_daemon_create().to_string())).await;
    assert_eq!(status, 413, "{}", out["message"]);
    assert!(
        out["message"].as_str().unwrap().contains("max_payload"),
        "{out}"
    );

    // On the subject: answered 400 on Bmw-Reply (and terminated, not retried).
    let body = big_daemon_create().to_string();
    let outcome = publish_command(&env, bmw::nats::names::SUBJECT_CREATE, body.as_bytes()).await;
    assert_eq!(outcome["code"], 400, "{outcome}");

    // A create that fits still works.
    let ok =
        json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "blob": "x".repeat(1000)}});
    let (status, out) = http(Method::POST, &url, Some(&ok.to_string())).await;
    assert_eq!(status, 200, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_refuses_creates_with_429() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(
        &env.url(),
        &["--max-queue-pending", "5", "--concurrency", "1"],
    )
    .await;
    let url = format!("{}/bmw/task/", bmw.base_url());
    // `held` has no worker: counted from the stream. `default` has one that
    // runs one task at a time: counted from its consumer (running + waiting).
    for (queue, kind, payload) in [
        ("held", "async:demo:echo", json!({})),
        ("default", "async:demo:sleep", json!({"seconds": 30})),
    ] {
        for n in 0..5 {
            let body = json!({"kind": kind, "payload": payload, "options": {"queue": queue, "task_id": format!("{queue}-{n}")}});
            let (status, out) = http(Method::POST, &url, Some(&body.to_string())).await;
            assert_eq!(status, 200, "{queue} #{n}: {out}");
        }
        let body = json!({"kind": kind, "payload": payload, "options": {"queue": queue}});
        let (status, out) = http(Method::POST, &url, Some(&body.to_string())).await;
        assert_eq!(status, 429, "{queue}: {out}");
        let message = out["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("`{queue}`")), "{out}");
    }
    // Another queue is not affected.
    let body = json!({"kind": "async:demo:echo", "options": {"queue": "other"}});
    let (status, out) = http(Method::POST, &url, Some(&body.to_string())).await;
    assert_eq!(status, 200, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_for_a_full_queue_is_kept_until_the_queue_has_room() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &["--max-queue-pending", "1"]).await;
    let url = format!("{}/bmw/task/", bmw.base_url());
    let held = json!({"kind": "async:demo:echo", "options": {"queue": "held", "task_id": "first"}});
    let (status, out) = http(Method::POST, &url, Some(&held.to_string())).await;
    assert_eq!(status, 200, "{out}");
    // On the subject, the queue full: not answered, kept.
    let body =
        json!({"kind": "async:demo:echo", "options": {"queue": "held", "task_id": "second"}});
    let inbox = env.nats.client.new_inbox();
    let mut replies = env.nats.client.subscribe(inbox.clone()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(bmw::nats::names::HEADER_REPLY, inbox.as_str());
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(body.to_string().into())
        .headers(headers);
    crate::harness::publish_stored(&env, bmw::nats::names::SUBJECT_CREATE, publish).await;
    // Longer than bmw used to keep it (20 deliveries a second apart).
    let early = tokio::time::timeout(
        std::time::Duration::from_secs(25),
        futures::StreamExt::next(&mut replies),
    )
    .await;
    assert!(
        early.is_err(),
        "answered while the queue was full: {early:?}"
    );
    // Room again: the command is applied and answered.
    let delete = json!({"task_type": "async", "task_id": "first"});
    let (status, out) = http(Method::DELETE, &url, Some(&delete.to_string())).await;
    assert_eq!(status, 200, "{out}");
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(45),
        futures::StreamExt::next(&mut replies),
    )
    .await
    .expect("applied once the queue had room")
    .unwrap();
    let outcome: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(outcome["code"], 0, "{outcome}");
    assert_eq!(outcome["data"]["task_id"], "second", "{outcome}");
}
