//! [`ProcessHandler`]: an async or periodic kind whose attempts are child
//! processes (a declared `command`), one per attempt.
//!
//! The payload is on stdin (and in `BMW_PAYLOAD`). Exit status 0 is success
//! (the last stdout line, if any, is logged as the task's `result`);
//! [`EXIT_NO_RETRY`] (65, `EX_DATAERR`) fails the task without retries (it
//! goes to the dead letters); any other status, or death by a signal, fails
//! the attempt and the task is retried with the worker's back-off. A
//! timeout, a passed deadline, a delete or a shutdown kills the process group
//! at once (SIGKILL).

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;

use super::Program;
use super::child::{ChildProcess, TaskFields, cut};
use crate::queue::{Handler, TaskContext, TaskError};

/// The exit status that means "failed, do not retry" (`EX_DATAERR` of sysexits.h).
pub const EXIT_NO_RETRY: i32 = 65;

/// Runs a declared command per attempt.
#[derive(Debug)]
pub struct ProcessHandler {
    program: Arc<Program>,
}

impl ProcessHandler {
    /// The handler that runs `program`.
    pub fn new(program: Arc<Program>) -> Self {
        ProcessHandler { program }
    }

    async fn run(&self, ctx: TaskContext, payload: &Value) -> Result<(), TaskError> {
        let env = vec![
            ("BMW_TASK_ID", ctx.task_id.clone()),
            ("BMW_KIND", ctx.kind.clone()),
            ("BMW_QUEUE", ctx.queue.clone()),
            ("BMW_ATTEMPT", ctx.attempt.to_string()),
            ("BMW_MAX_RETRY", ctx.max_retry.to_string()),
            ("BMW_WORKER_ID", ctx.worker_id.clone()),
        ];
        let fields = TaskFields::Async {
            task_id: ctx.task_id.clone(),
            kind: ctx.kind.clone(),
        };
        let mut child = ChildProcess::spawn(&self.program, env, payload, fields).map_err(|e| {
            TaskError::new(format!(
                "cannot start {}: {e}",
                self.program.program.display()
            ))
        })?;
        let status = tokio::select! {
            status = child.wait() => status,
            () = ctx.cancelled() => {
                let _ = child.kill().await;
                return Err(TaskError::new("cancelled: the task process was killed"));
            }
        };
        let status =
            status.map_err(|e| TaskError::new(format!("task process not waited for: {e}")))?;
        let tail = child.output_tail().await;
        if status.success() {
            if let Some(result) = &tail.stdout {
                tracing::info!(
                    task_id = ctx.task_id,
                    kind = ctx.kind,
                    result = cut(result),
                    "task result"
                );
            }
            return Ok(());
        }
        let mut message = format!("task process {status}");
        if let Some(last) = &tail.stderr {
            message.push_str("; last stderr line: ");
            message.push_str(cut(last));
        }
        Err(if status.code() == Some(EXIT_NO_RETRY) {
            TaskError::skip_retry(message)
        } else {
            TaskError::new(message)
        })
    }
}

impl Handler for ProcessHandler {
    fn handle<'a>(
        &'a self,
        ctx: TaskContext,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), TaskError>> {
        Box::pin(self.run(ctx, payload))
    }
}
