//! Figure 8: async noop tasks through a NATS-service handler
//! (`bmw::external::service`) beside the compiled `async:demo:noop` handler,
//! in the same run and the same setting: one in-process worker
//! (`--concurrency 64`) on a fresh queue, tasks published on
//! `bmw.async.<queue>` while it drains, done when the bench sees the task's
//! `succeeded` event. The service is answered by a Rust responder in this
//! process (a queue-grouped subscription that replies at once) or by the
//! Python example (`examples/python/collect_service.py`, one process, whose
//! venv `scripts/python-env` makes).
//!
//! Cost per task is CPU time per task: this process (producer, worker,
//! responder), the nats-server and the Python responder, over the measured
//! time. Each repetition runs the three handlers in turn, so drift in the
//! machine's load touches them alike.

use std::collections::HashSet;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream::message::PublishMessage;
use bmw::nats::Nats;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;

use crate::env::{Server, wait_for};
use crate::report::Samples;

/// Outstanding publish acks (as the baseline's window).
const WINDOW: usize = crate::baseline::WINDOW;
/// The service kind and its subject.
const SERVICE_KIND: &str = "async:bench:service_noop";
const SERVICE_SUBJECT: &str = "bench.service_noop";
/// The Python example's kind and subject (as it declares them).
const PYTHON_KIND: &str = "async:collect_es_task";
const PYTHON_SUBJECT: &str = "apm.collect_es";

/// Which handler runs the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handler {
    /// `async:demo:noop`, compiled in.
    Compiled,
    /// A service answered by a Rust responder in this process.
    RustService,
    /// A service answered by the Python example.
    PythonService,
}

impl Handler {
    pub(crate) const ALL: [Handler; 3] = [
        Handler::Compiled,
        Handler::RustService,
        Handler::PythonService,
    ];

    fn kind(self) -> &'static str {
        match self {
            Handler::Compiled => "async:demo:noop",
            Handler::RustService => SERVICE_KIND,
            Handler::PythonService => PYTHON_KIND,
        }
    }

    fn payload(self) -> serde_json::Value {
        match self {
            Handler::PythonService => serde_json::json!({"index": "bench"}),
            _ => serde_json::json!({}),
        }
    }
}

/// One run of one handler.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Once {
    /// Tasks per second.
    pub(crate) rate: f64,
    /// CPU microseconds per task, all processes.
    pub(crate) cpu_us: f64,
    /// The same split: this process, nats-server, the Python responder.
    pub(crate) split_us: [f64; 3],
}

/// The Python of `scripts/python-env` (made once), or why there is none.
pub(crate) fn python() -> Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let script = FsPath::new(env!("CARGO_MANIFEST_DIR")).join("scripts/python-env");
            let out = Command::new(&script)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("scripts/python-env: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "scripts/python-env failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
        .clone()
}

/// The Python example as a child process, killed on drop.
struct PythonService(Child);

impl Drop for PythonService {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl PythonService {
    async fn start(server: &Server) -> anyhow::Result<PythonService> {
        let python = tokio::task::spawn_blocking(python)
            .await?
            .map_err(anyhow::Error::msg)?;
        let script =
            FsPath::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/collect_service.py");
        let log = std::fs::File::create(server.dir().join("python-service.log"))?;
        let child = Command::new(python)
            .arg(script)
            .args(["--nats-url", server.url()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the Python example")?;
        Ok(PythonService(child))
    }
}

/// A Rust responder: answers every request on `subject` at once, empty.
async fn rust_responder(server: &Server) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = async_nats::connect(server.url()).await?;
    let mut sub = client
        .queue_subscribe(SERVICE_SUBJECT, "bmw".into())
        .await?;
    client.flush().await?;
    Ok(tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = client.publish(reply, "".into()).await;
            }
        }
    }))
}

/// Task ids seen in `succeeded` events of `kind` on `queue`.
async fn follow(
    nats: &Nats,
    kind: &str,
    queue: &str,
) -> anyhow::Result<(Arc<Mutex<HashSet<String>>>, tokio::task::JoinHandle<()>)> {
    let done: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut sub = nats
        .client
        .subscribe(format!("bmw.event.async.{kind}.succeeded"))
        .await?;
    nats.client.flush().await?;
    let (sink, queue) = (done.clone(), queue.to_owned());
    let task = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
                continue;
            };
            let mut done = sink.lock().unwrap_or_else(|e| e.into_inner());
            for task in v["tasks"].as_array().into_iter().flatten() {
                if task["queue"] == queue.as_str()
                    && let Some(id) = task["task_id"].as_str()
                {
                    done.insert(id.to_owned());
                }
            }
        }
    });
    Ok((done, task))
}

/// Publishes tasks `from..to` of `handler` on `bmw.async.<queue>`.
async fn enqueue(
    nats: &Nats,
    handler: Handler,
    queue: &str,
    range: std::ops::Range<usize>,
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut acks = FuturesUnordered::new();
    for i in range {
        let id = format!("{queue}-{i}");
        let body =
            serde_json::json!({"id": id, "kind": handler.kind(), "payload": handler.payload()});
        let publish = PublishMessage::build()
            .payload(serde_json::to_vec(&body)?.into())
            .message_id(&id);
        acks.push(
            nats.js
                .send_publish(format!("bmw.async.{queue}"), publish)
                .await?
                .into_future(),
        );
        while acks.len() >= WINDOW {
            acks.next().await.context("ack")??;
        }
        ensure!(Instant::now() < deadline, "enqueue: {i} by the deadline");
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(())
}

/// CPU seconds of this process, the nats-server and `extra`.
fn cpu(extra: Option<u32>) -> [f64; 3] {
    let pids = crate::async_tasks::server_pids();
    let server: f64 = pids
        .iter()
        .map(|p| crate::async_tasks::cpu_seconds(p))
        .sum();
    let extra = extra.map_or(0.0, |p| crate::async_tasks::cpu_seconds(&p.to_string()));
    [crate::async_tasks::cpu_seconds("self"), server, extra]
}

/// One run: an in-process worker with the three kinds on a fresh queue,
/// one warm-up task, then `n` tasks of `handler` while it drains.
pub(crate) async fn run(
    server: &Server,
    handler: Handler,
    n: usize,
    wait: Duration,
) -> anyhow::Result<Once> {
    let deadline = Instant::now() + wait;
    let nats = server.connect().await?;
    let worker_nats = server.connect().await?;
    let queue = format!("q{}", uuid::Uuid::new_v4().simple());
    let mut registry = bmw::builtin::registry();
    for (kind, subject) in [
        (SERVICE_KIND, SERVICE_SUBJECT),
        (PYTHON_KIND, PYTHON_SUBJECT),
    ] {
        registry.register_async(kind, bmw::external::service::handler(subject)?)?;
    }
    let config = bmw::Config::resolve(bmw::config::ConfigOverrides {
        nats_url: Some(server.url().to_owned()),
        queues: Some(vec![queue.clone()]),
        concurrency: Some(64),
        ..Default::default()
    })?;
    let (responder, python) = match handler {
        Handler::Compiled => (None, None),
        Handler::RustService => (Some(rust_responder(server).await?), None),
        Handler::PythonService => (None, Some(PythonService::start(server).await?)),
    };
    let token = CancellationToken::new();
    let _stop = token.clone().drop_guard();
    let worker = bmw::worker::Worker::new(worker_nats, config, Arc::new(registry));
    tokio::spawn(worker.run(token.clone()));
    let (done, follower) = follow(&nats, handler.kind(), &queue).await?;
    let count = || done.lock().unwrap_or_else(|e| e.into_inner()).len();
    // Warm-up: the worker's consumer, the responder's subscription, the
    // Python interpreter; retried with back-off until the service answers.
    enqueue(&nats, handler, &queue, 0..1, deadline).await?;
    wait_for("the warm-up task", Duration::from_secs(30), || count() >= 1).await?;
    let pid = python.as_ref().map(|p| p.0.id());
    let (cpu_start, started) = (cpu(pid), Instant::now());
    enqueue(&nats, handler, &queue, 1..n + 1, deadline).await?;
    let left = deadline.saturating_duration_since(Instant::now());
    let waited = wait_for(&format!("{n} tasks done"), left, || count() > n).await;
    let (cpu_end, wall) = (cpu(pid), started.elapsed().as_secs_f64().max(1e-6));
    follower.abort();
    if let Some(r) = responder {
        r.abort();
    }
    if let Err(e) = waited {
        bail!(
            "{handler:?}: {e}: {} of {n} done",
            count().saturating_sub(1)
        );
    }
    drop(python);
    let split_us: [f64; 3] = std::array::from_fn(|i| (cpu_end[i] - cpu_start[i]) / n as f64 * 1e6);
    Ok(Once {
        rate: n as f64 / wall,
        cpu_us: split_us.iter().sum(),
        split_us,
    })
}

/// Samples of one handler over the runs.
#[derive(Debug, Default)]
pub(crate) struct Figure {
    pub(crate) rate: Samples,
    pub(crate) cpu_us: Samples,
}

impl Figure {
    pub(crate) fn push(&mut self, once: Once) {
        self.rate.push(once.rate);
        self.cpu_us.push(once.cpu_us);
    }
}
