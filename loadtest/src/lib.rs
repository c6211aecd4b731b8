//! rekey-loadtest: seeds the demo schema with encrypted records, verifies every value
//! against the digest of its plaintext, and simulates application writes.
//!
//! - [`seed`]: deterministic records of realistic sizes, written with binary COPY, with
//!   optional planted corrupt values.
//! - [`verify`]: every value decrypts to its recorded digest; counts by key and outcome.
//! - [`traffic`]: application writes that encrypt with the active key.

pub mod bench;
pub mod seed;
pub mod traffic;
pub mod verify;
