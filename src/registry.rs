//! [`Registry`]: which kinds this binary can run, mapped to their
//! implementations: daemon [`Operators`], async and periodic [`Handlers`], and
//! the periodic tasks declared in code. Workers hand each runtime its part;
//! the operations use it to refuse unregistered kinds before anything is
//! stored. bmw's own demo kinds are added by `crate::builtin`, through the
//! same calls users make.

use std::sync::Arc;

use crate::daemon::{Operator, OperatorError, Operators};
use crate::periodic::PeriodicDeclaration;
use crate::queue::{Handler, Handlers};
use crate::task::{Kind, TaskType, ValidationError};

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The kind is not valid.
    #[error(transparent)]
    BadKind(#[from] ValidationError),
    /// The kind's type does not match the registration (e.g. `async:` as a daemon).
    #[error("kind `{kind}` is not a {expected} kind")]
    WrongType {
        /// The kind.
        kind: String,
        /// The type it should have.
        expected: TaskType,
    },
    /// The kind is registered already.
    #[error("kind `{0}` is registered twice")]
    Duplicate(String),
}

/// The kinds this binary knows. Build it once at start, then share it (`Arc`).
#[derive(Debug, Default)]
pub struct Registry {
    operators: Operators,
    handlers: Handlers,
    declared: Vec<(Kind, PeriodicDeclaration)>,
}

/// Parses `kind` and checks its type against the registration.
fn kind_of(
    kind: &str,
    wanted: impl Fn(TaskType) -> bool,
    expected: TaskType,
) -> Result<Kind, RegistryError> {
    let kind = Kind::parse(kind)?;
    if !wanted(kind.task_type()) {
        return Err(RegistryError::WrongType {
            kind: kind.to_string(),
            expected,
        });
    }
    Ok(kind)
}

impl Registry {
    /// An empty registry (`crate::builtin::registry()` has the demo kinds).
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers a daemon kind with the factory that builds its operator (once
    /// per worker, on first use).
    pub fn register_daemon<F>(&mut self, kind: &str, factory: F) -> Result<&mut Self, RegistryError>
    where
        F: Fn() -> Result<Arc<dyn Operator>, OperatorError> + Send + Sync + 'static,
    {
        let kind = kind_of(kind, |t| t == TaskType::Daemon, TaskType::Daemon)?;
        if !self.operators.insert(kind.clone(), Box::new(factory)) {
            return Err(RegistryError::Duplicate(kind.to_string()));
        }
        Ok(self)
    }

    /// Registers the handler of an async (or periodic) kind.
    pub fn register_async(
        &mut self,
        kind: &str,
        handler: impl Handler,
    ) -> Result<&mut Self, RegistryError> {
        let kind = kind_of(kind, |t| t != TaskType::Daemon, TaskType::Async)?;
        if !self.handlers.insert(kind.clone(), Arc::new(handler)) {
            return Err(RegistryError::Duplicate(kind.to_string()));
        }
        Ok(self)
    }

    /// Registers a periodic kind: its handler (run on every tick) and, when
    /// `declared` is given, a schedule that every worker writes at start.
    pub fn register_periodic(
        &mut self,
        kind: &str,
        declared: Option<PeriodicDeclaration>,
        handler: impl Handler,
    ) -> Result<&mut Self, RegistryError> {
        let parsed = kind_of(kind, |t| t == TaskType::Periodic, TaskType::Periodic)?;
        self.register_async(kind, handler)?;
        if let Some(d) = declared {
            self.declared.push((parsed, d));
        }
        Ok(self)
    }

    /// The periodic tasks declared in code.
    pub fn declared_periodic(&self) -> &[(Kind, PeriodicDeclaration)] {
        &self.declared
    }

    /// The daemon kinds and their operators.
    pub fn operators(&self) -> &Operators {
        &self.operators
    }

    /// The async and periodic kinds and their handlers.
    pub fn handlers(&self) -> &Handlers {
        &self.handlers
    }

    /// Whether `kind` can run here.
    pub fn is_registered(&self, kind: &Kind) -> bool {
        match kind.task_type() {
            TaskType::Daemon => self.operators.contains(kind),
            TaskType::Async | TaskType::Periodic => self.handlers.contains(kind),
        }
    }

    /// All registered kinds.
    pub fn kinds(&self) -> Vec<String> {
        self.operators
            .kinds()
            .chain(self.handlers.kinds())
            .map(Kind::to_string)
            .collect()
    }
}
