//! How commands print: one JSON document on stdout with `--json`, readable text otherwise.
//! Logs go to stderr, so stdout stays parseable.

use serde::Serialize;

/// Prints `value` as pretty JSON.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Formats an optional timestamp for tables.
pub fn when(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| "-".into())
}

/// `value` as JSON on stdout when `json`, else whatever `text` prints.
pub fn print_json_or<T: Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(),
) -> anyhow::Result<()> {
    if json {
        self::json(value)
    } else {
        text();
        Ok(())
    }
}
