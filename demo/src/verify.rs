//! Verification: every value of the demo tables decrypts to the plaintext whose digest
//! was recorded when it was written; planted corrupt values are still undecryptable (never
//! "repaired" into something else); nothing is missing. Counts by key and by outcome.

use std::collections::BTreeMap;

use deadpool_postgres::Pool;
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::ring::KeyRing;
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The tables and columns the load test writes.
pub const COLUMNS: [(&str, &str); 6] = [
    ("demo.users", "email"),
    ("demo.users", "phone"),
    ("demo.agents", "api_key"),
    ("demo.agents", "system_prompt"),
    ("demo.conversations", "body"),
    ("demo.conversations", "summary"),
];

/// What verification found.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct VerifyReport {
    /// Values that decrypted to their recorded plaintext.
    pub ok: i64,
    /// Planted corrupt values, still undecryptable (as they must be).
    pub corrupt_as_planted: i64,
    /// Values that decrypted to something else than what was written.
    pub mismatched: i64,
    /// Values that should decrypt and do not.
    pub undecryptable: i64,
    /// Values recorded as written but missing (row gone or value NULL).
    pub missing: i64,
    /// Values present that were never recorded.
    pub unrecorded: i64,
    /// Values by the key their header names ("malformed" when there is no valid header).
    pub by_key: BTreeMap<String, i64>,
    /// Decryptable values not under the expected key, when one was given.
    pub not_on_expected_key: i64,
    /// Up to 20 examples of failures, by location (never by value).
    pub examples: Vec<String>,
}

impl VerifyReport {
    /// Whether every value is accounted for.
    pub fn passed(&self) -> bool {
        self.mismatched == 0
            && self.undecryptable == 0
            && self.missing == 0
            && self.unrecorded == 0
            && self.not_on_expected_key == 0
    }

    fn example(&mut self, s: String) {
        if self.examples.len() < 20 {
            self.examples.push(s);
        }
    }
}

/// Verifies every value of the demo tables, `chunk` rows at a time.
pub async fn verify(
    pool: &Pool,
    ring: &KeyRing,
    expect_key: Option<Uuid>,
    chunk: i64,
) -> anyhow::Result<VerifyReport> {
    let client = pool.get().await?;
    let mut r = VerifyReport::default();
    for (table, column) in COLUMNS {
        let mut after = i64::MIN;
        loop {
            let rows = client
                .query(
                    &format!(
                        "WITH t AS (SELECT id, {column} AS v FROM {table} WHERE id > $1 ORDER BY id LIMIT $2),
                              d AS (SELECT row_id, digest, corrupt FROM demo.plaintext_digests
                                     WHERE table_name = $3 AND column_name = $4 AND row_id > $1
                                       AND row_id <= COALESCE((SELECT max(id) FROM t), $1))
                         SELECT COALESCE(t.id, d.row_id) AS id, t.v, d.digest, d.corrupt, t.id IS NOT NULL AS has_row
                           FROM t FULL JOIN d ON d.row_id = t.id ORDER BY 1"
                    ),
                    &[&after, &chunk, &table, &column],
                )
                .await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let id: i64 = row.get(0);
                let value: Option<Vec<u8>> = row.get(1);
                let digest: Option<Vec<u8>> = row.get(2);
                let corrupt: Option<bool> = row.get(3);
                after = after.max(id);
                let at = format!("{table}.{column} row {id}");
                match (value, digest) {
                    (None, None) => {}
                    (None, Some(_)) => {
                        r.missing += 1;
                        r.example(format!("{at}: missing"));
                    }
                    (Some(_), None) => {
                        r.unrecorded += 1;
                        r.example(format!("{at}: value never recorded"));
                    }
                    (Some(v), Some(d)) => {
                        let key = envelope::key_id(&v)
                            .map(|k| k.to_string())
                            .unwrap_or_else(|_| "malformed".into());
                        *r.by_key.entry(key).or_default() += 1;
                        let loc = FieldLocation {
                            table,
                            column,
                            row_id: id,
                        };
                        match (envelope::open(ring, &loc, &v), corrupt.unwrap_or(false)) {
                            (Ok(p), false)
                                if Sha256::digest(p.as_bytes()).as_slice() == d.as_slice() =>
                            {
                                r.ok += 1;
                                if let Some(k) = expect_key
                                    && envelope::key_id(&v).ok() != Some(k)
                                {
                                    r.not_on_expected_key += 1;
                                    r.example(format!("{at}: not under the expected key"));
                                }
                            }
                            (Ok(_), _) => {
                                r.mismatched += 1;
                                r.example(format!("{at}: decrypts to another plaintext"));
                            }
                            (Err(_), true) => r.corrupt_as_planted += 1,
                            (Err(e), false) => {
                                r.undecryptable += 1;
                                r.example(format!("{at}: {e}"));
                            }
                        }
                    }
                }
            }
            // The last id of the chunk: rows of t, or digests only (rows deleted).
            if rows.len() < chunk as usize {
                let more: bool = client
                    .query_one(
                        &format!(
                            "SELECT EXISTS (SELECT 1 FROM {table} WHERE id > $1)
                                 OR EXISTS (SELECT 1 FROM demo.plaintext_digests WHERE table_name = $2 AND column_name = $3 AND row_id > $1)"
                        ),
                        &[&after, &table, &column],
                    )
                    .await?
                    .get(0);
                if !more {
                    break;
                }
            }
        }
    }
    Ok(r)
}
