//! What the operator sees while a run is driven: an indicatif bar on a terminal, plain
//! lines elsewhere, nothing when quiet.

use indicatif::{ProgressBar, ProgressStyle};
use rekey_common::ledger::{self, Progress};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Auto,
    Quiet,
}

/// The progress display of one driven run.
#[derive(Debug)]
pub(crate) struct ProgressView {
    bar: Option<ProgressBar>,
    last_line: Instant,
    started: Instant,
    mode: ProgressMode,
    /// "rotated", or "would rotate" for a dry run, which writes nothing.
    verb: &'static str,
}

impl ProgressView {
    pub(crate) fn new(mode: ProgressMode, total: u64, dry_run: bool) -> Self {
        let bar = (mode == ProgressMode::Auto && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} rows {per_sec} ETA {eta} {msg}")
                    .expect("valid template"),
            );
            b
        });
        Self {
            bar,
            last_line: Instant::now(),
            started: Instant::now(),
            mode,
            verb: if dry_run { "would rotate" } else { "rotated" },
        }
    }

    pub(crate) fn awaiting(&mut self, run_id: i64, stage: &ledger::Stage) {
        if self.mode == ProgressMode::Auto && self.last_line.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "run {run_id}: stage {} ({}%) observed; waiting for `rekey promote {run_id}`",
                stage.stage_no, stage.percent
            );
            self.last_line = Instant::now();
        }
    }

    pub(crate) fn update(&mut self, run_id: i64, p: &Progress, stage: &ledger::Stage) {
        let rows = p.n_rows as u64;
        let msg = format!(
            "stage {} ({}%) errors {} failed batches {}",
            stage.stage_no, stage.percent, p.n_errors, p.failed
        );
        if let Some(b) = &self.bar {
            b.set_length(p.planned_rows_estimate.max(p.n_rows) as u64);
            b.set_position(rows);
            b.set_message(msg);
        } else if self.mode == ProgressMode::Auto
            && (self.last_line.elapsed() > Duration::from_secs(5) || p.is_finished())
        {
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            eprintln!(
                "run {run_id}: batches {}/{} done, {} rows ({:.0} rows/s), {} {}, {msg}",
                p.done + p.failed,
                p.n_batches,
                p.n_rows,
                p.n_rows as f64 / secs,
                self.verb,
                p.n_rotated
            );
            self.last_line = Instant::now();
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
