//! [`ProcessOperator`]: a daemon kind whose instances are child processes
//! (a declared `command`).
//!
//! Each run of an instance starts the command ([`super::child`]). The process
//! ending, whatever its exit status, is a failure: the maintainer retries it
//! with its back-off (a daemon does not end by itself). When the run is
//! stopped (delete, reload, hand-over, shutdown) the process group gets
//! SIGTERM, then SIGKILL when the worker's `--grace` is nearly over; when the
//! claim is lost it gets SIGKILL at once. A reload is a stop and a new run
//! with the new payload. The declared `dimension` field of the payload is the
//! instance's `task_dimension`, as a compiled operator's.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;

use super::Program;
use super::child::{ChildProcess, TaskFields, cut};
use crate::daemon::operator::field_text;
use crate::daemon::{Operator, OperatorContext, OperatorError};

/// Runs a declared command per daemon instance.
#[derive(Debug)]
pub struct ProcessOperator {
    program: Arc<Program>,
    dimension: Option<String>,
}

impl ProcessOperator {
    /// The operator of `program`, whose instances' dimension is the payload
    /// field `dimension` (none: the whole payload).
    pub fn new(program: Arc<Program>, dimension: Option<String>) -> Self {
        ProcessOperator { program, dimension }
    }

    async fn run(&self, ctx: OperatorContext, payload: &Value) -> Result<(), OperatorError> {
        let env = vec![
            ("BMW_UNI_ID", ctx.uni_id.to_string()),
            ("BMW_KIND", self.program.kind.to_string()),
            ("BMW_WORKER_ID", ctx.worker_id.clone()),
            ("BMW_RETRY_COUNT", ctx.retry_count.to_string()),
            ("BMW_RELOAD_COUNT", ctx.reload_count.to_string()),
            ("BMW_TASK_DIMENSION", self.task_dimension(payload)),
        ];
        let fields = TaskFields::Daemon {
            uni_id: ctx.uni_id.to_string(),
            kind: self.program.kind.to_string(),
        };
        let mut child = ChildProcess::spawn(&self.program, env, payload, fields).map_err(|e| {
            OperatorError::new(format!(
                "cannot start {}: {e}",
                self.program.program.display()
            ))
        })?;
        child.guard_group();
        tracing::info!(uni_id = %ctx.uni_id, pid = child.pid(), program = %self.program.program.display(), "task process started");
        tokio::select! {
            status = child.wait() => {
                let tail = child.output_tail().await;
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                Err(OperatorError::new(match tail.stderr {
                    Some(last) => format!("task process {status}; last stderr line: {}", cut(&last)),
                    None => format!("task process {status}"),
                }))
            }
            () = ctx.cancelled() => {
                let status = if ctx.is_lost() {
                    child.kill().await
                } else {
                    // SIGKILL a little before the maintainer's own patience runs out.
                    child.stop(ctx.grace.saturating_sub(ctx.grace / 10).max(Duration::from_millis(10))).await
                };
                tracing::info!(uni_id = %ctx.uni_id, pid = child.pid(), lost = ctx.is_lost(), status = ?status.ok(), "task process stopped");
                Ok(())
            }
        }
    }
}

impl Operator for ProcessOperator {
    fn start<'a>(
        &'a self,
        ctx: OperatorContext,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(self.run(ctx, payload))
    }

    fn task_dimension(&self, payload: &Value) -> String {
        self.dimension
            .as_deref()
            .map(|field| field_text(payload, field))
            .unwrap_or_default()
    }
}
