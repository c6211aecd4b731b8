//! `rekey keys …`: the key hierarchy from the operator's side. Each subcommand is one
//! transaction over `rekey_common::keys::store`, which writes the audit entries.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use rekey_common::keys::census::{self, CensusRow};
use rekey_common::keys::master::{self, FileMasterKey, MasterKeyProvider};
use rekey_common::keys::store::{self, KeyRecord};
use rekey_common::keys::{KeyKind, KeyState};
use secrecy::ExposeSecret;
use serde::Serialize;
use uuid::Uuid;

use crate::context::Context;
use crate::output::{self, when};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create and activate the first data key and field key if there are none (idempotent).
    Init {
        #[arg(long)]
        json: bool,
    },
    /// List every key with its state, age, rotation due date and nonce budget use.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Generate a new key in state `pending` (readers can decrypt with it before it encrypts).
    Generate {
        #[arg(long, value_parser = parse_kind)]
        kind: KeyKind,
        #[arg(long, default_value = "")]
        label: String,
        #[arg(long)]
        json: bool,
    },
    /// Make a pending or decrypt-only key the active key of its kind.
    Activate {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Data key rotation: a new data key, every field key re-wrapped under it, the old data
    /// key decrypt-only. One transaction; no field value is touched.
    Rewrap {
        #[arg(long)]
        json: bool,
    },
    /// Master key rotation: every data key re-wrapped under a new master key. The current
    /// master key comes from the usual settings, the new one from this file (base64 text).
    RotateMaster {
        #[arg(long)]
        new_master_key_file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write a new random master key (base64) to a file readable only by its owner.
    NewMaster {
        #[arg(long)]
        out: PathBuf,
    },
    /// Retire a key; refused while the census finds any value under it or a run needs it.
    Retire {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Erase a retired key's wrapped material; refused while any value still uses it.
    Destroy {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Count the values under each key in every configured target column.
    Census {
        #[arg(long)]
        json: bool,
    },
    /// Each key's age, rotation due date (field keys 30 days, data keys 90), state,
    /// encryptions against its nonce budget, and the values (field keys) or field keys
    /// (data keys) still under it. Exits 3 when an active key's rotation is overdue, and 4
    /// when a field key that can still encrypt has used 80% of its nonce budget or more, so
    /// that a scheduler can alert on either.
    Status {
        /// Skip counting the values under each field key (a scan of every target column).
        #[arg(long)]
        no_census: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Exit code of `rekey keys status` when a rotation is overdue.
pub const EXIT_OVERDUE: u8 = 3;

/// Exit code of `rekey keys status` when a field key that can still encrypt (pending or
/// active) has used [`BUDGET_WARN_PCT`] of its nonce budget or more (it takes precedence
/// over [`EXIT_OVERDUE`]: a spent budget stops rotations).
pub const EXIT_BUDGET: u8 = 4;

/// The share of a key's nonce budget past which `rekey keys status` warns.
pub const BUDGET_WARN_PCT: f64 = 80.0;

/// One key's line of `rekey keys status`.
#[derive(Debug, Serialize)]
pub struct KeyStatus {
    pub id: Uuid,
    pub kind: KeyKind,
    pub state: KeyState,
    pub age_days: f64,
    pub rotation_due_at: chrono::DateTime<chrono::Utc>,
    /// Negative once the due date has passed.
    pub days_until_due: f64,
    /// Active and past its due date.
    pub overdue: bool,
    pub encryptions: i64,
    pub nonce_budget: i64,
    pub nonce_budget_used_pct: f64,
    /// Field keys: values under the key in the target columns (`None` with --no-census);
    /// data keys: field keys wrapped by it.
    pub still_under: Option<i64>,
}

/// `rekey keys status`, computed.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub keys: Vec<KeyStatus>,
    pub overdue: Vec<Uuid>,
}

pub async fn status<C: tokio_postgres::GenericClient>(
    client: &C,
    targets: &[rekey_common::target::Target],
    with_census: bool,
) -> anyhow::Result<StatusReport> {
    let keys = store::list(client).await?;
    let counts: Option<Vec<census::CensusRow>> = if with_census {
        Some(census::census(client, targets).await?)
    } else {
        None
    };
    let now = chrono::Utc::now();
    let days = |d: chrono::TimeDelta| d.num_seconds() as f64 / 86_400.0;
    let out: Vec<KeyStatus> = keys
        .iter()
        .map(|k| {
            let still_under = match k.kind {
                KeyKind::Field => counts.as_ref().map(|rows| {
                    rows.iter()
                        .filter(|r| r.key_id == Some(k.id))
                        .map(|r| r.n_values)
                        .sum()
                }),
                KeyKind::Data => Some(
                    keys.iter()
                        .filter(|f| {
                            f.kind == KeyKind::Field
                                && f.wrapping_key_id == k.id
                                && f.state != KeyState::Destroyed
                        })
                        .count() as i64,
                ),
            };
            KeyStatus {
                id: k.id,
                kind: k.kind,
                state: k.state,
                age_days: days(now - k.created_at),
                rotation_due_at: k.rotation_due_at,
                days_until_due: days(k.rotation_due_at - now),
                overdue: k.state == KeyState::Active && k.rotation_due_at < now,
                encryptions: k.encryptions,
                nonce_budget: k.nonce_budget,
                nonce_budget_used_pct: 100.0 * k.encryptions as f64 / k.nonce_budget.max(1) as f64,
                still_under,
            }
        })
        .collect();
    let overdue = out.iter().filter(|k| k.overdue).map(|k| k.id).collect();
    Ok(StatusReport { keys: out, overdue })
}

fn print_status(r: &StatusReport) {
    println!(
        "{:<36}  {:<5}  {:<12}  {:>8}  {:<16}  {:>9}  {:>9}  {:>12}",
        "ID", "KIND", "STATE", "AGE (d)", "ROTATION DUE", "DUE IN", "BUDGET %", "STILL UNDER"
    );
    for k in &r.keys {
        println!(
            "{:<36}  {:<5}  {:<12}  {:>8.1}  {:<16}  {:>9}  {:>9.6}  {:>12}",
            k.id,
            k.kind,
            k.state,
            k.age_days,
            when(Some(k.rotation_due_at)),
            if k.overdue {
                "OVERDUE".to_owned()
            } else {
                format!("{:.1} d", k.days_until_due)
            },
            k.nonce_budget_used_pct,
            k.still_under.map_or("-".to_owned(), |n| n.to_string()),
        );
    }
    for id in &r.overdue {
        println!("rotation overdue: key {id}");
    }
}

fn parse_kind(s: &str) -> Result<KeyKind, String> {
    s.parse()
}

pub async fn run(config: Option<&Path>, command: KeysCommand) -> anyhow::Result<ExitCode> {
    if let KeysCommand::NewMaster { out } = &command {
        write_new_master(out)?;
        println!("wrote a new master key to {}", out.display());
        return Ok(ExitCode::SUCCESS);
    }
    let ctx = Context::connect(config).await?;
    let actor = ctx.settings.actor.clone();
    let mut client = ctx.pool.get().await?;
    match command {
        KeysCommand::Init { json } => {
            let master = ctx.master_key()?;
            let tx = client.transaction().await?;
            let report = store::init(&tx, &master, &ctx.settings.key_policy, &actor)
                .await
                .context("initialise the key store")?;
            tx.commit().await?;
            if json {
                output::json(&report)?;
            } else {
                println!(
                    "data key  {} ({})",
                    report.data_key.id, report.data_key.state
                );
                println!(
                    "field key {} ({})",
                    report.field_key.id, report.field_key.state
                );
                println!(
                    "{}",
                    if report.created.is_empty() {
                        "nothing to do: both keys already active"
                    } else {
                        "created and activated"
                    }
                );
            }
        }
        KeysCommand::List { json } => {
            let keys = store::list(&**client).await?;
            if json {
                output::json(&keys)?;
            } else {
                print_keys(&keys);
            }
        }
        KeysCommand::Generate { kind, label, json } => {
            let master = ctx.master_key()?;
            let tx = client.transaction().await?;
            let rec = store::generate(&tx, &master, kind, &label, &ctx.settings.key_policy, &actor)
                .await
                .with_context(|| format!("generate a {kind} key"))?;
            tx.commit().await?;
            tracing::info!(key_id = %rec.id, kind = %kind, "key generated");
            if json {
                output::json(&rec)?;
            } else {
                println!("generated {kind} key {} (pending)", rec.id);
            }
        }
        KeysCommand::Activate { id, json } => {
            let tx = client.transaction().await?;
            let rec = store::activate(&tx, id, &actor)
                .await
                .with_context(|| format!("activate key {id}"))?;
            tx.commit().await?;
            if json {
                output::json(&rec)?;
            } else {
                println!("{} key {} is active", rec.kind, rec.id);
            }
        }
        KeysCommand::Rewrap { json } => {
            let master = ctx.master_key()?;
            let tx = client.transaction().await?;
            let report = store::rewrap(&tx, &master, &ctx.settings.key_policy, &actor)
                .await
                .context("rotate the data key")?;
            tx.commit().await?;
            if json {
                output::json(&report)?;
            } else {
                println!(
                    "data key {} is active; {} field key(s) re-wrapped; old data key {} is decrypt_only",
                    report.new_data_key, report.n_field_keys, report.old_data_key
                );
            }
        }
        KeysCommand::RotateMaster {
            new_master_key_file,
            json,
        } => {
            let old = ctx.master_key()?;
            let provider = FileMasterKey::new("--new-master-key-file", &new_master_key_file);
            let new = provider
                .load()
                .with_context(|| format!("load the new master key from {}", provider.describe()))?;
            let tx = client.transaction().await?;
            let n = store::rotate_master(&tx, &old, &new, &actor)
                .await
                .context("rotate the master key")?;
            tx.commit().await?;
            if json {
                output::json(
                    &serde_json::json!({"old_master_key": old.id(), "new_master_key": new.id(), "n_data_keys": n}),
                )?;
            } else {
                println!(
                    "{n} data key(s) re-wrapped under master key {} (was {}).\n\
                     Next: give every process the new key (REKEY_MASTER_KEY, or replace the file REKEY_MASTER_KEY_FILE names), then\n\
                     - restart every rekey-worker (a worker whose key file was replaced reloads it by itself; one given the key in REKEY_MASTER_KEY must be restarted),\n\
                     - restart every coordinator driving a run (`rekey resume N` after the restart carries on),\n\
                     - restart the application's processes that unwrap keys.\n\
                     `rekey status` names workers still holding the old key, and `rekey preflight` fails while one is live.",
                    new.id(),
                    old.id()
                );
            }
        }
        KeysCommand::Retire { id, json } => {
            let tx = client.transaction().await?;
            // The census that guards retirement needs the tables: never retire blind.
            let targets = ctx.settings.require_targets()?;
            let rec = store::retire(&tx, id, targets, &actor)
                .await
                .with_context(|| format!("retire key {id}"))?;
            tx.commit().await?;
            if json {
                output::json(&rec)?;
            } else {
                println!("{} key {} is retired", rec.kind, rec.id);
            }
        }
        KeysCommand::Destroy { id, json } => {
            let tx = client.transaction().await?;
            let targets = ctx.settings.require_targets()?;
            let rec = store::destroy(&tx, id, targets, &actor)
                .await
                .with_context(|| format!("destroy key {id}"))?;
            tx.commit().await?;
            if json {
                output::json(&rec)?;
            } else {
                println!(
                    "{} key {} is destroyed: its wrapped material is erased",
                    rec.kind, rec.id
                );
            }
        }
        KeysCommand::Census { json } => {
            let rows = census::census(&**client, ctx.settings.require_targets()?).await?;
            let keys = store::list(&**client).await?;
            let report = CensusReport::new(rows, &keys);
            if json {
                output::json(&report)?;
            } else {
                report.print();
            }
        }
        KeysCommand::Status { no_census, json } => {
            let targets = if no_census {
                &[][..]
            } else {
                ctx.settings.require_targets()?
            };
            let report = status(&**client, targets, !no_census).await?;
            if json {
                output::json(&report)?;
            } else {
                print_status(&report);
            }
            let near_budget: Vec<&KeyStatus> = report
                .keys
                .iter()
                .filter(|k| {
                    k.kind == KeyKind::Field
                        && matches!(k.state, KeyState::Active | KeyState::Pending)
                        && k.nonce_budget_used_pct >= BUDGET_WARN_PCT
                })
                .collect();
            if !near_budget.is_empty() {
                if !json {
                    for k in &near_budget {
                        eprintln!(
                            "field key {} has used {:.1}% of its nonce budget (warning at {BUDGET_WARN_PCT}%): rotate to a new key",
                            k.id, k.nonce_budget_used_pct
                        );
                    }
                }
                return Ok(ExitCode::from(EXIT_BUDGET));
            }
            if !report.overdue.is_empty() {
                return Ok(ExitCode::from(EXIT_OVERDUE));
            }
        }
        KeysCommand::NewMaster { .. } => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}

fn write_new_master(out: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = master::generate_base64();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("create {} (it must not exist yet)", out.display()))?;
    f.write_all(key.expose_secret().as_bytes())?;
    f.write_all(b"\n")?;
    Ok(())
}

fn print_keys(keys: &[KeyRecord]) {
    println!(
        "{:<36}  {:<5}  {:<12}  {:<16}  {:<16}  {:<16}  {:>12}",
        "ID", "KIND", "STATE", "CREATED", "ACTIVATED", "ROTATION DUE", "ENCRYPTIONS"
    );
    for k in keys {
        println!(
            "{:<36}  {:<5}  {:<12}  {:<16}  {:<16}  {:<16}  {:>12}",
            k.id,
            k.kind,
            k.state,
            when(Some(k.created_at)),
            when(k.activated_at),
            when(Some(k.rotation_due_at)),
            format!(
                "{}/2^{}",
                k.encryptions,
                63 - k.nonce_budget.leading_zeros()
            )
        );
    }
}

/// The census with each key's state beside it.
#[derive(Debug, Serialize)]
pub struct CensusReport {
    pub rows: Vec<CensusRowWithState>,
    pub malformed_values: i64,
}

#[derive(Debug, Serialize)]
pub struct CensusRowWithState {
    #[serde(flatten)]
    pub row: CensusRow,
    pub key_state: Option<KeyState>,
}

impl CensusReport {
    fn new(rows: Vec<CensusRow>, keys: &[KeyRecord]) -> Self {
        let malformed_values = rows
            .iter()
            .filter(|r| r.key_id.is_none())
            .map(|r| r.n_values)
            .sum();
        let rows = rows
            .into_iter()
            .map(|row| CensusRowWithState {
                key_state: row
                    .key_id
                    .and_then(|id| keys.iter().find(|k| k.id == id).map(|k| k.state)),
                row,
            })
            .collect();
        Self {
            rows,
            malformed_values,
        }
    }

    fn print(&self) {
        println!(
            "{:<28}  {:<16}  {:<36}  {:<12}  {:>10}",
            "TABLE", "COLUMN", "KEY", "STATE", "VALUES"
        );
        for r in &self.rows {
            println!(
                "{:<28}  {:<16}  {:<36}  {:<12}  {:>10}",
                r.row.table,
                r.row.column,
                r.row
                    .key_id
                    .map(|k| k.to_string())
                    .unwrap_or_else(|| "(not an envelope)".into()),
                r.key_state
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                r.row.n_values
            );
        }
    }
}
