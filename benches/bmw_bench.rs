//! bmw's benchmark suite (issue 5): bmw against the raw JetStream ceiling,
//! measured in one run on this machine, printed as one markdown table.
//!
//! ```text
//! cargo bench --bench bmw_bench              # full: about 10 minutes
//! cargo bench --bench bmw_bench -- --quick   # smoke test (< 1 minute): small counts, checks counts
//! cargo bench --bench bmw_bench -- --only baseline,bridge   # a subset
//! ```
//!
//! Each scenario starts its own nats-server (the pinned binary, loopback, a
//! temporary file store) and its own `bmw` processes (the binary of this
//! build, stdout to /dev/null because the demo daemon prints every 5 s per
//! task), and kills them when it ends, also on error or panic. Every wait is
//! bounded in time and every loop in count.
//!
//! Figures: (1) raw JetStream baseline on a plain work queue: windowed async
//! publish, pull + ack, both at once, and 64 publishers awaiting each ack;
//! (2) `async:demo:noop` tasks end to end through a `bmw.task.create`
//! command (2a), a publish on `bmw.async.<queue>.<id>` (2b), the bridge (2c)
//! and a publish on `bmw.async.<queue>` (2e), 1 and 2 workers, enqueued
//! before or while draining, against 1b / 1c, with latencies and the rate
//! each producer path stores tasks (2d); the bridge's batch route (2g); 2c
//! and 2g also against 2e (issue 14's targets); (3) the bridge's `POST /bmw/task/`
//! under 64 connections; (4) 10,000 daemon tasks over 4 workers; (5)
//! fail-over after `kill -9`; (6) worker memory with 10,000 idle daemon
//! tasks, and while draining async tasks; (7) lateness of an every-second
//! periodic tick; (8) async noop tasks through a NATS-service handler (a
//! Rust responder, the Python example) beside the compiled handler; (9)
//! durability's price: 1c, 1d and bmw's producer paths with the store synced
//! before every acknowledgement and every 2 minutes, side by side; (10) bmw's
//! 2e and 2a beside the peer task queues apalis-nats and BullMQ (built from
//! their registries by `scripts/peers-env`), each round running all four on
//! fresh servers, with the ratio of bmw to the fastest peer. A wrong count (a task not bound or not done, a request
//! refused, a message lost) fails the run with a non-zero exit; a missed
//! target is only reported.

// A benchmark's output is its table.
#![allow(clippy::print_stdout)]

#[path = "bmw_bench/async_tasks.rs"]
mod async_tasks;
#[path = "bmw_bench/baseline.rs"]
mod baseline;
#[path = "bmw_bench/bridge.rs"]
mod bridge;
#[path = "bmw_bench/daemon.rs"]
mod daemon;
#[path = "bmw_bench/durable.rs"]
mod durable;
#[path = "bmw_bench/env.rs"]
mod env;
#[path = "bmw_bench/peers.rs"]
mod peers;
#[path = "bmw_bench/periodic.rs"]
mod periodic;
#[path = "bmw_bench/report.rs"]
mod report;
#[path = "bmw_bench/services.rs"]
mod services;

use std::future::Future;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use report::{Row, Samples, Target};

/// Counts and repetitions of one mode.
#[derive(Debug, Clone, Copy)]
struct Plan {
    quick: bool,
    baseline_msgs: usize,
    baseline_runs: usize,
    bridge_requests: usize,
    bridge_runs: usize,
    claim_tasks: usize,
    claim_workers: usize,
    claim_runs: usize,
    /// Figure 4 at scale: tasks and runs of the large row (0 runs: skipped).
    claim_large_tasks: usize,
    claim_large_runs: usize,
    failover_tasks: usize,
    failover_workers: usize,
    failover_fast_runs: usize,
    failover_default_runs: usize,
    memory_tasks: usize,
    memory_samples: usize,
    /// Tasks per async run.
    async_tasks: usize,
    async_runs: usize,
    periodic_ticks: usize,
    /// Figure 9: tasks per measurement, creates of the one-at-a-time loop, rounds.
    durable_tasks: usize,
    durable_loop_tasks: usize,
    durable_runs: usize,
    /// Figure 10: tasks per run of each system, rounds.
    peers_tasks: usize,
    peers_runs: usize,
    /// Bound of one scenario (or one run of a repeated one).
    scenario_limit: Duration,
    /// How long a run waits for all tasks to be stored, bound or back.
    wait_limit: Duration,
}

const FULL: Plan = Plan {
    quick: false,
    baseline_msgs: 100_000,
    baseline_runs: 5,
    bridge_requests: 3_000,
    bridge_runs: 3,
    claim_tasks: 10_000,
    claim_workers: 4,
    claim_runs: 3,
    claim_large_tasks: 100_000,
    claim_large_runs: 1,
    failover_tasks: 1_000,
    failover_workers: 3,
    failover_fast_runs: 3,
    failover_default_runs: 3,
    memory_tasks: 10_000,
    memory_samples: 6,
    async_tasks: 20_000,
    async_runs: 3,
    periodic_ticks: 20,
    durable_tasks: 10_000,
    durable_loop_tasks: 1_000,
    durable_runs: 3,
    peers_tasks: 20_000,
    peers_runs: 3,
    scenario_limit: Duration::from_secs(180),
    wait_limit: Duration::from_secs(60),
};

const QUICK: Plan = Plan {
    quick: true,
    baseline_msgs: 10_000,
    baseline_runs: 1,
    bridge_requests: 300,
    bridge_runs: 1,
    claim_tasks: 1_000,
    claim_workers: 4,
    claim_runs: 1,
    claim_large_tasks: 100_000,
    claim_large_runs: 0,
    failover_tasks: 1_000,
    failover_workers: 3,
    failover_fast_runs: 1,
    failover_default_runs: 0,
    memory_tasks: 1_000,
    memory_samples: 2,
    async_tasks: 500,
    async_runs: 1,
    periodic_ticks: 5,
    durable_tasks: 300,
    durable_loop_tasks: 100,
    durable_runs: 1,
    peers_tasks: 500,
    peers_runs: 1,
    scenario_limit: Duration::from_secs(60),
    wait_limit: Duration::from_secs(30),
};

/// Claim TTL and heartbeat: bmw's defaults, and the test suite's fast ones.
const DEFAULT_TTL: (u64, u64) = (15, 5);
const FAST_TTL: (u64, u64) = (3, 1);

const SCENARIOS: [&str; 10] = [
    "baseline", "async", "bridge", "claims", "failover", "memory", "periodic", "services",
    "durable", "peers",
];

/// The async scenarios: producer path, workers, enqueued while draining.
/// Enqueue-then-drain needs the subject path (see `async_tasks`).
const ASYNC_SCENARIOS: [(async_tasks::Path, usize, bool); 14] = {
    use async_tasks::Path::{Batch, Bridge, Command, QueueSubject, Subject};
    [
        (Command, 1, true),
        (Command, 2, true),
        (Subject, 1, false),
        (Subject, 1, true),
        (Subject, 2, false),
        (Subject, 2, true),
        (Bridge, 1, true),
        (Bridge, 2, true),
        (QueueSubject, 1, false),
        (QueueSubject, 1, true),
        (QueueSubject, 2, false),
        (QueueSubject, 2, true),
        // After 2e: their targets are ratios to 2e of the same run.
        (Batch, 1, true),
        (Batch, 2, true),
    ]
};

/// Issue 14's targets for the producer paths (commands, the bridge), as a
/// share of 2e (raw publish on `bmw.async.<queue>`) with the same workers,
/// same run.
fn producer_target(path: async_tasks::Path) -> Option<f64> {
    match path {
        async_tasks::Path::Command => Some(0.5),
        async_tasks::Path::Bridge => Some(0.3),
        async_tasks::Path::Batch => Some(0.6),
        _ => None,
    }
}

/// The figure letters of `--async-figures` (e.g. `ceg`: 2c, 2e and 2g).
fn figure_letter(path: async_tasks::Path) -> char {
    path_label(path).chars().nth(1).unwrap_or('?')
}

fn path_label(path: async_tasks::Path) -> &'static str {
    match path {
        async_tasks::Path::Command => "2a async via bmw.task.create",
        async_tasks::Path::Subject => "2b async via publish on bmw.async.<queue>.<id>",
        async_tasks::Path::Bridge => "2c async via bridge POST /bmw/task/",
        async_tasks::Path::BridgeLoop => "2h async via bridge POST /bmw/task/, one at a time",
        async_tasks::Path::QueueSubject => "2e async via publish on bmw.async.<queue>",
        async_tasks::Path::Batch => "2g async via bridge POST /bmw/task/batch, 1,000 per request",
    }
}

fn way_label(workers: usize, concurrent: bool) -> String {
    format!(
        "{workers} worker{}, {}",
        if workers == 1 { "" } else { "s" },
        if concurrent {
            "while draining"
        } else {
            "then drain"
        }
    )
}

fn usage() -> String {
    format!(
        "usage: bmw_bench [--quick] [--only {}] [--async-figures abcefg]",
        SCENARIOS.join(",")
    )
}

/// The async figures run (`--async-figures`): the letters after the 2.
const ALL_ASYNC_FIGURES: &str = "abcefg";

fn parse_args() -> Result<(Plan, Vec<String>, String), String> {
    let mut plan = FULL;
    let mut only: Vec<String> = SCENARIOS.iter().map(|s| (*s).to_owned()).collect();
    let mut figures = ALL_ASYNC_FIGURES.to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => plan = QUICK,
            "--async-figures" => {
                figures = args.next().ok_or_else(usage)?;
                if let Some(bad) = figures.chars().find(|c| !ALL_ASYNC_FIGURES.contains(*c)) {
                    return Err(format!("unknown async figure 2{bad}; {}", usage()));
                }
            }
            // cargo bench passes it to harness = false targets.
            "--bench" => {}
            "--only" => {
                let list = args.next().ok_or_else(usage)?;
                only = list.split(',').map(str::to_owned).collect();
                if let Some(bad) = only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
                    return Err(format!("unknown scenario {bad}; {}", usage()));
                }
            }
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other}; {}", usage())),
        }
    }
    Ok((plan, only, figures))
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The machine and build the figures come from.
fn conditions(plan: &Plan, load_before: &str) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown");
    let processors = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let changed: Vec<String> =
        command_output("git", &["status", "--porcelain", "--untracked-files=no"])
            .lines()
            .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
            .filter(|_| rev != "unknown")
            .collect();
    let dirty = match changed.len() {
        0 => String::new(),
        n if n <= 4 => format!(" + uncommitted changes in {}", changed.join(", ")),
        n => format!(
            " + uncommitted changes in {} and {} more files",
            changed[..3].join(", "),
            n - 3
        ),
    };
    let profile = if cfg!(debug_assertions) {
        "debug (debug assertions on)"
    } else {
        "release (cargo bench profile; the bmw binary of the same build)"
    };
    format!(
        "- mode: {}\n\
         - cores: {processors} x {model}; nproc: {}\n\
         - load average (1/5/15 min): {load_before} at start, {} at end\n\
         - nats-server: {}, file storage in {}, loopback only; store sync: the \
           server's default (every 2 min) except where figure 9 says `sync always`\n\
         - bmw: git {rev}{}; build profile: {profile}\n\
         - date: {}\n",
        if plan.quick {
            "--quick (smoke test: small counts, one run each)"
        } else {
            "full"
        },
        command_output("nproc", &[]),
        load_average(),
        env::nats_server_version(),
        std::env::temp_dir().display(),
        dirty,
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
    )
}

/// Runs one scenario under the plan's time bound, reporting its failure.
async fn bounded<T>(
    name: &str,
    limit: Duration,
    failures: &mut Vec<String>,
    f: impl Future<Output = anyhow::Result<T>>,
) -> Option<T> {
    eprintln!("[{name}]");
    let t = Instant::now();
    let result = match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            eprintln!("[{name}] FAILED: {e:#}");
            failures.push(format!("{name}: {e:#}"));
            None
        }
        Err(_) => {
            eprintln!("[{name}] FAILED: did not finish within {limit:?}");
            failures.push(format!("{name}: did not finish within {limit:?}"));
            None
        }
    };
    eprintln!("[{name}] {:.1} s", t.elapsed().as_secs_f64());
    result
}

/// Runs `f` `runs` times, each under `limit`; a failed run is reported and
/// the others still run. Returns the successful results and how many failed.
async fn repeat<T, Fut>(
    name: &str,
    runs: usize,
    limit: Duration,
    failures: &mut Vec<String>,
    mut f: impl FnMut() -> Fut,
) -> (Vec<T>, usize)
where
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut ok = Vec::new();
    let mut failed = 0;
    for i in 0..runs {
        match bounded(&format!("{name} run {}", i + 1), limit, failures, f()).await {
            Some(v) => ok.push(v),
            None => failed += 1,
        }
    }
    (ok, failed)
}

fn ratio(value: f64, base: f64, label: &str) -> String {
    if base.is_finite() && base > 0.0 && value.is_finite() {
        format!("{:.3} × {label}", value / base)
    } else {
        String::new()
    }
}

fn failed(figure: &str) -> Row {
    Row::na(figure, "**FAILED** (see errors below)")
}

/// Figure 8: the compiled `async:demo:noop`, then the same through a NATS
/// service answered by a Rust responder and by the Python example, taking
/// turns within each repetition; cost ratios against the compiled handler.
async fn services_rows(plan: &Plan, failures: &mut Vec<String>) -> Vec<Row> {
    use services::Handler;
    let n = plan.async_tasks;
    // The Python responder handles one request at a time: fewer tasks.
    let count = |h: Handler| {
        if h == Handler::PythonService {
            n.min(5_000)
        } else {
            n
        }
    };
    let python = services::python().err();
    let mut figures: Vec<(Handler, services::Figure, usize)> = Handler::ALL
        .iter()
        .map(|h| (*h, services::Figure::default(), 0))
        .collect();
    for run in 1..=plan.async_runs {
        for (handler, figure, lost) in figures.iter_mut() {
            if *handler == Handler::PythonService && python.is_some() {
                continue;
            }
            let name = format!("services {handler:?} run {run}");
            let once = bounded(&name, plan.scenario_limit, failures, async {
                let server = env::Server::start().await?;
                let once = server
                    .scenario(
                        &name,
                        services::run(&server, *handler, count(*handler), plan.wait_limit),
                    )
                    .await?;
                eprintln!(
                    "  {name}: {:.0} tasks/s, {:.0} µs CPU per task \
                     (bench process {:.0}, nats-server {:.0}, Python {:.0})",
                    once.rate, once.cpu_us, once.split_us[0], once.split_us[1], once.split_us[2]
                );
                Ok(once)
            })
            .await;
            match once {
                Some(once) => figure.push(once),
                None => *lost += 1,
            }
        }
    }
    let compiled_cpu = figures[0].1.cpu_us.median();
    let compiled_rate = figures[0].1.rate.median();
    let mut rows = Vec::new();
    for (handler, figure, lost) in figures {
        let label = match handler {
            Handler::Compiled => "8 async noop, compiled handler (`async:demo:noop`)",
            Handler::RustService => "8 async noop via a NATS service, Rust responder",
            Handler::PythonService => "8 async noop via a NATS service, the Python example",
        };
        let label = format!("{label}, {}/run", report::num(count(handler) as f64));
        if handler == Handler::PythonService
            && let Some(why) = &python
        {
            rows.push(Row::na(format!("{label}: tasks/s"), &format!("n/a: {why}")));
            continue;
        }
        if figure.rate.0.is_empty() {
            rows.push(failed(&label));
            continue;
        }
        let mut cpu = Row::new(
            format!("{label}: CPU per task"),
            "µs",
            figure.cpu_us.clone(),
        )
        .failed_runs(lost);
        if handler != Handler::Compiled {
            cpu = cpu.ratio(ratio(figure.cpu_us.median(), compiled_cpu, "compiled"));
        }
        if handler == Handler::RustService {
            cpu = cpu.target(
                Target::AtMost(2.0 * compiled_cpu),
                format!("<= 2 × compiled ({} µs)", report::num(2.0 * compiled_cpu)),
            );
        }
        let mut rate =
            Row::new(format!("{label}: tasks/s"), "tasks/s", figure.rate.clone()).failed_runs(lost);
        if handler != Handler::Compiled {
            rate = rate.ratio(ratio(figure.rate.median(), compiled_rate, "compiled"));
        }
        rows.push(rate);
        rows.push(cpu);
    }
    rows
}

#[tokio::main]
async fn main() -> ExitCode {
    let (plan, only, figures) = match parse_args() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return ExitCode::FAILURE;
    };
    // On Ctrl-C or SIGTERM the run is dropped, and with it every server and
    // worker guard: nothing is left running.
    tokio::select! {
        code = run(plan, only, figures) => code,
        _ = tokio::signal::ctrl_c() => { eprintln!("interrupted"); ExitCode::from(130) }
        _ = term.recv() => { eprintln!("terminated"); ExitCode::from(143) }
    }
}

async fn run(plan: Plan, only: Vec<String>, figures: String) -> ExitCode {
    let wants = |s: &str| only.iter().any(|o| o == s);
    let load_before = load_average();
    if let Err(e) = tokio::task::spawn_blocking(env::nats_server_binary)
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r)
    {
        eprintln!("cannot get nats-server: {e:#}");
        return ExitCode::FAILURE;
    }
    let limit = plan.scenario_limit;
    let mut failures = Vec::new();
    let mut rows = Vec::new();

    // 1. Baseline.
    let mut base = baseline::Baseline::default();
    if wants("baseline") {
        let r = bounded("baseline", limit, &mut failures, async {
            let server = env::Server::start().await?;
            baseline::run(&server, plan.baseline_msgs, plan.baseline_runs).await
        })
        .await;
        match r {
            Some(b) => base = b,
            None => rows.push(failed("1 JetStream baseline")),
        }
    }
    let n = report::num(plan.baseline_msgs as f64);
    let base_row = |figure: String, unit, samples: &Samples| {
        Row::new(figure, unit, samples.clone()).ratio("1 (baseline)".into())
    };
    if !base.publish.0.is_empty() {
        rows.push(base_row(
            format!(
                "1a JetStream work queue: async publish, window {} acks, {n} x 128 B",
                baseline::WINDOW
            ),
            "msg/s",
            &base.publish,
        ));
        rows.push(base_row(
            format!("1b JetStream work queue: pull + ack of those {n}, after the publish"),
            "msg/s",
            &base.drain,
        ));
        rows.push(base_row(
            format!("1c JetStream work queue: publish + pull/ack concurrently, {n}"),
            "msg/s",
            &base.both,
        ));
        rows.push(base_row(
            format!(
                "1d JetStream work queue: publish, {} publishers each awaiting its ack",
                baseline::CONCURRENCY
            ),
            "msg/s",
            &base.sync64,
        ));
        rows.push(base_row(
            "1c ... nats-server CPU per message".into(),
            "µs",
            &base.both_server_us,
        ));
        rows.push(base_row(
            "1d ... p50 latency".into(),
            "ms",
            &base.sync64_p50,
        ));
        rows.push(base_row(
            "1d ... p99 latency".into(),
            "ms",
            &base.sync64_p99,
        ));
    }
    let (pub_rate, both_rate) = (base.publish.median(), base.both.median());

    // 2. Async tasks.
    let mut async_rss = None;
    // 2b, 1 worker, while draining: what other handlers are compared with.
    let mut compiled_rate = f64::NAN;
    if wants("async") {
        let runs = plan.async_runs;
        let mut latency_rows = Vec::new();
        let mut previous = None;
        // 2e's median by workers, and the rows whose target is a share of it.
        let mut raw_rates = std::collections::HashMap::new();
        let mut producer_rows = Vec::new();
        let mut raw_enqueue_rates = std::collections::HashMap::new();
        for (path, workers, concurrent) in ASYNC_SCENARIOS {
            if !figures.contains(figure_letter(path)) {
                continue;
            }
            let n = plan.async_tasks;
            if previous != Some(path) && !path.can_enqueue_first() {
                rows.push(Row::na(
                    format!("{}, then drain", path_label(path)),
                    "n/a: this path needs a running worker, so it always drains while enqueuing",
                ));
            }
            previous = Some(path);
            let name = format!(
                "async {path:?} {workers}w {}",
                if concurrent {
                    "while draining"
                } else {
                    "then drain"
                }
            );
            let figure = format!(
                "{}, {}, {}/run",
                path_label(path),
                way_label(workers, concurrent),
                report::num(n as f64)
            );
            let Some(server) = bounded(
                &format!("{name}: server"),
                limit,
                &mut failures,
                env::Server::start(),
            )
            .await
            else {
                rows.push(failed(&figure));
                continue;
            };
            let mut run_no = 0;
            let (figs, lost) = repeat(&name, runs, limit, &mut failures, || {
                run_no += 1;
                async_tasks::run(
                    &server,
                    path,
                    workers,
                    concurrent,
                    async_tasks::Tasks {
                        n,
                        runner: async_tasks::Runner::Compiled,
                    },
                    plan.wait_limit,
                    run_no,
                )
            })
            .await;
            drop(server);
            if figs.is_empty() {
                rows.push(failed(&figure));
                continue;
            }
            let all = |f: fn(&async_tasks::AsyncFigure) -> &Samples| {
                Samples(figs.iter().flat_map(|g| f(g).0.iter().copied()).collect())
            };
            let rate = all(|g| &g.rate);
            if path == async_tasks::Path::Subject && workers == 1 && concurrent {
                compiled_rate = rate.median();
            }
            let (base_rate, base_name) = if concurrent {
                (both_rate, "1c")
            } else {
                (base.drain.median(), "1b")
            };
            if path == async_tasks::Path::QueueSubject && concurrent {
                raw_rates.insert(workers, rate.median());
            }
            if let Some(share) = producer_target(path) {
                producer_rows.push((rows.len(), workers, share));
            }
            let row = Row::new(figure.clone(), "tasks/s", rate.clone())
                .ratio(ratio(rate.median(), base_rate, base_name))
                .failed_runs(lost);
            rows.push(if base_rate.is_finite() {
                row.target(
                    Target::AtLeast(base_rate / 2.0),
                    format!(
                        ">= 50 % of {base_name} ({} msg/s)",
                        report::num(base_rate / 2.0)
                    ),
                )
            } else {
                row.target(Target::None, ">= 50 % of the baseline (baseline not run)")
            });
            if concurrent {
                let short = format!("{} ({})", &path_label(path)[..2], way_label(workers, true));
                let what = match path {
                    async_tasks::Path::Command => "command",
                    async_tasks::Path::Subject | async_tasks::Path::QueueSubject => "publish",
                    async_tasks::Path::Bridge
                    | async_tasks::Path::BridgeLoop
                    | async_tasks::Path::Batch => "request",
                };
                latency_rows.push(
                    Row::new(
                        format!("2d {short}: p50 {what} sent -> succeeded event"),
                        "ms",
                        all(|g| &g.p50_ms),
                    )
                    .failed_runs(lost),
                );
                latency_rows.push(
                    Row::new(
                        format!("2d {short}: p99 {what} sent -> succeeded event"),
                        "ms",
                        all(|g| &g.p99_ms),
                    )
                    .failed_runs(lost),
                );
                // Issue 14: how fast each path stores tasks, beside the drain.
                if matches!(
                    path,
                    async_tasks::Path::Bridge
                        | async_tasks::Path::Batch
                        | async_tasks::Path::QueueSubject
                ) {
                    let rate = all(|g| &g.enqueue_rate);
                    let to_raw = raw_enqueue_rates
                        .get(&workers)
                        .map(|raw| ratio(rate.median(), *raw, "2e"))
                        .unwrap_or_default();
                    if path == async_tasks::Path::QueueSubject {
                        raw_enqueue_rates.insert(workers, rate.median());
                    }
                    latency_rows.push(
                        Row::new(
                            format!("2d {short}: stored (all acked or answered) per second"),
                            "tasks/s",
                            rate,
                        )
                        .ratio(to_raw)
                        .failed_runs(lost),
                    );
                }
                if path == async_tasks::Path::Subject && workers == 1 {
                    async_rss = Some((all(|g| &g.rss_kib), lost));
                }
                // Issue 22: where the time goes, per task.
                if workers == 1 && path != async_tasks::Path::BridgeLoop {
                    let server = all(|g| &g.server_us);
                    let to_raw = ratio(server.median(), base.both_server_us.median(), "1c");
                    latency_rows.push(
                        Row::new(
                            format!("2d {short}: nats-server CPU per task"),
                            "µs",
                            server,
                        )
                        .ratio(to_raw)
                        .failed_runs(lost),
                    );
                    latency_rows.push(
                        Row::new(
                            format!("2d {short}: worker CPU per task"),
                            "µs",
                            all(|g| &g.worker_us),
                        )
                        .failed_runs(lost),
                    );
                }
            }
        }
        // Issue 14: the bridge's paths against 2e with the same workers.
        for (index, workers, share) in producer_rows {
            let Some(raw) = raw_rates.get(&workers).copied() else {
                continue;
            };
            let row = &mut rows[index];
            let to_raw = ratio(row.samples.median(), raw, "2e");
            row.ratio = if row.ratio.is_empty() {
                to_raw
            } else {
                format!("{}; {to_raw}", row.ratio)
            };
            row.target = Target::AtLeast(share * raw);
            row.target_text = format!(
                ">= {share} × 2e, {} ({} tasks/s)",
                way_label(workers, true),
                report::num(share * raw)
            );
        }
        rows.extend(latency_rows);
        // 2f: the same tasks run by a child process each (a declared `command`).
        let n = (plan.async_tasks / 10).max(100);
        let figure = format!(
            "2f async via a subprocess handler (`true` per task), publish on bmw.async.<queue>.<id>, {}, {}/run",
            way_label(1, true),
            report::num(n as f64)
        );
        let subprocess = if figures.contains('f') {
            bounded(
                "async subprocess: server",
                limit,
                &mut failures,
                env::Server::start(),
            )
            .await
        } else {
            None
        };
        match subprocess {
            None if !figures.contains('f') => {}
            None => rows.push(failed(&figure)),
            Some(server) => {
                let mut run_no = 0;
                let (figs, lost) = repeat("async subprocess", runs, limit, &mut failures, || {
                    run_no += 1;
                    async_tasks::run(
                        &server,
                        async_tasks::Path::Subject,
                        1,
                        true,
                        async_tasks::Tasks {
                            n,
                            runner: async_tasks::Runner::Subprocess,
                        },
                        plan.wait_limit,
                        run_no,
                    )
                })
                .await;
                drop(server);
                if figs.is_empty() {
                    rows.push(failed(&figure));
                } else {
                    let rate =
                        Samples(figs.iter().flat_map(|g| g.rate.0.iter().copied()).collect());
                    rows.push(
                        Row::new(figure, "tasks/s", rate.clone())
                            .ratio(ratio(rate.median(), compiled_rate, "2b 1 worker"))
                            .failed_runs(lost)
                            .target(Target::None, "reported: a process start per task"),
                    );
                }
            }
        }
    }

    // 3. Bridge.
    if wants("bridge") {
        let r = bounded("bridge", limit, &mut failures, async {
            let server = env::Server::start().await?;
            bridge::run(&server, plan.bridge_requests, plan.bridge_runs).await
        })
        .await;
        let c = bridge::CONNECTIONS;
        match r {
            Some(b) => {
                let requests = report::num(plan.bridge_requests as f64);
                rows.push(
                    Row::new(
                        format!("3 bridge POST /bmw/task/ (daemon create), {c} connections, {requests} requests/run"),
                        "req/s",
                        b.rate.clone(),
                    )
                    .ratio(format!(
                        "{}; {}",
                        ratio(b.rate.median(), pub_rate, "1a"),
                        ratio(b.rate.median(), base.sync64.median(), "1d")
                    )),
                );
                rows.push(
                    Row::new("3 bridge p50 latency", "ms", b.p50.clone()).ratio(ratio(
                        b.p50.median(),
                        base.sync64_p50.median(),
                        "1d p50",
                    )),
                );
                rows.push(
                    Row::new("3 bridge p99 latency", "ms", b.p99.clone()).ratio(ratio(
                        b.p99.median(),
                        base.sync64_p99.median(),
                        "1d p99",
                    )),
                );
            }
            None => rows.push(failed("3 bridge")),
        }
    }

    // 4. Claims at scale: the usual row, and a large one (issue 22, part 4).
    if wants("claims") {
        let workers = plan.claim_workers;
        for (tasks, runs, wait) in [
            (plan.claim_tasks, plan.claim_runs, plan.wait_limit),
            (
                plan.claim_large_tasks,
                plan.claim_large_runs,
                plan.wait_limit.max(Duration::from_secs(120)),
            ),
        ] {
            let label = format!(
                "{} daemon tasks / {workers} workers",
                report::num(tasks as f64)
            );
            if runs == 0 {
                rows.push(Row::na(format!("4 {label}"), "skipped in --quick"));
                continue;
            }
            let name = format!("claims {tasks}");
            let (runs, lost) = repeat(&name, runs, limit, &mut failures, || {
                daemon::claims(tasks, workers, wait)
            })
            .await;
            if runs.is_empty() {
                rows.push(failed(&format!("4 {label}")));
                continue;
            }
            let s = |f: fn(&daemon::Claims) -> f64| Samples(runs.iter().map(f).collect());
            let rate = Samples(runs.iter().map(|c| tasks as f64 / c.all_bound).collect());
            let r1c = ratio(rate.median(), both_rate, "1c");
            for row in [
                Row::new(
                    format!("4 {label}: creation start -> all bound"),
                    "s",
                    s(|c| c.all_bound),
                )
                .target(Target::AtMost(10.0), "<= 10 s"),
                Row::new(
                    format!("4 {label}: all specs stored -> all bound"),
                    "s",
                    s(|c| c.bound_after_stored),
                ),
                Row::new(
                    format!("4 {label}: creation start -> all specs stored"),
                    "s",
                    s(|c| c.stored),
                ),
                Row::new(
                    format!("4 {label}: created and bound per second"),
                    "tasks/s",
                    rate,
                )
                .ratio(r1c),
                Row::new(
                    format!("4 {label}: spread max/min per worker when all bound"),
                    "",
                    s(|c| c.spread),
                )
                .target(Target::AtMost(1.1), "<= 1.1"),
            ] {
                rows.push(row.failed_runs(lost));
            }
        }
    }

    // 5. Fail-over.
    if wants("failover") {
        let (tasks, workers) = (plan.failover_tasks, plan.failover_workers);
        for ((ttl, hb), runs) in [
            (DEFAULT_TTL, plan.failover_default_runs),
            (FAST_TTL, plan.failover_fast_runs),
        ] {
            let figure = format!(
                "5 fail-over: {} tasks / {workers} workers, kill -9 one, claim TTL {ttl} s, heartbeat {hb} s: until all run on live workers",
                report::num(tasks as f64)
            );
            if runs == 0 {
                rows.push(Row::na(figure, "skipped in --quick"));
                continue;
            }
            let (samples, lost) = repeat(
                &format!("failover ttl {ttl}s"),
                runs,
                limit,
                &mut failures,
                || daemon::failover(tasks, workers, ttl, hb, plan.wait_limit),
            )
            .await;
            let target = (ttl + hb + 1) as f64;
            if samples.is_empty() {
                rows.push(failed(&figure));
            } else {
                rows.push(
                    Row::new(figure, "s", Samples(samples))
                        .target(
                            Target::AtMost(target),
                            format!("<= {target} s (TTL + hb + 1 s)"),
                        )
                        .failed_runs(lost),
                );
            }
        }
    }

    // 6. Memory.
    if wants("memory") {
        let tasks = plan.memory_tasks;
        let r = bounded("memory", limit, &mut failures, async {
            daemon::memory(tasks, plan.memory_samples, plan.wait_limit).await
        })
        .await;
        let label = report::num(tasks as f64);
        match r {
            Some(m) => {
                let idle = Samples(m.idle.clone());
                let idle_kib = idle.median();
                let loaded = Samples(m.loaded.clone());
                let per_task = Samples(
                    m.loaded
                        .iter()
                        .map(|l| (l - idle_kib) / tasks as f64)
                        .collect(),
                );
                let mib = |s: &Samples| Samples(s.0.iter().map(|k| k / 1024.0).collect());
                rows.push(Row::new("6 worker VmRSS, idle", "MiB", mib(&idle)));
                rows.push(Row::new(
                    format!("6 worker VmRSS holding {label} idle daemon tasks"),
                    "MiB",
                    mib(&loaded),
                ));
                rows.push(
                    Row::new("6 memory per idle daemon task", "KiB", per_task)
                        .target(Target::Below(5.0), "< 5 KiB"),
                );
                rows.push(Row::new(
                    format!("6 one worker: creation start -> all {label} bound"),
                    "s",
                    Samples(vec![m.all_bound]),
                ));
            }
            None => rows.push(failed("6 memory")),
        }
    }
    if let Some((rss, lost)) = async_rss {
        rows.push(
            Row::new(
                format!(
                    "6 worker VmRSS while draining async tasks (peak; 2b, 1 worker, {}/run)",
                    report::num(plan.async_tasks as f64)
                ),
                "MiB",
                Samples(rss.0.iter().map(|k| k / 1024.0).collect()),
            )
            .failed_runs(lost),
        );
    }

    // 7. Periodic tick lateness.
    if wants("periodic") {
        let ticks = plan.periodic_ticks;
        let r = bounded("periodic", limit, &mut failures, async {
            let server = env::Server::start().await?;
            server
                .scenario("periodic", periodic::tick_lateness(&server, ticks))
                .await
        })
        .await;
        let figure = format!(
            "7 periodic `* * * * * *` tick lateness (enqueued event - due second), {ticks} ticks (runs = ticks)"
        );
        match r {
            Some(late) => rows.push(Row::new(figure, "ms", Samples(late))),
            None => rows.push(failed(&figure)),
        }
    }

    // 8. Async kinds as NATS services, beside the compiled handler.
    if wants("services") {
        rows.extend(services_rows(&plan, &mut failures).await);
    }

    if wants("peers") {
        let counts = peers::Counts {
            tasks: plan.peers_tasks,
            runs: plan.peers_runs,
            limit,
            wait: plan.wait_limit,
        };
        rows.extend(peers::rows(counts, &mut failures).await);
    }

    // 9. Durability's price.
    if wants("durable") {
        let counts = durable::Counts {
            tasks: plan.durable_tasks,
            loop_tasks: plan.durable_loop_tasks,
            runs: plan.durable_runs,
            limit,
            wait: plan.wait_limit,
        };
        rows.extend(durable::rows(counts, &mut failures).await);
    }

    println!("\n## bmw benchmark\n");
    println!("{}", conditions(&plan, &load_before));
    println!("{}", report::table(&rows));
    println!(
        "Values are medians over the runs (min and max beside them); ratios compare medians \
         measured in this same run. Bridge creates go to queue `bench`, which no worker \
         listens on, so figure 3 is the request path alone. Figure 2: `async:demo:noop` \
         tasks on a fresh queue, workers at `--concurrency 64`, done when the bench sees \
         the task's `succeeded` event; \"while draining\" times from the first enqueue \
         (workers already up) and compares with 1c, \"then drain\" times from the first \
         task done to the last (all enqueued before the workers start) and compares \
         with 1b; the bridge path keeps 64 requests in flight to a `bmw run`, which is \
         also the first worker. Figure 8: one in-process worker (`--concurrency 64`) \
         per run, tasks published on `bmw.async.<queue>` while it drains; CPU per task \
         counts the bench process (producer, worker, Rust responder), nats-server and \
         the Python responder; the three handlers take turns within each repetition. \
         Figure 9: a fresh server per mode and round, `sync_interval: always` (fsync \
         before each acknowledgement, bmw's default) against every 2 min, the modes \
         taking turns within each round; 1 worker while draining. \
         Figure 10: noop tasks, 64 at once, enqueued while one worker drains, from the \
         first enqueue to the last task done, the four systems taking turns within each \
         round on fresh servers: bmw's worker is its own process fed by the bench, \
         apalis-nats (same nats-server and settings) and BullMQ (redis-server, AOF \
         fsynced every second) run producer and worker in one process; each peer runs \
         one warm-up job first and counts every job by index."
    );
    let missed: Vec<&str> = rows
        .iter()
        .filter(|r| r.met() == Some(false))
        .map(|r| r.figure.as_str())
        .collect();
    if !missed.is_empty() {
        println!("\nMissed targets: {}", missed.join("; "));
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("\n### Errors\n");
        for f in &failures {
            println!("- {f}\n");
        }
        ExitCode::FAILURE
    }
}
