//! docker-compose.yml run for real, the way an operator runs it: images built here without a
//! registry (`scripts/images.sh`: a debootstrapped Debian, stand-ins for the PostgreSQL,
//! RabbitMQ and Prometheus images from Debian's packages, rekey's image from this build's
//! binaries), `up` with three workers, a staged rotation by `run --rm coordinator rotate`
//! while the test scales workers down and up, kills one, restarts the broker, cuts a worker
//! off the network for longer than the lease and pauses PostgreSQL; then every value is
//! verified, the audit log too, and Prometheus is asked what it scraped. The cluster test
//! does the same on three RabbitMQ nodes (docker-compose.cluster.yml) and stops the node
//! leading the batch queue, then partitions a second one away.
//!
//! Skipped, saying why, where no Docker engine answers. Each test is its own compose
//! project (a random name, its own network, volumes and secrets) and takes it down with
//! `down -v` whatever happens.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::binaries::bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Why the compose tests cannot run here, if they cannot.
fn no_engine() -> Option<String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Err(e) => Some(format!("no docker command ({e})")),
        Ok(o) if !o.status.success() => Some(format!(
            "no Docker engine answers: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// `docker compose` (v2) where it exists, else `docker-compose` (v1).
fn compose_tool() -> Vec<String> {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if v2 {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().unwrap()
}

fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(
        o.status.success(),
        "docker {}: {}",
        args.join(" "),
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Builds (or finds cached) the local images, one builder at a time; the variables that
/// select them.
fn local_images() -> Vec<(String, String)> {
    let bin_dir = bin("rekey").parent().unwrap().to_path_buf();
    let start = Instant::now();
    let o = Command::new("flock")
        .arg("/tmp/rekey-images.lock")
        .arg("bash")
        .arg(repo().join("scripts/images.sh"))
        .env("BIN_DIR", &bin_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "scripts/images.sh failed: {}", text(&o));
    eprintln!(
        "[compose] images ready in {:.0} s:\n{}",
        start.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .filter(|l| l.starts_with("[images]"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let o = Command::new("bash")
        .arg(repo().join("scripts/images.sh"))
        .arg("--env")
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// One compose project of the test's own, taken down (`down -v`) when dropped.
pub(crate) struct Project {
    pub(crate) name: String,
    tool: Vec<String>,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    pub(crate) prometheus_port: u16,
}

impl Project {
    /// A project on the shipped compose file, plus `extra` compose files (the cluster's),
    /// plus an override the test writes (`override_yaml`), with secrets of its own.
    pub(crate) fn new(extra: &[&str], override_yaml: &str) -> Self {
        let name = format!("rekeyt{}", rand::random::<u32>());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let secrets = dir.join("secrets");
        let o = Command::new("bash")
            .arg(repo().join("scripts/compose-secrets.sh"))
            .env("SECRETS_DIR", &secrets)
            .output()
            .unwrap();
        assert!(o.status.success(), "compose-secrets.sh: {}", text(&o));
        std::fs::write(dir.join("override.yml"), override_yaml).unwrap();
        let mut files = vec![repo().join("docker-compose.yml")];
        files.extend(extra.iter().map(|f| repo().join(f)));
        files.push(dir.join("override.yml"));
        let prometheus_port = crate::observability::free_port();
        let mut env = local_images();
        env.extend([
            ("REKEY_SECRETS_DIR".into(), secrets.display().to_string()),
            ("PROMETHEUS_PORT".into(), prometheus_port.to_string()),
            (
                "RABBITMQ_MANAGEMENT_PORT".into(),
                crate::observability::free_port().to_string(),
            ),
            (
                "GRAFANA_PORT".into(),
                crate::observability::free_port().to_string(),
            ),
            // The stand-in PostgreSQL archives nothing: no backup to check.
            ("REKEY_BACKUP_CHECK".into(), "none".into()),
            ("RUST_LOG".into(), "info".into()),
        ]);
        Self {
            name,
            tool: compose_tool(),
            files,
            env,
            dir,
            prometheus_port,
        }
    }

    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.tool[0]);
        c.args(&self.tool[1..]).arg("-p").arg(&self.name);
        for f in &self.files {
            c.arg("-f").arg(f);
        }
        c.args(args)
            .current_dir(repo())
            .env_remove("REKEY_CONFIG")
            .env_remove("REKEY_DATABASE_URL")
            .env_remove("REKEY_AMQP_URL")
            .env_remove("REKEY_QUEUE_PREFIX");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Runs a compose command that must succeed; its standard output.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "{} {}: {}",
            self.tool.join(" "),
            args.join(" "),
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// The containers of a service, running or not.
    pub(crate) fn containers(&self, service: &str) -> Vec<String> {
        self.ok(&["ps", "-q", service])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub(crate) fn network(&self) -> String {
        format!("{}_default", self.name)
    }

    /// A query in the project's database, as its superuser; the rows, `|`-separated.
    pub(crate) fn sql(&self, query: &str) -> String {
        self.ok(&psql(query))
    }

    /// `(done, all)` batches of run 1.
    pub(crate) fn batches(&self) -> (i64, i64) {
        let out = self.sql(
            "SELECT count(*) FILTER (WHERE state = 'done'), count(*) FROM rekey.batches WHERE run_id = 1",
        );
        let (d, a) = out.split_once('|').unwrap_or(("0", "0"));
        (d.parse().unwrap_or(0), a.parse().unwrap_or(0))
    }

    /// Waits until every container of `services` reports healthy (`up --wait` of compose v2,
    /// done by hand for v1).
    pub(crate) fn wait_healthy(&self, services: &[&str], within: Duration) {
        let start = Instant::now();
        loop {
            let mut waiting = Vec::new();
            for s in services {
                let ids = self.containers(s);
                if ids.is_empty() {
                    waiting.push(format!("{s}: no container"));
                }
                for id in ids {
                    let h = docker(&["inspect", "-f", "{{.State.Health.Status}}", &id]);
                    let h = String::from_utf8_lossy(&h.stdout).trim().to_owned();
                    if h != "healthy" {
                        waiting.push(format!("{s} {}: {h}", &id[..12]));
                    }
                }
            }
            if waiting.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < within,
                "not healthy within {within:?}: {waiting:?}\n{}",
                text(&self.run(&["logs", "--tail", "30"]))
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// A `run --rm coordinator …` in the background, its standard output and error into
    /// files beside the project (read back by [`Rotation::log`]).
    pub(crate) fn spawn_coordinator(&self, args: &[&str]) -> Rotation {
        let stem = self
            .dir
            .join(format!("coordinator-{}", rand::random::<u16>()));
        let out = std::fs::File::create(stem.with_extension("out")).unwrap();
        let err = std::fs::File::create(stem.with_extension("err")).unwrap();
        let child = self
            .cmd(&one_off(None, args))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        Rotation { child, files: stem }
    }

    /// A `run --rm coordinator …` that must succeed; its standard output.
    pub(crate) fn coordinator(&self, args: &[&str]) -> String {
        self.ok(&one_off(None, args))
    }

    /// `rekey-loadtest …` in the coordinator's container.
    pub(crate) fn loadtest(&self, args: &[&str]) -> String {
        self.ok(&one_off(Some("rekey-loadtest"), args))
    }

    /// An instant query to the project's Prometheus: the result vector.
    pub(crate) async fn prometheus(&self, q: &str) -> Vec<serde_json::Value> {
        rekey_common::telemetry::install_crypto_provider();
        let url = reqwest::Url::parse_with_params(
            &format!("http://127.0.0.1:{}/api/v1/query", self.prometheus_port),
            &[("query", q)],
        )
        .unwrap();
        let body: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        assert_eq!(body["status"], "success", "{q}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.run(&["logs", "--tail", "40", "--no-color"]);
            eprintln!("[compose] {} logs:\n{}", self.name, text(&logs));
        }
        let _ = self.run(&["down", "-v", "--remove-orphans", "--timeout", "10"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The compose arguments that run `query` in the project's database as its superuser.
fn psql(query: &str) -> [&str; 11] {
    [
        "exec", "-T", "postgres", "psql", "-U", "rekey", "-d", "rekey", "-At", "-c", query,
    ]
}

/// `run --rm -T --no-deps [--entrypoint E] coordinator ARGS…`: a one-off container of the
/// coordinator's image on the project's network, without starting what it depends on.
fn one_off<'a>(entrypoint: Option<&'a str>, args: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["run", "--rm", "-T", "--no-deps"];
    if let Some(e) = entrypoint {
        a.extend(["--entrypoint", e]);
    }
    a.push("coordinator");
    a.extend(args);
    a
}

/// A `rekey rotate` started by [`Project::spawn_coordinator`]: the compose client's process
/// and where its output goes.
pub(crate) struct Rotation {
    child: Child,
    /// The output files' stem: `.out` and `.err` beside it.
    files: PathBuf,
}

impl Rotation {
    /// The coordinator's standard output (`"out"`) or error (`"err"`), its last `lines`.
    fn log(&self, ext: &str, lines: usize) -> String {
        let all = std::fs::read_to_string(self.files.with_extension(ext)).unwrap_or_default();
        let all: Vec<&str> = all.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits for the run to have `n` batches done (or the rotation to end first: then it
    /// says which fault it was waiting to inject, the run's state and halt reason, and the
    /// coordinator's last words).
    fn await_done(&mut self, p: &Project, n: i64, before: &str) {
        let start = Instant::now();
        loop {
            let (done, all) = p.batches();
            if done >= n && all > 0 {
                return;
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                // The run's own record says whether it halted (and why) or the process
                // went away while the run was still running; asked without `p.sql`, which
                // would panic first (and lose the log) were PostgreSQL the problem.
                let run = text(&p.run(&psql(
                    "SELECT state::text || ': ' || coalesce(halt_reason, '-') FROM rekey.runs WHERE id = 1",
                )));
                panic!(
                    "the rotation ended ({s}) before {before}: {done}/{all} batches done; \
                     the run is {}; the coordinator's log ends:\n{}",
                    run.trim(),
                    self.log("err", 60)
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "{done}/{all} batches done after 180 s, waiting for {n} before {before}; \
                 the coordinator's log ends:\n{}",
                self.log("err", 60)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// After a fault ended: how long until the next batch was done (progress resumed).
    fn resumed(&mut self, p: &Project) -> f64 {
        let t = Instant::now();
        let (done, all) = p.batches();
        if done == all {
            return 0.0;
        }
        self.await_done(p, done + 1, "the next batch after a fault");
        t.elapsed().as_secs_f64()
    }

    /// Waits for `rekey rotate` to exit 0 within `within`; its standard output.
    fn finish(&mut self, within: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                let out = self.log("out", usize::MAX);
                assert!(
                    s.success(),
                    "the rotation failed ({s}):\n{out}\n{}",
                    self.log("err", 200)
                );
                return out;
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                panic!(
                    "the rotation did not end within {within:?}:\n{}",
                    self.log("err", 200)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The worker containers' addresses on the project's network as they come and go: when
/// each was first and last seen, for the check that Prometheus scraped every one.
#[derive(Default)]
struct SeenWorkers(std::collections::BTreeMap<String, (Instant, Instant)>);

impl SeenWorkers {
    fn note(&mut self, p: &Project) {
        let now = Instant::now();
        for id in p.containers("worker") {
            let o = docker(&[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                &id,
            ]);
            for ip in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let e = self.0.entry(ip.to_owned()).or_insert((now, now));
                e.1 = now;
            }
        }
    }

    /// The addresses that lived at least `long` (Prometheus finds workers by DNS every
    /// 15 s and scrapes every 15 s: one that lived that long must have been scraped).
    fn lived(&self, long: Duration) -> Vec<String> {
        self.0
            .iter()
            .filter(|(_, (first, last))| last.duration_since(*first) >= long)
            .map(|(ip, _)| ip.clone())
            .collect()
    }
}

/// The exit codes of the containers that died since `since` (docker's event log).
fn exit_codes_since(since: i64, ids: &[String]) -> Vec<String> {
    let now = unix_now() + 1;
    let mut args = vec![
        "events".to_owned(),
        "--since".into(),
        since.to_string(),
        "--until".into(),
        now.to_string(),
        "--filter".into(),
        "event=die".into(),
        "--format".into(),
        "{{.Actor.Attributes.exitCode}}".into(),
    ];
    for id in ids {
        args.extend(["--filter".into(), format!("container={id}")]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    docker_ok(&refs).lines().map(str::to_owned).collect()
}

/// Enough rows that the run outlasts every fault the tests inject: with 8,000 (320 batches of
/// 25 over the three stages) a loaded CI machine, slow to inject the faults, saw both
/// rotations complete before their last fault.
const ROWS: &str = "12000";

/// Each batch's transaction stays open 1 s after its writes, so that a worker killed,
/// cut off or drained is always in the middle of one.
const SLOW_BATCHES: &str = r#"
services:
  worker:
    environment:
      FAILPOINTS: "worker.after_write=sleep(1000)"
"#;

fn rotate_args() -> Vec<&'static str> {
    vec![
        "rotate",
        "--no-slow-start",
        "--throttle-pct",
        "0",
        // The faults here (a paused PostgreSQL, a restarted broker) and the other suites
        // sharing this machine move the probe's median; a breach would halt the run, which
        // is not what this test is about (docs/throttle.md, "The breach").
        "--breach-pct",
        "1000",
        "--stages",
        "1,50,100",
        "--observe",
        "0",
        "--auto-advance",
        "--key-propagation",
        "0",
        "--batch-size",
        "25",
        "--batch-bytes",
        "0",
        "--lease-secs",
        "10",
        "--metrics-addr",
        "0.0.0.0:9465",
        "--json",
    ]
}

/// Seeds the demo tables and makes the first key.
fn prepare(p: &Project) {
    p.coordinator(&["migrate", "--demo"]);
    p.coordinator(&["keys", "init"]);
    p.loadtest(&["seed", "--rows", ROWS]);
}

/// After the run: it completed, every value is readable under the new key, the audit log
/// verifies, no batch is left anything but done, no message is left in a queue.
fn verify_end(p: &Project, mut rotate: Rotation) {
    let out = rotate.finish(Duration::from_secs(600));
    let status: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{e}: {out}\n{}", rotate.log("err", 200)));
    assert_eq!(status["run"]["state"], "completed", "{out}");
    let target = status["run"]["target_key_id"].as_str().unwrap().to_owned();
    let v: serde_json::Value =
        serde_json::from_str(&p.loadtest(&["verify", "--expect-key", &target, "--json"])).unwrap();
    assert_eq!(v["mismatched"], 0, "{v}");
    assert!(
        v["ok"].as_i64().unwrap() >= ROWS.parse::<i64>().unwrap(),
        "{v}"
    );
    let a: serde_json::Value =
        serde_json::from_str(&p.coordinator(&["audit", "verify", "--json"])).unwrap();
    assert_eq!(a["problems"], serde_json::json!([]), "{a}");
    let left = p.sql("SELECT count(*) FROM rekey.batches WHERE run_id = 1 AND state <> 'done'");
    assert_eq!(left, "0", "batches not done");
    // Each batch committed once: a batch run twice into a second result would have
    // written its audit entries (one per key, operation and outcome) twice.
    let twice = p.sql(
        "SELECT count(*) FROM (SELECT 1 FROM rekey.audit_log WHERE run_id = 1 AND batch_no IS NOT NULL
           GROUP BY batch_no, key_id, operation, success HAVING count(*) > 1) x",
    );
    assert_eq!(twice, "0", "a batch's audit entries written twice");
    eprintln!("[compose] verified: {v}");
}

/// The messages left in the project's queues, per queue, from the broker itself.
fn queue_messages(p: &Project, service: &str) -> Vec<(String, i64)> {
    p.ok(&[
        "exec",
        "-T",
        service,
        "rabbitmqctl",
        "-q",
        "list_queues",
        "name",
        "messages",
    ])
    .lines()
    .filter_map(|l| {
        let mut it = l.split_whitespace();
        Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_up_scaled_workers_rotate_through_kills_restarts_partitions_and_pauses() {
    if let Some(why) = no_engine() {
        eprintln!("[compose] skipped: {why}");
        return;
    }
    let test_start = Instant::now();
    let p = Project::new(&[], SLOW_BATCHES);
    let services = ["postgres", "rabbitmq", "migrate", "worker", "prometheus"];
    let mut up = vec!["up", "-d", "--scale", "worker=3"];
    up.extend(services);
    p.ok(&up);
    let mut seen = SeenWorkers::default();
    seen.note(&p);
    p.wait_healthy(
        &["postgres", "rabbitmq", "worker"],
        Duration::from_secs(240),
    );
    let up_secs = test_start.elapsed().as_secs_f64();
    assert_eq!(p.containers("worker").len(), 3);
    prepare(&p);

    let mut rotate = p.spawn_coordinator(&rotate_args());
    let mut faults = Vec::new();
    let mut mark = |what: &str, t: Instant, rotate: &mut Rotation| {
        let took = t.elapsed().as_secs_f64();
        let again = rotate.resumed(&p);
        faults.push(format!(
            "{what}: {took:.1} s, next batch done {again:.1} s after"
        ));
        eprintln!("[compose] {what}: {took:.1} s; next batch done {again:.1} s after");
    };

    // 1. Scale 3 → 1: compose stops two workers with SIGTERM; each finishes and acks what
    //    it holds and exits 0 well inside the 2-minute grace period.
    rotate.await_done(&p, 3, "scaling down");
    seen.note(&p);
    let before = p.containers("worker");
    let since = unix_now() - 1;
    let t = Instant::now();
    p.ok(&["up", "-d", "--no-deps", "--scale", "worker=1", "worker"]);
    let drained = t.elapsed();
    let gone: Vec<String> = before
        .iter()
        .filter(|id| !p.containers("worker").contains(id))
        .cloned()
        .collect();
    assert_eq!(gone.len(), 2, "{before:?}");
    let codes = exit_codes_since(since, &gone);
    assert_eq!(codes, ["0", "0"], "drained workers' exit codes");
    assert!(drained < Duration::from_secs(100), "{drained:?}");
    mark(
        "scaled 3 → 1 (two workers drained on SIGTERM, exit 0)",
        t,
        &mut rotate,
    );
    let t = Instant::now();
    p.ok(&["up", "-d", "--no-deps", "--scale", "worker=3", "worker"]);
    seen.note(&p);
    mark("scaled 1 → 3", t, &mut rotate);

    // 2. SIGKILL a worker in the middle of a batch (its transaction is open).
    let (done, _) = p.batches();
    rotate.await_done(&p, done + 2, "killing a worker");
    seen.note(&p);
    let victim = p.containers("worker")[0].clone();
    let t = Instant::now();
    docker_ok(&["kill", &victim]);
    mark("docker kill of a worker mid-batch", t, &mut rotate);
    p.ok(&["up", "-d", "--no-deps", "--scale", "worker=3", "worker"]);
    seen.note(&p);

    // 3. Restart the broker: every connection drops; unacked orders go back to the queue.
    let (done, _) = p.batches();
    rotate.await_done(&p, done + 2, "restarting RabbitMQ");
    let t = Instant::now();
    p.ok(&["restart", "rabbitmq"]);
    mark("RabbitMQ restarted", t, &mut rotate);

    // 4. Cut a worker off the network mid-batch for longer than the batch lease (10 s):
    //    its batch is published again and done by another; when it comes back its own
    //    transaction's result must not make a second, different value.
    let (done, _) = p.batches();
    rotate.await_done(&p, done + 2, "disconnecting a worker");
    seen.note(&p);
    let cut = p.containers("worker")[1].clone();
    let t = Instant::now();
    docker_ok(&["network", "disconnect", &p.network(), &cut]);
    std::thread::sleep(Duration::from_secs(15));
    docker_ok(&[
        "network",
        "connect",
        "--alias",
        "worker",
        &p.network(),
        &cut,
    ]);
    seen.note(&p);
    mark(
        "a worker cut off the network for 15 s (lease 10 s), then reconnected",
        t,
        &mut rotate,
    );

    // 5. Pause PostgreSQL for 10 s.
    let (done, _) = p.batches();
    rotate.await_done(&p, done + 2, "pausing PostgreSQL");
    let t = Instant::now();
    p.ok(&["pause", "postgres"]);
    std::thread::sleep(Duration::from_secs(10));
    p.ok(&["unpause", "postgres"]);
    mark("PostgreSQL paused for 10 s", t, &mut rotate);
    let faults_done = test_start.elapsed().as_secs_f64();

    verify_end(&p, rotate);
    let left: i64 = queue_messages(&p, "rabbitmq").iter().map(|(_, n)| n).sum();
    assert_eq!(left, 0, "messages left in the queues");

    // Prometheus saw every worker up at some point (the three first, the replacements: each
    // address that lived long enough to be found and scraped) and the run's figures.
    seen.note(&p);
    tokio::time::sleep(Duration::from_secs(31)).await;
    seen.note(&p);
    let up = p
        .prometheus("max_over_time(up{job=\"rekey-worker\"}[1h]) == 1")
        .await;
    let scraped: Vec<String> = up
        .iter()
        .filter_map(|r| r["metric"]["instance"].as_str())
        .map(|i| i.rsplit_once(':').map_or(i, |(ip, _)| ip).to_owned())
        .collect();
    let must = seen.lived(Duration::from_secs(45));
    assert!(must.len() >= 3, "workers seen: {:?}", seen.0.keys());
    for ip in &must {
        assert!(
            scraped.contains(ip),
            "worker {ip} was never seen up by Prometheus: {scraped:?}"
        );
    }
    let rows = p
        .prometheus("sum(max_over_time(rows_rotated_total[1h]))")
        .await;
    let rows: f64 = rows[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(rows > 0.0, "{rows}");
    eprintln!(
        "[compose] up in {up_secs:.0} s; faults: {}; faults over at {faults_done:.0} s; \
         {} worker targets seen up ({} workers lived long enough to be scraped, all seen); whole test {:.0} s",
        faults.join("; "),
        up.len(),
        must.len(),
        test_start.elapsed().as_secs_f64()
    );
}

/// The node (`rabbitmq`, `rabbitmq2`, `rabbitmq3`) that leads a quorum queue, asked of a
/// node that is up.
fn queue_leader(p: &Project, ask: &str, queue: &str) -> String {
    let out = p.ok(&[
        "exec",
        "-T",
        ask,
        "rabbitmqctl",
        "-q",
        "list_queues",
        "name",
        "leader",
    ]);
    let node = out
        .lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == queue).then(|| it.next().map(str::to_owned))?
        })
        .unwrap_or_else(|| panic!("no leader for {queue} in:\n{out}"));
    node.strip_prefix("rabbit@").unwrap_or(&node).to_owned()
}

/// The node of each client connection of the cluster (from each connection's Erlang pid,
/// `<rabbit@node.…>`), asked of `ask`.
fn connections_by_node(p: &Project, ask: &str) -> Vec<String> {
    p.ok(&[
        "exec",
        "-T",
        ask,
        "rabbitmqctl",
        "-q",
        "list_connections",
        "pid",
    ])
    .lines()
    .filter_map(|l| {
        let node = l.trim().trim_start_matches('<').split('.').next()?;
        Some(node.strip_prefix("rabbit@")?.to_owned())
    })
    .collect()
}

/// Waits until `ask` sees `n` running nodes in its cluster.
fn await_cluster(p: &Project, ask: &str, n: usize, within: Duration) {
    let start = Instant::now();
    loop {
        let o = p.run(&[
            "exec",
            "-T",
            ask,
            "rabbitmqctl",
            "-q",
            "cluster_status",
            "--formatter",
            "json",
        ]);
        let running = serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
            .unwrap_or(0);
        if running == n {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{ask} sees {running} running nodes, not {n}, after {within:?}: {}",
            text(&o)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_on_a_three_node_rabbitmq_cluster_survives_the_leaders_loss_and_a_partition() {
    if let Some(why) = no_engine() {
        eprintln!("[compose] skipped: {why}");
        return;
    }
    let test_start = Instant::now();
    let p = Project::new(&["docker-compose.cluster.yml"], SLOW_BATCHES);
    let nodes = ["rabbitmq", "rabbitmq2", "rabbitmq3"];
    let mut up = vec!["up", "-d", "--scale", "worker=3", "postgres"];
    up.extend(nodes);
    up.extend(["migrate", "worker"]);
    p.ok(&up);
    let mut healthy = vec!["postgres", "worker"];
    healthy.extend(nodes);
    p.wait_healthy(&healthy, Duration::from_secs(300));
    await_cluster(&p, "rabbitmq", 3, Duration::from_secs(60));
    let up_secs = test_start.elapsed().as_secs_f64();
    prepare(&p);

    let mut rotate = p.spawn_coordinator(&rotate_args());
    rotate.await_done(&p, 3, "stopping the batch queue's leader");
    // The queues are quorum queues with a member on every node.
    let members = p.ok(&[
        "exec",
        "-T",
        "rabbitmq",
        "rabbitmqctl",
        "-q",
        "list_queues",
        "name",
        "type",
        "members",
    ]);
    assert!(
        members.contains("rekey.batches\tquorum")
            && nodes
                .iter()
                .all(|n| members.contains(&format!("rabbit@{n}"))),
        "{members}"
    );

    // 1. Stop the node that leads the batch queue: a new leader is elected among the two
    //    left; clients connected to the lost node fail over to another URL.
    let leader = queue_leader(&p, "rabbitmq", "rekey.batches");
    let clients_on_leader = connections_by_node(&p, "rabbitmq")
        .iter()
        .filter(|c| **c == leader)
        .count();
    let t = Instant::now();
    p.ok(&["stop", "-t", "10", &leader]);
    let stop_secs = t.elapsed().as_secs_f64();
    let ask = nodes.iter().find(|n| **n != leader).unwrap();
    let new_leader = queue_leader(&p, ask, "rekey.batches");
    assert_ne!(new_leader, leader);
    let leader_recovery = rotate.resumed(&p);
    let (done, _) = p.batches();
    rotate.await_done(&p, done + 2, "bringing the stopped node back");
    eprintln!(
        "[compose] stopped {leader} (the batch queue's leader, {clients_on_leader} clients on it) in {stop_secs:.1} s; \
         {new_leader} leads; next batch done {leader_recovery:.1} s after"
    );
    p.ok(&["start", &leader]);
    p.wait_healthy(&[leader.as_str()], Duration::from_secs(120));
    await_cluster(&p, ask, 3, Duration::from_secs(120));

    // 2. Partition a second node away from the others (and from every client) for 20 s:
    //    the one most clients are connected to now, so that they must fail over. With
    //    pause_minority it pauses; then it heals and rejoins.
    let (done, _) = p.batches();
    rotate.await_done(&p, done + 2, "partitioning a node");
    let by_node = connections_by_node(&p, ask);
    let cut = *nodes
        .iter()
        .filter(|n| **n != leader)
        .max_by_key(|n| by_node.iter().filter(|c| c == n).count())
        .unwrap();
    let cut_id = p.containers(cut)[0].clone();
    let t = Instant::now();
    let (before, _) = p.batches();
    docker_ok(&["network", "disconnect", &p.network(), &cut_id]);
    std::thread::sleep(Duration::from_secs(20));
    let (during, _) = p.batches();
    docker_ok(&["network", "connect", "--alias", cut, &p.network(), &cut_id]);
    let partition_secs = t.elapsed().as_secs_f64();
    let resumed_after = rotate.resumed(&p);
    eprintln!(
        "[compose] {cut} (clients on it: {}) partitioned away for 20 s: {} batches done meanwhile; next batch done {resumed_after:.1} s after it healed",
        by_node.iter().filter(|c| *c == cut).count(),
        during - before
    );

    verify_end(&p, rotate);
    await_cluster(&p, "rabbitmq", 3, Duration::from_secs(120));
    let queues = queue_messages(&p, "rabbitmq");
    assert!(queues.iter().all(|(_, n)| *n == 0), "{queues:?}");
    // One `done` per batch and each batch committed once (`verify_end`'s audit check): no
    // batch was run twice into different results.
    // The clients did fail over: some process says it connected to another node.
    let logs = text(&p.run(&["logs", "--no-color", "worker"]));
    let failovers = logs.matches("connected to another RabbitMQ node").count();
    assert!(failovers > 0, "no worker failed over to another node");
    eprintln!(
        "[compose] cluster: up in {up_secs:.0} s; leader {leader} stopped, next batch {leader_recovery:.1} s after; \
         {cut} partitioned {partition_secs:.0} s, next batch {resumed_after:.1} s after; {failovers} worker failovers; \
         whole test {:.0} s",
        test_start.elapsed().as_secs_f64()
    );
}

/// `compose config` of the shipped file with none of the image variables set names the
/// official images (what users with a registry run); with `scripts/images.sh --env`'s
/// variables, the local ones. The compose tool alone answers this: no engine needed.
#[test]
fn with_no_variables_set_the_compose_file_runs_the_official_images() {
    let tool = compose_tool();
    if Command::new(&tool[0]).arg("version").output().is_err() {
        eprintln!("[compose] skipped: no compose tool");
        return;
    }
    let config = |vars: &[(String, String)]| {
        let mut c = Command::new(&tool[0]);
        c.args(&tool[1..])
            .arg("-f")
            .arg(repo().join("docker-compose.yml"))
            .args(["--profile", "tools", "config"])
            .current_dir(repo());
        for v in [
            "REKEY_IMAGE",
            "POSTGRES_IMAGE",
            "RABBITMQ_IMAGE",
            "PROMETHEUS_IMAGE",
            "GRAFANA_IMAGE",
            "REKEY_SECRETS_DIR",
        ] {
            c.env_remove(v);
        }
        for (k, v) in vars {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "config: {}", text(&o));
        let doc: serde_json::Value =
            serde_norway::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
        let services = doc["services"].as_object().unwrap().clone();
        services
            .into_iter()
            .map(|(name, s)| (name, s["image"].as_str().unwrap_or("").to_owned()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let official = config(&[]);
    for (service, image) in [
        ("postgres", "postgres:15"),
        ("rabbitmq", "rabbitmq:3.13-management"),
        ("migrate", "rekey:latest"),
        ("worker", "rekey:latest"),
        ("coordinator", "rekey:latest"),
        ("prometheus", "prom/prometheus:v2.53.0"),
        ("grafana", "grafana/grafana:11.1.0"),
    ] {
        assert_eq!(official[service], image, "{service}: {official:?}");
    }
    let o = Command::new("bash")
        .arg(repo().join("scripts/images.sh"))
        .arg("--env")
        .output()
        .unwrap();
    let vars: Vec<(String, String)> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let local = config(&vars);
    assert_eq!(local["postgres"], "rekey-local/postgres:15");
    assert_eq!(local["rabbitmq"], "rekey-local/rabbitmq:3");
    assert_eq!(local["worker"], "rekey:local");
    assert_eq!(local["prometheus"], "rekey-local/prometheus:2");
    // Grafana has no stand-in (Debian does not package it): the tests leave it out.
    assert_eq!(local["grafana"], "grafana/grafana:11.1.0");
}
