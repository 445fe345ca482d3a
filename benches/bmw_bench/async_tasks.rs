//! Figure 2: async tasks end to end. `async:demo:noop` tasks through the three
//! producer paths (a JetStream publish on `bmw.async.<queue>.<id>`, a
//! `bmw.task.create` command, the bridge's `POST /bmw/task/`), drained by 1
//! and by 2 worker processes, measured both ways: enqueue all then drain, and
//! enqueue while draining. Completion is seen through the `succeeded` events
//! (one per batch of completions, listing its tasks, sent before their
//! acks), which also give the latency from enqueue.
//!
//! Enqueue-then-drain starts the workers after the last publish ack and
//! times from the first task done (worker start-up excluded) to the last.
//! Only the subject path can do that: a command needs a worker to enqueue it
//! and the bridge lives in a worker process, so those paths always run
//! while draining.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream::message::PublishMessage;
use bmw::nats::Nats;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::env::{BmwProc, Server, wait_for, wait_workers};
use crate::report::{Samples, percentile};

/// Outstanding publish acks (as the baseline's window).
const WINDOW: usize = crate::baseline::WINDOW;
/// Concurrent bridge requests (as figure 3).
const CONNECTIONS: usize = crate::bridge::CONNECTIONS;
/// Async tasks each worker runs at once.
const CONCURRENCY: &str = "64";

/// How tasks get in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// JetStream publish on `bmw.async.<queue>.<id>` (the fastest path).
    Subject,
    /// `bmw.task.create` commands, enqueued by a worker.
    Command,
    /// `POST /bmw/task/` on a `bmw run` bridge, 64 requests in flight.
    Bridge,
    /// `POST /bmw/task/` one at a time: a client's loop of single creates.
    BridgeLoop,
    /// JetStream publish on `bmw.async.<queue>`: one subject for the whole
    /// queue (the task id in the body and `Nats-Msg-Id`), which the server
    /// indexes more cheaply, at the price of lookups by id.
    QueueSubject,
    /// `POST /bmw/task/batch` on a `bmw run` bridge, [`BATCH_ITEMS`] creates
    /// per request, [`BATCH_REQUESTS`] requests in flight.
    Batch,
}

/// Creates per batch request (issue 14's figure).
pub(crate) const BATCH_ITEMS: usize = 1_000;
/// Batch requests in flight: one being answered while the next is read.
const BATCH_REQUESTS: usize = 2;

impl Path {
    /// Whether tasks can be enqueued before any worker runs (the raw publishes).
    pub(crate) fn can_enqueue_first(self) -> bool {
        matches!(self, Path::Subject | Path::QueueSubject)
    }
}

/// What runs the tasks on the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Runner {
    /// The compiled `async:demo:noop` handler.
    Compiled,
    /// `async:bench:true`, declared in a `--config` file: a `true` child
    /// process per task (`bmw::external::command`).
    Subprocess,
}

impl Runner {
    /// The kind of the tasks.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Runner::Compiled => "async:demo:noop",
            Runner::Subprocess => "async:bench:true",
        }
    }
}

/// How many tasks, and what runs them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tasks {
    /// Tasks per run.
    pub(crate) n: usize,
    /// What runs them.
    pub(crate) runner: Runner,
}

/// One run's samples (merged over runs by the caller).
#[derive(Debug, Default)]
pub(crate) struct AsyncFigure {
    /// Tasks per second.
    pub(crate) rate: Samples,
    /// Median enqueue-to-done latency (ms).
    pub(crate) p50_ms: Samples,
    /// 99th percentile enqueue-to-done latency (ms).
    pub(crate) p99_ms: Samples,
    /// Peak VmRSS (KiB) of the first worker while it drained.
    pub(crate) rss_kib: Samples,
    /// Tasks/s stored (every publish acked, every request answered), from
    /// the first enqueue to the last, while the workers drain.
    pub(crate) enqueue_rate: Samples,
    /// CPU time per task (µs) of the nats-server and of the workers, over
    /// the measured time.
    pub(crate) server_us: Samples,
    pub(crate) worker_us: Samples,
}

/// Done times of `succeeded` events by task id.
type Times = Arc<Mutex<HashMap<String, Instant>>>;

/// Follows the `succeeded` events of `queue`.
async fn follow(
    nats: &Nats,
    queue: &str,
    kind: &str,
) -> anyhow::Result<(Times, tokio::task::JoinHandle<()>)> {
    let done: Times = Arc::default();
    let mut sub = nats
        .client
        .subscribe(format!("bmw.event.async.{kind}.succeeded"))
        .await?;
    nats.client.flush().await?;
    let (sink, queue) = (done.clone(), queue.to_owned());
    let task = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let now = Instant::now();
            // One event per batch of completions: `tasks: [{task_id, queue, ...}]`.
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
                continue;
            };
            let mut done = sink.lock().unwrap_or_else(|e| e.into_inner());
            for task in v["tasks"].as_array().into_iter().flatten() {
                if task["queue"] == queue.as_str()
                    && let Some(id) = task["task_id"].as_str()
                {
                    done.entry(id.to_owned()).or_insert(now);
                }
            }
        }
    });
    Ok((done, task))
}

/// Task ids by enqueue index: known to a raw producer, answered by the bridge,
/// or sent by the worker to a command's `Bmw-Reply` subject.
type Ids = Arc<Mutex<HashMap<usize, String>>>;

/// Follows the outcomes of `queue`'s create commands, sent to
/// `_INBOX.bench.reply.<queue>.<index>`.
async fn follow_replies(
    nats: &Nats,
    queue: &str,
    ids: Ids,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let prefix = format!("_INBOX.bench.reply.{queue}.");
    let mut sub = nats.client.subscribe(format!("{prefix}*")).await?;
    nats.client.flush().await?;
    Ok(tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let index = m
                .subject
                .strip_prefix(prefix.as_str())
                .and_then(|i| i.parse().ok());
            let outcome = serde_json::from_slice::<serde_json::Value>(&m.payload).ok();
            let id = outcome
                .as_ref()
                .filter(|o| o["result"] == true)
                .and_then(|o| o["data"]["task_id"].as_str());
            match (index, id) {
                (Some(i), Some(id)) => {
                    ids.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(i, id.to_owned());
                }
                _ => eprintln!("  unexpected command outcome on {}: {outcome:?}", m.subject),
            }
        }
    }))
}

/// Enqueues `n` noop tasks on `queue` by `path` without a caller's task id
/// (which would cost bmw a look-up per task), recording when each was sent;
/// fills `ids` as task ids become known.
async fn enqueue(
    nats: &Nats,
    path: Path,
    queue: &str,
    tasks: Tasks,
    bridge: Option<&str>,
    ids: &Ids,
    deadline: Instant,
) -> anyhow::Result<Vec<Instant>> {
    let (n, kind) = (tasks.n, tasks.runner.kind());
    let mut sent = Vec::with_capacity(n);
    match path {
        Path::Subject | Path::QueueSubject | Path::Command => {
            let mut acks = FuturesUnordered::new();
            for i in 0..n {
                let publish = if path.can_enqueue_first() {
                    let id = format!("{queue}-{i}");
                    let body = serde_json::json!({"id": id, "kind": kind, "payload": {}});
                    let publish = PublishMessage::build()
                        .payload(serde_json::to_vec(&body)?.into())
                        .message_id(&id);
                    ids.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(i, id.clone());
                    let subject = if path == Path::Subject {
                        format!("bmw.async.{queue}.{id}")
                    } else {
                        format!("bmw.async.{queue}")
                    };
                    (subject, publish)
                } else {
                    let cmd = uuid::Uuid::new_v4().to_string();
                    let body = serde_json::json!({
                        "id": cmd, "kind": kind, "payload": {},
                        "options": {"queue": queue},
                    });
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(
                        bmw::nats::names::HEADER_REPLY,
                        format!("_INBOX.bench.reply.{queue}.{i}").as_str(),
                    );
                    let publish = PublishMessage::build()
                        .payload(serde_json::to_vec(&body)?.into())
                        .headers(headers)
                        .message_id(&cmd);
                    (bmw::nats::names::SUBJECT_CREATE.to_owned(), publish)
                };
                sent.push(Instant::now());
                let (subject, publish) = publish;
                acks.push(nats.js.send_publish(subject, publish).await?.into_future());
                while acks.len() >= WINDOW {
                    acks.next().await.context("ack")??;
                }
                ensure!(
                    Instant::now() < deadline,
                    "enqueue: {i} of {n} by the deadline"
                );
            }
            while let Some(ack) = acks.next().await {
                ack?;
            }
        }
        Path::Bridge | Path::BridgeLoop => {
            let in_flight = if path == Path::Bridge { CONNECTIONS } else { 1 };
            let url = format!("{}/bmw/task/", bridge.context("no bridge")?);
            let http = reqwest::Client::new();
            let mut inflight = FuturesUnordered::new();
            for i in 0..n {
                let body = serde_json::json!({"kind": kind, "options": {"queue": queue}});
                sent.push(Instant::now());
                let request = http.post(&url).json(&body);
                inflight.push(async move {
                    let response = request.send().await?;
                    let status = response.status();
                    let envelope: serde_json::Value = response.json().await?;
                    let id = envelope["data"]["task_id"].as_str().map(str::to_owned);
                    match id {
                        Some(id) if status.is_success() && envelope["result"] == true => {
                            Ok::<_, anyhow::Error>((i, id))
                        }
                        _ => bail!("bridge answered {status} {envelope}"),
                    }
                });
                while inflight.len() >= in_flight {
                    let (i, id) = inflight.next().await.context("request")??;
                    ids.lock().unwrap_or_else(|e| e.into_inner()).insert(i, id);
                }
                ensure!(
                    Instant::now() < deadline,
                    "enqueue: {i} of {n} by the deadline"
                );
            }
            while let Some(r) = inflight.next().await {
                let (i, id) = r?;
                ids.lock().unwrap_or_else(|e| e.into_inner()).insert(i, id);
            }
        }
        Path::Batch => {
            let url = format!("{}/bmw/task/batch", bridge.context("no bridge")?);
            let http = reqwest::Client::new();
            let mut inflight = FuturesUnordered::new();
            let record = |(first, got): (usize, Vec<String>)| {
                let mut ids = ids.lock().unwrap_or_else(|e| e.into_inner());
                for (k, id) in got.into_iter().enumerate() {
                    ids.insert(first + k, id);
                }
            };
            for first in (0..n).step_by(BATCH_ITEMS) {
                let items = (first..n.min(first + BATCH_ITEMS))
                    .map(|_| serde_json::json!({"kind": kind, "options": {"queue": queue}}))
                    .collect::<Vec<_>>();
                let now = Instant::now();
                sent.extend(std::iter::repeat_n(now, items.len()));
                let request = http.post(&url).json(&items);
                inflight.push(async move {
                    let response = request.send().await?;
                    let status = response.status();
                    let envelope: serde_json::Value = response.json().await?;
                    let outcomes = envelope["data"].as_array().cloned().unwrap_or_default();
                    let got: Vec<String> = outcomes
                        .iter()
                        .filter(|o| o["result"] == true)
                        .filter_map(|o| o["data"]["task_id"].as_str().map(str::to_owned))
                        .collect();
                    ensure!(
                        status.is_success() && got.len() == items.len(),
                        "batch answered {status}: {} of {} task ids; first outcome {:?}",
                        got.len(),
                        items.len(),
                        outcomes.iter().find(|o| o["result"] != true)
                    );
                    Ok::<_, anyhow::Error>((first, got))
                });
                while inflight.len() >= BATCH_REQUESTS {
                    record(inflight.next().await.context("request")??);
                }
                ensure!(
                    Instant::now() < deadline,
                    "enqueue: {first} of {n} by the deadline"
                );
            }
            while let Some(r) = inflight.next().await {
                record(r?);
            }
        }
    }
    Ok(sent)
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Samples the peak VmRSS of `pid` every 100 ms until aborted.
fn sample_rss(pid: u32) -> (Arc<Mutex<f64>>, tokio::task::JoinHandle<()>) {
    let peak = Arc::new(Mutex::new(rss_kib(pid).unwrap_or(f64::NAN)));
    let sink = peak.clone();
    let task = tokio::spawn(async move {
        // Bounded by the run: aborted when it ends; 10 minutes at most.
        for _ in 0..6_000 {
            if let Some(kib) = rss_kib(pid) {
                let mut p = sink.lock().unwrap_or_else(|e| e.into_inner());
                *p = p.max(kib);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (peak, task)
}

/// CPU seconds (user + system) of a process, from `/proc/<pid>/stat`.
pub(crate) fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // "pid (comm) state ppid ...": utime and stime are fields 14 and 15.
    let ticks: f64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// The bench's nats-server children (one while a scenario runs).
pub(crate) fn server_pids() -> Vec<String> {
    let mut pids = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return pids;
    };
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "nats-server" {
                pids.push(pid.to_owned());
            }
        }
    }
    pids
}

/// CPU seconds so far of the workers, the nats-server and the bench.
fn cpu(procs: &[BmwProc]) -> [f64; 3] {
    [
        procs
            .iter()
            .map(|p| cpu_seconds(&p.pid().to_string()))
            .sum(),
        server_pids().iter().map(|p| cpu_seconds(p)).sum(),
        cpu_seconds("self"),
    ]
}

/// One run's figures.
#[derive(Debug)]
struct Once {
    rate: f64,
    p50: f64,
    p99: f64,
    rss_kib: f64,
    /// Tasks/s stored while the workers drain (NaN when enqueued first).
    enqueue_rate: f64,
    /// CPU used during the measured time by workers, nats-server, bench, in
    /// cores (CPU seconds / wall seconds).
    cores: [f64; 3],
    /// The same as CPU µs per task.
    cpu_us: [f64; 3],
}

fn spawn_workers(
    server: &Server,
    queue: &str,
    workers: usize,
    bridge: Option<&str>,
    label: &str,
    runner: Runner,
) -> anyhow::Result<Vec<BmwProc>> {
    let kinds = server.dir().join("bench-kinds.toml");
    std::fs::write(
        &kinds,
        format!(
            "[[kind]]\nname = \"{}\"\ncommand = [\"true\"]\n",
            Runner::Subprocess.kind()
        ),
    )?;
    let kinds = kinds.display().to_string();
    let mut procs = Vec::new();
    for i in 0..workers {
        let mut args = vec!["--queues", queue, "--concurrency", CONCURRENCY];
        if runner == Runner::Subprocess {
            args.extend(["--config", &kinds]);
        }
        let role = match (bridge, i) {
            (Some(addr), 0) => {
                args.extend(["--http-addr", addr]);
                "run"
            }
            _ => "worker",
        };
        procs.push(BmwProc::spawn(
            role,
            server.url(),
            &args,
            server.dir(),
            &format!("{label}-{i}"),
        )?);
    }
    Ok(procs)
}

/// One run: `workers` worker processes on a fresh queue, `n` tasks by `path`,
/// while draining (`concurrent`) or all before it (subject path only).
async fn run_once(
    server: &Server,
    path: Path,
    workers: usize,
    concurrent: bool,
    tasks: Tasks,
    wait: Duration,
    label: &str,
) -> anyhow::Result<Once> {
    let (n, runner) = (tasks.n, tasks.runner);
    ensure!(
        concurrent || path.can_enqueue_first(),
        "enqueue-then-drain needs the subject path"
    );
    let nats = server.connect().await?;
    let queue = format!("q{}", uuid::Uuid::new_v4().simple());
    let (done, follower) = follow(&nats, &queue, runner.kind()).await?;
    let ids: Ids = Arc::default();
    let replies = match path {
        Path::Command => Some(follow_replies(&nats, &queue, ids.clone()).await?),
        _ => None,
    };
    let bridge_addr = match path {
        Path::Bridge | Path::BridgeLoop | Path::Batch => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            Some(format!("127.0.0.1:{port}"))
        }
        _ => None,
    };
    let done_count = || done.lock().unwrap_or_else(|e| e.into_inner()).len();
    let deadline = Instant::now() + wait;
    let (started, sent, mut procs, sampler, cpu_start);
    let mut enqueue_rate = f64::NAN;
    if concurrent {
        procs = spawn_workers(
            server,
            &queue,
            workers,
            bridge_addr.as_deref(),
            label,
            runner,
        )?;
        wait_workers(&nats, &mut procs).await?;
        if let Some(addr) = &bridge_addr {
            wait_for("the bridge", Duration::from_secs(20), || {
                std::net::TcpStream::connect(addr).is_ok()
            })
            .await?;
        }
        sampler = sample_rss(procs[0].pid());
        let url = bridge_addr.as_ref().map(|a| format!("http://{a}"));
        cpu_start = cpu(&procs);
        started = Instant::now();
        sent = enqueue(&nats, path, &queue, tasks, url.as_deref(), &ids, deadline).await?;
        enqueue_rate = n as f64 / started.elapsed().as_secs_f64().max(1e-6);
    } else {
        sent = enqueue(&nats, path, &queue, tasks, None, &ids, deadline).await?;
        procs = spawn_workers(server, &queue, workers, None, label, runner)?;
        wait_workers(&nats, &mut procs).await?;
        sampler = sample_rss(procs[0].pid());
        // The drain starts with the first task done (worker start-up excluded).
        wait_for("the first task done", Duration::from_secs(30), || {
            done_count() > 0
        })
        .await?;
        cpu_start = cpu(&procs);
        started = *done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .min()
            .context("one done")?;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let waited = wait_for(&format!("{n} tasks done"), left, || done_count() >= n).await;
    let (cpu_end, wall) = (cpu(&procs), started.elapsed().as_secs_f64().max(1e-6));
    sampler.1.abort();
    follower.abort();
    if let Err(e) = waited {
        bail!("{e}: {} of {n} done", done_count());
    }
    // Outcomes of the last commands may trail their tasks' events a little.
    let id_count = || ids.lock().unwrap_or_else(|e| e.into_inner()).len();
    let left = deadline.saturating_duration_since(Instant::now());
    let known = wait_for("every task id", left.min(Duration::from_secs(10)), || {
        id_count() >= n
    })
    .await;
    if let Some(r) = replies {
        r.abort();
    }
    if let Err(e) = known {
        bail!("{e}: {} of {n} command outcomes", id_count());
    }
    let done = done.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let last = *done.values().max().context("tasks done")?;
    let rate = n as f64 / last.duration_since(started).as_secs_f64().max(1e-6);
    let ids = ids.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut latencies: Vec<f64> = sent
        .iter()
        .enumerate()
        .filter_map(|(i, at)| {
            let d = done.get(ids.get(&i)?)?;
            Some(d.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    ensure!(
        latencies.len() == n && done.len() == n,
        "{label}: {} of {n} enqueued tasks seen done ({} done events)",
        latencies.len(),
        done.len()
    );
    for p in procs.iter_mut() {
        ensure!(p.alive(), "bmw {} exited; log:\n{}", p.pid(), p.log_tail());
    }
    let rss_kib = *sampler.0.lock().unwrap_or_else(|e| e.into_inner());
    drop(procs);
    Ok(Once {
        rate,
        p50: percentile(&mut latencies, 50.0),
        p99: percentile(&mut latencies, 99.0),
        rss_kib,
        enqueue_rate,
        cores: std::array::from_fn(|i| (cpu_end[i] - cpu_start[i]) / wall),
        cpu_us: std::array::from_fn(|i| (cpu_end[i] - cpu_start[i]) * 1e6 / n as f64),
    })
}

/// Run number `run` of one scenario, on a fresh queue of `server` and
/// under `wait` (enqueue and drain); on failure the process logs are kept.
pub(crate) async fn run(
    server: &Server,
    path: Path,
    workers: usize,
    concurrent: bool,
    tasks: Tasks,
    wait: Duration,
    run: usize,
) -> anyhow::Result<AsyncFigure> {
    let runner = tasks.runner;
    let way = if concurrent { "conc" } else { "drain" };
    let label = format!("async-{runner:?}-{path:?}-{workers}w-{way}-{run}");
    let once = server
        .scenario(
            &label,
            run_once(server, path, workers, concurrent, tasks, wait, &label),
        )
        .await?;
    eprintln!(
        "  {label}: {:.0} tasks/s, p50 {:.1} ms, p99 {:.1} ms, peak RSS {:.1} MiB; \
         CPU cores used: workers {:.2}, nats-server {:.2}, bench {:.2}; enqueued {:.0} tasks/s",
        once.rate,
        once.p50,
        once.p99,
        once.rss_kib / 1024.0,
        once.cores[0],
        once.cores[1],
        once.cores[2],
        once.enqueue_rate,
    );
    Ok(AsyncFigure {
        rate: Samples(vec![once.rate]),
        p50_ms: Samples(vec![once.p50]),
        p99_ms: Samples(vec![once.p99]),
        rss_kib: Samples(vec![once.rss_kib]),
        enqueue_rate: Samples(vec![once.enqueue_rate]),
        server_us: Samples(vec![once.cpu_us[1]]),
        worker_us: Samples(vec![once.cpu_us[0]]),
    })
}
