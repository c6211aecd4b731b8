//! The audit log of key usage. Key operations write one entry each; field encryptions and
//! decryptions are aggregated per batch, key, operation and outcome, so that the log stays
//! proportional to the work, not to the rows.

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

/// Appends entries in one statement.
pub async fn record<C: GenericClient>(
    client: &C,
    entries: &[AuditEntry],
) -> Result<(), tokio_postgres::Error> {
    if entries.is_empty() {
        return Ok(());
    }
    let key_ids: Vec<Option<Uuid>> = entries.iter().map(|e| e.key_id).collect();
    let ops: Vec<&str> = entries.iter().map(|e| e.operation.as_str()).collect();
    let success: Vec<bool> = entries.iter().map(|e| e.success).collect();
    let n_ops: Vec<i64> = entries.iter().map(|e| e.n_ops).collect();
    let run_ids: Vec<Option<i64>> = entries.iter().map(|e| e.run_id).collect();
    let batch_nos: Vec<Option<i64>> = entries.iter().map(|e| e.batch_no).collect();
    let actors: Vec<&str> = entries.iter().map(|e| e.actor.as_str()).collect();
    let details: Vec<&Value> = entries.iter().map(|e| &e.detail).collect();
    client
        .execute(
            "INSERT INTO rekey.audit_log (key_id, operation, success, n_ops, run_id, batch_no, actor, detail)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::bool[], $4::int8[], $5::int8[], $6::int8[], $7::text[], $8::jsonb[])",
            &[&key_ids, &ops, &success, &n_ops, &run_ids, &batch_nos, &actors, &details],
        )
        .await?;
    Ok(())
}
