//! rekey-common's integration tests: one binary, a fresh database per test.

mod format_md;
mod key_store;
mod ledger;
