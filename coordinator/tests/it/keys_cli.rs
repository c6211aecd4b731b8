//! `rekey keys …` through the binary: a whole key lifecycle with its logs captured and
//! searched for secrets, and bad configuration refused with the setting named.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use rekey_common::envelope::{self, FieldLocation};
use rekey_common::keys::master::{decode_base64_key, generate_base64};
use rekey_common::keys::{KeyKind, store, wrap};
use rekey_common::testing::TestDb;
use secrecy::ExposeSecret;
use uuid::Uuid;

use crate::helpers::{Run, rekey};

/// Every form a secret could take in text: raw, hex (both cases), base64 variants.
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
        STANDARD.encode(secret).into_bytes(),
        URL_SAFE.encode(secret).into_bytes(),
        URL_SAFE_NO_PAD.encode(secret).into_bytes(),
        // A Debug-printed byte array: "[12, 200, …".
        format!("{:?}", &secret[..8])
            .trim_end_matches(']')
            .as_bytes()
            .to_vec(),
    ]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn a_whole_key_lifecycle_logs_no_key_bytes_and_no_plaintext() {
    let db = TestDb::new().await;
    let master_b64 = generate_base64();
    let new_master_b64 = generate_base64();
    let master_file = std::env::temp_dir().join(format!("rekey-new-master-{}", Uuid::new_v4()));
    std::fs::write(&master_file, new_master_b64.expose_secret()).unwrap();
    // As `rekey keys new-master` writes it: readable by its owner only.
    std::fs::set_permissions(
        &master_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let env = [
        ("REKEY_DATABASE_URL", db.url.as_str()),
        ("REKEY_MASTER_KEY", master_b64.expose_secret()),
    ];
    let mut runs: Vec<Run> = Vec::new();
    let mut step = |args: &[&str], expect_ok: bool| {
        let r = rekey(&env, args);
        assert_eq!(
            r.ok, expect_ok,
            "rekey {args:?}\nstdout: {}\nstderr: {}",
            r.stdout, r.stderr
        );
        let out = (r.stdout.clone(), r.stderr.clone());
        runs.push(r);
        out
    };

    step(&["keys", "init", "--json"], true);
    let (list, _) = step(&["keys", "list", "--json"], true);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let first_field = list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "field")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The application writes values under the active field key.
    let master = decode_base64_key("test", master_b64.expose_secret()).unwrap();
    let plaintexts: Vec<String> = (1..=5)
        .map(|i| format!("very-secret-phone-{i}-{}", Uuid::new_v4()))
        .collect();
    {
        let c = db.pool.get().await.unwrap();
        let ring = store::load_ring(&**c, &master).await.unwrap();
        for (i, p) in plaintexts.iter().enumerate() {
            let id = i as i64 + 1;
            let loc = FieldLocation {
                table: "demo.users",
                column: "phone",
                row_id: id,
            };
            let env = envelope::seal(&ring, &loc, p.as_bytes()).unwrap();
            c.execute(
                "INSERT INTO demo.users (id, name, phone) VALUES ($1, 'x', $2)",
                &[&id, &env],
            )
            .await
            .unwrap();
        }
    }

    let (generated, _) = step(
        &[
            "keys", "generate", "--kind", "field", "--label", "next", "--json",
        ],
        true,
    );
    let generated: serde_json::Value = serde_json::from_str(&generated).unwrap();
    let next = generated["id"].as_str().unwrap().to_owned();
    step(&["keys", "activate", &next], true);
    let (census, _) = step(&["keys", "census", "--json"], true);
    assert!(
        census.contains(&first_field) && census.contains("\"n_values\": 5"),
        "{census}"
    );
    // Retire is refused while the census finds values under the key, naming where.
    let (_, refused) = step(&["keys", "retire", &first_field], false);
    assert!(refused.contains("demo.users.phone: 5 values"), "{refused}");
    step(&["keys", "rewrap"], true);
    step(&["keys", "generate", "--kind", "data"], true);
    step(
        &[
            "keys",
            "rotate-master",
            "--new-master-key-file",
            master_file.to_str().unwrap(),
        ],
        true,
    );
    // The old master key is now wrong, and the error says so.
    let (_, wrong) = step(&["keys", "generate", "--kind", "field"], false);
    assert!(wrong.contains("wrong master key"), "{wrong}");
    step(&["keys", "list"], true);

    // Collect every secret: both master keys, every data and field key unwrapped
    // independently, and the plaintexts.
    let new_master = decode_base64_key("test", new_master_b64.expose_secret()).unwrap();
    let c = db.pool.get().await.unwrap();
    let rows = c
        .query(
            "SELECT id, kind, wrapping_key_id, wrapped_key FROM rekey.keys WHERE kind = 'data'",
            &[],
        )
        .await
        .unwrap();
    let mut secrets: Vec<Vec<u8>> = vec![
        master.local_material().unwrap().expose().to_vec(),
        new_master.local_material().unwrap().expose().to_vec(),
    ];
    let mut data_keys = Vec::new();
    for r in &rows {
        let id: Uuid = r.get(0);
        let m = wrap::unwrap(
            new_master.local_material().unwrap(),
            new_master.id(),
            KeyKind::Data,
            id,
            &r.get::<_, Vec<u8>>(3),
        )
        .unwrap();
        secrets.push(m.expose().to_vec());
        data_keys.push((id, m));
    }
    let rows = c
        .query(
            "SELECT id, wrapping_key_id, wrapped_key FROM rekey.keys WHERE kind = 'field'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let (id, wrapping): (Uuid, Uuid) = (r.get(0), r.get(1));
        let (_, dk) = data_keys.iter().find(|(d, _)| *d == wrapping).unwrap();
        let m = wrap::unwrap(dk, wrapping, KeyKind::Field, id, &r.get::<_, Vec<u8>>(2)).unwrap();
        secrets.push(m.expose().to_vec());
    }
    assert_eq!(secrets.len(), 2 + 3 + 2);

    let all: Vec<u8> = runs.iter().flat_map(|r| r.raw.clone()).collect();
    assert!(
        all.len() > 1000,
        "the lifecycle should have produced logs and output"
    );
    for s in &secrets {
        for f in forms(s) {
            assert!(
                !contains(&all, &f),
                "key material appeared in output in some form"
            );
        }
    }
    for p in &plaintexts {
        assert!(
            !contains(&all, p.as_bytes()),
            "a plaintext appeared in output"
        );
    }
    std::fs::remove_file(&master_file).unwrap();
}

#[test]
fn a_missing_master_key_exits_non_zero_naming_the_setting() {
    // The database need not be reachable for this check to come first… but it is here.
    let db = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(TestDb::new());
    let r = rekey(&[("REKEY_DATABASE_URL", &db.url)], &["keys", "init"]);
    assert!(!r.ok);
    assert!(r.stderr.contains("REKEY_MASTER_KEY"), "{}", r.stderr);
}

#[test]
fn a_master_key_of_the_wrong_length_exits_non_zero_naming_the_setting() {
    let db = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(TestDb::new());
    let short = STANDARD.encode([7u8; 16]);
    let r = rekey(
        &[
            ("REKEY_DATABASE_URL", &db.url),
            ("REKEY_MASTER_KEY", &short),
        ],
        &["keys", "init"],
    );
    assert!(!r.ok);
    assert!(
        r.stderr.contains("REKEY_MASTER_KEY") && r.stderr.contains("16 bytes"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains(&short));
    let missing_file = std::env::temp_dir().join("rekey-no-such-master-key");
    let r = rekey(
        &[
            ("REKEY_DATABASE_URL", &db.url),
            ("REKEY_MASTER_KEY_FILE", missing_file.to_str().unwrap()),
        ],
        &["keys", "init"],
    );
    assert!(!r.ok);
    assert!(r.stderr.contains("REKEY_MASTER_KEY_FILE"), "{}", r.stderr);
}

#[test]
fn an_unreachable_database_exits_non_zero_naming_the_setting_but_not_the_password() {
    let r = rekey(
        &[(
            "REKEY_DATABASE_URL",
            "postgres://rekey:hunter2secret@127.0.0.1:1/nowhere",
        )],
        &["keys", "list"],
    );
    assert!(!r.ok);
    assert!(
        r.stderr.contains("REKEY_DATABASE_URL") && r.stderr.contains("127.0.0.1:1/nowhere"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("hunter2secret"), "{}", r.stderr);
    let r = rekey(&[("REKEY_DATABASE_URL", "mysql://nope")], &["keys", "list"]);
    assert!(!r.ok);
    assert!(r.stderr.contains("REKEY_DATABASE_URL"), "{}", r.stderr);
}

#[test]
fn migrate_is_idempotent() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::new());
    let r = rekey(
        &[("REKEY_DATABASE_URL", &db.url)],
        &["migrate", "--demo", "--json"],
    );
    assert!(r.ok, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        v["applied"].as_array().unwrap().len(),
        0,
        "TestDb already migrated: {}",
        r.stdout
    );
}

#[tokio::test]
async fn keys_status_exits_3_once_an_active_keys_rotation_is_overdue() {
    let db = TestDb::new().await;
    let master_b64 = generate_base64();
    let env = [
        ("REKEY_DATABASE_URL", db.url.as_str()),
        ("REKEY_MASTER_KEY", master_b64.expose_secret()),
    ];
    assert!(rekey(&env, &["migrate", "--demo"]).ok);
    assert!(rekey(&env, &["keys", "init"]).ok);
    let r = rekey(&env, &["keys", "status", "--json"]);
    assert!(r.ok, "{}", r.stderr);
    let s: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let keys = s["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let field = keys.iter().find(|k| k["kind"] == "field").unwrap();
    let data = keys.iter().find(|k| k["kind"] == "data").unwrap();
    // The playbook's periods: field keys 30 days, data keys 90.
    let due = |k: &serde_json::Value| k["days_until_due"].as_f64().unwrap();
    assert!((due(field) - 30.0).abs() < 0.1 && (due(data) - 90.0).abs() < 0.1);
    assert_eq!(field["still_under"], 0, "no values yet");
    assert_eq!(data["still_under"], 1, "it wraps the field key");
    assert_eq!(field["overdue"], false);

    // Ten values under the field key, and its due date in the past.
    let c = db.pool.get().await.unwrap();
    let master = decode_base64_key("test", master_b64.expose_secret()).unwrap();
    let ring = store::load_ring(&**c, &master).await.unwrap();
    for id in 1..=10i64 {
        let loc = FieldLocation {
            table: "demo.users",
            column: "email",
            row_id: id,
        };
        let v = envelope::seal(&ring, &loc, b"someone@example.org").unwrap();
        c.execute(
            "INSERT INTO demo.users (id, name, email) VALUES ($1, 'n', $2)",
            &[&id, &v],
        )
        .await
        .unwrap();
    }
    let field_id: Uuid = field["id"].as_str().unwrap().parse().unwrap();
    c.execute(
        "UPDATE rekey.keys SET rotation_due_at = now() - interval '1 day' WHERE id = $1",
        &[&field_id],
    )
    .await
    .unwrap();
    let r = rekey(&env, &["keys", "status", "--json"]);
    assert_eq!(r.code, Some(3), "{}{}", r.stdout, r.stderr);
    let s: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(s["overdue"], serde_json::json!([field_id.to_string()]));
    let field = s["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "field")
        .unwrap()
        .clone();
    assert_eq!(field["still_under"], 10);
    assert!(field["days_until_due"].as_f64().unwrap() < 0.0);
    let r = rekey(&env, &["keys", "status"]);
    assert_eq!(r.code, Some(3));
    assert!(
        r.stdout
            .contains(&format!("rotation overdue: key {field_id}")),
        "{}",
        r.stdout
    );
}

/// `rekey … | head -1`: when the reader of its output goes away, rekey ends quietly (as
/// other command-line tools do, by SIGPIPE), with no panic or backtrace on stderr.
#[tokio::test]
async fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let db = TestDb::new().await;
    let key = generate_base64();
    let env = [
        ("REKEY_DATABASE_URL", db.url.as_str()),
        ("REKEY_MASTER_KEY", key.expose_secret()),
    ];
    assert!(rekey(&env, &["keys", "init"]).ok);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rekey"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(["keys", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    // The reader is gone before rekey writes a line.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(13),
        "{:?}: {stderr}",
        out.status
    );
}

/// Each cause said once and true to what happened: a server that answered and refused is
/// not "cannot reach", and a bad master key names its setting once.
#[test]
fn errors_say_their_cause_once() {
    let missing_db = format!(
        "{}/rekey_no_such_database",
        rekey_common::testing::admin_url()
            .rsplit_once('/')
            .unwrap()
            .0
    );
    let r = rekey(
        &[("REKEY_DATABASE_URL", missing_db.as_str())],
        &["keys", "list"],
    );
    assert!(!r.ok);
    assert!(
        r.stderr.contains("refused the connection")
            && r.stderr
                .contains("\"rekey_no_such_database\" does not exist"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("cannot reach"), "{}", r.stderr);
    assert!(!r.stderr.contains("db error: db error"), "{}", r.stderr);

    let db_url = rekey_common::testing::admin_url();
    let r = rekey(
        &[
            ("REKEY_DATABASE_URL", db_url.as_str()),
            ("REKEY_MASTER_KEY", "not base64!"),
        ],
        &["keys", "init"],
    );
    assert!(!r.ok);
    assert_eq!(
        r.stderr.matches("REKEY_MASTER_KEY").count(),
        1,
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("not valid base64"), "{}", r.stderr);
}

/// With `--json`, a failure is a JSON object on stdout too (`{"error": {"message": …}}`),
/// so that a script reading stdout always gets JSON.
#[test]
fn json_errors_are_json_on_stdout() {
    let r = rekey(
        &[(
            "REKEY_DATABASE_URL",
            "postgres://rekey:hunter2secret@127.0.0.1:1/nowhere",
        )],
        &["keys", "list", "--json"],
    );
    assert!(!r.ok);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", r.stdout));
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("cannot reach PostgreSQL at 127.0.0.1:1/nowhere"),
        "{message}"
    );
    assert!(!r.stdout.contains("hunter2secret"), "{}", r.stdout);
    // Without --json, stdout stays empty.
    let r = rekey(
        &[("REKEY_DATABASE_URL", "postgres://rekey@127.0.0.1:1/nowhere")],
        &["keys", "list"],
    );
    assert!(!r.ok && r.stdout.is_empty(), "{}", r.stdout);
}
