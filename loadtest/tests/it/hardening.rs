//! Secrets an operator's mistakes could leak, through the binaries: a master key file
//! others can read, a TOML error on a line holding a password, and `RUST_LOG=trace` with a
//! wrong AMQP password.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use rekey_common::testing::TestDb;

use crate::binaries::{Env, SpawnGuarded, wait_exit};

fn without_master_key(env: &Env) -> Env {
    Env {
        vars: env
            .vars
            .iter()
            .filter(|(k, _)| *k != "REKEY_MASTER_KEY")
            .cloned()
            .collect(),
    }
}

/// A key file readable by group or others is refused by `rekey` and `rekey-worker`, naming
/// the file and its mode; `--allow-insecure-key-file` accepts it; 0600 is accepted.
#[tokio::test]
async fn a_master_key_file_others_can_read_is_refused_unless_allowed() {
    let db = TestDb::new().await;
    let reports = std::env::temp_dir().join(format!("{}-reports", db.name));
    let base = Env::new(&db, reports.clone());
    let key = base
        .vars
        .iter()
        .find(|(k, _)| *k == "REKEY_MASTER_KEY")
        .unwrap()
        .1
        .clone();
    let file = std::env::temp_dir().join(format!("{}-master.key", db.name));
    std::fs::write(&file, &key).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut env = without_master_key(&base);
    env.vars
        .push(("REKEY_MASTER_KEY_FILE", file.display().to_string()));

    let (ok, out, err) = env.run("rekey", &["keys", "init"]);
    assert!(!ok, "{out}{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("mode 0644"), "{err}");
    assert!(err.contains("--allow-insecure-key-file"), "{err}");
    assert!(!err.contains(key.trim()), "the key leaked: {err}");
    let mut worker = env
        .cmd("rekey-worker", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let code = wait_exit(&mut worker, Duration::from_secs(30));
    let mut werr = String::new();
    std::io::Read::read_to_string(worker.stderr.as_mut().unwrap(), &mut werr).unwrap();
    assert!(!code.success(), "{werr}");
    assert!(werr.contains("mode 0644"), "{werr}");

    let (ok, out, err) = env.run("rekey", &["--allow-insecure-key-file", "keys", "init"]);
    assert!(ok, "{out}{err}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, out, err) = env.run("rekey", &["keys", "init"]);
    assert!(ok, "{out}{err}");
    let _ = std::fs::remove_file(&file);
}

/// A TOML error on a line that holds a password says what and where, and not the line.
#[tokio::test]
async fn a_toml_error_names_its_position_and_never_the_line() {
    let db = TestDb::new().await;
    let mut env = Env::new(&db, std::env::temp_dir().join(format!("{}-r", db.name)));
    let config = std::env::temp_dir().join(format!("{}-bad.toml", db.name));
    std::fs::write(
        &config,
        "queue_prefix = \"x\"\ndatabase_url = \"postgres://app:Sup3rSecretPw@db/app\" oops\n",
    )
    .unwrap();
    for v in env.vars.iter_mut().filter(|(k, _)| *k == "REKEY_CONFIG") {
        v.1 = config.display().to_string();
    }
    let (ok, out, err) = env.run("rekey", &["status"]);
    assert!(!ok, "{out}{err}");
    assert!(!err.contains("Sup3rSecretPw"), "the password leaked: {err}");
    assert!(!out.contains("Sup3rSecretPw"), "the password leaked: {out}");
    assert!(err.contains("is not valid"), "{err}");
    assert!(err.contains("at line 2"), "{err}");
    let _ = std::fs::remove_file(&config);
}

/// `RUST_LOG=trace` cannot make the AMQP login (or statement parameters) reach the log.
#[tokio::test]
async fn rust_log_trace_never_logs_the_amqp_password() {
    let db = TestDb::new().await;
    let mut env = Env::new(&db, std::env::temp_dir().join(format!("{}-r", db.name)));
    env.vars.push((
        "REKEY_AMQP_URL",
        "amqp://guest:Wr0ngAmqpPassw0rd@127.0.0.1:5672/%2f".into(),
    ));
    env.vars.push(("RUST_LOG", "trace".into()));
    let (ok, out, err) = env.run("rekey", &["keys", "init"]);
    assert!(ok, "{out}{err}");
    let (_, out, err) = env.run("rekey", &["preflight"]);
    assert!(
        err.lines().count() > 5 || out.lines().count() > 5,
        "trace logging produced output: {out}{err}"
    );
    assert!(out.contains("broker"), "{out}");
    for text in [&out, &err] {
        assert!(
            !text.contains("Wr0ngAmqpPassw0rd"),
            "the AMQP password reached the output"
        );
    }
}
