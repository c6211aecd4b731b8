//! The census: how many values sit under each key, per configured target column, read from
//! the envelope header in SQL (`substring(col from 2 for 16)`) without decrypting anything.
//! It is the proof that a key may be retired.

use anyhow::Context;
use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::target::{Target, quote_ident};

/// Values of one column under one key. `key_id` is `None` for values that are not a valid
/// v1 envelope (wrong version byte or too short).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CensusRow {
    pub table: String,
    pub column: String,
    pub key_id: Option<Uuid>,
    pub n_values: i64,
}

/// Counts the non-NULL values of every target column by the key their header names.
pub async fn census<C: GenericClient>(
    client: &C,
    targets: &[Target],
) -> anyhow::Result<Vec<CensusRow>> {
    let mut out = Vec::new();
    for t in targets {
        for col in &t.columns {
            let c = quote_ident(col);
            let sql = format!(
                "SELECT CASE WHEN length({c}) < 45 OR substring({c} from 1 for 1) <> '\\x01'::bytea THEN NULL
                             ELSE encode(substring({c} from 2 for 16), 'hex')::uuid END AS key_id,
                        count(*)
                   FROM {table} WHERE {c} IS NOT NULL GROUP BY 1 ORDER BY 1",
                table = t.quoted_table()
            );
            let rows = client
                .query(&sql, &[])
                .await
                .with_context(|| format!("census of {}.{col}", t.table))?;
            out.extend(rows.iter().map(|r| CensusRow {
                table: t.table.clone(),
                column: col.clone(),
                key_id: r.get(0),
                n_values: r.get(1),
            }));
        }
    }
    Ok(out)
}

/// The census rows of one key only.
pub async fn usage_of<C: GenericClient>(
    client: &C,
    targets: &[Target],
    key_id: Uuid,
) -> anyhow::Result<Vec<CensusRow>> {
    Ok(census(client, targets)
        .await?
        .into_iter()
        .filter(|r| r.key_id == Some(key_id))
        .collect())
}

/// `demo.users.email: 120, demo.agents.api_key: 3` for messages.
pub fn describe(rows: &[CensusRow]) -> String {
    rows.iter()
        .map(|r| format!("{}.{}: {} values", r.table, r.column, r.n_values))
        .collect::<Vec<_>>()
        .join(", ")
}
