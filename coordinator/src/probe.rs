//! The performance probe: the latency an application sees, measured before a run as a
//! baseline and during each stage. By default it is point reads by random id on every
//! target table (what an application does most); `probe_query` in `rekey.toml` replaces it
//! with a query of the operator's choosing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use rand::RngExt;
use rekey_common::config::{Target, quote_ident};
use serde::Serialize;

/// One measurement: several probe queries, their median and 95th percentile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub median_ms: f64,
    pub p95_ms: f64,
    pub n: usize,
}

/// The probe's prepared queries on one connection.
struct Probe {
    client: deadpool_postgres::Object,
    /// Per target table: the point read and its id bounds.
    bounds: Vec<(tokio_postgres::Statement, i64, i64)>,
    custom: Option<tokio_postgres::Statement>,
    next: usize,
}

impl Probe {
    async fn prepare(
        pool: &Pool,
        targets: &[Target],
        custom: Option<&str>,
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
        Ok(Self {
            client,
            bounds,
            custom,
            next: 0,
        })
    }

    /// One probe query (the next table in turn); its latency in milliseconds.
    async fn once(&mut self) -> anyhow::Result<f64> {
        let t0 = Instant::now();
        if let Some(stmt) = &self.custom {
            self.client
                .query(stmt, &[])
                .await
                .context("run the probe query")?;
        } else if !self.bounds.is_empty() {
            let (stmt, lo, hi) = &self.bounds[self.next % self.bounds.len()];
            self.next += 1;
            let id = rand::rng().random_range(*lo..=*hi);
            self.client
                .query(stmt, &[&id])
                .await
                .context("run the probe query")?;
        }
        Ok(t0.elapsed().as_secs_f64() * 1000.0)
    }
}

/// Runs `n` probes (spread over the target tables), `spacing` apart, and returns their
/// latency.
pub async fn measure(
    pool: &Pool,
    targets: &[Target],
    custom: Option<&str>,
    n: usize,
    spacing: Duration,
) -> anyhow::Result<Latency> {
    let mut probe = Probe::prepare(pool, targets, custom).await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n.max(1) {
        if i > 0 && !spacing.is_zero() {
            tokio::time::sleep(spacing).await;
        }
        samples.push(probe.once().await?);
    }
    Ok(Latency::of(&mut samples))
}

impl Latency {
    /// The median and 95th percentile of `samples` (milliseconds; not empty).
    pub fn of(samples: &mut [f64]) -> Self {
        samples.sort_by(f64::total_cmp);
        let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Latency {
            median_ms: pick(0.5),
            p95_ms: pick(0.95),
            n: samples.len(),
        }
    }
}

/// Probes in the background while a stage rotates, one query every `every`, so that the
/// throttle sees the latency over the whole interval between its decisions, not one burst.
/// Stops when dropped.
#[derive(Debug)]
pub struct Prober {
    samples: Arc<Mutex<Vec<f64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    pub fn start(
        pool: Pool,
        targets: Vec<Target>,
        custom: Option<String>,
        every: Duration,
    ) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let mut probe = match Probe::prepare(&pool, &targets, custom.as_deref()).await {
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
                        Ok(ms) => {
                            let mut s = out.lock().expect("probe samples");
                            // Bounded: the driver takes them every few seconds.
                            if s.len() < 10_000 {
                                s.push(ms);
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
    pub fn take(&self) -> Vec<f64> {
        std::mem::take(&mut *self.samples.lock().expect("probe samples"))
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
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
    fn small_absolute_changes_are_not_impact() {
        assert_eq!(super::impact_pct(0.2, 0.5, 2.0), 0.0);
        assert!((super::impact_pct(10.0, 13.0, 2.0) - 30.0).abs() < 1e-9);
        assert_eq!(super::impact_pct(10.0, 9.0, 2.0), 0.0);
    }
}
