//! The planner walks the ids: even batches on sparse and skewed id spaces.

use rekey_common::target::Target;
use rekey_common::testing::TestDb;
use rekey_coordinator::plan::ranges;

#[tokio::test]
async fn ranges_hold_batch_size_rows_even_when_ids_are_sparse_or_skewed() {
    let db = TestDb::new().await;
    let c = db.pool.get().await.unwrap();
    // Dense 1..=500, then sparse every 97, then one far outlier.
    c.batch_execute(
        "INSERT INTO demo.users (id, name) SELECT g, 'u' FROM generate_series(1, 500) g;
         INSERT INTO demo.users (id, name) SELECT 1000 + g * 97, 'u' FROM generate_series(1, 700) g;
         INSERT INTO demo.users (id, name) VALUES (9000000000, 'far');",
    )
    .await
    .unwrap();
    let target = Target {
        table: "demo.users".into(),
        id_column: "id".into(),
        columns: vec!["email".into()],
    };
    let rs = ranges(&**c, &target, 100).await.unwrap();
    let mut total = 0;
    for (i, (lo, hi)) in rs.iter().enumerate() {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM demo.users WHERE id BETWEEN $1 AND $2",
                &[lo, hi],
            )
            .await
            .unwrap()
            .get(0);
        if i + 1 < rs.len() {
            assert_eq!(n, 100, "range {lo}..={hi}");
            assert_eq!(rs[i + 1].0, hi + 1, "ranges are contiguous");
        } else {
            assert!((1..=100).contains(&n));
        }
        total += n;
    }
    assert_eq!(total, 1201);
    assert_eq!(rs.len(), 13);
    assert_eq!(rs.last().unwrap().1, 9_000_000_000);
    // An empty table plans nothing.
    let empty = Target {
        table: "demo.agents".into(),
        ..target
    };
    assert!(ranges(&**c, &empty, 100).await.unwrap().is_empty());
}

#[tokio::test]
async fn byte_sized_batches_give_small_values_long_ranges_and_large_values_short_ones() {
    use rekey_common::sizing::{MIN_ROWS, avg_row_bytes, rows_for};
    let db = TestDb::new().await;
    let c = db.pool.get().await.unwrap();
    // 20,000 users with 100-byte e-mails; 2,000 conversations with 4,000-byte bodies
    // (random bytes: ciphertext does not compress, so large ones are stored out of line).
    c.batch_execute(
        "INSERT INTO demo.users (id, name, email) SELECT g, 'u', decode(repeat('ab', 100), 'hex') FROM generate_series(1, 20000) g;
         INSERT INTO demo.conversations (id, agent_id, title, body)
           SELECT g, 1, 't', (SELECT string_agg(decode(md5(g::text || i::text), 'hex'), ''::bytea) FROM generate_series(1, 250) i)
             FROM generate_series(1, 2000) g;
         ANALYZE demo.users; ANALYZE demo.conversations;",
    )
    .await
    .unwrap();
    let users = Target {
        table: "demo.users".into(),
        id_column: "id".into(),
        columns: vec!["email".into(), "phone".into()],
    };
    let conversations = Target {
        table: "demo.conversations".into(),
        id_column: "id".into(),
        columns: vec!["body".into(), "summary".into()],
    };
    let u = avg_row_bytes(&**c, &users).await.unwrap().unwrap();
    assert!((u - 100.0).abs() < 0.01, "NULL phones count 0: {u}");
    let b = avg_row_bytes(&**c, &conversations).await.unwrap().unwrap();
    assert!((b - 4000.0).abs() < 0.01, "TOASTed bodies count whole: {b}");
    // 64 KiB batches: 655 users, 16 conversations (raised to the floor).
    assert_eq!(rows_for(&**c, &users, 10_000, 65_536).await.unwrap(), 655);
    assert_eq!(
        rows_for(&**c, &conversations, 10_000, 65_536)
            .await
            .unwrap(),
        MIN_ROWS
    );
    assert_eq!(
        rows_for(&**c, &users, 500, 65_536).await.unwrap(),
        500,
        "the cap"
    );
    assert_eq!(
        rows_for(&**c, &users, 777, 0).await.unwrap(),
        777,
        "sizing off"
    );
    // An empty table has no average; it gets the cap.
    let agents = Target {
        table: "demo.agents".into(),
        id_column: "id".into(),
        columns: vec!["api_key".into()],
    };
    assert_eq!(avg_row_bytes(&**c, &agents).await.unwrap(), None);
    assert_eq!(rows_for(&**c, &agents, 900, 65_536).await.unwrap(), 900);
}
