//! The replicas' brake with a real hot standby: the test makes one of its own
//! (`pg_basebackup` of the suite's cluster into a second cluster on another port, streaming),
//! pauses its replay and writes WAL, and a rotation with `--max-replication-lag-bytes` is
//! held (nothing published, `rekey status` naming the replica) until replay resumes; then
//! it completes and every value verifies. Likewise a database busier than
//! `--max-active-backends` holds publication until its statements end.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::binaries::{SpawnGuarded, quick_rotate, seeded, sigterm, wait_exit};
use crate::observability::free_port;
use crate::stalls::status_until;

/// Runs a PostgreSQL tool as the `postgres` user when the tests run as root.
fn as_postgres(tool: &str) -> Command {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries (scripts/setup.sh installs them)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(tool)))
        .filter(|p| p.exists())
        .max()
        .unwrap_or_else(|| panic!("{tool} not found under /usr/lib/postgresql"));
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// A streaming hot standby of the suite's cluster; stopped and removed when dropped.
struct Standby {
    dir: PathBuf,
    port: u16,
    name: String,
}

impl Standby {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status();
        let admin = rekey_common::testing::admin_url();
        let out = as_postgres("pg_basebackup")
            .args(["-d", &admin, "-D"])
            .arg(&dir)
            .args(["-R", "-X", "stream", "-c", "fast"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A Debian cluster keeps its configuration in /etc: the copy needs its own.
        let port = free_port();
        std::fs::write(
            dir.join("postgresql.conf"),
            format!(
                "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nhot_standby = on\ncluster_name = '{name}'\nssl = off\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        let log = dir.join("standby.log");
        let out = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        let standby = Self {
            dir,
            port,
            name: name.to_owned(),
        };
        assert!(
            out.status.success(),
            "standby start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        standby
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn on(url: &str, sql: &str) {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(sql).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_whose_replay_falls_behind_holds_publication_until_it_catches_up() {
    let (db, env, reports) = seeded(3_000).await;
    let name = format!("{}_standby", db.name);
    let standby = Standby::start(&name);
    // The primary sees it streaming.
    let start = Instant::now();
    loop {
        let n = db
            .scalar(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                &[&standby.name],
            )
            .await;
        if n == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the standby never streamed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Replay paused, then 8 MB of WAL: the standby falls behind.
    on(&standby.url(), "SELECT pg_wal_replay_pause()").await;
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE public.filler AS SELECT g, repeat('x', 800) AS pad FROM generate_series(1, 10000) g",
        )
        .await
        .unwrap();

    let mut worker = env.worker("w");
    let mut driver = env
        .cmd(
            "rekey",
            &quick_rotate(&[
                "--stages",
                "100",
                "--batch-size",
                "200",
                "--max-replication-lag-bytes",
                "1048576",
                "--max-replication-lag",
                "0",
            ]),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let held = status_until(&env, "1", Duration::from_secs(60), |s| {
        s.contains("throttle     held: replica")
    })
    .await;
    assert!(held.contains(&name), "{held}");
    assert!(held.contains("MiB of WAL behind"), "{held}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let done = db
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = 1 AND state <> 'pending'",
            &[],
        )
        .await;
    assert_eq!(done, 0, "a held run published nothing");

    // Replay resumes: the replica catches up and the run completes.
    on(&standby.url(), "SELECT pg_wal_replay_resume()").await;
    let code = wait_exit(&mut driver, Duration::from_secs(180));
    let mut text = String::new();
    std::io::Read::read_to_string(driver.stderr.as_mut().unwrap(), &mut text).unwrap();
    sigterm(&worker);
    wait_exit(&mut worker, Duration::from_secs(30));
    assert!(code.success(), "{code:?}: {text}");
    assert!(text.contains("publication held"), "{text}");
    assert!(text.contains("hold lifted"), "{text}");
    let (ok, out, err) = env.run("rekey-loadtest", &["verify"]);
    assert!(ok, "{out}{err}");
    drop(standby);
    let _ = std::fs::remove_dir_all(&reports);
}

/// Backends running `pg_sleep(secs)` on `url`, until cancelled.
async fn sleepers(url: &str, n: usize, secs: u32) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        tasks.push(tokio::spawn(async move {
            let _ = client
                .simple_query(&format!("SELECT pg_sleep({secs}) /* rekey brake test */"))
                .await;
        }));
    }
    tasks
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_backends_hold_publication_until_they_finish() {
    let (db, env, reports) = seeded(2_000).await;
    // More sessions running a statement than the limit, whatever else the server runs (the
    // count is server-wide, as gh-ost's Threads_running: other tests only add to it).
    let busy = sleepers(&db.url, 16, 120).await;
    let start = Instant::now();
    while db
        .scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%rekey brake test%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        < 16
    {
        assert!(start.elapsed() < Duration::from_secs(30), "sleepers not running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut worker = env.worker("w");
    let mut driver = env
        .cmd(
            "rekey",
            &quick_rotate(&[
                "--stages",
                "100",
                "--batch-size",
                "100",
                "--max-active-backends",
                "12",
            ]),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn_guarded();
    let held = status_until(&env, "1", Duration::from_secs(60), |s| {
        s.contains("active backends in PostgreSQL")
    })
    .await;
    assert!(held.contains("(--max-active-backends 12)"), "{held}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM rekey.batches WHERE run_id = 1 AND state <> 'pending'",
            &[]
        )
        .await,
        0,
        "nothing published while the database is busy"
    );
    // The application's statements end: the run goes on and completes.
    db.scalar(
        "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE query LIKE '%rekey brake test%' AND pid <> pg_backend_pid()",
        &[],
    )
    .await;
    for b in busy {
        b.await.unwrap();
    }
    let code = wait_exit(&mut driver, Duration::from_secs(120));
    assert!(code.success(), "{code:?}");
    sigterm(&worker);
    wait_exit(&mut worker, Duration::from_secs(30));
    let (ok, out, err) = env.run("rekey-loadtest", &["verify"]);
    assert!(ok, "{out}{err}");
    let _ = std::fs::remove_dir_all(&reports);
}

/// A checkpoint PostgreSQL was asked for mid-run (here a `CHECKPOINT` command; in
/// production, WAL outgrowing `max_wal_size` under the rotation's writes) holds publication
/// for `--checkpoint-hold`, and `rekey status` says so; then the run goes on and completes,
/// every value verified.
#[tokio::test(flavor = "multi_thread")]
async fn a_requested_checkpoint_holds_publication_for_the_checkpoint_hold() {
    let (db, env, reports) = seeded(3_000).await;
    // Batches that take a while, so that the run is still going when the checkpoint comes.
    let mut worker = env.slow_worker("w");
    let mut driver = env
        .cmd(
            "rekey",
            &quick_rotate(&[
                "--stages",
                "100",
                "--batch-size",
                "100",
                "--checkpoint-hold",
                "12s",
            ]),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn_guarded();
    let done = "SELECT count(*) FROM rekey.batches WHERE run_id = 1 AND state = 'done'";
    let start = Instant::now();
    while db.scalar(done, &[]).await < 2 {
        assert!(start.elapsed() < Duration::from_secs(60), "no batch done");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    on(&db.url, "CHECKPOINT").await;
    let held = status_until(&env, "1", Duration::from_secs(30), |s| {
        s.contains("requested a checkpoint")
    })
    .await;
    assert!(held.contains("(--checkpoint-hold)"), "{held}");
    let published = "SELECT count(*) FROM rekey.batches WHERE run_id = 1 AND state <> 'pending'";
    let before = db.scalar(published, &[]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        db.scalar(published, &[]).await,
        before,
        "nothing published during the hold"
    );
    let code = wait_exit(&mut driver, Duration::from_secs(180));
    assert!(code.success(), "{code:?}");
    assert_eq!(
        db.scalar(done, &[]).await,
        db.scalar("SELECT count(*) FROM rekey.batches WHERE run_id = 1", &[])
            .await,
        "every batch done after the hold"
    );
    sigterm(&worker);
    wait_exit(&mut worker, Duration::from_secs(30));
    let (ok, out, err) = env.run("rekey-loadtest", &["verify"]);
    assert!(ok, "{out}{err}");
    let _ = std::fs::remove_dir_all(&reports);
}
