//! rekey-common: everything the coordinator, the workers and the load test share.
//!
//! - [`secret`]: types for key material and plaintext (redacted `Debug`, zeroized on drop).
//! - [`envelope`]: the v1 field envelope, `seal` and `open` (pure crypto, no I/O).
//! - [`keys`]: the key hierarchy: master key providers, the wrapped-key format, the key
//!   ring, the key store in Postgres, the census.
//! - [`audit`]: the key-usage audit log.
//! - [`ledger`]: runs, stages and batches: the truth about progress.
//! - [`messages`] and [`codec`]: what crosses RabbitMQ, and the one bincode codec.
//! - [`broker`]: RabbitMQ connection, topology, confirmed publishing.
//! - [`config`]: settings from `rekey.toml` and `REKEY_*` variables.
//! - [`target`]: the tables to rotate, and the SQL built from them.
//! - [`db`]: the connection pool and the embedded migrations.
//! - [`failpoint`]: fault points for the fault-injection tests (`failpoints` feature only).
//! - [`shutdown`]: SIGTERM and Ctrl-C as one future.
//! - [`metrics`]: the OpenTelemetry instruments and the Prometheus `/metrics` endpoint.
//! - [`report_error`]: an error's chain of causes, each said once, for people.
//! - [`notify`]: run events posted to a webhook, retried, never blocking the run.
//! - [`sizing`]: rows per batch from the bytes a batch should hold.
//! - [`telemetry`]: logging setup for the binaries.
//! - [`tls`]: TLS for PostgreSQL and RabbitMQ (rustls), configured in the URLs.
//! - [`testing`]: test support (a fresh database per test), used by every crate's tests.
//!
//! **Architecture invariant:** `envelope`, `keys::wrap`, `keys::ring` and `secret` do no
//! I/O; only the edges (`keys::store`, `audit`, `db`, the binaries) talk to Postgres.

pub mod audit;
pub mod broker;
pub mod codec;
pub mod config;
pub mod db;
pub mod envelope;
pub mod failpoint;
pub mod keys;
pub mod ledger;
pub mod messages;
pub mod metrics;
pub mod notify;
pub mod report_error;
pub mod secret;
pub mod shutdown;
pub mod sizing;
pub mod stages;
pub mod target;
pub mod telemetry;
pub mod testing;
pub mod tls;

pub use config::Settings;
