//! # bmw
//!
//! The BlueKing monitor worker (BMW) re-created on NATS JetStream: one service
//! that runs daemon tasks (endless loops, each held by exactly one worker),
//! async tasks (one-shot jobs on work-queue streams) and periodic tasks (cron or
//! interval schedules that nats-server itself fires). Commands are messages on
//! `bmw.task.*`; an HTTP bridge turns BMW's REST API into those messages.
//! Scaling out is starting one more worker.
//!
//! ## Layout, in the order a command flows
//!
//! ```text
//!  HTTP (bridge) ─┐            ┌─ async, periodic ─► ops (applied at once)
//!  bmw task ──────┴─► client ─┤
//!                             └─ daemon ─► bmw.task.* ─► command ─► ops ─► bmw_daemon_tasks
//!  any producer ─────────────────────────► (BMW_TASKS, one shared durable consumer)
//!
//!  every worker: daemon::runtime watches specs, claims, workers
//!     └─► claim (bmw_daemon_claims, per-key TTL, CAS) ─► maintainer ─► Operator
//!            └─ expiry = Purge event ─► another worker claims it
//!  maintainers ─► events (BMW_EVENTS) and metrics (/metrics)
//!
//!  async create ─► bmw.async.<queue>.<id> (BMW_ASYNC, work queue, no rollups)
//!     ─► one shared consumer per queue ─► queue::runtime ─► Handler
//!  @at start, retry, periodic ─► Nats-Schedule on bmw.schedule.> (BMW_SCHEDULES,
//!     only bmw writes) ─► the server fires bmw.fired.<queue>.<id> ─► a second
//!     shared consumer per queue ─► the same loop
//! ```
//!
//! ## Layering
//!
//! Modules depend downward only, in this order (lowest first):
//! [`shutdown`] (signals, children that die with bmw) → [`nats`] (names,
//! connection, typed errors), [`metrics`], [`logging`], [`traces`] →
//! [`task`], [`config`], [`events`] → [`membership`] → [`daemon`], [`queue`]
//! → [`periodic`] → [`registry`] → [`external`] → [`ops`] → [`command`], [`builtin`] →
//! [`client`] → [`bridge`], [`worker`] → [`service`] → [`cli`] → the binary.
//! `tests/layering.rs` checks it from the sources.
//!
//! - [`nats`]: connection, every NATS name, provisioning, a local
//!   nats-server, [`nats::NatsError`].
//! - [`task`]: kinds, payload canonical form, uni_ids, options and which type
//!   each applies to, commands as typed values, and [`task::Outcome`] /
//!   [`task::OpError`], what every operation answers.
//! - [`daemon`]: operators, specs, claims, maintainers, balancing, and
//!   [`daemon::DaemonOps`] (create, delete, reload).
//! - [`queue`]: async tasks: enqueue, the weighted and paced fetch loop, one
//!   attempt, batched acks and events, retries, dead letters, records,
//!   inspection, and [`queue::AsyncOps`].
//! - [`periodic`]: schedules fired by nats-server, declared or created at
//!   run time, and [`periodic::PeriodicOps`].
//! - [`registry`]: which kinds this binary can run; [`builtin`]: the demo kinds.
//! - [`external`]: kinds declared in configuration, run as child processes
//!   (or NATS services) rather than compiled in.
//! - [`ops`]: the one place commands are applied, for every caller.
//! - [`command`]: the wire form of `bmw.task.*`, the handler that applies and
//!   settles one message, and the shared durable consumer.
//! - [`client`]: what the bridge and `bmw task` submit and read through.
//! - [`membership`]: the live-worker entries.
//! - [`worker`], [`service`]: the process roles, and the one way each opens
//!   NATS ([`service::open`]); [`cli`]: `bmw task`, the command-line client.
//! - [`bridge`]: HTTP routes, the BMW envelope, and the guards: bearer tokens,
//!   the cross-site rule, request limits, TLS.
//! - [`events`], [`metrics`], [`logging`]: what operators observe;
//!   [`traces`]: OpenTelemetry spans and the `traceparent` NATS headers carry.
//! - [`config`], [`shutdown`]: settings; signals, and children that die with bmw.

pub mod bridge;
pub mod builtin;
pub mod cli;
pub mod client;
pub mod command;
pub mod config;
pub mod daemon;
pub mod events;
pub mod external;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod nats;
pub mod ops;
pub mod periodic;
pub mod queue;
pub mod registry;
pub mod service;
pub mod shutdown;
pub mod task;
pub mod traces;
pub mod worker;

pub use config::Config;
pub use registry::Registry;
