//! Who works on a run (`rekey.drivers`, `rekey.workers`, migration V8): the lease of the
//! process driving a run, and each worker's presence and health. Neither is a state
//! machine; both exist so that a stall never looks healthy: `rekey status` reads them to
//! say who drives a run, which workers are live, and why batches are not moving.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use super::LedgerError;

/// How long a driver's lease lives without a heartbeat.
pub const DRIVER_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// How often a driver renews its lease, and a worker writes its presence.
pub const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A worker not seen for this long is not live.
pub const WORKER_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// This machine's name (the container id in a container), for leases and presence.
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// The process driving a run, as its lease row says.
#[derive(Debug, Clone, Serialize)]
pub struct DriverLease {
    pub run_id: i64,
    pub host: String,
    pub pid: i32,
    pub since: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// Seconds since the last heartbeat.
    pub heartbeat_age_secs: f64,
    pub ttl_secs: f64,
    /// Whether the lease is live (its heartbeat younger than its ttl).
    pub live: bool,
    /// Consumers on the batch queue at the driver's last look (`None`: not looked yet).
    pub consumers: Option<i32>,
    /// Seconds without a consumer on the batch queue (`None`: there is one).
    pub no_consumer_secs: Option<f64>,
    /// What holds the driver's publication right now (`None`: nothing).
    pub throttle: Option<String>,
}

impl DriverLease {
    /// `host pid N`, as messages name a driver.
    pub fn who(&self) -> String {
        format!("{} pid {}", self.host, self.pid)
    }
}

/// A second driver was refused.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(
        "run {run_id} is driven by {who} (since {since}, last heartbeat {age:.0} s ago); a second driver is refused. \
         If that process is gone, its lease lapses {ttl:.0} s after its last heartbeat: then `rekey resume {run_id}` takes the run over"
    )]
    Busy {
        run_id: i64,
        who: String,
        since: String,
        age: f64,
        ttl: f64,
    },
    #[error(
        "run {run_id} was taken over by {who} after this driver's lease lapsed; this process stops driving it"
    )]
    TakenOver { run_id: i64, who: String },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl From<tokio_postgres::Error> for DriverError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Ledger(LedgerError::Db(e))
    }
}

const LEASE_COLUMNS: &str = "run_id, host, pid, since, heartbeat_at,
    extract(epoch FROM clock_timestamp() - heartbeat_at)::float8, ttl_secs,
    heartbeat_at > clock_timestamp() - make_interval(secs => ttl_secs), consumers,
    extract(epoch FROM clock_timestamp() - no_consumer_since)::float8, throttle";

fn lease_of(r: &Row) -> DriverLease {
    DriverLease {
        run_id: r.get(0),
        host: r.get(1),
        pid: r.get(2),
        since: r.get(3),
        heartbeat_at: r.get(4),
        heartbeat_age_secs: r.get(5),
        ttl_secs: r.get(6),
        live: r.get(7),
        consumers: r.get(8),
        no_consumer_secs: r.get(9),
        throttle: r.get(10),
    }
}

/// Records what holds the driver's publication now (`None`: nothing), for `rekey status`.
pub async fn set_driver_throttle<C: GenericClient>(
    c: &C,
    run_id: i64,
    throttle: Option<&str>,
) -> Result<(), LedgerError> {
    c.execute(
        "UPDATE rekey.drivers SET throttle = $2 WHERE run_id = $1",
        &[&run_id, &throttle],
    )
    .await?;
    Ok(())
}

/// The driver lease of run `run_id`, live or lapsed; `None` when no driver holds one (none
/// ever did, or the last one stopped cleanly).
pub async fn driver<C: GenericClient>(
    c: &C,
    run_id: i64,
) -> Result<Option<DriverLease>, LedgerError> {
    let row = c
        .query_opt(
            &format!("SELECT {LEASE_COLUMNS} FROM rekey.drivers WHERE run_id = $1"),
            &[&run_id],
        )
        .await?;
    Ok(row.as_ref().map(lease_of))
}

/// Takes the lease on run `run_id` for this process (`host`, `pid`): granted when nobody
/// holds it, when this process already does (its heartbeat renewed), or when the holder's
/// lease lapsed. Refused with [`DriverError::Busy`] while another process's lease is live.
pub async fn acquire_driver<C: GenericClient>(
    c: &C,
    run_id: i64,
    host: &str,
    pid: i32,
    ttl: std::time::Duration,
) -> Result<(), DriverError> {
    let granted = c
        .query_opt(
            "INSERT INTO rekey.drivers AS d (run_id, host, pid, ttl_secs) VALUES ($1, $2, $3, $4)
             ON CONFLICT (run_id) DO UPDATE SET
                 host = EXCLUDED.host, pid = EXCLUDED.pid, ttl_secs = EXCLUDED.ttl_secs,
                 heartbeat_at = clock_timestamp(),
                 since = CASE WHEN d.host = EXCLUDED.host AND d.pid = EXCLUDED.pid
                              THEN d.since ELSE clock_timestamp() END
             WHERE (d.host = EXCLUDED.host AND d.pid = EXCLUDED.pid)
                OR d.heartbeat_at <= clock_timestamp() - make_interval(secs => d.ttl_secs)
             RETURNING run_id",
            &[&run_id, &host, &pid, &ttl.as_secs_f64()],
        )
        .await?;
    if granted.is_some() {
        return Ok(());
    }
    match driver(c, run_id).await? {
        Some(l) => Err(DriverError::Busy {
            run_id,
            who: l.who(),
            since: l.since.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            age: l.heartbeat_age_secs,
            ttl: l.ttl_secs,
        }),
        // Released between the two statements: try once more.
        None => Box::pin(acquire_driver(c, run_id, host, pid, ttl)).await,
    }
}

/// Renews this process's lease and records what it sees on the broker (`consumers` on the
/// batch queue; `None`: not connected). [`DriverError::TakenOver`] when the lease is no
/// longer this process's.
pub async fn heartbeat_driver<C: GenericClient>(
    c: &C,
    run_id: i64,
    host: &str,
    pid: i32,
    consumers: Option<i32>,
) -> Result<DriverLease, DriverError> {
    let row = c
        .query_opt(
            &format!(
                "UPDATE rekey.drivers SET heartbeat_at = clock_timestamp(),
                     consumers = COALESCE($4, consumers),
                     no_consumer_since = CASE
                         WHEN $4 IS NULL THEN no_consumer_since
                         WHEN $4 = 0 THEN COALESCE(no_consumer_since, clock_timestamp())
                         ELSE NULL END
                  WHERE run_id = $1 AND host = $2 AND pid = $3
                  RETURNING {LEASE_COLUMNS}"
            ),
            &[&run_id, &host, &pid, &consumers],
        )
        .await?;
    if let Some(r) = row {
        return Ok(lease_of(&r));
    }
    // The row is gone (released by another driver of this process, or deleted by hand) or
    // another process holds it: take it again if it is free, else stop.
    match acquire_driver(c, run_id, host, pid, DRIVER_TTL).await {
        Ok(()) => driver(c, run_id)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("driver lease of run {run_id}")).into()),
        Err(DriverError::Busy { who, .. }) => Err(DriverError::TakenOver { run_id, who }),
        Err(e) => Err(e),
    }
}

/// Gives the lease up (a driver that stops cleanly).
pub async fn release_driver<C: GenericClient>(
    c: &C,
    run_id: i64,
    host: &str,
    pid: i32,
) -> Result<(), LedgerError> {
    c.execute(
        "DELETE FROM rekey.drivers WHERE run_id = $1 AND host = $2 AND pid = $3",
        &[&run_id, &host, &pid],
    )
    .await?;
    Ok(())
}

/// What a worker says of itself every few seconds.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerPresence {
    pub worker_id: String,
    pub host: String,
    pub version: String,
    /// The fingerprint of the master key the worker holds.
    pub master_key_id: Uuid,
    pub started_at: DateTime<Utc>,
    /// Seconds since it last wrote its presence.
    pub seen_secs_ago: f64,
    pub batches_done: i64,
    pub batches_failed: i64,
    pub batches_retried: i64,
    /// `wrong_master_key`, `lock_timeout`, `deadlock`, `connection`, `other`.
    pub last_error_kind: Option<String>,
    pub last_error: Option<String>,
    /// Failed attempts in a row since its last success.
    pub failing_streak: i64,
}

/// A worker's figures to write (`seen_at` is the database's clock).
#[derive(Debug, Clone)]
pub struct WorkerReport<'a> {
    pub worker_id: &'a str,
    pub host: &'a str,
    pub version: &'a str,
    pub master_key_id: Uuid,
    pub batches_done: i64,
    pub batches_failed: i64,
    pub batches_retried: i64,
    pub last_error_kind: Option<&'a str>,
    pub last_error: Option<&'a str>,
    pub failing_streak: i64,
}

/// Writes a worker's presence (inserted the first time).
pub async fn report_worker<C: GenericClient>(
    c: &C,
    w: &WorkerReport<'_>,
) -> Result<(), LedgerError> {
    c.execute(
        "INSERT INTO rekey.workers AS w (worker_id, host, version, master_key_id, batches_done,
                batches_failed, batches_retried, last_error_kind, last_error, last_error_at,
                failing_streak)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, CASE WHEN $8::text IS NULL THEN NULL ELSE clock_timestamp() END, $10)
         ON CONFLICT (worker_id) DO UPDATE SET
             host = EXCLUDED.host, version = EXCLUDED.version,
             master_key_id = EXCLUDED.master_key_id, seen_at = clock_timestamp(),
             batches_done = EXCLUDED.batches_done, batches_failed = EXCLUDED.batches_failed,
             batches_retried = EXCLUDED.batches_retried,
             last_error_kind = EXCLUDED.last_error_kind, last_error = EXCLUDED.last_error,
             last_error_at = CASE WHEN EXCLUDED.last_error_kind IS NULL THEN NULL
                                  WHEN w.last_error IS NOT DISTINCT FROM EXCLUDED.last_error
                                  THEN COALESCE(w.last_error_at, clock_timestamp())
                                  ELSE clock_timestamp() END,
             failing_streak = EXCLUDED.failing_streak",
        &[
            &w.worker_id,
            &w.host,
            &w.version,
            &w.master_key_id,
            &w.batches_done,
            &w.batches_failed,
            &w.batches_retried,
            &w.last_error_kind,
            &w.last_error,
            &w.failing_streak,
        ],
    )
    .await?;
    Ok(())
}

/// Removes a worker's presence (a worker that stops cleanly).
pub async fn remove_worker<C: GenericClient>(c: &C, worker_id: &str) -> Result<(), LedgerError> {
    c.execute(
        "DELETE FROM rekey.workers WHERE worker_id = $1",
        &[&worker_id],
    )
    .await?;
    Ok(())
}

/// Workers seen within [`WORKER_TTL`], by id.
pub async fn live_workers<C: GenericClient>(c: &C) -> Result<Vec<WorkerPresence>, LedgerError> {
    let rows = c
        .query(
            "SELECT worker_id, host, version, master_key_id, started_at,
                    extract(epoch FROM clock_timestamp() - seen_at)::float8, batches_done,
                    batches_failed, batches_retried, last_error_kind, last_error, failing_streak
               FROM rekey.workers
              WHERE seen_at > clock_timestamp() - make_interval(secs => $1)
              ORDER BY worker_id",
            &[&WORKER_TTL.as_secs_f64()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| WorkerPresence {
            worker_id: r.get(0),
            host: r.get(1),
            version: r.get(2),
            master_key_id: r.get(3),
            started_at: r.get(4),
            seen_secs_ago: r.get(5),
            batches_done: r.get(6),
            batches_failed: r.get(7),
            batches_retried: r.get(8),
            last_error_kind: r.get(9),
            last_error: r.get(10),
            failing_streak: r.get(11),
        })
        .collect())
}

/// Failing workers grouped by the cause of their failures: `(kind, text, workers)`, the
/// largest group first. A worker counts as failing when its last attempts failed in a row
/// (`failing_streak` ≥ 2).
pub fn failing_groups(workers: &[WorkerPresence]) -> Vec<(String, String, Vec<String>)> {
    let mut groups: Vec<(String, String, Vec<String>)> = Vec::new();
    for w in workers.iter().filter(|w| w.failing_streak >= 2) {
        let kind = w.last_error_kind.clone().unwrap_or_else(|| "other".into());
        let text = w.last_error.clone().unwrap_or_default();
        match groups.iter_mut().find(|g| g.0 == kind && g.1 == text) {
            Some(g) => g.2.push(w.worker_id.clone()),
            None => groups.push((kind, text, vec![w.worker_id.clone()])),
        }
    }
    groups.sort_by(|a, b| b.2.len().cmp(&a.2.len()).then(a.0.cmp(&b.0)));
    groups
}
