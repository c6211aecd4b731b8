//! The `rekey` command line: argument definitions and dispatch to library functions.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use deadpool_postgres::Pool;
use rekey_common::Settings;
use rekey_common::keys::master::MasterKey;
use rekey_common::telemetry::LogFormat;

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
    /// Rotate the field key: make a new key active for new writes, plan the run into the
    /// ledger, publish its batches and follow it to the end (unless --detach).
    Rotate {
        /// Rows per batch.
        #[arg(long, default_value_t = 1000)]
        batch_size: i64,
        /// Everything but the write, in a run of its own kind; reports counts and the
        /// would-be error rate. Keys are not activated.
        #[arg(long)]
        dry_run: bool,
        /// Rotate to this field key (default: the newest pending field key, or a new one).
        #[arg(long)]
        target_key: Option<uuid::Uuid>,
        /// Plan and publish nothing more than the ledger; `rekey resume RUN` drives it.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        drive: DriveArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show a run's progress from the ledger (default: the latest run).
    Status {
        run: Option<i64>,
        /// Refresh every 2 seconds until the run ends.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// Pause a running run: no more batches are published; workers hand back what they get.
    Pause {
        run: i64,
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused, halted or interrupted run, recomputing everything from the ledger,
    /// and follow it to the end (unless --detach).
    Resume {
        run: i64,
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        drive: DriveArgs,
        #[arg(long)]
        json: bool,
    },
}

/// How the coordinator paces a run it drives.
#[derive(Debug, Clone, clap::Args)]
pub struct DriveArgs {
    /// Batches published and not yet done, at most.
    #[arg(long, default_value_t = 64)]
    pub max_in_flight: i64,
    /// Seconds after which a published batch that is not done is published again.
    #[arg(long, default_value_t = 120)]
    pub lease_secs: u64,
}

impl DriveArgs {
    fn options(&self, json: bool) -> crate::drive::DriveOptions {
        crate::drive::DriveOptions {
            max_in_flight: self.max_in_flight.max(1),
            lease: std::time::Duration::from_secs(self.lease_secs.max(1)),
            progress: if json {
                crate::drive::ProgressMode::Quiet
            } else {
                crate::drive::ProgressMode::Auto
            },
            ..Default::default()
        }
    }
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
        let pool = rekey_common::db::pool(&settings, 4)?;
        rekey_common::db::check_connection(&pool, &settings).await?;
        Ok(Self { settings, pool })
    }

    /// Loads the master key from the configured provider.
    pub fn master_key(&self) -> anyhow::Result<MasterKey> {
        let provider = self.settings.master_key_provider()?;
        provider
            .load()
            .with_context(|| format!("load the master key from {}", provider.describe()))
    }
}

/// Runs one command; the exit code is for commands whose result is a verdict.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate { demo, json } => {
            let ctx = Context::connect(cli.config.as_deref()).await?;
            let mut applied = rekey_common::db::migrate(&ctx.pool).await?;
            if demo {
                applied.extend(rekey_common::db::migrate_demo(&ctx.pool).await?);
            }
            if json {
                crate::output::json(&serde_json::json!({ "applied": applied }))?;
            } else if applied.is_empty() {
                println!("migrations: up to date");
            } else {
                for m in &applied {
                    println!("applied {m}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { command } => keys_cmd::run(cli.config.as_deref(), command).await,
        Command::Rotate {
            batch_size,
            dry_run,
            target_key,
            detach,
            drive,
            json,
        } => {
            let ctx = Context::connect(cli.config.as_deref()).await?;
            let master = ctx.master_key()?;
            let opts = run_cmd::RotateOptions {
                batch_size,
                dry_run,
                target_key,
                seed: None,
            };
            let run = run_cmd::start_rotation(&ctx.pool, &ctx.settings, &master, &opts)
                .await
                .context("start the rotation")?;
            if !json {
                eprintln!("run {} planned: target key {}", run.id, run.target_key_id);
            }
            follow(&ctx, run.id, detach, &drive, json).await
        }
        Command::Status { run, watch, json } => {
            let ctx = Context::connect(cli.config.as_deref()).await?;
            let run_id = match run {
                Some(r) => r,
                None => rekey_common::ledger::recent_runs(&**ctx.pool.get().await?, 1)
                    .await?
                    .first()
                    .map(|r| r.id)
                    .context("there are no runs yet")?,
            };
            loop {
                let s = run_cmd::status(&ctx.pool, run_id).await?;
                if json {
                    crate::output::json(&s)?;
                } else {
                    run_cmd::print_status(&s);
                }
                if !watch || s.run.state.is_final() {
                    break;
                }
                tokio::time::sleep(run_cmd::WATCH_EVERY).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { run, json } => {
            let ctx = Context::connect(cli.config.as_deref()).await?;
            let r = run_cmd::pause(&ctx.pool, run).await?;
            if json {
                crate::output::json(&r)?;
            } else {
                println!("run {} is paused", r.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume {
            run,
            detach,
            drive,
            json,
        } => {
            let ctx = Context::connect(cli.config.as_deref()).await?;
            let r = run_cmd::resume(&ctx.pool, run).await?;
            if !json {
                eprintln!("run {} resumed", r.id);
            }
            follow(&ctx, r.id, detach, &drive, json).await
        }
    }
}

/// Drives a run to its end (or only reports its plan with --detach) and prints its status.
/// Exits non-zero unless the run completed.
async fn follow(
    ctx: &Context,
    run_id: i64,
    detach: bool,
    drive: &DriveArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if !detach {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        crate::drive::drive(
            &ctx.pool,
            &ctx.settings,
            run_id,
            &drive.options(json),
            shutdown,
        )
        .await?;
    }
    let s = run_cmd::status(&ctx.pool, run_id).await?;
    if json {
        crate::output::json(&s)?;
    } else {
        run_cmd::print_status(&s);
    }
    let ok = detach || s.run.state == rekey_common::ledger::RunState::Completed;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
