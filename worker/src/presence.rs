//! The worker's presence: every few seconds it writes its row in `rekey.workers` (id, host,
//! version, the master key it holds, batches done / failed / retried, its last failure's
//! kind and text), so that `rekey status` and preflight see who works and why batches do
//! not move. A worker that stops cleanly deletes its row; a killed one stops being seen.
//! The same task writes the counts of refused messages once a minute (`refusals.rs`).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use rekey_common::ledger::{self, HEARTBEAT_EVERY, WorkerReport};
use tokio::sync::oneshot;

use crate::consume::Shared;

/// What the worker has done since it started, and its last failure.
#[derive(Debug, Default)]
pub struct Health {
    done: AtomicI64,
    failed: AtomicI64,
    retried: AtomicI64,
    streak: AtomicI64,
    last_error: Mutex<Option<(&'static str, String)>>,
}

impl Health {
    /// A batch committed (or was already done): the failing streak ends.
    pub fn success(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
        self.streak.store(0, Ordering::Relaxed);
        *self.last_error.lock().expect("health lock") = None;
    }

    /// A batch was marked failed for good (its own fault, not the worker's).
    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// An attempt failed and will be tried again (here or by another worker).
    pub fn retried(&self, kind: &'static str, e: &anyhow::Error) {
        self.retried.fetch_add(1, Ordering::Relaxed);
        self.streak.fetch_add(1, Ordering::Relaxed);
        // Error texts name keys by id and tables by name, never a value.
        let text: String = format!("{e:#}").chars().take(500).collect();
        *self.last_error.lock().expect("health lock") = Some((kind, text));
    }
}

/// The presence task; [`Presence::stop`] ends it and deletes the row.
#[derive(Debug)]
pub struct Presence {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts writing the worker's presence now and every [`HEARTBEAT_EVERY`].
pub(crate) fn spawn(shared: Arc<Shared>) -> Presence {
    let (stop_tx, mut stop_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let host = ledger::host_name();
        loop {
            if let Err(e) = write(&shared, &host).await {
                tracing::warn!(error = %format!("{e:#}"), "worker presence not written");
            }
            shared
                .refusals
                .flush_due(&shared.pool, &shared.batch.worker_id)
                .await;
            tokio::select! {
                _ = &mut stop_rx => return,
                _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
            }
        }
    });
    Presence {
        stop: Some(stop_tx),
        task,
    }
}

async fn write(shared: &Shared, host: &str) -> anyhow::Result<()> {
    let h = &shared.health;
    let last = h.last_error.lock().expect("health lock").clone();
    let report = WorkerReport {
        worker_id: &shared.batch.worker_id,
        host,
        version: env!("CARGO_PKG_VERSION"),
        master_key_id: shared.ring.master_id(),
        batches_done: h.done.load(Ordering::Relaxed),
        batches_failed: h.failed.load(Ordering::Relaxed),
        batches_retried: h.retried.load(Ordering::Relaxed),
        last_error_kind: last.as_ref().map(|l| l.0),
        last_error: last.as_ref().map(|l| l.1.as_str()),
        failing_streak: h.streak.load(Ordering::Relaxed),
    };
    ledger::report_worker(&**shared.pool.get().await?, &report).await?;
    Ok(())
}

impl Presence {
    /// Stops writing and deletes the worker's row.
    pub(crate) async fn stop(mut self, shared: &Shared) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        shared
            .refusals
            .flush(&shared.pool, &shared.batch.worker_id)
            .await;
        let removed = async {
            ledger::remove_worker(&**shared.pool.get().await?, &shared.batch.worker_id).await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = removed {
            tracing::warn!(error = %format!("{e:#}"), "worker presence not removed; it ages out");
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.task.abort();
    }
}
