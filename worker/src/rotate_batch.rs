//! The transaction that rotates one batch. In one Postgres transaction it claims the batch
//! in the ledger (a batch already done is skipped), locks the batch's rows in id order
//! (`FOR UPDATE`, never `SKIP LOCKED`), opens each value with the key its header names,
//! seals it under the target key, opens the new value once more to verify it, writes all
//! values back in one `UPDATE … FROM unnest(…)`, records values that failed to decrypt
//! without changing them, appends aggregated audit entries, marks the batch done with its
//! counts, and commits. A dry run does the same and rolls the rows back, then records its
//! counts in a transaction of its own.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::{Object, Pool};
use rekey_common::audit::{self, AuditEntry};
use rekey_common::config::{Target, quote_ident};
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::ring::KeyRing;
use rekey_common::keys::store;
use rekey_common::ledger::RunKind;
use rekey_common::messages::{BatchMessage, Outcome};
use rekey_common::stages;
use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

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
        Self {
            lock_timeout_ms: 2000,
            statement_timeout_ms: 60_000,
            worker_id: "worker".into(),
            blocking_threshold: 256,
        }
    }
}

/// Why a batch did not complete.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Worth retrying: lock timeout, deadlock, serialization failure, lost connection.
    #[error("transient failure: {0:#}")]
    Transient(anyhow::Error),
    /// The message can never succeed (undecodable, unknown run, disagrees with the
    /// ledger): it goes to the dead-letter queue with this reason; the ledger is untouched.
    #[error("poison message: {0}")]
    Poison(String),
    /// The batch itself can never succeed (its SQL cannot run, verification failed, a key's
    /// nonce budget is spent): the batch is marked failed with this reason and the message
    /// dead-lettered.
    #[error("batch failed: {0}")]
    Failed(String),
}

impl From<tokio_postgres::Error> for BatchError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(e)
    }
}

impl From<deadpool_postgres::PoolError> for BatchError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        BatchError::Transient(anyhow::Error::new(e).context("get a database connection"))
    }
}

/// Splits database errors: a missing table or column (SQL class 42) can never succeed;
/// everything else (timeouts, deadlocks, lost connections, shutdowns) is retried.
fn classify(e: tokio_postgres::Error) -> BatchError {
    if let Some(code) = e.code()
        && code.code().starts_with("42")
    {
        return BatchError::Failed(format!(
            "the batch's SQL cannot run: {}",
            e.as_db_error().map(|d| d.message()).unwrap_or("")
        ));
    }
    BatchError::Transient(anyhow::Error::new(e))
}

/// Whether an error is one of the expected contention outcomes (for logs and metrics).
pub fn is_contention(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::QUERY_CANCELED
    )
}

/// The counts a batch records in the ledger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub n_rows: i64,
    pub n_values: i64,
    pub n_rotated: i64,
    pub n_skipped: i64,
    pub n_null: i64,
    pub n_errors: i64,
}

/// (key, operation, success) → number of operations.
pub type OpCounts = Vec<((Option<Uuid>, &'static str, bool), i64)>;

/// The result of one batch.
#[derive(Debug, Clone)]
pub struct BatchResult {
    pub outcome: Outcome,
    /// Crypto operations of a done batch, as audited.
    pub ops: OpCounts,
    pub counts: Counts,
    pub elapsed_ms: u64,
}

/// A value that could not be decrypted: where it is and why; never its bytes.
#[derive(Debug, Clone)]
struct ValueError {
    column: usize,
    row_id: i64,
    key_id: Option<Uuid>,
    kind: &'static str,
}

/// What the crypto of a batch produced.
#[derive(Debug, Default)]
struct Computed {
    ids: Vec<i64>,
    /// Per column, per updated row: the new envelope, or `None` to leave the value alone.
    new_values: Vec<Vec<Option<Vec<u8>>>>,
    errors: Vec<ValueError>,
    /// (key id, operation, success) → number of operations.
    audit: HashMap<(Option<Uuid>, &'static str, bool), i64>,
    counts: Counts,
    /// Key ids named by values that the ring does not hold.
    unknown_keys: HashSet<Uuid>,
}

/// Re-encrypts one batch's values. Pure CPU; no I/O.
fn compute(
    ring: &KeyRing,
    target: Uuid,
    sources: Option<&[Uuid]>,
    table: &str,
    columns: &[String],
    rows: &[(i64, Vec<Option<Vec<u8>>>)],
) -> anyhow::Result<Computed> {
    let target_key = ring
        .get(&target)
        .ok_or_else(|| anyhow::anyhow!("target key {target} is not in the key ring"))?;
    let mut out = Computed {
        new_values: vec![Vec::new(); columns.len()],
        ..Default::default()
    };
    out.counts.n_rows = rows.len() as i64;
    for (row_id, values) in rows {
        let mut changed: Vec<Option<Vec<u8>>> = vec![None; columns.len()];
        let mut any = false;
        for (ci, value) in values.iter().enumerate() {
            let Some(value) = value else {
                out.counts.n_null += 1;
                continue;
            };
            out.counts.n_values += 1;
            let header_key = envelope::key_id(value).ok();
            let not_a_source = match (sources, header_key) {
                (Some(sources), Some(k)) => !sources.contains(&k),
                _ => false,
            };
            if header_key == Some(target) || not_a_source {
                out.counts.n_skipped += 1;
                continue;
            }
            let loc = FieldLocation {
                table,
                column: &columns[ci],
                row_id: *row_id,
            };
            match envelope::open(ring, &loc, value) {
                Err(e) => {
                    if let envelope::Error::UnknownKey { key_id } = e {
                        out.unknown_keys.insert(key_id);
                    }
                    out.errors.push(ValueError {
                        column: ci,
                        row_id: *row_id,
                        key_id: header_key,
                        kind: e.kind(),
                    });
                    *out.audit.entry((header_key, "decrypt", false)).or_default() += 1;
                    out.counts.n_errors += 1;
                }
                Ok(plain) => {
                    *out.audit.entry((header_key, "decrypt", true)).or_default() += 1;
                    let sealed = envelope::seal_with(target_key, &loc, plain.as_bytes())?;
                    // Verify before anything is written: the new value must open to the
                    // same plaintext, or the batch fails whole.
                    let check = envelope::open_with(target_key, &loc, &sealed)
                        .map_err(|e| anyhow::anyhow!("verification of a re-encrypted value failed at {table}.{} row {row_id}: {e}", columns[ci]))?;
                    if check.as_bytes() != plain.as_bytes() {
                        anyhow::bail!(
                            "verification of a re-encrypted value failed at {table}.{} row {row_id}: plaintext differs",
                            columns[ci]
                        );
                    }
                    *out.audit
                        .entry((Some(target), "encrypt", true))
                        .or_default() += 1;
                    *out.audit.entry((Some(target), "verify", true)).or_default() += 1;
                    out.counts.n_rotated += 1;
                    changed[ci] = Some(sealed);
                    any = true;
                }
            }
        }
        if any {
            out.ids.push(*row_id);
            for (ci, v) in changed.into_iter().enumerate() {
                out.new_values[ci].push(v);
            }
        }
    }
    Ok(out)
}

/// The ledger's view of a batch and its run, read under the batch row's lock.
struct Claim {
    batch_state: String,
    kind: RunKind,
    run_state: String,
    target_key_id: Uuid,
    target: Target,
    stages: Vec<i32>,
    seed: i64,
    cumulative: bool,
    /// Rotate only values under these keys (rollback); `None`: any key but the target.
    source_key_ids: Option<Vec<Uuid>>,
}

/// Claims the batch: locks its ledger row and checks the message against the ledger.
async fn claim(
    tx: &tokio_postgres::Transaction<'_>,
    msg: &BatchMessage,
) -> Result<Claim, BatchError> {
    let row = tx
        .query_opt(
            "SELECT b.state, b.table_name, b.id_lo, b.id_hi, b.stage_no, r.kind, r.state, r.target_key_id,
                    r.targets, r.stages, r.seed, b.cumulative, r.source_key_ids
               FROM rekey.batches b JOIN rekey.runs r ON r.id = b.run_id
              WHERE b.run_id = $1 AND b.batch_no = $2
                FOR UPDATE OF b",
            &[&msg.run_id, &msg.batch_no],
        )
        .await?;
    let Some(row) = row else {
        let run_exists = tx
            .query_opt("SELECT 1 FROM rekey.runs WHERE id = $1", &[&msg.run_id])
            .await?
            .is_some();
        return Err(BatchError::Poison(if run_exists {
            format!("run {} has no batch {}", msg.run_id, msg.batch_no)
        } else {
            format!("unknown run {}", msg.run_id)
        }));
    };
    let (table, lo, hi, stage_no): (String, i64, i64, i32) =
        (row.get(1), row.get(2), row.get(3), row.get(4));
    if table != msg.table || lo != msg.id_lo || hi != msg.id_hi || stage_no != msg.stage_no {
        return Err(BatchError::Poison(format!(
            "batch {} of run {} disagrees with the ledger: message says {} ids {}..={} stage {}, ledger says {} ids {}..={} stage {}",
            msg.batch_no,
            msg.run_id,
            msg.table,
            msg.id_lo,
            msg.id_hi,
            msg.stage_no,
            table,
            lo,
            hi,
            stage_no
        )));
    }
    let targets: Vec<Target> = serde_json::from_value(row.get(8)).map_err(|e| {
        BatchError::Poison(format!("run {} has unreadable targets: {e}", msg.run_id))
    })?;
    let target = targets
        .into_iter()
        .find(|t| t.table == table)
        .ok_or_else(|| {
            BatchError::Poison(format!("run {} has no target table {table}", msg.run_id))
        })?;
    let kind = match row.get::<_, &str>(5) {
        "rotation" => RunKind::Rotation,
        "dry_run" => RunKind::DryRun,
        _ => RunKind::Rollback,
    };
    Ok(Claim {
        batch_state: row.get(0),
        kind,
        run_state: row.get(6),
        target_key_id: row.get(7),
        target,
        stages: row.get(9),
        seed: row.get(10),
        cumulative: row.get(11),
        source_key_ids: row.get(12),
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
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
        settings.lock_timeout_ms, settings.statement_timeout_ms
    ))
    .await?;
    let claim = claim(&tx, msg).await?;
    match claim.batch_state.as_str() {
        "done" | "failed" => return Ok((Outcome::AlreadyDone, Counts::default(), Vec::new())),
        _ => {}
    }
    rekey_common::failpoint!("worker.after_claim");
    if claim.run_state != "running" {
        // Paused, halted or over: hand the batch back so that `resume` publishes it again.
        tx.execute(
            "UPDATE rekey.batches SET state = 'pending', lease_until = NULL WHERE run_id = $1 AND batch_no = $2 AND state = 'published'",
            &[&msg.run_id, &msg.batch_no],
        )
        .await?;
        tx.commit().await?;
        return Ok((Outcome::Skipped, Counts::default(), Vec::new()));
    }

    // Lock the batch's rows of this stage in id order.
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
        "SELECT {id_col}, {} FROM {table} WHERE {id_col} BETWEEN $1 AND $2{stage_filter} ORDER BY {id_col} FOR UPDATE",
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
    rekey_common::failpoint!("worker.after_lock");
    let rows: Vec<(i64, Vec<Option<Vec<u8>>>)> = rows
        .into_iter()
        .map(|r| (r.get(0), (1..=cols.len()).map(|i| r.get(i)).collect()))
        .collect();

    let mut ring = ring_handle.get();
    if !ring.contains(&claim.target_key_id) {
        ring = ring_handle
            .reload(pool)
            .await
            .map_err(BatchError::Transient)?;
    }
    let mut computed = run_compute(ring.clone(), &claim, &rows, settings).await?;
    if !computed.unknown_keys.is_empty() && ring_handle.worth_reloading(&computed.unknown_keys) {
        // Perhaps a key generated after this worker loaded its ring: reload once and redo.
        flush_counts(&tx, &ring).await?;
        ring = ring_handle
            .reload(pool)
            .await
            .map_err(BatchError::Transient)?;
        ring_handle.note_missing(&ring, &computed.unknown_keys);
        computed = run_compute(ring.clone(), &claim, &rows, settings).await?;
    }

    if !computed.ids.is_empty() {
        let update = target.write_back_sql();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&computed.ids];
        for v in &computed.new_values {
            params.push(v);
        }
        let n = tx.execute(&update, &params).await?;
        if n != computed.ids.len() as u64 {
            return Err(BatchError::Transient(anyhow::anyhow!(
                "wrote {n} rows of {} in {}; rolled back",
                computed.ids.len(),
                target.table
            )));
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
        record(&tx, msg, &claim, &computed, &ring, settings).await?;
        tx.commit().await?;
    } else {
        record(&tx, msg, &claim, &computed, &ring, settings).await?;
        tx.commit().await?;
    }
    Ok((
        Outcome::Done,
        computed.counts,
        computed.audit.into_iter().collect(),
    ))
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

async fn flush_counts(
    tx: &tokio_postgres::Transaction<'_>,
    ring: &KeyRing,
) -> Result<(), BatchError> {
    store::add_encryptions(tx, &ring.take_encryption_counts())
        .await
        .map_err(|e| BatchError::Transient(anyhow::Error::new(e)))
}

/// Error table, audit entries, encryption counts and the ledger row, in `tx`.
async fn record(
    tx: &tokio_postgres::Transaction<'_>,
    msg: &BatchMessage,
    claim: &Claim,
    computed: &Computed,
    ring: &KeyRing,
    settings: &BatchSettings,
) -> Result<(), BatchError> {
    if !computed.errors.is_empty() {
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
    }
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
    let tail = audit::record_batch(tx, &entries).await?;
    let (tail_id, tail_hash) = tail.last.unzip();
    let c = computed.counts;
    tx.execute(
        "UPDATE rekey.batches SET state = 'done', done_at = now(), lease_until = NULL, worker = $3,
                n_rows = $4, n_values = $5, n_rotated = $6, n_skipped = $7, n_null = $8, n_errors = $9, error = NULL,
                audit_tail_id = $10, audit_tail = $11, audit_entries = $12
          WHERE run_id = $1 AND batch_no = $2",
        &[
            &msg.run_id,
            &msg.batch_no,
            &settings.worker_id,
            &c.n_rows,
            &c.n_values,
            &c.n_rotated,
            &c.n_skipped,
            &c.n_null,
            &c.n_errors,
            &tail_id,
            &tail_hash,
            &tail.entries,
        ],
    )
    .await?;
    // Last before the commit: every batch updates the key's counter row, so the row lock
    // it takes is held only for the commit, not across the ledger write.
    flush_counts(tx, ring).await?;
    Ok(())
}
