//! [`Enqueuer`]: validates an async create and puts the task in its queue —
//! one durable publish on `bmw.async.<queue>.<id>`, or a one-shot `@at`
//! schedule on `bmw.schedule.at.<queue>.<id>` that nats-server fires at
//! `process_at` — after taking the unique lock when `unique_ttl` is set.
//!
//! Used by the bridge and `bmw task` directly (a task is durable once
//! published, so no worker needs to answer) and by workers for async creates
//! that arrive as `bmw.task.create` commands.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, message::PublishMessage};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::message::TaskMessage;
use crate::nats::{
    NatsError, RETRY_BUDGET, TtlCreate, create_with_ttl, names, publish_with_retries, with_retries,
};
use crate::task::{
    CreateCommand, OpError, Origin, TaskType, ValidationError, canonical_payload, check_fits,
    to_hex,
};

/// Enqueues async tasks.
#[derive(Debug, Clone)]
pub struct Enqueuer {
    js: jetstream::Context,
    unique: kv::Store,
    stream: jetstream::stream::Stream,
    schedules: jetstream::stream::Stream,
}

/// When a delayed task is due: `process_at`, or now + `process_in`.
fn due_time(create: &CreateCommand) -> Result<Option<DateTime<Utc>>, ValidationError> {
    let o = &create.options;
    match (&o.process_at, o.process_in) {
        (Some(_), Some(_)) => Err(ValidationError::new(
            "options.process_in",
            "give process_at or process_in, not both",
        )),
        (Some(at), None) => Ok(Some(parse_time("options.process_at", at)?)),
        (None, Some(d)) => chrono::TimeDelta::from_std(d)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d))
            .map(Some)
            .ok_or_else(|| ValidationError::new("options.process_in", "is too far in the future")),
        (None, None) => Ok(None),
    }
}

fn parse_time(field: &str, s: &str) -> Result<DateTime<Utc>, ValidationError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| ValidationError::new(field, format!("{s:?} is not an RFC 3339 time ({e})")))
}

/// Checks what only an async create needs: a live deadline, a subject-safe
/// task id, non-zero windows.
pub fn validate(create: &CreateCommand) -> Result<(), ValidationError> {
    let o = &create.options;
    if !matches!(
        create.kind.task_type(),
        TaskType::Async | TaskType::Periodic
    ) {
        return Err(ValidationError::new("kind", "not an async kind"));
    }
    if let Some(deadline) = &o.deadline
        && parse_time("options.deadline", deadline)? <= Utc::now()
    {
        return Err(ValidationError::new(
            "options.deadline",
            format!("{deadline} is in the past"),
        ));
    }
    if let Some(id) = &o.task_id {
        crate::task::check_task_id("options.task_id", id)?;
    }
    if o.unique_ttl.is_some_and(|d| d.is_zero()) {
        return Err(ValidationError::new(
            "options.unique_ttl",
            "must be at least 1s",
        ));
    }
    if o.timeout.is_some_and(|d| d.is_zero()) {
        return Err(ValidationError::new(
            "options.timeout",
            "must be above zero",
        ));
    }
    due_time(create)?;
    Ok(())
}

impl Enqueuer {
    /// An enqueuer over the (provisioned) stream and unique bucket.
    pub async fn open(js: &jetstream::Context) -> Result<Enqueuer, NatsError> {
        let unique = js.get_key_value(names::BUCKET_UNIQUE).await?;
        let stream = js.get_stream(names::STREAM_ASYNC).await?;
        let schedules = js.get_stream(names::STREAM_SCHEDULES).await?;
        Ok(Enqueuer {
            js: js.clone(),
            unique,
            stream,
            schedules,
        })
    }

    /// Validates and enqueues; returns `{task_id, queue, state, process_at}`.
    /// A create from a command message that was applied already (a
    /// redelivery) answers the task of the first apply, with `"duplicate":
    /// true`, and enqueues nothing.
    pub async fn enqueue(&self, create: &CreateCommand) -> Result<Value, OpError> {
        validate(create)?;
        let queue = create.options.queue().to_owned();
        let due =
            due_time(create)?.filter(|at| *at > Utc::now() + chrono::Duration::milliseconds(500));
        let answer = |task_id: &str, duplicate: bool| created(create, due, task_id, duplicate);
        let (task_id, derived) = task_id_for(create);
        // Measured as it will be stored, before anything is looked up or locked.
        let message = TaskMessage {
            id: task_id.clone(),
            kind: create.kind.to_string(),
            payload: create.payload.clone(),
            options: create.options.clone(),
            enqueued_at: Some(Utc::now().to_rfc3339()),
            errors: Vec::new(),
        };
        let body = crate::nats::to_json_bytes(&message);
        check_fits("async task", body.len(), self.js.client().max_payload())?;
        // A derived id is not looked up (three reads on every command): a
        // redelivery comes within the duplicate window, and its publish is
        // answered as a duplicate.
        if create.options.task_id.is_some()
            && with_retries(RETRY_BUDGET, |_| self.id_in_use(&task_id)).await?
        {
            return Err(OpError::Conflict {
                message: format!("task id `{task_id}` is in use"),
                task_id,
            });
        }
        let lock = match create.options.unique_ttl {
            Some(window) => self.lock_unique(create, &queue, &task_id, window).await?,
            None => None,
        };
        let (subject, mut headers) = destination(&queue, &task_id, due);
        // A delayed task's schedule carries the trace to the message it fires.
        let span = crate::traces::publish_span(&subject, &task_id);
        crate::traces::inject(&span, &mut headers);
        let publish = PublishMessage::build()
            .payload(body)
            .headers(headers)
            .message_id(&task_id);
        // Retried through an election or a reconnect; the message id keeps it single.
        let published = tracing::Instrument::instrument(
            publish_with_retries(&self.js, &subject, publish),
            span,
        );
        let ack = match published.await {
            Ok(ack) => ack,
            Err(e) => {
                if let Some(lock) = lock {
                    self.unlock_unique(&lock).await;
                }
                return Err(e.into());
            }
        };
        if ack.duplicate {
            if derived {
                return Ok(answer(&task_id, true));
            }
            return Err(OpError::Conflict {
                message: format!("task id `{task_id}` was enqueued already"),
                task_id,
            });
        }
        crate::metrics::task_enqueued(create.kind.as_str());
        Ok(answer(&task_id, false))
    }

    /// Whether a task id is pending, scheduled, or has a record.
    async fn id_in_use(&self, task_id: &str) -> Result<bool, NatsError> {
        for (stream, filter) in [
            (&self.stream, names::async_subject(names::ANY, task_id)),
            (&self.schedules, names::delayed_subject(names::ANY, task_id)),
            (&self.schedules, names::fired_subject(names::ANY, task_id)),
        ] {
            if super::inspect::subjects(stream, &filter)
                .await?
                .next()
                .is_some()
            {
                return Ok(true);
            }
        }
        let records = self.js.get_key_value(names::BUCKET_ASYNC_TASKS).await?;
        Ok(matches!(records.entry(task_id).await?, Some(e) if e.operation == kv::Operation::Put))
    }

    /// Takes the unique lock of this kind, payload and queue for `window`,
    /// holding `task_id`. `Some(lock)`: taken now; `None`: this task holds it
    /// already (a redelivered command's second apply).
    async fn lock_unique(
        &self,
        create: &CreateCommand,
        queue: &str,
        task_id: &str,
        window: Duration,
    ) -> Result<Option<UniqueLock>, OpError> {
        let mut hasher = Sha256::new();
        hasher.update(create.kind.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(canonical_payload(&create.payload));
        hasher.update([0]);
        hasher.update(queue.as_bytes());
        let key = to_hex(&hasher.finalize());
        let lock = with_retries(RETRY_BUDGET, |_| {
            create_with_ttl(
                &self.js,
                &self.unique,
                &key,
                task_id.as_bytes().to_vec().into(),
                window,
            )
        })
        .await?;
        match lock {
            TtlCreate::Created(revision) => Ok(Some(UniqueLock { key, revision })),
            // Taken by an earlier apply or attempt of this very create.
            TtlCreate::Exists(existing) if existing.as_ref() == task_id.as_bytes() => Ok(None),
            TtlCreate::Exists(existing) => {
                let existing = String::from_utf8_lossy(&existing).into_owned();
                Err(OpError::Conflict {
                    message: format!(
                        "a task of this kind, payload and queue exists within its unique window: `{existing}`"
                    ),
                    task_id: existing,
                })
            }
        }
    }

    /// Releases a unique lock whose task was not enqueued, unless a newer
    /// lock replaced it. A failure is logged: the lock then lasts its window.
    async fn unlock_unique(&self, lock: &UniqueLock) {
        if let Err(e) = self
            .unique
            .delete_expect_revision(&lock.key, Some(lock.revision))
            .await
        {
            tracing::warn!(key = lock.key, cause = %e, "unique lock of a task not enqueued not released");
        }
    }
}

/// A unique lock this create took: its key and the revision it wrote.
#[derive(Debug)]
struct UniqueLock {
    key: String,
    revision: u64,
}

/// The async task id of a create command: the same for every delivery of
/// one command, so a redelivery's publish is deduplicated by its
/// `Nats-Msg-Id`; a UUID (version 8) from a digest of the command id.
pub fn task_id_of_command(command_id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"bmw.task.create\0")
        .chain_update(command_id.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// What a create answers: the task, its queue and state, and whether it was
/// a duplicate of one enqueued already.
fn created(
    create: &CreateCommand,
    due: Option<DateTime<Utc>>,
    task_id: &str,
    duplicate: bool,
) -> Value {
    let state = if due.is_some() {
        "scheduled"
    } else {
        "pending"
    };
    let mut data = json!({"task_id": task_id, "kind": create.kind,
                          "queue": create.options.queue(), "state": state,
                          "process_at": due.map(|d| d.to_rfc3339())});
    if duplicate {
        data["duplicate"] = json!(true);
    }
    data
}

/// The task's id: the one given, else derived from the command's (so a
/// redelivered command enqueues once), else a new one; and whether it was
/// derived.
fn task_id_for(create: &CreateCommand) -> (String, bool) {
    match (&create.options.task_id, create.origin) {
        (Some(id), _) => (id.clone(), false),
        (None, Origin::Message) => (task_id_of_command(&create.id), true),
        (None, Origin::Direct) => (uuid::Uuid::new_v4().to_string(), false),
    }
}

/// Where a task is published: its queue's subject, or, when it is due later,
/// a schedule that fires it there at `due`.
fn destination(queue: &str, task_id: &str, due: Option<DateTime<Utc>>) -> (String, HeaderMap) {
    let mut headers = HeaderMap::new();
    let subject = match due {
        Some(at) => {
            let at = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            headers.insert(
                async_nats::header::NATS_SCHEDULE,
                format!("@at {at}").as_str(),
            );
            headers.insert(
                async_nats::header::NATS_SCHEDULE_TARGET,
                names::fired_subject(queue, task_id).as_str(),
            );
            names::delayed_subject(queue, task_id)
        }
        None => names::async_subject(queue, task_id),
    };
    (subject, headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{Kind, Options, arbitrary};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(arbitrary::config())]

        #[test]
        fn creates_validate_or_are_refused_by_name((kind, payload, options) in arbitrary::create_parts()) {
            let (Ok(kind), Ok(options)) = (Kind::parse(&kind), Options::from_json(Some(&options))) else {
                return Ok(());
            };
            let create = CreateCommand { id: "c".into(), kind, payload, options, origin: Default::default() };
            match validate(&create) {
                Ok(()) => {
                    let due = due_time(&create);
                    prop_assert!(due.is_ok(), "{:?}", due);
                }
                Err(e) => prop_assert!(e.field == "kind" || e.field.starts_with("options."), "{}", e),
            }
        }
    }

    #[test]
    fn a_command_s_task_id_is_stable_distinct_and_a_valid_task_id() {
        let a = task_id_of_command("cmd-1");
        assert_eq!(a, task_id_of_command("cmd-1"));
        assert_ne!(a, task_id_of_command("cmd-2"));
        assert!(uuid::Uuid::parse_str(&a).is_ok(), "{a}");
        assert_eq!(crate::task::check_task_id("task_id", &a), Ok(()));
    }

    #[test]
    fn the_longest_delay_is_a_date() {
        let create = CreateCommand {
            id: "c".into(),
            kind: Kind::parse("async:a:b").unwrap(),
            payload: Value::Null,
            options: Options {
                process_in: Some(crate::task::options::MAX_DURATION),
                ..Options::default()
            },
            origin: Default::default(),
        };
        assert!(due_time(&create).unwrap().unwrap() > Utc::now());
    }
}
