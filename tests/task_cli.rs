//! `bmw task` as a scripting tool (issue 26, part 5): only its answer on
//! stdout, nothing on stderr unless `-v` or an error (said once), and exit
//! codes a script can use: 0 done, 1 refused by bmw, 2 bad usage, 3 NATS
//! not reachable, in seconds rather than after the 30 s a service waits.

use std::time::{Duration, Instant};

use crate::harness::{TestEnv, free_port};

/// Runs `bmw <args>` (no `BMW_LOG`), returns (exit code, stdout, stderr, time taken).
async fn bmw(args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let started = Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_bmw"))
            .args(args)
            .env_remove("BMW_LOG")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("bmw ends within 60 s")
    .expect("bmw runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_command_prints_its_answer_and_nothing_else() {
    let env = TestEnv::start().await;
    let url = env.url();
    let (code, stdout, stderr, _) = bmw(&["task", "list", "--nats-url", &url]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert!(rows.is_array(), "{rows}");
    assert_eq!(stderr, "", "nothing but the answer without -v");

    // -v: what it does, on stderr; the answer is the same.
    let (code, stdout, stderr, _) = bmw(&["task", "-v", "list", "--nats-url", &url]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(serde_json::from_str::<serde_json::Value>(&stdout).is_ok());
    assert!(stderr.contains("INFO"), "-v logs: {stderr}");

    // --table: the same rows for a person, one line each under a header.
    let created = bmw(&["task", "create", "async:demo:noop", "--nats-url", &url]).await;
    assert_eq!(created.0, Some(0), "{created:?}");
    let (code, stdout, stderr, _) = bmw(&[
        "task",
        "list",
        "--type",
        "async",
        "--table",
        "--nats-url",
        &url,
    ])
    .await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one row:\n{stdout}");
    assert!(
        lines[0].starts_with("task_id") && lines[0].contains("kind"),
        "{stdout}"
    );
    assert!(lines[1].contains("async:demo:noop"), "{stdout}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&stdout).is_err(),
        "not JSON"
    );

    // Refused by bmw: exit 1, the refusal on stdout as the bridge would send it.
    let (code, stdout, stderr, _) =
        bmw(&["task", "create", "not-a-kind", "--nats-url", &url]).await;
    assert_eq!(code, Some(1), "stdout: {stdout} stderr: {stderr}");
}

/// `bmw task` builds each command as the JSON a producer publishes and
/// sends it through the wire parser the bridge uses: its refusals are the
/// bridge's, field names included.
#[tokio::test(flavor = "multi_thread")]
async fn task_commands_go_through_the_wire_parser_and_are_refused_as_the_bridge_refuses() {
    let env = TestEnv::start().await;
    let url = env.url();
    let refused = async |args: &[&str]| {
        let mut all = vec!["task"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--nats-url", &url]);
        let (code, stdout, stderr, _) = bmw(&all).await;
        assert_eq!(code, Some(1), "{args:?}: stdout {stdout} stderr {stderr}");
        let outcome: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not the outcome ({e}): {stdout}"));
        assert_eq!(outcome["result"], false, "{outcome}");
        assert_eq!(outcome["code"], 400, "{outcome}");
        outcome["message"].as_str().unwrap_or_default().to_owned()
    };
    let message = refused(&["delete", "x", "--type", "cron"]).await;
    assert!(message.contains("task_type"), "names the field: {message}");
    let message = refused(&["create", "async:demo:noop", "--options", r#"{"queue": 7}"#]).await;
    assert!(message.contains("queue"), "names the option: {message}");
    let message = refused(&["reload", "daemon:demo:demo:x", "[1]"]).await;
    assert!(message.contains("payload"), "names the payload: {message}");

    // An argument that is not JSON at all: one line on stderr, exit 1.
    let (code, stdout, stderr, _) = bmw(&[
        "task",
        "create",
        "async:demo:noop",
        "{not json",
        "--nats-url",
        &url,
    ])
    .await;
    assert_eq!(code, Some(1), "stdout {stdout} stderr {stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("bmw: payload is not JSON"), "{stderr}");

    // And what the parser accepts is done.
    let (code, stdout, stderr, _) = bmw(&[
        "task",
        "create",
        "async:demo:noop",
        "{}",
        "--options",
        r#"{"queue": "default"}"#,
        "--nats-url",
        &url,
    ])
    .await;
    assert_eq!(code, Some(0), "stdout {stdout} stderr {stderr}");
    let outcome: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let task_id = outcome["data"]["task_id"]
        .as_str()
        .expect("a task id")
        .to_owned();
    let (code, stdout, stderr, _) = bmw(&[
        "task",
        "delete",
        &task_id,
        "--type",
        "async",
        "--nats-url",
        &url,
    ])
    .await;
    assert_eq!(code, Some(0), "stdout {stdout} stderr {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_command_without_nats_says_so_once_and_exits_3_in_seconds() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let (code, stdout, stderr, took) = bmw(&["task", "list", "--nats-url", &url]).await;
    assert_eq!(code, Some(3), "stdout: {stdout} stderr: {stderr}");
    assert_eq!(stdout, "");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].starts_with("bmw: ") && lines[0].contains("127.0.0.1"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(15), "gave up after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn task_help_names_the_exit_codes_and_shows_examples() {
    let (code, stdout, _, _) = bmw(&["task", "--help"]).await;
    assert_eq!(code, Some(0));
    for needle in ["Exit codes", "3", "Examples", "bmw task create"] {
        assert!(stdout.contains(needle), "{needle:?} in:\n{stdout}");
    }
    let (code, _, stderr, _) = bmw(&["task", "no-such-subcommand"]).await;
    assert_eq!(code, Some(2), "{stderr}");
}
