//! Names that become subjects or keys are checked where they enter: a task
//! id with a wildcard cannot pick another task, a producer's id unfit for a
//! subject does not make its task impossible to dead-letter, and each
//! periodic kind has its own schedule.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, TestEnv, collect_events, create_ok, http};

fn archived(events: &Arc<std::sync::Mutex<Vec<Value>>>) -> Vec<String> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == "archived")
        .filter_map(|e| e["task_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn wildcard_task_ids_are_refused_where_they_enter() {
    let env = TestEnv::start().await;
    let events = collect_events(&env, "bmw.event.async.>");
    env.nats.client.flush().await.unwrap();
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    for id in ["victim-1", "victim-2"] {
        let body = json!({"kind": "async:demo:fail", "payload": {"skip_retry": true}, "options": {"task_id": id}});
        create_ok(&base, &body).await;
    }
    assert_eventually!(
        Duration::from_secs(10),
        archived(&events).len() == 2,
        "both tasks archived: {:?}",
        archived(&events)
    );
    for id in ["*", ">", "victim-*", "a b", "a.b", ""] {
        let body = json!({"task_id": id}).to_string();
        let (status, out) = http(
            Method::POST,
            &format!("{base}/bmw/task/async/requeue"),
            Some(&body),
        )
        .await;
        assert_eq!(status, 400, "requeue {id:?}: {out}");
        let body = json!({"task_type": "async", "task_id": id}).to_string();
        let (status, out) = http(Method::DELETE, &format!("{base}/bmw/task/"), Some(&body)).await;
        assert_eq!(status, 400, "delete {id:?}: {out}");
        let body = json!({"kind": "async:demo:echo", "options": {"task_id": id}}).to_string();
        let (status, out) = http(Method::POST, &format!("{base}/bmw/task/"), Some(&body)).await;
        assert_eq!(status, 400, "create {id:?}: {out}");
    }
    let (status, out) = http(
        Method::GET,
        &format!("{base}/bmw/task/?task_type=async&queue=*"),
        None,
    )
    .await;
    assert_eq!(status, 400, "a wildcard queue filter: {out}");
    // Nothing was requeued: both are still archived.
    for id in ["victim-1", "victim-2"] {
        let (status, out) = http(
            Method::GET,
            &format!("{base}/bmw/task/?task_type=async&task_id={id}"),
            None,
        )
        .await;
        assert_eq!(
            (status, out["data"]["state"].as_str()),
            (200, Some("archived")),
            "{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_id_unfit_for_subjects_is_still_dead_lettered() {
    let env = TestEnv::start().await;
    let events = collect_events(&env, "bmw.event.async.>");
    env.nats.client.flush().await.unwrap();
    let _worker = BmwProcess::worker(&env.url(), &[]);
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, "order 42 *");
    let body = json!({"kind": "async:demo:fail", "payload": {"skip_retry": true}});
    env.nats
        .js
        .publish_with_headers("bmw.async.default", headers, body.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eventually!(
        Duration::from_secs(10),
        archived(&events).iter().any(|id| id.starts_with("x-")),
        "the task is archived under a safe id: {:?}",
        events.lock().unwrap()
    );
    let id = archived(&events)
        .into_iter()
        .find(|id| id.starts_with("x-"))
        .unwrap();
    let task = env
        .client
        .get_async(&id)
        .await
        .expect("found by its safe id");
    assert_eq!(task.state, bmw::queue::TaskState::Archived);
    env.client.requeue(&id).await.expect("and requeued by it");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_periodic_kind_has_its_own_schedule() {
    let env = TestEnv::start().await;
    let mut registry = bmw::builtin::registry();
    for kind in ["periodic:a_b:c", "periodic:a:b_c"] {
        registry
            .register_periodic(kind, None, |_: bmw::queue::TaskContext, _: Value| async {
                Ok(())
            })
            .unwrap();
    }
    let client =
        bmw::client::TaskClient::new(env.nats.clone(), Arc::new(registry), Duration::from_secs(5))
            .await
            .unwrap();
    for kind in ["periodic:a_b:c", "periodic:a:b_c"] {
        let body = json!({"kind": kind, "options": {"every": "1h"}}).to_string();
        client
            .submit_json("bmw.task.create", body.as_bytes())
            .await
            .unwrap();
    }
    let stream = env.nats.js.get_stream("BMW_SCHEDULES").await.unwrap();
    for kind in ["periodic:a_b:c", "periodic:a:b_c"] {
        let subject = bmw::nats::names::schedule_subject(kind);
        assert!(
            stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .is_ok(),
            "{kind} keeps its schedule on {subject}"
        );
    }
    // A kind that is not one cannot reach the purge filter.
    for kind in ["*", ">", "periodic:*:x", "async:demo:echo"] {
        let body = json!({"task_type": "periodic", "kind": kind}).to_string();
        let err = client
            .submit_json("bmw.task.delete", body.as_bytes())
            .await
            .expect_err(kind);
        assert_eq!(err.status(), 400, "{kind}: {err}");
    }
    assert_eq!(client.list_periodic().await.unwrap().len(), 2);

    // A schedule left by an older bmw on the shared subject is replaced, not kept.
    let legacy = bmw::nats::names::legacy_schedule_subject("periodic:demo:tick");
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_SCHEDULE, "@every 1h");
    headers.insert(
        async_nats::header::NATS_SCHEDULE_TARGET,
        "bmw.fired.default.periodic_demo_tick",
    );
    let tick = json!({"id": "", "kind": "periodic:demo:tick", "payload": {}, "options": {}});
    env.nats
        .js
        .publish_with_headers(legacy.clone(), headers, tick.to_string().into())
        .await
        .unwrap()
        .await
        .expect("the old schedule is stored");
    let body = json!({"kind": "periodic:demo:tick", "options": {"every": "1h"}}).to_string();
    client
        .submit_json("bmw.task.create", body.as_bytes())
        .await
        .unwrap();
    assert!(
        stream
            .get_last_raw_message_by_subject(&legacy)
            .await
            .is_err(),
        "old schedule purged"
    );
    let current = bmw::nats::names::schedule_subject("periodic:demo:tick");
    assert!(
        stream
            .get_last_raw_message_by_subject(&current)
            .await
            .is_ok()
    );
}
