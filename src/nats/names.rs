//! Every NATS name bmw uses: streams, subjects, buckets, consumers and headers.
//!
//! Nothing else in the crate spells a subject or bucket name; the contract with
//! other programs (design.md §2-3) lives here in one place.

/// Stream holding task commands (`bmw.task.create|delete|reload`).
pub const STREAM_TASKS: &str = "BMW_TASKS";
/// Stream holding async task messages and schedules (work queue).
pub const STREAM_ASYNC: &str = "BMW_ASYNC";
/// Stream holding events published by maintainers.
pub const STREAM_EVENTS: &str = "BMW_EVENTS";
/// Stream holding dead-lettered async tasks.
pub const STREAM_DEAD: &str = "BMW_DEAD";

/// Subject of create commands.
pub const SUBJECT_CREATE: &str = "bmw.task.create";
/// Subject of delete commands.
pub const SUBJECT_DELETE: &str = "bmw.task.delete";
/// Subject of reload commands.
pub const SUBJECT_RELOAD: &str = "bmw.task.reload";
/// Wildcard of all command subjects.
pub const SUBJECT_TASKS_ALL: &str = "bmw.task.*";
/// Wildcard of async task subjects (`bmw.async.<queue>`).
pub const SUBJECT_ASYNC_ALL: &str = "bmw.async.>";
/// The one message that stays at the head of `BMW_ASYNC` (see
/// [`super::provision`]): no consumer reads it.
pub const SUBJECT_ASYNC_ANCHOR: &str = "bmw.anchor.async";
/// Wildcard of schedule subjects (`bmw.schedule.<kind key>`).
pub const SUBJECT_SCHEDULE_ALL: &str = "bmw.schedule.>";
/// Wildcard of event subjects.
pub const SUBJECT_EVENTS_ALL: &str = "bmw.event.>";
/// Wildcard of dead-letter subjects.
pub const SUBJECT_DEAD_ALL: &str = "bmw.dead.>";

/// Bucket of daemon task specs.
pub const BUCKET_DAEMON_TASKS: &str = "bmw_daemon_tasks";
/// Bucket of daemon claims (per-key TTL).
pub const BUCKET_DAEMON_CLAIMS: &str = "bmw_daemon_claims";
/// Bucket of live workers (per-key TTL).
pub const BUCKET_WORKERS: &str = "bmw_workers";
/// Bucket of async task records.
pub const BUCKET_ASYNC_TASKS: &str = "bmw_async_tasks";
/// Bucket of unique-window locks.
pub const BUCKET_UNIQUE: &str = "bmw_unique";
/// Bucket of periodic task specs.
pub const BUCKET_PERIODIC: &str = "bmw_periodic";

/// Durable consumer shared by all workers for commands.
pub const CONSUMER_COMMANDS: &str = "bmw-commands";

/// Header naming the core NATS subject a command's outcome goes to.
pub const HEADER_REPLY: &str = "Bmw-Reply";

/// Event subject: `bmw.event.<type>.<kind>.<what>`.
pub fn event_subject(task_type: &str, kind: &str, what: &str) -> String {
    format!("bmw.event.{task_type}.{kind}.{what}")
}

/// The raw subject a KV key of `bucket` is stored under, for publishes that need
/// headers the KV API does not offer (TTL together with an expected revision).
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// Core NATS subject (no stream) on which deletes of running async tasks are
/// broadcast to every worker.
pub const SUBJECT_ASYNC_CANCEL: &str = "bmw.cancel.async";

/// Subject of one async task enqueued by bmw: `bmw.async.<queue>.<task_id>`.
/// (Producers may also publish on `bmw.async.<queue>` itself.)
pub fn async_subject(queue: &str, task_id: &str) -> String {
    format!("bmw.async.{queue}.{task_id}")
}

/// The filters of a queue's consumer: the bare queue subject and per-task ones.
pub fn async_queue_filters(queue: &str) -> Vec<String> {
    vec![format!("bmw.async.{queue}"), format!("bmw.async.{queue}.>")]
}

/// Subject of the one-shot schedule of a delayed task.
pub fn delayed_subject(queue: &str, task_id: &str) -> String {
    format!("bmw.schedule.at.{queue}.{task_id}")
}

/// Subject of a dead-lettered task: `bmw.dead.<queue>.<task_id>`.
pub fn dead_subject(queue: &str, task_id: &str) -> String {
    format!("bmw.dead.{queue}.{task_id}")
}

/// The durable consumer shared by all workers of a queue.
pub fn async_consumer(queue: &str) -> String {
    format!("bmw-async-{queue}")
}
