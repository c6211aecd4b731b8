//! The coordinator: the `rekey` operator CLI and the library behind it.
//!
//! - [`cli`]: argument definitions and dispatch.
//! - [`keys_cmd`]: `rekey keys …`, over `rekey_common::keys::store`.
//! - [`output`]: text or `--json` output.

pub mod cli;
pub mod keys_cmd;
pub mod output;
