//! The database's own brakes (gh-ost's `--max-lag-millis`): while a streaming replica's
//! replay is behind by more than the run's limits, the driver publishes nothing new, as it
//! does for the operator's hold. A rotation rewrites every row and so writes WAL faster
//! than most applications; a replica that falls behind serves stale reads and, on a
//! failover, loses what it had not replayed.
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

/// The replicas' brake for this step: looked at every [`CHECK_EVERY`], remembered between.
/// A failed look holds nothing (and says why once per failure).
pub(crate) async fn check(
    d: &Driver<'_>,
    rt: &mut StageRuntime,
    s: &RunSettings,
) -> Option<String> {
    if s.max_replication_lag_bytes.is_none_or(|b| b <= 0)
        && s.max_replication_lag_secs.is_none_or(|x| x <= 0.0)
    {
        return None;
    }
    if rt
        .last_brake_check
        .is_some_and(|t| t.elapsed() < CHECK_EVERY)
    {
        return rt.brake.clone();
    }
    rt.last_brake_check = Some(Instant::now());
    let looked = async {
        let c = d.pool.get().await?;
        anyhow::Ok(replica_lags(&**c).await?)
    }
    .await;
    rt.brake = match looked {
        Ok(lags) => {
            if let Some(m) = &d.opts.metrics {
                // The farthest replica (0 with none): what the brake answers to.
                let most = lags.iter().filter_map(|l| l.bytes).fold(0.0, f64::max);
                m.replication_lag_bytes
                    .record(most as u64, &[KeyValue::new("run_id", d.run_id)]);
            }
            reason(&lags, s)
        }
        Err(e) => {
            tracing::warn!(run_id = d.run_id, error = %format!("{e:#}"), "could not read the replicas' lag");
            None
        }
    };
    rt.brake.clone()
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
}
