//! The `rekey` command line: argument definitions and dispatch to library functions.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use rekey_common::Settings;
use rekey_common::ledger::{self, RunSettings};
use rekey_common::telemetry::LogFormat;

use crate::args::{DriveArgs, LatencyArgs, parse_duration, parse_observe};
use crate::context::Context;
use crate::follow::follow;
use crate::keys_cmd::{self, KeysCommand};
use crate::output::print_json_or;
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
