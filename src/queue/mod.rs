//! Async tasks: one-shot background jobs on the `BMW_ASYNC` work-queue stream.
//!
//! Flow: [`enqueue`] validates a create and publishes the task (or its `@at`
//! schedule); every worker's [`runtime`] fetches from the shared consumer of
//! each queue it listens on (weighted, bounded concurrency), runs the
//! [`handler`], and acks, `nak`s with a [`retry`] delay, or dead-letters the
//! task. [`record`] keeps the inspectable state where it matters, and
//! [`inspect`] reads tasks and queue stats back. Delivery is at least once.

pub mod admin;
mod attempt;
mod completer;
pub mod enqueue;
mod fetcher;
pub mod handler;
pub mod inspect;
pub mod message;
mod outcome;
pub mod record;
pub mod retry;
pub mod runtime;

pub use admin::{Admin, AdminError};
pub use enqueue::{EnqueueError, Enqueuer};
pub use handler::{Handler, TaskContext, TaskError};
pub use inspect::{Inspector, ListQuery, QueueStats};
pub use message::TaskMessage;
pub use record::{RecordStore, TaskRecord, TaskState};
pub use retry::Backoff;
pub use runtime::AsyncRuntime;
