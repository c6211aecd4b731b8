//! Fault points for the fault-injection tests, with the [`fail`] crate, compiled in only
//! with the `failpoints` feature (`cargo test --workspace --all-features` turns it on;
//! release builds have none and [`failpoint!`](crate::failpoint!) expands to nothing).
//!
//! A binary built with the feature reads `FAILPOINTS` at start (see [`setup`]), in the
//! `fail` crate's syntax: `name=actions;name=actions`, e.g.
//! `worker.after_commit=25%return` or `worker.after_claim=3*off->return`. The action
//! `return` **kills the process with SIGKILL** on the spot (the test's way of dying at an
//! exact step; `pkcs11.lose_session` alone does what its comment says instead);
//! `sleep(ms)`, `pause`, `panic` and `print` do what the `fail` crate says.
//! Each point names the step it sits after; [`POINTS`] lists them all.

/// Every fault point, in the order a batch meets them, then the coordinator's.
pub const POINTS: [&str; 8] = [
    // The batch's ledger row is locked and checked, nothing else done.
    "worker.after_claim",
    // The batch's rows are read (not locked), nothing computed or written.
    "worker.after_read",
    // The new values are written, the transaction not yet committed.
    "worker.after_write",
    // The transaction committed; the message is not yet acked.
    "worker.after_commit",
    // The message is acked; the report is not yet published.
    "worker.after_ack",
    // The coordinator marked a batch published in the ledger, not yet on the broker.
    "coordinator.before_publish",
    // The coordinator scanned a stage's coverage, not yet recorded its gate decision.
    "coordinator.mid_gate",
    // A key ring is about to be loaded with a PKCS#11 master key. Not a death: `return`
    // finalizes the PKCS#11 library under the process's session (the token closed it).
    "pkcs11.lose_session",
];

/// Marks a fault point. With the `failpoints` feature, configured by `FAILPOINTS`; the
/// `return` action SIGKILLs the process. Without the feature, nothing.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        $crate::failpoint::__fail::fail_point!($name, |_| $crate::failpoint::die($name))
    };
}

/// Marks a fault point. With the `failpoints` feature, configured by `FAILPOINTS`; the
/// `return` action SIGKILLs the process. Without the feature, nothing.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        ()
    };
}

#[cfg(feature = "failpoints")]
#[doc(hidden)]
pub use fail as __fail;

/// Reads `FAILPOINTS` and keeps its configuration for the life of the process. Call it
/// first thing in `main`. Without the feature, does nothing.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    if let Ok(spec) = std::env::var("FAILPOINTS") {
        for item in spec.split(';').filter(|s| !s.trim().is_empty()) {
            let (name, actions) = item.split_once('=').unwrap_or((item, ""));
            if let Err(e) = fail::cfg(name.trim(), actions.trim()) {
                eprintln!("FAILPOINTS: bad entry {item:?}: {e}");
                std::process::exit(2);
            }
        }
        tracing::warn!(failpoints = %spec, "fault points armed");
    }
}

/// Whether this build has fault points.
pub const fn enabled() -> bool {
    cfg!(feature = "failpoints")
}

/// Dies by SIGKILL at fault point `name`: no destructor, no flush, no goodbye to the
/// broker or the database, exactly as a killed process. Writes one line to stderr first,
/// so that a test can tell which point killed it.
#[cfg(feature = "failpoints")]
#[doc(hidden)]
pub fn die(name: &str) -> ! {
    use std::io::Write;
    let pid = std::process::id();
    let _ = writeln!(std::io::stderr(), "failpoint {name}: SIGKILL to {pid}");
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    // `kill` signals asynchronously in theory; never carry on past the point.
    std::process::abort()
}
