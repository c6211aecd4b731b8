//! A seeded demo database with keys, worker tasks that can be stopped gracefully or
//! aborted, and the coordinator's driver.

use std::sync::Arc;
use std::time::Duration;

use rekey_common::Settings;
use rekey_common::broker::{self, Topology};
use rekey_common::keys::master::{MasterKey, decode_base64_key, generate_base64};
use rekey_common::keys::store;
use rekey_common::ledger::RunState;
use rekey_common::messages::MessageKey;
use rekey_common::testing::TestDb;
use rekey_coordinator::drive::drive;
use rekey_coordinator::progress::ProgressMode;
use rekey_coordinator::runtime::DriveOptions;
use rekey_loadtest::seed::{SeedOptions, seed};
use rekey_loadtest::verify::{VerifyReport, verify};
use rekey_worker::consume::{WorkerOptions, run};
use secrecy::ExposeSecret;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub struct Env {
    pub db: TestDb,
    pub settings: Settings,
    pub master: Arc<MasterKey>,
    pub topo: Topology,
}

impl Env {
    /// A database with rekey's schema, keys, and `rows` seeded records.
    pub async fn seeded(rows: i64, corrupt_fraction: f64) -> Self {
        let db = TestDb::new().await;
        let key_b64 = generate_base64();
        let settings = db.settings(Some(key_b64.expose_secret()));
        let master = Arc::new(decode_base64_key("test", key_b64.expose_secret()).unwrap());
        {
            let mut c = db.pool.get().await.unwrap();
            let tx = c.transaction().await.unwrap();
            store::init(&tx, &master, &Default::default(), "test")
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        let ring = Arc::new(
            store::load_ring(&**db.pool.get().await.unwrap(), &master)
                .await
                .unwrap(),
        );
        seed(
            &db.pool,
            ring,
            &SeedOptions {
                rows,
                seed: 7,
                corrupt_fraction,
                chunk: 5000,
            },
        )
        .await
        .unwrap();
        let topo = Topology::of(&settings);
        Self {
            db,
            settings,
            master,
            topo,
        }
    }

    /// The key that tags batch orders, as the coordinator derives it.
    pub fn message_key(&self) -> MessageKey {
        MessageKey::derive(&self.master)
    }

    pub fn worker(&self, id: &str, concurrency: usize) -> Worker {
        self.worker_with(WorkerOptions {
            concurrency,
            prefetch: concurrency as u16 * 2,
            worker_id: id.to_owned(),
            ..Default::default()
        })
    }

    pub fn worker_with(&self, opts: WorkerOptions) -> Worker {
        let (tx, rx) = oneshot::channel::<()>();
        let settings = self.settings.clone();
        let handle = tokio::spawn(async move {
            let id = opts.worker_id.clone();
            let ran = run(settings, opts, async {
                let _ = rx.await;
            })
            .await;
            if let Err(e) = ran {
                // Said at once: the test itself only notices when it stops the worker.
                eprintln!("worker {id} ended with an error: {e:#}");
                panic!("worker {id} ended with an error: {e:#}");
            }
        });
        Worker {
            stop: Some(tx),
            handle,
        }
    }

    pub fn drive_options() -> DriveOptions {
        DriveOptions {
            lease: Duration::from_secs(5),
            tick: Duration::from_millis(100),
            progress: ProgressMode::Quiet,
            ..Default::default()
        }
    }

    /// Drives a run to its end, with a deadline so that a hung test fails instead of hanging.
    pub async fn drive(&self, run_id: i64) -> RunState {
        let driven = tokio::time::timeout(
            Duration::from_secs(300),
            drive(
                &self.db.pool,
                &self.settings,
                run_id,
                &Self::drive_options(),
                std::future::pending(),
            ),
        )
        .await;
        match driven {
            Ok(Ok(state)) => state,
            Ok(Err(e)) => panic!("driving run {run_id} failed: {e:#}\n{}", self.dump().await),
            Err(_) => panic!(
                "run {run_id} did not finish within 300 s\n{}",
                self.dump().await
            ),
        }
    }

    /// Waits (up to 60 s) until `check` holds; on timeout the panic tells what the ledger,
    /// the queues and the workers looked like.
    pub async fn wait_until(&self, what: &str, mut check: impl AsyncFnMut() -> bool) {
        for _ in 0..600 {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting until {what}\n{}", self.dump().await);
    }

    /// What a failed test needs to be understood: runs, batches by state, queue depths and
    /// consumers, the workers' presence rows, the last refusals.
    pub async fn dump(&self) -> String {
        let mut out = String::from("--- state at failure ---\n");
        let c = match self.db.pool.get().await {
            Ok(c) => c,
            Err(e) => return format!("{out}database unreachable: {e}"),
        };
        let queries = [
            "SELECT 'run ' || id || ' ' || state || ' stage ' || current_stage FROM rekey.runs ORDER BY id",
            "SELECT 'batches ' || state || ': ' || count(*) FROM rekey.batches GROUP BY state ORDER BY state",
            "SELECT 'failed batch ' || batch_no || ': ' || coalesce(error, '') FROM rekey.batches WHERE state = 'failed' LIMIT 3",
            "SELECT 'worker ' || worker_id || ' seen ' || round(extract(epoch FROM clock_timestamp() - seen_at)) || ' s ago, done ' || batches_done || ', failed ' || batches_failed || ', retried ' || batches_retried || ', last error ' || coalesce(last_error_kind || ': ' || last_error, '-') FROM rekey.workers",
            "SELECT 'driver of run ' || run_id || ': pid ' || pid || ', heartbeat ' || round(extract(epoch FROM clock_timestamp() - heartbeat_at)) || ' s ago, consumers ' || coalesce(consumers::text, '?') FROM rekey.drivers",
            "SELECT 'audit ' || operation || ': ' || left(detail::text, 200) FROM rekey.audit_log WHERE operation IN ('dead_letter', 'refused_messages') ORDER BY id DESC LIMIT 3",
        ];
        for q in queries {
            match c.query(q, &[]).await {
                Ok(rows) => rows.iter().for_each(|r| {
                    out.push_str(&r.get::<_, Option<String>>(0).unwrap_or_default());
                    out.push('\n');
                }),
                Err(e) => out.push_str(&format!("({q}: {e})\n")),
            }
        }
        match broker::connect(&self.settings.amqp_url, "test-dump").await {
            Ok(conn) => {
                if let Ok(ch) = conn.create_channel().await {
                    for q in [
                        &self.topo.batches,
                        &self.topo.dead_letters,
                        &self.topo.reports,
                    ] {
                        let depth = broker::queue_depth(&ch, q).await;
                        let consumers = broker::consumer_count(&ch, q).await;
                        out.push_str(&format!(
                            "queue {q}: depth {depth:?}, consumers {consumers:?}\n"
                        ));
                    }
                }
            }
            Err(e) => out.push_str(&format!("broker unreachable: {e:#}\n")),
        }
        out
    }

    pub async fn verify(&self, expect_key: Option<Uuid>) -> VerifyReport {
        let ring = store::load_ring(&**self.db.pool.get().await.unwrap(), &self.master)
            .await
            .unwrap();
        verify(&self.db.pool, &ring, expect_key, 5000)
            .await
            .unwrap()
    }

    /// A confirmed channel with the topology declared (keep the connection alive).
    pub async fn channel(&self) -> (lapin::Connection, lapin::Channel) {
        let conn = broker::connect(&self.settings.amqp_url, "test")
            .await
            .unwrap();
        let ch = broker::confirmed_channel(&conn).await.unwrap();
        broker::declare(&ch, &self.topo).await.unwrap();
        (conn, ch)
    }

    /// Deletes this test's queues.
    pub async fn finish(self) {
        let (_conn, ch) = self.channel().await;
        broker::delete(&ch, &self.topo).await.unwrap();
    }

    pub async fn scalar(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> i64 {
        self.db.scalar(sql, params).await
    }
}

impl Drop for Env {
    /// A test that failed before `finish` still leaves no queues behind (its database is
    /// dropped by `TestDb`): deleted from a thread of its own, the test's runtime being
    /// busy or gone.
    fn drop(&mut self) {
        let (url, topo) = (self.settings.amqp_url.clone(), self.topo.clone());
        rekey_common::testing::on_own_thread(async move {
            let deleted = async {
                let conn = broker::connect(&url, "test-cleanup").await?;
                let ch = conn.create_channel().await?;
                broker::delete(&ch, &topo).await?;
                broker::close(&conn, "bye").await;
                anyhow::Ok(())
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), deleted).await;
        });
    }
}

pub struct Worker {
    stop: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<()>,
}

impl Worker {
    /// Asks the worker to finish its batches in flight and waits for it.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), &mut self.handle)
            .await
            .expect("worker stopped")
            .unwrap();
    }

    /// Kills the worker task where it stands (a crash, as far as the database and the
    /// broker can tell: its connections drop mid-transaction).
    pub fn abort(self) {
        self.handle.abort();
    }
}
