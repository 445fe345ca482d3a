//! Periodic tasks fired by nats-server: exactly once per tick with three
//! workers, cron seconds, time zones, delete, pause and resume, declared
//! schedules reconciled by many workers into one, ticks stored while no
//! worker runs, and bad input refused with nothing written.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{BmwProcess, TestEnv, http, wait_until};

fn collect(env: &TestEnv, subject: &'static str) -> Arc<Mutex<Vec<Value>>> {
    crate::harness::collect_events(env, subject)
}

fn ticks(events: &Arc<Mutex<Vec<Value>>>, kind: &str) -> Vec<DateTime<Utc>> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind && e["what"] == "enqueued")
        .filter_map(|e| {
            DateTime::parse_from_rfc3339(e["time"].as_str()?)
                .ok()
                .map(|t| t.with_timezone(&Utc))
        })
        .collect()
}

async fn submit(env: &TestEnv, body: Value) -> Result<bmw::task::Outcome, bmw::task::OpError> {
    match env
        .client
        .submit_json("bmw.task.create", body.to_string().as_bytes())
        .await?
    {
        bmw::client::Submitted::Done(o) => Ok(o),
        bmw::client::Submitted::Accepted { .. } | bmw::client::Submitted::Duplicate { .. } => {
            panic!("periodic creates are applied directly")
        }
    }
}

async fn delete(env: &TestEnv, kind: &str) {
    let body = json!({"task_type": "periodic", "kind": kind}).to_string();
    env.client
        .submit_json("bmw.task.delete", body.as_bytes())
        .await
        .expect("delete");
}

/// Lateness of each tick after its whole-second due time, in ms.
fn lateness_ms(events: &Arc<Mutex<Vec<Value>>>, kind: &str) -> Vec<i64> {
    let mut late: Vec<i64> = ticks(events, kind)
        .iter()
        .map(|t| i64::from(t.nanosecond() / 1_000_000))
        .collect();
    late.sort();
    late
}

#[tokio::test(flavor = "multi_thread")]
async fn every_second_on_three_workers_runs_once_per_tick() {
    let env = TestEnv::start().await;
    let events = collect(&env, "bmw.event.periodic.>");
    env.nats.client.flush().await.unwrap();
    let workers: Vec<BmwProcess> = (0..3)
        .map(|_| BmwProcess::worker(&env.url(), &[]))
        .collect();
    for w in &workers {
        w.worker_id().await;
    }
    let out = submit(
        &env,
        json!({"kind": "periodic:demo:tick", "payload": {"n": 1}, "options": {"every": "1s"}}),
    )
    .await
    .unwrap();
    assert!(out.result, "{out:?}");
    // Count over a 10 s window that starts after the first tick.
    assert!(
        wait_until(Duration::from_secs(5), async || !ticks(
            &events,
            "periodic:demo:tick"
        )
        .is_empty())
        .await,
        "first tick"
    );
    let start = Utc::now();
    tokio::time::sleep(Duration::from_secs(10)).await; // the observation window itself
    let end = Utc::now();
    let n = ticks(&events, "periodic:demo:tick")
        .into_iter()
        .filter(|t| *t > start && *t <= end)
        .count();
    assert!(
        (9..=11).contains(&n),
        "{n} ticks in 10 s with 3 workers (expected 10 ± 1, not 30)"
    );

    // The list shows the schedule, the last run and the next one.
    let rows = env.client.list_periodic().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["schedule_header"], "@every 1s");
    assert_eq!(rows[0]["last_outcome"], "succeeded", "{}", rows[0]);
    let next = DateTime::parse_from_rfc3339(rows[0]["next_run_at"].as_str().unwrap()).unwrap();
    assert!(
        next.with_timezone(&Utc) > Utc::now() - chrono::Duration::seconds(1),
        "{}",
        rows[0]
    );

    // Delete stops the ticks.
    delete(&env, "periodic:demo:tick").await;
    let after = Utc::now() + chrono::Duration::milliseconds(500);
    tokio::time::sleep(Duration::from_secs(3)).await; // long enough for three ticks
    let late = ticks(&events, "periodic:demo:tick")
        .into_iter()
        .filter(|t| *t > after)
        .count();
    assert_eq!(late, 0, "ticks after delete");
    assert!(env.client.list_periodic().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn cron_fires_on_its_seconds_and_pause_resume_work() {
    let env = TestEnv::start().await;
    let events = collect(&env, "bmw.event.periodic.>");
    env.nats.client.flush().await.unwrap();
    let worker = BmwProcess::worker(&env.url(), &[]);
    worker.worker_id().await;
    submit(
        &env,
        json!({"kind": "periodic:demo:tick", "options": {"cron": "*/2 * * * * *"}}),
    )
    .await
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), async || ticks(
            &events,
            "periodic:demo:tick"
        )
        .len()
            >= 3)
        .await,
        "three cron ticks"
    );
    for t in ticks(&events, "periodic:demo:tick") {
        assert_eq!(t.second() % 2, 0, "tick at {t} is not on an even second");
    }
    let late = lateness_ms(&events, "periodic:demo:tick");
    eprintln!(
        "cron tick lateness after the due second (ms): median {} max {} of {}",
        late[late.len() / 2],
        late[late.len() - 1],
        late.len()
    );

    // Pause: no ticks; resume: ticks again.
    let (_, body) = (
        0,
        env.client
            .pause_periodic("periodic:demo:tick", true)
            .await
            .unwrap(),
    );
    assert_eq!(body["paused"], true);
    let paused_at = Utc::now() + chrono::Duration::milliseconds(300);
    tokio::time::sleep(Duration::from_secs(3)).await; // covers a tick that would have come
    assert_eq!(
        ticks(&events, "periodic:demo:tick")
            .into_iter()
            .filter(|t| *t > paused_at)
            .count(),
        0,
        "ticks while paused"
    );
    assert_eq!(env.client.list_periodic().await.unwrap()[0]["paused"], true);
    env.client
        .pause_periodic("periodic:demo:tick", false)
        .await
        .unwrap();
    let resumed = Utc::now();
    assert!(
        wait_until(Duration::from_secs(5), async || ticks(
            &events,
            "periodic:demo:tick"
        )
        .into_iter()
        .any(|t| t > resumed))
        .await,
        "ticks after resume"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn time_zones_and_bad_input() {
    let env = TestEnv::start().await;
    let out = submit(&env, json!({"kind": "periodic:demo:tick", "options": {"cron": "0 0 9 * * *", "timezone": "Asia/Shanghai"}})).await.unwrap();
    assert!(out.result, "{out:?}");
    // 09:00 in Shanghai is 01:00 UTC: the next one after now.
    let now = Utc::now();
    let mut expected = now.date_naive().and_hms_opt(1, 0, 0).unwrap().and_utc();
    if expected <= now {
        expected += chrono::Duration::days(1);
    }
    let rows = env.client.list_periodic().await.unwrap();
    let next = DateTime::parse_from_rfc3339(rows[0]["next_run_at"].as_str().unwrap()).unwrap();
    assert_eq!(next.with_timezone(&Utc), expected, "{}", rows[0]);
    delete(&env, "periodic:demo:tick").await;

    let cases = [
        (
            json!({"kind": "periodic:demo:tick", "options": {"cron": "61 * * * * *"}}),
            "`options.cron`",
        ),
        (
            json!({"kind": "periodic:demo:tick", "options": {"cron": "* * * *"}}),
            "`options.cron`",
        ),
        (
            json!({"kind": "periodic:demo:tick", "options": {"every": "soon"}}),
            "`options.every`",
        ),
        (
            json!({"kind": "periodic:demo:tick", "options": {"every": "500ms"}}),
            "`options.every`",
        ),
        (
            json!({"kind": "periodic:demo:tick", "options": {"cron": "* * * * * *", "timezone": "Mars/Base"}}),
            "`options.timezone`",
        ),
        (
            json!({"kind": "periodic:demo:tick", "options": {}}),
            "`options.cron`",
        ),
        (
            json!({"kind": "periodic:demo:unknown", "options": {"every": 1}}),
            "not registered",
        ),
    ];
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    crate::harness::assert_refused(&bmw.base_url(), &cases).await;
    let list = crate::harness::list_tasks(&bmw.base_url(), "periodic").await;
    assert!(list.is_empty(), "no schedule written: {list:?}");
    let stream = env.nats.js.get_stream("BMW_SCHEDULES").await.unwrap();
    assert!(
        stream
            .get_last_raw_message_by_subject(&bmw::nats::names::schedule_subject(
                "periodic:demo:tick"
            ))
            .await
            .is_err()
    );
    let (status, _) = http(
        Method::DELETE,
        &format!("{}/bmw/task/", bmw.base_url()),
        Some(r#"{"task_type": "periodic", "kind": "periodic:demo:tick"}"#),
    )
    .await;
    assert_eq!(status, 404);
}

fn declared_registry(counter: Arc<Mutex<u32>>) -> bmw::Registry {
    let mut registry = bmw::builtin::registry();
    let declaration = bmw::periodic::PeriodicDeclaration {
        schedule: bmw::periodic::Schedule::Every(Duration::from_secs(1)),
        timezone: None,
        payload: json!({"declared": true}),
        options: Default::default(),
    };
    registry
        .register_periodic(
            "periodic:test:declared",
            Some(declaration),
            move |_ctx: bmw::queue::TaskContext, _p: Value| {
                let counter = counter.clone();
                async move {
                    *counter.lock().unwrap() += 1;
                    Ok(())
                }
            },
        )
        .unwrap();
    registry
}

#[tokio::test(flavor = "multi_thread")]
async fn declared_schedules_reconcile_to_one_and_survive_restarts() {
    let env = TestEnv::start().await;
    let runs = Arc::new(Mutex::new(0u32));
    let config = bmw::Config {
        nats_url: Some(env.url()),
        ..bmw::Config::default()
    };
    let start_worker = || {
        let worker = bmw::worker::Worker::new(
            env.nats.clone(),
            config.clone(),
            Arc::new(declared_registry(runs.clone())),
        );
        let token = CancellationToken::new();
        (tokio::spawn(worker.run(token.clone())), token)
    };
    // Three workers start at once; each reconciles the declared schedule.
    let workers: Vec<_> = (0..3).map(|_| start_worker()).collect();
    let stream = env.nats.js.get_stream("BMW_SCHEDULES").await.unwrap();
    let schedules = async || {
        let info = stream.info_with_subjects("bmw.schedule.>").await.unwrap();
        futures::TryStreamExt::try_collect::<Vec<(String, usize)>>(info)
            .await
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(5), async || *runs.lock().unwrap() >= 2).await,
        "declared task ticks"
    );
    let found = schedules().await;
    assert_eq!(
        found,
        vec![(
            bmw::nats::names::schedule_subject("periodic:test:declared"),
            1
        )],
        "one schedule message"
    );
    // A restart of every worker neither duplicates nor loses it.
    for (handle, token) in workers {
        token.cancel();
        handle.await.unwrap().unwrap();
    }
    let (handle, token) = start_worker();
    let before = *runs.lock().unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await; // an observation window of four ticks
    let in_window = *runs.lock().unwrap() - before;
    assert!(
        (3..=6).contains(&in_window),
        "{in_window} runs in 4 s after restart"
    );
    assert_eq!(schedules().await.len(), 1);
    token.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ticks_while_no_worker_runs_are_run_when_one_starts() {
    let env = TestEnv::start().await;
    let events = collect(&env, "bmw.event.periodic.>");
    env.nats.client.flush().await.unwrap();
    submit(
        &env,
        json!({"kind": "periodic:demo:tick", "options": {"every": "1s"}}),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // ticks accumulate with no worker
    let stream = env.nats.js.get_stream("BMW_SCHEDULES").await.unwrap();
    let stored = futures::TryStreamExt::try_collect::<Vec<(String, usize)>>(
        stream.info_with_subjects("bmw.fired.>").await.unwrap(),
    )
    .await
    .unwrap();
    assert!(
        stored.iter().map(|(_, n)| n).sum::<usize>() >= 2,
        "ticks are stored: {stored:?}"
    );
    let worker = BmwProcess::worker(&env.url(), &[]);
    worker.worker_id().await;
    assert!(
        wait_until(Duration::from_secs(5), async || ticks(
            &events,
            "periodic:demo:tick"
        )
        .len()
            >= 2)
        .await,
        "stored ticks ran"
    );
}
