//! Batches: a run's ID ranges, their state machine, and the statements that move a batch,
//! the coordinator's (publish, lease expiry) and the worker's (claim, hand back, done,
//! failed) alike.

use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Transaction};
use uuid::Uuid;

use super::runs::{RunKind, RunState, kind_of, targets_from};
use super::{LedgerError, StateMachine, check, state_enum, state_machine, state_of};
use crate::target::Target;

state_enum! {
    /// Where a batch is (see the module docs for its transitions).
    BatchState {
        /// In the ledger, not published (or handed back, or its lease ran out).
        Pending = "pending",
        /// A message for it is out; a worker has until its lease ends.
        Published = "published",
        Done = "done",
        /// No worker can finish it (its reason in `error`); `resume` tries again.
        Failed = "failed",
    }
}

state_machine!(
    BatchState,
    "batch",
    initial = Pending,
    [
        (Pending, Published),
        (Pending, Done),
        (Pending, Failed),
        (Published, Pending),
        (Published, Done),
        (Published, Failed),
        (Failed, Pending),
    ]
);

/// One planned batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    pub stage_no: i32,
    pub table: String,
    pub id_lo: i64,
    pub id_hi: i64,
    /// A sweep batch: every record of stages up to `stage_no` in the range.
    pub cumulative: bool,
}

/// Appends batches to a run, numbering them after the run's last batch.
pub async fn insert_batches<C: GenericClient>(
    c: &C,
    run_id: i64,
    plans: &[BatchPlan],
) -> Result<u64, LedgerError> {
    if plans.is_empty() {
        return Ok(0);
    }
    let stages: Vec<i32> = plans.iter().map(|p| p.stage_no).collect();
    let tables: Vec<&str> = plans.iter().map(|p| p.table.as_str()).collect();
    let los: Vec<i64> = plans.iter().map(|p| p.id_lo).collect();
    let his: Vec<i64> = plans.iter().map(|p| p.id_hi).collect();
    let cumulative: Vec<bool> = plans.iter().map(|p| p.cumulative).collect();
    let initial = <BatchState as StateMachine>::INITIAL.as_str();
    Ok(c.execute(
        "INSERT INTO rekey.batches (run_id, batch_no, stage_no, table_name, id_lo, id_hi, cumulative, state)
         SELECT $1, COALESCE((SELECT max(batch_no) FROM rekey.batches WHERE run_id = $1), 0) + u.ord, u.s, u.t, u.lo, u.hi, u.c, $7
           FROM unnest($2::int[], $3::text[], $4::int8[], $5::int8[], $6::bool[]) WITH ORDINALITY AS u(s, t, lo, hi, c, ord)",
        &[&run_id, &stages, &tables, &los, &his, &cumulative, &initial],
    )
    .await?)
}

/// What lease expiry did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// published → failed: their lease ran out `max_attempts` times.
    pub failed: u64,
    /// published → pending: to be published again.
    pub pending: u64,
}

/// Batches whose lease ran out: failed after `max_attempts` publications, else pending
/// again (the coordinator publishes them anew; a second copy of a message is harmless).
///
/// A batch whose ledger row a worker's transaction holds (it claimed the batch and has
/// not committed: a slow batch, or a worker cut off the network mid-batch) is skipped
/// (`SKIP LOCKED`) and looked at again next time: waiting for that lock stalled the whole
/// driver, publication included, for as long as the worker was cut off (seen in the
/// compose test: 12 s without a batch done after a worker's 15 s disconnection).
pub async fn expire_leases<C: GenericClient>(
    c: &C,
    run_id: i64,
    max_attempts: i32,
) -> Result<Expired, LedgerError> {
    let (published, failed) = BatchState::edge(BatchState::Published, BatchState::Failed);
    let failed = c
        .execute(
            "WITH x AS MATERIALIZED (
                 SELECT batch_no FROM rekey.batches
                  WHERE run_id = $1 AND state = $3 AND lease_until < now() AND attempts >= $2
                    FOR UPDATE SKIP LOCKED)
             UPDATE rekey.batches b
                SET state = $4, error = 'no worker completed it after ' || b.attempts || ' publications'
               FROM x WHERE b.run_id = $1 AND b.batch_no = x.batch_no",
            &[&run_id, &max_attempts, &published, &failed],
        )
        .await?;
    let (published, pending) = BatchState::edge(BatchState::Published, BatchState::Pending);
    let pending = c
        .execute(
            "WITH x AS MATERIALIZED (
                 SELECT batch_no FROM rekey.batches
                  WHERE run_id = $1 AND state = $2 AND lease_until < now()
                    FOR UPDATE SKIP LOCKED)
             UPDATE rekey.batches b SET state = $3
               FROM x WHERE b.run_id = $1 AND b.batch_no = x.batch_no",
            &[&run_id, &published, &pending],
        )
        .await?;
    Ok(Expired { failed, pending })
}

/// Batches marked published whose message never reached the broker (the publish failed or
/// its confirm never came: the connection dropped, the node was lost): pending again at
/// once, this publication not counted, so that the next session publishes them without
/// waiting for their lease. A copy the broker did take despite the missing confirm is
/// harmless: the ledger makes a second delivery change nothing.
pub async fn unpublish<C: GenericClient>(
    c: &C,
    run_id: i64,
    batch_nos: &[i64],
) -> Result<u64, LedgerError> {
    let (published, pending) = BatchState::edge(BatchState::Published, BatchState::Pending);
    Ok(c.execute(
        "UPDATE rekey.batches SET state = $3, attempts = greatest(attempts - 1, 0), lease_until = NULL
          WHERE run_id = $1 AND state = $2 AND batch_no = ANY($4)",
        &[&run_id, &published, &pending, &batch_nos],
    )
    .await?)
}

/// Batches published and not yet done or failed.
pub async fn in_flight<C: GenericClient>(c: &C, run_id: i64) -> Result<i64, LedgerError> {
    Ok(c.query_one(
        "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND state = $2",
        &[&run_id, &BatchState::Published.as_str()],
    )
    .await?
    .get(0))
}

/// A batch just marked published, for its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub batch_no: i64,
    pub stage_no: i32,
    pub table: String,
    pub id_lo: i64,
    pub id_hi: i64,
    /// How many times it has been published, this time included.
    pub attempt: i32,
}

/// pending → published for up to `room` batches, in batch order, each leased for
/// `lease_ms`. `SKIP LOCKED` keeps two coordinators from publishing the same batch at once.
pub async fn publish_next<C: GenericClient>(
    c: &C,
    run_id: i64,
    room: i64,
    lease_ms: f64,
) -> Result<Vec<Published>, LedgerError> {
    let (pending, published) = BatchState::edge(BatchState::Pending, BatchState::Published);
    let rows = c
        .query(
            // MATERIALIZED: the batches are picked once. As a subquery in FROM, a nested-loop
            // plan rescans it for every row of `b`, and each rescan's SKIP LOCKED /
            // re-check passes over the rows this very statement already published, so the
            // LIMIT held per rescan and a window of one published every pending batch.
            "WITH p AS MATERIALIZED (
                 SELECT batch_no FROM rekey.batches WHERE run_id = $1 AND state = $4
                  ORDER BY batch_no LIMIT $2 FOR UPDATE SKIP LOCKED)
             UPDATE rekey.batches b SET state = $5, attempts = attempts + 1, published_at = now(),
                    lease_until = now() + make_interval(secs => $3::float8 / 1000)
               FROM p
              WHERE b.run_id = $1 AND b.batch_no = p.batch_no
          RETURNING b.batch_no, b.stage_no, b.table_name, b.id_lo, b.id_hi, b.attempts",
            &[&run_id, &room, &lease_ms, &pending, &published],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Published {
            batch_no: r.get(0),
            stage_no: r.get(1),
            table: r.get(2),
            id_lo: r.get(3),
            id_hi: r.get(4),
            attempt: r.get(5),
        })
        .collect())
}

/// A batch's ledger row and its run's, as a worker claims it.
#[derive(Debug, Clone)]
pub struct BatchClaim {
    pub state: BatchState,
    pub table: String,
    pub id_lo: i64,
    pub id_hi: i64,
    pub stage_no: i32,
    /// A sweep batch: every record of stages up to `stage_no` in the range.
    pub cumulative: bool,
    pub run_kind: RunKind,
    pub run_state: RunState,
    pub target_key_id: Uuid,
    pub targets: Vec<Target>,
    pub stages: Vec<i32>,
    pub seed: i64,
    /// Rotate only values under these keys (rollback); `None`: any key but the target.
    pub source_key_ids: Option<Vec<Uuid>>,
}

/// What [`claim`] found.
#[derive(Debug)]
pub enum Claimed {
    Batch(Box<BatchClaim>),
    /// The run exists, the batch does not.
    NoBatch,
    NoRun,
}

/// Claims a batch for the transaction `tx`: locks its ledger row (held until `tx` ends, so
/// lease expiry and a second worker wait) and reads it with its run's.
pub async fn claim(
    tx: &Transaction<'_>,
    run_id: i64,
    batch_no: i64,
) -> Result<Claimed, LedgerError> {
    let row = tx
        .query_opt(
            "SELECT b.state, b.table_name, b.id_lo, b.id_hi, b.stage_no, r.kind, r.state, r.target_key_id,
                    r.targets, r.stages, r.seed, b.cumulative, r.source_key_ids
               FROM rekey.batches b JOIN rekey.runs r ON r.id = b.run_id
              WHERE b.run_id = $1 AND b.batch_no = $2
                FOR UPDATE OF b",
            &[&run_id, &batch_no],
        )
        .await?;
    let Some(row) = row else {
        let run_exists = tx
            .query_opt("SELECT 1 FROM rekey.runs WHERE id = $1", &[&run_id])
            .await?
            .is_some();
        return Ok(if run_exists {
            Claimed::NoBatch
        } else {
            Claimed::NoRun
        });
    };
    Ok(Claimed::Batch(Box::new(BatchClaim {
        state: state_of(row.get(0))?,
        table: row.get(1),
        id_lo: row.get(2),
        id_hi: row.get(3),
        stage_no: row.get(4),
        run_kind: kind_of(row.get(5))?,
        run_state: state_of(row.get(6))?,
        target_key_id: row.get(7),
        targets: targets_from(run_id, row.get(8))?,
        stages: row.get(9),
        seed: row.get(10),
        cumulative: row.get(11),
        source_key_ids: row.get(12),
    })))
}

/// published → pending: a worker hands back a batch of a run that is not running (paused,
/// halted, over), so that `resume` publishes it again.
pub async fn hand_back<C: GenericClient>(
    c: &C,
    run_id: i64,
    batch_no: i64,
) -> Result<u64, LedgerError> {
    let (published, pending) = BatchState::edge(BatchState::Published, BatchState::Pending);
    Ok(c
        .execute(
            "UPDATE rekey.batches SET state = $4, lease_until = NULL WHERE run_id = $1 AND batch_no = $2 AND state = $3",
            &[&run_id, &batch_no, &published, &pending],
        )
        .await?)
}

/// A finished batch's figures, written with its `done`.
#[derive(Debug, Clone, Default)]
pub struct DoneBatch {
    pub worker: String,
    pub n_rows: i64,
    pub n_values: i64,
    pub n_rotated: i64,
    pub n_skipped: i64,
    pub n_null: i64,
    pub n_errors: i64,
    /// The batch's audit chain: its last entry's id and hash, and how many entries.
    pub audit_tail_id: Option<i64>,
    pub audit_tail: Option<Vec<u8>>,
    pub audit_entries: i32,
}

/// (pending | published) → done, in the transaction that rotated the batch's rows (which
/// holds the batch's row since [`claim`]).
pub async fn mark_done<C: GenericClient>(
    c: &C,
    run_id: i64,
    batch_no: i64,
    d: &DoneBatch,
) -> Result<u64, LedgerError> {
    let from: Vec<&str> = sources(BatchState::Done);
    let params: [&(dyn ToSql + Sync); 14] = [
        &run_id,
        &batch_no,
        &d.worker,
        &d.n_rows,
        &d.n_values,
        &d.n_rotated,
        &d.n_skipped,
        &d.n_null,
        &d.n_errors,
        &d.audit_tail_id,
        &d.audit_tail,
        &d.audit_entries,
        &BatchState::Done.as_str(),
        &from,
    ];
    Ok(c.execute(
        "UPDATE rekey.batches SET state = $13, done_at = now(), lease_until = NULL, worker = $3,
                n_rows = $4, n_values = $5, n_rotated = $6, n_skipped = $7, n_null = $8, n_errors = $9, error = NULL,
                audit_tail_id = $10, audit_tail = $11, audit_entries = $12
          WHERE run_id = $1 AND batch_no = $2 AND state = ANY($14)",
        &params,
    )
    .await?)
}

/// → failed, with the reason, unless the batch is done: it can never succeed as it is.
pub async fn mark_failed<C: GenericClient>(
    c: &C,
    run_id: i64,
    batch_no: i64,
    reason: &str,
    worker: &str,
) -> Result<u64, LedgerError> {
    let mut from = sources(BatchState::Failed);
    from.push(BatchState::Failed.as_str());
    Ok(c.execute(
        "UPDATE rekey.batches SET state = $5, error = $3, worker = $4, lease_until = NULL
              WHERE run_id = $1 AND batch_no = $2 AND state = ANY($6)",
        &[
            &run_id,
            &batch_no,
            &reason,
            &worker,
            &BatchState::Failed.as_str(),
            &from,
        ],
    )
    .await?)
}

/// (published | failed) → pending for a run being resumed: a published batch may have lost
/// its message; a failed one gets another chance (its attempts start again) now that the
/// operator fixed the cause.
pub async fn reopen_batches<C: GenericClient>(c: &C, run_id: i64) -> Result<u64, LedgerError> {
    let (published, pending) = BatchState::edge(BatchState::Published, BatchState::Pending);
    let (failed, _) = BatchState::edge(BatchState::Failed, BatchState::Pending);
    Ok(c
        .execute(
            "UPDATE rekey.batches SET state = $4, lease_until = NULL, attempts = CASE WHEN state = $3 THEN 0 ELSE attempts END
              WHERE run_id = $1 AND state IN ($2, $3)",
            &[&run_id, &published, &failed, &pending],
        )
        .await?)
}

/// Moves a batch to `to` from whatever state it is in, if the table allows it. The named
/// transitions above are what rekey uses; this one is for tools and tests.
pub async fn set_batch_state<C: GenericClient>(
    c: &C,
    run_id: i64,
    batch_no: i64,
    to: BatchState,
) -> Result<(), LedgerError> {
    let what = format!("batch {batch_no} of run {run_id}");
    let row = c
        .query_opt(
            "SELECT state FROM rekey.batches WHERE run_id = $1 AND batch_no = $2 FOR UPDATE",
            &[&run_id, &batch_no],
        )
        .await?
        .ok_or_else(|| LedgerError::NotFound(what.clone()))?;
    let from: BatchState = state_of(row.get(0))?;
    check(what, from, to)?;
    c.execute(
        "UPDATE rekey.batches SET state = $3 WHERE run_id = $1 AND batch_no = $2",
        &[&run_id, &batch_no, &to.as_str()],
    )
    .await?;
    Ok(())
}

/// The states from which a batch may move to `to`.
fn sources(to: BatchState) -> Vec<&'static str> {
    BatchState::ALL
        .iter()
        .filter(|s| **s != to && s.can_become(to))
        .map(|s| s.as_str())
        .collect()
}

/// A run's progress, recomputed from the ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub n_batches: i64,
    pub pending: i64,
    pub published: i64,
    pub done: i64,
    pub failed: i64,
    pub n_rows: i64,
    pub n_values: i64,
    pub n_rotated: i64,
    pub n_skipped: i64,
    pub n_null: i64,
    pub n_errors: i64,
    /// Rows in the planned ranges (an estimate until every batch is done).
    pub planned_rows_estimate: i64,
}

impl Progress {
    /// Decrypt errors over values that needed decrypting.
    pub fn error_rate(&self) -> f64 {
        let attempted = self.n_rotated + self.n_errors;
        if attempted == 0 {
            0.0
        } else {
            self.n_errors as f64 / attempted as f64
        }
    }

    pub fn is_finished(&self) -> bool {
        self.pending == 0 && self.published == 0
    }
}

pub async fn progress<C: GenericClient>(c: &C, run_id: i64) -> Result<Progress, LedgerError> {
    progress_of(c, run_id, None).await
}

/// Progress of one stage's batches, or of the whole run.
pub async fn progress_of<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: Option<i32>,
) -> Result<Progress, LedgerError> {
    let s = |b: BatchState| b.as_str();
    let r = c
        .query_one(
            "SELECT count(*),
                    count(*) FILTER (WHERE state = $3),
                    count(*) FILTER (WHERE state = $4),
                    count(*) FILTER (WHERE state = $5),
                    count(*) FILTER (WHERE state = $6),
                    COALESCE(sum(n_rows), 0)::int8, COALESCE(sum(n_values), 0)::int8,
                    COALESCE(sum(n_rotated), 0)::int8, COALESCE(sum(n_skipped), 0)::int8,
                    COALESCE(sum(n_null), 0)::int8, COALESCE(sum(n_errors), 0)::int8
               FROM rekey.batches WHERE run_id = $1 AND ($2::int IS NULL OR stage_no = $2)",
            &[
                &run_id,
                &stage_no,
                &s(BatchState::Pending),
                &s(BatchState::Published),
                &s(BatchState::Done),
                &s(BatchState::Failed),
            ],
        )
        .await?;
    let settings = c
        .query_opt(
            "SELECT (settings->>'planned_rows')::int8 FROM rekey.runs WHERE id = $1",
            &[&run_id],
        )
        .await?
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .unwrap_or(0);
    Ok(Progress {
        n_batches: r.get(0),
        pending: r.get(1),
        published: r.get(2),
        done: r.get(3),
        failed: r.get(4),
        n_rows: r.get(5),
        n_values: r.get(6),
        n_rotated: r.get(7),
        n_skipped: r.get(8),
        n_null: r.get(9),
        n_errors: r.get(10),
        planned_rows_estimate: settings,
    })
}

/// The reason of a failed batch of run `run_id` that contains `words`, if any (the driver
/// halts a run at once on some reasons, such as a spent nonce budget).
pub async fn failure_containing<C: GenericClient>(
    c: &C,
    run_id: i64,
    words: &str,
) -> Result<Option<String>, LedgerError> {
    Ok(c.query_opt(
        "SELECT error FROM rekey.batches
              WHERE run_id = $1 AND state = 'failed' AND strpos(error, $2) > 0
              ORDER BY batch_no LIMIT 1",
        &[&run_id, &words],
    )
    .await?
    .map(|r| r.get(0)))
}
