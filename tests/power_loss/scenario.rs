//! One power-loss scenario: a nats-server whose store is on a [`LazyFs`],
//! a `bmw bridge` and a `bmw worker`, a load of creates on every producer
//! path (the bridge, its batch route, `bmw.task.create`, a raw publish on
//! `bmw.async.<queue>.<id>`, daemon and periodic creates); at a random
//! moment the power goes (the unsynced data dropped, every process
//! `kill -9`'d); everything starts again on what is left, and every
//! acknowledged create is looked for.
//!
//! The async tasks go to a queue no worker takes, so each must still be
//! there, pending, afterwards: a task that ran would prove nothing.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use bmw::client::TaskClient;
use bmw::nats::Nats;
use bmw::nats::local::{LocalServer, LocalServerOptions, StoreSync};
use bmw::nats::names;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, nats_server_binary};
use crate::lazyfs::LazyFs;

/// The queue the async creates go to: no worker takes it.
const HELD: &str = "held";

/// What was acknowledged, by producer path: the ids to find afterwards.
#[derive(Default, Debug)]
pub(crate) struct Acknowledged {
    /// Path name -> async task ids.
    pub(crate) tasks: BTreeMap<&'static str, Vec<String>>,
    /// Daemon uni_ids answered 2xx.
    pub(crate) daemons: Vec<String>,
    /// Periodic kinds answered 2xx.
    pub(crate) periodic: Vec<String>,
}

/// What one run found.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) sync: String,
    pub(crate) power_loss_after: Duration,
    /// Path name -> (acknowledged, lost).
    pub(crate) paths: BTreeMap<&'static str, (usize, usize)>,
    pub(crate) dropped_bytes: u64,
    pub(crate) synced_bytes: u64,
}

impl Outcome {
    pub(crate) fn lost(&self) -> usize {
        self.paths.values().map(|(_, lost)| lost).sum()
    }

    /// A Markdown row: mode, moment, then acknowledged/lost per path.
    pub(crate) fn row(&self) -> String {
        let paths: Vec<String> = self
            .paths
            .iter()
            .map(|(path, (acked, lost))| format!("{path}: {lost} of {acked} lost"))
            .collect();
        format!(
            "| {} | {:.1} s | {} | {} | {} KiB ({} KiB synced before) |",
            self.sync,
            self.power_loss_after.as_secs_f64(),
            paths.join(", "),
            self.lost(),
            self.dropped_bytes / 1024,
            self.synced_bytes / 1024
        )
    }
}

/// A random duration in `[from, to)`, printed so a failure can be rerun.
fn random_between(from: Duration, to: Duration) -> Duration {
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let span = (to - from).as_millis() as u64;
    from + Duration::from_millis(seed % span.max(1))
}

/// Mounts the lazy filesystem or fails with the reason FUSE is unusable here.
pub(crate) fn mount(backing: &Path, mountpoint: &Path) -> LazyFs {
    LazyFs::mount(backing, mountpoint).unwrap_or_else(|e| {
        panic!(
            "cannot mount the test filesystem at {} (FUSE: /dev/fuse and fuse3, \
             installed by scripts/fuse-env): {e}",
            mountpoint.display()
        )
    })
}

/// One node on `port`, or a cluster of `nodes`, with their stores under `store`.
async fn servers(store: &Path, sync: StoreSync, nodes: usize) -> Vec<LocalServer> {
    if nodes > 1 {
        return crate::harness::NatsCluster::start_nodes(store, nodes, Some(sync))
            .await
            .0;
    }
    let binary = tokio::task::spawn_blocking(nats_server_binary)
        .await
        .unwrap();
    let options = LocalServerOptions {
        store_dir: store.to_owned(),
        port: crate::harness::free_port(),
        extra_args: vec![],
        binary: Some(binary),
        sync: Some(sync),
    };
    let server = LocalServer::start(options, store)
        .await
        .expect("nats-server starts on the lazy filesystem");
    vec![server]
}

/// The bridge and a worker that takes `default` only (never `held`).
async fn bmw_processes(url: &str, replicas: &str) -> (BmwProcess, BmwProcess) {
    let worker = BmwProcess::worker(url, &["--queues", "default", "--replicas", replicas]);
    worker.worker_id().await;
    let bridge = BmwProcess::bridge(url, &["--replicas", replicas]).await;
    (bridge, worker)
}

/// Runs the load until stopped; what was acknowledged is in `acked`.
fn start_load(
    base_url: String,
    js: async_nats::jetstream::Context,
    acked: Arc<Mutex<Acknowledged>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut loops = Vec::new();
    // The bridge, one create per request.
    let (h, b, a) = (http.clone(), base_url.clone(), acked.clone());
    loops.push(tokio::spawn(async move {
        for n in 0..5000 {
            let id = format!("bridge-{n}");
            let body = json!({"kind": "async:demo:echo", "payload": {"n": n},
                              "options": {"queue": HELD, "task_id": id}});
            if post(&h, &format!("{b}/bmw/task/"), &body).await.is_some() {
                a.lock()
                    .unwrap()
                    .tasks
                    .entry("bridge")
                    .or_default()
                    .push(id);
            }
        }
    }));
    // The batch route, 20 per request.
    let (h, b, a) = (http.clone(), base_url.clone(), acked.clone());
    loops.push(tokio::spawn(async move {
        for n in 0..500 {
            let ids: Vec<String> = (0..20).map(|i| format!("batch-{n}-{i}")).collect();
            let body: Vec<Value> = ids
                .iter()
                .map(|id| {
                    json!({"kind": "async:demo:echo", "payload": {},
                                 "options": {"queue": HELD, "task_id": id}})
                })
                .collect();
            let Some(envelope) = post(&h, &format!("{b}/bmw/task/batch"), &json!(body)).await
            else {
                continue;
            };
            let items = envelope["data"].as_array().cloned().unwrap_or_default();
            let mut a = a.lock().unwrap();
            for (id, item) in ids.iter().zip(items) {
                if item["result"] == true {
                    a.tasks.entry("batch").or_default().push(id.clone());
                }
            }
        }
    }));
    // Commands on bmw.task.create, acknowledged by the stream.
    let (j, a) = (js.clone(), acked.clone());
    loops.push(tokio::spawn(async move {
        for n in 0..5000 {
            let id = format!("command-{n}");
            let body = json!({"kind": "async:demo:echo", "payload": {"n": n},
                              "options": {"queue": HELD, "task_id": id}});
            let publish = PublishMessage::build()
                .payload(bmw::nats::to_json_bytes(&body))
                .message_id(id.as_str());
            if let Ok(ack) = j.send_publish(names::SUBJECT_CREATE, publish).await
                && ack.await.is_ok()
            {
                a.lock()
                    .unwrap()
                    .tasks
                    .entry("command")
                    .or_default()
                    .push(id);
            }
        }
    }));
    // Raw publishes of task messages on bmw.async.<queue>.<id>.
    let (j, a) = (js.clone(), acked.clone());
    loops.push(tokio::spawn(async move {
        for n in 0..5000 {
            let id = format!("raw-{n}");
            let message = json!({"id": id, "kind": "async:demo:echo", "payload": {"n": n},
                                 "options": {"queue": HELD}});
            let publish = PublishMessage::build()
                .payload(bmw::nats::to_json_bytes(&message))
                .message_id(id.as_str());
            let subject = names::async_subject(HELD, &id);
            if let Ok(ack) = j.send_publish(subject, publish).await
                && ack.await.is_ok()
            {
                a.lock()
                    .unwrap()
                    .tasks
                    .entry("raw publish")
                    .or_default()
                    .push(id);
            }
        }
    }));
    // Daemon creates, and one periodic create, through the bridge.
    let (h, b, a) = (http, base_url, acked);
    loops.push(tokio::spawn(async move {
        let periodic = json!({"kind": "periodic:demo:tick", "payload": {},
                              "options": {"every": "1h", "queue": HELD}});
        if post(&h, &format!("{b}/bmw/task/"), &periodic)
            .await
            .is_some()
        {
            a.lock().unwrap().periodic.push("periodic:demo:tick".into());
        }
        for n in 0..1000 {
            let body = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": n}});
            if let Some(envelope) = post(&h, &format!("{b}/bmw/task/"), &body).await
                && let Some(uni_id) = envelope["data"]["uni_id"].as_str()
            {
                a.lock().unwrap().daemons.push(uni_id.to_owned());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }));
    loops
}

/// The envelope of a 2xx answer, `None` for anything else.
async fn post(http: &reqwest::Client, url: &str, body: &Value) -> Option<Value> {
    let response = http
        .post(url)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// Runs the scenario with one node (`nodes` 1) or a cluster whose stores
/// are all on one lazy filesystem under `dir`: every node loses power at once.
pub(crate) async fn run(dir: &Path, sync: StoreSync, nodes: usize) -> Outcome {
    let (backing, mountpoint) = (dir.join("backing"), dir.join("mnt"));
    let fs = mount(&backing, &mountpoint);
    let mut servers = servers(&mountpoint.join("store"), sync, nodes).await;
    let url = servers
        .iter()
        .map(|s| s.url().to_owned())
        .collect::<Vec<_>>()
        .join(",");
    let replicas = if nodes > 1 { "3" } else { "1" };
    let nats = Nats::connect(&url, "bmw-power-loss").await.unwrap();
    let settings = bmw::nats::provision::Settings::new(if nodes > 1 { 3 } else { 1 });
    let provisioned = crate::harness::wait_until(Duration::from_secs(30), async || {
        bmw::nats::provision::provision(&nats.js, &settings)
            .await
            .is_ok()
    })
    .await;
    assert!(provisioned, "the streams are provisioned");
    let (mut bridge, mut worker) = bmw_processes(&url, replicas).await;

    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let started = Instant::now();
    let loops = start_load(bridge.base_url(), nats.js.clone(), acked.clone());
    let moment = random_between(Duration::from_millis(1500), Duration::from_millis(3500));
    tokio::time::sleep(moment).await;
    // The power goes: unsynced data first, then every process at once.
    let dropped = fs.power_loss();
    for server in &mut servers {
        server.kill().await;
    }
    bridge.kill9();
    worker.kill9();
    for l in &loops {
        l.abort();
    }
    let power_loss_after = started.elapsed();
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    drop(nats);
    fs.unmount().expect("unmount");

    // The machine (or every machine) comes back.
    let fs = mount(&backing, &mountpoint);
    let restarts = servers.iter_mut().map(LocalServer::restart);
    for restarted in futures::future::join_all(restarts).await {
        restarted.expect("nats-server restarts");
    }
    let (bridge, worker) = bmw_processes(&url, replicas).await;
    let nats = Nats::connect(&url, "bmw-power-loss").await.unwrap();
    let client = TaskClient::new(
        nats.clone(),
        Arc::new(bmw::builtin::registry()),
        Duration::from_secs(5),
    )
    .await
    .expect("client");

    let paths = account(&nats, &client, &acked).await;
    drop(client);
    let outcome = Outcome {
        sync: sync.to_string(),
        power_loss_after,
        paths,
        dropped_bytes: dropped.bytes,
        synced_bytes: dropped.synced_bytes,
    };
    drop((bridge, worker));
    for server in &mut servers {
        server.kill().await;
    }
    fs.unmount().expect("unmount");
    outcome
}

/// Looks for every acknowledged create, waiting (while more keep turning
/// up, 45 s after the last, at most 120 s) for the commands the worker applies after the restart:
/// an async task is there when its message is in `BMW_ASYNC` (the queue is
/// never taken), a daemon or periodic task when it is listed.
async fn account(
    nats: &Nats,
    client: &TaskClient,
    acked: &Acknowledged,
) -> BTreeMap<&'static str, (usize, usize)> {
    let mut missing: BTreeMap<&'static str, Vec<String>> = acked.tasks.clone();
    missing.insert("daemon", acked.daemons.clone());
    missing.insert("periodic", acked.periodic.clone());
    let counts: BTreeMap<&'static str, usize> = missing
        .iter()
        .map(|(path, ids)| (*path, ids.len()))
        .collect();
    let mut last_change = Instant::now();
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let before: usize = missing.values().map(Vec::len).sum();
        let found = present(nats, client).await;
        for ids in missing.values_mut() {
            ids.retain(|id| !found.contains(id));
        }
        let after: usize = missing.values().map(Vec::len).sum();
        if after < before {
            last_change = Instant::now();
        }
        // Commands a worker had fetched come again after the consumer's ack
        // wait (30 s): wait past it before calling anything lost.
        if after == 0 || last_change.elapsed() > Duration::from_secs(45) || Instant::now() > until {
            break;
        }
        // A poll interval: the worker applies the kept commands meanwhile.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (path, ids) in &missing {
        if !ids.is_empty() {
            eprintln!(
                "power loss: {path}: {} lost, e.g. {:?}",
                ids.len(),
                &ids[..ids.len().min(5)]
            );
        }
    }
    counts
        .into_iter()
        .map(|(path, n)| (path, (n, missing[path].len())))
        .collect()
}

/// Every task id pending on the held queue, daemon uni_id and periodic kind there is now.
async fn present(nats: &Nats, client: &TaskClient) -> std::collections::HashSet<String> {
    use futures::TryStreamExt;
    let mut found = std::collections::HashSet::new();
    let prefix = names::async_subject(HELD, "");
    if let Ok(stream) = nats.js.get_stream(names::STREAM_ASYNC).await
        && let Ok(info) = stream.info_with_subjects(format!("{prefix}>")).await
        && let Ok(subjects) = info.try_collect::<Vec<(String, usize)>>().await
    {
        found.extend(
            subjects
                .into_iter()
                .filter_map(|(s, _)| s.strip_prefix(&prefix).map(str::to_owned)),
        );
    }
    if let Ok(rows) = client.list_daemon().await {
        found.extend(rows.into_iter().map(|r| r.uni_id));
    }
    if let Ok(rows) = client.list_periodic().await {
        found.extend(
            rows.iter()
                .filter_map(|r| r["kind"].as_str().map(str::to_owned)),
        );
    }
    found
}
