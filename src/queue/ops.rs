//! [`AsyncOps`]: the operations on async tasks, written once for every
//! caller (bridge, `bmw task`, the command consumer): create (enqueue),
//! delete and requeue, plus the reads behind listings. Task ids and queue
//! names are checked here, where they enter, before they reach a subject
//! filter or a key.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use serde_json::Value;

use super::admin::Admin;
use super::depth::QueueDepth;
use super::enqueue::Enqueuer;
use super::inspect::{Inspector, QueueStats};
use super::listing::{ListQuery, Page};
use super::record::{RecordStore, TaskRecord};
use super::schedule_room::ScheduleRoom;
use crate::membership::WorkerEntry;
use crate::nats::{Nats, NatsError, names};
use crate::task::{CreateCommand, OpError, check_queue, check_task_id};

/// Creates of one [`AsyncOps::create_many`] in flight at once: enough to
/// keep nats-server busy storing while the acks come back, and under the
/// JetStream context's 5,000 acks awaited.
pub const PIPELINE: usize = 1_000;

/// Of those, creates that read before they publish (a caller's task id is
/// looked up, a unique lock taken) at once: each costs nats-server up to
/// three JetStream API requests, which it queues (and drops past its API
/// queue limit) and each attempt of which must be answered within
/// [`crate::nats::ATTEMPT_TIMEOUT`]; as many as a batch ran before.
const WITH_LOOKUPS: usize = 64;

/// Creates, deletes, requeues and reads async tasks.
#[derive(Debug, Clone)]
pub struct AsyncOps {
    enqueuer: Enqueuer,
    admin: Admin,
    depth: Arc<QueueDepth>,
    schedules: Arc<ScheduleRoom>,
}

impl AsyncOps {
    /// Opens the (provisioned) streams and buckets.
    /// Opens the (provisioned) streams and buckets; a queue holding
    /// `max_pending` tasks refuses creates (0: no limit).
    pub async fn open(nats: &Nats, max_pending: u64) -> Result<AsyncOps, NatsError> {
        let stream = nats.js.get_stream(names::STREAM_ASYNC).await?;
        Ok(AsyncOps {
            enqueuer: Enqueuer::open(&nats.js).await?,
            admin: Admin::open(nats).await?,
            depth: Arc::new(QueueDepth::new(stream, max_pending)),
            schedules: Arc::new(ScheduleRoom::new(
                nats.js.get_stream(names::STREAM_SCHEDULES).await?,
            )),
        })
    }

    /// Validates and enqueues; the data is `{task_id, kind, queue, state, process_at}`.
    /// A full queue refuses it (429), a delayed one when `BMW_SCHEDULES`
    /// is full (507).
    pub async fn create(&self, create: &CreateCommand) -> Result<Value, OpError> {
        let queue = create.options.queue();
        self.depth.check(queue).await?;
        let delayed = create.options.process_at.is_some() || create.options.process_in.is_some();
        if delayed {
            self.schedules.check().await?;
        }
        let data = self.enqueuer.enqueue(create).await.map_err(|e| match e {
            OpError::Nats(n) if n.kind() == crate::nats::NatsErrorKind::Full => {
                OpError::StorageFull {
                    stream: if delayed {
                        names::STREAM_SCHEDULES
                    } else {
                        names::STREAM_ASYNC
                    }
                    .into(),
                    detail: n.to_string(),
                }
            }
            e => e,
        })?;
        if delayed {
            // About what the schedule stores: the payload and its envelope.
            let size = serde_json::to_vec(&create.payload).map_or(0, |p| p.len());
            self.schedules.added(size as u64 + 512);
        }
        self.depth.added(queue);
        Ok(data)
    }

    /// Creates many tasks at once, each as [`AsyncOps::create`] does, with
    /// up to [`PIPELINE`] publishes awaiting their acks together rather than
    /// one round trip after the other; one result per create, in order.
    pub async fn create_many(&self, creates: &[&CreateCommand]) -> Vec<Result<Value, OpError>> {
        let mut results = Vec::with_capacity(creates.len());
        let lookups = tokio::sync::Semaphore::new(WITH_LOOKUPS);
        let mut in_flight = FuturesOrdered::new();
        for create in creates {
            if in_flight.len() >= PIPELINE
                && let Some(result) = in_flight.next().await
            {
                results.push(result);
            }
            let reads_first =
                create.options.task_id.is_some() || create.options.unique_ttl.is_some();
            let lookups = &lookups;
            in_flight.push_back(async move {
                // Never closed, so a permit always comes.
                let _turn = match reads_first {
                    true => lookups.acquire().await.ok(),
                    false => None,
                };
                self.create(create).await
            });
        }
        while let Some(result) = in_flight.next().await {
            results.push(result);
        }
        results
    }

    /// Deletes a task in any state; a running handler is cancelled.
    pub async fn delete(&self, task_id: &str) -> Result<Value, OpError> {
        check_task_id("task_id", task_id)?;
        self.admin.delete(task_id).await
    }

    /// Deletes every async task, in any state (the ticks of periodic tasks
    /// are theirs: left alone); how many were deleted. The tasks are listed
    /// first, page by page, then deleted one by one as [`AsyncOps::delete`]
    /// does.
    pub async fn delete_all(&self) -> Result<usize, OpError> {
        let mut ids = Vec::new();
        let mut query = ListQuery {
            limit: super::listing::MAX_LIMIT,
            ..ListQuery::default()
        };
        loop {
            let page = super::listing::page(self.inspector(), &query).await?;
            ids.extend(
                page.tasks
                    .into_iter()
                    .filter(|t| t.kind.starts_with("async:"))
                    .map(|t| t.task_id),
            );
            match page.next {
                Some(next) => query.cursor = Some(next),
                None => break,
            }
        }
        ids.sort();
        ids.dedup();
        let mut deleted = 0;
        for task_id in ids {
            match self.admin.delete(&task_id).await {
                Ok(_) => deleted += 1,
                Err(OpError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Puts an archived task back in its queue with fresh attempts.
    pub async fn requeue(&self, task_id: &str) -> Result<Value, OpError> {
        check_task_id("task_id", task_id)?;
        self.admin.requeue(task_id).await
    }

    /// One task by id.
    pub async fn get(&self, task_id: &str) -> Result<TaskRecord, OpError> {
        check_task_id("task_id", task_id)?;
        self.inspector()
            .get(task_id)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("async task `{task_id}` does not exist")))
    }

    /// Tasks matching a query.
    pub async fn list(&self, query: &ListQuery) -> Result<Page, OpError> {
        if let Some(queue) = &query.queue {
            check_queue("queue", queue)?;
        }
        Ok(super::listing::page(self.inspector(), query).await?)
    }

    /// Stats of every queue; `workers` give the processed and failed counts.
    pub async fn stats(&self, workers: &[WorkerEntry]) -> Result<Vec<QueueStats>, OpError> {
        Ok(self.inspector().stats(workers).await?)
    }

    /// The task records (shared with the worker's attempts).
    pub fn records(&self) -> &RecordStore {
        &self.inspector().records
    }

    fn inspector(&self) -> &Inspector {
        self.admin.inspector()
    }
}
