//! Test support: a fresh database with a random name per test, migrated,
//! and dropped when the test ends. Tests that need Postgres fail loudly when it is missing;
//! they never skip.

use std::str::FromStr;

use deadpool_postgres::Pool;
use secrecy::SecretString;

use crate::config::{DEFAULT_DATABASE_URL, Settings};
use crate::db;

/// A database made for one test.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: Pool,
    admin_url: String,
}

/// A `rekey.toml` naming the demo schema's tables, for tests that run rekey's binaries on
/// the demo data (`REKEY_CONFIG`).
pub fn demo_config() -> std::path::PathBuf {
    crate::config::demo_config_file().expect("write the demo targets")
}

/// Where Debian's softhsm2 package puts its PKCS#11 module.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 configuration of a test's own in `dir` (its tokens under `dir/tokens`, the
/// lines of `extra_conf` appended) with one token initialized for each of `labels`, user PIN
/// `pin`; returns the configuration's path, for `SOFTHSM2_CONF`.
pub fn softhsm2_tokens(
    dir: &std::path::Path,
    labels: &[&str],
    pin: &str,
    extra_conf: &str,
) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("tokens")).expect("the token directory");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n{extra_conf}\n",
            dir.join("tokens").display()
        ),
    )
    .expect("softhsm2.conf");
    for label in labels {
        let out = std::process::Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label, "--pin", pin])
            .args(["--so-pin", "so-31415926"])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util (scripts/setup.sh installs softhsm2)");
        assert!(out.status.success(), "{out:?}");
    }
    conf
}

/// Writes `text` and a newline to `path`, readable by its owner only (a PIN or password
/// file, as rekey requires of them).
pub fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{text}\n")).expect("a private file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("mode 0600");
}

/// The `name = value` lines of the first fenced block after `heading` in FORMAT.md: the
/// values of a worked example, for the tests that check it byte for byte.
pub fn format_md_example(heading: &str) -> std::collections::HashMap<String, String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../FORMAT.md"))
        .expect("FORMAT.md");
    let section = text
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("FORMAT.md has no {heading:?}"));
    let block = section.split("```").nth(1).expect("a fenced block");
    block
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The server tests use: `REKEY_TEST_DATABASE_URL` or the local default.
pub fn admin_url() -> String {
    std::env::var("REKEY_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

impl TestDb {
    /// The single `int8` a query returns (panics on any error: for tests).
    pub async fn scalar(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> i64 {
        self.pool
            .get()
            .await
            .unwrap()
            .query_one(sql, params)
            .await
            .unwrap()
            .get(0)
    }

    /// Creates `rekey_test_<random>`, applies rekey's and the demo migrations.
    pub async fn new() -> Self {
        let admin_url = admin_url();
        let name = format!("rekey_test_{}", uuid::Uuid::new_v4().simple());
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .expect("tests need PostgreSQL at REKEY_TEST_DATABASE_URL or 127.0.0.1:5432");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let mut cfg = tokio_postgres::Config::from_str(&admin_url).expect("valid admin URL");
        cfg.dbname(&name);
        let url = format!(
            "postgres://{}@{}:{}/{}",
            cfg.get_user().unwrap_or("postgres"),
            match &cfg.get_hosts()[0] {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            },
            cfg.get_ports().first().copied().unwrap_or(5432),
            name
        );
        let pool = db::pool_for_url(&url, 8).expect("pool");
        db::migrate(&pool).await.expect("migrate rekey schema");
        db::migrate_demo(&pool).await.expect("migrate demo schema");
        Self {
            name,
            url,
            pool,
            admin_url,
        }
    }

    /// Settings pointing at this database, with the given master key (base64) if any.
    pub fn settings(&self, master_key_b64: Option<&str>) -> Settings {
        let mut env = std::collections::HashMap::new();
        env.insert("REKEY_DATABASE_URL".to_owned(), self.url.clone());
        env.insert("REKEY_ACTOR".to_owned(), "test".to_owned());
        env.insert("REKEY_QUEUE_PREFIX".to_owned(), self.name.clone());
        env.insert(
            "REKEY_REPORTS_DIR".to_owned(),
            std::env::temp_dir()
                .join(format!("{}-reports", self.name))
                .display()
                .to_string(),
        );
        // A test machine has no WAL archive; the backup check is tested on its own.
        env.insert("REKEY_BACKUP_CHECK".to_owned(), "none".to_owned());
        if let Some(k) = master_key_b64 {
            env.insert("REKEY_MASTER_KEY".to_owned(), k.to_owned());
        }
        let mut s = Settings::from_sources(Some(std::path::Path::new("/dev/null")), &env)
            .expect("test settings");
        s.database_url = SecretString::from(self.url.clone());
        s.targets = crate::target::demo_targets();
        s
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.pool.close();
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        on_own_thread(async move {
            if let Ok((client, conn)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
            {
                tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        });
    }
}

/// Runs `fut` to its end on a thread with a runtime of its own, and waits for it: for a
/// `Drop` that runs inside a test's runtime (which may be busy or shutting down) and must
/// still clean up.
pub fn on_own_thread(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(fut);
    })
    .join();
}
