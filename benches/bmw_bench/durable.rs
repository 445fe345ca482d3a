//! Figure 9 (issue 27): what durability costs. The raw JetStream ceiling and
//! bmw's drain and producer paths measured on a server that fsyncs before every
//! acknowledgement (`sync_interval: always`, bmw's default) and on one that
//! fsyncs every 2 minutes (nats-server's default), the two modes taking turns
//! within each round so both see the same machine.
//!
//! Targets: the durable queue path (2e) at least 0.8 × the durable raw
//! ceiling (1c), and the durable batch route (2g) at least 5 × a loop of
//! single durable creates (2h: one `POST /bmw/task/` at a time).

use std::time::Duration;

use bmw::nats::local::StoreSync;

use crate::async_tasks::{self, Path, Runner, Tasks};
use crate::env::Server;
use crate::report::{self, Row, Samples, Target};
use crate::{bounded, failed, path_label, ratio};

/// The two sync modes, the one measured against first.
const MODES: [(&str, StoreSync); 2] = [
    (
        "sync every 2 min",
        StoreSync::Every(Duration::from_secs(120)),
    ),
    ("sync always", StoreSync::Always),
];

/// The bmw paths measured, 1 worker each: while draining, or all enqueued
/// before the worker starts (`false`: the drain alone, against 1b).
const PATHS: [(Path, bool); 6] = [
    (Path::QueueSubject, false),
    (Path::QueueSubject, true),
    (Path::Command, true),
    (Path::Bridge, true),
    (Path::BridgeLoop, true),
    (Path::Batch, true),
];
/// Where 2h is in [`PATHS`] (2g's target is a multiple of it).
const LOOP: usize = 4;

/// Counts of figure 9.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counts {
    /// Raw messages and bmw tasks per measurement.
    pub(crate) tasks: usize,
    /// Creates of the one-at-a-time loop (2h), which is slow when durable.
    pub(crate) loop_tasks: usize,
    /// Rounds (each runs both modes).
    pub(crate) runs: usize,
    /// Bound of one measurement.
    pub(crate) limit: Duration,
    /// How long a run waits for its tasks.
    pub(crate) wait: Duration,
}

/// Samples of one mode: raw 1b, 1c and 1d, then one per path.
#[derive(Debug, Default, Clone)]
struct ModeSamples {
    raw_drain: Samples,
    raw_both: Samples,
    raw_sync64: Samples,
    paths: [Samples; PATHS.len()],
    lost: usize,
}

fn count(path: Path, counts: &Counts) -> usize {
    if path == Path::BridgeLoop {
        counts.loop_tasks
    } else {
        counts.tasks
    }
}

/// Runs figure 9 and returns its rows.
pub(crate) async fn rows(counts: Counts, failures: &mut Vec<String>) -> Vec<Row> {
    let mut modes: [ModeSamples; 2] = Default::default();
    for round in 1..=counts.runs {
        for ((label, sync), samples) in MODES.iter().zip(modes.iter_mut()) {
            let name = format!("durable {label} round {round}: server");
            let Some(server) =
                bounded(&name, counts.limit, failures, Server::start_with(*sync)).await
            else {
                samples.lost += 1;
                continue;
            };
            let name = format!("durable {label} round {round}: raw");
            let raw = bounded(&name, counts.limit, failures, async {
                crate::baseline::drain_both_sync64(&server, counts.tasks).await
            })
            .await;
            match raw {
                Some([drain, both, sync64]) => {
                    eprintln!("  {name}: 1b {drain:.0}/s, 1c {both:.0}/s, 1d {sync64:.0}/s");
                    samples.raw_drain.push(drain);
                    samples.raw_both.push(both);
                    samples.raw_sync64.push(sync64);
                }
                None => samples.lost += 1,
            }
            for (i, (path, concurrent)) in PATHS.iter().enumerate() {
                let name = format!("durable {label} round {round}: {path:?} {concurrent}");
                let tasks = Tasks {
                    n: count(*path, &counts),
                    runner: Runner::Compiled,
                };
                let figure = bounded(&name, counts.limit, failures, async {
                    async_tasks::run(&server, *path, 1, *concurrent, tasks, counts.wait, round)
                        .await
                })
                .await;
                match figure {
                    Some(f) => samples.paths[i].push(f.rate.median()),
                    None => samples.lost += 1,
                }
            }
        }
    }
    table(&modes, &counts)
}

fn table(modes: &[ModeSamples; 2], counts: &Counts) -> Vec<Row> {
    let [fast, durable] = modes;
    let mut rows = Vec::new();
    let n = report::num(counts.tasks as f64);
    let raw_durable = durable.raw_both.median();
    for (which, (label, _)) in MODES.iter().enumerate() {
        let mode = &modes[which];
        let against_fast = |samples: &Samples, fast: &Samples| {
            if which == 1 {
                ratio(samples.median(), fast.median(), "sync every 2 min")
            } else {
                String::new()
            }
        };
        if mode.raw_both.0.is_empty() {
            rows.push(failed(&format!("9 {label}: raw JetStream")));
        } else {
            rows.push(
                Row::new(
                    format!(
                        "9 {label}: 1b JetStream work queue, pull + ack after the publish, {n}"
                    ),
                    "msg/s",
                    mode.raw_drain.clone(),
                )
                .ratio(against_fast(&mode.raw_drain, &fast.raw_drain)),
            );
            rows.push(
                Row::new(
                    format!("9 {label}: 1c JetStream work queue, publish + pull/ack at once, {n}"),
                    "msg/s",
                    mode.raw_both.clone(),
                )
                .ratio(against_fast(&mode.raw_both, &fast.raw_both)),
            );
            rows.push(
                Row::new(
                    format!(
                        "9 {label}: 1d JetStream, {} publishers each awaiting its ack",
                        crate::baseline::CONCURRENCY
                    ),
                    "msg/s",
                    mode.raw_sync64.clone(),
                )
                .ratio(against_fast(&mode.raw_sync64, &fast.raw_sync64)),
            );
        }
        for (i, (path, concurrent)) in PATHS.iter().enumerate() {
            let (path, concurrent) = (*path, *concurrent);
            let figure = format!(
                "9 {label}: {}, 1 worker, {}, {}/run",
                path_label(path),
                if concurrent {
                    "while draining"
                } else {
                    "then drain"
                },
                report::num(count(path, counts) as f64)
            );
            let samples = &mode.paths[i];
            if samples.0.is_empty() {
                rows.push(failed(&figure));
                continue;
            }
            let (raw, raw_name) = if concurrent {
                (&mode.raw_both, "1c of this mode")
            } else {
                (&mode.raw_drain, "1b of this mode")
            };
            let mut ratios = vec![ratio(samples.median(), raw.median(), raw_name)];
            if which == 1 {
                ratios.push(against_fast(samples, &fast.paths[i]));
            }
            let mut row = Row::new(figure, "tasks/s", samples.clone())
                .ratio(ratios.join("; "))
                .failed_runs(mode.lost);
            if which == 1 && path == Path::QueueSubject && concurrent {
                row = row.target(
                    Target::AtLeast(0.8 * raw_durable),
                    format!(
                        ">= 0.8 × durable 1c ({} msg/s)",
                        report::num(0.8 * raw_durable)
                    ),
                );
            }
            if which == 1 && path == Path::Batch {
                let single = durable.paths[LOOP].median();
                row.ratio = format!("{}; {}", row.ratio, ratio(samples.median(), single, "2h"));
                row = row.target(
                    Target::AtLeast(5.0 * single),
                    format!(">= 5 × durable 2h ({} tasks/s)", report::num(5.0 * single)),
                );
            }
            rows.push(row);
        }
    }
    rows
}
