//! Drives a run to its end: publishes pending batches (ledger first, then a confirmed
//! publish) within an in-flight window, republishes batches whose message was lost or
//! whose lease ran out, consumes worker reports to wake up early, and shows progress. The
//! ledger is the only source of progress; broker state is never trusted. When the broker
//! drops, the driver reconnects by itself.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use rekey_common::Settings;
use rekey_common::broker::{self, Topology};
use rekey_common::ledger::{self, Progress, RunState};
use rekey_common::messages::{BatchMessage, BatchReport, FORMAT_VERSION};

/// How the driver paces a run.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// Batches published and not yet done, at most.
    pub max_in_flight: i64,
    /// A published batch not done within this time is published again.
    pub lease: Duration,
    /// Publications of one batch before it is marked failed.
    pub max_attempts: i32,
    /// How often the ledger is re-read when no report arrives.
    pub tick: Duration,
    /// Show an indicatif bar (terminal) or plain lines (elsewhere), or nothing.
    pub progress: ProgressMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Auto,
    Quiet,
}

impl Default for DriveOptions {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            lease: Duration::from_secs(120),
            max_attempts: 20,
            tick: Duration::from_millis(500),
            progress: ProgressMode::Auto,
        }
    }
}

/// Publishes what the window allows: marks each batch published in the ledger, then
/// publishes its message with a confirm. A crash between the two leaves a published batch
/// without a message, which its lease brings back.
async fn publish_window(
    pool: &Pool,
    channel: &lapin::Channel,
    topo: &Topology,
    run_id: i64,
    opts: &DriveOptions,
) -> anyhow::Result<usize> {
    let client = pool.get().await?;
    // Leases that ran out: publish again, or give up after max_attempts.
    client
        .execute(
            "UPDATE rekey.batches SET state = 'failed', error = 'no worker completed it after ' || attempts || ' publications'
              WHERE run_id = $1 AND state = 'published' AND lease_until < now() AND attempts >= $2",
            &[&run_id, &opts.max_attempts],
        )
        .await?;
    client
        .execute(
            "UPDATE rekey.batches SET state = 'pending' WHERE run_id = $1 AND state = 'published' AND lease_until < now()",
            &[&run_id],
        )
        .await?;
    let in_flight: i64 = client
        .query_one(
            "SELECT count(*) FROM rekey.batches WHERE run_id = $1 AND state = 'published'",
            &[&run_id],
        )
        .await?
        .get(0);
    let room = (opts.max_in_flight - in_flight).max(0);
    if room == 0 {
        return Ok(0);
    }
    let lease_ms = opts.lease.as_millis() as i64;
    let rows = client
        .query(
            "UPDATE rekey.batches b SET state = 'published', attempts = attempts + 1, published_at = now(),
                    lease_until = now() + make_interval(secs => $3::float8 / 1000)
               FROM (SELECT batch_no FROM rekey.batches WHERE run_id = $1 AND state = 'pending'
                      ORDER BY batch_no LIMIT $2 FOR UPDATE SKIP LOCKED) p
              WHERE b.run_id = $1 AND b.batch_no = p.batch_no
          RETURNING b.batch_no, b.stage_no, b.table_name, b.id_lo, b.id_hi, b.attempts",
            &[&run_id, &room, &(lease_ms as f64)],
        )
        .await?;
    // SKIP LOCKED above only keeps two coordinators from publishing the same batch at once;
    // a worker never takes rows that way.
    for r in &rows {
        let msg = BatchMessage {
            format: FORMAT_VERSION,
            run_id,
            batch_no: r.get(0),
            stage_no: r.get(1),
            table: r.get(2),
            id_lo: r.get(3),
            id_hi: r.get(4),
            attempt: r.get(5),
        };
        broker::publish(channel, &topo.batches, &msg.encode(), None)
            .await
            .with_context(|| format!("publish batch {} of run {run_id}", msg.batch_no))?;
    }
    Ok(rows.len())
}

struct Display {
    bar: Option<ProgressBar>,
    last_line: Instant,
    started: Instant,
    mode: ProgressMode,
}

impl Display {
    fn new(mode: ProgressMode, total: u64) -> Self {
        let bar = (mode == ProgressMode::Auto && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} rows {per_sec} ETA {eta} {msg}")
                    .expect("valid template"),
            );
            b
        });
        Self {
            bar,
            last_line: Instant::now(),
            started: Instant::now(),
            mode,
        }
    }

    fn update(&mut self, run_id: i64, p: &Progress) {
        let rows = p.n_rows as u64;
        let msg = format!("errors {} failed batches {}", p.n_errors, p.failed);
        if let Some(b) = &self.bar {
            b.set_length(p.planned_rows_estimate.max(p.n_rows) as u64);
            b.set_position(rows);
            b.set_message(msg);
        } else if self.mode == ProgressMode::Auto
            && (self.last_line.elapsed() > Duration::from_secs(5) || p.is_finished())
        {
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            eprintln!(
                "run {run_id}: batches {}/{} done, {} rows ({:.0} rows/s), rotated {}, {msg}",
                p.done + p.failed,
                p.n_batches,
                p.n_rows,
                p.n_rows as f64 / secs,
                p.n_rotated
            );
            self.last_line = Instant::now();
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// Drives run `run_id` until it completes, is paused or halted, or `shutdown` resolves.
/// Returns the run's state at that moment.
pub async fn drive(
    pool: &Pool,
    settings: &Settings,
    run_id: i64,
    opts: &DriveOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<RunState> {
    tokio::pin!(shutdown);
    let topo = Topology::new(&settings.queue_prefix);
    let first = ledger::progress(&**pool.get().await?, run_id).await?;
    let mut display = Display::new(opts.progress, first.planned_rows_estimate as u64);
    let mut backoff = Duration::from_millis(200);
    loop {
        let conn = match broker::connect(
            &settings.amqp_url,
            &format!("rekey-coordinator-run-{run_id}"),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "broker unreachable; retrying");
                tokio::select! {
                    _ = &mut shutdown => return current_state(pool, run_id).await,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        let session = async {
            let channel = broker::confirmed_channel(&conn).await?;
            broker::declare(&channel, &topo).await?;
            let report_ch = conn.create_channel().await?;
            let mut reports = report_ch
                .basic_consume(
                    topo.reports.as_str().into(),
                    format!("coordinator-{run_id}-{}", std::process::id())
                        .as_str()
                        .into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            loop {
                let run = ledger::get_run(&**pool.get().await?, run_id)
                    .await?
                    .with_context(|| format!("run {run_id} not found"))?;
                if run.state != RunState::Running {
                    return anyhow::Ok(run.state);
                }
                publish_window(pool, &channel, &topo, run_id, opts).await?;
                let p = ledger::progress(&**pool.get().await?, run_id).await?;
                display.update(run_id, &p);
                if p.is_finished() {
                    let (state, reason) = if p.failed > 0 {
                        (
                            RunState::Halted,
                            Some(format!(
                                "{} batch(es) failed; see `rekey status {run_id}`",
                                p.failed
                            )),
                        )
                    } else {
                        (RunState::Completed, None)
                    };
                    ledger::set_run_state(&**pool.get().await?, run_id, state, reason.as_deref())
                        .await?;
                    return Ok(state);
                }
                tokio::select! {
                    _ = &mut shutdown => return Ok(RunState::Running),
                    _ = tokio::time::sleep(opts.tick) => {}
                    next = reports.next() => match next {
                        Some(Ok(d)) => {
                            if let Ok(r) = BatchReport::decode(&d.data) {
                                tracing::debug!(run_id = r.run_id, batch_no = r.batch_no, outcome = ?r.outcome, "report");
                            }
                            d.ack(BasicAckOptions::default()).await?;
                        }
                        Some(Err(e)) => return Err(anyhow::Error::new(e).context("consume reports")),
                        None => anyhow::bail!("report consumer closed"),
                    }
                }
            }
        };
        match session.await {
            Ok(state) => {
                let _ = conn.close(200, "bye".into()).await;
                display.finish();
                return Ok(state);
            }
            Err(e) => {
                // A broker or database hiccup: the ledger still holds everything, so
                // reconnect and carry on.
                tracing::warn!(error = %format!("{e:#}"), "run session interrupted; reconnecting");
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

async fn current_state(pool: &Pool, run_id: i64) -> anyhow::Result<RunState> {
    Ok(ledger::get_run(&**pool.get().await?, run_id)
        .await?
        .map(|r| r.state)
        .unwrap_or(RunState::Failed))
}
