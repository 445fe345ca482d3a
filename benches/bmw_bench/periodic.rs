//! Tick accuracy of periodic tasks: a `* * * * * *` cron schedule (every
//! second, fired by nats-server) run by one worker for a bounded number of
//! ticks. Each tick's lateness is the time its `enqueued` event was stamped
//! by the worker minus the whole second it was due (the second of the
//! server's `fired_at`, which is never early).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, ensure};
use chrono::{DateTime, Utc};
use futures::StreamExt;

use crate::env::{BmwProc, Server, wait_for, wait_workers};

fn time(v: &serde_json::Value) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Lateness of each of `ticks` ticks after its due second, in ms.
pub(crate) async fn tick_lateness(server: &Server, ticks: usize) -> anyhow::Result<Vec<f64>> {
    let nats = server.connect().await?;
    let seen: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut sub = nats
        .client
        .subscribe("bmw.event.periodic.periodic:demo:tick.enqueued")
        .await?;
    nats.client.flush().await?;
    let sink = seen.clone();
    let follower = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
                continue;
            };
            let Some(stamped) = time(&v["time"]) else {
                continue;
            };
            let due = time(&v["fired_at"]).unwrap_or(stamped);
            let due_second = due.timestamp() as f64;
            let late = stamped.timestamp_micros() as f64 / 1000.0 - due_second * 1000.0;
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(late);
        }
    });
    let mut procs = vec![BmwProc::spawn(
        "worker",
        server.url(),
        &[],
        server.dir(),
        "periodic",
    )?];
    wait_workers(&nats, &mut procs).await?;
    let client = bmw::client::TaskClient::new(
        nats.clone(),
        Arc::new(bmw::builtin::registry()),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    let body =
        serde_json::json!({"kind": "periodic:demo:tick", "options": {"cron": "* * * * * *"}});
    client
        .submit_json("bmw.task.create", body.to_string().as_bytes())
        .await
        .map_err(|e| anyhow!("periodic create: {e}"))?;
    let count = || seen.lock().unwrap_or_else(|e| e.into_inner()).len();
    let limit = Duration::from_secs(ticks as u64 + 10);
    let waited = wait_for(&format!("{ticks} ticks"), limit, || count() >= ticks).await;
    follower.abort();
    let delete = serde_json::json!({"task_type": "periodic", "kind": "periodic:demo:tick"});
    let deleted = client
        .submit_json("bmw.task.delete", delete.to_string().as_bytes())
        .await;
    waited?;
    deleted.map_err(|e| anyhow!("periodic delete: {e}"))?;
    ensure!(
        procs[0].alive(),
        "the worker exited:\n{}",
        procs[0].log_tail()
    );
    drop(procs);
    let mut late = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    late.truncate(ticks);
    Ok(late)
}
