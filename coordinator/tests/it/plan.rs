//! The planner walks the ids: even batches on sparse and skewed id spaces.

use rekey_common::config::Target;
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
