//! Starting, pausing, resuming and inspecting rotation runs. Every decision is taken from
//! the ledger; `resume` recomputes everything from it and never trusts broker state.

use std::time::Duration;

use anyhow::{Context, bail};
use deadpool_postgres::Pool;
use rekey_common::Settings;
use rekey_common::keys::master::MasterKey;
use rekey_common::keys::{KeyKind, KeyState, store};
use rekey_common::ledger::{self, NewRun, Progress, Run, RunKind, RunState};
use serde::Serialize;
use uuid::Uuid;

use crate::plan;

/// What `rekey rotate` was asked for.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    pub batch_size: i64,
    pub dry_run: bool,
    /// Rotate to this key (pending or active field key); default: the newest pending
    /// field key, or a new one.
    pub target_key: Option<Uuid>,
    pub seed: Option<i64>,
}

impl Default for RotateOptions {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            dry_run: false,
            target_key: None,
            seed: None,
        }
    }
}

/// Chooses the target key, makes it active for new writes (unless a dry run), records the
/// run, plans its batches into the ledger and marks it running. Nothing is published yet.
pub async fn start_rotation(
    pool: &Pool,
    settings: &Settings,
    master: &MasterKey,
    opts: &RotateOptions,
) -> anyhow::Result<Run> {
    if opts.batch_size < 1 {
        bail!("--batch-size must be at least 1");
    }
    let mut client = pool.get().await?;
    // Every stored key must unwrap before anything changes.
    store::load_ring(&**client, master)
        .await
        .context("load the key ring")?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('rekey keys'))", &[])
        .await?;
    let previous = store::active(&*tx, KeyKind::Field).await?;
    let target = match opts.target_key {
        Some(id) => {
            let k = store::get(&*tx, id).await?;
            if k.kind != KeyKind::Field || !matches!(k.state, KeyState::Pending | KeyState::Active)
            {
                bail!(
                    "target key {id} must be a pending or active field key; it is a {} {} key",
                    k.state,
                    k.kind
                );
            }
            k
        }
        None => {
            let newest_pending = store::list(&*tx)
                .await?
                .into_iter()
                .filter(|k| k.kind == KeyKind::Field && k.state == KeyState::Pending)
                .max_by_key(|k| k.created_at);
            match newest_pending {
                Some(k) => k,
                None => {
                    store::generate(
                        &tx,
                        master,
                        KeyKind::Field,
                        "rotation target",
                        &settings.key_policy,
                        &settings.actor,
                    )
                    .await?
                }
            }
        }
    };
    if !opts.dry_run {
        store::activate(&tx, target.id, &settings.actor).await?;
    }
    let seed = opts.seed.unwrap_or_else(rand::random);
    let run = ledger::create_run(
        &*tx,
        &NewRun {
            kind: if opts.dry_run {
                RunKind::DryRun
            } else {
                RunKind::Rotation
            },
            target_key_id: target.id,
            previous_key_id: previous.map(|k| k.id).filter(|id| *id != target.id),
            parent_run_id: None,
            targets: settings.targets.clone(),
            batch_size: i32::try_from(opts.batch_size).context("--batch-size is too large")?,
            seed,
            operator: settings.actor.clone(),
        },
    )
    .await?;
    let plans = plan::plan_stage(&*tx, &settings.targets, 0, opts.batch_size).await?;
    ledger::insert_batches(&*tx, run.id, &plans).await?;
    let planned_rows: i64 = {
        let mut n = 0;
        for t in &settings.targets {
            let c: i64 = tx
                .query_one(&format!("SELECT count(*) FROM {}", t.quoted_table()), &[])
                .await?
                .get(0);
            n += c;
        }
        n
    };
    tx.execute(
        "UPDATE rekey.runs SET settings = settings || jsonb_build_object('planned_rows', $2::int8) WHERE id = $1",
        &[&run.id, &planned_rows],
    )
    .await?;
    ledger::set_run_state(&*tx, run.id, RunState::Running, None).await?;
    tx.commit().await?;
    tracing::info!(run_id = run.id, target_key = %target.id, n_batches = plans.len(), planned_rows, dry_run = opts.dry_run, "run planned");
    Ok(ledger::get_run(&**client, run.id)
        .await?
        .expect("just created"))
}

/// Pauses a running run: the coordinator stops publishing, workers hand back the batches
/// they receive, and `resume` carries on.
pub async fn pause(pool: &Pool, run_id: i64) -> anyhow::Result<Run> {
    let client = pool.get().await?;
    let run = ledger::get_run(&**client, run_id)
        .await?
        .with_context(|| format!("no run {run_id}"))?;
    if run.state != RunState::Running {
        bail!(
            "run {run_id} is {}; only a running run can be paused",
            run.state
        );
    }
    ledger::set_run_state(&**client, run_id, RunState::Paused, None).await?;
    Ok(ledger::get_run(&**client, run_id).await?.expect("exists"))
}

/// Makes a paused, halted or interrupted run runnable again. Batches marked published
/// are published again (a duplicate message is harmless: the worker finds it done).
pub async fn resume(pool: &Pool, run_id: i64) -> anyhow::Result<Run> {
    let client = pool.get().await?;
    let run = ledger::get_run(&**client, run_id)
        .await?
        .with_context(|| format!("no run {run_id}"))?;
    if run.state.is_final() {
        bail!("run {run_id} is {}; there is nothing to resume", run.state);
    }
    client
        .execute(
            "UPDATE rekey.batches SET state = 'pending', lease_until = NULL WHERE run_id = $1 AND state = 'published'",
            &[&run_id],
        )
        .await?;
    ledger::set_run_state(&**client, run_id, RunState::Running, None).await?;
    client
        .execute(
            "UPDATE rekey.runs SET halt_reason = NULL WHERE id = $1",
            &[&run_id],
        )
        .await?;
    Ok(ledger::get_run(&**client, run_id).await?.expect("exists"))
}

/// A failed batch and why.
#[derive(Debug, Clone, Serialize)]
pub struct FailedBatch {
    pub batch_no: i64,
    pub table: String,
    pub id_lo: i64,
    pub id_hi: i64,
    pub attempts: i32,
    pub error: Option<String>,
}

/// Values that failed to decrypt in a run, per table and column.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorCount {
    pub table: String,
    pub column: String,
    pub error_kind: String,
    pub n_values: i64,
}

/// Everything `rekey status RUN` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub run: Run,
    pub progress: Progress,
    pub decrypt_error_rate: f64,
    pub failed_batches: Vec<FailedBatch>,
    pub decrypt_errors: Vec<ErrorCount>,
    pub elapsed_secs: Option<f64>,
}

pub async fn status(pool: &Pool, run_id: i64) -> anyhow::Result<Status> {
    let client = pool.get().await?;
    let run = ledger::get_run(&**client, run_id)
        .await?
        .with_context(|| format!("no run {run_id}"))?;
    let progress = ledger::progress(&**client, run_id).await?;
    let failed_batches = client
        .query(
            "SELECT batch_no, table_name, id_lo, id_hi, attempts, error FROM rekey.batches
              WHERE run_id = $1 AND state = 'failed' ORDER BY batch_no LIMIT 100",
            &[&run_id],
        )
        .await?
        .iter()
        .map(|r| FailedBatch {
            batch_no: r.get(0),
            table: r.get(1),
            id_lo: r.get(2),
            id_hi: r.get(3),
            attempts: r.get(4),
            error: r.get(5),
        })
        .collect();
    let decrypt_errors = client
        .query(
            "SELECT table_name, column_name, error_kind, count(*) FROM rekey.decrypt_errors
              WHERE run_id = $1 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            &[&run_id],
        )
        .await?
        .iter()
        .map(|r| ErrorCount {
            table: r.get(0),
            column: r.get(1),
            error_kind: r.get(2),
            n_values: r.get(3),
        })
        .collect();
    let elapsed_secs = run.started_at.map(|s| {
        let end = run.finished_at.unwrap_or_else(chrono::Utc::now);
        (end - s).num_milliseconds() as f64 / 1000.0
    });
    Ok(Status {
        decrypt_error_rate: progress.error_rate(),
        run,
        progress,
        failed_batches,
        decrypt_errors,
        elapsed_secs,
    })
}

/// Prints a status for people.
pub fn print_status(s: &Status) {
    let r = &s.run;
    let p = &s.progress;
    println!(
        "run {} ({}) {}{}",
        r.id,
        r.kind.as_str(),
        r.state,
        r.halt_reason
            .as_deref()
            .map(|h| format!(": {h}"))
            .unwrap_or_default()
    );
    println!("  target key   {}", r.target_key_id);
    if let Some(prev) = r.previous_key_id {
        println!("  previous key {prev}");
    }
    println!(
        "  batches      {} total: {} done, {} published, {} pending, {} failed",
        p.n_batches, p.done, p.published, p.pending, p.failed
    );
    println!(
        "  values       {} rows, {} values: {} rotated, {} already on target, {} null, {} decrypt errors ({:.4}%)",
        p.n_rows,
        p.n_values,
        p.n_rotated,
        p.n_skipped,
        p.n_null,
        p.n_errors,
        s.decrypt_error_rate * 100.0
    );
    if let Some(e) = s.elapsed_secs {
        println!(
            "  elapsed      {e:.1} s ({:.0} rows/s)",
            p.n_rows as f64 / e.max(0.001)
        );
    }
    for f in &s.failed_batches {
        println!(
            "  failed batch {} ({} ids {}..={}, {} attempts): {}",
            f.batch_no,
            f.table,
            f.id_lo,
            f.id_hi,
            f.attempts,
            f.error.as_deref().unwrap_or("-")
        );
    }
    for e in &s.decrypt_errors {
        println!(
            "  undecryptable {}.{} ({}): {} values, see rekey.decrypt_errors",
            e.table, e.column, e.error_kind, e.n_values
        );
    }
}

/// Default tick of `status --watch`.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);
