//! The `rekey` binary end to end, against a fresh database per test.

mod demo_cli;
mod helpers;
mod keys_cli;
mod plan;
mod probe;
