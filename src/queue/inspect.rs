//! Reading async tasks back: one task by id, filtered lists with paging, and
//! per-queue stats. `pending` and `scheduled` tasks are found in the stream
//! by subject (`bmw.async.<queue>.<id>`, `bmw.schedule.at.<queue>.<id>`),
//! everything else in the records bucket; queue depths come from the
//! consumers, processed and failed counts from the live workers' entries.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, message::StreamMessage, stream::Stream};
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::Value;

use super::message::TaskMessage;
use super::record::{RecordStore, TaskRecord, TaskState};
use crate::nats::{NatsError, names};

/// The subjects of `stream` matching `filter` (wildcards allowed).
pub(crate) async fn subjects(
    stream: &Stream,
    filter: &str,
) -> Result<std::vec::IntoIter<String>, NatsError> {
    let info = stream.info_with_subjects(filter).await?;
    let found: Vec<(String, usize)> = info.try_collect().await?;
    let mut subjects: Vec<String> = found.into_iter().map(|(s, _)| s).collect();
    subjects.sort();
    Ok(subjects.into_iter())
}

/// The record of a task still in the stream (pending or scheduled); `None`
/// for a message that is not a task (a raw producer's mistake).
pub(super) fn message_record(message: &StreamMessage, state: TaskState) -> Option<TaskRecord> {
    let subject = message.subject.as_str();
    // A message that is not a task (a raw producer's mistake) is not listed.
    let Ok(task) = serde_json::from_slice::<TaskMessage>(&message.payload) else {
        return None;
    };
    Some(TaskRecord {
        task_id: names::task_id_of(subject).to_owned(),
        kind: task.kind.clone(),
        queue: names::queue_of(subject).unwrap_or_default().to_owned(),
        state,
        attempts: 0,
        max_retry: task.max_retry(),
        last_error: None,
        errors: Vec::new(),
        payload: task.payload,
        options: serde_json::to_value(&task.options).unwrap_or(Value::Null),
        enqueued_at: task.enqueued_at,
        next_process_at: task.options.process_at.clone(),
        completed_at: None,
        updated_at: message.time.to_string(),
    })
}

/// Reads tasks and stats.
#[derive(Debug, Clone)]
pub struct Inspector {
    /// `BMW_ASYNC`: the queues.
    pub(crate) stream: Stream,
    /// `BMW_SCHEDULES`: delayed tasks, retries, ticks and what they fired.
    pub(crate) schedules: Stream,
    pub(crate) dead: Stream,
    pub(crate) records: RecordStore,
}

/// One queue's numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct QueueStats {
    /// Queue name.
    pub queue: String,
    /// Waiting to be fetched.
    pub pending: u64,
    /// Fetched and not acknowledged (running, or waiting for a retry delay).
    pub active: u64,
    /// Waiting for their `process_at`.
    pub scheduled: u64,
    /// Waiting for a retry.
    pub retry: u64,
    /// In the dead-letter stream.
    pub archived: u64,
    /// Succeeded, summed over live workers since they started.
    pub processed: u64,
    /// Failed attempts, summed over live workers since they started.
    pub failed: u64,
}

impl Inspector {
    /// Opens the streams and records bucket.
    pub async fn open(js: &jetstream::Context) -> Result<Inspector, NatsError> {
        Ok(Inspector {
            stream: js.get_stream(names::STREAM_ASYNC).await?,
            schedules: js.get_stream(names::STREAM_SCHEDULES).await?,
            dead: js.get_stream(names::STREAM_DEAD).await?,
            records: RecordStore::open(js).await?,
        })
    }

    async fn message_record(
        &self,
        stream: &Stream,
        subject: &str,
        state: TaskState,
    ) -> Result<Option<TaskRecord>, NatsError> {
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(message_record(&message, state)),
            Err(_) => Ok(None),
        }
    }

    /// One task by id.
    pub async fn get(&self, task_id: &str) -> Result<Option<TaskRecord>, NatsError> {
        if let Some(record) = self.records.get(task_id).await? {
            return Ok(Some(record));
        }
        for (stream, filter, state) in [
            (
                &self.stream,
                names::async_subject(names::ANY, task_id),
                TaskState::Pending,
            ),
            (
                &self.schedules,
                names::fired_subject(names::ANY, task_id),
                TaskState::Pending,
            ),
            (
                &self.schedules,
                names::delayed_subject(names::ANY, task_id),
                TaskState::Scheduled,
            ),
        ] {
            if let Some(subject) = subjects(stream, &filter).await?.next() {
                return self.message_record(stream, &subject, state).await;
            }
        }
        // A dead letter whose record is gone (expired, or removed by a
        // requeue an instant before the task is back in its queue).
        let filter = names::dead_subject(names::ANY, task_id);
        if let Some(subject) = subjects(&self.dead, &filter).await?.next() {
            return self
                .message_record(&self.dead, &subject, TaskState::Archived)
                .await;
        }
        Ok(None)
    }

    /// Stats of `queues`, plus any queue that has a consumer.
    pub async fn stats(
        &self,
        workers: &[crate::membership::WorkerEntry],
    ) -> Result<Vec<QueueStats>, NatsError> {
        let mut stats: BTreeMap<String, QueueStats> = BTreeMap::new();
        let mut names_stream = self.stream.consumer_names();
        while let Some(name) = names_stream.try_next().await? {
            if let Some(queue) = names::queue_of_consumer(&name) {
                stats.entry(queue.to_owned()).or_insert_with(|| QueueStats {
                    queue: queue.to_owned(),
                    ..Default::default()
                });
            }
        }
        for w in workers {
            for (q, n) in &w.async_processed {
                stats
                    .entry(q.clone())
                    .or_insert_with(|| QueueStats {
                        queue: q.clone(),
                        ..Default::default()
                    })
                    .processed += n;
            }
            for (q, n) in &w.async_failed {
                stats
                    .entry(q.clone())
                    .or_insert_with(|| QueueStats {
                        queue: q.clone(),
                        ..Default::default()
                    })
                    .failed += n;
            }
        }
        let records = self.records.all().await?;
        for s in stats.values_mut() {
            let mut consumer: jetstream::consumer::PullConsumer = match self
                .stream
                .get_consumer(&names::async_consumer(&s.queue))
                .await
            {
                Ok(c) => c,
                Err(_) => continue,
            };
            if let Ok(info) = consumer.info().await {
                s.pending = info.num_pending;
                s.active = info.num_ack_pending as u64;
            }
            // What its schedules fired (retries, delayed starts, ticks).
            if let Ok(mut fired) = self
                .schedules
                .get_consumer::<jetstream::consumer::pull::Config>(&names::fired_consumer(&s.queue))
                .await
                && let Ok(info) = fired.info().await
            {
                s.pending += info.num_pending;
                s.active += info.num_ack_pending as u64;
            }
            s.scheduled = subjects(
                &self.schedules,
                &names::delayed_subject(&s.queue, names::ANY),
            )
            .await?
            .len() as u64;
            s.archived = subjects(&self.dead, &names::dead_subject(&s.queue, names::ANY))
                .await?
                .len() as u64;
            s.retry = records
                .iter()
                .filter(|r| r.queue == s.queue && r.state == TaskState::Retry)
                .count() as u64;
        }
        Ok(stats.into_values().collect())
    }
}
