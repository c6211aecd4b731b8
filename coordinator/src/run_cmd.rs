//! Starting, pausing, resuming and inspecting rotation runs. Every decision is taken from
//! the ledger; `resume` recomputes everything from it and never trusts broker state.

use crate::events::{Events, RunEvent};
use std::time::Duration;

use anyhow::{Context, bail};
use deadpool_postgres::Pool;
use rekey_common::Settings;
use rekey_common::keys::master::MasterKey;
use rekey_common::keys::{KeyKind, KeyState, store};
use rekey_common::ledger::{
    self, NewRun, Progress, Run, RunKind, RunSettings, RunState, StageState,
};
use serde::Serialize;
use uuid::Uuid;

/// What `rekey rotate` was asked for.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    pub batch_size: i64,
    pub dry_run: bool,
    /// Rotate to this key (pending or active field key); default: the newest pending
    /// field key, or a new one.
    pub target_key: Option<Uuid>,
    pub seed: Option<i64>,
    /// Cumulative percentages of records per stage, ending at 100.
    pub stages: Vec<i32>,
    /// Gating and observation settings.
    pub gating: RunSettings,
    /// How long a new key stays pending before it becomes active: at least the interval
    /// at which applications reload their key ring.
    pub key_propagation: std::time::Duration,
}

impl Default for RotateOptions {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            dry_run: false,
            target_key: None,
            seed: None,
            stages: vec![100],
            key_propagation: std::time::Duration::ZERO,
            gating: RunSettings {
                observe_first_secs: 0,
                observe_secs: 0,
                auto_advance: true,
                ..Default::default()
            },
        }
    }
}

/// A new field key for a rotation to target, published as pending.
async fn new_target_key(
    tx: &tokio_postgres::Transaction<'_>,
    master: &MasterKey,
    settings: &Settings,
) -> anyhow::Result<store::KeyRecord> {
    Ok(store::generate(
        tx,
        master,
        KeyKind::Field,
        "rotation target",
        &settings.key_policy,
        &settings.actor,
    )
    .await?)
}

/// Chooses the target key, makes it active for new writes (unless a dry run), records the
/// run, plans its batches into the ledger and marks it running. Nothing is published yet.
pub async fn start_rotation(
    pool: &Pool,
    settings: &Settings,
    master: &MasterKey,
    opts: &RotateOptions,
) -> anyhow::Result<Run> {
    start_rotation_with(&Events::default(), pool, settings, master, opts).await
}

/// [`start_rotation`], saying its events (`planned`, the first `stage_started`) to `events`.
pub async fn start_rotation_with(
    events: &Events,
    pool: &Pool,
    settings: &Settings,
    master: &MasterKey,
    opts: &RotateOptions,
) -> anyhow::Result<Run> {
    settings.require_targets()?;
    if opts.batch_size < 1 {
        bail!("--batch-size must be at least 1");
    }
    rekey_common::stages::validate(&opts.stages).map_err(|e| anyhow::anyhow!("--stages: {e}"))?;
    if opts.dry_run && opts.stages != [100] {
        bail!("a dry run covers 100% of records in one stage; leave --stages out");
    }
    let mut client = pool.get().await?;
    // Every stored key must unwrap before anything changes.
    store::load_ring(&**client, master)
        .await
        .context("load the key ring")?;
    // Tables whose columns rekey cannot rotate are refused before a key is generated.
    let problems = rekey_common::target::schema_problems(&**client, &settings.targets).await?;
    if !problems.is_empty() {
        bail!(
            "the [[targets]] cannot be rotated: {}; nothing was changed",
            problems.join("; ")
        );
    }
    // A new key is first published as pending, which every reader can already decrypt
    // with, and made active only once readers have had `key_propagation` to load it, so
    // that no reader meets a value under a key it does not know.
    if opts.target_key.is_none() {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext('rekey keys'))", &[])
            .await?;
        let has_pending = store::list(&*tx)
            .await?
            .iter()
            .any(|k| k.kind == KeyKind::Field && k.state == KeyState::Pending);
        if !has_pending {
            let k = new_target_key(&tx, master, settings).await?;
            tracing::info!(key_id = %k.id, "new field key published as pending");
        }
        tx.commit().await?;
    }
    if !opts.dry_run {
        let wait: f64 = client
            .query_one(
                "SELECT COALESCE(max(EXTRACT(EPOCH FROM (created_at + make_interval(secs => $2) - now()))), 0)::float8
                   FROM rekey.keys WHERE kind = 'field' AND state = 'pending' AND ($1::uuid IS NULL OR id = $1)",
                &[&opts.target_key, &opts.key_propagation.as_secs_f64()],
            )
            .await?
            .get(0);
        if wait > 0.0 {
            tracing::info!(
                wait_secs = wait,
                "waiting for readers to load the pending key before it becomes active"
            );
            tokio::time::sleep(std::time::Duration::from_secs_f64(wait)).await;
        }
    }
    // The application's latency before the run, the baseline of the performance gate and
    // the throttle: measured before the new key becomes active and outside the transaction
    // that plans the run, which holds the key store's lock.
    let baseline = match opts.gating.probe_baseline_ms {
        Some(_) => None,
        None => Some(
            crate::probe::measure(
                pool,
                &settings.targets,
                settings.probe_query.as_deref(),
                opts.gating.probe_writes,
                crate::probe::BASELINE_PROBES,
                crate::probe::BASELINE_SPACING,
            )
            .await?,
        ),
    };
    // The application's own p99 before the run, when its Prometheus is configured: a run
    // is not planned on a signal that does not answer.
    let slo_baseline = match (&opts.gating.slo, opts.gating.slo_baseline_ms) {
        (Some(source), None) => Some(
            crate::slo::Slo::new(source)?
                .baseline_ms()
                .await
                .context("measure the application's p99 before the run (--slo-query)")?,
        ),
        _ => None,
    };
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
                None => new_target_key(&tx, master, settings).await?,
            }
        }
    };
    if !opts.dry_run {
        store::activate(&tx, target.id, &settings.actor).await?;
    }
    let seed = opts.seed.unwrap_or_else(rand::random);
    let mut gating = opts.gating.clone();
    gating.planned_rows = planned_rows(&*tx, &settings.targets).await?;
    if slo_baseline.is_some() {
        gating.slo_baseline_ms = slo_baseline;
    }
    if let Some(lat) = baseline {
        gating.probe_baseline_ms = Some(lat.reads.median_ms);
        gating.probe_baseline_p95_ms = Some(lat.reads.p95_ms);
        gating.probe_baseline_p99_ms = Some(lat.reads.p99_ms);
        gating.probe_write_baseline_p99_ms = lat.writes.map(|w| w.p99_ms);
        gating.probe_noise_ms = Some(lat.read_noise_ms);
        gating.probe_write_noise_ms = lat.write_noise_ms;
    }
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
            stages: opts.stages.clone(),
            source_key_ids: None,
            settings: gating,
        },
    )
    .await?;
    ledger::create_stages(&*tx, run.id, &opts.stages).await?;
    // The first stage's batches are in the ledger before anything is published.
    let started = crate::stage::start_stage_in(&tx, &run, 0, &settings.actor).await?;
    ledger::set_run_state(&*tx, run.id, RunState::Running, None).await?;
    let action = if opts.dry_run { "dry_run" } else { "rotate" };
    record_action(
        &*tx,
        &run,
        &settings.actor,
        action,
        serde_json::json!({"stages": opts.stages, "batch_size": opts.batch_size, "batch_bytes": opts.gating.batch_bytes}),
    )
    .await?;
    tx.commit().await?;
    let planned = RunEvent::Planned {
        target_key: target.id.to_string(),
        dry_run: opts.dry_run,
    };
    events.emit(pool, run.id, planned).await;
    if let Some(started) = started {
        events.emit(pool, run.id, started).await;
    }
    Ok(ledger::get_run(&**client, run.id)
        .await?
        .expect("just created"))
}

/// Rows in the target tables now (the progress bar's length).
async fn planned_rows<C: tokio_postgres::GenericClient>(
    c: &C,
    targets: &[rekey_common::target::Target],
) -> anyhow::Result<i64> {
    let mut n = 0;
    for t in targets {
        let rows: i64 = c
            .query_one(&format!("SELECT count(*) FROM {}", t.quoted_table()), &[])
            .await
            .with_context(|| format!("count the rows of {}", t.table))?
            .get(0);
        n += rows;
    }
    Ok(n)
}

/// Appends an operator action on a run to the audit log (the report lists them).
async fn record_action<C: tokio_postgres::GenericClient>(
    c: &C,
    run: &Run,
    actor: &str,
    operation: &str,
    detail: serde_json::Value,
) -> anyhow::Result<()> {
    rekey_common::audit::record(
        c,
        &[rekey_common::audit::AuditEntry::run_event(
            run.id,
            run.target_key_id,
            operation,
            true,
            actor,
            detail,
        )],
    )
    .await?;
    Ok(())
}

/// `rekey promote RUN`: passes the current stage once its gates passed and its observation
/// ended; refuses, saying why, before that.
pub async fn promote(pool: &Pool, settings: &Settings, run_id: i64) -> anyhow::Result<Run> {
    let client = pool.get().await?;
    let run = ledger::get_run(&**client, run_id)
        .await?
        .with_context(|| format!("no run {run_id}"))?;
    if run.state != RunState::Running {
        bail!(
            "run {run_id} is {}; only a running run can be promoted",
            run.state
        );
    }
    let stage = ledger::stage(&**client, run_id, run.current_stage)
        .await?
        .with_context(|| format!("run {run_id} has no stage {}", run.current_stage))?;
    if let Some(why) = crate::gate::promotion_refusal(&stage, chrono::Utc::now()) {
        bail!("cannot promote run {run_id}: {why}");
    }
    if !crate::gate::advance(pool, &run, stage.stage_no, &settings.actor, "promote").await? {
        bail!(
            "cannot promote run {run_id}: stage {} changed meanwhile; look again with `rekey status {run_id}`",
            stage.stage_no
        );
    }
    crate::report::write(
        pool,
        settings,
        run_id,
        &format!("stage {} promoted", stage.stage_no),
    )
    .await?;
    Ok(ledger::get_run(&**client, run_id).await?.expect("exists"))
}

/// `rekey rollback RUN`: re-encrypts every value the run moved back to the previous key,
/// through the same pipeline, in a rollback run of its own, and makes the previous key
/// active again. Works mid-stage, after a halt and after completion; refused once the
/// previous key can no longer decrypt (retired or destroyed).
pub async fn start_rollback(
    pool: &Pool,
    settings: &Settings,
    run_id: i64,
    batch_size: i64,
) -> anyhow::Result<Run> {
    start_rollback_with(&Events::default(), pool, settings, run_id, batch_size).await
}

/// [`start_rollback`], saying its events (`rollback_planned`, `stage_started`) to `events`.
pub async fn start_rollback_with(
    events: &Events,
    pool: &Pool,
    settings: &Settings,
    run_id: i64,
    batch_size: i64,
) -> anyhow::Result<Run> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('rekey keys'))", &[])
        .await?;
    let run = ledger::get_run(&*tx, run_id)
        .await?
        .with_context(|| format!("no run {run_id}"))?;
    if run.kind != RunKind::Rotation {
        bail!(
            "run {run_id} is a {} run; only a rotation can be rolled back",
            run.kind.as_str()
        );
    }
    if run.state == RunState::RolledBack {
        bail!("run {run_id} is already rolled back");
    }
    let Some(previous) = run.previous_key_id else {
        bail!("run {run_id} has no previous key to roll back to");
    };
    let prev = store::get(&*tx, previous).await?;
    if !prev.state.can_decrypt() {
        bail!(
            "cannot roll back run {run_id}: its previous key {previous} is {}; values can no longer be moved back to it",
            prev.state
        );
    }
    let open = tx
        .query_opt(
            "SELECT id FROM rekey.runs WHERE parent_run_id = $1 AND kind = 'rollback' AND state NOT IN ('completed', 'failed', 'rolled_back')",
            &[&run_id],
        )
        .await?;
    if let Some(r) = open {
        let id: i64 = r.get(0);
        bail!(
            "run {run_id} already has rollback run {id} in progress; `rekey resume {id}` continues it"
        );
    }
    // Stop the run where it stands; workers hand back any batch of it they receive.
    if run.state != RunState::Completed {
        ledger::set_run_state(&*tx, run_id, RunState::Halted, Some("rolling back")).await?;
    }
    store::activate(&tx, previous, &settings.actor).await?;
    let rollback = ledger::create_run(
        &*tx,
        &NewRun {
            kind: RunKind::Rollback,
            target_key_id: previous,
            previous_key_id: Some(run.target_key_id),
            parent_run_id: Some(run_id),
            targets: run.targets.clone(),
            stages: vec![100],
            batch_size: i32::try_from(batch_size.max(1)).context("--batch-size is too large")?,
            seed: run.seed,
            operator: settings.actor.clone(),
            source_key_ids: Some(vec![run.target_key_id]),
            settings: RunSettings {
                planned_rows: planned_rows(&*tx, &run.targets).await?,
                observe_first_secs: 0,
                observe_secs: 0,
                auto_advance: true,
                auto_rollback: false,
                ..run.settings.clone()
            },
        },
    )
    .await?;
    ledger::create_stages(&*tx, rollback.id, &[100]).await?;
    let started = crate::stage::start_stage_in(&tx, &rollback, 0, &settings.actor).await?;
    ledger::set_run_state(&*tx, rollback.id, RunState::Running, None).await?;
    record_action(
        &*tx,
        &run,
        &settings.actor,
        "rollback",
        serde_json::json!({"rollback_run": rollback.id}),
    )
    .await?;
    tx.commit().await?;
    let planned = RunEvent::RollbackPlanned {
        rollback_run: rollback.id,
        previous_key: previous.to_string(),
    };
    events.emit(pool, run_id, planned).await;
    if let Some(started) = started {
        events.emit(pool, rollback.id, started).await;
    }
    Ok(ledger::get_run(&**client, rollback.id)
        .await?
        .expect("just created"))
}

/// After a rollback run completed, its parent run is rolled back.
pub async fn finish_rollback(
    pool: &Pool,
    settings: &Settings,
    rollback: &Run,
) -> anyhow::Result<()> {
    if let (RunKind::Rollback, Some(parent)) = (rollback.kind, rollback.parent_run_id) {
        let client = pool.get().await?;
        ledger::set_run_state(
            &**client,
            parent,
            RunState::RolledBack,
            Some(&format!("rolled back by run {}", rollback.id)),
        )
        .await?;
        crate::report::write(pool, settings, parent, "rolled back").await?;
    }
    Ok(())
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
    record_action(&**client, &run, "operator", "pause", serde_json::json!({})).await?;
    Ok(ledger::get_run(&**client, run_id).await?.expect("exists"))
}

/// Holds (`on`) or frees a run's publication without pausing it: the driver publishes
/// nothing new while held, batches in flight finish, and `rekey status` says who held it.
/// Audited. Refused for a run that is over.
pub async fn throttle(
    pool: &Pool,
    run_id: i64,
    on: bool,
    actor: &str,
    reason: Option<&str>,
) -> anyhow::Result<Run> {
    let client = pool.get().await?;
    let run = ledger::get_run(&**client, run_id)
        .await?
        .with_context(|| format!("no run {run_id}"))?;
    let hold = on.then(|| {
        let mut h = format!(
            "{actor} at {}",
            chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
        );
        if let Some(r) = reason.filter(|r| !r.trim().is_empty()) {
            h.push_str(&format!(": {}", r.trim()));
        }
        h
    });
    if !ledger::set_throttle_hold(&**client, run_id, hold.as_deref()).await? {
        bail!(
            "run {run_id} is {}; only a run that is not over can be throttled",
            run.state
        );
    }
    let action = if on { "throttle_on" } else { "throttle_off" };
    record_action(
        &**client,
        &run,
        actor,
        action,
        serde_json::json!({ "reason": reason }),
    )
    .await?;
    Ok(ledger::get_run(&**client, run_id).await?.expect("exists"))
}

/// Makes a paused, halted or interrupted run runnable again. Batches marked published
/// are published again (a duplicate message is harmless: the worker finds it done).
pub async fn resume(pool: &Pool, run_id: i64) -> anyhow::Result<Run> {
    // Another live driver keeps the run: reopening its published batches under it would
    // publish them twice.
    crate::lease::check_free(pool, run_id).await?;
    let client = pool.get().await?;
    let run = ledger::get_run(&**client, run_id)
        .await?
        .with_context(|| format!("no run {run_id}"))?;
    if run.state.is_final() {
        bail!("run {run_id} is {}; there is nothing to resume", run.state);
    }
    let rollback = client
        .query_opt("SELECT id FROM rekey.runs WHERE parent_run_id = $1 AND kind = 'rollback' ORDER BY id DESC LIMIT 1", &[&run_id])
        .await?;
    if let Some(r) = rollback {
        let id: i64 = r.get(0);
        bail!("run {run_id} is being rolled back by run {id}; resume run {id} instead");
    }
    // Batches marked published may have lost their message; failed ones get another
    // chance now that the operator fixed the cause.
    ledger::reopen_batches(&**client, run_id).await?;
    // A breached stage runs again: what is left is published, then it is gated anew.
    ledger::rerun_breached(&**client, run_id, run.current_stage).await?;
    ledger::set_run_state(&**client, run_id, RunState::Running, None).await?;
    ledger::clear_halt_reason(&**client, run_id).await?;
    record_action(
        &**client,
        &run,
        "operator",
        "resume",
        serde_json::json!({"from": run.state}),
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
    pub stages: Vec<ledger::Stage>,
    pub progress: Progress,
    pub decrypt_error_rate: f64,
    pub failed_batches: Vec<FailedBatch>,
    pub decrypt_errors: Vec<ErrorCount>,
    pub elapsed_secs: Option<f64>,
    /// Who drives the run and works on it, why batches fail, and what happens next.
    pub health: crate::health::RunHealth,
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
    let stages = ledger::stages(&**client, run_id).await?;
    let health = crate::health::read(&**client, &run, &stages).await?;
    Ok(Status {
        stages,
        health,
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
    for st in &s.stages {
        let current = if st.stage_no == r.current_stage && !r.state.is_final() {
            "*"
        } else {
            " "
        };
        let awaiting = s.health.awaiting_promote && st.stage_no == r.current_stage;
        let until = match (st.state, st.observe_until) {
            (StageState::Observing, Some(u)) if awaiting => format!(
                " ended {}: awaiting promote",
                u.format("%Y-%m-%d %H:%M:%S UTC")
            ),
            (StageState::Observing, Some(u)) => {
                format!(" until {}", u.format("%Y-%m-%d %H:%M:%S UTC"))
            }
            _ => String::new(),
        };
        let why = st
            .gate
            .as_ref()
            .and_then(|g| g.get("checks"))
            .and_then(|c| c.as_array())
            .map(|cs| {
                cs.iter()
                    .filter(|c| c["passed"] == false)
                    .map(|c| {
                        format!(
                            " {}: {}",
                            c["name"].as_str().unwrap_or(""),
                            c["reason"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<String>()
            })
            .unwrap_or_default();
        println!(
            "  {current}stage {} {:>3}%   {}{until}{why}",
            st.stage_no, st.percent, st.state
        );
    }
    println!(
        "  batches      {} total: {} done, {} published, {} pending, {} failed",
        p.n_batches, p.done, p.published, p.pending, p.failed
    );
    // A dry run writes nothing: its counts are what a rotation would do.
    let rotated = if r.kind == RunKind::DryRun {
        "would rotate"
    } else {
        "rotated"
    };
    println!(
        "  values       {} rows, {} values: {} {rotated}, {} already on target, {} null, {} decrypt errors ({:.4}%)",
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
    for line in crate::health::lines(r, &s.health) {
        println!("{line}");
    }
}

/// Default tick of `status --watch`.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);
