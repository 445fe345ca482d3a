//! The bench's world: a nats-server per scenario (free loopback port,
//! temporary file store, killed on drop), `bmw` child processes (killed on
//! drop, so also on panic), a tracker of daemon specs and claims fed by KV
//! watches, and small helpers (waiting with deadlines, resident memory).

use std::collections::{HashMap, HashSet};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream::kv;
use bmw::nats::local::{LocalServer, LocalServerOptions, StoreSync};
use bmw::nats::{Nats, names};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

/// The pinned nats-server, installed (once) by `nats/install.sh`.
pub(crate) fn nats_server_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    if let Some(b) = BINARY.get() {
        return Ok(b.clone());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("nats/install.sh");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .context("running nats/install.sh")?;
    if !out.status.success() {
        bail!(
            "nats/install.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    Ok(BINARY.get_or_init(|| path).clone())
}

/// `nats-server --version`.
pub(crate) fn nats_server_version() -> String {
    nats_server_binary()
        .ok()
        .and_then(|b| Command::new(b).arg("--version").output().ok())
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            text.trim_start_matches("nats-server: ").to_owned()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A nats-server with JetStream (file storage) on a free loopback port.
pub(crate) struct Server {
    server: LocalServer,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts one with nats-server's default store sync (every 2 minutes).
    pub(crate) async fn start() -> anyhow::Result<Server> {
        Server::start_sync(None).await
    }

    /// Starts one whose store syncs as `sync` says (figure 9).
    pub(crate) async fn start_with(sync: StoreSync) -> anyhow::Result<Server> {
        Server::start_sync(Some(sync)).await
    }

    async fn start_sync(sync: Option<StoreSync>) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new().prefix("bmw-bench-").tempdir()?;
        let binary = tokio::task::spawn_blocking(nats_server_binary).await??;
        let options = LocalServerOptions {
            store_dir: dir.path().join("store"),
            port: 0,
            extra_args: vec![],
            binary: Some(binary),
            sync,
        };
        let server = LocalServer::start(options, dir.path())
            .await
            .context("nats-server start")?;
        Ok(Server { server, dir })
    }

    pub(crate) fn url(&self) -> &str {
        self.server.url()
    }

    /// A directory for this scenario's logs.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Copies this scenario's process logs to the target directory (they are
    /// lost with the temporary directory otherwise); returns where.
    pub(crate) fn keep_logs(&self, label: &str) -> PathBuf {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
        let to = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("bmw_bench")
            .join(format!("{label}-{stamp}"));
        let _ = std::fs::create_dir_all(&to);
        if let Ok(entries) = std::fs::read_dir(self.dir()) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let _ = std::fs::copy(e.path(), to.join(e.file_name()));
                }
            }
        }
        to
    }

    /// Runs a scenario on this server; on failure keeps the logs and says where.
    pub(crate) async fn scenario<T>(
        &self,
        label: &str,
        f: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        match f.await {
            Ok(v) => Ok(v),
            Err(e) => {
                let at = self.keep_logs(label);
                Err(e.context(format!("{label} failed; process logs in {}", at.display())))
            }
        }
    }

    /// A bmw connection with the streams and buckets provisioned.
    pub(crate) async fn connect(&self) -> anyhow::Result<Nats> {
        let nats = Nats::connect(self.url(), "bmw-bench").await?;
        bmw::nats::provision::provision(&nats.js, &bmw::nats::provision::Settings::new(1)).await?;
        Ok(nats)
    }
}

/// A `bmw` child process: stdout to /dev/null (the demo daemon prints every
/// 5 s per task), stderr to a log file; `kill -9` on drop.
pub(crate) struct BmwProc {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl BmwProc {
    /// Starts `bmw <role> --demo-kinds --nats-url <url> <args>`.
    pub(crate) fn spawn(
        role: &str,
        url: &str,
        args: &[&str],
        dir: &Path,
        name: &str,
    ) -> anyhow::Result<BmwProc> {
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log)?;
        // BMW_BENCH_WRAP="heaptrack" (or "valgrind --tool=callgrind") profiles
        // the bmw processes.
        let wrap: Vec<String> = std::env::var("BMW_BENCH_WRAP")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let mut command = match wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_bmw"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_bmw")),
        };
        // If the bench itself is killed (SIGKILL, no destructors), the kernel
        // kills the worker too. Spawned from a runtime thread that lives as
        // long as the bench, so the signal does not fire early.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // Every figure runs the demo kinds (`async:demo:noop`, `daemon:demo:demo`).
        let child = command
            .arg(role)
            .arg("--demo-kinds")
            .args(["--nats-url", url])
            .args(args)
            .current_dir(dir)
            .env("BMW_LOG", "info,async_nats=warn")
            // Several workers on this host: none takes the default metrics port.
            .env("BMW_METRICS_ADDR", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("spawning bmw")?;
        Ok(BmwProc {
            pid: child.id(),
            child: Some(child),
            log,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// `kill -9` and reap.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.pid != child.id() {
                // The bmw process under a BMW_BENCH_WRAP profiler.
                // SAFETY: plain kill(2) on a pid we started (through the wrapper).
                unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether it still runs.
    pub(crate) fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last lines of its log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Resident memory in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub(crate) fn rss_kib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS line")?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("VmRSS value")?
            .parse()?;
        Ok(kib)
    }
}

impl Drop for BmwProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes; returns
/// when it held.
pub(crate) async fn wait_for(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until `n` workers are registered in `bmw_workers`; returns
/// their ids by pid.
pub(crate) async fn wait_workers(
    nats: &Nats,
    procs: &mut [BmwProc],
) -> anyhow::Result<HashMap<u32, String>> {
    let kv = nats.js.get_key_value(names::BUCKET_WORKERS).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries: HashMap<String, bmw::membership::WorkerEntry> =
            bmw::nats::read_all(&kv).await.map_err(anyhow::Error::msg)?;
        let ids: HashMap<u32, String> = entries
            .into_values()
            .map(|w| (w.pid, w.worker_id))
            .collect();
        // Under BMW_BENCH_WRAP the registered pid is a descendant of ours.
        for p in procs.iter_mut() {
            if let Some(pid) = ids.keys().find(|pid| descends_from(**pid, p.pid)) {
                p.pid = *pid;
            }
        }
        if procs.iter().all(|p| ids.contains_key(&p.pid())) {
            return Ok(ids);
        }
        for p in procs.iter_mut() {
            if !p.alive() {
                bail!("bmw {} exited; log:\n{}", p.pid(), p.log_tail());
            }
        }
        if Instant::now() > deadline {
            bail!("workers did not register within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `pid` is `ancestor` or one of its descendants (by `/proc/<pid>/stat`).
fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..8 {
        if pid == ancestor {
            return true;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // "pid (comm) state ppid ...": the comm may hold spaces, so split after ')'.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            return false;
        };
        pid = ppid;
    }
    false
}

/// Publishes `n` create commands of `daemon:demo:demo` (payload
/// `{"content":"ok","n":first+i}`) on `bmw.task.create` with a window of
/// outstanding acks; returns when every ack arrived.
pub(crate) async fn publish_creates(
    nats: &Nats,
    first: usize,
    n: usize,
    window: usize,
) -> anyhow::Result<()> {
    let mut pending = FuturesUnordered::new();
    for i in first..first + n {
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::json!({
            "id": id,
            "kind": "daemon:demo:demo",
            "payload": {"content": "ok", "n": i},
        });
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(&body)?.into())
            .message_id(&id);
        let ack = nats.js.send_publish(names::SUBJECT_CREATE, publish).await?;
        pending.push(ack.into_future());
        while pending.len() >= window {
            pending.next().await.context("ack")??;
        }
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    Ok(())
}

/// What the watches have seen. `loads` is kept as entries arrive, so a
/// scenario polling it every 10 ms costs nothing next to the workers it
/// measures (counting 100,000 keys at each poll took a third of a core).
#[derive(Default)]
struct Tracked {
    specs: HashSet<String>,
    /// Held claims: key -> worker_id.
    claims: HashMap<String, String>,
    /// Per worker, the specs it holds a claim on.
    loads: HashMap<String, usize>,
}

impl Tracked {
    fn count(&mut self, key: &str, delta: isize) {
        if let Some(worker) = self.claims.get(key) {
            let load = self.loads.entry(worker.clone()).or_insert(0);
            *load = load.saturating_add_signed(delta);
        }
    }

    fn set_claim(&mut self, key: String, holder: Option<String>) {
        let spec = self.specs.contains(&key);
        if spec {
            self.count(&key, -1);
        }
        match holder {
            Some(worker) => self.claims.insert(key.clone(), worker),
            None => self.claims.remove(&key),
        };
        if spec {
            self.count(&key, 1);
        }
    }

    fn set_spec(&mut self, key: String, present: bool) {
        if present {
            if !self.specs.contains(&key) {
                self.count(&key, 1);
                self.specs.insert(key);
            }
        } else if self.specs.remove(&key) {
            self.count(&key, -1);
        }
    }

    /// Forgets one watch's side; with it, every binding (a load counts
    /// specs and claims both seen).
    fn clear(&mut self, claims: bool) {
        if claims {
            self.claims.clear();
        } else {
            self.specs.clear();
        }
        self.loads.clear();
    }
}

/// Follows `bmw_daemon_tasks` and `bmw_daemon_claims` with KV watches, so a
/// scenario can look at "which task is bound to whom" every few ms without
/// reading 10,000 keys each time.
pub(crate) struct Tracker {
    state: Arc<Mutex<Tracked>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(serde::Deserialize)]
struct ClaimHolder {
    worker_id: String,
}

impl Tracker {
    pub(crate) async fn start(nats: &Nats) -> anyhow::Result<Tracker> {
        let state = Arc::new(Mutex::new(Tracked::default()));
        let mut tasks = Vec::new();
        for (bucket, is_claims) in [
            (names::BUCKET_DAEMON_TASKS, false),
            (names::BUCKET_DAEMON_CLAIMS, true),
        ] {
            let kv = nats.js.get_key_value(bucket).await?;
            let mut watch = kv.watch_with_history(">").await?;
            let state = state.clone();
            tasks.push(tokio::spawn(async move {
                // Bounded: a watch that keeps failing is given up after 100
                // restarts, and the scenario then times out with a message.
                let mut errors = 0_u64;
                for _ in 0..100 {
                    while let Some(entry) = watch.next().await {
                        match entry {
                            Ok(entry) => apply(&state, is_claims, entry),
                            Err(e) => {
                                errors += 1;
                                if errors <= 5 {
                                    eprintln!("  tracker: watch of {bucket}: {e}");
                                }
                            }
                        }
                    }
                    // The watch ended (its ordered consumer could not be
                    // recreated): start over from the current values.
                    eprintln!("  tracker: watch of {bucket} ended; re-reading it");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let Ok(w) = kv.watch_with_history(">").await else {
                        continue;
                    };
                    watch = w;
                    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                    s.clear(is_claims);
                }
            }));
        }
        Ok(Tracker { state, tasks })
    }

    fn with<T>(&self, f: impl FnOnce(&Tracked) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Specs stored.
    pub(crate) fn specs(&self) -> usize {
        self.with(|s| s.specs.len())
    }

    /// Specs bound to a worker (of `live`, when given).
    pub(crate) fn bound(&self, live: Option<&HashSet<String>>) -> usize {
        self.with(|s| {
            s.loads
                .iter()
                .filter(|(w, _)| live.is_none_or(|l| l.contains(*w)))
                .map(|(_, n)| n)
                .sum()
        })
    }

    /// Tasks per worker (workers that hold none left out).
    pub(crate) fn loads(&self) -> HashMap<String, usize> {
        self.with(|s| {
            s.loads
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(w, n)| (w.clone(), *n))
                .collect()
        })
    }
}

fn apply(state: &Mutex<Tracked>, is_claims: bool, entry: kv::Entry) {
    let put = entry.operation == kv::Operation::Put;
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    if is_claims {
        let holder = put
            .then(|| serde_json::from_slice::<ClaimHolder>(&entry.value).ok())
            .flatten()
            .map(|c| c.worker_id)
            .filter(|w| !w.is_empty());
        s.set_claim(entry.key, holder);
    } else {
        s.set_spec(entry.key, put);
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Checks with bmw's own listing (`TaskClient::list_daemon`) that exactly `n`
/// daemon tasks exist and each is bound to one of `live`. A listing taken
/// while a task moves between workers (released by one to rebalance, not yet
/// claimed by the other) is taken again, for up to 10 s.
pub(crate) async fn verify_bindings(
    nats: &Nats,
    n: usize,
    live: &HashSet<String>,
) -> anyhow::Result<HashMap<String, usize>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match list_bindings(nats, n, live).await {
            Err(e) if Instant::now() < deadline => {
                eprintln!("  listing not settled yet ({e}); looking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            done => return done,
        }
    }
}

async fn list_bindings(
    nats: &Nats,
    n: usize,
    live: &HashSet<String>,
) -> anyhow::Result<HashMap<String, usize>> {
    let registry = Arc::new(bmw::builtin::registry());
    let client = bmw::client::TaskClient::new(nats.clone(), registry, Duration::from_secs(5))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let rows = client
        .list_daemon()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if rows.len() != n {
        bail!("list_daemon shows {} tasks, expected {n}", rows.len());
    }
    let mut loads = HashMap::new();
    for row in &rows {
        if !live.contains(&row.binding.worker_id) {
            bail!(
                "task {} is bound to {:?}, not to a live worker",
                row.uni_id,
                row.binding.worker_id
            );
        }
        *loads.entry(row.binding.worker_id.clone()).or_insert(0) += 1;
    }
    Ok(loads)
}

/// What bmw's own listing shows: tasks, how many bound, load per worker.
pub(crate) async fn listing_summary(nats: &Nats) -> String {
    let registry = Arc::new(bmw::builtin::registry());
    let client =
        match bmw::client::TaskClient::new(nats.clone(), registry, Duration::from_secs(5)).await {
            Ok(c) => c,
            Err(e) => return format!("list_daemon unavailable: {e}"),
        };
    match client.list_daemon().await {
        Ok(rows) => {
            let mut loads: HashMap<String, usize> = HashMap::new();
            for r in &rows {
                *loads.entry(r.binding.worker_id.clone()).or_insert(0) += 1;
            }
            let free = loads.remove("").unwrap_or(0);
            format!(
                "list_daemon: {} tasks, {free} unbound, per worker {:?}",
                rows.len(),
                loads.values().collect::<Vec<_>>()
            )
        }
        Err(e) => format!("list_daemon failed: {e}"),
    }
}

/// max/min tasks per worker over `workers` (a worker with none counts as 0).
pub(crate) fn spread(loads: &HashMap<String, usize>, workers: &HashSet<String>) -> f64 {
    let counts: Vec<usize> = workers
        .iter()
        .map(|w| loads.get(w).copied().unwrap_or(0))
        .collect();
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    let min = counts.iter().copied().min().unwrap_or(0) as f64;
    if min == 0.0 { f64::INFINITY } else { max / min }
}
