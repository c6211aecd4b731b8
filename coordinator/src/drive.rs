//! Drives a run to its end: publishes pending batches (ledger first, then a confirmed
//! publish) within an in-flight window, republishes batches whose message was lost or
//! whose lease ran out, consumes worker reports to wake up early, and shows progress. The
//! ledger is the only source of progress; broker state is never trusted. When the broker
//! drops, the driver reconnects by itself.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use opentelemetry::KeyValue;
use rekey_common::Settings;
use rekey_common::audit::{self, AuditEntry};
use rekey_common::broker::{self, Topology};
use rekey_common::keys::master::MasterKey;
use rekey_common::keys::store;
use rekey_common::ledger::{self, Progress, Run, RunKind, RunState, StageState};
use rekey_common::metrics::Metrics;
use rekey_common::notify::{Event, Notifier};
use tracing::Instrument;

use crate::{gate, plan, probe, report};
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
    /// Steps (ledger reads, publishing) come at most this often however fast reports come.
    pub min_step: Duration,
    /// Show an indicatif bar (terminal) or plain lines (elsewhere), or nothing.
    pub progress: ProgressMode,
    /// How often the throttle decides, on the probe's samples since its last decision.
    pub probe_every: Duration,
    /// How often the background probe queries while a stage rotates.
    pub probe_spacing: Duration,
    /// Where the run's gauges go (served by `--metrics-addr`).
    pub metrics: Option<Arc<Metrics>>,
    /// Where run events go (the webhook, if configured).
    pub notifier: Notifier,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Auto,
    Quiet,
}

/// The driver's defaults, one place for the flags (`DriveArgs`) and `DriveOptions`.
pub const DEFAULT_MAX_IN_FLIGHT: i64 = 64;
pub const DEFAULT_LEASE: Duration = Duration::from_secs(120);

impl Default for DriveOptions {
    fn default() -> Self {
        Self {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            lease: DEFAULT_LEASE,
            max_attempts: 20,
            tick: Duration::from_millis(500),
            min_step: Duration::from_millis(100),
            progress: ProgressMode::Auto,
            probe_every: Duration::from_secs(2),
            probe_spacing: Duration::from_millis(50),
            metrics: None,
            notifier: Notifier::default(),
        }
    }
}

/// Acknowledges one report from the reports queue.
async fn take_report(
    next: Option<Result<lapin::message::Delivery, lapin::Error>>,
) -> anyhow::Result<()> {
    match next {
        Some(Ok(d)) => {
            if let Ok(r) = BatchReport::decode(&d.data) {
                tracing::debug!(run_id = r.run_id, batch_no = r.batch_no, outcome = ?r.outcome, "report");
            }
            d.ack(BasicAckOptions::default()).await?;
            Ok(())
        }
        Some(Err(e)) => Err(anyhow::Error::new(e).context("consume reports")),
        None => anyhow::bail!("report consumer closed"),
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
    window: i64,
) -> anyhow::Result<usize> {
    let client = pool.get().await?;
    // Leases that ran out: publish again, or give up after max_attempts.
    ledger::expire_leases(&**client, run_id, opts.max_attempts).await?;
    let in_flight = ledger::in_flight(&**client, run_id).await?;
    let room = (window - in_flight).max(0);
    if room == 0 {
        return Ok(0);
    }
    let rows = ledger::publish_next(&**client, run_id, room, opts.lease.as_millis() as f64).await?;
    let n = rows.len();
    for p in rows {
        let msg = BatchMessage {
            format: FORMAT_VERSION,
            run_id,
            batch_no: p.batch_no,
            stage_no: p.stage_no,
            table: p.table,
            id_lo: p.id_lo,
            id_hi: p.id_hi,
            attempt: p.attempt,
        };
        rekey_common::failpoint!("coordinator.before_publish");
        // A span per publication; its trace context travels in the message's headers, so
        // that the worker's batch span joins the run's trace.
        let span = tracing::info_span!(
            "publish",
            run_id,
            stage = msg.stage_no,
            batch_no = msg.batch_no
        );
        let headers = rekey_common::telemetry::inject(&span);
        broker::publish(channel, &topo.batches, &msg.encode(), headers)
            .instrument(span)
            .await
            .with_context(|| format!("publish batch {} of run {run_id}", msg.batch_no))?;
    }
    Ok(n)
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

    fn awaiting(&mut self, run_id: i64, stage: &ledger::Stage) {
        if self.mode == ProgressMode::Auto && self.last_line.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "run {run_id}: stage {} ({}%) observed; waiting for `rekey promote {run_id}`",
                stage.stage_no, stage.percent
            );
            self.last_line = Instant::now();
        }
    }

    fn update(&mut self, run_id: i64, p: &Progress, stage: &ledger::Stage) {
        let rows = p.n_rows as u64;
        let msg = format!(
            "stage {} ({}%) errors {} failed batches {}",
            stage.stage_no, stage.percent, p.n_errors, p.failed
        );
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
/// Returns the run's state at that moment. Stages are planned, gated, observed and (with
/// `auto_advance`) promoted here; the ledger records every step, so a driver that dies is
/// replaced by `rekey resume` without loss.
pub async fn drive(
    pool: &Pool,
    settings: &Settings,
    run_id: i64,
    opts: &DriveOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<RunState> {
    tokio::pin!(shutdown);
    let topo = Topology::new(&settings.queue_prefix);
    let master = settings.load_master_key()?;
    let first = ledger::progress(&**pool.get().await?, run_id).await?;
    let mut display = Display::new(opts.progress, first.planned_rows_estimate as u64);
    let mut stage_state = StageRuntime::default();
    let mut backoff = broker::Backoff::new();
    let mut failures = 0u32;
    let name = format!("rekey-coordinator-run-{run_id}");
    loop {
        let Some(conn) = broker::connect_until(settings, &name, &mut backoff, &mut shutdown).await
        else {
            return current_state(pool, run_id).await;
        };
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
                let stepped = step(
                    pool,
                    settings,
                    &master,
                    &channel,
                    &topo,
                    run_id,
                    opts,
                    &mut stage_state,
                    &mut display,
                )
                .await?;
                failures = 0;
                if let Some(state) = stepped {
                    return anyhow::Ok(state);
                }
                let stepped_at = Instant::now();
                let nap = stage_state
                    .paced_for()
                    .map_or(opts.tick, |d| d.min(opts.tick));
                tokio::select! {
                    _ = &mut shutdown => return Ok(RunState::Running),
                    _ = tokio::time::sleep(nap) => {}
                    next = reports.next() => {
                        take_report(next).await?;
                        // Reports only wake the driver (the ledger is the truth): gather
                        // those arriving within `min_step`, so that one step of ledger
                        // queries answers many batches instead of one each.
                        let gather = tokio::time::sleep(opts.min_step.saturating_sub(stepped_at.elapsed()));
                        tokio::pin!(gather);
                        loop {
                            tokio::select! {
                                _ = &mut gather => break,
                                _ = &mut shutdown => return Ok(RunState::Running),
                                next = reports.next() => take_report(next).await?,
                            }
                        }
                    }
                }
            }
        };
        match session.await {
            Ok(state) => {
                broker::close(&conn, "bye").await;
                display.finish();
                return Ok(state);
            }
            Err(e) => {
                // A broker or database hiccup: the ledger still holds everything, so
                // reconnect and carry on, backing off; an error that persists for about
                // ten minutes is not a hiccup and is returned.
                failures += 1;
                if failures > MAX_SESSION_FAILURES {
                    return Err(e.context(format!(
                        "driving run {run_id} failed {failures} times in a row"
                    )));
                }
                let delay =
                    Duration::from_millis(200u64 << failures.min(6)).min(Duration::from_secs(10));
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "run session interrupted; reconnecting");
                tokio::select! {
                    _ = &mut shutdown => return current_state(pool, run_id).await,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// What the driver keeps in memory about the current stage (lost on restart, which only
/// restarts the latency samples and the throttle).
#[derive(Debug, Default)]
struct StageRuntime {
    stage_no: Option<i32>,
    perf: gate::PerfTracker,
    /// Set when the stage starts rotating.
    throttle: Option<gate::Throttle>,
    prober: Option<probe::Prober>,
    last_publish: Option<Instant>,
    last_probe: Option<Instant>,
    last_observation: Option<Instant>,
    ring: Option<rekey_common::keys::ring::KeyRing>,
}

impl StageRuntime {
    /// While pacing: how long until the next batch may be published, if it must wait.
    fn paced_for(&self) -> Option<Duration> {
        let gap = self.throttle.as_ref()?.gap;
        if gap.is_zero() {
            return None;
        }
        // Once the gap has passed, the next batch waits only for room in the window,
        // which a report announces: no early wake-up then.
        let left = gap.saturating_sub(self.last_publish?.elapsed());
        (!left.is_zero()).then_some(left)
    }
}

/// One step of the run's state machine. Returns the run's state when driving should stop.
#[allow(clippy::too_many_arguments)]
async fn step(
    pool: &Pool,
    settings: &Settings,
    master: &MasterKey,
    channel: &lapin::Channel,
    topo: &Topology,
    run_id: i64,
    opts: &DriveOptions,
    rt: &mut StageRuntime,
    display: &mut Display,
) -> anyhow::Result<Option<RunState>> {
    let client = pool.get().await?;
    let run = ledger::get_run(&**client, run_id)
        .await?
        .with_context(|| format!("run {run_id} not found"))?;
    if let Some(m) = &opts.metrics {
        record_run(m, &run);
    }
    if run.state != RunState::Running {
        return Ok(Some(run.state));
    }
    let stage_no = run.current_stage;
    let stage = ledger::stage(&**client, run_id, stage_no)
        .await?
        .with_context(|| format!("run {run_id} has no stage {stage_no}"))?;
    if rt.stage_no != Some(stage_no) {
        *rt = StageRuntime {
            stage_no: Some(stage_no),
            ..Default::default()
        };
    }
    drop(client);
    if stage.state != StageState::Running {
        // Gating or observing (perhaps for a day): the throttle's probe is not needed.
        rt.prober = None;
    }
    match stage.state {
        StageState::Pending => {
            start_stage(pool, settings, &run, stage_no).await?;
        }
        StageState::Running => {
            let throttle = rt.throttle.get_or_insert_with(|| {
                // Slow start answers the probe: without a throttle it would only slow.
                gate::Throttle::new(
                    opts.max_in_flight,
                    run.settings.slow_start && run.settings.throttle_pct > 0.0,
                )
            });
            if rt.prober.is_none() {
                rt.prober = Some(probe::Prober::start(
                    pool.clone(),
                    run.targets.clone(),
                    settings.probe_query.clone(),
                    run.settings.probe_writes,
                    opts.probe_spacing,
                ));
                // The first judgement comes at once (a few probes measured on the spot), so
                // that even a stage shorter than the probe interval has a sample.
            }
            if rt
                .last_probe
                .is_none_or(|t| t.elapsed() >= opts.probe_every)
            {
                rt.last_probe = Some(Instant::now());
                let mut samples = rt.prober.as_ref().map(|p| p.take()).unwrap_or_default();
                if samples.len() < 3 {
                    // The background probe fell behind (a slow probe query): measure now.
                    samples.extend(
                        probe::samples(
                            pool,
                            &run.targets,
                            settings.probe_query.as_deref(),
                            run.settings.probe_writes,
                            5,
                            Duration::ZERO,
                        )
                        .await?,
                    );
                }
                // The breach and the metrics judge the reads (the baseline's median is the
                // reads'); the throttle judges every probe against its own kind's p99.
                let lat = {
                    let mut reads: Vec<f64> =
                        samples.iter().filter(|s| !s.write).map(|s| s.ms).collect();
                    if reads.is_empty() {
                        reads = samples.iter().map(|s| s.ms).collect();
                    }
                    probe::Latency::of(&mut reads)
                };
                rt.perf.record(&run.settings, lat.median_ms);
                let (over, under) = rt.perf.probes(&run.settings, &samples);
                if let Some(m) = &opts.metrics {
                    record_probe(
                        m,
                        pool,
                        channel,
                        topo,
                        &run,
                        &lat,
                        rt.perf.figures.impact_pct,
                    )
                    .await;
                }
                let in_flight = ledger::progress(&**pool.get().await?, run_id)
                    .await?
                    .published;
                let was = throttle.clone();
                throttle.adjust(over, under, in_flight);
                rt.perf.figures.max_gap_ms = rt
                    .perf
                    .figures
                    .max_gap_ms
                    .max(throttle.gap.as_millis() as u64);
                if let Some(m) = &opts.metrics {
                    m.throttle_gap.record(
                        throttle.gap.as_secs_f64() * 1000.0,
                        &[KeyValue::new("run_id", run_id)],
                    );
                }
                // A warning when latency first slows the stage and a note when the
                // throttle lets go; the steps in between are debug (the report counts them).
                if over > 0 && rt.perf.figures.throttled_samples == 1 {
                    tracing::warn!(
                        run_id,
                        stage_no,
                        probes_over = over,
                        probes = over + under,
                        p99_ms = lat.p99_ms,
                        read_threshold_ms = run.settings.throttle_threshold_ms(false),
                        write_threshold_ms = run.settings.throttle_threshold_ms(true),
                        window = throttle.window,
                        gap_ms = throttle.gap.as_millis() as u64,
                        "application latency up: throttling"
                    );
                } else if was.engaged() && !throttle.engaged() {
                    tracing::info!(run_id, stage_no, p99_ms = lat.p99_ms, "throttle released");
                } else if throttle.window != was.window || throttle.gap != was.gap {
                    tracing::debug!(
                        run_id,
                        stage_no,
                        probes_over = over,
                        p99_ms = lat.p99_ms,
                        window = throttle.window,
                        gap_ms = throttle.gap.as_millis() as u64,
                        "throttle"
                    );
                }
                if rt.perf.figures.breached {
                    let reason = format!(
                        "performance impact: probe latency over {:.0}% above the baseline for {} samples in a row",
                        run.settings.breach_pct,
                        gate::SUSTAINED_SAMPLES
                    );
                    let decision = gate::evaluate(
                        &**pool.get().await?,
                        &run,
                        stage_no,
                        0,
                        0,
                        &rt.perf.figures,
                    )
                    .await?;
                    return breach(
                        pool,
                        settings,
                        &opts.notifier,
                        &run,
                        stage_no,
                        &decision,
                        &reason,
                    )
                    .await
                    .map(Some);
                }
            }
            let throttle = rt.throttle.clone().expect("set above");
            let window = throttle.window;
            // Pacing: at most one batch per gap.
            let paced = !throttle.gap.is_zero()
                && rt.last_publish.is_some_and(|t| t.elapsed() < throttle.gap);
            if !paced && publish_window(pool, channel, topo, run_id, opts, window).await? > 0 {
                rt.last_publish = Some(Instant::now());
            }
            let p = ledger::progress_of(&**pool.get().await?, run_id, Some(stage_no)).await?;
            let total = ledger::progress(&**pool.get().await?, run_id).await?;
            if let Some(m) = &opts.metrics {
                let run_label = [KeyValue::new("run_id", run_id)];
                m.throttle_window.record(window as u64, &run_label);
                m.batches_in_flight
                    .record(total.published.max(0) as u64, &run_label);
            }
            display.update(run_id, &total, &stage);
            if p.is_finished() {
                ledger::begin_gating(&**pool.get().await?, run_id, stage_no).await?;
            }
        }
        StageState::Gating => {
            return gate_stage(pool, settings, &opts.notifier, &run, &stage, rt).await;
        }
        StageState::Observing => {
            let every = Duration::from_secs_f64(
                (run_observe_secs(&run, stage_no) as f64 / 5.0).clamp(0.2, 60.0),
            );
            // A rollback's target key already held values before it ran (corrupt ones
            // among them), so a failure there could not be told from an old one; its
            // workers verified every value they wrote before commit, which stands instead.
            let observe = run.kind != RunKind::Rollback;
            if observe && rt.last_observation.is_none_or(|t| t.elapsed() >= every) {
                rt.last_observation = Some(Instant::now());
                if rt.ring.is_none() {
                    rt.ring = Some(store::load_ring(&**pool.get().await?, master).await?);
                }
                let ring = rt.ring.as_ref().expect("loaded");
                let client = pool.get().await?;
                let (read, failures) =
                    gate::observe_sample(&**client, &run, ring, stage_no).await?;
                ledger::add_observation(
                    &**client,
                    run_id,
                    stage_no,
                    read as i64,
                    failures.len() as i64,
                )
                .await?;
                if !failures.is_empty() {
                    let reason = format!(
                        "observation: {} rotated value(s) failed to decrypt, e.g. {}",
                        failures.len(),
                        failures[0]
                    );
                    let decision = ledger::stage(&**client, run_id, stage_no)
                        .await?
                        .and_then(|s| s.gate);
                    drop(client);
                    return mark_breach(
                        pool,
                        settings,
                        &opts.notifier,
                        &run,
                        stage_no,
                        decision,
                        &reason,
                    )
                    .await
                    .map(Some);
                }
            }
            let ended = stage.observe_until.is_none_or(|u| u <= chrono::Utc::now());
            if ended
                && run.settings.auto_advance
                && gate::advance(pool, &run, stage_no, &settings.actor, "advance").await?
            {
                let path =
                    report::write(pool, settings, run_id, &format!("stage {stage_no} passed"))
                        .await?;
                notify(
                    &opts.notifier,
                    pool,
                    run_id,
                    "stage_passed",
                    Some(stage_no),
                    None,
                    Some(&path),
                )
                .await;
                if stage_no as usize + 1 >= run.stages.len() {
                    return Ok(Some(RunState::Completed));
                }
            } else if ended {
                display.awaiting(run_id, &stage);
            }
        }
        StageState::Breached => return Ok(Some(RunState::Halted)),
        StageState::Passed => {}
    }
    Ok(None)
}

/// The run's gauges: state, stage, duration, rows rotated and error rate (from the ledger).
fn record_run(m: &Metrics, run: &Run) {
    let label = [KeyValue::new("run_id", run.id)];
    m.set_run_state(run.id, run.state);
    m.run_stage.record(run.current_stage.max(0) as u64, &label);
    let end = run.finished_at.unwrap_or_else(chrono::Utc::now);
    m.rotation_duration.record(
        (end - run.created_at).num_milliseconds() as f64 / 1000.0,
        &label,
    );
}

/// Gauges refreshed with each probe sample: latency, impact, queue depths, the audit gap
/// and the run's totals. A failure here only costs a sample of metrics.
async fn record_probe(
    m: &Metrics,
    pool: &Pool,
    channel: &lapin::Channel,
    topo: &Topology,
    run: &Run,
    lat: &probe::Latency,
    impact_pct: f64,
) {
    let label = [KeyValue::new("run_id", run.id)];
    m.probe_latency
        .record(lat.median_ms, &[KeyValue::new("quantile", "0.5")]);
    m.probe_latency
        .record(lat.p95_ms, &[KeyValue::new("quantile", "0.95")]);
    m.probe_latency
        .record(lat.p99_ms, &[KeyValue::new("quantile", "0.99")]);
    m.probe_impact.record(impact_pct, &label);
    for q in [&topo.batches, &topo.dead_letters, &topo.reports] {
        if let Ok(n) = broker::queue_depth(channel, q).await {
            m.queue_depth
                .record(u64::from(n), &[KeyValue::new("queue", q.clone())]);
        }
    }
    let figures = async {
        let c = pool.get().await?;
        let gap: Option<f64> = c
            .query_one(
                "SELECT extract(epoch FROM clock_timestamp() - max(at))::float8 FROM rekey.audit_log WHERE run_id = $1",
                &[&run.id],
            )
            .await?
            .get(0);
        let p = ledger::progress(&**c, run.id).await?;
        anyhow::Ok((gap, p))
    }
    .await;
    if let Ok((gap, p)) = figures {
        if let Some(gap) = gap {
            m.audit_gap.record(gap, &label);
        }
        m.run_rows_rotated.record(p.n_rotated.max(0) as u64, &label);
        m.run_error_rate.record(p.error_rate(), &label);
    }
}

/// The final figures of a run that ended: state, duration, rows rotated, error rate.
pub async fn record_final(m: &Metrics, pool: &Pool, run_id: i64) -> anyhow::Result<()> {
    let c = pool.get().await?;
    let run = ledger::get_run(&**c, run_id)
        .await?
        .with_context(|| format!("run {run_id} not found"))?;
    record_run(m, &run);
    let p = ledger::progress(&**c, run_id).await?;
    let label = [KeyValue::new("run_id", run_id)];
    m.run_rows_rotated.record(p.n_rotated.max(0) as u64, &label);
    m.run_error_rate.record(p.error_rate(), &label);
    m.batches_in_flight
        .record(p.published.max(0) as u64, &label);
    Ok(())
}

fn run_observe_secs(run: &Run, stage_no: i32) -> u64 {
    if stage_no == 0 {
        run.settings.observe_first_secs
    } else {
        run.settings.observe_secs
    }
}

/// Plans a stage's batches and marks it running.
async fn start_stage(
    pool: &Pool,
    settings: &Settings,
    run: &Run,
    stage_no: i32,
) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    start_stage_in(&tx, run, stage_no, &settings.actor).await?;
    tx.commit().await?;
    Ok(())
}

/// Plans a stage's batches into the ledger and marks the stage running, in `tx`. A stage
/// is planned when it starts, so that rows inserted since the run began are in it.
pub async fn start_stage_in(
    tx: &tokio_postgres::Transaction<'_>,
    run: &Run,
    stage_no: i32,
    actor: &str,
) -> anyhow::Result<usize> {
    let (lo, hi) =
        rekey_common::stages::bucket_range(&run.stages, stage_no).context("stage out of range")?;
    let fraction = f64::from(hi - lo) / f64::from(rekey_common::stages::BUCKETS);
    // A batch holds about `batch_bytes` of values (at most `batch_size` rows) of this
    // stage's slice; its id range spans that many rows divided by the slice's fraction.
    let mut range_rows = std::collections::HashMap::new();
    for t in &run.targets {
        let rows = rekey_common::sizing::rows_for(
            tx,
            t,
            i64::from(run.batch_size),
            run.settings.batch_bytes,
        )
        .await
        .with_context(|| format!("size the batches of {}", t.table))?;
        range_rows.insert(
            t.table.clone(),
            ((rows as f64 / fraction).ceil() as i64).max(1),
        );
    }
    let n = ledger::start_stage(tx, run.id, stage_no).await?;
    if n == 0 {
        return Ok(0);
    }
    let plans = plan::plan_stage(tx, &run.targets, stage_no, &range_rows).await?;
    ledger::insert_batches(tx, run.id, &plans).await?;
    audit::record(
        tx,
        &[AuditEntry::run_event(run.id, run.target_key_id, "stage_start", true, actor, serde_json::json!({"stage_no": stage_no, "percent": run.stages[stage_no as usize], "batches": plans.len()}))],
    )
    .await?;
    tracing::info!(
        run_id = run.id,
        stage_no,
        percent = run.stages[stage_no as usize],
        n_batches = plans.len(),
        "stage started"
    );
    Ok(plans.len())
}

/// Sweeps stragglers (re-batching them) or decides the stage's gates.
#[tracing::instrument(name = "gate", skip_all, fields(run_id = run.id, stage = stage.stage_no))]
async fn gate_stage(
    pool: &Pool,
    settings: &Settings,
    notifier: &Notifier,
    run: &Run,
    stage: &ledger::Stage,
    rt: &mut StageRuntime,
) -> anyhow::Result<Option<RunState>> {
    let stage_no = stage.stage_no;
    let sweeps = stage
        .gate
        .as_ref()
        .and_then(|g| g.get("sweeps"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as u32;
    let client = pool.get().await?;
    let mut plans = Vec::new();
    let mut left = 0i64;
    // A dry run writes nothing, so every record is "left": coverage has no meaning there.
    let sweep_targets: &[rekey_common::target::Target] = if run.kind == RunKind::DryRun {
        &[]
    } else {
        &run.targets
    };
    // The tables are scanned at once, each on a connection of its own.
    let found = futures::future::try_join_all(sweep_targets.iter().map(|t| async move {
        let c = pool.get().await?;
        gate::stragglers(&**c, run, t, stage_no).await
    }))
    .await?;
    for (t, ids) in sweep_targets.iter().zip(found) {
        left += ids.len() as i64;
        plans.extend(gate::sweep_batches(
            &t.table,
            stage_no,
            &ids,
            run.batch_size as usize,
        ));
    }
    if left > 0 && sweeps < MAX_SWEEPS {
        tracing::info!(
            run_id = run.id,
            stage_no,
            stragglers = left,
            sweep = sweeps + 1,
            "coverage sweep: re-batching stragglers"
        );
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        ledger::insert_batches(&*tx, run.id, &plans).await?;
        ledger::sweep_again(&*tx, run.id, stage_no, i64::from(sweeps + 1)).await?;
        tx.commit().await?;
        return Ok(None);
    }
    let decision = gate::evaluate(&**client, run, stage_no, left, sweeps, &rt.perf.figures).await?;
    drop(client);
    rekey_common::failpoint!("coordinator.mid_gate");
    if let Some(reason) = decision.reason() {
        return breach(pool, settings, notifier, run, stage_no, &decision, &reason)
            .await
            .map(Some);
    }
    let observe = run_observe_secs(run, stage_no);
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    ledger::begin_observing(
        &*tx,
        run.id,
        stage_no,
        &serde_json::to_value(&decision)?,
        observe as f64,
    )
    .await?;
    // The gate's decision, then the seal of the stage's batch audit chains.
    let seal =
        audit::stage_seal(&*tx, run.id, run.target_key_id, stage_no, &settings.actor).await?;
    audit::record(
        &*tx,
        &[
            AuditEntry::run_event(
                run.id,
                run.target_key_id,
                "gate",
                true,
                &settings.actor,
                serde_json::json!({"stage_no": stage_no, "passed": true, "observe_secs": observe}),
            ),
            seal,
        ],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(
        run_id = run.id,
        stage_no,
        observe_secs = observe,
        "stage gates passed; observing"
    );
    report::write(
        pool,
        settings,
        run.id,
        &format!("stage {stage_no} gates passed"),
    )
    .await?;
    Ok(None)
}

/// Consecutive failed sessions (each backing off up to 10 s) before the driver gives up.
const MAX_SESSION_FAILURES: u32 = 60;

/// Sweeps of stragglers per stage before the coverage gate gives up.
pub const MAX_SWEEPS: u32 = 5;

async fn breach(
    pool: &Pool,
    settings: &Settings,
    notifier: &Notifier,
    run: &Run,
    stage_no: i32,
    decision: &gate::GateDecision,
    reason: &str,
) -> anyhow::Result<RunState> {
    mark_breach(
        pool,
        settings,
        notifier,
        run,
        stage_no,
        Some(serde_json::to_value(decision)?),
        reason,
    )
    .await
}

/// Records a breach: the stage breached with its figures, the run halted with the reason.
async fn mark_breach(
    pool: &Pool,
    settings: &Settings,
    notifier: &Notifier,
    run: &Run,
    stage_no: i32,
    gate_json: Option<serde_json::Value>,
    reason: &str,
) -> anyhow::Result<RunState> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    ledger::breach_stage(&*tx, run.id, stage_no, gate_json.as_ref()).await?;
    ledger::set_run_state(
        &*tx,
        run.id,
        RunState::Halted,
        Some(&format!("stage {stage_no} breached: {reason}")),
    )
    .await?;
    audit::record(
        &*tx,
        &[AuditEntry::run_event(
            run.id,
            run.target_key_id,
            "gate",
            false,
            &settings.actor,
            serde_json::json!({"stage_no": stage_no, "passed": false, "reason": reason}),
        )],
    )
    .await?;
    tx.commit().await?;
    tracing::error!(
        run_id = run.id,
        stage_no,
        reason,
        "stage breached: run halted"
    );
    let path = report::write(
        pool,
        settings,
        run.id,
        &format!("stage {stage_no} breached"),
    )
    .await?;
    notify(
        notifier,
        pool,
        run.id,
        "gate_breached",
        Some(stage_no),
        Some(reason.to_owned()),
        Some(&path),
    )
    .await;
    Ok(RunState::Halted)
}

/// Sends a run event with the run's figures; a failure to build it costs only a warning.
pub async fn notify(
    notifier: &Notifier,
    pool: &Pool,
    run_id: i64,
    event: &'static str,
    stage_no: Option<i32>,
    reason: Option<String>,
    report: Option<&std::path::Path>,
) {
    if !notifier.is_enabled() {
        return;
    }
    let built = async {
        let c = pool.get().await?;
        let run = ledger::get_run(&**c, run_id)
            .await?
            .with_context(|| format!("run {run_id} not found"))?;
        let p = ledger::progress(&**c, run_id).await?;
        anyhow::Ok(Event {
            event,
            run_id,
            kind: run.kind.as_str().to_owned(),
            state: run.state.as_str().to_owned(),
            stage_no: stage_no.or(Some(run.current_stage)),
            reason: reason.or(run.halt_reason),
            figures: serde_json::json!({
                "batches": p.n_batches,
                "batches_done": p.done,
                "batches_failed": p.failed,
                "rows": p.n_rows,
                "rotated": p.n_rotated,
                "decrypt_errors": p.n_errors,
                "decrypt_error_rate": p.error_rate(),
                "stages": run.stages,
                "duration_secs": (run.finished_at.unwrap_or_else(chrono::Utc::now) - run.created_at).num_milliseconds() as f64 / 1000.0,
            }),
            report: report.map(|p| p.display().to_string()),
            at: chrono::Utc::now(),
        })
    }
    .await;
    match built {
        Ok(e) => notifier.send(e),
        Err(e) => tracing::warn!(run_id, event, error = %format!("{e:#}"), "run event not sent"),
    }
}

async fn current_state(pool: &Pool, run_id: i64) -> anyhow::Result<RunState> {
    Ok(ledger::get_run(&**pool.get().await?, run_id)
        .await?
        .map(|r| r.state)
        .unwrap_or(RunState::Failed))
}
