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

use crate::throttle::{SUSTAINED_SAMPLES, Throttle};

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
    let throttle = rt.throttle.get_or_insert_with(|| {
        // Slow start answers the probe: without a throttle it would only slow.
        Throttle::new(
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
        let working = in_flight > 0 && d.consumers.load(Ordering::Relaxed) != 0;
        let (over, under) = if working {
            rt.perf.record(&run.settings, lat.median_ms);
            rt.perf.probes(&run.settings, &samples)
        } else {
            (0, samples.len())
        };
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
            let throttling = RunEvent::Throttling {
                stage_no,
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
