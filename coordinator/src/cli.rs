//! The `rekey` command line: argument definitions and dispatch to library functions.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rekey_common::metrics::Metrics;

use crate::drive::{DriveOptions, notify};
use deadpool_postgres::Pool;
use rekey_common::Settings;
use rekey_common::keys::master::MasterKey;
use rekey_common::ledger::{self, RunKind, RunSettings, RunState};
use rekey_common::notify::Notifier;
use rekey_common::telemetry::LogFormat;
use tracing::Instrument;

use crate::keys_cmd::{self, KeysCommand};
use crate::run_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "rekey",
    version,
    about = "Staged, resumable rotation of field-level encryption keys in PostgreSQL"
)]
pub struct Cli {
    /// Configuration file (default: $REKEY_CONFIG, then ./rekey.toml if present).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply rekey's migrations (idempotent).
    Migrate {
        /// Also create the demo application schema.
        #[arg(long)]
        demo: bool,
        #[arg(long)]
        json: bool,
    },
    /// Manage the key hierarchy.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        command: crate::audit_cmd::AuditCommand,
    },
    /// The pre-rotation checklist, each item pass, warn or fail.
    Preflight {
        #[arg(long)]
        json: bool,
    },
    /// Rotate the field key in stages: make a new key active for new writes, then rotate a
    /// 1% canary and 25/50/75/100% of records, each stage gated and observed.
    Rotate {
        /// Rows per batch at most.
        #[arg(long, default_value_t = 10_000)]
        batch_size: i64,
        /// Bytes of encrypted values a batch holds, about (sampled per table): small values
        /// get long batches, large ones short batches; 0: every batch holds --batch-size rows.
        #[arg(long, default_value_t = rekey_common::sizing::DEFAULT_BATCH_BYTES)]
        batch_bytes: i64,
        /// Cumulative percentages of records per stage, ending at 100.
        #[arg(long, value_delimiter = ',', default_value = "1,25,50,75,100")]
        stages: Vec<i32>,
        /// Observation after the first stage and after each later one, e.g. `24h,2h`
        /// (the playbook), `30s`, or `0` for staging and tests.
        #[arg(long, default_value = "24h,2h")]
        observe: String,
        /// Promote each stage by itself once its observation ends (else `rekey promote`).
        #[arg(long)]
        auto_advance: bool,
        /// Roll back by itself when a gate is breached.
        #[arg(long)]
        auto_rollback: bool,
        /// A stage's decrypt error rate must stay below this fraction.
        #[arg(long, default_value_t = RunSettings::default().max_error_rate)]
        max_error_rate: f64,
        #[command(flatten)]
        latency: LatencyArgs,
        /// Everything but the write, in a run of its own kind (one stage, 100%).
        #[arg(long)]
        dry_run: bool,
        /// Rotate to this field key (default: the newest pending field key, or a new one).
        #[arg(long)]
        target_key: Option<uuid::Uuid>,
        /// How long a new key stays pending (readable by everyone, used by no one) before
        /// it becomes active: at least the interval at which applications reload their keys.
        #[arg(long, default_value = "30s")]
        key_propagation: String,
        /// Start even when preflight fails.
        #[arg(long)]
        skip_preflight: bool,
        /// Plan only; `rekey resume RUN` drives it.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        drive: DriveArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show a run's progress and stages from the ledger (default: the latest run).
    Status {
        run: Option<i64>,
        /// Refresh every 2 seconds until the run ends.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// Pass the current stage once its gates passed and its observation ended.
    Promote {
        run: i64,
        /// Keep driving the run after promoting it.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        drive: DriveArgs,
        #[arg(long)]
        json: bool,
    },
    /// Pause a running run: no more batches are published; workers hand back what they get.
    Pause {
        run: i64,
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused, halted or interrupted run, recomputing everything from the ledger.
    Resume {
        /// The run; by default the newest run that is not over.
        run: Option<i64>,
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        drive: DriveArgs,
        #[arg(long)]
        json: bool,
    },
    /// Re-encrypt every value the run moved back to the previous key and make that key
    /// active again.
    Rollback {
        run: i64,
        #[arg(long, default_value_t = 1000)]
        batch_size: i64,
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        drive: DriveArgs,
        #[arg(long)]
        json: bool,
    },
    /// Write a run's evidence report again (to exports/rotation_reports/ and the database).
    Report {
        run: i64,
        #[arg(long)]
        json: bool,
    },
    /// A fresh demo database, 100,000 records, two workers, a whole staged rotation.
    Demo {
        #[arg(long, default_value_t = 100_000)]
        rows: i64,
        /// Observation per stage.
        #[arg(long, default_value = "3s")]
        observe: String,
        /// Keep the demo database afterwards.
        #[arg(long)]
        keep: bool,
    },
}

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
    /// The probe alternates its point reads with a one-row write and commit (in
    /// `rekey.latency_probe`), each kind judged against its own p99 before the run: it
    /// then sees the WAL-flush waits a rotation adds to the application's commits, and
    /// throttles harder (measured: far harder after a quiet baseline).
    #[arg(long)]
    pub probe_writes: bool,
    /// A stage is breached when the probe's median stays this many percent above its
    /// baseline for 3 samples in a row.
    #[arg(long, default_value_t = RunSettings::default().breach_pct)]
    pub breach_pct: f64,
    /// Start each stage at full speed instead of at one batch in flight.
    #[arg(long)]
    pub no_slow_start: bool,
}

/// How the coordinator paces a run it drives.
#[derive(Debug, Clone, clap::Args)]
pub struct DriveArgs {
    /// Batches published and not yet done, at most.
    #[arg(long, default_value_t = crate::drive::DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: i64,
    /// Seconds after which a published batch that is not done is published again.
    #[arg(long, default_value_t = crate::drive::DEFAULT_LEASE.as_secs())]
    pub lease_secs: u64,
    /// Serve the run's Prometheus metrics at http://ADDR/metrics while driving it.
    #[arg(long, env = "REKEY_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Keep serving metrics this long after the run ended, so that the last scrape sees
    /// the final figures (e.g. 30s, a scrape interval or two).
    #[arg(long, default_value = "0")]
    pub metrics_linger: String,
}

impl DriveArgs {
    pub fn options(&self, json: bool) -> crate::drive::DriveOptions {
        crate::drive::DriveOptions {
            max_in_flight: self.max_in_flight.max(1),
            lease: Duration::from_secs(self.lease_secs.max(1)),
            progress: if json {
                crate::drive::ProgressMode::Quiet
            } else {
                crate::drive::ProgressMode::Auto
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
fn parse_observe(s: &str) -> anyhow::Result<(Duration, Duration)> {
    let parts: Vec<&str> = s.split(',').collect();
    let first = parse_duration(parts[0]).context("--observe")?;
    let rest = match parts.get(1) {
        Some(p) => parse_duration(p).context("--observe")?,
        None => first,
    };
    Ok((first, rest))
}

/// What every command that touches the database starts from.
#[derive(Debug)]
pub struct Context {
    pub settings: Settings,
    pub pool: Pool,
}

impl Context {
    /// Loads settings and connects, failing with a message that names the setting.
    pub async fn connect(config: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let settings = Settings::load(config)?;
        Self::with_settings(settings).await
    }

    pub async fn with_settings(settings: Settings) -> anyhow::Result<Self> {
        let pool = rekey_common::db::pool(&settings, 6)?;
        rekey_common::db::check_connection(&pool, &settings).await?;
        Ok(Self { settings, pool })
    }

    /// Loads the master key from the configured provider.
    pub fn master_key(&self) -> anyhow::Result<MasterKey> {
        self.settings.load_master_key()
    }
}

fn print_json_or<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(),
) -> anyhow::Result<()> {
    if json {
        crate::output::json(value)
    } else {
        text();
        Ok(())
    }
}

/// Runs one command; the exit code is for commands whose result is a verdict.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Migrate { demo, json } => {
            let ctx = Context::connect(config).await?;
            let mut applied = rekey_common::db::migrate(&ctx.pool).await?;
            if demo {
                applied.extend(rekey_common::db::migrate_demo(&ctx.pool).await?);
            }
            print_json_or(json, &serde_json::json!({ "applied": applied }), || {
                if applied.is_empty() {
                    println!("migrations: up to date");
                }
                for m in &applied {
                    println!("applied {m}");
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { command } => keys_cmd::run(config, command).await,
        Command::Audit { command } => crate::audit_cmd::run(config, command).await,
        Command::Preflight { json } => {
            let settings = Settings::load(config)?;
            settings.require_targets()?;
            let p = crate::preflight::run(&settings).await;
            print_json_or(json, &p, || p.print())?;
            Ok(if p.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Rotate {
            batch_size,
            batch_bytes,
            stages,
            observe,
            auto_advance,
            auto_rollback,
            max_error_rate,
            latency,
            dry_run,
            target_key,
            key_propagation,
            skip_preflight,
            detach,
            drive,
            json,
        } => {
            let (first, rest) = parse_observe(&observe)?;
            let key_propagation = parse_duration(&key_propagation).context("--key-propagation")?;
            let ctx = Context::connect(config).await?;
            ctx.settings.require_targets()?;
            if !skip_preflight {
                let p = crate::preflight::run(&ctx.settings).await;
                if !p.passed {
                    if !json {
                        p.print();
                    }
                    let items: Vec<String> = p
                        .failures()
                        .iter()
                        .map(|c| format!("{}: {}", c.item, c.detail))
                        .collect();
                    anyhow::bail!(
                        "preflight failed ({}); fix it or pass --skip-preflight",
                        items.join("; ")
                    );
                }
            }
            let master = ctx.master_key()?;
            let opts = run_cmd::RotateOptions {
                batch_size,
                dry_run,
                target_key,
                seed: None,
                key_propagation,
                stages: if dry_run { vec![100] } else { stages },
                gating: RunSettings {
                    observe_first_secs: first.as_secs(),
                    observe_secs: rest.as_secs(),
                    auto_advance: auto_advance || dry_run,
                    auto_rollback,
                    max_error_rate,
                    batch_bytes: batch_bytes.max(0),
                    throttle_pct: latency.throttle_pct.max(0.0),
                    throttle_min_ms: latency.throttle_min_ms.max(0.0),
                    app_p99_ms: latency.app_p99_ms.filter(|ms| *ms > 0.0),
                    probe_writes: latency.probe_writes,
                    breach_pct: latency.breach_pct,
                    slow_start: !latency.no_slow_start,
                    ..Default::default()
                },
            };
            let run = run_cmd::start_rotation(&ctx.pool, &ctx.settings, &master, &opts)
                .await
                .context("start the rotation")?;
            if !json {
                eprintln!(
                    "run {} planned: target key {}, stages {:?}",
                    run.id, run.target_key_id, run.stages
                );
            }
            follow(&ctx, run.id, detach, &drive, json, "started").await
        }
        Command::Status { run, watch, json } => {
            let ctx = Context::connect(config).await?;
            let run_id = match run {
                Some(r) => r,
                None => ledger::recent_runs(&**ctx.pool.get().await?, 1)
                    .await?
                    .first()
                    .map(|r| r.id)
                    .context("there are no runs yet")?,
            };
            loop {
                let s = run_cmd::status(&ctx.pool, run_id).await?;
                print_json_or(json, &s, || run_cmd::print_status(&s))?;
                if !watch || s.run.state.is_final() {
                    break;
                }
                tokio::time::sleep(run_cmd::WATCH_EVERY).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Promote {
            run,
            follow: keep,
            drive,
            json,
        } => {
            let ctx = Context::connect(config).await?;
            let r = run_cmd::promote(&ctx.pool, &ctx.settings, run).await?;
            if !json {
                eprintln!(
                    "run {} promoted: now at stage {} ({})",
                    r.id, r.current_stage, r.state
                );
            }
            follow(&ctx, r.id, !keep, &drive, json, "resumed").await
        }
        Command::Pause { run, json } => {
            let ctx = Context::connect(config).await?;
            let r = run_cmd::pause(&ctx.pool, run).await?;
            print_json_or(json, &r, || println!("run {} is paused", r.id))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume {
            run,
            detach,
            drive,
            json,
        } => {
            let ctx = Context::connect(config).await?;
            let run = match run {
                Some(r) => r,
                None => ledger::latest_unfinished_run(&**ctx.pool.get().await?)
                    .await?
                    .map(|r| r.id)
                    .context("no run to resume: every run in the ledger is over (`rekey status` lists them)")?,
            };
            let r = run_cmd::resume(&ctx.pool, run).await?;
            if !json {
                eprintln!("run {} resumed", r.id);
            }
            follow(&ctx, r.id, detach, &drive, json, "resumed").await
        }
        Command::Rollback {
            run,
            batch_size,
            detach,
            drive,
            json,
        } => {
            let ctx = Context::connect(config).await?;
            let r = run_cmd::start_rollback(&ctx.pool, &ctx.settings, run, batch_size).await?;
            if !json {
                eprintln!(
                    "rollback run {} started for run {run}: back to key {}",
                    r.id, r.target_key_id
                );
            }
            follow(&ctx, r.id, detach, &drive, json, "started").await
        }
        Command::Report { run, json } => {
            let ctx = Context::connect(config).await?;
            let path =
                crate::report::write(&ctx.pool, &ctx.settings, run, "report requested").await?;
            print_json_or(json, &serde_json::json!({"path": path}), || {
                println!("{}", path.display())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            rows,
            observe,
            keep,
        } => {
            let settings = Settings::load(config)?;
            crate::demo::run(settings, rows, parse_duration(&observe)?, keep).await
        }
    }
}

/// Drives a run to its end (or leaves it with --detach) and prints its status. A breach
/// with auto-rollback starts the rollback and drives it too; a completed rollback marks
/// its parent rolled back. Exits non-zero unless the run completed (or was detached).
pub async fn follow(
    ctx: &Context,
    run_id: i64,
    detach: bool,
    drive: &DriveArgs,
    json: bool,
    opening: &'static str,
) -> anyhow::Result<ExitCode> {
    let mut run_id = run_id;
    let notifier = Notifier::new(ctx.settings.webhook_url.as_ref())?;
    let pool = &ctx.pool;
    if !detach {
        notify(&notifier, pool, run_id, opening, None, None, None).await;
    }
    let metrics = Metrics::new("rekey");
    let server = match (detach, drive.metrics_addr) {
        (false, Some(addr)) => Some(rekey_common::metrics::serve(addr, metrics.clone()).await?.1),
        _ => None,
    };
    if !detach {
        loop {
            let shutdown = rekey_common::shutdown::signal();
            // The run's trace: every publication, gate and (through the message headers)
            // every batch is part of it.
            let span = tracing::info_span!("run", run_id);
            let state = crate::drive::drive(
                &ctx.pool,
                &ctx.settings,
                run_id,
                &DriveOptions {
                    metrics: Some(metrics.clone()),
                    notifier: notifier.clone(),
                    ..drive.options(json)
                },
                shutdown,
            )
            .instrument(span)
            .await?;
            crate::drive::record_final(&metrics, &ctx.pool, run_id).await?;
            let run = ledger::get_run(&**ctx.pool.get().await?, run_id)
                .await?
                .context("run vanished")?;
            match (state, run.kind) {
                (RunState::Completed, RunKind::Rollback) => {
                    run_cmd::finish_rollback(&ctx.pool, &ctx.settings, &run).await?;
                    let parent = run.parent_run_id.unwrap_or(run_id);
                    notify(&notifier, pool, parent, "rolled_back", None, None, None).await;
                }
                (RunState::Completed, _) => {
                    let path =
                        crate::report::write(&ctx.pool, &ctx.settings, run_id, "run completed")
                            .await?;
                    notify(
                        &notifier,
                        pool,
                        run_id,
                        "completed",
                        None,
                        None,
                        Some(&path),
                    )
                    .await;
                }
                (RunState::Halted, _) => {
                    notify(&notifier, pool, run_id, "halted", None, None, None).await;
                }
                _ => {}
            }
            match (state, run.kind) {
                (RunState::Halted, RunKind::Rotation)
                    if run.settings.auto_rollback
                        && run.halt_reason.as_deref() != Some("rolling back") =>
                {
                    if !json {
                        eprintln!(
                            "run {run_id} halted ({}); rolling back",
                            run.halt_reason.as_deref().unwrap_or("-")
                        );
                    }
                    let rb = run_cmd::start_rollback(
                        &ctx.pool,
                        &ctx.settings,
                        run_id,
                        i64::from(run.batch_size),
                    )
                    .await?;
                    run_id = rb.id;
                    notify(&notifier, pool, run_id, "started", None, None, None).await;
                    continue;
                }
                _ => {}
            }
            break;
        }
    }
    // Deliver what is queued before exiting (bounded: a dead webhook never holds us long).
    notifier.flush(Duration::from_secs(20)).await;
    let s = run_cmd::status(&ctx.pool, run_id).await?;
    print_json_or(json, &s, || run_cmd::print_status(&s))?;
    if !json && !detach {
        let path = crate::report::path(&ctx.pool, &ctx.settings, run_id).await?;
        eprintln!("report: {}", path.display());
    }
    if server.is_some() {
        let linger = parse_duration(&drive.metrics_linger)?;
        if !linger.is_zero() {
            tracing::info!(
                secs = linger.as_secs_f64(),
                "serving the final metrics before exiting"
            );
            tokio::time::sleep(linger).await;
        }
    }
    // Exports what an OTLP reader still holds.
    metrics.shutdown();
    let ok = detach || s.run.state == RunState::Completed;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
