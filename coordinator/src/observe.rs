//! Observation: while a stage is observed, random samples of what it rotated are read back
//! and decrypted; any failure breaches the stage.

use anyhow::Context;
use rand::RngExt;
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::ring::KeyRing;
use rekey_common::ledger::Run;
use rekey_common::stages;
use rekey_common::target::quote_ident;
use serde::Serialize;
use tokio_postgres::GenericClient;

/// What one observation check found.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct ObservationFigures {
    pub checks: u64,
    pub values_read: u64,
    pub failures: u64,
}

/// Re-reads a random sample of rows of stages up to `stage_no` and decrypts every value
/// under the run's target key (what the run wrote, or for a rollback what it restored),
/// apart from values a run already quarantined. Returns (values read, failures with where).
pub async fn observe_sample<C: GenericClient>(
    c: &C,
    run: &Run,
    ring: &KeyRing,
    stage_no: i32,
) -> anyhow::Result<(u64, Vec<String>)> {
    let (_, hi) = stages::bucket_range(&run.stages, stage_no).context("stage out of range")?;
    let mut read = 0;
    let mut failures = Vec::new();
    for t in &run.targets {
        let id = quote_ident(&t.id_column);
        let bounds = c
            .query_one(
                &format!("SELECT min({id}), max({id}) FROM {}", t.quoted_table()),
                &[],
            )
            .await?;
        let (Some(lo), Some(hi_id)) = (
            bounds.get::<_, Option<i64>>(0),
            bounds.get::<_, Option<i64>>(1),
        ) else {
            continue;
        };
        let start = rand::rng().random_range(lo..=hi_id);
        let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
        let sql = format!(
            "SELECT {id}, {} FROM {} WHERE {id} >= $1 AND {} < $2::int4 ORDER BY {id} LIMIT $3",
            cols.join(", "),
            t.quoted_table(),
            stages::bucket_sql(&id, "$4")
        );
        let rows = c
            .query(
                &sql,
                &[&start, &hi, &run.settings.observe_sample, &run.seed],
            )
            .await?;
        for r in &rows {
            let row_id: i64 = r.get(0);
            for (i, col) in t.columns.iter().enumerate() {
                let Some(v) = r.get::<_, Option<Vec<u8>>>(i + 1) else {
                    continue;
                };
                // Only what this run wrote is under observation: values under other keys
                // (quarantined ones, or the values a rollback leaves alone) are not its doing.
                if envelope::key_id(&v).ok() != Some(run.target_key_id) {
                    continue;
                }
                read += 1;
                let loc = FieldLocation {
                    table: &t.table,
                    column: col,
                    row_id,
                };
                if let Err(e) = envelope::open(ring, &loc, &v) {
                    // A value some run already found undecryptable and left alone (a
                    // rollback's target key holds the originals of those) is known, not new.
                    let known: bool = c
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM rekey.decrypt_errors WHERE table_name = $1
                               AND column_name = $2 AND row_id = $3)",
                            &[&t.table, col, &row_id.to_string()],
                        )
                        .await?
                        .get(0);
                    if !known {
                        failures.push(format!("{}.{col} row {row_id}: {e}", t.table));
                    }
                }
            }
        }
    }
    Ok((read, failures))
}
