//! `rekey preflight`: the playbook's pre-rotation checklist, the items software can check,
//! each pass, warn or fail with its reason. `rekey rotate` runs it first.
//!
//! The backup check is configurable (`backup_check` in `rekey.toml`, `REKEY_BACKUP_CHECK`):
//! - `archiver` (default): `pg_stat_archiver` shows a WAL segment archived within 24 hours
//!   and no archiving failure since (continuous archiving is how most managed and
//!   self-hosted backups work); warns when archiving is off, since a base backup made by
//!   other means cannot be seen from SQL;
//! - `command:<shell command>`: the command exits 0 when a backup from the last 24 hours
//!   exists (e.g. `command:pgbackrest info --output=json | jq -e …`);
//! - `none`: the check warns that nobody checked.

use std::time::Duration;

use deadpool_postgres::Pool;
use rekey_common::Settings;
use rekey_common::audit::{self, AuditEntry};
use rekey_common::broker::{self, Topology};
use rekey_common::keys::census;
use rekey_common::keys::{KeyKind, KeyState, store};
use serde::Serialize;
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One checklist item.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub item: &'static str,
    pub status: Status,
    pub detail: String,
}

/// The whole checklist.
#[derive(Debug, Clone, Serialize)]
pub struct Preflight {
    pub checks: Vec<Check>,
    pub passed: bool,
}

impl Preflight {
    pub fn failures(&self) -> Vec<&Check> {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .collect()
    }

    pub fn print(&self) {
        for c in &self.checks {
            let mark = match c.status {
                Status::Pass => "PASS",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("[{mark}] {:<24} {}", c.item, c.detail);
        }
    }
}

fn check(item: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        item,
        status,
        detail: detail.into(),
    }
}

/// Runs every check; never stops at the first failure.
pub async fn run(settings: &Settings) -> Preflight {
    let mut checks = Vec::new();
    let pool = rekey_common::db::pool(settings, 2);
    let db = match &pool {
        Ok(pool) => rekey_common::db::check_connection(pool, settings)
            .await
            .map_err(|e| format!("{e:#}")),
        Err(e) => Err(format!("{e:#}")),
    };
    match &db {
        Ok(version) => checks.push(check(
            "database",
            Status::Pass,
            format!("PostgreSQL {version} at {}", settings.database_display()),
        )),
        Err(e) => checks.push(check("database", Status::Fail, e.clone())),
    }
    checks.push(broker_check(settings).await);
    let master = settings.load_master_key().map_err(|e| format!("{e:#}"));
    match (&master, &pool, &db) {
        (Err(e), _, _) => checks.push(check("master_key", Status::Fail, e.clone())),
        (Ok(m), Ok(pool), Ok(_)) => checks.extend(key_checks(pool, settings, m).await),
        (Ok(_), _, _) => checks.push(check(
            "master_key",
            Status::Warn,
            "present, but the key store could not be read",
        )),
    }
    if let (Ok(pool), Ok(_)) = (&pool, &db) {
        checks.push(targets_check(pool, settings).await);
        checks.push(workers_check(pool).await);
        checks.push(audit_check(pool, settings).await);
        checks.push(backup_check(pool, settings).await);
    }
    let passed = checks.iter().all(|c| c.status != Status::Fail);
    Preflight { checks, passed }
}

async fn broker_check(settings: &Settings) -> Check {
    let topo = Topology::of(settings);
    let result = async {
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            broker::connect_settings(settings, "rekey-preflight"),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from RabbitMQ at {} within 10 s ({})",
                broker::redacted(secrecy::ExposeSecret::expose_secret(&settings.amqp_url)),
                settings.amqp_url_from
            )
        })??;
        // Were the queues there already? Workers without the configure permission wait
        // for them (retrying every few seconds, at most 10 s apart): when this check
        // declares them, it gives the workers that long to attach.
        let existed = {
            let probe = conn.create_channel().await?;
            let there = broker::queue_depth(&probe, &topo.batches).await.is_ok();
            if there {
                broker::close_channel(&probe).await;
            }
            there
        };
        let ch = conn.create_channel().await?;
        broker::declare(&ch, &topo).await?;
        let mut n = broker::consumer_count(&ch, &topo.batches).await?;
        if !existed {
            let until = std::time::Instant::now() + broker::Backoff::MAX + Duration::from_secs(5);
            while n == 0 && std::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(500)).await;
                n = broker::consumer_count(&ch, &topo.batches).await?;
            }
        }
        broker::close(&conn, "bye").await;
        anyhow::Ok(n)
    }
    .await;
    match result {
        Ok(0) => check(
            "broker_and_workers",
            Status::Fail,
            format!(
                "queues declared on {}, but no worker is consuming {}: start rekey-worker",
                broker::redacted(secrecy::ExposeSecret::expose_secret(&settings.amqp_url)),
                topo.batches
            ),
        ),
        Ok(n) => check(
            "broker_and_workers",
            Status::Pass,
            format!("queues declared; {n} worker(s) consuming {}", topo.batches),
        ),
        Err(e) => check("broker_and_workers", Status::Fail, format!("{e:#}")),
    }
}

/// Every target's table exists with a `bigint` id column and `bytea` encrypted columns.
async fn targets_check(pool: &Pool, settings: &Settings) -> Check {
    let problems = async {
        let c = pool.get().await?;
        anyhow::Ok(rekey_common::target::schema_problems(&**c, &settings.targets).await?)
    }
    .await;
    match problems {
        Err(e) => check("targets", Status::Fail, format!("{e:#}")),
        Ok(p) if !p.is_empty() => check("targets", Status::Fail, p.join("; ")),
        Ok(_) => {
            let columns: usize = settings.targets.iter().map(|t| t.columns.len()).sum();
            check(
                "targets",
                Status::Pass,
                format!(
                    "{} table(s): {} ids, {columns} {} column(s)",
                    settings.targets.len(),
                    rekey_common::target::ID_TYPE,
                    rekey_common::target::VALUE_TYPE
                ),
            )
        }
    }
}

/// The live workers (their presence rows): each must hold the master key the key store
/// is wrapped by, and none may be failing every batch.
async fn workers_check(pool: &Pool) -> Check {
    let result = async {
        let c = pool.get().await?;
        let workers = rekey_common::ledger::live_workers(&**c).await?;
        let store_ids = store::wrapping_master_ids(&**c).await?;
        anyhow::Ok((workers, store_ids))
    }
    .await;
    let (workers, store_ids) = match result {
        Ok(x) => x,
        Err(e) => return check("workers", Status::Fail, format!("{e:#}")),
    };
    let stale: Vec<String> = workers
        .iter()
        .filter(|w| !store_ids.is_empty() && !store_ids.contains(&w.master_key_id))
        .map(|w| format!("{} (master key {})", w.worker_id, w.master_key_id))
        .collect();
    if !stale.is_empty() {
        let store: Vec<String> = store_ids.iter().map(ToString::to_string).collect();
        return check(
            "workers",
            Status::Fail,
            format!(
                "{} live worker(s) hold another master key than the key store's ({}): {}; restart them with the key store's master key",
                stale.len(),
                store.join(", "),
                stale.join(", ")
            ),
        );
    }
    let failing = rekey_common::ledger::failing_groups(&workers);
    if let Some((kind, error, ids)) = failing.first() {
        // A worker that cannot open the key store fails every batch; contention passes.
        let status = if kind == "wrong_master_key" {
            Status::Fail
        } else {
            Status::Warn
        };
        return check(
            "workers",
            status,
            format!(
                "{} worker(s) failing every batch ({kind}): {error}: {}",
                ids.len(),
                ids.join(", ")
            ),
        );
    }
    if workers.is_empty() {
        return check(
            "workers",
            Status::Warn,
            "no worker has reported its presence in the last 30 s (workers older than this rekey do not)",
        );
    }
    check(
        "workers",
        Status::Pass,
        format!(
            "{} live worker(s), all on the key store's master key",
            workers.len()
        ),
    )
}

async fn key_checks(
    pool: &Pool,
    settings: &Settings,
    master: &rekey_common::keys::master::MasterKey,
) -> Vec<Check> {
    let mut out = Vec::new();
    let Ok(client) = pool.get().await else {
        return vec![check("master_key", Status::Fail, "no database connection")];
    };
    let ring = match store::load_ring(&**client, master).await {
        Ok(r) => {
            out.push(check(
                "master_key",
                Status::Pass,
                format!(
                    "master key {} ({}, provider {}) unwraps every stored key ({} field keys usable)",
                    master.id(),
                    master.describe(),
                    master.provider(),
                    r.len()
                ),
            ));
            r
        }
        Err(e) => {
            out.push(check(
                "master_key",
                Status::Fail,
                format!("a stored key does not unwrap: {e}"),
            ));
            return out;
        }
    };
    let keys = match store::list(&**client).await {
        Ok(k) => k,
        Err(e) => {
            out.push(check("keys", Status::Fail, e.to_string()));
            return out;
        }
    };
    let active = keys
        .iter()
        .find(|k| k.kind == KeyKind::Field && k.state == KeyState::Active);
    let pending = keys
        .iter()
        .filter(|k| k.kind == KeyKind::Field && k.state == KeyState::Pending)
        .count();
    match (active, pending) {
        (None, _) => out.push(check("new_keys", Status::Fail, "no active field key: run `rekey keys init`")),
        (Some(_), 0) => out.push(check("new_keys", Status::Warn, "no pending field key yet: `rekey rotate` will generate one (or run `rekey keys generate --kind field`)")),
        (Some(_), n) => out.push(check("new_keys", Status::Pass, format!("{n} pending field key(s) ready"))),
    }
    match census::census(&**client, &settings.targets).await {
        Ok(rows) => {
            let unreadable: Vec<String> = rows
                .iter()
                .filter(|r| r.key_id.is_some_and(|k| !ring.contains(&k)))
                .map(|r| {
                    format!(
                        "{}.{} has {} values under key {}",
                        r.table,
                        r.column,
                        r.n_values,
                        r.key_id.expect("some")
                    )
                })
                .collect();
            if unreadable.is_empty() {
                let n: i64 = rows.iter().map(|r| r.n_values).sum();
                out.push(check(
                    "old_keys",
                    Status::Pass,
                    format!("every key of the {n} values in the target columns is usable"),
                ));
            } else {
                out.push(check(
                    "old_keys",
                    Status::Warn,
                    format!(
                        "values under keys this ring cannot use (they will be quarantined): {}",
                        unreadable.join("; ")
                    ),
                ));
            }
        }
        Err(e) => out.push(check("old_keys", Status::Fail, format!("{e:#}"))),
    }
    out
}

async fn audit_check(pool: &Pool, settings: &Settings) -> Check {
    let result = async {
        let c = pool.get().await?;
        audit::record(
            &**c,
            &[AuditEntry {
                key_id: None,
                operation: "preflight".into(),
                success: true,
                n_ops: 1,
                run_id: None,
                batch_no: None,
                actor: settings.actor.clone(),
                detail: json!({}),
            }],
        )
        .await?;
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => check(
            "audit_log",
            Status::Pass,
            "writable (a preflight entry was appended)",
        ),
        Err(e) => check("audit_log", Status::Fail, format!("not writable: {e:#}")),
    }
}

async fn backup_check(pool: &Pool, settings: &Settings) -> Check {
    let spec = settings.backup_check.as_str();
    if spec == "none" {
        return check(
            "backup",
            Status::Warn,
            "no backup check configured (REKEY_BACKUP_CHECK=none): confirm a backup from the last 24 h by hand",
        );
    }
    if let Some(cmd) = spec.strip_prefix("command:") {
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .await;
        return match out {
            Ok(o) if o.status.success() => check(
                "backup",
                Status::Pass,
                format!("backup command succeeded: {cmd}"),
            ),
            Ok(o) => check(
                "backup",
                Status::Fail,
                format!("backup command exited with {}: {cmd}", o.status),
            ),
            Err(e) => check(
                "backup",
                Status::Fail,
                format!("could not run the backup command: {e}"),
            ),
        };
    }
    let row = async {
        let c = pool.get().await?;
        let r = c
            .query_one(
                "SELECT current_setting('archive_mode'), last_archived_time, last_failed_time,
                        last_archived_time > now() - interval '24 hours'
                   FROM pg_stat_archiver",
                &[],
            )
            .await?;
        anyhow::Ok((
            r.get::<_, String>(0),
            r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(1),
            r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(2),
            r.get::<_, Option<bool>>(3),
        ))
    }
    .await;
    match row {
        Err(e) => check(
            "backup",
            Status::Fail,
            format!("cannot read pg_stat_archiver: {e:#}"),
        ),
        Ok((mode, _, _, _)) if mode == "off" => check(
            "backup",
            Status::Warn,
            "WAL archiving is off, so no backup is visible from SQL: confirm one from the last 24 h, or set REKEY_BACKUP_CHECK=command:<check>",
        ),
        Ok((_, Some(last), failed, Some(true))) if failed.is_none_or(|f| f < last) => {
            check("backup", Status::Pass, format!("WAL archived at {last}"))
        }
        Ok((_, last, failed, _)) => check(
            "backup",
            Status::Fail,
            format!("no WAL archived in the last 24 h (last {last:?}, last failure {failed:?})"),
        ),
    }
}
