//! Periodic tasks: cron or interval schedules, fired by nats-server itself
//! (`Nats-Schedule` messages in `BMW_SCHEDULES`), so each tick is enqueued exactly
//! once however many workers run, with no leader. A tick is an async task of
//! the periodic kind, run by the async machinery (retries, timeout, events).
//!
//! [`schedule`] parses and checks schedules; [`store`] keeps specs and
//! schedule messages; [`ops`] is what callers use (create, delete, pause,
//! resume, list); [`PeriodicDeclaration`]s registered in code are
//! reconciled into the stream by every worker at start ([`reconcile`]).

pub mod ops;
pub mod schedule;
pub mod store;

use serde_json::Value;

pub use ops::PeriodicOps;
pub use schedule::{Schedule, parse_timezone};
pub use store::{PeriodicError, PeriodicSpec, PeriodicStatus, PeriodicStore};

use crate::task::Options;

/// A periodic task declared in code: what [`crate::Registry::register_periodic`] takes.
#[derive(Debug, Clone)]
pub struct PeriodicDeclaration {
    /// When it fires.
    pub schedule: Schedule,
    /// IANA time zone of a cron schedule (`None`: UTC).
    pub timezone: Option<String>,
    /// Payload of every tick.
    pub payload: Value,
    /// Async options of every tick.
    pub options: Options,
}

/// Writes the declared schedules: creates missing ones, updates changed ones,
/// leaves identical ones alone (a pause survives restarts). Many workers
/// starting at once still leave one schedule per kind (rollup).
pub async fn reconcile(
    store: &PeriodicStore,
    declared: &[(crate::task::Kind, PeriodicDeclaration)],
) -> Result<(), PeriodicError> {
    for (kind, d) in declared {
        let wanted = PeriodicSpec {
            kind: kind.clone(),
            schedule: d.schedule.clone(),
            timezone: d.timezone.clone(),
            payload: d.payload.clone(),
            options: d.options.clone(),
            paused: false,
            declared: true,
            created_at: chrono::Utc::now().to_rfc3339(),
        };
        match store.get(kind.as_str()).await? {
            Some(current) if current.same_schedule(&wanted) => {
                if !current.paused && !store.has_schedule(kind.as_str()).await? {
                    store.apply(&current).await?;
                }
            }
            Some(current) => {
                let updated = PeriodicSpec {
                    paused: current.paused,
                    created_at: current.created_at,
                    ..wanted
                };
                tracing::info!(kind = %kind, schedule = updated.schedule.text(), "declared periodic task updated");
                store.apply(&updated).await?;
            }
            None => {
                tracing::info!(kind = %kind, schedule = wanted.schedule.text(), "declared periodic task created");
                store.apply(&wanted).await?;
            }
        }
    }
    Ok(())
}
