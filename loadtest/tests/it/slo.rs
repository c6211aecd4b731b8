//! The application's own latency signal, through the binaries and a real Prometheus
//! (Debian's package): Prometheus scrapes an application-like exporter that the test
//! controls (its p99 gauge), `rekey-loadtest traffic --metrics-addr` (an application's
//! request histogram) and the coordinator; `rekey rotate` is given the SLO query by
//! environment and flag. When the application's p99 rises over its limit the throttle
//! paces the run and `rekey status` names the signal, its value and its limit; when it
//! falls back the run finishes, every value verified. A query that cannot serve as a
//! signal is refused before anything is planned.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;

use rekey_loadtest::prom::Prometheus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::binaries::{
    Env, Proc, SpawnGuarded, paced_rotate, quick_rotate, seeded, sigterm, wait_exit,
};
use crate::stalls::status_until;

/// The application: serves `app_p99_seconds` (the test sets it) at /metrics.
struct AppExporter {
    port: u16,
    p99_bits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// While false, every scrape gets a 503: the metric goes stale in Prometheus.
    up: Arc<AtomicBool>,
}

impl AppExporter {
    fn start(p99_secs: f64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let p99_bits = Arc::new(AtomicU64::new(p99_secs.to_bits()));
        let stop = Arc::new(AtomicBool::new(false));
        let up = Arc::new(AtomicBool::new(true));
        let (bits, halt, serving) = (p99_bits.clone(), stop.clone(), up.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut req = [0u8; 2048];
                let _ = s.read(&mut req);
                if !serving.load(Ordering::Relaxed) {
                    let _ = write!(
                        s,
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    continue;
                }
                let body = format!(
                    "# TYPE app_p99_seconds gauge\napp_p99_seconds {}\n",
                    f64::from_bits(bits.load(Ordering::Relaxed))
                );
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self {
            port,
            p99_bits,
            stop,
            up,
        }
    }

    fn serve(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    fn set(&self, p99_secs: f64) {
        self.p99_bits.store(p99_secs.to_bits(), Ordering::Relaxed);
    }
}

impl Drop for AppExporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Run 1's settings as the ledger keeps them.
async fn run_settings(db: &rekey_common::testing::TestDb) -> serde_json::Value {
    db.pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT settings FROM rekey.runs WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0)
}

fn free_port() -> u16 {
    rekey_loadtest::prom::free_port().unwrap()
}

async fn done_batches(db: &rekey_common::testing::TestDb) -> i64 {
    db.scalar(
        "SELECT count(*) FROM rekey.batches WHERE run_id = 1 AND state = 'done'",
        &[],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_applications_own_p99_from_prometheus_paces_the_run_and_status_names_it() {
    let (db, env, reports) = seeded(3_000).await;
    let app = AppExporter::start(0.010);
    let (traffic_port, coordinator_port) = (free_port(), free_port());
    let prom = Prometheus::start(
        &db.name,
        &[
            ("app", app.port),
            ("traffic", traffic_port),
            ("rekey", coordinator_port),
        ],
    )
    .await
    .unwrap();

    // Queries that cannot be a signal are refused before anything is planned.
    let refuse = |url: &str, query: &str| {
        let out = env
            .cmd(
                "rekey",
                &quick_rotate(&[
                    "--slo-prometheus-url",
                    url,
                    "--slo-query",
                    query,
                    "--detach",
                ]),
            )
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let two = refuse(&prom.url, "up");
    assert!(two.contains("returned 3 series"), "{two}");
    assert!(two.contains("--slo-query"), "{two}");
    let creds = refuse(
        &prom.url.replace("http://", "http://admin:hunter2@"),
        "max(app_p99_seconds)",
    );
    assert!(creds.contains("must not hold credentials"), "{creds}");
    assert!(!creds.contains("hunter2"), "{creds}");
    let down = refuse(&format!("http://127.0.0.1:{}", free_port()), "max(up)");
    assert!(
        down.contains("the SLO query at http://127.0.0.1:"),
        "{down}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM rekey.runs", &[]).await,
        0,
        "nothing planned"
    );

    // The application's traffic exports its request histogram; Prometheus computes its
    // p99 (the query docs/throttle.md gives as the example).
    let traffic_log = std::env::temp_dir().join(format!("{}-traffic.log", db.name));
    let mut traffic = env
        .cmd(
            "rekey-loadtest",
            &[
                "traffic",
                "--rate",
                "50",
                "--duration",
                "300s",
                "--metrics-addr",
                &format!("127.0.0.1:{traffic_port}"),
            ],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&traffic_log).unwrap())
        .spawn_guarded();

    // Planned with the signal from the environment (and the unit from a flag): the
    // baseline is the gauge's 10 ms. Slow start paces the first batches. The suite's
    // parallel tests make the probe noisy (their rotations' commits): its noise floor is
    // raised so that the application's signal alone paces this run (a probe over 1.5 ms
    // of its p99 before the run held a run of CI to one batch per 30 s). It raises the
    // application's budget with it: limit 110 ms, aim 76.7 ms. No re-baseline pause.
    let (ok, out, err) = {
        let o = env
            .cmd(
                "rekey",
                &paced_rotate(&[
                    "--stages",
                    "100",
                    "--batch-size",
                    "50",
                    "--slo-unit",
                    "s",
                    "--throttle-min-ms",
                    "100",
                    "--rebaseline-every",
                    "0",
                    "--detach",
                ]),
            )
            .env("REKEY_SLO_PROMETHEUS_URL", &prom.url)
            .env("REKEY_SLO_QUERY", "max(app_p99_seconds)")
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert!(ok, "{out}{err}");
    let settings = run_settings(&db).await;
    assert_eq!(
        settings["slo_baseline_ms"].as_f64(),
        Some(10.0),
        "{settings}"
    );
    assert_eq!(settings["slo"]["query"], "max(app_p99_seconds)");

    let mut workers: Vec<Proc> = (0..2).map(|i| env.worker(&format!("w{i}"))).collect();
    let log_path = std::env::temp_dir().join(format!("{}-driver.log", db.name));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut driver = env
        .cmd(
            "rekey",
            &[
                "resume",
                "1",
                "--metrics-addr",
                &format!("127.0.0.1:{coordinator_port}"),
            ],
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn_guarded();
    // The first batches are paced (slow start): the application turns slow then.
    let start = Instant::now();
    while done_batches(&db).await == 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "no batch done");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.set(0.500);
    let slowed = status_until(&env, "1", Duration::from_secs(30), |s| {
        s.contains("the application's p99 from Prometheus is 500.0 ms, over its limit of 110.0 ms")
    })
    .await;
    assert!(slowed.contains("batch(es) in flight at most"), "{slowed}");
    // Held back while it stays slow: far fewer batches than the 60 the run has.
    let at = done_batches(&db).await;
    let paced = status_until(&env, "1", Duration::from_secs(40), |s| {
        s.contains("over its limit") && gap_ms(s) >= 3_100
    })
    .await;
    let during = done_batches(&db).await - at;
    assert!(
        during < 20,
        "{during} batches done while the application was over its SLO:\n{paced}"
    );
    // The application recovers: so does the run, to its end.
    app.set(0.010);
    let code = exit_or_explain(&env, &mut driver, &log_path, Duration::from_secs(300));
    assert!(code.success(), "{code:?}");
    for w in &workers {
        sigterm(w);
    }
    for w in &mut workers {
        wait_exit(w, Duration::from_secs(30));
    }
    let (ok, out, err) = env.run("rekey-loadtest", &["verify"]);
    assert!(ok, "{out}{err}");
    // The driver's log says when and why it throttled.
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    let throttling = log
        .lines()
        .find(|l| l.contains("throttling"))
        .unwrap_or_else(|| panic!("no throttling event:\n{log}"));
    assert!(
        throttling.contains("from Prometheus is 500.0 ms"),
        "{throttling}"
    );
    // Prometheus saw the coordinator's view of the signal, and the traffic's p99.
    let seen = prom
        .query("max_over_time(rekey_slo_latency_ms[10m])")
        .await
        .unwrap();
    assert!(
        (seen - 500.0).abs() < 1e-6,
        "rekey_slo_latency_ms peaked at {seen}"
    );
    let traffic_p99 = prom
        .query(
            "histogram_quantile(0.99, sum by (le) (rate(app_request_duration_seconds_bucket[30s])))",
        )
        .await
        .unwrap();
    assert!(
        traffic_p99 > 0.0 && traffic_p99 < 5.0,
        "the traffic's p99 from its histogram: {traffic_p99} s; up {:?}, requests {:?}; its log:\n{}",
        prom.query("max(up{job=\"traffic\"})").await,
        prom.query("sum(app_request_duration_seconds_count)").await,
        std::fs::read_to_string(&traffic_log).unwrap_or_default()
    );
    let _ = std::fs::remove_file(&traffic_log);
    let _ = traffic.kill();
    let _ = traffic.wait();
    let _ = std::fs::remove_dir_all(&reports);
    let _: &Env = &env;
}

/// Waits for the driver to end; when it does not within `within`, fails with what
/// `rekey status` says and the end of the driver's log (which signal held the run).
fn exit_or_explain(
    env: &Env,
    driver: &mut Proc,
    log_path: &std::path::Path,
    within: Duration,
) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = driver.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() >= within {
            let (_, status, err) = env.run("rekey", &["status", "1"]);
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "the driver did not end within {within:?}; `rekey status 1`:\n{status}{err}\nits log, last lines first:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The gap between batches `rekey status` shows on its throttle line (0 when none).
fn gap_ms(status: &str) -> u64 {
    status
        .lines()
        .find(|l| l.contains("ms between batches"))
        .and_then(|l| {
            let before = l.split(" ms between batches").next()?;
            before.rsplit(' ').next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// The application's signal lost mid-run (its exporter fails every scrape: the metric goes
/// stale, the SLO query returns no series): the run goes on, governed by the probe alone,
/// and `rekey status` and a `signal_lost` event say why; when the metric is back, a
/// `signal_back` event, and the run completes with every value verified.
/// A run planned on the exporter's signal (`--batch-size` and `extra` given to `rotate`),
/// driven by `rekey resume` in the background with its log in a file, one worker whose
/// batches take 300 ms (the run outlasts what the test does to the signal), two batches
/// done.
struct SloScene {
    // Dropped in this order: the processes before the signal, the database last.
    driver: Proc,
    worker: Proc,
    _prom: Prometheus,
    app: AppExporter,
    log_path: std::path::PathBuf,
    reports: std::path::PathBuf,
    env: Env,
    db: rekey_common::testing::TestDb,
}

impl SloScene {
    async fn start(batch_size: &str, extra: &[&str]) -> Self {
        let (db, env, reports) = seeded(3_000).await;
        let app = AppExporter::start(0.010);
        let prom = Prometheus::start(&db.name, &[("app", app.port)])
            .await
            .unwrap();
        let mut args = vec![
            "--stages",
            "100",
            "--batch-size",
            batch_size,
            "--slo-prometheus-url",
            &prom.url,
            "--slo-query",
            "max(app_p99_seconds)",
            "--slo-unit",
            "s",
            "--detach",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = env.run("rekey", &quick_rotate(&args));
        assert!(ok, "{out}{err}");
        let worker = env.slow_worker("w");
        let log_path = std::env::temp_dir().join(format!("{}-driver.log", db.name));
        let driver = env
            .cmd("rekey", &["resume", "1"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn_guarded();
        let start = Instant::now();
        while done_batches(&db).await < 2 {
            assert!(start.elapsed() < Duration::from_secs(60), "no batch done");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            db,
            env,
            reports,
            app,
            _prom: prom,
            worker,
            driver,
            log_path,
        }
    }

    /// Waits for the driver to finish the run and returns its log.
    fn finished(&mut self, within: Duration) -> String {
        let code = wait_exit(&mut self.driver, within);
        assert!(code.success(), "{code:?}");
        let log = std::fs::read_to_string(&self.log_path).unwrap();
        let _ = std::fs::remove_file(&self.log_path);
        log
    }

    /// Stops the worker and verifies every value.
    fn verified(mut self) {
        sigterm(&self.worker);
        wait_exit(&mut self.worker, Duration::from_secs(30));
        let (ok, out, err) = self.env.run("rekey-loadtest", &["verify"]);
        assert!(ok, "{out}{err}");
        let _ = std::fs::remove_dir_all(&self.reports);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signal_lost_mid_run_leaves_the_probe_governing_and_status_says_so() {
    let mut scene = SloScene::start("50", &[]).await;
    let (db, env) = (&scene.db, &scene.env);
    scene.app.serve(false);
    let lost = status_until(env, "1", Duration::from_secs(30), |s| {
        s.contains("from Prometheus is unavailable")
    })
    .await;
    assert!(
        lost.contains("the query returned no series") && lost.contains("the probe alone governs"),
        "{lost}"
    );
    // Not held by the loss: batches go on being done meanwhile (the probe may pace them
    // on a loaded machine, so within 30 s rather than at once; a hold would last).
    let at = done_batches(db).await;
    let since = Instant::now();
    while done_batches(db).await <= at {
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "the run stalled while the signal was lost"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    scene.app.serve(true);
    status_until(env, "1", Duration::from_secs(30), |s| {
        !s.contains("is unavailable")
    })
    .await;
    let log = scene.finished(Duration::from_secs(180));
    scene.verified();
    let lost_at = log
        .find("from Prometheus is unavailable: the probe alone governs")
        .unwrap_or_else(|| panic!("no signal_lost event:\n{log}"));
    let back_at = log
        .find("from Prometheus answers again")
        .unwrap_or_else(|| panic!("no signal_back event:\n{log}"));
    assert!(lost_at < back_at, "{log}");
}

/// The application slower for reasons of its own (also while nothing runs): the throttle
/// first holds the run back against the p99 before the run; the next re-baseline (the
/// rotation paused, the query's window clear of it) asks Prometheus for the application
/// alone and moves the limit with it, so the run goes on instead of crawling at the
/// longest gap; the new value is recorded and said.
#[tokio::test(flavor = "multi_thread")]
async fn the_applications_own_drift_is_rebaselined_and_the_run_goes_on() {
    let mut scene = SloScene::start("20", &["--rebaseline-every", "30s"]).await;
    let env = &scene.env;
    // 18 ms from now on, whatever the rotation does: the throttle holds the run back.
    scene.app.set(0.018);
    status_until(env, "1", Duration::from_secs(30), |s| {
        s.contains("the application's p99 from Prometheus is 18.0 ms, over its limit of 11.5 ms")
    })
    .await;
    // The re-baseline (30 s into the stage) waits for the application alone, then moves
    // the limit: 18.0 ms + 15%.
    status_until(env, "1", Duration::from_secs(90), |s| {
        s.contains("re-baselining")
            && s.contains("the application's Prometheus is asked 20 s after")
    })
    .await;
    let log = scene.finished(Duration::from_secs(240));
    let settings = run_settings(&scene.db).await;
    assert_eq!(
        settings["slo_baseline_ms"].as_f64(),
        Some(10.0),
        "{settings}"
    );
    assert_eq!(
        settings["slo_rebaselined_ms"].as_f64(),
        Some(18.0),
        "{settings}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("new baseline") && l.contains("slo_p99_ms=18")),
        "no re-baseline of the application's p99:\n{log}"
    );
    scene.verified();
}

/// The baseline is the application's recent history, not the moment the run is planned: a
/// minute at 10 ms and a spike to 30 ms while the run is planned make a 10 ms baseline (the
/// median of the query over the last two minutes, a value every 10 s), where five polls
/// at that moment would have made it 30 ms.
#[tokio::test(flavor = "multi_thread")]
async fn the_slo_baseline_is_the_applications_recent_history_not_the_moment_of_planning() {
    let (db, env, reports) = seeded(300).await;
    let app = AppExporter::start(0.010);
    let prom = Prometheus::start(&db.name, &[("app", app.port)])
        .await
        .unwrap();
    // Enough history for the subquery's 10 s steps: at least five of them at 10 ms.
    let start = Instant::now();
    loop {
        let points = prom
            .query("count_over_time((max(app_p99_seconds))[2m:10s])")
            .await
            .unwrap_or(0.0);
        if points >= 6.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{points} points"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    app.set(0.030);
    let start = Instant::now();
    while prom.query("max(app_p99_seconds)").await.ok() != Some(0.030) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the spike not scraped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, out, err) = env.run(
        "rekey",
        &quick_rotate(&[
            "--slo-prometheus-url",
            &prom.url,
            "--slo-query",
            "max(app_p99_seconds)",
            "--detach",
        ]),
    );
    assert!(ok, "{out}{err}");
    let settings = run_settings(&db).await;
    assert_eq!(
        settings["slo_baseline_ms"].as_f64(),
        Some(10.0),
        "{settings}"
    );
    let _ = std::fs::remove_dir_all(&reports);
}
