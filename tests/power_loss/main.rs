//! Power loss (issue 27, part 3), as Jepsen tests it with LazyFS: nats-server's
//! store on a filesystem that keeps written data in memory until it is
//! fsynced ([`lazyfs`]), a load of creates on every producer path, then at a
//! random moment the power goes: everything not fsynced is dropped and every
//! process `kill -9`'d. Everything starts again on what is left and every
//! acknowledged create is looked for ([`scenario`]).
//!
//! Needs FUSE (`/dev/fuse`; `scripts/fuse-env` installs Debian's `fuse3`).
//! `cargo test` runs the durable single-node case; the rest, which prints
//! the table `docs/operations.md` shows ("The power-loss test"), with
//! `cargo test --test power_loss -- --ignored --test-threads 1 --nocapture`.

#[macro_use]
#[path = "../harness/mod.rs"]
mod harness;

mod lazyfs;
mod scenario;
mod tests;
