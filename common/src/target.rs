//! Targets: the encrypted tables rekey rotates (`[[targets]]` in `rekey.toml`), checked
//! as identifiers before they go into SQL, and the SQL built from them.

use anyhow::bail;
use serde::{Deserialize, Serialize};

/// One encrypted table: its name (optionally schema-qualified), its integer primary key
/// column, and the encrypted `bytea` columns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub table: String,
    #[serde(default = "default_id_column")]
    pub id_column: String,
    pub columns: Vec<String>,
}

fn default_id_column() -> String {
    "id".to_owned()
}

impl Target {
    /// The table name quoted for SQL (`"demo"."users"`).
    pub fn quoted_table(&self) -> String {
        self.table
            .split('.')
            .map(quote_ident)
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The row version a batch reads beside each row and hands back to
    /// [`write_back_sql`](Self::write_back_sql): the row's `xmin` (the transaction that
    /// wrote this version of the row), as `int8`. Any write to the row makes a new version
    /// with another `xmin`; locking it (`FOR SHARE`, a foreign key check) does not.
    pub const VERSION_SQL: &'static str = "xmin::text::int8";

    /// The one write-back statement of a batch, a compare-and-swap: `$1` the ids
    /// (`int8[]`), `$2…` one `bytea[]` per column in order (a NULL element leaves that value
    /// unchanged), then the versions the rows had when read (`int8[]`, see
    /// [`VERSION_SQL`](Self::VERSION_SQL)). A row written by anyone else since it was read
    /// is left alone; the statement returns the ids it wrote. Under READ COMMITTED an
    /// UPDATE that meets a row being written waits for that writer and then rechecks the
    /// condition against the row's newest version, so no application write is ever lost.
    pub fn write_back_sql(&self) -> String {
        let id = quote_ident(&self.id_column);
        let cols: Vec<String> = self.columns.iter().map(|c| quote_ident(c)).collect();
        let sets: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = COALESCE(u.c{i}, t.{c})"))
            .collect();
        let args: Vec<String> = (0..cols.len())
            .map(|i| format!("${}::bytea[]", i + 2))
            .collect();
        let aliases: Vec<String> = (0..cols.len()).map(|i| format!("c{i}")).collect();
        format!(
            "UPDATE {} AS t SET {} FROM unnest($1::int8[], {}, ${}::int8[]) AS u(id, {}, v) \
             WHERE t.{id} = u.id AND t.{} = u.v RETURNING t.{id}",
            self.quoted_table(),
            sets.join(", "),
            args.join(", "),
            cols.len() + 2,
            aliases.join(", "),
            Self::VERSION_SQL,
        )
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let parts: Vec<&str> = self.table.split('.').collect();
        if parts.len() > 2 || parts.iter().any(|p| !is_identifier(p)) {
            bail!(
                "target table {:?} is not a valid [schema.]table name (letters, digits and _ only)",
                self.table
            );
        }
        if !is_identifier(&self.id_column) {
            bail!(
                "target {}: id_column {:?} is not a valid column name",
                self.table,
                self.id_column
            );
        }
        if self.columns.is_empty() {
            bail!("target {}: no encrypted columns listed", self.table);
        }
        for c in &self.columns {
            if !is_identifier(c) {
                bail!(
                    "target {}: column {c:?} is not a valid column name",
                    self.table
                );
            }
        }
        Ok(())
    }
}

/// Whether `s` is a plain SQL identifier, safe to quote into statements.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}

/// Quotes an identifier that `is_identifier` accepted.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The demo application's targets: what `rekey demo` and the load-test tools rotate. Never
/// a default for anything else: without `[[targets]]` commands refuse
/// ([`Settings::require_targets`]).
pub fn demo_targets() -> Vec<Target> {
    let t = |table: &str, cols: &[&str]| Target {
        table: table.to_owned(),
        id_column: "id".to_owned(),
        columns: cols.iter().map(|c| (*c).to_owned()).collect(),
    };
    vec![
        t("demo.users", &["email", "phone"]),
        t("demo.agents", &["api_key", "system_prompt"]),
        t("demo.conversations", &["body", "summary"]),
    ]
}

/// `targets` as `rekey.toml` writes them (for tools that hand a configuration to rekey's
/// binaries, e.g. the demo's targets to a load test's coordinator).
pub fn targets_toml(targets: &[Target]) -> String {
    let mut out = String::new();
    for t in targets {
        let cols: Vec<String> = t.columns.iter().map(|c| format!("{c:?}")).collect();
        out.push_str(&format!(
            "[[targets]]\ntable = {:?}\nid_column = {:?}\ncolumns = [{}]\n\n",
            t.table,
            t.id_column,
            cols.join(", ")
        ));
    }
    out
}

/// The column types rekey rotates: the id column `bigint` (`int8`: every batch reads and
/// binds ids as 64-bit integers), the encrypted columns `bytea` (rekey envelopes).
pub const ID_TYPE: &str = "bigint";
pub const VALUE_TYPE: &str = "bytea";

/// What is wrong with the targets' tables in the database: each problem names the table,
/// the column and the type found. Empty when every target can be rotated.
pub async fn schema_problems<C: tokio_postgres::GenericClient>(
    c: &C,
    targets: &[Target],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    for t in targets {
        // Names are bound as parameters, never written into the SQL.
        let exists: bool = c
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t.quoted_table()])
            .await?
            .get(0);
        if !exists {
            problems.push(format!("table {} does not exist", t.table));
            continue;
        }
        let mut wanted = vec![(t.id_column.as_str(), ID_TYPE, "its id column")];
        wanted.extend(
            t.columns
                .iter()
                .map(|col| (col.as_str(), VALUE_TYPE, "an encrypted column")),
        );
        for (column, want, role) in wanted {
            let found: Option<String> = c
                .query_opt(
                    "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                      WHERE a.attrelid = to_regclass($1) AND a.attname = $2
                        AND a.attnum > 0 AND NOT a.attisdropped",
                    &[&t.quoted_table(), &column],
                )
                .await?
                .map(|r| r.get(0));
            match found {
                None => problems.push(format!("{}.{column} ({role}) does not exist", t.table)),
                Some(ty) if ty != want => problems.push(format!(
                    "{}.{column} ({role}) is {ty}; rekey needs {want}",
                    t.table
                )),
                Some(_) => {}
            }
        }
    }
    Ok(problems)
}
