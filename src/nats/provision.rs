//! Idempotent creation of bmw's streams and buckets (design.md §2-3).
//!
//! Every process calls [`provision`] at start: it creates what is missing and
//! updates compatible configs; an existing config the server refuses to change
//! (e.g. another retention policy) fails with an error naming the stream.

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

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The server refused to create or update a stream or bucket.
    #[error(
        "cannot create or update {what} `{name}` ({message}); an existing config may be \
         incompatible: inspect it with `nats stream info {stream}` and remove or fix it"
    )]
    Incompatible {
        /// `stream` or `bucket`.
        what: &'static str,
        /// Its name.
        name: String,
        /// Its stream name.
        stream: String,
        /// The server's message.
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

/// Provisions every stream and bucket with `replicas` replicas.
pub async fn provision(js: &jetstream::Context, replicas: usize) -> Result<(), ProvisionError> {
    refuse_shared_async_stream(js).await?;
    for config in stream_configs(replicas) {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|e| ProvisionError::Incompatible {
                what: "stream",
                stream: name.clone(),
                name,
                message: e.to_string(),
            })?;
    }
    anchor_async_stream(js).await;
    for config in bucket_configs(replicas) {
        let name = config.bucket.clone();
        js.create_or_update_key_value(config)
            .await
            .map_err(|e| ProvisionError::Incompatible {
                what: "bucket",
                stream: format!("KV_{name}"),
                name,
                message: e.to_string(),
            })?;
    }
    Ok(())
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
