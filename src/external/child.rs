//! `ChildProcess`: one child process of a declared kind, supervised.
//!
//! - It runs in a process group of its own (stop and kill reach whatever it
//!   starts), and with `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with the
//!   worker even when the worker is killed with `kill -9` (Linux).
//! - Its environment is the worker's without the worker's own `BMW_*`
//!   settings (they may hold secrets), plus the declaration's `env`, plus the
//!   task's `BMW_*` variables; the payload is also written to its stdin as
//!   JSON, which is then closed. A payload larger than [`MAX_ENV_PAYLOAD`]
//!   is on stdin only.
//! - Its stdout and stderr are read line by line into the worker's log with
//!   the task's fields; a line is cut at [`MAX_LINE`] bytes (the rest of it is
//!   read and dropped) and at most [`MAX_LINES_PER_SECOND`] lines a second
//!   per stream are logged (the others are counted), so a flood costs
//!   bounded memory: the pipe holds the child back while the reader works.
//! - A daemon instance's child also gets a group guard
//!   (`ChildProcess::guard_group`): a small `sh` that kills the child's
//!   group when the worker dies, so what the child started does not outlive
//!   a worker killed with `kill -9` either.
//! - Stopping is SIGTERM to the group, then SIGKILL after a grace period;
//!   killing is SIGKILL at once. It is always waited for (no zombie); when it
//!   has ended, what it left in its group is killed. Dropping a
//!   `ChildProcess` that still runs kills its group (and tokio reaps it).

use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Program;

/// The largest payload also passed in `BMW_PAYLOAD` (bytes of JSON); a
/// larger one is on stdin only.
pub const MAX_ENV_PAYLOAD: usize = 64 * 1024;
/// The longest output line logged, in bytes; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 8 * 1024;
/// The most output lines logged per second and stream; the others are counted.
pub const MAX_LINES_PER_SECOND: u32 = 200;
/// How long the output readers get to finish after the child has ended.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// Whose child it is, for the log lines.
#[derive(Debug, Clone)]
pub(crate) enum TaskFields {
    /// An instance of a daemon kind.
    Daemon {
        /// Its uni_id.
        uni_id: String,
        /// Its kind.
        kind: String,
    },
    /// An attempt of an async or periodic task.
    Async {
        /// The task id.
        task_id: String,
        /// Its kind.
        kind: String,
    },
}

impl TaskFields {
    fn log_line(&self, stream: &'static str, line: &str, pid: u32) {
        match self {
            TaskFields::Daemon { uni_id, kind } => {
                tracing::info!(uni_id, kind, pid, stream, line, "task output");
            }
            TaskFields::Async { task_id, kind } => {
                tracing::info!(task_id, kind, pid, stream, line, "task output");
            }
        }
    }

    fn log_dropped(&self, stream: &'static str, dropped: u64, pid: u32) {
        match self {
            TaskFields::Daemon { uni_id, kind } => {
                tracing::warn!(
                    uni_id,
                    kind,
                    pid,
                    stream,
                    dropped,
                    "task output over the rate limit was dropped"
                );
            }
            TaskFields::Async { task_id, kind } => {
                tracing::warn!(
                    task_id,
                    kind,
                    pid,
                    stream,
                    dropped,
                    "task output over the rate limit was dropped"
                );
            }
        }
    }
}

/// A running (or ended, not yet dropped) child process.
#[derive(Debug)]
pub(crate) struct ChildProcess {
    child: tokio::process::Child,
    pid: u32,
    status: Option<ExitStatus>,
    stdout: Option<JoinHandle<Option<String>>>,
    stderr: Option<JoinHandle<Option<String>>>,
    /// The write end of the group guard's stdin (see [`ChildProcess::guard_group`]).
    guard: Option<tokio::process::ChildStdin>,
}

/// The group guard: waits for its stdin to close, then kills the process
/// group given as `$1`. Its stdin is a pipe only the worker writes to, so it
/// closes when the worker lets the child go or dies, however it dies. (No
/// `--` before the group: dash, Debian's `sh`, takes none.)
const GROUP_GUARD: &str = "while read -r _; do :; done; kill -KILL \"-$1\" 2>/dev/null";

/// At most 512 bytes of an output line (cut at a character boundary), for
/// an error message or a result.
pub(crate) fn cut(line: &str) -> &str {
    let mut end = line.len().min(512);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// The last lines of a child's output.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct OutputTail {
    /// The last stdout line, if any.
    pub(crate) stdout: Option<String>,
    /// The last stderr line, if any.
    pub(crate) stderr: Option<String>,
}

impl ChildProcess {
    /// Starts `program` with the task's `BMW_*` variables (`env`) and the
    /// payload on stdin (and in `BMW_PAYLOAD` when small enough).
    pub(crate) fn spawn(
        program: &Program,
        env: Vec<(&'static str, String)>,
        payload: &Value,
        fields: TaskFields,
    ) -> io::Result<ChildProcess> {
        let mut command = tokio::process::Command::new(&program.program);
        command
            .args(&program.args)
            .current_dir(&program.workdir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        // The worker's own settings are not the child's business (tokens, passwords).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BMW_") {
                command.env_remove(key);
            }
        }
        command.envs(program.env.iter().map(|(k, v)| (k, v)));
        let json = payload.to_string();
        if json.len() <= MAX_ENV_PAYLOAD {
            command.env("BMW_PAYLOAD", &json);
        }
        command.envs(env);
        // Die with the worker, however it dies.
        crate::shutdown::die_with_this_process(&mut command, libc::SIGKILL);
        let mut child = command.spawn()?;
        let pid = child.id().unwrap_or_default();
        if let Some(mut stdin) = child.stdin.take() {
            // A child that never reads its stdin gets it closed on exit; errors
            // (it closed stdin early) are its own business.
            tokio::spawn(async move {
                let _ = stdin.write_all(json.as_bytes()).await;
                let _ = stdin.shutdown().await;
            });
        }
        let stdout = child.stdout.take().map(|out| {
            let fields = fields.clone();
            tokio::spawn(read_lines(BufReader::new(out), "stdout", fields, pid))
        });
        let stderr = child
            .stderr
            .take()
            .map(|err| tokio::spawn(read_lines(BufReader::new(err), "stderr", fields, pid)));
        Ok(ChildProcess {
            child,
            pid,
            status: None,
            stdout,
            stderr,
            guard: None,
        })
    }

    /// Starts a guard (`sh`, in a group of its own) that kills this child's
    /// whole process group once the worker lets go of it or dies:
    /// `PR_SET_PDEATHSIG` takes the child with a worker killed by `kill -9`,
    /// but not what the child started itself. Costs one idle `sh` per child,
    /// so daemon instances have one and short async attempts do not.
    pub(crate) fn guard_group(&mut self) {
        if self.pid == 0 || self.status.is_some() {
            return;
        }
        let guard = tokio::process::Command::new("sh")
            .args(["-c", GROUP_GUARD, "bmw-group-guard"])
            .arg(self.pid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        match guard {
            // The guard process is reaped by tokio once it exits.
            Ok(mut guard) => self.guard = guard.stdin.take(),
            Err(e) => tracing::warn!(
                pid = self.pid,
                cause = %e,
                "no group guard for a task process: what it starts may outlive a killed worker"
            ),
        }
    }

    /// The child's process id (also its process group id).
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the child to end (cancel-safe); what it left in its group is
    /// killed then.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self.child.wait().await?;
        self.status = Some(status);
        self.signal_group(libc::SIGKILL);
        // The group is gone: the guard's turn comes and finds nothing to kill.
        drop(self.guard.take());
        Ok(status)
    }

    /// SIGTERM to the group; SIGKILL after `grace` if it still runs. Waits for it.
    pub(crate) async fn stop(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if self.status.is_none() {
            self.signal_group(libc::SIGTERM);
            if let Ok(done) = tokio::time::timeout(grace, self.wait()).await {
                return done;
            }
            tracing::warn!(pid = self.pid, waited = ?grace, "task process ignored SIGTERM; killing it");
        }
        self.kill().await
    }

    /// SIGKILL to the group at once; waits for it.
    pub(crate) async fn kill(&mut self) -> io::Result<ExitStatus> {
        if self.status.is_none() {
            self.signal_group(libc::SIGKILL);
        }
        self.wait().await
    }

    /// The last line of stdout and stderr, once the child has ended (readers
    /// that a leftover holder of the pipes keeps open are given up on).
    pub(crate) async fn output_tail(&mut self) -> OutputTail {
        async fn last(handle: Option<JoinHandle<Option<String>>>) -> Option<String> {
            let handle = handle?;
            tokio::time::timeout(OUTPUT_DRAIN, handle)
                .await
                .ok()?
                .ok()
                .flatten()
        }
        OutputTail {
            stdout: last(self.stdout.take()).await,
            stderr: last(self.stderr.take()).await,
        }
    }

    fn signal_group(&self, signal: libc::c_int) {
        if self.pid == 0 {
            return;
        }
        // SAFETY: killpg has no memory effects; the group is the child's own
        // (process_group(0)), which exists while any of its members does.
        unsafe {
            libc::killpg(self.pid as libc::pid_t, signal);
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // Still running (its task was aborted): kill the group; tokio reaps it.
        if self.status.is_none() {
            self.signal_group(libc::SIGKILL);
        }
        for handle in [self.stdout.take(), self.stderr.take()]
            .into_iter()
            .flatten()
        {
            handle.abort();
        }
    }
}

/// Logs `reader`'s lines until its end; returns the last one.
async fn read_lines<R: AsyncBufRead + Unpin>(
    mut reader: R,
    stream: &'static str,
    fields: TaskFields,
    pid: u32,
) -> Option<String> {
    let mut line = Vec::with_capacity(256);
    let mut last = None;
    let mut window = Instant::now();
    let mut in_window = 0u32;
    let mut dropped = 0u64;
    while let Ok(Some(_truncated)) = next_line(&mut reader, &mut line, MAX_LINE).await {
        let text = String::from_utf8_lossy(&line)
            .trim_end_matches('\r')
            .to_owned();
        if window.elapsed() >= Duration::from_secs(1) {
            if dropped > 0 {
                fields.log_dropped(stream, dropped, pid);
            }
            window = Instant::now();
            in_window = 0;
            dropped = 0;
        }
        if in_window < MAX_LINES_PER_SECOND {
            in_window += 1;
            fields.log_line(stream, &text, pid);
        } else {
            dropped += 1;
        }
        last = Some(text);
    }
    if dropped > 0 {
        fields.log_dropped(stream, dropped, pid);
    }
    last
}

/// Reads the next line (without its `\n`) into `line`, keeping at most `cap`
/// bytes of it and dropping the rest. `Ok(None)` at the end; `Ok(Some(true))`
/// when the line was cut.
async fn next_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    cap: usize,
) -> io::Result<Option<bool>> {
    line.clear();
    let mut truncated = false;
    let mut read_any = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(read_any.then_some(truncated));
        }
        read_any = true;
        let newline = buf.iter().position(|b| *b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        let room = cap.saturating_sub(line.len());
        if chunk.len() > room {
            truncated = true;
        }
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = newline.map_or(buf.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(Some(truncated));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_cut_at_the_cap_and_the_rest_is_dropped() {
        let input = format!("short\n{}\nend", "x".repeat(100));
        let mut reader = BufReader::with_capacity(16, input.as_bytes());
        let mut line = Vec::new();
        assert_eq!(
            next_line(&mut reader, &mut line, 10).await.unwrap(),
            Some(false)
        );
        assert_eq!(line, b"short");
        assert_eq!(
            next_line(&mut reader, &mut line, 10).await.unwrap(),
            Some(true)
        );
        assert_eq!(line, b"xxxxxxxxxx");
        assert_eq!(
            next_line(&mut reader, &mut line, 10).await.unwrap(),
            Some(false)
        );
        assert_eq!(line, b"end");
        assert_eq!(next_line(&mut reader, &mut line, 10).await.unwrap(), None);
    }
}
