//! Stage gates, observation and promotion. When a stage's batches are done the coordinator
//! proves coverage (no record of the stage left under a key it should have left, except
//! quarantined values; stragglers are re-batched), checks the decrypt error rate, audit
//! completeness and performance impact, and records the decision with its figures. Then
//! it observes the stage, re-reading and decrypting samples of rotated rows, until the
//! observation period ends and the stage is promoted.

use anyhow::Context;
use deadpool_postgres::Pool;
use rand::RngExt;
use rekey_common::audit::{self, AuditEntry};
use rekey_common::config::{Target, quote_ident};
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::ring::KeyRing;
use rekey_common::ledger::{self, BatchPlan, Run, RunState};
use rekey_common::stages;
use serde::Serialize;
use serde_json::json;
use tokio_postgres::GenericClient;

/// The SQL condition "this value still needs rotating" for column `c` of the run; `$1` is
/// the target key id (bytea) or, for a rollback, the source key ids (bytea[]).
fn needs_rotation(col: &str, run: &Run) -> String {
    let header = format!("substring({col} from 2 for 16)");
    match &run.source_key_ids {
        Some(_) => format!("({col} IS NOT NULL AND {header} = ANY($1::bytea[]))"),
        None => format!("({col} IS NOT NULL AND {header} IS DISTINCT FROM $1::bytea)"),
    }
}

/// Ids of rows of stages up to `stage_no` that still hold a value to rotate, apart from
/// values quarantined in the error table.
pub async fn stragglers<C: GenericClient>(
    c: &C,
    run: &Run,
    target: &Target,
    stage_no: i32,
) -> anyhow::Result<Vec<i64>> {
    let (_, hi) = stages::bucket_range(&run.stages, stage_no).context("stage out of range")?;
    let id = quote_ident(&target.id_column);
    let conds: Vec<String> = target
        .columns
        .iter()
        .map(|col| {
            let q = quote_ident(col);
            format!(
                "({} AND NOT EXISTS (SELECT 1 FROM rekey.decrypt_errors e WHERE e.run_id = $2 AND e.table_name = $3
                   AND e.column_name = '{}' AND e.row_id = t.{id}::text))",
                needs_rotation(&format!("t.{q}"), run),
                col
            )
        })
        .collect();
    let bucket = stages::bucket_sql(&format!("t.{id}"), "$4");
    let sql = format!(
        "SELECT t.{id} FROM {} t WHERE {bucket} < $5::int4 AND ({}) ORDER BY t.{id}",
        target.quoted_table(),
        conds.join(" OR ")
    );
    let target_key = run.target_key_id.as_bytes().to_vec();
    let sources: Vec<Vec<u8>> = run
        .source_key_ids
        .iter()
        .flatten()
        .map(|k| k.as_bytes().to_vec())
        .collect();
    let keys: &(dyn tokio_postgres::types::ToSql + Sync) = if run.source_key_ids.is_some() {
        &sources
    } else {
        &target_key
    };
    let rows = c
        .query(&sql, &[keys, &run.id, &target.table, &run.seed, &hi])
        .await
        .with_context(|| format!("coverage sweep of {}", target.table))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Cuts straggler ids into sweep batches of at most `batch_size` ids each.
pub fn sweep_batches(table: &str, stage_no: i32, ids: &[i64], batch_size: usize) -> Vec<BatchPlan> {
    ids.chunks(batch_size.max(1))
        .map(|chunk| BatchPlan {
            stage_no,
            table: table.to_owned(),
            id_lo: chunk[0],
            id_hi: *chunk.last().expect("non-empty chunk"),
            cumulative: true,
        })
        .collect()
}

/// Performance figures of a stage, collected by the driver while the stage ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PerfFigures {
    pub baseline_ms: Option<f64>,
    pub samples: usize,
    pub median_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub impact_pct: f64,
    pub max_impact_pct: f64,
    pub throttled_samples: usize,
    /// The longest gap between publications the throttle paced the stage at (0: never).
    pub max_gap_ms: u64,
    /// Consecutive samples over the breach threshold, at most.
    pub max_consecutive_over_breach: usize,
    pub breached: bool,
}

/// Latency samples of one stage and the throttle decision.
#[derive(Debug, Clone, Default)]
pub struct PerfTracker {
    pub samples_ms: Vec<f64>,
    pub impacts: Vec<f64>,
    consecutive_over_breach: usize,
    pub figures: PerfFigures,
}

/// The throttle's state: how many batches may be in flight, and while pacing, how often one
/// may be published. Each sample over the threshold halves the batches actually in flight
/// (the window may be far above what the workers take), then, at one batch, paces: at most
/// one batch per 200 ms, 400 ms, … 3.2 s. Each good sample undoes one step, the gap first.
/// A stage starts at one batch in flight and doubles while latency stays good (a slow
/// start), so that a rotation never opens at full speed on a database it has not measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttle {
    max: i64,
    pub window: i64,
    pub gap: std::time::Duration,
}

/// The shortest and longest gap between publications when pacing.
pub const MIN_GAP: std::time::Duration = std::time::Duration::from_millis(200);
pub const MAX_GAP: std::time::Duration = std::time::Duration::from_millis(3200);

impl Throttle {
    /// A stage's throttle: slow start from one batch when `slow_start`, else from `max`.
    pub fn new(max: i64, slow_start: bool) -> Self {
        let max = max.max(1);
        Self {
            max,
            window: if slow_start { 1 } else { max },
            gap: std::time::Duration::ZERO,
        }
    }

    /// After a probe sample: `over` whether latency is over the threshold, `in_flight` the
    /// batches in flight now.
    pub fn adjust(&mut self, over: bool, in_flight: i64) {
        if over {
            if self.window > 1 {
                self.window = (self.window.min(in_flight.max(1)) / 2).max(1);
            } else {
                self.gap = (self.gap * 2).clamp(MIN_GAP, MAX_GAP);
            }
        } else if !self.gap.is_zero() {
            self.gap /= 2;
            if self.gap < MIN_GAP {
                self.gap = std::time::Duration::ZERO;
            }
        } else {
            self.window = (self.window * 2).min(self.max);
        }
    }

    /// Whether the throttle holds the run below its configured pace.
    pub fn engaged(&self) -> bool {
        self.window < self.max || !self.gap.is_zero()
    }
}

/// Samples over the breach threshold in a row that make a breach ("sustained").
pub const SUSTAINED_SAMPLES: usize = 3;

impl PerfTracker {
    /// Records a sample (the median and the 95th percentile of its probes); returns whether
    /// the coordinator should throttle now. The throttle answers the tail as well as the
    /// median (the application's p99 suffers first), a breach only the median, which noise
    /// on a busy machine does not move.
    pub fn record(&mut self, settings: &ledger::RunSettings, ms: f64, p95_ms: f64) -> bool {
        let baseline = settings.probe_baseline_ms;
        let impact = baseline
            .map(|b| crate::probe::impact_pct(b, ms, settings.min_impact_ms))
            .unwrap_or(0.0);
        // The throttle's own noise floor: it answers small rises too (the probe's baseline is
        // a fraction of a millisecond), a breach only rises over `min_impact_ms`.
        let floor = settings.throttle_min_ms;
        let throttle_impact = baseline
            .map(|b| crate::probe::impact_pct(b, ms, floor))
            .unwrap_or(0.0);
        let tail_impact = settings
            .probe_baseline_p95_ms
            .map(|b| crate::probe::impact_pct(b, p95_ms, floor))
            .unwrap_or(0.0);
        self.samples_ms.push(ms);
        self.impacts.push(impact);
        let throttle = settings.throttle_pct > 0.0
            && (throttle_impact > settings.throttle_pct || tail_impact > settings.throttle_pct);
        if impact > settings.breach_pct {
            self.consecutive_over_breach += 1;
        } else {
            self.consecutive_over_breach = 0;
        }
        let f = &mut self.figures;
        f.baseline_ms = baseline;
        f.samples = self.samples_ms.len();
        let mut sorted = self.samples_ms.clone();
        sorted.sort_by(f64::total_cmp);
        f.median_ms = Some(sorted[sorted.len() / 2]);
        f.max_ms = sorted.last().copied();
        f.impact_pct = baseline
            .map(|b| crate::probe::impact_pct(b, sorted[sorted.len() / 2], settings.min_impact_ms))
            .unwrap_or(0.0);
        f.max_impact_pct = f.max_impact_pct.max(impact);
        if throttle {
            f.throttled_samples += 1;
        }
        f.max_consecutive_over_breach = f
            .max_consecutive_over_breach
            .max(self.consecutive_over_breach);
        if self.consecutive_over_breach >= SUSTAINED_SAMPLES {
            f.breached = true;
        }
        throttle
    }
}

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

/// What one observation check found.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct ObservationFigures {
    pub checks: u64,
    pub values_read: u64,
    pub failures: u64,
}

/// Re-reads a random sample of rows of stages up to `stage_no` and decrypts every value
/// under the run's target key (what the run wrote, or for a rollback what it restored),
/// apart from values a run already quarantined. Returns (values read, failures with where).
pub async fn observe_sample<C: GenericClient>(
    c: &C,
    run: &Run,
    ring: &KeyRing,
    stage_no: i32,
) -> anyhow::Result<(u64, Vec<String>)> {
    let (_, hi) = stages::bucket_range(&run.stages, stage_no).context("stage out of range")?;
    let mut read = 0;
    let mut failures = Vec::new();
    for t in &run.targets {
        let id = quote_ident(&t.id_column);
        let bounds = c
            .query_one(
                &format!("SELECT min({id}), max({id}) FROM {}", t.quoted_table()),
                &[],
            )
            .await?;
        let (Some(lo), Some(hi_id)) = (
            bounds.get::<_, Option<i64>>(0),
            bounds.get::<_, Option<i64>>(1),
        ) else {
            continue;
        };
        let start = rand::rng().random_range(lo..=hi_id);
        let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
        let sql = format!(
            "SELECT {id}, {} FROM {} WHERE {id} >= $1 AND {} < $2::int4 ORDER BY {id} LIMIT $3",
            cols.join(", "),
            t.quoted_table(),
            stages::bucket_sql(&id, "$4")
        );
        let rows = c
            .query(
                &sql,
                &[&start, &hi, &run.settings.observe_sample, &run.seed],
            )
            .await?;
        for r in &rows {
            let row_id: i64 = r.get(0);
            for (i, col) in t.columns.iter().enumerate() {
                let Some(v) = r.get::<_, Option<Vec<u8>>>(i + 1) else {
                    continue;
                };
                // Only what this run wrote is under observation: values under other keys
                // (quarantined ones, or the values a rollback leaves alone) are not its doing.
                if envelope::key_id(&v).ok() != Some(run.target_key_id) {
                    continue;
                }
                read += 1;
                let loc = FieldLocation {
                    table: &t.table,
                    column: col,
                    row_id,
                };
                if let Err(e) = envelope::open(ring, &loc, &v) {
                    // A value some run already found undecryptable and left alone (a
                    // rollback's target key holds the originals of those) is known, not new.
                    let known: bool = c
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM rekey.decrypt_errors WHERE table_name = $1
                               AND column_name = $2 AND row_id = $3)",
                            &[&t.table, col, &row_id.to_string()],
                        )
                        .await?
                        .get(0);
                    if !known {
                        failures.push(format!("{}.{col} row {row_id}: {e}", t.table));
                    }
                }
            }
        }
    }
    Ok((read, failures))
}

/// Why a stage cannot be promoted now, or `None` when it can.
pub fn promotion_refusal(
    stage: &ledger::Stage,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    match stage.state.as_str() {
        "observing" => match stage.observe_until {
            Some(until) if now < until => Some(format!(
                "stage {} ({}%) is under observation until {} ({} s from now)",
                stage.stage_no,
                stage.percent,
                until.format("%Y-%m-%d %H:%M:%S UTC"),
                (until - now).num_seconds()
            )),
            _ => None,
        },
        "passed" => Some(format!("stage {} has already passed", stage.stage_no)),
        "breached" => Some(format!(
            "stage {} breached its gates; resume or roll back the run",
            stage.stage_no
        )),
        other => Some(format!(
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
    let n = tx
        .execute(
            "UPDATE rekey.stages SET state = 'passed', finished_at = now()
              WHERE run_id = $1 AND stage_no = $2 AND state = 'observing' AND observe_until <= now()",
            &[&run.id, &stage_no],
        )
        .await?;
    if n == 0 {
        return Ok(false);
    }
    let last = stage_no as usize + 1 >= run.stages.len();
    if last {
        ledger::set_run_state(&*tx, run.id, RunState::Completed, None).await?;
    } else {
        tx.execute(
            "UPDATE rekey.runs SET current_stage = $2 WHERE id = $1 AND current_stage = $3",
            &[&run.id, &(stage_no + 1), &stage_no],
        )
        .await?;
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

    fn settings() -> ledger::RunSettings {
        ledger::RunSettings {
            probe_baseline_ms: Some(10.0),
            ..Default::default()
        }
    }

    #[test]
    fn latency_over_15_percent_throttles_and_over_20_percent_sustained_breaches() {
        let s = settings();
        let mut t = PerfTracker::default();
        assert!(
            !t.record(&s, 11.0, 11.0),
            "+10% (1 ms, under the noise floor) is fine"
        );
        assert!(t.record(&s, 11.8 + 2.0, 11.8 + 2.0), "+38% throttles");
        assert!(!t.figures.breached);
        assert!(!t.record(&s, 10.5, 10.5), "back to normal stops throttling");
        // Over 20% twice, a normal sample, then three in a row: only the last is a breach.
        t.record(&s, 13.0, 13.0);
        t.record(&s, 13.0, 13.0);
        t.record(&s, 10.0, 10.0);
        assert!(!t.figures.breached);
        t.record(&s, 13.0, 13.0);
        t.record(&s, 13.0, 13.0);
        assert!(!t.figures.breached);
        t.record(&s, 13.0, 13.0);
        assert!(t.figures.breached);
        assert_eq!(t.figures.max_consecutive_over_breach, SUSTAINED_SAMPLES);
        assert!(t.figures.throttled_samples >= 5);
    }

    #[test]
    fn a_slow_tail_throttles_but_never_breaches() {
        let s = ledger::RunSettings {
            probe_baseline_p95_ms: Some(10.0),
            ..settings()
        };
        let mut t = PerfTracker::default();
        for _ in 0..10 {
            assert!(t.record(&s, 10.0, 30.0), "p95 +200% throttles");
        }
        assert!(!t.figures.breached, "the median did not move");
        assert!(!t.record(&s, 10.0, 11.0), "p95 back to normal");
    }

    #[test]
    fn the_throttle_halves_what_is_in_flight_then_paces_and_recovers_step_by_step() {
        use std::time::Duration;
        let mut t = Throttle::new(64, false);
        assert!(!t.engaged());
        // 64 allowed, 4 actually in flight: the first step is to 2, not to 32.
        t.adjust(true, 4);
        assert_eq!((t.window, t.gap), (2, Duration::ZERO));
        t.adjust(true, 2);
        assert_eq!(t.window, 1);
        t.adjust(true, 1);
        assert_eq!(t.gap, MIN_GAP);
        for _ in 0..10 {
            t.adjust(true, 1);
        }
        assert_eq!(t.gap, MAX_GAP, "the gap is capped");
        // Good samples take the gap back first (3.2 s → 1.6 → 0.8 → 0.4 → 0.2 → none),
        // then double the window.
        for _ in 0..5 {
            assert!(t.gap > Duration::ZERO);
            t.adjust(false, 1);
        }
        assert_eq!((t.window, t.gap), (1, Duration::ZERO));
        t.adjust(false, 1);
        assert_eq!(t.window, 2);
        for _ in 0..10 {
            t.adjust(false, 2);
        }
        assert_eq!(t.window, 64);
        assert!(!t.engaged());
    }

    #[test]
    fn a_stage_starts_slowly_at_one_batch_in_flight() {
        let mut t = Throttle::new(64, true);
        assert_eq!(t.window, 1);
        assert!(t.engaged());
        t.adjust(false, 1);
        t.adjust(false, 2);
        assert_eq!(t.window, 4);
    }

    #[test]
    fn small_rises_throttle_but_only_rises_over_the_noise_floor_breach() {
        let s = ledger::RunSettings {
            probe_baseline_ms: Some(0.15),
            probe_baseline_p95_ms: Some(0.35),
            ..Default::default()
        };
        let mut t = PerfTracker::default();
        assert!(!t.record(&s, 0.16, 0.40), "+0.05 ms is noise");
        for _ in 0..5 {
            assert!(t.record(&s, 0.9, 1.5), "+0.75 ms on the median throttles");
        }
        assert!(!t.figures.breached, "under the 2 ms breach floor");
        let off = ledger::RunSettings {
            throttle_pct: 0.0,
            ..s
        };
        assert!(
            !t.record(&off, 5.0, 9.0),
            "a throttle_pct of 0 turns the throttle off"
        );
    }

    #[test]
    fn without_a_baseline_nothing_throttles() {
        let s = ledger::RunSettings::default();
        let mut t = PerfTracker::default();
        assert!(!t.record(&s, 1000.0, 1000.0));
        assert!(!t.figures.breached);
    }

    #[test]
    fn promotion_is_refused_until_the_observation_ends() {
        let now = chrono::Utc::now();
        let mut st = ledger::Stage {
            run_id: 1,
            stage_no: 0,
            percent: 1,
            state: "running".into(),
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
        st.state = "observing".into();
        st.observe_until = Some(now + chrono::Duration::hours(24));
        assert!(
            promotion_refusal(&st, now)
                .unwrap()
                .contains("under observation until")
        );
        st.observe_until = Some(now - chrono::Duration::seconds(1));
        assert!(promotion_refusal(&st, now).is_none());
    }

    #[test]
    fn sweep_batches_cover_every_straggler_in_ranges_of_at_most_batch_size_ids() {
        let ids: Vec<i64> = (0..25).map(|i| i * 7).collect();
        let b = sweep_batches("demo.users", 2, &ids, 10);
        assert_eq!(b.len(), 3);
        assert!(b.iter().all(|p| p.cumulative && p.stage_no == 2));
        assert_eq!((b[0].id_lo, b[0].id_hi), (0, 63));
        assert_eq!((b[2].id_lo, b[2].id_hi), (140, 168));
    }
}
