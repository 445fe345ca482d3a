//! Async tasks: one-shot background jobs on the `BMW_ASYNC` work-queue stream.
//!
//! Flow: [`ops`] is what callers use: create ([`enqueue`] validates and
//! publishes the task, or its `@at` schedule), delete and requeue
//! ([`admin`]) and reads ([`inspect`]). Every worker's [`runtime`] fetches
//! from the shared consumer of each queue it listens on (weighted, bounded
//! concurrency), runs the [`handler`] of each task in an attempt, and acks,
//! `nak`s with a [`retry`] delay, or dead-letters it ([`dead_letter`]); what attempts share is
//! in [`shared`]. [`record`] keeps the inspectable state where it matters.
//! Delivery is at least once.

pub mod admin;
mod attempt;
mod completer;
pub mod dead_letter;
mod depth;
pub mod enqueue;
mod fetcher;
pub mod handler;
pub mod inspect;
pub mod listing;
pub mod message;
pub mod ops;
mod outcome;
mod overlap;
pub mod record;
pub mod retry;
pub mod runtime;
mod schedule_room;
pub mod shared;

pub use admin::Admin;
pub use enqueue::Enqueuer;
pub(crate) use handler::panic_message;
pub use handler::{Handler, Handlers, TaskContext, TaskError};
pub use inspect::{Inspector, QueueStats};
pub use listing::{Cursor, ListQuery, Page};
pub use message::TaskMessage;
pub use ops::AsyncOps;
pub use record::{RecordStore, TaskRecord, TaskState};
pub use retry::Backoff;
pub use runtime::AsyncRuntime;
pub use shared::{AttemptEnv, TickObserver};
