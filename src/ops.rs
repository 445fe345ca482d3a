//! [`Operations`]: the one place a command is applied, for every task type
//! and every caller. The command consumer applies what arrives on
//! `bmw.task.*`; the bridge and `bmw task` (through `crate::client`) apply
//! async and periodic commands directly (a task is durable once stored) and
//! check daemon commands before handing them to a worker ([`Route`]).
//!
//! Each task type owns its operations ([`DaemonOps`], [`AsyncOps`],
//! [`PeriodicOps`]); this module checks what they share (the kind is known
//! here or to a live worker, the options apply to the type and are within the
//! operator's [`TaskLimits`]) and dispatches.
//! The stores behind them are opened once per process, here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::config::{Config, TaskLimits};
use crate::daemon::{DaemonOps, SpecStore};
use crate::membership::WorkerEntry;
use crate::nats::{Nats, NatsError, names};
use crate::periodic::{PeriodicOps, PeriodicStore};
use crate::queue::AsyncOps;
use crate::registry::Registry;
use crate::task::{
    Command, CreateCommand, DeleteTarget, Kind, OpError, Options, TaskType, ValidationError,
    check_fits,
};

/// The operations of one process over its stores. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Operations {
    client: async_nats::Client,
    registry: Arc<Registry>,
    daemon: DaemonOps,
    queue: AsyncOps,
    periodic: PeriodicOps,
    workers: kv::Store,
    limits: TaskLimits,
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

    /// Opens them with the limits of `config` (`--max-queue-pending`,
    /// `--max-task-delay`...).
    pub async fn open_with(
        nats: &Nats,
        registry: Arc<Registry>,
        config: &Config,
    ) -> Result<Operations, NatsError> {
        let js = &nats.js;
        let daemon = DaemonOps::new(
            SpecStore::open(js).await?,
            registry.operators().clone(),
            nats.client.clone(),
        );
        Ok(Operations {
            client: nats.client.clone(),
            daemon,
            queue: AsyncOps::open(nats, config.max_queue_pending).await?,
            periodic: PeriodicOps::new(PeriodicStore::open(js).await?),
            workers: js.get_key_value(names::BUCKET_WORKERS).await?,
            registry,
            limits: config.limits,
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

    /// Refuses a periodic create whose stored form would not fit in one NATS
    /// message: its schedule message carries the payload and options of every
    /// tick. (An async task is measured as it is built, in the enqueue; a
    /// daemon spec where it is built, in [`Operations::route`] and the daemon
    /// create.)
    fn check_periodic_size(&self, create: &CreateCommand) -> Result<(), OpError> {
        let body = crate::nats::to_json_bytes(&(&create.payload, &create.options));
        let size = body.len() + create.kind.as_str().len() + 256;
        check_fits("periodic task", size, self.client.max_payload())
    }

    /// Refuses options that do not apply to the task's type, and, for the
    /// types that use them (async, periodic), options over the limits.
    fn check_options(&self, create: &CreateCommand) -> Result<(), ValidationError> {
        let task_type = create.kind.task_type();
        create.options.check_for(task_type)?;
        if task_type != TaskType::Daemon {
            check_limits(&self.limits, &create.options, Utc::now())?;
        }
        Ok(())
    }

    /// How a producer gets `command` applied, refusing first what a worker
    /// would refuse (unknown kind, bad options, unknown uni_id, too large).
    pub async fn route(&self, command: &Command) -> Result<Route, OpError> {
        match command {
            // Applied here, where `apply` checks it.
            Command::Create(create) if create.kind.task_type() != TaskType::Daemon => {
                Ok(Route::Direct)
            }
            Command::Create(create) => {
                self.check_options(create)?;
                match self.home_of(&create.kind).await? {
                    Home::Here => {
                        let spec = self.daemon.spec_for(create)?;
                        self.daemon.check_size(&spec)?;
                        Ok(Route::Worker {
                            known: json!({"uni_id": spec.uni_id}),
                        })
                    }
                    // Built with more kinds than this binary: the worker computes
                    // the uni_id (and measures the spec).
                    Home::Elsewhere => Ok(Route::Worker {
                        known: json!({"uni_id": null}),
                    }),
                }
            }
            Command::Delete {
                target: DeleteTarget::Daemon(uni_id),
                ..
            } => {
                self.daemon.check_exists(uni_id).await?;
                Ok(Route::Worker {
                    known: json!({"uni_id": uni_id}),
                })
            }
            Command::Delete {
                target: DeleteTarget::All(TaskType::Daemon),
                ..
            } => Ok(Route::Worker {
                known: json!({"task_type": TaskType::Daemon}),
            }),
            Command::Reload {
                uni_id, payload, ..
            } => {
                self.daemon.check_reload(uni_id, payload.as_ref()).await?;
                Ok(Route::Worker {
                    known: json!({"uni_id": uni_id}),
                })
            }
            Command::Delete { .. } => Ok(Route::Direct),
        }
    }

    /// Creates many async tasks at once: each checked as [`Operations::apply`]
    /// checks it (where a kind runs is looked up once per kind, not per
    /// task), the valid ones stored with their publishes pipelined
    /// ([`AsyncOps::create_many`]); one result per create, in order.
    pub async fn create_async_many(
        &self,
        creates: &[&CreateCommand],
    ) -> Vec<Result<Value, OpError>> {
        // Where each kind runs is looked up once: known, or refused (the
        // refusal repeated for each item of that kind). An error reading the
        // live workers is not kept: the next item of the kind looks again.
        let mut homes: HashMap<&str, Result<(), ValidationError>> = HashMap::new();
        // `None`: valid, its result comes from the pipelined creates.
        let mut refused: Vec<Option<OpError>> = Vec::with_capacity(creates.len());
        let mut valid = Vec::with_capacity(creates.len());
        for create in creates {
            let kind = create.kind.as_str();
            let checked = match create.kind.task_type() {
                TaskType::Async => self.check_options(create).map_err(OpError::from),
                other => Err(ValidationError::new("kind", format!("{other} is not async")).into()),
            };
            let checked = match (checked, homes.get(kind)) {
                (Err(e), _) => Err(e),
                (Ok(()), Some(home)) => home.clone().map_err(OpError::from),
                (Ok(()), None) => match self.home_of(&create.kind).await {
                    Ok(_) => {
                        homes.insert(kind, Ok(()));
                        Ok(())
                    }
                    Err(OpError::Invalid(e)) => {
                        homes.insert(kind, Err(e.clone()));
                        Err(e.into())
                    }
                    Err(e) => Err(e),
                },
            };
            match checked {
                Ok(()) => {
                    valid.push(*create);
                    refused.push(None);
                }
                Err(e) => refused.push(Some(e)),
            }
        }
        let mut created = self.queue.create_many(&valid).await.into_iter();
        refused
            .into_iter()
            .map(|refusal| match refusal {
                Some(e) => Err(e),
                None => created.next().unwrap_or_else(|| {
                    Err(OpError::Nats(NatsError::new(std::io::Error::other(
                        "an async create of the batch went unanswered",
                    ))))
                }),
            })
            .collect()
    }

    /// Applies `command`. `Ok(None)`: not here: a daemon create of a kind only
    /// other workers run (they compute its uni_id).
    pub async fn apply(&self, command: &Command) -> Result<Option<Value>, OpError> {
        let data = match command {
            Command::Create(create) => {
                self.check_options(create)?;
                let home = self.home_of(&create.kind).await?;
                match create.kind.task_type() {
                    TaskType::Daemon if home == Home::Elsewhere => return Ok(None),
                    TaskType::Daemon => self.daemon.create(create).await?,
                    TaskType::Async => self.queue.create(create).await?,
                    TaskType::Periodic => {
                        self.check_periodic_size(create)?;
                        self.periodic.create(create).await?
                    }
                }
            }
            Command::Delete { target, .. } => match target {
                DeleteTarget::Daemon(uni_id) => self.daemon.delete(uni_id).await?,
                DeleteTarget::Async(task_id) => self.queue.delete(task_id).await?,
                DeleteTarget::Periodic(kind) => self.periodic.delete(kind).await?,
                DeleteTarget::All(task_type) => {
                    let deleted = match task_type {
                        TaskType::Daemon => self.daemon.delete_all().await?,
                        TaskType::Async => self.queue.delete_all().await?,
                        TaskType::Periodic => self.periodic.delete_all().await?,
                    };
                    tracing::info!(%task_type, deleted, "every task of a type deleted");
                    json!({"task_type": task_type, "deleted": deleted})
                }
            },
            Command::Reload {
                uni_id, payload, ..
            } => match self.daemon.reload(uni_id, payload.as_ref()).await? {
                Some(data) => data,
                None => return Ok(None),
            },
        };
        Ok(Some(data))
    }
}

/// Refuses an option over its bound in `limits`, naming the option and the
/// setting that bounds it. Times are measured from `now`.
pub fn check_limits(
    limits: &TaskLimits,
    options: &Options,
    now: DateTime<Utc>,
) -> Result<(), ValidationError> {
    let over = |field: &str, what: String, limit: Duration, setting: &str| {
        ValidationError::new(
            format!("options.{field}"),
            format!(
                "{what} is over the limit of {} (--{setting})",
                humantime::format_duration(limit)
            ),
        )
    };
    let durations = [
        (
            "process_in",
            options.process_in,
            limits.max_task_delay,
            "max-task-delay",
        ),
        (
            "timeout",
            options.timeout,
            limits.max_task_timeout,
            "max-task-timeout",
        ),
        (
            "retention",
            options.retention,
            limits.max_retention,
            "max-retention",
        ),
        (
            "unique_ttl",
            options.unique_ttl,
            limits.max_unique_ttl,
            "max-unique-ttl",
        ),
    ];
    for (field, value, limit, setting) in durations {
        if let Some(d) = value.filter(|d| *d > limit) {
            let what = humantime::format_duration(d).to_string();
            return Err(over(field, what, limit, setting));
        }
    }
    let times = [
        ("process_at", options.process_at.as_deref()),
        ("deadline", options.deadline.as_deref()),
    ];
    for (field, value) in times {
        let Some(text) = value else { continue };
        let at = DateTime::parse_from_rfc3339(text).map_err(|e| {
            ValidationError::new(
                format!("options.{field}"),
                format!("{text:?} is not an RFC 3339 time ({e})"),
            )
        })?;
        // In the past is fine here (and a past deadline is refused elsewhere);
        // the future is bounded.
        let ahead = (at.with_timezone(&Utc) - now).to_std().unwrap_or_default();
        if ahead > limits.max_task_delay {
            let what = format!(
                "{text} ({} from now)",
                humantime::format_duration(Duration::from_secs(ahead.as_secs()))
            );
            return Err(over(field, what, limits.max_task_delay, "max-task-delay"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::arbitrary;
    use proptest::prelude::*;

    fn limits() -> TaskLimits {
        TaskLimits {
            max_task_delay: Duration::from_secs(3600),
            max_task_timeout: Duration::from_secs(60),
            max_retention: Duration::from_secs(3600),
            max_unique_ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn options_over_their_limits_are_refused_naming_option_and_setting() {
        let now = Utc::now();
        let in_2h = (now + chrono::Duration::hours(2)).to_rfc3339();
        let cases = [
            (
                json!({"process_in": "2h"}),
                "options.process_in",
                "--max-task-delay",
            ),
            (
                json!({"process_at": in_2h}),
                "options.process_at",
                "--max-task-delay",
            ),
            (
                json!({"deadline": in_2h}),
                "options.deadline",
                "--max-task-delay",
            ),
            (
                json!({"timeout": "61s"}),
                "options.timeout",
                "--max-task-timeout",
            ),
            (
                json!({"retention": "2h"}),
                "options.retention",
                "--max-retention",
            ),
            (
                json!({"unique_ttl": "2h"}),
                "options.unique_ttl",
                "--max-unique-ttl",
            ),
        ];
        for (given, field, setting) in cases {
            let options = Options::from_json(Some(&given)).unwrap();
            let e = check_limits(&limits(), &options, now).unwrap_err();
            assert_eq!(e.field, field, "{given}");
            assert!(e.message.contains(setting), "{e}");
        }
        let within = json!({"process_in": "1h", "timeout": "1m", "retention": "1h",
                            "unique_ttl": "1h", "deadline": "2000-01-01T00:00:00Z"});
        let options = Options::from_json(Some(&within)).unwrap();
        assert_eq!(check_limits(&limits(), &options, now), Ok(()));
    }

    proptest! {
        #![proptest_config(arbitrary::config())]

        #[test]
        fn any_options_are_within_limits_or_refused_by_name(
            options in arbitrary::options_object(),
            seconds in prop::array::uniform4(1u64..=crate::task::options::MAX_DURATION.as_secs()),
        ) {
            let Ok(options) = Options::from_json(Some(&options)) else {
                return Ok(());
            };
            let limits = TaskLimits {
                max_task_delay: Duration::from_secs(seconds[0]),
                max_task_timeout: Duration::from_secs(seconds[1]),
                max_retention: Duration::from_secs(seconds[2]),
                max_unique_ttl: Duration::from_secs(seconds[3]),
            };
            match check_limits(&limits, &options, Utc::now()) {
                Ok(()) => {
                    prop_assert!(options.timeout.is_none_or(|t| t <= limits.max_task_timeout));
                    prop_assert!(options.retention.is_none_or(|t| t <= limits.max_retention));
                }
                Err(e) => prop_assert!(e.field.starts_with("options.") && e.message.contains("--max-"), "{}", e),
            }
        }
    }
}
