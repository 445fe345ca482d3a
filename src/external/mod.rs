//! Task code outside this binary, in any language: kinds whose work is done
//! by a program bmw starts or by a NATS service bmw calls.
//!
//! - [`service`]: async and periodic kinds answered by a (queue-grouped)
//!   NATS service: one request per attempt.

pub mod service;
