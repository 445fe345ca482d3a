//! BMW's log lines, kept word for word because operators grep for them
//! (`bmw-seed.md`): the binding line when an instance starts and the `[RETRY]`
//! line when it failed.

use std::time::Duration;

use chrono::{DateTime, Local};

use crate::task::UniId;

/// `Binding(<uni_id> <------> <worker_id>) is discovered, task is started, payload: ...`
pub(crate) fn binding_discovered(uni_id: &UniId, worker_id: &str, payload: &str) {
    tracing::info!(
        uni_id = %uni_id,
        worker_id,
        "Binding({uni_id} <------> {worker_id}) is discovered, task is started, payload: {payload}"
    );
}

/// `[RETRY] receive ERROR: ... Task: ..., retryCount: N reloadCount: M The retry time of the next attempt is: ..., (10.00 seconds later)`
pub(crate) fn retry(
    uni_id: &UniId,
    error: &str,
    retry_count: u32,
    reload_count: u32,
    at: DateTime<Local>,
    delay: Duration,
) {
    tracing::warn!(
        uni_id = %uni_id,
        retry_count,
        reload_count,
        "[RETRY] receive ERROR: {error}. Task: {uni_id}, retryCount: {retry_count} reloadCount: {reload_count} \
         The retry time of the next attempt is: {}, ({:.2} seconds later)",
        at.format("%Y-%m-%d %H:%M:%S%.6f %z"),
        delay.as_secs_f64()
    );
}
