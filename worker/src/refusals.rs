//! Messages refused before they are authenticated (undecodable, another format version, a
//! tag that does not verify) come from whoever can publish on the broker, in any number.
//! Each is still logged and dead-lettered (the dead-letter queue has a length limit), but
//! the audit log gets one control-chain entry per kind of refusal per minute with the
//! count, not one per message, so that a flood cannot grow the audit chain without bound.
//! Refusals of authenticated orders (a batch the ledger does not know, a table outside the
//! run's targets) are audited one by one: only a holder of the master key can send them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rekey_common::audit::{self, AuditEntry};
use serde_json::json;

/// How often the counts are written (and at the worker's clean stop).
pub const FLUSH_EVERY: Duration = Duration::from_secs(60);

/// The audit entries' `operation`.
pub const OPERATION: &str = "refused_messages";

#[derive(Debug)]
struct Tally {
    count: i64,
    bytes: u64,
    first_at: DateTime<Utc>,
    last_at: DateTime<Utc>,
    /// The first refusal's reason (already cut to 256 bytes).
    sample: String,
}

/// Refusals counted since the last flush, by kind.
#[derive(Debug)]
pub struct Refusals {
    tallies: Mutex<BTreeMap<&'static str, Tally>>,
    last_flush: Mutex<Instant>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            tallies: Mutex::new(BTreeMap::new()),
            last_flush: Mutex::new(Instant::now()),
        }
    }
}

impl Refusals {
    /// Counts one refused message of `kind` (`reason` is already bounded).
    pub fn note(&self, kind: &'static str, reason: &str, bytes: usize) {
        let now = Utc::now();
        let mut tallies = self.tallies.lock().expect("refusals lock");
        let t = tallies.entry(kind).or_insert_with(|| Tally {
            count: 0,
            bytes: 0,
            first_at: now,
            last_at: now,
            sample: reason.to_owned(),
        });
        t.count += 1;
        t.bytes += bytes as u64;
        t.last_at = now;
    }

    /// Writes the counts if [`FLUSH_EVERY`] has passed since the last write.
    pub async fn flush_due(&self, pool: &Pool, actor: &str) {
        let due = self.last_flush.lock().expect("refusals lock").elapsed() >= FLUSH_EVERY;
        if due {
            self.flush(pool, actor).await;
        }
    }

    /// Writes one control-chain entry per kind counted since the last write. Counts that
    /// cannot be written are kept for the next flush.
    pub async fn flush(&self, pool: &Pool, actor: &str) {
        *self.last_flush.lock().expect("refusals lock") = Instant::now();
        let taken = std::mem::take(&mut *self.tallies.lock().expect("refusals lock"));
        if taken.is_empty() {
            return;
        }
        let entries: Vec<AuditEntry> = taken
            .iter()
            .map(|(kind, t)| AuditEntry {
                key_id: None,
                operation: OPERATION.into(),
                success: false,
                n_ops: t.count,
                run_id: None,
                batch_no: None,
                actor: actor.to_owned(),
                detail: json!({
                    "kind": kind,
                    "count": t.count,
                    "bytes": t.bytes,
                    "first_at": t.first_at,
                    "last_at": t.last_at,
                    "first_reason": t.sample,
                }),
            })
            .collect();
        let written = async {
            audit::record(&**pool.get().await?, &entries).await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %format!("{e:#}"), "could not audit refused messages; kept for the next try");
            let mut tallies = self.tallies.lock().expect("refusals lock");
            for (kind, t) in taken {
                match tallies.get_mut(kind) {
                    Some(now) => {
                        now.count += t.count;
                        now.bytes += t.bytes;
                        now.first_at = t.first_at;
                        now.sample = t.sample;
                    }
                    None => {
                        tallies.insert(kind, t);
                    }
                }
            }
        }
    }
}
