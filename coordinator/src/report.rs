//! Evidence reports: everything the playbook's evidence list names, as JSON, written to
//! `exports/rotation_reports/<database>-run-<id>.json` at every stage end and at the end of a run, and
//! kept in `rekey.reports` as well (one row per writing). The schema is
//! `docs/report.schema.json`; tests validate every report against it.

use std::path::PathBuf;

use anyhow::Context;
use deadpool_postgres::Pool;
use rekey_common::Settings;
use rekey_common::ledger::{self, RunKind};
use serde_json::{Value, json};

/// The report's schema version.
pub const SCHEMA_VERSION: i64 = 1;

/// Builds the report of run `run_id` from the ledger and the audit log.
pub async fn build(pool: &Pool, run_id: i64, reason: &str) -> anyhow::Result<Value> {
    let c = pool.get().await?;
    let run = ledger::get_run(&**c, run_id)
        .await?
        .with_context(|| format!("no run {run_id}"))?;
    let total = ledger::progress(&**c, run_id).await?;
    let mut stages = Vec::new();
    let mut audit_complete = true;
    for s in ledger::stages(&**c, run_id).await? {
        let p = ledger::progress_of(&**c, run_id, Some(s.stage_no)).await?;
        let duration = match (s.started_at, s.finished_at.or(s.gated_at)) {
            (Some(a), Some(b)) => Some((b - a).num_milliseconds() as f64 / 1000.0),
            _ => None,
        };
        let audit_check = s
            .gate
            .as_ref()
            .and_then(|g| g.get("checks"))
            .and_then(|c| c.as_array())
            .and_then(|cs| cs.iter().find(|c| c["name"] == "audit_completeness"))
            .map(|c| c["passed"].as_bool().unwrap_or(false));
        if audit_check == Some(false) {
            audit_complete = false;
        }
        stages.push(json!({
            "stage_no": s.stage_no,
            "percent": s.percent,
            "state": s.state,
            "started_at": s.started_at,
            "gated_at": s.gated_at,
            "observe_until": s.observe_until,
            "finished_at": s.finished_at,
            "duration_secs": duration,
            "counts": counts(&p, run.kind == RunKind::DryRun),
            "decrypt_error_rate": p.error_rate(),
            "gate": s.gate,
        }));
    }
    let decrypt_errors: Vec<Value> = c
        .query(
            "SELECT table_name, column_name, error_kind, count(*) FROM rekey.decrypt_errors WHERE run_id = $1 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            &[&run_id],
        )
        .await?
        .iter()
        .map(|r| json!({"table": r.get::<_, String>(0), "column": r.get::<_, String>(1), "error_kind": r.get::<_, String>(2), "values": r.get::<_, i64>(3)}))
        .collect();
    let actions: Vec<Value> = c
        .query(
            "SELECT at, operation, success, actor, detail FROM rekey.audit_log WHERE run_id = $1 AND batch_no IS NULL ORDER BY id",
            &[&run_id],
        )
        .await?
        .iter()
        .map(|r| {
            json!({"at": r.get::<_, chrono::DateTime<chrono::Utc>>(0), "operation": r.get::<_, String>(1),
                   "success": r.get::<_, bool>(2), "actor": r.get::<_, String>(3), "detail": r.get::<_, Value>(4)})
        })
        .collect();
    let audit_entries: i64 = c
        .query_one(
            "SELECT count(*) FROM rekey.audit_log WHERE run_id = $1",
            &[&run_id],
        )
        .await?
        .get(0);
    let duration = run.started_at.map(|s| {
        (run.finished_at.unwrap_or_else(chrono::Utc::now) - s).num_milliseconds() as f64 / 1000.0
    });
    // The control chain's newest entry: kept with the evidence, outside the database, it
    // shows whether the chain up to it was later rewritten (`rekey audit verify`).
    let chain_head = c
        .query_opt(
            "SELECT last_id, encode(last_hash, 'hex') FROM rekey.audit_head WHERE chain = 'control' AND last_id IS NOT NULL",
            &[],
        )
        .await?
        .map(|r| json!({"entry": r.get::<_, i64>(0), "hash": r.get::<_, String>(1)}));
    Ok(json!({
        "schema_version": SCHEMA_VERSION,
        "generated_at": chrono::Utc::now(),
        "reason": reason,
        "run": {
            "id": run.id,
            "kind": run.kind,
            "state": run.state,
            "halt_reason": run.halt_reason,
            "operator": c.query_one("SELECT operator FROM rekey.runs WHERE id = $1", &[&run_id]).await?.get::<_, String>(0),
            "parent_run_id": run.parent_run_id,
            "created_at": run.created_at,
            "started_at": run.started_at,
            "finished_at": run.finished_at,
            "duration_secs": duration,
        },
        "keys": {
            "before": run.previous_key_id,
            "after": run.target_key_id,
            "rotated_from": run.source_key_ids,
        },
        "targets": run.targets,
        "settings": {
            "stages": run.stages,
            "batch_size": run.batch_size,
            "seed": run.seed,
            "gating": run.settings,
        },
        "totals": {
            "counts": counts(&total, run.kind == RunKind::DryRun),
            "decrypt_error_rate": total.error_rate(),
        },
        "stages": stages,
        "audit": {
            "entries": audit_entries,
            "complete": audit_complete,
            "chain_head": chain_head,
        },
        "decrypt_errors": decrypt_errors,
        "operator_actions": actions,
    }))
}

/// A stage's or the run's counts. A dry run writes nothing: what it counted is what a
/// rotation would rotate, and the report says so (`would_rotate`, no `rotated`).
fn counts(p: &ledger::Progress, dry_run: bool) -> Value {
    let mut v = json!({
        "batches": p.n_batches, "batches_done": p.done, "batches_failed": p.failed,
        "rows": p.n_rows, "values": p.n_values,
        "already_on_target": p.n_skipped, "null": p.n_null, "decrypt_errors": p.n_errors,
    });
    let verb = if dry_run { "would_rotate" } else { "rotated" };
    v[verb] = json!(p.n_rotated);
    v
}

/// Builds the report, writes it to the reports directory and to `rekey.reports`, and
/// returns the file's path.
pub async fn write(
    pool: &Pool,
    settings: &Settings,
    run_id: i64,
    reason: &str,
) -> anyhow::Result<PathBuf> {
    // One writer per run at a time, and each builds its report only once it holds the
    // lock: the coordinator and `rekey promote` may write at the same moment, and without
    // this a report built from the ledger before the other's commit could be stored (and
    // written to the file) after the other's newer one, leaving the evidence stale.
    let mut lock_client = pool.get().await?;
    let lock = lock_client.transaction().await?;
    lock.execute(
        "SELECT pg_advisory_xact_lock(hashtext('rekey report'), $1::int4)",
        &[&i32::try_from(run_id).unwrap_or(i32::MAX)],
    )
    .await?;
    let report = build(pool, run_id, reason).await?;
    lock.execute(
        "INSERT INTO rekey.reports (run_id, reason, report) VALUES ($1, $2, $3)",
        &[&run_id, &reason, &report],
    )
    .await?;
    std::fs::create_dir_all(&settings.reports_dir).with_context(|| {
        format!(
            "create the reports directory {}",
            settings.reports_dir.display()
        )
    })?;
    let path = path(pool, settings, run_id).await?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
    lock.commit().await?;
    tracing::info!(run_id, path = %path.display(), reason, "report written");
    Ok(path)
}

/// Where a run's evidence report is written: `<reports_dir>/<database>-run-<id>.json` (run
/// ids restart in every database: the database's name keeps reports apart).
pub async fn path(pool: &Pool, settings: &Settings, run_id: i64) -> anyhow::Result<PathBuf> {
    let dbname: String = pool
        .get()
        .await?
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    Ok(settings
        .reports_dir
        .join(format!("{dbname}-run-{run_id}.json")))
}
