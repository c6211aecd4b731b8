//! Who works on a run and what happens next, as `rekey status` says it: the driver's lease,
//! the consumers on the batch queue, the live workers and why they fail (grouped by
//! cause), and for every run state the command that moves it. So that a stall never looks
//! healthy.

use rekey_common::ledger::{self, DriverLease, Run, RunKind, RunState, Stage, StageState};
use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// Workers failing for one cause.
#[derive(Debug, Clone, Serialize)]
pub struct FailingGroup {
    /// `wrong_master_key`, `lock_timeout`, `deadlock`, `connection`, …
    pub kind: String,
    /// The last error's text (names keys by id, never a value).
    pub error: String,
    pub workers: Vec<String>,
    /// What to do about it.
    pub hint: String,
}

/// What `rekey status` says beside the ledger's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunHealth {
    /// The lease of the process driving the run (live or lapsed), if any.
    pub driver: Option<DriverLease>,
    /// Whether a live driver holds the run.
    pub driven: bool,
    /// Workers seen in the last 30 s.
    pub workers: Vec<ledger::WorkerPresence>,
    /// The master key(s) the key store is wrapped by.
    pub store_master_ids: Vec<Uuid>,
    /// Live workers that hold another master key than the key store's.
    pub stale_master_workers: Vec<String>,
    pub failing: Vec<FailingGroup>,
    /// The current stage's observation ended and it waits for `rekey promote`.
    pub awaiting_promote: bool,
    /// What happens next, and the command that moves the run.
    pub next: String,
}

/// What to do about workers failing for `kind`.
pub(crate) fn hint(kind: &str) -> &'static str {
    match kind {
        "wrong_master_key" => "restart them with the key store's master key",
        "lock_timeout" | "deadlock" | "serialization" | "statement_timeout" => {
            "the application holds the rows' locks; the batches are retried, and a long stall needs a larger --lock-timeout-ms or a quieter hour"
        }
        "connection" | "database" => "check the database and the workers' DATABASE_URL",
        _ => "see the workers' logs",
    }
}

/// Reads the run's driver, its workers and the key store's master key.
pub async fn read<C: GenericClient>(
    c: &C,
    run: &Run,
    stages: &[Stage],
) -> anyhow::Result<RunHealth> {
    let driver = ledger::driver(c, run.id).await?;
    let workers = ledger::live_workers(c).await?;
    let store_master_ids = rekey_common::keys::store::wrapping_master_ids(c).await?;
    let stale_master_workers = workers
        .iter()
        .filter(|w| !store_master_ids.is_empty() && !store_master_ids.contains(&w.master_key_id))
        .map(|w| w.worker_id.clone())
        .collect();
    let failing = ledger::failing_groups(&workers)
        .into_iter()
        .map(|(kind, error, workers)| FailingGroup {
            hint: hint(&kind).to_owned(),
            kind,
            error,
            workers,
        })
        .collect();
    let current = stages.iter().find(|s| s.stage_no == run.current_stage);
    let awaiting_promote = run.state == RunState::Running
        && !run.settings.auto_advance
        && current.is_some_and(|s| {
            s.state == StageState::Observing
                && s.observe_until.is_some_and(|u| u <= chrono::Utc::now())
        });
    // A lease whose process is gone from this machine is not waited out.
    let driver = driver.map(|mut d| {
        if d.live && crate::lease::holder_gone(&d) {
            d.live = false;
        }
        d
    });
    let driven = driver.as_ref().is_some_and(|d| d.live);
    let mut h = RunHealth {
        driver,
        driven,
        workers,
        store_master_ids,
        stale_master_workers,
        failing,
        awaiting_promote,
        next: String::new(),
    };
    h.next = next(run, current, &h);
    Ok(h)
}

/// What happens next to `run`, and the command that moves it.
fn next(run: &Run, stage: Option<&Stage>, h: &RunHealth) -> String {
    let id = run.id;
    let nobody = |what: &str| format!("nobody is driving run {id}: {what} `rekey resume {id}`");
    match run.state {
        RunState::Planning => format!(
            "run {id} is being planned; if it stays so, its planner died: `rekey resume {id}`"
        ),
        RunState::Paused => format!("paused: `rekey resume {id}` carries on"),
        RunState::Halted => format!(
            "halted: fix the cause above, then `rekey resume {id}`; or `rekey rollback {id}`"
        ),
        RunState::Completed if run.kind == RunKind::Rotation => format!(
            "over: every value is under key {}; `rekey rollback {id}` still restores the previous key until it is retired (`rekey keys retire`)",
            run.target_key_id
        ),
        RunState::Completed => "over".into(),
        RunState::Failed => "over: failed (see the reason above); start a new run".into(),
        RunState::RolledBack => "over: rolled back".into(),
        RunState::Running => {
            let Some(s) = stage else {
                return if h.driven {
                    "the driver is at work".into()
                } else {
                    nobody("carry on with")
                };
            };
            let later = run.stages.len() as i32 > s.stage_no + 1;
            match s.state {
                StageState::Observing if h.awaiting_promote => {
                    let then = if later {
                        format!("stage {} starts", s.stage_no + 1)
                    } else {
                        "the run completes".into()
                    };
                    format!(
                        "awaiting promote: `rekey promote {id}` and {then} (add `--follow` to drive it from that shell); or `rekey rollback {id}`"
                    )
                }
                StageState::Observing => {
                    let until = s
                        .observe_until
                        .map(|u| u.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                        .unwrap_or_else(|| "-".into());
                    let then = if run.settings.auto_advance {
                        "the driver promotes it by itself"
                    } else {
                        "it awaits `rekey promote`"
                    };
                    let watch = if h.driven {
                        String::new()
                    } else {
                        format!("; {}", nobody("its samples stop until"))
                    };
                    format!(
                        "stage {} is observed until {until}; then {then}{watch}",
                        s.stage_no
                    )
                }
                _ if !h.driven => nobody("the stage stays where it is until"),
                StageState::Pending => format!("the driver starts stage {}", s.stage_no),
                StageState::Running => format!(
                    "stage {} rotates; when its batches are done, its gates are checked",
                    s.stage_no
                ),
                StageState::Gating => format!("stage {}'s gates are being checked", s.stage_no),
                StageState::Passed | StageState::Breached => "the driver moves on".into(),
            }
        }
    }
}

/// The lines `rekey status` prints for it.
pub fn lines(run: &Run, h: &RunHealth) -> Vec<String> {
    let mut out = Vec::new();
    if !run.state.is_final() {
        match &h.driver {
            Some(d) if d.live => out.push(format!(
                "  driven by    {} since {} (heartbeat {:.0} s ago)",
                d.who(),
                d.since.format("%Y-%m-%d %H:%M:%S UTC"),
                d.heartbeat_age_secs
            )),
            Some(d) => out.push(format!(
                "  driven by    nobody is driving run {id}: the last driver, {}, stopped answering {:.0} s ago; `rekey resume {id}` takes over",
                d.who(),
                d.heartbeat_age_secs,
                id = run.id
            )),
            None => out.push(format!(
                "  driven by    nobody is driving run {id}: `rekey resume {id}` drives it",
                id = run.id
            )),
        }
        if let Some(d) = h.driver.as_ref().filter(|d| d.live) {
            match (d.consumers, d.no_consumer_secs) {
                (Some(0), Some(secs)) => out.push(format!(
                    "  consumers    none on the batch queue for {secs:.0} s: start workers (`rekey-worker`, or `docker-compose up -d --scale worker=N`)"
                )),
                (Some(n), _) => out.push(format!("  consumers    {n} on the batch queue")),
                _ => {}
            }
            if let Some(t) = &d.throttle {
                out.push(format!("  throttle     {t}"));
            }
        }
        // The operator's hold shows even while nobody drives the run.
        if let (Some(h), false) = (
            &run.throttle_hold,
            h.driver
                .as_ref()
                .is_some_and(|d| d.live && d.throttle.is_some()),
        ) {
            out.push(format!(
                "  throttle     held by the operator ({h}): `rekey throttle {} off` lifts it",
                run.id
            ));
        }
    }
    let (done, retried): (i64, i64) = h
        .workers
        .iter()
        .map(|w| (w.batches_done, w.batches_retried))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    if h.workers.is_empty() {
        if !run.state.is_final() {
            out.push("  workers      none seen in the last 30 s".into());
        }
    } else {
        out.push(format!(
            "  workers      {} live: {done} batches done, {retried} attempts retried since they started",
            h.workers.len()
        ));
    }
    for g in &h.failing {
        let n = g.workers.len();
        let who = if n == 1 { "worker" } else { "workers" };
        out.push(format!(
            "  failing      {n} {who} failing every batch ({}): {}; {}",
            g.kind, g.error, g.hint
        ));
    }
    if !h.stale_master_workers.is_empty() {
        let store: Vec<String> = h.store_master_ids.iter().map(Uuid::to_string).collect();
        out.push(format!(
            "  master key   {} live worker(s) hold another master key than the key store's ({}): {}; restart them with it",
            h.stale_master_workers.len(),
            store.join(", "),
            h.stale_master_workers.join(", ")
        ));
    }
    out.push(format!("  next         {}", h.next));
    out
}
