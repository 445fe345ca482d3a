//! What a caller asks of bmw, as typed values: a [`Command`] (create, delete
//! or reload) and its parts. The bridge, `bmw task` and the command consumer
//! all build these; the operations apply them. Their JSON form on
//! `bmw.task.*` is `crate::command::wire`'s business.

use serde_json::{Map, Value};

use super::{Kind, Options, TaskType, UniId};

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
    /// Where it came from, which decides an async task's id when
    /// `options.task_id` is not given.
    pub origin: Origin,
}

/// Where a create came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Origin {
    /// Applied once, where it was asked (the bridge, `bmw task`): an async
    /// task gets a fresh id.
    #[default]
    Direct,
    /// Applied from a `bmw.task.create` message, which may be delivered more
    /// than once: an async task's id is derived from the command's `id`, so
    /// a second apply's publish is a duplicate of the first's instead of
    /// another task.
    Message,
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
    /// Every task of a type (`DELETE /bmw/task/all`).
    All(TaskType),
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
        /// Keys to merge into the stored payload (BMW's map merge: each
        /// top-level key replaces the stored one); `None` restarts as it is.
        payload: Option<Map<String, Value>>,
    },
}

impl Command {
    /// The command id.
    pub fn id(&self) -> &str {
        match self {
            Command::Create(c) => &c.id,
            Command::Delete { id, .. } | Command::Reload { id, .. } => id,
        }
    }

    /// The daemon task this command names, if it names one by uni_id.
    pub fn daemon_uni_id(&self) -> Option<&UniId> {
        match self {
            Command::Delete {
                target: DeleteTarget::Daemon(uni_id),
                ..
            }
            | Command::Reload { uni_id, .. } => Some(uni_id),
            _ => None,
        }
    }
}
