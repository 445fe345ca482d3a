//! bmw's streams and buckets (design.md §2-3): created and checked by every
//! process at start ([`ensure`]), configured in full by `bmw provision`
//! ([`provision`]).
//!
//! Under least privilege (`nats/permissions.conf`) only an admin may create
//! or change a stream: [`ensure`] reads each config, creates only what is
//! missing and updates only what this bmw cannot work with (its subjects,
//! retention, rollups, schedules, TTLs); limits an operator set stay as they
//! are. [`provision`] applies this bmw's whole config to every one.

use std::time::Duration;

use async_nats::jetstream::{self, kv, message::PublishMessage, stream};

use super::names::*;

/// Max age of commands and events.
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
/// Dedup window of commands and async tasks.
const DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// How long a delete/expiry marker stays in a TTL bucket; watchers see it at
/// once, acquirers use its revision while it lasts.
const MARKER_TTL: Duration = Duration::from_secs(60);

/// The hint every refusal of a create or update ends with.
const ADMIN_HINT: &str = "under least privilege only an admin may create or change \
     streams: run `bmw provision` with an admin's credentials (nats/permissions.conf, \
     role ADMIN), then start this process again";

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The server refused to create or update a stream or bucket.
    #[error(
        "cannot {action} {what} `{name}` ({message}); an existing config may be \
         incompatible: inspect it with `nats stream info {stream}` and remove or fix it; \
         if this user has no right to, {ADMIN_HINT}"
    )]
    Incompatible {
        /// `create` or `update`.
        action: &'static str,
        /// `stream` or `bucket`.
        what: &'static str,
        /// Its name.
        name: String,
        /// Its stream name.
        stream: String,
        /// The server's message.
        message: String,
    },
    /// A create or update got no answer: the server drops a request its
    /// user has no permission for.
    #[error("cannot {action} {what} `{name}`: the server did not answer; {ADMIN_HINT}")]
    NotPermitted {
        /// `create` or `update`.
        action: &'static str,
        /// `stream` or `bucket`.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// A stream's config could not be read.
    #[error(
        "cannot read the config of stream `{stream}` ({message}); this user needs \
         `$JS.API.STREAM.INFO.{stream}` (nats/permissions.conf)"
    )]
    Unreadable {
        /// The stream.
        stream: String,
        /// Why.
        message: String,
    },
    /// `BMW_ASYNC` is the shared queue-and-schedules stream of bmw 0.1.
    #[error(
        "stream `BMW_ASYNC` was made by bmw 0.1 and holds schedules, so any producer may \
         purge it with a rollup; this bmw keeps schedules in `BMW_SCHEDULES` instead. It \
         holds {messages} messages: let the old workers drain it, then remove it \
         (`nats stream rm BMW_ASYNC`) and start again (delayed tasks, retries and \
         periodic schedules still in it go with it: create those periodic tasks again)"
    )]
    SharedAsyncStream {
        /// Messages it holds.
        messages: u64,
    },
}

/// `bmw provision`: creates every stream and bucket with `replicas`
/// replicas, or updates it to this bmw's whole config.
pub async fn provision(js: &jetstream::Context, settings: &Settings) -> Result<(), ProvisionError> {
    refuse_shared_async_stream(js).await?;
    for config in stream_configs(settings) {
        put_stream(js, "update", config).await?;
    }
    anchor_async_stream(js).await;
    for config in bucket_configs(settings) {
        put_bucket(js, "update", config).await?;
    }
    Ok(())
}

/// Every process at start: creates what is missing and updates what this
/// bmw cannot work with, reading each config first, so that a process
/// without the right to change streams starts on what an admin provisioned.
pub async fn ensure(js: &jetstream::Context, settings: &Settings) -> Result<(), ProvisionError> {
    refuse_shared_async_stream(js).await?;
    let mut unlimited = Vec::new();
    for config in stream_configs(settings) {
        let name = config.name.clone();
        match current(js, &name).await? {
            None => {
                put_stream(js, "create", config).await?;
                if name == STREAM_ASYNC {
                    anchor_async_stream(js).await;
                }
            }
            Some(have) => {
                if unbounded(&have) {
                    unlimited.push(name.clone());
                }
                if let Some(field) = stream_differs(&have, &config) {
                    tracing::info!(stream = %name, field, "updating a stream this bmw cannot work with as it is");
                    put_stream(js, "update", config).await?;
                }
            }
        }
    }
    for config in bucket_configs(settings) {
        let stream = format!("KV_{}", config.bucket);
        match current(js, &stream).await? {
            None => put_bucket(js, "create", config).await?,
            Some(have) => {
                if unbounded(&have) {
                    unlimited.push(stream.clone());
                }
                if let Some(field) = bucket_differs(&have, &config) {
                    tracing::info!(bucket = %config.bucket, field, "updating a bucket this bmw cannot work with as it is");
                    put_bucket(js, "update", config).await?;
                }
            }
        }
    }
    if !unlimited.is_empty() {
        tracing::warn!(
            streams = ?unlimited,
            "streams without storage limits (made by an older bmw): a producer can fill the \
             server's store; run `bmw provision` to apply them"
        );
    }
    Ok(())
}

/// A stream's config, or `None` when there is no such stream.
async fn current(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Option<stream::Config>, ProvisionError> {
    match js.get_stream(stream).await {
        Ok(s) => Ok(Some(s.cached_info().config.clone())),
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(e) => Err(ProvisionError::Unreadable {
            stream: stream.into(),
            message: e.to_string(),
        }),
    }
}

async fn put_stream(
    js: &jetstream::Context,
    action: &'static str,
    config: stream::Config,
) -> Result<(), ProvisionError> {
    let name = config.name.clone();
    let result = js.create_or_update_stream(config).await;
    result.map(drop).map_err(|e| {
        refusal(
            action,
            "stream",
            name.clone(),
            name,
            e.to_string(),
            is_timeout(&e.to_string()),
        )
    })
}

async fn put_bucket(
    js: &jetstream::Context,
    action: &'static str,
    config: kv::Config,
) -> Result<(), ProvisionError> {
    let name = config.bucket.clone();
    let result = js.create_or_update_key_value(config).await;
    result.map(drop).map_err(|e| {
        let stream = format!("KV_{name}");
        refusal(
            action,
            "bucket",
            name,
            stream,
            e.to_string(),
            is_timeout(&e.to_string()),
        )
    })
}

fn is_timeout(message: &str) -> bool {
    message.contains("timed out") || message.contains("timeout")
}

fn refusal(
    action: &'static str,
    what: &'static str,
    name: String,
    stream: String,
    message: String,
    timed_out: bool,
) -> ProvisionError {
    if timed_out {
        ProvisionError::NotPermitted { action, what, name }
    } else {
        ProvisionError::Incompatible {
            action,
            what,
            name,
            stream,
            message,
        }
    }
}

/// The first setting of `have` that keeps this bmw from working as `want`
/// says: what messages it takes and keeps, not its limits or replicas
/// (an operator's choice, set by `bmw provision`).
fn stream_differs(have: &stream::Config, want: &stream::Config) -> Option<&'static str> {
    let mut have_subjects = have.subjects.clone();
    let mut want_subjects = want.subjects.clone();
    have_subjects.sort();
    want_subjects.sort();
    [
        ("subjects", have_subjects != want_subjects),
        ("retention", have.retention != want.retention),
        ("allow_rollup_hdrs", have.allow_rollup != want.allow_rollup),
        (
            "allow_msg_schedules",
            have.allow_message_schedules != want.allow_message_schedules,
        ),
        (
            "allow_msg_ttl",
            have.allow_message_ttl != want.allow_message_ttl,
        ),
        // Zero is the server's default (two minutes).
        (
            "duplicate_window",
            !want.duplicate_window.is_zero() && have.duplicate_window != want.duplicate_window,
        ),
    ]
    .into_iter()
    .find_map(|(field, differs)| differs.then_some(field))
}

/// [`stream_differs`] for a bucket's stream.
fn bucket_differs(have: &stream::Config, want: &kv::Config) -> Option<&'static str> {
    [
        (
            "history",
            have.max_messages_per_subject != want.history.max(1),
        ),
        (
            "limit_markers",
            have.subject_delete_marker_ttl != want.limit_markers
                || have.allow_message_ttl != want.limit_markers.is_some(),
        ),
    ]
    .into_iter()
    .find_map(|(field, differs)| differs.then_some(field))
}

/// Refuses a `BMW_ASYNC` made by bmw before 0.2, which held the schedules
/// too and so allowed rollups from any producer: nats-server cannot turn
/// message schedules off on an existing stream, and its subjects overlap
/// those of `BMW_SCHEDULES`. The operator drains it (or moves its tasks)
/// and removes it; bmw does not delete a stream that may hold tasks.
async fn refuse_shared_async_stream(js: &jetstream::Context) -> Result<(), ProvisionError> {
    let Ok(mut stream) = js.get_stream(STREAM_ASYNC).await else {
        return Ok(());
    };
    let Ok(info) = stream.info().await else {
        return Ok(());
    };
    if !info.config.allow_message_schedules {
        return Ok(());
    }
    Err(ProvisionError::SharedAsyncStream {
        messages: info.state.messages,
    })
}

/// Keeps one message that no consumer reads at the head of `BMW_ASYNC`.
///
/// nats-server looks for a consumer's next message by scanning every subject
/// its filter matches whenever the consumer's position is at or below the
/// stream's first sequence. In a work queue whose workers keep up, that is
/// every pull, and with one subject per task (`bmw.async.<queue>.<id>`) the
/// scan costs as much as the backlog is deep: a 100,000-task backlog drained
/// at 14,000 tasks/s instead of 27,000. The anchor keeps the first sequence
/// below every task, so no pull scans. Written once (a second writer's
/// publish is refused by the expected subject sequence); a failure costs
/// speed, not correctness, so it is only logged.
async fn anchor_async_stream(js: &jetstream::Context) {
    let publish = PublishMessage::build()
        .payload("anchor: keeps the head of BMW_ASYNC below every task".into())
        .expected_last_subject_sequence(0);
    let stored = match js.send_publish(SUBJECT_ASYNC_ANCHOR, publish).await {
        Ok(ack) => ack.await.map(|_| ()),
        Err(e) => return tracing::warn!(cause = %e, "async stream anchor not written"),
    };
    if let Err(e) = stored
        && e.kind() != jetstream::context::PublishErrorKind::WrongLastSequence
    {
        tracing::warn!(cause = %e, "async stream anchor not written");
    }
}

/// How `bmw provision` (and a start that creates what is missing) sizes
/// the streams and buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Replicas of every stream and bucket.
    pub replicas: usize,
    /// What all of bmw's streams and buckets together may hold, in bytes
    /// (`--storage-max-bytes`), shared out by [`SHARES`].
    pub storage_max_bytes: u64,
}

impl Settings {
    /// `replicas` replicas and the default storage budget.
    pub fn new(replicas: usize) -> Settings {
        Settings {
            replicas,
            storage_max_bytes: DEFAULT_STORAGE_MAX_BYTES,
        }
    }

    /// The bytes `stream`'s share of the budget comes to.
    pub fn share_of(&self, stream: &str) -> i64 {
        let thousandths = SHARES
            .iter()
            .find(|(name, _)| *name == stream)
            .map_or(0, |(_, share)| *share);
        i64::try_from(self.storage_max_bytes / 1000 * thousandths).unwrap_or(i64::MAX)
    }
}

/// Default of `--storage-max-bytes`: 4 GiB (nats-server reserves each
/// stream's `max_bytes` in its store, 75% of the free disk unless told).
pub const DEFAULT_STORAGE_MAX_BYTES: u64 = 4 << 30;

/// The least `--storage-max-bytes` bmw accepts.
pub const MIN_STORAGE_MAX_BYTES: u64 = 1 << 20;

/// Each stream's share of the storage budget, in thousandths. Queued tasks
/// take the most; the claims bucket has more than the specs it claims (a
/// claim is never larger than its spec), so claims never run out before
/// specs do; `BMW_SCHEDULES`' share is a soft limit (see [`SOFT_MAX_BYTES`]).
pub const SHARES: [(&str, u64); 11] = [
    (STREAM_ASYNC, 300),
    (STREAM_SCHEDULES, 100),
    (STREAM_TASKS, 100),
    (STREAM_EVENTS, 150),
    (STREAM_DEAD, 100),
    ("KV_bmw_async_tasks", 150),
    ("KV_bmw_daemon_tasks", 35),
    ("KV_bmw_daemon_claims", 45),
    ("KV_bmw_unique", 10),
    ("KV_bmw_workers", 5),
    ("KV_bmw_periodic", 5),
];

/// The largest message any stream takes and the largest value any bucket
/// takes: nats-server's default `max_payload`.
pub const MAX_MESSAGE_BYTES: i32 = 1 << 20;

/// The smallest message bmw stores, about: a stream's `max_msgs` is its
/// bytes over this (a bound on the server's per-message index as well).
const MIN_MESSAGE_BYTES: i64 = 128;

/// Metadata key of `BMW_SCHEDULES`' soft byte limit. nats-server does not
/// let a stream with message schedules discard new messages, and discarding
/// old ones would drop periodic schedules and delayed tasks, so that stream
/// has no hard byte limit: bmw refuses new delayed and periodic creates
/// itself once it holds this many bytes (`crate::queue::storage`).
pub const SOFT_MAX_BYTES: &str = "bmw_soft_max_bytes";

fn stream_configs(settings: &Settings) -> Vec<stream::Config> {
    let replicas = settings.replicas;
    // A full stream refuses new messages (the publisher is told) rather
    // than dropping old ones: tasks, commands and dead letters are work
    // someone was told is accepted.
    let bounded = |name: &str| {
        let max_bytes = settings.share_of(name).max(1);
        stream::Config {
            name: name.into(),
            max_bytes,
            max_messages: (max_bytes / MIN_MESSAGE_BYTES).max(1),
            max_message_size: MAX_MESSAGE_BYTES,
            discard: stream::DiscardPolicy::New,
            num_replicas: replicas,
            ..Default::default()
        }
    };
    vec![
        stream::Config {
            subjects: vec![SUBJECT_TASKS_ALL.into()],
            max_age: WEEK,
            duplicate_window: DEDUP_WINDOW,
            ..bounded(STREAM_TASKS)
        },
        // Producers publish here: no rollup (a `Nats-Rollup: all` from any
        // publisher would purge every queue), no schedule, no message TTL.
        stream::Config {
            subjects: vec![SUBJECT_ASYNC_ALL.into(), SUBJECT_ASYNC_ANCHOR.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: DEDUP_WINDOW,
            allow_rollup: false,
            ..bounded(STREAM_ASYNC)
        },
        // Only bmw writes here (schedules need rollups): periodic schedules,
        // delayed tasks and retries, and the task messages they fire. No
        // hard byte limit (see SOFT_MAX_BYTES).
        stream::Config {
            name: STREAM_SCHEDULES.into(),
            subjects: vec![SUBJECT_SCHEDULE_ALL.into(), SUBJECT_FIRED_ALL.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: DEDUP_WINDOW,
            allow_message_schedules: true,
            allow_rollup: true,
            max_message_size: MAX_MESSAGE_BYTES,
            num_replicas: replicas,
            metadata: [(
                SOFT_MAX_BYTES.to_owned(),
                settings.share_of(STREAM_SCHEDULES).to_string(),
            )]
            .into(),
            ..Default::default()
        },
        // History: the oldest events make room for new ones.
        stream::Config {
            subjects: vec![SUBJECT_EVENTS_ALL.into()],
            max_age: WEEK,
            discard: stream::DiscardPolicy::Old,
            ..bounded(STREAM_EVENTS)
        },
        stream::Config {
            subjects: vec![SUBJECT_DEAD_ALL.into()],
            max_age: WEEK,
            ..bounded(STREAM_DEAD)
        },
    ]
}

fn bucket_configs(settings: &Settings) -> Vec<kv::Config> {
    // Buckets discard new (async-nats sets it): a full bucket refuses new
    // keys, and still takes an update of a key no larger than its value
    // (a heartbeat).
    let bucket = |name: &str, ttl_keys: bool| kv::Config {
        bucket: name.into(),
        history: 1,
        num_replicas: settings.replicas,
        limit_markers: ttl_keys.then_some(MARKER_TTL),
        max_bytes: settings.share_of(&format!("KV_{name}")).max(1),
        max_value_size: MAX_MESSAGE_BYTES,
        ..Default::default()
    };
    vec![
        bucket(BUCKET_DAEMON_TASKS, false),
        bucket(BUCKET_DAEMON_CLAIMS, true),
        bucket(BUCKET_WORKERS, true),
        bucket(BUCKET_ASYNC_TASKS, true),
        bucket(BUCKET_UNIQUE, true),
        bucket(BUCKET_PERIODIC, false),
    ]
}

/// Whether a stream has none of the limits `bmw provision` sets (made by
/// an older bmw): worth a warning at start, not a stop.
fn unbounded(have: &stream::Config) -> bool {
    if have.name == STREAM_SCHEDULES {
        !have.metadata.contains_key(SOFT_MAX_BYTES)
    } else {
        have.max_bytes <= 0
    }
}
