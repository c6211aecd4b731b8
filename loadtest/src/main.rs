//! `rekey-loadtest`: seed the demo schema, verify it, and (later) load-test rotations.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rekey_common::keys::store;
use rekey_common::telemetry::LogFormat;
use rekey_common::{Settings, db};
use rekey_loadtest::{bench, chaos, procs, seed, verify};

#[derive(Debug, Parser)]
#[command(
    name = "rekey-loadtest",
    version,
    about = "Seed, verify and load-test rekey on the demo schema"
)]
struct Cli {
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fill the (empty) demo schema with N encrypted records; creates the schema and the
    /// first keys if needed.
    Seed {
        #[arg(long, default_value_t = 100_000)]
        rows: i64,
        /// Seed of the plaintext generator: the same seed gives the same plaintexts.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Fraction of values planted so that they cannot decrypt.
        #[arg(long, default_value_t = 0.0)]
        corrupt_fraction: f64,
        #[arg(long)]
        json: bool,
    },
    /// Simulated application traffic: reads that decrypt and writes that encrypt, at a fixed
    /// rate, with latency percentiles and errors. Runs alone or alongside a rotation.
    Traffic {
        /// Operations started per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// How long, e.g. 30s, 5m.
        #[arg(long, default_value = "30s")]
        duration: String,
        /// Share of writes (one-row updates, each in its own commit); the rest are point
        /// reads.
        #[arg(long, default_value_t = rekey_loadtest::traffic::DEFAULT_WRITE_SHARE)]
        write_share: f64,
        /// Export the application's request latency histogram
        /// (`app_request_duration_seconds{op}`) at http://ADDR/metrics, as an application
        /// would to its Prometheus.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        #[arg(long)]
        json: bool,
    },
    /// On freshly seeded data (the demo tables are emptied first): (a) the in-database
    /// rewrite ceiling, (b) a bare client rotation, (c) the full rekey rotation with W worker
    /// processes under application traffic; prints rows/s, ratios, latency impact and peak
    /// memory, and writes JSON and a PNG chart.
    Bench {
        #[arg(long, default_value_t = 1_000_000)]
        rows: i64,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Batches per worker at once; (a) and (b) use workers × this many connections.
        #[arg(long, default_value_t = 2)]
        worker_concurrency: usize,
        #[arg(long, default_value_t = 4)]
        prefetch: u16,
        /// Rows per batch at most.
        #[arg(long, default_value_t = 10_000)]
        batch_size: i64,
        /// Bytes of values per batch (0: --batch-size rows each), in all three phases.
        #[arg(long, default_value_t = rekey_common::sizing::DEFAULT_BATCH_BYTES)]
        batch_bytes: i64,
        /// Stages of the rotation in (c).
        #[arg(long, value_delimiter = ',', default_value = "100")]
        stages: Vec<i32>,
        /// Application operations per second before and during (c); 0 for none.
        #[arg(long, default_value_t = 100)]
        traffic_rate: u32,
        /// Share of the traffic that writes (one-row updates, each in its own commit).
        #[arg(long, default_value_t = rekey_loadtest::traffic::DEFAULT_WRITE_SHARE)]
        write_share: f64,
        /// Throttle (c) on the application's own p99: the traffic exports its request
        /// histogram to a Prometheus the bench starts (Debian's package), and `rekey rotate`
        /// gets `--slo-prometheus-url`/`--slo-query`.
        #[arg(long)]
        slo: bool,
        /// The `rate()` window of the SLO query, e.g. 10s.
        #[arg(long, default_value = "10s")]
        slo_window: String,
        /// Traffic alone before (c), for the baseline latency (a p99 of 12,000 operations at
        /// 100 ops/s: of 4,000 it moves by ±10% from run to run).
        #[arg(long, default_value = "120s")]
        baseline: String,
        /// `rekey rotate --throttle-pct` in (c); 0 turns the throttle off.
        #[arg(long, default_value_t = 15.0)]
        throttle_pct: f64,
        /// `rekey rotate --throttle-min-ms` in (c).
        #[arg(long, default_value_t = 0.5)]
        throttle_min_ms: f64,
        /// `rekey rotate --no-slow-start` in (c).
        #[arg(long)]
        no_slow_start: bool,
        /// Only (c) and its latency: skip (a) and (b) (no ratios then), e.g. to study the
        /// throttle.
        #[arg(long)]
        only_full: bool,
        /// Do not tell `rekey rotate` the application's p99 (`--app-p99-ms`, the traffic's
        /// p99 before (c)); the throttle then budgets on its probe's own p99.
        #[arg(long)]
        no_app_p99: bool,
        /// Where `rekey` and `rekey-worker` are (default: beside this program).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Skip checking every value after (c).
        #[arg(long)]
        no_verify: bool,
        /// The JSON report (default: bench-<rows>.json).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The PNG chart (default: bench-<rows>.png).
        #[arg(long)]
        chart: Option<PathBuf>,
        /// A TrueType font for the chart's text.
        #[arg(
            long,
            default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
        )]
        font: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// A bounded soak: rotates N freshly seeded records while SIGKILLing workers and the
    /// coordinator (then resuming), restarting a private RabbitMQ node and terminating
    /// database connections mid-transaction at random moments; then verifies every record
    /// and prints the faults injected and the records verified, lost and corrupted.
    Chaos {
        #[arg(long, default_value_t = 100_000)]
        rows: i64,
        /// Faults are injected for at most this long, e.g. 90s, 10m.
        #[arg(long, default_value = "5m")]
        duration: String,
        /// Mean time between faults.
        #[arg(long, default_value = "1s")]
        fault_every: String,
        /// Which faults (each once first, in this order, then at random).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "worker-kill,db-terminate,coordinator-kill,broker-restart"
        )]
        faults: Vec<rekey_loadtest::chaos::Fault>,
        /// A broker restart at most this often.
        #[arg(long, default_value = "20s")]
        broker_restart_gap: String,
        /// After the faults stop, how long the run may take to complete.
        #[arg(long, default_value = "10m")]
        finish_within: String,
        #[arg(long, default_value_t = 3)]
        workers: usize,
        #[arg(long, default_value_t = 2)]
        worker_concurrency: usize,
        /// Bytes of values per batch (smaller: more batches, more moments to fail in).
        #[arg(long, default_value_t = 256 * 1024)]
        batch_bytes: i64,
        #[arg(long, value_delimiter = ',', default_value = "1,100")]
        stages: Vec<i32>,
        /// Use the configured broker instead of a private node; no broker restarts then.
        #[arg(long)]
        shared_broker: bool,
        /// Where `rekey` and `rekey-worker` are (default: beside this program).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Keep the processes' logs here (default: kept only when the soak fails).
        #[arg(long)]
        log_dir: Option<PathBuf>,
        /// Seed of the plaintexts and of the fault schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Draw a bench's PNG chart again from its JSON report.
    Chart {
        /// The JSON report `bench` wrote.
        from: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(
            long,
            default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
        )]
        font: PathBuf,
    },
    /// Check that every value decrypts to its recorded plaintext; counts by key and outcome.
    Verify {
        /// Also require every decryptable value to be under this key.
        #[arg(long)]
        expect_key: Option<uuid::Uuid>,
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // First thing: a SIGTERM or Ctrl-C to this process alone (a supervisor's stop, a CI
    // job cancelled, `timeout`) drops what runs, and with it every process it started —
    // workers, `rekey rotate`, Prometheus, private brokers and clusters are all killed on
    // drop — instead of leaving them running behind it.
    let stop = rekey_common::shutdown::signal();
    let cli = Cli::parse();
    rekey_common::telemetry::init(cli.log_format);
    let outcome = tokio::select! {
        r = run(cli) => r,
        () = stop => {
            eprintln!("stopped by a signal: the processes it started are stopped with it; a rotation it started stays resumable (`rekey status`)");
            return ExitCode::from(130);
        }
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", rekey_common::report_error::error_text(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Chart { from, out, font } = &cli.command {
        // Needs no database, broker or key.
        let report: bench::BenchReport = serde_json::from_slice(
            &std::fs::read(from).with_context(|| format!("read {}", from.display()))?,
        )
        .with_context(|| format!("{} is not a bench report", from.display()))?;
        bench::chart(&report, out, font)?;
        println!("wrote {}", out.display());
        return Ok(ExitCode::SUCCESS);
    }
    let settings = Settings::load(cli.config.as_deref())?;
    let pool = db::pool(&settings, 4)?;
    db::check_connection(&pool, &settings).await?;
    let master = settings.load_master_key()?;
    match cli.command {
        Command::Seed {
            rows,
            seed: s,
            corrupt_fraction,
            json,
        } => {
            if !(0.0..=1.0).contains(&corrupt_fraction) {
                anyhow::bail!("--corrupt-fraction must be between 0 and 1");
            }
            db::migrate(&pool).await?;
            db::migrate_demo(&pool).await?;
            {
                let mut c = pool.get().await?;
                let tx = c.transaction().await?;
                store::init(&tx, &master, &settings.key_policy, &settings.actor).await?;
                tx.commit().await?;
            }
            let ring = Arc::new(store::load_ring(&**pool.get().await?, &master).await?);
            let started = std::time::Instant::now();
            let report = seed::seed(
                &pool,
                ring,
                &seed::SeedOptions {
                    rows,
                    seed: s,
                    corrupt_fraction,
                    ..Default::default()
                },
            )
            .await?;
            let secs = started.elapsed().as_secs_f64();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"report": report, "seconds": secs})
                    )?
                );
            } else {
                println!(
                    "seeded {} records ({} values, {} planted corrupt) in {secs:.1} s ({:.0} records/s)",
                    report.rows,
                    report.values,
                    report.corrupt_values,
                    report.rows as f64 / secs
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Traffic {
            rate,
            duration,
            write_share,
            metrics_addr,
            json,
        } => {
            anyhow::ensure!(
                (0.0..=1.0).contains(&write_share),
                "--write-share must be between 0 and 1, not {write_share}"
            );
            let duration = parse_secs(&duration)?;
            let histogram = Arc::new(rekey_loadtest::traffic::AppHistogram::new());
            let _server = match metrics_addr {
                Some(addr) => {
                    let h = histogram.clone();
                    let (bound, task) =
                        rekey_common::metrics::serve_text(addr, Arc::new(move || h.render()))
                            .await?;
                    eprintln!("application metrics at http://{bound}/metrics");
                    Some(AbortOnDrop(task))
                }
                None => None,
            };
            let report = rekey_loadtest::traffic::run(
                &pool,
                Arc::new(master),
                &rekey_loadtest::traffic::TrafficOptions {
                    rate,
                    duration,
                    write_share,
                    histogram: metrics_addr.map(|_| histogram.clone()),
                    ..Default::default()
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for (name, p) in [
                    ("reads", report.reads),
                    ("writes", report.writes),
                    ("all", report.all),
                ] {
                    println!(
                        "{name:<6} {:>7} ops  p50 {:>7.2} ms  p95 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
                        p.count, p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms
                    );
                }
                println!(
                    "{:.0} ops/s over {:.1} s; {} errors; {} values failed to decrypt",
                    report.achieved_rate, report.seconds, report.errors, report.decrypt_errors
                );
                rekey_loadtest::traffic::print_windows(&report.windows);
            }
            Ok(if report.errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bench {
            rows,
            workers,
            worker_concurrency,
            prefetch,
            batch_size,
            batch_bytes,
            stages,
            traffic_rate,
            write_share,
            slo,
            slo_window,
            baseline,
            throttle_pct,
            throttle_min_ms,
            no_slow_start,
            only_full,
            no_app_p99,
            bin_dir,
            no_verify,
            out,
            chart,
            font,
            json,
        } => {
            anyhow::ensure!(
                rows > 0 && workers > 0 && batch_size > 0,
                "--rows, --workers and --batch-size must be positive"
            );
            let bin_dir = bin_dir.unwrap_or_else(procs::own_dir);
            let opts = bench::BenchOptions {
                rows,
                workers,
                worker_concurrency,
                prefetch,
                batch_size,
                batch_bytes,
                stages,
                traffic_rate,
                write_share,
                slo,
                slo_window: parse_secs(&slo_window)?,
                baseline: parse_secs(&baseline)?,
                throttle_pct,
                throttle_min_ms,
                slow_start: !no_slow_start,
                only_full,
                tell_app_p99: !no_app_p99,
                bin_dir,
                config: cli.config.clone(),
                verify: !no_verify,
                seed: 1,
            };
            let report = bench::run(&settings, Arc::new(master), &opts, &|m| {
                eprintln!("bench: {m}")
            })
            .await?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("bench-{rows}.json")));
            std::fs::write(&out, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("write {}", out.display()))?;
            let chart = chart.unwrap_or_else(|| PathBuf::from(format!("bench-{rows}.png")));
            bench::chart(&report, &chart, &font)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                bench::print(&report);
                println!("  wrote {} and {}", out.display(), chart.display());
            }
            Ok(match &report.verify {
                Some(v) if !v.passed() => ExitCode::FAILURE,
                _ => ExitCode::SUCCESS,
            })
        }
        Command::Chaos {
            rows,
            duration,
            fault_every,
            faults,
            broker_restart_gap,
            finish_within,
            workers,
            worker_concurrency,
            batch_bytes,
            stages,
            shared_broker,
            bin_dir,
            log_dir,
            seed,
            json,
        } => {
            anyhow::ensure!(
                rows > 0 && workers > 0 && batch_bytes > 0,
                "--rows, --workers and --batch-bytes must be positive"
            );
            let opts = chaos::ChaosOptions {
                rows,
                duration: parse_secs(&duration)?,
                finish_within: parse_secs(&finish_within)?,
                fault_every: parse_secs(&fault_every)?,
                faults,
                broker_restart_gap: parse_secs(&broker_restart_gap)?,
                workers,
                worker_concurrency,
                batch_bytes,
                stages,
                shared_broker,
                bin_dir: bin_dir.unwrap_or_else(procs::own_dir),
                config: cli.config.clone(),
                log_dir,
                seed,
            };
            let report = chaos::run(&settings, Arc::new(master), &opts, &|m| {
                eprintln!("chaos: {m}")
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                chaos::print(&report);
            }
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Chart { .. } => unreachable!("handled above"),
        Command::Verify { expect_key, json } => {
            let ring = store::load_ring(&**pool.get().await?, &master).await?;
            let report = verify::verify(&pool, &ring, expect_key, 10_000).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "ok {}  corrupt-as-planted {}  mismatched {}  undecryptable {}  missing {}  unrecorded {}  not-on-expected-key {}",
                    report.ok,
                    report.corrupt_as_planted,
                    report.mismatched,
                    report.undecryptable,
                    report.missing,
                    report.unrecorded,
                    report.not_on_expected_key
                );
                for (k, n) in &report.by_key {
                    println!("  key {k}: {n} values");
                }
                for e in &report.examples {
                    println!("  {e}");
                }
            }
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Parses `250ms`, `30s`, `5m`, `1h` or a number of seconds.
fn parse_secs(s: &str) -> anyhow::Result<std::time::Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        let n: f64 = ms
            .parse()
            .with_context(|| format!("{s:?} is not a duration like 500ms, 30s, 5m"))?;
        return Ok(std::time::Duration::from_secs_f64(n / 1000.0));
    }
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1.0),
        Some('m') => (&s[..s.len() - 1], 60.0),
        Some('h') => (&s[..s.len() - 1], 3600.0),
        _ => (s, 1.0),
    };
    let n: f64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a duration like 30s, 5m"))?;
    Ok(std::time::Duration::from_secs_f64(n * mult))
}

/// Aborts a server task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
