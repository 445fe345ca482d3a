//! [`CommandHandler`]: what a worker does with one command message. It
//! applies the command through the [`Operations`], then settles the message:
//! acked when applied or refused for a reason of the task (404, 409), left
//! to another worker when only they run its kind, redelivered after a NATS
//! failure, and terminated as poison when it can never apply (bad input, a
//! request the server refuses, or too many failed deliveries) — with an
//! `error` event. The outcome goes to the `Bmw-Reply` subject once final. A
//! panic while handling one command (a bug, or user code such as an
//! operator's `task_dimension`) fails that command alone, with a 500.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use futures::FutureExt;
use serde_json::{Value, json};

use crate::events::EventPublisher;
use crate::nats::{NatsErrorKind, names};
use crate::ops::Operations;
use crate::queue::panic_message;
use crate::task::{Command, OpError, Outcome, ValidationError};

/// How long a command that cannot be applied for now (a full queue or
/// stream, an election, an outage) is kept and tried again, from when it
/// was published; then it is given up, with an `error` event naming its
/// sequence in `BMW_TASKS` (where it stays for the stream's week) and an
/// answer on its `Bmw-Reply`.
pub const COMMAND_PATIENCE: Duration = Duration::from_secs(10 * 60);

/// The longest wait between two tries of such a command.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// A command as parsed from its message (or why it could not be).
pub(super) type Parsed = Result<Command, ValidationError>;

/// A command message, parsed, with the hash of its order key (the task it
/// names): commands with one key are applied in order, one at a time.
pub(super) type Keyed = (Message, Parsed, u64);

/// Applies command messages; shared by all lanes of a worker.
#[derive(Debug)]
pub struct CommandHandler {
    ops: Operations,
    client: async_nats::Client,
    events: EventPublisher,
}

/// What to do with a message after applying its command.
enum Settle {
    /// Done: ack, and reply.
    Ack(Outcome),
    /// Never applicable: terminate, emit an error event, and reply.
    Poison(Outcome),
    /// Not now: redelivered later, no reply yet.
    Later(String),
    /// Not here: only other workers run its kind; redelivered at once, with
    /// no limit on deliveries.
    Elsewhere,
}

impl Settle {
    /// How the command was settled, as its span records it.
    fn label(&self) -> &'static str {
        match self {
            Settle::Ack(outcome) if outcome.result => "ok",
            Settle::Ack(_) => "refused",
            Settle::Poison(_) => "poison",
            Settle::Later(_) => "later",
            Settle::Elsewhere => "elsewhere",
        }
    }
}

impl CommandHandler {
    /// A handler applying commands with `ops`, replying on `client`.
    pub fn new(ops: Operations, client: async_nats::Client, events: EventPublisher) -> Self {
        CommandHandler {
            ops,
            client,
            events,
        }
    }

    /// The operations (the consumer uses them to pick a command's lane).
    pub(super) fn ops(&self) -> &Operations {
        &self.ops
    }

    /// Applies and settles a lane's batch. Commands on one task (the same
    /// order key: a daemon task's uni_id, else the command's body) are
    /// applied one by one in the order they came, so a daemon create and a
    /// later delete of that task are never reordered nor applied at once;
    /// commands on different tasks are applied together, so their writes
    /// (an async create's task publish, a daemon create's spec write) are
    /// in flight at the same time: a round trip per batch, not per command.
    pub(super) async fn handle_batch(&self, batch: Vec<Keyed>) {
        let mut chains: Vec<Vec<(Message, Parsed)>> = Vec::new();
        let mut chain_of: HashMap<u64, usize> = HashMap::with_capacity(batch.len());
        for (message, parsed, key) in batch {
            let chain = *chain_of.entry(key).or_insert_with(|| {
                chains.push(Vec::new());
                chains.len() - 1
            });
            chains[chain].push((message, parsed));
        }
        futures::future::join_all(chains.into_iter().map(|chain| async move {
            for (message, parsed) in chain {
                self.handle(message, parsed).await;
            }
        }))
        .await;
    }

    /// Applies one command message and settles it. A panic while doing so
    /// fails this command alone ([`CommandHandler::fail_panicked`]).
    pub(super) async fn handle(&self, message: Message, parsed: Parsed) {
        let span = crate::traces::command_span(message.subject.as_str(), message.headers.as_ref());
        if let Ok(Command::Create(create)) = &parsed
            && !span.is_disabled()
        {
            span.record("task.kind", create.kind.as_str());
        }
        let settling = self.apply_and_settle(&message, parsed, &span);
        let handled = AssertUnwindSafe(tracing::Instrument::instrument(settling, span.clone()))
            .catch_unwind()
            .await;
        if let Err(panic) = handled {
            self.fail_panicked(&message, &panic_message(panic.as_ref()))
                .await;
        }
    }

    /// Settles a command whose handling panicked: terminated as poison with
    /// an `error` event, and answered 500 (never retried: it would panic
    /// again, on every worker).
    pub(super) async fn fail_panicked(&self, message: &Message, panic: &str) {
        let outcome = Outcome::err(500, format!("command handling panicked: {panic}"));
        self.reply(message, &outcome).await;
        self.poison(message, message.subject.as_str(), &outcome.message)
            .await;
    }

    async fn apply_and_settle(&self, message: &Message, parsed: Parsed, span: &tracing::Span) {
        let subject = message.subject.to_string();
        let settle = match (parsed, reply_target(message)) {
            // Refused before anything is applied: a producer that names
            // another's subject as its inbox gets nothing done.
            (_, Err(target)) => Settle::Poison(Outcome::err(
                400,
                format!(
                    "`{}` must be an inbox of the sender's own (`_INBOX.<id>` or \
                     `_INBOX_<user>.<id>`, no wildcard), not {target:?}; nothing was applied",
                    names::HEADER_REPLY
                ),
            )),
            (Err(e), _) => Settle::Poison(OpError::Invalid(e).into()),
            (Ok(command), Ok(_)) => self.apply(&command).await,
        };
        if !span.is_disabled() {
            span.record("outcome", settle.label());
        }
        match settle {
            // The outcome is sent before the command is settled, on the same
            // connection: a worker killed between the two leaves the command
            // to be applied again and answered again, never settled unanswered.
            Settle::Ack(outcome) => {
                let label = if outcome.result { "ok" } else { "refused" };
                crate::metrics::command(subject_label(&subject), label);
                self.reply(message, &outcome).await;
                ack(message, AckKind::Ack).await;
            }
            Settle::Poison(outcome) => {
                self.reply(message, &outcome).await;
                self.poison(message, &subject, &outcome.message).await;
            }
            Settle::Elsewhere => {
                let delay = Duration::from_millis(100);
                ack(message, AckKind::Nak(Some(delay))).await;
            }
            Settle::Later(cause) => {
                let info = message.info().ok();
                let delivered = info.as_ref().map_or(0, |i| i.delivered);
                let age = info.as_ref().map_or(Duration::ZERO, |i| {
                    let published = std::time::SystemTime::from(i.published);
                    published.elapsed().unwrap_or(Duration::ZERO)
                });
                if age < COMMAND_PATIENCE {
                    // 1 s, 2 s, 4 s... up to 30 s between tries.
                    let exponent = u32::try_from(delivered.clamp(1, 6) - 1).unwrap_or(0);
                    let delay = Duration::from_secs(1 << exponent).min(MAX_RETRY_DELAY);
                    tracing::warn!(
                        subject,
                        cause,
                        delivered,
                        retry_in = ?delay,
                        "command cannot be applied now; kept and tried again"
                    );
                    return ack(message, AckKind::Nak(Some(delay))).await;
                }
                let sequence = info.as_ref().map_or(0, |i| i.stream_sequence);
                let gave_up = Outcome::err(
                    503,
                    format!(
                        "gave up after {delivered} tries over {}s: {cause}; the command stays \
                         in BMW_TASKS at sequence {sequence} for its max age",
                        age.as_secs()
                    ),
                );
                self.reply(message, &gave_up).await;
                self.poison(message, &subject, &gave_up.message).await;
            }
        }
    }

    async fn apply(&self, command: &Command) -> Settle {
        match self.ops.apply(command).await {
            Ok(Some(data)) => Settle::Ack(Outcome::ok(data)),
            Ok(None) => {
                tracing::debug!(
                    id = command.id(),
                    "command left to a worker that runs its kind"
                );
                Settle::Elsewhere
            }
            Err(e @ OpError::Invalid(_)) => Settle::Poison(e.into()),
            // On a subject, too large is bad input like any other (400).
            Err(e @ OpError::TooLarge { .. }) => Settle::Poison(Outcome::err(400, e.to_string())),
            Err(OpError::Nats(e)) if e.kind() == NatsErrorKind::Refused => {
                Settle::Poison(OpError::Nats(e).into())
            }
            Err(OpError::Nats(e)) => Settle::Later(e.to_string()),
            // A full queue or stream may drain: the command waits in BMW_TASKS meanwhile.
            Err(e @ (OpError::QueueFull { .. } | OpError::StorageFull { .. })) => {
                Settle::Later(e.to_string())
            }
            Err(e) => Settle::Ack(e.into()),
        }
    }

    /// Sends `outcome` to the message's `Bmw-Reply` inbox, if it names one
    /// (never to anything else: see [`reply_target`]).
    async fn reply(&self, message: &Message, outcome: &Outcome) {
        if let Ok(Some(reply_to)) = reply_target(message)
            && let Err(e) = self
                .client
                .publish(reply_to, crate::nats::to_json_bytes(outcome))
                .await
        {
            tracing::warn!(cause = %e, "command outcome not sent");
        }
    }

    async fn poison(&self, message: &Message, subject: &str, cause: &str) {
        tracing::error!(subject, cause, "command refused and terminated");
        crate::metrics::command(subject_label(subject), "poison");
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

/// The inbox a command's outcome goes to: `Ok(None)` without a `Bmw-Reply`
/// header, `Err(target)` when a header names anything but an inbox
/// ([`names::is_reply_inbox`]; every value of a repeated header counts).
fn reply_target(message: &Message) -> Result<Option<String>, String> {
    let Some(headers) = message.headers.as_ref() else {
        return Ok(None);
    };
    let mut target = None;
    for value in headers.get_all(names::HEADER_REPLY) {
        let value = value.as_str();
        if !names::is_reply_inbox(value) || target.is_some_and(|t: &str| t != value) {
            return Err(value.chars().take(300).collect());
        }
        target = Some(value);
    }
    Ok(target.map(str::to_owned))
}

async fn ack(message: &Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(cause = %e, "command ack failed; it will be redelivered");
    }
}

/// The `subject` label of a command's metric: one of the command subjects,
/// or `other` (the stream takes any `bmw.task.<token>`, and a series per
/// token would let a producer grow the metrics without bound).
fn subject_label(subject: &str) -> &'static str {
    [
        names::SUBJECT_CREATE,
        names::SUBJECT_DELETE,
        names::SUBJECT_RELOAD,
    ]
    .into_iter()
    .find(|known| *known == subject)
    .unwrap_or("other")
}
