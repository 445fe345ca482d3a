//! [`EventPublisher`]: what happened to tasks, published on
//! `bmw.event.<type>.<kind>.<what>` into the `BMW_EVENTS` stream.
//!
//! Events are for operators and other programs (alerting, audits); bmw's own
//! state never depends on them. They are plain NATS publishes that the
//! `BMW_EVENTS` stream captures, at most once: no ack round trip on the hot
//! path, and on one connection they reach the server in order with the acks
//! that follow them (on one server, a task's `succeeded` event is not lost
//! while its ack gets through). In a cluster an event sent while `BMW_EVENTS`
//! elects a leader is dropped, whatever happens to the ack (design note 38).

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::nats::names;

/// One event. `what` is `started`, `error`, `retry`, `stopped`, `moved`
/// (daemon) and the async/periodic ones of design.md §2.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `daemon`, `async`, `periodic`, or `command` for a refused command.
    pub task_type: String,
    /// The task's kind (or `unknown` for a message that had none).
    pub kind: String,
    /// What happened.
    pub what: String,
    /// The worker that saw it.
    pub worker_id: String,
    /// RFC 3339 time.
    pub time: String,
    /// Details: uni_id, error, retry counts...
    #[serde(flatten)]
    pub detail: Value,
}

/// Publishes events; cheap to clone.
#[derive(Debug, Clone)]
pub struct EventPublisher {
    client: async_nats::Client,
    worker_id: Arc<str>,
}

impl EventPublisher {
    /// A publisher that stamps events with `worker_id`.
    pub fn new(client: async_nats::Client, worker_id: impl Into<String>) -> Self {
        EventPublisher {
            client,
            worker_id: Arc::from(worker_id.into()),
        }
    }

    /// Stamps an event now and queues it on the connection.
    pub async fn emit(&self, task_type: &str, kind: &str, what: &str, detail: Value) {
        self.send(self.event(task_type, kind, what, detail)).await
    }

    fn event(&self, task_type: &str, kind: &str, what: &str, detail: Value) -> Event {
        Event {
            task_type: task_type.to_owned(),
            kind: kind.to_owned(),
            what: what.to_owned(),
            worker_id: self.worker_id.to_string(),
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            detail,
        }
    }

    async fn send(&self, event: Event) {
        let (task_type, kind, what) = (
            event.task_type.as_str(),
            event.kind.as_str(),
            event.what.as_str(),
        );
        let subject = names::event_subject(task_type, subject_token(kind), what);
        let body = match serde_json::to_vec(&event) {
            Ok(body) => body,
            Err(e) => return tracing::warn!(cause = %e, "cannot encode event"),
        };
        if let Err(e) = self.client.publish(subject, body.into()).await {
            tracing::warn!(cause = %e, kind, what, "event not published");
        }
    }
}

/// A kind as a subject token: kinds are validated, but a poison message may
/// carry anything.
fn subject_token(kind: &str) -> &str {
    let ok = !kind.is_empty() && !kind.contains(['.', '*', '>', ' ', '\t', '\r', '\n']);
    if ok { kind } else { "unknown" }
}
