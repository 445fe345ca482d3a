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
/// Bound on the events stream.
const EVENTS_MAX_BYTES: i64 = 1024 * 1024 * 1024;

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
pub async fn provision(js: &jetstream::Context, replicas: usize) -> Result<(), ProvisionError> {
    refuse_shared_async_stream(js).await?;
    for config in stream_configs(replicas) {
        put_stream(js, "update", config).await?;
    }
    anchor_async_stream(js).await;
    for config in bucket_configs(replicas) {
        put_bucket(js, "update", config).await?;
    }
    Ok(())
}

/// Every process at start: creates what is missing and updates what this
/// bmw cannot work with, reading each config first, so that a process
/// without the right to change streams starts on what an admin provisioned.
pub async fn ensure(js: &jetstream::Context, replicas: usize) -> Result<(), ProvisionError> {
    refuse_shared_async_stream(js).await?;
    for config in stream_configs(replicas) {
        let name = config.name.clone();
        match current(js, &name).await? {
            None => {
                put_stream(js, "create", config).await?;
                if name == STREAM_ASYNC {
                    anchor_async_stream(js).await;
                }
            }
            Some(have) => {
                if let Some(field) = stream_differs(&have, &config) {
                    tracing::info!(stream = %name, field, "updating a stream this bmw cannot work with as it is");
                    put_stream(js, "update", config).await?;
                }
            }
        }
    }
    for config in bucket_configs(replicas) {
        let stream = format!("KV_{}", config.bucket);
        match current(js, &stream).await? {
            None => put_bucket(js, "create", config).await?,
            Some(have) => {
                if let Some(field) = bucket_differs(&have, &config) {
                    tracing::info!(bucket = %config.bucket, field, "updating a bucket this bmw cannot work with as it is");
                    put_bucket(js, "update", config).await?;
                }
            }
        }
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

fn stream_configs(replicas: usize) -> Vec<stream::Config> {
    vec![
        stream::Config {
            name: STREAM_TASKS.into(),
            subjects: vec![SUBJECT_TASKS_ALL.into()],
            max_age: WEEK,
            duplicate_window: DEDUP_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        },
        // Producers publish here: no rollup (a `Nats-Rollup: all` from any
        // publisher would purge every queue), no schedule, no message TTL.
        stream::Config {
            name: STREAM_ASYNC.into(),
            subjects: vec![SUBJECT_ASYNC_ALL.into(), SUBJECT_ASYNC_ANCHOR.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: DEDUP_WINDOW,
            allow_rollup: false,
            num_replicas: replicas,
            ..Default::default()
        },
        // Only bmw writes here (schedules need rollups): periodic schedules,
        // delayed tasks and retries, and the task messages they fire.
        stream::Config {
            name: STREAM_SCHEDULES.into(),
            subjects: vec![SUBJECT_SCHEDULE_ALL.into(), SUBJECT_FIRED_ALL.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: DEDUP_WINDOW,
            allow_message_schedules: true,
            allow_rollup: true,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: STREAM_EVENTS.into(),
            subjects: vec![SUBJECT_EVENTS_ALL.into()],
            max_age: WEEK,
            max_bytes: EVENTS_MAX_BYTES,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: STREAM_DEAD.into(),
            subjects: vec![SUBJECT_DEAD_ALL.into()],
            max_age: WEEK,
            num_replicas: replicas,
            ..Default::default()
        },
    ]
}

fn bucket_configs(replicas: usize) -> Vec<kv::Config> {
    let bucket = |name: &str, ttl_keys: bool| kv::Config {
        bucket: name.into(),
        history: 1,
        num_replicas: replicas,
        limit_markers: ttl_keys.then_some(MARKER_TTL),
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
