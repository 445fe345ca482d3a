//! Daemon tasks: endless loops, each instance held by exactly one worker.
//!
//! Flow: a create command stores a [`DaemonSpec`] ([`spec`]); every worker's
//! [`DaemonRuntime`] ([`runtime`]) sees it, and one wins its claim
//! ([`claim`], per-key TTL, compare-and-set); the winner's `Maintainer`
//! (`maintainer`) runs the [`Operator`] ([`operator`]) and retries it with the
//! [`RetryPolicy`] ([`retry`]); the `balancer` spreads tasks over workers.
//! [`DaemonOps`] ([`ops`]) is what callers use to create, delete and reload;
//! [`Operators`] ([`operators`]) are the kinds this binary can run.

pub(crate) mod balancer;
pub mod claim;
pub(crate) mod maintainer;
pub mod operator;
pub mod operators;
pub mod ops;
pub mod retry;
pub mod runtime;
mod seed_log;
pub mod spec;
mod watch;

pub use claim::{Claim, ClaimError, ClaimStore};
pub use operator::{Operator, OperatorContext, OperatorError};
pub use operators::{OperatorFactory, Operators};
pub use ops::DaemonOps;
pub use retry::RetryPolicy;
pub use runtime::DaemonRuntime;
pub use spec::{CreateOutcome, DaemonSpec, SpecError, SpecStore};
