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
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::ring::KeyRing;
use rekey_common::ledger::{self, BatchPlan, Run, RunState, StageState};
use rekey_common::stages;
use rekey_common::target::{Target, quote_ident};
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
    /// Judgements at which probes over the throttle's threshold slowed the run.
    pub throttled_samples: usize,
    /// The longest gap between publications the throttle paced the stage at (0: never).
    pub max_gap_ms: u64,
    /// The probe's reads' 99th percentile before the run and over the stage (milliseconds),
    /// and its writes'.
    pub baseline_p99_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub write_baseline_p99_ms: Option<f64>,
    pub write_p99_ms: Option<f64>,
    /// A read (a write) slower than this counted against the throttle; how many probes
    /// were taken and how many were over (the throttle holds that share near 1%).
    pub throttle_threshold_ms: Option<f64>,
    pub write_throttle_threshold_ms: Option<f64>,
    pub probes: u64,
    pub probes_over: u64,
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
    reads: crate::probe::Histogram,
    writes: crate::probe::Histogram,
    pub figures: PerfFigures,
}

/// The throttle: how many batches may be in flight and, while pacing, how often one may be
/// published, both set by one level. Level 0 is full speed; each level up to log2(max)
/// halves the batches in flight; past that, at one batch, the gap between publications
/// grows to `GAP_UNIT × (2^x − 1)` x levels past (100 ms, 300 ms, 700 ms, … `MAX_GAP`).
///
/// The level follows the probes one by one. A probe over the threshold (the probe's p99
/// before the run plus the latency budget) raises it by `STEP`; a probe under it lowers
/// it by `STEP × p / (1 − p)`, p = `TARGET_SHARE` (1%). The level comes to rest where 1% of
/// the probes are over the threshold, that is where the probe's p99 is its baseline p99
/// plus the budget: the application's p99 is what the budget is about, and a p99 is moved
/// by rare stalls that a median or a 95th percentile does not see. Heavy impact (one probe
/// in five over) climbs a level every ten probes; clean probes take a level back every 198
/// (10 s at one probe per 50 ms). A stage starts at one batch in flight (a slow start), so
/// that a rotation never opens at full speed on a database it has not measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttle {
    max: i64,
    level: f64,
    pub window: i64,
    pub gap: std::time::Duration,
}

/// The pacing unit and the longest gap between publications.
pub const GAP_UNIT: std::time::Duration = std::time::Duration::from_millis(100);
pub const MAX_GAP: std::time::Duration = std::time::Duration::from_secs(30);
/// What one probe over the threshold adds to the level.
pub const STEP: f64 = 0.5;
/// The share of probes over the threshold the throttle holds a run to.
pub const TARGET_SHARE: f64 = 0.01;

impl Throttle {
    /// A stage's throttle: slow start from one batch when `slow_start`, else from `max`.
    pub fn new(max: i64, slow_start: bool) -> Self {
        let mut t = Self {
            max: max.max(1),
            level: 0.0,
            window: max.max(1),
            gap: std::time::Duration::ZERO,
        };
        if slow_start {
            t.level = t.halvings();
        }
        t.apply();
        t
    }

    /// Levels from `max` batches in flight down to one.
    fn halvings(&self) -> f64 {
        (self.max as f64).log2().ceil()
    }

    /// The highest level: one batch per `MAX_GAP`.
    fn top(&self) -> f64 {
        self.halvings() + (MAX_GAP.as_secs_f64() / GAP_UNIT.as_secs_f64() + 1.0).log2()
    }

    fn apply(&mut self) {
        let h = self.halvings();
        if self.level < h {
            self.window = ((self.max as f64) / self.level.exp2()).floor().max(1.0) as i64;
            self.gap = std::time::Duration::ZERO;
        } else {
            self.window = 1;
            self.gap = GAP_UNIT.mul_f64((self.level - h).exp2() - 1.0).min(MAX_GAP);
        }
    }

    /// After `over` probes over the threshold and `under` probes under it; `in_flight` the
    /// batches in flight now.
    pub fn adjust(&mut self, over: usize, under: usize, in_flight: i64) {
        if over > 0 && self.window > in_flight.max(1) {
            // The window may be far above what the workers take: slowing down starts from
            // what is in flight, not from what is allowed.
            self.level = self
                .level
                .max((self.max as f64 / in_flight.max(1) as f64).log2());
        }
        let down = STEP * TARGET_SHARE / (1.0 - TARGET_SHARE);
        self.level += STEP * over as f64 - down * under as f64;
        self.level = self.level.clamp(0.0, self.top());
        self.apply();
    }

    /// Whether the throttle holds the run below its configured pace.
    pub fn engaged(&self) -> bool {
        self.window < self.max || !self.gap.is_zero()
    }
}

/// Samples over the breach threshold in a row that make a breach ("sustained").
pub const SUSTAINED_SAMPLES: usize = 3;

impl PerfTracker {
    /// Counts the stage's probes one by one against the throttle's threshold for their
    /// kind; returns how many were over it and how many under (both 0 when the throttle is
    /// off).
    pub fn probes(
        &mut self,
        settings: &ledger::RunSettings,
        samples: &[crate::probe::Sample],
    ) -> (usize, usize) {
        let (read_limit, write_limit) = (
            settings.throttle_threshold_ms(false),
            settings.throttle_threshold_ms(true),
        );
        let mut over = 0;
        for s in samples {
            let (h, limit) = if s.write {
                (&mut self.writes, write_limit)
            } else {
                (&mut self.reads, read_limit)
            };
            h.record(s.ms);
            if limit.is_some_and(|l| s.ms > l) {
                over += 1;
            }
        }
        let f = &mut self.figures;
        f.baseline_p99_ms = settings.probe_baseline_p99_ms;
        f.write_baseline_p99_ms = settings.probe_write_baseline_p99_ms;
        f.throttle_threshold_ms = read_limit;
        f.write_throttle_threshold_ms = write_limit.filter(|_| self.writes.count() > 0);
        f.probes = self.reads.count() + self.writes.count();
        f.probes_over += over as u64;
        f.p99_ms = self.reads.quantile(0.99);
        f.write_p99_ms = self.writes.quantile(0.99);
        if over > 0 {
            f.throttled_samples += 1;
        }
        match read_limit {
            Some(_) => (over, samples.len() - over),
            None => (0, 0),
        }
    }

    /// Records a judgement's median (milliseconds) for the breach: its median `breach_pct`
    /// over the baseline (and by more than `min_impact_ms`) for `SUSTAINED_SAMPLES`
    /// judgements in a row. Noise on a busy machine does not move a median; the throttle
    /// answers the tail (`probes`).
    pub fn record(&mut self, settings: &ledger::RunSettings, ms: f64) {
        let baseline = settings.probe_baseline_ms;
        let impact = baseline
            .map(|b| crate::probe::impact_pct(b, ms, settings.min_impact_ms))
            .unwrap_or(0.0);
        self.samples_ms.push(ms);
        self.impacts.push(impact);
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
        f.max_consecutive_over_breach = f
            .max_consecutive_over_breach
            .max(self.consecutive_over_breach);
        if self.consecutive_over_breach >= SUSTAINED_SAMPLES {
            f.breached = true;
        }
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

    fn settings() -> ledger::RunSettings {
        ledger::RunSettings {
            probe_baseline_ms: Some(10.0),
            ..Default::default()
        }
    }

    #[test]
    fn a_median_over_20_percent_for_three_judgements_in_a_row_breaches() {
        let s = settings();
        let mut t = PerfTracker::default();
        t.record(&s, 11.0);
        assert!(
            t.figures.impact_pct == 0.0,
            "+10% (1 ms, under the noise floor) is no impact"
        );
        // Over 20% twice, a normal sample, then three in a row: only the last is a breach.
        t.record(&s, 13.0);
        t.record(&s, 13.0);
        t.record(&s, 10.0);
        assert!(!t.figures.breached);
        t.record(&s, 13.0);
        t.record(&s, 13.0);
        assert!(!t.figures.breached);
        t.record(&s, 13.0);
        assert!(t.figures.breached);
        assert_eq!(t.figures.max_consecutive_over_breach, SUSTAINED_SAMPLES);
    }

    #[test]
    fn probes_count_against_their_kinds_baseline_p99_plus_the_budget() {
        use crate::probe::Sample;
        let read = |ms| Sample { ms, write: false };
        let write = |ms| Sample { ms, write: true };
        let s = ledger::RunSettings {
            probe_baseline_ms: Some(0.3),
            probe_baseline_p99_ms: Some(2.0),
            probe_write_baseline_p99_ms: Some(6.0),
            ..Default::default()
        };
        // 15% of the probe's own 2 ms p99 is 0.3 ms, under the 0.5 ms floor.
        assert_eq!(s.throttle_threshold_ms(false), Some(2.5));
        assert_eq!(
            s.throttle_threshold_ms(true),
            Some(6.5),
            "the same budget on writes"
        );
        let app = ledger::RunSettings {
            app_p99_ms: Some(10.0),
            ..s.clone()
        };
        assert_eq!(
            app.throttle_threshold_ms(false),
            Some(3.5),
            "15% of the application's 10 ms"
        );
        let mut t = PerfTracker::default();
        assert_eq!(
            t.probes(
                &s,
                &[read(0.3), read(2.4), read(2.6), write(6.0), write(9.0)]
            ),
            (2, 3),
            "a read at 2.6 ms and a write at 9 ms are over; a write at 6 ms is not"
        );
        let clean: Vec<Sample> = (0..95)
            .map(|i| if i % 2 == 0 { read(0.3) } else { write(1.0) })
            .collect();
        assert_eq!(t.probes(&s, &clean), (0, 95));
        assert_eq!((t.figures.probes, t.figures.probes_over), (100, 2));
        assert_eq!(t.figures.throttled_samples, 1);
        assert_eq!(t.figures.write_throttle_threshold_ms, Some(6.5));
        let p99 = t.figures.p99_ms.unwrap();
        assert!((2.6..2.9).contains(&p99), "p99 of the stage's reads: {p99}");
        let off = ledger::RunSettings {
            throttle_pct: 0.0,
            ..s.clone()
        };
        assert_eq!(off.throttle_threshold_ms(false), None);
        assert_eq!(
            t.probes(&off, &[read(50.0)]),
            (0, 0),
            "a throttle_pct of 0 turns it off"
        );
        assert_eq!(
            ledger::RunSettings::default().throttle_threshold_ms(false),
            None,
            "without a baseline nothing throttles"
        );
        // A run planned before writes were probed: its writes are judged on the reads' p99.
        let old = ledger::RunSettings {
            probe_write_baseline_p99_ms: None,
            ..s
        };
        assert_eq!(old.throttle_threshold_ms(true), Some(2.5));
    }

    #[test]
    fn the_throttle_halves_what_is_in_flight_then_paces_and_recovers_slowly() {
        use std::time::Duration;
        let mut t = Throttle::new(64, false);
        assert!(!t.engaged());
        assert_eq!((t.window, t.gap), (64, Duration::ZERO));
        // 64 allowed, 4 actually in flight: the first probe over starts from 4, not 64.
        t.adjust(1, 0, 4);
        assert_eq!((t.window, t.gap), (2, Duration::ZERO));
        t.adjust(2, 0, 2);
        assert_eq!((t.window, t.gap), (1, Duration::ZERO));
        t.adjust(1, 0, 1);
        assert_eq!(
            (t.window, t.gap),
            (1, Duration::ZERO),
            "one batch, not yet paced"
        );
        t.adjust(2, 0, 1);
        assert_eq!(t.gap, GAP_UNIT, "one level past one batch: 100 ms");
        t.adjust(2, 0, 1);
        assert_eq!(t.gap, GAP_UNIT * 3);
        for _ in 0..20 {
            t.adjust(5, 0, 1);
        }
        assert_eq!(t.gap, MAX_GAP, "the gap is capped");
        // One probe over in a hundred holds the level where it is.
        let held = t.clone();
        t.adjust(1, 99, 1);
        assert!((t.level - held.level).abs() < 1e-9);
        // Clean probes take a level back every 198 probes: from the top to full speed
        // takes 198 × (8.2 + 6) probes, about 2,800, not one judgement.
        t.adjust(0, 198, 1);
        assert!(t.gap < MAX_GAP && t.gap > MAX_GAP / 3, "{:?}", t.gap);
        let mut probes = 198;
        while t.engaged() {
            t.adjust(0, 40, 1);
            probes += 40;
        }
        assert!((2_700..2_900).contains(&probes), "{probes} probes");
        assert_eq!((t.window, t.gap), (64, Duration::ZERO));
    }

    #[test]
    fn under_steady_impact_the_share_of_probes_over_settles_near_one_percent() {
        // A stand-in for the database: each batch in flight or paced adds a stall to some
        // probes; the share of slow probes falls as the throttle paces.
        let mut t = Throttle::new(8, true);
        let mut over_total = 0;
        let mut total = 0;
        let mut rng = 12345u64;
        for judgement in 0..2_000 {
            // The share of probes stalled: 30% at full speed (1 batch per 100 ms of
            // work), falling with the duty cycle.
            let busy = 0.1 * t.window as f64;
            let duty = busy / (busy + t.gap.as_secs_f64());
            let share = 0.3 * duty.min(1.0);
            let mut over = 0;
            for _ in 0..40 {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if ((rng >> 11) as f64 / (1u64 << 53) as f64) < share {
                    over += 1;
                }
            }
            t.adjust(over, 40 - over, t.window);
            if judgement >= 500 {
                over_total += over;
                total += 40;
            }
        }
        let share = over_total as f64 / total as f64;
        assert!(
            (0.007..0.014).contains(&share),
            "share of probes over: {share}"
        );
        assert!(t.gap > std::time::Duration::from_secs(2), "{:?}", t.gap);
    }

    #[test]
    fn a_stage_starts_slowly_at_one_batch_in_flight() {
        let mut t = Throttle::new(64, true);
        assert_eq!((t.window, t.gap), (1, std::time::Duration::ZERO));
        assert!(t.engaged());
        // Two levels of clean probes later: four batches.
        t.adjust(0, 396, 1);
        assert_eq!(t.window, 4);
    }

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
