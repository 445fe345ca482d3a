//! [`AsyncOps`]: the operations on async tasks, written once for every
//! caller (bridge, `bmw task`, the command consumer): create (enqueue),
//! delete and requeue, plus the reads behind listings. A task id that no
//! task can have is refused here (400), before it reaches a subject or key.

use serde_json::Value;

use super::admin::Admin;
use super::enqueue::Enqueuer;
use super::inspect::{Inspector, ListQuery, QueueStats};
use super::record::{RecordStore, TaskRecord};
use crate::membership::WorkerEntry;
use crate::nats::{Nats, NatsError};
use crate::task::{CreateCommand, OpError, check_task_id};

/// Creates, deletes, requeues and reads async tasks.
#[derive(Debug, Clone)]
pub struct AsyncOps {
    enqueuer: Enqueuer,
    admin: Admin,
}

impl AsyncOps {
    /// Opens the (provisioned) streams and buckets.
    pub async fn open(nats: &Nats) -> Result<AsyncOps, NatsError> {
        Ok(AsyncOps {
            enqueuer: Enqueuer::open(&nats.js).await?,
            admin: Admin::open(nats).await?,
        })
    }

    /// Validates and enqueues; the data is `{task_id, kind, queue, state, process_at}`.
    pub async fn create(&self, create: &CreateCommand) -> Result<Value, OpError> {
        self.enqueuer.enqueue(create).await
    }

    /// Deletes a task in any state; a running handler is cancelled.
    pub async fn delete(&self, task_id: &str) -> Result<Value, OpError> {
        check_task_id(task_id)?;
        self.admin.delete(task_id).await
    }

    /// Puts an archived task back in its queue with fresh attempts.
    pub async fn requeue(&self, task_id: &str) -> Result<Value, OpError> {
        check_task_id(task_id)?;
        self.admin.requeue(task_id).await
    }

    /// One task by id.
    pub async fn get(&self, task_id: &str) -> Result<TaskRecord, OpError> {
        check_task_id(task_id)?;
        self.inspector()
            .get(task_id)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("async task `{task_id}` does not exist")))
    }

    /// Tasks matching a query.
    pub async fn list(&self, query: &ListQuery) -> Result<Vec<TaskRecord>, OpError> {
        if let Some(queue) = &query.queue {
            crate::task::options::check_queue("queue", queue)?;
        }
        Ok(self.inspector().list(query).await?)
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
