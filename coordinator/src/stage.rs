//! A stage's transitions as the driver makes them: starting it (planning its batches),
//! gating it (coverage sweeps, then the gate decision), breaching it.

use crate::events::{Events, RunEvent};
use crate::runtime::StageRuntime;
use crate::{coverage, gate, plan, report};
use anyhow::Context;
use deadpool_postgres::Pool;
use rekey_common::Settings;
use rekey_common::audit::{self, AuditEntry};
use rekey_common::ledger::{self, Run, RunKind, RunState};

pub(crate) fn run_observe_secs(run: &Run, stage_no: i32) -> u64 {
    if stage_no == 0 {
        run.settings.observe_first_secs
    } else {
        run.settings.observe_secs
    }
}

/// Plans a stage's batches and marks it running.
pub(crate) async fn start_stage(
    pool: &Pool,
    settings: &Settings,
    events: &Events,
    run: &Run,
    stage_no: i32,
) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let started = start_stage_in(&tx, run, stage_no, &settings.actor).await?;
    tx.commit().await?;
    if let Some(event) = started {
        events.emit(pool, run.id, event).await;
    }
    Ok(())
}

/// Plans a stage's batches into the ledger and marks the stage running, in `tx`. A stage
/// is planned when it starts, so that rows inserted since the run began are in it. The
/// event to emit once `tx` commits; none when the stage was no longer pending.
pub async fn start_stage_in(
    tx: &tokio_postgres::Transaction<'_>,
    run: &Run,
    stage_no: i32,
    actor: &str,
) -> anyhow::Result<Option<RunEvent<'static>>> {
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
        return Ok(None);
    }
    let plans = plan::plan_stage(tx, &run.targets, stage_no, &range_rows).await?;
    ledger::insert_batches(tx, run.id, &plans).await?;
    audit::record(
        tx,
        &[AuditEntry::run_event(run.id, run.target_key_id, "stage_start", true, actor, serde_json::json!({"stage_no": stage_no, "percent": run.stages[stage_no as usize], "batches": plans.len()}))],
    )
    .await?;
    Ok(Some(RunEvent::StageStarted {
        stage_no,
        percent: run.stages[stage_no as usize],
        batches: plans.len(),
    }))
}

/// Sweeps stragglers (re-batching them) or decides the stage's gates.
#[tracing::instrument(name = "gate", skip_all, fields(run_id = run.id, stage = stage.stage_no))]
pub(crate) async fn gate_stage(
    pool: &Pool,
    settings: &Settings,
    events: &Events,
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
    // A target column whose type changed since the run was planned fails its batches and
    // cannot be swept: halt here, naming it, instead of retrying the sweep for ever.
    let problems = rekey_common::target::schema_problems(&**client, &run.targets).await?;
    if !problems.is_empty() {
        drop(client);
        let reason = format!("the targets cannot be rotated: {}", problems.join("; "));
        return mark_breach(pool, settings, events, run, stage_no, None, &reason)
            .await
            .map(Some);
    }
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
        coverage::stragglers(&**c, run, t, stage_no).await
    }))
    .await?;
    for (t, ids) in sweep_targets.iter().zip(found) {
        left += ids.len() as i64;
        plans.extend(coverage::sweep_batches(
            &t.table,
            stage_no,
            &ids,
            run.batch_size as usize,
        ));
    }
    if left > 0 && sweeps < MAX_SWEEPS {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        ledger::insert_batches(&*tx, run.id, &plans).await?;
        ledger::sweep_again(&*tx, run.id, stage_no, i64::from(sweeps + 1)).await?;
        tx.commit().await?;
        let sweep = RunEvent::CoverageSweep {
            stage_no,
            stragglers: left,
            sweep: sweeps + 1,
        };
        events.emit(pool, run.id, sweep).await;
        return Ok(None);
    }
    let decision = gate::evaluate(&**client, run, stage_no, left, sweeps, &rt.perf.figures).await?;
    drop(client);
    rekey_common::failpoint!("coordinator.mid_gate");
    if let Some(reason) = decision.reason() {
        return breach(pool, settings, events, run, stage_no, &decision, &reason)
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
    let passed = RunEvent::GatesPassed {
        stage_no,
        observe_secs: observe,
    };
    events.emit(pool, run.id, passed).await;
    report::write(
        pool,
        settings,
        run.id,
        &format!("stage {stage_no} gates passed"),
    )
    .await?;
    Ok(None)
}

/// Sweeps of stragglers per stage before the coverage gate gives up.
pub const MAX_SWEEPS: u32 = 5;

pub(crate) async fn breach(
    pool: &Pool,
    settings: &Settings,
    events: &Events,
    run: &Run,
    stage_no: i32,
    decision: &gate::GateDecision,
    reason: &str,
) -> anyhow::Result<RunState> {
    mark_breach(
        pool,
        settings,
        events,
        run,
        stage_no,
        Some(serde_json::to_value(decision)?),
        reason,
    )
    .await
}

/// Records a breach: the stage breached with its figures, the run halted with the reason.
pub(crate) async fn mark_breach(
    pool: &Pool,
    settings: &Settings,
    events: &Events,
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
    let path = report::write(
        pool,
        settings,
        run.id,
        &format!("stage {stage_no} breached"),
    )
    .await?;
    let breached = RunEvent::Breached {
        stage_no,
        reason,
        report: &path,
    };
    events.emit(pool, run.id, breached).await;
    Ok(RunState::Halted)
}
