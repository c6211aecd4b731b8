//! Application traffic on the demo schema, as an application that owns the data would do
//! it: reads that decrypt every encrypted column of a row, and writes that encrypt with the
//! active key and record the new plaintext's digest in the same transaction. The
//! application refreshes its key ring periodically, so it may write under the previous key
//! for a while after a rotation starts; the coverage sweep catches those.
//!
//! [`run`] is open-loop: operations start at a fixed rate whatever the latency, so that a
//! slow database shows as latency, not as fewer requests (no coordinated omission).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::master::MasterKey;
use rekey_common::keys::ring::KeyRing;
use rekey_common::keys::store;
use sha2::{Digest, Sha256};

/// What the writer did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WriteReport {
    pub updates: u64,
    pub errors: u64,
    /// Updates that waited on a row lock held by a rotation batch for over 100 ms.
    pub slow: u64,
    /// Writes Postgres chose as a deadlock's victim (each retried, as an application
    /// retries SQLSTATE 40P01; a write that deadlocks five times in a row is an error).
    pub deadlocks: u64,
    /// The first failed write's error (SQL state and message; no value), for the test or
    /// bench that reports it.
    pub first_error: Option<String>,
}

/// Updates random `demo.users.email` values (ids 1..=max_id) until `deadline`, each in its
/// own transaction with its digest, reloading the key ring every `refresh`.
pub async fn update_emails(
    pool: &Pool,
    master: Arc<MasterKey>,
    max_id: i64,
    deadline: Duration,
    refresh: Duration,
    seed: u64,
) -> anyhow::Result<WriteReport> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = WriteReport::default();
    let started = Instant::now();
    let mut ring: Arc<KeyRing> = Arc::new(store::load_ring(&**pool.get().await?, &master).await?);
    let mut loaded = Instant::now();
    while started.elapsed() < deadline {
        if loaded.elapsed() > refresh {
            ring = Arc::new(store::load_ring(&**pool.get().await?, &master).await?);
            loaded = Instant::now();
        }
        let id = rng.random_range(1..=max_id);
        let email = format!(
            "updated{}.{}@example.org",
            id,
            rng.random_range(0..1_000_000u32)
        );
        let t0 = Instant::now();
        for attempt in 1..=5 {
            match write_one(pool, &ring, id, email.as_bytes()).await {
                Ok(true) => report.updates += 1,
                Ok(false) => {}
                Err(e) if is_deadlock(&e) && attempt < 5 => {
                    report.deadlocks += 1;
                    continue;
                }
                Err(e) => {
                    report.errors += 1;
                    tracing::debug!(error = %format!("{e:#}"), "application write failed");
                    report.first_error.get_or_insert_with(|| error_text(&e));
                }
            }
            break;
        }
        if t0.elapsed() > Duration::from_millis(100) {
            report.slow += 1;
        }
    }
    let c = pool.get().await?;
    store::add_encryptions(&**c, &ring.take_encryption_counts()).await?;
    Ok(report)
}

/// Writes one `demo.users.email` under `ring`'s encryption key, with its digest, in a
/// transaction of its own, as the application does; false when the row does not exist.
pub async fn write_one(
    pool: &Pool,
    ring: &KeyRing,
    id: i64,
    plaintext: &[u8],
) -> anyhow::Result<bool> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    if !write_in(&tx, ring, id, plaintext).await? {
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// Writes one e-mail and its digest in `tx`; false when the row does not exist.
async fn write_in(
    tx: &deadpool_postgres::Transaction<'_>,
    ring: &KeyRing,
    id: i64,
    plaintext: &[u8],
) -> anyhow::Result<bool> {
    let loc = FieldLocation {
        table: "demo.users",
        column: "email",
        row_id: id,
    };
    let env = envelope::seal(ring, &loc, plaintext)?;
    let n = tx
        .execute(
            "UPDATE demo.users SET email = $2 WHERE id = $1",
            &[&id, &env],
        )
        .await?;
    if n == 0 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO demo.plaintext_digests (table_name, column_name, row_id, digest) VALUES ('demo.users', 'email', $1, $2)
         ON CONFLICT (table_name, column_name, row_id) DO UPDATE SET digest = EXCLUDED.digest, corrupt = false",
        &[&id, &Sha256::digest(plaintext).to_vec()],
    )
    .await?;
    Ok(true)
}

/// Whether Postgres broke a deadlock by aborting this transaction (worth retrying).
fn is_deadlock(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
}

/// An application write's error for a report: the SQL state and the server's message
/// when Postgres refused it (never its detail, which may quote a value), else the chain.
fn error_text(e: &anyhow::Error) -> String {
    match e
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::as_db_error)
    {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => format!("{e:#}"),
    }
}

/// What the pair writer did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PairReport {
    /// Pairs written and committed.
    pub committed: u64,
    /// Transactions Postgres chose as a deadlock's victim (each retried).
    pub deadlocks: u64,
    pub errors: u64,
    /// The first failed pair's error (SQL state and message; no value).
    pub first_error: Option<String>,
}

/// Hostile application writes: updates `demo.users.email` of row `id` and then of row
/// `id - gap` in one transaction, holding the first row's lock for `hold` before taking the
/// second. That is the opposite of a batch's id order, so the two deadlock when they meet,
/// and a `hold` longer than the worker's `lock_timeout` outlasts its wait. A deadlock victim
/// is retried with the same values; any other error is counted.
pub async fn update_pairs_descending(
    pool: &Pool,
    master: Arc<MasterKey>,
    max_id: i64,
    gap: i64,
    hold: Duration,
    deadline: Duration,
    seed: u64,
) -> anyhow::Result<PairReport> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = PairReport::default();
    let started = Instant::now();
    let mut ring: Arc<KeyRing> = Arc::new(store::load_ring(&**pool.get().await?, &master).await?);
    let mut loaded = Instant::now();
    while started.elapsed() < deadline {
        if loaded.elapsed() > Duration::from_millis(500) {
            ring = Arc::new(store::load_ring(&**pool.get().await?, &master).await?);
            loaded = Instant::now();
        }
        let hi = rng.random_range(gap + 1..=max_id);
        let tag = rng.random_range(0..1_000_000u32);
        let (a, b) = (
            format!("pair{hi}.{tag}@example.org"),
            format!("pair{}.{tag}@example.org", hi - gap),
        );
        for _ in 0..5 {
            let attempt = async {
                let mut client = pool.get().await?;
                let tx = client.transaction().await?;
                write_in(&tx, &ring, hi, a.as_bytes()).await?;
                tokio::time::sleep(hold).await;
                write_in(&tx, &ring, hi - gap, b.as_bytes()).await?;
                tx.commit().await?;
                anyhow::Ok(())
            }
            .await;
            match attempt {
                Ok(()) => {
                    report.committed += 1;
                    break;
                }
                Err(e) if is_deadlock(&e) => {
                    report.deadlocks += 1;
                }
                Err(e) => {
                    report.errors += 1;
                    tracing::warn!(error = %format!("{e:#}"), "pair write failed");
                    report.first_error.get_or_insert_with(|| error_text(&e));
                    break;
                }
            }
        }
    }
    store::add_encryptions(&**pool.get().await?, &ring.take_encryption_counts()).await?;
    Ok(report)
}

/// How to load the application's side.
#[derive(Debug, Clone)]
pub struct TrafficOptions {
    /// Operations started per second.
    pub rate: u32,
    pub duration: Duration,
    /// Share of writes (one-row updates of `demo.users.email`, each in its own commit); the
    /// rest are point reads.
    pub write_share: f64,
    /// Operations in flight at most (further ones wait, and their wait counts as latency).
    pub max_in_flight: usize,
    /// How often the application reloads its key ring.
    pub refresh: Duration,
    pub seed: u64,
    /// Ends the traffic early when it turns true (the bench stops it when a rotation ends).
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
    /// Where each operation's latency is also counted, for a Prometheus scrape.
    pub histogram: Option<Arc<AppHistogram>>,
}

/// An application's usual mix: 70% point reads, 30% single-row updates.
pub const DEFAULT_WRITE_SHARE: f64 = 0.3;

/// Seconds per window of the per-window figures.
pub const WINDOW_SECS: u64 = 10;

/// The application's request latency as its own Prometheus would scrape it: a histogram
/// `app_request_duration_seconds{op="read"|"write"}` (what `--slo-query` reads in the
/// tests and in docs/throttle.md's example).
#[derive(Debug)]
pub struct AppHistogram {
    /// Cumulative per bound, per op (read, write); the last is +Inf.
    counts: [Vec<AtomicU64>; 2],
    sum_us: [AtomicU64; 2],
}

impl AppHistogram {
    /// Bucket bounds in seconds: fine from 0.5 ms to 50 ms, where a p99 moves.
    pub const BOUNDS: &[f64] = &[
        0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125,
        0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ];

    pub fn new() -> Self {
        let row = || {
            (0..=Self::BOUNDS.len())
                .map(|_| AtomicU64::new(0))
                .collect()
        };
        Self {
            counts: [row(), row()],
            sum_us: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    pub fn record(&self, write: bool, us: u64) {
        let op = usize::from(write);
        let secs = us as f64 / 1e6;
        for (i, bound) in Self::BOUNDS.iter().enumerate() {
            if secs <= *bound {
                self.counts[op][i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.counts[op][Self::BOUNDS.len()].fetch_add(1, Ordering::Relaxed);
        self.sum_us[op].fetch_add(us, Ordering::Relaxed);
    }

    /// Prometheus's text format.
    pub fn render(&self) -> String {
        let name = "app_request_duration_seconds";
        let mut out = format!(
            "# HELP {name} Request latency of the application (rekey-loadtest traffic), from when the request was due\n# TYPE {name} histogram\n"
        );
        for (op, label) in ["read", "write"].iter().enumerate() {
            for (i, bound) in Self::BOUNDS.iter().enumerate() {
                out.push_str(&format!(
                    "{name}_bucket{{op=\"{label}\",le=\"{bound}\"}} {}\n",
                    self.counts[op][i].load(Ordering::Relaxed)
                ));
            }
            let n = self.counts[op][Self::BOUNDS.len()].load(Ordering::Relaxed);
            out.push_str(&format!(
                "{name}_bucket{{op=\"{label}\",le=\"+Inf\"}} {n}\n{name}_sum{{op=\"{label}\"}} {}\n{name}_count{{op=\"{label}\"}} {n}\n",
                self.sum_us[op].load(Ordering::Relaxed) as f64 / 1e6
            ));
        }
        out
    }
}

impl Default for AppHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Default for TrafficOptions {
    fn default() -> Self {
        Self {
            rate: 200,
            duration: Duration::from_secs(30),
            write_share: DEFAULT_WRITE_SHARE,
            max_in_flight: 32,
            refresh: Duration::from_secs(2),
            seed: 1,
            stop: None,
            histogram: None,
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(samples_us: &mut [u64]) -> Self {
        if samples_us.is_empty() {
            return Self::default();
        }
        samples_us.sort_unstable();
        let at = |q: f64| {
            samples_us[((samples_us.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
        };
        Self {
            count: samples_us.len() as u64,
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// What the traffic saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TrafficReport {
    pub seconds: f64,
    pub started_ops: u64,
    pub reads: Percentiles,
    pub writes: Percentiles,
    pub all: Percentiles,
    /// Values read that failed to decrypt (planted corrupt values count here too).
    pub decrypt_errors: u64,
    /// Operations that failed outright (database errors, timeouts).
    pub errors: u64,
    /// Operations per second achieved.
    pub achieved_rate: f64,
    /// Per second of the run: (second, operations completed, p99 latency in ms).
    pub timeline: Vec<(u64, u64, f64)>,
    /// Per [`WINDOW_SECS`] of the run: reads, writes and all.
    pub windows: Vec<Window>,
    /// When the clock started, and every operation: (seconds since then when it completed,
    /// whether it wrote, latency in µs), for figures over any stretch (the bench's first
    /// minute of a rotation).
    #[serde(skip)]
    pub started: Option<Instant>,
    #[serde(skip)]
    pub latencies: Vec<(f64, bool, u64)>,
}

impl TrafficReport {
    /// Reads, writes and all operations that completed between `from` and `to`.
    pub fn between(&self, from: Instant, to: Instant) -> Window {
        let Some(started) = self.started else {
            return Window::default();
        };
        let (lo, hi) = (
            from.saturating_duration_since(started).as_secs_f64(),
            to.saturating_duration_since(started).as_secs_f64(),
        );
        let (mut reads, mut writes) = (Vec::new(), Vec::new());
        for (t, write, us) in &self.latencies {
            if (lo..hi).contains(t) {
                if *write {
                    writes.push(*us)
                } else {
                    reads.push(*us)
                }
            }
        }
        let mut all: Vec<u64> = reads.iter().chain(writes.iter()).copied().collect();
        Window {
            start_s: lo as u64,
            reads: Percentiles::of(&mut reads),
            writes: Percentiles::of(&mut writes),
            all: Percentiles::of(&mut all),
        }
    }
}

/// The figures of one window of the traffic (by when operations completed).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// Seconds since the traffic started when the window began.
    pub start_s: u64,
    pub reads: Percentiles,
    pub writes: Percentiles,
    pub all: Percentiles,
}

/// Prints the per-window figures: p50/p95/p99 of reads, writes and all, milliseconds.
pub fn print_windows(windows: &[Window]) {
    if windows.is_empty() {
        return;
    }
    println!(
        "{:>9}  {:>24}  {:>24}  {:>24}",
        "window", "reads p50/p95/p99 ms", "writes p50/p95/p99 ms", "all p50/p95/p99 ms"
    );
    let cell = |p: &Percentiles| {
        if p.count == 0 {
            "-".to_owned()
        } else {
            format!("{:.2}/{:.2}/{:.2}", p.p50_ms, p.p95_ms, p.p99_ms)
        }
    };
    for w in windows {
        println!(
            "{:>4}-{:<4}  {:>24}  {:>24}  {:>24}",
            w.start_s,
            w.start_s + WINDOW_SECS,
            cell(&w.reads),
            cell(&w.writes),
            cell(&w.all)
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read(usize),
    Write,
}

/// Runs open-loop traffic for `opts.duration`.
pub async fn run(
    pool: &Pool,
    master: Arc<MasterKey>,
    opts: &TrafficOptions,
) -> anyhow::Result<TrafficReport> {
    let client = pool.get().await?;
    let mut bounds = Vec::new();
    for (table, cols) in [
        ("demo.users", &["email", "phone"][..]),
        ("demo.agents", &["api_key", "system_prompt"][..]),
        ("demo.conversations", &["body", "summary"][..]),
    ] {
        let r = client
            .query_one(&format!("SELECT min(id), max(id) FROM {table}"), &[])
            .await?;
        if let (Some(lo), Some(hi)) = (r.get::<_, Option<i64>>(0), r.get::<_, Option<i64>>(1)) {
            bounds.push((table, cols, lo, hi));
        }
    }
    anyhow::ensure!(
        !bounds.is_empty(),
        "the demo tables are empty: run `rekey-loadtest seed` first"
    );
    let max_user = client
        .query_one("SELECT COALESCE(max(id), 0) FROM demo.users", &[])
        .await?
        .get::<_, i64>(0);
    drop(client);
    let bounds = Arc::new(bounds);
    let ring = Arc::new(std::sync::RwLock::new(Arc::new(
        store::load_ring(&**pool.get().await?, &master).await?,
    )));
    // The application's connections are open before the clock starts (a running
    // application's are), so that connecting does not count as latency.
    // Connections others hold are not waited for (the pool may be shared).
    {
        let mut warm = Vec::new();
        for _ in 0..pool.status().max_size.min(opts.max_in_flight.max(1)) {
            match tokio::time::timeout(Duration::from_millis(200), pool.get()).await {
                Ok(c) => {
                    let c = c?;
                    c.simple_query("SELECT 1").await?;
                    warm.push(c);
                }
                Err(_) => break,
            }
        }
    }
    // The key ring is reloaded beside the operations, as an application does, not in
    // their way: a reload the operations waited for would be the traffic's own p99.
    let _stop_reloading = AbortOnDrop({
        let (pool, master, ring, every) =
            (pool.clone(), master.clone(), ring.clone(), opts.refresh);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Ok(c) = pool.get().await
                    && let Ok(r) = store::load_ring(&**c, &master).await
                {
                    let old =
                        std::mem::replace(&mut *ring.write().expect("ring lock"), Arc::new(r));
                    // Encryptions counted by the ring being replaced still count.
                    let _ = store::add_encryptions(&**c, &old.take_encryption_counts()).await;
                }
            }
        })
    });
    let decrypt_errors = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(tokio::sync::Semaphore::new(opts.max_in_flight.max(1)));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Op, Instant, Instant, bool)>();
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let period = Duration::from_secs_f64(1.0 / f64::from(opts.rate.max(1)));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut started_ops = 0u64;
    let stopped = || opts.stop.as_ref().is_some_and(|s| *s.borrow());
    while started.elapsed() < opts.duration && !stopped() {
        let due = ticker.tick().await;
        let op = if !rng.random_bool(opts.write_share.clamp(0.0, 1.0)) || max_user == 0 {
            Op::Read(rng.random_range(0..bounds.len()))
        } else {
            Op::Write
        };
        let pick = rng.random::<u64>();
        let email = format!("traffic{}@example.org", rng.random_range(0..1_000_000u32));
        let histogram = opts.histogram.clone();
        let (pool, ring, bounds, tx, permits, decrypt_errors) = (
            pool.clone(),
            ring.clone(),
            bounds.clone(),
            tx.clone(),
            permits.clone(),
            decrypt_errors.clone(),
        );
        let scheduled = due.into_std();
        started_ops += 1;
        tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore open");
            let ring = ring.read().expect("ring lock").clone();
            let ok = match op {
                Op::Read(t) => {
                    let (table, cols, lo, hi) = bounds[t];
                    let id = lo + (pick % ((hi - lo + 1) as u64)) as i64;
                    read_one(&pool, &ring, table, cols, id, &decrypt_errors)
                        .await
                        .is_ok()
                }
                Op::Write => {
                    let id = 1 + (pick % max_user as u64) as i64;
                    write_one(&pool, &ring, id, email.as_bytes()).await.is_ok()
                }
            };
            let done = Instant::now();
            if let Some(h) = histogram {
                // As the application's own metrics would: live, from when it was due.
                let us = done.saturating_duration_since(scheduled).as_micros() as u64;
                h.record(matches!(op, Op::Write), us);
            }
            let _ = tx.send((op, scheduled, done, ok));
        });
    }
    drop(tx);
    let mut reads = Vec::new();
    let mut writes = Vec::new();
    let mut errors = 0;
    let mut per_second: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    let mut per_window: std::collections::BTreeMap<u64, [Vec<u64>; 2]> = Default::default();
    let mut latencies = Vec::new();
    while let Some((op, scheduled, done, ok)) = rx.recv().await {
        // Latency from when the operation was due, so queueing behind a slow database counts.
        let us = done.saturating_duration_since(scheduled).as_micros() as u64;
        if !ok {
            errors += 1;
        }
        let second = done.saturating_duration_since(started).as_secs();
        per_second.entry(second).or_default().push(us);
        let write = matches!(op, Op::Write);
        latencies.push((
            done.saturating_duration_since(started).as_secs_f64(),
            write,
            us,
        ));
        per_window.entry(second / WINDOW_SECS).or_default()[usize::from(write)].push(us);

        match op {
            Op::Read(_) => reads.push(us),
            Op::Write => writes.push(us),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut all: Vec<u64> = reads.iter().chain(writes.iter()).copied().collect();
    let timeline = per_second
        .into_iter()
        .map(|(s, mut v)| {
            let p = Percentiles::of(&mut v);
            (s, p.count, p.p99_ms)
        })
        .collect();
    let windows = per_window
        .into_iter()
        .map(|(w, [mut reads, mut writes])| {
            let mut all: Vec<u64> = reads.iter().chain(writes.iter()).copied().collect();
            Window {
                start_s: w * WINDOW_SECS,
                reads: Percentiles::of(&mut reads),
                writes: Percentiles::of(&mut writes),
                all: Percentiles::of(&mut all),
            }
        })
        .collect();
    let c = pool.get().await?;
    let ring = ring.read().expect("ring lock").clone();
    store::add_encryptions(&**c, &ring.take_encryption_counts()).await?;
    Ok(TrafficReport {
        seconds,
        started_ops,
        reads: Percentiles::of(&mut reads),
        writes: Percentiles::of(&mut writes),
        achieved_rate: all.len() as f64 / seconds,
        all: Percentiles::of(&mut all),
        decrypt_errors: decrypt_errors.load(Ordering::Relaxed),
        errors,
        timeline,
        windows,
        started: Some(started),
        latencies,
    })
}

/// Aborts a background task when dropped (the traffic's key reloader).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads one row and decrypts its encrypted columns, as the application does.
async fn read_one(
    pool: &Pool,
    ring: &KeyRing,
    table: &str,
    cols: &[&str],
    id: i64,
    decrypt_errors: &AtomicU64,
) -> anyhow::Result<()> {
    let c = pool.get().await?;
    let row = c
        .query_opt(
            &format!(
                "SELECT id, {} FROM {table} WHERE id >= $1 ORDER BY id LIMIT 1",
                cols.join(", ")
            ),
            &[&id],
        )
        .await?;
    if let Some(row) = row {
        let row_id: i64 = row.get(0);
        for (i, col) in cols.iter().enumerate() {
            if let Some(v) = row.get::<_, Option<Vec<u8>>>(i + 1) {
                let loc = FieldLocation {
                    table,
                    column: col,
                    row_id,
                };
                if envelope::open(ring, &loc, &v).is_err() {
                    decrypt_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    Ok(())
}
