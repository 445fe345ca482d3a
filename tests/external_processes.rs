//! Kinds declared in the config file and run as child processes, against a
//! real nats-server, real `bmw` processes, real children and python3: the
//! Python daemon example runs on exactly one of two workers, dies with its
//! worker on `kill -9` and moves, restarts with back-off when it exits,
//! reloads with a new payload, and leaves no process behind after a delete
//! and after SIGTERM; a shell async task's exit statuses map to success,
//! retry and no-retry; a missing program stops the worker from starting; a
//! child flooding its stdout does not grow the worker's memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, FAST, TestEnv, http, wait_until};

const DAEMON_KIND: &str = "daemon:apm:pre_calculate";

fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(path)
}

/// A temp dir holding `kinds.toml` with `text`; the daemon example's state
/// files go in it too.
fn kinds_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kinds.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// The Python daemon example, with the temp dir as a marker argument (to
/// find its processes) and as `APM_PID_DIR` (to find its state).
fn daemon_kinds(dir_marker: &str) -> String {
    format!(
        "[[kind]]\nname = \"{DAEMON_KIND}\"\ncommand = [\"python3\", {script:?}, {dir_marker:?}]\ndimension = \"data_id\"\n",
        script = example("python/apm_daemon.py").display().to_string(),
    )
}

/// A `bmw worker` with the fast settings, the declared kinds and 1 s retries.
fn worker(url: &str, config: &Path, state_dir: &Path) -> BmwProcess {
    let config = config.display().to_string();
    let args: Vec<&str> = ["worker"]
        .into_iter()
        .chain(FAST.iter().copied())
        .chain(["--retry-base", "1s", "--config", &config, "--nats-url", url])
        .collect();
    BmwProcess::spawn_with_env(&args, &[("APM_PID_DIR", &state_dir.display().to_string())])
}

/// What the daemon example wrote at its last start for `data_id`.
fn state(dir: &Path, data_id: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(format!("{data_id}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

/// Whether `pid` runs (a zombie of a killed parent, waiting for init, does not count).
fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether `pid` is gone entirely (not even a zombie).
fn gone(pid: u64) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Live processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u64> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(marker) && alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// Submits a command body on `subject`; the outcome's data.
async fn submit(env: &TestEnv, subject: &str, body: Value) -> Value {
    match env
        .client
        .submit_json(subject, body.to_string().as_bytes())
        .await
        .expect("submitted")
    {
        bmw::client::Submitted::Done(o) => {
            assert!(o.result, "refused: {o:?}");
            o.data
        }
        bmw::client::Submitted::Accepted { data } | bmw::client::Submitted::Duplicate { data } => {
            data
        }
    }
}

/// Waits until `data_id`'s state satisfies `check`; returns it.
async fn wait_state(
    dir: &Path,
    data_id: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let mut seen = None;
    let ok = wait_until(Duration::from_secs(30), async || {
        seen = state(dir, data_id);
        seen.as_ref().is_some_and(&check)
    })
    .await;
    assert!(ok, "{what}: last state {seen:?}");
    seen.unwrap()
}

#[tokio::test]
async fn a_declared_daemon_runs_once_fails_over_reloads_and_leaves_no_process() {
    let env = TestEnv::start().await;
    let (dir, config) = kinds_file("");
    // Not the config path, which is on the workers' command lines.
    let marker = dir.path().join("apm-marker").display().to_string();
    std::fs::write(&config, daemon_kinds(&marker)).unwrap();
    let mut w1 = worker(&env.url(), &config, dir.path());
    let mut w2 = worker(&env.url(), &config, dir.path());
    let id1 = w1.worker_id().await;
    let id2 = w2.worker_id().await;

    let data = submit(
        &env,
        bmw::nats::names::SUBJECT_CREATE,
        // A tick a minute: without PR_SET_PDEATHSIG it would outlive its worker
        // until its next write to the closed pipe.
        json!({"kind": DAEMON_KIND, "payload": {"data_id": "1573001", "token": "a", "interval": 60}}),
    )
    .await;
    let first = wait_state(dir.path(), "1573001", "started", |s| s["pid"].is_u64()).await;
    let uni_id = first["uni_id"].as_str().unwrap().to_owned();
    if let Some(given) = data["uni_id"].as_str() {
        assert_eq!(given, uni_id);
    }
    // The uni_id is the kind and the dimension's text in hex, as a compiled operator's.
    let hex: String = "1573001".bytes().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        uni_id,
        format!("{DAEMON_KIND}-{hex}"),
        "the declared dimension feeds the uni_id"
    );
    let holder = first["worker_id"].as_str().unwrap().to_owned();
    assert!(holder == id1 || holder == id2, "{holder}");
    // Exactly one process, held for a while (the other worker never starts one).
    for _ in 0..10 {
        assert_eq!(
            processes_with(&marker).len(),
            1,
            "one instance, one process"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pid = first["pid"].as_u64().unwrap();
    assert!(alive(pid));

    // kill -9 of the holder: its child dies with it, and the other worker takes over.
    let (dead, survivor, survivor_id) = if holder == id1 {
        (&mut w1, &w2, &id2)
    } else {
        (&mut w2, &w1, &id1)
    };
    dead.kill9();
    assert_eventually!(
        Duration::from_secs(5),
        !alive(pid),
        "the child died with its worker"
    );
    let moved = wait_state(dir.path(), "1573001", "moved", |s| {
        s["pid"].as_u64() != Some(pid)
    })
    .await;
    assert_eq!(moved["worker_id"].as_str(), Some(survivor_id.as_str()));
    let pid2 = moved["pid"].as_u64().unwrap();
    assert_eq!(processes_with(&marker), vec![pid2]);

    // A reload with a new payload restarts the process with it.
    submit(
        &env,
        bmw::nats::names::SUBJECT_RELOAD,
        json!({"task_uni_id": uni_id, "payload": {"token": "b"}}),
    )
    .await;
    let reloaded = wait_state(dir.path(), "1573001", "reloaded", |s| {
        s["payload"]["token"] == "b"
    })
    .await;
    assert_eq!(reloaded["reload_count"], 1);
    assert_eventually!(
        Duration::from_secs(5),
        gone(pid2),
        "the old process is reaped"
    );
    let pid3 = reloaded["pid"].as_u64().unwrap();

    // A delete stops it, and the worker reaps it.
    submit(
        &env,
        bmw::nats::names::SUBJECT_DELETE,
        json!({"task_type": "daemon", "task_uni_id": uni_id}),
    )
    .await;
    assert_eventually!(
        Duration::from_secs(10),
        gone(pid3),
        "deleted: the process is gone"
    );
    assert!(processes_with(&marker).is_empty());
    survivor
        .wait_log(Duration::from_secs(5), &["data_id 1573001: stopping"])
        .await;
}

#[tokio::test]
async fn a_declared_daemon_that_exits_restarts_with_back_off_and_stops_with_its_worker() {
    let env = TestEnv::start().await;
    let (dir, config) = kinds_file("");
    // Not the config path, which is on the workers' command lines.
    let marker = dir.path().join("apm-marker").display().to_string();
    std::fs::write(&config, daemon_kinds(&marker)).unwrap();
    let mut w = worker(&env.url(), &config, dir.path());
    w.worker_id().await;
    let created = Instant::now();
    submit(
        &env,
        bmw::nats::names::SUBJECT_CREATE,
        json!({"kind": DAEMON_KIND, "payload": {"data_id": 7, "fail_after": 0.2}}),
    )
    .await;
    let retried = wait_state(dir.path(), "7", "restarted twice", |s| {
        s["retry_count"] == 2
    })
    .await;
    // Two failures, each followed by the 1 s back-off.
    assert!(
        created.elapsed() >= Duration::from_secs(2),
        "{:?}",
        created.elapsed()
    );
    w.wait_log(
        Duration::from_secs(5),
        &["[RETRY]", "exit status: 1", "giving up after 0.2s"],
    )
    .await;
    assert!(
        w.has_log("data_id 7: tick"),
        "the child's stdout is in the worker's log"
    );

    // A long-running one, then SIGTERM of the worker: the child gets SIGTERM and is reaped.
    submit(
        &env,
        bmw::nats::names::SUBJECT_CREATE,
        json!({"kind": DAEMON_KIND, "payload": {"data_id": 8}}),
    )
    .await;
    let running = wait_state(dir.path(), "8", "started", |s| s["pid"].is_u64()).await;
    let pid = running["pid"].as_u64().unwrap();
    assert!(retried["pid"].as_u64() != Some(pid));
    assert!(w.sigterm(), "the worker exits on SIGTERM");
    assert!(gone(pid), "the worker reaped its child before exiting");
    assert!(
        processes_with(&marker).is_empty(),
        "no process left: {:?}",
        processes_with(&marker)
    );
    assert!(
        w.has_log("data_id 8: stopping"),
        "the child got SIGTERM and stopped cleanly"
    );
}

/// A script next to the config file (a relative
/// path: read from the file's directory) whose exit status the payload picks.
fn async_kinds(dir: &Path) -> String {
    let script = dir.join("exits.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nread -r p\necho \"got $p\"\ncase $p in\n  *fail*) echo broken >&2; exit 1;;\n  *fatal*) exit 65;;\nesac\necho result-$BMW_ATTEMPT-on-$BMW_WORKER_ID\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    "[[kind]]\nname = \"async:exits\"\ncommand = [\"./exits.sh\"]\n".to_owned()
}

async fn record_state(bmw: &BmwProcess, task_id: &str) -> Value {
    let (_, body) = http(
        Method::GET,
        &format!(
            "{}/bmw/task/?task_type=async&task_id={task_id}",
            bmw.base_url()
        ),
        None,
    )
    .await;
    body["data"].clone()
}

async fn create_async(bmw: &BmwProcess, kind: &str, payload: Value, options: Value) -> String {
    let (status, body) = http(
        Method::POST,
        &format!("{}/bmw/task/", bmw.base_url()),
        Some(&json!({"kind": kind, "payload": payload, "options": options}).to_string()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["data"]["task_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_declared_async_commands_exit_status_is_success_retry_or_no_retry() {
    let env = TestEnv::start().await;
    let (dir, config) = kinds_file("");
    std::fs::write(&config, async_kinds(dir.path())).unwrap();
    let config = config.display().to_string();
    let bmw = BmwProcess::run(
        &env.url(),
        &[
            "--async-retry-base",
            "100ms",
            "--async-retry-max",
            "1s",
            "--config",
            &config,
        ],
    )
    .await;
    let state = async |id: &str, wanted: &str, attempts: u64| {
        let mut last = Value::Null;
        let ok = wait_until(Duration::from_secs(20), async || {
            last = record_state(&bmw, id).await;
            last["state"] == wanted && last["attempts"] == attempts
        })
        .await;
        assert!(
            ok,
            "{id}: wanted {wanted} after {attempts} attempts, got {last}"
        );
        last
    };
    let ok = create_async(
        &bmw,
        "async:exits",
        json!({"do": "ok"}),
        json!({"retention": "1h"}),
    )
    .await;
    let fail = create_async(
        &bmw,
        "async:exits",
        json!({"do": "fail"}),
        json!({"retry": 2}),
    )
    .await;
    let fatal = create_async(
        &bmw,
        "async:exits",
        json!({"do": "fatal"}),
        json!({"retry": 5}),
    )
    .await;
    state(&ok, "completed", 1).await;
    let worker_id = bmw.worker_id().await;
    bmw.wait_log(
        Duration::from_secs(5),
        &["task result", &ok, &format!("result-1-on-{worker_id}")],
    )
    .await;
    let failed = state(&fail, "archived", 3).await;
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("exit status: 1; last stderr line: broken"),
        "{failed}"
    );
    let refused = state(&fatal, "archived", 1).await;
    assert!(
        refused["last_error"]
            .as_str()
            .unwrap()
            .contains("exit status: 65"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_missing_or_unrunnable_program_stops_the_worker_from_starting() {
    let (dir, config) = kinds_file(
        "[[kind]]\nname = \"daemon:apm:x\"\ncommand = [\"./bin/not-there.py\"]\ndimension = \"data_id\"\n",
    );
    let line = refused_at_start(&config, &["daemon:apm:x", "not-there.py", "does not exist"]).await;
    assert!(
        line.contains(&dir.path().join("bin/not-there.py").display().to_string()),
        "{line}"
    );
    let cases: [(&str, &[&str]); 3] = [
        (
            "[[kind]]\nname = \"async:x\"\ncommand = [\"no-such-program-for-bmw\"]\n",
            &["async:x", "no-such-program-for-bmw", "PATH"],
        ),
        (
            "[[kind]]\nname = \"async:x\"\ncommand = [\"true\"]\nservice = \"x\"\n",
            &["async:x", "not both"],
        ),
        (
            "[[kind]]\nname = \"async:x\"\nservice = \"bmw.async.default.x\"\n",
            &["async:x", "bmw.async.default.x"],
        ),
    ];
    for (declaration, needles) in cases {
        std::fs::write(&config, declaration).unwrap();
        refused_at_start(&config, needles).await;
    }
}

/// Starts a worker on the declarations in `config` and expects it to exit
/// with an error at once, with a log line holding every one of `needles`
/// (which it returns). No server is needed: the declarations are checked
/// before anything connects.
async fn refused_at_start(config: &std::path::Path, needles: &[&str]) -> String {
    let config = config.display().to_string();
    let mut w = BmwProcess::spawn_raw(&[
        "worker",
        "--config",
        &config,
        "--nats-url",
        "nats://127.0.0.1:1",
    ]);
    let status = w
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the worker exits");
    assert!(
        !status.success(),
        "{needles:?}: the worker must refuse to start"
    );
    w.wait_log(Duration::from_secs(2), needles).await
}

/// The worker's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_child_flooding_stdout_does_not_grow_the_workers_memory() {
    let env = TestEnv::start().await;
    // 50 MB without a newline, then 200 000 short lines.
    let (_dir, config) = kinds_file(
        "[[kind]]\nname = \"async:flood\"\ncommand = [\"sh\", \"-c\", \
         \"head -c 50000000 /dev/zero | tr '\\\\0' x; echo; yes flood | head -n 200000; echo done\"]\n",
    );
    let config = config.display().to_string();
    let bmw = BmwProcess::run(&env.url(), &["--config", &config]).await;
    let before = rss_kib(bmw.pid());
    let id = create_async(&bmw, "async:flood", json!({}), json!({"retention": "1h"})).await;
    let mut peak = before;
    let done = wait_until(Duration::from_secs(60), async || {
        peak = peak.max(rss_kib(bmw.pid()));
        record_state(&bmw, &id).await["state"] == "completed"
    })
    .await;
    assert!(
        done,
        "the flood task completes: {}",
        record_state(&bmw, &id).await
    );
    assert!(
        peak < before + 30 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
    assert!(
        bmw.has_log("over the rate limit was dropped"),
        "short lines past the rate are counted, not logged"
    );
    let long = bmw.logs().into_iter().map(|l| l.len()).max().unwrap_or(0);
    assert!(
        long < 3 * bmw::external::child::MAX_LINE,
        "a logged line is cut: {long} bytes"
    );
}

#[tokio::test]
async fn the_examples_run_with_the_readme_command() {
    let env = TestEnv::start().await;
    // As `docs/task-code.md` says, from the repository's root: `run --config examples/kinds.toml`.
    assert_eq!(
        std::env::current_dir().unwrap(),
        Path::new(env!("CARGO_MANIFEST_DIR"))
    );
    let bmw = BmwProcess::run(&env.url(), &["--config", "examples/kinds.toml"]).await;
    let (status, body) = http(
        Method::POST,
        &format!("{}/bmw/task/", bmw.base_url()),
        Some(r#"{"kind": "daemon:apm:pre_calculate", "payload": {"data_id": "1573001"}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    bmw.wait_log(
        Duration::from_secs(20),
        &["task output", "data_id 1573001: tick at"],
    )
    .await;

    // The shell example: a missing directory is not retried; a real one is cleaned.
    let missing = create_async(
        &bmw,
        "async:cleanup",
        json!({"dir": "/nonexistent/bmw"}),
        json!({"retry": 3}),
    )
    .await;
    let mut last = Value::Null;
    assert_eventually!(
        Duration::from_secs(20),
        {
            last = record_state(&bmw, &missing).await;
            last["state"] == "archived" && last["attempts"] == 1
        },
        "not retried: {last}"
    );
    let work = tempfile::tempdir().unwrap();
    let old = work.path().join("old.log");
    std::fs::write(&old, "x").unwrap();
    let cleaned = create_async(
        &bmw,
        "async:cleanup",
        json!({"dir": work.path(), "older_than_minutes": 0}),
        json!({}),
    )
    .await;
    bmw.wait_log(
        Duration::from_secs(20),
        &["task result", &cleaned, "removed"],
    )
    .await;
    assert!(!old.exists(), "the old file is removed");
}

#[tokio::test]
async fn a_lost_claim_kills_the_process_at_once_without_a_grace_period() {
    use crate::harness::proxy::{FaultProxy, Mode};
    let env = TestEnv::start().await;
    let proxy = FaultProxy::start(&env.url()).await;
    let (dir, config) = kinds_file("");
    let marker = dir.path().join("apm-marker").display().to_string();
    std::fs::write(&config, daemon_kinds(&marker)).unwrap();
    let config_arg = config.display().to_string();
    let state_dir = dir.path().display().to_string();
    let url = proxy.url();
    // A long grace: a SIGTERM would be answered ("stopping") well within it.
    let args: Vec<&str> = ["worker"]
        .into_iter()
        .chain(["--claim-ttl", "3s", "--heartbeat", "1s", "--grace", "20s"])
        .chain(["--config", &config_arg])
        .chain(["--nats-url", &url])
        .collect();
    let w = BmwProcess::spawn_with_env(&args, &[("APM_PID_DIR", &state_dir)]);
    w.worker_id().await;
    submit(
        &env,
        bmw::nats::names::SUBJECT_CREATE,
        json!({"kind": DAEMON_KIND, "payload": {"data_id": 9, "interval": 60}}),
    )
    .await;
    let started = wait_state(dir.path(), "9", "started", |s| s["pid"].is_u64()).await;
    let pid = started["pid"].as_u64().unwrap();

    // Cut the worker off: its claim deadline passes, and the process is killed.
    proxy.set(Mode::BlackHole);
    let cut = Instant::now();
    assert_eventually!(
        Duration::from_secs(10),
        gone(pid),
        "the process is killed and reaped"
    );
    assert!(
        cut.elapsed() < Duration::from_secs(8),
        "{:?}",
        cut.elapsed()
    );
    w.wait_log(
        Duration::from_secs(2),
        &["task process stopped", "lost=true"],
    )
    .await;
    assert!(
        !w.has_log("data_id 9: stopping"),
        "SIGKILL, not SIGTERM: the process had no chance to stop cleanly"
    );
}

#[tokio::test]
async fn kinds_in_the_files_of_a_kinds_dir_run_too() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.toml"),
        async_kinds(dir.path()), // async:exits, `./exits.sh` next to the file
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        "[[kind]]\nname = \"async:echo\"\ncommand = [\"sh\", \"-c\", \"cat; echo\"]\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a kind file").unwrap();
    let kinds_dir = dir.path().display().to_string();
    let bmw = BmwProcess::run(&env.url(), &["--kinds-dir", &kinds_dir]).await;
    let ok = create_async(&bmw, "async:exits", json!({"do": "ok"}), json!({})).await;
    bmw.wait_log(Duration::from_secs(20), &["task result", &ok, "result-1"])
        .await;
    let echo = create_async(&bmw, "async:echo", json!({"said": "hi"}), json!({})).await;
    bmw.wait_log(Duration::from_secs(20), &["task result", &echo, "said"])
        .await;

    // A file with anything but `[[kind]]` tables stops the start, naming it.
    std::fs::write(dir.path().join("c.toml"), "claim-ttl = \"3s\"\n").unwrap();
    let mut w = BmwProcess::spawn_raw(&[
        "worker",
        "--kinds-dir",
        &kinds_dir,
        "--nats-url",
        "nats://127.0.0.1:1",
    ]);
    assert!(
        !w.wait_exit(Duration::from_secs(20))
            .await
            .expect("exits")
            .success()
    );
    w.wait_log(Duration::from_secs(2), &["c.toml", "TOML parse error"])
        .await;
    assert!(w.has_log("unknown field `claim-ttl`, expected `kind`"));
}

/// A declared daemon whose process starts one of its own (a grandchild of
/// the worker): `kill -9` of the worker takes both, not only the direct
/// child (which `PR_SET_PDEATHSIG` reaches; its children it does not).
#[tokio::test]
async fn a_killed_worker_leaves_no_grandchild_of_a_daemon_behind() {
    let env = TestEnv::start().await;
    let (dir, config) = kinds_file("");
    let family = dir.path().display().to_string();
    std::fs::write(
        &config,
        format!(
            "[[kind]]\nname = \"daemon:test:family\"\ndimension = \"data_id\"\n\
             command = [\"sh\", \"-c\", \"sleep 600 & echo $! > \\\"$FAMILY_DIR/grandchild\\\"; \
             echo $$ > \\\"$FAMILY_DIR/child\\\"; wait\"]\nenv = {{ FAMILY_DIR = {family:?} }}\n"
        ),
    )
    .unwrap();
    let mut w = worker(&env.url(), &config, dir.path());
    w.worker_id().await;
    submit(
        &env,
        bmw::nats::names::SUBJECT_CREATE,
        json!({"kind": "daemon:test:family", "payload": {"data_id": "7"}}),
    )
    .await;
    let pid = |name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.path().join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    assert_eventually!(
        Duration::from_secs(20),
        pid("child").is_some() && pid("grandchild").is_some(),
        "the daemon's process and its own child start; logs:\n{}",
        w.logs().join("\n")
    );
    let (child, grandchild) = (pid("child").unwrap(), pid("grandchild").unwrap());
    assert!(alive(child) && alive(grandchild));
    w.kill9();
    assert_eventually!(
        Duration::from_secs(5),
        !alive(child) && !alive(grandchild),
        "child alive: {}, grandchild alive: {}",
        alive(child),
        alive(grandchild)
    );
}
