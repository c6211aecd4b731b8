//! The audit log of key usage. Key operations write one entry each; field encryptions and
//! decryptions are aggregated per batch, key, operation and outcome, so that the log stays
//! proportional to the work, not to the rows.
//!
//! The log is a hash chain (migration V5): a trigger gives every entry the hash of its
//! predecessor and its own. [`record`] appends to the control chain (key operations, run
//! events, dead letters, seals); [`record_batch`] to the chain of one batch, inside the
//! batch's transaction, and returns its tail for the batch's ledger row; [`stage_seal`]
//! makes the entry that seals a stage's batch chains into the control chain; [`verify`]
//! checks it all.

pub mod verify;

pub use verify::{VerifyOptions, VerifyReport, verify};

use serde_json::Value;
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// One audit entry. `detail` must never hold key material or plaintext.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub key_id: Option<Uuid>,
    /// `generate`, `wrap`, `activate`, `rewrap`, `retire`, `destroy`, `encrypt`, `decrypt`, …
    pub operation: String,
    pub success: bool,
    pub n_ops: i64,
    pub run_id: Option<i64>,
    pub batch_no: Option<i64>,
    pub actor: String,
    pub detail: Value,
}

impl AuditEntry {
    /// A single successful key operation by `actor`.
    pub fn key_op(key_id: Uuid, operation: &str, actor: &str, detail: Value) -> Self {
        Self {
            key_id: Some(key_id),
            operation: operation.to_owned(),
            success: true,
            n_ops: 1,
            run_id: None,
            batch_no: None,
            actor: actor.to_owned(),
            detail,
        }
    }
}

impl AuditEntry {
    /// A successful or failed event of run `run_id` that no batch owns (a stage start, a
    /// gate decision, an operator action), about the run's target key.
    pub fn run_event(
        run_id: i64,
        key_id: Uuid,
        operation: &str,
        success: bool,
        actor: &str,
        detail: Value,
    ) -> Self {
        Self {
            key_id: Some(key_id),
            operation: operation.to_owned(),
            success,
            n_ops: 1,
            run_id: Some(run_id),
            batch_no: None,
            actor: actor.to_owned(),
            detail,
        }
    }
}

/// Appends entries to the control chain in one statement. The chain's head row stays
/// locked until the caller's transaction ends: keep such transactions short.
pub async fn record<C: GenericClient>(
    client: &C,
    entries: &[AuditEntry],
) -> Result<(), tokio_postgres::Error> {
    insert(client, entries, "control").await.map(|_| ())
}

/// The end of a batch's chain, recorded in its ledger row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchTail {
    /// The last entry's id and hash (`None` when the batch wrote no entry).
    pub last: Option<(i64, Vec<u8>)>,
    pub entries: i32,
}

/// Appends a batch's entries (each must name the batch) to the batch's own chain, in the
/// batch's transaction. Returns the chain's tail.
pub async fn record_batch<C: GenericClient>(
    client: &C,
    entries: &[AuditEntry],
) -> Result<BatchTail, tokio_postgres::Error> {
    let rows = insert(client, entries, "batch").await?;
    Ok(BatchTail {
        last: rows.into_iter().max_by_key(|(id, _)| *id),
        entries: entries.len() as i32,
    })
}

/// The entry that seals the chains of a stage's batches into the control chain: a digest
/// of every batch's (number, tail hash, entry count), read from the ledger. `rekey audit
/// verify` recomputes it from the entries themselves.
pub async fn stage_seal<C: GenericClient>(
    client: &C,
    run_id: i64,
    key_id: Uuid,
    stage_no: i32,
    actor: &str,
) -> Result<AuditEntry, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT batch_no, audit_tail, COALESCE(audit_entries, 0) FROM rekey.batches
              WHERE run_id = $1 AND stage_no = $2 ORDER BY batch_no",
            &[&run_id, &stage_no],
        )
        .await?;
    let tails: Vec<(i64, Option<Vec<u8>>, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(AuditEntry::run_event(
        run_id,
        key_id,
        "audit_seal",
        true,
        actor,
        serde_json::json!({
            "stage_no": stage_no,
            "batches": tails.len(),
            "digest": verify::seal_digest(&tails),
        }),
    ))
}

async fn insert<C: GenericClient>(
    client: &C,
    entries: &[AuditEntry],
    chain: &str,
) -> Result<Vec<(i64, Vec<u8>)>, tokio_postgres::Error> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let key_ids: Vec<Option<Uuid>> = entries.iter().map(|e| e.key_id).collect();
    let ops: Vec<&str> = entries.iter().map(|e| e.operation.as_str()).collect();
    let success: Vec<bool> = entries.iter().map(|e| e.success).collect();
    let n_ops: Vec<i64> = entries.iter().map(|e| e.n_ops).collect();
    let run_ids: Vec<Option<i64>> = entries.iter().map(|e| e.run_id).collect();
    let batch_nos: Vec<Option<i64>> = entries.iter().map(|e| e.batch_no).collect();
    let actors: Vec<&str> = entries.iter().map(|e| e.actor.as_str()).collect();
    let details: Vec<&Value> = entries.iter().map(|e| &e.detail).collect();
    // WITH ORDINALITY keeps the entries' order, which is the order of their ids and of
    // their chain.
    let rows = client
        .query(
            "INSERT INTO rekey.audit_log (key_id, operation, success, n_ops, run_id, batch_no, actor, detail, chain)
             SELECT k, o, s, n, r, b, a, d, $9 FROM unnest($1::uuid[], $2::text[], $3::bool[], $4::int8[], $5::int8[], $6::int8[], $7::text[], $8::jsonb[])
                    WITH ORDINALITY AS u(k, o, s, n, r, b, a, d, i) ORDER BY i
             RETURNING id, hash",
            &[&key_ids, &ops, &success, &n_ops, &run_ids, &batch_nos, &actors, &details, &chain],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
