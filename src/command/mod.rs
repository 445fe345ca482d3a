//! Commands on `bmw.task.*`: their wire form ([`wire`]), how a worker
//! applies and settles one ([`CommandHandler`], [`handler`]) and the shared
//! durable consumer that feeds them to every worker in lanes
//! ([`CommandConsumer`], [`consumer`]).
//!
//! Anyone may publish a command; the bridge and `bmw task` use
//! `crate::client::TaskClient`. A command that cannot be parsed or names an
//! unknown kind is a poison message: terminated, logged, published as an
//! `error` event and answered; it never stops the consumer. A command that
//! fails for a NATS reason is redelivered. The outcome goes to the
//! `Bmw-Reply` subject once its effects are durable.

pub mod consumer;
pub mod handler;
pub mod wire;

pub use consumer::{CommandConsumer, LANES};
pub use handler::CommandHandler;
