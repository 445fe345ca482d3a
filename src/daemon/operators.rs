//! [`Operators`]: the daemon kinds this binary can run, each with the
//! factory that builds its [`Operator`] once per process, on first use.
//! Cheap to clone: every clone shares the factories and built operators.

use std::collections::BTreeMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use super::operator::{Operator, OperatorError};
use crate::task::Kind;

/// Builds the operator of a daemon kind.
pub type OperatorFactory = Box<dyn Fn() -> Result<Arc<dyn Operator>, OperatorError> + Send + Sync>;

struct Entry {
    factory: OperatorFactory,
    /// Built on first use, then shared by every instance of the kind.
    operator: OnceLock<Result<Arc<dyn Operator>, OperatorError>>,
}

/// Daemon kinds and their operators.
#[derive(Clone, Default)]
pub struct Operators {
    map: BTreeMap<Kind, Arc<Entry>>,
}

impl fmt::Debug for Operators {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.map.keys()).finish()
    }
}

impl Operators {
    /// Adds a kind with its factory; `false` (and no change) if it has one.
    pub fn insert(&mut self, kind: Kind, factory: OperatorFactory) -> bool {
        if self.map.contains_key(&kind) {
            return false;
        }
        let entry = Entry {
            factory,
            operator: OnceLock::new(),
        };
        self.map.insert(kind, Arc::new(entry));
        true
    }

    /// The operator of a kind, built on first call. `None` if the kind is not
    /// registered; `Some(Err)` if its factory failed or panicked (a panic is
    /// user code failing, kept like an error: the factory is not called again).
    pub fn get(&self, kind: &Kind) -> Option<Result<Arc<dyn Operator>, OperatorError>> {
        let entry = self.map.get(kind)?;
        let built = entry.operator.get_or_init(|| {
            std::panic::catch_unwind(AssertUnwindSafe(|| (entry.factory)())).unwrap_or_else(
                |panic| {
                    Err(OperatorError::new(format!(
                        "operator factory panicked: {}",
                        panic_text(panic.as_ref())
                    )))
                },
            )
        });
        Some(built.clone())
    }

    /// Whether `kind` is registered.
    pub fn contains(&self, kind: &Kind) -> bool {
        self.map.contains_key(kind)
    }

    /// Whether this process can run `kind`: registered, and its operator
    /// built or not tried yet (not failed).
    pub fn can_run(&self, kind: &Kind) -> bool {
        self.map
            .get(kind)
            .is_some_and(|entry| entry.operator.get().is_none_or(Result::is_ok))
    }

    /// The kinds, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &Kind> {
        self.map.keys()
    }
}

/// A panic's message, if it carried one.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("unknown panic")
}
