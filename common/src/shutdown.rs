//! SIGTERM and SIGINT (Ctrl-C) as one future, for the binaries' orderly shutdown.

use std::future::Future;

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled: call it first thing in `main`, so that a
/// signal that comes during startup is not the default, fatal one.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers =
        signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
    async move {
        match handlers {
            Ok((mut term, mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "signal handlers not installed: SIGTERM stops this process at once");
                std::future::pending::<()>().await;
            }
        }
    }
}
