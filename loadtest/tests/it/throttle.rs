//! gh-ost's operator controls, through the binaries: `rekey throttle RUN on|off` and a
//! throttle flag file hold a run's publication without pausing it; `rekey status` says what
//! holds it; lifting both lets the run finish, every value verified.

use std::process::Stdio;
use std::time::Duration;

use crate::binaries::{SpawnGuarded, quick_rotate, seeded, sigterm, wait_exit};
use crate::stalls::status_until;

/// Batches of run 1 in a state.
async fn batches(db: &rekey_common::testing::TestDb, state: &str) -> i64 {
    db.scalar(
        "SELECT count(*) FROM rekey.batches WHERE run_id = 1 AND state = $1",
        &[&state],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn throttle_on_and_a_flag_file_hold_publication_and_status_says_why() {
    let (db, env, reports) = seeded(2_000).await;
    let flag = std::env::temp_dir().join(format!("{}-throttle.flag", db.name));
    std::fs::write(&flag, "").unwrap();
    let (ok, out, err) = env.run(
        "rekey",
        &quick_rotate(&["--stages", "100", "--batch-size", "100", "--detach"]),
    );
    assert!(ok, "{out}{err}");
    // Held by the operator before anything is published, with a reason.
    let (ok, out, err) = env.run(
        "rekey",
        &["throttle", "1", "on", "--reason", "month-end batch jobs"],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("run 1 is held"), "{out}");
    let mut worker = env.worker("w");
    let flag_arg = flag.display().to_string();
    let mut driver = env
        .cmd("rekey", &["resume", "1", "--throttle-flag-file", &flag_arg])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let held = status_until(&env, "1", Duration::from_secs(60), |s| {
        s.contains("throttle     held by the operator")
    })
    .await;
    assert!(held.contains("month-end batch jobs"), "{held}");
    assert!(held.contains("`rekey throttle 1 off` lifts it"), "{held}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        batches(&db, "done").await,
        0,
        "a held run published nothing"
    );
    assert_eq!(batches(&db, "published").await, 0);

    // Off, but the flag file still holds it.
    let (ok, out, err) = env.run("rekey", &["throttle", "1", "off"]);
    assert!(ok, "{out}{err}");
    let flagged = status_until(&env, "1", Duration::from_secs(30), |s| {
        s.contains("throttle flag file")
    })
    .await;
    assert!(flagged.contains(&flag_arg), "{flagged}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(batches(&db, "done").await, 0, "the flag file held the run");

    // Both lifted: the run finishes.
    std::fs::remove_file(&flag).unwrap();
    let code = wait_exit(&mut driver, Duration::from_secs(120));
    let mut text = String::new();
    std::io::Read::read_to_string(driver.stderr.as_mut().unwrap(), &mut text).unwrap();
    assert!(code.success(), "{code:?}: {text}");
    assert!(text.contains("publication held"), "{text}");
    assert!(text.contains("hold lifted"), "{text}");
    sigterm(&worker);
    wait_exit(&mut worker, Duration::from_secs(30));
    assert_eq!(
        batches(&db, "pending").await + batches(&db, "published").await,
        0
    );
    assert!(batches(&db, "done").await > 0);
    let (ok, out, err) = env.run("rekey-loadtest", &["verify"]);
    assert!(ok, "{out}{err}");
    // Both switches are in the audit log.
    let audited = db
        .scalar(
            "SELECT count(*) FROM rekey.audit_log WHERE operation IN ('throttle_on', 'throttle_off')",
            &[],
        )
        .await;
    assert_eq!(audited, 2);
    // A finished run cannot be held.
    let (ok, _, err) = env.run("rekey", &["throttle", "1", "on"]);
    assert!(!ok);
    assert!(err.contains("only a run that is not over"), "{err}");
    let _ = std::fs::remove_dir_all(&reports);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_pauses_to_rebaseline_the_probe_and_records_the_new_baseline() {
    let (db, env, reports) = seeded(3_000).await;
    let mut worker = env.worker("w");
    let log_path = std::env::temp_dir().join(format!("{}-rebaseline.log", db.name));
    let mut driver = env
        .cmd(
            "rekey",
            &quick_rotate(&[
                "--stages",
                "100",
                "--batch-size",
                "50",
                "--max-in-flight",
                "1",
                "--rebaseline-every",
                "2s",
            ]),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn_guarded();
    let code = wait_exit(&mut driver, Duration::from_secs(180));
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(code.success(), "{code:?}: {log}");
    // Publication paused (said as a hold), the probe measured the application alone, and
    // the new baseline is the run's from then on.
    assert!(log.contains("re-baselining"), "{log}");
    assert!(
        log.contains("new baseline: the application alone, publication paused"),
        "{log}"
    );
    let rebaselined = db
        .scalar(
            "SELECT count(*) FROM rekey.runs WHERE id = 1 AND settings ? 'probe_rebaselined_p99_ms' AND (settings->>'probe_rebaselined_p99_ms')::float8 > 0",
            &[],
        )
        .await;
    assert_eq!(rebaselined, 1);
    sigterm(&worker);
    wait_exit(&mut worker, Duration::from_secs(30));
    let (ok, out, err) = env.run("rekey-loadtest", &["verify"]);
    assert!(ok, "{out}{err}");
    let _ = std::fs::remove_dir_all(&reports);
}
