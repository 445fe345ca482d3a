//! The bridge's OpenAPI 3.1 document, served at `GET /openapi.json`.
//!
//! It is generated from the code: every API route is registered through a
//! [`utoipa_axum::router::OpenApiRouter`] (see [`super::router`]), which
//! takes the route's path and method from the handler's `#[utoipa::path]`,
//! so a route cannot be served without being documented. The routes outside
//! it (`/health`, `/ready`, the metrics, this document) are listed in
//! [`BridgeDoc`]'s `paths`, and the integration tests probe every documented
//! path.
//!
//! The handlers that read a raw body and parse it by hand (the command
//! routes: [`crate::command::wire`] parses them) are described by the
//! schema types here, which mirror what the parser accepts; the unit tests
//! check them against the parser ([`CreateOptions`] against
//! [`crate::task::Options`]).
//!
//! The document is public (no token needed): it describes the API and holds
//! no data.

use axum::Json;
use axum::response::IntoResponse;
use serde::Serialize;
use serde_json::Value;
use serde_json::json;
use utoipa::openapi::schema::{AnyOfBuilder, ArrayBuilder, ObjectBuilder, Schema, SchemaType};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, Ref, RefOr, Server};
use utoipa::{IntoResponses, Modify, OpenApi, PartialSchema, ToSchema};

use crate::bridge::envelope::Envelope;
use crate::client::{DaemonRow, MAX_BATCH_ITEMS};
use crate::queue::TaskRecord;

/// Where the document is served.
pub const PATH: &str = "/openapi.json";

/// The name of the bearer-token security scheme the API routes name.
pub const BEARER: &str = "bearer";

/// The BMW envelope with a typed `data`: what a route answers on success.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvelopeOf<T> {
    /// `true`.
    pub result: bool,
    /// 0 on success.
    pub code: u16,
    /// `ok`, or what happened.
    pub message: String,
    /// What the route returns.
    pub data: T,
}

/// What `GET /bmw/task/` answers in `data`: daemon rows, async records (or
/// one record, with `task_id`), or periodic tasks, by `task_type`. Any of
/// them (an empty list is each).
#[derive(Debug)]
pub struct TaskList;

impl PartialSchema for TaskList {
    fn schema() -> RefOr<Schema> {
        let list = |name: &str| {
            ArrayBuilder::new()
                .items(Ref::from_schema_name(name))
                .build()
        };
        AnyOfBuilder::new()
            .item(list(DaemonRow::name().as_ref()))
            .item(list(TaskRecord::name().as_ref()))
            .item(Ref::from_schema_name(TaskRecord::name()))
            .item(
                ArrayBuilder::new()
                    .items(ObjectBuilder::new().description(Some("A periodic task: kind, schedule, timezone, queue, paused, next and last run, last outcome, runs")))
                    .build(),
            )
            .into()
    }
}

impl ToSchema for TaskList {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((DaemonRow::name().into(), DaemonRow::schema()));
        <DaemonRow as ToSchema>::schemas(schemas);
        schemas.push((TaskRecord::name().into(), TaskRecord::schema()));
        <TaskRecord as ToSchema>::schemas(schemas);
    }
}

/// `POST /bmw/task/batch`: 1 to [`MAX_BATCH_ITEMS`] create bodies. Each
/// item is checked on its own, as a [`CreateBody`]: one that is not valid is
/// refused in its outcome and the others are created, so the request itself
/// only needs to be such an array.
#[derive(Debug)]
pub struct BatchBody;

impl PartialSchema for BatchBody {
    fn schema() -> RefOr<Schema> {
        let item = ObjectBuilder::new()
            .schema_type(SchemaType::AnyValue)
            .description(Some(
                "A create body (CreateBody); an invalid one is refused in its own outcome",
            ));
        ArrayBuilder::new()
            .items(item)
            .min_items(Some(1))
            // Not `maxItems`: so many items are rarely within --max-body,
            // and a client learns either limit from a 400 or 413 naming it.
            .description(Some(format!(
                "1 to {MAX_BATCH_ITEMS} create bodies (more: 400), within --max-body (else 413)"
            )))
            .examples([json!([
                {"kind": "async:demo:echo", "payload": {"hello": 1}},
                {"kind": "daemon:demo:demo", "payload": {"content": "ok"}}
            ])])
            .into()
    }
}

impl ToSchema for BatchBody {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((CreateBody::name().into(), CreateBody::schema()));
        <CreateBody as ToSchema>::schemas(schemas);
    }
}

/// A create body: `POST /bmw/task/`, each item of `POST /bmw/task/batch`,
/// and the JSON published on `bmw.task.create`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok"}, "options": {"queue": "default"}}))]
pub struct CreateBody {
    /// The command id (deduplicates a re-sent command; a fresh one if absent).
    pub id: Option<String>,
    /// The task's kind: `daemon:`, `async:` or `periodic:` and a name of one
    /// or more `:`-separated parts of `A-Z a-z 0-9 _ -`.
    #[schema(pattern = r"^(daemon|async|periodic)(:[A-Za-z0-9_-]+)+$")]
    pub kind: String,
    /// Any JSON: what the task's handler receives (a daemon task's identity
    /// is derived from it).
    pub payload: Option<Value>,
    /// The task's options.
    pub options: Option<CreateOptions>,
}

/// A create's options: BMW's names. Which apply to which task type:
/// `task::Options::check_for` (docs/tasks.md describes each). Durations are integer seconds or a
/// humantime string (`"1h 30m"`), at most 100 years; times are RFC 3339.
/// An unknown name is refused; `null` is an option not given.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOptions {
    /// Queue: 1-64 of `A-Z a-z 0-9 _ -` (default `default`).
    #[schema(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    pub queue: Option<String>,
    /// Max retries (async; kept on daemon tasks, as BMW does).
    #[schema(minimum = 0, maximum = 4294967295_u64)]
    pub retry: Option<u32>,
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
    /// Absolute deadline, RFC 3339.
    #[schema(format = DateTime)]
    pub deadline: Option<String>,
    /// Unique window (async).
    pub unique_ttl: Option<Duration>,
    /// Delayed start at an RFC 3339 time (async).
    #[schema(format = DateTime)]
    pub process_at: Option<String>,
    /// Delayed start after a duration (async).
    pub process_in: Option<Duration>,
    /// How long a finished task stays inspectable (async).
    pub retention: Option<Duration>,
    /// Caller-chosen task id (async).
    pub task_id: Option<String>,
    /// Cron schedule, 5 fields or 6 with seconds first (periodic).
    pub cron: Option<String>,
    /// Interval schedule (periodic).
    pub every: Option<Duration>,
    /// IANA time zone of a cron schedule (periodic).
    pub timezone: Option<String>,
    /// Whether a tick may start while the previous run is active (periodic).
    pub overlap: Option<OverlapName>,
}

/// A duration: integer seconds, or a humantime string such as `"1h 30m"`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Duration {
    /// Whole seconds.
    Seconds(u64),
    /// A humantime string.
    Text(String),
}

/// `skip` (the default, as BMW) or `allow`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OverlapName {
    /// A tick is skipped while the previous run is active.
    Skip,
    /// Runs may overlap.
    Allow,
}

/// A task type's name.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskTypeName {
    /// Daemon tasks.
    Daemon,
    /// Async tasks.
    Async,
    /// Periodic tasks.
    Periodic,
}

/// `DELETE /bmw/task/`: which task. A daemon task by `task_uni_id`, an async
/// one by `task_id`, a periodic one by `kind`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"task_type": "daemon", "task_uni_id": "daemon:demo:demo-7b22636f6e74656e74223a226f6b227d"}))]
pub struct DeleteBody {
    /// The command id (a fresh one if absent).
    pub id: Option<String>,
    /// The task's type.
    pub task_type: TaskTypeName,
    /// A daemon task's uni_id.
    pub task_uni_id: Option<String>,
    /// An async task's id.
    pub task_id: Option<String>,
    /// A periodic task's kind.
    pub kind: Option<String>,
    /// `true`: every task of the type (as `DELETE /bmw/task/all`).
    pub all: Option<bool>,
}

/// `DELETE /bmw/task/all`: the type whose tasks all go (or `?task_type=`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"task_type": "daemon"}))]
pub struct DeleteAllBody {
    /// The task type.
    pub task_type: Option<TaskTypeName>,
}

/// `POST /bmw/task/daemon/reload`: restart a daemon task, merging
/// `payload`'s top-level keys into its stored payload first.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"task_uni_id": "daemon:demo:demo-7b22636f6e74656e74223a226e6f745f6f6b227d"}))]
pub struct ReloadBody {
    /// The command id (a fresh one if absent).
    pub id: Option<String>,
    /// The daemon task's uni_id.
    #[schema(min_length = 1)]
    pub task_uni_id: String,
    /// The keys to change (an object), or absent to restart as it is.
    #[schema(value_type = Option<Object>)]
    pub payload: Option<Value>,
}

/// `POST /bmw/task/async/requeue`: an archived async task to put back.
#[derive(Debug, Serialize, ToSchema)]
pub struct RequeueBody {
    /// The task id.
    #[schema(min_length = 1)]
    pub task_id: String,
}

/// `POST /bmw/task/periodic/pause` and `/resume`: which periodic task.
#[derive(Debug, Serialize, ToSchema)]
pub struct KindBody {
    /// The periodic task's kind.
    #[schema(min_length = 1)]
    pub kind: String,
}

/// What `DELETE /bmw/task/all` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    /// The type deleted.
    pub task_type: TaskTypeName,
    /// How many tasks went.
    pub deleted: u64,
}

/// What `POST /bmw/log/level` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogLevel {
    /// The level now in force.
    pub log_level: String,
}

/// The failures every API route may answer, each with the envelope
/// (`result: false`, `code` the status).
#[derive(Debug, IntoResponses)]
pub enum ApiFailures {
    /// The input is invalid: the message names the field.
    #[response(status = 400)]
    BadRequest(Envelope),
    /// A token is needed (`--api-token`).
    #[response(status = 401)]
    Unauthorized(Envelope),
    /// A read-only token on a write, or a cross-site write.
    #[response(status = 403)]
    Forbidden(Envelope),
    /// No such task.
    #[response(status = 404)]
    NotFound(Envelope),
    /// The body is larger than `--max-body`, or what would be stored does
    /// not fit in a NATS message.
    #[response(status = 413)]
    TooLarge(Envelope),
    /// The queue is full (`--max-queue-pending`), or too many live feeds
    /// are open; `Retry-After` says when to try again.
    #[response(status = 429)]
    QueueFull(Envelope),
    /// NATS is unavailable, or the bridge is overloaded
    /// (`--max-concurrent-requests`); `Retry-After` says when to try again.
    #[response(status = 503)]
    Unavailable(Envelope),
    /// No answer within `--request-timeout`.
    #[response(status = 504)]
    TimedOut(Envelope),
}

/// Adds the bearer-token security scheme.
#[derive(Debug)]
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token of --api-token (read-write) or --api-read-token (read-only), \
                         needed only when tokens are configured",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document's frame and the routes outside the API router.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "bmw",
        description = "BMW's REST API on NATS JetStream: daemon, async and periodic tasks. \
                       Every answer is BMW's envelope {\"result\", \"code\", \"message\", \"data\"}; \
                       `code` is 0 on success, else the HTTP status.",
        license(name = "MIT", identifier = "MIT")
    ),
    paths(health, ready, metrics, bmw_metrics, document),
    components(schemas(Envelope, CreateBody, CreateOptions)),
    modifiers(&BearerScheme),
    tags(
        (name = "tasks", description = "Create, list, delete and reload tasks"),
        (name = "async", description = "Async tasks: requeue, queues"),
        (name = "periodic", description = "Periodic tasks: pause and resume"),
        (name = "workers", description = "Live workers"),
        (name = "console", description = "What the console at /ui/ reads: the live feed"),
        (name = "operations", description = "Health, readiness, metrics, log level, this document"),
    )
)]
pub struct BridgeDoc;

/// The document's frame, to which [`super::router`] adds the API routes.
pub fn base() -> Document {
    let mut doc = BridgeDoc::openapi();
    doc.servers = Some(vec![Server::new("/")]);
    doc
}

/// `GET /health`: 200 while the process runs.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process runs", body = Envelope)))]
pub(super) async fn health() -> impl IntoResponse {
    super::envelope::Reply::ok(Value::Null)
}

/// `GET /ready`, served by `routes::ready`: 200 while NATS is connected.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "NATS is connected", body = Envelope),
        (status = 503, description = "NATS is not connected", body = Envelope),
    ))]
#[allow(dead_code)]
fn ready() {}

/// `GET /metrics`, served by `ops_router`.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 401, description = "A token is needed (--metrics-require-token)", body = Envelope),
    ))]
#[allow(dead_code)]
fn metrics() {}

/// `GET /bmw/metrics`: BMW's path of the metrics.
#[utoipa::path(get, path = "/bmw/metrics", tag = "operations",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 401, description = "A token is needed (--metrics-require-token)", body = Envelope),
    ))]
#[allow(dead_code)]
fn bmw_metrics() {}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
#[allow(dead_code)]
fn document() {}

/// The route serving `doc`.
pub(super) fn route(doc: Document) -> axum::Router {
    let doc = std::sync::Arc::new(doc);
    axum::Router::new().route(
        PATH,
        axum::routing::get(move || {
            let doc = doc.clone();
            async move { Json(doc.as_ref().clone()) }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Options;

    /// The names the options schema lists are exactly the options the
    /// parser accepts: a new option fails to compile here (no `..`) until
    /// the schema has it.
    #[test]
    fn options_schema_lists_exactly_the_options() {
        let every = Options {
            queue: Some("q".into()),
            retry: Some(1),
            timeout: Some(std::time::Duration::from_secs(1)),
            deadline: Some("2030-01-01T00:00:00Z".into()),
            unique_ttl: Some(std::time::Duration::from_secs(1)),
            process_at: Some("2030-01-01T00:00:00Z".into()),
            process_in: Some(std::time::Duration::from_secs(1)),
            retention: Some(std::time::Duration::from_secs(1)),
            task_id: Some("t".into()),
            cron: Some("* * * * *".into()),
            every: Some(std::time::Duration::from_secs(1)),
            timezone: Some("UTC".into()),
            overlap: Some(crate::task::Overlap::Allow),
        };
        let given: Vec<String> = match serde_json::to_value(&every).unwrap() {
            Value::Object(map) => map.keys().cloned().collect(),
            other => panic!("{other}"),
        };
        let schema = serde_json::to_value(CreateOptions::schema()).unwrap();
        let listed: Vec<String> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let mut given_sorted = given.clone();
        given_sorted.sort();
        let mut listed_sorted = listed;
        listed_sorted.sort();
        assert_eq!(given_sorted, listed_sorted);
        // And the parser takes each of them back.
        assert_eq!(
            Options::from_json(Some(&serde_json::to_value(&every).unwrap())).unwrap(),
            every
        );
    }
}
