//! The bridge's routes (design.md §6): each turns a REST call into a command
//! submitted through [`crate::client::TaskClient`] (applied directly or by a
//! worker), or reads a listing, and answers with the envelope.

use std::collections::HashMap;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::BridgeState;
use super::console::daemon_list::DaemonQuery;
use super::envelope::{ApiError, Envelope, OkWith, Reply};
use super::openapi::{
    ApiFailures, BatchBody, CreateBody, DeleteAllBody, DeleteBody, Deleted, EnvelopeOf, KindBody,
    LogLevel, ReloadBody, RequeueBody, TaskList, TaskTypeName,
};
use crate::client::{MAX_BATCH_ITEMS, Submitted};
use crate::membership::WorkerEntry;
use crate::nats::names;
use crate::queue::QueueStats;
use crate::queue::{ListQuery, TaskState};
use crate::task::TaskType;

/// Reads the body up to `--max-body`: a larger one is refused with 413
/// naming the limit, before any of it is read when the client announced its
/// length, else as soon as the limit is passed.
async fn body(state: &BridgeState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.max_body;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("invalid `body`: larger than the limit of {limit} bytes (--max-body)"),
        )
    };
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let error = e.into_inner();
        if error.is::<http_body_util::LengthLimitError>() {
            too_large()
        } else {
            ApiError::bad_request(format!("invalid `body`: unreadable ({error})"))
        }
    })
}

async fn submit(state: &BridgeState, subject: &str, raw: Body) -> Result<Reply, ApiError> {
    let bytes = body(state, raw).await?;
    match state.client.submit_json(subject, &bytes).await? {
        Submitted::Done(outcome) => Ok(Reply::from_outcome(outcome)),
        Submitted::Accepted { data } => Ok(Reply(
            StatusCode::ACCEPTED,
            Envelope {
                result: true,
                code: 0,
                message: crate::client::ACCEPTED_MESSAGE.into(),
                data,
            },
        )),
        Submitted::Duplicate { data } => Ok(Reply(
            StatusCode::ACCEPTED,
            Envelope {
                result: true,
                code: 0,
                message: crate::client::DUPLICATE_MESSAGE.into(),
                data,
            },
        )),
    }
}

/// `POST /bmw/task/`: create a task.
#[utoipa::path(post, path = "/bmw/task/", tag = "tasks", security((), ("bearer" = [])),
    request_body = CreateBody,
    responses(
        (status = 200, description = "Created (or already there): the task's uni_id, task_id or schedule", body = Envelope),
        (status = 202, description = "Stored; no worker answered in time: `data` holds what is known", body = Envelope),
        (status = 409, description = "The task id is in use, or the same task is within its unique window: `data.task_id` names it", body = Envelope),
        ApiFailures,
    ))]
pub(super) async fn create(State(state): State<BridgeState>, raw: Body) -> Result<Reply, ApiError> {
    submit(&state, names::SUBJECT_CREATE, raw).await
}

/// `POST /bmw/task/batch`: create many tasks. The body is a JSON array of
/// create bodies (1 to 10,000, `MAX_BATCH_ITEMS`); the answer is one envelope whose
/// `data` holds each item's outcome, in order. The request itself is refused
/// (400, 413) only when the body is not such an array; a refused item is
/// refused on its own and the others are created.
#[utoipa::path(post, path = "/bmw/task/batch", tag = "tasks", security((), ("bearer" = [])),
    request_body = BatchBody,
    responses(
        (status = 200, description = "Each item's outcome, in order (an item may be refused on its own)", body = EnvelopeOf<Vec<Envelope>>),
        ApiFailures,
    ))]
pub(super) async fn create_batch(
    State(state): State<BridgeState>,
    deadline: Option<axum::Extension<super::limits::Deadline>>,
    raw: Body,
) -> Result<OkWith<Vec<Envelope>>, ApiError> {
    let bytes = body(&state, raw).await?;
    // Each item is kept as its text and parsed straight into its command.
    let items = match serde_json::from_slice::<Vec<&RawValue>>(&bytes) {
        Ok(items) => items,
        Err(e) => {
            return Err(match serde_json::from_slice::<Value>(&bytes) {
                Ok(other) => ApiError::bad_request(format!(
                    "invalid `body`: expected a JSON array of create bodies like [{{\"kind\": \"async:demo:echo\", \"payload\": {{}}}}], got {}",
                    json_type(&other)
                )),
                Err(_) => ApiError::bad_request(format!("invalid `body`: {e}")),
            });
        }
    };
    if items.is_empty() {
        return Err(ApiError::bad_request(
            "invalid `body`: an empty array: nothing to create",
        ));
    }
    if items.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::bad_request(format!(
            "invalid `body`: {} items, over the limit of {MAX_BATCH_ITEMS} in one batch; send several",
            items.len()
        )));
    }
    let count = items.len();
    // Answer with what is finished a little before the request's limit
    // (the rest marked unfinished), rather than a 504 with part applied.
    let until = deadline.map(|axum::Extension(d)| {
        let left = d.0.saturating_duration_since(tokio::time::Instant::now());
        d.0 - (left / 10).min(std::time::Duration::from_secs(1))
    });
    let outcomes = state.client.submit_batch_raw(&items, until).await;
    let refused = outcomes.iter().filter(|o| !o.result).count();
    tracing::debug!(items = count, refused, "batch created");
    Ok(OkWith(outcomes))
}

/// What a JSON value is, to name it in a refusal without echoing it.
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `DELETE /bmw/task/`: delete a task.
#[utoipa::path(delete, path = "/bmw/task/", tag = "tasks", security((), ("bearer" = [])),
    request_body = DeleteBody,
    responses(
        (status = 200, description = "Deleted", body = Envelope),
        (status = 202, description = "Stored; no worker answered in time", body = Envelope),
        ApiFailures,
    ))]
pub(super) async fn delete(State(state): State<BridgeState>, raw: Body) -> Result<Reply, ApiError> {
    submit(&state, names::SUBJECT_DELETE, raw).await
}

/// `DELETE /bmw/task/all` with `{"task_type"}` (or `?task_type=`): delete
/// every task of that type; answers how many.
#[utoipa::path(delete, path = "/bmw/task/all", tag = "tasks", security((), ("bearer" = [])),
    params(("task_type" = Option<TaskTypeName>, Query, description = "The type, if the body does not give it")),
    request_body(content = Option<DeleteAllBody>, description = "The type (or `?task_type=`)"),
    responses(
        (status = 200, description = "How many went", body = EnvelopeOf<Deleted>),
        (status = 202, description = "Stored; no worker answered in time", body = Envelope),
        ApiFailures,
    ))]
pub(super) async fn delete_all(
    State(state): State<BridgeState>,
    Query(query): Query<HashMap<String, String>>,
    raw: Body,
) -> Result<Reply, ApiError> {
    let bytes = body(&state, raw).await?;
    let mut command = if bytes.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(fields)) => fields,
            Ok(other) => {
                return Err(ApiError::bad_request(format!(
                    "invalid `body`: expected an object like {{\"task_type\": \"daemon\"}}, got {other}"
                )));
            }
            Err(e) => return Err(ApiError::bad_request(format!("invalid `body`: {e}"))),
        }
    };
    if let Some(task_type) = query.get("task_type") {
        // Refused when invalid even if the body names a type: a typo must
        // not go unnoticed on a route that deletes everything.
        TaskType::parse(task_type)?;
        command
            .entry("task_type")
            .or_insert_with(|| Value::String(task_type.clone()));
    }
    // A fresh command id, whatever the body says: this is one request.
    command.remove("id");
    command.insert("all".into(), Value::Bool(true));
    let body = Body::from(serde_json::to_vec(&command).unwrap_or_default());
    submit(&state, names::SUBJECT_DELETE, body).await
}

/// `POST /bmw/task/daemon/reload`: restart a daemon task.
#[utoipa::path(post, path = "/bmw/task/daemon/reload", tag = "tasks", security((), ("bearer" = [])),
    request_body = ReloadBody,
    responses(
        (status = 200, description = "Restarted (reloadCount + 1)", body = Envelope),
        (status = 202, description = "Stored; no worker answered in time", body = Envelope),
        ApiFailures,
    ))]
pub(super) async fn reload(State(state): State<BridgeState>, raw: Body) -> Result<Reply, ApiError> {
    submit(&state, names::SUBJECT_RELOAD, raw).await
}

/// The response header that carries where the next page of an async
/// listing starts (absent on the last page): pass it back as `cursor`.
pub(super) const NEXT_CURSOR_HEADER: &str = "bmw-next-cursor";

/// `GET /bmw/task/?task_type=daemon|async|periodic`: list tasks. Daemon
/// filters and paging: see [`DaemonQuery`]. Async
/// filters: `task_id` (one task), `queue`, `state`, `kind`; paging: `limit`,
/// `cursor` (from the previous page's `Bmw-Next-Cursor` header), `offset`.
#[utoipa::path(get, path = "/bmw/task/", tag = "tasks", security((), ("bearer" = [])),
    params(
        ("task_type" = Option<TaskTypeName>, Query, description = "daemon (the default), async or periodic"),
        ("kind" = Option<String>, Query, description = "Only this kind (daemon, async)"),
        ("task_id" = Option<String>, Query, description = "One async task: `data` is its record"),
        ("queue" = Option<String>, Query, description = "Only this queue (daemon, async)"),
        ("state" = Option<String>, Query, description = "Only this state: for async tasks pending, scheduled, active, retry, completed or archived; for daemon tasks running, retrying or unbound"),
        ("worker" = Option<String>, Query, description = "Daemon: only the tasks this worker holds"),
        ("dimension" = Option<String>, Query, description = "Daemon: only the tasks whose dimension contains this"),
        ("limit" = Option<u32>, Query, maximum = 4294967295_u64, description = "At most this many (async: 0 is the default page; daemon: at most 10,000, and with it the answer is paged)"),
        ("offset" = Option<u32>, Query, maximum = 4294967295_u64, description = "Skip this many (async, daemon)"),
        ("cursor" = Option<String>, Query, description = "Async: where the page starts (the previous page's `Bmw-Next-Cursor`)"),
    ),
    responses(
        (status = 200, description = "Daemon tasks with their binding, async task records (or one record with `task_id`), or periodic tasks",
            body = EnvelopeOf<TaskList>,
            headers(("bmw-next-cursor" = String, description = "Async: where the next page starts (absent on the last page)"),
                ("bmw-total-count" = String, description = "Daemon, when filtered or paged: how many tasks match, before `limit` and `offset`"))),
        ApiFailures,
    ))]
pub(super) async fn list(
    State(state): State<BridgeState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let task_type = query
        .get("task_type")
        .map(String::as_str)
        .unwrap_or("daemon");
    let task_type = TaskType::parse(task_type)?;
    // Every parameter is checked whatever the type, so a bad one is never
    // silently ignored.
    let number = |name: &str| -> Result<usize, ApiError> {
        query.get(name).map_or(Ok(0), |v| {
            v.parse::<u32>().map(|n| n as usize).map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid `{name}`: {v:?} is not a number from 0 to {}",
                    u32::MAX
                ))
            })
        })
    };
    let (offset, limit) = (number("offset")?, number("limit")?);
    let cursor = query.get("cursor").map(|c| c.parse()).transpose()?;
    match task_type {
        TaskType::Daemon => {
            // Its `state` is the daemon list's own (running, retrying, unbound).
            let daemon_query = DaemonQuery::parse(&query)?;
            let rows = state.client.list_daemon().await?;
            Ok(daemon_query.answer(rows))
        }
        TaskType::Async => {
            if let Some(task_id) = query.get("task_id") {
                let record = state.client.get_async(task_id).await?;
                return Ok(Reply::ok(json!(record)).into_response());
            }
            let list_query = ListQuery {
                queue: query.get("queue").cloned(),
                state: async_state(&query)?,
                kind: query.get("kind").cloned(),
                offset,
                limit,
                cursor,
            };
            let page = state.client.list_async(&list_query).await?;
            let mut response = Reply::ok(json!(page.tasks)).into_response();
            if let Some(next) = page.next
                && let Ok(value) = HeaderValue::from_str(&next.to_string())
            {
                response.headers_mut().insert(NEXT_CURSOR_HEADER, value);
            }
            Ok(response)
        }
        TaskType::Periodic => {
            async_state(&query)?;
            let rows = state.client.list_periodic().await?;
            Ok(Reply::ok(json!(rows)).into_response())
        }
    }
}

/// The async state `?state=` names, or 400.
fn async_state(query: &HashMap<String, String>) -> Result<Option<TaskState>, ApiError> {
    query
        .get("state")
        .map(|s| {
            TaskState::parse(s).ok_or_else(|| {
                ApiError::bad_request(format!("invalid `state`: {s:?}, expected pending, scheduled, active, retry, completed or archived"))
            })
        })
        .transpose()
}

/// `GET /bmw/queue/`: per-queue stats of async tasks.
#[utoipa::path(get, path = "/bmw/queue/", tag = "async", security((), ("bearer" = [])),
    responses((status = 200, description = "Each async queue's numbers", body = EnvelopeOf<Vec<QueueStats>>), ApiFailures))]
pub(super) async fn queues(State(state): State<BridgeState>) -> Result<Reply, ApiError> {
    let stats = state.client.queue_stats().await?;
    Ok(Reply::ok(json!(stats)))
}

/// `GET /bmw/storage/`: how full each of bmw's streams and buckets is
/// against the limits `bmw provision` set (`--storage-max-bytes`).
#[utoipa::path(get, path = "/bmw/storage/", tag = "async", security((), ("bearer" = [])),
    responses((status = 200, description = "Each stream's bytes and messages against its limits; `near_full` at 80 % or more", body = EnvelopeOf<Vec<crate::nats::storage::StreamUsage>>), ApiFailures))]
pub(super) async fn storage(State(state): State<BridgeState>) -> Result<Reply, ApiError> {
    let usage = crate::nats::storage::usage(&state.client.nats().js)
        .await
        .map_err(crate::task::OpError::from)?;
    Ok(Reply::ok(json!(usage)))
}

/// The non-empty string `field` of a JSON body, or 400 naming it.
async fn required_field(state: &BridgeState, raw: Body, field: &str) -> Result<String, ApiError> {
    let bytes = body(state, raw).await?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid `body`: {e}")))?;
    value
        .get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| ApiError::bad_request(format!("invalid `{field}`: is required")))
}

/// `POST /bmw/task/async/requeue` with `{"task_id"}`: re-enqueue an archived task.
#[utoipa::path(post, path = "/bmw/task/async/requeue", tag = "async", security((), ("bearer" = [])),
    request_body = RequeueBody,
    responses((status = 200, description = "Back in its queue", body = Envelope), ApiFailures))]
pub(super) async fn requeue(
    State(state): State<BridgeState>,
    raw: Body,
) -> Result<Reply, ApiError> {
    let task_id = required_field(&state, raw, "task_id").await?;
    let data = state.client.requeue(&task_id).await?;
    Ok(Reply::ok(data))
}

/// `POST /bmw/task/periodic/pause` (or `/resume`) with `{"kind"}`.
async fn pause_or_resume(state: &BridgeState, raw: Body, paused: bool) -> Result<Reply, ApiError> {
    let kind = required_field(state, raw, "kind").await?;
    let data = state.client.pause_periodic(&kind, paused).await?;
    Ok(Reply::ok(data))
}

/// `POST /bmw/task/periodic/pause`: stop the ticks, keep the task.
#[utoipa::path(post, path = "/bmw/task/periodic/pause", tag = "periodic", security((), ("bearer" = [])),
    request_body = KindBody,
    responses((status = 200, description = "Paused: the schedule and its next run", body = Envelope), ApiFailures))]
pub(super) async fn pause(State(state): State<BridgeState>, raw: Body) -> Result<Reply, ApiError> {
    pause_or_resume(&state, raw, true).await
}

/// `POST /bmw/task/periodic/resume`: start the ticks again.
#[utoipa::path(post, path = "/bmw/task/periodic/resume", tag = "periodic", security((), ("bearer" = [])),
    request_body = KindBody,
    responses((status = 200, description = "Resumed: the schedule and its next run", body = Envelope), ApiFailures))]
pub(super) async fn resume(State(state): State<BridgeState>, raw: Body) -> Result<Reply, ApiError> {
    pause_or_resume(&state, raw, false).await
}

/// `GET /bmw/worker/`: live workers and their load.
#[utoipa::path(get, path = "/bmw/worker/", tag = "workers", security((), ("bearer" = [])),
    responses((status = 200, description = "Live workers and their load", body = EnvelopeOf<Vec<WorkerEntry>>), ApiFailures))]
pub(super) async fn workers(State(state): State<BridgeState>) -> Result<Reply, ApiError> {
    let workers = state.client.list_workers().await?;
    Ok(Reply::ok(json!(workers)))
}

/// `GET /ready`: 200 while NATS is connected.
pub(super) async fn ready(State(state): State<BridgeState>) -> Reply {
    let connected = state.nats.connection_state() == async_nats::connection::State::Connected;
    let status = if connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let envelope = Envelope {
        result: connected,
        code: if connected { 0 } else { 503 },
        message: if connected {
            "ok".into()
        } else {
            "nats is not connected".into()
        },
        data: Value::Null,
    };
    Reply(status, envelope)
}

/// `POST /bmw/log/level?log_level=debug`: this process's log level, at once
/// (BMW's route); 400 for a missing or unknown level.
#[utoipa::path(post, path = "/bmw/log/level", tag = "operations", security((), ("bearer" = [])),
    params(("log_level" = String, Query, description = "trace, debug, info, warn or error")),
    responses(
        (status = 200, description = "The level now in force", body = EnvelopeOf<LogLevel>),
        (status = 501, description = "This process's logging cannot change level", body = Envelope),
        ApiFailures,
    ))]
pub(super) async fn log_level(
    Query(query): Query<HashMap<String, String>>,
) -> Result<Reply, ApiError> {
    let given = query.get("log_level").ok_or_else(|| {
        ApiError::bad_request(format!(
            "missing query parameter `log_level` (one of {})",
            crate::logging::LEVELS
        ))
    })?;
    match crate::logging::set_level(given) {
        Ok(level) => {
            tracing::info!(log_level = level, "log level changed");
            Ok(Reply::ok(json!({"log_level": level})))
        }
        Err(e @ crate::logging::LogLevelError::Unknown { .. }) => {
            Err(ApiError::bad_request(e.to_string()))
        }
        Err(e) => Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, e.to_string())),
    }
}

/// Any other path: 404 with the envelope.
pub(super) async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}
