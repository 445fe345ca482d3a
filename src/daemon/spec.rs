//! [`SpecStore`]: daemon task specs in the `bmw_daemon_tasks` bucket, keyed by
//! [`UniId::key`]. A spec is what should run; claims say who runs it.
//!
//! Writes are compare-and-set on the entry's revision, so two commands racing
//! on one task cannot lose an update (each retries on a fresh read).

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::nats::{NatsError, NatsErrorKind, RETRY_BUDGET, names, with_retries};
use crate::task::{Kind, Options, UniId};

/// What should run: one daemon task instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonSpec {
    /// The instance's identity.
    pub uni_id: UniId,
    /// Its kind.
    pub kind: Kind,
    /// Its payload (any JSON).
    pub payload: Value,
    /// Its options (only `queue` matters to daemons).
    #[serde(default)]
    pub options: Options,
    /// When it was first created (RFC 3339).
    pub created_at: String,
    /// Bumped by every reload or payload change; the owner restarts on a change.
    pub generation: u64,
    /// The task_dimension metric label: the operator's dimension or the uni_id.
    pub dimension: String,
}

/// Why a spec operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// No such task.
    #[error("daemon task `{0}` does not exist")]
    NotFound(String),
    /// NATS failed.
    #[error("daemon task store: {0}")]
    Nats(#[from] NatsError),
    /// A stored spec is not valid JSON.
    #[error("daemon task store: {0}")]
    Json(#[from] serde_json::Error),
}

/// What a create did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    /// A new task.
    Created,
    /// The same task with the same payload and options: nothing changed.
    Unchanged,
    /// The task existed with another payload/options: replaced and reloaded.
    Replaced,
}

/// The daemon spec bucket.
#[derive(Debug, Clone)]
pub struct SpecStore {
    kv: kv::Store,
}

const CAS_ATTEMPTS: usize = 8;

fn contention(uni_id: &UniId) -> SpecError {
    SpecError::Nats(NatsError::with_kind(
        NatsErrorKind::Conflict,
        format!("too much contention on `{uni_id}`"),
    ))
}

impl SpecStore {
    /// Opens the (provisioned) bucket.
    pub async fn open(js: &jetstream::Context) -> Result<SpecStore, NatsError> {
        let kv = js.get_key_value(names::BUCKET_DAEMON_TASKS).await?;
        Ok(SpecStore { kv })
    }

    /// The underlying bucket, for watching.
    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    /// The stored spec and its revision; NATS steps ride out an election or
    /// a reconnect ([`with_retries`]), as every write here does.
    async fn read(&self, key: &str) -> Result<Option<(DaemonSpec, u64)>, SpecError> {
        let entry = with_retries(RETRY_BUDGET, |_| async {
            self.kv.entry(key).await.map_err(NatsError::from)
        })
        .await?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let spec = serde_json::from_slice(&e.value)?;
                Ok(Some((spec, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// The spec of a uni_id, if it exists.
    pub async fn get(&self, uni_id: &UniId) -> Result<Option<DaemonSpec>, SpecError> {
        Ok(self.read(&uni_id.key()).await?.map(|(s, _)| s))
    }

    /// Writes `spec` if the entry is still at `revision` (`None`: absent or
    /// deleted; `Some(0)`: no message at all on the key, not even a marker);
    /// `Ok(false)` when another write came first. A retried write whose
    /// first attempt was stored (its ack lost) finds its own bytes there and
    /// counts as written, so a reload is not applied twice.
    async fn write(
        &self,
        key: &str,
        spec: &DaemonSpec,
        revision: Option<u64>,
    ) -> Result<bool, SpecError> {
        let body = crate::nats::to_json_bytes(spec);
        let written = with_retries(RETRY_BUDGET, |attempt| {
            let body = body.clone();
            async move {
                let conflict = match revision {
                    Some(rev) => match self.kv.update(key, body.clone(), rev).await {
                        Ok(_) => return Ok(true),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => true,
                        Err(e) => return Err(NatsError::from(e)),
                    },
                    None => match self.kv.create(key, body.clone()).await {
                        Ok(_) => return Ok(true),
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => true,
                        Err(e) => return Err(NatsError::from(e)),
                    },
                };
                if conflict && attempt > 1 {
                    let ours = self.kv.entry(key).await.map_err(NatsError::from)?;
                    return Ok(ours.is_some_and(|e| e.value == body));
                }
                Ok(false)
            }
        })
        .await?;
        Ok(written)
    }

    /// Creates a task, or replaces its payload/options (bumping the generation
    /// so the owner restarts it); an identical create changes nothing.
    pub async fn create(&self, mut spec: DaemonSpec) -> Result<CreateOutcome, SpecError> {
        let key = spec.uni_id.key();
        // Most creates are of new tasks: write expecting no message on the
        // key (one round trip), and read only when that fails.
        if self.write(&key, &spec, Some(0)).await? {
            return Ok(CreateOutcome::Created);
        }
        for _ in 0..CAS_ATTEMPTS {
            let (outcome, revision) = match self.read(&key).await? {
                None => (CreateOutcome::Created, None),
                Some((old, _)) if old.payload == spec.payload && old.options == spec.options => {
                    return Ok(CreateOutcome::Unchanged);
                }
                Some((old, rev)) => {
                    spec.generation = old.generation + 1;
                    spec.created_at = old.created_at;
                    (CreateOutcome::Replaced, Some(rev))
                }
            };
            if self.write(&key, &spec, revision).await? {
                return Ok(outcome);
            }
        }
        Err(contention(&spec.uni_id))
    }

    /// Bumps a task's generation: its owner restarts it with reload_count + 1.
    pub async fn reload(&self, uni_id: &UniId) -> Result<DaemonSpec, SpecError> {
        self.update(uni_id, |spec| {
            spec.generation += 1;
            Ok::<_, SpecError>(())
        })
        .await
    }

    /// Changes a task's spec with `change` (compare-and-set: `change` runs
    /// again on a fresh read when another write came first); an error from
    /// `change` leaves the spec as it was.
    pub async fn update<E: From<SpecError>>(
        &self,
        uni_id: &UniId,
        mut change: impl FnMut(&mut DaemonSpec) -> Result<(), E>,
    ) -> Result<DaemonSpec, E> {
        let key = uni_id.key();
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut spec, rev)) = self.read(&key).await? else {
                return Err(SpecError::NotFound(uni_id.to_string()).into());
            };
            change(&mut spec)?;
            if self.write(&key, &spec, Some(rev)).await? {
                return Ok(spec);
            }
        }
        Err(contention(uni_id).into())
    }

    /// Deletes a task: its owner stops it and drops the claim.
    pub async fn delete(&self, uni_id: &UniId) -> Result<DaemonSpec, SpecError> {
        let key = uni_id.key();
        let Some((spec, rev)) = self.read(&key).await? else {
            return Err(SpecError::NotFound(uni_id.to_string()));
        };
        let key = key.as_str();
        with_retries(RETRY_BUDGET, |attempt| async move {
            match self.kv.purge_expect_revision(key, Some(rev)).await {
                Ok(()) => Ok(()),
                // An earlier attempt purged it and its ack was lost.
                Err(_) if attempt > 1 && self.kv.get(key).await.is_ok_and(|v| v.is_none()) => {
                    Ok(())
                }
                Err(e) => Err(NatsError::from(e)),
            }
        })
        .await?;
        Ok(spec)
    }

    /// Every spec, sorted by uni_id.
    pub async fn list(&self) -> Result<Vec<DaemonSpec>, SpecError> {
        let all = crate::nats::read_all::<DaemonSpec>(&self.kv).await?;
        let mut specs: Vec<DaemonSpec> = all.into_values().collect();
        specs.sort_by(|a, b| a.uni_id.cmp(&b.uni_id));
        Ok(specs)
    }
}
