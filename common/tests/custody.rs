//! The master key inside a PKCS#11 token, against a real SoftHSM2 token made here
//! (`softhsm2-util --init-token` in a temporary `SOFTHSM2_CONF`): generation inside the
//! token, its bytes unreadable, wrapping and unwrapping data keys, every refusal an operator
//! can meet (module, token, PIN, key label, an extractable key), a session the library lost
//! and reopened, and the key store moving between a local key and token keys.
//!
//! Its own test binary: each test runs its body in a child process with its own
//! `SOFTHSM2_CONF` (a PKCS#11 library is initialized once per process).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::UserType;
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::master::{
    DataKeyUnwrapError, MasterKey, decode_base64_key, generate_base64,
};
use rekey_common::keys::pkcs11::{TokenError, TokenKey, TokenSelector, TokenSettings, token_calls};
use rekey_common::keys::store;
use rekey_common::secret::KeyMaterial;
use rekey_common::testing::{SOFTHSM2_MODULE, TestDb, softhsm2_tokens, write_private};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

const MODULE: &str = SOFTHSM2_MODULE;
const TOKEN: &str = "rekey-test";
const PIN: &str = "4711-rekey";

struct Hsm {
    dir: PathBuf,
    pin_file: PathBuf,
}

/// A SoftHSM2 token directory of the test's own, with the token initialized. The library
/// reads `SOFTHSM2_CONF` when it is initialized, once per process, and this workspace
/// forbids the `unsafe` `set_var`: so the test runs its body in a child process of this
/// test binary (`--exact` name) with `SOFTHSM2_CONF` set. In the child this returns the
/// token; in the parent it waits for the child, asserts it passed, and returns `None`.
fn hsm(test: &str) -> Option<Hsm> {
    hsm_with(test, "")
}

/// [`hsm`] with more lines for `softhsm2.conf` (e.g. `slots.mechanisms`).
fn hsm_with(test: &str, extra_conf: &str) -> Option<Hsm> {
    if let Some(dir) = std::env::var_os("REKEY_CUSTODY_DIR") {
        let dir = PathBuf::from(dir);
        return Some(Hsm {
            pin_file: dir.join("pin"),
            dir,
        });
    }
    if !Path::new(MODULE).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{MODULE} is missing: scripts/setup.sh installs softhsm2"
        );
        eprintln!("skipped: {MODULE} is missing (apt-get install softhsm2)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("rekey-softhsm-{}", Uuid::new_v4()));
    let conf = softhsm2_tokens(&dir, &[TOKEN, "another-token"], PIN, extra_conf);
    write_private(&dir.join("pin"), PIN);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env("REKEY_CUSTODY_DIR", &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in its child process:\n{stdout}\n{stderr}"
    );
    None
}

fn settings(h: &Hsm, key_label: &str) -> TokenSettings {
    TokenSettings {
        module: MODULE.into(),
        token: TokenSelector::Label(TOKEN.into()),
        pin_file: h.pin_file.clone(),
        key_label: key_label.into(),
    }
}

fn fresh_label(what: &str) -> String {
    format!("{what}-{}", &Uuid::new_v4().to_string()[..8])
}

/// A context of the test's own on the same library, logged in to the token.
fn own_session() -> (Pkcs11, cryptoki::session::Session) {
    let ctx = Pkcs11::new(MODULE).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim() == TOKEN)
        .unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    match session.login(UserType::User, Some(&SecretString::from(PIN))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("{e}"),
    }
    (ctx, session)
}

#[test]
fn a_token_key_is_generated_inside_the_token_and_never_leaves_it() {
    let Some(h) = hsm("a_token_key_is_generated_inside_the_token_and_never_leaves_it") else {
        return;
    };
    let h = &h;
    let label = fresh_label("master");
    let key = TokenKey::generate(&settings(h, &label)).unwrap();
    // The same key opened again has the same id (serial + CKA_ID, FORMAT.md).
    let again = TokenKey::open(&settings(h, &label)).unwrap();
    assert_eq!(key.id(), again.id());
    assert!(key.describe().contains(&label) && key.describe().contains(TOKEN));
    assert!(!format!("{key:?}").contains(PIN));
    // A second key with the same label is refused.
    let e = TokenKey::generate(&settings(h, &label)).unwrap_err();
    assert!(matches!(e, TokenError::KeyExists { .. }), "{e}");

    // Its attributes, asked of the token by the test's own session: sensitive, not
    // extractable, a token object; and its value refused.
    let (_ctx, s) = own_session();
    let handles = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap();
    assert_eq!(handles.len(), 1);
    let attrs = s
        .get_attributes(
            handles[0],
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Token,
                AttributeType::ValueLen,
            ],
        )
        .unwrap();
    assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
    assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
    assert!(attrs.contains(&Attribute::Token(true)), "{attrs:?}");
    // C_GetAttributeValue on CKA_VALUE: the token refuses (CKR_ATTRIBUTE_SENSITIVE), or
    // answers without the value; never the bytes.
    match s.get_attributes(handles[0], &[AttributeType::Value]) {
        Err(CkError::Pkcs11(RvError::AttributeSensitive, _)) => {}
        Ok(v) => assert!(
            !v.iter()
                .any(|a| matches!(a, Attribute::Value(b) if !b.is_empty())),
            "the token gave out CKA_VALUE: {v:?}"
        ),
        Err(e) => panic!("unexpected error reading CKA_VALUE: {e}"),
    }
}

#[test]
fn data_keys_wrapped_by_a_token_key_unwrap_only_with_their_id_and_bytes() {
    let Some(h) = hsm("data_keys_wrapped_by_a_token_key_unwrap_only_with_their_id_and_bytes")
    else {
        return;
    };
    let h = &h;
    let label = fresh_label("wrap");
    let master = MasterKey::from_token(TokenKey::generate(&settings(h, &label)).unwrap()).unwrap();
    assert_eq!(master.provider(), "pkcs11");
    assert!(master.local_material().is_none());
    let id = Uuid::new_v4();
    let dk = KeyMaterial::generate();
    let wrapped = master.wrap_data_key(id, &dk).unwrap();
    assert_eq!(wrapped.len(), 12 + 32 + 16, "the local layout");
    let back = master.unwrap_data_key(id, &wrapped).unwrap();
    assert_eq!(back.expose(), dk.expose());
    // Bound to the data key's id, and every byte authenticated.
    let wrong_id = master.unwrap_data_key(Uuid::new_v4(), &wrapped);
    assert!(
        matches!(wrong_id, Err(DataKeyUnwrapError::Unwrap(_))),
        "{:?}",
        wrong_id.map(|_| "unwrapped")
    );
    for i in [0, 12, 43, 44, 59] {
        let mut bad = wrapped.clone();
        bad[i] ^= 1;
        assert!(
            matches!(
                master.unwrap_data_key(id, &bad),
                Err(DataKeyUnwrapError::Unwrap(_))
            ),
            "byte {i}"
        );
    }
    // Another token key cannot unwrap it.
    let other =
        MasterKey::from_token(TokenKey::generate(&settings(h, &fresh_label("other"))).unwrap())
            .unwrap();
    assert!(other.unwrap_data_key(id, &wrapped).is_err());

    // Unwraps per second through SoftHSM2 (for the note; the worker unwraps only when it
    // loads its key ring, never per value).
    let n = 2000;
    let calls = token_calls();
    let start = Instant::now();
    for _ in 0..n {
        master.unwrap_data_key(id, &wrapped).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(token_calls() - calls, n, "one token call per unwrap");
    eprintln!(
        "[custody] {n} data-key unwraps through SoftHSM2 in {secs:.2} s: {:.0} unwraps/s",
        n as f64 / secs
    );
}

#[test]
fn a_session_the_library_lost_is_reopened() {
    let Some(h) = hsm("a_session_the_library_lost_is_reopened") else {
        return;
    };
    let h = &h;
    let master =
        MasterKey::from_token(TokenKey::generate(&settings(h, &fresh_label("session"))).unwrap())
            .unwrap();
    let id = Uuid::new_v4();
    let wrapped = master.wrap_data_key(id, &KeyMaterial::generate()).unwrap();
    // The library finalized under the key's session (C_Finalize by another context in the
    // same process): every session is gone.
    let (ctx, s) = own_session();
    drop(s);
    ctx.finalize().unwrap();
    // The next unwrap opens a new session and succeeds.
    master.unwrap_data_key(id, &wrapped).unwrap();
    master.unwrap_data_key(id, &wrapped).unwrap();
}

/// An AES-256 key labelled `label` generated by the test's own session (not by rekey):
/// sensitive and not extractable when `kept`, else one the token would export.
fn make_key(label: &str, kept: bool) {
    let (_ctx, s) = own_session();
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(kept),
            Attribute::Extractable(!kept),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Sign(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ],
    )
    .unwrap();
}

/// The secret key objects labelled `label` in the token, by the test's own session.
fn keys_labelled(label: &str) -> usize {
    let (_ctx, s) = own_session();
    s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
    .unwrap()
    .len()
}

/// A token that does not offer AES-GCM (SoftHSM2's `slots.mechanisms` without it, as
/// some HSMs' firmware or policy leaves it out): `new-master` is refused before a key is
/// made, and an existing key is refused when opened, each naming the mechanism and the
/// settings to fix.
#[test]
fn a_token_without_aes_gcm_is_refused_naming_the_mechanism_and_nothing_is_made() {
    let Some(h) = hsm_with(
        "a_token_without_aes_gcm_is_refused_naming_the_mechanism_and_nothing_is_made",
        // SoftHSM2 2.6.1 reads the first name of a "-" list with its minus sign (an
        // unknown name, ignored): the list starts with an empty name.
        "slots.mechanisms = -,CKM_AES_GCM",
    ) else {
        return;
    };
    let h = &h;
    let label = fresh_label("no-gcm");
    let e = TokenKey::generate(&settings(h, &label)).unwrap_err();
    assert!(
        matches!(&e, TokenError::MechanismMissing { mechanism, .. } if *mechanism == "CKM_AES_GCM"),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("CKM_AES_GCM") && text.contains("REKEY_PKCS11_MODULE"),
        "{text}"
    );
    assert_eq!(keys_labelled(&label), 0, "no key was made");

    // A key made by other means (key generation is still offered) is refused when opened.
    make_key(&label, true);
    let e = TokenKey::open(&settings(h, &label)).unwrap_err();
    assert!(matches!(e, TokenError::MechanismMissing { .. }), "{e}");
}

/// The values of FORMAT.md's token example.
fn documented_token_example() -> std::collections::HashMap<String, String> {
    rekey_common::testing::format_md_example("#### Example: a data key wrapped by a token key")
}

/// FORMAT.md's token example, byte for byte, against a real token: its key's documented
/// bytes imported into SoftHSM2 (sensitive, not extractable), the token's own `C_Encrypt`
/// (`CKM_AES_GCM`, the documented IV and AAD) gives the documented wrapped data key and
/// its `C_Sign` (`CKM_AES_CMAC`) the documented message-key IKM; rekey's token provider
/// unwraps the documented bytes and derives the documented message key; what it wraps with
/// a fresh nonce opens with plain AES-GCM under the key's bytes. The key's id is the
/// documented formula over this token's serial and the key's `CKA_ID`.
#[test]
fn format_md_token_example_is_what_a_token_computes() {
    let Some(h) = hsm("format_md_token_example_is_what_a_token_computes") else {
        return;
    };
    let h = &h;
    let doc = documented_token_example();
    let x = |k: &str| hex::decode(&doc[k]).unwrap();
    let label = fresh_label("example");
    let (_ctx, s) = own_session();
    let handle = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(x("token_key_value")),
            Attribute::Id(x("token_key_cka_id")),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Sign(true),
        ])
        .unwrap();
    let mut iv: [u8; 12] = x("token_data_key_wrap_nonce").try_into().unwrap();
    let aad = x("token_data_key_wrap_aad");
    let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv, &aad, 128.into()).unwrap();
    let sealed = s
        .encrypt(&Mechanism::AesGcm(params), handle, &x("data_key"))
        .unwrap();
    assert_eq!(
        hex::encode([x("token_data_key_wrap_nonce"), sealed].concat()),
        doc["token_wrapped_data_key"],
        "the token's C_Encrypt"
    );
    let cmac = s
        .sign(&Mechanism::AesCMac, handle, b"rekey message key v1")
        .unwrap();
    assert_eq!(
        hex::encode(&cmac),
        doc["token_message_key_ikm"],
        "the token's C_Sign"
    );

    // rekey's provider on the same key.
    let key = TokenKey::open(&settings(h, &label)).unwrap();
    assert_eq!(
        key.id(),
        rekey_common::keys::pkcs11::token_key_id(key.serial(), &x("token_key_cka_id"))
    );
    let unwrapped = key
        .unwrap(&aad, &x("token_wrapped_data_key"))
        .unwrap()
        .expect("the documented bytes unwrap");
    assert_eq!(hex::encode(&*unwrapped), doc["data_key"]);
    assert_eq!(
        hex::encode(&*key.message_key_material().unwrap()),
        doc["token_message_key_ikm"]
    );
    let master = MasterKey::from_token(key).unwrap();
    let mk = rekey_common::messages::MessageKey::derive(&master);
    assert_eq!(hex::encode(mk.expose_for_spec()), doc["token_message_key"]);
    let wrapped = master.token().unwrap().wrap(&aad, &x("data_key")).unwrap();
    use aes_gcm::aead::{Aead, Payload};
    use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
    let plain = Aes256Gcm::new_from_slice(&x("token_key_value"))
        .unwrap()
        .decrypt(
            &Nonce::try_from(&wrapped[..12]).unwrap(),
            Payload {
                msg: &wrapped[12..],
                aad: &aad,
            },
        )
        .unwrap();
    assert_eq!(hex::encode(plain), doc["data_key"]);
}

#[test]
fn each_misconfiguration_is_refused_naming_the_setting_and_nothing_is_tried_twice() {
    let Some(h) =
        hsm("each_misconfiguration_is_refused_naming_the_setting_and_nothing_is_tried_twice")
    else {
        return;
    };
    let h = &h;
    let label = fresh_label("refusals");
    TokenKey::generate(&settings(h, &label)).unwrap();

    let mut s = settings(h, &label);
    s.module = "/nonexistent/libpkcs11.so".into();
    let e = TokenKey::open(&s).unwrap_err();
    assert!(matches!(e, TokenError::ModuleMissing { .. }), "{e}");
    assert!(e.to_string().contains("REKEY_PKCS11_MODULE"), "{e}");

    let mut s = settings(h, &label);
    s.token = TokenSelector::Label("no-such-token".into());
    let e = TokenKey::open(&s).unwrap_err().to_string();
    assert!(
        e.contains("REKEY_PKCS11_TOKEN_LABEL") && e.contains("'rekey-test'"),
        "{e}"
    );

    let e = TokenKey::open(&settings(h, "no-such-key")).unwrap_err();
    assert!(matches!(e, TokenError::KeyNotFound { .. }), "{e}");
    assert!(e.to_string().contains("REKEY_PKCS11_KEY_LABEL"), "{e}");

    // A wrong PIN: refused once, named, never retried; the right PIN still works after it
    // (the token is not locked by rekey).
    let wrong = h.dir.join("wrong-pin");
    write_private(&wrong, "0000-not-it");
    let mut s = settings(h, &label);
    s.pin_file = wrong;
    let e = TokenKey::open(&s).unwrap_err();
    assert!(matches!(e, TokenError::PinIncorrect { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("REKEY_PKCS11_PIN_FILE") && text.contains("does not try again"),
        "{text}"
    );
    assert!(
        !text.contains("0000-not-it") && !text.contains(PIN),
        "{text}"
    );
    TokenKey::open(&settings(h, &label)).unwrap();

    let mut s = settings(h, &label);
    s.pin_file = h.dir.join("no-pin-file");
    let e = TokenKey::open(&s).unwrap_err().to_string();
    assert!(e.contains("REKEY_PKCS11_PIN_FILE"), "{e}");

    // A key the token would export is refused as a master key.
    let exportable = fresh_label("exportable");
    make_key(&exportable, false);
    let e = TokenKey::open(&settings(h, &exportable)).unwrap_err();
    assert!(matches!(e, TokenError::KeyExportable { .. }), "{e}");
    assert!(e.to_string().contains("extractable"), "{e}");
}

/// The key store moves from a local master key to a token key and on to another token
/// key, re-wrapping every data key in one transaction each; `keys list` says which wraps
/// them; a field key wrapped before still unwraps through the new master; the old master
/// is refused afterwards, naming the mismatch.
#[tokio::test]
async fn the_key_store_moves_from_a_local_key_to_token_keys() {
    let Some(h) = hsm("the_key_store_moves_from_a_local_key_to_token_keys") else {
        return;
    };
    let h = &h;
    let db = TestDb::new().await;
    let local = decode_base64_key("test", generate_base64().expose_secret()).unwrap();
    let mut c = db.pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let init = store::init(&tx, &local, &Default::default(), "test")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let ring_before = store::load_ring(&**c, &local).await.unwrap();

    let token_a =
        MasterKey::from_token(TokenKey::generate(&settings(h, &fresh_label("store-a"))).unwrap())
            .unwrap();
    let token_b =
        MasterKey::from_token(TokenKey::generate(&settings(h, &fresh_label("store-b"))).unwrap())
            .unwrap();
    for (old, new) in [(&local, &token_a), (&token_a, &token_b)] {
        let tx = c.transaction().await.unwrap();
        let n = store::rotate_master(&tx, old, new, "test").await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(n, 1);
        let keys = store::list(&**c).await.unwrap();
        let data = keys.iter().find(|k| k.id == init.data_key.id).unwrap();
        assert_eq!(data.wrapping_key_id, new.id());
        assert_eq!(data.wrapped_by, new.token().unwrap().describe());
        // The field key still unwraps, under the same id, through the new master.
        let ring = store::load_ring(&**c, new).await.unwrap();
        assert_eq!(ring.len(), ring_before.len());
        // The old master is refused by name.
        let e = store::load_ring(&**c, old).await.unwrap_err();
        assert!(matches!(e, store::Error::WrongMasterKey { .. }), "{e}");
    }
    // The hot path: once the ring is loaded (the only token calls), sealing and opening
    // values calls the token never.
    let ring = store::load_ring(&**c, &token_b).await.unwrap();
    let calls = token_calls();
    for row_id in 0..1000 {
        let loc = FieldLocation {
            table: "demo.users",
            column: "email",
            row_id,
        };
        let env = envelope::seal(&ring, &loc, b"someone@example.com").unwrap();
        envelope::open(&ring, &loc, &env).unwrap();
    }
    assert_eq!(
        token_calls(),
        calls,
        "sealing and opening values called the token"
    );

    // And back to a local key.
    let local2 = decode_base64_key("test", generate_base64().expose_secret()).unwrap();
    let tx = c.transaction().await.unwrap();
    store::rotate_master(&tx, &token_b, &local2, "test")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let keys = store::list(&**c).await.unwrap();
    let data = keys.iter().find(|k| k.id == init.data_key.id).unwrap();
    assert_eq!(data.wrapped_by, "local key");
    store::load_ring(&**c, &local2).await.unwrap();
}
