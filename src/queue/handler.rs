//! The [`Handler`] trait: what an async task does, and what it returns.
//!
//! A handler gets a [`TaskContext`] (task id, attempt, deadline, cancellation
//! token, the worker's NATS connection) and the payload, and returns `Ok(())`,
//! a [`TaskError`] to retry with back-off, or a [`TaskError::skip_retry`] that
//! archives the task at once. A timeout, a passed deadline or a panic fails
//! the attempt like an error does.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::task::Kind;

/// What one attempt of a task gets.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The task's id.
    pub task_id: String,
    /// Its kind.
    pub kind: String,
    /// Its queue.
    pub queue: String,
    /// This attempt, from 1.
    pub attempt: u32,
    /// The worker running the attempt.
    pub worker_id: String,
    /// Retries allowed after the first attempt.
    pub max_retry: u32,
    /// Fires on timeout, deadline, delete or shutdown; `select!` on it.
    pub token: CancellationToken,
    /// When this attempt's time is up: its task's `timeout` or `deadline`,
    /// else the worker's `--async-default-timeout`, whichever comes first
    /// (`None`: unlimited). Handlers that call out pass it on.
    pub deadline: Option<chrono::DateTime<chrono::Utc>>,
    /// The worker's NATS connection, for handlers that call out over NATS
    /// (`crate::external::service`); a clone is a few reference counts.
    pub nats: async_nats::Client,
}

impl TaskContext {
    /// Resolves when the attempt must stop.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    message: String,
    skip_retry: bool,
    retry_after: Option<Duration>,
}

impl TaskError {
    /// A failure that is retried with the default back-off.
    pub fn new(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            skip_retry: false,
            retry_after: None,
        }
    }

    /// A failure that is not retried: the task is archived at once.
    pub fn skip_retry(message: impl Into<String>) -> Self {
        TaskError {
            skip_retry: true,
            ..TaskError::new(message)
        }
    }

    /// A failure retried after `delay` instead of the default back-off (at
    /// most the worker's `--async-retry-max`).
    pub fn retry_after(message: impl Into<String>, delay: Duration) -> Self {
        TaskError {
            retry_after: Some(delay),
            ..TaskError::new(message)
        }
    }

    /// Whether retries are skipped.
    pub fn skips_retry(&self) -> bool {
        self.skip_retry
    }

    /// The handler's own retry delay, if any.
    pub fn delay(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskError {}

impl From<&str> for TaskError {
    fn from(message: &str) -> Self {
        TaskError::new(message)
    }
}

impl From<String> for TaskError {
    fn from(message: String) -> Self {
        TaskError::new(message)
    }
}

/// The text of a caught panic (`panic!("...")` carries a `&str` or a
/// `String`); used wherever bmw catches one: a handler's, a command's, a
/// request's.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// An async task implementation, shared by every task of its kind.
///
/// Like a daemon `Operator`, `handle` returns a boxed future so that
/// handlers can live in [`Handlers`] as `Arc<dyn Handler>`.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt.
    fn handle<'a>(
        &'a self,
        ctx: TaskContext,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), TaskError>>;
}

/// Any `Fn(TaskContext, Value) -> Future` is a handler.
impl<F, Fut> Handler for F
where
    F: Fn(TaskContext, Value) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), TaskError>> + Send + 'static,
{
    fn handle<'a>(
        &'a self,
        ctx: TaskContext,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), TaskError>> {
        Box::pin((self)(ctx, payload.clone()))
    }
}

/// The async and periodic kinds this binary can run, with their handlers.
/// Cheap to clone (the handlers are shared).
#[derive(Clone, Default)]
pub struct Handlers {
    map: BTreeMap<Kind, Arc<dyn Handler>>,
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.map.keys()).finish()
    }
}

impl Handlers {
    /// Adds the handler of `kind`; `false` (and no change) if it has one.
    pub fn insert(&mut self, kind: Kind, handler: Arc<dyn Handler>) -> bool {
        if self.map.contains_key(&kind) {
            return false;
        }
        self.map.insert(kind, handler);
        true
    }

    /// The handler of a kind.
    pub fn get(&self, kind: &Kind) -> Option<Arc<dyn Handler>> {
        self.map.get(kind).cloned()
    }

    /// Whether `kind` has a handler.
    pub fn contains(&self, kind: &Kind) -> bool {
        self.map.contains_key(kind)
    }

    /// The kinds, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &Kind> {
        self.map.keys()
    }
}
