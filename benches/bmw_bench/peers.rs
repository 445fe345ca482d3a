//! Figure 10 (issue 22, part 5): bmw beside two peer task queues, measured in
//! the same run on the same machine: apalis-nats (Rust, on NATS JetStream
//! like bmw) and BullMQ (Node.js, on redis). Every system runs noop tasks
//! with 64 at once, enqueued while one worker drains them, timed from the
//! first enqueue to the last task done:
//!
//! - bmw 2e and 2a (`async_tasks::run`, 1 worker process at `--concurrency
//!   64`): this process publishes on `bmw.async.<queue>` (2e) or sends
//!   `bmw.task.create` commands (2a), done at the task's `succeeded` event.
//! - apalis-nats (`benches/peers/apalis-nats`): one process holding an
//!   apalis worker (concurrency 64, a durable pull consumer) and a producer
//!   pushing through apalis-nats's sink; done when the handler returned.
//!   On a fresh nats-server started like bmw's (same binary and settings).
//! - BullMQ (`benches/peers/bullmq`): one Node process holding a Worker
//!   (concurrency 64) and a Queue adding jobs with `addBulk` in chunks of
//!   1,000; done at the worker's `completed` event. On a fresh redis-server
//!   7 (loopback, temporary dir, AOF on with `appendfsync everysec`).
//!
//! - Raw JetStream 1c (`baseline::both_once`) on a work queue, the retention
//!   of bmw's `BMW_ASYNC` (an ack deletes the message), and on a limits
//!   stream, the retention apalis-nats creates (an ack only moves the
//!   consumer's floor): each system's own ceiling on this machine.
//!
//! Each round runs the six in turn, each on a fresh server, so drift in the
//! machine's load touches them alike. `scripts/peers-env` installs the peers
//! (building apalis-nats's binary, `npm ci`, redis-server from apt); a peer
//! that cannot be installed is reported `n/a` with the reason and the others
//! still run. A peer run that does not complete every task (each peer counts
//! its tasks by index and exits non-zero otherwise) is a failed run.
//!
//! Targets (issue 22; reported, not asserted): bmw 2e at least 1.5 ×
//! apalis-nats, bmw 2a at least 1 × apalis-nats.

use std::collections::HashMap;
use std::os::unix::process::CommandExt as _;
use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};

use async_nats::jetstream::stream::RetentionPolicy;

use crate::async_tasks::{self, Path, Runner, Tasks};
use crate::baseline;
use crate::env::{Server, wait_for};
use crate::report::{self, Row, Samples, Target};
use crate::{bounded, failed, ratio};

/// Tasks at once in every system (bmw's `--concurrency`, the peers' workers).
const CONCURRENCY: usize = 64;
/// BullMQ's `addBulk` chunk.
const BULLMQ_CHUNK: usize = 1_000;
/// How long installing a peer may take (the first build of apalis-nats's
/// binary takes minutes on 2 cores).
const INSTALL_LIMIT: Duration = Duration::from_secs(20 * 60);

/// Counts of figure 10.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counts {
    /// Tasks per run.
    pub(crate) tasks: usize,
    /// Rounds (each runs every system once).
    pub(crate) runs: usize,
    /// Bound of one run.
    pub(crate) limit: Duration,
    /// How long a run waits for its tasks.
    pub(crate) wait: Duration,
}

/// The systems, in the order they take turns within a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum System {
    Bmw2e,
    Bmw2a,
    Apalis,
    BullMq,
    /// Raw JetStream 1c on a work queue: the ceiling of bmw's retention.
    RawWorkQueue,
    /// Raw JetStream 1c on a limits stream: the ceiling of apalis-nats's.
    RawLimits,
}

const SYSTEMS: [System; 6] = [
    System::Bmw2e,
    System::Bmw2a,
    System::Apalis,
    System::BullMq,
    System::RawWorkQueue,
    System::RawLimits,
];

impl System {
    fn peer(self) -> Option<&'static str> {
        match self {
            System::Apalis => Some("apalis-nats"),
            System::BullMq => Some("bullmq"),
            _ => None,
        }
    }

    fn is_raw(self) -> bool {
        matches!(self, System::RawWorkQueue | System::RawLimits)
    }

    fn short(self) -> &'static str {
        match self {
            System::Bmw2e => "bmw 2e",
            System::Bmw2a => "bmw 2a",
            System::Apalis => "apalis-nats",
            System::BullMq => "BullMQ",
            System::RawWorkQueue => "raw 1c work queue",
            System::RawLimits => "raw 1c limits",
        }
    }
}

/// What `scripts/peers-env <peer>` printed (`name=path` lines), or why it failed.
async fn peer_env(peer: &str) -> Result<HashMap<String, PathBuf>, String> {
    let script = FsPath::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peers-env");
    eprintln!("[peers] scripts/peers-env {peer}");
    let mut command = tokio::process::Command::new(&script);
    command
        .arg(peer)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let run = async {
        let out = command
            .output()
            .await
            .map_err(|e| format!("scripts/peers-env: {e}"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr
                .lines()
                .rev()
                .find(|l| l.starts_with("peers-env:"))
                .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
                .unwrap_or("no message")
                .trim()
                .to_owned();
            return Err(format!(
                "scripts/peers-env {peer} failed ({}): {why}",
                out.status
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), PathBuf::from(v)))
            .collect())
    };
    match tokio::time::timeout(INSTALL_LIMIT, run).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "scripts/peers-env {peer} did not finish within {INSTALL_LIMIT:?}"
        )),
    }
}

/// A command that the kernel kills with the bench (`PR_SET_PDEATHSIG`), and
/// that tokio kills when its handle is dropped (a run's time-out, a panic).
/// Spawned from the runtime's threads, which live as long as the bench.
fn guarded(program: &FsPath) -> tokio::process::Command {
    let mut std_command = std::process::Command::new(program);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        std_command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut command = tokio::process::Command::from(std_command);
    command.stdin(Stdio::null()).kill_on_drop(true);
    command
}

/// The last lines of a log, for error messages.
fn tail(log: &FsPath) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Runs a peer's program to its end; its JSON line, checked for every task done.
async fn run_peer(
    mut command: tokio::process::Command,
    log: &FsPath,
    tasks: usize,
) -> anyhow::Result<f64> {
    let stderr = std::fs::File::create(log)?;
    let child = command
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("starting the peer")?;
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!("peer exited with {}: {}", out.status, tail(log));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON line in the peer's output: {stdout}"))?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let done = v["done"].as_u64().unwrap_or(0) as usize;
    ensure!(
        v["tasks"].as_u64() == Some(tasks as u64) && done == tasks,
        "peer reports {done} of {tasks} tasks done: {line}"
    );
    let rate = v["rate"].as_f64().context("no rate")?;
    eprintln!(
        "  {}: {rate:.0} tasks/s ({} done, {} duplicates, producer {}, enqueued in {:.2} s)",
        v["peer"].as_str().unwrap_or("peer"),
        done,
        v["duplicates"],
        v["producer"].as_str().unwrap_or("?"),
        v["enqueue_seconds"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(rate)
}

/// One apalis-nats run on a fresh nats-server.
async fn apalis_once(binary: &FsPath, counts: &Counts, label: &str) -> anyhow::Result<f64> {
    let server = Server::start().await?;
    let mut command = guarded(binary);
    command.args([
        "--nats-url",
        server.url(),
        "--tasks",
        &counts.tasks.to_string(),
        "--concurrency",
        &CONCURRENCY.to_string(),
        "--timeout",
        &counts.wait.as_secs().to_string(),
    ]);
    let log = server.dir().join(format!("{label}.log"));
    server
        .scenario(label, run_peer(command, &log, counts.tasks))
        .await
}

/// A redis-server on a free loopback port with a temporary dir, AOF on and
/// fsynced every second; killed on drop.
struct Redis {
    child: tokio::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    async fn start(binary: &FsPath) -> anyhow::Result<Redis> {
        let dir = tempfile::Builder::new()
            .prefix("bmw-bench-redis-")
            .tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(dir.path().join("redis.log"))?;
        let mut command = guarded(binary);
        let dir_arg = dir.path().display().to_string();
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", &dir_arg, "--daemonize", "no"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            // AOF only: no RDB snapshots on top.
            .args(["--save", ""])
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command.spawn().context("starting redis-server")?;
        let mut redis = Redis { child, port, dir };
        let addr = format!("127.0.0.1:{port}");
        let up = wait_for("redis-server", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&addr).is_ok()
        })
        .await;
        if let Err(e) = up {
            let exited = redis.child.try_wait().ok().flatten();
            bail!(
                "{e} (exited: {exited:?}); log: {}",
                tail(&redis.dir.path().join("redis.log"))
            );
        }
        Ok(redis)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Reaped here, so no zombie is left while the bench goes on.
        for _ in 0..100 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What the BullMQ peer runs with.
#[derive(Debug)]
struct BullMqEnv {
    node: PathBuf,
    script: PathBuf,
    redis: PathBuf,
}

/// One BullMQ run on a fresh redis-server.
async fn bullmq_once(env: &BullMqEnv, counts: &Counts) -> anyhow::Result<f64> {
    let redis = Redis::start(&env.redis).await?;
    let mut command = guarded(&env.node);
    command.arg(&env.script).args([
        "--redis-port",
        &redis.port.to_string(),
        "--tasks",
        &counts.tasks.to_string(),
        "--concurrency",
        &CONCURRENCY.to_string(),
        "--bulk",
        &BULLMQ_CHUNK.to_string(),
        "--timeout",
        &counts.wait.as_secs().to_string(),
    ]);
    let log = redis.dir.path().join("bullmq.log");
    let rate = run_peer(command, &log, counts.tasks).await;
    rate.map_err(|e| {
        e.context(format!(
            "redis log: {}",
            tail(&redis.dir.path().join("redis.log"))
        ))
    })
}

/// The version of `name` in a Cargo.lock.
fn cargo_lock_version(lock: &str, name: &str) -> Option<String> {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == format!("name = \"{name}\"") {
            return lines
                .next()?
                .strip_prefix("version = \"")?
                .strip_suffix('"')
                .map(str::to_owned);
        }
    }
    None
}

/// Labels of the peers with their pinned versions (from their lock files) and
/// the programs they run on.
fn apalis_label() -> String {
    let lock = std::fs::read_to_string(
        FsPath::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/apalis-nats/Cargo.lock"),
    )
    .unwrap_or_default();
    let v = |name| cargo_lock_version(&lock, name).unwrap_or_else(|| "?".into());
    format!(
        "apalis-nats {} (apalis {}, async-nats {})",
        v("apalis-nats"),
        v("apalis"),
        v("async-nats")
    )
}

fn bullmq_label(env: &BullMqEnv) -> String {
    let lock: serde_json::Value = std::fs::read_to_string(
        FsPath::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/bullmq/package-lock.json"),
    )
    .ok()
    .and_then(|s| serde_json::from_str(&s).ok())
    .unwrap_or_default();
    let version = |bin: &FsPath, arg: &str| {
        std::process::Command::new(bin)
            .arg(arg)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let redis = version(&env.redis, "--version");
    let redis = redis
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap_or("?");
    format!(
        "BullMQ {} (ioredis {}, Node {}, redis-server {redis})",
        lock["packages"]["node_modules/bullmq"]["version"]
            .as_str()
            .unwrap_or("?"),
        lock["packages"]["node_modules/ioredis"]["version"]
            .as_str()
            .unwrap_or("?"),
        version(&env.node, "--version"),
    )
}

/// Runs figure 10 and returns its rows.
pub(crate) async fn rows(counts: Counts, failures: &mut Vec<String>) -> Vec<Row> {
    // Install what the peers need, each on its own: one that cannot be had
    // is reported n/a and the others still run.
    let apalis = peer_env("apalis-nats").await.and_then(|paths| {
        paths
            .get("apalis-nats")
            .cloned()
            .ok_or_else(|| "scripts/peers-env printed no apalis-nats path".to_owned())
    });
    let bullmq = peer_env("bullmq").await.and_then(|paths| {
        let get = |k: &str| {
            paths
                .get(k)
                .cloned()
                .ok_or_else(|| format!("scripts/peers-env printed no {k} path"))
        };
        Ok(BullMqEnv {
            node: get("node")?,
            script: get("bullmq")?,
            redis: get("redis-server")?,
        })
    });
    for (peer, why) in [
        ("apalis-nats", apalis.as_ref().err()),
        ("bullmq", bullmq.as_ref().err()),
    ] {
        if let Some(why) = why {
            eprintln!("[peers] {peer} cannot run: {why}");
        }
    }

    let mut samples: HashMap<System, (Samples, usize)> = SYSTEMS
        .iter()
        .map(|s| (*s, (Samples::default(), 0)))
        .collect();
    for round in 1..=counts.runs {
        for system in SYSTEMS {
            let name = format!("peers {} round {round}", system.short());
            let tasks = Tasks {
                n: counts.tasks,
                runner: Runner::Compiled,
            };
            let once = match system {
                System::Bmw2e | System::Bmw2a => {
                    let path = if system == System::Bmw2e {
                        Path::QueueSubject
                    } else {
                        Path::Command
                    };
                    bounded(&name, counts.limit, failures, async {
                        let server = Server::start().await?;
                        let figure =
                            async_tasks::run(&server, path, 1, true, tasks, counts.wait, round)
                                .await?;
                        Ok(figure.rate.median())
                    })
                    .await
                }
                System::Apalis => {
                    let Ok(binary) = &apalis else { continue };
                    let label = format!("peers-apalis-nats-{round}");
                    bounded(
                        &name,
                        counts.limit,
                        failures,
                        apalis_once(binary, &counts, &label),
                    )
                    .await
                }
                System::BullMq => {
                    let Ok(env) = &bullmq else { continue };
                    bounded(&name, counts.limit, failures, bullmq_once(env, &counts)).await
                }
                System::RawWorkQueue | System::RawLimits => {
                    let retention = if system == System::RawWorkQueue {
                        RetentionPolicy::WorkQueue
                    } else {
                        RetentionPolicy::Limits
                    };
                    bounded(&name, counts.limit, failures, async {
                        let server = Server::start().await?;
                        let rate = baseline::both_once(&server, counts.tasks, retention).await?;
                        eprintln!("  {}: {rate:.0} msg/s", system.short());
                        Ok(rate)
                    })
                    .await
                }
            };
            let entry = samples.entry(system).or_default();
            match once {
                Some(rate) => entry.0.push(rate),
                None => entry.1 += 1,
            }
        }
    }

    let n = report::num(counts.tasks as f64);
    let figure = |system: System| -> String {
        let way = format!("1 worker at concurrency {CONCURRENCY}, while draining, {n}/run");
        match system {
            System::Bmw2e => {
                format!("10 peers: bmw 2e, publish on bmw.async.<queue> ({way}; worker process)")
            }
            System::Bmw2a => {
                format!("10 peers: bmw 2a, bmw.task.create commands ({way}; worker process)")
            }
            System::Apalis => format!(
                "10 peers: {}, push via its sink ({way}; producer and worker in one process)",
                apalis_label()
            ),
            System::BullMq => match &bullmq {
                Ok(env) => format!(
                    "10 peers: {}, addBulk {} ({way}; producer and worker in one Node process; \
                     redis AOF everysec)",
                    bullmq_label(env),
                    report::num(BULLMQ_CHUNK as f64)
                ),
                Err(_) => format!("10 peers: BullMQ ({way})"),
            },
            System::RawWorkQueue => format!(
                "10 peers: raw JetStream 1c, work queue (bmw's retention: an ack deletes), \
                 publish + pull/ack at once, {n}/run"
            ),
            System::RawLimits => format!(
                "10 peers: raw JetStream 1c, limits stream (apalis-nats's retention: an ack \
                 moves the floor, nothing deleted), publish + pull/ack at once, {n}/run"
            ),
        }
    };
    let median = |system: System| samples[&system].0.median();
    // The fastest peer that ran (by median).
    let fastest = [System::Apalis, System::BullMq]
        .into_iter()
        .filter(|s| median(*s).is_finite())
        .max_by(|a, b| median(*a).total_cmp(&median(*b)));
    let apalis_rate = median(System::Apalis);
    let bmw_2e = median(System::Bmw2e);
    let mut rows = Vec::new();
    for system in SYSTEMS {
        let label = figure(system);
        let unavailable = match system {
            System::Apalis => apalis.as_ref().err(),
            System::BullMq => bullmq.as_ref().err(),
            _ => None,
        };
        if let Some(why) = unavailable {
            rows.push(Row::na(format!("{label}: tasks/s"), &format!("n/a: {why}")));
            continue;
        }
        let (rate, lost) = &samples[&system];
        if rate.0.is_empty() {
            rows.push(failed(&label));
            continue;
        }
        let unit = if system.is_raw() { "msg/s" } else { "tasks/s" };
        let mut row = Row::new(label, unit, rate.clone()).failed_runs(*lost);
        if system == System::RawLimits {
            row = row.ratio(ratio(
                rate.median(),
                median(System::RawWorkQueue),
                "raw work queue",
            ));
        } else if system == System::RawWorkQueue {
            row = row.ratio(ratio(rate.median(), apalis_rate, "apalis-nats"));
        } else if system == System::Apalis {
            row = row.ratio(
                [
                    ratio(rate.median(), bmw_2e, "bmw 2e"),
                    ratio(rate.median(), median(System::RawLimits), "raw limits"),
                ]
                .join("; "),
            );
        } else if system.peer().is_some() {
            row = row.ratio(ratio(rate.median(), bmw_2e, "bmw 2e"));
        } else {
            let mut ratios = Vec::new();
            if let Some(f) = fastest {
                ratios.push(ratio(
                    rate.median(),
                    median(f),
                    &format!("fastest peer ({})", f.short()),
                ));
                if f != System::Apalis && apalis_rate.is_finite() {
                    ratios.push(ratio(rate.median(), apalis_rate, "apalis-nats"));
                }
            }
            ratios.push(ratio(
                rate.median(),
                median(System::RawWorkQueue),
                "raw work queue",
            ));
            row = row.ratio(ratios.join("; "));
            let share = if system == System::Bmw2e { 1.5 } else { 1.0 };
            row = if apalis_rate.is_finite() {
                row.target(
                    Target::AtLeast(share * apalis_rate),
                    format!(
                        ">= {share} × apalis-nats ({} tasks/s)",
                        report::num(share * apalis_rate)
                    ),
                )
            } else {
                row.target(
                    Target::None,
                    format!(">= {share} × apalis-nats (apalis-nats not measured)"),
                )
            };
        }
        rows.push(row);
    }
    rows
}
