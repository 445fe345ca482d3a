//! Accounting after a scenario, from what the worker processes logged (their
//! logs hold every run, even one made while NATS was unreachable) and from
//! the task records: which async task ids ran how often (`echo` lines), which
//! retried and slow tasks completed (their record, kept by `retention`) and
//! how often the slow ones ran (`sleep` lines), which daemon
//! creates were stored, which periodic ticks ran, and the longest time one
//! daemon task ran in two worker processes at once (from each process's
//! `Binding(...) is discovered, task is started` and `daemon instance
//! stopped` lines; a process killed ends its runs at its death, a frozen one
//! runs nothing while frozen).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use crate::harness::wait_until;
use crate::load::Accepted;
use crate::world::{ProcessLog, World};

/// What became of the load.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Accepted async task ids that never ran (echo) or never completed (retried, slow).
    pub(crate) lost: Vec<String>,
    /// Runs beyond the first, over every echo, slow task and periodic tick.
    pub(crate) duplicated: usize,
    /// Daemon uni_ids answered 2xx but not stored.
    pub(crate) daemons_missing: Vec<String>,
    /// The longest time one daemon task ran in two processes at once (0 if never).
    pub(crate) double_run: Duration,
    /// The task with that double run.
    pub(crate) double_run_task: Option<String>,
    /// Periodic ticks that ran while the load ran, and ticks that ran twice.
    pub(crate) ticks_ran: usize,
    pub(crate) ticks_twice: usize,
    /// Daemon runs seen (starts in any process), to show the measurement saw them.
    pub(crate) daemon_runs: usize,
    /// Daemon instances started again: starts beyond the first of each task,
    /// in any process (a stop and a start elsewhere or on the same worker).
    pub(crate) restarts: usize,
}

fn parse_time(line: &str) -> Option<DateTime<Utc>> {
    let first = line.split_whitespace().next()?;
    DateTime::parse_from_rfc3339(first)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The value of `field=` in a log line.
fn log_field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {field}="))? + field.len() + 2;
    line[start..]
        .split_whitespace()
        .next()
        .map(|v| v.trim_matches('"'))
}

/// Task id -> times it ran (lines logged by `handler`, `echo` or `tick`).
fn runs(logs: &[ProcessLog], handler: &str) -> HashMap<String, Vec<DateTime<Utc>>> {
    let needle = format!("builtin: {handler} ");
    let mut runs: HashMap<String, Vec<DateTime<Utc>>> = HashMap::new();
    for line in logs.iter().flat_map(|l| &l.lines) {
        if line.contains(&needle)
            && let (Some(id), Some(time)) = (log_field(line, "task_id"), parse_time(line))
        {
            runs.entry(id.to_owned()).or_default().push(time);
        }
    }
    runs
}

/// Task ids whose completion the worker logged without its record
/// (`completed record not written`: the record bucket was unreachable).
fn completed_unrecorded(logs: &[ProcessLog]) -> BTreeSet<String> {
    logs.iter()
        .flat_map(|l| &l.lines)
        .filter(|l| l.contains("completed record not written"))
        .filter_map(|l| log_field(l, "task_id").map(str::to_owned))
        .collect()
}

/// What is still missing: echo ids not run, retried and slow ids not completed,
/// daemon uni_ids not stored. `completed` and `stored` remember what was
/// seen, so each id is asked about until it is found, then no more.
async fn missing(
    world: &World,
    accepted: &Accepted,
    completed: &mut BTreeSet<String>,
    stored: &mut BTreeSet<String>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let logs = world.worker_logs();
    let echoes = runs(&logs, "echo");
    let echo: Vec<String> = accepted
        .echo
        .iter()
        .filter(|id| !echoes.contains_key(*id))
        .cloned()
        .collect();
    completed.extend(completed_unrecorded(&logs));
    let mut retried = Vec::new();
    for id in &accepted.completing {
        if completed.contains(id) {
            continue;
        }
        match world.client.get_async(id).await {
            Ok(r) if r.state == bmw::queue::TaskState::Completed => {
                completed.insert(id.clone());
            }
            _ => retried.push(id.clone()),
        }
    }
    if accepted.daemons.iter().any(|u| !stored.contains(u))
        && let Ok(rows) = world.client.list_daemon().await
    {
        stored.extend(rows.into_iter().map(|r| r.uni_id));
    }
    let daemons = accepted
        .daemons
        .iter()
        .filter(|u| !stored.contains(*u))
        .cloned()
        .collect();
    (echo, retried, daemons)
}

/// Waits (up to `patience`) until every accepted task ran or completed and
/// every accepted daemon create is stored; then counts.
pub(crate) async fn settle(
    world: &World,
    accepted: &Accepted,
    window: (DateTime<Utc>, DateTime<Utc>),
    patience: Duration,
) -> Tally {
    let mut completed: BTreeSet<String> = BTreeSet::new();
    let mut stored: BTreeSet<String> = BTreeSet::new();
    let mut left = (Vec::new(), Vec::new(), Vec::new());
    wait_until(patience, async || {
        left = missing(world, accepted, &mut completed, &mut stored).await;
        left.0.is_empty() && left.1.is_empty() && left.2.is_empty()
    })
    .await;
    let logs = world.worker_logs();
    let echoes = runs(&logs, "echo");
    let mut tally = Tally::default();
    let (echo, retried, daemons) = left;
    for id in echo.iter().chain(&retried) {
        let state = match world.client.get_async(id).await {
            Ok(r) => format!("{:?}, {} attempts", r.state, r.attempts),
            Err(e) => format!("no record: {e}"),
        };
        let class = if echo.contains(id) {
            "echo"
        } else {
            "retried or slow"
        };
        tally.lost.push(format!("{id} ({class}; {state})"));
    }
    tally.daemons_missing = daemons;
    tally.duplicated = echoes.values().map(|t| t.len() - 1).sum();
    tally.duplicated += runs(&logs, "sleep")
        .values()
        .map(|t| t.len() - 1)
        .sum::<usize>();
    let ticks = runs(&logs, "tick");
    tally.ticks_twice = ticks.values().map(|t| t.len() - 1).sum();
    tally.duplicated += tally.ticks_twice;
    tally.ticks_ran = ticks
        .values()
        .filter(|t| t.iter().any(|t| *t >= window.0 && *t <= window.1))
        .count();
    tally.daemon_runs = daemon_runs(&logs, Utc::now()).values().map(Vec::len).sum();
    tally.restarts = restarts(&logs);
    let (longest, task) = longest_double_run(&logs, Utc::now());
    tally.double_run = longest;
    tally.double_run_task = task;
    tally
}

/// One run of a daemon task in one process.
type Interval = (DateTime<Utc>, DateTime<Utc>);

/// Per uni_id, per process: the intervals it ran, without frozen time.
fn daemon_runs(
    logs: &[ProcessLog],
    now: DateTime<Utc>,
) -> BTreeMap<String, Vec<(usize, Interval)>> {
    let mut all: BTreeMap<String, Vec<(usize, Interval)>> = BTreeMap::new();
    for (process, log) in logs.iter().enumerate() {
        let end_of_life = log.ended.unwrap_or(now);
        let mut open: HashMap<String, DateTime<Utc>> = HashMap::new();
        let mut closed: Vec<(String, Interval)> = Vec::new();
        for line in &log.lines {
            let Some(time) = parse_time(line) else {
                continue;
            };
            let Some(uni_id) = log_field(line, "uni_id") else {
                continue;
            };
            if line.contains("is discovered, task is started") {
                open.entry(uni_id.to_owned()).or_insert(time);
            } else if line.contains("daemon instance stopped")
                && let Some(start) = open.remove(uni_id)
            {
                closed.push((uni_id.to_owned(), (start, time)));
            }
        }
        closed.extend(open.into_iter().map(|(u, start)| (u, (start, end_of_life))));
        for (uni_id, interval) in closed {
            for piece in without_frozen(interval, &log.frozen) {
                all.entry(uni_id.clone())
                    .or_default()
                    .push((process, piece));
            }
        }
    }
    all
}

/// Starts beyond the first of each daemon task, over every process.
fn restarts(logs: &[ProcessLog]) -> usize {
    let mut starts: HashMap<&str, usize> = HashMap::new();
    for line in logs.iter().flat_map(|log| &log.lines) {
        if line.contains("is discovered, task is started")
            && let Some(uni_id) = log_field(line, "uni_id")
        {
            *starts.entry(uni_id).or_default() += 1;
        }
    }
    starts.values().map(|n| n - 1).sum()
}

/// `interval` minus the frozen windows.
fn without_frozen(interval: Interval, frozen: &[Interval]) -> Vec<Interval> {
    let mut pieces = vec![interval];
    for &(from, to) in frozen {
        pieces = pieces
            .into_iter()
            .flat_map(|(start, end)| {
                if to <= start || from >= end {
                    return vec![(start, end)];
                }
                let mut rest = Vec::new();
                if start < from {
                    rest.push((start, from));
                }
                if to < end {
                    rest.push((to, end));
                }
                rest
            })
            .collect();
    }
    pieces
}

/// The longest overlap of two runs of one daemon task in different processes.
fn longest_double_run(logs: &[ProcessLog], now: DateTime<Utc>) -> (Duration, Option<String>) {
    let mut longest = TimeDelta::zero();
    let mut task = None;
    for (uni_id, runs) in daemon_runs(logs, now) {
        for (i, (p, a)) in runs.iter().enumerate() {
            for (q, b) in &runs[i + 1..] {
                if p == q {
                    continue;
                }
                let overlap = a.1.min(b.1) - a.0.max(b.0);
                if overlap > longest {
                    longest = overlap;
                    task = Some(uni_id.clone());
                }
            }
        }
    }
    (longest.to_std().unwrap_or_default(), task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn overlaps_count_across_processes_only_and_skip_frozen_time() {
        let line = |s: i64, what: &str| {
            format!(
                "{} INFO bmw::daemon: {what} uni_id=\"d-1\"",
                at(s).to_rfc3339()
            )
        };
        let a = ProcessLog {
            lines: vec![
                line(0, "Binding(d-1) is discovered, task is started"),
                line(10, "daemon instance stopped"),
            ],
            ended: None,
            frozen: vec![(at(2), at(9))],
        };
        let b = ProcessLog {
            lines: vec![line(5, "Binding(d-1) is discovered, task is started")],
            ended: Some(at(20)),
            frozen: vec![],
        };
        // a runs 0-2 and 9-10; b runs 5-20: one second at once.
        assert_eq!(
            longest_double_run(&[a, b], at(30)).0,
            Duration::from_secs(1)
        );
    }
}
