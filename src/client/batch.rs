//! Batches of creates: [`TaskClient::submit_batch`] takes a list of create
//! bodies (`{kind, payload, options}`, any task type), parses and checks each
//! on its own and submits it through the same path as one create
//! ([`TaskClient::submit`]: async and periodic ones stored here, daemon ones
//! published for a worker with their command id as `Nats-Msg-Id` and an
//! answer on `Bmw-Reply`), many at once, and answers one [`Outcome`] per item
//! in item order. A refused item is that item's outcome; the others go on.
//!
//! Creates of one daemon task (one uni_id) are submitted one after the other
//! in item order, a later one only once the earlier one is answered or
//! stored, so a batch keeps the order per daemon task that single creates
//! sent one after the other have.
//!
//! Async creates, the bulk of most batches, take a shorter way: checked
//! together ([`Operations::create_async_many`], where each kind is looked
//! up once) and stored with up to a thousand publishes awaiting their acks
//! at once, each still acked (stored) before its item answers `code` 0.
//!
//! [`Operations::create_async_many`]: crate::ops::Operations::create_async_many

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Submitted, TaskClient};
use crate::command::wire;
use crate::nats::names;
use crate::task::{Command, CreateCommand, OpError, Outcome, TaskType, ValidationError};

/// Most items one batch may hold.
pub const MAX_BATCH_ITEMS: usize = 10_000;

/// Items of a batch submitted at once (their publishes and stores pipelined).
const BATCH_CONCURRENCY: usize = 64;

/// The code of an item stored durably that no worker answered in time (the
/// single create route answers it with HTTP 202).
pub const ACCEPTED_CODE: u16 = 202;

/// The message of an accepted item.
pub const ACCEPTED_MESSAGE: &str = "accepted: no worker answered in time; the command is stored and will be applied when a worker runs";

/// One item, parsed (or why not).
type Parsed = Result<Command, ValidationError>;

impl TaskClient {
    /// Submits each create body of `items`; one outcome per item, in order:
    /// `code` 0 (created, or a duplicate answered as a single create answers
    /// it), [`ACCEPTED_CODE`] (stored, no worker answered in time), or the
    /// status of why the item was refused.
    pub async fn submit_batch(&self, items: Vec<Value>) -> Vec<Outcome> {
        self.submit_parsed(items.into_iter().map(parse_item).collect(), None)
            .await
    }

    /// [`TaskClient::submit_batch`] for items still in their JSON text (the
    /// bridge's request body): each is parsed straight into its command,
    /// with no JSON tree in between.
    /// Answers by `until` when given: items not sent by then are answered
    /// [`UNFINISHED_CODE`] with `data.submitted` `false` (not sent) or
    /// `"unknown"` (being sent); a worker's answer is awaited no later than
    /// `until` (the item is then [`ACCEPTED_CODE`]: stored). Daemon and
    /// periodic creates are idempotent, so sending an unfinished one again
    /// is safe.
    pub async fn submit_batch_raw(
        &self,
        items: &[&RawValue],
        until: Option<Instant>,
    ) -> Vec<Outcome> {
        let parsed = items
            .iter()
            .map(|item| wire::parse(names::SUBJECT_CREATE, item.get().as_bytes()))
            .collect();
        self.submit_parsed(parsed, until).await
    }

    async fn submit_parsed(&self, items: Vec<Parsed>, until: Option<Instant>) -> Vec<Outcome> {
        let count = items.len();
        // The async creates, and the rest (refused, daemon, periodic) with
        // their places in the batch.
        let (mut creates, mut others) = (Vec::new(), Vec::new());
        for (index, parsed) in items.into_iter().enumerate() {
            match parsed {
                Ok(Command::Create(create)) if create.kind.task_type() == TaskType::Async => {
                    creates.push((index, create));
                }
                parsed => others.push((index, parsed)),
            }
        }
        let async_creates = async {
            let borrowed: Vec<&CreateCommand> = creates.iter().map(|(_, c)| c.as_ref()).collect();
            self.ops.create_async_many(&borrowed).await
        };
        let others = async {
            let mut outcomes = Vec::with_capacity(others.len());
            for wave in self.waves(others) {
                let answered: Vec<(usize, Outcome)> =
                    futures::stream::iter(wave)
                        .map(|(index, parsed)| async move {
                            (index, self.submit_item(parsed, until).await)
                        })
                        .buffered(BATCH_CONCURRENCY)
                        .collect()
                        .await;
                outcomes.extend(answered);
            }
            outcomes
        };
        let (created, others) = futures::join!(async_creates, others);
        let mut outcomes: Vec<Option<Outcome>> = vec![None; count];
        for ((index, _), result) in creates.iter().zip(created) {
            outcomes[*index] = Some(match result {
                Ok(data) => Outcome::ok(data),
                Err(e) => e.into(),
            });
        }
        for (index, outcome) in others {
            outcomes[index] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::err(500, "this item went unanswered")))
            .collect()
    }

    /// The items cut into consecutive waves in which no daemon task appears
    /// twice: a wave is submitted all at once, the next one when it is done.
    fn waves(&self, items: Vec<(usize, Parsed)>) -> Vec<Vec<(usize, Parsed)>> {
        let mut waves: Vec<Vec<(usize, Parsed)>> = vec![Vec::new()];
        let mut daemon_tasks_in_wave = HashSet::new();
        for (index, parsed) in items {
            if let Some(uni_id) = self.daemon_task_of(&parsed)
                && !daemon_tasks_in_wave.insert(uni_id.clone())
            {
                waves.push(Vec::new());
                daemon_tasks_in_wave.clear();
                daemon_tasks_in_wave.insert(uni_id);
            }
            if let Some(wave) = waves.last_mut() {
                wave.push((index, parsed));
            }
        }
        waves
    }

    /// Which daemon task a daemon create is for: its uni_id, or its kind
    /// when that cannot be told here (an unknown kind, an operator that
    /// panics: the submit answers why).
    fn daemon_task_of(&self, parsed: &Parsed) -> Option<String> {
        let Ok(Command::Create(create)) = parsed else {
            return None;
        };
        if create.kind.task_type() != TaskType::Daemon {
            return None;
        }
        let spec =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.ops.daemon().spec_for(create)));
        Some(match spec {
            Ok(Ok(spec)) => spec.uni_id.to_string(),
            _ => create.kind.to_string(),
        })
    }

    /// One item's outcome; a panic in task code (an operator's dimension)
    /// answers 500 for that item, as the single create route does.
    async fn submit_item(&self, parsed: Parsed, until: Option<Instant>) -> Outcome {
        let command = match parsed {
            Ok(command) => command,
            Err(e) => return OpError::from(e).into(),
        };
        let Some(until) = until else {
            return self.submit_caught(command, None).await;
        };
        if Instant::now() >= until {
            return unfinished(
                json!(false),
                "the batch's time ran out before this item was sent",
            );
        }
        match tokio::time::timeout_at(until, self.submit_caught(command, Some(until))).await {
            Ok(outcome) => outcome,
            Err(_) => unfinished(
                json!("unknown"),
                "the batch's time ran out while this item was being sent",
            ),
        }
    }

    async fn submit_caught(&self, command: Command, until: Option<Instant>) -> Outcome {
        match AssertUnwindSafe(self.submit_until(command, until))
            .catch_unwind()
            .await
        {
            Ok(Ok(Submitted::Done(outcome))) => outcome,
            Ok(Ok(Submitted::Accepted { data })) => Outcome {
                result: true,
                code: ACCEPTED_CODE,
                message: ACCEPTED_MESSAGE.into(),
                data,
            },
            Ok(Ok(Submitted::Duplicate { data })) => Outcome {
                result: true,
                code: ACCEPTED_CODE,
                message: super::DUPLICATE_MESSAGE.into(),
                data,
            },
            Ok(Err(e)) => e.into(),
            Err(panic) => {
                let message = crate::queue::handler::panic_message(panic.as_ref());
                tracing::error!(panic = message, "a batch item's create panicked");
                Outcome::err(500, format!("creating this item panicked: {message}"))
            }
        }
    }
}

/// The code of a batch item the batch's time limit left unanswered.
pub const UNFINISHED_CODE: u16 = 503;

/// An item left unfinished: `submitted` says whether it was sent (`false`)
/// or may have been (`"unknown"`).
fn unfinished(submitted: Value, why: &str) -> Outcome {
    Outcome {
        result: false,
        code: UNFINISHED_CODE,
        message: format!("not finished: {why}; send it again (creates are idempotent)"),
        data: json!({"submitted": submitted}),
    }
}

/// A create body as a command, parsed as `POST /bmw/task/` parses one.
fn parse_item(item: Value) -> Parsed {
    wire::parse_value(names::SUBJECT_CREATE, item)
}
