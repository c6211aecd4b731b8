//! Schemas rekey cannot rotate, and a batch that panics: clear refusals naming table,
//! column and type, no panic, no pending key left behind, and a worker that goes on.

use std::process::Stdio;
use std::time::{Duration, Instant};

use rekey_common::testing::TestDb;

use crate::binaries::{Env, SpawnGuarded, quick_rotate, seeded, sigterm, wait_exit};

/// A `text` encrypted column and an `int4` id: preflight fails naming each, and `rekey
/// rotate --skip-preflight` refuses before it generates a key or plans a run.
#[tokio::test]
async fn a_text_column_and_an_int4_id_are_refused_naming_them_and_leave_no_pending_key() {
    let db = TestDb::new().await;
    let reports = std::env::temp_dir().join(format!("{}-reports", db.name));
    let mut env = Env::new(&db, reports.clone());
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE SCHEMA app;
             CREATE TABLE app.notes (id int4 PRIMARY KEY, body bytea);
             CREATE TABLE app.items (id bigint PRIMARY KEY, secret text);
             INSERT INTO app.notes VALUES (1, NULL); INSERT INTO app.items VALUES (1, 'x');",
        )
        .await
        .unwrap();
    let config = std::env::temp_dir().join(format!("{}-schema.toml", db.name));
    std::fs::write(
        &config,
        "[[targets]]\ntable = \"app.notes\"\ncolumns = [\"body\"]\n\n\
         [[targets]]\ntable = \"app.items\"\ncolumns = [\"secret\"]\n",
    )
    .unwrap();
    for v in env.vars.iter_mut().filter(|(k, _)| *k == "REKEY_CONFIG") {
        v.1 = config.display().to_string();
    }
    let (ok, out, err) = env.run("rekey", &["keys", "init"]);
    assert!(ok, "{out}{err}");

    let (ok, out, err) = env.run("rekey", &["preflight"]);
    assert!(!ok, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains("] targets "))
        .unwrap_or_default();
    assert!(line.starts_with("[FAIL]"), "{out}");
    assert!(
        line.contains("app.notes.id (its id column) is integer; rekey needs bigint"),
        "{line}"
    );
    assert!(
        line.contains("app.items.secret (an encrypted column) is text; rekey needs bytea"),
        "{line}"
    );

    let keys_before = db.scalar("SELECT count(*) FROM rekey.keys", &[]).await;
    let out = env
        .cmd(
            "rekey",
            &["rotate", "--skip-preflight", "--key-propagation", "0s"],
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a refusal, not a panic: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("the [[targets]] cannot be rotated"), "{err}");
    assert!(err.contains("app.notes.id"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM rekey.keys", &[]).await,
        keys_before,
        "no key was generated"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM rekey.runs", &[]).await, 0);
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_dir_all(&reports);
}

/// A column whose type changes after the run was planned: the worker fails the batches
/// naming table, column and type, settles every delivery, and keeps taking work; the run
/// halts at its gate instead of stalling.
#[tokio::test(flavor = "multi_thread")]
async fn a_column_changed_to_text_mid_run_fails_its_batches_by_name_and_the_worker_goes_on() {
    let (db, env, reports) = seeded(300).await;
    let (ok, out, err) = env.run("rekey", &quick_rotate(&["--detach", "--stages", "100"]));
    assert!(ok, "{out}{err}");
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(
            "ALTER TABLE demo.users ALTER COLUMN phone TYPE text USING encode(phone, 'hex')",
        )
        .await
        .unwrap();
    let mut worker = env.worker("w1");
    let (_, out, err) = env.run("rekey", &["resume", "1"]);
    let users_failed = db
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = 1 AND state = 'failed'
               AND error LIKE 'demo.users.phone is of type text; rekey needs bytea%'",
            &[],
        )
        .await;
    assert!(users_failed > 0, "{out}{err}");
    // The other tables' batches were done by the same worker, which is still running.
    let others_done = db
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = 1 AND state = 'done' AND table_name <> 'demo.users'",
            &[],
        )
        .await;
    assert!(others_done > 0, "{out}{err}");
    assert!(worker.try_wait().unwrap().is_none(), "the worker died");
    let row = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT state, halt_reason FROM rekey.runs WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    let (state, reason): (String, Option<String>) = (row.get(0), row.get(1));
    assert_eq!(state, "halted", "{out}{err}");
    let reason = reason.unwrap_or_default();
    assert!(
        reason.contains("demo.users.phone (an encrypted column) is text; rekey needs bytea"),
        "{reason}"
    );
    sigterm(&worker);
    wait_exit(&mut worker, Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&reports);
}

/// A batch that panics (the `panic` action of a fault point): its delivery is settled (the
/// batch marked failed with the panic's reason, the message dead-lettered), the worker goes
/// on, and `rekey resume` finishes the run.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_panics_is_marked_failed_and_the_worker_goes_on() {
    let (db, env, reports) = seeded(300).await;
    let mut worker = env
        .cmd("rekey-worker", &["--worker-id", "p1", "--concurrency", "1"])
        .env("FAILPOINTS", "worker.after_read=1*panic")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn_guarded();
    let rotate = quick_rotate(&["--stages", "100"]);
    let (ok, out, err) = env.run("rekey", &rotate);
    assert!(!ok, "the run halts on the failed batch: {out}{err}");
    let failed = db
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = 1 AND state = 'failed'
               AND error LIKE 'the worker panicked while handling the batch%'",
            &[],
        )
        .await;
    assert_eq!(failed, 1, "{out}{err}");
    assert!(worker.try_wait().unwrap().is_none(), "the worker died");
    let start = Instant::now();
    let (ok, out, err) = env.run("rekey", &["resume", "1"]);
    assert!(ok, "{out}{err}");
    assert!(start.elapsed() < Duration::from_secs(120));
    let (ok, out, err) = env.run("rekey-loadtest", &["verify"]);
    assert!(ok, "{out}{err}");
    sigterm(&worker);
    wait_exit(&mut worker, Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&reports);
}
