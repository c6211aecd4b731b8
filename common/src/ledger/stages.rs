//! Stages: a run's slices (1%, 25%, …), their state machine, and the statements that move
//! a stage.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{GenericClient, Row};

use super::{LedgerError, StateMachine, check, state_enum, state_machine, state_of};

state_enum! {
    /// Where a stage is (see the module docs for its transitions).
    StageState {
        Pending = "pending",
        /// Its batches are being published and rotated.
        Running = "running",
        /// Its batches are done; its gates are being checked.
        Gating = "gating",
        /// Its gates passed; the observation window runs.
        Observing = "observing",
        Passed = "passed",
        Breached = "breached",
    }
}

state_machine!(
    StageState,
    "stage",
    initial = Pending,
    [
        (Pending, Running),
        (Running, Gating),
        (Running, Breached),
        (Gating, Running),
        (Gating, Observing),
        (Gating, Breached),
        (Observing, Passed),
        (Observing, Breached),
        (Breached, Running),
    ]
);

/// A stage as recorded in the ledger.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub run_id: i64,
    pub stage_no: i32,
    pub percent: i32,
    pub state: StageState,
    pub started_at: Option<DateTime<Utc>>,
    pub gated_at: Option<DateTime<Utc>>,
    pub observe_until: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The gate decision with its figures.
    pub gate: Option<serde_json::Value>,
}

fn stage_from(r: &Row) -> Result<Stage, LedgerError> {
    Ok(Stage {
        run_id: r.get("run_id"),
        stage_no: r.get("stage_no"),
        percent: r.get("percent"),
        state: state_of(r.get("state"))?,
        started_at: r.get("started_at"),
        gated_at: r.get("gated_at"),
        observe_until: r.get("observe_until"),
        finished_at: r.get("finished_at"),
        gate: r.get("gate"),
    })
}

pub async fn stages<C: GenericClient>(c: &C, run_id: i64) -> Result<Vec<Stage>, LedgerError> {
    c.query(
        "SELECT * FROM rekey.stages WHERE run_id = $1 ORDER BY stage_no",
        &[&run_id],
    )
    .await?
    .iter()
    .map(stage_from)
    .collect()
}

pub async fn stage<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
) -> Result<Option<Stage>, LedgerError> {
    c.query_opt(
        "SELECT * FROM rekey.stages WHERE run_id = $1 AND stage_no = $2",
        &[&run_id, &stage_no],
    )
    .await?
    .map(|r| stage_from(&r))
    .transpose()
}

/// Creates a run's stage rows, all pending.
pub async fn create_stages<C: GenericClient>(
    c: &C,
    run_id: i64,
    percents: &[i32],
) -> Result<(), LedgerError> {
    c.execute(
        "INSERT INTO rekey.stages (run_id, stage_no, percent, state)
         SELECT $1, (u.ord - 1)::int, u.p, $3 FROM unnest($2::int[]) WITH ORDINALITY AS u(p, ord)",
        &[
            &run_id,
            &percents,
            &<StageState as StateMachine>::INITIAL.as_str(),
        ],
    )
    .await?;
    Ok(())
}

/// Moves one stage from `from` to `to`, setting `extra` (SQL assignments over `$5…`) too,
/// where `cond` (SQL, may be empty) holds; the number of rows moved (0 or 1).
async fn move_stage<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
    (from, to): (StageState, StageState),
    extra: &str,
    cond: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, LedgerError> {
    let (f, t) = StageState::edge(from, to);
    let sql = format!(
        "UPDATE rekey.stages SET state = $4{extra} WHERE run_id = $1 AND stage_no = $2 AND state = $3{cond}"
    );
    let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&run_id, &stage_no, &f, &t];
    all.extend_from_slice(params);
    Ok(c.execute(&sql, &all).await?)
}

/// pending → running: the stage starts (its batches are planned in the same transaction).
/// 0 when it had already started.
pub async fn start_stage<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
) -> Result<u64, LedgerError> {
    let e = (StageState::Pending, StageState::Running);
    move_stage(c, run_id, stage_no, e, ", started_at = now()", "", &[]).await
}

/// running → gating: every batch of the stage is done or failed.
pub async fn begin_gating<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
) -> Result<u64, LedgerError> {
    let e = (StageState::Running, StageState::Gating);
    move_stage(c, run_id, stage_no, e, ", gated_at = now()", "", &[]).await
}

/// gating → running: a coverage sweep found stragglers and re-batched them (`sweeps` so far).
pub async fn sweep_again<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
    sweeps: i64,
) -> Result<u64, LedgerError> {
    let e = (StageState::Gating, StageState::Running);
    let extra = ", gate = jsonb_build_object('sweeps', $5::int8)";
    move_stage(c, run_id, stage_no, e, extra, "", &[&sweeps]).await
}

/// gating → observing: the gates passed (`decision`); observation for `secs`.
pub async fn begin_observing<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
    decision: &serde_json::Value,
    secs: f64,
) -> Result<u64, LedgerError> {
    let e = (StageState::Gating, StageState::Observing);
    let extra = ", gate = $5, observe_until = now() + make_interval(secs => $6::float8)";
    move_stage(c, run_id, stage_no, e, extra, "", &[decision, &secs]).await
}

/// Adds one observation check (values read back, failures) to an observing stage's gate.
pub async fn add_observation<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
    values_read: i64,
    failures: i64,
) -> Result<(), LedgerError> {
    c.execute(
        "UPDATE rekey.stages SET gate = jsonb_set(COALESCE(gate, '{}'), '{observation}', jsonb_build_object(
            'checks', COALESCE((gate->'observation'->>'checks')::int8, 0) + 1,
            'values_read', COALESCE((gate->'observation'->>'values_read')::int8, 0) + $3,
            'failures', COALESCE((gate->'observation'->>'failures')::int8, 0) + $4))
          WHERE run_id = $1 AND stage_no = $2",
        &[&run_id, &stage_no, &values_read, &failures],
    )
    .await?;
    Ok(())
}

/// observing → passed, once the observation window is over; 0 when it is not (or the stage
/// is not observing).
pub async fn pass_stage<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
) -> Result<u64, LedgerError> {
    let e = (StageState::Observing, StageState::Passed);
    let (extra, cond) = (", finished_at = now()", " AND observe_until <= now()");
    move_stage(c, run_id, stage_no, e, extra, cond, &[]).await
}

/// → breached, from any state that may breach, with the gate's figures when given.
pub async fn breach_stage<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
    gate: Option<&serde_json::Value>,
) -> Result<u64, LedgerError> {
    let from: Vec<&str> = StageState::ALL
        .iter()
        .filter(|s| s.can_become(StageState::Breached))
        .map(|s| s.as_str())
        .collect();
    Ok(c.execute(
        "UPDATE rekey.stages SET state = $4, gate = COALESCE($5, gate), finished_at = now()
              WHERE run_id = $1 AND stage_no = $2 AND state = ANY($3)",
        &[
            &run_id,
            &stage_no,
            &from,
            &StageState::Breached.as_str(),
            &gate,
        ],
    )
    .await?)
}

/// breached → running: `resume` runs a breached stage again (what is left is published,
/// then it is gated anew).
pub async fn rerun_breached<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
) -> Result<u64, LedgerError> {
    let e = (StageState::Breached, StageState::Running);
    move_stage(c, run_id, stage_no, e, ", finished_at = NULL", "", &[]).await
}

/// Moves a stage to `to` from whatever state it is in, if the table allows it. The
/// named transitions above are what rekey uses; this one is for tools and tests.
pub async fn set_stage_state<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
    to: StageState,
) -> Result<(), LedgerError> {
    let what = format!("stage {stage_no} of run {run_id}");
    let row = c
        .query_opt(
            "SELECT state FROM rekey.stages WHERE run_id = $1 AND stage_no = $2 FOR UPDATE",
            &[&run_id, &stage_no],
        )
        .await?
        .ok_or_else(|| LedgerError::NotFound(what.clone()))?;
    let from: StageState = state_of(row.get(0))?;
    check(what, from, to)?;
    c.execute(
        "UPDATE rekey.stages SET state = $3 WHERE run_id = $1 AND stage_no = $2",
        &[&run_id, &stage_no, &to.as_str()],
    )
    .await?;
    Ok(())
}
