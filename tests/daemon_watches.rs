//! A worker whose watches of the specs, claims and workers buckets stalled
//! (cut off behind a [`FaultProxy`]) catches up with every change made
//! meanwhile once it can reach NATS again: a deleted task is not run again, a
//! created one starts, a reloaded one runs its new generation, and nothing
//! runs on a stale view while the watches replay. A panic in a maintainer's
//! path (here: a daemon kind whose operator factory panics) costs that task
//! alone, never the worker's other daemon tasks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
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

/// Creates three tasks (to be deleted, reloaded and kept by the test) and
/// waits until worker `id` holds all three and `events` has each one's
/// `started` event: an event still queued in the worker's client when the
/// test cuts it off would otherwise arrive after the outage and pass for a
/// start made then.
async fn three_held_tasks(
    env: &TestEnv,
    ops: &bmw::ops::Operations,
    id: &str,
    events: &Mutex<Vec<Value>>,
) -> (String, String, String) {
    let tasks = (
        create(ops, 0).await,
        create(ops, 1).await,
        create(ops, 2).await,
    );
    assert_eventually!(
        Duration::from_secs(10),
        live_claims(env)
            .await
            .values()
            .filter(|(w, _)| *w == id)
            .count()
            == 3,
        "the worker holds the three tasks; claims {:?}",
        live_claims(env).await
    );
    assert_eventually!(
        Duration::from_secs(10),
        [&tasks.0, &tasks.1, &tasks.2]
            .iter()
            .all(|t| started(&events.lock().unwrap(), t) == 1),
        "each task started once; events {:?}",
        events.lock().unwrap()
    );
    tasks
}

/// How many `started` events of `uni_id` are in `events`.
fn started(events: &[Value], uni_id: &str) -> usize {
    events
        .iter()
        .filter(|e| e["what"] == "started" && e["uni_id"] == uni_id)
        .count()
}

/// The claims expected when worker `id` holds each `(uni_id, generation)`.
fn held_by(id: &str, tasks: &[(&str, u64)]) -> BTreeMap<String, (String, u64)> {
    tasks
        .iter()
        .map(|(uni_id, generation)| (key(uni_id), (id.to_owned(), *generation)))
        .collect()
}

/// Creates a running `daemon:demo:demo` task; returns its uni_id.
async fn create(ops: &bmw::ops::Operations, n: usize) -> String {
    let body = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": n}});
    let data = apply(ops, bmw::nats::names::SUBJECT_CREATE, body).await;
    data["uni_id"].as_str().unwrap().to_owned()
}

/// The live claims: uni_id key -> (worker_id, generation), each held by a
/// worker whose entry names the lease the claim was taken under (a claim
/// outlives its holder's lease until another worker takes it over).
async fn live_claims(env: &TestEnv) -> BTreeMap<String, (String, u64)> {
    let leases: BTreeMap<String, String> = env
        .read_bucket(bmw::nats::names::BUCKET_WORKERS)
        .await
        .into_values()
        .map(|w| {
            let field = |name: &str| w[name].as_str().unwrap_or_default().to_owned();
            (field("worker_id"), field("lease"))
        })
        .collect();
    let all = env
        .read_bucket(bmw::nats::names::BUCKET_DAEMON_CLAIMS)
        .await;
    all.into_iter()
        .filter(|(_, c)| {
            c["worker_id"].as_str().is_some_and(|w| {
                !w.is_empty() && leases.get(w).map(String::as_str) == c["lease"].as_str()
            })
        })
        .map(|(k, c)| {
            let worker = c["worker_id"].as_str().unwrap_or_default().to_owned();
            (k, (worker, c["generation"].as_u64().unwrap_or_default()))
        })
        .collect()
}

/// An in-process worker's settings with `harness::FAST`'s claim TTL,
/// heartbeat and grace, against `url`.
fn fast_config(url: String) -> bmw::Config {
    bmw::Config {
        nats_url: Some(url),
        claim_ttl: Duration::from_secs(3),
        heartbeat: Duration::from_secs(1),
        grace: Duration::from_secs(2),
        ..bmw::Config::default()
    }
}

fn key(uni_id: &str) -> String {
    bmw::task::UniId::from_raw(uni_id).key()
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
    let events = collect_events(&env, "bmw.event.daemon.>");
    let (deleted, reloaded, kept) = three_held_tasks(&env, &ops, &id, &events).await;

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
    // The cut-off worker's claims lapse with its lease (it cannot renew it).
    assert_eventually!(
        Duration::from_secs(15),
        live_claims(&env).await.is_empty(),
        "the cut-off worker's claims expire; claims {:?}",
        live_claims(&env).await
    );

    tokio::time::sleep(outage).await;
    let before_pass = events.lock().unwrap().len();
    let passed = Instant::now();
    proxy.set(Mode::Pass);
    let expected = held_by(&id, &[(&reloaded, 1), (&kept, 0), (&created, 0)]);
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
        "the claims stay as expected; claims {:?}; logs:\n{}",
        live_claims(&env).await,
        worker.logs().join("\n")
    );
    let after_pass = events.lock().unwrap()[before_pass..].to_vec();
    assert_eq!(
        started(&after_pass, &deleted),
        0,
        "the deleted task was started again; events since the pass: {after_pass:?}"
    );
    // The reloaded task started once after the worker came back: at its new
    // generation, not at the old one and then again.
    assert_eq!(
        started(&after_pass, &reloaded),
        1,
        "the reloaded task starts once; events since the pass: {after_pass:?}"
    );
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

/// nats-server killed (as a crash would) and restarted on the same store;
/// the changes are made as soon as the server answers again, while the
/// worker is reconnecting: it ends up running exactly the tasks that exist,
/// and never starts the deleted one after the restart. A guard: the server
/// is back within milliseconds, and async-nats's ordered consumers already
/// resumed from their last sequence before the watches were restarted on
/// reconnects (this passed before that change too).
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_catches_up_with_changes_made_right_after_a_server_restart() {
    let mut env = TestEnv::start().await;
    let ops = bmw::ops::Operations::open(&env.nats, Arc::new(bmw::builtin::registry()))
        .await
        .unwrap();
    let worker = BmwProcess::worker(&env.url(), &[]);
    let id = worker.worker_id().await;
    let events = collect_events(&env, "bmw.event.daemon.>");
    let (deleted, reloaded, kept) = three_held_tasks(&env, &ops, &id, &events).await;

    env.server.server.kill().await;
    env.server.server.restart().await.expect("server restarts");
    let restarted = Instant::now();
    let delete = bmw::command::wire::parse(
        bmw::nats::names::SUBJECT_DELETE,
        json!({"task_type": "daemon", "task_uni_id": deleted})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert_eventually!(
        Duration::from_secs(20),
        ops.apply(&delete).await.is_ok(),
        "the delete is stored once the server is back"
    );
    apply(
        &ops,
        bmw::nats::names::SUBJECT_RELOAD,
        json!({"task_uni_id": reloaded}),
    )
    .await;
    let created = create(&ops, 3).await;
    let changed = restarted.elapsed();

    let expected = held_by(&id, &[(&reloaded, 1), (&kept, 0), (&created, 0)]);
    assert_eventually!(
        Duration::from_secs(30),
        live_claims(&env).await == expected,
        "the worker runs exactly the tasks that exist; claims {:?}; logs:\n{}",
        live_claims(&env).await,
        worker.logs().join("\n")
    );
    eprintln!(
        "changes stored {changed:?} after the restart, caught up {:?} after it",
        restarted.elapsed()
    );
    assert_eq!(
        started(&events.lock().unwrap(), &deleted),
        1,
        "the deleted task is not started again"
    );
}

/// async-nats hands its `Connected` event to the callback through a channel
/// (late under load, dropped when the channel is full), while each watch
/// resumes on its own as soon as the connection is back. Here the worker
/// never hears of the reconnect at all (its connection count never moves)
/// and nine of its twelve tasks are deleted while it is cut off: the
/// runtime sees the new connection by itself before it next acts, replays
/// every bucket, and runs exactly the three tasks left, none of the deleted
/// ones. (async-nats's resumed watches alone usually get this right too,
/// since a freed task is claimed only a heartbeat later; the replay is what
/// makes it independent of which watch resumes first.)
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_misses_the_reconnect_event_does_not_act_on_a_half_resumed_view() {
    let env = TestEnv::start().await;
    let proxy = FaultProxy::start(&env.url()).await;
    let ops = bmw::ops::Operations::open(&env.nats, Arc::new(bmw::builtin::registry()))
        .await
        .unwrap();
    let through_proxy = bmw::nats::Nats::connect(&proxy.url(), "bmw-worker")
        .await
        .unwrap();
    // A connection count that never changes: the reconnect event is lost.
    let (_never_bumped, connections) = tokio::sync::watch::channel(0);
    let nats = bmw::nats::Nats {
        connections,
        ..through_proxy
    };
    let config = fast_config(proxy.url());
    let worker = bmw::worker::Worker::new(nats, config, Arc::new(bmw::builtin::registry()));
    let id = worker.id().to_owned();
    let token = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(worker.run(token.clone()));
    let events = collect_events(&env, "bmw.event.daemon.>");

    let mut tasks = Vec::new();
    for n in 0..12 {
        tasks.push(create(&ops, n).await);
    }
    assert_eventually!(
        Duration::from_secs(15),
        live_claims(&env).await.len() == 12
            && events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e["what"] == "started")
                .count()
                == 12,
        "the worker holds and started the twelve tasks; claims {:?}",
        live_claims(&env).await
    );

    proxy.set(Mode::Refuse);
    let (deleted, kept) = tasks.split_at(9);
    for uni_id in deleted {
        apply(
            &ops,
            bmw::nats::names::SUBJECT_DELETE,
            json!({"task_type": "daemon", "task_uni_id": uni_id}),
        )
        .await;
    }
    assert_eventually!(
        Duration::from_secs(15),
        live_claims(&env).await.is_empty(),
        "the cut-off worker's claims expire; claims {:?}",
        live_claims(&env).await
    );
    let before_pass = events.lock().unwrap().len();
    proxy.set(Mode::Pass);

    let expected = held_by(
        &id,
        &kept.iter().map(|t| (t.as_str(), 0)).collect::<Vec<_>>(),
    );
    assert_eventually!(
        Duration::from_secs(20),
        live_claims(&env).await == expected,
        "the worker runs exactly the tasks that exist; claims {:?}",
        live_claims(&env).await
    );
    let restarted: Vec<Value> = events.lock().unwrap()[before_pass..]
        .iter()
        .filter(|e| e["what"] == "started" && deleted.iter().any(|d| e["uni_id"] == d.as_str()))
        .cloned()
        .collect();
    assert!(
        restarted.is_empty(),
        "deleted tasks were started again: {restarted:?}"
    );
    token.cancel();
    handle.await.unwrap().unwrap();
}

/// A daemon kind that idles until cancelled.
struct Idle;

impl bmw::daemon::Operator for Idle {
    fn start<'a>(
        &'a self,
        ctx: bmw::daemon::OperatorContext,
        _payload: &'a Value,
    ) -> futures::future::BoxFuture<'a, Result<(), bmw::daemon::OperatorError>> {
        Box::pin(async move {
            ctx.cancelled().await;
            Ok(())
        })
    }

    fn task_dimension(&self, _payload: &Value) -> String {
        String::new()
    }
}

const FRAGILE: &str = "daemon:custom:fragile";

/// The worker's operator for a kind cannot be built (its factory panics, as
/// user code may): that task is given up here, its claim released at once
/// with an `error` event, and the worker's other daemon tasks go on. (An
/// operator that panics in `start` or in its loop is already a failure that
/// is retried, inside the maintainer: the factory is the one piece of user
/// code the runtime itself calls.)
#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_operator_factory_costs_its_task_alone() {
    let env = TestEnv::start().await;
    // Where the task is created its operator builds; on the worker it panics.
    let mut here = bmw::builtin::registry();
    here.register_daemon(FRAGILE, || {
        Ok(Arc::new(Idle) as Arc<dyn bmw::daemon::Operator>)
    })
    .unwrap();
    let ops = bmw::ops::Operations::open(&env.nats, Arc::new(here))
        .await
        .unwrap();
    let mut there = bmw::builtin::registry();
    there
        .register_daemon(FRAGILE, || panic!("the operator cannot be built"))
        .unwrap();
    let config = fast_config(env.url());
    let events = collect_events(&env, "bmw.event.daemon.>");
    env.nats.client.flush().await.unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let worker = bmw::worker::Worker::new(env.nats.clone(), config, Arc::new(there));
    let handle = tokio::spawn(worker.run(token.clone()));

    let demo = create(&ops, 0).await;
    assert_eventually!(
        Duration::from_secs(10),
        live_claims(&env).await.contains_key(&key(&demo)),
        "the demo task runs"
    );
    let fragile = apply(
        &ops,
        bmw::nats::names::SUBJECT_CREATE,
        json!({"kind": FRAGILE, "payload": {"n": 1}}),
    )
    .await["uni_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eventually!(
        Duration::from_secs(10),
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e["what"] == "error" && e["uni_id"] == fragile.as_str()),
        "an error event for the task whose operator cannot be built; events {:?}",
        events.lock().unwrap()
    );
    // Past a claim TTL: the demo task still runs (its claim renewed), the
    // fragile one is not held, and the worker and its daemon runtime go on.
    let demo_claim = live_claims(&env).await.get(&key(&demo)).cloned();
    assert!(
        !wait_until(Duration::from_secs(5), async || {
            let claims = live_claims(&env).await;
            // An empty read (a timed-out read on a loaded machine) or a
            // moment without the demo's claim says nothing about the panic.
            claims
                .get(&key(&demo))
                .is_some_and(|c| Some(c) != demo_claim.as_ref())
                || claims.contains_key(&key(&fragile))
                || handle.is_finished()
        })
        .await,
        "the demo task keeps running and the fragile one is not held; claims {:?}, worker ended: {}",
        live_claims(&env).await,
        handle.is_finished()
    );
    assert_eventually!(
        Duration::from_secs(10),
        live_claims(&env).await.get(&key(&demo)) == demo_claim.as_ref(),
        "the demo task is still held by this worker"
    );
    let later = create(&ops, 1).await;
    assert_eventually!(
        Duration::from_secs(10),
        live_claims(&env).await.contains_key(&key(&later)),
        "a task created afterwards runs too"
    );
    token.cancel();
    handle.await.unwrap().unwrap();
}

/// A daemon kind whose operator panics: on `{"when": "call"}` in `start`
/// itself, otherwise inside the run.
struct Panicky;

impl bmw::daemon::Operator for Panicky {
    fn start<'a>(
        &'a self,
        _ctx: bmw::daemon::OperatorContext,
        payload: &'a Value,
    ) -> futures::future::BoxFuture<'a, Result<(), bmw::daemon::OperatorError>> {
        if payload["when"] == "call" {
            panic!("panicked when called");
        }
        Box::pin(async move { panic!("panicked while running") })
    }

    fn task_dimension(&self, _payload: &Value) -> String {
        String::new()
    }
}

/// An operator that panics, when called or while running, is a failure of
/// that run, caught inside the maintainer: an `error` event, a retry, the
/// claim kept here, and the worker goes on. No operator panic reaches the
/// runtime (this is the guard of that).
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_that_panics_is_retried_and_the_worker_goes_on() {
    const PANICKY: &str = "daemon:custom:panicky";
    let env = TestEnv::start().await;
    let mut registry = bmw::builtin::registry();
    registry
        .register_daemon(PANICKY, || {
            Ok(Arc::new(Panicky) as Arc<dyn bmw::daemon::Operator>)
        })
        .unwrap();
    let registry = Arc::new(registry);
    let ops = bmw::ops::Operations::open(&env.nats, registry.clone())
        .await
        .unwrap();
    let config = fast_config(env.url());
    let events = collect_events(&env, "bmw.event.daemon.>");
    env.nats.client.flush().await.unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let worker = bmw::worker::Worker::new(env.nats.clone(), config, registry);
    let handle = tokio::spawn(worker.run(token.clone()));
    let mut panicky = Vec::new();
    for when in ["call", "run"] {
        let body = json!({"kind": PANICKY, "payload": {"when": when}});
        let data = apply(&ops, bmw::nats::names::SUBJECT_CREATE, body).await;
        panicky.push(data["uni_id"].as_str().unwrap().to_owned());
    }
    let demo = create(&ops, 0).await;
    assert_eventually!(
        Duration::from_secs(10),
        panicky.iter().all(
            |u| events.lock().unwrap().iter().any(|e| e["what"] == "retry"
                && e["uni_id"] == u.as_str()
                && e["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("operator panicked"))
        ),
        "each panic is a retried failure; events {:?}",
        events.lock().unwrap()
    );
    let claims = live_claims(&env).await;
    assert!(
        panicky
            .iter()
            .chain([&demo])
            .all(|u| claims.contains_key(&key(u))),
        "every task is still held here; claims {claims:?}"
    );
    assert!(!handle.is_finished(), "the worker goes on");
    token.cancel();
    handle.await.unwrap().unwrap();
}
