//! The three binaries together, as processes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rekey_common::broker::{self, Topology};
use rekey_common::keys::master::generate_base64;
use rekey_common::testing::TestDb;
use secrecy::ExposeSecret;

pub(crate) fn bin(name: &str) -> PathBuf {
    let here = PathBuf::from(env!("CARGO_BIN_EXE_rekey-loadtest"));
    let path = here.with_file_name(name);
    assert!(
        path.exists(),
        "{} not built: run the tests with `cargo test --workspace --all-features`",
        path.display()
    );
    path
}

/// A spawned process that is killed (and reaped) when dropped: a test that fails half-way
/// leaves no worker, driver or traffic generator running behind it.
pub(crate) struct Proc(Option<Child>);

impl Proc {
    pub(crate) fn into_inner(mut self) -> Child {
        self.0.take().expect("a Proc holds its child until dropped")
    }
}

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0
            .as_ref()
            .expect("a Proc holds its child until dropped")
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        self.0
            .as_mut()
            .expect("a Proc holds its child until dropped")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0
            && let Ok(None) = c.try_wait()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `Command::spawn` for the tests: the child is a [`Proc`].
pub(crate) trait SpawnGuarded {
    fn spawn_guarded(&mut self) -> Proc;
}

impl SpawnGuarded for Command {
    fn spawn_guarded(&mut self) -> Proc {
        match self.spawn() {
            Ok(c) => Proc(Some(c)),
            Err(e) => panic!("cannot start {}: {e}", self.get_program().display()),
        }
    }
}

pub(crate) struct Env {
    pub(crate) vars: Vec<(&'static str, String)>,
}

impl Env {
    /// The settings of every test here: the test's database and queues, a fresh master
    /// key, reports in `reports_dir`, no backup check.
    pub(crate) fn new(db: &TestDb, reports_dir: PathBuf) -> Self {
        Self {
            vars: vec![
                ("REKEY_DATABASE_URL", db.url.clone()),
                (
                    "REKEY_MASTER_KEY",
                    generate_base64().expose_secret().to_owned(),
                ),
                ("REKEY_QUEUE_PREFIX", db.name.clone()),
                ("REKEY_REPORTS_DIR", reports_dir.display().to_string()),
                ("REKEY_BACKUP_CHECK", "none".into()),
                (
                    "REKEY_CONFIG",
                    rekey_common::testing::demo_config().display().to_string(),
                ),
            ],
        }
    }

    pub(crate) fn cmd(&self, name: &str, args: &[&str]) -> Command {
        let mut c = Command::new(bin(name));
        c.args(args)
            .env_remove("REKEY_CONFIG")
            .current_dir(std::env::temp_dir());
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    pub(crate) fn run(&self, name: &str, args: &[&str]) -> (bool, String, String) {
        let out = self.cmd(name, args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub(crate) fn worker(&self, id: &str) -> Proc {
        self.cmd("rekey-worker", &["--worker-id", id])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn_guarded()
    }

    /// A worker whose every batch takes 300 ms more (the `worker.after_write` fault point,
    /// with the `failpoints` feature): a run that lasts while a test does something to it.
    pub(crate) fn slow_worker(&self, id: &str) -> Proc {
        self.cmd("rekey-worker", &["--worker-id", id])
            .env("FAILPOINTS", "worker.after_write=sleep(300)")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn_guarded()
    }
}

/// `rekey rotate` as the tests run it unattended (no preflight, no key propagation wait,
/// no observation, stages promoted by themselves, opened at full speed: slow start paces a
/// stage's first ~20 s), then `extra`.
pub(crate) fn quick_rotate<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = paced_rotate(extra);
    args.insert(1, "--no-slow-start");
    args
}

/// [`quick_rotate`] with slow start, for the tests of pacing.
pub(crate) fn paced_rotate<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "rotate",
        "--skip-preflight",
        "--key-propagation",
        "0s",
        "--observe",
        "0",
        "--auto-advance",
    ];
    args.extend_from_slice(extra);
    args
}

/// A channel on the suite's broker (the guest user on 127.0.0.1), with its connection.
pub(crate) async fn test_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = broker::connect(
        &secrecy::SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
        "t",
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

pub(crate) fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

pub(crate) fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < within,
            "process did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_rotate_with_two_worker_processes_verify_and_stop_them_with_sigterm() {
    let db = TestDb::new().await;
    let mut env = Env::new(
        &db,
        std::env::temp_dir().join(format!("{}-reports", db.name)),
    );
    env.vars.push(("RUST_LOG", "info".into()));
    let (ok, out, err) = env.run(
        "rekey-loadtest",
        &[
            "seed",
            "--rows",
            "8000",
            "--corrupt-fraction",
            "0.002",
            "--json",
        ],
    );
    assert!(ok, "{out}{err}");
    let mut w1 = env.worker("p1");
    let mut w2 = env.worker("p2");
    // Preflight requires live workers: wait until both consume.
    let (_conn, ch) = test_channel().await;
    let topo = Topology::new(&db.name);
    broker::declare(&ch, &topo).await.unwrap();
    let start = Instant::now();
    loop {
        if broker::consumer_count(&ch, &topo.batches).await.unwrap() == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "workers did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (ok, out, err) = env.run(
        "rekey",
        &[
            "rotate",
            "--no-slow-start",
            "--batch-size",
            "400",
            "--stages",
            "1,100",
            "--key-propagation",
            "0",
            "--observe",
            "0",
            "--auto-advance",
            // 0.2% of the values are corrupt; the 1% canary holds about 170 values, so a
            // threshold of 1% would be crossed by two corrupt values in it (about one run
            // in twenty): the threshold here only has to pass what the seed planted.
            "--max-error-rate",
            "0.05",
            "--json",
        ],
    );
    assert!(ok, "{out}\n{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["run"]["state"], "completed");
    assert_eq!(status["progress"]["n_rows"], 8000);
    let target = status["run"]["target_key_id"].as_str().unwrap().to_owned();
    let run_id = status["run"]["id"].as_i64().unwrap().to_string();

    let (ok, out, _) = env.run("rekey", &["status", &run_id, "--json"]);
    assert!(ok);
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        again["progress"], status["progress"],
        "status is recomputed from the ledger"
    );
    assert!(!again["decrypt_errors"].as_array().unwrap().is_empty());

    let (ok, out, err) = env.run(
        "rekey-loadtest",
        &["verify", "--expect-key", &target, "--json"],
    );
    assert!(ok, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["ok"].as_i64().unwrap() > 10_000);
    assert_eq!(v["mismatched"], 0);

    // The audit log the run left verifies, from the command line too.
    let (ok, out, err) = env.run("rekey", &["audit", "verify", "--json"]);
    assert!(ok, "{out}\n{err}");
    let a: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(a["problems"], serde_json::json!([]));
    assert_eq!(a["seals"], 2);

    // Pause and resume of a finished run are refused with a reason.
    let (ok, _, err) = env.run("rekey", &["pause", &run_id]);
    assert!(
        !ok && err.contains("only a running run can be paused"),
        "{err}"
    );

    sigterm(&w1);
    sigterm(&w2);
    assert!(wait_exit(&mut w1, Duration::from_secs(30)).success());
    assert!(wait_exit(&mut w2, Duration::from_secs(30)).success());

    let (_conn, ch) = test_channel().await;
    broker::delete(&ch, &Topology::new(&db.name)).await.unwrap();
}

#[test]
fn rekey_demo_completes_five_passed_stages_and_its_report_follows_the_schema() {
    let dir =
        std::env::temp_dir().join(format!("rekey-demo-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(bin("rekey"))
        .args(["demo", "--rows", "5000", "--observe", "0"])
        .env_remove("REKEY_CONFIG")
        .env_remove("REKEY_MASTER_KEY")
        .env_remove("REKEY_MASTER_KEY_FILE")
        .env("REKEY_BACKUP_CHECK", "none")
        .env("REKEY_DATABASE_URL", rekey_common::testing::admin_url())
        .current_dir(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let path = stdout
        .lines()
        .find_map(|l| l.strip_prefix("report: "))
        .unwrap_or_else(|| panic!("no report path in {stdout}"));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(path)).unwrap()).unwrap();
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../../../docs/report.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&report)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let stages = report["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 5);
    assert!(stages.iter().all(|s| s["state"] == "passed"), "{stages:#?}");
    assert_eq!(report["run"]["state"], "completed");
    assert!(
        stdout.contains("mismatched 0, undecryptable 0, missing 0"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_breach_with_auto_rollback_rolls_the_run_back_by_itself() {
    let db = TestDb::new().await;
    let hook = crate::receiver::Receiver::start(0).await;
    let mut env = Env::new(
        &db,
        std::env::temp_dir().join(format!("{}-reports", db.name)),
    );
    env.vars.push(("REKEY_WEBHOOK_URL", hook.url("/hook")));
    // 1% of the values cannot decrypt: the first gate (0.1%) is breached.
    let (ok, out, err) = env.run(
        "rekey-loadtest",
        &["seed", "--rows", "4000", "--corrupt-fraction", "0.01"],
    );
    assert!(ok, "{out}{err}");
    let (_, before, _) = env.run("rekey", &["keys", "list", "--json"]);
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();
    let previous = before
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "field" && k["state"] == "active")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut w = env.worker("p1");
    let (ok, out, err) = env.run(
        "rekey",
        &[
            "rotate",
            "--no-slow-start",
            "--stages",
            "50,100",
            "--key-propagation",
            "0",
            "--observe",
            "0",
            "--auto-advance",
            "--auto-rollback",
            "--skip-preflight",
            "--json",
        ],
    );
    assert!(ok, "the rollback run completed: {out}\n{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["run"]["kind"], "rollback");
    assert_eq!(status["run"]["state"], "completed");
    assert_eq!(status["run"]["target_key_id"], previous.as_str());
    let (_, parent, _) = env.run(
        "rekey",
        &[
            "status",
            &status["run"]["parent_run_id"].to_string(),
            "--json",
        ],
    );
    let parent: serde_json::Value = serde_json::from_str(&parent).unwrap();
    assert_eq!(parent["run"]["state"], "rolled_back");
    assert!(parent["stages"][0]["state"] == "breached");
    let (ok, out, err) = env.run(
        "rekey-loadtest",
        &["verify", "--expect-key", &previous, "--json"],
    );
    assert!(ok, "every value back under the previous key: {out}\n{err}");
    // The webhook heard it all, in order: the breach with its reason, the halt, the
    // rollback run starting and passing, the original run rolled back.
    let events: Vec<(String, i64)> = hook
        .accepted_json()
        .iter()
        .map(|e| {
            (
                e["rekey"]["event"].as_str().unwrap().to_owned(),
                e["rekey"]["run_id"].as_i64().unwrap(),
            )
        })
        .collect();
    let parent_id = parent["run"]["id"].as_i64().unwrap();
    let rollback_id = status["run"]["id"].as_i64().unwrap();
    assert_eq!(
        events,
        [
            ("started".to_owned(), parent_id),
            ("gate_breached".to_owned(), parent_id),
            ("halted".to_owned(), parent_id),
            ("started".to_owned(), rollback_id),
            ("stage_passed".to_owned(), rollback_id),
            ("rolled_back".to_owned(), parent_id),
        ]
    );
    let breach = &hook.accepted_json()[1];
    assert!(
        breach["rekey"]["reason"]
            .as_str()
            .unwrap()
            .contains("decrypt"),
        "{breach}"
    );
    sigterm(&w);
    assert!(wait_exit(&mut w, Duration::from_secs(30)).success());
    let (_conn, ch) = test_channel().await;
    broker::delete(&ch, &Topology::new(&db.name)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_measures_three_phases_on_the_same_data_and_leaves_every_value_verified() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("{}-bench", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let env = Env::new(&db, dir.join("reports"));
    let (json, png) = (dir.join("bench.json"), dir.join("bench.png"));
    let (ok, out, err) = env.run(
        "rekey-loadtest",
        &[
            "bench",
            "--rows",
            "3000",
            "--workers",
            "1",
            "--traffic-rate",
            "20",
            "--baseline",
            "2s",
            "--out",
            json.to_str().unwrap(),
            "--chart",
            png.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}{err}");
    for line in [
        "(a) ceiling",
        "(b) bare",
        "(c) full",
        "(c)/(a)",
        "peak RSS",
        "verify: ok",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let values = r["values"].as_i64().unwrap();
    assert!(values > 3000, "two columns per record, some NULL: {values}");
    for phase in ["ceiling", "bare", "full"] {
        assert_eq!(r[phase]["rows"], 3000, "{phase}: {r}");
        assert!(r[phase]["rows_per_sec"].as_f64().unwrap() > 0.0, "{phase}");
        assert!(
            r["throughput"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p[1] == phase),
            "{phase} has no timeline"
        );
    }
    // (b) re-encrypted every value; (c) every value too, and again those the application
    // wrote under the old key meanwhile (the coverage sweep's stragglers), except those the
    // application rewrote under the new key before the rotation reached them (skipped as
    // already on target).
    assert_eq!(r["bare"]["values"], values);
    let app_writes = r["latency"]["writes_during"]["count"].as_i64().unwrap();
    assert!(
        r["full"]["values"].as_i64().unwrap() >= values - app_writes,
        "{r}"
    );
    assert!(r["full_vs_bare"].as_f64().unwrap() > 0.0);
    assert!(r["full_vs_ceiling"].as_f64().unwrap() > 0.0);
    assert_eq!(r["rows_per_batch"].as_array().unwrap().len(), 3);
    // Every value decrypts to its original plaintext, under the run's target key.
    let v = &r["verify"];
    // The application's writes may have filled NULL e-mails: more values, never fewer.
    assert!(v["ok"].as_i64().unwrap() >= values, "{v}");
    for bad in [
        "mismatched",
        "undecryptable",
        "missing",
        "not_on_expected_key",
    ] {
        assert_eq!(v[bad], 0, "{bad}: {v}");
    }
    // Traffic ran before and during (c), and every process's memory was read.
    let l = &r["latency"];
    assert!(l["before"]["count"].as_u64().unwrap() > 0, "{l}");
    assert!(l["during"]["count"].as_u64().unwrap() > 0, "{l}");
    assert_eq!(l["before_errors"], 0);
    assert_eq!(l["during_errors"], 0);
    assert!(r["coordinator"]["peak_rss_mib"].as_f64().unwrap() > 1.0);
    let workers = r["workers_memory"].as_array().unwrap();
    assert_eq!(workers.len(), 1);
    assert!(workers[0]["peak_rss_mib"].as_f64().unwrap() > 1.0);
    // What the figures depend on besides rekey: the server's settings as it reports them,
    // the database's size before and after, printed too.
    let c = &r["conditions"];
    let pg: std::collections::HashMap<String, String> =
        serde_json::from_value::<Vec<(String, String)>>(c["postgres"].clone())
            .unwrap()
            .into_iter()
            .collect();
    let version = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(pg.get("server_version"), Some(&version), "{c}");
    assert!(pg.contains_key("shared_buffers"), "{c}");
    assert!(c["database_mib"].as_f64().unwrap() > 1.0, "{c}");
    assert!(
        c["database_mib_after"].as_f64().unwrap() >= c["database_mib"].as_f64().unwrap() * 0.5,
        "{c}"
    );
    assert!(
        out.contains(&format!(
            "PostgreSQL: server_version {version}, shared_buffers "
        )),
        "{out}"
    );
    // The chart is a PNG.
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // `chart` draws it again from the JSON alone.
    let again = dir.join("again.png");
    let (ok, out, err) = env.run(
        "rekey-loadtest",
        &[
            "chart",
            json.to_str().unwrap(),
            "--out",
            again.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}{err}");
    assert_eq!(&std::fs::read(&again).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    // The bench's queues are gone: a passive declare of them fails.
    let (_conn, ch) = test_channel().await;
    let topo = Topology::new(r["queue_prefix"].as_str().unwrap());
    assert!(broker::queue_depth(&ch, &topo.batches).await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The processes whose parent is `pid` (from /proc), with their names.
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces and parentheses.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut rest = tail.split_whitespace();
        let (_state, ppid) = (rest.next(), rest.next());
        if ppid.and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            let child: u32 = head.split_whitespace().next().unwrap().parse().unwrap();
            let comm = head.split_once('(').map_or("", |(_, c)| c).to_owned();
            found.push((child, comm));
        }
    }
    found
}

/// Whether `pid` is gone (or a zombie nobody reaped: dead all the same).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, t)| t.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// A bench stopped by SIGTERM to it alone (a supervisor's stop, a cancelled job, `timeout`)
/// stops the workers, the `rekey rotate` and the Prometheus it started, instead of
/// leaving them running; it says so and exits non-zero.
#[tokio::test(flavor = "multi_thread")]
async fn a_bench_stopped_by_a_signal_stops_every_process_it_started() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("{}-bench", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let env = Env::new(&db, dir.join("reports"));
    let log = dir.join("bench.log");
    // Slow start paces (c)'s first batches 1.5 s apart: (c) lasts long enough to be stopped.
    let mut bench = env
        .cmd(
            "rekey-loadtest",
            &[
                "bench",
                "--rows",
                "3000",
                "--workers",
                "2",
                "--only-full",
                "--slo",
                "--batch-size",
                "100",
                "--traffic-rate",
                "20",
                "--baseline",
                "2s",
                "--out",
                dir.join("bench.json").to_str().unwrap(),
                "--chart",
                dir.join("bench.png").to_str().unwrap(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn_guarded();
    let start = Instant::now();
    let children = loop {
        let c = children_of(bench.id());
        let workers = c.iter().filter(|(_, n)| n == "rekey-worker").count();
        if workers == 2
            && c.iter().any(|(_, n)| n == "rekey")
            && c.iter().any(|(_, n)| n == "prometheus")
        {
            break c;
        }
        assert!(
            bench.try_wait().unwrap().is_none(),
            "the bench ended first:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "(c) not under way: {c:?}\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    sigterm(&bench);
    let code = wait_exit(&mut bench, Duration::from_secs(30));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code.code(), Some(130), "{text}");
    assert!(
        text.contains("stopped by a signal: the processes it started are stopped with it"),
        "{text}"
    );
    let start = Instant::now();
    while !children.iter().all(|(pid, _)| gone(*pid)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "left running: {:?}",
            children
                .iter()
                .filter(|(pid, _)| !gone(*pid))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its queues stay with the run (the bench deletes them when it ends by itself).
    let (_conn, ch) = test_channel().await;
    let prefix = format!("{}-bench-{}", db.name, bench.id());
    broker::delete(&ch, &Topology::new(&prefix)).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bench_refuses_before_touching_anything_when_its_binaries_are_missing_and_chart_names_a_bad_report()
 {
    let db = TestDb::new().await;
    let empty = std::env::temp_dir().join(format!("{}-nobin", db.name));
    let env = Env::new(&db, empty.join("reports"));
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, out, err) = env.run(
        "rekey-loadtest",
        &[
            "bench",
            "--rows",
            "100",
            "--bin-dir",
            empty.to_str().unwrap(),
        ],
    );
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains(&empty.join("rekey").display().to_string()) && err.contains("not found"),
        "{err}"
    );
    // Nothing was seeded or migrated.
    let c = db.pool.get().await.unwrap();
    let keys: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'rekey' AND tablename = 'runs'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let runs: i64 = if keys == 0 {
        0
    } else {
        c.query_one("SELECT count(*) FROM rekey.runs", &[])
            .await
            .unwrap()
            .get(0)
    };
    assert_eq!(runs, 0);
    let users: i64 = c
        .query_one("SELECT count(*) FROM demo.users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 0);
    // A file that is not a bench report is named.
    let bad = empty.join("not-a-report.json");
    std::fs::write(&bad, b"{\"rows\": \"many\"}").unwrap();
    let (ok, out, err) = env.run(
        "rekey-loadtest",
        &[
            "chart",
            bad.to_str().unwrap(),
            "--out",
            empty.join("x.png").to_str().unwrap(),
        ],
    );
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("not-a-report.json is not a bench report"),
        "{err}"
    );
    assert!(!empty.join("x.png").exists());
    let _ = std::fs::remove_dir_all(&empty);
}

/// A database with a key store and `rows` seeded records, the settings of the binaries
/// for it, and where its reports go.
pub(crate) async fn seeded(rows: u32) -> (TestDb, Env, std::path::PathBuf) {
    let db = TestDb::new().await;
    let reports = std::env::temp_dir().join(format!("{}-reports", db.name));
    let env = Env::new(&db, reports.clone());
    let (ok, out, err) = env.run("rekey", &["keys", "init"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = env.run("rekey-loadtest", &["seed", "--rows", &rows.to_string()]);
    assert!(ok, "{out}{err}");
    (db, env, reports)
}

/// `rekey resume` without a RUN takes the newest run that is not over, says so, and refuses
/// when there is none; log lines written to a pipe carry no colour codes.
#[tokio::test]
async fn resume_without_a_run_takes_the_newest_unfinished_one_and_logs_have_no_colour_codes() {
    let db = TestDb::new().await;
    let mut env = Env::new(
        &db,
        std::env::temp_dir().join(format!("{}-reports", db.name)),
    );
    env.vars.push(("RUST_LOG", "info".into()));
    let (ok, out, err) = env.run("rekey", &["keys", "init"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = env.run("rekey", &["resume"]);
    assert!(!ok, "{out}{err}");
    assert!(err.contains("no run to resume"), "{err}");

    let (ok, out, err) = env.run("rekey-loadtest", &["seed", "--rows", "200"]);
    assert!(ok, "{out}{err}");
    let mut logs = String::new();
    for _ in 0..2 {
        let (ok, out, err) = env.run(
            "rekey",
            &[
                "rotate",
                "--no-slow-start",
                "--skip-preflight",
                "--detach",
                "--key-propagation",
                "0s",
                "--observe",
                "0",
            ],
        );
        assert!(ok, "{out}{err}");
        logs.push_str(&err);
    }
    // Run 2 is the newest; pause it, then resume it without naming it.
    let (ok, out, err) = env.run("rekey", &["pause", "2"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = env.run("rekey", &["resume", "--detach"]);
    assert!(ok, "{out}{err}");
    assert!(err.contains("run 2 resumed"), "{err}");
    let state = {
        let c = db.pool.get().await.unwrap();
        let s: String = c
            .query_one("SELECT state FROM rekey.runs WHERE id = 2", &[])
            .await
            .unwrap()
            .get(0);
        s
    };
    assert_eq!(state, "running");
    logs.push_str(&err);
    assert!(logs.contains(" INFO "), "no log line to look at: {logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in piped logs: {logs:?}"
    );
}

/// Ctrl-C while `rekey rotate` drives a run: it stops driving, names only reports that
/// exist, and says how to carry on.
#[tokio::test]
async fn ctrl_c_while_driving_prints_the_resume_hint_and_no_missing_report() {
    let (db, env, reports) = seeded(300).await;
    // No worker: the run waits for one, driven, until the operator presses Ctrl-C.
    let mut rotate = env
        .cmd(
            "rekey",
            &[
                "rotate",
                "--no-slow-start",
                "--skip-preflight",
                "--key-propagation",
                "0s",
                "--observe",
                "0",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let start = Instant::now();
    loop {
        let c = db.pool.get().await.unwrap();
        let published: i64 = c
            .query_one(
                "SELECT count(*) FROM rekey.batches WHERE state = 'published'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if published > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the run never published"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = Command::new("kill")
        .args(["-INT", &rotate.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = wait_exit(&mut rotate, Duration::from_secs(30));
    let mut err = String::new();
    std::io::Read::read_to_string(rotate.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("`rekey resume 1` carries on"),
        "{code:?}: {err}"
    );
    for line in err.lines().filter_map(|l| l.strip_prefix("report: ")) {
        assert!(
            std::path::Path::new(line).exists(),
            "names a report that does not exist: {line}"
        );
    }
    let _ = std::fs::remove_dir_all(&reports);
}

/// `rekey rotate --dry-run` with the default flags finishes (no observation period to wait
/// out), says "would rotate", and writes nothing to the target tables.
#[tokio::test]
async fn a_dry_run_with_default_flags_finishes_and_writes_nothing() {
    let (db, env, reports) = seeded(300).await;
    let digest = || async {
        let c = db.pool.get().await.unwrap();
        let d: String = c
            .query_one(
                "SELECT md5(string_agg(md5(u::text), '' ORDER BY u.id)) FROM demo.users u",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        d
    };
    let before = digest().await;
    let mut worker = env.worker("dry");
    let mut rotate = env
        .cmd(
            "rekey",
            &[
                "rotate",
                "--dry-run",
                "--skip-preflight",
                "--key-propagation",
                "0s",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let code = wait_exit(&mut rotate, Duration::from_secs(90));
    let mut text = String::new();
    std::io::Read::read_to_string(rotate.stdout.as_mut().unwrap(), &mut text).unwrap();
    std::io::Read::read_to_string(rotate.stderr.as_mut().unwrap(), &mut text).unwrap();
    sigterm(&worker);
    wait_exit(&mut worker, Duration::from_secs(30));
    assert!(code.success(), "{code:?}: {text}");
    assert!(text.contains("would rotate"), "{text}");
    assert_eq!(digest().await, before, "a dry run changed demo.users");
    // The evidence report says "would rotate" too, and never "rotated".
    let report = std::fs::read_dir(&reports)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a report was written");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let counts = &r["totals"]["counts"];
    assert!(counts["would_rotate"].is_i64(), "{counts}");
    assert!(counts.get("rotated").is_none(), "{counts}");
    let _ = std::fs::remove_dir_all(&reports);
}

/// Waits (at most 120 s: CI builds images beside it) until each worker has said it is
/// present: it has loaded its key ring and started consuming. A worker that exits first
/// fails the test with its exit status and log.
pub(crate) async fn workers_present(db: &TestDb, workers: &mut [(&str, &mut Proc)]) {
    let ids: Vec<String> = workers.iter().map(|(id, _)| (*id).to_owned()).collect();
    let start = std::time::Instant::now();
    loop {
        let n = db
            .scalar(
                "SELECT count(*) FROM rekey.workers WHERE worker_id = ANY($1)",
                &[&ids],
            )
            .await;
        if n == ids.len() as i64 {
            return;
        }
        for (id, w) in workers.iter_mut() {
            if let Some(status) = w.try_wait().unwrap() {
                let mut log = String::new();
                if let Some(err) = w.stderr.as_mut() {
                    let _ = std::io::Read::read_to_string(err, &mut log);
                }
                panic!("worker {id} exited ({status}) before it was present:\n{log}");
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "workers {ids:?} not all present after 120 s ({n} were), both still running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
