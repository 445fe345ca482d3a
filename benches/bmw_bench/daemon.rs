//! Figures 4-6 for daemon tasks: claims at scale over 4 workers, fail-over
//! after `kill -9`, and worker memory with many idle tasks. Each run has its
//! own nats-server and worker processes, so runs do not see each other's
//! tasks.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::ensure;

use crate::env::{
    BmwProc, Server, Tracker, listing_summary, publish_creates, spread, verify_bindings, wait_for,
    wait_workers,
};

/// Outstanding create acks while creating tasks.
const WINDOW: usize = 512;

/// One claims-at-scale run.
#[derive(Debug)]
pub(crate) struct Claims {
    /// Creation start -> all specs stored, s.
    pub(crate) stored: f64,
    /// Creation start -> every task bound, s.
    pub(crate) all_bound: f64,
    /// All specs stored -> every task bound, s.
    pub(crate) bound_after_stored: f64,
    /// max/min tasks per worker when all were bound.
    pub(crate) spread: f64,
}

/// Starts `count` workers with `args` and waits until they are registered.
async fn workers(
    server: &Server,
    nats: &bmw::nats::Nats,
    count: usize,
    args: &[&str],
    tag: &str,
) -> anyhow::Result<(Vec<BmwProc>, Vec<String>)> {
    let mut procs = (0..count)
        .map(|i| {
            BmwProc::spawn(
                "worker",
                server.url(),
                args,
                server.dir(),
                &format!("{tag}-{i}"),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ids = wait_workers(nats, &mut procs).await?;
    let ids = procs.iter().map(|p| ids[&p.pid()].clone()).collect();
    // Let each runtime open its watches before the first task arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok((procs, ids))
}

/// `wait_for`, and on a timeout what bmw's listing and the tracker show.
async fn wait_or_explain(
    what: &str,
    timeout: Duration,
    nats: &bmw::nats::Nats,
    tracker: &Tracker,
    condition: impl FnMut() -> bool,
) -> anyhow::Result<Instant> {
    match wait_for(what, timeout, condition).await {
        Ok(t) => Ok(t),
        Err(e) => {
            let listing = listing_summary(nats).await;
            Err(e.context(format!(
                "tracker: {} specs, {} bound, loads {:?}; {listing}",
                tracker.specs(),
                tracker.bound(None),
                tracker.loads().values().collect::<Vec<_>>()
            )))
        }
    }
}

/// `tasks` daemon tasks over `n_workers` workers (default claim TTL and
/// heartbeat): how long until all are stored and all bound, and the spread.
pub(crate) async fn claims(
    tasks: usize,
    n_workers: usize,
    limit: Duration,
) -> anyhow::Result<Claims> {
    let server = Server::start().await?;
    server
        .scenario("claims", claims_on(&server, tasks, n_workers, limit))
        .await
}

async fn claims_on(
    server: &Server,
    tasks: usize,
    n_workers: usize,
    limit: Duration,
) -> anyhow::Result<Claims> {
    let nats = server.connect().await?;
    let tracker = Tracker::start(&nats).await?;
    let (procs, ids) = workers(server, &nats, n_workers, &[], "claims").await?;
    let live: HashSet<String> = ids.into_iter().collect();

    let t0 = Instant::now();
    publish_creates(&nats, 0, tasks, WINDOW).await?;
    let stored = wait_or_explain("all specs stored", limit, &nats, &tracker, || {
        tracker.specs() == tasks
    })
    .await?;
    let bound = wait_or_explain("all tasks bound", limit, &nats, &tracker, || {
        tracker.bound(None) == tasks
    })
    .await?;
    let spread_at_bound = spread(&tracker.loads(), &live);
    let loads = verify_bindings(&nats, tasks, &live).await?;
    ensure!(
        loads.values().sum::<usize>() == tasks,
        "loads {loads:?} do not add up to {tasks}"
    );
    let result = Claims {
        stored: (stored - t0).as_secs_f64(),
        all_bound: (bound - t0).as_secs_f64(),
        bound_after_stored: (bound - stored).as_secs_f64(),
        spread: spread_at_bound,
    };
    let mut per_worker: Vec<usize> = loads.values().copied().collect();
    per_worker.sort_unstable();
    eprintln!(
        "  claims {tasks} over {n_workers}: stored {:.2} s, all bound {:.2} s (+{:.2} s), spread {:.3}, per worker {per_worker:?}",
        result.stored, result.all_bound, result.bound_after_stored, result.spread
    );
    drop(procs);
    Ok(result)
}

/// `tasks` tasks on `n_workers` workers with `--claim-ttl ttl --heartbeat hb`;
/// `kill -9` one: seconds until every task is bound to a live worker again.
pub(crate) async fn failover(
    tasks: usize,
    n_workers: usize,
    ttl: u64,
    hb: u64,
    limit: Duration,
) -> anyhow::Result<f64> {
    let server = Server::start().await?;
    server
        .scenario(
            &format!("failover-ttl{ttl}"),
            failover_on(&server, tasks, n_workers, (ttl, hb), limit),
        )
        .await
}

async fn failover_on(
    server: &Server,
    tasks: usize,
    n_workers: usize,
    (ttl, hb): (u64, u64),
    limit: Duration,
) -> anyhow::Result<f64> {
    let nats = server.connect().await?;
    let tracker = Tracker::start(&nats).await?;
    let (ttl_s, hb_s) = (format!("{ttl}s"), format!("{hb}s"));
    let args = ["--claim-ttl", &ttl_s, "--heartbeat", &hb_s];
    let (mut procs, ids) = workers(server, &nats, n_workers, &args, "failover").await?;
    publish_creates(&nats, 0, tasks, WINDOW).await?;
    // Bound and balanced: every worker holds its share.
    let share = tasks / n_workers;
    wait_or_explain("all bound and balanced", limit, &nats, &tracker, || {
        let loads = tracker.loads();
        loads.values().sum::<usize>() == tasks
            && ids
                .iter()
                .all(|w| loads.get(w).is_some_and(|l| *l + 1 >= share))
    })
    .await?;
    let victim = ids[0].clone();
    let held = tracker.loads().get(&victim).copied().unwrap_or(0);
    let live: HashSet<String> = ids[1..].iter().cloned().collect();

    let t = Instant::now();
    procs[0].kill9();
    let back = wait_or_explain(
        "every task bound to a live worker",
        Duration::from_secs(ttl + hb) + limit,
        &nats,
        &tracker,
        || tracker.bound(Some(&live)) == tasks,
    )
    .await?;
    let secs = (back - t).as_secs_f64();
    verify_bindings(&nats, tasks, &live).await?;
    eprintln!(
        "  fail-over ({tasks} tasks, {n_workers} workers, ttl {ttl}s, hb {hb}s): killed one holding {held}, all back in {secs:.2} s"
    );
    drop(procs);
    Ok(secs)
}

/// One worker's resident memory.
#[derive(Debug)]
pub(crate) struct Memory {
    /// Idle, KiB (samples).
    pub(crate) idle: Vec<f64>,
    /// Holding every task, KiB (samples).
    pub(crate) loaded: Vec<f64>,
    /// Seconds from creation start until the lone worker held them all.
    pub(crate) all_bound: f64,
}

async fn rss_samples(p: &BmwProc, n: usize, every: Duration) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(p.rss_kib()?);
        tokio::time::sleep(every).await;
    }
    Ok(out)
}

/// One worker (default settings): VmRSS idle, then holding `tasks` idle
/// daemon tasks.
pub(crate) async fn memory(
    tasks: usize,
    samples: usize,
    limit: Duration,
) -> anyhow::Result<Memory> {
    let server = Server::start().await?;
    server
        .scenario("memory", memory_on(&server, tasks, samples, limit))
        .await
}

async fn memory_on(
    server: &Server,
    tasks: usize,
    samples: usize,
    limit: Duration,
) -> anyhow::Result<Memory> {
    let nats = server.connect().await?;
    let tracker = Tracker::start(&nats).await?;
    let (procs, ids) = workers(server, &nats, 1, &[], "memory").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_samples(&procs[0], 3, Duration::from_millis(500)).await?;
    let t0 = Instant::now();
    publish_creates(&nats, 0, tasks, WINDOW).await?;
    let bound = wait_or_explain("all tasks bound", limit, &nats, &tracker, || {
        tracker.bound(None) == tasks
    })
    .await?;
    let live: HashSet<String> = ids.into_iter().collect();
    verify_bindings(&nats, tasks, &live).await?;
    // Over one heartbeat (5 s): a round of renewals and of the demo's prints.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = rss_samples(&procs[0], samples, Duration::from_secs(1)).await?;
    let all_bound = (bound - t0).as_secs_f64();
    eprintln!(
        "  memory: idle {idle:?} KiB, with {tasks} tasks {loaded:?} KiB (all bound in {all_bound:.2} s)"
    );
    drop(procs);
    Ok(Memory {
        idle,
        loaded,
        all_bound,
    })
}
