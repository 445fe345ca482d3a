//! [`TaskClient`]: the producer side, used by the bridge and by `bmw task`.
//! It applies a command directly through the [`Operations`] when that is
//! enough (async and periodic tasks are durable once stored), and otherwise
//! checks it the way a worker would, publishes it on `bmw.task.*`
//! (deduplicated by its id) and waits, bounded, for the outcome on a reply
//! inbox; with no worker answering, the command stays stored and the caller
//! learns it was accepted. It also reads the listings (daemon tasks with
//! their bindings, live workers, async tasks, queues, periodic tasks).
//! [`TaskClient::submit_batch`] submits many creates at once (module `batch`).

mod batch;
pub mod table;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use crate::command::wire;
use crate::daemon::{Claim, DaemonSpec};
use crate::membership::WorkerEntry;
use crate::nats::{Nats, NatsError, names};
use crate::ops::{Operations, Route};
use crate::queue::{ListQuery, Page, QueueStats, TaskRecord};
use crate::registry::Registry;
use crate::task::{Command, OpError, Outcome};

pub use self::batch::{ACCEPTED_CODE, ACCEPTED_MESSAGE, MAX_BATCH_ITEMS, UNFINISHED_CODE};

/// What became of a submitted command.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitted {
    /// Applied here, or by a worker that answered (possibly with a refusal).
    Done(Outcome),
    /// Stored durably; no worker answered in time. `data` is what is known
    /// (the uni_id of a daemon create).
    Accepted {
        /// What is known of the task.
        data: Value,
    },
    /// A command with this id was stored already (inside the stream's
    /// dedup window), so this one was not: the first is applied, or will
    /// be, once. `data` is what is known of its task, with `duplicate`.
    Duplicate {
        /// What is known of the task, and `"duplicate": true`.
        data: Value,
    },
}

/// The message of a command answered [`Submitted::Duplicate`].
pub const DUPLICATE_MESSAGE: &str = "duplicate: a command with this id was stored already (it is applied once); this one was not stored again";

/// A row of the daemon task list (the seed's fields plus the run state).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DaemonRow {
    /// uni_id.
    pub uni_id: String,
    /// Kind.
    pub kind: String,
    /// The operator's dimension (e.g. a data id), or the uni_id for an
    /// operator without one: the `task_dimension` metric label.
    pub dimension: String,
    /// Payload.
    pub payload: Value,
    /// Options.
    pub options: Value,
    /// Who runs it.
    pub binding: Binding,
}

/// A daemon task's binding to a worker.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Binding {
    /// The holder, empty if none.
    pub worker_id: String,
    /// Whether the holder is a live worker.
    pub worker_is_normal: bool,
    /// Failures since the last start or reload.
    pub retry_count: u32,
    /// Reloads so far.
    pub reload_count: u32,
    /// When the next retry is due, if waiting.
    pub next_retry_at: Option<String>,
}

/// Submits commands and reads listings.
#[derive(Debug, Clone)]
pub struct TaskClient {
    nats: Nats,
    ops: Operations,
    reply_timeout: Duration,
}

impl TaskClient {
    /// A client over a connection, opening its own stores; `registry`
    /// validates kinds.
    pub async fn new(
        nats: Nats,
        registry: Arc<Registry>,
        reply_timeout: Duration,
    ) -> Result<Self, OpError> {
        let ops = Operations::open(&nats, registry).await?;
        Ok(TaskClient::with_operations(nats, ops, reply_timeout))
    }

    /// A client sharing a process's [`Operations`].
    pub fn with_operations(nats: Nats, ops: Operations, reply_timeout: Duration) -> Self {
        TaskClient {
            nats,
            ops,
            reply_timeout,
        }
    }

    /// Validates and submits a command given as the JSON of `subject`.
    pub async fn submit_json(&self, subject: &str, body: &[u8]) -> Result<Submitted, OpError> {
        let command = wire::parse(subject, body)?;
        self.submit(command).await
    }

    /// Validates and submits a command: applied here when that is enough,
    /// else published for a worker, waiting up to the reply timeout.
    pub async fn submit(&self, command: Command) -> Result<Submitted, OpError> {
        self.submit_until(command, None).await
    }

    /// [`TaskClient::submit`], waiting for a worker no later than `until`.
    pub async fn submit_until(
        &self,
        command: Command,
        until: Option<tokio::time::Instant>,
    ) -> Result<Submitted, OpError> {
        let known = match self.ops.route(&command).await? {
            Route::Direct => match self.ops.apply(&command).await? {
                Some(data) => return Ok(Submitted::Done(Outcome::ok(data))),
                None => json!({}),
            },
            Route::Worker { known } => known,
        };
        self.publish(&command, known, until)
            .await
            .map_err(OpError::from)
    }

    /// Publishes a command with a reply inbox and waits for the outcome.
    async fn publish(
        &self,
        command: &Command,
        mut known: Value,
        until: Option<tokio::time::Instant>,
    ) -> Result<Submitted, NatsError> {
        let inbox = self.nats.client.new_inbox();
        let mut replies = self.nats.client.subscribe(inbox.clone()).await?;
        let mut headers = HeaderMap::new();
        headers.insert(names::HEADER_REPLY, inbox.as_str());
        let subject = wire::subject(command);
        let span = crate::traces::publish_span(subject, command.id());
        crate::traces::inject(&span, &mut headers);
        let publish = PublishMessage::build()
            .payload(crate::nats::to_json_bytes(&wire::encode(command)))
            .headers(headers)
            .message_id(command.id());
        // Retried through an election or a reconnect; the command id keeps it single.
        let ack = tracing::Instrument::instrument(
            crate::nats::publish_with_retries(&self.nats.js, subject, publish),
            span,
        )
        .await?;
        if ack.duplicate {
            // JetStream kept the first and dropped this one: no worker will
            // answer it.
            if let Some(known) = known.as_object_mut() {
                known.insert("duplicate".into(), json!(true));
                known.insert("id".into(), json!(command.id()));
            }
            return Ok(Submitted::Duplicate { data: known });
        }
        let wait = match until {
            Some(until) => self
                .reply_timeout
                .min(until.saturating_duration_since(tokio::time::Instant::now())),
            None => self.reply_timeout,
        };
        match tokio::time::timeout(wait, replies.next()).await {
            Ok(Some(reply)) => match serde_json::from_slice(&reply.payload) {
                Ok(outcome) => Ok(Submitted::Done(outcome)),
                Err(e) => Err(NatsError::new(e)),
            },
            _ => Ok(Submitted::Accepted { data: known }),
        }
    }

    /// Pauses (`true`) or resumes a periodic task.
    pub async fn pause_periodic(&self, kind: &str, paused: bool) -> Result<Value, OpError> {
        self.ops.periodic().set_paused(kind, paused).await
    }

    /// Every periodic task with its schedule, next run, last run and outcome.
    pub async fn list_periodic(&self) -> Result<Vec<Value>, OpError> {
        self.ops.periodic().list().await
    }

    /// Puts an archived async task back in its queue.
    pub async fn requeue(&self, task_id: &str) -> Result<Value, OpError> {
        self.ops.queue().requeue(task_id).await
    }

    /// One async task by id.
    pub async fn get_async(&self, task_id: &str) -> Result<TaskRecord, OpError> {
        self.ops.queue().get(task_id).await
    }

    /// Async tasks matching a query.
    pub async fn list_async(&self, query: &ListQuery) -> Result<Page, OpError> {
        self.ops.queue().list(query).await
    }

    /// Stats of every async queue.
    pub async fn queue_stats(&self) -> Result<Vec<QueueStats>, OpError> {
        let workers = self.list_workers().await?;
        self.ops.queue().stats(&workers).await
    }

    /// Every daemon task with its binding.
    pub async fn list_daemon(&self) -> Result<Vec<DaemonRow>, OpError> {
        let specs = self.ops.daemon().specs().list().await?;
        let claims_kv = self
            .nats
            .js
            .get_key_value(names::BUCKET_DAEMON_CLAIMS)
            .await
            .map_err(NatsError::from)?;
        let claims: HashMap<String, Claim> = crate::nats::read_all(&claims_kv).await?;
        let workers = self.list_workers().await?;
        let live: HashMap<&str, &str> = workers
            .iter()
            .map(|w| (w.worker_id.as_str(), w.lease.as_str()))
            .collect();
        Ok(specs
            .into_iter()
            .map(|spec| row(spec, &claims, &live))
            .collect())
    }

    /// The connection it submits and reads through (the console's live
    /// feed watches the same streams and buckets).
    pub fn nats(&self) -> &Nats {
        &self.nats
    }

    /// Every live worker.
    pub async fn list_workers(&self) -> Result<Vec<WorkerEntry>, OpError> {
        self.ops.list_workers().await
    }
}

/// asynq's default `Retry`, which BMW lists for a task that gave none.
const BMW_DEFAULT_RETRY: u32 = 10;
/// Go's zero `time.Time`, which BMW lists for a task with no deadline.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A daemon task's row; `live` has the lease of every live worker.
fn row(spec: DaemonSpec, claims: &HashMap<String, Claim>, live: &HashMap<&str, &str>) -> DaemonRow {
    let claim = claims.get(&spec.uni_id.key()).filter(|c| c.is_held());
    let mut options = serde_json::to_value(&spec.options).unwrap_or(Value::Null);
    options["queue"] = json!(spec.options.queue());
    // BMW lists asynq's options with Go's field names and zero values; clients
    // written for it read them (`options["Queue"]`). Durations in nanoseconds.
    let nanos = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_nanos() as u64);
    let o = &spec.options;
    for (name, value) in [
        ("Retry", json!(o.retry.unwrap_or(BMW_DEFAULT_RETRY))),
        ("Queue", json!(o.queue())),
        ("TaskID", json!(o.task_id.clone().unwrap_or_default())),
        ("Timeout", json!(nanos(o.timeout))),
        (
            "Deadline",
            json!(o.deadline.as_deref().unwrap_or(GO_ZERO_TIME)),
        ),
        ("UniqueTTL", json!(nanos(o.unique_ttl))),
        (
            "ProcessAt",
            json!(o.process_at.as_deref().unwrap_or(&spec.created_at)),
        ),
        ("Retention", json!(nanos(o.retention))),
    ] {
        options[name] = value;
    }
    DaemonRow {
        uni_id: spec.uni_id.to_string(),
        kind: spec.kind.to_string(),
        dimension: spec.dimension,
        payload: spec.payload,
        options,
        binding: Binding {
            worker_id: claim.map(|c| c.worker_id.clone()).unwrap_or_default(),
            worker_is_normal: claim.is_some_and(|c| {
                live.get(c.worker_id.as_str())
                    .is_some_and(|lease| c.is_held_under(Some(lease)))
            }),
            retry_count: claim.map_or(0, |c| c.retry_count),
            reload_count: claim.map_or(0, |c| c.reload_count),
            next_retry_at: claim.and_then(|c| c.next_retry_at.clone()),
        },
    }
}
