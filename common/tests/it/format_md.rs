//! FORMAT.md's worked example, checked byte for byte: once through rekey's own code, and
//! once as an independent program would do it, with AES-GCM and the documented layout only.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::master::{MasterKey, fingerprint};
use rekey_common::keys::ring::FieldKey;
use rekey_common::keys::{KeyKind, KeyState, wrap};
use rekey_common::messages::{BatchMessage, FORMAT_VERSION, MessageKey, TAG_LEN};
use rekey_common::secret::KeyMaterial;
use uuid::Uuid;

fn seq(start: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| start + i as u8).collect()
}

/// The `name = hex-or-text` lines of the fenced block after "## Worked example".
fn documented() -> HashMap<String, String> {
    rekey_common::testing::format_md_example("\n## Worked example")
}

fn computed() -> Vec<(&'static str, String)> {
    let master = MasterKey::new(KeyMaterial::from_slice(&seq(0x00, 32)).unwrap());
    let data_id = Uuid::parse_str("11111111-2222-4333-8444-555555555555").unwrap();
    let data_key = KeyMaterial::from_slice(&seq(0x20, 32)).unwrap();
    let field_id = Uuid::parse_str("66666666-7777-4888-9999-aaaaaaaaaaaa").unwrap();
    let field_key = KeyMaterial::from_slice(&seq(0x40, 32)).unwrap();
    let wrapped_data = wrap::wrap_with_nonce(
        master.local_material().unwrap(),
        master.id(),
        KeyKind::Data,
        data_id,
        &data_key,
        seq(0xa0, 12).try_into().unwrap(),
    );
    let wrapped_field = wrap::wrap_with_nonce(
        &data_key,
        data_id,
        KeyKind::Field,
        field_id,
        &field_key,
        seq(0xb0, 12).try_into().unwrap(),
    );
    let key = FieldKey::new(field_id, KeyState::Active, &field_key, 0, 1 << 32);
    let loc = FieldLocation {
        table: "demo.users",
        column: "email",
        row_id: 42,
    };
    let env = envelope::seal_with_nonce(
        &key,
        seq(0xc0, 12).try_into().unwrap(),
        &loc,
        b"alice@example.com",
    );
    let mut aad = env[..17].to_vec();
    aad.extend_from_slice(b"demo.users\x00email\x0042");
    let message_key = MessageKey::derive(&master);
    let order = BatchMessage {
        format: FORMAT_VERSION,
        run_id: 7,
        batch_no: 12,
        stage_no: 0,
        table: "demo.users".into(),
        id_lo: 1,
        id_hi: 1000,
        attempt: 1,
        master_key_id: [0; 16],
        tag: [0; TAG_LEN],
    }
    .sealed(&message_key);
    vec![
        ("master_key", hex::encode(seq(0x00, 32))),
        (
            "master_key_base64",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_owned(),
        ),
        (
            "master_key_id",
            fingerprint(master.local_material().unwrap()).to_string(),
        ),
        ("data_key_id", data_id.to_string()),
        ("data_key", hex::encode(seq(0x20, 32))),
        ("data_key_wrap_nonce", hex::encode(seq(0xa0, 12))),
        (
            "data_key_wrap_aad",
            hex::encode(wrap::associated_data(KeyKind::Data, data_id, master.id())),
        ),
        ("wrapped_data_key", hex::encode(&wrapped_data)),
        ("field_key_id", field_id.to_string()),
        ("field_key", hex::encode(seq(0x40, 32))),
        ("field_key_wrap_nonce", hex::encode(seq(0xb0, 12))),
        (
            "field_key_wrap_aad",
            hex::encode(wrap::associated_data(KeyKind::Field, field_id, data_id)),
        ),
        ("wrapped_field_key", hex::encode(&wrapped_field)),
        ("table", "demo.users".to_owned()),
        ("column", "email".to_owned()),
        ("row_id", "42".to_owned()),
        ("plaintext", hex::encode(b"alice@example.com")),
        ("nonce", hex::encode(seq(0xc0, 12))),
        ("aad", hex::encode(&aad)),
        ("envelope", hex::encode(&env)),
        ("message_key", hex::encode(message_key.expose_for_spec())),
        ("message_tagged_text", order.tagged_text()),
        ("message_tag", hex::encode(order.tag)),
        ("message", hex::encode(order.encode())),
    ]
}

#[test]
fn format_md_worked_example_matches_byte_for_byte() {
    let doc = documented();
    let computed = computed();
    if std::env::var("REKEY_PRINT_FORMAT_EXAMPLE").is_ok() {
        for (k, v) in &computed {
            println!("{k} = {v}");
        }
    }
    for (name, value) in &computed {
        assert_eq!(
            doc.get(*name),
            Some(value),
            "FORMAT.md's {name} differs from what rekey computes"
        );
    }
}

#[test]
fn an_independent_program_can_unwrap_the_keys_and_decrypt_the_field() {
    let doc = documented();
    let h = |k: &str| hex::decode(&doc[k]).unwrap();
    let uuid = |k: &str| Uuid::parse_str(&doc[k]).unwrap();
    let gcm = |key: &[u8], nonce_ct: &[u8], aad: &[u8]| {
        Aes256Gcm::new_from_slice(key)
            .unwrap()
            .decrypt(
                &Nonce::try_from(&nonce_ct[..12]).unwrap(),
                Payload {
                    msg: &nonce_ct[12..],
                    aad,
                },
            )
            .unwrap()
    };
    // Master key id: first 16 bytes of SHA-256("rekey master key v1" || master key).
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"rekey master key v1")
        .chain_update(h("master_key"))
        .finalize();
    assert_eq!(&digest[..16], uuid("master_key_id").as_bytes());
    // Data key: AAD = 01 'D' data_key_id master_key_id.
    let mut aad = vec![0x01, b'D'];
    aad.extend_from_slice(uuid("data_key_id").as_bytes());
    aad.extend_from_slice(uuid("master_key_id").as_bytes());
    let data_key = gcm(&h("master_key"), &h("wrapped_data_key"), &aad);
    assert_eq!(data_key, h("data_key"));
    // Field key: AAD = 01 'F' field_key_id data_key_id.
    let mut aad = vec![0x01, b'F'];
    aad.extend_from_slice(uuid("field_key_id").as_bytes());
    aad.extend_from_slice(uuid("data_key_id").as_bytes());
    let field_key = gcm(&data_key, &h("wrapped_field_key"), &aad);
    assert_eq!(field_key, h("field_key"));
    // Field value: AAD = envelope[0..17] || table 00 column 00 row id text.
    let env = h("envelope");
    assert_eq!(env[0], 0x01);
    assert_eq!(&env[1..17], uuid("field_key_id").as_bytes());
    let mut aad = env[..17].to_vec();
    aad.extend_from_slice(
        format!("{}\0{}\0{}", doc["table"], doc["column"], doc["row_id"]).as_bytes(),
    );
    assert_eq!(hex::encode(&aad), doc["aad"]);
    let plaintext = gcm(&field_key, &env[17..], &aad);
    assert_eq!(plaintext, h("plaintext"));
}

#[test]
fn an_independent_program_can_tag_a_batch_order_and_a_worker_accepts_it() {
    use hmac::Mac;
    let doc = documented();
    let h = |k: &str| hex::decode(&doc[k]).unwrap();
    // message_key = HKDF-SHA-256(no salt, master key, "rekey batch message hmac v2", 32).
    let mut message_key = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(None, &h("master_key"))
        .expand(b"rekey batch message hmac v2", &mut message_key)
        .unwrap();
    assert_eq!(hex::encode(message_key), doc["message_key"]);
    // The tagged text: "rekey-batch-v2;" and each field as <length>:<value>;.
    let mut text = String::from("rekey-batch-v2;");
    for f in [
        "2",
        &doc["master_key_id"],
        "7",
        "12",
        "0",
        "demo.users",
        "1",
        "1000",
        "1",
    ] {
        text.push_str(&format!("{}:{f};", f.len()));
    }
    assert_eq!(text, doc["message_tagged_text"]);
    let tag = hmac::Hmac::<sha2::Sha256>::new_from_slice(&message_key)
        .unwrap()
        .chain_update(text.as_bytes())
        .finalize()
        .into_bytes();
    assert_eq!(hex::encode(tag), doc["message_tag"]);
    // The body: varints (zigzag for signed), the table with its length, then the tag.
    let mut body = vec![0x02];
    body.extend_from_slice(Uuid::parse_str(&doc["master_key_id"]).unwrap().as_bytes());
    body.extend_from_slice(&[0x0e, 0x18, 0x00, 10]);
    body.extend_from_slice(b"demo.users");
    body.extend_from_slice(&[0x02, 0xfb, 0xd0, 0x07, 0x02]);
    body.extend_from_slice(&tag);
    assert_eq!(hex::encode(&body), doc["message"]);
    // rekey decodes it and its key verifies it.
    let master = MasterKey::new(KeyMaterial::from_slice(&h("master_key")).unwrap());
    let order = BatchMessage::decode(&body).unwrap();
    assert_eq!((order.run_id, order.batch_no, order.id_hi), (7, 12, 1000));
    MessageKey::derive(&master).verify(&order).unwrap();
}

fn documented_token_example() -> HashMap<String, String> {
    rekey_common::testing::format_md_example("#### Example: a data key wrapped by a token key")
}

/// The token example, without a token: its id from the serial and CKA_ID, its AAD, and
/// AES-256-GCM under the key's bytes give the documented wrapped key (rekey's wrap code
/// and an independent `aes-gcm` call agree), and HKDF of the CMAC gives the message key.
/// `common/tests/custody.rs` checks the same bytes against a SoftHSM2 token.
#[test]
fn the_token_example_is_aes_gcm_under_the_token_keys_bytes() {
    let doc = documented_token_example();
    let h = |k: &str| hex::decode(&doc[k]).unwrap();
    let uuid = |k: &str| Uuid::parse_str(&doc[k]).unwrap();
    let id = rekey_common::keys::pkcs11::token_key_id(&doc["token_serial"], &h("token_key_cka_id"));
    assert_eq!(id, uuid("token_master_key_id"));
    // An independent SHA-256 of the documented formula.
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"rekey pkcs11 master key v1")
        .chain_update(doc["token_serial"].as_bytes())
        .chain_update([0u8])
        .chain_update(h("token_key_cka_id"))
        .finalize();
    assert_eq!(&digest[..16], id.as_bytes());
    let data_id = uuid("data_key_id");
    assert_eq!(
        hex::encode(wrap::associated_data(KeyKind::Data, data_id, id)),
        doc["token_data_key_wrap_aad"]
    );
    let key = KeyMaterial::from_slice(&h("token_key_value")).unwrap();
    let ours = wrap::wrap_with_nonce(
        &key,
        id,
        KeyKind::Data,
        data_id,
        &KeyMaterial::from_slice(&h("data_key")).unwrap(),
        h("token_data_key_wrap_nonce").try_into().unwrap(),
    );
    assert_eq!(hex::encode(&ours), doc["token_wrapped_data_key"]);
    let nonce = h("token_data_key_wrap_nonce");
    let sealed = Aes256Gcm::new_from_slice(&h("token_key_value"))
        .unwrap()
        .encrypt(
            &Nonce::try_from(&nonce[..]).unwrap(),
            Payload {
                msg: &h("data_key"),
                aad: &h("token_data_key_wrap_aad"),
            },
        )
        .unwrap();
    assert_eq!([nonce, sealed].concat(), h("token_wrapped_data_key"));
    let mut message_key = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(None, &h("token_message_key_ikm"))
        .expand(b"rekey batch message hmac v2", &mut message_key)
        .unwrap();
    assert_eq!(hex::encode(message_key), doc["token_message_key"]);
}
