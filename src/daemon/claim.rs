//! [`ClaimStore`]: who runs which daemon task, in the `bmw_daemon_claims`
//! bucket (design.md §4, §10; design-notes, 88).
//!
//! A held claim names its holder and the holder's [`Lease`]: it has no TTL
//! and is not renewed. It is the holder's for as long as that lease lives
//! (the worker's entry in `bmw_workers`, renewed every heartbeat); once the
//! lease is gone, any worker may take the claim over. Every write is a
//! publish on the key's raw subject with `Nats-Expected-Last-Subject-Sequence`
//! (and `Nats-TTL` where a value should expire), because the KV API cannot
//! combine a TTL with an expected revision: acquire expects the revision of
//! the marker, released value or dead holder's claim it saw (0 for a key never
//! written), any later write the claim's own revision. A `WrongLastSequence`
//! answer means another worker holds the claim: [`ClaimError::Lost`] /
//! [`ClaimError::AlreadyHeld`].
//!
//! A graceful hand-over ([`ClaimStore::release`]) writes a *released* value
//! (empty `worker_id`, the releasing worker in `released_by`, counts kept,
//! with the store's TTL), so the retry and reload counts move with the task
//! and the next holder knows where it came from; removal after a delete
//! purges the key.
//!
//! [`Lease`]: crate::membership::Lease

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, kv, message::PublishMessage};
use serde::{Deserialize, Serialize};

use crate::membership::Leases;
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
    /// The holder's lease: the claim is held while it lives. Empty in a
    /// claim written by a worker older than leases, which expires with its
    /// TTL unless renewed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lease: String,
}

impl Claim {
    /// Whether it names a holder (alive or not).
    pub fn is_held(&self) -> bool {
        !self.worker_id.is_empty()
    }

    /// Whether its holder still holds it, given the lease its holder's
    /// worker entry names now (`None`: no entry).
    pub fn is_held_under(&self, holder_lease: Option<&str>) -> bool {
        self.is_held() && (self.lease.is_empty() || holder_lease == Some(self.lease.as_str()))
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
    leases: Leases,
    ttl: Duration,
}

impl ClaimStore {
    /// Opens the (provisioned) bucket; released claims live `ttl`; a
    /// holder's lease is read with `leases`.
    pub async fn open(
        js: &jetstream::Context,
        leases: Leases,
        ttl: Duration,
    ) -> Result<ClaimStore, ClaimError> {
        let kv = js
            .get_key_value(names::BUCKET_DAEMON_CLAIMS)
            .await
            .map_err(NatsError::from)?;
        Ok(ClaimStore {
            js: js.clone(),
            kv,
            leases,
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

    /// Takes the task for `worker_id` under `lease` if nobody holds it: a
    /// key never written, a released or removed claim, or one whose holder's
    /// lease is gone (taken over), or one of this worker's own that it no
    /// longer runs. Counts carry over from the claim replaced when it is at
    /// the same generation. Returns the claim, its revision and the worker
    /// that held the task before, if another one did.
    pub async fn acquire(
        &self,
        key: &str,
        uni_id: &UniId,
        worker_id: &str,
        lease: &str,
        generation: u64,
    ) -> Result<(Claim, u64, Option<String>), ClaimError> {
        // A new task's key was never written: claim it in one round trip,
        // expecting no message on the key. Any earlier claim, held,
        // released or expired, makes that write fail, and the read below
        // finds it.
        let mut claim = Claim {
            uni_id: uni_id.clone(),
            worker_id: worker_id.to_owned(),
            since: chrono::Utc::now().to_rfc3339(),
            generation,
            retry_count: 0,
            reload_count: 0,
            next_retry_at: None,
            released_by: String::new(),
            lease: lease.to_owned(),
        };
        match self.write(key, &claim, 0).await {
            Ok(rev) => return Ok((claim, rev, None)),
            Err(ClaimError::Lost(_)) => {}
            Err(e) => return Err(e),
        }
        let entry = self.kv.entry(key).await.map_err(NatsError::from)?;
        let (expected, previous) = match entry {
            None => (0, None),
            Some(e) if e.operation != kv::Operation::Put => (e.revision, None),
            Some(e) => {
                let previous: Option<Claim> = serde_json::from_slice(&e.value).ok();
                if let Some(p) = previous.as_ref().filter(|p| p.is_held())
                    && !self.is_free(p, worker_id).await?
                {
                    return Err(ClaimError::AlreadyHeld(uni_id.to_string()));
                }
                (e.revision, previous)
            }
        };
        let from = previous.as_ref().and_then(|p| {
            let from = if p.is_held() {
                &p.worker_id
            } else {
                &p.released_by
            };
            (!from.is_empty() && from != worker_id).then(|| from.clone())
        });
        match previous {
            Some(p) if p.generation == generation => {
                (claim.retry_count, claim.reload_count, claim.next_retry_at) =
                    (p.retry_count, p.reload_count, p.next_retry_at);
            }
            Some(p) => claim.reload_count = p.reload_count,
            None => {}
        }
        match self.write(key, &claim, expected).await {
            Ok(rev) => Ok((claim, rev, from)),
            Err(ClaimError::Lost(id)) => Err(ClaimError::AlreadyHeld(id)),
            Err(e) => Err(e),
        }
    }

    /// Whether a held claim may be taken over by `worker_id`: it is this
    /// worker's own (which asks only for one it does not run), or its
    /// holder's lease is gone, as the workers stream's leader says. A claim
    /// without a lease (an older worker's) is held until it expires.
    async fn is_free(&self, claim: &Claim, worker_id: &str) -> Result<bool, ClaimError> {
        if claim.worker_id == worker_id {
            return Ok(true);
        }
        if claim.lease.is_empty() {
            return Ok(false);
        }
        let lease = self.leases.of(&claim.worker_id).await?;
        Ok(!claim.is_held_under(lease.as_ref().map(|(id, _)| id.as_str())))
    }

    /// Updates our claim (its counts); `revision` is the one we hold.
    pub async fn update(&self, key: &str, claim: &Claim, revision: u64) -> Result<u64, ClaimError> {
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
            lease: String::new(),
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
        let mut publish = PublishMessage::build()
            .payload(body)
            .expected_last_subject_sequence(expected);
        // A held claim lives as long as its lease; a released one (or a
        // claim of an older worker's kind, without a lease) expires.
        if !claim.is_held() || claim.lease.is_empty() {
            publish = publish.ttl(self.ttl);
        }
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
