//! The end of a run, for every caller of [`crate::drive::drive`]: drive it (or not, with
//! `--detach`), then the policy of its end: the final report, a rollback's finish,
//! auto-rollback on a breach, notifications, the exit code.

use crate::events::RunEvent;
use crate::run_cmd;
use crate::runtime::DriveOptions;
use anyhow::Context as _;

use rekey_common::ledger::{self, RunKind, RunState};
use std::process::ExitCode;
use std::time::Duration;
use tracing::Instrument;

use crate::args::{DriveArgs, parse_duration};
use crate::context::Context;
use crate::output::print_json_or;

/// Drives a run to its end (or leaves it with --detach) and prints its status. A breach
/// with auto-rollback starts the rollback and drives it too; a completed rollback marks
/// its parent rolled back. Exits non-zero unless the run completed (or was detached).
pub async fn follow(
    ctx: &Context,
    run_id: i64,
    detach: bool,
    drive: &DriveArgs,
    json: bool,
    opening: RunEvent<'static>,
) -> anyhow::Result<ExitCode> {
    let mut run_id = run_id;
    let pool = &ctx.pool;
    let (metrics, events) = (&ctx.metrics, &ctx.events);
    if !detach {
        events.emit(pool, run_id, opening).await;
    }
    let server = match (detach, drive.metrics_addr) {
        (false, Some(addr)) => Some(rekey_common::metrics::serve(addr, metrics.clone()).await?.1),
        _ => None,
    };
    if !detach {
        loop {
            let shutdown = rekey_common::shutdown::signal();
            // The run's trace: every publication, gate and (through the message headers)
            // every batch is part of it.
            let span = tracing::info_span!("run", run_id);
            let state = crate::drive::drive(
                &ctx.pool,
                &ctx.settings,
                run_id,
                &DriveOptions {
                    metrics: Some(metrics.clone()),
                    events: events.clone(),
                    ..drive.options(json)
                },
                shutdown,
            )
            .instrument(span)
            .await?;
            crate::events::record_final(metrics, &ctx.pool, run_id).await?;
            let run = ledger::get_run(&**ctx.pool.get().await?, run_id)
                .await?
                .context("run vanished")?;
            match (state, run.kind) {
                (RunState::Completed, RunKind::Rollback) => {
                    run_cmd::finish_rollback(&ctx.pool, &ctx.settings, &run).await?;
                    let parent = run.parent_run_id.unwrap_or(run_id);
                    events.emit(pool, parent, RunEvent::RolledBack).await;
                }
                (RunState::Completed, _) => {
                    let path =
                        crate::report::write(&ctx.pool, &ctx.settings, run_id, "run completed")
                            .await?;
                    let completed = RunEvent::Completed { report: &path };
                    events.emit(pool, run_id, completed).await;
                }
                (RunState::Halted, _) => {
                    let halted = RunEvent::Halted {
                        reason: run.halt_reason.as_deref(),
                    };
                    events.emit(pool, run_id, halted).await;
                }
                _ => {}
            }
            match (state, run.kind) {
                (RunState::Halted, RunKind::Rotation)
                    if run.settings.auto_rollback
                        && run.halt_reason.as_deref() != Some("rolling back") =>
                {
                    if !json {
                        eprintln!(
                            "run {run_id} halted ({}); rolling back",
                            run.halt_reason.as_deref().unwrap_or("-")
                        );
                    }
                    let rb = run_cmd::start_rollback_with(
                        events,
                        &ctx.pool,
                        &ctx.settings,
                        run_id,
                        i64::from(run.batch_size),
                    )
                    .await?;
                    run_id = rb.id;
                    events.emit(pool, run_id, RunEvent::Started).await;
                    continue;
                }
                _ => {}
            }
            break;
        }
    }
    // Deliver what is queued before exiting (bounded: a dead webhook never holds us long).
    events.flush(Duration::from_secs(20)).await;
    let s = run_cmd::status(&ctx.pool, run_id).await?;
    print_json_or(json, &s, || run_cmd::print_status(&s))?;
    if !json && !detach {
        // Only a report that was written (a run stopped early by Ctrl-C may have none yet).
        let path = crate::report::path(&ctx.pool, &ctx.settings, run_id).await?;
        if path.exists() {
            eprintln!("report: {}", path.display());
        }
        // Stopped while the run still has work (Ctrl-C, SIGTERM): how to carry on.
        if !s.run.state.is_final() && s.run.state != RunState::Halted {
            eprintln!(
                "run {run_id} is {} and nobody drives it now: `rekey resume {run_id}` carries on",
                s.run.state
            );
        }
    }
    if server.is_some() {
        let linger = parse_duration(&drive.metrics_linger)?;
        if !linger.is_zero() {
            tracing::info!(
                secs = linger.as_secs_f64(),
                "serving the final metrics before exiting"
            );
            tokio::time::sleep(linger).await;
        }
    }
    // Exports what an OTLP reader still holds.
    metrics.shutdown();
    let ok = detach || s.run.state == RunState::Completed;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
