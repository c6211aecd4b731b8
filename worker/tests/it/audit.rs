//! The tamper-evident audit log: a staged rotation leaves a log whose chains, batch tails and
//! stage seals verify; an edited entry and a deleted entry (batch or control) are named.

use rekey_common::audit::{VerifyOptions, VerifyReport, verify};
use rekey_common::ledger::RunState;
use rekey_coordinator::run_cmd;

use crate::helpers::Env;

async fn check(env: &Env, opts: &VerifyOptions) -> VerifyReport {
    verify(&**env.db.pool.get().await.unwrap(), opts)
        .await
        .unwrap()
}

/// Runs `sql` with the append-only trigger off, as someone tampering would.
async fn tamper(env: &Env, sql: &str) {
    env.db
        .pool
        .get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "ALTER TABLE rekey.audit_log DISABLE TRIGGER audit_append_only; {sql};
             ALTER TABLE rekey.audit_log ENABLE TRIGGER audit_append_only"
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_chain_verifies_after_a_staged_rotation_and_names_an_edited_and_a_deleted_entry()
{
    let env = Env::seeded(3_000, 0.0).await;
    let w = env.worker("w", 2);
    let run = run_cmd::start_rotation(
        &env.db.pool,
        &env.settings,
        &env.master,
        &crate::staged::staged(&[1, 100], 0, 0, true),
    )
    .await
    .unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    w.stop().await;

    let all = VerifyOptions::default();
    let r = check(&env, &all).await;
    assert!(r.passed(), "{r:?}");
    assert_eq!(r.unchained, 0);
    assert_eq!(r.seals, 2, "each stage sealed when its gates passed");
    let batches_with_entries = env
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND audit_entries > 0",
            &[&run.id],
        )
        .await;
    assert_eq!(r.batch_chains as i64, batches_with_entries);
    assert!(r.control_entries > 5 && r.head.is_some());
    // Appending is the only way in.
    let refused = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .execute("DELETE FROM rekey.audit_log WHERE id = 1", &[])
        .await
        .unwrap_err();
    assert!(
        format!("{refused:?}").contains("append-only"),
        "{refused:?}"
    );

    // Edit one batch entry: named, and nothing else is.
    let edited = env
        .scalar(
            "SELECT min(id) FROM rekey.audit_log WHERE run_id = $1 AND operation = 'encrypt'",
            &[&run.id],
        )
        .await;
    tamper(
        &env,
        &format!("UPDATE rekey.audit_log SET n_ops = n_ops + 1 WHERE id = {edited}"),
    )
    .await;
    let r = check(&env, &all).await;
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert_eq!(r.problems[0].kind, "edited");
    assert_eq!(r.problems[0].entry, Some(edited));
    assert!(r.problems[0].message.contains(&format!("entry {edited}")));
    // --since after the edit leaves it out; before, it is in.
    let later = VerifyOptions {
        since: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        ..Default::default()
    };
    assert!(check(&env, &later).await.passed());
    tamper(
        &env,
        &format!("UPDATE rekey.audit_log SET n_ops = n_ops - 1 WHERE id = {edited}"),
    )
    .await;
    assert!(check(&env, &all).await.passed(), "restored, it verifies");

    // Delete the first entry of a batch that wrote several: its successor names it, the
    // batch's ledger row and the stage's seal disagree.
    let row = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT min(a.id), a.batch_no FROM rekey.audit_log a JOIN rekey.batches b USING (run_id, batch_no)
              WHERE a.run_id = $1 AND a.chain = 'batch' AND b.audit_entries > 1
              GROUP BY a.batch_no ORDER BY a.batch_no LIMIT 1",
            &[&run.id],
        )
        .await
        .unwrap();
    let (deleted, batch_no): (i64, i64) = (row.get(0), row.get(1));
    tamper(
        &env,
        &format!("DELETE FROM rekey.audit_log WHERE id = {deleted}"),
    )
    .await;
    let r = check(&env, &all).await;
    assert!(!r.passed());
    let kinds: Vec<&str> = r.problems.iter().map(|p| p.kind).collect();
    assert!(
        r.problems
            .iter()
            .any(|p| p.kind == "deleted"
                && p.message.contains(&format!("entry {deleted} was deleted"))),
        "{:?}",
        r.problems
    );
    assert!(
        r.problems.iter().any(|p| p.batch_no == Some(batch_no)
            && p.message
                .contains(&format!("batch {batch_no} of run {}", run.id))),
        "{:?}",
        r.problems
    );
    assert!(kinds.contains(&"seal"), "{kinds:?}");

    // Delete a control entry in the middle of the chain (the canary's gate decision).
    let gate = env
        .scalar(
            "SELECT min(id) FROM rekey.audit_log WHERE run_id = $1 AND operation = 'gate'",
            &[&run.id],
        )
        .await;
    tamper(
        &env,
        &format!("DELETE FROM rekey.audit_log WHERE id = {gate}"),
    )
    .await;
    let r = check(&env, &all).await;
    assert!(
        r.problems.iter().any(
            |p| p.kind == "deleted" && p.message.contains(&format!("entry {gate} was deleted"))
        ),
        "{:?}",
        r.problems
    );

    // Gaps: with a threshold below the pauses between batch entries, each is reported
    // with its run, stage and entries.
    let strict = VerifyOptions {
        max_gap_secs: 0.0,
        ..Default::default()
    };
    let r = check(&env, &strict).await;
    assert!(!r.gaps.is_empty());
    assert!(r.gaps.iter().all(|g| g.run_id == run.id && g.seconds > 0.0));
    env.finish().await;
}
