//! Commands on `bmw.task.*`: their wire form ([`Command::parse`]), how a
//! worker applies them ([`CommandHandler`]) and the shared durable consumer
//! that feeds them to workers ([`CommandConsumer`]).
//!
//! Anyone may publish a command; the bridge and `bmw task` use
//! [`crate::client::TaskClient`]. A command that cannot be parsed or names an
//! unknown kind is a poison message: terminated, logged and published as an
//! `error` event; it never stops the consumer. A command that fails for a
//! NATS reason is redelivered. The outcome goes to the `Bmw-Reply` subject
//! once its effects are durable.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::daemon::{CreateOutcome, DaemonSpec, SpecError, SpecStore};
use crate::events::EventPublisher;
use crate::nats::names;
use crate::registry::Registry;
use crate::task::{Kind, Options, TaskType, UniId, ValidationError};

/// A validated create.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateCommand {
    /// Command id (also the `Nats-Msg-Id`).
    pub id: String,
    /// The task's kind.
    pub kind: Kind,
    /// Its payload.
    pub payload: Value,
    /// Its options.
    pub options: Options,
}

/// What a delete names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteTarget {
    /// A daemon task by uni_id.
    Daemon(UniId),
    /// An async task by id.
    Async(String),
    /// A periodic task by kind.
    Periodic(String),
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `bmw.task.create`.
    Create(Box<CreateCommand>),
    /// `bmw.task.delete`.
    Delete {
        /// Command id.
        id: String,
        /// What to delete.
        target: DeleteTarget,
    },
    /// `bmw.task.reload`.
    Reload {
        /// Command id.
        id: String,
        /// The daemon task.
        uni_id: UniId,
    },
}

/// The wire form of every command: one JSON object.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Wire {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    kind: Option<Value>,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default)]
    task_uni_id: Option<String>,
    #[serde(default)]
    task_id: Option<String>,
}

fn required(field: &str, v: Option<String>) -> Result<String, ValidationError> {
    v.filter(|s| !s.is_empty())
        .ok_or_else(|| ValidationError::new(field, "is required"))
}

impl Command {
    /// Parses and validates a command published on `subject`. A missing `id`
    /// gets a fresh one.
    pub fn parse(subject: &str, body: &[u8]) -> Result<Command, ValidationError> {
        let wire: Wire = serde_json::from_slice(body)
            .map_err(|e| ValidationError::new("body", format!("not a JSON command object: {e}")))?;
        let id = wire
            .id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        match subject {
            names::SUBJECT_CREATE => {
                let kind = match wire.kind {
                    Some(Value::String(k)) => Kind::parse(&k)?,
                    Some(other) => {
                        return Err(ValidationError::new(
                            "kind",
                            format!("must be a string, got {other}"),
                        ));
                    }
                    None => return Err(ValidationError::new("kind", "is required")),
                };
                let options = Options::from_json(wire.options.as_ref())?;
                Ok(Command::Create(Box::new(CreateCommand {
                    id,
                    kind,
                    payload: wire.payload,
                    options,
                })))
            }
            names::SUBJECT_DELETE => {
                let task_type = TaskType::parse(&required("task_type", wire.task_type)?)?;
                let target = match task_type {
                    TaskType::Daemon => DeleteTarget::Daemon(UniId::from_raw(required(
                        "task_uni_id",
                        wire.task_uni_id,
                    )?)),
                    TaskType::Async => DeleteTarget::Async(required("task_id", wire.task_id)?),
                    TaskType::Periodic => DeleteTarget::Periodic(required(
                        "kind",
                        wire.kind.and_then(|k| k.as_str().map(str::to_owned)),
                    )?),
                };
                Ok(Command::Delete { id, target })
            }
            names::SUBJECT_RELOAD => Ok(Command::Reload {
                id,
                uni_id: UniId::from_raw(required("task_uni_id", wire.task_uni_id)?),
            }),
            other => Err(ValidationError::new(
                "subject",
                format!("{other} is not a command subject"),
            )),
        }
    }

    /// The subject this command is published on.
    pub fn subject(&self) -> &'static str {
        match self {
            Command::Create(_) => names::SUBJECT_CREATE,
            Command::Delete { .. } => names::SUBJECT_DELETE,
            Command::Reload { .. } => names::SUBJECT_RELOAD,
        }
    }

    /// The command id.
    pub fn id(&self) -> &str {
        match self {
            Command::Create(c) => &c.id,
            Command::Delete { id, .. } | Command::Reload { id, .. } => id,
        }
    }

    /// The wire JSON.
    pub fn to_json(&self) -> Value {
        match self {
            Command::Create(c) => {
                json!({"id": c.id, "kind": c.kind, "payload": c.payload, "options": c.options})
            }
            Command::Delete { id, target } => match target {
                DeleteTarget::Daemon(u) => {
                    json!({"id": id, "task_type": "daemon", "task_uni_id": u})
                }
                DeleteTarget::Async(t) => json!({"id": id, "task_type": "async", "task_id": t}),
                DeleteTarget::Periodic(k) => json!({"id": id, "task_type": "periodic", "kind": k}),
            },
            Command::Reload { id, uni_id } => json!({"id": id, "task_uni_id": uni_id}),
        }
    }
}

/// The outcome of a command, sent to `Bmw-Reply`. `code` is 0 on success,
/// else the HTTP status the bridge answers with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Success.
    pub result: bool,
    /// 0, or an HTTP status (400, 404, 409, 500).
    pub code: u16,
    /// `ok` or what went wrong.
    pub message: String,
    /// The task (uni_id...), or null.
    pub data: Value,
}

impl Outcome {
    /// Success with data.
    pub fn ok(data: Value) -> Self {
        Outcome {
            result: true,
            code: 0,
            message: "ok".into(),
            data,
        }
    }

    /// Failure with a status and message.
    pub fn err(code: u16, message: impl Into<String>) -> Self {
        Outcome {
            result: false,
            code,
            message: message.into(),
            data: Value::Null,
        }
    }
}

/// Why a command was not applied (refusals are not errors: they are
/// [`Outcome`]s with a code).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A NATS failure: try again later.
    #[error("command not applied: {0}")]
    Transient(String),
    /// The kind is not registered here but a live worker advertises it: leave
    /// the command to that worker.
    #[error("kind `{0}` is run by other workers")]
    NotMine(String),
}

/// Applies commands to the stores; shared by all consumer loops of a worker.
#[derive(Debug, Clone)]
pub struct CommandHandler {
    registry: Arc<Registry>,
    specs: SpecStore,
    workers: async_nats::jetstream::kv::Store,
    enqueuer: crate::queue::Enqueuer,
    admin: crate::queue::Admin,
    periodic: crate::periodic::PeriodicStore,
}

impl CommandHandler {
    /// A handler over the stores of `nats` (opened here).
    pub async fn open(nats: &crate::nats::Nats, registry: Arc<Registry>) -> Result<Self, String> {
        let js = &nats.js;
        Ok(CommandHandler {
            registry,
            specs: SpecStore::open(js).await.map_err(|e| e.to_string())?,
            workers: js
                .get_key_value(names::BUCKET_WORKERS)
                .await
                .map_err(|e| e.to_string())?,
            enqueuer: crate::queue::Enqueuer::open(js).await?,
            admin: crate::queue::Admin::open(nats).await?,
            periodic: crate::periodic::PeriodicStore::open(js).await?,
        })
    }

    /// Whether a live worker advertises `kind`.
    async fn advertised(&self, kind: &Kind) -> Result<bool, ApplyError> {
        let workers = crate::nats::read_all::<crate::membership::WorkerEntry>(&self.workers)
            .await
            .map_err(ApplyError::Transient)?;
        Ok(workers
            .values()
            .any(|w| w.kinds.iter().any(|k| k == kind.as_str())))
    }

    /// Builds the spec of a daemon create (validating the kind).
    pub fn daemon_spec(
        registry: &Registry,
        create: &CreateCommand,
    ) -> Result<DaemonSpec, ValidationError> {
        registry.check(&create.kind)?;
        let operator = match registry.operator(&create.kind) {
            Some(Ok(op)) => op,
            Some(Err(e)) => {
                return Err(ValidationError::new(
                    "kind",
                    format!("{} cannot be built: {e}", create.kind),
                ));
            }
            None => {
                return Err(ValidationError::new(
                    "kind",
                    format!("{} is not registered", create.kind),
                ));
            }
        };
        let dimension = operator.task_dimension(&create.payload);
        let uni_id = UniId::new(&create.kind, &dimension, &create.payload);
        Ok(DaemonSpec {
            dimension: if dimension.is_empty() {
                uni_id.to_string()
            } else {
                dimension
            },
            uni_id,
            kind: create.kind.clone(),
            payload: create.payload.clone(),
            options: create.options.clone(),
            created_at: chrono::Utc::now().to_rfc3339(),
            generation: 0,
        })
    }

    async fn create_periodic(&self, create: &CreateCommand) -> Result<Outcome, ApplyError> {
        use crate::periodic::PeriodicError;
        let spec = match crate::periodic::spec_from_create(create) {
            Ok(spec) => spec,
            Err(e) => return Ok(Outcome::err(400, e.to_string())),
        };
        match self.periodic.apply(&spec).await {
            Ok(()) => Ok(Outcome::ok(crate::client::periodic_data(&spec))),
            Err(PeriodicError::Refused(m)) => Ok(Outcome::err(400, m)),
            Err(e) => Err(ApplyError::Transient(e.to_string())),
        }
    }

    async fn enqueue(&self, create: &CreateCommand) -> Result<Outcome, ApplyError> {
        use crate::queue::EnqueueError;
        if let Err(e) = self.registry.check(&create.kind) {
            return Ok(Outcome::err(400, e.to_string()));
        }
        match self.enqueuer.enqueue(create).await {
            Ok(data) => Ok(Outcome::ok(data)),
            Err(EnqueueError::Invalid(e)) => Ok(Outcome::err(400, e.to_string())),
            Err(EnqueueError::Conflict { message, task_id }) => {
                let mut o = Outcome::err(409, message);
                o.data = json!({"task_id": task_id});
                Ok(o)
            }
            Err(EnqueueError::Nats(e)) => Err(ApplyError::Transient(e)),
        }
    }

    /// Applies a command. Refusals are `Ok` outcomes with a code; `Err` means
    /// "not now" or "not here".
    pub async fn apply(&self, command: &Command) -> Result<Outcome, ApplyError> {
        let transient = |e: SpecError| ApplyError::Transient(e.to_string());
        match command {
            Command::Create(create) => {
                if !self.registry.is_registered(&create.kind)
                    && self.advertised(&create.kind).await?
                {
                    return Err(ApplyError::NotMine(create.kind.to_string()));
                }
                match create.kind.task_type() {
                    TaskType::Async => return self.enqueue(create).await,
                    TaskType::Periodic => return self.create_periodic(create).await,
                    TaskType::Daemon => {}
                }
                let spec = match Self::daemon_spec(&self.registry, create) {
                    Ok(spec) => spec,
                    Err(e) => return Ok(Outcome::err(400, e.to_string())),
                };
                let outcome = self.specs.create(spec.clone()).await.map_err(transient)?;
                tracing::info!(uni_id = %spec.uni_id, ?outcome, "daemon task created");
                Ok(Outcome::ok(daemon_data(&spec, outcome)))
            }
            Command::Delete {
                target: DeleteTarget::Daemon(uni_id),
                ..
            } => match self.specs.delete(uni_id).await {
                Ok(spec) => {
                    tracing::info!(uni_id = %uni_id, "daemon task deleted");
                    Ok(Outcome::ok(json!({"uni_id": spec.uni_id})))
                }
                Err(SpecError::NotFound(_)) => Ok(Outcome::err(
                    404,
                    format!("daemon task `{uni_id}` does not exist"),
                )),
                Err(e) => Err(transient(e)),
            },
            Command::Delete {
                target: DeleteTarget::Async(task_id),
                ..
            } => match self.admin.delete(task_id).await {
                Ok(data) => Ok(Outcome::ok(data)),
                Err(crate::queue::AdminError::NotFound(m)) => Ok(Outcome::err(404, m)),
                Err(crate::queue::AdminError::Nats(m)) => Err(ApplyError::Transient(m)),
            },
            Command::Delete {
                target: DeleteTarget::Periodic(kind),
                ..
            } => match self.periodic.delete(kind).await {
                Ok(spec) => Ok(Outcome::ok(json!({"kind": spec.kind}))),
                Err(crate::periodic::PeriodicError::NotFound(k)) => Ok(Outcome::err(
                    404,
                    format!("periodic task `{k}` does not exist"),
                )),
                Err(e) => Err(ApplyError::Transient(e.to_string())),
            },
            Command::Reload { uni_id, .. } => match self.specs.reload(uni_id).await {
                Ok(spec) => {
                    tracing::info!(uni_id = %uni_id, generation = spec.generation, "daemon task reload requested");
                    Ok(Outcome::ok(
                        json!({"uni_id": spec.uni_id, "generation": spec.generation}),
                    ))
                }
                Err(SpecError::NotFound(_)) => Ok(Outcome::err(
                    404,
                    format!("daemon task `{uni_id}` does not exist"),
                )),
                Err(e) => Err(transient(e)),
            },
        }
    }
}

/// The data of a daemon create's outcome.
pub fn daemon_data(spec: &DaemonSpec, outcome: CreateOutcome) -> Value {
    json!({
        "uni_id": spec.uni_id,
        "kind": spec.kind,
        "payload": spec.payload,
        "options": spec.options,
        "created": outcome == CreateOutcome::Created,
        "replaced": outcome == CreateOutcome::Replaced,
    })
}

/// A command as parsed from its message (or why it could not be).
type Parsed = Result<Command, ValidationError>;

/// Commands a worker applies at once (on different tasks).
pub const LANES: usize = 64;
/// Commands waiting per lane.
const LANE_DEPTH: usize = 64;

/// Deliveries of one command before it is given up as poison.
const MAX_DELIVER: i64 = 20;

/// The consumer loop of one worker on the shared durable consumer.
#[derive(Debug)]
pub struct CommandConsumer {
    nats: crate::nats::Nats,
    handler: CommandHandler,
    events: EventPublisher,
}

impl CommandConsumer {
    /// A consumer applying commands with `handler`.
    pub fn new(nats: crate::nats::Nats, handler: CommandHandler, events: EventPublisher) -> Self {
        CommandConsumer {
            nats,
            handler,
            events,
        }
    }

    async fn consumer(&self) -> Result<jetstream::consumer::Consumer<pull::Config>, String> {
        let stream = self
            .nats
            .js
            .get_stream(names::STREAM_TASKS)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .get_or_create_consumer(
                names::CONSUMER_COMMANDS,
                pull::Config {
                    durable_name: Some(names::CONSUMER_COMMANDS.into()),
                    ack_wait: Duration::from_secs(30),
                    // Unlimited: a command left to another worker (`NotMine`) may be
                    // delivered many times; transient failures are bounded by
                    // `MAX_DELIVER` in `retry_later`.
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| e.to_string())
    }

    /// Consumes until `token` fires. Survives errors and server restarts.
    ///
    /// Commands run in [`LANES`] lanes: a command goes to the lane of the task
    /// it names (its uni_id), so commands on one task keep their order while
    /// commands on different tasks run side by side.
    pub async fn run(self, token: CancellationToken) {
        let this = Arc::new(self);
        let mut lanes = Vec::with_capacity(LANES);
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..LANES {
            let (tx, mut rx) =
                tokio::sync::mpsc::channel::<(jetstream::Message, Parsed)>(LANE_DEPTH);
            lanes.push(tx);
            let this = this.clone();
            workers.spawn(async move {
                while let Some((message, parsed)) = rx.recv().await {
                    this.handle(message, parsed).await;
                }
            });
        }
        'outer: loop {
            let messages = match this.consumer().await {
                Ok(c) => c.messages().await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match messages {
                Ok(mut messages) => loop {
                    tokio::select! {
                        next = messages.next() => match next {
                            Some(Ok(message)) => {
                                // Parsed once here: the lane depends on it, and the lane uses it.
                                let parsed = Command::parse(message.subject.as_str(), &message.payload);
                                let lane = this.lane_of(&message, &parsed);
                                if lanes[lane].send((message, parsed)).await.is_err() {
                                    break 'outer;
                                }
                            }
                            Some(Err(e)) => tracing::debug!(cause = %e, "command consumer hiccup"),
                            None => break,
                        },
                        () = token.cancelled() => break 'outer,
                    }
                },
                Err(e) => tracing::warn!(cause = %e, "command consumer unavailable, retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = token.cancelled() => break,
            }
        }
        // Let the lanes finish what they hold (each command is short).
        drop(lanes);
        while workers.join_next().await.is_some() {}
    }

    /// The lane of a message: by the uni_id of the daemon task it names (so a
    /// create and a later delete of one task stay in order), else by its body.
    fn lane_of(&self, message: &jetstream::Message, parsed: &Parsed) -> usize {
        use std::hash::{Hash, Hasher};
        let key = match parsed {
            Ok(Command::Create(create)) if create.kind.task_type() == TaskType::Daemon => {
                CommandHandler::daemon_spec(&self.handler.registry, create)
                    .map(|spec| spec.uni_id.to_string())
                    .unwrap_or_default()
            }
            Ok(Command::Delete {
                target: DeleteTarget::Daemon(uni_id),
                ..
            })
            | Ok(Command::Reload { uni_id, .. }) => uni_id.to_string(),
            _ => String::from_utf8_lossy(&message.payload).into_owned(),
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        (hasher.finish() % LANES as u64) as usize
    }

    async fn handle(&self, message: jetstream::Message, parsed: Parsed) {
        let subject = message.subject.to_string();
        let reply_to = message
            .headers
            .as_ref()
            .and_then(|h| h.get(names::HEADER_REPLY))
            .map(|v| v.as_str().to_owned());
        let outcome = match parsed {
            Err(e) => {
                self.poison(&message, &subject, &e.to_string()).await;
                Outcome::err(400, e.to_string())
            }
            Ok(command) => match self.handler.apply(&command).await {
                Ok(outcome) => {
                    crate::metrics::command(
                        &subject,
                        if outcome.result { "ok" } else { "refused" },
                    );
                    if outcome.code == 400 {
                        self.poison(&message, &subject, &outcome.message).await;
                    } else {
                        ack(&message, AckKind::Ack).await;
                    }
                    outcome
                }
                Err(ApplyError::NotMine(kind)) => {
                    tracing::debug!(kind, "command left to a worker that runs its kind");
                    return ack(&message, AckKind::Nak(Some(Duration::from_millis(100)))).await;
                }
                Err(e) => return self.retry_later(&message, &subject, &e.to_string()).await,
            },
        };
        if let Some(reply_to) = reply_to
            && let Ok(body) = serde_json::to_vec(&outcome)
            && let Err(e) = self.nats.client.publish(reply_to, body.into()).await
        {
            tracing::warn!(cause = %e, "command outcome not sent");
        }
    }

    async fn retry_later(&self, message: &jetstream::Message, subject: &str, cause: &str) {
        let delivered = message.info().map(|i| i.delivered).unwrap_or(0);
        if delivered >= MAX_DELIVER {
            return self
                .poison(
                    message,
                    subject,
                    &format!("gave up after {delivered} deliveries: {cause}"),
                )
                .await;
        }
        tracing::warn!(
            subject,
            cause,
            delivered,
            "command failed, will be redelivered"
        );
        ack(message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
    }

    async fn poison(&self, message: &jetstream::Message, subject: &str, cause: &str) {
        tracing::error!(subject, cause, "command refused and terminated");
        crate::metrics::command(subject, "poison");
        ack(message, AckKind::Term).await;
        let body = String::from_utf8_lossy(&message.payload);
        let kind = serde_json::from_slice::<Value>(&message.payload)
            .ok()
            .and_then(|v| v.get("kind").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        let detail = json!({"subject": subject, "error": cause, "body": body.chars().take(4096).collect::<String>()});
        self.events.emit("command", &kind, "error", detail).await;
    }
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(cause = %e, "command ack failed; it will be redelivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_commands() {
        let c = Command::parse(names::SUBJECT_CREATE, br#"{"kind":"daemon:demo:demo","payload":{"content":"ok"},"options":{"queue":"default"}}"#).unwrap();
        let Command::Create(c) = c else { panic!() };
        assert_eq!(c.kind.as_str(), "daemon:demo:demo");
        assert_eq!(c.options.queue(), "default");
        let d = Command::parse(
            names::SUBJECT_DELETE,
            br#"{"task_type":"daemon","task_uni_id":"x"}"#,
        )
        .unwrap();
        assert!(matches!(
            d,
            Command::Delete {
                target: DeleteTarget::Daemon(_),
                ..
            }
        ));
        let r = Command::parse(names::SUBJECT_RELOAD, br#"{"id":"7","task_uni_id":"x"}"#).unwrap();
        assert_eq!(r.id(), "7");
        assert_eq!(
            Command::parse(r.subject(), r.to_json().to_string().as_bytes()).unwrap(),
            r
        );
    }

    #[test]
    fn bad_commands_name_the_field() {
        let cases: [(&str, &[u8], &str); 6] = [
            (names::SUBJECT_CREATE, b"not json", "body"),
            (names::SUBJECT_CREATE, br#"{"payload":{}}"#, "kind"),
            (names::SUBJECT_CREATE, br#"{"kind":"cron:a:b"}"#, "kind"),
            (
                names::SUBJECT_CREATE,
                br#"{"kind":"daemon:a:b","options":{"retry":"x"}}"#,
                "options.retry",
            ),
            (
                names::SUBJECT_DELETE,
                br#"{"task_type":"daemon"}"#,
                "task_uni_id",
            ),
            (names::SUBJECT_RELOAD, br#"{}"#, "task_uni_id"),
        ];
        for (subject, body, field) in cases {
            assert_eq!(
                Command::parse(subject, body).unwrap_err().field,
                field,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
