//! [`PeriodicOps`]: the operations on periodic tasks, written once for every
//! caller (bridge, `bmw task`, the command consumer): create (or replace),
//! delete, pause, resume and list.

use serde_json::{Value, json};

use super::schedule::{Schedule, parse_timezone};
use super::store::{PeriodicError, PeriodicSpec, PeriodicStore};
use crate::task::{CreateCommand, Kind, OpError, TaskType, ValidationError};

impl From<PeriodicError> for OpError {
    fn from(e: PeriodicError) -> Self {
        match e {
            PeriodicError::NotFound(kind) => {
                OpError::NotFound(format!("periodic task `{kind}` does not exist"))
            }
            refused @ PeriodicError::Refused(_) => {
                OpError::Invalid(ValidationError::new("options", refused.to_string()))
            }
            PeriodicError::Nats(e) => OpError::Nats(e),
        }
    }
}

/// Builds the spec of a run-time create (`options.cron` or `options.every`,
/// `timezone`, and async options for each tick), refusing bad input.
pub fn spec_from_create(create: &CreateCommand) -> Result<PeriodicSpec, ValidationError> {
    create.options.check_for(TaskType::Periodic)?;
    let mut options = create.options.clone();
    let schedule = Schedule::from_options(options.cron.as_deref(), options.every)?;
    let timezone = options.timezone.take();
    parse_timezone(timezone.as_deref())?;
    options.cron = None;
    options.every = None;
    Ok(PeriodicSpec {
        kind: create.kind.clone(),
        schedule,
        timezone,
        payload: create.payload.clone(),
        options,
        paused: false,
        declared: false,
        created_at: chrono::Utc::now().to_rfc3339(),
    })
}

/// What a create, pause or resume answers: the schedule and its next run.
pub fn periodic_data(spec: &PeriodicSpec) -> Value {
    let tz = parse_timezone(spec.timezone.as_deref()).unwrap_or(chrono_tz::UTC);
    let next = (!spec.paused)
        .then(|| spec.schedule.next_after(chrono::Utc::now(), tz))
        .flatten();
    json!({"kind": spec.kind, "schedule": spec.schedule.text(), "timezone": spec.timezone,
           "queue": spec.options.queue(), "paused": spec.paused, "next_run_at": next.map(|t| t.to_rfc3339())})
}

/// A kind named by a delete, pause or resume: checked before it becomes a
/// key or a subject filter.
fn periodic_kind(kind: &str) -> Result<Kind, ValidationError> {
    let kind = Kind::parse(kind)?;
    if kind.task_type() != TaskType::Periodic {
        return Err(ValidationError::new(
            "kind",
            format!("{kind} is not a periodic kind"),
        ));
    }
    Ok(kind)
}

/// Creates, deletes, pauses, resumes and lists periodic tasks.
#[derive(Debug, Clone)]
pub struct PeriodicOps {
    store: PeriodicStore,
}

impl PeriodicOps {
    /// Operations over `store`.
    pub fn new(store: PeriodicStore) -> Self {
        PeriodicOps { store }
    }

    /// The store (the worker reconciles declarations and records ticks in it).
    pub fn store(&self) -> &PeriodicStore {
        &self.store
    }

    /// Creates or replaces the schedule of a kind.
    pub async fn create(&self, create: &CreateCommand) -> Result<Value, OpError> {
        let spec = spec_from_create(create)?;
        self.store.apply(&spec).await?;
        Ok(periodic_data(&spec))
    }

    /// Deletes a periodic task: no more ticks.
    pub async fn delete(&self, kind: &str) -> Result<Value, OpError> {
        let kind = periodic_kind(kind)?;
        let spec = self.store.delete(kind.as_str()).await?;
        Ok(json!({"kind": spec.kind}))
    }

    /// Deletes every periodic task; how many were deleted.
    pub async fn delete_all(&self) -> Result<usize, OpError> {
        let mut deleted = 0;
        for row in self.store.list().await? {
            let Some(kind) = row["kind"].as_str() else {
                continue;
            };
            match self.store.delete(kind).await {
                Ok(_) => deleted += 1,
                Err(PeriodicError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(deleted)
    }

    /// Pauses (`true`) or resumes (`false`) a periodic task.
    pub async fn set_paused(&self, kind: &str, paused: bool) -> Result<Value, OpError> {
        let kind = periodic_kind(kind)?;
        let spec = self.store.set_paused(kind.as_str(), paused).await?;
        Ok(periodic_data(&spec))
    }

    /// Every periodic task with its schedule, next run, last run and outcome.
    pub async fn list(&self) -> Result<Vec<Value>, OpError> {
        Ok(self.store.list().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{Options, arbitrary};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(arbitrary::config())]

        #[test]
        fn periodic_creates_build_a_spec_or_are_refused_by_name((kind, payload, options) in arbitrary::create_parts()) {
            let (Ok(kind), Ok(options)) = (Kind::parse(&kind), Options::from_json(Some(&options))) else {
                return Ok(());
            };
            let create = CreateCommand { id: "c".into(), kind, payload, options, origin: Default::default() };
            match spec_from_create(&create) {
                Ok(spec) => {
                    let data = periodic_data(&spec);
                    prop_assert_eq!(&data["kind"], &serde_json::json!(spec.kind));
                }
                Err(e) => prop_assert!(e.field.starts_with("options."), "{}", e),
            }
        }

        #[test]
        fn kinds_to_delete_or_pause_are_periodic_kinds_or_refused(kind in arbitrary::kind_text()) {
            match periodic_kind(&kind) {
                Ok(k) => prop_assert_eq!(k.task_type(), TaskType::Periodic),
                Err(e) => prop_assert_eq!(e.field, "kind"),
            }
        }
    }
}
