//! Arguments shared by several commands: how a run is driven (`DriveArgs`, `LatencyArgs`)
//! and durations (`30s`, `24h,2h`).

use anyhow::Context as _;

use rekey_common::ledger::RunSettings;
use std::time::Duration;

/// The latency budget: when the probe's latency rises above it the coordinator throttles;
/// a sustained rise over the breach threshold fails the stage's performance gate.
#[derive(Debug, Clone, clap::Args)]
pub struct LatencyArgs {
    /// The latency budget, in percent of the application's p99 (`--app-p99-ms`; of the
    /// probe's own p99 when not given): the throttle holds the probe's p99 within this much
    /// of its p99 before the run. 0 turns the throttle off.
    #[arg(long, default_value_t = RunSettings::default().throttle_pct)]
    pub throttle_pct: f64,
    /// The budget is at least this many milliseconds (the probe's noise floor).
    #[arg(long, default_value_t = RunSettings::default().throttle_min_ms)]
    pub throttle_min_ms: f64,
    /// The application's own 99th percentile latency before the run, in milliseconds (from
    /// its dashboards): sizes the budget of `--throttle-pct`.
    #[arg(long)]
    pub app_p99_ms: Option<f64>,
    /// The probe reads only: by default its point reads alternate with a one-row write and
    /// commit (in `rekey.latency_probe`), each kind judged against its own p99 before the
    /// run, so that it sees the WAL-flush waits a rotation adds to the application's
    /// commits.
    #[arg(long)]
    pub no_probe_writes: bool,
    /// (The default now; kept so that scripts that pass it go on working.)
    #[arg(long, hide = true)]
    pub probe_writes: bool,
    /// While a stage rotates, pause publication this often for the probe to measure the
    /// application alone (a new baseline, and how far the application is from its
    /// baseline while nothing runs), e.g. 5m; 0: never.
    #[arg(long, default_value = "5m")]
    pub rebaseline_every: String,
    /// A stage is breached when the probe's median stays this many percent above its
    /// baseline for 3 samples in a row.
    #[arg(long, default_value_t = RunSettings::default().breach_pct)]
    pub breach_pct: f64,
    /// Start each stage at full speed instead of at one batch in flight.
    #[arg(long)]
    pub no_slow_start: bool,
    /// Publish nothing new while a streaming replica replays more than this far behind
    /// (`pg_stat_replication.replay_lag`, e.g. 30s); 0: not checked.
    #[arg(long, default_value = "30s")]
    pub max_replication_lag: String,
    /// … or more than this many bytes of WAL behind the primary; 0: not checked.
    #[arg(long, default_value_t = rekey_common::ledger::DEFAULT_MAX_REPLICATION_LAG_BYTES)]
    pub max_replication_lag_bytes: i64,
    /// Publish nothing new while more than this many client backends are active in
    /// PostgreSQL (`pg_stat_activity`, the rotation's own not counted; gh-ost's
    /// `--max-load Threads_running`); 0: not checked.
    #[arg(long, default_value_t = 0)]
    pub max_active_backends: i64,
    /// Publish nothing new for this long after PostgreSQL requested a checkpoint (WAL
    /// outgrew `max_wal_size`: the rotation writes faster than checkpoints spread it);
    /// 0: not checked.
    #[arg(long, default_value = "10s")]
    pub checkpoint_hold: String,
    /// The application's Prometheus (http://host:9090): with `--slo-query`, the throttle
    /// holds the application's own p99 within `--throttle-pct` of its value before the run
    /// (`REKEY_SLO_PROMETHEUS_URL`, `slo_prometheus_url` in rekey.toml).
    #[arg(long)]
    pub slo_prometheus_url: Option<String>,
    /// A PromQL expression returning one series, the application's p99 latency, e.g.
    /// `histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket[30s])))`
    /// (`REKEY_SLO_QUERY`, `slo_query`).
    #[arg(long)]
    pub slo_query: Option<String>,
    /// The unit of the query's value: s or ms (`REKEY_SLO_UNIT`, `slo_unit`; default s).
    #[arg(long)]
    pub slo_unit: Option<String>,
}

impl LatencyArgs {
    /// The SLO signal: these flags, else the settings' (environment, rekey.toml).
    pub fn slo(
        &self,
        configured: Option<&rekey_common::config::SloSource>,
    ) -> anyhow::Result<Option<rekey_common::config::SloSource>> {
        if self.slo_prometheus_url.is_none() && self.slo_query.is_none() {
            let Some(c) = configured else { return Ok(None) };
            return match &self.slo_unit {
                None => Ok(Some(c.clone())),
                Some(_) => rekey_common::config::SloSource::from_parts(
                    Some(c.prometheus_url.clone()),
                    Some(c.query.clone()),
                    self.slo_unit.clone(),
                ),
            };
        }
        rekey_common::config::SloSource::from_parts(
            self.slo_prometheus_url
                .clone()
                .or_else(|| configured.map(|c| c.prometheus_url.clone())),
            self.slo_query
                .clone()
                .or_else(|| configured.map(|c| c.query.clone())),
            self.slo_unit.clone().or_else(|| {
                configured.map(|c| if c.unit_ms == 1.0 { "ms" } else { "s" }.to_owned())
            }),
        )
    }
}

/// How the coordinator paces a run it drives.
#[derive(Debug, Clone, clap::Args)]
pub struct DriveArgs {
    /// Batches published and not yet done, at most.
    #[arg(long, default_value_t = crate::runtime::DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: i64,
    /// Seconds after which a published batch that is not done is published again.
    #[arg(long, default_value_t = crate::runtime::DEFAULT_LEASE.as_secs())]
    pub lease_secs: u64,
    /// Serve the run's Prometheus metrics at http://ADDR/metrics while driving it.
    #[arg(long, env = "REKEY_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Keep serving metrics this long after the run ended, so that the last scrape sees
    /// the final figures (e.g. 30s, a scrape interval or two).
    #[arg(long, default_value = "0")]
    pub metrics_linger: String,
    /// Say so (log, metric, webhook) when batches wait and nobody has consumed the batch
    /// queue for this long (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
    pub no_consumer_after: Duration,
    /// While this file exists, publish nothing new (batches in flight finish); remove it to
    /// go on. Like `rekey throttle RUN on`, for scripts and cron.
    #[arg(long, env = "REKEY_THROTTLE_FLAG_FILE")]
    pub throttle_flag_file: Option<std::path::PathBuf>,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| format!("{e:#}"))
}

impl DriveArgs {
    pub fn options(&self, json: bool) -> crate::runtime::DriveOptions {
        crate::runtime::DriveOptions {
            max_in_flight: self.max_in_flight.max(1),
            lease: Duration::from_secs(self.lease_secs.max(1)),
            no_consumer_after: self.no_consumer_after,
            throttle_flag_file: self.throttle_flag_file.clone(),
            progress: if json {
                crate::progress::ProgressMode::Quiet
            } else {
                crate::progress::ProgressMode::Auto
            },
            ..Default::default()
        }
    }
}

/// Parses `24h`, `90m`, `30s`, `1d`, `250ms` or `0`.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a duration like 24h, 90m, 30s"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => anyhow::bail!("{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// `--observe A[,B]`: first stage, later stages.
pub fn parse_observe(s: &str) -> anyhow::Result<(Duration, Duration)> {
    let parts: Vec<&str> = s.split(',').collect();
    let first = parse_duration(parts[0]).context("--observe")?;
    let rest = match parts.get(1) {
        Some(p) => parse_duration(p).context("--observe")?,
        None => first,
    };
    Ok((first, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_an_operator_writes_them() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
        assert_eq!(
            parse_observe("24h,2h").unwrap(),
            (Duration::from_secs(86400), Duration::from_secs(7200))
        );
        assert_eq!(
            parse_observe("5s").unwrap(),
            (Duration::from_secs(5), Duration::from_secs(5))
        );
    }
}
