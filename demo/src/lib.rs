//! rekey-demo: the demo application's data, shared by `rekey demo` (the operator binary)
//! and `rekey-loadtest`, so that the operator binary links no load-test tooling.
//!
//! - [`seed`]: deterministic records of realistic sizes in the demo schema, written with
//!   binary COPY, with a SHA-256 of every plaintext and optional planted corrupt values.
//! - [`verify`]: every value decrypts to its recorded digest; counts by key and outcome.

pub mod seed;
pub mod verify;
