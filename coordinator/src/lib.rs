//! The coordinator: the `rekey` operator CLI and the library behind it.
//!
//! - [`cli`]: argument definitions and dispatch.
//! - [`keys_cmd`]: `rekey keys …`, over `rekey_common::keys::store`.
//! - [`output`]: text or `--json` output.
//! - [`plan`]: cutting tables into ID ranges.
//! - [`run_cmd`]: starting, pausing, resuming and inspecting runs.
//! - [`drive`]: publishing batches, leases, reports and progress until a run ends.

pub mod cli;
pub mod drive;
pub mod keys_cmd;
pub mod output;
pub mod plan;
pub mod run_cmd;
