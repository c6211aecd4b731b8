//! rekey-loadtest: seeds the demo schema with encrypted records, verifies every value
//! against the digest of its plaintext, and simulates application writes.
//!
//! - [`seed`], [`verify`]: the demo data and its verification, from the `rekey-demo` crate
//!   (which `rekey demo` uses too).
//! - [`traffic`]: application traffic: reads that decrypt, writes that encrypt.
//! - [`bench`]: the throughput benchmark, (a) ceiling, (b) bare, (c) full.
//! - [`chaos`]: the fault-injection soak: kills, broker restarts, terminated connections.
//! - [`procs`]: rekey's processes (a worker fleet that replaces its dead, signals) and a
//!   private RabbitMQ node that can be restarted without touching the shared one.

pub mod bench;
pub mod chaos;
pub mod procs;
pub mod prom;
pub mod traffic;

pub use rekey_demo::{seed, verify};
