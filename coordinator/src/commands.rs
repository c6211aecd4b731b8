//! What each `rekey` command does: the dispatch from the parsed arguments ([`crate::cli`])
//! to the modules that do the work.

use crate::args::{parse_duration, parse_observe};
use crate::context::Context;
use crate::events::RunEvent;
use crate::follow::follow;
use crate::keys_cmd::{self};
use crate::output::print_json_or;
use crate::run_cmd;
use anyhow::Context as _;
use rekey_common::Settings;
use rekey_common::ledger::{self, RunSettings};
use std::process::ExitCode;

use crate::cli::{Cli, Command};

/// Runs one command; the exit code is for commands whose result is a verdict.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.config.as_deref();
    if cli.allow_insecure_key_file {
        rekey_common::keys::master::allow_insecure_key_files();
    }
    match cli.command {
        Command::Migrate { demo, json } => {
            let ctx = Context::connect(config).await?;
            let mut applied = rekey_common::db::migrate(&ctx.pool).await?;
            if demo {
                applied.extend(rekey_common::db::migrate_demo(&ctx.pool).await?);
            }
            print_json_or(json, &serde_json::json!({ "applied": applied }), || {
                if applied.is_empty() {
                    println!("migrations: up to date");
                }
                for m in &applied {
                    println!("applied {m}");
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BrokerUsers {
            coordinator_user,
            coordinator_password_file,
            worker_user,
            worker_password_file,
            vhost,
        } => {
            let settings = Settings::load(config)?;
            let topo = rekey_common::broker::Topology::of(&settings);
            let users = [
                (
                    coordinator_user,
                    coordinator_password_file,
                    topo.coordinator_permissions(),
                ),
                (worker_user, worker_password_file, topo.worker_permissions()),
            ];
            let mut defs_users = Vec::new();
            let mut defs_permissions = Vec::new();
            for (user, file, p) in users {
                let password = rekey_common::config::read_secret_file(
                    "the password file",
                    &file.display().to_string(),
                )?;
                defs_users.push(serde_json::json!({
                    "name": user,
                    "password_hash": rekey_common::broker::password_hash(&password),
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": [],
                }));
                defs_permissions.push(serde_json::json!({
                    "user": user,
                    "vhost": vhost,
                    "configure": p.configure,
                    "write": p.write,
                    "read": p.read,
                }));
            }
            let defs = serde_json::json!({
                "users": defs_users,
                "permissions": defs_permissions,
            });
            println!("{}", serde_json::to_string_pretty(&defs)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { command } => keys_cmd::run(config, command).await,
        Command::Audit { command } => crate::audit_cmd::run(config, command).await,
        Command::Preflight { json } => {
            let settings = Settings::load(config)?;
            settings.require_targets()?;
            let p = crate::preflight::run(&settings).await;
            print_json_or(json, &p, || p.print())?;
            Ok(if p.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Rotate {
            batch_size,
            batch_bytes,
            stages,
            observe,
            auto_advance,
            auto_rollback,
            max_error_rate,
            latency,
            dry_run,
            target_key,
            key_propagation,
            skip_preflight,
            detach,
            drive,
            json,
        } => {
            // A dry run changes nothing, so there is nothing to observe unless asked.
            let observe =
                observe.unwrap_or_else(|| if dry_run { "0" } else { "24h,2h" }.to_owned());
            let (first, rest) = parse_observe(&observe)?;
            let key_propagation = parse_duration(&key_propagation).context("--key-propagation")?;
            let ctx = Context::connect(config).await?;
            ctx.settings.require_targets()?;
            if !skip_preflight {
                let p = crate::preflight::run(&ctx.settings).await;
                if !p.passed {
                    if !json {
                        p.print();
                    }
                    let items: Vec<String> = p
                        .failures()
                        .iter()
                        .map(|c| format!("{}: {}", c.item, c.detail))
                        .collect();
                    anyhow::bail!(
                        "preflight failed ({}); fix it or pass --skip-preflight",
                        items.join("; ")
                    );
                }
            }
            let master = ctx.master_key()?;
            let opts = run_cmd::RotateOptions {
                batch_size,
                dry_run,
                target_key,
                seed: None,
                key_propagation,
                stages: if dry_run { vec![100] } else { stages },
                gating: RunSettings {
                    observe_first_secs: first.as_secs(),
                    observe_secs: rest.as_secs(),
                    auto_advance: auto_advance || dry_run,
                    auto_rollback,
                    max_error_rate,
                    batch_bytes: batch_bytes.max(0),
                    throttle_pct: latency.throttle_pct.max(0.0),
                    throttle_min_ms: latency.throttle_min_ms.max(0.0),
                    app_p99_ms: latency.app_p99_ms.filter(|ms| *ms > 0.0),
                    probe_writes: !latency.no_probe_writes,
                    rebaseline_secs: parse_duration(&latency.rebaseline_every)
                        .context("--rebaseline-every")?
                        .as_secs_f64(),
                    breach_pct: latency.breach_pct,
                    slow_start: !latency.no_slow_start,
                    max_replication_lag_secs: Some(
                        parse_duration(&latency.max_replication_lag)
                            .context("--max-replication-lag")?
                            .as_secs_f64(),
                    )
                    .filter(|s| *s > 0.0),
                    max_replication_lag_bytes: Some(latency.max_replication_lag_bytes)
                        .filter(|b| *b > 0),
                    max_active_backends: Some(latency.max_active_backends).filter(|n| *n > 0),
                    checkpoint_hold_secs: parse_duration(&latency.checkpoint_hold)
                        .context("--checkpoint-hold")?
                        .as_secs_f64(),
                    slo: latency.slo(ctx.settings.slo.as_ref())?,
                    ..Default::default()
                },
            };
            let run =
                run_cmd::start_rotation_with(&ctx.events, &ctx.pool, &ctx.settings, &master, &opts)
                    .await
                    .context("start the rotation")?;
            if !json {
                eprintln!(
                    "run {} planned: target key {}, stages {:?}",
                    run.id, run.target_key_id, run.stages
                );
            }
            follow(&ctx, run.id, detach, &drive, json, RunEvent::Started).await
        }
        Command::Status { run, watch, json } => {
            let ctx = Context::connect(config).await?;
            let run_id = match run {
                Some(r) => r,
                None => ledger::recent_runs(&**ctx.pool.get().await?, 1)
                    .await?
                    .first()
                    .map(|r| r.id)
                    .context("there are no runs yet")?,
            };
            loop {
                let s = run_cmd::status(&ctx.pool, run_id).await?;
                print_json_or(json, &s, || run_cmd::print_status(&s))?;
                if !watch || s.run.state.is_final() {
                    break;
                }
                tokio::time::sleep(run_cmd::WATCH_EVERY).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Promote {
            run,
            follow: keep,
            drive,
            json,
        } => {
            let ctx = Context::connect(config).await?;
            if keep {
                ctx.checked_master_key().await?;
                crate::lease::check_free(&ctx.pool, run).await?;
            }
            let r = run_cmd::promote(&ctx.pool, &ctx.settings, run).await?;
            if !json {
                eprintln!(
                    "run {} promoted: now at stage {} ({})",
                    r.id, r.current_stage, r.state
                );
            }
            if !keep && !json {
                // Promoting only marks the stage passed; a driver starts the next one.
                let lease = ledger::driver(&**ctx.pool.get().await?, r.id).await?;
                match lease.filter(|l| l.live) {
                    Some(l) => eprintln!(
                        "run {} is driven by {}: it starts the next stage",
                        r.id,
                        l.who()
                    ),
                    None if !r.state.is_final() => eprintln!(
                        "nobody is driving run {id}: the next stage stays pending until `rekey resume {id}` (or promote with `--follow` to drive it from here)",
                        id = r.id
                    ),
                    None => {}
                }
            }
            follow(&ctx, r.id, !keep, &drive, json, RunEvent::Resumed).await
        }
        Command::Pause { run, json } => {
            let ctx = Context::connect(config).await?;
            let r = run_cmd::pause(&ctx.pool, run).await?;
            print_json_or(json, &r, || println!("run {} is paused", r.id))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Throttle {
            run,
            switch,
            reason,
            json,
        } => {
            let ctx = Context::connect(config).await?;
            let on = switch == "on";
            let r = run_cmd::throttle(&ctx.pool, run, on, &ctx.settings.actor, reason.as_deref())
                .await?;
            print_json_or(json, &r, || match &r.throttle_hold {
                Some(h) => println!(
                    "run {} is held: nothing new is published until `rekey throttle {} off` ({h})",
                    r.id, r.id
                ),
                None => println!("run {} is not held: publication goes on", r.id),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume {
            run,
            detach,
            drive,
            json,
        } => {
            let ctx = Context::connect(config).await?;
            let run = match run {
                Some(r) => r,
                None => ledger::latest_unfinished_run(&**ctx.pool.get().await?)
                    .await?
                    .map(|r| r.id)
                    .context("no run to resume: every run in the ledger is over (`rekey status` lists them)")?,
            };
            // Nothing changes unless the master key opens the key store.
            ctx.checked_master_key().await?;
            let r = run_cmd::resume(&ctx.pool, run).await?;
            if !json {
                eprintln!("run {} resumed", r.id);
            }
            follow(&ctx, r.id, detach, &drive, json, RunEvent::Resumed).await
        }
        Command::Rollback {
            run,
            batch_size,
            detach,
            drive,
            json,
        } => {
            let ctx = Context::connect(config).await?;
            let r = run_cmd::start_rollback_with(
                &ctx.events,
                &ctx.pool,
                &ctx.settings,
                run,
                batch_size,
            )
            .await?;
            if !json {
                eprintln!(
                    "rollback run {} started for run {run}: back to key {}",
                    r.id, r.target_key_id
                );
            }
            follow(&ctx, r.id, detach, &drive, json, RunEvent::Started).await
        }
        Command::Report { run, json } => {
            let ctx = Context::connect(config).await?;
            let path =
                crate::report::write(&ctx.pool, &ctx.settings, run, "report requested").await?;
            print_json_or(json, &serde_json::json!({"path": path}), || {
                println!("{}", path.display())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            rows,
            observe,
            keep,
        } => {
            let settings = Settings::load(config)?;
            crate::demo::run(settings, rows, parse_duration(&observe)?, keep).await
        }
    }
}
