//! The binaries end to end, as an operator runs them: `rekey-loadtest seed`, two
//! `rekey-worker` processes, `rekey rotate`, `rekey status`, `rekey-loadtest verify`, and
//! SIGTERM to the workers. The other binaries are found beside `rekey-loadtest` (they are
//! built by `cargo test --workspace`).

mod binaries;
mod seed;
