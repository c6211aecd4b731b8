//! The nonce budget, enforced where it cannot be raced: three worker processes rotate
//! under a new field key whose budget is smaller than the values to rotate. The key store
//! refuses every flush that would pass it, the run halts naming the key, the count never
//! passes the budget, every value still decrypts, and `rekey keys status` exits 4.

use std::process::Stdio;
use std::time::Duration;

use crate::binaries::{SpawnGuarded, quick_rotate, seeded, sigterm, wait_exit};

#[tokio::test(flavor = "multi_thread")]
async fn a_spent_nonce_budget_halts_the_run_across_three_worker_processes_and_is_never_passed() {
    let (db, mut env, reports) = seeded(1_500).await;
    // The new key gets a budget of 400 encryptions (the seeded values need about 2,000).
    let config = std::env::temp_dir().join(format!("{}-budget.toml", db.name));
    let demo = std::fs::read_to_string(rekey_common::testing::demo_config()).unwrap();
    std::fs::write(&config, format!("{demo}\n[keys]\nnonce_budget = 400\n")).unwrap();
    for v in env.vars.iter_mut().filter(|(k, _)| *k == "REKEY_CONFIG") {
        v.1 = config.display().to_string();
    }
    let mut workers: Vec<_> = ["b1", "b2", "b3"].map(|id| env.worker(id)).into();
    let mut rotate = env
        .cmd(
            "rekey",
            &quick_rotate(&["--stages", "100", "--batch-size", "40"]),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let code = wait_exit(&mut rotate, Duration::from_secs(180));
    let mut text = String::new();
    std::io::Read::read_to_string(rotate.stdout.as_mut().unwrap(), &mut text).unwrap();
    std::io::Read::read_to_string(rotate.stderr.as_mut().unwrap(), &mut text).unwrap();
    for w in &mut workers {
        sigterm(w);
        wait_exit(w, Duration::from_secs(30));
    }
    assert!(
        !code.success(),
        "the run completed past its key's budget: {text}"
    );
    let c = db.pool.get().await.unwrap();
    let row = c
        .query_one(
            "SELECT r.state, r.halt_reason, k.id::text, k.encryptions, k.nonce_budget
               FROM rekey.runs r JOIN rekey.keys k ON k.id = r.target_key_id WHERE r.id = 1",
            &[],
        )
        .await
        .unwrap();
    let (state, reason, key, used, budget): (String, Option<String>, String, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(state, "halted", "{text}");
    let reason = reason.unwrap_or_default();
    assert!(
        reason.contains(&format!("field key {key} has reached its nonce budget")),
        "{reason}"
    );
    assert!(reason.contains("rotate to a new key"), "{reason}");
    assert_eq!(budget, 400);
    assert!(
        used <= budget,
        "the key store let {used} encryptions pass {budget}"
    );
    assert!(used > 0, "some batches committed before the budget ran out");
    // Every value committed under the new key took one of its encryptions.
    let rotated: i64 = c
        .query_one(
            "SELECT COALESCE(sum(n_rotated), 0)::int8 FROM rekey.batches WHERE run_id = 1 AND state = 'done'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        rotated > 0 && rotated <= used,
        "{rotated} values rotated with {used} encryptions"
    );
    // Every value still decrypts (under the old key or the new one) to its plaintext.
    let (ok, out, err) = env.run("rekey-loadtest", &["verify"]);
    assert!(ok, "{out}{err}");
    // The key status says so and exits 4.
    let out = env
        .cmd("rekey", &["keys", "status", "--no-census"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains(&format!("field key {key} has used")), "{err}");
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_dir_all(&reports);
}
