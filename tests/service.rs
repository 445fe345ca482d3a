//! The README's first command: `bmw run` with no `--nats-url` starts its own
//! nats-server under the data directory, serves the walkthrough, drains on
//! Ctrl-C, and stops the server when it exits.

use std::time::Duration;

use reqwest::Method;

use crate::harness::{BmwProcess, api, free_port, http, wait_until};

/// The arguments of `parent`'s child whose program name ends with `program`.
fn child_command_line(parent: u32, program: &str) -> Option<Vec<String>> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let after_comm = stat.rsplit(')').next().unwrap_or("");
        let ppid = after_comm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with(program)) {
            return Some(args);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn bmw_run_without_a_url_starts_and_stops_its_own_server() {
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let data_dir = data.path().to_str().unwrap();
    let mut bmw = BmwProcess::spawn_raw(&["run", "--http-addr", &addr, "--data-dir", data_dir]);
    bmw.http_port = Some(addr.rsplit(':').next().unwrap().parse().unwrap());
    let up = wait_until(Duration::from_secs(60), async || {
        api::get(format!("http://{addr}/ready"))
            .try_send()
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(up, "bmw run did not come up:\n{}", bmw.logs().join("\n"));
    let line = bmw
        .wait_log(Duration::from_secs(5), &["started a local nats-server"])
        .await;
    let nats_port: u16 = line
        .split("nats://127.0.0.1:")
        .nth(1)
        .and_then(|s| s[..s.find('"').unwrap_or(s.len())].parse().ok())
        .expect("url in the log");
    assert!(
        data.path().join("nats").is_dir(),
        "the store is under the data directory"
    );
    // Durable by default: it says so, and the server was told so.
    assert!(line.contains("sync=always"), "{line}");
    let server_args = child_command_line(bmw.pid(), "nats-server").expect("a nats-server child");
    let conf = server_args
        .iter()
        .skip_while(|a| *a != "-c")
        .nth(1)
        .expect("a config file");
    let text = std::fs::read_to_string(conf).unwrap();
    assert!(text.contains("sync_interval: always"), "{text}");

    let body = r#"{"kind": "daemon:demo:demo", "payload": {"content": "ok"}, "options": {"queue": "default"}}"#;
    let (status, envelope) = http(
        Method::POST,
        &format!("http://{addr}/bmw/task/"),
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{envelope}");
    bmw.wait_log(
        Duration::from_secs(10),
        &["start task instance, payload: map[content:ok] "],
    )
    .await;

    // Ctrl-C in a terminal signals the whole foreground process group (the
    // harness starts bmw in a group of its own, as a shell does). The local
    // nats-server is in another group, so bmw drains (the worker leaves and
    // flushes) before it stops the server, rather than finding it gone.
    let sent = unsafe { libc::kill(-(bmw.pid() as i32), libc::SIGINT) };
    assert_eq!(sent, 0);
    bmw.wait_log(Duration::from_secs(20), &["worker stopped"])
        .await;
    let logs = bmw.logs().join("\n");
    for unclean in ["final flush timed out", "worker entry not removed in time"] {
        assert!(!logs.contains(unclean), "{unclean}:\n{logs}");
    }
    let closed = wait_until(Duration::from_secs(10), async || {
        tokio::net::TcpStream::connect(("127.0.0.1", nats_port))
            .await
            .is_err()
    })
    .await;
    assert!(closed, "the local nats-server stopped with bmw run");
}

#[tokio::test(flavor = "multi_thread")]
async fn provisioning_is_idempotent_and_names_an_incompatible_stream() {
    let server = crate::harness::NatsServer::start().await;
    let nats = bmw::nats::Nats::connect(&server.url(), "bmw-test")
        .await
        .unwrap();
    // A BMW_ASYNC that is not a work queue cannot be turned into one.
    nats.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "BMW_ASYNC".into(),
            subjects: vec!["bmw.async.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let err = bmw::nats::provision::provision(&nats.js, &bmw::nats::provision::Settings::new(1))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("BMW_ASYNC"), "{err}");
    nats.js.delete_stream("BMW_ASYNC").await.unwrap();
    // Twice in a row is fine, and leaves one anchor at the head of BMW_ASYNC.
    bmw::nats::provision::provision(&nats.js, &bmw::nats::provision::Settings::new(1))
        .await
        .unwrap();
    bmw::nats::provision::provision(&nats.js, &bmw::nats::provision::Settings::new(1))
        .await
        .unwrap();
    let mut stream = nats.js.get_stream("BMW_ASYNC").await.unwrap();
    let info = stream.info().await.unwrap().state.clone();
    assert_eq!(info.messages, 1, "one anchor");
    assert_eq!(info.first_sequence, 1, "at the head");
    let head = stream.get_raw_message(1).await.unwrap();
    assert_eq!(
        head.subject.as_str(),
        bmw::nats::names::SUBJECT_ASYNC_ANCHOR
    );
    // A purged stream gets it back at the next provisioning.
    stream.purge().await.unwrap();
    bmw::nats::provision::provision(&nats.js, &bmw::nats::provision::Settings::new(1))
        .await
        .unwrap();
    let anchor = stream
        .get_last_raw_message_by_subject(bmw::nats::names::SUBJECT_ASYNC_ANCHOR)
        .await;
    assert!(anchor.is_ok(), "anchor rewritten: {anchor:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_out_of_range_are_refused_at_start_naming_the_setting() {
    let server = crate::harness::NatsServer::start().await;
    let cases: &[(&[&str], &str)] = &[
        (&["--async-ack-wait", "0s"], "async-ack-wait"),
        (&["--async-ack-wait", "100000years"], "async-ack-wait"),
        (&["--retry-max", "100000000years"], "retry-max"),
        (&["--async-retry-max", "100000000years"], "async-retry-max"),
        (&["--claim-ttl", "100000000years"], "claim-ttl"),
        (&["--grace", "100000000years"], "grace"),
        (&["--concurrency", "18446744073709551615"], "concurrency"),
        (&["--queues", "a=4294967295,b=4294967295"], "queues"),
        (&["--max-task-delay", "0s"], "max-task-delay"),
        (&["--max-retention", "100000000years"], "max-retention"),
    ];
    for (args, setting) in cases {
        let args: Vec<&str> = ["worker"].iter().chain(args.iter()).copied().collect();
        let mut bmw = BmwProcess::spawn(&server.url(), &args);
        let status = bmw.wait_exit(Duration::from_secs(20)).await;
        let logs = bmw.logs().join("\n");
        assert!(
            status.is_some_and(|s| !s.success()),
            "{args:?}: should exit with an error, got {status:?}; logs:\n{logs}"
        );
        assert!(
            logs.contains(&format!("invalid setting `{setting}`")),
            "{args:?}: the message names {setting}; logs:\n{logs}"
        );
        assert!(
            !logs.contains("panicked"),
            "{args:?}: a panic; logs:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_kinds_are_opt_in_outside_bmw_run() {
    let env = crate::harness::TestEnv::start().await;
    let plain = BmwProcess::spawn(&env.url(), &["worker"]);
    let plain_id = plain.worker_id().await;
    let by_flag = BmwProcess::spawn(&env.url(), &["worker", "--demo-kinds"]);
    let by_flag_id = by_flag.worker_id().await;
    let by_env = BmwProcess::spawn_with_env(
        &["worker", "--nats-url", &env.url()],
        &[("BMW_DEMO_KINDS", "true")],
    );
    let by_env_id = by_env.worker_id().await;
    let kinds = |id: String| {
        let client = env.client.clone();
        async move {
            client
                .list_workers()
                .await
                .unwrap()
                .into_iter()
                .find(|w| w.worker_id == id)
                .map(|w| w.kinds)
        }
    };
    assert_eq!(
        kinds(plain_id).await,
        Some(vec![]),
        "no demo kinds by default"
    );
    for id in [by_flag_id, by_env_id] {
        let kinds = kinds(id).await.expect("a live worker");
        assert!(kinds.iter().any(|k| k == "daemon:demo:demo"), "{kinds:?}");
        assert!(kinds.iter().any(|k| k == "async:demo:sleep"), "{kinds:?}");
    }
    // Gone for good (their entries removed), so no one advertises the demo.
    for mut worker in [plain, by_flag, by_env] {
        assert!(worker.sigterm(), "the worker stops on SIGTERM");
    }

    // `bmw run` has them unless told not to; without them the demo is unknown.
    let run = BmwProcess::run(&env.url(), &["--demo-kinds=false"]).await;
    let (status, envelope) = http(
        Method::POST,
        &format!("{}/bmw/task/", run.base_url()),
        Some(r#"{"kind": "async:demo:sleep", "payload": {"seconds": 1}}"#),
    )
    .await;
    assert_eq!(status, 400, "{envelope}");
    assert!(
        envelope["message"]
            .as_str()
            .unwrap()
            .contains("not registered"),
        "{envelope}"
    );
}

/// BMW drains on SIGINT, SIGTERM and SIGQUIT; so does bmw (SIGQUIT used to
/// kill the process with a core dump, claims left to expire).
#[tokio::test(flavor = "multi_thread")]
async fn sigquit_drains_like_sigterm() {
    let env = crate::harness::TestEnv::start().await;
    let mut worker = BmwProcess::worker(&env.url(), &[]);
    let id = worker.worker_id().await;
    env.create_demo("ok").await;
    assert_eventually!(
        std::time::Duration::from_secs(10),
        env.loads().await.get(&id) == Some(&1),
        "the worker holds the task"
    );
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    let sent = unsafe { libc::kill(worker.pid() as i32, libc::SIGQUIT) };
    assert_eq!(sent, 0);
    let status = worker.wait_exit(std::time::Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exited cleanly: {status:?}; logs:\n{}",
        worker.logs().join("\n")
    );
    assert!(worker.has_log("received SIGQUIT"));
    // Released on the way out, not left to expire: nobody holds it at once.
    assert_eventually!(
        std::time::Duration::from_secs(2),
        env.bindings().await.values().all(String::is_empty),
        "the claim was released"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_creates_what_is_missing_fixes_what_bmw_cannot_use_and_keeps_an_operators_limits() {
    use async_nats::jetstream::stream;
    let server = crate::harness::NatsServer::start().await;
    let nats = bmw::nats::Nats::connect(&server.url(), "bmw-test")
        .await
        .unwrap();
    bmw::nats::provision::provision(&nats.js, &bmw::nats::provision::Settings::new(1))
        .await
        .unwrap();
    let config = async |name: &str| -> stream::Config {
        let mut s = nats.js.get_stream(name).await.unwrap();
        s.info().await.unwrap().config.clone()
    };
    // An operator's limit, a setting bmw cannot work with, a bucket gone.
    let mut events = config("BMW_EVENTS").await;
    events.max_bytes = 1 << 20;
    nats.js.update_stream(events).await.unwrap();
    let mut dead = config("BMW_DEAD").await;
    dead.subjects = vec!["bmw.dead.only-this".into()];
    nats.js.update_stream(dead).await.unwrap();
    nats.js.delete_key_value("bmw_unique").await.unwrap();

    bmw::nats::provision::ensure(&nats.js, &bmw::nats::provision::Settings::new(1))
        .await
        .unwrap();
    assert_eq!(
        config("BMW_EVENTS").await.max_bytes,
        1 << 20,
        "the limit stays"
    );
    assert_eq!(
        config("BMW_DEAD").await.subjects,
        vec!["bmw.dead.>".to_owned()]
    );
    assert!(
        nats.js.get_key_value("bmw_unique").await.is_ok(),
        "recreated"
    );
    // `bmw provision` applies the whole config again.
    bmw::nats::provision::provision(&nats.js, &bmw::nats::provision::Settings::new(1))
        .await
        .unwrap();
    let share = bmw::nats::provision::Settings::new(1).share_of("BMW_EVENTS");
    assert_eq!(config("BMW_EVENTS").await.max_bytes, share);
}
