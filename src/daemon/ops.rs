//! [`DaemonOps`]: the operations on daemon tasks, written once for every
//! caller (the command consumer applies them; the bridge and `bmw task`
//! check them first): create (or replace), delete, reload (with a payload to
//! merge, or not). A daemon spec is built in one place,
//! [`DaemonOps::spec_for`].

use serde_json::{Map, Value, json};

use super::operators::Operators;
use super::spec::{CreateOutcome, DaemonSpec, SpecError, SpecStore};
use crate::task::{CreateCommand, OpError, Origin, UniId, ValidationError, check_fits};

impl From<SpecError> for OpError {
    fn from(e: SpecError) -> Self {
        match e {
            SpecError::NotFound(uni_id) => {
                OpError::NotFound(format!("daemon task `{uni_id}` does not exist"))
            }
            SpecError::Nats(e) => OpError::Nats(e),
            SpecError::Json(e) => OpError::Nats(crate::nats::NatsError::new(e)),
        }
    }
}

/// Creates, deletes and reloads daemon tasks.
#[derive(Debug, Clone)]
pub struct DaemonOps {
    specs: SpecStore,
    operators: Operators,
    /// Tells the server's max payload.
    client: async_nats::Client,
}

impl DaemonOps {
    /// Operations over `specs`; `operators` give each kind's dimension,
    /// `client` the server's max payload.
    pub fn new(specs: SpecStore, operators: Operators, client: async_nats::Client) -> Self {
        DaemonOps {
            specs,
            operators,
            client,
        }
    }

    /// The spec store (the worker's runtime watches it).
    pub fn specs(&self) -> &SpecStore {
        &self.specs
    }

    /// The spec a create asks for: its uni_id comes from the operator's
    /// dimension, or from the canonical payload.
    pub fn spec_for(&self, create: &CreateCommand) -> Result<DaemonSpec, ValidationError> {
        let operator = match self.operators.get(&create.kind) {
            Some(Ok(op)) => op,
            Some(Err(e)) => {
                return Err(ValidationError::new(
                    "kind",
                    format!("{} cannot be built: {e}", create.kind),
                ));
            }
            None => {
                return Err(ValidationError::new(
                    "kind",
                    format!("{} is not registered", create.kind),
                ));
            }
        };
        let dimension = operator.task_dimension(&create.payload);
        let uni_id = UniId::new(&create.kind, &dimension, &create.payload);
        Ok(DaemonSpec {
            dimension: if dimension.is_empty() {
                uni_id.to_string()
            } else {
                dimension
            },
            uni_id,
            kind: create.kind.clone(),
            payload: create.payload.clone(),
            options: create.options.clone(),
            created_at: chrono::Utc::now().to_rfc3339(),
            generation: 0,
        })
    }

    /// Creates a task, or replaces its payload and options (its instance
    /// restarts); an identical create changes nothing.
    pub async fn create(&self, create: &CreateCommand) -> Result<Value, OpError> {
        let spec = self.spec_for(create)?;
        self.check_size(&spec)?;
        let outcome = self.specs.create(spec.clone()).await?;
        tracing::info!(uni_id = %spec.uni_id, ?outcome, "daemon task created");
        Ok(json!({
            "uni_id": spec.uni_id,
            "kind": spec.kind,
            "payload": spec.payload,
            "options": spec.options,
            "created": outcome == CreateOutcome::Created,
            "replaced": outcome == CreateOutcome::Replaced,
        }))
    }

    /// Deletes a task: its holder stops it and drops the claim.
    pub async fn delete(&self, uni_id: &UniId) -> Result<Value, OpError> {
        let spec = self.specs.delete(uni_id).await?;
        tracing::info!(uni_id = %uni_id, "daemon task deleted");
        Ok(json!({"uni_id": spec.uni_id}))
    }

    /// Deletes every daemon task (their holders stop them); how many were
    /// deleted (one deleted meanwhile by another caller is not counted).
    pub async fn delete_all(&self) -> Result<usize, OpError> {
        let mut deleted = 0;
        for spec in self.specs.list().await? {
            match self.specs.delete(&spec.uni_id).await {
                Ok(_) => deleted += 1,
                Err(SpecError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(deleted)
    }

    /// Restarts a task: its holder runs it again with reload_count + 1, with
    /// `keys` (if any) merged into its payload: each top-level key replaces
    /// the stored one, and a merge that changes the uni_id is refused.
    /// `Ok(None)`: a merge needs the kind's operator, which only other
    /// workers have.
    pub async fn reload(
        &self,
        uni_id: &UniId,
        keys: Option<&Map<String, Value>>,
    ) -> Result<Option<Value>, OpError> {
        if let Some(keys) = keys {
            let Some(spec) = self.specs.get(uni_id).await? else {
                return Err(SpecError::NotFound(uni_id.to_string()).into());
            };
            if !self.operators.contains(&spec.kind) {
                return Ok(None);
            }
            let spec = self
                .specs
                .update(uni_id, |spec| {
                    self.merge(spec, keys)?;
                    spec.generation += 1;
                    Ok::<_, OpError>(())
                })
                .await?;
            tracing::info!(uni_id = %uni_id, generation = spec.generation, keys = ?keys.keys().collect::<Vec<_>>(), "daemon task reload with a new payload requested");
            return Ok(Some(
                json!({"uni_id": spec.uni_id, "generation": spec.generation, "payload": spec.payload}),
            ));
        }
        let spec = self.specs.reload(uni_id).await?;
        tracing::info!(uni_id = %uni_id, generation = spec.generation, "daemon task reload requested");
        Ok(Some(
            json!({"uni_id": spec.uni_id, "generation": spec.generation}),
        ))
    }

    /// Merges `keys` into `spec`'s payload as BMW does (each top-level key
    /// replaces the stored one), refusing a stored payload that is not an
    /// object, a merged payload that would give the task another uni_id (its
    /// dimension changed: that is another task), or one too large to store.
    fn merge(&self, spec: &mut DaemonSpec, keys: &Map<String, Value>) -> Result<(), OpError> {
        let mut merged = match &spec.payload {
            Value::Object(stored) => stored.clone(),
            Value::Null => Map::new(),
            other => {
                return Err(ValidationError::new(
                    "payload",
                    format!("the stored payload is {other}, not an object: keys cannot be merged into it"),
                )
                .into());
            }
        };
        merged.extend(keys.iter().map(|(k, v)| (k.clone(), v.clone())));
        let create = CreateCommand {
            id: String::new(),
            kind: spec.kind.clone(),
            payload: Value::Object(merged),
            options: spec.options.clone(),
            origin: Origin::Direct,
        };
        let merged = self.spec_for(&create)?;
        if merged.uni_id != spec.uni_id {
            return Err(ValidationError::new(
                "payload",
                format!(
                    "the merged payload would change the task's uni_id (its dimension) from `{}` to `{}`: create that task instead",
                    spec.uni_id, merged.uni_id
                ),
            )
            .into());
        }
        spec.payload = merged.payload;
        self.check_size(spec)
    }

    /// Refuses a reload a worker would refuse: an unknown uni_id (404) or,
    /// when this process has the kind's operator, a payload that cannot be
    /// merged (400).
    pub async fn check_reload(
        &self,
        uni_id: &UniId,
        keys: Option<&Map<String, Value>>,
    ) -> Result<(), OpError> {
        let Some(mut spec) = self.specs.get(uni_id).await? else {
            return Err(SpecError::NotFound(uni_id.to_string()).into());
        };
        match keys {
            Some(keys) if self.operators.contains(&spec.kind) => self.merge(&mut spec, keys),
            _ => Ok(()),
        }
    }

    /// Refuses a spec that would not fit in one NATS message: it holds its
    /// uni_id, which may be the payload in hex (a 400 KB payload makes a
    /// 1.2 MB spec).
    pub fn check_size(&self, spec: &DaemonSpec) -> Result<(), OpError> {
        let size = crate::nats::to_json_bytes(spec).len();
        check_fits("daemon task", size, self.client.max_payload())
    }

    /// Refuses a uni_id that names no task (404).
    pub async fn check_exists(&self, uni_id: &UniId) -> Result<(), OpError> {
        match self.specs.get(uni_id).await? {
            Some(_) => Ok(()),
            None => Err(SpecError::NotFound(uni_id.to_string()).into()),
        }
    }
}
