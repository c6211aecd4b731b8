//! The `rekey` command line: its clap definitions. [`crate::commands`] runs them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use rekey_common::ledger::RunSettings;
use rekey_common::telemetry::LogFormat;

use crate::args::{DriveArgs, LatencyArgs};
use crate::keys_cmd::KeysCommand;

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
    /// Accept a master key file that group or others can read (refused by default).
    #[arg(long, global = true)]
    pub allow_insecure_key_file: bool,
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
        /// (the playbook), `30s`, or `0` for staging and tests [default: 24h,2h; with
        /// --dry-run, 0].
        #[arg(long)]
        observe: Option<String>,
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
        latency: Box<LatencyArgs>,
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
    /// Hold (`on`) or free (`off`) a run's publication without pausing it, as gh-ost's
    /// throttle: while held the driver publishes nothing new and batches in flight finish;
    /// `rekey status` says who held it and why. Audited.
    Throttle {
        run: i64,
        #[arg(value_parser = ["on", "off"])]
        switch: String,
        /// Why (kept with the hold and in the audit log).
        #[arg(long)]
        reason: Option<String>,
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
    /// RabbitMQ definitions (JSON, for `rabbitmqctl import_definitions` or the broker's
    /// `load_definitions`) of two users with the least permissions each needs on this
    /// queue prefix: the coordinator (declare the queues, publish orders, read reports) and
    /// the workers (read orders, publish reports and dead letters). Passwords are read from
    /// files and written only as salted hashes.
    BrokerUsers {
        #[arg(long, default_value = "rekey-coordinator")]
        coordinator_user: String,
        #[arg(long)]
        coordinator_password_file: std::path::PathBuf,
        #[arg(long, default_value = "rekey-worker")]
        worker_user: String,
        #[arg(long)]
        worker_password_file: std::path::PathBuf,
        /// The virtual host (it must exist).
        #[arg(long, default_value = "/")]
        vhost: String,
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
