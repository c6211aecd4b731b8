//! The key store against a real Postgres: transitions, the one-active rule, rotations of
//! data and master keys, and the census guarding retirement.

use rekey_common::audit;
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::master::{MasterKey, decode_base64_key, generate_base64};
use rekey_common::keys::ring::KeyRing;
use rekey_common::keys::store::{self, Error};
use rekey_common::keys::{KeyKind, KeyState};
use rekey_common::target::demo_targets;
use rekey_common::testing::TestDb;
use secrecy::ExposeSecret;
use uuid::Uuid;

fn new_master() -> MasterKey {
    decode_base64_key("test", generate_base64().expose_secret()).unwrap()
}

const ACTOR: &str = "test";

async fn init(db: &TestDb, master: &MasterKey) -> store::InitReport {
    let mut c = db.pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let r = store::init(&tx, master, &Default::default(), ACTOR)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    r
}

/// Seals `n` user emails with the ring's active key and stores them; returns the plaintexts.
async fn seed_users(db: &TestDb, ring: &KeyRing, n: i64) -> Vec<String> {
    let c = db.pool.get().await.unwrap();
    let mut out = Vec::new();
    for id in 1..=n {
        let email = format!("user{id}@example.com");
        let loc = FieldLocation {
            table: "demo.users",
            column: "email",
            row_id: id,
        };
        let env = envelope::seal(ring, &loc, email.as_bytes()).unwrap();
        c.execute(
            "INSERT INTO demo.users (id, name, email) VALUES ($1, $2, $3)",
            &[&id, &format!("user {id}"), &env],
        )
        .await
        .unwrap();
        out.push(email);
    }
    out
}

async fn assert_all_decrypt(db: &TestDb, ring: &KeyRing, expected: &[String]) {
    let c = db.pool.get().await.unwrap();
    let rows = c
        .query("SELECT id, email FROM demo.users ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), expected.len());
    for (row, want) in rows.iter().zip(expected) {
        let id: i64 = row.get(0);
        let env: Vec<u8> = row.get(1);
        let loc = FieldLocation {
            table: "demo.users",
            column: "email",
            row_id: id,
        };
        let got = envelope::open(ring, &loc, &env).unwrap_or_else(|e| panic!("row {id}: {e}"));
        assert_eq!(got.as_bytes(), want.as_bytes());
    }
}

#[tokio::test]
async fn init_is_idempotent_and_makes_one_active_key_per_kind() {
    let db = TestDb::new().await;
    let master = new_master();
    let first = init(&db, &master).await;
    assert_eq!(first.created.len(), 2);
    let second = init(&db, &master).await;
    assert!(second.created.is_empty());
    assert_eq!(first.field_key.id, second.field_key.id);
    let c = db.pool.get().await.unwrap();
    let keys = store::list(&**c).await.unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k.state == KeyState::Active));
    let field = keys.iter().find(|k| k.kind == KeyKind::Field).unwrap();
    let days = (field.rotation_due_at - field.created_at).num_days();
    assert_eq!(days, 30);
    let data = keys.iter().find(|k| k.kind == KeyKind::Data).unwrap();
    assert_eq!((data.rotation_due_at - data.created_at).num_days(), 90);
    assert_eq!(field.wrapping_key_id, data.id);
    assert_eq!(data.wrapping_key_id, master.id());
}

#[tokio::test]
async fn every_illegal_state_transition_is_refused_with_a_clear_error() {
    let db = TestDb::new().await;
    let master = new_master();
    let init = init(&db, &master).await;
    let mut c = db.pool.get().await.unwrap();

    // Active cannot be retired directly (it must first stop encrypting).
    let tx = c.transaction().await.unwrap();
    let err = store::retire(&tx, init.field_key.id, &demo_targets(), ACTOR)
        .await
        .unwrap_err();
    // The text says what to do instead.
    assert!(
        err.to_string()
            .contains("`rekey keys activate` another key"),
        "{err}"
    );
    assert!(
        matches!(
            err,
            Error::IllegalTransition {
                from: KeyState::Active,
                to: KeyState::Retired,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("active -> retired"), "{err}");
    drop(tx);

    // Pending cannot be destroyed.
    let tx = c.transaction().await.unwrap();
    let pending = store::generate(
        &tx,
        &master,
        KeyKind::Field,
        "p",
        &Default::default(),
        ACTOR,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let err = store::destroy(&tx, pending.id, &demo_targets(), ACTOR)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pending -> destroyed"), "{err}");
    drop(tx);

    // The database itself refuses an illegal transition written by hand.
    for (from_sql, to) in [
        ("active", "pending"),
        ("active", "destroyed"),
        ("active", "retired"),
    ] {
        let err = c
            .execute(
                &format!(
                    "UPDATE rekey.keys SET state = '{to}' WHERE id = $1 AND state = '{from_sql}'"
                ),
                &[&init.field_key.id],
            )
            .await
            .unwrap_err();
        let text = format!("{}", err.as_db_error().unwrap());
        assert!(text.contains("illegal key state transition"), "{text}");
    }

    // Unknown key ids are named.
    let tx = c.transaction().await.unwrap();
    let ghost = Uuid::new_v4();
    let err = store::activate(&tx, ghost, ACTOR).await.unwrap_err();
    assert!(err.to_string().contains(&ghost.to_string()));
}

#[tokio::test]
async fn a_second_active_key_per_kind_is_impossible() {
    let db = TestDb::new().await;
    let master = new_master();
    let init = init(&db, &master).await;
    let mut c = db.pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let other = store::generate(&tx, &master, KeyKind::Field, "", &Default::default(), ACTOR)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // By hand, bypassing rekey: the unique index refuses it.
    let err = c
        .execute(
            "UPDATE rekey.keys SET state = 'active' WHERE id = $1",
            &[&other.id],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    // Through rekey: activation demotes the previous key in the same transaction.
    let tx = c.transaction().await.unwrap();
    store::activate(&tx, other.id, ACTOR).await.unwrap();
    tx.commit().await.unwrap();
    let old = store::get(&**c, init.field_key.id).await.unwrap();
    assert_eq!(old.state, KeyState::DecryptOnly);
    let n_active: i64 = c
        .query_one(
            "SELECT count(*) FROM rekey.keys WHERE kind = 'field' AND state = 'active'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n_active, 1);
}

#[tokio::test]
async fn after_rewrap_every_field_written_before_still_decrypts() {
    let db = TestDb::new().await;
    let master = new_master();
    let init = init(&db, &master).await;
    let c = db.pool.get().await.unwrap();
    let ring = store::load_ring(&**c, &master).await.unwrap();
    let emails = seed_users(&db, &ring, 50).await;
    drop(c);

    let mut c = db.pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let report = store::rewrap(&tx, &master, &Default::default(), ACTOR)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(report.old_data_key, init.data_key.id);
    assert_eq!(report.n_field_keys, 1);

    let old = store::get(&**c, init.data_key.id).await.unwrap();
    assert_eq!(old.state, KeyState::DecryptOnly);
    let field = store::get(&**c, init.field_key.id).await.unwrap();
    assert_eq!(field.wrapping_key_id, report.new_data_key);

    let ring = store::load_ring(&**c, &master).await.unwrap();
    assert_all_decrypt(&db, &ring, &emails).await;

    // The old data key now wraps nothing, so it can be retired and destroyed.
    let tx = c.transaction().await.unwrap();
    store::retire(&tx, old.id, &demo_targets(), ACTOR)
        .await
        .unwrap();
    store::destroy(&tx, old.id, &demo_targets(), ACTOR)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let ring = store::load_ring(&**c, &master).await.unwrap();
    assert_all_decrypt(&db, &ring, &emails).await;

    let ops: Vec<String> = c
        .query(
            "SELECT operation FROM rekey.audit_log WHERE key_id = $1 ORDER BY id",
            &[&old.id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        ops,
        [
            "generate",
            "wrap",
            "activate",
            "deactivate",
            "retire",
            "destroy"
        ]
    );
}

#[tokio::test]
async fn master_key_rotation_keeps_everything_readable_and_the_old_master_is_then_wrong() {
    let db = TestDb::new().await;
    let master = new_master();
    init(&db, &master).await;
    let c = db.pool.get().await.unwrap();
    let ring = store::load_ring(&**c, &master).await.unwrap();
    let emails = seed_users(&db, &ring, 20).await;
    drop(c);

    let new = new_master();
    let mut c = db.pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    assert_eq!(
        store::rotate_master(&tx, &master, &new, ACTOR)
            .await
            .unwrap(),
        1
    );
    tx.commit().await.unwrap();

    let ring = store::load_ring(&**c, &new).await.unwrap();
    assert_all_decrypt(&db, &ring, &emails).await;
    let err = store::load_ring(&**c, &master).await.unwrap_err();
    assert!(matches!(err, Error::WrongMasterKey { .. }), "{err}");
}

#[tokio::test]
async fn a_wrong_master_key_gives_an_error_that_says_so() {
    let db = TestDb::new().await;
    let master = new_master();
    init(&db, &master).await;
    let c = db.pool.get().await.unwrap();
    let wrong = new_master();
    let err = store::load_ring(&**c, &wrong).await.unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("wrong master key"), "{text}");
    assert!(
        text.contains(&master.id().to_string()) && text.contains(&wrong.id().to_string()),
        "{text}"
    );

    // Generating under a wrong master key is refused too, so the store never mixes masters.
    let mut c = db.pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let err = store::generate(&tx, &wrong, KeyKind::Data, "", &Default::default(), ACTOR)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WrongMasterKey { .. }));
}

#[tokio::test]
async fn a_tampered_wrapped_key_is_reported_by_id() {
    let db = TestDb::new().await;
    let master = new_master();
    let init = init(&db, &master).await;
    let c = db.pool.get().await.unwrap();
    c.execute(
        "UPDATE rekey.keys SET wrapped_key = set_byte(wrapped_key, 19, get_byte(wrapped_key, 19) # 1) WHERE id = $1",
        &[&init.field_key.id],
    )
    .await
    .unwrap();
    let err = store::load_ring(&**c, &master).await.unwrap_err();
    assert!(matches!(err, Error::Unwrap(_)), "{err}");
    assert!(err.to_string().contains(&init.field_key.id.to_string()));
}

#[tokio::test]
async fn retire_is_refused_while_a_value_still_uses_the_key() {
    let db = TestDb::new().await;
    let master = new_master();
    let init = init(&db, &master).await;
    let mut c = db.pool.get().await.unwrap();
    let ring = store::load_ring(&**c, &master).await.unwrap();
    seed_users(&db, &ring, 7).await;

    let tx = c.transaction().await.unwrap();
    let next = store::generate(&tx, &master, KeyKind::Field, "", &Default::default(), ACTOR)
        .await
        .unwrap();
    store::activate(&tx, next.id, ACTOR).await.unwrap();
    tx.commit().await.unwrap();

    let tx = c.transaction().await.unwrap();
    let err = store::retire(&tx, init.field_key.id, &demo_targets(), ACTOR)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::StillInUse { .. }), "{text}");
    assert!(text.contains("demo.users.email: 7 values"), "{text}");
    drop(tx);
    assert_eq!(
        store::get(&**c, init.field_key.id).await.unwrap().state,
        KeyState::DecryptOnly
    );

    c.execute("UPDATE demo.users SET email = NULL", &[])
        .await
        .unwrap();
    let tx = c.transaction().await.unwrap();
    store::retire(&tx, init.field_key.id, &demo_targets(), ACTOR)
        .await
        .unwrap();
    let destroyed = store::destroy(&tx, init.field_key.id, &demo_targets(), ACTOR)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(destroyed.state, KeyState::Destroyed);
    let wrapped: Option<Vec<u8>> = c
        .query_one(
            "SELECT wrapped_key FROM rekey.keys WHERE id = $1",
            &[&init.field_key.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(wrapped.is_none());
    // A destroyed key is no longer in the ring.
    let ring = store::load_ring(&**c, &master).await.unwrap();
    assert!(!ring.contains(&init.field_key.id));
}

#[tokio::test]
async fn encryption_counts_reach_the_key_store() {
    let db = TestDb::new().await;
    let master = new_master();
    let init = init(&db, &master).await;
    let c = db.pool.get().await.unwrap();
    let ring = store::load_ring(&**c, &master).await.unwrap();
    seed_users(&db, &ring, 5).await;
    store::add_encryptions(&**c, &ring.take_encryption_counts())
        .await
        .unwrap();
    assert_eq!(
        store::get(&**c, init.field_key.id)
            .await
            .unwrap()
            .encryptions,
        5
    );
    audit::record(&**c, &[]).await.unwrap();
}
