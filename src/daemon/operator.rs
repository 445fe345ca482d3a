//! The [`Operator`] trait: what a daemon task does (the Rust form of BMW's
//! `Operator` with `Start(ctx, errorChan, payload)` and `GetTaskDimension`).
//!
//! The maintainer calls [`Operator::start`] once per run of an instance. The
//! operator loops until [`OperatorContext::cancelled`] fires and then returns
//! `Ok(())`; a foreseeable failure is returned as `Err` (BMW's send on
//! `errorReceiveChan`), after which the maintainer retries with back-off.
//! Returning `Ok` while not cancelled also counts as a failure: a daemon must
//! not end by itself. A panic counts as a failure too and never takes the
//! worker down.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::task::UniId;

/// A daemon task's failure, as reported to the maintainer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorError {
    message: String,
}

impl OperatorError {
    /// A failure with a message (logged in the `[RETRY]` line and the `error` event).
    pub fn new(message: impl Into<String>) -> Self {
        OperatorError {
            message: message.into(),
        }
    }
}

impl fmt::Display for OperatorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OperatorError {}

impl From<String> for OperatorError {
    fn from(message: String) -> Self {
        OperatorError { message }
    }
}

impl From<&str> for OperatorError {
    fn from(message: &str) -> Self {
        OperatorError::new(message)
    }
}

/// What a run of an instance gets: its identity and a cancellation signal.
#[derive(Debug, Clone)]
pub struct OperatorContext {
    /// The instance's uni_id.
    pub uni_id: UniId,
    /// Fires when the run must stop (delete, reload, lost claim, rebalance, shutdown).
    pub token: CancellationToken,
    // What an operator that runs other programs (`crate::external`) passes on.
    /// The worker running the instance.
    pub worker_id: String,
    /// Failed runs since the instance was created or last reloaded.
    pub retry_count: u32,
    /// Reloads so far.
    pub reload_count: u32,
    /// How long the run may take to stop after `token` fires, before it is aborted.
    pub grace: Duration,
    /// Fires (before `token`) when the claim is lost: another worker may run
    /// the instance already, so stop at once, without a grace period.
    pub lost: CancellationToken,
}

impl OperatorContext {
    /// A context for `uni_id` stopped by `token`, with no worker, no counts
    /// and no grace period (tests, and operators run by hand).
    pub fn new(uni_id: UniId, token: CancellationToken) -> Self {
        OperatorContext {
            uni_id,
            token,
            worker_id: String::new(),
            retry_count: 0,
            reload_count: 0,
            grace: Duration::ZERO,
            lost: CancellationToken::new(),
        }
    }

    /// Whether the run stops because its claim was lost (stop at once).
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Resolves when the run must stop; `select!` on it in every loop.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// Whether the run must stop.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// A daemon task implementation, built once per worker by its factory and
/// shared by all instances of its kind (BMW's `initialFunc` singleton).
///
/// `start` returns a boxed future rather than being an `async fn` because the
/// registry holds operators as `Arc<dyn Operator>`, and an `async fn` in a
/// trait cannot be called through `dyn`.
///
/// ```
/// use bmw::daemon::{Operator, OperatorContext, OperatorError};
/// use futures::future::BoxFuture;
/// use serde_json::Value;
///
/// struct Ticker;
///
/// impl Operator for Ticker {
///     fn start<'a>(&'a self, ctx: OperatorContext, payload: &'a Value)
///         -> BoxFuture<'a, Result<(), OperatorError>> {
///         Box::pin(async move {
///             let every = payload["seconds"].as_u64().ok_or("payload needs `seconds`")?;
///             let mut tick = tokio::time::interval(std::time::Duration::from_secs(every));
///             loop {
///                 tokio::select! {
///                     _ = tick.tick() => tracing::info!("tick"),
///                     () = ctx.cancelled() => return Ok(()),
///                 }
///             }
///         })
///     }
///
///     fn task_dimension(&self, payload: &Value) -> String {
///         payload["data_id"].to_string()
///     }
/// }
/// ```
pub trait Operator: Send + Sync + 'static {
    /// Runs one instance until `ctx` is cancelled (`Ok`) or it fails (`Err`).
    fn start<'a>(
        &'a self,
        ctx: OperatorContext,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), OperatorError>>;

    /// The instance's dimension (e.g. a data id); empty means "the whole
    /// payload". It decides the uni_id and the `task_dimension` metric label.
    fn task_dimension(&self, _payload: &Value) -> String {
        String::new()
    }
}

/// A payload field as the text a `task_dimension` wants: a JSON string as its
/// plain text (`"1573001"` gives `1573001`, as BMW's Go code does), anything
/// else as its JSON (`7` gives `7`), a missing field as empty (the uni_id then
/// comes from the whole payload).
///
/// ```
/// use serde_json::json;
/// let payload = json!({"data_id": "1573001", "n": 7});
/// assert_eq!(bmw::daemon::operator::field_text(&payload, "data_id"), "1573001");
/// assert_eq!(bmw::daemon::operator::field_text(&payload, "n"), "7");
/// assert_eq!(bmw::daemon::operator::field_text(&payload, "missing"), "");
/// ```
pub fn field_text(payload: &Value, field: &str) -> String {
    match payload.get(field) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}
