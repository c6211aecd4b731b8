//! The coordinator: the `rekey` operator CLI and the library behind it.
//!
//! Commands: [`cli`] (the clap definitions), [`commands`] (the dispatch), [`args`] (flags several commands
//! share, durations), [`context`] (settings + pool), [`output`] (text or `--json`),
//! [`keys_cmd`], [`audit_cmd`], [`run_cmd`] (start, pause, resume, promote, roll back,
//! status), [`preflight`], [`demo`], [`follow`] (driving a run and the policy of its end,
//! for every command that drives).
//!
//! Driving a run: [`drive`] (the session loop and `step`, which dispatches on the stage's
//! state), [`runtime`] (`DriveOptions`, `Driver`, `StageRuntime`), [`stage`] (start, gate,
//! breach a stage), [`plan`] (ID ranges), [`coverage`] (sweeps for stragglers),
//! [`latency`] (the probe's judgement of a running stage), [`brakes`] (replicas' lag holds
//! publication), [`throttle`] (the throttle and
//! the performance figures), [`probe`] (the latency probe), [`gate`] (the gate decision and
//! promotion), [`observe`] (observation samples), [`events`] (an event's log line, metrics
//! and webhook), [`progress`] (what the operator sees), [`report`] (evidence reports).

pub mod args;
pub mod audit_cmd;
pub mod brakes;
pub mod cli;
pub mod commands;
pub mod context;
pub mod coverage;
pub mod demo;
pub mod drive;
pub mod events;
pub mod follow;
pub mod gate;
pub mod health;
pub mod keys_cmd;
pub mod latency;
pub mod lease;
pub mod observe;
pub mod output;
pub mod plan;
pub mod preflight;
pub mod probe;
pub mod progress;
pub mod report;
pub mod run_cmd;
pub mod runtime;
pub mod slo;
pub mod stage;
pub mod throttle;
