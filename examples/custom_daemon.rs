//! A user-written daemon task registered next to the built-ins, run as a
//! worker: `cargo run --example custom_daemon -- nats://127.0.0.1:4222`, then
//! `bmw task create daemon:example:counter '{"data_id": 7, "every_ms": 500}'`.
//!
//! The operator counts up until cancelled and fails (to be retried with
//! back-off) when the payload lacks `every_ms`. Its dimension is the data id,
//! so one instance runs per data id whatever else the payload holds.

use std::sync::Arc;
use std::time::Duration;

use bmw::Config;
use bmw::daemon::{Operator, OperatorContext, OperatorError};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

struct Counter;

impl Operator for Counter {
    fn start<'a>(
        &'a self,
        ctx: OperatorContext,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(async move {
            let every = payload["every_ms"]
                .as_u64()
                .ok_or("payload needs `every_ms`")?;
            let mut tick = tokio::time::interval(Duration::from_millis(every));
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        n += 1;
                        tracing::info!(uni_id = %ctx.uni_id, n, "counted");
                    }
                    () = ctx.cancelled() => return Ok(()),
                }
            }
        })
    }

    fn task_dimension(&self, payload: &Value) -> String {
        // `"1573001"` and `1573001` both give `1573001`, the label bk-monitor queries.
        bmw::daemon::operator::field_text(payload, "data_id")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // bmw's logging: `BMW_LOG` or info, and `POST /bmw/log/level` where a bridge runs.
    bmw::logging::init(false, None);
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let mut registry = bmw::builtin::registry();
    registry.register_daemon("daemon:example:counter", || {
        Ok(Arc::new(Counter) as Arc<dyn Operator>)
    })?;
    let config = Config {
        nats_url: Some(url),
        ..Config::default()
    };
    let token = CancellationToken::new();
    let on_signal = token.clone();
    tokio::spawn(async move {
        bmw::shutdown::shutdown_signal().await;
        on_signal.cancel();
    });
    bmw::service::run_worker(config, Arc::new(registry), token).await?;
    Ok(())
}
