//! The staged rollout: a 1% canary that is a uniform sample, nested stages, gates that halt
//! on corrupt data, promotion only after observation, rollback from mid-run and from the
//! end, preflight, and evidence reports that follow their documented schema.

use std::time::Duration;

use rekey_common::keys::store;
use rekey_common::keys::{KeyKind, KeyState};
use rekey_common::ledger::{self, RunSettings, RunState};
use rekey_coordinator::drive::drive;
use rekey_coordinator::preflight::{self, Status};
use rekey_coordinator::run_cmd::{self, RotateOptions};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::helpers::Env;

pub(crate) fn staged(
    stages: &[i32],
    observe_first: u64,
    observe: u64,
    auto_advance: bool,
) -> RotateOptions {
    RotateOptions {
        batch_size: 500,
        stages: stages.to_vec(),
        gating: RunSettings {
            observe_first_secs: observe_first,
            observe_secs: observe,
            auto_advance,
            // Full speed from each stage's start: these tests are about stages and gates.
            slow_start: false,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn background(env: &Env, run_id: i64) -> JoinHandle<anyhow::Result<RunState>> {
    let (pool, settings) = (env.db.pool.clone(), env.settings.clone());
    tokio::spawn(async move {
        drive(
            &pool,
            &settings,
            run_id,
            &Env::drive_options(),
            std::future::pending(),
        )
        .await
    })
}

async fn stage_state(env: &Env, run_id: i64, stage_no: i32) -> String {
    ledger::stage(&**env.db.pool.get().await.unwrap(), run_id, stage_no)
        .await
        .unwrap()
        .unwrap()
        .state
        .as_str()
        .to_owned()
}

async fn wait_stage(env: &Env, run_id: i64, stage_no: i32, state: &str) {
    for _ in 0..1200 {
        let s = stage_state(env, run_id, stage_no).await;
        if s == state {
            return;
        }
        assert_ne!(
            s, "breached",
            "stage {stage_no} breached while waiting for {state}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("stage {stage_no} of run {run_id} never reached {state}");
}

/// The newest report of a run, validated against docs/report.schema.json.
async fn report(env: &Env, run_id: i64) -> Value {
    let r: Value = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT report FROM rekey.reports WHERE run_id = $1 ORDER BY id DESC LIMIT 1",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    validate(&r);
    r
}

pub fn validate(report: &Value) {
    let schema: Value =
        serde_json::from_str(include_str!("../../../docs/report.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(report)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "report does not follow docs/report.schema.json: {errors:#?}"
    );
}

/// Values of `table` under `key`, by quarter of the table's rows in id order (the ids of
/// the demo tables are dense, sparse and skewed, so quarters of rows, not of the id range).
async fn under_key_by_quarter(env: &Env, table: &str, key: uuid::Uuid) -> Vec<i64> {
    let c = env.db.pool.get().await.unwrap();
    let rows = c
        .query(
            &format!(
                "SELECT q, count(*) FILTER (WHERE substring(v from 2 for 16) = $1)
                   FROM (SELECT ntile(4) OVER (ORDER BY id) AS q, {col} AS v FROM {table}) x GROUP BY 1 ORDER BY 1",
                col = match table {
                    "demo.users" => "email",
                    "demo.agents" => "api_key",
                    _ => "body",
                }
            ),
            &[&key.as_bytes().to_vec()],
        )
        .await
        .unwrap();
    let mut q = vec![0; 4];
    for r in rows {
        q[(r.get::<_, i32>(0) - 1) as usize] = r.get(1);
    }
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_canary_is_a_uniform_one_percent_of_every_table_and_no_record_is_rotated_twice() {
    let env = Env::seeded(40_000, 0.0).await;
    let w = env.worker("w", 2);
    let run = run_cmd::start_rotation(
        &env.db.pool,
        &env.settings,
        &env.master,
        &staged(&[1, 25, 50, 75, 100], 0, 0, false),
    )
    .await
    .unwrap();
    let driver = background(&env, run.id);
    wait_stage(&env, run.id, 0, "observing").await;

    // About 1% of each table, spread over the whole id space (bounds: 5 standard deviations).
    for (table, n) in [
        ("demo.users", 16_000.0),
        ("demo.agents", 8_000.0),
        ("demo.conversations", 16_000.0),
    ] {
        let quarters = under_key_by_quarter(&env, table, run.target_key_id).await;
        let total: i64 = quarters.iter().sum();
        let (mean, sd) = (n * 0.01, (n * 0.01f64 * 0.99).sqrt());
        assert!(
            (total as f64 - mean).abs() < 5.0 * sd,
            "{table}: {total} canary records, expected about {mean}"
        );
        for (i, q) in quarters.iter().enumerate() {
            let (m, s) = (mean / 4.0, (n / 4.0 * 0.01f64 * 0.99).sqrt());
            assert!(
                (*q as f64 - m).abs() < 5.0 * s,
                "{table} quarter {i}: {q} canary records, expected about {m}"
            );
        }
    }
    // Stage by stage with promote.
    for stage_no in 0..5 {
        wait_stage(&env, run.id, stage_no, "observing").await;
        let r = run_cmd::promote(&env.db.pool, &env.settings, run.id)
            .await
            .unwrap();
        if stage_no < 4 {
            assert_eq!(r.current_stage, stage_no + 1);
        } else {
            assert_eq!(r.state, RunState::Completed);
        }
    }
    assert_eq!(driver.await.unwrap().unwrap(), RunState::Completed);
    w.stop().await;

    let v = env.verify(Some(run.target_key_id)).await;
    assert!(v.passed(), "{v:?}");
    let p = ledger::progress(&**env.db.pool.get().await.unwrap(), run.id)
        .await
        .unwrap();
    let encrypts = env
        .scalar("SELECT sum(n_ops)::int8 FROM rekey.audit_log WHERE run_id = $1 AND operation = 'encrypt'", &[&run.id])
        .await;
    assert_eq!(p.n_rotated, v.ok, "every value rotated once");
    assert_eq!(encrypts, v.ok, "no value encrypted twice across stages");
    let r = report(&env, run.id).await;
    assert_eq!(r["stages"].as_array().unwrap().len(), 5);
    assert!(
        r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "passed")
    );
    let actions: Vec<&str> = r["operator_actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["operation"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions.iter().filter(|a| **a == "promote").count(),
        5,
        "{actions:?}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_values_above_the_threshold_halt_the_run_at_the_gate_and_below_it_pass() {
    // Above: 0.5% of values planted corrupt against a 0.1% threshold.
    let env = Env::seeded(8_000, 0.005).await;
    let w = env.worker("w", 2);
    let run = run_cmd::start_rotation(
        &env.db.pool,
        &env.settings,
        &env.master,
        &staged(&[50, 100], 0, 0, true),
    )
    .await
    .unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Halted);
    let status = run_cmd::status(&env.db.pool, run.id).await.unwrap();
    assert_eq!(status.stages[0].state.as_str(), "breached");
    assert_eq!(
        status.stages[1].state.as_str(),
        "pending",
        "the run stopped at the first gate"
    );
    assert!(
        status
            .run
            .halt_reason
            .as_deref()
            .unwrap()
            .contains("decrypt_error_rate"),
        "{:?}",
        status.run.halt_reason
    );
    let r = report(&env, run.id).await;
    let check = r["stages"][0]["gate"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "decrypt_error_rate")
        .unwrap()
        .clone();
    assert_eq!(check["passed"], false);
    assert!(check["figures"]["rate"].as_f64().unwrap() > 0.001);
    assert!(check["figures"]["errors"].as_i64().unwrap() > 0);
    w.stop().await;
    env.finish().await;

    // Below: a few corrupt values, well under 0.1%.
    let env = Env::seeded(8_000, 0.0002).await;
    let w = env.worker("w", 2);
    let run = run_cmd::start_rotation(
        &env.db.pool,
        &env.settings,
        &env.master,
        &staged(&[50, 100], 0, 0, true),
    )
    .await
    .unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    let r = report(&env, run.id).await;
    for stage in r["stages"].as_array().unwrap() {
        let check = stage["gate"]["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "decrypt_error_rate")
            .unwrap();
        assert_eq!(check["passed"], true);
        assert!(check["figures"]["rate"].as_f64().unwrap() < 0.001);
    }
    assert_eq!(
        r["totals"]["counts"]["decrypt_errors"],
        env.verify(None).await.corrupt_as_planted
    );
    w.stop().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promote_is_refused_before_the_observation_period_ends_and_accepted_after() {
    let env = Env::seeded(2_000, 0.0).await;
    let w = env.worker("w", 2);
    let run = run_cmd::start_rotation(
        &env.db.pool,
        &env.settings,
        &env.master,
        &staged(&[1, 100], 3600, 3600, false),
    )
    .await
    .unwrap();
    // Before the gates: refused.
    let err = run_cmd::promote(&env.db.pool, &env.settings, run.id)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("gates have not passed"), "{err}");
    let driver = background(&env, run.id);
    wait_stage(&env, run.id, 0, "observing").await;
    let err = run_cmd::promote(&env.db.pool, &env.settings, run.id)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("under observation until"), "{err}");
    assert_eq!(stage_state(&env, run.id, 0).await, "observing");
    // The hour passes.
    env.db
        .pool
        .get()
        .await
        .unwrap()
        .execute("UPDATE rekey.stages SET observe_until = now() - interval '1 second' WHERE run_id = $1 AND stage_no = 0", &[&run.id])
        .await
        .unwrap();
    let r = run_cmd::promote(&env.db.pool, &env.settings, run.id)
        .await
        .unwrap();
    assert_eq!(r.current_stage, 1);
    assert_eq!(stage_state(&env, run.id, 0).await, "passed");
    driver.abort();
    w.stop().await;
    env.finish().await;
}

async fn active_field_key(env: &Env) -> uuid::Uuid {
    store::active(&**env.db.pool.get().await.unwrap(), KeyKind::Field)
        .await
        .unwrap()
        .unwrap()
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_after_the_25_percent_stage_restores_every_value_under_the_previous_key() {
    let env = Env::seeded(10_000, 0.0).await;
    let before = active_field_key(&env).await;
    let w = env.worker("w", 2);
    let run = run_cmd::start_rotation(
        &env.db.pool,
        &env.settings,
        &env.master,
        &staged(&[1, 25, 50, 75, 100], 0, 0, false),
    )
    .await
    .unwrap();
    let driver = background(&env, run.id);
    wait_stage(&env, run.id, 0, "observing").await;
    run_cmd::promote(&env.db.pool, &env.settings, run.id)
        .await
        .unwrap();
    wait_stage(&env, run.id, 1, "observing").await;
    let moved = env
        .verify(None)
        .await
        .by_key
        .get(&run.target_key_id.to_string())
        .copied()
        .unwrap_or(0);
    assert!(
        moved > 1000,
        "about a quarter of the values are under the new key ({moved})"
    );

    let rb = run_cmd::start_rollback(&env.db.pool, &env.settings, run.id, 500)
        .await
        .unwrap();
    assert_eq!(
        driver.await.unwrap().unwrap(),
        RunState::Halted,
        "the rotation's driver stops"
    );
    assert_eq!(
        active_field_key(&env).await,
        before,
        "the previous key is active again at once"
    );
    assert_eq!(env.drive(rb.id).await, RunState::Completed);
    let rb = ledger::get_run(&**env.db.pool.get().await.unwrap(), rb.id)
        .await
        .unwrap()
        .unwrap();
    run_cmd::finish_rollback(&env.db.pool, &env.settings, &rb)
        .await
        .unwrap();
    w.stop().await;

    let v = env.verify(Some(before)).await;
    assert!(
        v.passed(),
        "every value back under the previous key with its plaintext: {v:?}"
    );
    let original = ledger::get_run(&**env.db.pool.get().await.unwrap(), run.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(original.state, RunState::RolledBack);
    let rotated_back = ledger::progress(&**env.db.pool.get().await.unwrap(), rb.id)
        .await
        .unwrap()
        .n_rotated;
    assert_eq!(
        rotated_back, moved,
        "the rollback moved exactly what the run had moved"
    );
    report(&env, run.id).await;
    report(&env, rb.id).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_after_completion_works_and_is_refused_once_the_previous_key_is_retired() {
    let env = Env::seeded(3_000, 0.0).await;
    let before = active_field_key(&env).await;
    let w = env.worker("w", 2);
    let run = run_cmd::start_rotation(
        &env.db.pool,
        &env.settings,
        &env.master,
        &staged(&[100], 0, 0, true),
    )
    .await
    .unwrap();
    assert_eq!(env.drive(run.id).await, RunState::Completed);
    let rb = run_cmd::start_rollback(&env.db.pool, &env.settings, run.id, 500)
        .await
        .unwrap();
    assert_eq!(env.drive(rb.id).await, RunState::Completed);
    let rb = ledger::get_run(&**env.db.pool.get().await.unwrap(), rb.id)
        .await
        .unwrap()
        .unwrap();
    run_cmd::finish_rollback(&env.db.pool, &env.settings, &rb)
        .await
        .unwrap();
    assert!(env.verify(Some(before)).await.passed());
    assert_eq!(active_field_key(&env).await, before);

    // A second rotation completes; its previous key is then retired: no way back.
    let run2 = run_cmd::start_rotation(
        &env.db.pool,
        &env.settings,
        &env.master,
        &staged(&[100], 0, 0, true),
    )
    .await
    .unwrap();
    assert_eq!(env.drive(run2.id).await, RunState::Completed);
    w.stop().await;
    {
        let mut c = env.db.pool.get().await.unwrap();
        let tx = c.transaction().await.unwrap();
        store::retire(&tx, before, &env.settings.targets, "test")
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let err = run_cmd::start_rollback(&env.db.pool, &env.settings, run2.id, 500)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is retired") && err.contains(&before.to_string()),
        "{err}"
    );
    let k = store::get(&**env.db.pool.get().await.unwrap(), run2.target_key_id)
        .await
        .unwrap();
    assert_eq!(
        k.state,
        KeyState::Active,
        "a refused rollback changes nothing"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preflight_fails_naming_the_item_without_a_master_key_a_broker_or_an_unwrappable_key() {
    let env = Env::seeded(200, 0.0).await;
    let w = env.worker("w", 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ok = preflight::run(&env.settings).await;
    assert!(ok.passed, "{ok:?}");

    let item = |p: &preflight::Preflight, name: &str| {
        p.checks.iter().find(|c| c.item == name).unwrap().clone()
    };
    let mut no_key = env.settings.clone();
    no_key.master_key = rekey_common::config::MasterKeySource::None;
    let p = preflight::run(&no_key).await;
    assert!(!p.passed);
    let c = item(&p, "master_key");
    assert_eq!(c.status, Status::Fail);
    assert!(c.detail.contains("REKEY_MASTER_KEY"), "{c:?}");

    let mut no_broker = env.settings.clone();
    no_broker.amqp_url = secrecy::SecretString::from("amqp://guest:guest@127.0.0.1:1/%2f");
    no_broker.amqp_urls = vec![no_broker.amqp_url.clone()];
    let p = preflight::run(&no_broker).await;
    assert!(!p.passed);
    let c = item(&p, "broker_and_workers");
    assert_eq!(c.status, Status::Fail);
    assert!(
        c.detail.contains("REKEY_AMQP_URL") && c.detail.contains("127.0.0.1:1"),
        "{c:?}"
    );

    env.db
        .pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE rekey.keys SET wrapped_key = set_byte(wrapped_key, 29, get_byte(wrapped_key, 29) # 1) WHERE kind = 'field' AND state = 'active'",
            &[],
        )
        .await
        .unwrap();
    let p = preflight::run(&env.settings).await;
    assert!(!p.passed);
    let c = item(&p, "master_key");
    assert_eq!(c.status, Status::Fail);
    assert!(c.detail.contains("does not unwrap"), "{c:?}");
    w.stop().await;
    env.finish().await;
}
