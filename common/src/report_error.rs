//! An error as a person reads it: the chain of causes, each said once. Libraries often
//! put their cause into their own message too (tokio-postgres: "db error: ERROR: …"), so
//! `{:#}` would print it twice or three times.

/// `e` and its causes, outermost first, `": "` between them, skipping a cause whose text
/// the message already holds.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("db error: {0}")]
    struct Wraps(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("ERROR: relation \"x\" does not exist")]
    struct Inner;

    #[test]
    fn each_cause_is_said_once_and_in_order() {
        let e = anyhow::Error::new(Wraps(Inner)).context("key store query failed");
        assert_eq!(
            error_text(&e),
            "key store query failed: db error: ERROR: relation \"x\" does not exist"
        );
        let plain = anyhow::anyhow!("outer").context("context");
        assert_eq!(error_text(&plain), "context: outer");
    }
}
