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
    /// Master key rotation: every data key re-wrapped under a new master key, in one
    /// transaction, audited; no field value is touched. The current master key comes from
    /// the usual settings (REKEY_MASTER_KEY_PROVIDER says which when both a local key and a
    /// token are configured); the new one from a file (base64 text) or from the configured
    /// PKCS#11 token by its label. Moves between providers: local → token, token → token,
    /// token → local.
    RotateMaster {
        /// The new master key: a local key in this file (base64 text).
        #[arg(
            long,
            required_unless_present = "new_pkcs11_label",
            conflicts_with = "new_pkcs11_label"
        )]
        new_master_key_file: Option<PathBuf>,
        /// The new master key: the key with this label in the PKCS#11 token the settings
        /// name (REKEY_PKCS11_MODULE, REKEY_PKCS11_TOKEN_LABEL, REKEY_PKCS11_PIN_FILE).
        #[arg(long)]
        new_pkcs11_label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A new master key: 32 random bytes (base64) in a file readable only by its owner
    /// (`--out FILE`), or an AES-256 key generated inside the configured PKCS#11 token
    /// (`--pkcs11 --label L`): sensitive, not extractable, a token object; its bytes never
    /// leave the token.
    NewMaster {
        #[arg(long, required_unless_present = "pkcs11", conflicts_with = "pkcs11")]
        out: Option<PathBuf>,
        /// Generate the key inside the PKCS#11 token of the settings.
        #[arg(long, requires = "label")]
        pkcs11: bool,
        /// The new token key's label (CKA_LABEL).
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
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
    /// What wraps the key: for a data key its master key's provider and key (`local key`,
    /// `pkcs11 key 'L' in token 'T' (serial S)`), for a field key its data key.
    pub wrapped_by: String,
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
                wrapped_by: k.wrapped_by.clone(),
            }
        })
        .collect();
    let overdue = out.iter().filter(|k| k.overdue).map(|k| k.id).collect();
    Ok(StatusReport { keys: out, overdue })
}

fn print_status(r: &StatusReport) {
    println!(
        "{:<36}  {:<5}  {:<12}  {:>8}  {:<16}  {:>9}  {:>9}  {:>12}  WRAPPED BY",
        "ID", "KIND", "STATE", "AGE (d)", "ROTATION DUE", "DUE IN", "BUDGET %", "STILL UNDER"
    );
    for k in &r.keys {
        println!(
            "{:<36}  {:<5}  {:<12}  {:>8.1}  {:<16}  {:>9}  {:>9.6}  {:>12}  {}",
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
            k.wrapped_by,
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
    if let KeysCommand::NewMaster {
        out,
        pkcs11,
        label,
        json,
    } = &command
    {
        if let Some(out) = out {
            write_new_master(out)?;
            println!("wrote a new master key to {}", out.display());
            return Ok(ExitCode::SUCCESS);
        }
        debug_assert!(*pkcs11);
        let settings = rekey_common::Settings::load(config)?;
        let token = settings.pkcs11.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "--pkcs11 needs the token's settings: REKEY_PKCS11_MODULE, REKEY_PKCS11_TOKEN_LABEL (or REKEY_PKCS11_SLOT) and REKEY_PKCS11_PIN_FILE, or [pkcs11] in rekey.toml"
            )
        })?;
        let label = label.as_deref().expect("clap requires --label");
        let key = rekey_common::keys::pkcs11::TokenKey::generate(&token.with_key_label(label))?;
        if *json {
            output::json(&serde_json::json!({
                "provider": "pkcs11",
                "master_key_id": key.id(),
                "token": key.token_label(),
                "serial": key.serial(),
                "key_label": key.key_label(),
            }))?;
        } else {
            println!(
                "generated master key {} inside the token: {}
                 It is sensitive and not extractable. Use it with REKEY_PKCS11_KEY_LABEL={label} (and                  REKEY_MASTER_KEY_PROVIDER=pkcs11), or move the data keys to it with                  `rekey keys rotate-master --new-pkcs11-label {label}`.",
                key.id(),
                key.describe()
            );
        }
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
            new_pkcs11_label,
            json,
        } => {
            let old = ctx.master_key()?;
            let new = match (&new_master_key_file, &new_pkcs11_label) {
                (Some(file), _) => {
                    let provider = FileMasterKey::new("--new-master-key-file", file);
                    provider.load().with_context(|| {
                        format!("load the new master key from {}", provider.describe())
                    })?
                }
                (None, Some(label)) => {
                    let token = ctx.settings.pkcs11.as_ref().ok_or_else(|| {
                        anyhow::anyhow!(
                            "--new-pkcs11-label needs the token's settings: REKEY_PKCS11_MODULE, REKEY_PKCS11_TOKEN_LABEL (or REKEY_PKCS11_SLOT) and REKEY_PKCS11_PIN_FILE, or [pkcs11] in rekey.toml"
                        )
                    })?;
                    let key =
                        rekey_common::keys::pkcs11::TokenKey::open(&token.with_key_label(label))?;
                    master::MasterKey::from_token(key)?
                }
                (None, None) => unreachable!("clap requires one"),
            };
            anyhow::ensure!(
                new.id() != old.id(),
                "the new master key is the current one ({}): nothing to re-wrap",
                new.describe()
            );
            let tx = client.transaction().await?;
            let n = store::rotate_master(&tx, &old, &new, &actor)
                .await
                .context("rotate the master key")?;
            tx.commit().await?;
            if json {
                output::json(&serde_json::json!({
                    "old_master_key": old.id(),
                    "old_provider": old.provider(),
                    "new_master_key": new.id(),
                    "new_provider": new.provider(),
                    "new_master_key_is": new.describe(),
                    "n_data_keys": n
                }))?;
            } else {
                println!(
                    "{n} data key(s) re-wrapped under master key {} ({}; was {}, {}).\n\
                     Next: give every process the new key (REKEY_MASTER_KEY, or replace the file REKEY_MASTER_KEY_FILE names; \
                     for a token key REKEY_PKCS11_KEY_LABEL and REKEY_MASTER_KEY_PROVIDER=pkcs11), then\n\
                     - restart every rekey-worker (a worker whose key file was replaced reloads it by itself; one given the key in REKEY_MASTER_KEY must be restarted),\n\
                     - restart every coordinator driving a run (`rekey resume N` after the restart carries on),\n\
                     - restart the application's processes that unwrap keys.\n\
                     `rekey status` names workers still holding the old key, and `rekey preflight` fails while one is live.",
                    new.id(),
                    new.describe(),
                    old.id(),
                    old.describe()
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
        "{:<36}  {:<5}  {:<12}  {:<16}  {:<16}  {:<16}  {:>12}  WRAPPED BY",
        "ID", "KIND", "STATE", "CREATED", "ACTIVATED", "ROTATION DUE", "ENCRYPTIONS"
    );
    for k in keys {
        println!(
            "{:<36}  {:<5}  {:<12}  {:<16}  {:<16}  {:<16}  {:>12}  {}",
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
            ),
            k.wrapped_by
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
