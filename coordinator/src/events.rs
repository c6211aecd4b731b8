//! Run events: where an event of a run becomes its log line and its webhook post.

use crate::probe;
use anyhow::Context;
use deadpool_postgres::Pool;
use opentelemetry::KeyValue;
use rekey_common::broker::{self, Topology};
use rekey_common::ledger::{self, Run};
use rekey_common::metrics::Metrics;
use rekey_common::notify::{Event, Notifier};

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

/// The run's gauges: state, stage, duration, rows rotated and error rate (from the ledger).
pub(crate) fn record_run(m: &Metrics, run: &Run) {
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
pub(crate) async fn record_probe(
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
