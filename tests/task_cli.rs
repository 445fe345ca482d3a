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
