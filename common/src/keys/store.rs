//! The key store in Postgres (`rekey.keys`): generating, wrapping, activating, rotating,
//! retiring and destroying keys, and loading the key ring. Every key operation writes an
//! audit entry in the same transaction as the change it records.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use tokio_postgres::{GenericClient, Row, Transaction};
use uuid::Uuid;

use super::KeyPolicy;
use super::census::{self, CensusRow};
use super::master::MasterKey;
use super::ring::{FieldKey, KeyRing};
use super::wrap::{self, UnwrapError};
use super::{KeyKind, KeyState};
use crate::audit::{self, AuditEntry};
use crate::secret::KeyMaterial;
use crate::target::Target;

/// The words every refusal for a spent nonce budget carries (a failed batch's reason
/// holds them; the driver halts the run on them).
pub const BUDGET_SPENT: &str = "has reached its nonce budget";

/// Why a key store operation was refused. Texts name keys by id, never by material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "wrong master key: data key {data_key_id} is wrapped by master key {expected}, but the supplied master key is {supplied}; check REKEY_MASTER_KEY / REKEY_MASTER_KEY_FILE"
    )]
    WrongMasterKey {
        data_key_id: Uuid,
        expected: Uuid,
        supplied: Uuid,
    },
    #[error(transparent)]
    Unwrap(#[from] UnwrapError),
    /// The master key's token could not be used (PKCS#11).
    #[error(transparent)]
    Custody(#[from] super::pkcs11::TokenError),
    #[error("illegal state change for {kind} key {key_id}: {from} -> {to}{}", transition_hint(*from, *to))]
    IllegalTransition {
        key_id: Uuid,
        kind: KeyKind,
        from: KeyState,
        to: KeyState,
    },
    #[error("no key with id {0}")]
    UnknownKey(Uuid),
    #[error(
        "field key {key_id} {} ({used} of {budget} random-nonce encryptions used, {more} more refused): rotate to a new key",
        BUDGET_SPENT
    )]
    BudgetSpent {
        key_id: Uuid,
        used: i64,
        budget: i64,
        more: i64,
    },
    #[error("no active {0} key: run `rekey keys init` first")]
    NoActiveKey(KeyKind),
    #[error(
        "{kind} key {key_id} is still in use ({usage}); move those values to another key first"
    )]
    StillInUse {
        key_id: Uuid,
        kind: KeyKind,
        usage: String,
    },
    #[error("key {key_id} is {state}; only keys in state {expected} can be {action}")]
    WrongState {
        key_id: Uuid,
        state: KeyState,
        expected: &'static str,
        action: &'static str,
    },
    #[error("key store query failed: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to do instead of an illegal key state change, for the error text.
fn transition_hint(from: KeyState, to: KeyState) -> &'static str {
    match (from, to) {
        (KeyState::Active, KeyState::Retired) => {
            ": an active key cannot be retired; `rekey keys activate` another key of its kind first (it becomes decrypt_only), move the values off it (`rekey rotate`), then retire it"
        }
        (KeyState::Active, KeyState::Destroyed) | (KeyState::DecryptOnly, KeyState::Destroyed) => {
            ": only a retired key can be destroyed; retire it first (`rekey keys retire`, refused while values remain under it)"
        }
        (KeyState::Retired | KeyState::Destroyed, KeyState::Active) => {
            ": a retired or destroyed key never comes back; generate a new key (`rekey keys generate`)"
        }
        _ => "",
    }
}

/// A stored key's public facts: everything but its wrapped material.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyRecord {
    pub id: Uuid,
    pub kind: KeyKind,
    pub state: KeyState,
    /// The master key's fingerprint (data keys) or the wrapping data key's id (field keys).
    pub wrapping_key_id: Uuid,
    pub label: String,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub deactivated_at: Option<DateTime<Utc>>,
    pub retired_at: Option<DateTime<Utc>>,
    pub destroyed_at: Option<DateTime<Utc>>,
    pub rotation_due_at: DateTime<Utc>,
    pub encryptions: i64,
    pub nonce_budget: i64,
    /// For a data key, the master key that wraps it: `local key`, or `pkcs11 key 'L' in
    /// token 'T' (serial S)` (from `rekey.master_keys`); for a field key, `data key <id>`.
    pub wrapped_by: String,
}

const COLUMNS: &str = "id, kind, state, wrapping_key_id, label, created_at, activated_at, deactivated_at, \
                       retired_at, destroyed_at, rotation_due_at, encryptions, nonce_budget, \
                       CASE WHEN kind = 'field' THEN 'data key ' || wrapping_key_id \
                       ELSE coalesce((SELECT m.description FROM rekey.master_keys m WHERE m.id = wrapping_key_id), 'local key') \
                       END AS wrapped_by";

/// Records `master` in `rekey.master_keys` (once): the provider of the key that wraps
/// data keys, for `keys list` and `keys status`.
async fn record_master<C: GenericClient>(c: &C, master: &MasterKey) -> Result<()> {
    let description = match master.token() {
        Some(t) => t.describe(),
        None => "local key".to_owned(),
    };
    c.execute(
        "INSERT INTO rekey.master_keys (id, provider, description) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        &[&master.id(), &master.provider(), &description],
    )
    .await?;
    Ok(())
}

fn record(row: &Row) -> KeyRecord {
    KeyRecord {
        id: row.get("id"),
        kind: row
            .get::<_, &str>("kind")
            .parse()
            .expect("kind checked by the database"),
        state: row
            .get::<_, &str>("state")
            .parse()
            .expect("state checked by the database"),
        wrapping_key_id: row.get("wrapping_key_id"),
        label: row.get("label"),
        created_at: row.get("created_at"),
        activated_at: row.get("activated_at"),
        deactivated_at: row.get("deactivated_at"),
        retired_at: row.get("retired_at"),
        destroyed_at: row.get("destroyed_at"),
        rotation_due_at: row.get("rotation_due_at"),
        encryptions: row.get("encryptions"),
        nonce_budget: row.get("nonce_budget"),
        wrapped_by: row.get("wrapped_by"),
    }
}

/// Every key, oldest first.
pub async fn list<C: GenericClient>(c: &C) -> Result<Vec<KeyRecord>> {
    let rows = c
        .query(
            &format!("SELECT {COLUMNS} FROM rekey.keys ORDER BY created_at, id"),
            &[],
        )
        .await?;
    Ok(rows.iter().map(record).collect())
}

pub async fn get<C: GenericClient>(c: &C, id: Uuid) -> Result<KeyRecord> {
    c.query_opt(
        &format!("SELECT {COLUMNS} FROM rekey.keys WHERE id = $1"),
        &[&id],
    )
    .await?
    .map(|r| record(&r))
    .ok_or(Error::UnknownKey(id))
}

async fn lock(tx: &Transaction<'_>, id: Uuid) -> Result<KeyRecord> {
    tx.query_opt(
        &format!("SELECT {COLUMNS} FROM rekey.keys WHERE id = $1 FOR UPDATE"),
        &[&id],
    )
    .await?
    .map(|r| record(&r))
    .ok_or(Error::UnknownKey(id))
}

/// The active key of a kind, if any.
pub async fn active<C: GenericClient>(c: &C, kind: KeyKind) -> Result<Option<KeyRecord>> {
    Ok(c.query_opt(
        &format!("SELECT {COLUMNS} FROM rekey.keys WHERE kind = $1 AND state = 'active'"),
        &[&kind.as_str()],
    )
    .await?
    .map(|r| record(&r)))
}

/// Checks that `master` is the key the stored data keys were wrapped with.
pub async fn verify_master<C: GenericClient>(c: &C, master: &MasterKey) -> Result<()> {
    let row = c
        .query_opt(
            "SELECT id, wrapping_key_id FROM rekey.keys
              WHERE kind = 'data' AND state <> 'destroyed' AND wrapping_key_id <> $1 LIMIT 1",
            &[&master.id()],
        )
        .await?;
    match row {
        Some(r) => Err(Error::WrongMasterKey {
            data_key_id: r.get(0),
            expected: r.get(1),
            supplied: master.id(),
        }),
        None => Ok(()),
    }
}

/// Unwraps one data key with the master key.
async fn data_key_material<C: GenericClient>(
    c: &C,
    master: &MasterKey,
    id: Uuid,
) -> Result<KeyMaterial> {
    let row = c
        .query_opt(
            "SELECT wrapping_key_id, wrapped_key, state FROM rekey.keys WHERE id = $1 AND kind = 'data'",
            &[&id],
        )
        .await?
        .ok_or(Error::UnknownKey(id))?;
    let wrapping: Uuid = row.get(0);
    let wrapped: Option<Vec<u8>> = row.get(1);
    let state: KeyState = row
        .get::<_, &str>(2)
        .parse()
        .expect("state checked by the database");
    if wrapping != master.id() {
        return Err(Error::WrongMasterKey {
            data_key_id: id,
            expected: wrapping,
            supplied: master.id(),
        });
    }
    let wrapped = wrapped.ok_or(Error::WrongState {
        key_id: id,
        state,
        expected: "pending, active, decrypt_only or retired",
        action: "unwrapped",
    })?;
    unwrap_data_key(master, id, &wrapped)
}

fn unwrap_data_key(master: &MasterKey, id: Uuid, wrapped: &[u8]) -> Result<KeyMaterial> {
    master.unwrap_data_key(id, wrapped).map_err(|e| match e {
        super::master::DataKeyUnwrapError::Unwrap(u) => Error::Unwrap(u),
        super::master::DataKeyUnwrapError::Token(t) => Error::Custody(t),
    })
}

fn wrap_data_key(master: &MasterKey, id: Uuid, key: &KeyMaterial) -> Result<Vec<u8>> {
    master.wrap_data_key(id, key).map_err(|e| match e {
        super::master::MasterKeyError::Token(t) => Error::Custody(t),
        other => Error::Other(other.into()),
    })
}

fn rotation_days(policy: &KeyPolicy, kind: KeyKind) -> i64 {
    i64::from(match kind {
        KeyKind::Data => policy.data_rotation_days,
        KeyKind::Field => policy.field_rotation_days,
    })
}

/// Generates a key in state `pending`: a data key wrapped by the master key, or a field
/// key wrapped by the active data key.
pub async fn generate(
    tx: &Transaction<'_>,
    master: &MasterKey,
    kind: KeyKind,
    label: &str,
    policy: &KeyPolicy,
    actor: &str,
) -> Result<KeyRecord> {
    verify_master(tx, master).await?;
    let id = Uuid::new_v4();
    let material = KeyMaterial::generate();
    let (wrapping_id, wrapped) = match kind {
        KeyKind::Data => {
            record_master(tx, master).await?;
            (master.id(), wrap_data_key(master, id, &material)?)
        }
        KeyKind::Field => {
            let data = active(tx, KeyKind::Data)
                .await?
                .ok_or(Error::NoActiveKey(KeyKind::Data))?;
            let dk = data_key_material(tx, master, data.id).await?;
            (
                data.id,
                wrap::wrap(&dk, data.id, KeyKind::Field, id, &material),
            )
        }
    };
    let nonce_budget = i64::try_from(policy.nonce_budget).unwrap_or(i64::MAX);
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO rekey.keys (id, kind, state, wrapped_key, wrapping_key_id, label, rotation_due_at, nonce_budget)
                 VALUES ($1, $2, 'pending', $3, $4, $5, now() + make_interval(days => $6::int), $7)
                 RETURNING {COLUMNS}"
            ),
            &[
                &id,
                &kind.as_str(),
                &wrapped,
                &wrapping_id,
                &label,
                &(rotation_days(policy, kind) as i32),
                &nonce_budget,
            ],
        )
        .await?;
    audit::record(
        tx,
        &[
            AuditEntry::key_op(id, "generate", actor, json!({"kind": kind, "label": label})),
            AuditEntry::key_op(
                id,
                "wrap",
                actor,
                json!({"kind": kind, "wrapping_key_id": wrapping_id}),
            ),
        ],
    )
    .await?;
    Ok(record(&row))
}

async fn set_state(
    tx: &Transaction<'_>,
    rec: &KeyRecord,
    to: KeyState,
    actor: &str,
) -> Result<KeyRecord> {
    if !rec.state.can_become(to) {
        return Err(Error::IllegalTransition {
            key_id: rec.id,
            kind: rec.kind,
            from: rec.state,
            to,
        });
    }
    let stamp = match to {
        KeyState::Active => "activated_at",
        KeyState::DecryptOnly => "deactivated_at",
        KeyState::Retired => "retired_at",
        KeyState::Destroyed => "destroyed_at",
        KeyState::Pending => unreachable!("no transition leads to pending"),
    };
    let wipe = if to == KeyState::Destroyed {
        ", wrapped_key = NULL"
    } else {
        ""
    };
    let row = tx
        .query_one(
            &format!("UPDATE rekey.keys SET state = $2, {stamp} = now(){wipe} WHERE id = $1 RETURNING {COLUMNS}"),
            &[&rec.id, &to.as_str()],
        )
        .await?;
    let operation = match to {
        KeyState::Active => "activate",
        KeyState::DecryptOnly => "deactivate",
        KeyState::Retired => "retire",
        KeyState::Destroyed => "destroy",
        KeyState::Pending => unreachable!(),
    };
    audit::record(
        tx,
        &[AuditEntry::key_op(
            rec.id,
            operation,
            actor,
            json!({"kind": rec.kind, "from": rec.state, "to": to}),
        )],
    )
    .await?;
    Ok(record(&row))
}

/// Makes a pending or decrypt-only key the active key of its kind; the previously active
/// key becomes decrypt-only in the same transaction. Activating the active key is a no-op.
pub async fn activate(tx: &Transaction<'_>, id: Uuid, actor: &str) -> Result<KeyRecord> {
    let rec = lock(tx, id).await?;
    if rec.state == KeyState::Active {
        return Ok(rec);
    }
    if !rec.state.can_become(KeyState::Active) {
        return Err(Error::IllegalTransition {
            key_id: id,
            kind: rec.kind,
            from: rec.state,
            to: KeyState::Active,
        });
    }
    if rec.kind == KeyKind::Field && rec.encryptions >= rec.nonce_budget {
        // A key with no nonce left would refuse every encryption it was made active for.
        return Err(Error::BudgetSpent {
            key_id: id,
            used: rec.encryptions,
            budget: rec.nonce_budget,
            more: 0,
        });
    }
    let current = tx
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM rekey.keys WHERE kind = $1 AND state = 'active' FOR UPDATE"
            ),
            &[&rec.kind.as_str()],
        )
        .await?
        .map(|r| record(&r));
    if let Some(current) = current {
        set_state(tx, &current, KeyState::DecryptOnly, actor).await?;
    }
    set_state(tx, &rec, KeyState::Active, actor).await
}

/// What `init` found or made.
#[derive(Debug, Clone, Serialize)]
pub struct InitReport {
    pub data_key: KeyRecord,
    pub field_key: KeyRecord,
    pub created: Vec<Uuid>,
}

/// Makes sure an active data key and an active field key exist; idempotent.
pub async fn init(
    tx: &Transaction<'_>,
    master: &MasterKey,
    policy: &KeyPolicy,
    actor: &str,
) -> Result<InitReport> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('rekey keys'))", &[])
        .await?;
    verify_master(tx, master).await?;
    let mut created = Vec::new();
    let data_key = match active(tx, KeyKind::Data).await? {
        Some(k) => k,
        None => {
            let k = generate(tx, master, KeyKind::Data, "initial data key", policy, actor).await?;
            created.push(k.id);
            activate(tx, k.id, actor).await?
        }
    };
    let field_key = match active(tx, KeyKind::Field).await? {
        Some(k) => k,
        None => {
            let k = generate(
                tx,
                master,
                KeyKind::Field,
                "initial field key",
                policy,
                actor,
            )
            .await?;
            created.push(k.id);
            activate(tx, k.id, actor).await?
        }
    };
    Ok(InitReport {
        data_key,
        field_key,
        created,
    })
}

/// What a data key rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct RewrapReport {
    pub old_data_key: Uuid,
    pub new_data_key: Uuid,
    pub n_field_keys: usize,
}

/// Data key rotation: a new data key, every field key that is not destroyed re-wrapped under
/// it, the new key active and the old one decrypt-only, all in the caller's transaction.
/// No field value is touched.
pub async fn rewrap(
    tx: &Transaction<'_>,
    master: &MasterKey,
    policy: &KeyPolicy,
    actor: &str,
) -> Result<RewrapReport> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('rekey keys'))", &[])
        .await?;
    let old = active(tx, KeyKind::Data)
        .await?
        .ok_or(Error::NoActiveKey(KeyKind::Data))?;
    let new = generate(tx, master, KeyKind::Data, "rotated data key", policy, actor).await?;
    let new_material = data_key_material(tx, master, new.id).await?;
    let rows = tx
        .query(
            "SELECT id, wrapping_key_id, wrapped_key FROM rekey.keys
              WHERE kind = 'field' AND state <> 'destroyed' ORDER BY id FOR UPDATE",
            &[],
        )
        .await?;
    let mut unwrapped_data_keys: Vec<(Uuid, KeyMaterial)> = Vec::new();
    let mut entries = Vec::new();
    for row in &rows {
        let (id, wrapping): (Uuid, Uuid) = (row.get(0), row.get(1));
        let wrapped: Vec<u8> = row.get(2);
        let dk = match unwrapped_data_keys.iter().find(|(k, _)| *k == wrapping) {
            Some((_, m)) => m.clone(),
            None => {
                let m = data_key_material(tx, master, wrapping).await?;
                unwrapped_data_keys.push((wrapping, m.clone()));
                m
            }
        };
        let material = wrap::unwrap(&dk, wrapping, KeyKind::Field, id, &wrapped)?;
        let rewrapped = wrap::wrap(&new_material, new.id, KeyKind::Field, id, &material);
        tx.execute(
            "UPDATE rekey.keys SET wrapped_key = $2, wrapping_key_id = $3 WHERE id = $1",
            &[&id, &rewrapped, &new.id],
        )
        .await?;
        entries.push(AuditEntry::key_op(
            id,
            "rewrap",
            actor,
            json!({"kind": "field", "from_data_key": wrapping, "to_data_key": new.id}),
        ));
    }
    audit::record(tx, &entries).await?;
    activate(tx, new.id, actor).await?;
    Ok(RewrapReport {
        old_data_key: old.id,
        new_data_key: new.id,
        n_field_keys: rows.len(),
    })
}

/// Master key rotation: every data key that is not destroyed re-wrapped under `new`.
pub async fn rotate_master(
    tx: &Transaction<'_>,
    old: &MasterKey,
    new: &MasterKey,
    actor: &str,
) -> Result<usize> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('rekey keys'))", &[])
        .await?;
    verify_master(tx, old).await?;
    record_master(tx, new).await?;
    let rows = tx
        .query(
            "SELECT id, wrapped_key FROM rekey.keys WHERE kind = 'data' AND state <> 'destroyed' ORDER BY id FOR UPDATE",
            &[],
        )
        .await?;
    let mut entries = Vec::new();
    for row in &rows {
        let id: Uuid = row.get(0);
        let wrapped: Vec<u8> = row.get(1);
        let material = unwrap_data_key(old, id, &wrapped)?;
        let rewrapped = wrap_data_key(new, id, &material)?;
        tx.execute(
            "UPDATE rekey.keys SET wrapped_key = $2, wrapping_key_id = $3 WHERE id = $1",
            &[&id, &rewrapped, &new.id()],
        )
        .await?;
        entries.push(AuditEntry::key_op(
            id,
            "rewrap",
            actor,
            json!({"kind": "data", "from_master_key": old.id(), "to_master_key": new.id()}),
        ));
    }
    audit::record(tx, &entries).await?;
    Ok(rows.len())
}

/// Why a key is still needed, or `None` when it may be retired or destroyed.
async fn usage(
    tx: &Transaction<'_>,
    rec: &KeyRecord,
    targets: &[Target],
) -> Result<Option<String>> {
    match rec.kind {
        KeyKind::Field => {
            let rows: Vec<CensusRow> = census::usage_of(tx, targets, rec.id).await?;
            let mut reasons = Vec::new();
            if !rows.is_empty() {
                reasons.push(census::describe(&rows));
            }
            let runs = tx
                .query(
                    "SELECT id FROM rekey.runs
                      WHERE (target_key_id = $1 OR previous_key_id = $1)
                        AND state NOT IN ('completed', 'failed', 'rolled_back')",
                    &[&rec.id],
                )
                .await?;
            if !runs.is_empty() {
                let ids: Vec<String> = runs
                    .iter()
                    .map(|r| r.get::<_, i64>(0).to_string())
                    .collect();
                reasons.push(format!("needed by unfinished run(s) {}", ids.join(", ")));
            }
            Ok((!reasons.is_empty()).then(|| reasons.join("; ")))
        }
        KeyKind::Data => {
            let n: i64 = tx
                .query_one(
                    "SELECT count(*) FROM rekey.keys WHERE kind = 'field' AND state <> 'destroyed' AND wrapping_key_id = $1",
                    &[&rec.id],
                )
                .await?
                .get(0);
            Ok(
                (n > 0)
                    .then(|| format!("it wraps {n} field key(s); run `rekey keys rewrap` first")),
            )
        }
    }
}

/// Retires a pending or decrypt-only key once nothing needs it.
pub async fn retire(
    tx: &Transaction<'_>,
    id: Uuid,
    targets: &[Target],
    actor: &str,
) -> Result<KeyRecord> {
    let rec = lock(tx, id).await?;
    if !rec.state.can_become(KeyState::Retired) {
        return Err(Error::IllegalTransition {
            key_id: id,
            kind: rec.kind,
            from: rec.state,
            to: KeyState::Retired,
        });
    }
    if let Some(usage) = usage(tx, &rec, targets).await? {
        return Err(Error::StillInUse {
            key_id: id,
            kind: rec.kind,
            usage,
        });
    }
    set_state(tx, &rec, KeyState::Retired, actor).await
}

/// Erases a retired key's wrapped material; the census must still find nothing under it.
pub async fn destroy(
    tx: &Transaction<'_>,
    id: Uuid,
    targets: &[Target],
    actor: &str,
) -> Result<KeyRecord> {
    let rec = lock(tx, id).await?;
    if rec.state != KeyState::Retired {
        return Err(Error::IllegalTransition {
            key_id: id,
            kind: rec.kind,
            from: rec.state,
            to: KeyState::Destroyed,
        });
    }
    if let Some(usage) = usage(tx, &rec, targets).await? {
        return Err(Error::StillInUse {
            key_id: id,
            kind: rec.kind,
            usage,
        });
    }
    set_state(tx, &rec, KeyState::Destroyed, actor).await
}

/// Loads every field key that can still decrypt (pending, active, decrypt-only) into a
/// ring that encrypts with the active field key.
pub async fn load_ring<C: GenericClient>(c: &C, master: &MasterKey) -> Result<KeyRing> {
    if let Some(token) = master.token() {
        token.fault_lose_session();
    }
    verify_master(c, master).await?;
    let rows = c
        .query(
            "SELECT f.id, f.state, f.wrapped_key, f.wrapping_key_id, f.encryptions, f.nonce_budget
               FROM rekey.keys f
              WHERE f.kind = 'field' AND f.state IN ('pending', 'active', 'decrypt_only')",
            &[],
        )
        .await?;
    let mut data_keys: Vec<(Uuid, KeyMaterial)> = Vec::new();
    let mut ring = KeyRing::default();
    let mut active_id = None;
    for row in &rows {
        let id: Uuid = row.get(0);
        let state: KeyState = row
            .get::<_, &str>(1)
            .parse()
            .expect("state checked by the database");
        let wrapped: Vec<u8> = row.get(2);
        let wrapping: Uuid = row.get(3);
        let dk = match data_keys.iter().find(|(k, _)| *k == wrapping) {
            Some((_, m)) => m.clone(),
            None => {
                let m = data_key_material(c, master, wrapping).await?;
                data_keys.push((wrapping, m.clone()));
                m
            }
        };
        let material = wrap::unwrap(&dk, wrapping, KeyKind::Field, id, &wrapped)?;
        let encryptions: i64 = row.get(4);
        let budget: i64 = row.get(5);
        ring.insert(FieldKey::new(
            id,
            state,
            &material,
            u64::try_from(encryptions).unwrap_or(0),
            u64::try_from(budget).unwrap_or(0),
        ));
        if state == KeyState::Active {
            active_id = Some(id);
        }
    }
    if let Some(id) = active_id {
        ring.set_encrypt_key(id).expect("just inserted");
    }
    Ok(ring)
}

/// Adds encryption counts (from [`KeyRing::take_encryption_counts`]) to the key store.
pub async fn add_encryptions<C: GenericClient>(c: &C, counts: &[(Uuid, u64)]) -> Result<()> {
    if counts.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = counts.iter().map(|(id, _)| *id).collect();
    let ns: Vec<i64> = counts
        .iter()
        .map(|(_, n)| i64::try_from(*n).unwrap_or(i64::MAX))
        .collect();
    // One statement that refuses to pass a budget, whatever other processes counted
    // meanwhile (the row lock orders concurrent flushes): a key whose count would pass it
    // is not updated and is named; the caller's transaction then fails, so nothing sealed
    // past the budget is ever committed.
    let refused = c
        .query(
            "WITH u AS (SELECT * FROM unnest($1::uuid[], $2::int8[]) AS u(id, n)),
                  upd AS (UPDATE rekey.keys k SET encryptions = k.encryptions + u.n
                            FROM u WHERE k.id = u.id AND k.encryptions + u.n <= k.nonce_budget
                          RETURNING k.id)
             SELECT k.id, k.encryptions, k.nonce_budget, u.n FROM u JOIN rekey.keys k ON k.id = u.id
              WHERE u.id NOT IN (SELECT id FROM upd)",
            &[&ids, &ns],
        )
        .await?;
    match refused.first() {
        Some(r) => Err(Error::BudgetSpent {
            key_id: r.get(0),
            used: r.get(1),
            budget: r.get(2),
            more: r.get(3),
        }),
        None => Ok(()),
    }
}

/// The master keys (fingerprints) that wrap the key store's data keys: one, unless a
/// `rotate-master` was interrupted.
pub async fn wrapping_master_ids<C: GenericClient>(c: &C) -> Result<Vec<Uuid>> {
    Ok(c.query(
        "SELECT DISTINCT wrapping_key_id FROM rekey.keys
              WHERE kind = 'data' AND state <> 'destroyed' ORDER BY 1",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}
