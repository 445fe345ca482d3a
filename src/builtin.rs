//! Built-in kinds, registered through the same public API users call:
//! `daemon:demo:demo`, exactly BMW's demo (prints the start line, then the
//! current time every 5 s; any `content` other than `ok` fails),
//! `daemon:demo:dimension` (waits quietly; its `task_dimension` is
//! `payload.data_id`, as APM's pre-calculation has it; `{"fail": true}` fails
//! at once), and the async
//! demos `async:demo:echo` (logs the payload), `async:demo:sleep`
//! (`{"seconds": n}`; logs its task id as it starts), `async:demo:fail` (`{"fail_times": n}` fails the first n
//! attempts; `{"skip_retry": true}` fails for good) and `async:demo:noop`, and
//! the periodic `periodic:demo:tick` (logs each tick; no schedule declared).
//!
//! The demo prints to stdout, as the seed shows; that is the one place the
//! library prints.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;

use crate::daemon::{Operator, OperatorContext, OperatorError};
use crate::queue::{TaskContext, TaskError};
use crate::registry::{Registry, RegistryError};

/// A registry holding the built-in kinds (what `bmw run` starts with).
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    // The built-in kinds are valid and distinct: registering them cannot fail.
    if let Err(e) = register(&mut registry) {
        unreachable!("built-in kinds are valid and distinct: {e}");
    }
    registry
}

/// Registers every built-in kind.
pub fn register(registry: &mut Registry) -> Result<(), RegistryError> {
    registry.register_daemon("daemon:demo:demo", || {
        Ok(Arc::new(Demo) as Arc<dyn Operator>)
    })?;
    registry.register_daemon("daemon:demo:dimension", || {
        Ok(Arc::new(ByDataId) as Arc<dyn Operator>)
    })?;
    registry.register_async(
        "async:demo:echo",
        |ctx: TaskContext, payload: Value| async move {
            tracing::info!(task_id = ctx.task_id, %payload, "echo");
            Ok(())
        },
    )?;
    registry.register_async("async:demo:noop", |_: TaskContext, _: Value| async {
        Ok(())
    })?;
    registry.register_async(
        "async:demo:sleep",
        |ctx: TaskContext, payload: Value| async move {
            let seconds = payload
                .get("seconds")
                .and_then(Value::as_f64)
                .unwrap_or(1.0)
                .max(0.0);
            let Ok(duration) = Duration::try_from_secs_f64(seconds) else {
                return Err(TaskError::skip_retry(format!(
                    "`seconds` is out of range: {seconds}"
                )));
            };
            // Each run is logged: the chaos suite counts runs of slow tasks.
            tracing::info!(task_id = ctx.task_id, seconds, "sleep");
            tokio::select! {
                () = tokio::time::sleep(duration) => Ok(()),
                () = ctx.cancelled() => Err(TaskError::new("cancelled")),
            }
        },
    )?;
    registry.register_async(
        "async:demo:fail",
        |ctx: TaskContext, payload: Value| async move {
            if payload.get("skip_retry").and_then(Value::as_bool) == Some(true) {
                return Err(TaskError::skip_retry("told to fail for good"));
            }
            if payload.get("panic").and_then(Value::as_bool) == Some(true) && ctx.attempt == 1 {
                panic!("told to panic");
            }
            let fail_times = payload
                .get("fail_times")
                .and_then(Value::as_u64)
                .unwrap_or(u64::MAX);
            if u64::from(ctx.attempt) <= fail_times {
                return Err(TaskError::new(format!(
                    "failing attempt {} of {fail_times}",
                    ctx.attempt
                )));
            }
            Ok(())
        },
    )?;
    // A handler only: create its schedule at run time (`options.every` or `options.cron`).
    registry.register_periodic(
        "periodic:demo:tick",
        None,
        |ctx: TaskContext, payload: Value| async move {
            tracing::info!(task_id = ctx.task_id, kind = ctx.kind, %payload, "tick");
            Ok(())
        },
    )?;
    Ok(())
}

/// BMW's demo daemon.
#[derive(Debug, Clone, Copy)]
pub struct Demo;

/// Go's `%v` of a decoded JSON payload (`map[content:ok]`), as the seed prints it.
fn go_format(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}:{}", go_format(v)))
                .collect();
            format!("map[{}]", items.join(" "))
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(go_format).collect::<Vec<_>>().join(" ")
        ),
        Value::String(s) => s.clone(),
        Value::Null => "<nil>".to_owned(),
        other => other.to_string(),
    }
}

impl Operator for Demo {
    fn start<'a>(
        &'a self,
        ctx: OperatorContext,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(async move {
            println!("start task instance, payload: {} ", go_format(payload));
            if payload.get("content").and_then(Value::as_str) != Some("ok") {
                return Err(OperatorError::new("receive abnormal payload"));
            }
            let period = Duration::from_secs(5);
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {
                        println!("当前时间:  {}", chrono::Local::now().format("%Y-%m-%d %H:%M:%S"));
                    }
                    () = ctx.cancelled() => {
                        println!("receive task instance done, return");
                        return Ok(());
                    }
                }
            }
        })
    }
}

/// A daemon keyed by `payload.data_id`: one instance per data id, whose
/// `daemon_running_task_count` series carries `task_dimension="<data_id>"`.
#[derive(Debug, Clone, Copy)]
pub struct ByDataId;

impl Operator for ByDataId {
    fn start<'a>(
        &'a self,
        ctx: OperatorContext,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(async move {
            if payload.get("fail").and_then(Value::as_bool) == Some(true) {
                return Err(OperatorError::new("told to fail"));
            }
            ctx.cancelled().await;
            Ok(())
        })
    }

    fn task_dimension(&self, payload: &Value) -> String {
        crate::daemon::operator::field_text(payload, "data_id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prints_payloads_like_go() {
        assert_eq!(go_format(&json!({"content": "ok"})), "map[content:ok]");
        assert_eq!(
            go_format(&json!({"b": [1, "x"], "a": null})),
            "map[a:<nil> b:[1 x]]"
        );
    }

    #[tokio::test]
    async fn demo_fails_on_abnormal_payload_and_stops_on_cancel() {
        let token = tokio_util::sync::CancellationToken::new();
        let ctx = OperatorContext::new(crate::task::UniId::from_raw("x"), token.clone());
        let bad = json!({"content": "not_ok"});
        assert_eq!(
            Demo.start(ctx.clone(), &bad).await,
            Err(OperatorError::new("receive abnormal payload"))
        );
        token.cancel();
        assert_eq!(Demo.start(ctx, &json!({"content": "ok"})).await, Ok(()));
    }
}
