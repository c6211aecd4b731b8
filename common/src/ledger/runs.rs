//! Runs: what a run is, its kind and its state machine, and the statements that change
//! a run's row.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use super::{LedgerError, StateMachine, check, state_enum, state_machine, state_of};
use crate::target::Target;

state_enum! {
    /// What a run does.
    RunKind {
        Rotation = "rotation",
        /// Everything but the write; never touches a real run's progress.
        DryRun = "dry_run",
        Rollback = "rollback",
    }
}

state_enum! {
    /// Where a run is (see the module docs for its transitions).
    RunState {
        Planning = "planning",
        Running = "running",
        Paused = "paused",
        Halted = "halted",
        Completed = "completed",
        Failed = "failed",
        RolledBack = "rolled_back",
    }
}

state_machine!(
    RunState,
    "run",
    initial = Planning,
    [
        (Planning, Running),
        (Planning, Failed),
        (Running, Paused),
        (Running, Halted),
        (Running, Completed),
        (Running, Failed),
        (Paused, Running),
        (Paused, Halted),
        (Halted, Running),
        (Halted, RolledBack),
        (Completed, RolledBack),
    ]
);

impl RunState {
    /// Whether the run is over: nothing is left to drive (a completed run can still be
    /// rolled back, by a run of its own).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Completed | RunState::Failed | RunState::RolledBack
        )
    }

    /// The states in which a run is not over.
    pub fn unfinished() -> impl Iterator<Item = RunState> {
        Self::ALL.iter().copied().filter(|s| !s.is_final())
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
    /// The operator's hold on publication (`rekey throttle RUN on`): who, when, why.
    pub throttle_hold: Option<String>,
    pub source_key_ids: Option<Vec<Uuid>>,
    pub settings: RunSettings,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const RUN_COLUMNS: &str = "id, kind, state, target_key_id, previous_key_id, parent_run_id, targets, stages, \
                           current_stage, batch_size, seed, halt_reason, throttle_hold, source_key_ids, settings, created_at, started_at, finished_at";

/// A run kind's text, read back.
pub(super) fn kind_of(text: &str) -> Result<RunKind, LedgerError> {
    RunKind::ALL
        .iter()
        .copied()
        .find(|k| k.as_str() == text)
        .ok_or_else(|| LedgerError::Unknown {
            machine: "run kind",
            text: text.to_owned(),
        })
}

fn run_from(row: &Row) -> Result<Run, LedgerError> {
    Ok(Run {
        id: row.get("id"),
        kind: kind_of(row.get("kind"))?,
        state: state_of(row.get("state"))?,
        target_key_id: row.get("target_key_id"),
        previous_key_id: row.get("previous_key_id"),
        parent_run_id: row.get("parent_run_id"),
        targets: targets_from(row.get("id"), row.get("targets"))?,
        stages: row.get("stages"),
        current_stage: row.get("current_stage"),
        batch_size: row.get("batch_size"),
        seed: row.get("seed"),
        halt_reason: row.get("halt_reason"),
        throttle_hold: row.get("throttle_hold"),
        source_key_ids: row.get("source_key_ids"),
        settings: serde_json::from_value(row.get("settings")).unwrap_or_default(),
        created_at: row.get("created_at"),
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
    })
}

/// A run's targets as stored, each checked as the settings check them (they name tables
/// and columns that go into SQL).
pub(super) fn targets_from(id: i64, json: serde_json::Value) -> Result<Vec<Target>, LedgerError> {
    let unreadable = |e: String| LedgerError::Unreadable {
        what: format!("run {id}'s targets"),
        error: e,
    };
    let targets: Vec<Target> =
        serde_json::from_value(json).map_err(|e| unreadable(e.to_string()))?;
    for t in &targets {
        t.validate().map_err(|e| unreadable(format!("{e:#}")))?;
    }
    Ok(targets)
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
    /// How far the p99s of the baseline's windows spread, for reads and writes
    /// (milliseconds): the budget of each kind is at least its noise.
    pub probe_noise_ms: Option<f64>,
    pub probe_write_noise_ms: Option<f64>,
    /// While a stage rotates, publication pauses this often for the probe to measure the
    /// application alone again (a new baseline); 0: never.
    pub rebaseline_secs: f64,
    /// The probe's p99 (reads, writes) at the last re-baseline: the throttle's baseline
    /// from then on, kept between the p99 before the run and twice it.
    pub probe_rebaselined_p99_ms: Option<f64>,
    pub probe_write_rebaselined_p99_ms: Option<f64>,
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
    /// Publication holds while a streaming replica replays more than this many seconds
    /// behind (`pg_stat_replication.replay_lag`); `None` or 0: not checked.
    pub max_replication_lag_secs: Option<f64>,
    /// … or more than this many bytes of WAL behind the primary; `None` or 0: not checked.
    pub max_replication_lag_bytes: Option<i64>,
    /// Publication holds while more client backends than this are active
    /// (`pg_stat_activity`, the rotation's own not counted); `None` or 0: not checked.
    pub max_active_backends: Option<i64>,
    /// Publication holds for this many seconds after PostgreSQL requested a checkpoint
    /// (`pg_stat_bgwriter.checkpoints_req` rose: WAL outgrew `max_wal_size`); 0: not
    /// checked.
    pub checkpoint_hold_secs: f64,
    /// The application's own p99 from its Prometheus: where and how it is asked …
    pub slo: Option<crate::config::SloSource>,
    /// … and its value before the run (milliseconds): the throttle holds it within
    /// `throttle_pct` of this.
    pub slo_baseline_ms: Option<f64>,
    /// Its value at the last re-baseline, the application alone (publication paused, the
    /// query's window clear of the rotation): the throttle's baseline from then on, kept
    /// between the value before the run and twice it.
    pub slo_rebaselined_ms: Option<f64>,
}

impl RunSettings {
    /// The probe's p99 before the run for reads, or writes when `write`.
    fn probe_p99(&self, write: bool) -> Option<f64> {
        let reads = self
            .probe_baseline_p99_ms
            .or(self.probe_baseline_p95_ms)
            .or(self.probe_baseline_ms);
        let (before, again) = if write {
            (
                self.probe_write_baseline_p99_ms.or(reads),
                self.probe_write_rebaselined_p99_ms,
            )
        } else {
            (reads, self.probe_rebaselined_p99_ms)
        };
        // A re-baseline moves the bar with the application's own drift, within bounds: never
        // below the baseline before the run, never past twice it.
        Some(match (before?, again) {
            (b, Some(a)) => a.clamp(b, 2.0 * b),
            (b, None) => b,
        })
    }

    /// The latency the throttle allows the probe to add to its p99 (milliseconds): an
    /// absolute allowance, the same for reads and writes, since the application's p99 is
    /// one figure.
    pub fn throttle_budget_ms(&self) -> Option<f64> {
        let base = self
            .probe_baseline_p99_ms
            .or(self.probe_baseline_p95_ms)
            .or(self.probe_baseline_ms)?;
        (self.throttle_pct > 0.0).then(|| {
            (self.throttle_pct / 100.0 * self.app_p99_ms.unwrap_or(base)).max(self.throttle_min_ms)
        })
    }

    /// A probe slower than this (milliseconds) counts against the throttle: the p99 before
    /// the run of its kind (read or write) plus the budget. None: the throttle is off or
    /// there is no baseline.
    pub fn throttle_threshold_ms(&self, write: bool) -> Option<f64> {
        let noise = if write {
            self.probe_write_noise_ms.or(self.probe_noise_ms)
        } else {
            self.probe_noise_ms
        };
        Some(self.probe_p99(write)? + self.throttle_budget_ms()?.max(noise.unwrap_or(0.0)))
    }

    /// The application's p99 the throttle measures against: its value before the run, or
    /// at the last re-baseline within bounds (never below the value before the run, never
    /// past twice it), as for the probe.
    pub fn slo_base_ms(&self) -> Option<f64> {
        let before = self.slo_baseline_ms?;
        Some(match self.slo_rebaselined_ms {
            Some(again) => again.clamp(before, 2.0 * before),
            None => before,
        })
    }

    /// The application's p99 (from its Prometheus) over this counts against the throttle:
    /// its base ([`RunSettings::slo_base_ms`]) plus `throttle_pct` of it (at least
    /// `throttle_min_ms`).
    pub fn slo_limit_ms(&self) -> Option<f64> {
        let base = self.slo_base_ms()?;
        (self.throttle_pct > 0.0 && self.slo.is_some())
            .then(|| base + (self.throttle_pct / 100.0 * base).max(self.throttle_min_ms))
    }

    /// What the throttle steers the application's p99 to: its base plus
    /// [`SLO_AIM_SHARE`] of the budget, so that its window-to-window spread stays under
    /// the limit.
    pub fn slo_aim_ms(&self) -> Option<f64> {
        let base = self.slo_base_ms()?;
        self.slo_limit_ms()
            .map(|limit| base + SLO_AIM_SHARE * (limit - base))
    }
}

/// The share of the latency budget the throttle spends on average (the aim); the rest is
/// for the application's p99's spread from one window to the next.
pub const SLO_AIM_SHARE: f64 = 2.0 / 3.0;

/// The replicas' brake by default: 30 s of replay lag, or 1 GiB of WAL.
pub const DEFAULT_MAX_REPLICATION_LAG_SECS: f64 = 30.0;
pub const DEFAULT_MAX_REPLICATION_LAG_BYTES: i64 = 1 << 30;

/// How often a stage's rotation pauses for a new baseline by default.
pub const DEFAULT_REBASELINE_SECS: f64 = 300.0;

/// How long a requested checkpoint holds publication by default.
pub const DEFAULT_CHECKPOINT_HOLD_SECS: f64 = 10.0;

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
            probe_noise_ms: None,
            probe_write_noise_ms: None,
            rebaseline_secs: DEFAULT_REBASELINE_SECS,
            probe_rebaselined_p99_ms: None,
            probe_write_rebaselined_p99_ms: None,
            probe_writes: true,
            app_p99_ms: None,
            max_audit_gap_secs: 300.0,
            observe_sample: 50,
            batch_bytes: 0,
            max_replication_lag_secs: Some(DEFAULT_MAX_REPLICATION_LAG_SECS),
            max_replication_lag_bytes: Some(DEFAULT_MAX_REPLICATION_LAG_BYTES),
            max_active_backends: None,
            checkpoint_hold_secs: DEFAULT_CHECKPOINT_HOLD_SECS,
            slo: None,
            slo_baseline_ms: None,
            slo_rebaselined_ms: None,
        }
    }
}

/// Records a re-baseline of the probe (and of the application's own p99, when it answered)
/// in the run's settings (the throttle's baseline from
/// then on, within bounds: [`RunSettings`]).
pub async fn set_rebaseline<C: GenericClient>(
    c: &C,
    run_id: i64,
    reads_p99_ms: f64,
    writes_p99_ms: Option<f64>,
    slo_ms: Option<f64>,
) -> Result<(), LedgerError> {
    let mut patch = serde_json::json!({
        "probe_rebaselined_p99_ms": reads_p99_ms,
        "probe_write_rebaselined_p99_ms": writes_p99_ms,
    });
    // A re-baseline whose SLO query did not answer keeps the last one's value.
    if let Some(v) = slo_ms {
        patch["slo_rebaselined_ms"] = v.into();
    }
    c.execute(
        "UPDATE rekey.runs SET settings = settings || $2::jsonb WHERE id = $1",
        &[&run_id, &patch],
    )
    .await?;
    Ok(())
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

pub async fn create_run<C: GenericClient>(c: &C, new: &NewRun) -> Result<Run, LedgerError> {
    let targets = serde_json::to_value(&new.targets).expect("targets serialize");
    let row = c
        .query_one(
            &format!(
                "INSERT INTO rekey.runs (kind, state, target_key_id, previous_key_id, parent_run_id, targets, batch_size, seed,
                                         operator, stages, source_key_ids, settings)
                 VALUES ($1, $12, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {RUN_COLUMNS}"
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
                &<RunState as StateMachine>::INITIAL.as_str(),
            ],
        )
        .await?;
    run_from(&row)
}

pub async fn get_run<C: GenericClient>(c: &C, id: i64) -> Result<Option<Run>, LedgerError> {
    c.query_opt(
        &format!("SELECT {RUN_COLUMNS} FROM rekey.runs WHERE id = $1"),
        &[&id],
    )
    .await?
    .map(|r| run_from(&r))
    .transpose()
}

/// The most recent runs, newest first.
pub async fn recent_runs<C: GenericClient>(c: &C, limit: i64) -> Result<Vec<Run>, LedgerError> {
    c.query(
        &format!("SELECT {RUN_COLUMNS} FROM rekey.runs ORDER BY id DESC LIMIT $1"),
        &[&limit],
    )
    .await?
    .iter()
    .map(run_from)
    .collect()
}

/// The newest run that is not over (see [`RunState::is_final`]), if any.
pub async fn latest_unfinished_run<C: GenericClient>(c: &C) -> Result<Option<Run>, LedgerError> {
    let states: Vec<&str> = RunState::unfinished().map(RunState::as_str).collect();
    c.query_opt(
        &format!(
            "SELECT {RUN_COLUMNS} FROM rekey.runs WHERE state = ANY($1) ORDER BY id DESC LIMIT 1"
        ),
        &[&states],
    )
    .await?
    .map(|r| run_from(&r))
    .transpose()
}

/// Moves a run to `state`, with a reason when given (the coordinator is the only writer of
/// run state). Refuses a change the table does not allow, naming both states.
pub async fn set_run_state<C: GenericClient>(
    c: &C,
    id: i64,
    state: RunState,
    reason: Option<&str>,
) -> Result<(), LedgerError> {
    let row = c
        .query_opt(
            "SELECT state FROM rekey.runs WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?
        .ok_or_else(|| LedgerError::NotFound(format!("run {id}")))?;
    let from: RunState = state_of(row.get(0))?;
    check(format!("run {id}"), from, state)?;
    let over: Vec<&str> = RunState::ALL
        .iter()
        .filter(|s| s.is_final())
        .map(|s| s.as_str())
        .collect();
    c.execute(
        "UPDATE rekey.runs SET state = $2, halt_reason = COALESCE($3, halt_reason),
                started_at = CASE WHEN $2 = $4 THEN COALESCE(started_at, now()) ELSE started_at END,
                finished_at = CASE WHEN $2 = ANY($5) THEN now() ELSE finished_at END
          WHERE id = $1",
        &[
            &id,
            &state.as_str(),
            &reason,
            &RunState::Running.as_str(),
            &over,
        ],
    )
    .await?;
    Ok(())
}

/// Holds (`Some(who, when, why)`) or frees (`None`) a run's publication; false if the run
/// does not exist or is over.
pub async fn set_throttle_hold<C: GenericClient>(
    c: &C,
    id: i64,
    hold: Option<&str>,
) -> Result<bool, LedgerError> {
    let over: Vec<&str> = RunState::ALL
        .iter()
        .filter(|s| s.is_final())
        .map(|s| s.as_str())
        .collect();
    let n = c
        .execute(
            "UPDATE rekey.runs SET throttle_hold = $2 WHERE id = $1 AND state <> ALL($3)",
            &[&id, &hold, &over],
        )
        .await?;
    Ok(n == 1)
}

/// Forgets why a run halted (it runs again).
pub async fn clear_halt_reason<C: GenericClient>(c: &C, id: i64) -> Result<(), LedgerError> {
    c.execute(
        "UPDATE rekey.runs SET halt_reason = NULL WHERE id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

/// Makes the stage after `passed` the run's current one; false if another process did.
pub async fn advance_stage<C: GenericClient>(
    c: &C,
    id: i64,
    passed: i32,
) -> Result<bool, LedgerError> {
    let n = c
        .execute(
            "UPDATE rekey.runs SET current_stage = $2 WHERE id = $1 AND current_stage = $3",
            &[&id, &(passed + 1), &passed],
        )
        .await?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::RunSettings;

    /// The application's own p99 re-baselined moves the throttle's limit with the
    /// application's drift, within bounds: never below its value before the run, never
    /// past twice it.
    #[test]
    fn a_rebaselined_slo_moves_the_limit_within_bounds() {
        let mut s = RunSettings {
            throttle_pct: 15.0,
            throttle_min_ms: 0.5,
            slo: Some(crate::config::SloSource {
                prometheus_url: "http://127.0.0.1:9090".into(),
                query: "max(app_p99_seconds)".into(),
                unit_ms: 1000.0,
            }),
            slo_baseline_ms: Some(10.0),
            ..RunSettings::default()
        };
        assert_eq!(s.slo_limit_ms(), Some(11.5));
        assert!(
            (s.slo_aim_ms().unwrap() - 11.0).abs() < 1e-9,
            "two thirds of 1.5 ms"
        );
        for (again, base) in [(18.0, 18.0), (5.0, 10.0), (35.0, 20.0)] {
            s.slo_rebaselined_ms = Some(again);
            assert_eq!(s.slo_base_ms(), Some(base), "re-baselined at {again} ms");
            assert!((s.slo_limit_ms().unwrap() - base * 1.15).abs() < 1e-9);
            assert!((s.slo_aim_ms().unwrap() - base * 1.10).abs() < 1e-9);
        }
        // No throttle, no aim.
        s.throttle_pct = 0.0;
        assert_eq!(s.slo_aim_ms(), None);
    }
}
