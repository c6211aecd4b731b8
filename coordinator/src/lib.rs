//! The coordinator: the `rekey` operator CLI and the library behind it.
//!
//! - [`cli`]: argument definitions and dispatch.
//! - [`keys_cmd`]: `rekey keys …`, over `rekey_common::keys::store`.
//! - [`audit_cmd`]: `rekey audit verify`, over `rekey_common::audit::verify`.
//! - [`output`]: text or `--json` output.
//! - [`plan`]: cutting tables into ID ranges.
//! - [`run_cmd`]: starting, pausing, resuming and inspecting runs.
//! - [`gate`]: stage gates, coverage sweeps, observation, promotion.
//! - [`probe`]: the application-latency probe.
//! - [`report`]: evidence reports.
//! - [`drive`]: publishing batches, leases, reports and progress until a run ends.

pub mod audit_cmd;
pub mod cli;
pub mod demo;
pub mod drive;
pub mod gate;
pub mod keys_cmd;
pub mod output;
pub mod plan;
pub mod preflight;
pub mod probe;
pub mod report;
pub mod run_cmd;
