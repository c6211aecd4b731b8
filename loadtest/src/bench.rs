//! `rekey-loadtest bench`: on one freshly seeded data set, measures in turn
//! (a) the in-database ceiling: every encrypted column rewritten in place by id range;
//! (b) a bare client-side rotation: read, decrypt, re-encrypt, bulk write, nothing else;
//! (c) the full rekey rotation: `rekey rotate` with W `rekey-worker` processes over RabbitMQ,
//! with ledger, audit and verification, while simulated application traffic runs;
//! and reports rows/s, the ratios, the application's latency before and during (c), the
//! peak memory of every process, a per-second timeline, a JSON file and a PNG chart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use rekey_common::Settings;
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::master::MasterKey;
use rekey_common::keys::ring::KeyRing;
use rekey_common::keys::{KeyKind, store};
use rekey_common::target::{Target, quote_ident};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::traffic::{self, Percentiles, TrafficOptions, TrafficReport};
use crate::{seed, verify};

/// What to measure and how.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub rows: i64,
    pub workers: usize,
    /// Batches each worker runs at once; (a) and (b) use `workers × worker_concurrency`
    /// connections, so all three phases have the same parallelism.
    pub worker_concurrency: usize,
    pub prefetch: u16,
    /// Rows per batch at most.
    pub batch_size: i64,
    /// Bytes of values per batch (0: `batch_size` rows each), as `rekey rotate --batch-bytes`.
    pub batch_bytes: i64,
    /// Stages of the rotation in (c), e.g. `[100]` or `[1, 25, 50, 75, 100]`.
    pub stages: Vec<i32>,
    /// Application traffic (operations per second) measured before and during (c); 0: none.
    pub traffic_rate: u32,
    /// Share of the traffic that writes.
    pub write_share: f64,
    /// Give (c) the application's own p99 as its SLO signal: the traffic exports its
    /// request histogram to a Prometheus of the bench's own, and `rekey rotate` gets
    /// `--slo-prometheus-url` and `--slo-query` (`slo_window` the query's rate window).
    pub slo: bool,
    pub slo_window: Duration,
    /// How long the traffic runs before (c) to give the baseline latency.
    pub baseline: Duration,
    /// The throttle of (c): `rekey rotate --throttle-pct` (0: off), `--throttle-min-ms`,
    /// and slow start (else `--no-slow-start`).
    pub throttle_pct: f64,
    pub throttle_min_ms: f64,
    pub slow_start: bool,
    /// Skip (a) and (b).
    pub only_full: bool,
    /// Pass the traffic's p99 before (c) to `rekey rotate --app-p99-ms`.
    pub tell_app_p99: bool,
    /// Where `rekey` and `rekey-worker` are (default: beside this executable).
    pub bin_dir: PathBuf,
    /// Passed on to `rekey` and `rekey-worker`.
    pub config: Option<PathBuf>,
    /// Check every value after (c).
    pub verify: bool,
    pub seed: u64,
}

/// One phase's figures.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PhaseResult {
    pub name: String,
    pub rows: i64,
    pub values: i64,
    pub seconds: f64,
    pub rows_per_sec: f64,
    /// Seconds since the bench started when the phase started.
    pub started_at: f64,
}

/// A process's memory, in MiB.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ProcessMemory {
    pub name: String,
    pub pid: u32,
    /// The kernel's high-water mark of resident memory (VmHWM).
    pub peak_rss_mib: f64,
    /// CPU time (user + system) the process used, in seconds, as last read.
    pub cpu_seconds: f64,
    /// Resident memory sampled every 250 ms: (seconds since the bench started, MiB).
    pub samples: Vec<(f64, f64)>,
}

/// Application latency and its change.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LatencyImpact {
    pub rate: u32,
    pub before: Percentiles,
    pub during: Percentiles,
    pub reads_before: Percentiles,
    pub reads_during: Percentiles,
    pub writes_before: Percentiles,
    pub writes_during: Percentiles,
    pub before_errors: u64,
    pub during_errors: u64,
    pub decrypt_errors: u64,
    /// (p99 during − p99 before) / p99 before, in percent.
    pub p99_impact_pct: f64,
    pub p50_impact_pct: f64,
    /// All operations during (a) and during (b), the same traffic.
    #[serde(default)]
    pub during_ceiling: Percentiles,
    #[serde(default)]
    pub during_bare: Percentiles,
    /// Share of the traffic that wrote.
    #[serde(default)]
    pub write_share: f64,
    /// The first 60 s of the rotation (from the run's creation) and its p99 against before.
    #[serde(default)]
    pub first_minute: traffic::Window,
    #[serde(default)]
    pub first_minute_p99_impact_pct: f64,
    /// Per 10 s of the rotation: its traffic, rows/s and what held the throttle back.
    #[serde(default)]
    pub windows: Vec<RotationWindow>,
}

/// Ten seconds of the rotation: the application's figures, the rate, the throttle's say.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RotationWindow {
    /// Seconds since the run was created.
    pub start_s: u64,
    pub traffic: traffic::Window,
    pub rows_per_sec: f64,
    /// What `rekey status` said held publication back, most of the window (none: full
    /// speed).
    pub throttle: Option<String>,
}

/// Everything the bench measured.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct BenchReport {
    pub rows: i64,
    pub values: i64,
    pub workers: usize,
    pub worker_concurrency: usize,
    pub batch_size: i64,
    pub batch_bytes: i64,
    /// Rows per batch for each table, as (a), (b) and (c) cut them.
    pub rows_per_batch: Vec<(String, i64)>,
    pub stages: Vec<i32>,
    /// (c)'s throttle: percent over the probe's baseline (0: off), noise floor, slow start.
    pub throttle_pct: f64,
    pub throttle_min_ms: f64,
    pub slow_start: bool,
    /// `rekey rotate --app-p99-ms` in (c): the traffic's p99 before (c), as an operator
    /// reads their application's p99 off its dashboards.
    pub app_p99_ms_told: Option<f64>,
    /// (c)'s performance figures per stage, from its gate decisions: the probe's p99
    /// before and during, the throttle's threshold, probes over it, the longest gap.
    pub throttle_figures: Vec<serde_json::Value>,
    pub seed_seconds: f64,
    pub data_mib: f64,
    pub ceiling: PhaseResult,
    pub bare: PhaseResult,
    pub full: PhaseResult,
    /// Wall time of the `rekey rotate` process, including key propagation, planning and gates.
    pub full_process_seconds: f64,
    /// Rows the run's batches read, sweeps included.
    pub full_rows_scanned: i64,
    /// CPU seconds the machine was busy during (c) (all processes: Postgres, RabbitMQ,
    /// workers, coordinator, traffic) and the machine's core count: where the time went.
    pub full_machine_cpu_seconds: f64,
    pub cores: usize,
    pub full_vs_ceiling: f64,
    pub full_vs_bare: f64,
    pub latency: Option<LatencyImpact>,
    pub coordinator: ProcessMemory,
    pub workers_memory: Vec<ProcessMemory>,
    /// Per second: (seconds since start, phase, rows/s).
    pub throughput: Vec<(f64, String, f64)>,
    /// Per second of traffic: (seconds since start, ops, p99 ms).
    pub app_latency: Vec<(f64, u64, f64)>,
    pub verify: Option<verify::VerifyReport>,
    pub run_id: Option<i64>,
    /// The queue prefix (c) used; its queues are deleted at the end.
    pub queue_prefix: String,
    /// Seconds since the bench started when (c)'s run was created (its windows count from
    /// there).
    #[serde(default)]
    pub run_created_at: f64,
    /// The SLO query (c) was given, when `--slo`.
    #[serde(default)]
    pub slo_query: Option<String>,
    /// What the figures depend on besides rekey: the database's settings and the machine's
    /// memory reclaim.
    #[serde(default)]
    pub conditions: Conditions,
}

/// The settings the bench's figures depend on, read when it starts: PostgreSQL's own
/// (which share of the data its buffers hold, how often it checkpoints) and whether the
/// kernel reclaims memory that has not been touched for a while (DAMON's proactive
/// `pageout`, as on some virtual machines): then every page of the page cache untouched
/// for that long is dropped, and an application's point reads of a database larger than
/// `shared_buffers` go to the disk whatever a rotation does.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Conditions {
    /// `name = setting` of the PostgreSQL settings in [`PG_SETTINGS`].
    pub postgres: Vec<(String, String)>,
    /// The database's size when the bench starts (after seeding) and when it ends, MiB.
    pub database_mib: f64,
    pub database_mib_after: f64,
    /// The kernel's proactive reclaim, when one runs: what it reclaims and how fast.
    pub reclaim: Option<String>,
}

/// The PostgreSQL settings a bench records.
pub const PG_SETTINGS: [&str; 6] = [
    "server_version",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "synchronous_commit",
    "wal_compression",
];

impl Conditions {
    async fn read(pool: &Pool) -> anyhow::Result<Self> {
        let c = pool.get().await?;
        let mut postgres = Vec::new();
        for name in PG_SETTINGS {
            let row = c.query_one("SELECT current_setting($1)", &[&name]).await?;
            postgres.push((name.to_owned(), row.get(0)));
        }
        Ok(Self {
            postgres,
            database_mib: database_mib(pool).await?,
            database_mib_after: 0.0,
            reclaim: damon_reclaim(Path::new("/sys/kernel/mm/damon/admin/kdamonds")),
        })
    }

    /// One line for the printed report.
    pub fn line(&self) -> String {
        let pg = self
            .postgres
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut line = format!(
            "PostgreSQL: {pg}; database {:.0} MiB before, {:.0} MiB after",
            self.database_mib, self.database_mib_after
        );
        if let Some(r) = &self.reclaim {
            line.push_str(&format!("; the kernel reclaims memory: {r}"));
        }
        line
    }
}

async fn database_mib(pool: &Pool) -> anyhow::Result<f64> {
    Ok(pool
        .get()
        .await?
        .query_one(
            "SELECT pg_database_size(current_database())::float8 / 1048576",
            &[],
        )
        .await?
        .get(0))
}

/// The DAMON schemes that page memory out, from its sysfs interface (`root`): for each
/// running kdamond, the age after which a region not accessed is paged out and the quota.
/// `None` when there is none (or no such interface).
pub fn damon_reclaim(root: &Path) -> Option<String> {
    let read = |p: PathBuf| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let mut found = Vec::new();
    for kd in std::fs::read_dir(root).ok()?.flatten() {
        let kd = kd.path();
        if read(kd.join("state")).as_deref() != Some("on") {
            continue;
        }
        for ctx in std::fs::read_dir(kd.join("contexts")).ok()?.flatten() {
            let ctx = ctx.path();
            let aggr_us: f64 = read(ctx.join("monitoring_attrs/intervals/aggr_us"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let Ok(schemes) = std::fs::read_dir(ctx.join("schemes")) else {
                continue;
            };
            for sc in schemes.flatten() {
                let sc = sc.path();
                if read(sc.join("action")).as_deref() != Some("pageout") {
                    continue;
                }
                let age: f64 = read(sc.join("access_pattern/age/min"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                let quota: f64 = read(sc.join("quotas/bytes"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                let reset_ms: f64 = read(sc.join("quotas/reset_interval_ms"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000.0);
                let mut what = format!(
                    "DAMON pages out what was not accessed for {:.0} s",
                    age * aggr_us / 1e6
                );
                if quota > 0.0 && reset_ms > 0.0 {
                    what.push_str(&format!(
                        ", up to {:.0} MiB/s",
                        quota / 1048576.0 * 1000.0 / reset_ms
                    ));
                }
                found.push(what);
            }
        }
    }
    (!found.is_empty()).then(|| found.join("; "))
}

/// The demo tables and their encrypted columns.
fn demo_targets() -> Vec<Target> {
    rekey_common::target::demo_targets()
}

/// Id ranges of about `batch` rows each, from one pass over the id index.
async fn ranges(pool: &Pool, t: &Target, batch: i64) -> anyhow::Result<Vec<(i64, i64)>> {
    let c = pool.get().await?;
    let (table, id) = (t.quoted_table(), quote_ident(&t.id_column));
    let starts: Vec<i64> = c
        .query(
            &format!(
                "SELECT {id} FROM (SELECT {id}, row_number() OVER (ORDER BY {id}) - 1 AS rn FROM {table}) s
                  WHERE rn % $1 = 0 ORDER BY {id}"
            ),
            &[&batch],
        )
        .await
        .with_context(|| format!("cut {} into ranges", t.table))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let max: Option<i64> = c
        .query_one(&format!("SELECT max({id}) FROM {table}"), &[])
        .await?
        .get(0);
    let mut out = Vec::with_capacity(starts.len());
    for (i, lo) in starts.iter().enumerate() {
        let hi = starts.get(i + 1).map(|n| n - 1).or(max).unwrap_or(*lo);
        out.push((*lo, hi));
    }
    Ok(out)
}

/// All ranges of all targets, as work items, sized as `rekey rotate` sizes them.
async fn work(
    pool: &Pool,
    max_rows: i64,
    batch_bytes: i64,
) -> anyhow::Result<(Vec<(Target, i64, i64)>, Vec<(String, i64)>)> {
    let mut out = Vec::new();
    let mut sizes = Vec::new();
    for t in demo_targets() {
        let rows =
            rekey_common::sizing::rows_for(&**pool.get().await?, &t, max_rows, batch_bytes).await?;
        sizes.push((t.table.clone(), rows));
        for (lo, hi) in ranges(pool, &t, rows).await? {
            out.push((t.clone(), lo, hi));
        }
    }
    Ok((out, sizes))
}

/// Counts rows as they are done and samples the rate once a second.
struct Meter {
    rows: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<Vec<(f64, f64)>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Meter {
    fn start(epoch: Instant) -> Self {
        let rows = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let counter = rows.clone();
        let sampler = tokio::spawn(async move {
            let mut out = Vec::new();
            let (mut last, mut last_at) = (0, Instant::now());
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                let end = tokio::select! {
                    _ = tick.tick() => false,
                    _ = stopped.changed() => true,
                };
                let now = counter.load(Ordering::Relaxed);
                let secs = last_at.elapsed().as_secs_f64().max(1e-3);
                out.push((epoch.elapsed().as_secs_f64(), (now - last) as f64 / secs));
                (last, last_at) = (now, Instant::now());
                if end {
                    break;
                }
            }
            out
        });
        Self {
            rows,
            sampler,
            stop,
        }
    }

    async fn finish(self) -> Vec<(f64, f64)> {
        let _ = self.stop.send(true);
        self.sampler.await.unwrap_or_default()
    }
}

/// Runs `work` over `parallel` connections; each item's closure returns (rows, values).
async fn run_parallel<F, Fut>(
    items: Vec<(Target, i64, i64)>,
    parallel: usize,
    meter: &Meter,
    f: F,
) -> anyhow::Result<(i64, i64)>
where
    F: Fn(Target, i64, i64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<(i64, i64)>> + Send,
{
    let queue = Arc::new(std::sync::Mutex::new(items.into_iter()));
    let f = Arc::new(f);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1) {
        let (queue, f, rows) = (queue.clone(), f.clone(), meter.rows.clone());
        tasks.spawn(async move {
            let mut done = (0i64, 0i64);
            loop {
                let next = queue.lock().expect("work queue").next();
                let Some((t, lo, hi)) = next else {
                    return anyhow::Ok(done);
                };
                let (r, v) = f(t, lo, hi).await?;
                rows.fetch_add(r as u64, Ordering::Relaxed);
                done.0 += r;
                done.1 += v;
            }
        });
    }
    let mut total = (0, 0);
    while let Some(res) = tasks.join_next().await {
        let (r, v) = res.context("bench task panicked")??;
        total.0 += r;
        total.1 += v;
    }
    Ok(total)
}

/// (a) Every encrypted column rewritten in place (`col = col || ''`), by id range.
async fn ceiling(
    pool: &Pool,
    items: Vec<(Target, i64, i64)>,
    parallel: usize,
    meter: &Meter,
) -> anyhow::Result<(i64, i64)> {
    let pool = pool.clone();
    run_parallel(items, parallel, meter, move |t, lo, hi| {
        let pool = pool.clone();
        async move {
            let c = pool.get().await?;
            let id = quote_ident(&t.id_column);
            let sets: Vec<String> = t
                .columns
                .iter()
                .map(|col| {
                    let q = quote_ident(col);
                    format!("{q} = {q} || ''::bytea")
                })
                .collect();
            let n = c
                .execute(
                    &format!(
                        "UPDATE {} SET {} WHERE {id} BETWEEN $1 AND $2",
                        t.quoted_table(),
                        sets.join(", ")
                    ),
                    &[&lo, &hi],
                )
                .await
                .with_context(|| format!("rewrite {} ids {lo}..={hi}", t.table))?;
            Ok((n as i64, n as i64 * t.columns.len() as i64))
        }
    })
    .await
}

/// (b) A bare client rotation to `target`: read a range with the rows' versions, decrypt and
/// re-encrypt off the executor, write back with the same compare-and-swap `UPDATE … FROM
/// unnest` as the workers ([`Target::write_back_sql`]; a row the application wrote since
/// the read is left alone), commit.
async fn bare(
    pool: &Pool,
    ring: Arc<KeyRing>,
    target: Uuid,
    items: Vec<(Target, i64, i64)>,
    parallel: usize,
    meter: &Meter,
) -> anyhow::Result<(i64, i64)> {
    let pool = pool.clone();
    run_parallel(items, parallel, meter, move |t, lo, hi| {
        let (pool, ring) = (pool.clone(), ring.clone());
        async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            let id = quote_ident(&t.id_column);
            let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
            let rows = tx
                .query(
                    &format!(
                        "SELECT {id}, {}, {} FROM {} WHERE {id} BETWEEN $1 AND $2 ORDER BY {id}",
                        Target::VERSION_SQL,
                        cols.join(", "),
                        t.quoted_table()
                    ),
                    &[&lo, &hi],
                )
                .await?;
            let versions: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
            let data: Vec<(i64, Vec<Option<Vec<u8>>>)> = rows
                .iter()
                .map(|r| (r.get(0), (2..cols.len() + 2).map(|i| r.get(i)).collect()))
                .collect();
            let t2 = t.clone();
            let (ids, new_values, n_values) =
                tokio::task::spawn_blocking(move || reencrypt(&ring, target, &t2, &data)).await??;
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&ids];
            for v in &new_values {
                params.push(v);
            }
            params.push(&versions);
            // Rows the application wrote since the read are left to it (no sweep here).
            tx.query(&t.write_back_sql(), &params).await?;
            tx.commit().await?;
            Ok((ids.len() as i64, n_values))
        }
    })
    .await
}

type Reencrypted = (Vec<i64>, Vec<Vec<Option<Vec<u8>>>>, i64);

fn reencrypt(
    ring: &KeyRing,
    target: Uuid,
    t: &Target,
    rows: &[(i64, Vec<Option<Vec<u8>>>)],
) -> anyhow::Result<Reencrypted> {
    let key = ring
        .get(&target)
        .ok_or_else(|| anyhow::anyhow!("key {target} is not in the ring"))?;
    let mut ids = Vec::with_capacity(rows.len());
    let mut cols: Vec<Vec<Option<Vec<u8>>>> = vec![Vec::with_capacity(rows.len()); t.columns.len()];
    let mut n = 0;
    for (row_id, values) in rows {
        ids.push(*row_id);
        for (ci, v) in values.iter().enumerate() {
            let new = match v {
                None => None,
                Some(v) => {
                    let loc = FieldLocation {
                        table: &t.table,
                        column: &t.columns[ci],
                        row_id: *row_id,
                    };
                    // A value that cannot be opened (planted corruption) is left alone.
                    match envelope::open(ring, &loc, v) {
                        Ok(plain) => {
                            n += 1;
                            Some(envelope::seal_with(key, &loc, plain.as_bytes())?)
                        }
                        Err(_) => None,
                    }
                }
            };
            cols[ci].push(new);
        }
    }
    Ok((ids, cols, n))
}

/// Polls a child's memory from /proc until it exits.
fn watch_memory(name: String, pid: u32, epoch: Instant) -> tokio::task::JoinHandle<ProcessMemory> {
    tokio::spawn(async move {
        let mut mem = ProcessMemory {
            name,
            pid,
            ..Default::default()
        };
        let path = format!("/proc/{pid}/status");
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let Ok(status) = tokio::fs::read_to_string(&path).await else {
                break;
            };
            // A zombie has no memory lines: the process has exited.
            let field = |k: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(k))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
                    .map(|kib| kib / 1024.0)
            };
            let (Some(rss), Some(hwm)) = (field("VmRSS:"), field("VmHWM:")) else {
                break;
            };
            mem.peak_rss_mib = mem.peak_rss_mib.max(hwm);
            if let Some(cpu) = process_cpu_seconds(pid).await {
                mem.cpu_seconds = cpu;
            }
            mem.samples.push((epoch.elapsed().as_secs_f64(), rss));
        }
        mem
    })
}

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// utime + stime of a process from /proc/<pid>/stat.
async fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = tokio::fs::read_to_string(format!("/proc/{pid}/stat"))
        .await
        .ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime) = (
        f.get(11)?.parse::<f64>().ok()?,
        f.get(12)?.parse::<f64>().ok()?,
    );
    Some((utime + stime) / USER_HZ)
}

/// CPU seconds the whole machine spent busy (everything but idle and iowait), from /proc/stat.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, x)| x)
        .sum();
    busy / USER_HZ
}

fn percent(after: f64, before: f64) -> f64 {
    if before > 0.0 {
        (after - before) / before * 100.0
    } else {
        0.0
    }
}

/// The bench, start to end. Destroys and reseeds the demo tables.
pub async fn run(
    settings: &Settings,
    master: Arc<MasterKey>,
    opts: &BenchOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<BenchReport> {
    let (rekey, worker_bin) = crate::procs::binaries(&opts.bin_dir)?;
    let parallel = opts.workers.max(1) * opts.worker_concurrency.max(1);
    let pool = rekey_common::db::pool(settings, parallel + 2)?;
    let epoch = Instant::now();
    let mut report = BenchReport {
        rows: opts.rows,
        workers: opts.workers,
        worker_concurrency: opts.worker_concurrency,
        batch_size: opts.batch_size,
        batch_bytes: opts.batch_bytes,
        stages: opts.stages.clone(),
        throttle_pct: opts.throttle_pct,
        throttle_min_ms: opts.throttle_min_ms,
        slow_start: opts.slow_start,
        ..Default::default()
    };

    progress(&format!(
        "seeding {} records (the demo tables are emptied first)",
        opts.rows
    ));
    let t = Instant::now();
    let seeded = seed::reseed(&pool, settings, &master, opts.rows, opts.seed).await?;
    report.seed_seconds = t.elapsed().as_secs_f64();
    report.values = seeded.values;
    report.conditions = Conditions::read(&pool).await?;
    report.data_mib = pool
        .get()
        .await?
        .query_one(
            "SELECT (pg_total_relation_size('demo.users') + pg_total_relation_size('demo.agents')
                     + pg_total_relation_size('demo.conversations'))::float8 / 1048576",
            &[],
        )
        .await?
        .get(0);

    // The application's traffic runs during (a) and (b) as well: all three phases share the
    // machine with it, and its latency during (a) shows what rewriting the rows costs the
    // application when Postgres alone does it.
    let traffic_pool = rekey_common::db::pool(settings, 8)?;
    // With --slo, the application's request histogram, scraped by a Prometheus of the
    // bench's own, is (c)'s signal.
    let histogram = Arc::new(traffic::AppHistogram::new());
    let traffic_opts = |stop: Option<tokio::sync::watch::Receiver<bool>>| TrafficOptions {
        histogram: opts.slo.then(|| histogram.clone()),
        rate: opts.traffic_rate,
        duration: if stop.is_some() {
            Duration::from_secs(24 * 3600)
        } else {
            opts.baseline
        },
        refresh: Duration::from_secs(1),
        seed: opts.seed,
        stop,
        write_share: opts.write_share,
        ..Default::default()
    };
    let background = |seed: u64| {
        (opts.traffic_rate > 0).then(|| {
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let (p, m) = (traffic_pool.clone(), master.clone());
            let o = TrafficOptions {
                seed,
                ..traffic_opts(Some(stop_rx))
            };
            let offset = epoch.elapsed().as_secs_f64();
            (
                stop_tx,
                offset,
                tokio::spawn(async move { traffic::run(&p, m, &o).await }),
            )
        })
    };

    let (during_ceiling, during_bare) = if opts.only_full {
        (None, None)
    } else {
        // (a) the ceiling.
        progress("(a) in-database ceiling: UPDATE … SET col = col || '' by id range");
        let (items, sizes) = work(&pool, opts.batch_size, opts.batch_bytes).await?;
        report.rows_per_batch = sizes;
        let meter = Meter::start(epoch);
        let started_at = epoch.elapsed().as_secs_f64();
        let t = Instant::now();
        let traffic_a = background(opts.seed + 1);
        let (rows, values) = ceiling(&pool, items, parallel, &meter).await?;
        report.ceiling = phase("ceiling", rows, values, t.elapsed(), started_at);
        push_timeline(&mut report, "ceiling", meter.finish().await);
        let during_ceiling = finish_traffic(&mut report, traffic_a).await?;
        seed::vacuum(&pool).await?;

        // (b) the bare client rotation, to a key made active for it.
        progress("(b) bare client rotation: read, decrypt, re-encrypt, bulk write");
        let bare_key = {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            let k = store::generate(
                &tx,
                &master,
                KeyKind::Field,
                "bench bare rotation",
                &settings.key_policy,
                &settings.actor,
            )
            .await?;
            tx.commit().await?;
            k.id
        };
        // The key is published as pending first, so that the application's traffic (which
        // reloads its keys every second) can read what (b) writes under it.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            store::activate(&tx, bare_key, &settings.actor).await?;
            tx.commit().await?;
        }
        let ring = Arc::new(store::load_ring(&**pool.get().await?, &master).await?);
        let (items, _) = work(&pool, opts.batch_size, opts.batch_bytes).await?;
        let meter = Meter::start(epoch);
        let started_at = epoch.elapsed().as_secs_f64();
        let t = Instant::now();
        let traffic_b = background(opts.seed + 2);
        let (rows, values) = bare(&pool, ring.clone(), bare_key, items, parallel, &meter).await?;
        report.bare = phase("bare", rows, values, t.elapsed(), started_at);
        push_timeline(&mut report, "bare", meter.finish().await);
        let during_bare = finish_traffic(&mut report, traffic_b).await?;
        store::add_encryptions(&**pool.get().await?, &ring.take_encryption_counts()).await?;
        seed::vacuum(&pool).await?;
        (during_ceiling, during_bare)
    };

    // (c) the full rotation, with traffic before and during. Before the baseline, the
    // database writes out what seeding, (a) and (b) left dirty (a checkpoint they started
    // would otherwise spread its writes over the baseline for minutes).
    quiesce(&pool).await;
    let slo = if opts.slo && opts.traffic_rate > 0 {
        let h = histogram.clone();
        let (addr, server) =
            rekey_common::metrics::serve_text("127.0.0.1:0".parse()?, Arc::new(move || h.render()))
                .await?;
        let prom = crate::prom::Prometheus::start("rekey-bench", &[("app", addr.port())]).await?;
        let query = format!(
            "histogram_quantile(0.99, sum by (le) (rate(app_request_duration_seconds_bucket[{}s])))",
            opts.slo_window.as_secs().max(2)
        );
        progress(&format!(
            "(c) will throttle on the application's p99 from {}: {query}",
            prom.url
        ));
        Some((prom, server, query))
    } else {
        None
    };
    let before = if opts.traffic_rate > 0 {
        progress(&format!(
            "application traffic alone for {:?} ({} ops/s)",
            opts.baseline, opts.traffic_rate
        ));
        let offset = epoch.elapsed().as_secs_f64();
        let r = traffic::run(&traffic_pool, master.clone(), &traffic_opts(None)).await?;
        push_latency(&mut report, offset, &r);
        Some(r)
    } else {
        None
    };

    progress(&format!(
        "(c) full rotation: rekey rotate with {} rekey-worker processes",
        opts.workers
    ));
    let prefix = format!("{}-bench-{}", settings.queue_prefix, std::process::id());
    report.queue_prefix = prefix.clone();
    // rekey's binaries rotate the demo tables: name them unless the operator gave a file.
    let config = match &opts.config {
        Some(c) => c.clone(),
        None => rekey_common::config::demo_config_file().context("write the demo targets")?,
    };
    let env = |cmd: &mut tokio::process::Command| {
        cmd.env("REKEY_QUEUE_PREFIX", &prefix)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("warn,lapin=off".into()),
            )
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd.arg("--config").arg(&config);
    };
    let mut workers = Vec::new();
    let mut mem_watch = Vec::new();
    for i in 0..opts.workers {
        let mut cmd = tokio::process::Command::new(&worker_bin);
        env(&mut cmd);
        cmd.arg("--worker-id")
            .arg(format!("bench-w{i}"))
            .arg("--concurrency")
            .arg(opts.worker_concurrency.to_string())
            .arg("--prefetch")
            .arg(opts.prefetch.to_string())
            .stdout(std::process::Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", worker_bin.display()))?;
        let pid = child.id().unwrap_or_default();
        mem_watch.push(watch_memory(format!("worker {i}"), pid, epoch));
        workers.push(child);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let during = if opts.traffic_rate > 0 {
        let (p, m, o) = (
            traffic_pool.clone(),
            master.clone(),
            traffic_opts(Some(stop_rx)),
        );
        let offset = epoch.elapsed().as_secs_f64();
        Some((
            offset,
            tokio::spawn(async move { traffic::run(&p, m, &o).await }),
        ))
    } else {
        None
    };
    let mut cmd = tokio::process::Command::new(&rekey);
    env(&mut cmd);
    cmd.args(crate::procs::unattended_rotate(&opts.stages, "2s"));
    cmd.args([
        "--batch-size",
        &opts.batch_size.to_string(),
        "--batch-bytes",
        &opts.batch_bytes.to_string(),
        "--throttle-pct",
        &opts.throttle_pct.to_string(),
        "--throttle-min-ms",
        &opts.throttle_min_ms.to_string(),
        "--json",
    ])
    .stdout(std::process::Stdio::piped());
    if !opts.slow_start {
        cmd.arg("--no-slow-start");
    }
    if let Some((prom, _, query)) = &slo {
        report.slo_query = Some(query.clone());
        cmd.args(["--slo-prometheus-url", &prom.url, "--slo-query", query]);
    }
    if let Some(b) = before.as_ref().filter(|_| opts.tell_app_p99) {
        report.app_p99_ms_told = Some(b.all.p99_ms);
        cmd.args(["--app-p99-ms", &format!("{:.3}", b.all.p99_ms)]);
    }
    let t = Instant::now();
    let busy_before = machine_busy_seconds();
    let started_at = epoch.elapsed().as_secs_f64();
    let coordinator = cmd
        .spawn()
        .with_context(|| format!("start {}", rekey.display()))?;
    let coord_mem = watch_memory(
        "coordinator".into(),
        coordinator.id().unwrap_or_default(),
        epoch,
    );
    let (said_tx, said_rx) = tokio::sync::watch::channel(false);
    let throttle_said = tokio::spawn(watch_throttle(pool.clone(), said_rx));
    let out = coordinator.wait_with_output().await?;
    let _ = said_tx.send(true);
    let throttle_said = throttle_said.await.unwrap_or_default();
    report.full_process_seconds = t.elapsed().as_secs_f64();
    report.full_machine_cpu_seconds = machine_busy_seconds() - busy_before;
    report.cores = std::thread::available_parallelism().map_or(1, usize::from);
    let _ = stop_tx.send(true);
    let run_id = last_run(&pool).await?;
    report.run_id = run_id;
    anyhow::ensure!(
        out.status.success(),
        "rekey rotate failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    let (scanned, values, secs) = run_figures(&pool, run_id).await?;
    // Every record is rotated once; sweep batches that re-read rows (to catch values the
    // application wrote under the old key meanwhile) count in `full_rows_scanned`.
    report.full_rows_scanned = scanned;
    report.full = PhaseResult {
        name: "full".into(),
        rows: opts.rows,
        values,
        seconds: secs,
        rows_per_sec: opts.rows as f64 / secs.max(1e-9),
        started_at,
    };
    // The ledger's per-second rates count from the run's creation (after the probe's
    // baseline and planning), not from the process's start.
    let created = run_created(&pool, run_id).await?;
    report.run_created_at = created.saturating_duration_since(epoch).as_secs_f64();
    let rates = ledger_rates(&pool, run_id, report.run_created_at).await?;
    push_timeline(&mut report, "full", rates);
    report.throttle_figures = pool
        .get()
        .await?
        .query(
            "SELECT c->'figures' FROM rekey.stages s, jsonb_array_elements(s.gate->'checks') c
              WHERE s.run_id = $1 AND c->>'name' = 'performance_impact' ORDER BY s.stage_no",
            &[&run_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    report.coordinator = coord_mem.await?;
    for mut w in workers {
        if let Some(pid) = w.id() {
            // SIGTERM: the worker drains and exits.
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), w.wait()).await;
        let _ = w.start_kill();
    }
    for m in mem_watch {
        report.workers_memory.push(m.await?);
    }
    if let Some((offset, handle)) = during {
        let d = handle.await??;
        push_latency(&mut report, offset, &d);
        let rates = ledger_rates(&pool, run_id, 0.0).await?;
        if let Some(b) = &before {
            let first_minute = d.between(created, created + Duration::from_secs(60));
            let windows = (0..)
                .map(|w: u64| w * traffic::WINDOW_SECS)
                .take_while(|s| created + Duration::from_secs(*s) < Instant::now())
                .map(|s| {
                    let (from, to) = (
                        created + Duration::from_secs(s),
                        created + Duration::from_secs(s + traffic::WINDOW_SECS),
                    );
                    let rows: f64 = rates
                        .iter()
                        .filter(|(t, _)| (s as f64..(s + traffic::WINDOW_SECS) as f64).contains(t))
                        .map(|(_, r)| r)
                        .sum();
                    RotationWindow {
                        start_s: s,
                        traffic: traffic::Window {
                            start_s: s,
                            ..d.between(from, to)
                        },
                        rows_per_sec: rows / traffic::WINDOW_SECS as f64,
                        throttle: most_said(&throttle_said, from, to),
                    }
                })
                .filter(|w| w.traffic.all.count > 0)
                .collect();
            report.latency = Some(LatencyImpact {
                rate: opts.traffic_rate,
                before: b.all,
                during: d.all,
                reads_before: b.reads,
                reads_during: d.reads,
                writes_before: b.writes,
                writes_during: d.writes,
                before_errors: b.errors,
                during_errors: d.errors,
                decrypt_errors: b.decrypt_errors + d.decrypt_errors,
                p99_impact_pct: percent(d.all.p99_ms, b.all.p99_ms),
                p50_impact_pct: percent(d.all.p50_ms, b.all.p50_ms),
                during_ceiling: during_ceiling.unwrap_or_default(),
                during_bare: during_bare.unwrap_or_default(),
                write_share: opts.write_share,
                first_minute_p99_impact_pct: percent(first_minute.all.p99_ms, b.all.p99_ms),
                first_minute,
                windows,
            });
        }
    }
    if let Some((_, server, _)) = slo {
        server.abort();
    }
    crate::procs::delete_queues(settings, &prefix).await;
    report.conditions.database_mib_after = database_mib(&pool).await?;
    if !opts.only_full {
        report.full_vs_ceiling = report.full.rows_per_sec / report.ceiling.rows_per_sec.max(1e-9);
        report.full_vs_bare = report.full.rows_per_sec / report.bare.rows_per_sec.max(1e-9);
    }

    if opts.verify {
        progress("verifying every value against its recorded plaintext");
        let ring = store::load_ring(&**pool.get().await?, &master).await?;
        let target: Uuid = pool
            .get()
            .await?
            .query_one(
                "SELECT target_key_id FROM rekey.runs WHERE id = $1",
                &[&run_id],
            )
            .await?
            .get(0);
        report.verify = Some(verify::verify(&pool, &ring, Some(target), 10_000).await?);
    }
    Ok(report)
}

/// A checkpoint now, so that the baseline is measured on a quiet database. Needs the
/// `pg_checkpoint` role (or a superuser); without it the bench goes on, noting why.
async fn quiesce(pool: &Pool) {
    let done = async {
        pool.get()
            .await?
            .batch_execute("CHECKPOINT")
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    if let Err(e) = done {
        eprintln!(
            "bench: no checkpoint before the baseline ({e:#}); it may include the writes of seeding"
        );
    }
}

fn phase(name: &str, rows: i64, values: i64, d: Duration, started_at: f64) -> PhaseResult {
    let seconds = d.as_secs_f64();
    PhaseResult {
        name: name.into(),
        rows,
        values,
        seconds,
        rows_per_sec: rows as f64 / seconds.max(1e-9),
        started_at,
    }
}

fn push_timeline(report: &mut BenchReport, name: &str, samples: Vec<(f64, f64)>) {
    report
        .throughput
        .extend(samples.into_iter().map(|(t, r)| (t, name.to_owned(), r)));
}

/// Stops traffic started with a phase and records its latency timeline.
async fn finish_traffic(
    report: &mut BenchReport,
    traffic: Option<(
        tokio::sync::watch::Sender<bool>,
        f64,
        tokio::task::JoinHandle<anyhow::Result<TrafficReport>>,
    )>,
) -> anyhow::Result<Option<Percentiles>> {
    let Some((stop, offset, handle)) = traffic else {
        return Ok(None);
    };
    let _ = stop.send(true);
    let r = handle.await??;
    push_latency(report, offset, &r);
    Ok(Some(r.all))
}

fn push_latency(report: &mut BenchReport, offset: f64, r: &TrafficReport) {
    report.app_latency.extend(
        r.timeline
            .iter()
            .map(|(s, n, p99)| (offset + *s as f64, *n, *p99)),
    );
}

/// When run `run_id` was created, as an `Instant` of this process.
async fn run_created(pool: &Pool, run_id: Option<i64>) -> anyhow::Result<Instant> {
    let age: f64 = pool
        .get()
        .await?
        .query_one(
            "SELECT extract(epoch FROM now() - created_at)::float8 FROM rekey.runs WHERE id = $1",
            &[&run_id],
        )
        .await?
        .get(0);
    Ok(Instant::now() - Duration::from_secs_f64(age.max(0.0)))
}

/// What the driver said held publication back (`rekey.drivers.throttle`, as `rekey status`
/// shows it), read every second until `stop`: (when, what; None: nothing).
async fn watch_throttle(
    pool: Pool,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<(Instant, Option<String>)> {
    let mut said = Vec::new();
    while !*stop.borrow() {
        if let Ok(c) = pool.get().await
            && let Ok(rows) = c
                .query(
                    "SELECT throttle FROM rekey.drivers ORDER BY run_id DESC LIMIT 1",
                    &[],
                )
                .await
        {
            let now: Option<String> = rows.first().and_then(|r| r.get(0));
            said.push((Instant::now(), now));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    said
}

/// The throttle's say most often read between `from` and `to`, shortened to its kind
/// (the text before its first ':' or ';').
fn most_said(said: &[(Instant, Option<String>)], from: Instant, to: Instant) -> Option<String> {
    let mut counts: std::collections::BTreeMap<Option<String>, usize> = Default::default();
    for (t, s) in said {
        if *t >= from && *t < to {
            let kind = s.as_ref().map(|s| {
                let short: String = s
                    .split(" batch(es) in flight")
                    .next()
                    .unwrap_or(s)
                    .chars()
                    .take(110)
                    .collect();
                short.trim_end_matches([';', ' ']).to_owned()
            });
            *counts.entry(kind).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .and_then(|(k, _)| k)
}

/// The run `rekey rotate` just made: the newest.
async fn last_run(pool: &Pool) -> anyhow::Result<Option<i64>> {
    Ok(pool
        .get()
        .await?
        .query_one("SELECT max(id) FROM rekey.runs", &[])
        .await?
        .get(0))
}

/// Rows and values the run rotated and the seconds from the run's creation (after key
/// propagation; planning included) to its last batch done (the final gate and report not
/// included: `full_process_seconds` has the whole process).
async fn run_figures(pool: &Pool, run_id: Option<i64>) -> anyhow::Result<(i64, i64, f64)> {
    let r = pool
        .get()
        .await?
        .query_one(
            "SELECT COALESCE(sum(n_rows), 0)::int8, COALESCE(sum(n_rotated), 0)::int8,
                    COALESCE(extract(epoch FROM max(b.done_at) - r.created_at), 0)::float8
               FROM rekey.runs r LEFT JOIN rekey.batches b ON b.run_id = r.id AND b.state = 'done'
              WHERE r.id = $1 GROUP BY r.created_at",
            &[&run_id],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

/// Rows/s per second of the run, from the ledger's `done_at` stamps.
async fn ledger_rates(
    pool: &Pool,
    run_id: Option<i64>,
    started_at: f64,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let rows = pool
        .get()
        .await?
        .query(
            "SELECT floor(extract(epoch FROM b.done_at - r.created_at))::int8 AS s, sum(b.n_rows)::int8
               FROM rekey.batches b JOIN rekey.runs r ON r.id = b.run_id
              WHERE b.run_id = $1 AND b.state = 'done' GROUP BY 1 ORDER BY 1",
            &[&run_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                started_at + r.get::<_, i64>(0) as f64,
                r.get::<_, i64>(1) as f64,
            )
        })
        .collect())
}

/// Prints the figures.
pub fn print(r: &BenchReport) {
    println!(
        "{} records, {} values ({:.0} MiB), {} workers × {} batches, stages {:?}, rows per batch {}",
        r.rows,
        r.values,
        r.data_mib,
        r.workers,
        r.worker_concurrency,
        r.stages,
        r.rows_per_batch
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !r.conditions.postgres.is_empty() {
        println!("  {}", r.conditions.line());
    }
    if r.throttle_pct > 0.0 {
        println!(
            "  (c) throttle: the probe's p99 held within {}% of the application's p99 (at least {} ms), {}",
            r.throttle_pct,
            r.throttle_min_ms,
            if r.slow_start {
                "slow start"
            } else {
                "no slow start"
            }
        );
    } else {
        println!("  (c) throttle off");
    }
    if let Some(q) = &r.slo_query {
        println!(
            "  (c) rekey rotate --slo-query '{q}' (the traffic's own histogram, through Prometheus)"
        );
    }
    if let Some(ms) = r.app_p99_ms_told {
        println!("  (c) rekey rotate --app-p99-ms {ms:.2} (the traffic's p99 before (c))");
    }
    for p in [&r.ceiling, &r.bare, &r.full] {
        if p.name.is_empty() {
            let which = if std::ptr::eq(p, &r.ceiling) {
                "a"
            } else {
                "b"
            };
            println!("  ({which}) skipped");
            continue;
        }
        println!(
            "  ({}) {:<8} {:>10} rows in {:>7.1} s  {:>9.0} rows/s",
            match p.name.as_str() {
                "ceiling" => "a",
                "bare" => "b",
                _ => "c",
            },
            p.name,
            p.rows,
            p.seconds,
            p.rows_per_sec
        );
    }
    if r.ceiling.name.is_empty() {
        println!("  rekey rotate process {:.1} s", r.full_process_seconds);
    } else {
        println!(
            "  (c)/(a) {:.0}%   (c)/(b) {:.0}%   rekey rotate process {:.1} s",
            r.full_vs_ceiling * 100.0,
            r.full_vs_bare * 100.0,
            r.full_process_seconds
        );
    }
    if let Some(l) = &r.latency {
        println!(
            "  app latency at {} ops/s: p50 {:.2} → {:.2} ms ({:+.0}%), p99 {:.2} → {:.2} ms ({:+.0}%), errors {} / {}",
            l.rate,
            l.before.p50_ms,
            l.during.p50_ms,
            l.p50_impact_pct,
            l.before.p99_ms,
            l.during.p99_ms,
            l.p99_impact_pct,
            l.before_errors,
            l.during_errors
        );
        println!(
            "    reads p99 {:.2} → {:.2} ms, writes p99 {:.2} → {:.2} ms",
            l.reads_before.p99_ms,
            l.reads_during.p99_ms,
            l.writes_before.p99_ms,
            l.writes_during.p99_ms
        );
        if !r.ceiling.name.is_empty() {
            println!(
                "    the same traffic during (a): p99 {:.2} ms ({:+.0}%), during (b): p99 {:.2} ms ({:+.0}%)",
                l.during_ceiling.p99_ms,
                percent(l.during_ceiling.p99_ms, l.before.p99_ms),
                l.during_bare.p99_ms,
                percent(l.during_bare.p99_ms, l.before.p99_ms),
            );
        }
    }
    if let Some(l) = r.latency.as_ref().filter(|l| !l.windows.is_empty()) {
        println!(
            "  (c) at {:.0}% writes — first 60 s: p99 {:.2} ms ({:+.0}%; reads {:.2}, writes {:.2}); per 10 s of the rotation:",
            l.write_share * 100.0,
            l.first_minute.all.p99_ms,
            l.first_minute_p99_impact_pct,
            l.first_minute.reads.p99_ms,
            l.first_minute.writes.p99_ms
        );
        println!(
            "    {:>9} {:>8}  {:>20}  {:>7} {:>7}  throttle",
            "window", "rows/s", "all p50/p95/p99 ms", "reads", "writes"
        );
        for w in &l.windows {
            println!(
                "    {:>4}-{:<4} {:>8.0}  {:>20}  {:>7.2} {:>7.2}  {}",
                w.start_s,
                w.start_s + traffic::WINDOW_SECS,
                w.rows_per_sec,
                format!(
                    "{:.2}/{:.2}/{:.2}",
                    w.traffic.all.p50_ms, w.traffic.all.p95_ms, w.traffic.all.p99_ms
                ),
                w.traffic.reads.p99_ms,
                w.traffic.writes.p99_ms,
                w.throttle.as_deref().unwrap_or("-")
            );
        }
    }
    for (i, f) in r.throttle_figures.iter().enumerate() {
        let ms = |k: &str| f.get(k).and_then(serde_json::Value::as_f64);
        let n = |k: &str| f.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        println!(
            "  (c) stage {i} probe: p99 {} → {} ms, threshold {} ms, {} of {} probes over ({:.2}%), longest gap {} ms",
            ms("baseline_p99_ms").map_or("-".into(), |v| format!("{v:.2}")),
            ms("p99_ms").map_or("-".into(), |v| format!("{v:.2}")),
            ms("throttle_threshold_ms").map_or("-".into(), |v| format!("{v:.2}")),
            n("probes_over"),
            n("probes"),
            n("probes_over") as f64 / n("probes").max(1) as f64 * 100.0,
            n("max_gap_ms")
        );
    }
    println!(
        "  peak RSS: coordinator {:.1} MiB; workers {}",
        r.coordinator.peak_rss_mib,
        r.workers_memory
            .iter()
            .map(|m| format!("{:.1} MiB", m.peak_rss_mib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let workers_cpu: f64 = r.workers_memory.iter().map(|m| m.cpu_seconds).sum();
    println!(
        "  CPU during (c): {:.1} s busy of {:.1} s × {} cores; workers {:.1} s, coordinator {:.1} s, the rest (Postgres, RabbitMQ, traffic) {:.1} s",
        r.full_machine_cpu_seconds,
        r.full_process_seconds,
        r.cores,
        workers_cpu,
        r.coordinator.cpu_seconds,
        r.full_machine_cpu_seconds - workers_cpu - r.coordinator.cpu_seconds
    );
    if let Some(v) = &r.verify {
        println!(
            "  verify: ok {}  mismatched {}  undecryptable {}  missing {}  not-on-new-key {}",
            v.ok, v.mismatched, v.undecryptable, v.missing, v.not_on_expected_key
        );
    }
}

/// Writes the chart: throughput per phase on top, application p99 latency below.
pub fn chart(r: &BenchReport, path: &Path, font: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let bytes = std::fs::read(font)
        .with_context(|| format!("read the chart font {} (--font)", font.display()))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable font", font.display()))?;
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(450);
    let t_max = r
        .throughput
        .iter()
        .map(|p| p.0)
        .chain(r.app_latency.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let y_max = r.throughput.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1;
    let mut c = ChartBuilder::on(&top)
        .caption(
            format!(
                "rekey bench: {} records, {} workers — rows/s per phase",
                r.rows, r.workers
            ),
            ("sans-serif", 22),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
    c.configure_mesh()
        .x_desc("seconds since the bench started")
        .y_desc("rows/s")
        .draw()?;
    for (name, color) in [("ceiling", &BLUE), ("bare", &GREEN), ("full", &RED)] {
        let pts: Vec<(f64, f64)> = r
            .throughput
            .iter()
            .filter(|p| p.1 == name)
            .map(|p| (p.0, p.2))
            .collect();
        let label = match name {
            "ceiling" => "(a) in-database ceiling",
            "bare" => "(b) bare client rotation",
            _ => "(c) rekey rotation",
        };
        // Width 1: plotters draws wider lines wrongly on steep segments.
        c.draw_series(LineSeries::new(pts, color.stroke_width(1)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    // What held the rotation back, per 10 s window: a band along the top.
    let kinds: [(&str, RGBColor); 4] = [
        ("full speed", RGBColor(60, 170, 60)),
        ("slow start", RGBColor(150, 150, 150)),
        ("latency", RGBColor(240, 150, 30)),
        ("held", RGBColor(200, 30, 30)),
    ];
    if let Some(l) = &r.latency {
        for w in &l.windows {
            let kind = match w.throttle.as_deref() {
                None => 0,
                Some(t) if t.starts_with("latency: slow start") => 1,
                Some(t) if t.starts_with("latency") => 2,
                Some(_) => 3,
            };
            let x = r.run_created_at + w.start_s as f64;
            c.draw_series(std::iter::once(Rectangle::new(
                [(x, y_max * 0.96), (x + traffic::WINDOW_SECS as f64, y_max)],
                kinds[kind].1.filled(),
            )))?;
        }
        for (name, color) in kinds {
            c.draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
                .label(format!("throttle: {name}"))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 4), (x + 20, y + 4)], color.filled())
                });
        }
    }
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    let l_max = r.app_latency.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1;
    let mut c = ChartBuilder::on(&bottom)
        .caption(
            "application p99 latency per second (ms)",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..l_max)?;
    c.configure_mesh()
        .x_desc("seconds since the bench started")
        .y_desc("p99 ms")
        .draw()?;
    c.draw_series(LineSeries::new(
        r.app_latency.iter().map(|p| (p.0, p.2)),
        BLACK.stroke_width(1),
    ))?;
    if r.full.started_at > 0.0 {
        let (s, e) = (
            r.full.started_at,
            r.full.started_at + r.full_process_seconds,
        );
        c.draw_series(std::iter::once(Rectangle::new(
            [(s, 0.0), (e, l_max)],
            RED.mix(0.1).filled(),
        )))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DAMON sysfs tree as a VM's proactive reclaim sets it up: one kdamond on, a
    /// `pageout` scheme for regions not accessed for 12 aggregation intervals of 5 s, at
    /// most 128 MiB a second; a second kdamond off; a scheme of another action.
    #[test]
    fn the_kernels_proactive_reclaim_is_read_from_damons_sysfs() {
        let root = std::env::temp_dir().join(format!("rekey-damon-{}", Uuid::new_v4()));
        let put = |rel: &str, v: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("{v}\n")).unwrap();
        };
        assert_eq!(damon_reclaim(&root), None, "no interface");
        put("0/state", "on");
        put("0/contexts/0/monitoring_attrs/intervals/aggr_us", "5000000");
        put("0/contexts/0/schemes/0/action", "pageout");
        put("0/contexts/0/schemes/0/access_pattern/age/min", "12");
        put("0/contexts/0/schemes/0/quotas/bytes", "134217728");
        put("0/contexts/0/schemes/0/quotas/reset_interval_ms", "1000");
        put("0/contexts/0/schemes/1/action", "stat");
        put("1/state", "off");
        put("1/contexts/0/schemes/0/action", "pageout");
        assert_eq!(
            damon_reclaim(&root).as_deref(),
            Some("DAMON pages out what was not accessed for 60 s, up to 128 MiB/s")
        );
        put("0/state", "off");
        assert_eq!(damon_reclaim(&root), None, "not running");
        let _ = std::fs::remove_dir_all(&root);
    }
}
