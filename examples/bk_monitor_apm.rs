//! bmw with the daemon kind bk-monitor's APM pre-calculation drives,
//! `daemon:apm:pre_calculate`, registered in Rust next to the built-ins: a
//! program of your own that embeds bmw with your kinds.
//!
//! ```text
//! cargo run --example bk_monitor_apm -- run    bmw.toml   # bridge + worker
//! cargo run --example bk_monitor_apm -- worker bmw.toml   # a worker (metrics on 10213)
//! cargo run --example bk_monitor_apm -- bridge bmw.toml   # the bridge alone
//! ```
//!
//! The settings come from the TOML file (keys are the long flag names:
//! `nats-url`, `queues`, `metrics-addr`...). The operator logs its payload
//! when an instance starts and then waits until it is stopped; its dimension
//! is `payload.data_id` as plain text, the `task_dimension` label bk-monitor
//! queries `daemon_running_task_count` by.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bmw::config::{Config, ConfigOverrides};
use bmw::daemon::{Operator, OperatorContext, OperatorError};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The pre-calculation of one data id: here it only runs until stopped.
struct PreCalculate;

impl Operator for PreCalculate {
    fn start<'a>(
        &'a self,
        ctx: OperatorContext,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(async move {
            tracing::info!(uni_id = %ctx.uni_id, %payload, "pre-calculation started");
            ctx.cancelled().await;
            Ok(())
        })
    }

    fn task_dimension(&self, payload: &Value) -> String {
        bmw::daemon::operator::field_text(payload, "data_id")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let role = args.next().unwrap_or_else(|| "worker".into());
    let overrides = match args.next() {
        Some(path) => ConfigOverrides::from_file(Path::new(&path))?,
        None => ConfigOverrides::default(),
    };
    let config = Config::resolve(overrides)?;
    bmw::logging::init(false, None);
    let mut registry = bmw::builtin::registry();
    registry.register_daemon("daemon:apm:pre_calculate", || {
        Ok(Arc::new(PreCalculate) as Arc<dyn Operator>)
    })?;
    let registry = Arc::new(registry);
    let token = CancellationToken::new();
    let on_signal = token.clone();
    tokio::spawn(async move {
        bmw::shutdown::shutdown_signal().await;
        on_signal.cancel();
    });
    match role.as_str() {
        "run" => bmw::service::run_all(config, registry, token).await,
        "worker" => bmw::service::run_worker(config, registry, token).await,
        "bridge" => bmw::service::run_bridge(config, registry, token).await,
        other => anyhow::bail!("unknown role `{other}`: run, worker or bridge"),
    }
    .context(role)?;
    Ok(())
}
