//! Drives a run to its end: publishes pending batches (ledger first, then a confirmed
//! publish) within an in-flight window, republishes batches whose message was lost or
//! whose lease ran out, consumes worker reports to wake up early, and shows progress. The
//! ledger is the only source of progress; broker state is never trusted. When the broker
//! drops, the driver reconnects by itself.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use opentelemetry::KeyValue;
use rekey_common::Settings;
use rekey_common::broker::{self, Topology};
use rekey_common::keys::store;
use rekey_common::ledger::{self, RunKind, RunState, StageState};
use tracing::Instrument;

use crate::events::{RunEvent, record_run};
use crate::lease::Lease;
use crate::progress::ProgressView;
use crate::runtime::{ConsumerWatch, DriveOptions, Driver, StageRuntime};
use crate::stage::{gate_stage, mark_breach, run_observe_secs, start_stage};
use crate::{gate, latency, observe, report};
use rekey_common::messages::{BatchMessage, BatchReport, FORMAT_VERSION, MessageKey, TAG_LEN};

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
async fn publish_window(d: &Driver<'_>, window: i64) -> anyhow::Result<usize> {
    let Driver {
        pool,
        channel,
        topo,
        run_id,
        opts,
        message_key,
        ..
    } = *d;
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
    let batch_nos: Vec<i64> = rows.iter().map(|p| p.batch_no).collect();
    for (i, p) in rows.into_iter().enumerate() {
        let msg = BatchMessage {
            format: FORMAT_VERSION,
            run_id,
            batch_no: p.batch_no,
            stage_no: p.stage_no,
            table: p.table,
            id_lo: p.id_lo,
            id_hi: p.id_hi,
            attempt: p.attempt,
            master_key_id: [0; 16],
            tag: [0; TAG_LEN],
        }
        .sealed(message_key);
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
        if let Err(e) = broker::publish(channel, &topo.batches, &msg.encode(), headers)
            .instrument(span)
            .await
        {
            // Not confirmed is not sent: this batch and the ones after it go back to
            // pending now rather than when their lease runs out.
            let unsent = &batch_nos[i..];
            if let Err(le) = ledger::unpublish(&**client, run_id, unsent).await {
                tracing::warn!(error = %le, "could not hand unsent batches back; their lease will");
            }
            return Err(e.context(format!(
                "publish batch {} of run {run_id} ({} batch(es) handed back to pending)",
                msg.batch_no,
                unsent.len()
            )));
        }
    }
    Ok(n)
}

/// Drives run `run_id` until it completes, is paused or halted, or `shutdown` resolves.
/// Returns the run's state at that moment. Stages are planned, gated, observed and (with
/// `auto_advance`) promoted here; the ledger records every step, so a driver that dies is
/// replaced by `rekey resume` without loss.
///
/// The driver holds the run's lease (`lease.rs`) while it drives: a second driver is
/// refused, and one whose lease another process took over stops.
pub async fn drive(
    pool: &Pool,
    settings: &Settings,
    run_id: i64,
    opts: &DriveOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<RunState> {
    let mut lease = Lease::acquire(pool, run_id).await?;
    let consumers = lease.consumers.clone();
    let result = tokio::select! {
        r = drive_leased(pool, settings, run_id, opts, shutdown, &consumers) => r,
        lost = lease.lost() => Err(lost.into()),
    };
    lease.release(pool).await;
    result
}

async fn drive_leased(
    pool: &Pool,
    settings: &Settings,
    run_id: i64,
    opts: &DriveOptions,
    shutdown: impl std::future::Future<Output = ()>,
    consumers: &AtomicI32,
) -> anyhow::Result<RunState> {
    tokio::pin!(shutdown);
    let mut watch = ConsumerWatch::default();
    let topo = Topology::of(settings);
    let master = settings.load_master_key()?;
    let message_key = MessageKey::derive(&master);
    let first = ledger::progress(&**pool.get().await?, run_id).await?;
    let dry_run = ledger::get_run(&**pool.get().await?, run_id)
        .await?
        .is_some_and(|r| r.kind == RunKind::DryRun);
    let mut display = ProgressView::new(opts.progress, first.planned_rows_estimate as u64, dry_run);
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
                let driver = Driver {
                    pool,
                    settings,
                    master: &master,
                    message_key: &message_key,
                    channel: &channel,
                    topo: &topo,
                    run_id,
                    opts,
                    events: &opts.events,
                    consumers,
                };
                let stepped = step(&driver, &mut stage_state, &mut display).await?;
                failures = 0;
                if stepped.is_none() {
                    watch_consumers(&driver, &mut watch, consumers).await?;
                }
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
                broker::prefer_another_node(settings);
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

/// One step of the run's state machine: read the run and its current stage from the ledger
/// and do what the stage's state asks. Returns the run's state when driving should stop.
async fn step(
    d: &Driver<'_>,
    rt: &mut StageRuntime,
    display: &mut ProgressView,
) -> anyhow::Result<Option<RunState>> {
    let Driver {
        pool,
        settings,
        master,
        run_id,
        opts,
        events,
        ..
    } = *d;
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
            start_stage(pool, settings, events, &run, stage_no).await?;
        }
        StageState::Running => {
            if let Some(state) = latency::judge(d, rt, &run, stage_no).await? {
                return Ok(Some(state));
            }
            let throttle = rt.throttle.clone().expect("set above");
            let window = throttle.window;
            // The operator's hold and the flag file stop publication; batches in flight
            // finish. What holds it now is said (event, driver row for `rekey status`).
            let hold = match hold_reason(&run, opts) {
                Some(h) => Some(h),
                None => match crate::brakes::check(d, rt, &run.settings).await {
                    Some(b) => Some(b),
                    None => latency::rebaseline(d, rt, &run, stage_no).await?,
                },
            };
            say_throttle(d, rt, hold.as_deref(), &throttle).await;
            // Pacing: at most one batch per gap.
            let paced = !throttle.gap.is_zero()
                && rt.last_publish.is_some_and(|t| t.elapsed() < throttle.gap);
            if hold.is_none() && !paced && publish_window(d, window).await? > 0 {
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
            if p.failed > 0
                && let Some(reason) =
                    ledger::failure_containing(&**pool.get().await?, run_id, store::BUDGET_SPENT)
                        .await?
            {
                // A spent nonce budget fails every batch that follows: halt now, naming the
                // key, rather than at the stage's gate.
                return mark_breach(pool, settings, events, &run, stage_no, None, &reason)
                    .await
                    .map(Some);
            }
            if p.is_finished() {
                ledger::begin_gating(&**pool.get().await?, run_id, stage_no).await?;
            }
        }
        StageState::Gating => {
            return gate_stage(pool, settings, events, &run, &stage, rt).await;
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
                    observe::observe_sample(&**client, &run, ring, stage_no).await?;
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
                    return mark_breach(pool, settings, events, &run, stage_no, decision, &reason)
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
                let passed = RunEvent::StagePassed {
                    stage_no,
                    report: &path,
                };
                events.emit(pool, run_id, passed).await;
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

/// What holds the run's publication besides the latency throttle: the operator's
/// `rekey throttle RUN on`, or the flag file while it exists.
fn hold_reason(run: &ledger::Run, opts: &DriveOptions) -> Option<String> {
    if let Some(h) = &run.throttle_hold {
        return Some(format!(
            "held by the operator ({h}): `rekey throttle {} off` lifts it",
            run.id
        ));
    }
    let flag = opts.throttle_flag_file.as_ref()?;
    flag.exists().then(|| {
        format!(
            "held: the throttle flag file {} exists; remove it to go on",
            flag.display()
        )
    })
}

/// Says what holds publication when it changes: a `held` / `hold_released` event when a
/// hold (the operator's, the flag file's, a replica's lag) begins or ends, and the driver
/// row's `throttle` (also the latency throttle's figures) for `rekey status`.
async fn say_throttle(
    d: &Driver<'_>,
    rt: &mut StageRuntime,
    hold: Option<&str>,
    throttle: &crate::throttle::Throttle,
) {
    let latency = throttle.engaged().then(|| {
        let why = rt
            .latency_reason
            .as_deref()
            .unwrap_or("the probe's latency was over its threshold");
        format!(
            "latency: {why}; {} batch(es) in flight at most, {} ms between batches",
            throttle.window,
            throttle.gap.as_millis()
        )
    });
    // The application's own signal lost: the probe governs meanwhile, and status says so.
    let lost = rt.slo_error.as_deref().map(|e| {
        format!("the application's p99 from Prometheus is unavailable ({e}); the probe alone governs until it answers")
    });
    let latency = match (latency, lost) {
        (Some(l), Some(n)) => Some(format!("{l}; {n}")),
        (l, n) => l.or(n),
    };
    let now = hold.map(str::to_owned).or(latency);
    if now == rt.said_throttle {
        return;
    }
    let was_held = rt.said_held;
    rt.said_held = hold.is_some();
    // Events on the transitions only (a replica's lag changes its text at every look).
    match hold {
        Some(reason) if !was_held => {
            let held = RunEvent::Held {
                reason: reason.to_owned(),
            };
            d.events.emit(d.pool, d.run_id, held).await;
        }
        None if was_held => {
            d.events
                .emit(d.pool, d.run_id, RunEvent::HoldReleased)
                .await
        }
        _ => {}
    }
    let written = async {
        ledger::set_driver_throttle(&**d.pool.get().await?, d.run_id, now.as_deref()).await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = written {
        tracing::warn!(run_id = d.run_id, error = %format!("{e:#}"), "could not record the throttle's state");
    }
    rt.said_throttle = now;
}

/// Every heartbeat: counts the batch queue's consumers (for the lease, `rekey status` and
/// `rekey_queue_consumers`), and says `no_consumer` when batches have waited with nobody
/// consuming for `no_consumer_after` (and `consumers_back` when somebody returns).
async fn watch_consumers(
    d: &Driver<'_>,
    watch: &mut ConsumerWatch,
    seen: &AtomicI32,
) -> anyhow::Result<()> {
    if watch
        .last_check
        .is_some_and(|t| t.elapsed() < ledger::HEARTBEAT_EVERY)
    {
        return Ok(());
    }
    watch.last_check = Some(Instant::now());
    let queue = &d.topo.batches;
    let n = broker::consumer_count(d.channel, queue).await?;
    seen.store(i32::try_from(n).unwrap_or(i32::MAX), Ordering::Relaxed);
    if let Some(m) = &d.opts.metrics {
        m.queue_consumers
            .record(u64::from(n), &[KeyValue::new("queue", queue.clone())]);
    }
    let p = ledger::progress(&**d.pool.get().await?, d.run_id).await?;
    let waiting = p.pending + p.published > 0;
    if n > 0 || !waiting {
        if watch.said && n > 0 {
            let back = RunEvent::ConsumersBack {
                queue: queue.clone(),
                consumers: n,
            };
            d.events.emit(d.pool, d.run_id, back).await;
        }
        watch.none_since = None;
        watch.said = false;
        return watch_workers(d, watch).await;
    }
    let since = *watch.none_since.get_or_insert_with(Instant::now);
    if !watch.said && since.elapsed() >= d.opts.no_consumer_after {
        watch.said = true;
        let none = RunEvent::NoConsumer {
            queue: queue.clone(),
            secs: since.elapsed().as_secs(),
        };
        d.events.emit(d.pool, d.run_id, none).await;
    }
    Ok(())
}

/// Says `workers_failing` once for each cause for which live workers fail every batch
/// (from their presence rows), and again if it clears and comes back.
async fn watch_workers(d: &Driver<'_>, watch: &mut ConsumerWatch) -> anyhow::Result<()> {
    let workers = ledger::live_workers(&**d.pool.get().await?).await?;
    let groups = ledger::failing_groups(&workers);
    watch
        .failing_said
        .retain(|kind| groups.iter().any(|g| &g.0 == kind));
    for (kind, error, ids) in groups {
        if watch.failing_said.insert(kind.clone()) {
            let failing = RunEvent::WorkersFailing {
                hint: crate::health::hint(&kind).to_owned(),
                kind,
                error,
                workers: ids,
            };
            d.events.emit(d.pool, d.run_id, failing).await;
        }
    }
    Ok(())
}

/// Consecutive failed sessions (each backing off up to 10 s) before the driver gives up.
const MAX_SESSION_FAILURES: u32 = 60;

async fn current_state(pool: &Pool, run_id: i64) -> anyhow::Result<RunState> {
    Ok(ledger::get_run(&**pool.get().await?, run_id)
        .await?
        .map(|r| r.state)
        .unwrap_or(RunState::Failed))
}
