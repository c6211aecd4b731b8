//! The database's own brakes (gh-ost's `--max-lag-millis`): while a streaming replica's
//! replay is behind by more than the run's limits, the driver publishes nothing new, as it
//! does for the operator's hold. A rotation rewrites every row and so writes WAL faster
//! than most applications; a replica that falls behind serves stale reads and, on a
//! failover, loses what it had not replayed.
//!
//! Beside the replicas, two brakes on the primary's load (gh-ost's `--max-load`): client
//! backends running a statement (`--max-active-backends`), and a checkpoint PostgreSQL had
//! to request because WAL outgrew `max_wal_size` (`--checkpoint-hold`: a rotation that
//! writes WAL faster than checkpoints spread it out makes every commit wait).
//!
//! Lag is read on the primary from `pg_stat_replication`: in bytes, the WAL between the
//! primary's current position and what the replica has replayed (this grows whenever replay
//! falls behind, paused or slow), and in time, `replay_lag` (which PostgreSQL measures only
//! while replay progresses). The columns are visible to superusers and members of
//! `pg_monitor` (or `pg_read_all_stats`); for another user they are NULL and no replica can
//! hold the run (docs/throttle.md says so).

use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use rekey_common::ledger::RunSettings;
use tokio_postgres::GenericClient;

use crate::runtime::{Driver, StageRuntime};

/// How often the driver looks at the replicas.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// One streaming replica as the primary sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaLag {
    /// `application_name` (the standby's `cluster_name`, or `walreceiver`) and address.
    pub name: String,
    /// WAL bytes between the primary's current position and the replica's replay.
    pub bytes: Option<f64>,
    /// `replay_lag`, seconds.
    pub secs: Option<f64>,
}

pub async fn replica_lags<C: GenericClient>(
    c: &C,
) -> Result<Vec<ReplicaLag>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT coalesce(nullif(application_name, ''), 'replica') || '@' || coalesce(host(client_addr), 'local'),
                    pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8,
                    extract(epoch FROM replay_lag)::float8
               FROM pg_stat_replication
              WHERE state = 'streaming'
              ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ReplicaLag {
            name: r.get(0),
            bytes: r.get(1),
            secs: r.get(2),
        })
        .collect())
}

/// Why the replicas hold the run (the first replica over a limit), if they do.
pub fn reason(lags: &[ReplicaLag], s: &RunSettings) -> Option<String> {
    lags.iter().find_map(|l| {
        if let (Some(b), Some(max)) = (l.bytes, s.max_replication_lag_bytes)
            && max > 0
            && b > max as f64
        {
            return Some(format!(
                "held: replica {} is {:.1} MiB of WAL behind (--max-replication-lag-bytes {:.1} MiB); publication goes on when it catches up",
                l.name,
                b / 1_048_576.0,
                max as f64 / 1_048_576.0
            ));
        }
        if let (Some(secs), Some(max)) = (l.secs, s.max_replication_lag_secs)
            && max > 0.0
            && secs > max
        {
            return Some(format!(
                "held: replica {} replays {secs:.1} s behind (--max-replication-lag {max:.0}s); publication goes on when it catches up",
                l.name
            ));
        }
        None
    })
}

/// The database's load as the driver last looked at it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Looks {
    /// `server_version_num` (the checkpoint counter moved in PostgreSQL 17).
    version: Option<i32>,
    /// `checkpoints_req` at the last look, and until when a rise holds publication.
    checkpoints_req: Option<i64>,
    checkpoint_hold_until: Option<Instant>,
}

/// Client backends running a statement now (this one's own not counted) and checkpoints
/// requested since the statistics were reset.
pub async fn load<C: GenericClient>(
    c: &C,
    version: i32,
) -> Result<(i64, i64), tokio_postgres::Error> {
    let checkpoints = if version >= 170_000 {
        "SELECT num_requested FROM pg_stat_checkpointer"
    } else {
        "SELECT checkpoints_req FROM pg_stat_bgwriter"
    };
    let row = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM pg_stat_activity
                          WHERE state = 'active' AND backend_type = 'client backend'
                            AND pid <> pg_backend_pid())::int8,
                        ({checkpoints})::int8"
            ),
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Why the database's load holds the run, if it does: too many active backends, or a
/// checkpoint requested within `checkpoint_hold_secs`.
fn load_reason(
    looks: &mut Looks,
    s: &RunSettings,
    active: i64,
    checkpoints_req: i64,
) -> Option<String> {
    if let Some(last) = looks.checkpoints_req
        && checkpoints_req > last
        && s.checkpoint_hold_secs > 0.0
    {
        looks.checkpoint_hold_until =
            Some(Instant::now() + Duration::from_secs_f64(s.checkpoint_hold_secs));
    }
    looks.checkpoints_req = Some(checkpoints_req);
    if let Some(max) = s.max_active_backends.filter(|m| *m > 0)
        && active > max
    {
        return Some(format!(
            "held: {active} active backends in PostgreSQL (--max-active-backends {max}); publication goes on when fewer are"
        ));
    }
    if looks
        .checkpoint_hold_until
        .is_some_and(|t| t > Instant::now())
    {
        return Some(format!(
            "held: PostgreSQL requested a checkpoint (WAL outgrew max_wal_size, or someone ran CHECKPOINT; {checkpoints_req} requested since its statistics were reset); publication goes on {:.0} s after it (--checkpoint-hold)",
            s.checkpoint_hold_secs
        ));
    }
    None
}

/// The database's brakes for this step (replicas' lag, active backends, requested
/// checkpoints): looked at every [`CHECK_EVERY`], remembered between. A failed look holds
/// nothing (and says why once per failure). The figures go to the metrics whether or not
/// a limit is set.
pub(crate) async fn check(
    d: &Driver<'_>,
    rt: &mut StageRuntime,
    s: &RunSettings,
) -> Option<String> {
    if rt
        .last_brake_check
        .is_some_and(|t| t.elapsed() < CHECK_EVERY)
    {
        return hold_still(rt);
    }
    rt.last_brake_check = Some(Instant::now());
    let looks = &mut rt.looks;
    let looked = async {
        let c = d.pool.get().await?;
        let version = match looks.version {
            Some(v) => v,
            None => {
                let v: String = c
                    .query_one("SELECT current_setting('server_version_num')", &[])
                    .await?
                    .get(0);
                *looks.version.insert(v.parse().unwrap_or(0))
            }
        };
        let lags = replica_lags(&**c).await?;
        let (active, checkpoints) = load(&**c, version).await?;
        anyhow::Ok((lags, active, checkpoints))
    }
    .await;
    rt.brake = match looked {
        Ok((lags, active, checkpoints)) => {
            if let Some(m) = &d.opts.metrics {
                let run = [KeyValue::new("run_id", d.run_id)];
                // The farthest replica (0 with none): what the brake answers to.
                let most = lags.iter().filter_map(|l| l.bytes).fold(0.0, f64::max);
                m.replication_lag_bytes.record(most as u64, &run);
                m.active_backends.record(active.max(0) as u64, &run);
                m.checkpoints_requested
                    .record(checkpoints.max(0) as u64, &run);
            }
            reason(&lags, s).or_else(|| load_reason(looks, s, active, checkpoints))
        }
        Err(e) => {
            tracing::warn!(run_id = d.run_id, error = %format!("{e:#}"), "could not read the database's load (replicas, backends, checkpoints)");
            None
        }
    };
    rt.brake.clone()
}

/// Between looks: the last look's reason, but a checkpoint's hold ends on time.
fn hold_still(rt: &StageRuntime) -> Option<String> {
    let b = rt.brake.clone()?;
    if b.contains("requested a checkpoint")
        && rt
            .looks
            .checkpoint_hold_until
            .is_none_or(|t| t <= Instant::now())
    {
        return None;
    }
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_over_either_limit_holds_and_one_within_both_does_not() {
        let s = RunSettings {
            max_replication_lag_bytes: Some(1 << 20),
            max_replication_lag_secs: Some(30.0),
            ..Default::default()
        };
        let lag = |bytes: f64, secs: f64| ReplicaLag {
            name: "standby@127.0.0.1".into(),
            bytes: Some(bytes),
            secs: Some(secs),
        };
        assert_eq!(reason(&[lag(1000.0, 1.0)], &s), None);
        let by_bytes = reason(&[lag(3.0 * 1_048_576.0, 1.0)], &s).unwrap();
        assert!(by_bytes.contains("3.0 MiB of WAL behind"), "{by_bytes}");
        let by_time = reason(&[lag(10.0, 45.0)], &s).unwrap();
        assert!(by_time.contains("45.0 s behind"), "{by_time}");
        // Limits of 0 (or none) check nothing; a replica whose columns are hidden holds
        // nothing.
        let off = RunSettings {
            max_replication_lag_bytes: Some(0),
            max_replication_lag_secs: None,
            ..Default::default()
        };
        assert_eq!(reason(&[lag(1e12, 1e6)], &off), None);
        let hidden = ReplicaLag {
            name: "r@x".into(),
            bytes: None,
            secs: None,
        };
        assert_eq!(reason(&[hidden], &s), None);
    }

    #[test]
    fn busy_backends_hold_and_a_requested_checkpoint_holds_for_a_while() {
        let s = RunSettings {
            max_active_backends: Some(8),
            checkpoint_hold_secs: 10.0,
            ..Default::default()
        };
        let mut looks = Looks::default();
        // The first look only learns the checkpoint counter.
        assert_eq!(load_reason(&mut looks, &s, 3, 40), None);
        let busy = load_reason(&mut looks, &s, 9, 40).unwrap();
        assert!(busy.contains("9 active backends"), "{busy}");
        assert!(busy.contains("--max-active-backends 8"), "{busy}");
        let ckpt = load_reason(&mut looks, &s, 3, 41).unwrap();
        assert!(ckpt.contains("requested a checkpoint"), "{ckpt}");
        // Still held at the next look (the counter no longer rises) …
        assert!(load_reason(&mut looks, &s, 3, 41).is_some());
        // … until the hold has passed.
        looks.checkpoint_hold_until = Some(Instant::now());
        assert_eq!(load_reason(&mut looks, &s, 3, 41), None);
        let off = RunSettings {
            max_active_backends: None,
            checkpoint_hold_secs: 0.0,
            ..Default::default()
        };
        let mut looks = Looks::default();
        assert_eq!(load_reason(&mut looks, &off, 1000, 1), None);
        assert_eq!(load_reason(&mut looks, &off, 1000, 2), None);
    }
}
