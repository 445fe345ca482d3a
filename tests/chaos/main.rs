//! The chaos suite (issue 11): real nats-servers (one node, or a 3-node
//! cluster) and real `bmw` processes under a mixed load while faults are
//! injected, then every task accounted for: async tasks lost and run twice,
//! daemon tasks running on two workers at once, creates answered 2xx and
//! applied, periodic ticks due and run.
//!
//! The quick subset runs with `cargo test`; the whole suite, which prints
//! the table `docs/operations.md` shows ("The chaos suite"), with
//! `cargo test --test chaos -- --ignored --test-threads 1 --nocapture`.

#[macro_use]
#[path = "../harness/mod.rs"]
mod harness;

mod accounting;
mod faults;
mod load;
mod report;
mod scenarios;
mod world;
