//! [`Registry`]: which kinds this binary can run, mapped to their
//! implementations. Workers run them; the bridge and the command handler use it
//! to refuse unregistered kinds before anything is stored.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use crate::daemon::{Operator, OperatorError};
use crate::periodic::PeriodicDeclaration;
use crate::queue::Handler;
use crate::task::{Kind, TaskType, ValidationError};

type OperatorFactory = Box<dyn Fn() -> Result<Arc<dyn Operator>, OperatorError> + Send + Sync>;

struct DaemonEntry {
    factory: OperatorFactory,
    /// Built on first use, then shared by every instance of the kind.
    operator: OnceLock<Result<Arc<dyn Operator>, OperatorError>>,
}

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
#[derive(Default)]
pub struct Registry {
    daemon: BTreeMap<Kind, DaemonEntry>,
    handlers: BTreeMap<Kind, Arc<dyn Handler>>,
    declared: Vec<(Kind, PeriodicDeclaration)>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("daemon", &self.daemon.keys().collect::<Vec<_>>())
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// A registry with bmw's built-in kinds (`daemon:demo:demo`...).
    pub fn with_builtins() -> Self {
        let mut registry = Registry::new();
        crate::builtin::register(&mut registry).expect("built-in kinds are valid and distinct");
        registry
    }

    /// Registers a daemon kind with the factory that builds its operator (once
    /// per worker, on first use).
    pub fn register_daemon<F>(&mut self, kind: &str, factory: F) -> Result<&mut Self, RegistryError>
    where
        F: Fn() -> Result<Arc<dyn Operator>, OperatorError> + Send + Sync + 'static,
    {
        let kind = Kind::parse(kind)?;
        if kind.task_type() != TaskType::Daemon {
            return Err(RegistryError::WrongType {
                kind: kind.to_string(),
                expected: TaskType::Daemon,
            });
        }
        if self.daemon.contains_key(&kind) {
            return Err(RegistryError::Duplicate(kind.to_string()));
        }
        self.daemon.insert(
            kind,
            DaemonEntry {
                factory: Box::new(factory),
                operator: OnceLock::new(),
            },
        );
        Ok(self)
    }

    /// Registers the handler of an async (or periodic) kind.
    pub fn register_async(
        &mut self,
        kind: &str,
        handler: impl Handler,
    ) -> Result<&mut Self, RegistryError> {
        let kind = Kind::parse(kind)?;
        if kind.task_type() == TaskType::Daemon {
            return Err(RegistryError::WrongType {
                kind: kind.to_string(),
                expected: TaskType::Async,
            });
        }
        if self.handlers.contains_key(&kind) {
            return Err(RegistryError::Duplicate(kind.to_string()));
        }
        self.handlers.insert(kind, Arc::new(handler));
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
        let parsed = Kind::parse(kind)?;
        if parsed.task_type() != TaskType::Periodic {
            return Err(RegistryError::WrongType {
                kind: kind.to_owned(),
                expected: TaskType::Periodic,
            });
        }
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

    /// The handler of an async or periodic kind.
    pub fn handler(&self, kind: &Kind) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind).cloned()
    }

    /// The operator of a daemon kind, built on first call. `None` if the kind is
    /// not registered; `Some(Err)` if its factory failed.
    pub fn operator(&self, kind: &Kind) -> Option<Result<Arc<dyn Operator>, OperatorError>> {
        let entry = self.daemon.get(kind)?;
        Some(entry.operator.get_or_init(|| (entry.factory)()).clone())
    }

    /// Whether `kind` can run here.
    pub fn is_registered(&self, kind: &Kind) -> bool {
        match kind.task_type() {
            TaskType::Daemon => self.daemon.contains_key(kind),
            TaskType::Async | TaskType::Periodic => self.handlers.contains_key(kind),
        }
    }

    /// Refuses a kind this binary cannot run, naming it.
    pub fn check(&self, kind: &Kind) -> Result<(), ValidationError> {
        if self.is_registered(kind) {
            Ok(())
        } else {
            Err(ValidationError::new(
                "kind",
                format!(
                    "{kind} is not registered (known kinds: {})",
                    self.kinds().join(", ")
                ),
            ))
        }
    }

    /// All registered kinds.
    pub fn kinds(&self) -> Vec<String> {
        self.daemon
            .keys()
            .chain(self.handlers.keys())
            .map(Kind::to_string)
            .collect()
    }
}
