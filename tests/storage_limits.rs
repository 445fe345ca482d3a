//! Bounded storage (issue 21, part 4): every stream and bucket has limits
//! from `--storage-max-bytes`; a full queue refuses new work with a clear
//! error and keeps what it holds; daemon claims and heartbeats go on while
//! it is full; `BMW_SCHEDULES`, which cannot refuse by itself, is kept
//! under its share by bmw; the gauge, the log and `/bmw/storage/` warn
//! before a limit is reached.

use std::time::Duration;

use async_nats::jetstream::stream::DiscardPolicy;
use reqwest::Method;
use serde_json::json;

use crate::harness::{BmwProcess, NatsServer, api, http, list_tasks};

/// A budget small enough to fill in a test: `BMW_ASYNC` gets 30 % of it.
const BUDGET: &str = "4MiB";

fn big_payload() -> serde_json::Value {
    json!({"blob": "x".repeat(50_000)})
}

#[tokio::test(flavor = "multi_thread")]
async fn every_stream_is_bounded_and_a_full_queue_refuses_new_work_keeping_the_old() {
    let server = NatsServer::start().await;
    let bmw = BmwProcess::run(&server.url(), &["--storage-max-bytes", BUDGET]).await;
    let base = bmw.base_url();
    let nats = bmw::nats::Nats::connect(&server.url(), "bmw-test")
        .await
        .unwrap();
    let js = &nats.js;

    // Limits everywhere: bytes, messages, message size; discard new but
    // for the events (history) and the schedules (bmw's own limit).
    for name in bmw::nats::storage::STREAMS {
        let mut stream = js.get_stream(name).await.unwrap();
        let config = stream.info().await.unwrap().config.clone();
        assert!(config.max_message_size > 0, "{name}: {config:?}");
        match name {
            "BMW_SCHEDULES" => {
                assert!(config.max_bytes <= 0, "{name} must not drop schedules");
                assert!(
                    config
                        .metadata
                        .contains_key(bmw::nats::provision::SOFT_MAX_BYTES),
                    "{config:?}"
                );
            }
            "BMW_EVENTS" => {
                assert!(config.max_bytes > 0, "{config:?}");
                assert_eq!(config.discard, DiscardPolicy::Old);
            }
            _ => {
                assert!(
                    config.max_bytes > 0 && config.max_bytes < 4 << 20,
                    "{name}: {config:?}"
                );
                assert_eq!(config.discard, DiscardPolicy::New, "{name}");
            }
        }
    }

    // A daemon task runs.
    let daemon = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok"}});
    let (status, out) = http(
        Method::POST,
        &format!("{base}/bmw/task/"),
        Some(&daemon.to_string()),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    bmw.wait_log(
        Duration::from_secs(10),
        &["start task instance, payload: map[content:ok] "],
    )
    .await;

    // A producer fills a queue no worker serves, until it is refused.
    let body = json!({"kind": "async:demo:echo", "payload": big_payload()}).to_string();
    let mut accepted = 0;
    let mut refusal = None;
    for n in 0..200 {
        let sent = js
            .publish(format!("bmw.async.held.t{n}"), body.clone().into())
            .await
            .unwrap();
        match sent.await {
            Ok(_) => accepted += 1,
            Err(e) => {
                refusal = Some(e.to_string());
                break;
            }
        }
    }
    let refusal = refusal.expect("the queue never filled");
    assert!(refusal.contains("maximum bytes exceeded"), "{refusal}");
    assert!(accepted > 5, "{accepted}");
    let held = async || {
        let mut stream = js.get_stream("BMW_ASYNC").await.unwrap();
        stream.info().await.unwrap().state.messages
    };
    assert_eq!(
        held().await,
        accepted + 1,
        "every accepted task and the anchor"
    );
    // More is refused, and nothing old is dropped for it.
    for n in 0..3 {
        let sent = js
            .publish(format!("bmw.async.held.more{n}"), body.clone().into())
            .await
            .unwrap();
        assert!(sent.await.is_err());
    }
    let create =
        json!({"kind": "async:demo:echo", "payload": big_payload(), "options": {"queue": "held"}});
    let (status, out) = http(
        Method::POST,
        &format!("{base}/bmw/task/"),
        Some(&create.to_string()),
    )
    .await;
    assert_eq!(status, 507, "{out}");
    assert!(
        out["message"].as_str().unwrap().contains("storage"),
        "{out}"
    );
    assert_eq!(held().await, accepted + 1);

    // Claims and heartbeats go on: a new daemon task is claimed and runs,
    // and the first keeps its claim past two claim TTLs (3 s each).
    let second = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": 2}});
    let (status, out) = http(
        Method::POST,
        &format!("{base}/bmw/task/"),
        Some(&second.to_string()),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    bmw.wait_log(
        Duration::from_secs(10),
        &["start task instance, payload: map[content:ok n:2] "],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        !bmw.has_log("daemon instance stopped"),
        "{}",
        bmw.logs().join("\n")
    );
    let rows = list_tasks(&base, "daemon").await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter().all(|r| r["binding"]["worker_id"].is_string()),
        "{rows:?}"
    );

    // The warning: the gauge, the log, the storage route.
    assert_eventually!(
        Duration::from_secs(15),
        {
            let text = api::get(format!("{base}/metrics")).send().await.text;
            text.lines().any(|l| {
                l.starts_with("bmw_storage_used_ratio{stream=\"BMW_ASYNC\"}")
                    && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(0.8)
            })
        },
        "no gauge near full"
    );
    bmw.wait_log(
        Duration::from_secs(5),
        &["near its storage limit", "BMW_ASYNC"],
    )
    .await;
    let (status, out) = http(Method::GET, &format!("{base}/bmw/storage/"), None).await;
    assert_eq!(status, 200, "{out}");
    let streams = out["data"].as_array().unwrap();
    let queue = streams.iter().find(|s| s["stream"] == "BMW_ASYNC").unwrap();
    assert_eq!(queue["near_full"], true, "{queue}");
    assert_eq!(queue["when_full"], "refuses new", "{queue}");

    // Once it drains, work is taken again.
    let stream = js.get_stream("BMW_ASYNC").await.unwrap();
    stream.purge().filter("bmw.async.held.>").await.unwrap();
    let sent = js
        .publish("bmw.async.held.after", body.into())
        .await
        .unwrap();
    assert!(sent.await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn delayed_creates_are_refused_once_the_schedules_hold_their_share() {
    let server = NatsServer::start().await;
    let bmw = BmwProcess::run(&server.url(), &["--storage-max-bytes", BUDGET]).await;
    let url = format!("{}/bmw/task/", bmw.base_url());
    let delayed = json!({"kind": "async:demo:echo", "payload": big_payload(), "options": {"process_in": "1h"}});
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..100 {
        let (status, out) = http(Method::POST, &url, Some(&delayed.to_string())).await;
        match status {
            200 => accepted += 1,
            _ => {
                refused = Some((status, out));
                break;
            }
        }
    }
    let (status, out) = refused.expect("the schedules never filled");
    assert_eq!(status, 507, "{out}");
    let message = out["message"].as_str().unwrap();
    assert!(
        message.contains("BMW_SCHEDULES") && message.contains("--storage-max-bytes"),
        "{out}"
    );
    assert!(accepted >= 5, "{accepted}");
    // Every accepted one is still scheduled; a task to run now still goes in.
    let rows = crate::harness::list_tasks(&bmw.base_url(), "async").await;
    let scheduled = rows.iter().filter(|r| r["state"] == "scheduled").count();
    assert_eq!(scheduled, accepted, "{rows:?}");
    let now = json!({"kind": "async:demo:echo", "payload": {"n": 1}});
    let (status, out) = http(Method::POST, &url, Some(&now.to_string())).await;
    assert_eq!(status, 200, "{out}");
}
