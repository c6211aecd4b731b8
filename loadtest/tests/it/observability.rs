//! Observability end to end: the Prometheus endpoints of two workers and of the coordinator
//! scraped after a staged rotation, their figures checked against the ledger's.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::scene::{Scene, rotate_args};

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics` over plain HTTP/1.1; the body.
pub(crate) async fn scrape(port: u16) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The sum of a metric's samples whose labels include every one of `labels`
/// (`key="value"` strings).
pub(crate) fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_and_coordinator_metrics_agree_with_the_ledger() {
    let scene = Scene::new(5_000, false).await;
    let ports = [free_port(), free_port()];
    let mut fleets: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let addr = format!("127.0.0.1:{p}");
            scene.fleet_with(
                &format!("m{i}-"),
                &["--metrics-addr", &addr],
                1,
                2,
                VecDeque::new(),
            )
        })
        .collect();
    let cport = free_port();
    let caddr = format!("127.0.0.1:{cport}");
    let coordinator = scene.rekey(
        "rotate",
        &rotate_args(
            "1,100",
            &["--metrics-addr", &caddr, "--metrics-linger", "10s"],
        ),
        None,
    );
    // Scrape the coordinator while it runs and once the run is over (it lingers).
    let start = Instant::now();
    let mut during = None;
    loop {
        let state = scene
            .db
            .pool
            .get()
            .await
            .unwrap()
            .query_opt("SELECT state FROM rekey.runs ORDER BY id DESC LIMIT 1", &[])
            .await
            .unwrap()
            .map(|r| r.get::<_, String>(0));
        if state.as_deref() == Some("completed") {
            break;
        }
        if state.as_deref() == Some("running")
            && let Some(t) = scrape(cport).await
            && t.contains("rekey_run_state{")
        {
            during = Some(t);
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "the run did not complete: {}",
            scene.log("rotate")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The final figures are recorded as the driver returns; the endpoint lingers.
    let mut coord = String::new();
    for _ in 0..50 {
        coord = scrape(cport).await.expect("the coordinator serves metrics");
        // The final gauges and then the `completed` event (after the final report).
        if coord.contains("state=\"completed\"} 1")
            && sum(&coord, "rekey_run_events_total", &["event=\"completed\""]) >= 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = during.expect("a scrape while the run was running");
    assert!(during.contains("state=\"running\"} 1"), "{during}");
    let workers: Vec<String> = {
        let mut v = Vec::new();
        for p in ports {
            v.push(scrape(p).await.expect("a worker serves metrics"));
        }
        v
    };
    let run_id = scene.last_run().await;
    let c = scene.db.pool.get().await.unwrap();
    let row = c
        .query_one(
            "SELECT COALESCE(sum(n_rotated), 0)::int8, count(*) FILTER (WHERE state = 'done'),
                    COALESCE(sum(n_errors), 0)::int8
               FROM rekey.batches WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .unwrap();
    let (rotated, done, errors): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let total =
        |name: &str, labels: &[&str]| -> f64 { workers.iter().map(|w| sum(w, name, labels)).sum() };
    assert_eq!(total("rows_rotated_total", &[]), rotated as f64);
    assert_eq!(total("batches_total", &["outcome=\"done\""]), done as f64);
    assert_eq!(total("batch_duration_seconds_count", &[]), done as f64);
    assert_eq!(
        total("encrypt_operations_total", &["outcome=\"ok\""]),
        rotated as f64
    );
    assert_eq!(
        total("decrypt_operations_total", &["outcome=\"ok\""]),
        rotated as f64
    );
    assert_eq!(total("decrypt_errors_total", &[]), errors as f64);
    assert_eq!(total("batches_in_progress", &[]), 0.0);
    let run = format!("run_id=\"{run_id}\"");
    let r = [run.as_str()];
    assert_eq!(
        sum(&coord, "rekey_run_state", &[&run, "state=\"completed\""]),
        1.0,
        "{coord}"
    );
    assert_eq!(
        sum(&coord, "rekey_run_state", &r),
        1.0,
        "one state at a time"
    );
    assert_eq!(sum(&coord, "rekey_run_rows_rotated", &r), rotated as f64);
    assert_eq!(sum(&coord, "rekey_run_stage", &r), 1.0);
    assert_eq!(sum(&coord, "rekey_run_decrypt_error_rate", &r), 0.0);
    assert_eq!(sum(&coord, "rekey_batches_in_flight", &r), 0.0);
    assert!(sum(&coord, "key_rotation_duration_seconds", &r) > 0.0);
    // The run's events, counted by the process that planned and drove it: two stages, each
    // started, gated and passed (the last one completes the run), nothing breached.
    let events = |event: &str| {
        let label = format!("event=\"{event}\"");
        sum(&coord, "rekey_run_events_total", &[&run, &label])
    };
    for (event, n) in [
        ("planned", 1.0),
        ("started", 1.0),
        ("stage_started", 2.0),
        ("gates_passed", 2.0),
        ("stage_passed", 2.0),
        ("completed", 1.0),
        ("gate_breached", 0.0),
        ("halted", 0.0),
    ] {
        assert_eq!(events(event), n, "{event} events:\n{coord}");
    }
    // Every metric rekey names exists in one of the scrapes.
    let all = format!("{coord}\n{}\n{during}", workers.join("\n"));
    for name in rekey_common::metrics::NAMES
        .iter()
        .filter(|n| !rekey_common::metrics::CONFIGURED_ONLY.contains(n))
    {
        assert!(
            all.lines().any(|l| l.starts_with(&format!("{name}{{"))
                || l.starts_with(&format!("{name} "))
                || l.starts_with(&format!("{name}_bucket{{"))),
            "{name} is in no scrape"
        );
    }
    let (status, out) = scene
        .until_exit(coordinator, &mut fleets[0], Duration::from_secs(60))
        .await;
    assert!(status.success(), "{out}");
    for f in fleets {
        f.stop(Duration::from_secs(30)).await;
    }
    scene.everything_verified(run_id).await;
    scene.finish().await;
}

/// The metric names a PromQL expression reads (label matchers, grouping lists, ranges and
/// functions left out).
fn metric_names(expr: &str) -> std::collections::BTreeSet<String> {
    const WORDS: &[&str] = &[
        "sum",
        "max",
        "min",
        "avg",
        "count",
        "rate",
        "increase",
        "clamp_min",
        "histogram_quantile",
        "and",
        "or",
        "unless",
        "by",
        "on",
        "without",
        "group_left",
        "group_right",
        "bool",
    ];
    let mut out = std::collections::BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut last_word) = (0, String::new());
    while i < chars.len() {
        let c = chars[i];
        if c == '{' || c == '[' || c == '"' {
            let close = match c {
                '{' => '}',
                '[' => ']',
                _ => '"',
            };
            i += 1;
            while i < chars.len() && chars[i] != close {
                i += 1;
            }
            i += 1;
        } else if c == '('
            && ["by", "on", "without", "group_left", "group_right"].contains(&last_word.as_str())
        {
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            i += 1;
            last_word.clear();
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if !WORDS.contains(&word.as_str()) {
                out.insert(word.clone());
            }
            last_word = word;
        } else {
            if !c.is_whitespace() {
                last_word.clear();
            }
            i += 1;
        }
    }
    out
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
}

#[test]
fn the_dashboard_and_the_alert_rules_use_only_metrics_rekey_exports_and_pass_promtool() {
    let mut exprs: Vec<String> = repo_file("prometheus/alerts.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:").map(|e| e.trim().to_owned()))
        .collect();
    assert!(exprs.len() >= 5, "alert rules found: {exprs:?}");
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("grafana/dashboards/encryption-health.json")).unwrap();
    assert_eq!(dashboard["title"], "Encryption Health");
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    // The extractor itself: names in, labels, groupings, ranges and numbers out.
    assert_eq!(
        metric_names(
            r#"sum by (key) (rate(foo_total{a="b"}[5m])) > 1e-9 and on (run_id) bar == 1"#
        ),
        ["bar", "foo_total"].map(String::from).into()
    );
    let before = exprs.len();
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() > before + 10, "dashboard queries found");
    let known = rekey_common::metrics::NAMES;
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        for name in metric_names(e) {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| known.contains(b)))
                .unwrap_or(&name)
                .to_owned();
            assert!(
                known.contains(&base.as_str()),
                "{name} (in `{e}`) is not a metric rekey exports"
            );
            used.insert(base);
        }
    }
    // The playbook's three are on the dashboard and in the rules.
    for name in [
        "decrypt_errors_total",
        "key_rotation_duration_seconds",
        "audit_log_gap_seconds",
    ] {
        assert!(used.contains(name), "{name} unused");
    }
    // promtool (Debian's prometheus package; .ci/run installs it).
    let dir = format!("{}/../prometheus", env!("CARGO_MANIFEST_DIR"));
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
        vec!["check", "config", "prometheus.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool not found: install Debian's prometheus package (.ci/run does)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_staged_run_posts_its_events_to_the_webhook_in_order_retrying_a_failure() {
    let hook = crate::receiver::Receiver::start(1).await;
    let mut scene = Scene::new(3_000, false).await;
    scene
        .env
        .vars
        .push(("REKEY_WEBHOOK_URL", hook.url("/hooks/secret-token")));
    let mut fleet = scene.fleet(1, 2, VecDeque::new());
    let c = scene.rekey("rotate", &rotate_args("1,100", &[]), None);
    let (status, out) = scene
        .until_exit(c, &mut fleet, Duration::from_secs(240))
        .await;
    assert!(status.success(), "{out}\n{}", scene.log("rotate"));
    fleet.stop(Duration::from_secs(30)).await;
    let run_id = scene.last_run().await;
    let events = hook.accepted_json();
    let names: Vec<String> = events
        .iter()
        .map(|e| e["rekey"]["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["started", "stage_passed", "stage_passed", "completed"],
        "{events:?}"
    );
    // The first attempt was refused (500) and retried: one request more than events.
    assert_eq!(hook.got.lock().unwrap().len(), events.len() + 1);
    assert_eq!(hook.got.lock().unwrap()[0].path, "/hooks/secret-token");
    assert!(hook.got.lock().unwrap().iter().all(|r| r.method == "POST"));
    for e in &events {
        assert_eq!(e["rekey"]["run_id"], run_id);
        assert!(
            e["text"]
                .as_str()
                .unwrap()
                .starts_with(&format!("rekey rotation run {run_id}: "))
        );
    }
    assert_eq!(events[1]["rekey"]["stage_no"], 0);
    assert_eq!(events[2]["rekey"]["stage_no"], 1);
    let done = &events[3]["rekey"];
    assert_eq!(done["state"], "completed");
    let rotated = scene
        .scalar(
            "SELECT COALESCE(sum(n_rotated), 0)::int8 FROM rekey.batches WHERE run_id = $1",
            &[&run_id],
        )
        .await;
    assert_eq!(done["figures"]["rotated"], rotated);
    let report = done["report"].as_str().unwrap();
    assert!(std::path::Path::new(report).exists(), "{report}");
    // The URL's token never reaches a log.
    assert!(!scene.log("rotate").contains("secret-token"));
    scene.everything_verified(run_id).await;
    scene.finish().await;
}

/// A span from an OTLP/JSON export: service, name, trace id and its attributes (as text).
#[derive(Debug)]
struct SpanSeen {
    service: String,
    name: String,
    trace: String,
    attrs: std::collections::HashMap<String, String>,
}

fn attr_text(v: &serde_json::Value) -> String {
    ["stringValue", "intValue", "doubleValue", "boolValue"]
        .iter()
        .find_map(|k| v.get(k))
        .map(|x| x.as_str().map_or(x.to_string(), str::to_owned))
        .unwrap_or_default()
}

fn spans_in(body: &serde_json::Value) -> Vec<SpanSeen> {
    let mut out = Vec::new();
    for rs in body["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .map(|a| attr_text(&a["value"]))
            .unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                out.push(SpanSeen {
                    service: service.clone(),
                    name: s["name"].as_str().unwrap_or_default().to_owned(),
                    trace: s["traceId"].as_str().unwrap_or_default().to_owned(),
                    attrs: s["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            (
                                a["key"].as_str().unwrap_or_default().to_owned(),
                                attr_text(&a["value"]),
                            )
                        })
                        .collect(),
                });
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn otlp_receives_the_run_trace_with_every_batch_joined_to_it_and_the_metrics() {
    let otlp = crate::receiver::Receiver::start(0).await;
    let mut scene = Scene::new(3_000, false).await;
    for (k, v) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url("")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "500".to_owned()),
    ] {
        scene.env.vars.push((k, v));
    }
    let mut fleet = scene.fleet(1, 2, VecDeque::new());
    let c = scene.rekey("rotate", &rotate_args("100", &[]), None);
    let (status, out) = scene
        .until_exit(c, &mut fleet, Duration::from_secs(240))
        .await;
    assert!(status.success(), "{out}\n{}", scene.log("rotate"));
    // SIGTERM: the worker drains, then exports what it still holds.
    let ended = fleet.stop(Duration::from_secs(30)).await;
    assert!(ended.iter().all(|d| d.status.success()), "{ended:?}");
    let run_id = scene.last_run().await.to_string();
    let got = otlp.got.lock().unwrap().clone();
    let bodies = |path: &str| -> Vec<serde_json::Value> {
        got.iter()
            .filter(|r| r.path == path)
            .map(|r| serde_json::from_slice(&r.body).expect("OTLP/JSON"))
            .collect()
    };
    let spans: Vec<SpanSeen> = bodies("/v1/traces").iter().flat_map(spans_in).collect();
    let run = spans
        .iter()
        .find(|s| s.service == "rekey" && s.name == "run" && s.attrs.get("run_id") == Some(&run_id))
        .unwrap_or_else(|| {
            panic!(
                "no run span among {} spans; requests {:?}; log {}",
                spans.len(),
                got.iter()
                    .map(|r| (r.path.clone(), r.body.len()))
                    .collect::<Vec<_>>(),
                scene.log("rotate")
            )
        });
    let batches: Vec<&SpanSeen> = spans
        .iter()
        .filter(|s| s.service == "rekey-worker" && s.name == "batch")
        .collect();
    let done = scene
        .scalar(
            "SELECT count(*) FROM rekey.batches WHERE state = 'done'",
            &[],
        )
        .await;
    assert!(
        batches.len() as i64 >= done,
        "{} batch spans, {done} batches",
        batches.len()
    );
    for b in &batches {
        assert_eq!(
            b.trace, run.trace,
            "a batch span outside the run's trace: {b:?}"
        );
        assert_eq!(b.attrs.get("run_id"), Some(&run_id));
        for field in ["stage", "batch_no", "worker"] {
            assert!(b.attrs.contains_key(field), "{field} missing: {b:?}");
        }
    }
    assert!(
        spans
            .iter()
            .any(|s| s.name == "publish" && s.trace == run.trace)
    );
    assert!(
        spans
            .iter()
            .any(|s| s.name == "gate" && s.trace == run.trace)
    );
    let metrics: String = bodies("/v1/metrics")
        .iter()
        .map(|b| b.to_string())
        .collect();
    for name in ["rows_rotated_total", "batches_total", "rekey_run_state"] {
        assert!(
            metrics.contains(&format!("\"{name}\"")),
            "{name} not exported over OTLP"
        );
    }
    scene.everything_verified(run_id.parse().unwrap()).await;
    scene.finish().await;
}
