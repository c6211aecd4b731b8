//! The process-level test scene: a seeded database, the binaries' settings, a worker
//! fleet, `rekey` commands with their logs, and the end-of-test verification.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rekey_common::Settings;
use rekey_common::keys::master::MasterKey;
use rekey_common::keys::store;
use rekey_common::testing::TestDb;
use rekey_loadtest::procs::{Fleet, FleetSpec, PrivateBroker};
use std::collections::VecDeque;
use tokio::process::Child;
use uuid::Uuid;

use crate::binaries::{Env, bin};

/// A seeded database, the processes' settings, and optionally a private broker.
pub(crate) struct Scene {
    pub(crate) db: TestDb,
    pub(crate) env: Env,
    pub(crate) settings: Settings,
    pub(crate) master: Arc<MasterKey>,
    pub(crate) broker: Option<PrivateBroker>,
    pub(crate) logs: PathBuf,
}

/// Small batches: many of them, many moments to fail in.
/// The scene's tests are about faults, not pacing: stages open at full speed (slow start
/// paces a stage's first ~20 s; `slo.rs` and the throttle's unit tests show it).
pub(crate) const ROTATE: [&str; 15] = [
    "rotate",
    "--no-slow-start",
    "--observe",
    "0",
    "--auto-advance",
    "--key-propagation",
    "0",
    "--skip-preflight",
    "--batch-bytes",
    "16384",
    "--lease-secs",
    "10",
    "--max-error-rate",
    "0.001",
    "--json",
];

impl Scene {
    pub(crate) async fn new(rows: i64, private_broker: bool) -> Self {
        let db = TestDb::new().await;
        let logs = std::env::temp_dir().join(format!("{}-logs", db.name));
        std::fs::create_dir_all(&logs).unwrap();
        let mut env = Env::new(&db, logs.join("reports"));
        env.vars.push(("RUST_LOG", "info,lapin=warn".into()));
        let broker = if private_broker {
            let b = PrivateBroker::start().await.unwrap();
            env.vars.push(("REKEY_AMQP_URL", b.url()));
            Some(b)
        } else {
            None
        };
        let key = env
            .vars
            .iter()
            .find(|(k, _)| *k == "REKEY_MASTER_KEY")
            .map(|(_, v)| v.clone())
            .unwrap();
        let settings = db.settings(Some(&key));
        let master = Arc::new(settings.master_key_provider().unwrap().load().unwrap());
        rekey_loadtest::seed::reseed(&db.pool, &settings, &master, rows, 1)
            .await
            .unwrap();
        Self {
            db,
            env,
            settings,
            master,
            broker,
            logs,
        }
    }

    pub(crate) fn fleet(
        &self,
        n: usize,
        concurrency: usize,
        failpoints: VecDeque<String>,
    ) -> Fleet {
        self.fleet_with("w", &[], n, concurrency, failpoints)
    }

    /// Workers named `<prefix>1`, `<prefix>2`, … with extra arguments.
    pub(crate) fn fleet_with(
        &self,
        prefix: &str,
        extra: &[&str],
        n: usize,
        concurrency: usize,
        failpoints: VecDeque<String>,
    ) -> Fleet {
        let mut args = vec![
            "--concurrency".to_owned(),
            concurrency.to_string(),
            "--prefetch".into(),
            concurrency.to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Fleet::start(
            FleetSpec {
                bin: bin("rekey-worker"),
                env: self
                    .env
                    .vars
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                args,
                log_dir: Some(self.logs.clone()),
                id_prefix: prefix.into(),
            },
            n,
            failpoints,
        )
        .unwrap()
    }

    /// Starts `rekey` with `args`, its stdout piped, its stderr in `<log>.log`.
    pub(crate) fn rekey(&self, log: &str, args: &[&str], failpoints: Option<&str>) -> Child {
        let mut cmd = tokio::process::Command::from(self.env.cmd("rekey", args));
        cmd.stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.logs.join(format!("{log}.log"))).unwrap())
            .kill_on_drop(true);
        if let Some(f) = failpoints {
            cmd.env("FAILPOINTS", f);
        }
        cmd.spawn().unwrap()
    }

    /// Asserts that the process that wrote `log` died by SIGKILL at fault point `point`.
    #[cfg(feature = "failpoints")]
    pub(crate) fn assert_killed_at(&self, status: &ExitStatus, log: &str, point: &str) {
        let text = self.log(log);
        assert!(rekey_loadtest::procs::killed(status), "{status}: {text}");
        assert!(text.contains(&format!("failpoint {point}")), "{text}");
    }

    pub(crate) fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{log}.log"))).unwrap_or_default()
    }

    /// Waits for `child` to exit, replacing dead workers meanwhile. Returns its status and
    /// its stdout.
    pub(crate) async fn until_exit(
        &self,
        mut child: Child,
        fleet: &mut Fleet,
        within: Duration,
    ) -> (ExitStatus, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut out = String::new();
                if let Some(mut o) = child.stdout.take() {
                    use tokio::io::AsyncReadExt;
                    o.read_to_string(&mut out).await.unwrap();
                }
                return (status, out);
            }
            fleet.replace_dead().unwrap();
            assert!(
                start.elapsed() < within,
                "rekey did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn scalar(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> i64 {
        self.db.scalar(sql, params).await
    }

    pub(crate) async fn last_run(&self) -> i64 {
        self.scalar("SELECT max(id) FROM rekey.runs", &[]).await
    }

    pub(crate) async fn wait_for(&self, what: &str, within: Duration, sql: &str, at_least: i64) {
        let start = Instant::now();
        while self.scalar(sql, &[]).await < at_least {
            assert!(start.elapsed() < within, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The end of every test: the run completed; every value decrypts to its recorded
    /// plaintext under the run's key; the ledger and the audit log counted each rotation
    /// once; every batch is done.
    pub(crate) async fn everything_verified(&self, run_id: i64) -> i64 {
        let c = self.db.pool.get().await.unwrap();
        let row = c
            .query_one(
                "SELECT r.state, r.target_key_id,
                        (SELECT COALESCE(sum(n_rotated), 0)::int8 FROM rekey.batches WHERE run_id = r.id AND state = 'done'),
                        (SELECT count(*) FROM rekey.batches WHERE run_id = r.id AND state <> 'done'),
                        (SELECT COALESCE(sum(n_ops), 0)::int8 FROM rekey.audit_log WHERE run_id = r.id AND operation = 'encrypt' AND success)
                   FROM rekey.runs r WHERE r.id = $1",
                &[&run_id],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "completed");
        let target: Uuid = row.get(1);
        let (rotated, not_done, audited): (i64, i64, i64) = (row.get(2), row.get(3), row.get(4));
        let ring = store::load_ring(&**c, &self.master).await.unwrap();
        let v = rekey_loadtest::verify::verify(&self.db.pool, &ring, Some(target), 10_000)
            .await
            .unwrap();
        assert!(v.passed(), "{v:?}");
        assert_eq!(v.corrupt_as_planted, 0);
        assert_eq!(rotated, v.ok, "the ledger counted every rotation once");
        assert_eq!(
            audited, rotated,
            "the audit log counted every encryption once"
        );
        assert_eq!(not_done, 0, "every batch is done");
        v.ok
    }

    pub(crate) async fn finish(self) {
        if self.broker.is_none() {
            rekey_loadtest::procs::delete_queues(&self.settings, &self.settings.queue_prefix).await;
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

pub(crate) fn rotate_args<'a>(stages: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = ROTATE.to_vec();
    a.extend(["--stages", stages]);
    a.extend(extra);
    a
}
