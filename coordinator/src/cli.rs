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
    }
}
