//! The pipeline's promises: every value rotated exactly once and still decrypting to its
//! plaintext, under duplicates, crashes, corrupt data, poison messages and concurrent
//! application writes; a dry run that changes nothing.

use std::time::Duration;

use rekey_common::broker;
use rekey_common::ledger::{self, RunState};
use rekey_common::messages::{BatchMessage, FORMAT_VERSION, TAG_LEN};
use rekey_coordinator::drive::drive;
use rekey_coordinator::run_cmd::{self, RotateOptions};

use crate::helpers::Env;

fn opts(batch_size: i64) -> RotateOptions {
    let mut o = RotateOptions {
        batch_size,
        ..Default::default()
    };
    // These tests are about what a rotation does, not its pacing: full speed from the
    // start (slow start paces a stage's first ~20 s).
    o.gating.slow_start = false;
    o
}

/// Options for runs over planted corrupt values: the error-rate gate is the next issue's
/// subject; here the run must go through them.
fn tolerant(batch_size: i64, dry_run: bool) -> RotateOptions {
    let mut o = opts(batch_size);
    o.dry_run = dry_run;
    o.gating.max_error_rate = 1.0;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_thousand_records_over_three_tables_are_rotated_by_two_workers() {
    let env = Env::seeded(50_000, 0.0).await;
    let (w1, w2) = (env.worker("w1", 2), env.worker("w2", 2));
    let run = run_cmd::start_rotation(&env.db.pool, &env.settings, &env.master, &opts(1000))
        .await
        .unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Completed);

    let report = env.verify(Some(run.target_key_id)).await;
    assert!(report.passed(), "{report:?}");
    let p = ledger::progress(&**env.db.pool.get().await.unwrap(), run.id)
        .await
        .unwrap();
    assert_eq!(p.n_rows, 50_000, "the ledger's rows add up to the records");
    assert_eq!(p.n_rotated, report.ok, "every value rotated once");
    assert_eq!(p.n_values, p.n_rotated + p.n_skipped + p.n_errors);
    assert_eq!(p.n_errors, 0);
    let encrypts = env
        .scalar("SELECT COALESCE(sum(n_ops), 0)::int8 FROM rekey.audit_log WHERE run_id = $1 AND operation = 'encrypt'", &[&run.id])
        .await;
    let decrypts = env
        .scalar(
            "SELECT COALESCE(sum(n_ops), 0)::int8 FROM rekey.audit_log WHERE run_id = $1 AND operation = 'decrypt' AND success",
            &[&run.id],
        )
        .await;
    assert_eq!(
        (encrypts, decrypts),
        (p.n_rotated, p.n_rotated),
        "the audit adds up to the operations"
    );
    let used: i64 = env
        .scalar(
            "SELECT encryptions FROM rekey.keys WHERE id = $1",
            &[&run.target_key_id],
        )
        .await;
    assert_eq!(
        used, p.n_rotated,
        "the nonce budget counts every encryption"
    );
    // Both workers took part.
    let workers = env
        .scalar(
            "SELECT count(DISTINCT worker) FROM rekey.batches WHERE run_id = $1",
            &[&run.id],
        )
        .await;
    assert_eq!(workers, 2);
    w1.stop().await;
    w2.stop().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_batch_published_twice_is_rotated_once_and_counted_once() {
    let env = Env::seeded(3_000, 0.0).await;
    let run = run_cmd::start_rotation(&env.db.pool, &env.settings, &env.master, &opts(250))
        .await
        .unwrap();
    // Before the coordinator publishes anything, every batch is already on the queue twice.
    let (_conn, ch) = env.channel().await;
    let batches = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query("SELECT batch_no, stage_no, table_name, id_lo, id_hi FROM rekey.batches WHERE run_id = $1", &[&run.id])
        .await
        .unwrap();
    for _ in 0..2 {
        for b in &batches {
            let msg = order_for(run.id, b, 0).sealed(&env.message_key());
            broker::publish(&ch, &env.topo.batches, &msg.encode(), None)
                .await
                .unwrap();
        }
    }
    let w = env.worker("w", 2);
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    // Let the remaining duplicates drain through the worker too.
    env.wait_until("the queue is empty", async || {
        broker::queue_depth(&ch, &env.topo.batches).await.unwrap() == 0
    })
    .await;
    w.stop().await;

    let p = ledger::progress(&**env.db.pool.get().await.unwrap(), run.id)
        .await
        .unwrap();
    let report = env.verify(Some(run.target_key_id)).await;
    assert!(report.passed(), "{report:?}");
    assert_eq!(p.n_rotated, report.ok);
    let per_batch_max = env
        .scalar(
            "SELECT COALESCE(max(n), 0)::int8 FROM (SELECT count(*) AS n FROM rekey.audit_log
              WHERE run_id = $1 AND operation = 'encrypt' GROUP BY batch_no) x",
            &[&run.id],
        )
        .await;
    assert_eq!(per_batch_max, 1, "each batch audited once");
    let encrypts = env
        .scalar("SELECT sum(n_ops)::int8 FROM rekey.audit_log WHERE run_id = $1 AND operation = 'encrypt'", &[&run.id])
        .await;
    assert_eq!(encrypts, p.n_rotated);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_and_the_coordinator_killed_mid_run_then_resume_completes_without_redoing_done_batches()
 {
    let env = Env::seeded(12_000, 0.0).await;
    let run = run_cmd::start_rotation(&env.db.pool, &env.settings, &env.master, &opts(100))
        .await
        .unwrap();
    let n_batches = env
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1",
            &[&run.id],
        )
        .await;
    let w1 = env.worker("doomed", 1);
    let (pool, settings) = (env.db.pool.clone(), env.settings.clone());
    let coordinator = tokio::spawn(async move {
        drive(
            &pool,
            &settings,
            run.id,
            &Env::drive_options(),
            std::future::pending(),
        )
        .await
    });
    env.wait_until("a third of the batches are done", async || {
        env.scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND state = 'done'",
            &[&run.id],
        )
        .await
            >= n_batches / 3
    })
    .await;
    // Both die where they stand.
    w1.abort();
    coordinator.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done_before: Vec<(i64, chrono::DateTime<chrono::Utc>)> = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query("SELECT batch_no, done_at FROM rekey.batches WHERE run_id = $1 AND state = 'done' ORDER BY 1", &[&run.id])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        !done_before.is_empty() && (done_before.len() as i64) < n_batches,
        "the run was interrupted mid-way"
    );

    let w2 = env.worker("survivor", 2);
    run_cmd::resume(&env.db.pool, run.id).await.unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    w2.stop().await;

    let c = env.db.pool.get().await.unwrap();
    for (batch_no, done_at) in &done_before {
        let row = c
            .query_one(
                "SELECT done_at, worker FROM rekey.batches WHERE run_id = $1 AND batch_no = $2",
                &[&run.id, batch_no],
            )
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, chrono::DateTime<chrono::Utc>>(0),
            *done_at,
            "batch {} was redone",
            batch_no
        );
        assert_eq!(row.get::<_, String>(1), "doomed");
    }
    let report = env.verify(Some(run.target_key_id)).await;
    assert!(report.passed(), "{report:?}");
    let p = ledger::progress(&**c, run.id).await.unwrap();
    assert_eq!(p.n_rotated, report.ok);
    assert_eq!(p.n_rows, 12_000);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planted_corrupt_values_are_listed_left_unchanged_and_counted_in_the_error_rate() {
    let env = Env::seeded(4_000, 0.01).await;
    let corrupt_before: Vec<(String, String, i64, Vec<u8>)> = corrupt_values(&env).await;
    assert!(corrupt_before.len() > 20, "the seed planted corrupt values");
    let w = env.worker("w", 2);
    let run = run_cmd::start_rotation(
        &env.db.pool,
        &env.settings,
        &env.master,
        &tolerant(500, false),
    )
    .await
    .unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    w.stop().await;

    assert_eq!(
        corrupt_values(&env).await,
        corrupt_before,
        "corrupt values left byte for byte unchanged"
    );
    let c = env.db.pool.get().await.unwrap();
    for (table, column, id, _) in &corrupt_before {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM rekey.decrypt_errors WHERE run_id = $1 AND table_name = $2 AND column_name = $3 AND row_id = $4",
                &[&run.id, table, column, &id.to_string()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{table}.{column} row {id} listed in the error table");
    }
    // The seed plants flipped bits and values moved from another row (both fail
    // authentication) and values under a key nobody has.
    let kinds: Vec<String> = c
        .query(
            "SELECT DISTINCT error_kind FROM rekey.decrypt_errors WHERE run_id = $1 ORDER BY 1",
            &[&run.id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kinds, ["tampered", "unknown_key"]);
    let status = run_cmd::status(&env.db.pool, run.id).await.unwrap();
    assert_eq!(status.progress.n_errors, corrupt_before.len() as i64);
    let expected_rate =
        corrupt_before.len() as f64 / (status.progress.n_rotated + status.progress.n_errors) as f64;
    assert!((status.decrypt_error_rate - expected_rate).abs() < 1e-12);
    let report = env.verify(Some(run.target_key_id)).await;
    assert!(report.passed(), "every other value rotated: {report:?}");
    assert_eq!(report.corrupt_as_planted, corrupt_before.len() as i64);
    env.finish().await;
}

async fn corrupt_values(env: &Env) -> Vec<(String, String, i64, Vec<u8>)> {
    let c = env.db.pool.get().await.unwrap();
    let mut out = Vec::new();
    for (table, column) in rekey_loadtest::verify::COLUMNS {
        let rows = c
            .query(
                &format!(
                    "SELECT d.row_id, t.{column} FROM demo.plaintext_digests d JOIN {table} t ON t.id = d.row_id
                      WHERE d.table_name = $1 AND d.column_name = $2 AND d.corrupt ORDER BY 1"
                ),
                &[&table, &column],
            )
            .await
            .unwrap();
        out.extend(
            rows.iter()
                .map(|r| (table.to_owned(), column.to_owned(), r.get(0), r.get(1))),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_without_touching_a_row_and_workers_keep_running() {
    let env = Env::seeded(1_000, 0.0).await;
    let run = run_cmd::start_rotation(&env.db.pool, &env.settings, &env.master, &opts(100))
        .await
        .unwrap();
    let w = env.worker("w", 2);
    let (_conn, ch) = env.channel().await;
    let first = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT batch_no, table_name, id_lo, id_hi FROM rekey.batches WHERE run_id = $1 ORDER BY batch_no LIMIT 1", &[&run.id])
        .await
        .unwrap();
    let tampered = BatchMessage {
        format: FORMAT_VERSION,
        run_id: run.id,
        batch_no: first.get(0),
        stage_no: 0,
        table: first.get(1),
        id_lo: first.get(2),
        id_hi: first.get::<_, i64>(3) + 500,
        attempt: 1,
        master_key_id: [0; 16],
        tag: [0; TAG_LEN],
    }
    .sealed(&env.message_key());
    let key = env.message_key();
    let unknown_run = BatchMessage {
        run_id: run.id + 1000,
        ..tampered.clone()
    }
    .sealed(&key);
    let future_version = BatchMessage {
        format: 3,
        ..tampered.clone()
    }
    .sealed(&key);
    // A sender's text in the reason is bounded: a 60 KB table name.
    let long_table = BatchMessage {
        table: "t".repeat(60_000),
        ..tampered.clone()
    }
    .sealed(&key);
    // A forger without the master key: a changed range under the old tag, and a tag of
    // its own making.
    let bad_tag = BatchMessage {
        id_hi: tampered.id_hi + 1,
        ..tampered.clone()
    };
    let forged = BatchMessage {
        tag: [0x5a; TAG_LEN],
        ..tampered.clone()
    };
    let random: Vec<u8> = (0..97u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    for body in [
        tampered.encode(),
        unknown_run.encode(),
        future_version.encode(),
        long_table.encode(),
        bad_tag.encode(),
        forged.encode(),
        untagged_v1(&tampered),
        random,
    ] {
        broker::publish(&ch, &env.topo.batches, &body, None)
            .await
            .unwrap();
    }
    env.wait_until("eight messages are dead-lettered", async || {
        broker::queue_depth(&ch, &env.topo.dead_letters)
            .await
            .unwrap()
            == 8
    })
    .await;
    let census = rekey_common::keys::census::census(
        &**env.db.pool.get().await.unwrap(),
        &env.settings.targets,
    )
    .await
    .unwrap();
    assert!(
        census.iter().all(|r| r.key_id != Some(run.target_key_id)),
        "no row touched"
    );
    // Authenticated orders refused are audited one by one.
    let reasons: Vec<String> = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query("SELECT detail->>'reason' FROM rekey.audit_log WHERE operation = 'dead_letter' AND NOT success ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        reasons.len(),
        3,
        "each authenticated refusal audited: {reasons:?}"
    );
    assert!(
        reasons.iter().all(|r| r.len() <= 256),
        "a reason is at most 256 bytes: {:?}",
        reasons.iter().map(String::len).collect::<Vec<_>>()
    );
    // Two workers' tasks may audit in any order.
    for expected in ["disagrees with the ledger", "unknown run"] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "{expected:?} not among {reasons:?}"
        );
    }
    let state = env
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND state = 'pending'",
            &[&run.id],
        )
        .await;
    assert!(state > 0, "the ledger is untouched by poison");
    // The same worker then completes the real run.
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    assert!(!w.handle.is_finished());
    w.stop().await;
    // The unauthenticated ones are counted by kind, written at the latest when the
    // worker stops.
    let counted = refused_counts(&env).await;
    assert_eq!(
        counted,
        vec![
            ("bad_tag".to_owned(), 2),
            ("undecodable".to_owned(), 1),
            ("unknown_version".to_owned(), 2),
        ],
        "refusals before authentication, by kind"
    );
    assert!(env.verify(Some(run.target_key_id)).await.passed());
    env.finish().await;
}

/// What anyone who can publish on the vhost, without the master key, can do with 1,000
/// messages: nothing to any row or to the ledger; the audit log gets one entry per kind of
/// refusal per minute, and the dead-letter queue keeps at most its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_forged_messages_change_nothing_and_leave_a_bounded_trace() {
    let mut env = Env::seeded(600, 0.0).await;
    env.settings.dead_letter_max_length = 100;
    env.topo = rekey_common::broker::Topology::of(&env.settings);
    let run = run_cmd::start_rotation(&env.db.pool, &env.settings, &env.master, &opts(100))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let w = env.worker("w", 2);
    let (_conn, ch) = env.channel().await;
    let batches = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT batch_no, stage_no, table_name, id_lo, id_hi FROM rekey.batches WHERE run_id = $1",
            &[&run.id],
        )
        .await
        .unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..1_000u64 {
        let b = &batches[(next() % batches.len() as u64) as usize];
        let copy = order_for(run.id, b, 1);
        let body = match i % 3 {
            // Random bytes of random length.
            0 => (0..next() % 300).map(|_| next() as u8).collect(),
            // A real batch with a guessed tag.
            1 => {
                let mut tag = [0u8; TAG_LEN];
                tag.iter_mut().for_each(|t| *t = next() as u8);
                BatchMessage { tag, ..copy }.encode()
            }
            // A real batch in the untagged format 1.
            _ => untagged_v1(&copy),
        };
        broker::publish(&ch, &env.topo.batches, &body, None)
            .await
            .unwrap();
    }
    env.wait_until("the forged messages are consumed", async || {
        broker::queue_depth(&ch, &env.topo.batches).await.unwrap() == 0
    })
    .await;
    // A clean stop finishes the deliveries in hand and writes the last counts.
    w.stop().await;
    let minutes = started.elapsed().as_secs() / 60 + 1;

    let census = rekey_common::keys::census::census(
        &**env.db.pool.get().await.unwrap(),
        &env.settings.targets,
    )
    .await
    .unwrap();
    assert!(
        census.iter().all(|r| r.key_id != Some(run.target_key_id)),
        "no row touched"
    );
    let not_pending = env
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND state <> 'pending'",
            &[&run.id],
        )
        .await;
    assert_eq!(not_pending, 0, "the ledger is untouched");
    let dead = broker::queue_depth(&ch, &env.topo.dead_letters)
        .await
        .unwrap();
    assert!(
        (1..=100).contains(&dead),
        "the dead-letter queue keeps at most its limit of 100: {dead}"
    );
    let counted = refused_counts(&env).await;
    assert_eq!(
        counted.iter().map(|c| c.1).sum::<i64>(),
        1_000,
        "{counted:?}"
    );
    let entries = env
        .scalar(
            "SELECT count(*) FROM rekey.audit_log WHERE operation IN ('refused_messages', 'dead_letter')",
            &[],
        )
        .await;
    assert!(
        entries as u64 <= 3 * minutes,
        "{entries} audit entries for 1,000 refusals in {minutes} minute(s): at most one per kind per minute"
    );
    // The broker itself refuses a message over its limit (rabbitmq/10-rekey.conf, which
    // scripts/setup.sh installs): 128 KiB.
    let (_big_conn, big_ch) = env.channel().await;
    let big = broker::publish(&big_ch, &env.topo.batches, &vec![0u8; 200 * 1024], None).await;
    assert!(
        big.is_err(),
        "the broker took a 200 KiB message: is it running with rabbitmq/10-rekey.conf?"
    );
    // The run is then rotated as if nothing had happened.
    let w = env.worker("w2", 2);
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    w.stop().await;
    assert!(env.verify(Some(run.target_key_id)).await.passed());
    env.finish().await;
}

/// The untagged batch order for a ledger row read as `batch_no, stage_no, table_name,
/// id_lo, id_hi`.
fn order_for(run_id: i64, row: &tokio_postgres::Row, attempt: i32) -> BatchMessage {
    BatchMessage {
        format: FORMAT_VERSION,
        run_id,
        batch_no: row.get(0),
        stage_no: row.get(1),
        table: row.get(2),
        id_lo: row.get(3),
        id_hi: row.get(4),
        attempt,
        master_key_id: [0; 16],
        tag: [0; TAG_LEN],
    }
}

/// A batch order in format 1 (no tag), as a build before authentication wrote it.
fn untagged_v1(m: &BatchMessage) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct V1<'a> {
        format: u16,
        run_id: i64,
        batch_no: i64,
        stage_no: i32,
        table: &'a str,
        id_lo: i64,
        id_hi: i64,
        attempt: i32,
    }
    rekey_common::codec::encode(&V1 {
        format: 1,
        run_id: m.run_id,
        batch_no: m.batch_no,
        stage_no: m.stage_no,
        table: &m.table,
        id_lo: m.id_lo,
        id_hi: m.id_hi,
        attempt: m.attempt,
    })
}

/// The `refused_messages` audit entries' counts summed by kind, in kind order.
async fn refused_counts(env: &Env) -> Vec<(String, i64)> {
    env.db
        .pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT detail->>'kind', sum((detail->>'count')::bigint)::bigint
               FROM rekey.audit_log WHERE operation = 'refused_messages'
              GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A well-formed copy of a batch the coordinator never published (still `pending`, e.g.
/// sent by anyone who can publish on the vhost, or a stale message of a batch `resume`
/// reopened) is acked and skipped: no row is touched, the batch stays pending, nothing is
/// dead-lettered, and the in-flight window and the throttle stay the coordinator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_of_a_batch_never_published_is_skipped_without_touching_a_row() {
    let env = Env::seeded(600, 0.0).await;
    let run = run_cmd::start_rotation(&env.db.pool, &env.settings, &env.master, &opts(100))
        .await
        .unwrap();
    let w = env.worker("w", 1);
    let (_conn, ch) = env.channel().await;
    let row = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT batch_no, stage_no, table_name, id_lo, id_hi FROM rekey.batches
              WHERE run_id = $1 AND state = 'pending' ORDER BY batch_no LIMIT 1",
            &[&run.id],
        )
        .await
        .unwrap();
    let batch_no: i64 = row.get(0);
    let copy = order_for(run.id, &row, 1).sealed(&env.message_key());
    broker::publish(&ch, &env.topo.batches, &copy.encode(), None)
        .await
        .unwrap();
    env.wait_until("the copy is consumed", async || {
        broker::queue_depth(&ch, &env.topo.batches).await.unwrap() == 0
    })
    .await;
    // The worker settles it at once; give the report a moment, then look.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let state: String = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT state FROM rekey.batches WHERE run_id = $1 AND batch_no = $2",
            &[&run.id, &batch_no],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        state, "pending",
        "a batch the coordinator never published was run"
    );
    let census = rekey_common::keys::census::census(
        &**env.db.pool.get().await.unwrap(),
        &env.settings.targets,
    )
    .await
    .unwrap();
    assert!(
        census.iter().all(|r| r.key_id != Some(run.target_key_id)),
        "no row touched"
    );
    assert_eq!(
        broker::queue_depth(&ch, &env.topo.dead_letters)
            .await
            .unwrap(),
        0,
        "nothing dead-lettered"
    );
    // The coordinator's own publication then runs it.
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    w.stop().await;
    assert!(env.verify(Some(run.target_key_id)).await.passed());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn application_updates_during_the_rotation_are_never_lost() {
    let env = Env::seeded(6_000, 0.0).await;
    let (w1, w2) = (env.worker("w1", 2), env.worker("w2", 2));
    let (pool, master) = (env.db.pool.clone(), env.master.clone());
    let max_user = env.scalar("SELECT max(id) FROM demo.users", &[]).await;
    let writers: Vec<_> = (0..3)
        .map(|i| {
            let (pool, master) = (pool.clone(), master.clone());
            tokio::spawn(async move {
                rekey_loadtest::traffic::update_emails(
                    &pool,
                    master,
                    max_user,
                    Duration::from_secs(6),
                    Duration::from_millis(500),
                    100 + i,
                )
                .await
                .unwrap()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = run_cmd::start_rotation(&env.db.pool, &env.settings, &env.master, &opts(200))
        .await
        .unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    let mut updates = 0;
    for w in writers {
        let r = w.await.unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        updates += r.updates;
    }
    assert!(
        updates > 100,
        "the application wrote during the run ({updates} updates)"
    );
    w1.stop().await;
    w2.stop().await;
    // Every row holds the application's latest plaintext.
    let report = env.verify(None).await;
    assert!(report.passed(), "{report:?}");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heavy_writes_long_row_locks_and_deadlocks_lose_no_update_and_leave_no_straggler() {
    let env = Env::seeded(6_000, 0.0).await;
    // lock_timeout above Postgres' deadlock_timeout (1 s), so that a worker and a pair
    // writer that meet wait long enough for the deadlock detector; the long holders keep
    // their rows past it.
    let workers: Vec<_> = ["w1", "w2"]
        .into_iter()
        .map(|id| {
            env.worker_with(rekey_worker::consume::WorkerOptions {
                concurrency: 2,
                lock_timeout_ms: 1_200,
                worker_id: id.into(),
                ..Default::default()
            })
        })
        .collect();
    let max_user = env.scalar("SELECT max(id) FROM demo.users", &[]).await;
    let deadline = Duration::from_secs(8);
    let mut writers = Vec::new();
    // Single-row writers retry a deadlock, as an application does: queued for a row's tuple
    // lock behind a batch, one can close a cycle between the batch (ascending) and a pair
    // writer (descending), and Postgres may choose it as the victim (CI saw it once).
    for i in 0..4u64 {
        let (pool, master) = (env.db.pool.clone(), env.master.clone());
        writers.push(tokio::spawn(async move {
            let r = rekey_loadtest::traffic::update_emails(
                &pool,
                master,
                max_user,
                deadline,
                Duration::from_millis(500),
                200 + i,
            )
            .await
            .unwrap();
            (r.updates, r.errors, r.deadlocks, r.first_error)
        }));
    }
    // Pairs in descending id order: deadlock bait (50 ms between the two locks) and long
    // holders (2.5 s, twice the workers' lock_timeout).
    for (i, hold) in [(0u64, 50u64), (1, 50), (2, 2_500)] {
        let (pool, master) = (env.db.pool.clone(), env.master.clone());
        writers.push(tokio::spawn(async move {
            let r = rekey_loadtest::traffic::update_pairs_descending(
                &pool,
                master,
                max_user,
                3,
                Duration::from_millis(hold),
                deadline,
                300 + i,
            )
            .await
            .unwrap();
            (r.committed, r.errors, r.deadlocks, r.first_error)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = run_cmd::start_rotation(&env.db.pool, &env.settings, &env.master, &opts(200))
        .await
        .unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    let (mut writes, mut deadlocks) = (0, 0);
    for w in writers {
        let (n, errors, d, first) = w.await.unwrap();
        assert_eq!(errors, 0, "every application write went through: {first:?}");
        writes += n;
        deadlocks += d;
    }
    assert!(writes > 100, "the application wrote ({writes})");
    for w in workers {
        w.stop().await;
    }
    let c = env.db.pool.get().await.unwrap();
    let waiting: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE NOT l.granted AND a.datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(waiting, 0, "nothing is left waiting on a lock");
    let server_deadlocks: i64 = c
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "{writes} application writes, {deadlocks} deadlock victims retried by the application, {server_deadlocks} deadlocks detected by Postgres"
    );
    // No lost update: every value holds the application's latest plaintext; and no
    // straggler: the values written under the old key meanwhile were swept to the new one.
    let report = env.verify(Some(run.target_key_id)).await;
    assert!(report.passed(), "{report:?}");
    let p = ledger::progress(&**c, run.id).await.unwrap();
    assert_eq!(p.failed, 0);
    assert_eq!(p.done, p.n_batches);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_changes_nothing_and_its_counts_match_the_real_run() {
    let env = Env::seeded(3_000, 0.005).await;
    let snapshot = "SELECT md5(string_agg(md5(COALESCE(email, '')::text || COALESCE(phone, '')::text), ',' ORDER BY id)) FROM demo.users";
    let fingerprint = |env: &Env| {
        let pool = env.db.pool.clone();
        async move {
            let c = pool.get().await.unwrap();
            let a: String = c.query_one(snapshot, &[]).await.unwrap().get(0);
            let b: String = c
                .query_one("SELECT md5(string_agg(md5(body::text), ',' ORDER BY id)) FROM demo.conversations", &[])
                .await
                .unwrap()
                .get(0);
            let k: String = c
                .query_one(
                    "SELECT string_agg(id::text || state, ',' ORDER BY id) FROM rekey.keys",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (a, b, k)
        }
    };
    let w = env.worker("w", 2);
    let before = fingerprint(&env).await;
    let dry = run_cmd::start_rotation(
        &env.db.pool,
        &env.settings,
        &env.master,
        &tolerant(300, true),
    )
    .await
    .unwrap();
    assert_eq!(env.drive(dry.id).await, RunState::Completed);
    let after = fingerprint(&env).await;
    assert_eq!(before.0, after.0, "no value changed");
    assert_eq!(before.1, after.1, "no value changed");
    let dry_p = ledger::progress(&**env.db.pool.get().await.unwrap(), dry.id)
        .await
        .unwrap();
    assert!(dry_p.n_rotated > 0 && dry_p.n_errors > 0);

    let real = run_cmd::start_rotation(
        &env.db.pool,
        &env.settings,
        &env.master,
        &tolerant(300, false),
    )
    .await
    .unwrap();
    assert_eq!(
        real.target_key_id, dry.target_key_id,
        "the real run takes the key the dry run rehearsed"
    );
    assert_eq!(env.drive(real.id).await, RunState::Completed);
    w.stop().await;
    let real_p = ledger::progress(&**env.db.pool.get().await.unwrap(), real.id)
        .await
        .unwrap();
    assert_eq!(
        (
            dry_p.n_rows,
            dry_p.n_values,
            dry_p.n_rotated,
            dry_p.n_errors,
            dry_p.n_null
        ),
        (
            real_p.n_rows,
            real_p.n_values,
            real_p.n_rotated,
            real_p.n_errors,
            real_p.n_null
        )
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_locked_by_the_application_past_the_lock_timeout_is_retried_not_lost() {
    let env = Env::seeded(2_000, 0.0).await;
    let w = env.worker_with(rekey_worker::consume::WorkerOptions {
        concurrency: 2,
        lock_timeout_ms: 150,
        worker_id: "impatient".into(),
        ..Default::default()
    });
    // The application holds row 5 of demo.users for 1.5 s, well past the worker's lock_timeout.
    let pool = env.db.pool.clone();
    let holder = tokio::spawn(async move {
        let mut c = pool.get().await.unwrap();
        let tx = c.transaction().await.unwrap();
        tx.execute("SELECT 1 FROM demo.users WHERE id = 5 FOR UPDATE", &[])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tx.commit().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let run = run_cmd::start_rotation(&env.db.pool, &env.settings, &env.master, &opts(100))
        .await
        .unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    holder.await.unwrap();
    w.stop().await;
    let report = env.verify(Some(run.target_key_id)).await;
    assert!(report.passed(), "{report:?}");
    let p = ledger::progress(&**env.db.pool.get().await.unwrap(), run.id)
        .await
        .unwrap();
    assert_eq!(p.n_rotated, report.ok, "counted once despite the retries");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_run_publishes_nothing_more_and_resume_finishes_it() {
    let env = Env::seeded(6_000, 0.0).await;
    let run = run_cmd::start_rotation(&env.db.pool, &env.settings, &env.master, &opts(100))
        .await
        .unwrap();
    let w = env.worker("w", 1);
    let (pool, settings) = (env.db.pool.clone(), env.settings.clone());
    let coordinator = tokio::spawn(async move {
        drive(
            &pool,
            &settings,
            run.id,
            &Env::drive_options(),
            std::future::pending(),
        )
        .await
    });
    env.wait_until("some batches are done", async || {
        env.scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND state = 'done'",
            &[&run.id],
        )
        .await
            >= 5
    })
    .await;
    run_cmd::pause(&env.db.pool, run.id).await.unwrap();
    assert_eq!(
        coordinator.await.unwrap().unwrap(),
        RunState::Paused,
        "the driver stops on pause"
    );
    // Batches already on the queue are handed back by the worker, not rotated.
    let (_conn, ch) = env.channel().await;
    env.wait_until("the queue drains", async || {
        broker::queue_depth(&ch, &env.topo.batches).await.unwrap() == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done_paused = env
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND state = 'done'",
            &[&run.id],
        )
        .await;
    let total = env
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1",
            &[&run.id],
        )
        .await;
    assert!(done_paused < total);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND state = 'done'",
            &[&run.id]
        )
        .await,
        done_paused,
        "nothing moves while paused"
    );
    run_cmd::resume(&env.db.pool, run.id).await.unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    w.stop().await;
    assert!(env.verify(Some(run.target_key_id)).await.passed());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn application_traffic_alongside_a_rotation_sees_no_error_and_reports_its_latency() {
    let env = Env::seeded(4_000, 0.0).await;
    let w = env.worker("w", 2);
    let (pool, master) = (env.db.pool.clone(), env.master.clone());
    let traffic = tokio::spawn(async move {
        rekey_loadtest::traffic::run(
            &pool,
            master,
            &rekey_loadtest::traffic::TrafficOptions {
                rate: 100,
                duration: Duration::from_secs(3),
                refresh: Duration::from_millis(300),
                ..Default::default()
            },
        )
        .await
        .unwrap()
    });
    // The application reloads its keys every 300 ms; the new key stays pending for 1 s,
    // so no read ever meets a value under a key the application does not know.
    let mut o = opts(200);
    o.key_propagation = Duration::from_secs(1);
    let run = run_cmd::start_rotation(&env.db.pool, &env.settings, &env.master, &o)
        .await
        .unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    let t = traffic.await.unwrap();
    w.stop().await;
    assert_eq!((t.errors, t.decrypt_errors), (0, 0), "{t:?}");
    assert!(
        (250..=350).contains(&t.all.count),
        "about 100 ops/s for 3 s: {t:?}"
    );
    assert!(t.reads.count > t.writes.count && t.writes.count > 0);
    assert!(
        t.all.p50_ms <= t.all.p95_ms
            && t.all.p95_ms <= t.all.p99_ms
            && t.all.p99_ms <= t.all.max_ms
    );
    assert!(t.timeline.len() >= 3);
    // Every value, including the application's writes, decrypts to what was written last.
    assert!(env.verify(None).await.passed());
    env.finish().await;
}
