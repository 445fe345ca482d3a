//! [`TaskClient`]: the producer side of commands, used by the bridge and by
//! `bmw task`. It validates input with the same parser workers use, publishes
//! the command (deduplicated by its id), and waits (bounded) for the outcome
//! on a reply inbox; with no worker answering, the command stays stored and the
//! caller learns it was accepted. It also reads the listings (daemon tasks with
//! their bindings, live workers) straight from the buckets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use crate::command::{Command, CommandHandler, DeleteTarget, Outcome};
use crate::daemon::{Claim, DaemonSpec, SpecStore};
use crate::membership::WorkerEntry;
use crate::nats::{Nats, names};
use crate::periodic::{PeriodicError, PeriodicSpec, PeriodicStore};
use crate::queue::{Admin, AdminError, EnqueueError, Enqueuer, ListQuery, QueueStats, TaskRecord};
use crate::registry::Registry;
use crate::task::{TaskType, ValidationError};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The input is invalid (HTTP 400).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The task does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// NATS failed (HTTP 503).
    #[error("nats: {0}")]
    Nats(String),
}

/// What became of a submitted command.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitted {
    /// A worker applied it and answered.
    Done(crate::command::Outcome),
    /// Stored durably; no worker answered in time. `data` is what is known
    /// (the uni_id of a daemon create).
    Accepted {
        /// What is known of the task.
        data: Value,
    },
}

/// A row of the daemon task list (the seed's fields plus the run state).
#[derive(Debug, Clone, Serialize)]
pub struct DaemonRow {
    /// uni_id.
    pub uni_id: String,
    /// Kind.
    pub kind: String,
    /// Payload.
    pub payload: Value,
    /// Options.
    pub options: Value,
    /// Who runs it.
    pub binding: Binding,
}

/// A daemon task's binding to a worker.
#[derive(Debug, Clone, Serialize)]
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

/// Publishes commands and reads listings.
#[derive(Debug, Clone)]
pub struct TaskClient {
    nats: Nats,
    registry: Arc<Registry>,
    specs: SpecStore,
    enqueuer: Enqueuer,
    admin: Admin,
    periodic: PeriodicStore,
    reply_timeout: Duration,
}

fn periodic_error(e: PeriodicError) -> ClientError {
    match e {
        PeriodicError::NotFound(k) => {
            ClientError::NotFound(format!("periodic task `{k}` does not exist"))
        }
        PeriodicError::Refused(m) => ClientError::Invalid(ValidationError::new("options", m)),
        PeriodicError::Nats(m) => ClientError::Nats(m),
    }
}

/// The data of a periodic create, pause or resume.
pub fn periodic_data(spec: &PeriodicSpec) -> Value {
    let tz = crate::periodic::parse_timezone(spec.timezone.as_deref()).unwrap_or(chrono_tz::UTC);
    let next = (!spec.paused)
        .then(|| spec.schedule.next_after(chrono::Utc::now(), tz))
        .flatten();
    json!({"kind": spec.kind, "schedule": spec.schedule.header(), "timezone": spec.timezone,
           "queue": spec.options.queue(), "paused": spec.paused, "next_run_at": next.map(|t| t.to_rfc3339())})
}

impl TaskClient {
    /// A client over a connection; `registry` validates kinds.
    pub async fn new(
        nats: Nats,
        registry: Arc<Registry>,
        reply_timeout: Duration,
    ) -> Result<Self, ClientError> {
        let specs = SpecStore::open(&nats.js)
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        let enqueuer = Enqueuer::open(&nats.js).await.map_err(ClientError::Nats)?;
        let admin = Admin::open(&nats).await.map_err(ClientError::Nats)?;
        let periodic = PeriodicStore::open(&nats.js)
            .await
            .map_err(ClientError::Nats)?;
        Ok(TaskClient {
            nats,
            registry,
            specs,
            enqueuer,
            admin,
            periodic,
            reply_timeout,
        })
    }

    /// Validates and submits a command given as the JSON of `subject`.
    pub async fn submit_json(&self, subject: &str, body: &[u8]) -> Result<Submitted, ClientError> {
        let command = Command::parse(subject, body)?;
        self.submit(command).await
    }

    /// Validates and submits a command, waiting up to the reply timeout.
    ///
    /// Async creates and deletes do not go through a worker: a task is durable
    /// once it is in its queue, so the client enqueues (or deletes) it itself.
    pub async fn submit(&self, command: Command) -> Result<Submitted, ClientError> {
        if let Some(done) = self.direct(&command).await? {
            return Ok(Submitted::Done(done));
        }
        let known = self.precheck(&command).await?;
        let inbox = self.nats.client.new_inbox();
        let mut replies = self
            .nats
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        let mut headers = HeaderMap::new();
        headers.insert(names::HEADER_REPLY, inbox.as_str());
        let body =
            serde_json::to_vec(&command.to_json()).map_err(|e| ClientError::Nats(e.to_string()))?;
        let publish = PublishMessage::build()
            .payload(body.into())
            .headers(headers)
            .message_id(command.id());
        let ack = self
            .nats
            .js
            .send_publish(command.subject(), publish)
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        ack.await.map_err(|e| ClientError::Nats(e.to_string()))?;
        match tokio::time::timeout(self.reply_timeout, replies.next()).await {
            Ok(Some(reply)) => {
                let outcome = serde_json::from_slice(&reply.payload)
                    .map_err(|e| ClientError::Nats(format!("bad outcome: {e}")))?;
                Ok(Submitted::Done(outcome))
            }
            _ => Ok(Submitted::Accepted { data: known }),
        }
    }

    /// Applies async creates and deletes directly; `None` for everything else.
    async fn direct(&self, command: &Command) -> Result<Option<Outcome>, ClientError> {
        match command {
            Command::Create(create) if create.kind.task_type() == TaskType::Async => {
                if !self.registry.is_registered(&create.kind) {
                    self.check_remote_kind(create.kind.as_str()).await?;
                }
                match self.enqueuer.enqueue(create).await {
                    Ok(data) => Ok(Some(Outcome::ok(data))),
                    Err(EnqueueError::Invalid(e)) => Err(e.into()),
                    Err(EnqueueError::Conflict { message, task_id }) => {
                        let mut outcome = Outcome::err(409, message);
                        outcome.data = json!({"task_id": task_id});
                        Ok(Some(outcome))
                    }
                    Err(EnqueueError::Nats(e)) => Err(ClientError::Nats(e)),
                }
            }
            Command::Create(create) if create.kind.task_type() == TaskType::Periodic => {
                if !self.registry.is_registered(&create.kind) {
                    self.check_remote_kind(create.kind.as_str()).await?;
                }
                let spec = crate::periodic::spec_from_create(create)?;
                self.periodic.apply(&spec).await.map_err(periodic_error)?;
                Ok(Some(Outcome::ok(periodic_data(&spec))))
            }
            Command::Delete {
                target: DeleteTarget::Periodic(kind),
                ..
            } => {
                let spec = self.periodic.delete(kind).await.map_err(periodic_error)?;
                Ok(Some(Outcome::ok(json!({"kind": spec.kind}))))
            }
            Command::Delete {
                target: DeleteTarget::Async(task_id),
                ..
            } => match self.admin.delete(task_id).await {
                Ok(data) => Ok(Some(Outcome::ok(data))),
                Err(AdminError::NotFound(m)) => Err(ClientError::NotFound(m)),
                Err(AdminError::Nats(m)) => Err(ClientError::Nats(m)),
            },
            _ => Ok(None),
        }
    }

    /// Pauses (`true`) or resumes a periodic task.
    pub async fn pause_periodic(&self, kind: &str, paused: bool) -> Result<Value, ClientError> {
        let spec = self
            .periodic
            .set_paused(kind, paused)
            .await
            .map_err(periodic_error)?;
        Ok(periodic_data(&spec))
    }

    /// Every periodic task with its schedule, next run, last run and outcome.
    pub async fn list_periodic(&self) -> Result<Vec<Value>, ClientError> {
        self.periodic.list().await.map_err(periodic_error)
    }

    /// Puts an archived async task back in its queue.
    pub async fn requeue(&self, task_id: &str) -> Result<Value, ClientError> {
        self.admin.requeue(task_id).await.map_err(|e| match e {
            AdminError::NotFound(m) => ClientError::NotFound(m),
            AdminError::Nats(m) => ClientError::Nats(m),
        })
    }

    /// One async task by id.
    pub async fn get_async(&self, task_id: &str) -> Result<TaskRecord, ClientError> {
        self.admin
            .inspector()
            .get(task_id)
            .await
            .map_err(ClientError::Nats)?
            .ok_or_else(|| ClientError::NotFound(format!("async task `{task_id}` does not exist")))
    }

    /// Async tasks matching a query.
    pub async fn list_async(&self, query: &ListQuery) -> Result<Vec<TaskRecord>, ClientError> {
        self.admin
            .inspector()
            .list(query)
            .await
            .map_err(ClientError::Nats)
    }

    /// Stats of every async queue.
    pub async fn queue_stats(&self) -> Result<Vec<QueueStats>, ClientError> {
        let workers = self.list_workers().await?;
        self.admin
            .inspector()
            .stats(&workers)
            .await
            .map_err(ClientError::Nats)
    }

    /// Refuses what a worker would refuse, before anything is stored; returns
    /// what is known of the task.
    async fn precheck(&self, command: &Command) -> Result<Value, ClientError> {
        match command {
            Command::Create(create) => {
                if !self.registry.is_registered(&create.kind) {
                    // Registered by a worker built with more kinds than this binary:
                    // the worker computes the uni_id.
                    return self
                        .check_remote_kind(create.kind.as_str())
                        .await
                        .map(|()| json!({"uni_id": null}));
                }
                let spec = CommandHandler::daemon_spec(&self.registry, create)?;
                Ok(json!({"uni_id": spec.uni_id}))
            }
            Command::Delete {
                target: DeleteTarget::Daemon(uni_id),
                ..
            }
            | Command::Reload { uni_id, .. } => {
                match self
                    .specs
                    .get(uni_id)
                    .await
                    .map_err(|e| ClientError::Nats(e.to_string()))?
                {
                    Some(_) => Ok(json!({"uni_id": uni_id})),
                    None => Err(ClientError::NotFound(format!(
                        "daemon task `{uni_id}` does not exist"
                    ))),
                }
            }
            Command::Delete { .. } => Err(ValidationError::new(
                "task_type",
                "only daemon tasks can be deleted by this version",
            )
            .into()),
        }
    }

    /// Accepts a kind some live worker advertises; refuses it otherwise.
    async fn check_remote_kind(&self, kind: &str) -> Result<(), ClientError> {
        let workers = self.list_workers().await?;
        if workers.iter().any(|w| w.kinds.iter().any(|k| k == kind)) {
            return Ok(());
        }
        let mut known: Vec<String> = self.registry.kinds();
        known.extend(workers.into_iter().flat_map(|w| w.kinds));
        known.sort();
        known.dedup();
        Err(ValidationError::new(
            "kind",
            format!(
                "{kind} is not registered (known kinds: {})",
                known.join(", ")
            ),
        )
        .into())
    }

    /// Every daemon task with its binding.
    pub async fn list_daemon(&self) -> Result<Vec<DaemonRow>, ClientError> {
        let specs = self
            .specs
            .list()
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        let claims: HashMap<String, Claim> =
            read_bucket(&self.nats, names::BUCKET_DAEMON_CLAIMS).await?;
        let workers: HashMap<String, WorkerEntry> =
            read_bucket(&self.nats, names::BUCKET_WORKERS).await?;
        let live: std::collections::HashSet<&str> =
            workers.values().map(|w| w.worker_id.as_str()).collect();
        Ok(specs
            .into_iter()
            .map(|spec| row(spec, &claims, &live))
            .collect())
    }

    /// Every live worker.
    pub async fn list_workers(&self) -> Result<Vec<WorkerEntry>, ClientError> {
        let workers: HashMap<String, WorkerEntry> =
            read_bucket(&self.nats, names::BUCKET_WORKERS).await?;
        let mut list: Vec<WorkerEntry> = workers.into_values().collect();
        list.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(list)
    }
}

fn row(
    spec: DaemonSpec,
    claims: &HashMap<String, Claim>,
    live: &std::collections::HashSet<&str>,
) -> DaemonRow {
    let claim = claims.get(&spec.uni_id.key()).filter(|c| c.is_held());
    let mut options = serde_json::to_value(&spec.options).unwrap_or(Value::Null);
    options["queue"] = json!(spec.options.queue());
    DaemonRow {
        uni_id: spec.uni_id.to_string(),
        kind: spec.kind.to_string(),
        payload: spec.payload,
        options,
        binding: Binding {
            worker_id: claim.map(|c| c.worker_id.clone()).unwrap_or_default(),
            worker_is_normal: claim.is_some_and(|c| live.contains(c.worker_id.as_str())),
            retry_count: claim.map_or(0, |c| c.retry_count),
            reload_count: claim.map_or(0, |c| c.reload_count),
            next_retry_at: claim.and_then(|c| c.next_retry_at.clone()),
        },
    }
}

async fn read_bucket<T: serde::de::DeserializeOwned>(
    nats: &Nats,
    bucket: &str,
) -> Result<HashMap<String, T>, ClientError> {
    let kv = nats
        .js
        .get_key_value(bucket)
        .await
        .map_err(|e| ClientError::Nats(e.to_string()))?;
    crate::nats::read_all(&kv).await.map_err(ClientError::Nats)
}
