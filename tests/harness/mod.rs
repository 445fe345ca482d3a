//! The one harness every integration test uses: a real nats-server per test
//! (free loopback port, temporary store, killed on drop), `bmw` worker and
//! bridge processes with captured logs, an in-process task client, and
//! waiting with deadlines instead of sleeps. `BMW_TEST_ECHO=1` echoes the
//! processes' output; `BMW_TEST_LOG` sets their log filter (`BMW_LOG`).
//! Processes serve no metrics address unless a test passes `--metrics-addr`
//! (`BMW_METRICS_ADDR=off`), so workers never compete for the default port.

#![allow(dead_code, unreachable_pub)]

pub mod api;
pub mod proxy;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bmw::client::TaskClient;
use bmw::nats::Nats;
use bmw::nats::local::{LocalServer, LocalServerOptions};
use serde_json::Value;

/// A nats-server with JetStream on a free loopback port and a temporary store.
pub struct NatsServer {
    pub server: LocalServer,
    _dir: tempfile::TempDir,
}

/// The pinned nats-server, installed once per test run by `nats/install.sh`
/// (tests run in parallel; one install, not one per test).
pub fn nats_server_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("nats/install.sh");
            let out = Command::new(&script)
                .output()
                .expect("nats/install.sh runs");
            assert!(
                out.status.success(),
                "nats/install.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = tokio::task::spawn_blocking(nats_server_binary)
            .await
            .unwrap();
        let options = LocalServerOptions {
            store_dir: dir.path().join("store"),
            port: 0,
            extra_args: vec![],
            binary: Some(binary),
            sync: None,
        };
        let server = LocalServer::start(options, dir.path())
            .await
            .expect("nats-server starts");
        NatsServer { server, _dir: dir }
    }

    /// A server that also reads `conf`, the text of a nats-server config file
    /// (authorization, TLS...); the port and store still come from the
    /// command line, which wins over the file.
    pub async fn start_with_config(conf: &str) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf_path = dir.path().join("server.conf");
        std::fs::write(&conf_path, conf).expect("write the server config");
        let binary = tokio::task::spawn_blocking(nats_server_binary)
            .await
            .unwrap();
        let options = LocalServerOptions {
            store_dir: dir.path().join("store"),
            port: 0,
            extra_args: vec!["-c".into(), conf_path.display().to_string()],
            binary: Some(binary),
            sync: None,
        };
        let server = LocalServer::start(options, dir.path())
            .await
            .expect("nats-server starts");
        NatsServer { server, _dir: dir }
    }

    pub fn url(&self) -> String {
        self.server.url().to_owned()
    }
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts that a condition becomes true within a timeout, printing context.
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $cond:expr, $($context:tt)+) => {
        assert!($crate::harness::wait_until($timeout, async || $cond).await, $($context)+)
    };
}

/// Settings that make fail-over fast in tests (claim TTL 3 s, heartbeat 1 s).
pub const FAST: &[&str] = &[
    "--claim-ttl",
    "3s",
    "--heartbeat",
    "1s",
    "--grace",
    "2s",
    "--reply-timeout",
    "5s",
];

/// A `bmw` child process with its stdout and stderr captured line by line.
pub struct BmwProcess {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    pub http_port: Option<u16>,
}

/// A free loopback TCP port (bound and released; a tiny race is acceptable in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl BmwProcess {
    /// Starts `bmw <args>` against `url`.
    pub fn spawn(url: &str, args: &[&str]) -> BmwProcess {
        let args: Vec<&str> = args.iter().copied().chain(["--nats-url", url]).collect();
        BmwProcess::spawn_raw(&args)
    }

    /// Starts `bmw <args>` as given.
    pub fn spawn_raw(args: &[&str]) -> BmwProcess {
        BmwProcess::spawn_with_env(args, &[])
    }

    /// Starts `bmw <args>` with extra environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> BmwProcess {
        BmwProcess::spawn_program(std::path::Path::new(env!("CARGO_BIN_EXE_bmw")), args, env)
    }

    /// Starts the example program `name` (built by `cargo test` next to the
    /// `bmw` binary, under `examples/`) with `args`.
    pub fn spawn_example(name: &str, args: &[&str]) -> BmwProcess {
        let bmw = std::path::Path::new(env!("CARGO_BIN_EXE_bmw"));
        let program = bmw.with_file_name("examples").join(name);
        assert!(
            program.exists(),
            "{} is built by `cargo test`",
            program.display()
        );
        BmwProcess::spawn_program(&program, args, &[])
    }

    /// Starts `program <args>` with extra environment variables.
    pub fn spawn_program(
        program: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> BmwProcess {
        use std::os::unix::process::CommandExt as _;
        let mut child = Command::new(program)
            .args(args)
            .env(
                "BMW_LOG",
                std::env::var("BMW_TEST_LOG").unwrap_or("info,async_nats=warn".into()),
            )
            // Many workers run on this host at once: none serves metrics on
            // the default 127.0.0.1:10213 unless a test gives it an address.
            .env("BMW_METRICS_ADDR", "off")
            .envs(env.iter().copied())
            // Its own process group, as a shell gives a command: a test can
            // signal the group the way a terminal's Ctrl-C does.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bmw starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for reader in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    if std::env::var_os("BMW_TEST_ECHO").is_some() {
                        eprintln!("[bmw] {line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        BmwProcess {
            child: Some(child),
            lines,
            http_port: None,
        }
    }

    /// A worker with the fast settings and the demo kinds, plus `extra`.
    pub fn worker(url: &str, extra: &[&str]) -> BmwProcess {
        let args: Vec<&str> = ["worker", "--demo-kinds"]
            .iter()
            .chain(FAST)
            .chain(extra)
            .copied()
            .collect();
        BmwProcess::spawn(url, &args)
    }

    /// `bmw run` (bridge + worker, with the demo kinds) on a free port with
    /// the fast settings plus `extra`.
    pub async fn run(url: &str, extra: &[&str]) -> BmwProcess {
        BmwProcess::serve("run", url, extra, &[]).await
    }

    /// `bmw <role>` (`run` or `bridge`) on a free port with the fast settings
    /// plus `extra` and the environment `env`, once its bridge answers.
    pub async fn serve(role: &str, url: &str, extra: &[&str], env: &[(&str, &str)]) -> BmwProcess {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let args: Vec<&str> = [
            role,
            "--demo-kinds",
            "--http-addr",
            &addr,
            "--nats-url",
            url,
        ]
        .iter()
        .copied()
        .chain(FAST.iter().copied())
        .chain(extra.iter().copied())
        .collect();
        let mut p = BmwProcess::spawn_with_env(&args, env);
        p.http_port = Some(port);
        let up = wait_until(Duration::from_secs(20), async || {
            reqwest::get(format!("http://{addr}/health")).await.is_ok()
        })
        .await;
        assert!(up, "bridge did not come up; logs:\n{}", p.logs().join("\n"));
        p
    }

    /// `bmw bridge` (no worker) on a free port with `extra`, up once `/health` answers.
    pub async fn bridge(url: &str, extra: &[&str]) -> BmwProcess {
        BmwProcess::bridge_on(url, free_port(), extra).await
    }

    /// `bmw bridge` on `port` (a bridge started again where its clients
    /// expect it), up once `/health` answers.
    pub async fn bridge_on(url: &str, port: u16, extra: &[&str]) -> BmwProcess {
        let addr = format!("127.0.0.1:{port}");
        // The demo kinds, as the harness's workers have them.
        let args: Vec<&str> = ["bridge", "--demo-kinds", "--http-addr", &addr]
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect();
        let mut p = BmwProcess::spawn(url, &args);
        p.http_port = Some(port);
        let up = wait_until(Duration::from_secs(20), async || {
            reqwest::get(format!("http://{addr}/health")).await.is_ok()
        })
        .await;
        assert!(up, "bridge did not come up; logs:\n{}", p.logs().join("\n"));
        p
    }

    /// Waits up to `timeout` for the process to exit by itself; its status, or
    /// `None` if it still runs.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, async || {
            status = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            status.is_some()
        })
        .await;
        status
    }

    pub fn base_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.http_port.expect("a bridge process")
        )
    }

    pub fn logs(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn has_log(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// The first log line containing all of `needles`, waiting up to `timeout`.
    pub async fn wait_log(&self, timeout: Duration, needles: &[&str]) -> String {
        let mut found = None;
        wait_until(timeout, async || {
            found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned();
            found.is_some()
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "no log line with {needles:?}; logs:\n{}",
                self.logs().join("\n")
            )
        })
    }

    /// The worker id, from the `worker started` log line.
    pub async fn worker_id(&self) -> String {
        let line = self
            .wait_log(Duration::from_secs(20), &["worker started"])
            .await;
        let start = line.find("worker_id=").expect("worker_id field") + "worker_id=".len();
        line[start..]
            .split_whitespace()
            .next()
            .unwrap()
            .trim_matches('"')
            .to_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and returns at once (see [`BmwProcess::wait_exit`]).
    pub fn send_sigterm(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
    }

    /// SIGTERM, then wait (bounded) for the exit; returns whether it exited.
    pub fn sigterm(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        false
    }
}

impl Drop for BmwProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A test's world: a server and a connected client.
pub struct TestEnv {
    pub server: NatsServer,
    pub nats: Nats,
    pub client: TaskClient,
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        let server = NatsServer::start().await;
        let nats = Nats::connect(&server.url(), "bmw-test")
            .await
            .expect("connect");
        bmw::nats::provision::provision(&nats.js, &bmw::nats::provision::Settings::new(1))
            .await
            .expect("provision");
        let registry = Arc::new(bmw::builtin::registry());
        let client = TaskClient::new(nats.clone(), registry, Duration::from_secs(5))
            .await
            .expect("client");
        TestEnv {
            server,
            nats,
            client,
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Creates a `daemon:demo:demo` task through the client; returns its uni_id.
    pub async fn create_demo(&self, content: &str) -> String {
        let body = serde_json::json!({"kind": "daemon:demo:demo", "payload": {"content": content}});
        self.create_daemon(&body).await
    }

    /// Creates the daemon task `body` through the client; returns its uni_id.
    pub async fn create_daemon(&self, body: &Value) -> String {
        let submitted = self
            .client
            .submit_json(
                bmw::nats::names::SUBJECT_CREATE,
                body.to_string().as_bytes(),
            )
            .await
            .expect("create");
        let data = match submitted {
            bmw::client::Submitted::Done(o) => {
                assert!(o.result, "create refused: {o:?}");
                o.data
            }
            bmw::client::Submitted::Accepted { data }
            | bmw::client::Submitted::Duplicate { data } => data,
        };
        data["uni_id"].as_str().unwrap().to_owned()
    }

    /// Who holds each daemon task now: uni_id -> worker_id ("" if none).
    pub async fn bindings(&self) -> std::collections::BTreeMap<String, String> {
        self.client
            .list_daemon()
            .await
            .expect("list")
            .into_iter()
            .map(|r| (r.uni_id, r.binding.worker_id))
            .collect()
    }

    /// One of bmw's buckets, opened as any client would.
    pub async fn bucket(&self, name: &str) -> async_nats::jetstream::kv::Store {
        self.nats
            .js
            .get_key_value(name)
            .await
            .unwrap_or_else(|e| panic!("bucket {name}: {e}"))
    }

    /// Every live value in `bucket`, by key. A read that fails (a timeout on
    /// a loaded machine) is read again, not taken for an empty bucket, which
    /// every caller would misread.
    pub async fn read_bucket(&self, bucket: &str) -> std::collections::BTreeMap<String, Value> {
        let kv = self.bucket(bucket).await;
        for _ in 0..50 {
            if let Ok(read) = bmw::nats::read_all::<Value>(&kv).await {
                return read.into_iter().collect();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("bucket {bucket} cannot be read");
    }

    /// How many tasks each worker holds.
    pub async fn loads(&self) -> std::collections::BTreeMap<String, usize> {
        let mut loads = std::collections::BTreeMap::new();
        for (_, w) in self.bindings().await {
            *loads.entry(w).or_insert(0) += 1;
        }
        loads
    }
}

/// GET/POST/DELETE a bridge route with a JSON content type; returns
/// (status, envelope).
pub async fn http(method: reqwest::Method, url: &str, body: Option<&str>) -> (u16, Value) {
    let request = api::request(method, url).header("Content-Type", "application/json");
    match body {
        Some(body) => request.body(body),
        None => request,
    }
    .envelope()
    .await
}

/// `POST /bmw/task/` of `body`, asserting 200; returns the envelope's data.
pub async fn create_ok(base_url: &str, body: &Value) -> Value {
    let (status, envelope) = http(
        reqwest::Method::POST,
        &format!("{base_url}/bmw/task/"),
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(status, 200, "{body}: {envelope}");
    envelope["data"].clone()
}

/// Publishes `publish` on `subject` (JetStream) and waits until the server
/// says it is stored.
pub async fn publish_stored(
    env: &TestEnv,
    subject: &str,
    publish: async_nats::jetstream::message::PublishMessage,
) -> async_nats::jetstream::publish::PublishAck {
    env.nats
        .js
        .send_publish(subject.to_owned(), publish)
        .await
        .unwrap()
        .await
        .unwrap()
}

/// Publishes a command on `subject` (JetStream) with a `Bmw-Reply` inbox
/// and returns the outcome a worker answers with.
pub async fn publish_command(env: &TestEnv, subject: &str, body: &[u8]) -> Value {
    let inbox = env.nats.client.new_inbox();
    let mut replies = env.nats.client.subscribe(inbox.clone()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(bmw::nats::names::HEADER_REPLY, inbox.as_str());
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(body.to_vec().into())
        .headers(headers);
    publish_stored(env, subject, publish).await;
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut replies),
    )
    .await
    .expect("an outcome")
    .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

/// Creates `count` `daemon:demo:demo` tasks that run (`{"content": "ok", "n": n}`).
pub async fn create_demos(client: &TaskClient, count: usize) {
    for n in 0..count {
        let body =
            serde_json::json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": n}});
        client
            .submit_json(
                bmw::nats::names::SUBJECT_CREATE,
                body.to_string().as_bytes(),
            )
            .await
            .expect("create");
    }
}

/// Asserts a command's outcome is a refusal with `code` whose message
/// contains `needle`.
pub fn assert_refused_outcome(outcome: &Value, code: u64, needle: &str) {
    assert_eq!(
        (outcome["result"].as_bool(), outcome["code"].as_u64()),
        (Some(false), Some(code)),
        "{outcome}"
    );
    let message = outcome["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{outcome}");
}

/// A registry with one kind, `daemon:custom:explosive`, run by [`Explosive`].
pub fn explosive_registry() -> bmw::Registry {
    let explosive = Arc::new(Explosive::default());
    let mut registry = bmw::Registry::new();
    registry
        .register_daemon("daemon:custom:explosive", move || {
            Ok(explosive.clone() as Arc<dyn bmw::daemon::Operator>)
        })
        .unwrap();
    registry
}

/// A 3-node JetStream cluster on loopback, each node with its own store and
/// a monitoring port (`/jsz`, `/healthz`) on loopback.
pub struct NatsCluster {
    pub nodes: Vec<LocalServer>,
    /// Node `i`'s monitoring port.
    pub monitor_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    pub async fn start(size: usize) -> NatsCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let (nodes, monitor_ports) = NatsCluster::start_nodes(dir.path(), size, None).await;
        NatsCluster {
            nodes,
            monitor_ports,
            _dir: dir,
        }
    }

    /// The nodes of a cluster with their stores under `dir` (`n0`, `n1`...),
    /// syncing as `sync` says (nats-server's default when `None`), and their
    /// monitoring ports.
    pub async fn start_nodes(
        dir: &Path,
        size: usize,
        sync: Option<bmw::nats::local::StoreSync>,
    ) -> (Vec<LocalServer>, Vec<u16>) {
        let binary = tokio::task::spawn_blocking(nats_server_binary)
            .await
            .unwrap();
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let monitor_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let starts = (0..size).map(|i| {
            let options = LocalServerOptions {
                store_dir: dir.join(format!("n{i}")),
                port: 0,
                extra_args: vec![
                    "--server_name".into(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "bmw".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", cluster_ports[i]),
                    "--routes".into(),
                    routes.clone(),
                    "--http_port".into(),
                    monitor_ports[i].to_string(),
                ],
                binary: Some(binary.clone()),
                sync,
            };
            let store = dir.to_owned();
            async move {
                LocalServer::start(options, &store)
                    .await
                    .expect("cluster node starts")
            }
        });
        let nodes = futures::future::join_all(starts).await;
        (nodes, monitor_ports)
    }

    /// A connection once JetStream has a meta leader and bmw's streams and
    /// buckets are provisioned with 3 replicas, and a task client on it.
    pub async fn client(&self) -> (Nats, TaskClient) {
        let nats = Nats::connect(&self.url(), "bmw-test").await.unwrap();
        let ready = wait_until(Duration::from_secs(20), async || {
            bmw::nats::provision::provision(&nats.js, &bmw::nats::provision::Settings::new(3))
                .await
                .is_ok()
        })
        .await;
        assert!(ready, "cluster did not become ready");
        let registry = Arc::new(bmw::builtin::registry());
        let client = TaskClient::new(nats.clone(), registry, Duration::from_secs(10))
            .await
            .unwrap();
        (nats, client)
    }

    /// All client URLs, comma-separated.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url().to_owned())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Collects the JSON events published on `subject` (e.g. `bmw.event.async.>`)
/// from now on; flush the client before acting so the subscription is in place.
pub fn collect_events(env: &TestEnv, subject: &'static str) -> Arc<Mutex<Vec<Value>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let (client, sink) = (env.nats.client.clone(), events.clone());
    tokio::spawn(async move {
        let mut sub = client.subscribe(subject).await.unwrap();
        while let Some(m) = futures::StreamExt::next(&mut sub).await {
            if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                sink.lock().unwrap().extend(flatten_event(v));
            }
        }
    });
    events
}

/// One event per task: a batched `succeeded` event (`tasks: [...]`) becomes
/// one copy per task, with the task's fields at the top level.
pub fn flatten_event(event: Value) -> Vec<Value> {
    let Some(tasks) = event["tasks"].as_array() else {
        return vec![event];
    };
    tasks
        .iter()
        .map(|task| {
            let mut one = event.clone();
            let object = one.as_object_mut().expect("an event is an object");
            object.remove("tasks");
            object.remove("count");
            if let Some(fields) = task.as_object() {
                object.extend(fields.clone());
            }
            one
        })
        .collect()
}

/// Posts each body to `POST /bmw/task/` and asserts a 400 envelope whose
/// message contains the paired text (the field at fault).
pub async fn assert_refused(base_url: &str, cases: &[(Value, &str)]) {
    for (body, needle) in cases {
        let (status, envelope) = http(
            reqwest::Method::POST,
            &format!("{base_url}/bmw/task/"),
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, 400, "{body}: {envelope}");
        assert!(
            envelope["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{body}: {envelope}"
        );
    }
}

/// `GET /bmw/task/?task_type=<t>`: the rows.
pub async fn list_tasks(base_url: &str, task_type: &str) -> Vec<Value> {
    let (status, body) = http(
        reqwest::Method::GET,
        &format!("{base_url}/bmw/task/?task_type={task_type}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["data"].as_array().cloned().unwrap_or_default()
}

/// A daemon operator whose `task_dimension` (user code that runs inside
/// command handling, once to pick the command's lane and once to apply it)
/// panics: on `{"explode": "routing"}` the first time, on `{"explode":
/// "applying"}` the second time it sees a payload.
#[derive(Default)]
pub struct Explosive {
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl bmw::daemon::Operator for Explosive {
    fn start<'a>(
        &'a self,
        ctx: bmw::daemon::OperatorContext,
        _payload: &'a serde_json::Value,
    ) -> futures::future::BoxFuture<'a, Result<(), bmw::daemon::OperatorError>> {
        Box::pin(async move {
            ctx.cancelled().await;
            Ok(())
        })
    }

    fn task_dimension(&self, payload: &serde_json::Value) -> String {
        let again = !self.seen.lock().unwrap().insert(payload.to_string());
        match payload["explode"].as_str() {
            Some("routing") => panic!("told to explode while routing"),
            Some("applying") if again => panic!("told to explode while applying"),
            _ => String::new(),
        }
    }
}
