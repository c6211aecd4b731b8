//! Run events: the one place where something that happened to a run becomes its log line,
//! its count in `rekey_run_events_total` (by `event`) and, for the events of the
//! playbook's communication plan, its webhook post with the run's figures. The run's
//! gauges (state, stage, probe, totals) are refreshed here too.

use std::path::Path;
use std::sync::Arc;

use crate::probe;
use anyhow::Context;
use deadpool_postgres::Pool;
use opentelemetry::KeyValue;
use rekey_common::broker::{self, Topology};
use rekey_common::ledger::{self, Run};
use rekey_common::metrics::Metrics;
use rekey_common::notify::{Event, Notifier};

/// Something that happened to a run.
#[derive(Debug, Clone)]
pub enum RunEvent<'a> {
    /// The run was planned: its first stage's batches are in the ledger.
    Planned { target_key: String, dry_run: bool },
    /// A rollback run was planned for this run.
    RollbackPlanned {
        rollback_run: i64,
        previous_key: String,
    },
    /// A driver began driving the run.
    Started,
    /// A driver took the run up again.
    Resumed,
    /// A stage's batches were planned and it began rotating.
    StageStarted {
        stage_no: i32,
        percent: i32,
        batches: usize,
    },
    /// Records the stage missed were re-batched.
    CoverageSweep {
        stage_no: i32,
        stragglers: i64,
        sweep: u32,
    },
    /// The stage's gates passed; its observation period began.
    GatesPassed { stage_no: i32, observe_secs: u64 },
    /// The stage's observation period ended clean and the run moved on.
    StagePassed { stage_no: i32, report: &'a Path },
    /// A gate failed: the stage is breached and the run halted.
    Breached {
        stage_no: i32,
        reason: &'a str,
        report: &'a Path,
    },
    /// Application latency first slowed the stage.
    Throttling {
        stage_no: i32,
        /// Which signal, its value and its limit.
        reason: String,
        probes_over: usize,
        probes: usize,
        p99_ms: f64,
        read_threshold_ms: Option<f64>,
        write_threshold_ms: Option<f64>,
        window: i64,
        gap_ms: u64,
    },
    /// The throttle let go.
    ThrottleReleased { stage_no: i32, p99_ms: f64 },
    /// Publication paused and the probe measured the application alone: its p99 now
    /// (reads, writes) against the baseline before the run.
    Rebaselined {
        stage_no: i32,
        reads_p99_ms: f64,
        writes_p99_ms: Option<f64>,
        before_reads_p99_ms: Option<f64>,
        before_writes_p99_ms: Option<f64>,
        /// The application's own p99 from its Prometheus, now and before the run.
        slo_p99_ms: Option<f64>,
        before_slo_p99_ms: Option<f64>,
    },
    /// The application's own signal (`--slo-query`) stopped answering: the probe alone
    /// governs the throttle until it does again.
    SignalLost { error: String },
    /// The application's own signal answers again.
    SignalBack { p99_ms: f64 },
    /// Publication is held by the operator (`rekey throttle RUN on`) or a flag file.
    Held { reason: String },
    /// The hold was lifted: publication goes on.
    HoldReleased,
    /// Batches wait and nobody has consumed the batch queue for `secs`.
    NoConsumer { queue: String, secs: u64 },
    /// Consumers came back after a `no_consumer`.
    ConsumersBack { queue: String, consumers: u32 },
    /// Live workers fail every batch for one cause (their presence rows say so).
    WorkersFailing {
        kind: String,
        error: String,
        workers: Vec<String>,
        hint: String,
    },
    /// Every stage passed.
    Completed { report: &'a Path },
    /// The run stopped and waits for an operator.
    Halted { reason: Option<&'a str> },
    /// The run's rollback completed: every value is back under the previous key.
    RolledBack,
}

impl RunEvent<'_> {
    /// The event's name: its `event` label and, when posted, the webhook's `event`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Planned { .. } => "planned",
            Self::RollbackPlanned { .. } => "rollback_planned",
            Self::Started => "started",
            Self::Resumed => "resumed",
            Self::StageStarted { .. } => "stage_started",
            Self::CoverageSweep { .. } => "coverage_sweep",
            Self::GatesPassed { .. } => "gates_passed",
            Self::StagePassed { .. } => "stage_passed",
            Self::Breached { .. } => "gate_breached",
            Self::Throttling { .. } => "throttling",
            Self::ThrottleReleased { .. } => "throttle_released",
            Self::Rebaselined { .. } => "rebaselined",
            Self::SignalLost { .. } => "signal_lost",
            Self::SignalBack { .. } => "signal_back",
            Self::Held { .. } => "held",
            Self::HoldReleased => "hold_released",
            Self::NoConsumer { .. } => "no_consumer",
            Self::ConsumersBack { .. } => "consumers_back",
            Self::WorkersFailing { .. } => "workers_failing",
            Self::Completed { .. } => "completed",
            Self::Halted { .. } => "halted",
            Self::RolledBack => "rolled_back",
        }
    }

    /// Every name, in the order a run meets them (docs/monitoring.md lists them).
    pub const NAMES: &'static [&'static str] = &[
        "planned",
        "rollback_planned",
        "started",
        "resumed",
        "stage_started",
        "coverage_sweep",
        "gates_passed",
        "stage_passed",
        "gate_breached",
        "throttling",
        "throttle_released",
        "rebaselined",
        "signal_lost",
        "signal_back",
        "held",
        "hold_released",
        "no_consumer",
        "consumers_back",
        "workers_failing",
        "completed",
        "halted",
        "rolled_back",
    ];

    /// Whether the webhook hears of it (the communication plan: a run's start, each
    /// stage's result, its end).
    pub fn posted(&self) -> bool {
        matches!(
            self,
            Self::Started
                | Self::Resumed
                | Self::StagePassed { .. }
                | Self::Breached { .. }
                | Self::NoConsumer { .. }
                | Self::ConsumersBack { .. }
                | Self::WorkersFailing { .. }
                | Self::Completed { .. }
                | Self::Halted { .. }
                | Self::RolledBack
        )
    }

    fn stage_no(&self) -> Option<i32> {
        match self {
            Self::StageStarted { stage_no, .. }
            | Self::CoverageSweep { stage_no, .. }
            | Self::GatesPassed { stage_no, .. }
            | Self::StagePassed { stage_no, .. }
            | Self::Breached { stage_no, .. }
            | Self::Throttling { stage_no, .. }
            | Self::ThrottleReleased { stage_no, .. }
            | Self::Rebaselined { stage_no, .. } => Some(*stage_no),
            _ => None,
        }
    }

    fn reason(&self) -> Option<&str> {
        match self {
            Self::Breached { reason, .. } => Some(reason),
            Self::NoConsumer { .. } => Some("nobody is consuming the batch queue: start workers"),
            Self::WorkersFailing { error, .. } => Some(error),
            Self::Held { reason } => Some(reason),
            Self::SignalLost { error } => Some(error),
            Self::Halted { reason } => *reason,
            _ => None,
        }
    }

    fn report(&self) -> Option<&Path> {
        match self {
            Self::StagePassed { report, .. }
            | Self::Breached { report, .. }
            | Self::Completed { report } => Some(report),
            _ => None,
        }
    }

    /// The event's log line.
    fn log(&self, run_id: i64) {
        match self {
            Self::Planned {
                target_key,
                dry_run,
            } => tracing::info!(run_id, target_key, dry_run, "run planned"),
            Self::RollbackPlanned {
                rollback_run,
                previous_key,
            } => tracing::warn!(run_id, rollback_run, previous_key, "rollback started"),
            Self::Started => tracing::info!(run_id, "driving the run"),
            Self::Resumed => tracing::info!(run_id, "driving the run again (resumed)"),
            Self::StageStarted {
                stage_no,
                percent,
                batches,
            } => tracing::info!(
                run_id,
                stage_no,
                percent,
                n_batches = batches,
                "stage started"
            ),
            Self::CoverageSweep {
                stage_no,
                stragglers,
                sweep,
            } => tracing::info!(
                run_id,
                stage_no,
                stragglers,
                sweep,
                "coverage sweep: re-batching stragglers"
            ),
            Self::GatesPassed {
                stage_no,
                observe_secs,
            } => tracing::info!(
                run_id,
                stage_no,
                observe_secs,
                "stage gates passed; observing"
            ),
            Self::StagePassed { stage_no, report } => tracing::info!(
                run_id,
                stage_no,
                report = %report.display(),
                "stage passed"
            ),
            Self::Breached {
                stage_no,
                reason,
                report,
            } => tracing::error!(
                run_id,
                stage_no,
                reason,
                report = %report.display(),
                "stage breached: run halted"
            ),
            Self::Throttling {
                stage_no,
                reason,
                probes_over,
                probes,
                p99_ms,
                read_threshold_ms,
                write_threshold_ms,
                window,
                gap_ms,
            } => tracing::warn!(
                run_id,
                stage_no,
                reason,
                probes_over,
                probes,
                p99_ms,
                read_threshold_ms,
                write_threshold_ms,
                window,
                gap_ms,
                "application latency up: throttling"
            ),
            Self::ThrottleReleased { stage_no, p99_ms } => {
                tracing::info!(run_id, stage_no, p99_ms, "throttle released")
            }
            Self::Rebaselined {
                stage_no,
                reads_p99_ms,
                writes_p99_ms,
                before_reads_p99_ms,
                before_writes_p99_ms,
                slo_p99_ms,
                before_slo_p99_ms,
            } => tracing::info!(
                run_id,
                stage_no,
                reads_p99_ms,
                writes_p99_ms,
                before_reads_p99_ms,
                before_writes_p99_ms,
                slo_p99_ms,
                before_slo_p99_ms,
                "new baseline: the application alone, publication paused"
            ),
            Self::SignalLost { error } => tracing::warn!(
                run_id,
                error,
                "the application's p99 from Prometheus is unavailable: the probe alone governs the throttle until it answers"
            ),
            Self::SignalBack { p99_ms } => tracing::info!(
                run_id,
                p99_ms,
                "the application's p99 from Prometheus answers again"
            ),
            Self::Held { reason } => tracing::warn!(
                run_id,
                reason,
                "publication held: batches in flight finish, nothing new is published"
            ),
            Self::HoldReleased => tracing::info!(run_id, "hold lifted: publishing again"),
            Self::NoConsumer { queue, secs } => tracing::warn!(
                run_id,
                queue,
                secs,
                "batches wait and nobody is consuming the batch queue: start workers (`rekey-worker`, or `docker-compose up -d --scale worker=N`)"
            ),
            Self::WorkersFailing {
                kind,
                error,
                workers,
                hint,
            } => tracing::error!(
                run_id,
                kind,
                error,
                workers = %workers.join(","),
                "{} worker(s) failing every batch: {hint}",
                workers.len()
            ),
            Self::ConsumersBack { queue, consumers } => {
                tracing::info!(
                    run_id,
                    queue,
                    consumers,
                    "the batch queue has consumers again"
                )
            }
            Self::Completed { report } => {
                tracing::info!(run_id, report = %report.display(), "run completed")
            }
            Self::Halted { reason } => tracing::warn!(run_id, reason, "run halted"),
            Self::RolledBack => tracing::info!(run_id, "run rolled back"),
        }
    }
}

/// Where run events go: the log always; the event counter when the process serves
/// metrics; the webhook when one is configured. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Events {
    notifier: Notifier,
    metrics: Option<Arc<Metrics>>,
}

impl Events {
    pub fn new(notifier: Notifier, metrics: Option<Arc<Metrics>>) -> Self {
        Self { notifier, metrics }
    }

    /// Says `event` of run `run_id` once: logs it, counts it, posts it. Posting reads the
    /// run's figures from `pool` and never waits for the webhook; a failure to read them
    /// costs only a warning.
    pub async fn emit(&self, pool: &Pool, run_id: i64, event: RunEvent<'_>) {
        event.log(run_id);
        if let Some(m) = &self.metrics {
            m.run_events.add(
                1,
                &[
                    KeyValue::new("run_id", run_id),
                    KeyValue::new("event", event.name()),
                ],
            );
        }
        if event.posted() && self.notifier.is_enabled() {
            post(&self.notifier, pool, run_id, &event).await;
        }
    }

    /// Waits at most `limit` for the webhook posts still queued.
    pub async fn flush(&self, limit: std::time::Duration) {
        self.notifier.flush(limit).await;
    }
}

/// Posts a run event with the run's figures; a failure to build it costs only a warning.
async fn post(notifier: &Notifier, pool: &Pool, run_id: i64, event: &RunEvent<'_>) {
    let name = event.name();
    let built = async {
        let c = pool.get().await?;
        let run = ledger::get_run(&**c, run_id)
            .await?
            .with_context(|| format!("run {run_id} not found"))?;
        let p = ledger::progress(&**c, run_id).await?;
        let mut figures = serde_json::json!({
            "batches": p.n_batches,
            "batches_done": p.done,
            "batches_failed": p.failed,
            "rows": p.n_rows,
            "decrypt_errors": p.n_errors,
            "decrypt_error_rate": p.error_rate(),
            "stages": run.stages,
            "duration_secs": (run.finished_at.unwrap_or_else(chrono::Utc::now) - run.created_at).num_milliseconds() as f64 / 1000.0,
        });
        // A dry run writes nothing: its count is what a rotation would rotate.
        let verb = if run.kind == ledger::RunKind::DryRun {
            "would_rotate"
        } else {
            "rotated"
        };
        figures[verb] = serde_json::json!(p.n_rotated);
        anyhow::Ok(Event {
            event: name,
            run_id,
            kind: run.kind.as_str().to_owned(),
            state: run.state.as_str().to_owned(),
            stage_no: event.stage_no().or(Some(run.current_stage)),
            reason: event.reason().map(str::to_owned).or(run.halt_reason),
            figures,
            report: event.report().map(|p| p.display().to_string()),
            at: chrono::Utc::now(),
        })
    }
    .await;
    match built {
        Ok(e) => notifier.send(e),
        Err(e) => {
            tracing::warn!(run_id, event = name, error = %format!("{e:#}"), "run event not sent")
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each event, so that a new variant must be named, listed and documented.
    fn every_event(report: &Path) -> Vec<RunEvent<'_>> {
        vec![
            RunEvent::Planned {
                target_key: "k".into(),
                dry_run: false,
            },
            RunEvent::RollbackPlanned {
                rollback_run: 2,
                previous_key: "k".into(),
            },
            RunEvent::Started,
            RunEvent::Resumed,
            RunEvent::StageStarted {
                stage_no: 0,
                percent: 1,
                batches: 3,
            },
            RunEvent::CoverageSweep {
                stage_no: 0,
                stragglers: 4,
                sweep: 1,
            },
            RunEvent::GatesPassed {
                stage_no: 0,
                observe_secs: 60,
            },
            RunEvent::StagePassed {
                stage_no: 0,
                report,
            },
            RunEvent::Breached {
                stage_no: 1,
                reason: "coverage",
                report,
            },
            RunEvent::Throttling {
                reason: "2 of 40 probes over their thresholds".into(),
                stage_no: 1,
                probes_over: 3,
                probes: 4,
                p99_ms: 12.0,
                read_threshold_ms: Some(10.0),
                write_threshold_ms: None,
                window: 8,
                gap_ms: 0,
            },
            RunEvent::ThrottleReleased {
                stage_no: 1,
                p99_ms: 2.0,
            },
            RunEvent::Rebaselined {
                stage_no: 1,
                reads_p99_ms: 1.5,
                writes_p99_ms: Some(4.0),
                before_reads_p99_ms: Some(1.4),
                before_writes_p99_ms: Some(3.0),
                slo_p99_ms: Some(6.3),
                before_slo_p99_ms: Some(5.2),
            },
            RunEvent::SignalLost {
                error: "the SLO query returned 0 series".into(),
            },
            RunEvent::SignalBack { p99_ms: 12.0 },
            RunEvent::Held {
                reason: "held by the operator".into(),
            },
            RunEvent::HoldReleased,
            RunEvent::NoConsumer {
                queue: "rekey.batches".into(),
                secs: 30,
            },
            RunEvent::ConsumersBack {
                queue: "rekey.batches".into(),
                consumers: 2,
            },
            RunEvent::WorkersFailing {
                kind: "wrong_master_key".into(),
                error: "wrong master key: …".into(),
                workers: vec!["w1".into()],
                hint: "restart them".into(),
            },
            RunEvent::Completed { report },
            RunEvent::Halted { reason: None },
            RunEvent::RolledBack,
        ]
    }

    #[test]
    fn every_event_is_named_once_listed_and_documented() {
        let report = Path::new("r.md");
        let names: Vec<&str> = every_event(report).iter().map(RunEvent::name).collect();
        assert_eq!(names, RunEvent::NAMES, "NAMES lists every event, in order");
        let doc = include_str!("../../docs/monitoring.md");
        for e in every_event(report) {
            assert!(
                doc.contains(&format!("`{}`", e.name())),
                "docs/monitoring.md names `{}`",
                e.name()
            );
        }
        // The webhook hears what the playbook's communication plan names, and no more.
        let posted: Vec<&str> = every_event(report)
            .iter()
            .filter(|e| e.posted())
            .map(RunEvent::name)
            .collect();
        assert_eq!(
            posted,
            [
                "started",
                "resumed",
                "stage_passed",
                "gate_breached",
                "no_consumer",
                "consumers_back",
                "workers_failing",
                "completed",
                "halted",
                "rolled_back"
            ]
        );
    }

    #[test]
    fn a_posted_event_carries_its_stage_reason_and_report() {
        let report = Path::new("reports/run-1.md");
        let e = RunEvent::Breached {
            stage_no: 2,
            reason: "decrypt error rate 0.2% over 0.1%",
            report,
        };
        assert_eq!(e.stage_no(), Some(2));
        assert_eq!(e.reason(), Some("decrypt error rate 0.2% over 0.1%"));
        assert_eq!(e.report(), Some(report));
        let h = RunEvent::Halted {
            reason: Some("paused by operator"),
        };
        assert_eq!(
            (h.stage_no(), h.reason(), h.report()),
            (None, Some("paused by operator"), None)
        );
    }
}
