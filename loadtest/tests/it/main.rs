//! The binaries end to end, as an operator runs them: `rekey-loadtest seed`, two
//! `rekey-worker` processes, `rekey rotate`, `rekey status`, `rekey-loadtest verify`, and
//! SIGTERM to the workers. The other binaries are found beside `rekey-loadtest` (they are
//! built by `cargo test --workspace`). `faults`: the fault-injection suite (kills at fault
//! points, broker restarts, terminated connections, SIGTERM, the chaos soak); its fault
//! point tests need `--all-features`.

mod binaries;
mod brakes;
mod broker_users;
mod budget;
mod compose;
mod custody;
mod deploy;
mod faults;
mod hardening;
mod observability;
mod receiver;
mod scene;
mod schema;
mod seed;
mod slo;
mod stalls;
mod throttle;
mod tls;
