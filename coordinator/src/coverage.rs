//! Coverage: the sweep that finds records of a stage still under another key after its
//! batches are done, and cuts them into sweep batches.

use anyhow::Context;
use rekey_common::ledger::{BatchPlan, Run};
use rekey_common::stages;
use rekey_common::target::{Target, quote_ident};
use tokio_postgres::GenericClient;

/// The SQL condition "this value still needs rotating" for column `c` of the run; `$1` is
/// the target key id (bytea) or, for a rollback, the source key ids (bytea[]).
fn needs_rotation(col: &str, run: &Run) -> String {
    let header = format!("substring({col} from 2 for 16)");
    match &run.source_key_ids {
        Some(_) => format!("({col} IS NOT NULL AND {header} = ANY($1::bytea[]))"),
        None => format!("({col} IS NOT NULL AND {header} IS DISTINCT FROM $1::bytea)"),
    }
}

/// Ids of rows of stages up to `stage_no` that still hold a value to rotate, apart from
/// values quarantined in the error table.
pub async fn stragglers<C: GenericClient>(
    c: &C,
    run: &Run,
    target: &Target,
    stage_no: i32,
) -> anyhow::Result<Vec<i64>> {
    let (_, hi) = stages::bucket_range(&run.stages, stage_no).context("stage out of range")?;
    let id = quote_ident(&target.id_column);
    // Column names are bound as parameters ($6, $7, …), never written into the SQL as text.
    let conds: Vec<String> = target
        .columns
        .iter()
        .enumerate()
        .map(|(i, col)| {
            let q = quote_ident(col);
            format!(
                "({} AND NOT EXISTS (SELECT 1 FROM rekey.decrypt_errors e WHERE e.run_id = $2 AND e.table_name = $3
                   AND e.column_name = ${}::text AND e.row_id = t.{id}::text))",
                needs_rotation(&format!("t.{q}"), run),
                i + 6
            )
        })
        .collect();
    let bucket = stages::bucket_sql(&format!("t.{id}"), "$4");
    let sql = format!(
        "SELECT t.{id} FROM {} t WHERE {bucket} < $5::int4 AND ({}) ORDER BY t.{id}",
        target.quoted_table(),
        conds.join(" OR ")
    );
    let target_key = run.target_key_id.as_bytes().to_vec();
    let sources: Vec<Vec<u8>> = run
        .source_key_ids
        .iter()
        .flatten()
        .map(|k| k.as_bytes().to_vec())
        .collect();
    let keys: &(dyn tokio_postgres::types::ToSql + Sync) = if run.source_key_ids.is_some() {
        &sources
    } else {
        &target_key
    };
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![keys, &run.id, &target.table, &run.seed, &hi];
    for col in &target.columns {
        params.push(col);
    }
    let rows = c
        .query(&sql, &params)
        .await
        .with_context(|| format!("coverage sweep of {}", target.table))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Cuts straggler ids into sweep batches of at most `batch_size` ids each.
pub fn sweep_batches(table: &str, stage_no: i32, ids: &[i64], batch_size: usize) -> Vec<BatchPlan> {
    ids.chunks(batch_size.max(1))
        .map(|chunk| BatchPlan {
            stage_no,
            table: table.to_owned(),
            id_lo: chunk[0],
            id_hi: *chunk.last().expect("non-empty chunk"),
            cumulative: true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_batches_cover_every_straggler_in_ranges_of_at_most_batch_size_ids() {
        let ids: Vec<i64> = (0..25).map(|i| i * 7).collect();
        let b = sweep_batches("demo.users", 2, &ids, 10);
        assert_eq!(b.len(), 3);
        assert!(b.iter().all(|p| p.cumulative && p.stage_no == 2));
        assert_eq!((b[0].id_lo, b[0].id_hi), (0, 63));
        assert_eq!((b[2].id_lo, b[2].id_hi), (140, 168));
    }
}
