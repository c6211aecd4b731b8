//! The latency probe against a real database: point reads and a committed write in turn.

use std::time::Duration;

use rekey_common::testing::TestDb;
use rekey_coordinator::probe;

/// Counts the probe's writes with a trigger on its table.
async fn count_writes(db: &TestDb) {
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE public.probe_writes (n int NOT NULL);
             INSERT INTO public.probe_writes VALUES (0);
             CREATE FUNCTION public.count_probe_write() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN UPDATE public.probe_writes SET n = n + 1; RETURN NEW; END $$;
             CREATE TRIGGER counted AFTER INSERT OR UPDATE ON rekey.latency_probe
               FOR EACH ROW EXECUTE FUNCTION public.count_probe_write();",
        )
        .await
        .unwrap();
}

async fn writes(db: &TestDb) -> (i32, i64) {
    let c = db.pool.get().await.unwrap();
    let n: i32 = c
        .query_one("SELECT n FROM public.probe_writes", &[])
        .await
        .unwrap()
        .get(0);
    let rows: i64 = c
        .query_one("SELECT count(*) FROM rekey.latency_probe", &[])
        .await
        .unwrap()
        .get(0);
    (n, rows)
}

#[tokio::test]
async fn the_probe_alternates_point_reads_with_a_committed_write_of_its_own_row() {
    let db = TestDb::new().await;
    let settings = db.settings(None);
    count_writes(&db).await;
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO demo.users (id, name) SELECT g, 'u' FROM generate_series(1, 100) g",
        )
        .await
        .unwrap();
    let samples = probe::samples(&db.pool, &settings.targets, None, true, 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(samples.len(), 10);
    assert!(
        samples.iter().all(|s| s.ms > 0.0 && s.ms.is_finite()),
        "{samples:?}"
    );
    assert_eq!(samples.iter().filter(|s| s.write).count(), 5);
    assert_eq!(
        writes(&db).await,
        (5, 1),
        "every other probe writes, one row per connection"
    );
    let b = probe::Baseline::of(&samples).unwrap();
    let w = b.writes.expect("writes measured on their own");
    assert_eq!((b.reads.n, w.n), (5, 5));
    assert!(b.reads.median_ms <= b.reads.p95_ms && b.reads.p95_ms <= b.reads.p99_ms);

    // With no rows to read (or an empty application), every probe writes.
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute("DELETE FROM demo.users")
        .await
        .unwrap();
    probe::samples(&db.pool, &settings.targets, None, true, 4, Duration::ZERO)
        .await
        .unwrap();
    let (n, rows) = writes(&db).await;
    assert_eq!(n, 9);
    // Without --probe-writes (the default) the probe only reads.
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute("INSERT INTO demo.users (id, name) VALUES (1, 'u')")
        .await
        .unwrap();
    let reads = probe::samples(&db.pool, &settings.targets, None, false, 6, Duration::ZERO)
        .await
        .unwrap();
    assert!(reads.iter().all(|s| !s.write));
    assert_eq!(writes(&db).await.0, 9, "no write without --probe-writes");
    assert!(
        (1..=2).contains(&rows),
        "a row per probe connection, at most 256: {rows}"
    );
}

#[tokio::test]
async fn a_configured_probe_query_replaces_both() {
    let db = TestDb::new().await;
    let settings = db.settings(None);
    count_writes(&db).await;
    let samples = probe::samples(
        &db.pool,
        &settings.targets,
        Some("SELECT 1"),
        true,
        6,
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!(samples.len(), 6);
    assert!(samples.iter().all(|s| !s.write));
    assert_eq!(writes(&db).await, (0, 0));
    let b = probe::Baseline::of(&samples).unwrap();
    assert_eq!((b.reads.n, b.writes), (6, None));
}
