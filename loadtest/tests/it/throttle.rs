//! gh-ost's operator controls, through the binaries: `rekey throttle RUN on|off` and a
//! throttle flag file hold a run's publication without pausing it; `rekey status` says what
//! holds it; lifting both lets the run finish, every value verified.

use std::process::Stdio;
use std::time::Duration;

use crate::binaries::{Env, Proc, SpawnGuarded, quick_rotate, seeded, sigterm, wait_exit};
use crate::stalls::status_until;

/// Batches of run 1 in a state.
async fn batches(db: &rekey_common::testing::TestDb, state: &str) -> i64 {
    db.scalar(
        "SELECT count(*) FROM rekey.batches WHERE run_id = 1 AND state = $1",
        &[&state],
    )
    .await
}

/// `rekey ARGS` in the background, its standard error (the driver's log) into `log`.
fn logged_rekey(env: &Env, args: &[&str], log: &std::path::Path) -> Proc {
    env.cmd("rekey", args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn_guarded()
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
    let mut driver = logged_rekey(
        &env,
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
        &log_path,
    );
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

/// The breach, through the binaries: the operator's probe query (`REKEY_PROBE_QUERY`, here
/// one whose latency the test sets) gets slow mid-stage and stays slow, so the stage is
/// breached and the run halted with the reason; nothing published is lost, and once the
/// application is fast again `rekey resume` runs the stage again and finishes it.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_sustained_rise_of_the_probes_latency_breaches_the_stage_and_resume_finishes_it() {
    let (db, mut env, reports) = seeded(3_000).await;
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE public.probe_delay (secs float8 NOT NULL)")
        .await
        .unwrap();
    env.vars.push((
        "REKEY_PROBE_QUERY",
        "SELECT pg_sleep(coalesce((SELECT max(secs) FROM public.probe_delay), 0))".to_owned(),
    ));
    // Batches of 20 rows at 300 ms each at least: the stage outlasts the three judgements
    // (2 s apart) a breach takes. The throttle is off: the breach is the gate that stands
    // whether or not the run is paced.
    let mut worker = env.slow_worker("w");
    let log_path = std::env::temp_dir().join(format!("{}-breach.log", db.name));
    let mut driver = logged_rekey(
        &env,
        &quick_rotate(&[
            "--stages",
            "100",
            "--batch-size",
            "20",
            "--throttle-pct",
            "0",
        ]),
        &log_path,
    );
    let start = std::time::Instant::now();
    while batches(&db, "done").await < 2 {
        assert!(start.elapsed() < Duration::from_secs(90), "no batch done");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The application slows down: every probe now takes 50 ms (its baseline: well under 1).
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute("INSERT INTO public.probe_delay VALUES (0.05)")
        .await
        .unwrap();
    let code = wait_exit(&mut driver, Duration::from_secs(120));
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(!code.success(), "a breached run is not a success: {log}");
    assert!(log.contains("stage breached: run halted"), "{log}");
    let (ok, out, err) = env.run("rekey", &["status", "1", "--json"]);
    assert!(ok, "{out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["run"]["state"], "halted", "{status}");
    assert_eq!(status["stages"][0]["state"], "breached", "{status}");
    let reason = status["run"]["halt_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("performance impact: probe latency over 20% above the baseline"),
        "{status}"
    );
    let left = batches(&db, "pending").await;
    assert!(left > 0, "halted before the end of the stage");
    // The operator's view says the same, and what to do.
    let (_, text, _) = env.run("rekey", &["status", "1"]);
    assert!(text.contains("performance impact"), "{text}");

    // The application is fast again: resume runs the breached stage again to its end.
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute("DELETE FROM public.probe_delay")
        .await
        .unwrap();
    let (ok, out, err) = env.run("rekey", &["resume", "1"]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        batches(&db, "pending").await + batches(&db, "published").await,
        0
    );
    sigterm(&worker);
    wait_exit(&mut worker, Duration::from_secs(30));
    let (ok, out, err) = env.run("rekey-loadtest", &["verify"]);
    assert!(
        ok,
        "every value readable after the breach and the resume: {out}{err}"
    );
    let _ = std::fs::remove_dir_all(&reports);
}
