//! The planner: cuts every target table into ID ranges of about `batch_size` rows by walking
//! the ids (one index-only probe per batch boundary), so that sparse or skewed ids still
//! give even batches. The ranges are written to the ledger before anything is published.

use anyhow::Context;
use rekey_common::ledger::BatchPlan;
use rekey_common::target::{Target, quote_ident};
use tokio_postgres::GenericClient;

/// Ranges `[lo, hi]` covering every row of `target` that exists now, each holding
/// `batch_size` rows (the last one fewer). Rows inserted later above the last range are
/// caught by the coverage sweep.
pub async fn ranges<C: GenericClient>(
    c: &C,
    target: &Target,
    batch_size: i64,
) -> anyhow::Result<Vec<(i64, i64)>> {
    let table = target.quoted_table();
    let id = quote_ident(&target.id_column);
    let first: Option<i64> = c
        .query_one(&format!("SELECT min({id}) FROM {table}"), &[])
        .await
        .with_context(|| format!("read the first id of {}", target.table))?
        .get(0);
    let Some(mut lo) = first else {
        return Ok(Vec::new());
    };
    let next_boundary =
        format!("SELECT {id} FROM {table} WHERE {id} >= $1 ORDER BY {id} OFFSET $2 LIMIT 1");
    let last = format!("SELECT max({id}) FROM {table} WHERE {id} >= $1");
    let mut out = Vec::new();
    loop {
        // The id `batch_size` rows on starts the next range.
        let row = c
            .query_opt(&next_boundary, &[&lo, &batch_size])
            .await
            .with_context(|| format!("walk the ids of {}", target.table))?;
        match row {
            Some(r) => {
                let next: i64 = r.get(0);
                out.push((lo, next - 1));
                lo = next;
            }
            None => {
                let hi: i64 = c.query_one(&last, &[&lo]).await?.get(0);
                out.push((lo, hi));
                return Ok(out);
            }
        }
    }
}

/// The batches of every target for one stage.
/// `rows_of(target)` is how many rows of the table one range spans.
pub async fn plan_stage<C: GenericClient>(
    c: &C,
    targets: &[Target],
    stage_no: i32,
    rows_of: &std::collections::HashMap<String, i64>,
) -> anyhow::Result<Vec<BatchPlan>> {
    let mut out = Vec::new();
    for t in targets {
        let batch_size = rows_of.get(&t.table).copied().unwrap_or(1000);
        for (lo, hi) in ranges(c, t, batch_size).await? {
            out.push(BatchPlan {
                stage_no,
                table: t.table.clone(),
                id_lo: lo,
                id_hi: hi,
                cumulative: false,
            });
        }
    }
    Ok(out)
}
