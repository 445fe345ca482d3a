//! Several worker processes: each task runs on exactly one live worker;
//! a joining worker gets its share; a killed worker's tasks move within the
//! claim TTL plus a heartbeat; SIGTERM hands tasks over at once; every move
//! is reported by one `moved` event; queues limit where a task runs.
//! Fail-over and rebalance times are printed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, TestEnv, wait_until};

/// Claim TTL and heartbeat of `harness::FAST`.
const TTL: Duration = Duration::from_secs(3);
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Collects daemon events (start/stop) from every worker.
fn collect_events(env: &TestEnv) -> Arc<Mutex<Vec<Value>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let client = env.nats.client.clone();
    let sink = events.clone();
    tokio::spawn(async move {
        let mut sub = client.subscribe("bmw.event.daemon.>").await.unwrap();
        while let Some(m) = sub.next().await {
            if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                sink.lock().unwrap().push(v);
            }
        }
    });
    events
}

/// Checks that no task was ever running on two workers at once: per uni_id, a
/// `started` by one worker never comes while another's run is still open.
/// `killed` holds (worker, time) of workers killed with SIGKILL.
fn assert_exactly_once(events: &[Value], killed: &[(String, String)]) {
    let mut timeline: BTreeMap<String, Vec<(String, String, String)>> = BTreeMap::new();
    for e in events {
        let what = e["what"].as_str().unwrap_or_default();
        if matches!(what, "started" | "stopped" | "error") {
            let uni_id = e["uni_id"].as_str().unwrap_or_default().to_owned();
            timeline.entry(uni_id).or_default().push((
                e["time"].as_str().unwrap().to_owned(),
                what.to_owned(),
                e["worker_id"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for (uni_id, mut list) in timeline {
        for (worker, time) in killed {
            list.push((time.clone(), "killed".into(), worker.clone()));
        }
        list.sort();
        let mut active: Option<String> = None;
        for (time, what, worker) in list {
            match what.as_str() {
                "started" => {
                    if let Some(other) = &active {
                        assert_eq!(
                            other, &worker,
                            "{uni_id} started on {worker} at {time} while running on {other}"
                        );
                    }
                    active = Some(worker);
                }
                _ if active.as_ref() == Some(&worker) => active = None,
                _ => {}
            }
        }
    }
}

/// A task changing worker: (uni_id, from, to).
type Move = (String, String, String);

/// The moves the `started` events show: per task, a start on another worker
/// than the start before it. A task's first start is not a move.
fn moves_seen(events: &[Value]) -> Vec<Move> {
    let field = |e: &Value, name: &str| e[name].as_str().unwrap_or_default().to_owned();
    let mut starts: Vec<(String, String, String)> = events
        .iter()
        .filter(|e| e["what"] == "started")
        .map(|e| (field(e, "uni_id"), field(e, "time"), field(e, "worker_id")))
        .collect();
    starts.sort();
    let mut moves: Vec<Move> = starts
        .windows(2)
        .filter(|w| w[0].0 == w[1].0 && w[0].2 != w[1].2)
        .map(|w| (w[1].0.clone(), w[0].2.clone(), w[1].2.clone()))
        .collect();
    moves.sort();
    moves
}

/// The `moved` events, each checked to come from the worker that took the task.
fn moves_reported(events: &[Value]) -> Vec<Move> {
    let field = |e: &Value, name: &str| e[name].as_str().unwrap_or_default().to_owned();
    let mut moves: Vec<Move> = events
        .iter()
        .filter(|e| e["what"] == "moved")
        .map(|e| {
            assert_eq!(e["to"], e["worker_id"], "sent by the new holder: {e}");
            (field(e, "uni_id"), field(e, "from"), field(e, "to"))
        })
        .collect();
    moves.sort();
    moves
}

/// Waits until exactly `expected` moved events match `which`.
async fn expect_moves(
    events: &Mutex<Vec<Value>>,
    what: &str,
    expected: usize,
    which: impl Fn(&Move) -> bool,
) {
    let count = || {
        let reported = moves_reported(&events.lock().unwrap());
        reported.iter().filter(|m| which(m)).count()
    };
    let ok = wait_until(Duration::from_secs(3), async || count() == expected).await;
    let reported = moves_reported(&events.lock().unwrap());
    assert!(
        ok,
        "{what}: {} moved events instead of {expected}; all: {reported:?}",
        count()
    );
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Waits until `done(loads)` holds; returns the time it took.
async fn time_until(
    env: &TestEnv,
    limit: Duration,
    what: &str,
    done: impl Fn(&BTreeMap<String, usize>) -> bool,
) -> Duration {
    let start = Instant::now();
    let mut last = BTreeMap::new();
    while start.elapsed() < limit {
        last = env.loads().await;
        if done(&last) {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not reached within {limit:?}; loads: {last:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ownership_rebalance_failover_and_handover() {
    let env = TestEnv::start().await;
    let events = collect_events(&env);
    let w1 = BmwProcess::worker(&env.url(), &[]);
    let mut w2 = BmwProcess::worker(&env.url(), &[]);
    let (id1, id2) = (w1.worker_id().await, w2.worker_id().await);
    const TASKS: usize = 6;
    crate::harness::create_demos(&env.client, TASKS).await;
    let settle = time_until(
        &env,
        Duration::from_secs(15),
        "two workers share six tasks",
        |l| {
            l.get("").is_none() && l.values().sum::<usize>() == TASKS && l.values().all(|n| *n == 3)
        },
    )
    .await;
    eprintln!("6 tasks on 2 workers: all running, 3 each, after {settle:?}");

    // A third worker joins: at most ceil(6/3) = 2 each.
    let mut w3 = BmwProcess::worker(&env.url(), &[]);
    let id3 = w3.worker_id().await;
    let joined = Instant::now();
    time_until(
        &env,
        Duration::from_secs(15),
        "rebalance after a join",
        |l| l.get("").is_none() && l.len() == 3 && l.values().all(|n| *n == 2),
    )
    .await;
    let rebalance = joined.elapsed();
    eprintln!("rebalance after a join: {rebalance:?} (2 tasks each on 3 workers)");
    // Each task the newcomer took was running elsewhere: one moved event each.
    let from_old = |m: &Move| m.2 == id3 && (m.1 == id1 || m.1 == id2);
    expect_moves(&events, "rebalance", 2, from_old).await;

    // kill -9 the newcomer: its tasks run again on w1 and w2 within TTL + heartbeat (+1 s slack).
    let killed_at = now();
    let kill_start = Instant::now();
    w3.kill9();
    time_until(
        &env,
        TTL + HEARTBEAT + Duration::from_secs(5),
        "fail-over after kill -9",
        |l| !l.contains_key(&id3) && l.get("").is_none() && l.values().sum::<usize>() == TASKS,
    )
    .await;
    let failover = kill_start.elapsed();
    eprintln!("fail-over after kill -9: {failover:?} (claim TTL {TTL:?}, heartbeat {HEARTBEAT:?})");
    assert!(
        failover <= TTL + HEARTBEAT + Duration::from_secs(1),
        "fail-over took {failover:?}"
    );
    expect_moves(&events, "fail-over", 2, |m| m.1 == id3).await;

    // SIGTERM w2: its claims are released before it exits, not left to expire.
    let handed_over = |m: &Move| m.1 == id2 && m.2 == id1;
    let before = moves_reported(&events.lock().unwrap())
        .iter()
        .filter(|m| handed_over(m))
        .count();
    let on_w2 = env.loads().await.get(&id2).copied().unwrap_or_default();
    assert!(w2.sigterm(), "worker exits on SIGTERM");
    let bindings = env.bindings().await;
    assert!(
        bindings.values().all(|w| w != &id2),
        "claims of a SIGTERMed worker are released at exit: {bindings:?}"
    );
    let handover = time_until(&env, TTL, "hand-over after SIGTERM", |l| {
        l.get(&id1) == Some(&TASKS)
    })
    .await;
    eprintln!("hand-over after SIGTERM: {handover:?} after exit");
    assert!(w2.sigterm());
    expect_moves(&events, "hand-over", before + on_w2, handed_over).await;

    // Every move (a start on another worker than the last) was reported
    // once, with both workers, and nothing else was (a first claim is no move).
    let same = wait_until(Duration::from_secs(3), async || {
        let events = events.lock().unwrap();
        moves_reported(&events) == moves_seen(&events)
    })
    .await;
    let events = events.lock().unwrap().clone();
    assert!(
        same,
        "moved events {:?}\n  differ from the moves seen {:?}",
        moves_reported(&events),
        moves_seen(&events)
    );

    // The event history never shows a task on two workers at once.
    assert!(
        events.iter().filter(|e| e["what"] == "started").count() >= TASKS + 2,
        "events were collected"
    );
    assert_exactly_once(&events, &[(id3, killed_at)]);
    drop(w1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_limits_where_a_task_runs() {
    let env = TestEnv::start().await;
    let plain = BmwProcess::worker(&env.url(), &["--queues", "default"]);
    let special = BmwProcess::worker(&env.url(), &["--queues", "default,gpu"]);
    let (_, special_id) = (plain.worker_id().await, special.worker_id().await);
    let mut ids = Vec::new();
    for n in 0..4 {
        let body = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": n}, "options": {"queue": "gpu"}});
        let out = env
            .client
            .submit_json("bmw.task.create", body.to_string().as_bytes())
            .await
            .unwrap();
        let bmw::client::Submitted::Done(out) = out else {
            panic!("no outcome")
        };
        ids.push(out.data["uni_id"].as_str().unwrap().to_owned());
    }
    assert_eventually!(
        Duration::from_secs(10),
        {
            let b = env.bindings().await;
            ids.iter().all(|id| b.get(id) == Some(&special_id))
        },
        "gpu tasks all run on the gpu worker"
    );
    // Observe two heartbeats: the gpu worker must not release its tasks to a
    // worker that cannot run them (balancing is per queue).
    let released = crate::harness::wait_until(3 * HEARTBEAT, async || {
        special.has_log("releasing a daemon task")
    })
    .await;
    assert!(
        !released,
        "gpu tasks were released to a worker without the gpu queue"
    );
    let loads: HashMap<String, usize> = env.loads().await.into_iter().collect();
    assert_eq!(loads.len(), 1, "{loads:?}");
}

/// The revision of `key` in `bucket` and its value (a test reads the bucket
/// as any client would).
async fn entry_of(env: &TestEnv, bucket: &str, key: &str) -> Option<(u64, Value)> {
    let kv = env.nats.js.get_key_value(bucket).await.ok()?;
    let entry = kv.entry(key).await.ok()??;
    let value = serde_json::from_slice(&entry.value).ok()?;
    Some((entry.revision, value))
}

/// Issue 22, part 4: a held instance costs no write a heartbeat. The
/// worker's entry in `bmw_workers` is its lease, renewed every heartbeat;
/// each claim names that lease and is written only when it is taken,
/// released, or its counts change. A killed holder's claims are taken over
/// by compare-and-set once its lease is gone, and then name the new
/// holder's lease.
#[tokio::test(flavor = "multi_thread")]
async fn claims_are_kept_by_the_workers_lease_not_rewritten_each_heartbeat() {
    use bmw::nats::names::{BUCKET_DAEMON_CLAIMS, BUCKET_WORKERS};
    let env = TestEnv::start().await;
    let mut w1 = BmwProcess::worker(&env.url(), &[]);
    let id1 = w1.worker_id().await;
    let uni_id = env.create_demo("leased").await;
    let key = bmw::task::UniId::from_raw(&uni_id).key();
    let worker_key = bmw::membership::worker_key(&id1);
    assert_eventually!(
        Duration::from_secs(15),
        env.bindings().await.get(&uni_id) == Some(&id1),
        "the worker holds the task; bindings {:?}",
        env.bindings().await
    );
    let (claim_rev, claim) = entry_of(&env, BUCKET_DAEMON_CLAIMS, &key)
        .await
        .expect("the claim is stored");
    let (worker_rev, entry) = entry_of(&env, BUCKET_WORKERS, &worker_key)
        .await
        .expect("the worker entry is stored");
    let lease = entry["lease"].as_str().unwrap_or_default().to_owned();
    assert!(!lease.is_empty(), "the worker entry names a lease: {entry}");
    assert_eq!(
        claim["lease"],
        lease.as_str(),
        "the claim names the holder's lease: {claim}"
    );
    // Three heartbeats: the lease is renewed three times ...
    assert_eventually!(
        Duration::from_secs(15),
        entry_of(&env, BUCKET_WORKERS, &worker_key)
            .await
            .is_some_and(|(rev, _)| rev >= worker_rev + 3),
        "the worker renews its entry every heartbeat"
    );
    // ... and the claim not once.
    let (after, _) = entry_of(&env, BUCKET_DAEMON_CLAIMS, &key).await.unwrap();
    assert_eq!(
        after, claim_rev,
        "the claim was rewritten while its instance ran idle"
    );

    // The holder dies: the other worker takes the claim over once the lease is gone.
    let w2 = BmwProcess::worker(&env.url(), &[]);
    let id2 = w2.worker_id().await;
    w1.kill9();
    assert_eventually!(
        TTL + HEARTBEAT * 6,
        env.bindings().await.get(&uni_id) == Some(&id2),
        "the live worker takes the task over; bindings {:?}",
        env.bindings().await
    );
    let (_, taken) = entry_of(&env, BUCKET_DAEMON_CLAIMS, &key).await.unwrap();
    let (_, entry2) = entry_of(&env, BUCKET_WORKERS, &bmw::membership::worker_key(&id2))
        .await
        .unwrap();
    assert_eq!(
        taken["lease"], entry2["lease"],
        "the new claim names the new holder's lease"
    );
}
