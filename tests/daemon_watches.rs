//! A worker whose watches of the specs, claims and workers buckets stalled
//! (cut off behind a [`FaultProxy`]) catches up with every change made
//! meanwhile once it can reach NATS again: a deleted task is not run again, a
//! created one starts, a reloaded one runs its new generation, and nothing
//! runs on a stale view while the watches replay.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::proxy::{FaultProxy, Mode};
use crate::harness::{BmwProcess, TestEnv, collect_events, wait_until};

/// Applies a command directly on the buckets (as a worker would), so that
/// it is stored whatever the cut-off worker does; returns the outcome's data.
async fn apply(ops: &bmw::ops::Operations, subject: &str, body: Value) -> Value {
    let command = bmw::command::wire::parse(subject, body.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{subject} {body}: {e}"));
    ops.apply(&command)
        .await
        .unwrap_or_else(|e| panic!("{subject} {body}: {e}"))
        .unwrap_or_else(|| panic!("{subject} {body}: not applied here"))
}

/// Creates a running `daemon:demo:demo` task; returns its uni_id.
async fn create(ops: &bmw::ops::Operations, n: usize) -> String {
    let body = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": n}});
    let data = apply(ops, bmw::nats::names::SUBJECT_CREATE, body).await;
    data["uni_id"].as_str().unwrap().to_owned()
}

/// The live claims: uni_id key -> (worker_id, generation).
async fn live_claims(env: &TestEnv) -> BTreeMap<String, (String, u64)> {
    let kv = env
        .nats
        .js
        .get_key_value(bmw::nats::names::BUCKET_DAEMON_CLAIMS)
        .await
        .unwrap();
    let all = bmw::nats::read_all::<Value>(&kv).await.unwrap_or_default();
    all.into_iter()
        .filter(|(_, c)| c["worker_id"].as_str().is_some_and(|w| !w.is_empty()))
        .map(|(k, c)| {
            let worker = c["worker_id"].as_str().unwrap_or_default().to_owned();
            (k, (worker, c["generation"].as_u64().unwrap_or_default()))
        })
        .collect()
}

fn key(uni_id: &str) -> String {
    uni_id.replace(':', ".")
}

/// One worker behind the proxy holds three tasks; the proxy switches to
/// `mode` until its claims have expired; meanwhile one task is deleted, one
/// reloaded and one created (straight on the buckets: the cut-off worker may
/// have taken the commands from the shared consumer). Once the proxy passes again the cut-off
/// worker runs exactly the tasks that exist, the reloaded one at its new
/// generation, and never starts the deleted one.
async fn a_cut_off_worker_catches_up_with_changes_made_meanwhile(mode: Mode, outage: Duration) {
    let env = TestEnv::start().await;
    let proxy = FaultProxy::start(&env.url()).await;
    let ops = bmw::ops::Operations::open(&env.nats, Arc::new(bmw::builtin::registry()))
        .await
        .unwrap();
    let worker = BmwProcess::worker(&proxy.url(), &[]);
    let id = worker.worker_id().await;
    let (deleted, reloaded, kept) = (
        create(&ops, 0).await,
        create(&ops, 1).await,
        create(&ops, 2).await,
    );
    assert_eventually!(
        Duration::from_secs(10),
        live_claims(&env)
            .await
            .values()
            .filter(|(w, _)| *w == id)
            .count()
            == 3,
        "the worker holds the three tasks; claims {:?}",
        live_claims(&env).await
    );

    proxy.set(mode);
    apply(
        &ops,
        bmw::nats::names::SUBJECT_DELETE,
        json!({"task_type": "daemon", "task_uni_id": deleted}),
    )
    .await;
    apply(
        &ops,
        bmw::nats::names::SUBJECT_RELOAD,
        json!({"task_uni_id": reloaded}),
    )
    .await;
    let created = create(&ops, 3).await;
    // The cut-off worker's claims expire (it cannot renew them).
    assert_eventually!(
        Duration::from_secs(15),
        live_claims(&env).await.is_empty(),
        "the cut-off worker's claims expire; claims {:?}",
        live_claims(&env).await
    );

    tokio::time::sleep(outage).await;
    let events = collect_events(&env, "bmw.event.daemon.>");
    env.nats.client.flush().await.unwrap();
    let passed = Instant::now();
    proxy.set(Mode::Pass);
    let expected: BTreeMap<String, (String, u64)> = [
        (key(&reloaded), (id.clone(), 1)),
        (key(&kept), (id.clone(), 0)),
        (key(&created), (id.clone(), 0)),
    ]
    .into_iter()
    .collect();
    let caught_up = wait_until(Duration::from_secs(20), async || {
        live_claims(&env).await == expected
    })
    .await;
    let took = passed.elapsed();
    eprintln!("{mode:?}: caught up {took:?} after the proxy passed again");
    assert!(
        caught_up,
        "the worker runs exactly the tasks that exist; claims {:?}, expected {expected:?}; logs:\n{}",
        live_claims(&env).await,
        worker.logs().join("\n")
    );
    // Settled: the deleted task is never claimed again, and it was never
    // started after the worker came back.
    assert!(
        !wait_until(Duration::from_secs(3), async || {
            live_claims(&env).await != expected
        })
        .await,
        "the claims stay as expected; claims {:?}",
        live_claims(&env).await
    );
    let started_deleted: Vec<Value> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == "started" && e["uni_id"] == deleted.as_str())
        .cloned()
        .collect();
    assert!(
        started_deleted.is_empty(),
        "the deleted task was started again: {started_deleted:?}"
    );
    // The reloaded task started once after the worker came back: at its new
    // generation, not at the old one and then again.
    let started_reloaded = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == "started" && e["uni_id"] == reloaded.as_str())
        .count();
    assert_eq!(started_reloaded, 1, "the reloaded task starts once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_worker_catches_up_with_changes_made_meanwhile() {
    a_cut_off_worker_catches_up_with_changes_made_meanwhile(Mode::Refuse, Duration::from_secs(25))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_black_holed_worker_catches_up_with_changes_made_meanwhile() {
    a_cut_off_worker_catches_up_with_changes_made_meanwhile(
        Mode::BlackHole,
        Duration::from_secs(25),
    )
    .await;
}
