//! The error split that decides what happens to a batch next: retry it, dead-letter its
//! message, or dead-letter it and mark the batch failed.

use rekey_common::ledger;
use tokio_postgres::error::SqlState;

/// Why a batch did not complete.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Worth retrying: lock timeout, deadlock, serialization failure, lost connection.
    #[error("transient failure: {0:#}")]
    Transient(anyhow::Error),
    /// The message can never succeed (undecodable, unknown run, disagrees with the
    /// ledger): it goes to the dead-letter queue with this reason; the ledger is untouched.
    #[error("poison message: {0}")]
    Poison(String),
    /// The batch itself can never succeed (its SQL cannot run, verification failed, a key's
    /// nonce budget is spent): the batch is marked failed with this reason and the message
    /// dead-lettered.
    #[error("batch failed: {0}")]
    Failed(String),
}

impl From<tokio_postgres::Error> for BatchError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(e)
    }
}

impl From<ledger::LedgerError> for BatchError {
    fn from(e: ledger::LedgerError) -> Self {
        match e {
            ledger::LedgerError::Db(e) => classify(e),
            // The run's row cannot be read (targets or a state this worker does not know):
            // nothing this message asks can be done.
            e @ (ledger::LedgerError::Unreadable { .. } | ledger::LedgerError::Unknown { .. }) => {
                BatchError::Poison(e.to_string())
            }
            e @ (ledger::LedgerError::Illegal { .. } | ledger::LedgerError::NotFound(_)) => {
                BatchError::Failed(e.to_string())
            }
        }
    }
}

impl From<deadpool_postgres::PoolError> for BatchError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        BatchError::Transient(anyhow::Error::new(e).context("get a database connection"))
    }
}

/// Splits database errors: a missing table or column (SQL class 42) can never succeed;
/// everything else (timeouts, deadlocks, lost connections, shutdowns) is retried.
fn classify(e: tokio_postgres::Error) -> BatchError {
    // A parameter of another type than its column (an `int4` id bound as `int8`): the
    // batch's SQL can never run against this schema.
    if std::error::Error::source(&e).is_some_and(|s| {
        s.downcast_ref::<tokio_postgres::types::WrongType>()
            .is_some()
    }) {
        return BatchError::Failed(format!(
            "a target column's type is not what rekey needs (ids bigint, values bytea): {e}"
        ));
    }
    if let Some(code) = e.code()
        && code.code().starts_with("42")
    {
        return BatchError::Failed(format!(
            "the batch's SQL cannot run: {}",
            e.as_db_error().map(|d| d.message()).unwrap_or("")
        ));
    }
    BatchError::Transient(anyhow::Error::new(e))
}

/// Whether an error is one of the expected contention outcomes (for logs and metrics).
pub fn is_contention(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::QUERY_CANCELED
    )
}

/// The kind of a transient failure, as the worker's presence reports it to `rekey status`:
/// `wrong_master_key`, `lock_timeout`, `deadlock`, `serialization`, `connection` or
/// `other`.
pub fn error_kind(e: &anyhow::Error) -> &'static str {
    for cause in e.chain() {
        if let Some(rekey_common::keys::store::Error::WrongMasterKey { .. }) = cause.downcast_ref()
        {
            return "wrong_master_key";
        }
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            return match pg.code() {
                Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => "lock_timeout",
                Some(c) if *c == SqlState::QUERY_CANCELED => "statement_timeout",
                Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => "deadlock",
                Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => "serialization",
                Some(_) => "database",
                None => "connection",
            };
        }
        if cause
            .downcast_ref::<deadpool_postgres::PoolError>()
            .is_some()
        {
            return "connection";
        }
    }
    "other"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_master_key_is_named_however_deep_in_the_chain() {
        let wrong = rekey_common::keys::store::Error::WrongMasterKey {
            data_key_id: uuid::Uuid::nil(),
            expected: uuid::Uuid::nil(),
            supplied: uuid::Uuid::max(),
        };
        let e = anyhow::Error::new(wrong).context("reload the key ring");
        assert_eq!(error_kind(&e), "wrong_master_key");
        assert_eq!(error_kind(&anyhow::anyhow!("something else")), "other");
    }
}
