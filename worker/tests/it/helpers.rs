//! A seeded demo database with keys, worker tasks that can be stopped gracefully or
//! aborted, and the coordinator's driver.

use std::sync::Arc;
use std::time::Duration;

use rekey_common::Settings;
use rekey_common::broker::{self, Topology};
use rekey_common::keys::master::{MasterKey, decode_base64_key, generate_base64};
use rekey_common::keys::store;
use rekey_common::ledger::RunState;
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
        let topo = Topology::new(&settings.queue_prefix);
        Self {
            db,
            settings,
            master,
            topo,
        }
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
            run(settings, opts, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
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
        tokio::time::timeout(
            Duration::from_secs(300),
            drive(
                &self.db.pool,
                &self.settings,
                run_id,
                &Self::drive_options(),
                std::future::pending(),
            ),
        )
        .await
        .expect("run finished within 300 s")
        .unwrap()
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
