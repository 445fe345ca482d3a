//! Network faults made with a [`FaultProxy`] or by killing the nats-server:
//! a cut-off daemon holder stops its instances before its claims can expire
//! (so two runs of one task overlap by less than one heartbeat), and a
//! worker or `bmw run` that cannot reach NATS still stops within its grace
//! period plus a few seconds. The measured overlaps and exit times are
//! printed (`-- --nocapture`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::proxy::{FaultProxy, Mode};
use crate::harness::{BmwProcess, TestEnv, wait_until};

/// Claim TTL and heartbeat of `harness::FAST`.
const TTL: Duration = Duration::from_secs(3);
const HEARTBEAT: Duration = Duration::from_secs(1);
/// `--grace` of `harness::FAST`.
const GRACE: Duration = Duration::from_secs(2);
/// Daemon tasks in the partition tests (about ten per worker).
const TASKS: usize = 20;

/// Collects the daemon events every reachable worker publishes.
async fn collect_daemon_events(env: &TestEnv) -> Arc<Mutex<Vec<Value>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut sub = env
        .nats
        .client
        .subscribe("bmw.event.daemon.>")
        .await
        .unwrap();
    env.nats.client.flush().await.unwrap();
    let sink = events.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                sink.lock().unwrap().push(v);
            }
        }
    });
    events
}

fn parse_time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("not a time: {text}: {e}"))
        .with_timezone(&Utc)
}

/// The value of `field=` in a log line.
fn log_field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let start = line.find(&format!("{field}="))? + field.len() + 1;
    line[start..]
        .split_whitespace()
        .next()
        .map(|v| v.trim_matches('"'))
}

/// When the worker logged each instance stopped: uni_id -> log time.
fn stops_logged(worker: &BmwProcess) -> HashMap<String, DateTime<Utc>> {
    worker
        .logs()
        .iter()
        .filter(|l| l.contains("daemon instance stopped"))
        .filter_map(|l| {
            let time = parse_time(l.split_whitespace().next()?);
            Some((log_field(l, "uni_id")?.to_owned(), time))
        })
        .collect()
}

/// Two workers, one behind the proxy, `TASKS` daemon tasks shared; the proxy
/// switches to `mode`. The cut-off worker must stop each of its instances
/// before the other worker starts it (or within one heartbeat after).
async fn a_cut_off_holder_stops_before_its_claims_expire(mode: Mode) {
    let env = TestEnv::start().await;
    let proxy = FaultProxy::start(&env.url()).await;
    let events = collect_daemon_events(&env).await;
    let reachable = BmwProcess::worker(&env.url(), &[]);
    let reachable_id = reachable.worker_id().await;
    let cut_off = BmwProcess::worker(&proxy.url(), &[]);
    let cut_off_id = cut_off.worker_id().await;
    crate::harness::create_demos(&env.client, TASKS).await;
    assert_eventually!(
        Duration::from_secs(20),
        {
            let loads = env.loads().await;
            loads.get(&cut_off_id).is_some_and(|n| *n >= TASKS / 2 - 1)
                && loads.values().sum::<usize>() == TASKS
        },
        "both workers hold tasks; loads {:?}",
        env.loads().await
    );
    // Let every renewal cycle settle, then cut.
    let held: Vec<String> = env
        .bindings()
        .await
        .into_iter()
        .filter(|(_, w)| *w == cut_off_id)
        .map(|(u, _)| u)
        .collect();
    let cut_at = Utc::now();
    let cut = Instant::now();
    proxy.set(mode);

    let all_moved = wait_until(Duration::from_secs(15), async || {
        env.loads().await.get(&reachable_id) == Some(&TASKS)
    })
    .await;
    let moved_after = cut.elapsed();
    assert!(
        all_moved,
        "the reachable worker takes every task; loads {:?}",
        env.loads().await
    );
    let all_stopped = wait_until(Duration::from_secs(15), async || {
        let stops = stops_logged(&cut_off);
        held.iter().all(|u| stops.contains_key(u))
    })
    .await;
    let stops = stops_logged(&cut_off);
    assert!(
        all_stopped,
        "the cut-off worker stops all {} of its instances; stopped {:?}; logs:\n{}",
        held.len(),
        stops.keys().collect::<Vec<_>>(),
        cut_off.logs().join("\n")
    );
    // The reachable worker's first start of each task after the cut.
    let mut taken: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    for e in events.lock().unwrap().iter() {
        let time = parse_time(e["time"].as_str().unwrap_or_default());
        if e["what"] == "started" && e["worker_id"] == reachable_id.as_str() && time > cut_at {
            let uni_id = e["uni_id"].as_str().unwrap_or_default().to_owned();
            let first = taken.entry(uni_id).or_insert(time);
            *first = (*first).min(time);
        }
    }
    let mut worst = chrono::TimeDelta::MIN;
    for uni_id in &held {
        let stopped = stops[uni_id];
        let started = *taken
            .get(uni_id)
            .unwrap_or_else(|| panic!("{uni_id} started on the reachable worker"));
        let overlap = stopped - started;
        worst = worst.max(overlap);
        eprintln!(
            "{mode:?}: {uni_id}: cut-off worker stopped at +{:.2}s, other started at +{:.2}s, overlap {:.2}s",
            (stopped - cut_at).as_seconds_f64(),
            (started - cut_at).as_seconds_f64(),
            overlap.as_seconds_f64()
        );
    }
    eprintln!(
        "{mode:?}: {} tasks moved within {moved_after:.2?} of the cut; worst overlap {:.2}s (negative: none)",
        held.len(),
        worst.as_seconds_f64()
    );
    assert!(
        worst <= chrono::TimeDelta::from_std(HEARTBEAT).unwrap(),
        "{mode:?}: two runs of a task overlapped by {:.2}s (more than one heartbeat); logs:\n{}",
        worst.as_seconds_f64(),
        cut_off.logs().join("\n")
    );
    assert!(
        cut_off.has_log("worker lease lapsed"),
        "the cut-off worker says why it stopped"
    );
    // The claim TTL bounds the take-over.
    assert!(moved_after < TTL + HEARTBEAT * 4, "{moved_after:?}");

    // Healed: the cut-off worker takes its share again, every task runs.
    proxy.set(Mode::Pass);
    let healed = Instant::now();
    assert_eventually!(
        Duration::from_secs(20),
        {
            let loads = env.loads().await;
            loads.get(&cut_off_id).is_some_and(|n| *n >= TASKS / 2 - 1)
                && loads
                    .get(&reachable_id)
                    .is_some_and(|n| *n >= TASKS / 2 - 1)
                && !loads.contains_key("")
        },
        "{mode:?}: shared again after the cut heals; loads {:?}; logs:\n{}",
        env.loads().await,
        cut_off.logs().join("\n")
    );
    eprintln!(
        "{mode:?}: shared again {:.2?} after the cut healed",
        healed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_black_holed_holder_stops_before_its_claims_expire() {
    a_cut_off_holder_stops_before_its_claims_expire(Mode::BlackHole).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_holder_stops_before_its_claims_expire() {
    a_cut_off_holder_stops_before_its_claims_expire(Mode::Refuse).await;
}

/// SIGTERM 2 s after the nats-server died: the process exits within its
/// grace period plus a few seconds.
async fn stops_within_grace_without_nats(
    mut process: BmwProcess,
    mut env: TestEnv,
    role: &str,
) -> Vec<String> {
    let id = process.worker_id().await;
    crate::harness::create_demos(&env.client, 3).await;
    assert_eventually!(
        Duration::from_secs(15),
        env.loads().await.get(&id) == Some(&3),
        "three tasks running"
    );
    env.server.server.kill().await;
    // The scenario of the issue: the signal comes 2 s into the outage.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let signalled = Instant::now();
    process.send_sigterm();
    let limit = GRACE + Duration::from_secs(5);
    let status = process.wait_exit(limit + Duration::from_secs(5)).await;
    let took = signalled.elapsed();
    match status {
        Some(_) => {
            eprintln!("{role}: exited {took:.2?} after SIGTERM with NATS gone (limit {limit:?})")
        }
        None => eprintln!(
            "{role}: still running {took:.2?} after SIGTERM with NATS gone (limit {limit:?})"
        ),
    }
    assert!(
        status.is_some_and(|s| s.success()) && took <= limit,
        "{role} still running {took:.2?} after SIGTERM; logs:\n{}",
        process.logs().join("\n")
    );
    process.logs()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_stops_within_grace_without_nats() {
    let env = TestEnv::start().await;
    let worker = BmwProcess::worker(&env.url(), &[]);
    stops_within_grace_without_nats(worker, env, "bmw worker").await;
}

/// The same with the default claim TTL and heartbeat: the instances still run
/// at the signal, and their releases cannot reach the server.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_holding_its_claims_stops_within_grace_without_nats() {
    let env = TestEnv::start().await;
    let worker = BmwProcess::spawn(
        &env.url(),
        &[
            "worker",
            "--demo-kinds",
            "--claim-ttl",
            "15s",
            "--heartbeat",
            "5s",
            "--grace",
            "2s",
        ],
    );
    let logs = stops_within_grace_without_nats(worker, env, "bmw worker (claim TTL 15 s)").await;
    assert!(
        logs.iter()
            .any(|l| l.contains("claim not handed over; it expires after its TTL")),
        "the releases were tried and given up; logs:\n{}",
        logs.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bmw_run_stops_within_grace_without_nats() {
    let env = TestEnv::start().await;
    let run = BmwProcess::run(&env.url(), &[]).await;
    stops_within_grace_without_nats(run, env, "bmw run").await;
}

/// `bmw run` with a request in flight when NATS is gone: the bridge's
/// graceful stop waits for it no longer than the grace period.
#[tokio::test(flavor = "multi_thread")]
async fn bmw_run_with_a_request_in_flight_stops_within_grace_without_nats() {
    let mut env = TestEnv::start().await;
    let port = crate::harness::free_port();
    let addr = format!("127.0.0.1:{port}");
    let url = env.url();
    // FAST, but with long request and reply timeouts: only the grace period
    // may bound the stop.
    let mut run = BmwProcess::spawn_raw(&[
        "run",
        "--demo-kinds",
        "--http-addr",
        &addr,
        "--nats-url",
        &url,
        "--claim-ttl",
        "3s",
        "--heartbeat",
        "1s",
        "--grace",
        "2s",
        "--reply-timeout",
        "30s",
        "--request-timeout",
        "60s",
    ]);
    assert_eventually!(
        Duration::from_secs(20),
        reqwest::get(format!("http://{addr}/health")).await.is_ok(),
        "bridge up; logs:\n{}",
        run.logs().join("\n")
    );
    run.worker_id().await;
    env.server.server.kill().await;
    let body = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok"}});
    let request = tokio::spawn(async move {
        let started = Instant::now();
        let answer = reqwest::Client::new()
            .post(format!("http://{addr}/bmw/task/"))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        (started.elapsed(), answer.map(|r| r.status().as_u16()))
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!request.is_finished(), "the request is still in flight");
    let signalled = Instant::now();
    run.send_sigterm();
    let limit = GRACE + Duration::from_secs(5);
    let status = run.wait_exit(limit + Duration::from_secs(5)).await;
    let took = signalled.elapsed();
    let answered = tokio::time::timeout(Duration::from_secs(1), request).await;
    eprintln!(
        "bmw run with a request in flight: {} {took:.2?} after SIGTERM with NATS gone (limit {limit:?}); request: {answered:?}",
        if status.is_some() {
            "exited"
        } else {
            "still running"
        }
    );
    assert!(
        status.is_some_and(|s| s.success()) && took <= limit,
        "bmw run still running {took:.2?} after SIGTERM; logs:\n{}",
        run.logs().join("\n")
    );
}

/// CPU seconds (user and system) process `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports in USER_HZ, 100 per second on every architecture it runs on.
    ticks as f64 / 100.0
}

/// A worker cut off from NATS waits: while its watches cannot be opened
/// again (a black hole makes them miss their heartbeats, then every new
/// one times out), its daemon runtime does not spin on the reconcile it
/// cannot do yet. Before, it did: a whole core for the length of the
/// outage, and under valgrind it starved the rest of the worker.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_off_worker_does_not_spin_while_its_watches_cannot_open() {
    let env = TestEnv::start().await;
    let proxy = FaultProxy::start(&env.url()).await;
    let worker = BmwProcess::worker(&proxy.url(), &[]);
    worker.worker_id().await;
    proxy.set(Mode::BlackHole);
    // A watch missed its heartbeats and cannot be opened again: the state
    // the runtime used to spin in.
    worker
        .wait_log(Duration::from_secs(20), &["cannot watch bucket"])
        .await;
    let (before, started) = (cpu_seconds(worker.pid()), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let used = cpu_seconds(worker.pid()) - before;
    eprintln!("cut off for {:?}: {used:.2} s of CPU", started.elapsed());
    assert!(
        used < 3.0,
        "the cut-off worker used {used:.2} s of CPU in 10 s; logs:\n{}",
        worker.logs().join("\n")
    );
    proxy.set(Mode::Pass);
}
