//! Figure 3: `POST /bmw/task/` under 64 concurrent loopback connections
//! against a `bmw run` process (bridge + worker), daemon creates with
//! distinct payloads. Each request is answered once a worker has stored the
//! spec (200); the tasks go to a queue no worker listens on (`bench`), so
//! the figure is the request path and not the claiming of thousands of new
//! tasks by the same process on the same two cores.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::env::{BmwProc, Server, Tracker, wait_for, wait_workers};
use crate::report::{Samples, percentile};

/// Concurrent connections.
pub(crate) const CONNECTIONS: usize = 64;

/// One sample per run.
#[derive(Debug, Default)]
pub(crate) struct Bridge {
    /// Requests/s.
    pub(crate) rate: Samples,
    /// p50 latency, ms.
    pub(crate) p50: Samples,
    /// p99 latency, ms.
    pub(crate) p99: Samples,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Sends `count` creates numbered from `first` over [`CONNECTIONS`]
/// connections; returns the elapsed time and every latency (ms).
async fn load(
    http: &reqwest::Client,
    url: &str,
    first: usize,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<(Duration, Vec<f64>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + timeout;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (http, url, next) = (http.clone(), url.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(lat);
                }
                if Instant::now() > deadline {
                    bail!("bridge load did not finish within {timeout:?}");
                }
                let body = serde_json::json!({
                    "kind": "daemon:demo:demo",
                    "payload": {"content": "ok", "n": first + i},
                    "options": {"queue": "bench"},
                });
                let t = Instant::now();
                let response = http.post(&url).json(&body).send().await?;
                let status = response.status().as_u16();
                let envelope: serde_json::Value = response.json().await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                ensure!(
                    status == 200 && envelope["result"] == true,
                    "request {i}: {status} {envelope}"
                );
            }
        }));
    }
    let mut all = Vec::with_capacity(count);
    for task in tasks {
        all.extend(task.await??);
    }
    ensure!(all.len() == count, "{} of {count} requests", all.len());
    Ok((t.elapsed(), all))
}

/// `runs` runs of `count` requests each (plus one warm-up of 64).
pub(crate) async fn run(server: &Server, count: usize, runs: usize) -> anyhow::Result<Bridge> {
    server.scenario("bridge", run_on(server, count, runs)).await
}

async fn run_on(server: &Server, count: usize, runs: usize) -> anyhow::Result<Bridge> {
    let nats = server.connect().await?;
    let tracker = Tracker::start(&nats).await?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut proc = [BmwProc::spawn(
        "run",
        server.url(),
        &["--http-addr", &addr],
        server.dir(),
        "bridge",
    )?];
    wait_workers(&nats, &mut proc).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = format!("http://{addr}");
    let up = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("{base}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > up {
            bail!("bridge not ready; log:\n{}", proc[0].log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("{base}/bmw/task/");
    let timeout = Duration::from_secs(60);
    let mut sent = CONNECTIONS;
    load(&http, &url, 0, CONNECTIONS, timeout)
        .await
        .context("warm-up")?;
    let mut out = Bridge::default();
    for run in 0..runs {
        let (elapsed, mut lat) = load(&http, &url, sent, count, timeout)
            .await
            .with_context(|| format!("bridge log:\n{}", proc[0].log_tail()))?;
        sent += count;
        out.rate.push(count as f64 / elapsed.as_secs_f64());
        out.p50.push(percentile(&mut lat, 50.0));
        out.p99.push(percentile(&mut lat, 99.0));
        eprintln!(
            "  bridge run {}: {:.0} req/s, p50 {:.1} ms, p99 {:.1} ms",
            run + 1,
            out.rate.0[run],
            out.p50.0[run],
            out.p99.0[run]
        );
    }
    // Every answered create is a stored spec, each payload a distinct task.
    wait_for("every created spec in the bucket", timeout, || {
        tracker.specs() == sent
    })
    .await
    .with_context(|| format!("{} specs stored, {sent} created", tracker.specs()))?;
    Ok(out)
}
