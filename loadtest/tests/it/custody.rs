//! Key custody through the binaries, as an operator meets it: a SoftHSM2 token made here,
//! `rekey keys new-master --pkcs11`, the key store moved from a local master key into the
//! token with `rekey keys rotate-master`, a staged rotation by two workers whose master key
//! is the token's (one of them losing its token session mid-run), `rekey preflight` naming
//! the provider, a move to a second token key and back to a local key; refusals (a wrong
//! PIN, a missing module, a missing key label, a token without AES-GCM) that change
//! nothing; processes opening the token at once; the same settings from `rekey.toml`'s
//! `[pkcs11]` table.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rekey_common::testing::{SOFTHSM2_MODULE, TestDb, softhsm2_tokens, write_private};

use crate::binaries::{Env, SpawnGuarded, quick_rotate, sigterm, wait_exit};

const MODULE: &str = SOFTHSM2_MODULE;
const PIN: &str = "2718-rekey";

/// A SoftHSM2 token directory with one token, `rekey`; its settings for the binaries.
fn softhsm(dir: &Path) -> Vec<(&'static str, String)> {
    let conf = softhsm2_tokens(dir, &["rekey"], PIN, "");
    let pin = dir.join("pin");
    write_private(&pin, PIN);
    vec![
        ("SOFTHSM2_CONF", conf.display().to_string()),
        ("REKEY_PKCS11_MODULE", MODULE.into()),
        ("REKEY_PKCS11_TOKEN_LABEL", "rekey".into()),
        ("REKEY_PKCS11_PIN_FILE", pin.display().to_string()),
    ]
}

fn set(env: &mut Env, key: &'static str, value: &str) {
    env.vars.retain(|(k, _)| *k != key);
    env.vars.push((key, value.to_owned()));
}

/// What wraps the data keys, per `rekey keys list --json`.
fn wrapped_by(env: &Env) -> Vec<String> {
    let (ok, out, err) = env.run("rekey", &["keys", "list", "--json"]);
    assert!(ok, "{out}{err}");
    let keys: serde_json::Value = serde_json::from_str(&out).unwrap();
    keys.as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kind"] == "data")
        .map(|k| k["wrapped_by"].as_str().unwrap().to_owned())
        .collect()
}

fn verify(env: &Env, target: &str) {
    let (ok, out, err) = env.run(
        "rekey-loadtest",
        &["verify", "--expect-key", target, "--json"],
    );
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mismatched"], 0, "{v}");
    assert!(v["ok"].as_i64().unwrap() >= 1500, "{v}");
}

#[tokio::test]
async fn a_staged_rotation_with_the_master_key_inside_a_softhsm2_token() {
    if !Path::new(MODULE).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{MODULE} is missing: scripts/setup.sh installs softhsm2"
        );
        eprintln!("skipped: {MODULE} is missing (apt-get install softhsm2)");
        return;
    }
    let db = TestDb::new().await;
    let dir: PathBuf = std::env::temp_dir().join(format!("{}-softhsm", db.name));
    let mut env = Env::new(&db, dir.join("reports"));
    env.vars.extend(softhsm(&dir));
    // Both a local key (Env's REKEY_MASTER_KEY) and a token are configured: which is the
    // master key must be said.
    let (ok, _, err) = env.run("rekey", &["keys", "init"]);
    assert!(!ok && err.contains("REKEY_MASTER_KEY_PROVIDER"), "{err}");
    set(&mut env, "REKEY_MASTER_KEY_PROVIDER", "local");
    let (ok, out, err) = env.run("rekey", &["keys", "init"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = env.run("rekey-loadtest", &["seed", "--rows", "1500"]);
    assert!(ok, "{out}{err}");
    assert_eq!(wrapped_by(&env), ["local key"]);

    // A key generated inside the token.
    let (ok, out, err) = env.run(
        "rekey",
        &[
            "keys",
            "new-master",
            "--pkcs11",
            "--label",
            "master-a",
            "--json",
        ],
    );
    assert!(ok, "{out}{err}");
    let a: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(a["provider"], "pkcs11");
    assert!(!out.contains(PIN) && !err.contains(PIN));

    // Refusals change nothing: a wrong PIN (named, not retried), a missing key label.
    let wrong = dir.join("wrong-pin");
    write_private(&wrong, "0000");
    let mut bad = Env {
        vars: env.vars.clone(),
    };
    set(&mut bad, "REKEY_PKCS11_PIN_FILE", wrong.to_str().unwrap());
    let (ok, _, err) = bad.run(
        "rekey",
        &["keys", "rotate-master", "--new-pkcs11-label", "master-a"],
    );
    assert!(
        !ok && err.contains("REKEY_PKCS11_PIN_FILE") && err.contains("does not try again"),
        "{err}"
    );
    let (ok, _, err) = env.run(
        "rekey",
        &["keys", "rotate-master", "--new-pkcs11-label", "no-such-key"],
    );
    assert!(!ok && err.contains("REKEY_PKCS11_KEY_LABEL"), "{err}");
    let mut bad = Env {
        vars: env.vars.clone(),
    };
    set(&mut bad, "REKEY_PKCS11_MODULE", "/nonexistent/libpkcs11.so");
    let (ok, _, err) = bad.run(
        "rekey",
        &["keys", "rotate-master", "--new-pkcs11-label", "master-a"],
    );
    assert!(
        !ok && err.contains("REKEY_PKCS11_MODULE") && err.contains("/nonexistent/libpkcs11.so"),
        "{err}"
    );
    assert_eq!(wrapped_by(&env), ["local key"], "nothing changed");

    // local → token.
    let (ok, out, err) = env.run(
        "rekey",
        &[
            "keys",
            "rotate-master",
            "--new-pkcs11-label",
            "master-a",
            "--json",
        ],
    );
    assert!(ok, "{out}{err}");
    let moved: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(moved["old_provider"], "local");
    assert_eq!(moved["new_provider"], "pkcs11");
    assert_eq!(moved["new_master_key"], a["master_key_id"]);
    let by = wrapped_by(&env);
    assert!(
        by[0].starts_with("pkcs11 key 'master-a' in token 'rekey'"),
        "{by:?}"
    );

    // A token that does not offer AES-GCM (the same token, SoftHSM2 told to leave the
    // mechanism out): new-master is refused naming it, and no key is made.
    let no_gcm = dir.join("no-gcm.conf");
    std::fs::write(
        &no_gcm,
        format!(
            // SoftHSM2 2.6.1 reads a "-" list's first name with its minus sign: an empty
            // name first.
            "{}slots.mechanisms = -,CKM_AES_GCM\n",
            std::fs::read_to_string(dir.join("softhsm2.conf")).unwrap()
        ),
    )
    .unwrap();
    let mut bad = Env {
        vars: env.vars.clone(),
    };
    set(&mut bad, "SOFTHSM2_CONF", no_gcm.to_str().unwrap());
    let (ok, _, err) = bad.run(
        "rekey",
        &["keys", "new-master", "--pkcs11", "--label", "master-x"],
    );
    assert!(
        !ok && err.contains("CKM_AES_GCM") && err.contains("REKEY_PKCS11_MODULE"),
        "{err}"
    );
    let (ok, _, err) = env.run(
        "rekey",
        &["keys", "rotate-master", "--new-pkcs11-label", "master-x"],
    );
    assert!(
        !ok && err.contains("REKEY_PKCS11_KEY_LABEL"),
        "no key was made: {err}"
    );

    // Every process on the token now: the local key is not the master any more.
    set(&mut env, "REKEY_MASTER_KEY_PROVIDER", "pkcs11");
    set(&mut env, "REKEY_PKCS11_KEY_LABEL", "master-a");
    // The first worker's token session is lost when it next loads its key ring (the
    // rotation's new key, mid-run): the library finalized under it, as a token that closed
    // every session would leave it. It opens a new one and goes on.
    let mut w1 = env
        .cmd("rekey-worker", &["--worker-id", "hsm-1"])
        .env("FAILPOINTS", "pkcs11.lose_session=1*off->1*return")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn_guarded();
    let mut w2 = env.worker("hsm-2");
    // Both have loaded their rings before the rotation makes its key: hsm-1's next load is
    // the one that loses its session.
    crate::binaries::workers_present(&db, &mut [("hsm-1", &mut w1), ("hsm-2", &mut w2)]).await;
    let (ok, out, err) = env.run("rekey", &quick_rotate(&["--stages", "1,100", "--json"]));
    assert!(ok, "{out}\n{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["run"]["state"], "completed", "{out}");
    let target = status["run"]["target_key_id"].as_str().unwrap().to_owned();
    verify(&env, &target);

    // Processes that open the token at the same moment (workers started together; with
    // SoftHSM2's file store one's login rewrites the token's record while another reads
    // it) all start.
    let many: Vec<_> = (0..6)
        .map(|_| {
            env.cmd("rekey", &["keys", "status"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn_guarded()
        })
        .collect();
    for p in many {
        let out = p.into_inner().wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // token → another token key; the values still verify through it.
    let (ok, out, err) = env.run(
        "rekey",
        &["keys", "new-master", "--pkcs11", "--label", "master-b"],
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = env.run(
        "rekey",
        &["keys", "rotate-master", "--new-pkcs11-label", "master-b"],
    );
    assert!(ok, "{out}{err}");
    set(&mut env, "REKEY_PKCS11_KEY_LABEL", "master-b");
    verify(&env, &target);
    let by = wrapped_by(&env);
    assert!(by.iter().all(|b| b.contains("'master-b'")), "{by:?}");
    // preflight names the provider and unwraps every data key through the token.
    let (ok, out, err) = env.run("rekey", &["preflight"]);
    assert!(
        out.contains("provider pkcs11") && out.contains("unwraps every stored key"),
        "{ok} {out}{err}"
    );
    let (ok, out, err) = env.run("rekey", &["audit", "verify", "--json"]);
    assert!(ok, "{out}{err}");
    let audit: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(audit["problems"], serde_json::json!([]));

    // The same settings from rekey.toml's [pkcs11] table and master_key_provider, with no
    // REKEY_PKCS11_* nor local key in the environment.
    let toml = dir.join("rekey.toml");
    std::fs::write(
        &toml,
        format!(
            "master_key_provider = \"pkcs11\"\n{}\n[pkcs11]\nmodule = \"{MODULE}\"\ntoken_label = \"rekey\"\npin_file = \"{}\"\nkey_label = \"master-b\"\n",
            std::fs::read_to_string(rekey_common::testing::demo_config()).unwrap(),
            dir.join("pin").display()
        ),
    )
    .unwrap();
    let mut from_toml = Env {
        vars: env.vars.clone(),
    };
    from_toml.vars.retain(|(k, _)| {
        !k.starts_with("REKEY_PKCS11_")
            && *k != "REKEY_MASTER_KEY"
            && *k != "REKEY_MASTER_KEY_PROVIDER"
    });
    set(&mut from_toml, "REKEY_CONFIG", toml.to_str().unwrap());
    let (ok, out, err) = from_toml.run("rekey", &["keys", "status", "--json"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("'master-b'"), "{out}");
    verify(&from_toml, &target);

    // token → local: a new local key file becomes the master; the values verify with it
    // alone (no token configured).
    let new_key = dir.join("local.key");
    let (ok, out, err) = env.run(
        "rekey",
        &["keys", "new-master", "--out", new_key.to_str().unwrap()],
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = env.run(
        "rekey",
        &[
            "keys",
            "rotate-master",
            "--new-master-key-file",
            new_key.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}{err}");
    assert_eq!(wrapped_by(&env), ["local key"]);
    let mut local = Env {
        vars: env.vars.clone(),
    };
    local.vars.retain(|(k, _)| {
        !k.starts_with("REKEY_PKCS11_")
            && *k != "REKEY_MASTER_KEY"
            && *k != "REKEY_MASTER_KEY_PROVIDER"
    });
    set(
        &mut local,
        "REKEY_MASTER_KEY_FILE",
        new_key.to_str().unwrap(),
    );
    verify(&local, &target);

    let mut logs = Vec::new();
    for w in [&mut w1, &mut w2] {
        sigterm(w);
        let status = wait_exit(w, Duration::from_secs(30));
        let mut log = String::new();
        std::io::Read::read_to_string(w.stderr.as_mut().unwrap(), &mut log).unwrap();
        assert!(status.success(), "{status}: {log}");
        logs.push(log);
    }
    let log = &logs[0];
    assert!(
        log.contains("fault point pkcs11.lose_session")
            && log.contains("PKCS#11 session lost; reopening it")
            && log.contains("PKCS#11 session reopened"),
        "hsm-1 lost its session and reopened it: {log}"
    );
    // cryptoki's complaint about each vendor mechanism it does not know stays out of the
    // log (thirty ERROR lines at every start otherwise).
    assert!(!log.contains("Mechanism type"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
