//! `rekey audit verify`: checks the audit log's hash chains (see
//! [`rekey_common::audit::verify`]) and prints what it found, naming each entry.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use rekey_common::audit::{VerifyOptions, VerifyReport, verify};

use crate::args::parse_duration;
use crate::context::Context;
use crate::output;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute every entry's hash and follow every link; report edited, deleted and
    /// re-linked entries, batch chains that disagree with the ledger, broken stage seals,
    /// and gaps longer than --max-gap while a stage ran. Exits non-zero on any of them.
    Verify {
        /// Report only what is at or after this time: RFC 3339 (`2026-11-28T00:00:00Z`) or
        /// a duration back from now (`24h`).
        #[arg(long)]
        since: Option<String>,
        /// A pause longer than this between a stage's batch entries is a gap (the
        /// playbook: 5 minutes).
        #[arg(long, default_value = "5m")]
        max_gap: String,
        #[arg(long)]
        json: bool,
    },
}

/// `--since`: a timestamp, or a duration back from now.
fn parse_since(s: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let back = parse_duration(s).map_err(|_| {
        anyhow::anyhow!("--since {s:?} is neither an RFC 3339 time nor a duration like 24h")
    })?;
    Ok(chrono::Utc::now() - chrono::Duration::from_std(back)?)
}

pub async fn run(config: Option<&Path>, command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify {
            since,
            max_gap,
            json,
        } => {
            let opts = VerifyOptions {
                since: since.as_deref().map(parse_since).transpose()?,
                max_gap_secs: parse_duration(&max_gap)?.as_secs_f64(),
            };
            let ctx = Context::connect(config).await?;
            let report = verify(&**ctx.pool.get().await?, &opts).await?;
            if json {
                output::json(&report)?;
            } else {
                print(&report);
            }
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn print(r: &VerifyReport) {
    println!(
        "audit log: {} entries ({} in the control chain, {} batch chains, {} stage seals, {} written before chaining)",
        r.entries, r.control_entries, r.batch_chains, r.seals, r.unchained
    );
    if let Some((id, hash)) = &r.head {
        println!("control chain head: entry {id}, hash {hash}");
    }
    for p in &r.problems {
        println!("{}: {}", p.kind.to_uppercase(), p.message);
    }
    for g in &r.gaps {
        println!(
            "GAP: run {} stage {}: {:.0} s without an audit entry between entries {} and {} (threshold {:.0} s)",
            g.run_id, g.stage_no, g.seconds, g.after_entry, g.before_entry, r.max_gap_secs
        );
    }
    println!(
        "{}",
        if r.passed() {
            "the audit log is intact"
        } else {
            "the audit log FAILED verification"
        }
    );
}
