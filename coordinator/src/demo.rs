//! `rekey demo`: a whole staged rotation on this machine's Postgres and RabbitMQ. Makes a
//! fresh demo database, seeds it, starts two `rekey-worker` processes (found beside the
//! `rekey` binary), runs the five stages with short observation periods, verifies every
//! value, and prints the report's path.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rekey_common::broker::{self, Topology};
use rekey_common::keys::master::{self, MasterKeyProvider};
use rekey_common::keys::store;
use rekey_common::ledger::RunSettings;
use rekey_common::{Settings, config::MasterKeySource, db};
use secrecy::{ExposeSecret, SecretString};

use crate::args::DriveArgs;
use crate::context::Context;
use crate::events::RunEvent;
use crate::follow::follow;
use crate::run_cmd::{self, RotateOptions};

/// A libpq key=value connection string for `dbname` on the configured server.
fn url_for(settings: &Settings, dbname: &str) -> anyhow::Result<String> {
    let cfg =
        tokio_postgres::Config::from_str(settings.database_url.expose_secret()).map_err(|_| {
            anyhow::anyhow!("REKEY_DATABASE_URL is not a valid PostgreSQL connection URL")
        })?;
    let quote = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut parts = Vec::new();
    if let Some(tokio_postgres::config::Host::Tcp(h)) = cfg.get_hosts().first() {
        parts.push(format!("host={}", quote(h)));
    }
    if let Some(p) = cfg.get_ports().first() {
        parts.push(format!("port={p}"));
    }
    if let Some(u) = cfg.get_user() {
        parts.push(format!("user={}", quote(u)));
    }
    if let Some(pw) = cfg.get_password() {
        parts.push(format!("password={}", quote(&String::from_utf8_lossy(pw))));
    }
    parts.push(format!("dbname={}", quote(dbname)));
    Ok(parts.join(" "))
}

/// What `rekey demo` adds when a service does not answer.
const SETUP_HINT: &str = "rekey demo needs PostgreSQL and RabbitMQ: on a Debian machine, \
     `scripts/setup.sh` (in rekey's repository) installs and starts both on 127.0.0.1";

pub async fn run(
    base: Settings,
    rows: i64,
    observe: Duration,
    keep: bool,
) -> anyhow::Result<ExitCode> {
    let name = format!(
        "rekey_demo_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    // Both services first, before anything is made.
    let admin = db::pool(&base, 1)?;
    db::check_connection(&admin, &base)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{SETUP_HINT}"))?;
    match tokio::time::timeout(
        Duration::from_secs(10),
        broker::connect_settings(&base, "rekey-demo"),
    )
    .await
    {
        Ok(Ok(conn)) => {
            let _ = conn.close(0, "checked".into()).await;
        }
        Ok(Err(e)) => anyhow::bail!("{e:#}\n{SETUP_HINT}"),
        Err(_) => anyhow::bail!(
            "no answer from RabbitMQ at {} within 10 s ({})\n{SETUP_HINT}",
            broker::redacted(base.amqp_url.expose_secret()),
            base.amqp_url_from
        ),
    }
    let dir = PathBuf::from("exports").join(&name);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    admin
        .get()
        .await?
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .with_context(|| format!("create the demo database {name}"))?;
    eprintln!("demo database {name}; files in {}", dir.display());

    // Everything that can fail once the database exists; whatever happens, the database and
    // the queues are dealt with below.
    let outcome: anyhow::Result<(ExitCode, PathBuf)> = async {
    // The demo's own master key unless one is configured.
    let key_file = match &base.master_key {
        MasterKeySource::File(p) => p.clone(),
        MasterKeySource::Env(v) => {
            let p = dir.join("master.key");
            write_private(&p, v.expose_secret())?;
            p
        }
        // A token's key is not for a throw-away demo database: the demo makes its own.
        MasterKeySource::None | MasterKeySource::Pkcs11 => {
            let p = dir.join("master.key");
            write_private(&p, master::generate_base64().expose_secret())?;
            p
        }
    };
    let mut settings = base.clone();
    settings.database_url = SecretString::from(url_for(&base, &name)?);
    settings.master_key = MasterKeySource::File(key_file.clone());
    settings.pkcs11 = None;
    settings.queue_prefix = name.clone();
    settings.targets = rekey_common::target::demo_targets();

    let ctx = Context::with_settings(settings.clone()).await?;
    db::migrate(&ctx.pool).await?;
    db::migrate_demo(&ctx.pool).await?;
    let master = master::FileMasterKey::new("REKEY_MASTER_KEY_FILE", &key_file).load()?;
    {
        let mut c = ctx.pool.get().await?;
        let tx = c.transaction().await?;
        store::init(&tx, &master, &settings.key_policy, &settings.actor).await?;
        tx.commit().await?;
    }
    let ring = Arc::new(store::load_ring(&**ctx.pool.get().await?, &master).await?);
    eprintln!("seeding {rows} records…");
    let seeded = rekey_demo::seed::seed(
        &ctx.pool,
        ring,
        &rekey_demo::seed::SeedOptions {
            rows,
            ..Default::default()
        },
    )
    .await?;
    eprintln!(
        "seeded {} records ({} encrypted values)",
        seeded.rows, seeded.values
    );

    let worker_bin = std::env::current_exe()?.with_file_name("rekey-worker");
    anyhow::ensure!(
        worker_bin.exists(),
        "{} not found: build the workspace first",
        worker_bin.display()
    );
    let mut workers = Vec::new();
    for i in 1..=2 {
        let log = std::fs::File::create(dir.join(format!("worker-{i}.log")))?;
        let child = tokio::process::Command::new(&worker_bin)
            .env("REKEY_DATABASE_URL", settings.database_url.expose_secret())
            .env("REKEY_AMQP_URL", settings.amqp_url.expose_secret())
            .env("REKEY_MASTER_KEY_FILE", &key_file)
            .env("REKEY_MASTER_KEY_PROVIDER", "local")
            .env("REKEY_QUEUE_PREFIX", &name)
            .env("REKEY_CONFIG", "/dev/null")
            .env_remove("REKEY_MASTER_KEY")
            .args(["--worker-id", &format!("demo-worker-{i}")])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", worker_bin.display()))?;
        workers.push(child);
    }
    wait_for_workers(&settings, 2).await?;
    eprintln!("2 workers up; rotating in stages 1,25,50,75,100 with {observe:?} observation");

    let opts = RotateOptions {
        batch_size: 10_000,
        stages: vec![1, 25, 50, 75, 100],
        key_propagation: Duration::from_secs(2),
        gating: RunSettings {
            observe_first_secs: observe.as_secs(),
            observe_secs: observe.as_secs(),
            auto_advance: true,
            batch_bytes: rekey_common::sizing::DEFAULT_BATCH_BYTES,
            ..Default::default()
        },
        ..Default::default()
    };
    let run = run_cmd::start_rotation_with(&ctx.events, &ctx.pool, &settings, &master, &opts).await?;
    let drive = DriveArgs {
        max_in_flight: 32,
        lease_secs: 60,
        metrics_addr: None,
        metrics_linger: "0".into(),
        no_consumer_after: std::time::Duration::from_secs(30),
        throttle_flag_file: None,
    };
    let code = follow(&ctx, run.id, false, &drive, false, RunEvent::Started).await?;

    let ring = store::load_ring(&**ctx.pool.get().await?, &master).await?;
    let v = rekey_demo::verify::verify(&ctx.pool, &ring, Some(run.target_key_id), 10_000).await?;
    println!(
        "verified: {} values under the new key decrypt to their original plaintext; mismatched {}, undecryptable {}, missing {}",
        v.ok, v.mismatched, v.undecryptable, v.missing
    );
    let report = crate::report::write(&ctx.pool, &settings, run.id, "demo finished").await?;

    for w in &mut workers {
        if let Some(pid) = w.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for w in &mut workers {
        let _ = tokio::time::timeout(Duration::from_secs(30), w.wait()).await;
    }
    ctx.pool.close();
    Ok((if v.passed() { code } else { ExitCode::FAILURE }, report))
    }
    .await;
    // The workers are gone (stopped above, or killed when dropped on an error).
    if let Ok(conn) = broker::connect(&base.amqp_url, "rekey-demo").await
        && let Ok(ch) = conn.create_channel().await
    {
        let _ = broker::delete(&ch, &Topology::new(&name)).await;
    }
    let dropped = if keep {
        None
    } else {
        Some(
            async {
                admin
                    .get()
                    .await?
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                anyhow::Ok(())
            }
            .await,
        )
    };
    match (&outcome, dropped) {
        (_, None) => eprintln!("kept the database {name} (--keep)"),
        (Ok(_), Some(Ok(()))) => eprintln!("dropped {name} (pass --keep to keep it)"),
        (Err(_), Some(Ok(()))) => eprintln!(
            "the demo failed; its database {name} was dropped (pass --keep to keep a failed demo's database for a look; logs stay in {})",
            dir.display()
        ),
        (_, Some(Err(e))) => eprintln!(
            "could not drop the demo database {name}: {}; drop it with `dropdb {name}`",
            rekey_common::report_error::error_text(&e)
        ),
    }
    let (code, report) = outcome?;
    // Last, so that it is what the operator sees: the evidence of the run.
    println!("report: {}", report.display());
    Ok(code)
}

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

async fn wait_for_workers(settings: &Settings, n: u32) -> anyhow::Result<()> {
    let topo = Topology::of(settings);
    let conn =
        broker::connect_with_retry(&settings.amqp_url, "rekey-demo", Duration::from_secs(30))
            .await?;
    let ch = conn.create_channel().await?;
    broker::declare(&ch, &topo).await?;
    for _ in 0..300 {
        if broker::consumer_count(&ch, &topo.batches).await? >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the demo workers did not start within 30 s; see their logs in exports/")
}
