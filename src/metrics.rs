//! Metric names, labels and recording (design.md §7); nothing else names a metric.
//!
//! [`install`] sets up the Prometheus recorder once per process; `/metrics`
//! and `/bmw/metrics` render it through [`render`]. Two families follow
//! BMW's `metrics.go`, beside bmw's own names: BMW's names
//! (`bmw_api_request_total`, `bmw_api_request_cost`, `bmw_task_total`,
//! `bmw_task_duration_seconds`, `daemon_task_retry_count`) with its types,
//! labels and buckets, and `daemon_running_task_count`, which is not kept in
//! the recorder at all: a recorder's gauge, once set, is rendered forever,
//! and bk-monitor calls a task running while any datapoint of its series
//! exists. So the instances running in this process are counted here
//! ([`daemon_running`]) and each render draws exactly those series. The
//! series recorded on every task and request are recorded through handles
//! kept per label set (`cache`), not looked up each time.

mod cache;

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, OnceLock, PoisonError};

use metrics::{Counter, Gauge, Histogram, Key, Label, Recorder};

use cache::{Cache, Handle};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// One series per daemon instance running in this process, present only
/// while it runs (value 1; BMW's name and `task_dimension` label, plus `kind`).
pub const DAEMON_RUNNING_TASK_COUNT: &str = "daemon_running_task_count";
/// BMW's name: retries of a daemon instance by `task_dimension` (a gauge
/// that only goes up, as BMW has it).
pub const DAEMON_TASK_RETRY_COUNT: &str = "daemon_task_retry_count";
/// BMW's name: bridge requests by `method`, `path` (the route) and `status`.
pub const BMW_API_REQUEST_TOTAL: &str = "bmw_api_request_total";
/// BMW's name: seconds the last request of a `method` and `path` took (a gauge).
pub const BMW_API_REQUEST_COST: &str = "bmw_api_request_cost";
/// BMW's name: tasks by `name` (the kind), `module` and `status`
/// (`enqueue` in module `scheduler`; `received`, `success`, `failure` in
/// module `worker`; `registered` in module `worker` when a worker starts).
pub const BMW_TASK_TOTAL: &str = "bmw_task_total";
/// BMW's name: async attempt duration by `name` (the kind), with BMW's buckets.
pub const BMW_TASK_DURATION_SECONDS: &str = "bmw_task_duration_seconds";
/// The buckets of [`BMW_TASK_DURATION_SECONDS`], BMW's.
const BMW_TASK_DURATION_BUCKETS: &[f64] = &[
    0.1, 3.0, 10.0, 15.0, 20.0, 30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 300.0, 600.0, 900.0, 1200.0,
    1500.0, 1800.0, 3600.0, 7200.0,
];
/// BMW's `module` label of what a worker does.
const MODULE_WORKER: &str = "worker";
/// BMW's `module` label of enqueues.
const MODULE_SCHEDULER: &str = "scheduler";
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
/// How full a stream is against its limit (the larger of bytes and messages).
pub const BMW_STORAGE_USED_RATIO: &str = "bmw_storage_used_ratio";
/// Bytes a stream holds.
pub const BMW_STORAGE_BYTES: &str = "bmw_storage_bytes";
/// Messages waiting in a queue.
pub const ASYNC_QUEUE_PENDING: &str = "async_queue_pending";
/// Periodic ticks received.
pub const PERIODIC_TASK_ENQUEUED_TOTAL: &str = "periodic_task_enqueued_total";
/// Periodic ticks skipped because the previous run of their task was still active.
pub const PERIODIC_TASK_SKIPPED_TOTAL: &str = "periodic_task_skipped_total";
/// Commands handled by outcome.
pub const COMMANDS_TOTAL: &str = "bmw_commands_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Daemon instances running in this process: (kind, dimension) -> how many.
static RUNNING: OnceLock<Mutex<HashMap<(String, String), usize>>> = OnceLock::new();

fn builder() -> PrometheusBuilder {
    match PrometheusBuilder::new().set_buckets_for_metric(
        Matcher::Full(BMW_TASK_DURATION_SECONDS.to_owned()),
        BMW_TASK_DURATION_BUCKETS,
    ) {
        Ok(builder) => builder,
        // Only an empty bucket list is refused, and the list is not empty.
        Err(_) => PrometheusBuilder::new(),
    }
}

/// Installs the Prometheus recorder (once; later calls reuse it).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| match builder().install_recorder() {
            Ok(handle) => handle,
            // Another recorder is installed (e.g. by an embedding program): keep
            // a handle of our own so /metrics still answers.
            Err(_) => builder().build_recorder().handle(),
        })
        .clone()
}

/// The Prometheus text of all metrics: the recorder's, then one
/// `daemon_running_task_count` series per instance running now.
pub fn render() -> String {
    let mut text = install().render();
    text.push_str(&render_running());
    text
}

/// The running instances' series, formatted by a recorder of their own that
/// lives for this render only (so a stopped instance leaves nothing behind).
fn render_running() -> String {
    let running = running().lock().unwrap_or_else(PoisonError::into_inner);
    if running.is_empty() {
        return String::new();
    }
    let recorder = PrometheusBuilder::new().build_recorder();
    let metadata = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);
    for (kind, dimension) in running.keys() {
        let labels = vec![
            Label::new("task_dimension", dimension.clone()),
            Label::new("kind", kind.clone()),
        ];
        recorder
            .register_gauge(
                &Key::from_parts(DAEMON_RUNNING_TASK_COUNT, labels),
                &metadata,
            )
            .set(1.0);
    }
    drop(running);
    recorder.handle().render()
}

fn running() -> &'static Mutex<HashMap<(String, String), usize>> {
    RUNNING.get_or_init(Default::default)
}

/// A daemon instance started (`true`) or stopped (`false`) in this process:
/// its `daemon_running_task_count` series is rendered from its start until
/// its last stop.
pub fn daemon_running(kind: &str, dimension: &str, running_now: bool) {
    let mut running = running().lock().unwrap_or_else(PoisonError::into_inner);
    let key = (kind.to_owned(), dimension.to_owned());
    if running_now {
        *running.entry(key).or_insert(0) += 1;
    } else if let Some(count) = running.get_mut(&key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            running.remove(&key);
        }
    }
}

/// A daemon instance failed and will be retried.
pub fn daemon_retry(kind: &str, dimension: &str) {
    metrics::counter!(DAEMON_TASK_RETRY_TOTAL, "kind" => kind.to_owned()).increment(1);
    metrics::gauge!(DAEMON_TASK_RETRY_COUNT, "task_dimension" => dimension.to_owned())
        .increment(1.0);
}

/// A daemon instance was reloaded.
pub fn daemon_reload(kind: &str) {
    metrics::counter!(DAEMON_TASK_RELOAD_TOTAL, "kind" => kind.to_owned()).increment(1);
}

/// A bridge request finished (bmw's names and BMW's). A method other than
/// the standard ones is labelled `OTHER`: any token is a valid HTTP method,
/// and a series per token would let a caller grow the metrics without bound.
pub fn bridge_request(method: &str, route: &str, code: u16, seconds: f64) {
    let method = standard_method(method);
    if !cache::enabled() {
        return RequestSeries::new(method, route, code).record(seconds);
    }
    ROUTES
        .get(route)
        .get(&(method, code))
        .get_or_init(|| RequestSeries::new(method, route, code))
        .record(seconds);
}

fn standard_method(method: &str) -> &'static str {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    ];
    STANDARD
        .into_iter()
        .find(|m| *m == method)
        .unwrap_or("OTHER")
}

/// The series one request of a method, route and status updates.
struct RequestSeries {
    requests: Counter,
    duration: Histogram,
    bmw_requests: Counter,
    bmw_cost: Gauge,
}

impl RequestSeries {
    fn new(method: &'static str, route: &str, code: u16) -> Self {
        RequestSeries {
            requests: metrics::counter!(BRIDGE_REQUESTS_TOTAL, "route" => route.to_owned(), "code" => code.to_string()),
            duration: metrics::histogram!(BRIDGE_REQUEST_DURATION_SECONDS, "route" => route.to_owned()),
            bmw_requests: metrics::counter!(BMW_API_REQUEST_TOTAL, "method" => method, "path" => route.to_owned(), "status" => code.to_string()),
            bmw_cost: metrics::gauge!(BMW_API_REQUEST_COST, "method" => method, "path" => route.to_owned()),
        }
    }

    fn record(&self, seconds: f64) {
        self.requests.increment(1);
        self.duration.record(seconds);
        self.bmw_requests.increment(1);
        self.bmw_cost.set(seconds);
    }
}

/// One route's request series, by method and status.
type RouteSeries = Cache<(&'static str, u16), Handle<RequestSeries>>;

/// Request series by route.
static ROUTES: LazyLock<Cache<String, RouteSeries>> = LazyLock::new(Cache::default);

/// The per-kind series of the task paths, each registered when first recorded.
#[derive(Default)]
struct KindSeries {
    registered: Handle<Counter>,
    enqueued: Handle<Counter>,
    received: Handle<Counter>,
    success: Handle<Counter>,
    failure: Handle<Counter>,
    duration: Handle<Histogram>,
    /// By queue.
    queues: Cache<String, QueueSeries>,
}

/// The per-kind-and-queue series of async attempts.
#[derive(Default)]
struct QueueSeries {
    succeeded: Handle<Counter>,
    failed: Handle<Counter>,
    duration: Handle<Histogram>,
}

static KINDS: LazyLock<Cache<String, KindSeries>> = LazyLock::new(Cache::default);

/// BMW's `bmw_task_total` of `kind`, through the kind's kept handle `pick`
/// once the recorder is installed.
fn bmw_task(
    kind: &str,
    module: &'static str,
    status: &'static str,
    pick: fn(&KindSeries) -> &Handle<Counter>,
) {
    let make = || metrics::counter!(BMW_TASK_TOTAL, "name" => kind.to_owned(), "module" => module, "status" => status);
    if !cache::enabled() {
        return make().increment(1);
    }
    pick(&KINDS.get(kind)).get_or_init(make).increment(1);
}

/// A worker registered a kind (BMW's `registered`).
pub fn task_registered(kind: &str) {
    bmw_task(kind, MODULE_WORKER, "registered", |s| &s.registered);
}

/// An async task was enqueued, or a periodic tick arrived (BMW's `enqueue`).
pub fn task_enqueued(kind: &str) {
    bmw_task(kind, MODULE_SCHEDULER, "enqueue", |s| &s.enqueued);
}

/// An async attempt began (BMW's `received`).
pub fn task_received(kind: &str) {
    bmw_task(kind, MODULE_WORKER, "received", |s| &s.received);
}

/// A command was handled with `outcome` (`ok`, `refused`, `poison`);
/// `subject` is one of the command subjects, or `other`.
pub fn command(subject: &'static str, outcome: &'static str) {
    let make = || metrics::counter!(COMMANDS_TOTAL, "subject" => subject, "outcome" => outcome);
    if !cache::enabled() {
        return make().increment(1);
    }
    COMMANDS
        .get(&(subject, outcome))
        .get_or_init(make)
        .increment(1);
}

static COMMANDS: LazyLock<Cache<(&'static str, &'static str), Handle<Counter>>> =
    LazyLock::new(Cache::default);

/// An async attempt ended: `succeeded` or not (bmw's `succeeded` and
/// `failed`, BMW's `success` and `failure`).
pub fn async_processed(kind: &str, queue: &str, succeeded: bool, seconds: f64) {
    let (status, bmw_status) = match succeeded {
        true => ("succeeded", "success"),
        false => ("failed", "failure"),
    };
    let processed = || metrics::counter!(ASYNC_TASK_PROCESSED_TOTAL, "kind" => kind.to_owned(), "queue" => queue.to_owned(), "status" => status);
    let duration = || metrics::histogram!(ASYNC_TASK_DURATION_SECONDS, "kind" => kind.to_owned(), "queue" => queue.to_owned());
    let bmw_task = || metrics::counter!(BMW_TASK_TOTAL, "name" => kind.to_owned(), "module" => MODULE_WORKER, "status" => bmw_status);
    let bmw_duration = || metrics::histogram!(BMW_TASK_DURATION_SECONDS, "name" => kind.to_owned());
    if !cache::enabled() {
        processed().increment(1);
        duration().record(seconds);
        bmw_task().increment(1);
        return bmw_duration().record(seconds);
    }
    let of_kind = KINDS.get(kind);
    let of_queue = of_kind.queues.get(queue);
    let (processed_handle, bmw_task_handle) = match succeeded {
        true => (&of_queue.succeeded, &of_kind.success),
        false => (&of_queue.failed, &of_kind.failure),
    };
    processed_handle.get_or_init(processed).increment(1);
    of_queue.duration.get_or_init(duration).record(seconds);
    bmw_task_handle.get_or_init(bmw_task).increment(1);
    of_kind.duration.get_or_init(bmw_duration).record(seconds);
}

/// Messages waiting in `queue`.
pub fn async_pending(queue: &str, pending: u64) {
    metrics::gauge!(ASYNC_QUEUE_PENDING, "queue" => queue.to_owned()).set(pending as f64);
}

/// How full `stream` is: `ratio` of its limit, `bytes` held.
pub fn storage_used(stream: &str, ratio: f64, bytes: u64) {
    metrics::gauge!(BMW_STORAGE_USED_RATIO, "stream" => stream.to_owned()).set(ratio);
    metrics::gauge!(BMW_STORAGE_BYTES, "stream" => stream.to_owned()).set(bytes as f64);
}

/// A periodic tick arrived.
pub fn periodic_enqueued(kind: &str) {
    metrics::counter!(PERIODIC_TASK_ENQUEUED_TOTAL, "kind" => kind.to_owned()).increment(1);
    task_enqueued(kind);
}

/// A periodic tick was skipped (`overlap: skip`).
pub fn periodic_skipped(kind: &str) {
    metrics::counter!(PERIODIC_TASK_SKIPPED_TOTAL, "kind" => kind.to_owned()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running_lines(kind: &str) -> Vec<String> {
        render_running()
            .lines()
            .filter(|l| l.starts_with(DAEMON_RUNNING_TASK_COUNT) && l.contains(kind))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_running_series_exists_from_the_first_start_to_the_last_stop() {
        let kind = "daemon:test:running_series";
        assert!(running_lines(kind).is_empty());
        daemon_running(kind, "1573001", true);
        assert_eq!(
            running_lines(kind),
            [format!(
                r#"{DAEMON_RUNNING_TASK_COUNT}{{task_dimension="1573001",kind="{kind}"}} 1"#
            )]
        );
        // Two instances of one dimension (a reload overlapping a stop): one series.
        daemon_running(kind, "1573001", true);
        daemon_running(kind, "1573001", false);
        assert_eq!(running_lines(kind).len(), 1);
        daemon_running(kind, "1573001", false);
        assert!(running_lines(kind).is_empty());
        // A stop without a start changes nothing.
        daemon_running(kind, "1573001", false);
        assert!(running_lines(kind).is_empty());
    }

    #[test]
    fn labels_are_escaped() {
        let kind = "daemon:test:escaped";
        daemon_running(kind, "a\"b\\c\nd", true);
        assert_eq!(
            running_lines(kind),
            [format!(
                r#"{DAEMON_RUNNING_TASK_COUNT}{{task_dimension="a\"b\\c\nd",kind="{kind}"}} 1"#
            )]
        );
        daemon_running(kind, "a\"b\\c\nd", false);
    }
}
