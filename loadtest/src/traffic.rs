//! Application traffic on the demo schema: writes that encrypt with the active key and
//! record the new plaintext's digest in the same transaction, as an application that owns
//! the data would. The application refreshes its key ring periodically, so it may write
//! under the previous key for a while after a rotation starts; the sweep catches those.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::master::MasterKey;
use rekey_common::keys::ring::KeyRing;
use rekey_common::keys::store;
use sha2::{Digest, Sha256};

/// What the writer did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WriteReport {
    pub updates: u64,
    pub errors: u64,
    /// Updates that waited on a row lock held by a rotation batch for over 100 ms.
    pub slow: u64,
}

/// Updates random `demo.users.email` values (ids 1..=max_id) until `deadline`, each in its
/// own transaction with its digest, reloading the key ring every `refresh`.
pub async fn update_emails(
    pool: &Pool,
    master: Arc<MasterKey>,
    max_id: i64,
    deadline: Duration,
    refresh: Duration,
    seed: u64,
) -> anyhow::Result<WriteReport> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = WriteReport::default();
    let started = Instant::now();
    let mut ring: Arc<KeyRing> = Arc::new(store::load_ring(&**pool.get().await?, &master).await?);
    let mut loaded = Instant::now();
    while started.elapsed() < deadline {
        if loaded.elapsed() > refresh {
            ring = Arc::new(store::load_ring(&**pool.get().await?, &master).await?);
            loaded = Instant::now();
        }
        let id = rng.random_range(1..=max_id);
        let email = format!(
            "updated{}.{}@example.org",
            id,
            rng.random_range(0..1_000_000u32)
        );
        let t0 = Instant::now();
        match write_one(pool, &ring, id, email.as_bytes()).await {
            Ok(true) => report.updates += 1,
            Ok(false) => {}
            Err(e) => {
                report.errors += 1;
                tracing::debug!(error = %format!("{e:#}"), "application write failed");
            }
        }
        if t0.elapsed() > Duration::from_millis(100) {
            report.slow += 1;
        }
    }
    let c = pool.get().await?;
    store::add_encryptions(&**c, &ring.take_encryption_counts()).await?;
    Ok(report)
}

async fn write_one(pool: &Pool, ring: &KeyRing, id: i64, plaintext: &[u8]) -> anyhow::Result<bool> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let loc = FieldLocation {
        table: "demo.users",
        column: "email",
        row_id: id,
    };
    let env = envelope::seal(ring, &loc, plaintext)?;
    let n = tx
        .execute(
            "UPDATE demo.users SET email = $2 WHERE id = $1",
            &[&id, &env],
        )
        .await?;
    if n == 0 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO demo.plaintext_digests (table_name, column_name, row_id, digest) VALUES ('demo.users', 'email', $1, $2)
         ON CONFLICT (table_name, column_name, row_id) DO UPDATE SET digest = EXCLUDED.digest, corrupt = false",
        &[&id, &Sha256::digest(plaintext).to_vec()],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}
