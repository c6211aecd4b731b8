//! Stage gates, observation and promotion. When a stage's batches are done the coordinator
//! proves coverage (no record of the stage left under a key it should have left, except
//! quarantined values; stragglers are re-batched), checks the decrypt error rate, audit
//! completeness and performance impact, and records the decision with its figures. Then
//! it observes the stage, re-reading and decrypting samples of rotated rows, until the
//! observation period ends and the stage is promoted.

use deadpool_postgres::Pool;
use rekey_common::audit::{self, AuditEntry};
use rekey_common::ledger::{self, Run, RunState, StageState};
use serde::Serialize;
use serde_json::json;
use tokio_postgres::GenericClient;

use crate::throttle::PerfFigures;

/// One gate's verdict with its figures.
#[derive(Debug, Clone, Serialize)]
pub struct GateCheck {
    pub name: &'static str,
    pub passed: bool,
    pub figures: serde_json::Value,
    pub reason: Option<String>,
}

/// The decision at the end of a stage.
#[derive(Debug, Clone, Serialize)]
pub struct GateDecision {
    pub passed: bool,
    pub checks: Vec<GateCheck>,
    pub sweeps: u32,
}

impl GateDecision {
    pub fn reason(&self) -> Option<String> {
        let failed: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {}", c.name, c.reason.as_deref().unwrap_or("failed")))
            .collect();
        (!failed.is_empty()).then(|| failed.join("; "))
    }
}

/// Error rate, audit completeness and performance of stage `stage_no` (coverage is
/// decided by the caller, which re-batches stragglers first).
pub async fn evaluate<C: GenericClient>(
    c: &C,
    run: &Run,
    stage_no: i32,
    stragglers_left: i64,
    sweeps: u32,
    perf: &PerfFigures,
) -> anyhow::Result<GateDecision> {
    let s = &run.settings;
    let p = ledger::progress_of(c, run.id, Some(stage_no)).await?;
    let mut checks = Vec::new();
    let quarantined: i64 = c
        .query_one(
            "SELECT count(*) FROM rekey.decrypt_errors e JOIN rekey.batches b ON b.run_id = e.run_id AND b.batch_no = e.batch_no
              WHERE e.run_id = $1 AND b.stage_no = $2",
            &[&run.id, &stage_no],
        )
        .await?
        .get(0);
    checks.push(GateCheck {
        name: "coverage",
        passed: stragglers_left == 0 && p.failed == 0,
        figures: json!({"stragglers_left": stragglers_left, "sweeps": sweeps, "quarantined_values": quarantined, "failed_batches": p.failed}),
        reason: if p.failed > 0 {
            Some(format!("{} batch(es) failed", p.failed))
        } else {
            (stragglers_left > 0).then(|| format!("{stragglers_left} record(s) still under a key this run must replace"))
        },
    });
    let rate = p.error_rate();
    checks.push(GateCheck {
        name: "decrypt_error_rate",
        passed: rate < s.max_error_rate,
        figures: json!({"errors": p.n_errors, "attempted": p.n_rotated + p.n_errors, "rate": rate, "threshold": s.max_error_rate}),
        reason: (rate >= s.max_error_rate).then(|| {
            format!("{:.4}% of decrypts failed ({} of {}), threshold {:.4}%", rate * 100.0, p.n_errors, p.n_rotated + p.n_errors, s.max_error_rate * 100.0)
        }),
    });
    let audit = c
        .query_one(
            "SELECT COALESCE(sum(a.n_ops) FILTER (WHERE a.operation = 'encrypt' AND a.success), 0)::int8,
                    COALESCE(sum(a.n_ops) FILTER (WHERE a.operation = 'decrypt' AND NOT a.success), 0)::int8,
                    COALESCE(sum(a.n_ops) FILTER (WHERE a.operation = 'decrypt' AND a.success), 0)::int8
               FROM rekey.audit_log a JOIN rekey.batches b ON b.run_id = a.run_id AND b.batch_no = a.batch_no
              WHERE a.run_id = $1 AND b.stage_no = $2",
            &[&run.id, &stage_no],
        )
        .await?;
    let (enc, dec_fail, dec_ok): (i64, i64, i64) = (audit.get(0), audit.get(1), audit.get(2));
    let gap: f64 = c
        .query_one(
            "WITH st AS (SELECT started_at FROM rekey.stages WHERE run_id = $1 AND stage_no = $2),
                  ts AS (SELECT at FROM rekey.audit_log WHERE run_id = $1 AND at >= (SELECT started_at FROM st)
                         UNION ALL SELECT started_at FROM st UNION ALL SELECT clock_timestamp())
             SELECT COALESCE(EXTRACT(EPOCH FROM max(d)), 0)::float8
               FROM (SELECT at - lag(at) OVER (ORDER BY at) AS d FROM ts) x",
            &[&run.id, &stage_no],
        )
        .await?
        .get(0);
    let counts_ok = enc == p.n_rotated && dec_ok == p.n_rotated && dec_fail == p.n_errors;
    let gap_ok = gap <= s.max_audit_gap_secs;
    checks.push(GateCheck {
        name: "audit_completeness",
        passed: counts_ok && gap_ok,
        figures: json!({
            "ledger_rotated": p.n_rotated, "audited_encrypts": enc, "audited_decrypts": dec_ok,
            "ledger_errors": p.n_errors, "audited_decrypt_failures": dec_fail,
            "max_gap_secs": gap, "max_gap_allowed_secs": s.max_audit_gap_secs
        }),
        reason: if !counts_ok {
            Some(format!(
                "audit counts {enc} encrypts / {dec_fail} failed decrypts, ledger {} / {}",
                p.n_rotated, p.n_errors
            ))
        } else {
            (!gap_ok).then(|| {
                format!(
                    "a gap of {gap:.0} s between audit entries (over {:.0} s)",
                    s.max_audit_gap_secs
                )
            })
        },
    });
    checks.push(GateCheck {
        name: "performance_impact",
        passed: !perf.breached,
        figures: serde_json::to_value(perf)?,
        reason: perf.breached.then(|| {
            format!(
                "probe latency over {:.0}% above the baseline for {} samples in a row",
                s.breach_pct, perf.max_consecutive_over_breach
            )
        }),
    });
    Ok(GateDecision {
        passed: checks.iter().all(|c| c.passed),
        checks,
        sweeps,
    })
}

/// Why a stage cannot be promoted now, or `None` when it can.
pub fn promotion_refusal(
    stage: &ledger::Stage,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    match stage.state {
        StageState::Observing => match stage.observe_until {
            Some(until) if now < until => Some(format!(
                "stage {} ({}%) is under observation until {} ({} s from now)",
                stage.stage_no,
                stage.percent,
                until.format("%Y-%m-%d %H:%M:%S UTC"),
                (until - now).num_seconds()
            )),
            _ => None,
        },
        StageState::Passed => Some(format!("stage {} has already passed", stage.stage_no)),
        StageState::Breached => Some(format!(
            "stage {} breached its gates; resume or roll back the run",
            stage.stage_no
        )),
        other @ (StageState::Pending | StageState::Running | StageState::Gating) => Some(format!(
            "stage {} ({}%) is {other}: its gates have not passed yet",
            stage.stage_no, stage.percent
        )),
    }
}

/// Passes the observed stage and moves the run on (or completes it after the last stage),
/// in one transaction. Returns false when the stage cannot be promoted (yet).
pub async fn advance(
    pool: &Pool,
    run: &Run,
    stage_no: i32,
    actor: &str,
    how: &str,
) -> anyhow::Result<bool> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let n = ledger::pass_stage(&*tx, run.id, stage_no).await?;
    if n == 0 {
        return Ok(false);
    }
    let last = stage_no as usize + 1 >= run.stages.len();
    if last {
        ledger::set_run_state(&*tx, run.id, RunState::Completed, None).await?;
    } else {
        ledger::advance_stage(&*tx, run.id, stage_no).await?;
    }
    audit::record(
        &*tx,
        &[AuditEntry::run_event(
            run.id,
            run.target_key_id,
            how,
            true,
            actor,
            json!({"stage_no": stage_no, "percent": run.stages[stage_no as usize], "last": last}),
        )],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotion_is_refused_until_the_observation_ends() {
        let now = chrono::Utc::now();
        let mut st = ledger::Stage {
            run_id: 1,
            stage_no: 0,
            percent: 1,
            state: StageState::Running,
            started_at: None,
            gated_at: None,
            observe_until: None,
            finished_at: None,
            gate: None,
        };
        assert!(
            promotion_refusal(&st, now)
                .unwrap()
                .contains("gates have not passed")
        );
        st.state = StageState::Observing;
        st.observe_until = Some(now + chrono::Duration::hours(24));
        assert!(
            promotion_refusal(&st, now)
                .unwrap()
                .contains("under observation until")
        );
        st.observe_until = Some(now - chrono::Duration::seconds(1));
        assert!(promotion_refusal(&st, now).is_none());
    }
}
