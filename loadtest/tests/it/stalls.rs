//! No silent stalls, through the binaries as an operator meets them: a run nobody consumes,
//! a driver killed mid-run, a second driver, `promote` with nobody driving, workers left
//! with the old master key after `rotate-master`, and `resume` with a wrong master key.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rekey_common::keys::master::generate_base64;
use secrecy::ExposeSecret;

use crate::binaries::{Env, SpawnGuarded, quick_rotate, seeded, sigterm, wait_exit};
use crate::observability::{free_port, scrape, sum};

/// Runs `rekey status RUN` until its output satisfies `ok`; the last output.
pub(crate) async fn status_until(
    env: &Env,
    run: &str,
    within: Duration,
    ok: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let (_, out, err) = env.run("rekey", &["status", run]);
        if ok(&out) {
            return out;
        }
        assert!(
            start.elapsed() < within,
            "`rekey status {run}` never showed what was expected:\n{out}{err}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn sigkill(child: &Child) {
    let status = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A fingerprint of the ledger (runs, stages, batches) and of the audit log.
async fn ledger_fingerprint(db: &rekey_common::testing::TestDb) -> String {
    let c = db.pool.get().await.unwrap();
    c.query_one(
        "SELECT (SELECT md5(string_agg(md5(r::text), ',' ORDER BY r.id)) FROM rekey.runs r)
             || (SELECT md5(string_agg(md5(s::text), ',' ORDER BY s.run_id, s.stage_no)) FROM rekey.stages s)
             || (SELECT md5(string_agg(md5(b::text), ',' ORDER BY b.run_id, b.batch_no)) FROM rekey.batches b)
             || (SELECT count(*)::text FROM rekey.audit_log)",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// With no worker, the driving `rekey rotate` says that nobody consumes the batch queue
/// (log line, `rekey_queue_consumers` 0, the `no_consumer` event) and `rekey status` shows
/// it with who drives the run; a second driver is refused without changing anything; once
/// the driver is SIGKILLed, status says nobody drives the run and the command to run, and
/// `rekey resume` takes it over.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_nobody_consumes_and_a_killed_driver_are_named_and_a_second_driver_is_refused() {
    let (db, env, reports) = seeded(300).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("{}-rotate.log", db.name));
    let mut driver = env
        .cmd(
            "rekey",
            &quick_rotate(&[
                "--stages",
                "1,100",
                "--no-consumer-after",
                "1s",
                "--metrics-addr",
                &addr,
            ]),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn_guarded();
    let pid = driver.id();
    // The driver counts the queue's consumers every 5 s; past `--no-consumer-after` it says so.
    let start = Instant::now();
    let logged = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("nobody is consuming the batch queue") {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the driver never said that nobody consumes: {text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(logged.contains("start workers"), "{logged}");
    let healthy = status_until(&env, "1", Duration::from_secs(30), |s| {
        s.contains("consumers    none on the batch queue")
    })
    .await;
    assert!(
        healthy.contains(&format!("pid {pid} since")),
        "status names the driver: {healthy}"
    );
    assert!(healthy.contains("start workers"), "{healthy}");
    assert!(
        healthy.contains("workers      none seen in the last 30 s"),
        "{healthy}"
    );
    eprintln!("--- status of a run nobody consumes:\n{healthy}");
    let metrics = scrape(port).await.expect("the driver serves metrics");
    assert_eq!(
        sum(&metrics, "rekey_queue_consumers", &["batches"]),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        sum(
            &metrics,
            "rekey_run_events_total",
            &["event=\"no_consumer\""]
        ),
        1.0,
        "{metrics}"
    );

    // A second driver while the first lives: refused, nothing changed.
    let before = ledger_fingerprint(&db).await;
    let (ok, out, err) = env.run("rekey", &["resume", "1"]);
    assert!(!ok, "{out}{err}");
    assert!(err.contains("a second driver is refused"), "{err}");
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    assert_eq!(
        ledger_fingerprint(&db).await,
        before,
        "a refused resume changed the ledger"
    );

    // The driver dies: status says so at once (same machine) and names the command.
    sigkill(&driver);
    wait_exit(&mut driver, Duration::from_secs(10));
    let orphaned = status_until(&env, "1", Duration::from_secs(20), |s| {
        s.contains("nobody is driving run 1")
    })
    .await;
    assert!(orphaned.contains("`rekey resume 1`"), "{orphaned}");
    eprintln!("--- status after the driver was killed:\n{orphaned}");

    // `rekey resume` takes the run over; with a worker, it completes.
    let mut worker = env.worker("w1");
    let mut resumed = env
        .cmd("rekey", &["resume", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let code = wait_exit(&mut resumed, Duration::from_secs(180));
    sigterm(&worker);
    wait_exit(&mut worker, Duration::from_secs(30));
    let mut text = String::new();
    std::io::Read::read_to_string(resumed.stderr.as_mut().unwrap(), &mut text).unwrap();
    assert!(code.success(), "{code:?}: {text}");
    let (_, done, _) = env.run("rekey", &["status", "1"]);
    assert!(done.contains("run 1 (rotation) completed"), "{done}");
    assert!(
        !done.contains("driven by"),
        "an ended run has no driver line: {done}"
    );
    assert!(
        done.contains("next         over: every value is under key"),
        "{done}"
    );
    let c = db.pool.get().await.unwrap();
    let leases: i64 = c
        .query_one("SELECT count(*) FROM rekey.drivers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        leases, 0,
        "a driver that stopped cleanly gives its lease up"
    );
    let workers: i64 = c
        .query_one("SELECT count(*) FROM rekey.workers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        workers, 0,
        "a worker that stopped cleanly removes its presence"
    );
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_dir_all(&reports);
}

/// Once a stage's observation ends without auto-advance, status says `awaiting promote`
/// and the command; `rekey promote` with nobody driving says so in those words.
#[tokio::test(flavor = "multi_thread")]
async fn awaiting_promote_is_said_and_promote_with_nobody_driving_warns() {
    let (_db, env, reports) = seeded(300).await;
    let mut worker = env.worker("w1");
    let mut driver = env
        .cmd(
            "rekey",
            &[
                "rotate",
                "--skip-preflight",
                "--key-propagation",
                "0s",
                "--observe",
                "1s",
                "--stages",
                "1,100",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn_guarded();
    let awaiting = status_until(&env, "1", Duration::from_secs(120), |s| {
        s.contains("awaiting promote")
    })
    .await;
    assert!(awaiting.contains("`rekey promote 1`"), "{awaiting}");
    assert!(awaiting.contains("workers      1 live"), "{awaiting}");
    eprintln!("--- status of a stage awaiting promote:\n{awaiting}");
    // The operator stops the driver (Ctrl-C), then promotes from another shell.
    let status = Command::new("kill")
        .args(["-INT", &driver.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_exit(&mut driver, Duration::from_secs(30));
    let (ok, out, err) = env.run("rekey", &["promote", "1"]);
    assert!(ok, "{out}{err}");
    assert!(
        err.contains(
            "nobody is driving run 1: the next stage stays pending until `rekey resume 1`"
        ),
        "{err}"
    );
    let pending = status_until(&env, "1", Duration::from_secs(10), |s| {
        s.contains("nobody is driving run 1")
    })
    .await;
    assert!(pending.contains("stage 1 100%   pending"), "{pending}");
    sigterm(&worker);
    wait_exit(&mut worker, Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&reports);
}

/// After `rekey keys rotate-master`, the command says to restart the workers; a worker
/// still holding the old key (in REKEY_MASTER_KEY) fails every batch and `rekey status`
/// names the cause within seconds, and preflight fails on it; a worker whose key *file* was
/// replaced reloads it by itself and finishes the run.
#[tokio::test(flavor = "multi_thread")]
async fn workers_left_with_the_old_master_key_are_named_by_status_and_fail_preflight() {
    let (db, mut env, reports) = seeded(300).await;
    let dir = std::env::temp_dir().join(format!("{}-keys", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let old = env
        .vars
        .iter()
        .find(|(k, _)| *k == "REKEY_MASTER_KEY")
        .unwrap()
        .1
        .clone();
    // Worker "stale" holds the old key in its environment; worker "file" reads a key file.
    let key_file = dir.join("master.key");
    std::fs::write(&key_file, &old).unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    // Its log is not read, and it logs every order it hands back: a pipe nobody reads
    // would fill and block it mid-batch.
    let mut stale = env
        .cmd("rekey-worker", &["--worker-id", "stale"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn_guarded();
    let mut file_env = Env {
        vars: env
            .vars
            .iter()
            .filter(|(k, _)| *k != "REKEY_MASTER_KEY")
            .cloned()
            .collect(),
    };
    file_env
        .vars
        .push(("REKEY_MASTER_KEY_FILE", key_file.display().to_string()));
    let mut by_file = file_env.worker("file");
    // Both present (their key rings loaded, the old key's) before the key changes: else
    // preflight may run before "stale" has said it is there (.ci/run failed so once).
    crate::binaries::workers_present(&db, &mut [("stale", &mut stale), ("file", &mut by_file)])
        .await;

    let new_key = dir.join("new.key");
    let (ok, out, err) = env.run(
        "rekey",
        &[
            "keys",
            "new-master",
            "--out",
            &new_key.display().to_string(),
        ],
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = env.run(
        "rekey",
        &[
            "keys",
            "rotate-master",
            "--new-master-key-file",
            &new_key.display().to_string(),
        ],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("restart every rekey-worker"), "{out}");
    // The operator switches rekey to the new key and replaces the worker's key file.
    let new = std::fs::read_to_string(&new_key).unwrap();
    for v in env
        .vars
        .iter_mut()
        .filter(|(k, _)| *k == "REKEY_MASTER_KEY")
    {
        v.1 = new.trim().to_owned();
    }
    std::fs::write(&key_file, &new).unwrap();

    let (ok, out, err) = env.run("rekey", &["preflight"]);
    assert!(!ok, "preflight passed with a stale worker: {out}{err}");
    let workers_line = out
        .lines()
        .find(|l| l.contains("] workers "))
        .unwrap_or_default()
        .to_owned();
    assert!(workers_line.starts_with("[FAIL]"), "{out}");
    assert!(workers_line.contains("stale"), "{workers_line}");

    // Thirty batches one at a time: the stale worker takes its share of them, each handed
    // back after a pause, so the run lasts past the driver's 5 s look at the workers (the
    // worker with the replaced file alone would finish three batches before it looks).
    let mut driver = env
        .cmd(
            "rekey",
            &quick_rotate(&[
                "--stages",
                "100",
                "--batch-size",
                "10",
                "--max-in-flight",
                "1",
            ]),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let failing = status_until(&env, "1", Duration::from_secs(60), |s| {
        s.contains("failing every batch (wrong_master_key)")
    })
    .await;
    assert!(failing.contains("1 worker failing"), "{failing}");
    assert!(failing.contains("restart them"), "{failing}");
    assert!(
        failing.contains("hold another master key than the key store's"),
        "{failing}"
    );
    eprintln!("--- status with a worker on the old master key:\n{failing}");
    // The worker whose file was replaced carries the run to its end.
    let code = wait_exit(&mut driver, Duration::from_secs(180));
    let mut text = String::new();
    std::io::Read::read_to_string(driver.stderr.as_mut().unwrap(), &mut text).unwrap();
    assert!(code.success(), "{code:?}: {text}");
    // The driver said it too, with the remedy.
    assert!(
        text.contains(
            "worker(s) failing every batch: restart them with the key store's master key"
        ),
        "{text}"
    );
    for w in [&mut stale, &mut by_file] {
        sigterm(w);
        wait_exit(w, Duration::from_secs(30));
    }
    let mut err = String::new();
    std::io::Read::read_to_string(by_file.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("reloaded the master key"), "{err}");
    let (ok, out, err) = env.run("rekey-loadtest", &["verify"]);
    assert!(ok, "{out}{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&reports);
}

/// `rekey resume` with a master key that does not open the key store refuses before it
/// changes anything, and says so.
#[tokio::test]
async fn resume_with_a_wrong_master_key_refuses_before_any_change() {
    let (db, mut env, reports) = seeded(200).await;
    let (ok, out, err) = env.run(
        "rekey",
        &[
            "rotate",
            "--skip-preflight",
            "--detach",
            "--key-propagation",
            "0s",
        ],
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = env.run("rekey", &["pause", "1"]);
    assert!(ok, "{out}{err}");
    let before = ledger_fingerprint(&db).await;
    for v in env
        .vars
        .iter_mut()
        .filter(|(k, _)| *k == "REKEY_MASTER_KEY")
    {
        v.1 = generate_base64().expose_secret().to_owned();
    }
    let (ok, out, err) = env.run("rekey", &["resume", "1", "--detach"]);
    assert!(!ok, "{out}{err}");
    assert!(err.contains("wrong master key"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(!err.contains("resumed"), "{err}");
    assert_eq!(ledger_fingerprint(&db).await, before, "the ledger changed");
    let _ = std::fs::remove_dir_all(&reports);
}
