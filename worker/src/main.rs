//! `rekey-worker`: takes batch orders from RabbitMQ and re-encrypts their rows. Parses
//! arguments, sets up logging and signals, and calls [`rekey_worker::consume::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rekey_common::telemetry::LogFormat;
use rekey_worker::consume::{self, WorkerOptions};

#[derive(Debug, Parser)]
#[command(
    name = "rekey-worker",
    version,
    about = "rekey's batch worker: re-encrypts rows batch by batch"
)]
struct Args {
    /// Configuration file (default: $REKEY_CONFIG, then ./rekey.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Accept a master key file that group or others can read (refused by default).
    #[arg(long)]
    allow_insecure_key_file: bool,
    /// Batches processed at once, each in its own transaction and connection.
    #[arg(long, env = "REKEY_WORKER_CONCURRENCY", default_value_t = consume::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Unacknowledged batch orders the broker may hand this worker at once.
    #[arg(long, env = "REKEY_WORKER_PREFETCH", default_value_t = consume::DEFAULT_PREFETCH)]
    prefetch: u16,
    /// `lock_timeout` of a batch transaction: how long it waits for an application's row lock.
    #[arg(long, default_value_t = consume::DEFAULT_LOCK_TIMEOUT_MS)]
    lock_timeout_ms: u64,
    /// `statement_timeout` of a batch transaction.
    #[arg(long, default_value_t = consume::DEFAULT_STATEMENT_TIMEOUT_MS)]
    statement_timeout_ms: u64,
    /// A name for logs, the ledger and the broker (default: hostname-pid).
    #[arg(long, env = "REKEY_WORKER_ID")]
    worker_id: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 0.0.0.0:9464.
    #[arg(long, env = "REKEY_WORKER_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = rekey_common::telemetry::init_for(args.log_format, "rekey-worker");
    rekey_common::failpoint::setup();
    // Before anything that takes time: a SIGTERM from here on drains and exits 0.
    let shutdown = consume::shutdown_signal();
    if args.allow_insecure_key_file {
        rekey_common::keys::master::allow_insecure_key_files();
    }
    let settings = match rekey_common::Settings::load(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", rekey_common::report_error::error_text(&e));
            return ExitCode::FAILURE;
        }
    };
    let mut opts = WorkerOptions {
        concurrency: args.concurrency.max(1),
        prefetch: args.prefetch.max(1),
        lock_timeout_ms: args.lock_timeout_ms,
        statement_timeout_ms: args.statement_timeout_ms,
        metrics_addr: args.metrics_addr,
        ..Default::default()
    };
    if let Some(id) = args.worker_id {
        opts.worker_id = id;
    }
    let code = match consume::run(settings, opts, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", rekey_common::report_error::error_text(&e));
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}
