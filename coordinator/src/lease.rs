//! The driver lease: the process driving a run holds `rekey.drivers`' row for it, renews
//! it every few seconds from a task of its own (so that a driver waiting for the broker is
//! still seen as alive), and gives it up when it stops. A second driver is refused while
//! the lease is live; a killed driver's lease lapses and `rekey resume` takes the run over.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use deadpool_postgres::Pool;
use rekey_common::ledger::{self, DRIVER_TTL, DriverError, HEARTBEAT_EVERY};
use tokio::sync::oneshot;

/// This process's identity in a lease.
pub fn me() -> (String, i32) {
    (ledger::host_name(), std::process::id() as i32)
}

/// Whether the lease's process is known to be gone: it ran on this machine and no process
/// with its pid exists any more. (On another machine only the lease's ttl can tell.)
pub fn holder_gone(l: &ledger::DriverLease) -> bool {
    l.host == ledger::host_name()
        && i64::from(l.pid) != i64::from(std::process::id())
        && std::fs::read_to_string(format!("/proc/{}/stat", l.pid))
            // Gone, or a zombie nobody reaped yet (state `Z` after the command name).
            .map_or(true, |stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
}

/// Refuses early (before anything changes) when another live process drives run `run_id`.
/// A lease whose process is gone from this machine is dropped at once.
pub async fn check_free(pool: &Pool, run_id: i64) -> anyhow::Result<()> {
    let (host, pid) = me();
    let c = pool.get().await?;
    if let Some(l) = ledger::driver(&**c, run_id).await?
        && l.live
        && (l.host != host || l.pid != pid)
    {
        if holder_gone(&l) {
            tracing::info!(run_id, driver = %l.who(), "the run's last driver is gone; taking its lease over");
            ledger::release_driver(&**c, run_id, &l.host, l.pid).await?;
            return Ok(());
        }
        // Same words as a refused acquire.
        ledger::acquire_driver(&**c, run_id, &host, pid, DRIVER_TTL).await?;
    }
    Ok(())
}

/// A held lease; renewed until [`Lease::release`].
#[derive(Debug)]
pub struct Lease {
    run_id: i64,
    /// Consumers on the batch queue as the driver last saw them (-1: not known).
    pub consumers: Arc<AtomicI32>,
    stop: Option<oneshot::Sender<()>>,
    lost: Option<oneshot::Receiver<DriverError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Takes the lease on run `run_id` and starts renewing it.
    pub async fn acquire(pool: &Pool, run_id: i64) -> anyhow::Result<Self> {
        check_free(pool, run_id).await?;
        let (host, pid) = me();
        ledger::acquire_driver(&**pool.get().await?, run_id, &host, pid, DRIVER_TTL).await?;
        let consumers = Arc::new(AtomicI32::new(-1));
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let (lost_tx, lost_rx) = oneshot::channel();
        let (pool, seen) = (pool.clone(), consumers.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stop_rx => return,
                    _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
                }
                let n = seen.load(Ordering::Relaxed);
                let beat = async {
                    let c = pool.get().await.map_err(|e| anyhow::anyhow!(e))?;
                    ledger::heartbeat_driver(&**c, run_id, &host, pid, (n >= 0).then_some(n))
                        .await
                        .map_err(anyhow::Error::from)
                }
                .await;
                match beat {
                    Ok(_) => {}
                    Err(e) => match e.downcast::<DriverError>() {
                        Ok(taken @ DriverError::TakenOver { .. }) => {
                            let _ = lost_tx.send(taken);
                            return;
                        }
                        // The database is away for a moment: the lease may lapse, and the
                        // next heartbeat finds out whether somebody took the run over.
                        Ok(e) => tracing::warn!(run_id, error = %e, "driver heartbeat failed"),
                        Err(e) => {
                            tracing::warn!(run_id, error = %format!("{e:#}"), "driver heartbeat failed")
                        }
                    },
                }
            }
        });
        Ok(Self {
            run_id,
            consumers,
            stop: Some(stop_tx),
            lost: Some(lost_rx),
            task,
        })
    }

    /// Resolves if another process took the run over (this one must stop driving it).
    pub async fn lost(&mut self) -> DriverError {
        match self.lost.as_mut() {
            Some(rx) => match rx.await {
                Ok(e) => e,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Stops renewing and gives the lease up.
    pub async fn release(mut self, pool: &Pool) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        let (host, pid) = me();
        let released = async {
            ledger::release_driver(&**pool.get().await?, self.run_id, &host, pid).await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = released {
            tracing::warn!(run_id = self.run_id, error = %format!("{e:#}"), "driver lease not released; it lapses by itself");
        }
    }
}

impl Drop for Lease {
    /// A lease dropped without [`Lease::release`] (its driver's future was dropped) stops
    /// renewing, so that it lapses.
    fn drop(&mut self) {
        self.task.abort();
    }
}
