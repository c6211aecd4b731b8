//! The performance probe: the latency an application sees, measured before a run as a
//! baseline and during each stage. By default it is point reads by random id on every
//! target table (what an application does most); `probe_query` in `rekey.toml` replaces it
//! with a query of the operator's choosing.

use std::time::Instant;

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

/// Runs `n` probes (spread over the target tables) and returns their latency.
pub async fn measure(
    pool: &Pool,
    targets: &[Target],
    custom: Option<&str>,
    n: usize,
) -> anyhow::Result<Latency> {
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
    let custom_stmt = match custom {
        Some(q) => Some(
            client
                .prepare(q)
                .await
                .context("prepare the configured probe_query")?,
        ),
        None => None,
    };
    let mut samples = Vec::with_capacity(n);
    for i in 0..n.max(1) {
        let t0 = Instant::now();
        if let Some(stmt) = &custom_stmt {
            client
                .query(stmt, &[])
                .await
                .context("run the probe query")?;
        } else if !bounds.is_empty() {
            let (stmt, lo, hi) = &bounds[i % bounds.len()];
            let id = rand::rng().random_range(*lo..=*hi);
            client
                .query(stmt, &[&id])
                .await
                .context("run the probe query")?;
        }
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok(Latency {
        median_ms: pick(0.5),
        p95_ms: pick(0.95),
        n: samples.len(),
    })
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
