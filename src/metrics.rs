//! Metric names, labels and recording (design.md §7); nothing else names a metric.
//!
//! [`install`] sets up the Prometheus recorder once per process; `/metrics`
//! renders it through [`render`].

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// One series per running daemon instance, 1 while it runs.
pub const DAEMON_RUNNING_TASK_COUNT: &str = "daemon_running_task_count";
/// Daemon retries.
pub const DAEMON_TASK_RETRY_TOTAL: &str = "daemon_task_retry_total";
/// Daemon reloads.
pub const DAEMON_TASK_RELOAD_TOTAL: &str = "daemon_task_reload_total";
/// Bridge requests by route and code.
pub const BRIDGE_REQUESTS_TOTAL: &str = "bridge_requests_total";
/// Bridge latency by route.
pub const BRIDGE_REQUEST_DURATION_SECONDS: &str = "bridge_request_duration_seconds";
/// Async attempts by outcome.
pub const ASYNC_TASK_PROCESSED_TOTAL: &str = "async_task_processed_total";
/// Async attempt duration.
pub const ASYNC_TASK_DURATION_SECONDS: &str = "async_task_duration_seconds";
/// Messages waiting in a queue.
pub const ASYNC_QUEUE_PENDING: &str = "async_queue_pending";
/// Periodic ticks received.
pub const PERIODIC_TASK_ENQUEUED_TOTAL: &str = "periodic_task_enqueued_total";
/// Commands handled by outcome.
pub const COMMANDS_TOTAL: &str = "bmw_commands_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once; later calls reuse it).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => handle,
            // Another recorder is installed (e.g. by an embedding program): keep
            // a handle of our own so /metrics still answers.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        })
        .clone()
}

/// The Prometheus text of all metrics.
pub fn render() -> String {
    install().render()
}

/// A daemon instance started (1) or stopped (0).
pub fn daemon_running(kind: &str, dimension: &str, running: bool) {
    metrics::gauge!(DAEMON_RUNNING_TASK_COUNT, "task_dimension" => dimension.to_owned(), "kind" => kind.to_owned())
        .set(if running { 1.0 } else { 0.0 });
}

/// A daemon instance failed and will be retried.
pub fn daemon_retry(kind: &str) {
    metrics::counter!(DAEMON_TASK_RETRY_TOTAL, "kind" => kind.to_owned()).increment(1);
}

/// A daemon instance was reloaded.
pub fn daemon_reload(kind: &str) {
    metrics::counter!(DAEMON_TASK_RELOAD_TOTAL, "kind" => kind.to_owned()).increment(1);
}

/// A bridge request finished.
pub fn bridge_request(route: &str, code: u16, seconds: f64) {
    metrics::counter!(BRIDGE_REQUESTS_TOTAL, "route" => route.to_owned(), "code" => code.to_string()).increment(1);
    metrics::histogram!(BRIDGE_REQUEST_DURATION_SECONDS, "route" => route.to_owned())
        .record(seconds);
}

/// A command was handled with `outcome` (`ok`, `refused`, `poison`).
pub fn command(subject: &str, outcome: &str) {
    metrics::counter!(COMMANDS_TOTAL, "subject" => subject.to_owned(), "outcome" => outcome.to_owned()).increment(1);
}

/// An async attempt ended with `status` (`succeeded`, `failed`).
pub fn async_processed(kind: &str, queue: &str, status: &str, seconds: f64) {
    metrics::counter!(ASYNC_TASK_PROCESSED_TOTAL, "kind" => kind.to_owned(), "queue" => queue.to_owned(), "status" => status.to_owned()).increment(1);
    metrics::histogram!(ASYNC_TASK_DURATION_SECONDS, "kind" => kind.to_owned(), "queue" => queue.to_owned()).record(seconds);
}

/// Messages waiting in `queue`.
pub fn async_pending(queue: &str, pending: u64) {
    metrics::gauge!(ASYNC_QUEUE_PENDING, "queue" => queue.to_owned()).set(pending as f64);
}

/// A periodic tick arrived.
pub fn periodic_enqueued(kind: &str) {
    metrics::counter!(PERIODIC_TASK_ENQUEUED_TOTAL, "kind" => kind.to_owned()).increment(1);
}

/// Periodic ticks skipped because the previous run of their task was still active.
pub const PERIODIC_TASK_SKIPPED_TOTAL: &str = "periodic_task_skipped_total";

/// A periodic tick was skipped (`overlap: skip`).
pub fn periodic_skipped(kind: &str) {
    metrics::counter!(PERIODIC_TASK_SKIPPED_TOTAL, "kind" => kind.to_owned()).increment(1);
}
