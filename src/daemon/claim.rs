//! [`ClaimStore`]: who runs which daemon task, in the `bmw_daemon_claims`
//! bucket with a per-key TTL (design.md §4, §10).
//!
//! Every write is a publish on the key's raw subject with `Nats-TTL` and
//! `Nats-Expected-Last-Subject-Sequence`, because the KV API cannot combine a
//! TTL with an expected revision: acquire expects the revision of the marker or
//! released value it saw (0 for a key never written), renew expects the
//! claim's own revision. A `WrongLastSequence` answer means another worker
//! holds the claim: [`ClaimError::Lost`] / [`ClaimError::AlreadyHeld`].
//!
//! A graceful hand-over ([`ClaimStore::release`]) writes a *released* value
//! (empty `worker_id`, the releasing worker in `released_by`, counts kept, same
//! TTL), so the retry and reload counts move with the task and the next holder
//! knows where it came from; removal after a delete purges the key.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, kv, message::PublishMessage};
use serde::{Deserialize, Serialize};

use crate::nats::{NatsError, names};
use crate::task::UniId;

/// A claim's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The task.
    pub uni_id: UniId,
    /// The holder; empty when released.
    pub worker_id: String,
    /// When the holder took it (RFC 3339).
    pub since: String,
    /// The spec generation the holder runs.
    pub generation: u64,
    /// Failures since the last successful start or reload.
    pub retry_count: u32,
    /// Reloads so far.
    pub reload_count: u32,
    /// When the next retry is due (RFC 3339), if waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_at: Option<String>,
    /// In a released claim, the worker that released it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub released_by: String,
}

impl Claim {
    /// Whether someone holds it.
    pub fn is_held(&self) -> bool {
        !self.worker_id.is_empty()
    }
}

/// Why a claim operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another worker holds the task.
    #[error("claim on `{0}` is held by another worker")]
    AlreadyHeld(String),
    /// The claim changed under us: another worker took it (fencing).
    #[error("claim on `{0}` was lost")]
    Lost(String),
    /// NATS did not answer or refused; the outcome is unknown.
    #[error("claim store: {0}")]
    Nats(#[from] NatsError),
}

/// The claims bucket of one worker.
#[derive(Debug, Clone)]
pub struct ClaimStore {
    js: jetstream::Context,
    kv: kv::Store,
    ttl: Duration,
}

impl ClaimStore {
    /// Opens the (provisioned) bucket; claims live `ttl` unless renewed.
    pub async fn open(js: &jetstream::Context, ttl: Duration) -> Result<ClaimStore, ClaimError> {
        let kv = js
            .get_key_value(names::BUCKET_DAEMON_CLAIMS)
            .await
            .map_err(NatsError::from)?;
        Ok(ClaimStore {
            js: js.clone(),
            kv,
            ttl,
        })
    }

    /// The underlying bucket, for watching.
    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    /// The current claim on `key` with its revision (`None` if free).
    pub async fn get(&self, key: &str) -> Result<Option<(Claim, u64)>, ClaimError> {
        let entry = self.kv.entry(key).await.map_err(NatsError::from)?;
        Ok(entry.and_then(|e| {
            let claim = (e.operation == kv::Operation::Put)
                .then(|| serde_json::from_slice::<Claim>(&e.value).ok())
                .flatten();
            claim.map(|c| (c, e.revision))
        }))
    }

    /// Takes the task for `worker_id` if nobody holds it. Counts of a released
    /// claim carry over. Returns the claim, its revision and, if the claim
    /// replaced a released one, the worker that released it.
    pub async fn acquire(
        &self,
        key: &str,
        uni_id: &UniId,
        worker_id: &str,
        generation: u64,
    ) -> Result<(Claim, u64, Option<String>), ClaimError> {
        // A new task's key was never written: claim it in one round trip,
        // expecting no message on the key. Any earlier claim, held,
        // released or expired, makes that write fail, and the read below
        // finds it.
        let fresh = Claim {
            uni_id: uni_id.clone(),
            worker_id: worker_id.to_owned(),
            since: chrono::Utc::now().to_rfc3339(),
            generation,
            retry_count: 0,
            reload_count: 0,
            next_retry_at: None,
            released_by: String::new(),
        };
        match self.write(key, &fresh, 0).await {
            Ok(rev) => return Ok((fresh, rev, None)),
            Err(ClaimError::Lost(_)) => {}
            Err(e) => return Err(e),
        }
        let entry = self.kv.entry(key).await.map_err(NatsError::from)?;
        let (expected, previous) = match entry {
            None => (0, None),
            Some(e) if e.operation != kv::Operation::Put => (e.revision, None),
            Some(e) => {
                let previous: Option<Claim> = serde_json::from_slice(&e.value).ok();
                if previous.as_ref().is_some_and(Claim::is_held) {
                    return Err(ClaimError::AlreadyHeld(uni_id.to_string()));
                }
                (e.revision, previous)
            }
        };
        let released_by = previous
            .as_ref()
            .map(|p| p.released_by.clone())
            .filter(|w| !w.is_empty());
        let (retry_count, reload_count, next_retry_at) = match previous {
            Some(p) if p.generation == generation => {
                (p.retry_count, p.reload_count, p.next_retry_at)
            }
            Some(p) => (0, p.reload_count, None),
            None => (0, 0, None),
        };
        let claim = Claim {
            uni_id: uni_id.clone(),
            worker_id: worker_id.to_owned(),
            since: chrono::Utc::now().to_rfc3339(),
            generation,
            retry_count,
            reload_count,
            next_retry_at,
            released_by: String::new(),
        };
        match self.write(key, &claim, expected).await {
            Ok(rev) => Ok((claim, rev, released_by)),
            Err(ClaimError::Lost(id)) => Err(ClaimError::AlreadyHeld(id)),
            Err(e) => Err(e),
        }
    }

    /// Renews (or updates) our claim; `revision` is the one we hold.
    pub async fn renew(&self, key: &str, claim: &Claim, revision: u64) -> Result<u64, ClaimError> {
        self.write(key, claim, revision).await
    }

    /// Hands the task over: a released value that keeps the counts.
    pub async fn release(
        &self,
        key: &str,
        claim: &Claim,
        revision: u64,
    ) -> Result<u64, ClaimError> {
        let released = Claim {
            worker_id: String::new(),
            released_by: claim.worker_id.clone(),
            next_retry_at: None,
            ..claim.clone()
        };
        self.write(key, &released, revision).await
    }

    /// Removes the claim of a deleted task.
    pub async fn remove(&self, key: &str, revision: u64) -> Result<(), ClaimError> {
        self.kv
            .purge_expect_revision_with_ttl(key, revision, self.ttl)
            .await
            .map_err(|e| ClaimError::Nats(e.into()))
    }

    async fn write(&self, key: &str, claim: &Claim, expected: u64) -> Result<u64, ClaimError> {
        let body = crate::nats::to_json_bytes(claim);
        let publish = PublishMessage::build()
            .payload(body)
            .expected_last_subject_sequence(expected)
            .ttl(self.ttl);
        let subject = names::kv_subject(names::BUCKET_DAEMON_CLAIMS, key);
        let result = match self.js.send_publish(subject, publish).await {
            Ok(ack) => ack.await.map(|a| a.sequence),
            Err(e) => Err(e),
        };
        result.map_err(|e| match e.kind() {
            PublishErrorKind::WrongLastSequence => ClaimError::Lost(claim.uni_id.to_string()),
            _ => ClaimError::Nats(e.into()),
        })
    }
}
