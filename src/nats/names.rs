//! Every NATS name bmw uses: streams, subjects, buckets, consumers and headers.
//!
//! Nothing else in the crate spells a subject or bucket name; the contract with
//! other programs (design.md §2-3) lives here in one place.

/// Stream holding task commands (`bmw.task.create|delete|reload`).
pub const STREAM_TASKS: &str = "BMW_TASKS";
/// Stream holding the async task messages of every queue (work queue):
/// producers publish here (`bmw.async.<queue>[.<id>]`), so it takes no
/// rollup, no schedule and no message TTL (see [`STREAM_SCHEDULES`]).
pub const STREAM_ASYNC: &str = "BMW_ASYNC";
/// Stream holding schedules (periodic kinds, delayed tasks, retries) and the
/// task messages they fire (`bmw.fired.<queue>.<id>`), work queue. Message
/// schedules need rollups, which nats-server lets any publisher use on a
/// stream that allows them: so only bmw writes here, never a producer.
pub const STREAM_SCHEDULES: &str = "BMW_SCHEDULES";
/// Stream holding events published by maintainers.
pub const STREAM_EVENTS: &str = "BMW_EVENTS";
/// Stream holding dead-lettered async tasks.
pub const STREAM_DEAD: &str = "BMW_DEAD";
/// Every stream bmw provisions (its buckets' streams aside).
pub const ALL_STREAMS: &[&str] = &[
    STREAM_TASKS,
    STREAM_ASYNC,
    STREAM_SCHEDULES,
    STREAM_EVENTS,
    STREAM_DEAD,
];

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
/// Wildcard of the task messages schedules fire (`bmw.fired.<queue>.<id>`).
pub const SUBJECT_FIRED_ALL: &str = "bmw.fired.>";
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

/// Header naming the core NATS subject a command's outcome goes to: an
/// inbox of the sender's own ([`is_reply_inbox`]), nothing else.
pub const HEADER_REPLY: &str = "Bmw-Reply";

/// Whether `subject` is a reply inbox a command's outcome may go to:
/// `_INBOX.<id...>` or a per-user inbox prefix `_INBOX_<user>.<id...>`
/// (async-nats's `custom_inbox_prefix`, which a server's permissions can
/// give each user), every token non-empty, no wildcard, no white space, at
/// most 256 bytes. Anything else (bmw's streams and buckets, the server's
/// API, another program's subjects) is never written to on a producer's
/// word: a worker publishes with its own rights.
pub fn is_reply_inbox(subject: &str) -> bool {
    let mut tokens = subject.split('.');
    let first = tokens.next().unwrap_or("");
    let prefix_ok = first == "_INBOX"
        || first
            .strip_prefix("_INBOX_")
            .is_some_and(|user| !user.is_empty());
    let token_ok = |t: &str| {
        !t.is_empty()
            && t != "*"
            && t != ">"
            && t.chars()
                .all(|c| c.is_ascii_graphic() && c != '*' && c != '>')
    };
    subject.len() <= 256
        && prefix_ok
        && token_ok(first)
        && subject.contains('.')
        && tokens.all(token_ok)
}

/// Requests to a service-answered kind (`crate::external::service`): the
/// headers bmw sends with each attempt, and the one it reads in a reply
/// beside the NATS services convention's error headers.
pub mod service_headers {
    /// The task's id.
    pub const TASK_ID: &str = "Bmw-Task-Id";
    /// The task's kind.
    pub const KIND: &str = "Bmw-Kind";
    /// The task's queue.
    pub const QUEUE: &str = "Bmw-Queue";
    /// This attempt, from 1.
    pub const ATTEMPT: &str = "Bmw-Attempt";
    /// The retries the task is allowed after its first attempt.
    pub const MAX_RETRY: &str = "Bmw-Max-Retry";
    /// When the attempt's time is up (RFC 3339, UTC); absent when unlimited.
    pub const DEADLINE: &str = "Bmw-Deadline";
    /// In a reply: retry after this delay (seconds, or a duration).
    pub const RETRY_AFTER: &str = "Bmw-Retry-After";
    /// In a reply, by the NATS services convention: the error code (a number).
    pub const ERROR_CODE: &str = async_nats::service::NATS_SERVICE_ERROR_CODE;
    /// In a reply, by the NATS services convention: the error's description.
    pub const ERROR: &str = async_nats::service::NATS_SERVICE_ERROR;
}

/// Subject prefixes a service-answered kind may not send to: bmw's own
/// subjects (some are stored by its streams, whose acknowledgement would
/// read as a success) and the server's APIs and inboxes.
pub const RESERVED_SUBJECT_PREFIXES: &[&str] = &["bmw.", "$JS.", "$KV.", "$O.", "$SYS.", "_INBOX."];

/// Event subject: `bmw.event.<type>.<kind>.<what>`.
pub fn event_subject(task_type: &str, kind: &str, what: &str) -> String {
    format!("bmw.event.{task_type}.{kind}.{what}")
}

/// The raw subject a KV key of `bucket` is stored under, for publishes that need
/// headers the KV API does not offer (TTL together with an expected revision).
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// The stream that stores `bucket`.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// Core NATS subject (no stream) on which deletes of running async tasks are
/// broadcast to every worker.
pub const SUBJECT_ASYNC_CANCEL: &str = "bmw.cancel.async";

/// A subject token matching any one token, for filters built with the
/// functions below (`async_subject(ANY, id)` finds a task in any queue).
pub const ANY: &str = "*";

const ASYNC_PREFIX: &str = "bmw.async.";
const DELAYED_PREFIX: &str = "bmw.schedule.at.";
const RETRY_PREFIX: &str = "bmw.schedule.retry.";
const DEAD_PREFIX: &str = "bmw.dead.";
const SCHEDULE_PREFIX: &str = "bmw.schedule.";
const FIRED_PREFIX: &str = "bmw.fired.";
const ASYNC_CONSUMER_PREFIX: &str = "bmw-async-";
const FIRED_CONSUMER_PREFIX: &str = "bmw-fired-";

/// Subject of one async task enqueued by bmw: `bmw.async.<queue>.<task_id>`.
/// (Producers may also publish on `bmw.async.<queue>` itself.)
pub fn async_subject(queue: &str, task_id: &str) -> String {
    format!("{ASYNC_PREFIX}{queue}.{task_id}")
}

/// The queue of a task, fired task, dead letter or delayed task subject
/// (`bmw.async.<queue>[.<id>]`, `bmw.fired.<queue>.<id>`,
/// `bmw.schedule.at.<queue>.<id>`, `bmw.dead.<queue>.<id>`); `None` for any
/// other subject.
pub fn queue_of(subject: &str) -> Option<&str> {
    [
        DELAYED_PREFIX,
        RETRY_PREFIX,
        ASYNC_PREFIX,
        FIRED_PREFIX,
        DEAD_PREFIX,
    ]
    .iter()
    .find_map(|prefix| subject.strip_prefix(prefix))
    .and_then(|rest| rest.split('.').next())
    .filter(|q| !q.is_empty())
}

/// The task id of a per-task subject: its last token.
pub fn task_id_of(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or(subject)
}

/// The key of a periodic kind in `bmw_periodic`: `periodic:demo:tick` -> `periodic.demo.tick`.
pub fn periodic_key(kind: &str) -> String {
    kind.replace(':', ".")
}

/// The key of a periodic kind's run status in `bmw_periodic`.
pub fn periodic_status_key(kind: &str) -> String {
    format!("status.{}", periodic_key(kind))
}

/// The key of a periodic kind's run lock in `bmw_unique` (`run.<kind key>`;
/// the unique windows' keys are single hex tokens, so never this).
pub fn periodic_run_lock_key(kind: &str) -> String {
    format!("run.{}", periodic_key(kind))
}

/// The prefix of run-status keys in `bmw_periodic`.
pub const PERIODIC_STATUS_PREFIX: &str = "status.";

/// Subject of a periodic kind's schedule message: `bmw.schedule.<kind>`,
/// the kind itself as one token (kinds are `[A-Za-z0-9_-]` parts joined by
/// `:`), so each kind has its own subject.
pub fn schedule_subject(kind: &str) -> String {
    format!("{SCHEDULE_PREFIX}{kind}")
}

/// The schedule subject of a kind before bmw 0.2 (`:` turned into `_`, so
/// `periodic:a_b:c` and `periodic:a:b_c` shared it): purged whenever a
/// kind's schedule is written or removed, so old schedules do not linger.
pub fn legacy_schedule_subject(kind: &str) -> String {
    format!("{SCHEDULE_PREFIX}{}", kind.replace(':', "_"))
}

/// Subject a schedule fires a task message on, in [`STREAM_SCHEDULES`]:
/// `bmw.fired.<queue>.<task_id>` (a delayed task, a retry).
pub fn fired_subject(queue: &str, task_id: &str) -> String {
    format!("{FIRED_PREFIX}{queue}.{task_id}")
}

/// Subject the ticks of a periodic kind land on: `bmw.fired.<queue>.<kind>`.
pub fn tick_subject(queue: &str, kind: &str) -> String {
    fired_subject(queue, kind)
}

/// The filter of a queue's consumer of fired messages: `bmw.fired.<queue>.>`.
pub fn fired_queue_filter(queue: &str) -> String {
    format!("{FIRED_PREFIX}{queue}.>")
}

/// The durable consumer shared by all workers of a queue for the messages
/// its schedules fire (on [`STREAM_SCHEDULES`]).
pub fn fired_consumer(queue: &str) -> String {
    format!("{FIRED_CONSUMER_PREFIX}{queue}")
}

/// The queue of an async consumer's name (`bmw-async-<queue>`).
pub fn queue_of_consumer(name: &str) -> Option<&str> {
    name.strip_prefix(ASYNC_CONSUMER_PREFIX)
}

/// The filters of a queue's consumer: the bare queue subject and per-task ones.
pub fn async_queue_filters(queue: &str) -> Vec<String> {
    vec![
        format!("{ASYNC_PREFIX}{queue}"),
        format!("{ASYNC_PREFIX}{queue}.>"),
    ]
}

/// Subject of the one-shot schedule of a delayed task.
pub fn delayed_subject(queue: &str, task_id: &str) -> String {
    format!("{DELAYED_PREFIX}{queue}.{task_id}")
}

/// Subject of the one-shot schedule of an async task's next attempt after a
/// failure: `bmw.schedule.retry.<queue>.<task_id>` (fired onto
/// [`fired_subject`]).
pub fn retry_subject(queue: &str, task_id: &str) -> String {
    format!("{RETRY_PREFIX}{queue}.{task_id}")
}

/// Header of a task message scheduled as a retry: the attempts the task made
/// before it (the server copies it onto the message it fires).
pub const HEADER_ATTEMPTS: &str = "Bmw-Attempts";

/// Subject of a dead-lettered task: `bmw.dead.<queue>.<task_id>`.
pub fn dead_subject(queue: &str, task_id: &str) -> String {
    format!("{DEAD_PREFIX}{queue}.{task_id}")
}

/// The durable consumer shared by all workers of a queue.
pub fn async_consumer(queue: &str) -> String {
    format!("{ASYNC_CONSUMER_PREFIX}{queue}")
}

/// Client names bmw's processes connect with (shown by `nats server report connections`).
pub mod client_name {
    /// `bmw run`.
    pub const RUN: &str = "bmw-run";
    /// `bmw worker`.
    pub const WORKER: &str = "bmw-worker";
    /// `bmw bridge`.
    pub const BRIDGE: &str = "bmw-bridge";
    /// `bmw task`.
    pub const TASK: &str = "bmw-task";
    /// `bmw provision`.
    pub const PROVISION: &str = "bmw-provision";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_inboxes_take_replies() {
        for good in [
            "_INBOX.abc",
            "_INBOX.a.b.c",
            "_INBOX_alice.x1",
            "_INBOX_bmw-bridge.k.1",
        ] {
            assert!(is_reply_inbox(good), "{good}");
        }
        for bad in [
            "",
            "_INBOX",
            "_INBOX.",
            "_INBOX..x",
            "_INBOX.>",
            "_INBOX.*",
            "_INBOX.a*",
            "_INBOX.a b",
            "_INBOX_.x",
            "_INBOXES.x",
            "bmw.task.create",
            "$KV.bmw_daemon_tasks.k",
            "$JS.API.STREAM.DELETE.BMW_ASYNC",
            "x._INBOX.y",
            "_INBOX.a\tb",
        ] {
            assert!(!is_reply_inbox(bad), "{bad:?}");
        }
        assert!(!is_reply_inbox(&format!("_INBOX.{}", "a".repeat(300))));
    }

    #[test]
    fn subjects_map_back_to_their_queue_and_id() {
        assert_eq!(queue_of(&async_subject("q1", "t1")), Some("q1"));
        assert_eq!(queue_of("bmw.async.q2"), Some("q2"));
        assert_eq!(queue_of(&delayed_subject("q3", "t")), Some("q3"));
        assert_eq!(queue_of(&dead_subject("q4", "t")), Some("q4"));
        assert_eq!(queue_of(&retry_subject("q5", "t")), Some("q5"));
        assert_eq!(queue_of(&schedule_subject("periodic:a:b")), None);
        assert_eq!(task_id_of(&dead_subject("q", "abc")), "abc");
        assert_eq!(queue_of_consumer(&async_consumer("q5")), Some("q5"));
        assert_eq!(
            tick_subject("q", "periodic:a:b"),
            "bmw.fired.q.periodic:a:b"
        );
        assert_eq!(queue_of(&fired_subject("q6", "t")), Some("q6"));
        assert_eq!(task_id_of(&fired_subject("q6", "t7")), "t7");
        // One subject per kind: these two shared one before.
        assert_ne!(
            schedule_subject("periodic:a_b:c"),
            schedule_subject("periodic:a:b_c")
        );
        assert_eq!(
            legacy_schedule_subject("periodic:a_b:c"),
            legacy_schedule_subject("periodic:a:b_c")
        );
    }
}
