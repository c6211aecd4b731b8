//! `rekey-loadtest chaos`: a bounded soak. Seeds N records, rotates them with `rekey rotate`
//! and W `rekey-worker` processes, and meanwhile, at random moments, SIGKILLs workers,
//! SIGKILLs the coordinator (then `rekey resume`s the run, as an operator would), restarts
//! the broker and terminates database connections in the middle of their transactions.
//! Afterwards it verifies every record and reports the faults injected and the records
//! verified, lost and corrupted.
//!
//! Only this machine's own processes and services are touched: the workers and coordinator
//! it started, the backends of its own database, and a RabbitMQ node of its own
//! ([`PrivateBroker`]) unless `--shared-broker` is given (then the broker is never
//! restarted).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rekey_common::Settings;
use rekey_common::keys::master::MasterKey;
use rekey_common::keys::store;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::procs::{self, Fleet, FleetSpec, PrivateBroker};
use crate::verify::{self, VerifyReport};

/// The faults the soak injects.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// SIGKILL a worker (the fleet starts another).
    WorkerKill,
    /// `pg_terminate_backend` on every backend of the database that is inside a transaction.
    DbTerminate,
    /// SIGKILL the coordinator, then `rekey resume` the run.
    CoordinatorKill,
    /// Stop the broker (orderly), leave it down 1–3 s, start it again.
    BrokerRestart,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::WorkerKill => "worker_kill",
            Fault::DbTerminate => "db_terminate",
            Fault::CoordinatorKill => "coordinator_kill",
            Fault::BrokerRestart => "broker_restart",
        }
    }

    /// Relative frequency.
    fn weight(self) -> u32 {
        match self {
            Fault::WorkerKill => 5,
            Fault::DbTerminate => 3,
            Fault::CoordinatorKill => 1,
            Fault::BrokerRestart => 1,
        }
    }
}

/// How the soak runs.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub rows: i64,
    /// Faults are injected for at most this long; the run then finishes undisturbed.
    pub duration: Duration,
    /// After the faults stop, how long the run may take to complete before the soak fails.
    pub finish_within: Duration,
    /// Mean time between faults (each gap drawn from half to one and a half times this).
    pub fault_every: Duration,
    /// Which faults (each at least once, in this order, before random picks begin).
    pub faults: Vec<Fault>,
    /// A broker restart at most this often (a restart takes the node ~10 s).
    pub broker_restart_gap: Duration,
    pub workers: usize,
    pub worker_concurrency: usize,
    /// `rekey rotate --batch-bytes`: smaller batches, more of them, more moments to fail in.
    pub batch_bytes: i64,
    pub stages: Vec<i32>,
    /// Use the configured broker instead of a private node (broker restarts are dropped).
    pub shared_broker: bool,
    pub bin_dir: PathBuf,
    pub config: Option<PathBuf>,
    /// Keep the processes' logs here (default: a temporary directory, removed when the soak
    /// passes).
    pub log_dir: Option<PathBuf>,
    pub seed: u64,
}

/// What the soak did and found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ChaosReport {
    pub rows: i64,
    pub values: i64,
    pub run_id: Option<i64>,
    /// The run's final state.
    pub run_state: String,
    pub seconds: f64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    pub faults_total: u64,
    /// Backends terminated by the `db_terminate` faults.
    pub backends_terminated: i64,
    /// Workers that ended without being killed by the soak (a crash would show here).
    pub unexpected_worker_exits: u64,
    /// Times the coordinator exited with an error by itself and the run was resumed.
    pub coordinator_failures: u64,
    /// Values under the run's new key, by the ledger's count and by verification.
    pub ledger_rotated: i64,
    pub audited_encryptions: i64,
    /// Every value checked against its recorded plaintext.
    pub verify: VerifyReport,
    /// Values recorded but absent.
    pub lost: i64,
    /// Values that decrypt to something else, do not decrypt, or were never recorded.
    pub corrupted: i64,
    /// Where the processes' logs are, when kept.
    pub log_dir: Option<PathBuf>,
}

impl ChaosReport {
    /// The run completed, every value is under the new key with its original plaintext,
    /// and the ledger counted each once.
    pub fn passed(&self) -> bool {
        self.run_state == "completed"
            && self.verify.passed()
            && self.lost == 0
            && self.corrupted == 0
            && self.ledger_rotated == self.verify.ok
            && self.audited_encryptions == self.ledger_rotated
    }
}

/// The coordinator process of the moment.
struct Coordinator {
    child: Child,
    /// SIGKILLed by the soak (its exit is expected).
    killed: bool,
}

struct Soak {
    pool: Pool,
    rekey: PathBuf,
    env: Vec<(String, String)>,
    log_dir: PathBuf,
    starts: usize,
}

impl Soak {
    fn coordinator(&mut self, args: &[String]) -> anyhow::Result<Coordinator> {
        self.starts += 1;
        let log = std::fs::File::create(self.log_dir.join(format!("rekey-{}.log", self.starts)))?;
        let child = Command::new(&self.rekey)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", self.rekey.display()))?;
        Ok(Coordinator {
            child,
            killed: false,
        })
    }

    fn resume(&mut self, run_id: i64) -> anyhow::Result<Coordinator> {
        self.coordinator(&[
            "resume".into(),
            run_id.to_string(),
            "--lease-secs".into(),
            "15".into(),
        ])
    }

    async fn run_state(&self, run_id: i64) -> anyhow::Result<String> {
        Ok(self
            .pool
            .get()
            .await?
            .query_one("SELECT state FROM rekey.runs WHERE id = $1", &[&run_id])
            .await?
            .get(0))
    }

    /// The run this soak started, once it exists with its batches.
    async fn find_run(&self, before: i64) -> anyhow::Result<Option<i64>> {
        Ok(self
            .pool
            .get()
            .await?
            .query_opt(
                "SELECT r.id FROM rekey.runs r WHERE r.id > $1
                    AND EXISTS (SELECT 1 FROM rekey.batches b WHERE b.run_id = r.id)
                  ORDER BY r.id LIMIT 1",
                &[&before],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// Terminates the database's backends that are inside a transaction (a batch, a ledger
    /// step), waiting up to a second for one to be. Returns how many.
    async fn terminate_backends(&self) -> anyhow::Result<i64> {
        let c = self.pool.get().await?;
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                      WHERE datname = current_database() AND pid <> pg_backend_pid()
                        AND backend_type = 'client backend' AND xact_start IS NOT NULL",
                    &[],
                )
                .await?
                .get(0);
            if n > 0 || Instant::now() > deadline {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn jitter(rng: &mut StdRng, mean: Duration) -> Duration {
    mean.mul_f64(rng.random_range(0.5..1.5))
}

fn pick(rng: &mut StdRng, kinds: &[Fault]) -> Fault {
    let total: u32 = kinds.iter().map(|k| k.weight()).sum();
    let mut x = rng.random_range(0..total.max(1));
    for k in kinds {
        if x < k.weight() {
            return *k;
        }
        x -= k.weight();
    }
    kinds[0]
}

/// The soak, start to end. Destroys and reseeds the demo tables.
pub async fn run(
    settings: &Settings,
    master: Arc<MasterKey>,
    opts: &ChaosOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<ChaosReport> {
    let (rekey, worker_bin) = procs::binaries(&opts.bin_dir)?;
    anyhow::ensure!(!opts.faults.is_empty(), "no faults chosen");
    let pool = rekey_common::db::pool(settings, 4)?;
    let mut report = ChaosReport {
        rows: opts.rows,
        ..Default::default()
    };
    let (log_dir, temp_logs) = match &opts.log_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("rekey-chaos-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&log_dir).with_context(|| format!("create {}", log_dir.display()))?;

    progress(&format!(
        "seeding {} records (the demo tables are emptied first)",
        opts.rows
    ));
    report.values = crate::seed::reseed(&pool, settings, &master, opts.rows, opts.seed)
        .await?
        .values;

    let mut broker = if opts.shared_broker {
        None
    } else {
        progress("starting a private RabbitMQ node");
        Some(PrivateBroker::start().await?)
    };
    let kinds: Vec<Fault> = opts
        .faults
        .iter()
        .copied()
        .filter(|k| *k != Fault::BrokerRestart || broker.is_some())
        .collect();
    anyhow::ensure!(
        !kinds.is_empty(),
        "broker restarts need the private broker (drop --shared-broker)"
    );
    let prefix = format!("{}-chaos-{}", settings.queue_prefix, std::process::id());
    let mut env = vec![
        ("REKEY_QUEUE_PREFIX".to_owned(), prefix.clone()),
        (
            "RUST_LOG".to_owned(),
            std::env::var("RUST_LOG").unwrap_or("info,lapin=off".into()),
        ),
    ];
    if let Some(b) = &broker {
        env.push(("REKEY_AMQP_URL".into(), b.url()));
    }
    // rekey's binaries rotate the demo tables: name them unless the operator gave a file.
    let config = match &opts.config {
        Some(c) => c.clone(),
        None => rekey_common::config::demo_config_file().context("write the demo targets")?,
    };
    env.push(("REKEY_CONFIG".into(), config.display().to_string()));
    let mut soak = Soak {
        pool: pool.clone(),
        rekey,
        env: env.clone(),
        log_dir: log_dir.clone(),
        starts: 0,
    };
    let mut fleet = Fleet::start(
        FleetSpec {
            bin: worker_bin,
            env,
            args: vec![
                "--concurrency".into(),
                opts.worker_concurrency.max(1).to_string(),
            ],
            log_dir: Some(log_dir.clone()),
            id_prefix: "w".into(),
        },
        opts.workers.max(1),
        VecDeque::new(),
    )?;

    let before: i64 = pool
        .get()
        .await?
        .query_one("SELECT COALESCE(max(id), 0) FROM rekey.runs", &[])
        .await?
        .get(0);
    let mut rotate_args = procs::unattended_rotate(&opts.stages, "1s");
    // The soak is about faults, not pacing: the latency throttle would answer the soak's
    // own disturbance (connections terminated, a broker restarting) with its longest gaps
    // and slow start would begin again after every coordinator kill, so both are off.
    rotate_args.extend(
        [
            "--batch-bytes",
            &opts.batch_bytes.to_string(),
            "--lease-secs",
            "15",
            "--throttle-pct",
            "0",
            "--no-slow-start",
        ]
        .map(str::to_owned),
    );
    progress(&format!(
        "rotating with {} workers; faults for up to {:?}, about every {:?}: {}",
        opts.workers,
        opts.duration,
        opts.fault_every,
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let started = Instant::now();
    let mut coordinator = soak.coordinator(&rotate_args)?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut first_round: VecDeque<Fault> = kinds.iter().copied().collect();
    let faults_until = started + opts.duration;
    let mut next_fault = started + jitter(&mut rng, opts.fault_every);
    let mut last_broker_restart: Option<Instant> = None;
    let mut run_id: Option<i64> = None;
    let outcome: anyhow::Result<()> = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for d in fleet.replace_dead()? {
            if !procs::killed(&d.status) {
                report.unexpected_worker_exits += 1;
                tracing::warn!(worker = %d.id, status = %d.status, "a worker ended by itself");
            }
        }
        if run_id.is_none() {
            run_id = soak.find_run(before).await?;
            report.run_id = run_id;
        }
        if let Some(status) = coordinator.child.try_wait()? {
            let Some(id) = run_id.or(soak.find_run(before).await?) else {
                break Err(anyhow::anyhow!(
                    "rekey rotate ended ({status}) before its run was planned; see {}",
                    log_dir.display()
                ));
            };
            run_id = Some(id);
            report.run_id = run_id;
            let state = soak.run_state(id).await?;
            match state.as_str() {
                "completed" => break Ok(()),
                "failed" | "rolled_back" | "cancelled" => {
                    break Err(anyhow::anyhow!(
                        "run {id} ended {state}; see {}",
                        log_dir.display()
                    ));
                }
                _ => {
                    if !coordinator.killed {
                        report.coordinator_failures += 1;
                        tracing::warn!(run_id = id, %status, state, "the coordinator exited with the run unfinished; resuming");
                    }
                    coordinator = soak.resume(id)?;
                }
            }
        }
        let now = Instant::now();
        if now > faults_until + opts.finish_within {
            break Err(anyhow::anyhow!(
                "the run did not complete within {:?} after the faults stopped",
                opts.finish_within
            ));
        }
        if run_id.is_none() || now >= faults_until || now < next_fault {
            continue;
        }
        let mut kind = first_round
            .pop_front()
            .unwrap_or_else(|| pick(&mut rng, &kinds));
        if kind == Fault::BrokerRestart
            && last_broker_restart.is_some_and(|t| t.elapsed() < opts.broker_restart_gap)
        {
            kind = Fault::WorkerKill;
        }
        let injected = match kind {
            Fault::WorkerKill => {
                let i = rng.random_range(0..fleet.members.len());
                fleet.kill(i).is_some()
            }
            Fault::DbTerminate => {
                let n = soak.terminate_backends().await?;
                report.backends_terminated += n;
                n > 0
            }
            Fault::CoordinatorKill => {
                let ok = coordinator.child.start_kill().is_ok();
                coordinator.killed = ok;
                ok
            }
            Fault::BrokerRestart => {
                let down = Duration::from_millis(rng.random_range(1000..3000));
                if let Some(b) = broker.as_mut() {
                    b.restart(down).await?;
                }
                last_broker_restart = Some(Instant::now());
                true
            }
        };
        if injected {
            *report.faults.entry(kind.name()).or_default() += 1;
            report.faults_total += 1;
            tracing::info!(
                fault = kind.name(),
                total = report.faults_total,
                "fault injected"
            );
        }
        next_fault = Instant::now() + jitter(&mut rng, opts.fault_every);
    };
    report.seconds = started.elapsed().as_secs_f64();
    for d in fleet.stop(Duration::from_secs(60)).await {
        if !d.status.success() {
            tracing::warn!(worker = %d.id, status = %d.status, "a worker did not stop cleanly");
        }
    }
    let _ = coordinator.child.start_kill();
    let _ = coordinator.child.wait().await;
    if broker.is_none() {
        crate::procs::delete_queues(settings, &prefix).await;
    }
    drop(broker);

    if let Some(id) = run_id {
        report.run_state = soak.run_state(id).await?;
        progress("verifying every value against its recorded plaintext");
        let c = pool.get().await?;
        let row = c
            .query_one(
                "SELECT r.target_key_id,
                        (SELECT COALESCE(sum(n_rotated), 0)::int8 FROM rekey.batches WHERE run_id = r.id AND state = 'done'),
                        (SELECT COALESCE(sum(n_ops), 0)::int8 FROM rekey.audit_log WHERE run_id = r.id AND operation = 'encrypt' AND success)
                   FROM rekey.runs r WHERE r.id = $1",
                &[&id],
            )
            .await?;
        let target: Uuid = row.get(0);
        report.ledger_rotated = row.get(1);
        report.audited_encryptions = row.get(2);
        let ring = store::load_ring(&**c, &master).await?;
        report.verify = verify::verify(&pool, &ring, Some(target), 10_000).await?;
        report.lost = report.verify.missing;
        report.corrupted =
            report.verify.mismatched + report.verify.undecryptable + report.verify.unrecorded;
    }
    if outcome.is_ok() && report.passed() && temp_logs {
        let _ = std::fs::remove_dir_all(&log_dir);
    } else {
        report.log_dir = Some(log_dir);
    }
    outcome?;
    Ok(report)
}

/// Prints the figures.
pub fn print(r: &ChaosReport) {
    println!(
        "chaos: {} records ({} values), run {} {} after {:.0} s",
        r.rows,
        r.values,
        r.run_id.map_or("-".into(), |i| i.to_string()),
        r.run_state,
        r.seconds
    );
    println!("faults injected: {}", r.faults_total);
    for (k, n) in &r.faults {
        println!("  {k:<18} {n}");
    }
    println!("  backends terminated: {}", r.backends_terminated);
    println!(
        "unexpected worker exits: {}, coordinator failures resumed: {}",
        r.unexpected_worker_exits, r.coordinator_failures
    );
    println!(
        "records verified: {} values ok, {} lost, {} corrupted, {} not under the new key",
        r.verify.ok, r.lost, r.corrupted, r.verify.not_on_expected_key
    );
    println!(
        "counted: ledger {} rotated, audit {} encryptions, verification {} under the new key",
        r.ledger_rotated, r.audited_encryptions, r.verify.ok
    );
    for e in &r.verify.examples {
        println!("  {e}");
    }
    if let Some(d) = &r.log_dir {
        println!("logs: {}", d.display());
    }
    println!("{}", if r.passed() { "PASSED" } else { "FAILED" });
}
