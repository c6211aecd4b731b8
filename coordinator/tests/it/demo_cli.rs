//! `rekey demo` when a service does not answer: it names the URL it tried (never its
//! password), the setting that URL came from, and `scripts/setup.sh`, and makes nothing.

use std::path::PathBuf;

use rekey_common::testing::admin_url;
use uuid::Uuid;

use crate::helpers::{Run, rekey_in};

/// A working directory of its own, removed afterwards.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("rekey-demo-cli-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    /// Names in the directory, apart from `rekey.toml`: the demo makes `exports/` once it
    /// starts making things.
    fn made(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "rekey.toml")
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_told(r: &Run, wanted: &[&str]) {
    assert!(!r.ok, "{}", r.stderr);
    for w in wanted {
        assert!(r.stderr.contains(w), "wanted {w:?} in:\n{}", r.stderr);
    }
    assert!(r.stderr.contains("scripts/setup.sh"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(!r.stderr.contains("demo database"), "{}", r.stderr);
}

#[test]
fn demo_without_postgres_names_the_url_its_setting_and_the_setup_command() {
    let dir = Scratch::new();
    let r = rekey_in(
        &dir.0,
        &[(
            "REKEY_DATABASE_URL",
            "postgres://postgres:hunter2secret@127.0.0.1:1/postgres",
        )],
        &["demo", "--rows", "100"],
    );
    assert_told(
        &r,
        &[
            "cannot reach PostgreSQL at 127.0.0.1:1/postgres",
            "set by REKEY_DATABASE_URL",
        ],
    );
    assert!(!r.stderr.contains("hunter2secret"), "{}", r.stderr);
    assert!(dir.made().is_empty(), "{:?}", dir.made());

    // The same URL from rekey.toml is said to come from there.
    std::fs::write(
        dir.0.join("rekey.toml"),
        "database_url = \"postgres://postgres@127.0.0.1:1/postgres\"\n",
    )
    .unwrap();
    let r = rekey_in(&dir.0, &[], &["demo", "--rows", "100"]);
    assert_told(
        &r,
        &[
            "cannot reach PostgreSQL at 127.0.0.1:1/postgres",
            "set by database_url in rekey.toml",
        ],
    );
    assert!(dir.made().is_empty(), "{:?}", dir.made());
}

#[test]
fn demo_without_rabbitmq_names_the_url_its_setting_and_the_setup_command_and_makes_nothing() {
    let dir = Scratch::new();
    let pg = admin_url();
    let r = rekey_in(
        &dir.0,
        &[
            ("REKEY_DATABASE_URL", pg.as_str()),
            (
                "REKEY_AMQP_URL",
                "amqp://guest:hunter2secret@127.0.0.1:1/%2f",
            ),
        ],
        &["demo", "--rows", "100"],
    );
    assert_told(
        &r,
        &[
            "cannot reach RabbitMQ at 127.0.0.1:1/%2f",
            "set by REKEY_AMQP_URL",
        ],
    );
    assert!(!r.stderr.contains("hunter2secret"), "{}", r.stderr);
    assert!(dir.made().is_empty(), "{:?}", dir.made());
}

/// Outside `rekey demo`, settings without `[[targets]]` are refused by every command that
/// would read or rotate tables, with an error that names `rekey.toml` and `[[targets]]`,
/// before anything is written.
#[tokio::test]
async fn without_targets_commands_refuse_naming_rekey_toml_and_targets_and_change_nothing() {
    let db = rekey_common::testing::TestDb::new().await;
    let dir = Scratch::new();
    let key = rekey_common::keys::master::generate_base64();
    let env = [
        ("REKEY_DATABASE_URL", db.url.as_str()),
        (
            "REKEY_MASTER_KEY",
            secrecy::ExposeSecret::expose_secret(&key),
        ),
        ("REKEY_QUEUE_PREFIX", db.name.as_str()),
        ("REKEY_BACKUP_CHECK", "none"),
    ];
    // Key operations that touch no table work without targets.
    let r = rekey_in(&dir.0, &env, &["keys", "init"]);
    assert!(r.ok, "{}", r.stderr);
    let field_key: String = {
        let c = db.pool.get().await.unwrap();
        c.query_one(
            "SELECT id::text FROM rekey.keys WHERE kind = 'field' AND state = 'active'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    let counts = || async {
        let c = db.pool.get().await.unwrap();
        let row = c
            .query_one(
                "SELECT (SELECT count(*) FROM rekey.keys), (SELECT count(*) FROM rekey.runs),
                        (SELECT count(*) FROM rekey.audit_log),
                        (SELECT string_agg(id::text || state, ',' ORDER BY id) FROM rekey.keys)",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, String>(3),
        )
    };
    let before = counts().await;
    for args in [
        vec!["keys", "census"],
        vec!["keys", "status"],
        vec!["preflight"],
        vec!["rotate", "--key-propagation", "0s", "--observe", "0"],
        vec![
            "rotate",
            "--skip-preflight",
            "--detach",
            "--key-propagation",
            "0s",
        ],
        vec!["keys", "retire", field_key.as_str()],
    ] {
        let r = rekey_in(&dir.0, &env, &args);
        assert!(!r.ok, "rekey {args:?} ran without targets");
        assert!(
            r.stderr.contains("[[targets]]") && r.stderr.contains("rekey.toml"),
            "rekey {args:?}: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("demo."), "rekey {args:?}: {}", r.stderr);
        assert_eq!(counts().await, before, "rekey {args:?} changed something");
    }
    // `keys status --no-census` reads no table and works.
    let r = rekey_in(&dir.0, &env, &["keys", "status", "--no-census"]);
    assert!(r.ok, "{}", r.stderr);
    // With the targets in ./rekey.toml the census runs.
    std::fs::write(
        dir.0.join("rekey.toml"),
        rekey_common::target::targets_toml(&rekey_common::target::demo_targets()),
    )
    .unwrap();
    let r = rekey_in(&dir.0, &env, &["keys", "census"]);
    assert!(r.ok, "{}", r.stderr);
}

/// A demo that fails after making its database drops it and says so (here: no
/// `rekey-worker` beside the `rekey` binary).
#[tokio::test]
async fn a_failed_demo_drops_its_database_and_says_so() {
    let dir = Scratch::new();
    let bin = dir.0.join("rekey");
    std::fs::copy(env!("CARGO_BIN_EXE_rekey"), &bin).unwrap();
    let pg = admin_url();
    let out = std::process::Command::new(&bin)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REKEY_DATABASE_URL", &pg)
        .current_dir(&dir.0)
        .args(["demo", "--rows", "200"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rekey-worker") && stderr.contains("not found"),
        "{stderr}"
    );
    let name = stderr
        .split_whitespace()
        .find(|w| w.starts_with("rekey_demo_"))
        .map(|w| w.trim_end_matches(';').to_owned())
        .unwrap_or_else(|| panic!("no database named: {stderr}"));
    assert!(
        stderr.contains(&format!("the demo failed; its database {name} was dropped")),
        "{stderr}"
    );
    let (client, conn) = tokio_postgres::connect(&pg, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "{name} was left behind");
}
