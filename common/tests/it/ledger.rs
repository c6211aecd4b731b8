//! The ledger's three state machines against a real Postgres: every pair of states is
//! tried, through the ledger module and as a bare `UPDATE`; the legal ones pass both, every
//! other is refused by both and changes nothing. The database's table of transitions is the
//! module's.

use rekey_common::keys::master::{decode_base64_key, generate_base64};
use rekey_common::keys::store;
use rekey_common::ledger::{
    self, BatchPlan, BatchState, LedgerError, NewRun, RunKind, RunState, StageState, StateMachine,
};
use rekey_common::target::demo_targets;
use rekey_common::testing::TestDb;
use secrecy::ExposeSecret;

/// A run with one stage and one batch; returns the run's id.
async fn one_run(db: &TestDb) -> i64 {
    let master = decode_base64_key("test", generate_base64().expose_secret()).unwrap();
    let mut c = db.pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let init = store::init(&tx, &master, &Default::default(), "test")
        .await
        .unwrap();
    let run = ledger::create_run(
        &*tx,
        &NewRun {
            kind: RunKind::Rotation,
            target_key_id: init.field_key.id,
            previous_key_id: None,
            parent_run_id: None,
            targets: demo_targets(),
            stages: vec![100],
            batch_size: 10,
            seed: 1,
            operator: "test".into(),
            source_key_ids: None,
            settings: Default::default(),
        },
    )
    .await
    .unwrap();
    assert_eq!(run.state, RunState::Planning);
    ledger::create_stages(&*tx, run.id, &[100]).await.unwrap();
    let plan = BatchPlan {
        stage_no: 0,
        table: "demo.users".into(),
        id_lo: 1,
        id_hi: 10,
        cumulative: false,
    };
    ledger::insert_batches(&*tx, run.id, &[plan]).await.unwrap();
    tx.commit().await.unwrap();
    run.id
}

/// Puts a row into `state` behind the trigger's back (replica mode skips triggers), as a
/// starting point.
async fn force(db: &TestDb, table: &str, key: &str, state: &str) {
    let c = db.pool.get().await.unwrap();
    c.batch_execute(&format!(
        "SET session_replication_role = replica;
         UPDATE rekey.{table} SET state = '{state}' WHERE {key};
         SET session_replication_role = DEFAULT;"
    ))
    .await
    .unwrap();
}

async fn state(db: &TestDb, table: &str, key: &str) -> String {
    let c = db.pool.get().await.unwrap();
    c.query_one(&format!("SELECT state FROM rekey.{table} WHERE {key}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Tries every `from -> to` of machine `S` on the row `key` of `table`, once through
/// `via_ledger` and once as a bare UPDATE; returns how many pairs were legal.
async fn every_pair<S, F, Fut>(db: &TestDb, table: &str, key: &str, via_ledger: F) -> usize
where
    S: StateMachine,
    F: Fn(S) -> Fut,
    Fut: std::future::Future<Output = Result<(), LedgerError>>,
{
    let mut legal = 0;
    for &from in S::ALL {
        for &to in S::ALL {
            let allowed = from.can_become(to);
            legal += usize::from(allowed && from != to);

            force(db, table, key, from.as_str()).await;
            let r = via_ledger(to).await;
            if allowed {
                r.unwrap_or_else(|e| panic!("{from:?} -> {to:?}: {e}"));
                assert_eq!(state(db, table, key).await, to.as_str());
            } else {
                match r {
                    Err(LedgerError::Illegal {
                        machine,
                        from: f,
                        to: t,
                        ..
                    }) => {
                        assert_eq!((machine, f, t), (S::MACHINE, from.as_str(), to.as_str()));
                    }
                    other => panic!("{from:?} -> {to:?} through the ledger: {other:?}"),
                }
                assert_eq!(state(db, table, key).await, from.as_str());
            }

            force(db, table, key, from.as_str()).await;
            let c = db.pool.get().await.unwrap();
            let r = c
                .execute(
                    &format!("UPDATE rekey.{table} SET state = $1 WHERE {key}"),
                    &[&to.as_str()],
                )
                .await;
            if allowed {
                r.unwrap_or_else(|e| panic!("{from:?} -> {to:?} in SQL: {e}"));
            } else {
                let e = r.expect_err("the database let an illegal transition through");
                let db_err = e.as_db_error().expect("a database error");
                assert_eq!(db_err.code().code(), "23514", "{db_err}");
                assert_eq!(
                    db_err.message(),
                    format!(
                        "illegal {} state change: {} -> {}",
                        S::MACHINE,
                        from.as_str(),
                        to.as_str()
                    )
                );
                assert_eq!(state(db, table, key).await, from.as_str());
            }
        }
    }
    legal
}

#[tokio::test]
async fn runs_change_state_only_along_the_table() {
    let db = TestDb::new().await;
    let id = one_run(&db).await;
    let legal = every_pair::<RunState, _, _>(&db, "runs", &format!("id = {id}"), |to| {
        let pool = db.pool.clone();
        async move {
            let c = pool.get().await.unwrap();
            ledger::set_run_state(&**c, id, to, None).await
        }
    })
    .await;
    assert_eq!(legal, RunState::TRANSITIONS.len());
}

#[tokio::test]
async fn stages_change_state_only_along_the_table() {
    let db = TestDb::new().await;
    let id = one_run(&db).await;
    let key = format!("run_id = {id} AND stage_no = 0");
    let legal = every_pair::<StageState, _, _>(&db, "stages", &key, |to| {
        let pool = db.pool.clone();
        async move {
            let c = pool.get().await.unwrap();
            ledger::set_stage_state(&**c, id, 0, to).await
        }
    })
    .await;
    assert_eq!(legal, StageState::TRANSITIONS.len());
}

#[tokio::test]
async fn batches_change_state_only_along_the_table() {
    let db = TestDb::new().await;
    let id = one_run(&db).await;
    let key = format!("run_id = {id} AND batch_no = 1");
    let legal = every_pair::<BatchState, _, _>(&db, "batches", &key, |to| {
        let pool = db.pool.clone();
        async move {
            let c = pool.get().await.unwrap();
            ledger::set_batch_state(&**c, id, 1, to).await
        }
    })
    .await;
    assert_eq!(legal, BatchState::TRANSITIONS.len());
}

#[tokio::test]
async fn the_database_holds_the_module_s_table_and_new_rows_start_in_the_initial_state() {
    let db = TestDb::new().await;
    fn table<S: StateMachine>() -> Vec<String> {
        S::TRANSITIONS
            .iter()
            .map(|(f, t)| format!("{} {} {}", S::MACHINE, f.as_str(), t.as_str()))
            .collect()
    }
    let mut code = table::<RunState>();
    code.extend(table::<StageState>());
    code.extend(table::<BatchState>());
    code.sort();
    let c = db.pool.get().await.unwrap();
    let mut stored: Vec<String> = c
        .query(
            "SELECT machine || ' ' || from_state || ' ' || to_state FROM rekey.state_transitions",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    stored.sort();
    assert_eq!(stored, code);

    // A new row in any state but the initial one is refused.
    let id = one_run(&db).await;
    let e = c
        .execute(
            "INSERT INTO rekey.batches (run_id, batch_no, table_name, id_lo, id_hi, state)
             VALUES ($1, 99, 'demo.users', 1, 2, 'done')",
            &[&id],
        )
        .await
        .expect_err("a batch born done");
    assert_eq!(e.as_db_error().unwrap().code().code(), "23514");
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1",
            &[&id]
        )
        .await,
        1
    );
}

#[tokio::test]
async fn named_transitions_move_only_from_their_own_states() {
    let db = TestDb::new().await;
    let id = one_run(&db).await;
    let c = db.pool.get().await.unwrap();
    // A batch that is done is never handed back, published or failed.
    force(
        &db,
        "batches",
        &format!("run_id = {id} AND batch_no = 1"),
        "done",
    )
    .await;
    assert_eq!(ledger::hand_back(&**c, id, 1).await.unwrap(), 0);
    assert!(
        ledger::publish_next(&**c, id, 10, 1000.0)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(ledger::mark_failed(&**c, id, 1, "x", "w").await.unwrap(), 0);
    assert_eq!(ledger::reopen_batches(&**c, id).await.unwrap(), 0);
    // A pending stage cannot pass, gate or observe; it starts.
    assert_eq!(ledger::pass_stage(&**c, id, 0).await.unwrap(), 0);
    assert_eq!(ledger::begin_gating(&**c, id, 0).await.unwrap(), 0);
    assert_eq!(ledger::start_stage(&**c, id, 0).await.unwrap(), 1);
    assert_eq!(ledger::start_stage(&**c, id, 0).await.unwrap(), 0);
    assert_eq!(ledger::breach_stage(&**c, id, 0, None).await.unwrap(), 1);
    assert_eq!(ledger::rerun_breached(&**c, id, 0).await.unwrap(), 1);
    assert_eq!(
        state(&db, "stages", &format!("run_id = {id} AND stage_no = 0")).await,
        "running"
    );
    // A run's illegal change says what it was.
    let e = ledger::set_run_state(&**c, id, RunState::Completed, None)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("illegal run state change for run {id}: planning -> completed")
    );
}

#[tokio::test]
async fn publish_next_publishes_at_most_room_batches_whatever_the_plan() {
    let db = TestDb::new().await;
    let id = one_run(&db).await;
    let more: Vec<BatchPlan> = (1..60)
        .map(|i| BatchPlan {
            stage_no: 0,
            table: "demo.users".into(),
            id_lo: i * 10 + 1,
            id_hi: i * 10 + 10,
            cumulative: false,
        })
        .collect();
    let c = db.pool.get().await.unwrap();
    ledger::insert_batches(&**c, id, &more).await.unwrap();
    // As a run's batches are when it starts: just inserted, no statistics yet. The plan
    // PostgreSQL then chose for the old query (a nested loop rescanning the picked batches
    // for every batch row) published all 60 for a room of one.
    let mut published = Vec::new();
    for room in [1, 1, 3] {
        let got = ledger::publish_next(&**c, id, room, 1000.0).await.unwrap();
        assert_eq!(got.len() as i64, room, "room {room}: {got:?}");
        published.extend(got.iter().map(|p| p.batch_no));
    }
    assert_eq!(published, vec![1, 2, 3, 4, 5], "in order, each once");
    assert_eq!(ledger::in_flight(&**c, id).await.unwrap(), 5);
}

/// A batch whose row a worker's open transaction holds is skipped by lease expiry (not
/// waited for): the driver never stalls behind a slow or cut-off worker; the next expiry
/// after the worker's transaction ended takes it.
#[tokio::test]
async fn lease_expiry_skips_a_batch_a_worker_holds_instead_of_waiting_for_it() {
    let db = TestDb::new().await;
    let id = one_run(&db).await;
    let more: Vec<BatchPlan> = (1..4)
        .map(|i| BatchPlan {
            stage_no: 0,
            table: "demo.users".into(),
            id_lo: i * 10 + 1,
            id_hi: i * 10 + 10,
            cumulative: false,
        })
        .collect();
    let c = db.pool.get().await.unwrap();
    ledger::insert_batches(&**c, id, &more).await.unwrap();
    // Two batches published with a lease that has already run out.
    let got = ledger::publish_next(&**c, id, 2, 0.0).await.unwrap();
    let (held, free) = (got[0].batch_no, got[1].batch_no);
    // A "worker" holds the first batch's row, as a claim does, and does not commit.
    let mut w = db.pool.get().await.unwrap();
    let tx = w.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM rekey.batches WHERE run_id = $1 AND batch_no = $2 FOR UPDATE",
        &[&id, &held],
    )
    .await
    .unwrap();
    let expired = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        ledger::expire_leases(&**c, id, 5),
    )
    .await
    .expect("lease expiry waited for a worker's lock")
    .unwrap();
    assert_eq!(
        expired,
        ledger::Expired {
            failed: 0,
            pending: 1
        }
    );
    let state = |n: i64| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT state FROM rekey.batches WHERE run_id = $1 AND batch_no = $2",
                &[&id, &n],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
        }
    };
    assert_eq!(state(free).await, "pending");
    assert_eq!(state(held).await, "published");
    tx.rollback().await.unwrap();
    let expired = ledger::expire_leases(&**c, id, 5).await.unwrap();
    assert_eq!(
        expired,
        ledger::Expired {
            failed: 0,
            pending: 1
        }
    );
    assert_eq!(state(held).await, "pending");
}

/// Batches whose publish was never confirmed go back to pending at once, their attempt
/// not counted; batches already done or handed back are left alone.
#[tokio::test]
async fn unpublished_batches_are_pending_again_without_counting_the_attempt() {
    let db = TestDb::new().await;
    let id = one_run(&db).await;
    let more: Vec<BatchPlan> = (1..4)
        .map(|i| BatchPlan {
            stage_no: 0,
            table: "demo.users".into(),
            id_lo: i * 10 + 1,
            id_hi: i * 10 + 10,
            cumulative: false,
        })
        .collect();
    let c = db.pool.get().await.unwrap();
    ledger::insert_batches(&**c, id, &more).await.unwrap();
    let got = ledger::publish_next(&**c, id, 3, 60_000.0).await.unwrap();
    let nos: Vec<i64> = got.iter().map(|p| p.batch_no).collect();
    assert_eq!(ledger::unpublish(&**c, id, &nos[1..]).await.unwrap(), 2);
    assert_eq!(ledger::in_flight(&**c, id).await.unwrap(), 1);
    // Published again next: the same batches, as their first attempt.
    let again = ledger::publish_next(&**c, id, 5, 60_000.0).await.unwrap();
    let by_no: Vec<(i64, i32)> = again.iter().map(|p| (p.batch_no, p.attempt)).collect();
    assert!(
        by_no.contains(&(nos[1], 1)) && by_no.contains(&(nos[2], 1)),
        "{by_no:?}"
    );
    // A second hand-back of batches no longer published changes nothing.
    ledger::unpublish(&**c, id, &nos[1..]).await.unwrap();
    assert_eq!(ledger::unpublish(&**c, id, &nos[1..]).await.unwrap(), 0);
}
