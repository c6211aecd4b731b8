//! The performance probe: the latency an application sees, measured before a run as a
//! baseline and during each stage. By default it is point reads by random id on every
//! target table (what an application does most); with `--probe-writes` they alternate with
//! a one-row write and commit in `rekey.latency_probe` (a commit waits for the WAL flush
//! behind a rotation's writes, which a read does not see); `probe_query` in `rekey.toml`
//! replaces both with a query of the operator's choosing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use rand::RngExt;
use rekey_common::target::{Target, quote_ident};
use serde::Serialize;

/// One measurement: several probe queries, their median, 95th and 99th percentile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub median_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub n: usize,
}

/// One probe: its latency (milliseconds) and whether it was the write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub ms: f64,
    pub write: bool,
}

/// Probes before a run, for its baseline: 400 of each kind, in [`BASELINE_WINDOWS`]
/// windows, 10 ms apart (about 10 s).
pub const BASELINE_PROBES: usize = 800;
pub const BASELINE_SPACING: Duration = Duration::from_millis(10);

/// The baseline's windows: its p99 is over all of them, its noise the spread of their
/// p99s, so that one quiet stretch does not become the bar.
pub const BASELINE_WINDOWS: usize = 4;

/// The baseline: reads (or the configured query) and writes, each on its own, since their
/// tails differ by several times and a read's stall would hide in the writes' tail; and
/// each kind's noise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Baseline {
    pub reads: Latency,
    pub writes: Option<Latency>,
    /// How far the p99s of the baseline's windows spread (milliseconds), per kind.
    pub read_noise_ms: f64,
    pub write_noise_ms: Option<f64>,
}

impl Baseline {
    pub fn of(samples: &[Sample]) -> Option<Self> {
        let kind = |write: bool| -> Vec<f64> {
            samples
                .iter()
                .filter(|s| s.write == write)
                .map(|s| s.ms)
                .collect()
        };
        let (mut reads, mut writes) = (kind(false), kind(true));
        let write_noise_ms = (!writes.is_empty()).then(|| noise(&writes));
        let writes = (!writes.is_empty()).then(|| Latency::of(&mut writes));
        let (reads, read_noise_ms) = if reads.is_empty() {
            (writes?, write_noise_ms.unwrap_or_default())
        } else {
            let n = noise(&reads);
            (Latency::of(&mut reads), n)
        };
        Some(Self {
            reads,
            writes,
            read_noise_ms,
            write_noise_ms,
        })
    }
}

/// The spread of the p99s of [`BASELINE_WINDOWS`] consecutive windows of `samples`
/// (in the order taken); 0 with too few samples to tell.
pub fn noise(samples: &[f64]) -> f64 {
    let per = samples.len() / BASELINE_WINDOWS;
    if per < 10 {
        return 0.0;
    }
    let p99s: Vec<f64> = samples
        .chunks(per)
        .filter(|c| c.len() == per)
        .map(|c| Latency::of(&mut c.to_vec()).p99_ms)
        .collect();
    let (lo, hi) = p99s
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    (hi - lo).max(0.0)
}

/// The probe's prepared queries on one connection.
struct Probe {
    client: deadpool_postgres::Object,
    /// Per target table: the point read and its id bounds.
    bounds: Vec<(tokio_postgres::Statement, i64, i64)>,
    custom: Option<tokio_postgres::Statement>,
    /// The write, and this connection's row for it (with `--probe-writes`).
    write: Option<(tokio_postgres::Statement, i32)>,
    next: usize,
}

impl Probe {
    async fn prepare(
        pool: &Pool,
        targets: &[Target],
        custom: Option<&str>,
        writes: bool,
    ) -> anyhow::Result<Self> {
        let client = pool.get().await.context("connect for the latency probe")?;
        let mut bounds = Vec::new();
        for t in targets {
            let r = client
                .query_one(
                    &format!(
                        "SELECT min({0}), max({0}) FROM {1}",
                        quote_ident(&t.id_column),
                        t.quoted_table()
                    ),
                    &[],
                )
                .await?;
            if let (Some(lo), Some(hi)) = (r.get::<_, Option<i64>>(0), r.get::<_, Option<i64>>(1)) {
                let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
                let sql = format!(
                    "SELECT {} FROM {} WHERE {} >= $1 ORDER BY {} LIMIT 1",
                    cols.join(", "),
                    t.quoted_table(),
                    quote_ident(&t.id_column),
                    quote_ident(&t.id_column)
                );
                bounds.push((client.prepare(&sql).await?, lo, hi));
            }
        }
        let custom = match custom {
            Some(q) => Some(
                client
                    .prepare(q)
                    .await
                    .context("prepare the configured probe_query")?,
            ),
            None => None,
        };
        let write = if writes && custom.is_none() {
            let stmt = client
                .prepare(
                    "INSERT INTO rekey.latency_probe (slot, probed_at) VALUES ($1, now())
                     ON CONFLICT (slot) DO UPDATE SET probed_at = EXCLUDED.probed_at",
                )
                .await
                .context("prepare the probe's write to rekey.latency_probe (a schema from before `rekey migrate`?)")?;
            Some((stmt, rand::rng().random_range(0..256)))
        } else {
            None
        };
        Ok(Self {
            client,
            bounds,
            custom,
            write,
            next: 0,
        })
    }

    /// One probe: the configured query, or in turn a write and a point read (the next
    /// table in turn).
    async fn once(&mut self) -> anyhow::Result<Sample> {
        let t0 = Instant::now();
        self.next += 1;
        let mut write = false;
        if let Some(stmt) = &self.custom {
            self.client
                .query(stmt, &[])
                .await
                .context("run the probe query")?;
        } else if let Some((stmt, slot)) = self
            .write
            .as_ref()
            .filter(|_| self.next % 2 == 1 || self.bounds.is_empty())
        {
            write = true;
            self.client
                .execute(stmt, &[slot])
                .await
                .context("run the probe's write")?;
        } else if !self.bounds.is_empty() {
            let (stmt, lo, hi) = &self.bounds[(self.next / 2) % self.bounds.len()];
            let id = rand::rng().random_range(*lo..=*hi);
            self.client
                .query(stmt, &[&id])
                .await
                .context("run the probe query")?;
        }
        Ok(Sample {
            ms: t0.elapsed().as_secs_f64() * 1000.0,
            write,
        })
    }
}

/// Runs `n` probes (spread over the target tables, reads and writes in turn), `spacing`
/// apart, and returns their latency by kind.
pub async fn measure(
    pool: &Pool,
    targets: &[Target],
    custom: Option<&str>,
    writes: bool,
    n: usize,
    spacing: Duration,
) -> anyhow::Result<Baseline> {
    let samples = samples(pool, targets, custom, writes, n, spacing).await?;
    Baseline::of(&samples).context("no probe samples")
}

/// Runs `n` probes (at least one), `spacing` apart.
pub async fn samples(
    pool: &Pool,
    targets: &[Target],
    custom: Option<&str>,
    writes: bool,
    n: usize,
    spacing: Duration,
) -> anyhow::Result<Vec<Sample>> {
    let mut probe = Probe::prepare(pool, targets, custom, writes).await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n.max(1) {
        if i > 0 && !spacing.is_zero() {
            tokio::time::sleep(spacing).await;
        }
        samples.push(probe.once().await?);
    }
    Ok(samples)
}

impl Latency {
    /// The median, 95th and 99th percentile of `samples` (milliseconds; not empty).
    pub fn of(samples: &mut [f64]) -> Self {
        samples.sort_by(f64::total_cmp);
        let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Latency {
            median_ms: pick(0.5),
            p95_ms: pick(0.95),
            p99_ms: pick(0.99),
            n: samples.len(),
        }
    }
}

/// Probes in the background while a stage rotates, one query every `every`, so that the
/// throttle sees the latency over the whole interval between its decisions, not one burst.
/// Stops when dropped.
#[derive(Debug)]
pub struct Prober {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    pub fn start(
        pool: Pool,
        targets: Vec<Target>,
        custom: Option<String>,
        writes: bool,
        every: Duration,
    ) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let mut probe = match Probe::prepare(&pool, &targets, custom.as_deref(), writes)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::debug!(error = %format!("{e:#}"), "latency probe: no connection");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                loop {
                    tick.tick().await;
                    match probe.once().await {
                        Ok(sample) => {
                            let mut s = out.lock().expect("probe samples");
                            // Bounded: the driver takes them every few seconds.
                            if s.len() < 10_000 {
                                s.push(sample);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %format!("{e:#}"), "latency probe failed");
                            break;
                        }
                    }
                }
            }
        });
        Self { samples, task }
    }

    /// The samples since the last call.
    pub fn take(&self) -> Vec<Sample> {
        std::mem::take(&mut *self.samples.lock().expect("probe samples"))
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Probe latencies of a whole stage in logarithmic buckets (9% wide, 0.01 ms to minutes),
/// for its percentiles in constant memory however long the stage runs.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    n: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; Self::BUCKETS],
            n: 0,
        }
    }
}

impl Histogram {
    const BUCKETS: usize = 220;
    const PER_OCTAVE: f64 = 8.0;
    const LOWEST_MS: f64 = 0.01;

    pub fn record(&mut self, ms: f64) {
        let i = ((ms.max(Self::LOWEST_MS) / Self::LOWEST_MS).log2() * Self::PER_OCTAVE).ceil();
        self.counts[(i.max(0.0) as usize).min(Self::BUCKETS - 1)] += 1;
        self.n += 1;
    }

    pub fn count(&self) -> u64 {
        self.n
    }

    /// The upper bound of the bucket holding quantile `q` (milliseconds); None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((self.n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::LOWEST_MS * (i as f64 / Self::PER_OCTAVE).exp2());
            }
        }
        None
    }
}

/// Latency increase over the baseline in percent; increases below `min_ms` are noise.
pub fn impact_pct(baseline_ms: f64, now_ms: f64, min_ms: f64) -> f64 {
    if baseline_ms <= 0.0 || now_ms - baseline_ms < min_ms {
        return 0.0;
    }
    (now_ms - baseline_ms) / baseline_ms * 100.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_histogram_gives_percentiles_within_a_bucket() {
        let mut h = super::Histogram::default();
        assert_eq!(h.quantile(0.99), None);
        for i in 1..=1000 {
            h.record(i as f64 / 100.0); // 0.01 … 10 ms
        }
        h.record(1e9); // beyond the last bucket: counted there
        assert_eq!(h.count(), 1001);
        let p50 = h.quantile(0.5).unwrap();
        let p99 = h.quantile(0.99).unwrap();
        assert!((5.0..5.0 * 1.1).contains(&p50), "p50 {p50}");
        assert!((9.9..9.9 * 1.1).contains(&p99), "p99 {p99}");
        assert!(h.quantile(1.0).unwrap() > 1e5);
    }

    #[test]
    fn the_baselines_noise_is_the_spread_of_its_windows_p99s() {
        use super::{Baseline, Sample};
        // Four windows of 100 reads: quiet ones at 1 ms with one 2 ms stall, and one
        // window whose tail reaches 5 ms.
        let mut samples = Vec::new();
        for w in 0..4 {
            for i in 0..100 {
                let ms = match (w, i) {
                    (2, 0..=2) => 5.0,
                    (_, 0..=2) => 2.0,
                    _ => 1.0,
                };
                samples.push(Sample { ms, write: false });
            }
        }
        let b = Baseline::of(&samples).unwrap();
        assert_eq!(b.read_noise_ms, 3.0);
        assert_eq!(b.writes, None);
        assert_eq!(super::noise(&[1.0; 20]), 0.0, "too few to tell");
    }

    #[test]
    fn small_absolute_changes_are_not_impact() {
        assert_eq!(super::impact_pct(0.2, 0.5, 2.0), 0.0);
        assert!((super::impact_pct(10.0, 13.0, 2.0) - 30.0).abs() < 1e-9);
        assert_eq!(super::impact_pct(10.0, 9.0, 2.0), 0.0);
    }
}
