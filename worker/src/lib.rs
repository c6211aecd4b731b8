//! rekey-worker: consumes batch orders and rotates their rows.
//!
//! - [`rotate`]: the transaction that rotates one batch (claim, lock, re-encrypt,
//!   verify, write back, record errors and audit, mark done), and the error split between
//!   transient failures (retried) and poison messages (dead-lettered); its crypto
//!   (`rotate/compute.rs`) does no I/O.
//! - [`consume`]: the consumer loop: prefetch, concurrency, retries, acks, reports,
//!   reconnection, graceful shutdown.
//! - [`ring`]: the worker's key ring, reloaded when a batch names a key it does not know
//!   (and its master key, when the key store was re-wrapped by `rotate-master`).
//! - [`presence`]: the worker's row in `rekey.workers`, written every few seconds.
//! - [`refusals`]: messages refused before authentication, audited as one count per kind
//!   per minute.

pub mod consume;
pub mod presence;
pub mod refusals;
pub mod ring;
pub mod rotate;
