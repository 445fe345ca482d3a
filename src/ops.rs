//! [`Operations`]: the one place a command is applied, for every task type
//! and every caller. The command consumer applies what arrives on
//! `bmw.task.*`; the bridge and `bmw task` (through `crate::client`) apply
//! async and periodic commands directly (a task is durable once stored) and
//! check daemon commands before handing them to a worker ([`Route`]).
//!
//! Each task type owns its operations ([`DaemonOps`], [`AsyncOps`],
//! [`PeriodicOps`]); this module checks what they share (the kind is known
//! here or to a live worker, the options apply to the type) and dispatches.
//! The stores behind them are opened once per process, here.

use std::sync::Arc;

use async_nats::jetstream::kv;
use serde_json::{Value, json};

use crate::config::Config;
use crate::daemon::{DaemonOps, SpecStore};
use crate::membership::WorkerEntry;
use crate::nats::{Nats, NatsError, names};
use crate::periodic::{PeriodicOps, PeriodicStore};
use crate::queue::AsyncOps;
use crate::registry::Registry;
use crate::task::{Command, CreateCommand, DeleteTarget, Kind, OpError, TaskType, ValidationError};

/// The operations of one process over its stores. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Operations {
    client: async_nats::Client,
    registry: Arc<Registry>,
    daemon: DaemonOps,
    queue: AsyncOps,
    periodic: PeriodicOps,
    workers: kv::Store,
}

/// Where a kind runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Home {
    /// Registered in this binary.
    Here,
    /// Not here, but a live worker advertises it.
    Elsewhere,
}

/// How a producer gets a command applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Apply it here with [`Operations::apply`].
    Direct,
    /// Publish it for a worker (a daemon create, delete or reload); `known` is
    /// what can be told already (the uni_id).
    Worker {
        /// What is known of the task.
        known: Value,
    },
}

impl Operations {
    /// Opens the (provisioned) streams and buckets of every task type, with
    /// the default limits.
    pub async fn open(nats: &Nats, registry: Arc<Registry>) -> Result<Operations, NatsError> {
        Operations::open_with(nats, registry, &Config::default()).await
    }

    /// Opens them with the limits of `config` (`--max-queue-pending`...).
    pub async fn open_with(
        nats: &Nats,
        registry: Arc<Registry>,
        config: &Config,
    ) -> Result<Operations, NatsError> {
        let js = &nats.js;
        let daemon = DaemonOps::new(SpecStore::open(js).await?, registry.operators().clone());
        Ok(Operations {
            client: nats.client.clone(),
            daemon,
            queue: AsyncOps::open(nats, config.max_queue_pending).await?,
            periodic: PeriodicOps::new(PeriodicStore::open(js).await?),
            workers: js.get_key_value(names::BUCKET_WORKERS).await?,
            registry,
        })
    }

    /// The kinds this process knows.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Daemon task operations.
    pub fn daemon(&self) -> &DaemonOps {
        &self.daemon
    }

    /// Async task operations.
    pub fn queue(&self) -> &AsyncOps {
        &self.queue
    }

    /// Periodic task operations.
    pub fn periodic(&self) -> &PeriodicOps {
        &self.periodic
    }

    /// The live-worker bucket.
    pub fn workers(&self) -> &kv::Store {
        &self.workers
    }

    /// Every live worker, sorted by id.
    pub async fn list_workers(&self) -> Result<Vec<WorkerEntry>, OpError> {
        let workers = crate::nats::read_all::<WorkerEntry>(&self.workers).await?;
        let mut list: Vec<WorkerEntry> = workers.into_values().collect();
        list.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(list)
    }

    /// Where `kind` runs; refuses a kind neither this binary nor any live
    /// worker knows, listing the known ones.
    async fn home_of(&self, kind: &Kind) -> Result<Home, OpError> {
        if self.registry.is_registered(kind) {
            return Ok(Home::Here);
        }
        let workers = self.list_workers().await?;
        if workers
            .iter()
            .any(|w| w.kinds.iter().any(|k| k == kind.as_str()))
        {
            return Ok(Home::Elsewhere);
        }
        let mut known = self.registry.kinds();
        known.extend(workers.into_iter().flat_map(|w| w.kinds));
        known.sort();
        known.dedup();
        Err(ValidationError::new(
            "kind",
            format!(
                "{kind} is not registered (known kinds: {})",
                known.join(", ")
            ),
        )
        .into())
    }

    /// Refuses a create whose stored form would not fit in one NATS message
    /// (the server's `max_payload`, less room for headers): refused before
    /// anything is stored, never accepted and then dropped.
    fn check_size(&self, create: &CreateCommand) -> Result<(), OpError> {
        /// Room for the headers JetStream and bmw add to a stored message.
        const HEADROOM: usize = 4096;
        let limit = self.client.max_payload().saturating_sub(HEADROOM);
        let (what, size) = match create.kind.task_type() {
            // A daemon spec holds its uni_id, which may be the payload in hex.
            // (Of a kind only other workers run, they measure it.)
            TaskType::Daemon => match self.daemon.spec_for(create) {
                Ok(spec) => ("daemon task", crate::nats::to_json_bytes(&spec).len()),
                Err(_) => return Ok(()),
            },
            task_type => {
                let what = if task_type == TaskType::Async {
                    "async task"
                } else {
                    "periodic task"
                };
                let body = crate::nats::to_json_bytes(&(&create.payload, &create.options));
                (what, body.len() + create.kind.as_str().len() + 256)
            }
        };
        if size > limit {
            return Err(OpError::TooLarge { what, size, limit });
        }
        Ok(())
    }

    /// How a producer gets `command` applied, refusing first what a worker
    /// would refuse (unknown kind, bad options, unknown uni_id, too large).
    pub async fn route(&self, command: &Command) -> Result<Route, OpError> {
        match command {
            Command::Create(create) => {
                create.options.check_for(create.kind.task_type())?;
                let home = self.home_of(&create.kind).await?;
                self.check_size(create)?;
                match (create.kind.task_type(), home) {
                    (TaskType::Daemon, Home::Here) => Ok(Route::Worker {
                        known: json!({"uni_id": self.daemon.spec_for(create)?.uni_id}),
                    }),
                    // Built with more kinds than this binary: the worker computes the uni_id.
                    (TaskType::Daemon, Home::Elsewhere) => Ok(Route::Worker {
                        known: json!({"uni_id": null}),
                    }),
                    _ => Ok(Route::Direct),
                }
            }
            Command::Delete {
                target: DeleteTarget::Daemon(uni_id),
                ..
            }
            | Command::Reload { uni_id, .. } => {
                self.daemon.check_exists(uni_id).await?;
                Ok(Route::Worker {
                    known: json!({"uni_id": uni_id}),
                })
            }
            Command::Delete { .. } => Ok(Route::Direct),
        }
    }

    /// Applies `command`. `Ok(None)`: not here: a daemon create of a kind only
    /// other workers run (they compute its uni_id).
    pub async fn apply(&self, command: &Command) -> Result<Option<Value>, OpError> {
        let data = match command {
            Command::Create(create) => {
                create.options.check_for(create.kind.task_type())?;
                let home = self.home_of(&create.kind).await?;
                self.check_size(create)?;
                match create.kind.task_type() {
                    TaskType::Daemon if home == Home::Elsewhere => return Ok(None),
                    TaskType::Daemon => self.daemon.create(create).await?,
                    TaskType::Async => self.queue.create(create).await?,
                    TaskType::Periodic => self.periodic.create(create).await?,
                }
            }
            Command::Delete { target, .. } => match target {
                DeleteTarget::Daemon(uni_id) => self.daemon.delete(uni_id).await?,
                DeleteTarget::Async(task_id) => self.queue.delete(task_id).await?,
                DeleteTarget::Periodic(kind) => self.periodic.delete(kind).await?,
            },
            Command::Reload { uni_id, .. } => self.daemon.reload(uni_id).await?,
        };
        Ok(Some(data))
    }
}
