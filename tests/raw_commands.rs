//! Commands published straight on `bmw.task.*` with JetStream, no bridge:
//! the seed walkthrough's effects, `Bmw-Reply` outcomes, and poison messages
//! (terminated, reported as an error event, the consumer keeps going).

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage as Publish;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, TestEnv, assert_refused_outcome, publish_command as publish};

/// Publishes `body` on `subject` with a reply inbox; returns the outcome.
/// The next command error event (`bmw.event.command.<kind>.error`), within 5 s.
async fn next_error(errors: &mut async_nats::Subscriber) -> async_nats::Message {
    let event = tokio::time::timeout(Duration::from_secs(5), errors.next())
        .await
        .expect("an error event")
        .unwrap();
    assert!(
        event.subject.as_str().ends_with(".error"),
        "{}",
        event.subject
    );
    event
}

#[tokio::test(flavor = "multi_thread")]
async fn walkthrough_over_raw_subjects() {
    let env = TestEnv::start().await;
    let metrics_port = crate::harness::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let worker = BmwProcess::worker(&env.url(), &["--metrics-addr", &metrics_addr]);
    let worker_id = worker.worker_id().await;
    let mut events = env
        .nats
        .client
        .subscribe("bmw.event.daemon.>")
        .await
        .unwrap();

    let create = json!({"id": "c-1", "kind": "daemon:demo:demo", "payload": {"content": "ok"}, "options": {"queue": "default"}});
    let outcome = publish(&env, "bmw.task.create", create.to_string().as_bytes()).await;
    assert_eq!(outcome["result"], true, "{outcome}");
    let uni_id = outcome["data"]["uni_id"].as_str().unwrap().to_owned();
    assert_eq!(uni_id, "daemon:demo:demo-7b22636f6e74656e74223a226f6b227d");
    worker
        .wait_log(
            Duration::from_secs(10),
            &["start task instance, payload: map[content:ok] "],
        )
        .await;
    assert_eventually!(
        Duration::from_secs(5),
        env.bindings().await.get(&uni_id) == Some(&worker_id),
        "task bound to the worker"
    );

    // A started event on BMW_EVENTS names the task and the worker.
    let started = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        started.subject.as_str().ends_with(".started"),
        "{}",
        started.subject
    );
    let event: Value = serde_json::from_slice(&started.payload).unwrap();
    assert_eq!(
        (event["uni_id"].as_str(), event["worker_id"].as_str()),
        (Some(uni_id.as_str()), Some(worker_id.as_str()))
    );

    // The same command id again is deduplicated by the stream: no second outcome needed.
    let dup = Publish::build()
        .payload(create.to_string().into_bytes().into())
        .message_id("c-1");
    let ack = env
        .nats
        .js
        .send_publish("bmw.task.create", dup)
        .await
        .unwrap()
        .await
        .unwrap();
    let first = Publish::build()
        .payload(create.to_string().into_bytes().into())
        .message_id("c-1");
    let ack2 = env
        .nats
        .js
        .send_publish("bmw.task.create", first)
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        ack2.duplicate || ack.duplicate,
        "a repeated Nats-Msg-Id is a duplicate"
    );

    // Reload, then delete, over raw subjects.
    let reload = publish(
        &env,
        "bmw.task.reload",
        json!({"task_uni_id": uni_id}).to_string().as_bytes(),
    )
    .await;
    assert_eq!(reload["result"], true, "{reload}");
    worker
        .wait_log(
            Duration::from_secs(10),
            &["daemon task reloaded", "reload_count=1"],
        )
        .await;
    let delete = publish(
        &env,
        "bmw.task.delete",
        json!({"task_type": "daemon", "task_uni_id": uni_id})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(delete["result"], true, "{delete}");
    assert_eventually!(
        Duration::from_secs(5),
        env.bindings().await.is_empty(),
        "task deleted"
    );
    worker
        .wait_log(
            Duration::from_secs(10),
            &["receive task instance done, return"],
        )
        .await;
    let missing = publish(
        &env,
        "bmw.task.delete",
        json!({"task_type": "daemon", "task_uni_id": uni_id})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(
        (missing["result"].as_bool(), missing["code"].as_u64()),
        (Some(false), Some(404))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_terminated_and_reported() {
    let env = TestEnv::start().await;
    let worker = BmwProcess::worker(&env.url(), &[]);
    worker.worker_id().await;
    let mut errors = env
        .nats
        .client
        .subscribe("bmw.event.command.>")
        .await
        .unwrap();

    let poison: [(&[u8], &str); 4] = [
        (b"\xff not json at all", "`body`"),
        (br#"{"kind": "nope"}"#, "`kind`"),
        (br#"{"kind": "daemon:demo:unregistered"}"#, "not registered"),
        (
            br#"{"kind": "daemon:demo:demo", "options": {"retry": -1}}"#,
            "`options.retry`",
        ),
    ];
    for (body, needle) in poison {
        let outcome = publish(&env, "bmw.task.create", body).await;
        assert_refused_outcome(&outcome, 400, needle);
        let event = next_error(&mut errors).await;
        let event: Value = serde_json::from_slice(&event.payload).unwrap();
        assert!(event["error"].as_str().unwrap().contains(needle), "{event}");
    }
    // Terminated, not redelivered: the consumer has nothing pending.
    let mut stream = env.nats.js.get_stream("BMW_TASKS").await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("bmw-commands").await.unwrap();
    assert_eventually!(
        Duration::from_secs(5),
        {
            let info = consumer.info().await.unwrap();
            info.num_ack_pending == 0 && info.num_pending == 0
        },
        "poison messages still pending"
    );
    let _ = stream.info().await;
    // The consumer still works.
    let outcome = publish(
        &env,
        "bmw.task.create",
        br#"{"kind": "daemon:demo:demo", "payload": {"content": "ok"}}"#,
    )
    .await;
    assert_eq!(outcome["result"], true, "{outcome}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_out_of_range_command_fails_alone_and_commands_keep_working() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let mut errors = env
        .nats
        .client
        .subscribe("bmw.event.command.>")
        .await
        .unwrap();
    env.nats.client.flush().await.unwrap();
    // The issue's body on the raw subject: the worker's command handling
    // panicked, and from then on no command was applied.
    let body = json!({"kind": "async:demo:echo", "options": {"process_in": 10_000_000_000_000u64}});
    let outcome = publish(&env, "bmw.task.create", body.to_string().as_bytes()).await;
    assert_refused_outcome(&outcome, 400, "`options.process_in`");
    let event = next_error(&mut errors).await;
    let event: Value = serde_json::from_slice(&event.payload).unwrap();
    assert!(
        event["error"]
            .as_str()
            .unwrap()
            .contains("options.process_in"),
        "{event}"
    );
    // A daemon create through the bridge is applied by the worker: 200, not 202.
    let (status, envelope) = crate::harness::http(
        reqwest::Method::POST,
        &format!("{}/bmw/task/", bmw.base_url()),
        Some(r#"{"kind": "daemon:demo:demo", "payload": {"content": "ok"}}"#),
    )
    .await;
    assert_eq!(status, 200, "{envelope}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_in_command_handling_fails_that_command_only() {
    use std::sync::Arc;
    let env = TestEnv::start().await;
    let registry = crate::harness::explosive_registry();
    let config = bmw::Config {
        nats_url: Some(env.url()),
        ..bmw::Config::default()
    };
    let token = tokio_util::sync::CancellationToken::new();
    let worker = bmw::worker::Worker::new(env.nats.clone(), config, Arc::new(registry));
    let handle = tokio::spawn(worker.run(token.clone()));
    let mut errors = env
        .nats
        .client
        .subscribe("bmw.event.command.>")
        .await
        .unwrap();
    env.nats.client.flush().await.unwrap();
    // Several, so that more than one lane meets a panic.
    for (n, when) in ["routing", "applying", "routing", "applying"]
        .into_iter()
        .enumerate()
    {
        let body = json!({"kind": "daemon:custom:explosive", "payload": {"explode": when, "n": n}});
        let outcome = publish(&env, "bmw.task.create", body.to_string().as_bytes()).await;
        assert_refused_outcome(&outcome, 500, &format!("told to explode while {when}"));
        next_error(&mut errors).await;
    }
    // Terminated, not redelivered, and the next commands are applied.
    for n in 0..3 {
        let body = json!({"kind": "daemon:custom:explosive", "payload": {"n": n}});
        let outcome = publish(&env, "bmw.task.create", body.to_string().as_bytes()).await;
        assert_eq!(outcome["result"], true, "{outcome}");
    }
    token.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_task_message_with_absurd_options_is_archived_and_the_worker_goes_on() {
    let env = TestEnv::start().await;
    let worker = BmwProcess::worker(&env.url(), crate::async_tasks::ASYNC_FAST);
    worker.worker_id().await;
    let events = crate::async_tasks::collect_events(&env);
    env.nats.client.flush().await.unwrap();
    let raw = |id: &str, body: Value| {
        let publish = Publish::build()
            .payload(body.to_string().into_bytes().into())
            .message_id(id);
        let js = env.nats.js.clone();
        async move {
            js.send_publish("bmw.async.default", publish)
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    let huge = 10_000_000_000_000u64;
    raw(
        "absurd-1",
        json!({"kind": "async:demo:fail", "payload": {"fail_times": 1},
               "options": {"timeout": huge, "retention": huge, "deadline": "9999-12-31T23:59:59Z"}}),
    )
    .await;
    raw("fine-1", json!({"kind": "async:demo:echo"})).await;
    let seen = |id: &'static str, what: &'static str| {
        let events = events.clone();
        move || {
            events
                .lock()
                .unwrap()
                .iter()
                .find(|e| e["task_id"] == id && e["what"] == what)
                .cloned()
        }
    };
    let archived = seen("absurd-1", "archived");
    assert_eventually!(
        Duration::from_secs(10),
        archived().is_some(),
        "the absurd task is archived; events: {:?}",
        events.lock().unwrap()
    );
    let archived = archived().unwrap();
    let error = archived["error"].as_str().unwrap();
    assert!(error.contains("`options.retention`"), "{archived}");
    assert_eq!(archived["kind"], "async:demo:fail", "{archived}");
    let done = seen("fine-1", "succeeded");
    assert_eventually!(
        Duration::from_secs(10),
        done().is_some(),
        "the next task runs; events: {:?}",
        events.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_retry_after_from_a_handler_is_capped() {
    use std::sync::Arc;
    let env = TestEnv::start().await;
    let mut registry = bmw::Registry::new();
    registry
        .register_async(
            "async:custom:later",
            |ctx: bmw::queue::TaskContext, _: Value| async move {
                if ctx.attempt == 1 {
                    // About 317,000 years: a date past chrono's range.
                    return Err(bmw::queue::TaskError::retry_after(
                        "later",
                        Duration::from_secs(10_000_000_000_000),
                    ));
                }
                Ok(())
            },
        )
        .unwrap();
    let config = bmw::Config {
        nats_url: Some(env.url()),
        async_retry_base: Duration::from_millis(100),
        async_retry_max: Duration::from_secs(1),
        ..bmw::Config::default()
    };
    let token = tokio_util::sync::CancellationToken::new();
    let worker = bmw::worker::Worker::new(env.nats.clone(), config, Arc::new(registry));
    let handle = tokio::spawn(worker.run(token.clone()));
    let events = crate::async_tasks::collect_events(&env);
    env.nats.client.flush().await.unwrap();
    let publish = Publish::build()
        .payload(
            json!({"kind": "async:custom:later"})
                .to_string()
                .into_bytes()
                .into(),
        )
        .message_id("later-1");
    crate::harness::publish_stored(&env, "bmw.async.default", publish).await;
    let find = |what: &str| {
        events
            .lock()
            .unwrap()
            .iter()
            .find(|e| e["task_id"] == "later-1" && e["what"] == what)
            .cloned()
    };
    assert_eventually!(
        Duration::from_secs(10),
        find("retry").is_some(),
        "a retry event; events: {:?}",
        events.lock().unwrap()
    );
    let delay = find("retry").unwrap()["delay_seconds"].as_f64().unwrap();
    assert!(delay <= 1.0, "capped at --async-retry-max: {delay}");
    assert_eventually!(
        Duration::from_secs(10),
        find("succeeded").is_some(),
        "the second attempt runs; events: {:?}",
        events.lock().unwrap()
    );
    token.cancel();
    handle.await.unwrap().unwrap();
}
