//! Seeding is deterministic from its seed, and verification catches every kind of damage.

use std::sync::Arc;

use rekey_common::keys::master::{decode_base64_key, generate_base64};
use rekey_common::keys::store;
use rekey_common::testing::TestDb;
use rekey_loadtest::seed::{SeedOptions, seed};
use rekey_loadtest::verify::verify;
use secrecy::ExposeSecret;

async fn seeded(
    seed_value: u64,
    rows: i64,
    corrupt: f64,
) -> (TestDb, Arc<rekey_common::keys::ring::KeyRing>) {
    let db = TestDb::new().await;
    let master = decode_base64_key("t", generate_base64().expose_secret()).unwrap();
    let mut c = db.pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    store::init(&tx, &master, &Default::default(), "test")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let ring = Arc::new(store::load_ring(&**c, &master).await.unwrap());
    let opts = SeedOptions {
        rows,
        seed: seed_value,
        corrupt_fraction: corrupt,
        chunk: 700,
    };
    let report = seed(&db.pool, ring.clone(), &opts).await.unwrap();
    assert_eq!(report.rows, rows);
    (db, ring)
}

async fn digest_of_plaintexts(db: &TestDb) -> String {
    db.pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT md5(string_agg(table_name || column_name || row_id || encode(digest, 'hex'), ',' ORDER BY 1))
               FROM demo.plaintext_digests",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn seeding_is_deterministic_from_its_seed_and_sizes_are_realistic() {
    let (a, _) = seeded(42, 3_000, 0.0).await;
    let (b, _) = seeded(42, 3_000, 0.0).await;
    let (c, _) = seeded(43, 3_000, 0.0).await;
    assert_eq!(
        digest_of_plaintexts(&a).await,
        digest_of_plaintexts(&b).await
    );
    assert_ne!(
        digest_of_plaintexts(&a).await,
        digest_of_plaintexts(&c).await
    );
    let client = a.pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT min(length(body)) - 45, max(length(body)) - 45, avg(length(email)) - 45 FROM demo.conversations, demo.users",
            &[],
        )
        .await
        .unwrap();
    let (min_body, max_body): (i32, i32) = (row.get(0), row.get(1));
    assert!(
        min_body >= 200 && max_body > 2000 && max_body <= 4096,
        "bodies {min_body}..{max_body} bytes"
    );
    // Sparse and skewed ids, for the planner.
    let gaps: i64 = client
        .query_one("SELECT max(id) - count(*) FROM demo.conversations", &[])
        .await
        .unwrap()
        .get(0);
    assert!(gaps > 100_000);
}

#[tokio::test]
async fn verification_reports_every_kind_of_damage_by_location() {
    let (db, ring) = seeded(1, 1_000, 0.02).await;
    let clean = verify(&db.pool, &ring, None, 300).await.unwrap();
    assert!(clean.passed(), "{clean:?}");
    assert!(clean.corrupt_as_planted > 0);
    let c = db.pool.get().await.unwrap();
    // A value swapped between rows, a deleted row, and a value set to NULL.
    c.batch_execute(
        "UPDATE demo.users SET email = (SELECT email FROM demo.users WHERE id = 2) WHERE id = 1;
         DELETE FROM demo.agents WHERE id = 4;
         UPDATE demo.conversations SET body = NULL WHERE id = 3;",
    )
    .await
    .unwrap();
    let r = verify(&db.pool, &ring, None, 300).await.unwrap();
    assert!(!r.passed());
    assert!(r.undecryptable >= 1 || r.corrupt_as_planted != clean.corrupt_as_planted);
    assert!(r.missing >= 2, "{r:?}");
    assert!(
        r.examples
            .iter()
            .any(|e| e.starts_with("demo.agents.api_key row 4")),
        "{:?}",
        r.examples
    );
}
