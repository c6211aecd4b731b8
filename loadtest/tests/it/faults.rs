//! The fault-injection suite: processes killed with SIGKILL at every step of a batch and of
//! the coordinator, RabbitMQ stopped and started mid-run, database connections terminated
//! mid-batch, SIGTERM mid-batch, and the chaos soak in a short form. Every test ends with
//! full verification: every value present, under the run's new key, decrypting to its
//! original plaintext, and counted once in the ledger and the audit log.
//!
//! The workers and the coordinator run as real processes (the binaries beside this test);
//! a broker that is restarted is a private RabbitMQ node, so the shared one is untouched.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rekey_common::testing::TestDb;

use crate::binaries::Env;
use crate::scene::{Scene, rotate_args};

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn workers_killed_at_every_fault_point_of_a_batch_repeatedly_lose_and_double_nothing() {
    let scene = Scene::new(6_000, false).await;
    let points = &rekey_common::failpoint::POINTS[..5];
    // Each worker started dies by SIGKILL at its point's third hit; two rounds over the
    // five points, then plain workers finish the run.
    let plan: VecDeque<String> = (0..2)
        .flat_map(|_| points.iter().map(|p| format!("{p}=2*off->return")))
        .collect();
    let mut fleet = scene.fleet(2, 2, plan);
    let coordinator = scene.rekey("rotate", &rotate_args("1,100", &[]), None);
    let (status, out) = scene
        .until_exit(coordinator, &mut fleet, Duration::from_secs(300))
        .await;
    assert!(status.success(), "{out}\n{}", scene.log("rotate"));
    let run_id = scene.last_run().await;
    let deaths = fleet.deaths.clone();
    fleet.stop(Duration::from_secs(30)).await;
    for p in points {
        let killed = deaths
            .iter()
            .filter(|d| {
                d.failpoints.as_deref().is_some_and(|f| f.starts_with(p))
                    && rekey_loadtest::procs::killed(&d.status)
            })
            .count();
        assert_eq!(killed, 2, "a worker was killed at {p} twice: {deaths:?}");
    }
    assert!(
        deaths
            .iter()
            .all(|d| rekey_loadtest::procs::killed(&d.status)),
        "no worker died any other way: {deaths:?}"
    );
    scene.everything_verified(run_id).await;
    scene.finish().await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_killed_mid_publish_and_mid_gate_is_resumed_to_completion() {
    let scene = Scene::new(5_000, false).await;
    let mut fleet = scene.fleet(2, 2, VecDeque::new());
    // Dies on its fourth publish: that batch is marked published in the ledger, never sent.
    let c = scene.rekey(
        "rotate",
        &rotate_args("1,100", &[]),
        Some("coordinator.before_publish=3*off->return"),
    );
    let (status, _) = scene
        .until_exit(c, &mut fleet, Duration::from_secs(120))
        .await;
    scene.assert_killed_at(&status, "rotate", "coordinator.before_publish");
    let run_id = scene.last_run().await;
    // The workers finish what was sent; the orphan stays published with no message.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let orphans = scene
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND state = 'published'",
            &[&run_id],
        )
        .await;
    assert!(
        orphans >= 1,
        "the batch marked but never published is there"
    );

    // Resumed, it publishes what is left and dies deciding a stage's gate.
    let c = scene.rekey(
        "resume-1",
        &["resume", &run_id.to_string(), "--lease-secs", "10"],
        Some("coordinator.mid_gate=return"),
    );
    let (status, _) = scene
        .until_exit(c, &mut fleet, Duration::from_secs(120))
        .await;
    scene.assert_killed_at(&status, "resume-1", "coordinator.mid_gate");
    let gated = scene
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT s.state FROM rekey.stages s JOIN rekey.runs r ON r.id = s.run_id AND s.stage_no = r.current_stage
              WHERE r.id = $1",
            &[&run_id],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(
        gated, "gating",
        "killed before the gate's decision was recorded"
    );

    // Resumed once more, without faults: the gate is decided anew and the run completes.
    let c = scene.rekey(
        "resume-2",
        &[
            "resume",
            &run_id.to_string(),
            "--lease-secs",
            "10",
            "--json",
        ],
        None,
    );
    let (status, out) = scene
        .until_exit(c, &mut fleet, Duration::from_secs(240))
        .await;
    assert!(status.success(), "{out}\n{}", scene.log("resume-2"));
    assert!(fleet.deaths.is_empty(), "{:?}", fleet.deaths);
    fleet.stop(Duration::from_secs(30)).await;
    scene.everything_verified(run_id).await;
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_stopped_and_started_mid_run_is_ridden_out_without_operator_action() {
    let mut scene = Scene::new(8_000, true).await;
    let mut fleet = scene.fleet(2, 2, VecDeque::new());
    let c = scene.rekey("rotate", &rotate_args("100", &[]), None);
    scene
        .wait_for(
            "a quarter of the batches are done",
            Duration::from_secs(120),
            "SELECT CASE WHEN count(*) > 0 AND 4 * count(*) FILTER (WHERE state = 'done') >= count(*) THEN 1 ELSE 0 END::int8 FROM rekey.batches",
            1,
        )
        .await;
    let done_before = scene
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE state = 'done'",
            &[],
        )
        .await;
    scene
        .broker
        .as_mut()
        .unwrap()
        .restart(Duration::from_secs(3))
        .await
        .unwrap();
    let (status, out) = scene
        .until_exit(c, &mut fleet, Duration::from_secs(300))
        .await;
    assert!(status.success(), "{out}\n{}", scene.log("rotate"));
    assert!(
        fleet.deaths.is_empty(),
        "the same worker processes rode it out: {:?}",
        fleet.deaths
    );
    let total = scene
        .scalar("SELECT count(*) FROM rekey.batches", &[])
        .await;
    assert!(done_before < total, "the restart came mid-run");
    let ended = fleet.stop(Duration::from_secs(30)).await;
    assert!(ended.iter().all(|d| d.status.success()), "{ended:?}");
    let run_id = scene.last_run().await;
    scene.everything_verified(run_id).await;
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn database_connections_terminated_mid_batch_are_retried_and_counted_once() {
    let scene = Scene::new(6_000, false).await;
    let mut fleet = scene.fleet(2, 2, VecDeque::new());
    let c = scene.rekey("rotate", &rotate_args("100", &[]), None);
    scene
        .wait_for(
            "the first batch is done",
            Duration::from_secs(120),
            "SELECT count(*) FROM rekey.batches WHERE state = 'done'",
            1,
        )
        .await;
    let pool = scene.db.pool.clone();
    let terminator = tokio::spawn(async move {
        // Backends inside a transaction: a batch between its claim and its commit, or a
        // coordinator step. Twelve of them, a quarter second apart at most.
        let mut terminated = 0i64;
        let start = Instant::now();
        while terminated < 12 && start.elapsed() < Duration::from_secs(60) {
            let n: i64 = pool
                .get()
                .await
                .unwrap()
                .query_one(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                      WHERE datname = current_database() AND pid <> pg_backend_pid()
                        AND backend_type = 'client backend' AND xact_start IS NOT NULL
                        AND query LIKE '%demo%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            terminated += n;
            tokio::time::sleep(Duration::from_millis(if n > 0 { 250 } else { 10 })).await;
        }
        terminated
    });
    let (status, out) = scene
        .until_exit(c, &mut fleet, Duration::from_secs(300))
        .await;
    terminator.abort();
    let terminated = terminator.await.unwrap_or(0);
    assert!(status.success(), "{out}\n{}", scene.log("rotate"));
    assert!(fleet.deaths.is_empty(), "{:?}", fleet.deaths);
    let logs: String = (1..=2).map(|i| scene.log(&format!("w{i}"))).collect();
    assert!(
        logs.contains("batch failed; retrying"),
        "a batch lost its connection and was retried (terminated {terminated})"
    );
    fleet.stop(Duration::from_secs(30)).await;
    let run_id = scene.last_run().await;
    scene.everything_verified(run_id).await;
    scene.finish().await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn application_writes_between_a_batch_read_and_its_write_back_are_kept_and_rotated() {
    use rekey_common::keys::store;
    let scene = Scene::new(600, false).await;
    // One batch at a time, each waiting 3 s between reading its rows and writing them back.
    let mut fleet = scene.fleet(
        1,
        1,
        VecDeque::from(["worker.after_read=sleep(3000)".to_owned()]),
    );
    // One batch per table (4 MiB batches), one in flight at a time.
    let args: Vec<&str> = rotate_args("100", &["--max-in-flight", "1"])
        .into_iter()
        .map(|a| if a == "16384" { "4194304" } else { a })
        .collect();
    let c = scene.rekey("rotate", &args, None);
    scene
        .wait_for(
            "the batch of demo.users has read its rows",
            Duration::from_secs(120),
            "SELECT count(*) FROM pg_stat_activity a
              WHERE a.datname = current_database() AND a.state = 'idle in transaction'
                AND now() - a.state_change > interval '300 ms' AND a.query LIKE '%xmin%users%'",
            1,
        )
        .await;
    let run_id = scene.last_run().await;
    let pool = &scene.db.pool;
    let client = pool.get().await.unwrap();
    let r = client
        .query_one(
            "SELECT b.id_lo, b.id_hi, r.target_key_id FROM rekey.batches b JOIN rekey.runs r ON r.id = b.run_id
              WHERE b.run_id = $1 AND b.state = 'published' AND b.table_name = 'demo.users'",
            &[&run_id],
        )
        .await
        .unwrap();
    let (lo, hi, target): (i64, i64, uuid::Uuid) = (r.get(0), r.get(1), r.get(2));
    assert!(hi > lo + 2, "the batch holds several users: {lo}..={hi}");
    let old_value: Vec<u8> = client
        .query_one("SELECT email FROM demo.users WHERE id = $1", &[&lo])
        .await
        .unwrap()
        .get(0);
    let old = rekey_common::envelope::key_id(&old_value).unwrap();
    assert_ne!(old, target);
    // The application, mid-batch: a stale instance writes row lo under the old key, an
    // up-to-date one writes row lo+1 under the new key.
    let mut stale = store::load_ring(&**client, &scene.master).await.unwrap();
    stale.set_encrypt_key(old).unwrap();
    let mut fresh = store::load_ring(&**client, &scene.master).await.unwrap();
    fresh.set_encrypt_key(target).unwrap();
    for (ring, id, text) in [
        (&stale, lo, "stale@example.org"),
        (&fresh, lo + 1, "fresh@example.org"),
    ] {
        assert!(
            rekey_loadtest::traffic::write_one(pool, ring, id, text.as_bytes())
                .await
                .unwrap()
        );
    }
    let fresh_bytes: Vec<u8> = client
        .query_one("SELECT email FROM demo.users WHERE id = $1", &[&(lo + 1)])
        .await
        .unwrap()
        .get(0);
    let still_open: i64 = scene
        .scalar(
            "SELECT count(*) FROM rekey.batches
              WHERE run_id = $1 AND state = 'published' AND id_lo = $2 AND table_name = 'demo.users'",
            &[&run_id, &lo],
        )
        .await;
    assert_eq!(
        still_open, 1,
        "the application wrote before the batch's write-back"
    );
    drop(client);

    let (status, out) = scene
        .until_exit(c, &mut fleet, Duration::from_secs(300))
        .await;
    assert!(status.success(), "{out}\n{}", scene.log("rotate"));
    fleet.stop(Duration::from_secs(30)).await;
    let c = pool.get().await.unwrap();
    // The up-to-date write is kept byte for byte: the batch did not overwrite it.
    let now: Vec<u8> = c
        .query_one("SELECT email FROM demo.users WHERE id = $1", &[&(lo + 1)])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        now, fresh_bytes,
        "the application's write under the new key is untouched"
    );
    // Verification (digests as the application recorded them): the stale write holds its
    // new plaintext, now under the new key; every other value rotated, none lost.
    let ring = store::load_ring(&**c, &scene.master).await.unwrap();
    let v = rekey_loadtest::verify::verify(pool, &ring, Some(target), 10_000)
        .await
        .unwrap();
    assert!(v.passed(), "{v:?}");
    let (rotated, audited) = (
        scene
            .scalar(
                "SELECT sum(n_rotated)::int8 FROM rekey.batches WHERE run_id = $1",
                &[&run_id],
            )
            .await,
        scene
            .scalar(
                "SELECT sum(n_ops)::int8 FROM rekey.audit_log WHERE run_id = $1 AND operation = 'encrypt' AND success",
                &[&run_id],
            )
            .await,
    );
    assert_eq!(
        rotated,
        v.ok - 1,
        "every value but the fresh write rotated once"
    );
    assert_eq!(audited, rotated, "the audit log counts each rotation once");
    // Done in one attempt: the two rows were done again under lock inside the batch, not by
    // failing and retrying it.
    let attempts = scene
        .scalar(
            "SELECT attempts::int8 FROM rekey.batches WHERE run_id = $1 AND id_lo = $2 AND table_name = 'demo.users'",
            &[&run_id, &lo],
        )
        .await;
    assert_eq!(attempts, 1, "{}", scene.log("w1"));
    scene.finish().await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_batch_finishes_and_acks_the_batches_in_flight_and_leaves_nothing_half_done() {
    let scene = Scene::new(4_000, false).await;
    // Each batch waits 2 s after reading its rows: SIGTERM surely finds two in flight.
    let fleet = scene.fleet(
        1,
        2,
        VecDeque::from(["worker.after_read=sleep(2000)".to_owned()]),
    );
    let c = scene.rekey(
        "rotate",
        &rotate_args("100", &["--max-in-flight", "6"]),
        None,
    );
    scene
        .wait_for(
            "two batches hold their rows",
            Duration::from_secs(120),
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND state = 'idle in transaction' AND now() - state_change > interval '300 ms'",
            2,
        )
        .await;
    // Freeze the ledger: the coordinator stops on SIGTERM (exiting non-zero: its run is
    // unfinished), so nothing is published or re-published from here on.
    let mut c = c;
    assert!(rekey_loadtest::procs::signal(
        c.id().unwrap(),
        "TERM",
        false
    ));
    let status = tokio::time::timeout(Duration::from_secs(20), c.wait())
        .await
        .expect("the coordinator stops within 20 s of SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(1), "{status}: {}", scene.log("rotate"));
    let run_id = scene.last_run().await;
    let done_before = scene
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND state = 'done'",
            &[&run_id],
        )
        .await;
    // SIGTERM (Fleet::stop sends it), then wait for the worker to drain and exit.
    let ended = fleet.stop(Duration::from_secs(60)).await;
    assert!(ended[0].status.success(), "exits cleanly: {ended:?}");
    let log = scene.log("w1");
    assert!(log.contains("finishing batches in flight"), "{log}");

    let c = scene.db.pool.get().await.unwrap();
    let finished: i64 = c
        .query_one(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND state = 'done'",
            &[&run_id],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        - done_before;
    assert_eq!(finished, 2, "both batches in flight finished after SIGTERM");
    let in_tx: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND pid <> pg_backend_pid() AND xact_start IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_tx, 0, "no transaction left open");
    // Acked: the queue holds exactly batches that are not done, each once.
    let conn = rekey_common::broker::connect(&scene.settings.amqp_url, "t")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let topo = rekey_common::broker::Topology::new(&scene.settings.queue_prefix);
    let mut queued = Vec::new();
    while let Some(m) = ch
        .basic_get(
            topo.batches.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let msg = rekey_common::messages::BatchMessage::decode(&m.delivery.data).unwrap();
        queued.push(msg.batch_no);
    }
    rekey_common::broker::close(&conn, "t").await;
    let unique: std::collections::BTreeSet<i64> = queued.iter().copied().collect();
    assert_eq!(
        unique.len(),
        queued.len(),
        "no batch queued twice: {queued:?}"
    );
    let published: std::collections::BTreeSet<i64> = c
        .query(
            "SELECT batch_no FROM rekey.batches WHERE run_id = $1 AND state = 'published'",
            &[&run_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        unique.is_subset(&published),
        "every queued batch is one not done: queued {unique:?}, published {published:?}"
    );
    // Nothing half done: no row of a batch that is not done is under the new key.
    let target: uuid::Uuid = c
        .query_one(
            "SELECT target_key_id FROM rekey.runs WHERE id = $1",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    for (table, column) in rekey_loadtest::verify::COLUMNS {
        let n: i64 = c
            .query_one(
                &format!(
                    "SELECT count(*) FROM rekey.batches b JOIN {table} t ON t.id BETWEEN b.id_lo AND b.id_hi
                      WHERE b.run_id = $1 AND b.table_name = $2 AND b.state <> 'done'
                        AND substring(t.{column} from 2 for 16) = decode(replace($3::text, '-', ''), 'hex')"
                ),
                &[&run_id, &table, &target.to_string()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            n, 0,
            "{table}.{column}: a row of an unfinished batch was rotated"
        );
    }
    drop(c);

    // Another worker and `rekey resume` finish the run.
    let mut fleet = scene.fleet(1, 2, VecDeque::new());
    let resume = scene.rekey("resume", &["resume", &run_id.to_string(), "--json"], None);
    let (status, out) = scene
        .until_exit(resume, &mut fleet, Duration::from_secs(240))
        .await;
    assert!(status.success(), "{out}\n{}", scene.log("resume"));
    fleet.stop(Duration::from_secs(30)).await;
    scene.everything_verified(run_id).await;
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_chaos_soak_injects_every_kind_of_fault_and_loses_nothing() {
    let db = TestDb::new().await;
    let env = Env::new(
        &db,
        std::env::temp_dir().join(format!("{}-reports", db.name)),
    );
    let out = env
        .cmd(
            "rekey-loadtest",
            &[
                "chaos",
                "--rows",
                "20000",
                "--duration",
                "90s",
                "--fault-every",
                "600ms",
                "--broker-restart-gap",
                "15s",
                "--finish-within",
                "5m",
                "--workers",
                "2",
                "--batch-bytes",
                "32768",
                "--json",
            ],
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["run_state"], "completed");
    for kind in [
        "worker_kill",
        "db_terminate",
        "coordinator_kill",
        "broker_restart",
    ] {
        assert!(
            r["faults"][kind].as_u64().unwrap_or(0) >= 1,
            "{kind} injected: {}",
            r["faults"]
        );
    }
    assert_eq!(r["lost"], 0);
    assert_eq!(r["corrupted"], 0);
    assert_eq!(r["unexpected_worker_exits"], 0);
    assert_eq!(r["verify"]["ok"], r["values"], "every value verified");
    assert_eq!(r["ledger_rotated"], r["values"], "counted once");
    assert!(r["log_dir"].is_null(), "logs kept only on failure");
}
