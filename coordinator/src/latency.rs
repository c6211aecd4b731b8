//! The latency judgement of a running stage: the background probe's samples, taken every
//! `probe_every`, move the throttle, fill the stage's performance figures and metrics, and
//! breach the stage on a sustained impact.

use crate::events::{RunEvent, record_probe};
use crate::runtime::{Driver, StageRuntime};
use crate::stage::breach;
use crate::{gate, probe};
use opentelemetry::KeyValue;
use rekey_common::ledger;
use rekey_common::ledger::{Run, RunState};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::throttle::{SUSTAINED_SAMPLES, SloReading, Throttle};

/// Starts the stage's throttle and background probe when the stage starts rotating, and
/// every `probe_every` judges the probe's samples since the last judgement: records the
/// stage's performance figures and metrics, moves the throttle's level by the probes over
/// and under their thresholds, and breaches the stage on a sustained impact (returning the
/// run's state then).
pub(crate) async fn judge(
    d: &Driver<'_>,
    rt: &mut StageRuntime,
    run: &Run,
    stage_no: i32,
) -> anyhow::Result<Option<RunState>> {
    let Driver {
        pool,
        settings,
        channel,
        topo,
        run_id,
        opts,
        ..
    } = *d;
    if rt.throttle.is_none() {
        // Slow start answers the probe: without a throttle it would only slow.
        rt.throttle = Some(Throttle::new(
            opts.max_in_flight,
            run.settings.slow_start && run.settings.throttle_pct > 0.0,
        ));
    }
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
    if rt.rebaselining.is_some() {
        // Publication is paused for a new baseline: what the probe sees now is the
        // application alone, not the rotation's doing.
        return Ok(None);
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
            let mut reads: Vec<f64> = samples.iter().filter(|s| !s.write).map(|s| s.ms).collect();
            if reads.is_empty() {
                reads = samples.iter().map(|s| s.ms).collect();
            }
            probe::Latency::of(&mut reads)
        };
        // Latency is the rotation's doing only while batches are worked on: with nothing
        // in flight, or nobody consuming them, it is the application's own, and neither
        // the throttle nor the breach hears of it.
        let in_flight = ledger::progress(&**pool.get().await?, run_id)
            .await?
            .published;
        // Batches worked on since the last judgement count too: a paced stage often has
        // none in flight at the instant of judging.
        let published_lately = rt
            .last_publish
            .is_some_and(|t| t.elapsed() < opts.probe_every * 2);
        let working =
            (in_flight > 0 || published_lately) && d.consumers.load(Ordering::Relaxed) != 0;
        let (over, under) = if working {
            rt.perf.record(&run.settings, lat.median_ms);
            rt.perf.probes(&run.settings, &samples)
        } else {
            (0, samples.len())
        };
        let probe_reason = (over > 0).then(|| {
            let f = &rt.perf.figures;
            format!(
                "{over} of {} probes over their thresholds (reads {} ms, writes {} ms; the probe's p99 so far: reads {} ms, writes {} ms)",
                over + under,
                ms(f.throttle_threshold_ms),
                ms(f.write_throttle_threshold_ms),
                ms(f.p99_ms),
                ms(f.write_p99_ms),
            )
        });
        // The application's own p99, when its Prometheus is configured: the preferred
        // signal, with a level of its own; the worse of it and the probe governs. It is
        // judged whether or not a batch is in flight right now: its window spans the
        // batches of the last seconds, and a paced run mostly has none in flight.
        let mut slo_reading = None;
        let mut slo_reason = None;
        if let Some(v) = slo_value(d, rt, run).await
            && let (Some(limit), Some(aim)) =
                (run.settings.slo_limit_ms(), run.settings.slo_aim_ms())
        {
            let r = SloReading {
                ms: v,
                aim_ms: aim,
                limit_ms: limit,
            };
            slo_reading = Some(r);
            let f = &mut rt.perf.figures;
            f.slo_baseline_ms = run.settings.slo_baseline_ms;
            f.slo_limit_ms = Some(limit);
            f.slo_aim_ms = Some(aim);
            f.slo_polls += 1;
            f.slo_max_ms = Some(f.slo_max_ms.map_or(v, |m: f64| m.max(v)));
            f.slo_ms = Some(v);
            if r.over_limit() {
                f.slo_polls_over += 1;
                if over == 0 {
                    f.throttled_samples += 1;
                }
            }
            if v > aim {
                let st = &run.settings;
                let before = st.slo_baseline_ms.unwrap_or_default();
                let base = st.slo_base_ms().unwrap_or(before);
                let over_what = if base > before {
                    format!(
                        "{base:.1} ms at the last re-baseline, the application alone; {before:.1} ms before the run"
                    )
                } else {
                    format!("{before:.1} ms before the run")
                };
                let reason = if r.over_limit() {
                    format!(
                        "the application's p99 from Prometheus is {v:.1} ms, over its limit of {limit:.1} ms ({:.0}% over its {over_what})",
                        st.throttle_pct,
                    )
                } else {
                    format!(
                        "the application's p99 from Prometheus is {v:.1} ms, over the throttle's aim of {aim:.1} ms (its limit: {limit:.1} ms, {:.0}% over its {over_what})",
                        st.throttle_pct,
                    )
                };
                slo_reason = Some(reason);
            }
        }
        if working {
            rt.judged += 1;
        }
        if let Some(m) = &opts.metrics {
            record_probe(
                m,
                pool,
                channel,
                topo,
                run,
                &lat,
                rt.perf.figures.impact_pct,
            )
            .await;
        }
        let throttle = rt.throttle.as_mut().expect("set above");
        let was = throttle.clone();
        if slo_reading.is_none() {
            throttle.forget_slo();
        }
        throttle.judge(over, under, in_flight, slo_reading);
        // Which signal governs the throttle after this judgement (the one whose level is
        // the higher; said again when the other one takes over, not each time the other
        // one is over for a judgement), and the reason: the governing signal's when it is
        // over its aim, else the other's.
        let governing = if throttle.slo_governs() {
            PROMETHEUS
        } else {
            PROBE
        };
        let (first, second) = if governing == PROMETHEUS {
            (slo_reason, probe_reason)
        } else {
            (probe_reason, slo_reason)
        };
        let reason = first.or(second);
        rt.latency_reason = if throttle.slow {
            Some(format!(
                "slow start: paced until the throttle has judged the database under the rotation ({} judgement(s) so far)",
                rt.judged
            ))
        } else if !throttle.engaged() {
            None
        } else {
            reason.or_else(|| {
                rt.latency_reason
                    .take()
                    .map(|r| r.strip_prefix("recovering from: ").unwrap_or(&r).to_owned())
                    .filter(|r| !r.starts_with("slow start"))
                    .map(|r| format!("recovering from: {r}"))
            })
        };
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
        let slowed = over > 0 || slo_reading.is_some_and(|r| r.ms > r.aim_ms);
        if slowed && rt.said_signal != Some(governing) {
            rt.said_signal = Some(governing);
            let throttling = RunEvent::Throttling {
                stage_no,
                reason: rt.latency_reason.clone().unwrap_or_default(),
                probes_over: over,
                probes: over + under,
                p99_ms: lat.p99_ms,
                read_threshold_ms: run.settings.throttle_threshold_ms(false),
                write_threshold_ms: run.settings.throttle_threshold_ms(true),
                window: throttle.window,
                gap_ms: throttle.gap.as_millis() as u64,
            };
            d.events.emit(pool, run_id, throttling).await;
        } else if was.engaged() && !throttle.engaged() {
            let released = RunEvent::ThrottleReleased {
                stage_no,
                p99_ms: lat.p99_ms,
            };
            d.events.emit(pool, run_id, released).await;
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
                run.settings.breach_pct, SUSTAINED_SAMPLES
            );
            let decision =
                gate::evaluate(&**pool.get().await?, run, stage_no, 0, 0, &rt.perf.figures).await?;
            return breach(pool, settings, d.events, run, stage_no, &decision, &reason)
                .await
                .map(Some);
        }
    }
    Ok(None)
}

/// The signals that slow a run, as the throttling event names them.
const PROBE: &str = "probe";
const PROMETHEUS: &str = "prometheus";

/// A re-baseline waits at most this long for the batches in flight to finish (else it is
/// skipped until the next one).
pub const REBASELINE_DRAIN: Duration = Duration::from_secs(60);

/// With an SLO query, a re-baseline asks the application's Prometheus this long after the
/// last batch in flight finished: the query's `rate()` window (the bench's 10 s) and a
/// scrape must fit in it for the value to be the application alone.
pub const SLO_SETTLE: Duration = Duration::from_secs(20);

/// A re-baseline's probes: 150 of each kind, 10 ms apart (about 4 s).
pub const REBASELINE_PROBES: usize = 300;

/// Every `rebaseline_secs` of a stage's rotation: holds publication until nothing is in
/// flight, measures the application alone with the probe, records the new baseline (the
/// throttle's from then on, within bounds) and says how far the application is from its
/// baseline before the run. Returns the hold's reason while it holds.
pub(crate) async fn rebaseline(
    d: &Driver<'_>,
    rt: &mut StageRuntime,
    run: &Run,
    stage_no: i32,
) -> anyhow::Result<Option<String>> {
    let s = &run.settings;
    if s.rebaseline_secs <= 0.0 || s.throttle_pct <= 0.0 || s.probe_baseline_p99_ms.is_none() {
        return Ok(None);
    }
    let every = Duration::from_secs_f64(s.rebaseline_secs);
    let since = *rt.rotating_since.get_or_insert_with(Instant::now);
    let Some(holding) = rt.rebaselining else {
        if rt.last_rebaseline.unwrap_or(since).elapsed() < every {
            return Ok(None);
        }
        rt.rebaselining = Some(Instant::now());
        return Ok(Some(rebaseline_reason(s)));
    };
    let in_flight = ledger::progress(&**d.pool.get().await?, d.run_id)
        .await?
        .published;
    if in_flight > 0 {
        if holding.elapsed() < REBASELINE_DRAIN {
            return Ok(Some(rebaseline_reason(s)));
        }
        tracing::warn!(
            run_id = d.run_id,
            in_flight,
            "re-baseline skipped: batches still in flight after 60 s"
        );
    } else {
        // The application's own p99 is a rate over a window: ask it once the window holds
        // the application alone.
        if s.slo.is_some() {
            let drained = *rt.rebaseline_drained.get_or_insert_with(Instant::now);
            if drained.elapsed() < SLO_SETTLE {
                return Ok(Some(rebaseline_reason(s)));
            }
        }
        let b = probe::measure(
            d.pool,
            &run.targets,
            d.settings.probe_query.as_deref(),
            s.probe_writes,
            REBASELINE_PROBES,
            probe::BASELINE_SPACING,
        )
        .await?;
        let writes = b.writes.map(|w| w.p99_ms);
        let slo = slo_value(d, rt, run).await;
        ledger::set_rebaseline(
            &**d.pool.get().await?,
            d.run_id,
            b.reads.p99_ms,
            writes,
            slo,
        )
        .await?;
        let said = RunEvent::Rebaselined {
            stage_no,
            reads_p99_ms: b.reads.p99_ms,
            writes_p99_ms: writes,
            before_reads_p99_ms: s.probe_baseline_p99_ms,
            before_writes_p99_ms: s.probe_write_baseline_p99_ms,
            slo_p99_ms: slo,
            before_slo_p99_ms: s.slo_baseline_ms,
        };
        d.events.emit(d.pool, d.run_id, said).await;
        rt.perf.figures.rebaselines += 1;
        rt.perf.figures.rebaselined_p99_ms = Some(b.reads.p99_ms);
        rt.perf.figures.rebaselined_write_p99_ms = writes;
    }
    // The probe's samples of the pause are not the rotation's.
    if let Some(p) = &rt.prober {
        p.take();
    }
    rt.rebaselining = None;
    rt.rebaseline_drained = None;
    rt.last_rebaseline = Some(Instant::now());
    Ok(None)
}

fn rebaseline_reason(s: &ledger::RunSettings) -> String {
    let slo = if s.slo.is_some() {
        format!(
            ", and the application's Prometheus is asked {} s after",
            SLO_SETTLE.as_secs()
        )
    } else {
        String::new()
    };
    format!(
        "held: re-baselining — the probe measures the application alone once the batches in flight finish{slo} (every {:.0} s, --rebaseline-every)",
        s.rebaseline_secs
    )
}

/// A figure in milliseconds, or `-`.
fn ms(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.1}"))
}

/// The application's p99 from its Prometheus now (milliseconds), when the run has an SLO
/// query; a failed query is said once per failure streak and judged as no signal (the
/// probe governs meanwhile).
async fn slo_value(d: &Driver<'_>, rt: &mut StageRuntime, run: &Run) -> Option<f64> {
    let source = run.settings.slo.as_ref()?;
    if rt.slo.is_none() {
        match crate::slo::Slo::new(source) {
            Ok(s) => rt.slo = Some(s),
            Err(e) => {
                tracing::warn!(run_id = d.run_id, error = %format!("{e:#}"), "the SLO signal is unavailable");
                return None;
            }
        }
    }
    match rt.slo.as_ref()?.value_ms().await {
        Ok(v) => {
            if rt.slo_error.take().is_some() {
                let back = RunEvent::SignalBack { p99_ms: v };
                d.events.emit(d.pool, d.run_id, back).await;
            }
            if let Some(m) = &d.opts.metrics {
                m.slo_latency
                    .record(v, &[KeyValue::new("run_id", d.run_id)]);
            }
            Some(v)
        }
        Err(e) => {
            let error = format!("{e:#}");
            if rt.slo_error.is_none() {
                let lost = RunEvent::SignalLost {
                    error: error.clone(),
                };
                d.events.emit(d.pool, d.run_id, lost).await;
            }
            rt.slo_error = Some(error);
            None
        }
    }
}
