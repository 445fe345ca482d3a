//! [`PeriodicStore`]: periodic task specs in `bmw_periodic` and their
//! schedule messages on `bmw.schedule.<kind>` in `BMW_SCHEDULES`, which
//! nats-server itself fires: one task message per tick on
//! `bmw.fired.<queue>.<kind>`, however many workers run. No leader.
//!
//! A schedule is replaced by publishing a new one with `Nats-Rollup: sub`,
//! deleted (or paused) by purging its subject, and the ticks it queued and
//! no worker took yet with it. The spec is written after the
//! schedule, so a refused schedule leaves nothing behind. Each tick's run
//! writes a small status (`status.<kind key>`): last run, outcome, next run.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, message::PublishMessage, stream::Stream};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::schedule::{Schedule, parse_timezone};
use crate::nats::{NatsError, NatsErrorKind, names};
use crate::queue::TaskMessage;
use crate::task::{Kind, Options};

/// What should fire, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeriodicSpec {
    /// The periodic kind (its identity: one schedule per kind).
    pub kind: Kind,
    /// When it fires.
    pub schedule: Schedule,
    /// IANA time zone of a cron schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Payload of every tick.
    #[serde(default)]
    pub payload: Value,
    /// Async options of every tick (queue, retry, timeout...).
    #[serde(default)]
    pub options: Options,
    /// Paused: the schedule message is removed, the spec kept.
    #[serde(default)]
    pub paused: bool,
    /// Declared in code (reconciled at worker start) or created at run time.
    #[serde(default)]
    pub declared: bool,
    /// First creation (RFC 3339).
    pub created_at: String,
}

impl PeriodicSpec {
    /// Whether two specs fire the same ticks (ignoring pause and timestamps).
    pub fn same_schedule(&self, other: &PeriodicSpec) -> bool {
        self.schedule == other.schedule
            && self.timezone == other.timezone
            && self.payload == other.payload
            && self.options == other.options
    }
}

/// The last tick's run, written by the worker that ran it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeriodicStatus {
    /// When the last tick ran.
    pub last_run_at: Option<String>,
    /// `succeeded`, `retry` or `archived`.
    pub last_outcome: Option<String>,
    /// The server's `Nats-Schedule-Next` of the last tick.
    pub next_run_at: Option<String>,
    /// Ticks run so far (as seen by the status writes).
    pub runs: u64,
}

/// Why a periodic operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PeriodicError {
    /// No such periodic task (404).
    #[error("periodic task `{0}` does not exist")]
    NotFound(String),
    /// The server refused the schedule: the caller's options (400).
    #[error("nats-server refused the schedule: {0}")]
    Refused(#[source] NatsError),
    /// NATS failed (503 when transient).
    #[error("periodic tasks: {0}")]
    Nats(#[from] NatsError),
}

fn nats(e: impl Into<NatsError>) -> PeriodicError {
    PeriodicError::Nats(e.into())
}

/// Specs, schedules and statuses of periodic tasks.
#[derive(Debug, Clone)]
pub struct PeriodicStore {
    js: jetstream::Context,
    kv: kv::Store,
    stream: Stream,
}

impl PeriodicStore {
    /// Opens the (provisioned) bucket and stream.
    pub async fn open(js: &jetstream::Context) -> Result<PeriodicStore, NatsError> {
        Ok(PeriodicStore {
            js: js.clone(),
            kv: js.get_key_value(names::BUCKET_PERIODIC).await?,
            stream: js.get_stream(names::STREAM_SCHEDULES).await?,
        })
    }

    /// The spec of a kind.
    pub async fn get(&self, kind: &str) -> Result<Option<PeriodicSpec>, PeriodicError> {
        match self
            .kv
            .entry(names::periodic_key(kind))
            .await
            .map_err(nats)?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(serde_json::from_slice(&e.value).ok())
            }
            _ => Ok(None),
        }
    }

    /// Writes (or replaces) the schedule, then the spec.
    pub async fn apply(&self, spec: &PeriodicSpec) -> Result<(), PeriodicError> {
        if !spec.paused {
            self.publish_schedule(spec).await?;
        } else {
            self.purge_schedule(spec.kind.as_str()).await?;
        }
        self.kv
            .put(
                names::periodic_key(spec.kind.as_str()),
                crate::nats::to_json_bytes(spec),
            )
            .await
            .map_err(nats)?;
        Ok(())
    }

    async fn publish_schedule(&self, spec: &PeriodicSpec) -> Result<(), PeriodicError> {
        let tick = TaskMessage {
            id: String::new(),
            kind: spec.kind.to_string(),
            payload: spec.payload.clone(),
            options: spec.options.clone(),
            enqueued_at: None,
            errors: Vec::new(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_SCHEDULE,
            spec.schedule.header().as_str(),
        );
        headers.insert(
            async_nats::header::NATS_SCHEDULE_TARGET,
            names::tick_subject(spec.options.queue(), spec.kind.as_str()).as_str(),
        );
        if let (Some(tz), Schedule::Cron(_)) = (&spec.timezone, &spec.schedule) {
            headers.insert(async_nats::header::NATS_SCHEDULE_TIME_ZONE, tz.as_str());
        }
        headers.insert(async_nats::header::NATS_ROLLUP, "sub");
        let publish = PublishMessage::build()
            .payload(crate::nats::to_json_bytes(&tick))
            .headers(headers);
        let subject = names::schedule_subject(spec.kind.as_str());
        let legacy = names::legacy_schedule_subject(spec.kind.as_str());
        // Retried through an election (a rollup: repeating it is harmless). Only
        // an API error about the schedule itself is the caller's fault; a
        // timeout or an outage is not.
        match crate::nats::publish_with_retries(&self.js, &subject, publish).await {
            Ok(_) => self.purge_subject(&legacy).await,
            Err(e) if e.kind() == NatsErrorKind::Refused => Err(PeriodicError::Refused(e)),
            Err(e) => Err(PeriodicError::Nats(e)),
        }
    }

    async fn purge_schedule(&self, kind: &str) -> Result<(), PeriodicError> {
        self.purge_subject(&names::schedule_subject(kind)).await?;
        self.purge_subject(&names::legacy_schedule_subject(kind))
            .await
    }

    /// Drops the ticks already queued and not yet running (a deleted or
    /// paused task runs no more, however long its queue).
    async fn purge_ticks(&self, spec: &PeriodicSpec) -> Result<(), PeriodicError> {
        self.purge_subject(&names::tick_subject(
            spec.options.queue(),
            spec.kind.as_str(),
        ))
        .await
    }

    async fn purge_subject(&self, subject: &str) -> Result<(), PeriodicError> {
        self.stream
            .purge()
            .filter(subject)
            .await
            .map(|_| ())
            .map_err(nats)
    }

    /// Whether the kind's schedule message is in the stream.
    pub async fn has_schedule(&self, kind: &str) -> Result<bool, PeriodicError> {
        Ok(self
            .stream
            .get_last_raw_message_by_subject(&names::schedule_subject(kind))
            .await
            .is_ok())
    }

    /// Deletes a periodic task: no more ticks.
    pub async fn delete(&self, kind: &str) -> Result<PeriodicSpec, PeriodicError> {
        let spec = self
            .get(kind)
            .await?
            .ok_or_else(|| PeriodicError::NotFound(kind.to_owned()))?;
        self.purge_schedule(kind).await?;
        self.purge_ticks(&spec).await?;
        self.kv
            .purge(names::periodic_key(kind))
            .await
            .map_err(nats)?;
        if let Err(e) = self.kv.purge(names::periodic_status_key(kind)).await {
            tracing::debug!(kind, cause = %e, "periodic status not removed");
        }
        Ok(spec)
    }

    /// Pauses (`true`) or resumes (`false`) a periodic task.
    pub async fn set_paused(
        &self,
        kind: &str,
        paused: bool,
    ) -> Result<PeriodicSpec, PeriodicError> {
        let mut spec = self
            .get(kind)
            .await?
            .ok_or_else(|| PeriodicError::NotFound(kind.to_owned()))?;
        spec.paused = paused;
        self.apply(&spec).await?;
        if paused {
            self.purge_ticks(&spec).await?;
        }
        Ok(spec)
    }

    /// Records a tick's run.
    pub async fn record_run(&self, kind: &str, outcome: &str, next_run_at: Option<String>) {
        let key = names::periodic_status_key(kind);
        let mut status: PeriodicStatus = match self.kv.get(&key).await {
            Ok(Some(v)) => serde_json::from_slice(&v).unwrap_or_default(),
            _ => PeriodicStatus::default(),
        };
        status.last_run_at = Some(Utc::now().to_rfc3339());
        status.last_outcome = Some(outcome.to_owned());
        status.next_run_at = next_run_at.or(status.next_run_at);
        status.runs += 1;
        if let Err(e) = self.kv.put(&key, crate::nats::to_json_bytes(&status)).await {
            tracing::warn!(kind, cause = %e, "periodic status not written");
        }
    }

    /// Every spec with its status and next run time.
    pub async fn list(&self) -> Result<Vec<Value>, PeriodicError> {
        let all = crate::nats::read_all::<Value>(&self.kv).await?;
        let mut rows = Vec::new();
        for (key, value) in &all {
            if key.starts_with(names::PERIODIC_STATUS_PREFIX) {
                continue;
            }
            let Ok(spec) = serde_json::from_value::<PeriodicSpec>(value.clone()) else {
                continue;
            };
            let status: PeriodicStatus = all
                .get(&format!("{}{key}", names::PERIODIC_STATUS_PREFIX))
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default();
            let tz = parse_timezone(spec.timezone.as_deref()).unwrap_or(chrono_tz::UTC);
            let computed = spec
                .schedule
                .next_after(Utc::now(), tz)
                .map(|t| t.to_rfc3339());
            let next = if spec.paused {
                None
            } else {
                status
                    .next_run_at
                    .clone()
                    .filter(|n| n.as_str() > Utc::now().to_rfc3339().as_str())
                    .or(computed)
            };
            let mut row = serde_json::to_value(&spec).unwrap_or_default();
            row["schedule_header"] = Value::String(spec.schedule.header());
            row["next_run_at"] = serde_json::json!(next);
            row["last_run_at"] = serde_json::json!(status.last_run_at);
            row["last_outcome"] = serde_json::json!(status.last_outcome);
            row["runs"] = serde_json::json!(status.runs);
            rows.push(row);
        }
        rows.sort_by(|a, b| a["kind"].as_str().cmp(&b["kind"].as_str()));
        Ok(rows)
    }
}

/// The store records each tick's run (the async runtime tells it).
impl crate::queue::TickObserver for PeriodicStore {
    fn record_run<'a>(
        &'a self,
        kind: &'a str,
        outcome: &'a str,
        next_run_at: Option<String>,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(PeriodicStore::record_run(self, kind, outcome, next_run_at))
    }
}
