//! The run / stage / batch ledger (`rekey.runs`, `rekey.batches`): the truth about a run's
//! progress. The coordinator writes runs and publishes batches; a worker writes only its
//! batch's row, in the transaction that rotates the batch's rows.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::config::Target;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    Rotation,
    /// Everything but the write; never touches a real run's progress.
    DryRun,
    Rollback,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Rotation => "rotation",
            RunKind::DryRun => "dry_run",
            RunKind::Rollback => "rollback",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "rotation" => RunKind::Rotation,
            "dry_run" => RunKind::DryRun,
            _ => RunKind::Rollback,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Planning,
    Running,
    Paused,
    Halted,
    Completed,
    Failed,
    RolledBack,
}

impl RunState {
    pub const ALL: [RunState; 7] = [
        RunState::Planning,
        RunState::Running,
        RunState::Paused,
        RunState::Halted,
        RunState::Completed,
        RunState::Failed,
        RunState::RolledBack,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Planning => "planning",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Halted => "halted",
            RunState::Completed => "completed",
            RunState::Failed => "failed",
            RunState::RolledBack => "rolled_back",
        }
    }
    fn parse(s: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or(RunState::Failed)
    }
    /// Whether the run is over for good.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Completed | RunState::Failed | RunState::RolledBack
        )
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A run as recorded in the ledger.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub id: i64,
    pub kind: RunKind,
    pub state: RunState,
    pub target_key_id: Uuid,
    pub previous_key_id: Option<Uuid>,
    pub parent_run_id: Option<i64>,
    pub targets: Vec<Target>,
    pub stages: Vec<i32>,
    pub current_stage: i32,
    pub batch_size: i32,
    pub seed: i64,
    pub halt_reason: Option<String>,
    pub source_key_ids: Option<Vec<Uuid>>,
    pub settings: RunSettings,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const RUN_COLUMNS: &str = "id, kind, state, target_key_id, previous_key_id, parent_run_id, targets, stages, \
                           current_stage, batch_size, seed, halt_reason, source_key_ids, settings, created_at, started_at, finished_at";

fn run_from(row: &Row) -> Run {
    Run {
        id: row.get("id"),
        kind: RunKind::parse(row.get("kind")),
        state: RunState::parse(row.get("state")),
        target_key_id: row.get("target_key_id"),
        previous_key_id: row.get("previous_key_id"),
        parent_run_id: row.get("parent_run_id"),
        targets: serde_json::from_value(row.get("targets")).unwrap_or_default(),
        stages: row.get("stages"),
        current_stage: row.get("current_stage"),
        batch_size: row.get("batch_size"),
        seed: row.get("seed"),
        halt_reason: row.get("halt_reason"),
        source_key_ids: row.get("source_key_ids"),
        settings: serde_json::from_value(row.get("settings")).unwrap_or_default(),
        created_at: row.get("created_at"),
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
    }
}

/// How a run is gated and paced, fixed when it is planned (kept in `runs.settings`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunSettings {
    /// Rows of the target tables when the run was planned.
    pub planned_rows: i64,
    /// Observation after the first stage (the playbook: 24 h after the canary).
    pub observe_first_secs: u64,
    /// Observation after every later stage (the playbook: 2 h between stages).
    pub observe_secs: u64,
    /// Advance to the next stage by itself once a stage's observation ends.
    pub auto_advance: bool,
    /// Roll back by itself when a gate is breached.
    pub auto_rollback: bool,
    /// A stage's decrypt error rate must stay below this (the playbook: 0.1%).
    pub max_error_rate: f64,
    /// Above this latency increase (percent) the coordinator throttles.
    pub throttle_pct: f64,
    /// Above this latency increase (percent), sustained, a stage is breached.
    pub breach_pct: f64,
    /// Latency increases smaller than this many milliseconds are noise, never impact.
    pub min_impact_ms: f64,
    /// The throttle's noise floor: it answers increases above this many milliseconds.
    pub throttle_min_ms: f64,
    /// Start each stage at one batch in flight and double while latency stays good.
    pub slow_start: bool,
    /// The probe query's latency before the run (median, milliseconds).
    pub probe_baseline_ms: Option<f64>,
    /// The probe's 95th percentile before the run (milliseconds; its reads, or the
    /// configured probe query).
    pub probe_baseline_p95_ms: Option<f64>,
    /// The probe's 99th percentile before the run (milliseconds): the throttle's baseline
    /// for the probe's reads (or the configured probe query) …
    pub probe_baseline_p99_ms: Option<f64>,
    /// … and for its writes.
    pub probe_write_baseline_p99_ms: Option<f64>,
    /// The probe writes as well as reads (`rekey.latency_probe`).
    pub probe_writes: bool,
    /// The application's own 99th percentile latency before the run (milliseconds), as the
    /// operator knows it: the throttle's budget is `throttle_pct` of it (of the probe's own
    /// p99 when unknown), and at least `throttle_min_ms`.
    pub app_p99_ms: Option<f64>,
    /// Longest allowed gap between audit entries while a stage runs (the playbook: 5 min).
    pub max_audit_gap_secs: f64,
    /// Rows read back and decrypted per table at each observation check.
    pub observe_sample: i64,
    /// A batch holds about this many bytes of values (the run's `batch_size` is then the
    /// most rows a batch holds); 0: every batch holds `batch_size` rows.
    pub batch_bytes: i64,
}

impl RunSettings {
    /// The probe's p99 before the run for reads, or writes when `write`.
    fn probe_p99(&self, write: bool) -> Option<f64> {
        let reads = self
            .probe_baseline_p99_ms
            .or(self.probe_baseline_p95_ms)
            .or(self.probe_baseline_ms);
        if write {
            self.probe_write_baseline_p99_ms.or(reads)
        } else {
            reads
        }
    }

    /// The latency the throttle allows the probe to add to its p99 (milliseconds): an
    /// absolute allowance, the same for reads and writes, since the application's p99 is
    /// one figure.
    pub fn throttle_budget_ms(&self) -> Option<f64> {
        let base = self.probe_p99(false)?;
        (self.throttle_pct > 0.0).then(|| {
            (self.throttle_pct / 100.0 * self.app_p99_ms.unwrap_or(base)).max(self.throttle_min_ms)
        })
    }

    /// A probe slower than this (milliseconds) counts against the throttle: the p99 before
    /// the run of its kind (read or write) plus the budget. None: the throttle is off or
    /// there is no baseline.
    pub fn throttle_threshold_ms(&self, write: bool) -> Option<f64> {
        Some(self.probe_p99(write)? + self.throttle_budget_ms()?)
    }
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            planned_rows: 0,
            observe_first_secs: 24 * 3600,
            observe_secs: 2 * 3600,
            auto_advance: false,
            auto_rollback: false,
            max_error_rate: 0.001,
            throttle_pct: 15.0,
            breach_pct: 20.0,
            min_impact_ms: 2.0,
            throttle_min_ms: 0.5,
            slow_start: true,
            probe_baseline_ms: None,
            probe_baseline_p95_ms: None,
            probe_baseline_p99_ms: None,
            probe_write_baseline_p99_ms: None,
            probe_writes: false,
            app_p99_ms: None,
            max_audit_gap_secs: 300.0,
            observe_sample: 50,
            batch_bytes: 0,
        }
    }
}

/// What a new run is.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub kind: RunKind,
    pub target_key_id: Uuid,
    pub previous_key_id: Option<Uuid>,
    pub parent_run_id: Option<i64>,
    pub targets: Vec<Target>,
    pub stages: Vec<i32>,
    pub batch_size: i32,
    pub seed: i64,
    pub operator: String,
    pub source_key_ids: Option<Vec<Uuid>>,
    pub settings: RunSettings,
}

pub async fn create_run<C: GenericClient>(
    c: &C,
    new: &NewRun,
) -> Result<Run, tokio_postgres::Error> {
    let targets = serde_json::to_value(&new.targets).expect("targets serialize");
    let row = c
        .query_one(
            &format!(
                "INSERT INTO rekey.runs (kind, state, target_key_id, previous_key_id, parent_run_id, targets, batch_size, seed,
                                         operator, stages, source_key_ids, settings)
                 VALUES ($1, 'planning', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {RUN_COLUMNS}"
            ),
            &[
                &new.kind.as_str(),
                &new.target_key_id,
                &new.previous_key_id,
                &new.parent_run_id,
                &targets,
                &new.batch_size,
                &new.seed,
                &new.operator,
                &new.stages,
                &new.source_key_ids,
                &serde_json::to_value(&new.settings).expect("settings serialize"),
            ],
        )
        .await?;
    Ok(run_from(&row))
}

pub async fn get_run<C: GenericClient>(
    c: &C,
    id: i64,
) -> Result<Option<Run>, tokio_postgres::Error> {
    Ok(c.query_opt(
        &format!("SELECT {RUN_COLUMNS} FROM rekey.runs WHERE id = $1"),
        &[&id],
    )
    .await?
    .map(|r| run_from(&r)))
}

/// The most recent runs, newest first.
pub async fn recent_runs<C: GenericClient>(
    c: &C,
    limit: i64,
) -> Result<Vec<Run>, tokio_postgres::Error> {
    Ok(c.query(
        &format!("SELECT {RUN_COLUMNS} FROM rekey.runs ORDER BY id DESC LIMIT $1"),
        &[&limit],
    )
    .await?
    .iter()
    .map(run_from)
    .collect())
}

/// Moves a run to `state` (the coordinator is the only writer of run state).
pub async fn set_run_state<C: GenericClient>(
    c: &C,
    id: i64,
    state: RunState,
    reason: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "UPDATE rekey.runs SET state = $2, halt_reason = COALESCE($3, halt_reason),
                started_at = CASE WHEN $2 = 'running' THEN COALESCE(started_at, now()) ELSE started_at END,
                finished_at = CASE WHEN $2 IN ('completed', 'failed', 'rolled_back') THEN now() ELSE finished_at END
          WHERE id = $1",
        &[&id, &state.as_str(), &reason],
    )
    .await?;
    Ok(())
}

/// One planned batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    pub stage_no: i32,
    pub table: String,
    pub id_lo: i64,
    pub id_hi: i64,
    /// A sweep batch: every record of stages up to `stage_no` in the range.
    pub cumulative: bool,
}

/// Appends batches to a run, numbering them after the run's last batch.
pub async fn insert_batches<C: GenericClient>(
    c: &C,
    run_id: i64,
    plans: &[BatchPlan],
) -> Result<u64, tokio_postgres::Error> {
    if plans.is_empty() {
        return Ok(0);
    }
    let stages: Vec<i32> = plans.iter().map(|p| p.stage_no).collect();
    let tables: Vec<&str> = plans.iter().map(|p| p.table.as_str()).collect();
    let los: Vec<i64> = plans.iter().map(|p| p.id_lo).collect();
    let his: Vec<i64> = plans.iter().map(|p| p.id_hi).collect();
    let cumulative: Vec<bool> = plans.iter().map(|p| p.cumulative).collect();
    c.execute(
        "INSERT INTO rekey.batches (run_id, batch_no, stage_no, table_name, id_lo, id_hi, cumulative)
         SELECT $1, COALESCE((SELECT max(batch_no) FROM rekey.batches WHERE run_id = $1), 0) + u.ord, u.s, u.t, u.lo, u.hi, u.c
           FROM unnest($2::int[], $3::text[], $4::int8[], $5::int8[], $6::bool[]) WITH ORDINALITY AS u(s, t, lo, hi, c, ord)",
        &[&run_id, &stages, &tables, &los, &his, &cumulative],
    )
    .await
}

/// A run's progress, recomputed from the ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub n_batches: i64,
    pub pending: i64,
    pub published: i64,
    pub done: i64,
    pub failed: i64,
    pub n_rows: i64,
    pub n_values: i64,
    pub n_rotated: i64,
    pub n_skipped: i64,
    pub n_null: i64,
    pub n_errors: i64,
    /// Rows in the planned ranges (an estimate until every batch is done).
    pub planned_rows_estimate: i64,
}

impl Progress {
    /// Decrypt errors over values that needed decrypting.
    pub fn error_rate(&self) -> f64 {
        let attempted = self.n_rotated + self.n_errors;
        if attempted == 0 {
            0.0
        } else {
            self.n_errors as f64 / attempted as f64
        }
    }

    pub fn is_finished(&self) -> bool {
        self.pending == 0 && self.published == 0
    }
}

pub async fn progress<C: GenericClient>(
    c: &C,
    run_id: i64,
) -> Result<Progress, tokio_postgres::Error> {
    progress_of(c, run_id, None).await
}

/// Progress of one stage's batches, or of the whole run.
pub async fn progress_of<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: Option<i32>,
) -> Result<Progress, tokio_postgres::Error> {
    let r = c
        .query_one(
            "SELECT count(*),
                    count(*) FILTER (WHERE state = 'pending'),
                    count(*) FILTER (WHERE state = 'published'),
                    count(*) FILTER (WHERE state = 'done'),
                    count(*) FILTER (WHERE state = 'failed'),
                    COALESCE(sum(n_rows), 0)::int8, COALESCE(sum(n_values), 0)::int8,
                    COALESCE(sum(n_rotated), 0)::int8, COALESCE(sum(n_skipped), 0)::int8,
                    COALESCE(sum(n_null), 0)::int8, COALESCE(sum(n_errors), 0)::int8
               FROM rekey.batches WHERE run_id = $1 AND ($2::int IS NULL OR stage_no = $2)",
            &[&run_id, &stage_no],
        )
        .await?;
    let settings = c
        .query_opt(
            "SELECT (settings->>'planned_rows')::int8 FROM rekey.runs WHERE id = $1",
            &[&run_id],
        )
        .await?
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .unwrap_or(0);
    Ok(Progress {
        n_batches: r.get(0),
        pending: r.get(1),
        published: r.get(2),
        done: r.get(3),
        failed: r.get(4),
        n_rows: r.get(5),
        n_values: r.get(6),
        n_rotated: r.get(7),
        n_skipped: r.get(8),
        n_null: r.get(9),
        n_errors: r.get(10),
        planned_rows_estimate: settings,
    })
}

/// A stage as recorded in the ledger.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub run_id: i64,
    pub stage_no: i32,
    pub percent: i32,
    pub state: String,
    pub started_at: Option<DateTime<Utc>>,
    pub gated_at: Option<DateTime<Utc>>,
    pub observe_until: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The gate decision with its figures.
    pub gate: Option<serde_json::Value>,
}

fn stage_from(r: &Row) -> Stage {
    Stage {
        run_id: r.get("run_id"),
        stage_no: r.get("stage_no"),
        percent: r.get("percent"),
        state: r.get("state"),
        started_at: r.get("started_at"),
        gated_at: r.get("gated_at"),
        observe_until: r.get("observe_until"),
        finished_at: r.get("finished_at"),
        gate: r.get("gate"),
    }
}

pub async fn stages<C: GenericClient>(
    c: &C,
    run_id: i64,
) -> Result<Vec<Stage>, tokio_postgres::Error> {
    Ok(c.query(
        "SELECT * FROM rekey.stages WHERE run_id = $1 ORDER BY stage_no",
        &[&run_id],
    )
    .await?
    .iter()
    .map(stage_from)
    .collect())
}

pub async fn stage<C: GenericClient>(
    c: &C,
    run_id: i64,
    stage_no: i32,
) -> Result<Option<Stage>, tokio_postgres::Error> {
    Ok(c.query_opt(
        "SELECT * FROM rekey.stages WHERE run_id = $1 AND stage_no = $2",
        &[&run_id, &stage_no],
    )
    .await?
    .map(|r| stage_from(&r)))
}

/// Creates a run's stage rows, all pending.
pub async fn create_stages<C: GenericClient>(
    c: &C,
    run_id: i64,
    percents: &[i32],
) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "INSERT INTO rekey.stages (run_id, stage_no, percent)
         SELECT $1, (u.ord - 1)::int, u.p FROM unnest($2::int[]) WITH ORDINALITY AS u(p, ord)",
        &[&run_id, &percents],
    )
    .await?;
    Ok(())
}
