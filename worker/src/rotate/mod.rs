//! The transaction that rotates one batch. In one Postgres transaction it claims the batch
//! in the ledger (a batch already done is skipped), reads the batch's rows with their row
//! versions (without locking them), opens each value with the key its header names, seals
//! it under the target key, opens the new value once more to verify it, and writes all
//! values back in one compare-and-swap `UPDATE … FROM unnest(…)` that only writes rows
//! still at the version read. Rows the application wrote in between are read again, this
//! time locked (`FOR UPDATE`, in id order), and rotated if they are still under an old key.
//! Then it records values that failed to decrypt without changing them, appends aggregated
//! audit entries, marks the batch done with its counts, and commits. So the application's
//! rows are locked only from the write-back to the commit, never during the read and the
//! crypto, and no application write is ever overwritten. A dry run does the same and rolls
//! the rows back, then records its counts in a transaction of its own.

//!
//! - [`compute`]: the crypto of a batch (no I/O).
//! - [`error`]: `Transient` / `Poison` / `Failed`, which decide what happens next.

mod compute;
mod error;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::{Object, Pool};
use rekey_common::audit::{self, AuditEntry};
use rekey_common::keys::ring::KeyRing;
use rekey_common::keys::store;
use rekey_common::ledger::{self, BatchState, RunKind, RunState};
use rekey_common::messages::{BatchMessage, Outcome};
use rekey_common::stages;
use rekey_common::target::{Target, quote_ident};
use serde_json::json;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use compute::{Computed, compute};
pub use compute::{Counts, OpCounts};
pub use error::{BatchError, error_kind, is_contention};

use crate::ring::RingHandle;

/// How a batch transaction behaves.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    pub lock_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    pub worker_id: String,
    /// Batches with more values than this do their crypto on the blocking pool, so that a
    /// large batch never stalls the async executor.
    pub blocking_threshold: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        use crate::consume::{
            DEFAULT_BLOCKING_THRESHOLD, DEFAULT_LOCK_TIMEOUT_MS, DEFAULT_STATEMENT_TIMEOUT_MS,
        };
        Self {
            lock_timeout_ms: DEFAULT_LOCK_TIMEOUT_MS,
            statement_timeout_ms: DEFAULT_STATEMENT_TIMEOUT_MS,
            worker_id: "worker".into(),
            blocking_threshold: DEFAULT_BLOCKING_THRESHOLD,
        }
    }
}

/// The result of one batch.
#[derive(Debug, Clone)]
pub struct BatchResult {
    pub outcome: Outcome,
    /// Crypto operations of a done batch, as audited.
    pub ops: OpCounts,
    pub counts: Counts,
    pub elapsed_ms: u64,
}

/// The ledger's view of a batch and its run, read under the batch row's lock.
struct Claim {
    batch_state: BatchState,
    kind: RunKind,
    run_state: RunState,
    target_key_id: Uuid,
    target: Target,
    stages: Vec<i32>,
    seed: i64,
    cumulative: bool,
    /// Rotate only values under these keys (rollback); `None`: any key but the target.
    source_key_ids: Option<Vec<Uuid>>,
}

/// Claims the batch (the ledger locks its row) and checks the message against the ledger.
async fn claim(
    tx: &tokio_postgres::Transaction<'_>,
    msg: &BatchMessage,
) -> Result<Claim, BatchError> {
    let b = match ledger::claim(tx, msg.run_id, msg.batch_no).await? {
        ledger::Claimed::Batch(b) => b,
        ledger::Claimed::NoBatch => {
            return Err(BatchError::Poison(format!(
                "run {} has no batch {}",
                msg.run_id, msg.batch_no
            )));
        }
        ledger::Claimed::NoRun => {
            return Err(BatchError::Poison(format!("unknown run {}", msg.run_id)));
        }
    };
    if b.table != msg.table
        || b.id_lo != msg.id_lo
        || b.id_hi != msg.id_hi
        || b.stage_no != msg.stage_no
    {
        return Err(BatchError::Poison(format!(
            "batch {} of run {} disagrees with the ledger: message says {} ids {}..={} stage {}, ledger says {} ids {}..={} stage {}",
            msg.batch_no,
            msg.run_id,
            msg.table,
            msg.id_lo,
            msg.id_hi,
            msg.stage_no,
            b.table,
            b.id_lo,
            b.id_hi,
            b.stage_no
        )));
    }
    let b = *b;
    let target = b
        .targets
        .into_iter()
        .find(|t| t.table == b.table)
        .ok_or_else(|| {
            BatchError::Poison(format!(
                "run {} has no target table {}",
                msg.run_id, b.table
            ))
        })?;
    Ok(Claim {
        batch_state: b.state,
        kind: b.run_kind,
        run_state: b.run_state,
        target_key_id: b.target_key_id,
        target,
        stages: b.stages,
        seed: b.seed,
        cumulative: b.cumulative,
        source_key_ids: b.source_key_ids,
    })
}

/// Rotates one batch. Returns what happened; errors say whether a retry can help.
#[tracing::instrument(name = "rotate", skip_all)]
pub async fn rotate_batch(
    pool: &Pool,
    ring: &RingHandle,
    msg: &BatchMessage,
    settings: &BatchSettings,
) -> Result<BatchResult, BatchError> {
    let started = Instant::now();
    let mut client = pool.get().await?;
    let result = rotate_in(&mut client, pool, ring, msg, settings).await;
    if let Err(BatchError::Transient(_)) = &result {
        // A connection that failed mid-transaction may be broken; never reuse it.
        let _ = Object::take(client);
    }
    let (outcome, counts, ops) = result?;
    Ok(BatchResult {
        ops,
        outcome,
        counts,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

async fn rotate_in(
    client: &mut Object,
    pool: &Pool,
    ring_handle: &RingHandle,
    msg: &BatchMessage,
    settings: &BatchSettings,
) -> Result<(Outcome, Counts, OpCounts), BatchError> {
    let tx = client.transaction().await?;
    let limits = format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
        settings.lock_timeout_ms, settings.statement_timeout_ms
    );
    // Sent together (tokio-postgres pipelines requests polled at once; they run in order).
    let (_, claim) = tokio::try_join!(
        async { tx.batch_execute(&limits).await.map_err(BatchError::from) },
        claim(&tx, msg)
    )?;
    match claim.batch_state {
        BatchState::Done | BatchState::Failed => {
            return Ok((Outcome::AlreadyDone, Counts::default(), Vec::new()));
        }
        BatchState::Pending => {
            // The coordinator marks a batch published before it publishes its message, so
            // a message for a pending batch was not sent by it now: a stale copy of a batch
            // `resume` reopened or handed back, or anyone's copy. Never run it (that would
            // bypass the in-flight window and the throttle); the coordinator publishes it.
            tracing::debug!(
                run_id = msg.run_id,
                batch_no = msg.batch_no,
                "message for a batch that is not published: skipped"
            );
            return Ok((Outcome::Skipped, Counts::default(), Vec::new()));
        }
        BatchState::Published => {}
    }
    rekey_common::failpoint!("worker.after_claim");
    if claim.run_state != RunState::Running {
        // Paused, halted or over: hand the batch back so that `resume` publishes it again.
        ledger::hand_back(&*tx, msg.run_id, msg.batch_no).await?;
        tx.commit().await?;
        return Ok((Outcome::Skipped, Counts::default(), Vec::new()));
    }

    // Read the batch's rows of this stage with their versions; nothing is locked yet.
    let target = &claim.target;
    let table = target.quoted_table();
    let id_col = quote_ident(&target.id_column);
    let cols: Vec<String> = target.columns.iter().map(|c| quote_ident(c)).collect();
    let (b_lo, b_hi) = stages::bucket_range(&claim.stages, msg.stage_no).ok_or_else(|| {
        BatchError::Poison(format!("run {} has no stage {}", msg.run_id, msg.stage_no))
    })?;
    // A sweep batch takes every stage up to this one; a normal batch only this stage's slice.
    let b_lo = if claim.cumulative { 0 } else { b_lo };
    let whole = b_lo == 0 && b_hi == stages::BUCKETS;
    let stage_filter = if whole {
        String::new()
    } else {
        format!(
            " AND {} BETWEEN $3 AND $4",
            stages::bucket_sql(&id_col, "$5")
        )
    };
    let select = format!(
        "SELECT {id_col}, {}, {} FROM {table} WHERE {id_col} BETWEEN $1 AND $2{stage_filter} ORDER BY {id_col}",
        Target::VERSION_SQL,
        cols.join(", ")
    );
    let (lo_b, hi_b) = (i64::from(b_lo), i64::from(b_hi) - 1);
    let rows = if whole {
        tx.query(&select, &[&msg.id_lo, &msg.id_hi]).await?
    } else {
        tx.query(
            &select,
            &[&msg.id_lo, &msg.id_hi, &lo_b, &hi_b, &claim.seed],
        )
        .await?
    };
    rekey_common::failpoint!("worker.after_read");
    let (rows, versions) = split_rows(rows, target)?;

    let mut ring = ring_handle.get();
    if !ring.contains(&claim.target_key_id) {
        ring = ring_handle
            .reload(pool)
            .await
            .map_err(BatchError::Transient)?;
    }
    let mut computed = run_compute(ring.clone(), &claim, &rows, settings).await?;
    if !computed.unknown_keys.is_empty() && ring_handle.worth_reloading(&computed.unknown_keys) {
        // Perhaps a key generated after this worker loaded its ring: reload once and redo
        // (the encryptions of the first try still count against the budget).
        let discarded = computed.sealed;
        ring = ring_handle
            .reload(pool)
            .await
            .map_err(BatchError::Transient)?;
        ring_handle.note_missing(&ring, &computed.unknown_keys);
        computed = run_compute(ring.clone(), &claim, &rows, settings).await?;
        computed.sealed += discarded;
    }

    if !computed.ids.is_empty() {
        let read_versions: Vec<i64> = computed.rows_idx.iter().map(|i| versions[*i]).collect();
        let written = write_back(
            &tx,
            target,
            &computed.ids,
            &computed.new_values,
            &read_versions,
        )
        .await?;
        if written.len() != computed.ids.len() {
            // The application wrote these rows after they were read: take back what was
            // computed for them, and do them again with their rows locked.
            let written: HashSet<i64> = written.into_iter().collect();
            let missed: Vec<i64> = computed
                .ids
                .iter()
                .copied()
                .filter(|id| !written.contains(id))
                .collect();
            computed.forget(
                &rows,
                claim.target_key_id,
                &missed.iter().copied().collect(),
            );
            let again = tx
                .query(
                    &format!(
                        "SELECT {id_col}, {}, {} FROM {table} WHERE {id_col} = ANY($1) ORDER BY {id_col} FOR UPDATE",
                        Target::VERSION_SQL,
                        cols.join(", ")
                    ),
                    &[&missed],
                )
                .await?;
            let (rows2, versions2) = split_rows(again, target)?;
            let redo = run_compute(ring.clone(), &claim, &rows2, settings).await?;
            tracing::debug!(
                batch_no = msg.batch_no,
                missed = missed.len(),
                rotated_again = redo.ids.len(),
                "rows written by the application during the batch: read again under lock"
            );
            if !redo.ids.is_empty() {
                let v2: Vec<i64> = redo.rows_idx.iter().map(|i| versions2[*i]).collect();
                let n = write_back(&tx, target, &redo.ids, &redo.new_values, &v2)
                    .await?
                    .len();
                if n != redo.ids.len() {
                    return Err(BatchError::Transient(anyhow::anyhow!(
                        "wrote {n} locked rows of {} in {}; rolled back",
                        redo.ids.len(),
                        target.table
                    )));
                }
            }
            computed.absorb(redo);
        }
    }
    rekey_common::failpoint!("worker.after_write");

    if claim.kind == RunKind::DryRun {
        // Everything but the write: roll the rows back, then record the counts alone.
        drop(tx);
        let tx = client.transaction().await?;
        let still_open = tx
            .query_opt(
                "SELECT 1 FROM rekey.batches WHERE run_id = $1 AND batch_no = $2 AND state NOT IN ('done', 'failed') FOR UPDATE",
                &[&msg.run_id, &msg.batch_no],
            )
            .await?
            .is_some();
        if !still_open {
            return Ok((Outcome::AlreadyDone, Counts::default(), Vec::new()));
        }
        record(&tx, msg, &claim, &computed, settings).await?;
        tx.commit().await?;
    } else {
        record(&tx, msg, &claim, &computed, settings).await?;
        tx.commit().await?;
    }
    Ok((
        Outcome::Done,
        computed.counts,
        computed.audit.into_iter().collect(),
    ))
}

/// Rows as read (id, version, values…) → (id, values) and the versions, in the same order.
/// A column of another type than rekey rotates (an id that is not `bigint`, a value that
/// is not `bytea`) fails the batch, naming the table, the column and the type.
#[allow(clippy::type_complexity)]
fn split_rows(
    rows: Vec<tokio_postgres::Row>,
    target: &Target,
) -> Result<(Vec<(i64, Vec<Option<Vec<u8>>>)>, Vec<i64>), BatchError> {
    let n_cols = target.columns.len();
    let wrong = |r: &tokio_postgres::Row, i: usize, want: &str| {
        let column = if i == 0 {
            target.id_column.as_str()
        } else {
            target.columns[i - 2].as_str()
        };
        BatchError::Failed(format!(
            "{}.{column} is of type {}; rekey needs {want}",
            target.table,
            r.columns()[i].type_().name()
        ))
    };
    let mut versions = Vec::with_capacity(rows.len());
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        versions.push(
            r.try_get(1)
                .map_err(|e| BatchError::Failed(format!("row version: {e}")))?,
        );
        let id: i64 = r
            .try_get(0)
            .map_err(|_| wrong(&r, 0, rekey_common::target::ID_TYPE))?;
        let mut values = Vec::with_capacity(n_cols);
        for i in 2..n_cols + 2 {
            values.push(
                r.try_get::<_, Option<Vec<u8>>>(i)
                    .map_err(|_| wrong(&r, i, rekey_common::target::VALUE_TYPE))?,
            );
        }
        out.push((id, values));
    }
    Ok((out, versions))
}

/// The compare-and-swap write-back ([`Target::write_back_sql`]): the ids it wrote.
async fn write_back(
    tx: &tokio_postgres::Transaction<'_>,
    target: &Target,
    ids: &Vec<i64>,
    new_values: &[Vec<Option<Vec<u8>>>],
    versions: &Vec<i64>,
) -> Result<Vec<i64>, BatchError> {
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![ids];
    for v in new_values {
        params.push(v);
    }
    params.push(versions);
    let rows = tx.query(&target.write_back_sql(), &params).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn run_compute(
    ring: Arc<KeyRing>,
    claim: &Claim,
    rows: &[(i64, Vec<Option<Vec<u8>>>)],
    settings: &BatchSettings,
) -> Result<Computed, BatchError> {
    let n_values = rows.len() * claim.target.columns.len();
    let (target, table, columns) = (
        claim.target_key_id,
        claim.target.table.clone(),
        claim.target.columns.clone(),
    );
    let sources = claim.source_key_ids.clone();
    let result = if n_values > settings.blocking_threshold {
        let rows = rows.to_vec();
        tokio::task::spawn_blocking(move || {
            compute(&ring, target, sources.as_deref(), &table, &columns, &rows)
        })
        .await
        .map_err(|e| BatchError::Transient(anyhow::anyhow!("crypto task failed: {e}")))?
    } else {
        compute(&ring, target, sources.as_deref(), &table, &columns, rows)
    };
    result.map_err(|e| BatchError::Failed(format!("{e:#}")))
}

/// Adds the batch's own encryptions under `key` to the key's count, in the batch's
/// transaction: the key store refuses to pass the budget, whatever other workers counted.
/// (Counted per batch, not per ring: a ring is shared by the batches a worker runs at once,
/// and a batch that rolls back must not take another's counts with it.)
async fn flush_counts(
    tx: &tokio_postgres::Transaction<'_>,
    key: Uuid,
    sealed: u64,
) -> Result<(), BatchError> {
    if sealed == 0 {
        return Ok(());
    }
    store::add_encryptions(tx, &[(key, sealed)])
        .await
        .map_err(|e| match e {
            // The key's budget is spent (by this worker or by others): the batch can never
            // commit under it, and the driver halts the run on these words.
            e @ store::Error::BudgetSpent { .. } => BatchError::Failed(e.to_string()),
            e => BatchError::Transient(anyhow::Error::new(e)),
        })
}

/// Error table, audit entries, encryption counts and the ledger row, in `tx`.
async fn record(
    tx: &tokio_postgres::Transaction<'_>,
    msg: &BatchMessage,
    claim: &Claim,
    computed: &Computed,
    settings: &BatchSettings,
) -> Result<(), BatchError> {
    let errors = async {
        if computed.errors.is_empty() {
            return Ok::<(), BatchError>(());
        }
        let cols: Vec<&str> = computed
            .errors
            .iter()
            .map(|e| claim.target.columns[e.column].as_str())
            .collect();
        let rows: Vec<String> = computed
            .errors
            .iter()
            .map(|e| e.row_id.to_string())
            .collect();
        let keys: Vec<Option<Uuid>> = computed.errors.iter().map(|e| e.key_id).collect();
        let kinds: Vec<&str> = computed.errors.iter().map(|e| e.kind).collect();
        tx.execute(
            "INSERT INTO rekey.decrypt_errors (run_id, batch_no, table_name, column_name, row_id, key_id, error_kind)
             SELECT $1, $2, $3, u.c, u.r, u.k, u.e FROM unnest($4::text[], $5::text[], $6::uuid[], $7::text[]) AS u(c, r, k, e)
             ON CONFLICT (run_id, table_name, column_name, row_id)
             DO UPDATE SET batch_no = EXCLUDED.batch_no, key_id = EXCLUDED.key_id, error_kind = EXCLUDED.error_kind, detected_at = now()",
            &[&msg.run_id, &msg.batch_no, &claim.target.table, &cols, &rows, &keys, &kinds],
        )
        .await?;
        Ok(())
    };
    let mut entries: Vec<AuditEntry> = computed
        .audit
        .iter()
        .map(|((key_id, op, success), n)| AuditEntry {
            key_id: *key_id,
            operation: (*op).to_owned(),
            success: *success,
            n_ops: *n,
            run_id: Some(msg.run_id),
            batch_no: Some(msg.batch_no),
            actor: settings.worker_id.clone(),
            detail: json!({"table": claim.target.table, "kind": claim.kind}),
        })
        .collect();
    entries.sort_by(|a, b| {
        (&a.operation, a.success, a.key_id).cmp(&(&b.operation, b.success, b.key_id))
    });
    // The batch's own audit chain; its tail goes into the ledger row in this transaction.
    let (_, tail) = tokio::try_join!(errors, async {
        audit::record_batch(tx, &entries)
            .await
            .map_err(BatchError::from)
    })?;
    let (tail_id, tail_hash) = tail.last.unzip();
    let c = computed.counts;
    let d = ledger::DoneBatch {
        worker: settings.worker_id.clone(),
        n_rows: c.n_rows,
        n_values: c.n_values,
        n_rotated: c.n_rotated,
        n_skipped: c.n_skipped,
        n_null: c.n_null,
        n_errors: c.n_errors,
        audit_tail_id: tail_id,
        audit_tail: tail_hash,
        audit_entries: tail.entries,
    };
    let done = ledger::mark_done(tx, msg.run_id, msg.batch_no, &d);
    // Last before the commit (pipelined after the ledger write, so it runs after it):
    // every batch updates the key's counter row, so the row lock it takes is held only
    // for the commit.
    tokio::try_join!(
        async { done.await.map_err(BatchError::from) },
        flush_counts(tx, claim.target_key_id, computed.sealed)
    )?;
    Ok(())
}
