//! Metrics: OpenTelemetry instruments, read by a Prometheus text endpoint (`/metrics` on
//! `--metrics-addr`). Names are exactly the ones below (no unit or `_total` added by the
//! exporter), the ones the Grafana dashboard and the alert rules use. Labels stay low in
//! cardinality: key ids (a handful), outcomes, states, the run id; never a row id.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::ledger::RunState;
use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, MeterProvider, UpDownCounter};
use opentelemetry_prometheus_text_exporter::PrometheusExporter;
use opentelemetry_sdk::metrics::SdkMeterProvider;

/// Every metric rekey exports, by name (the dashboard and alert rules are checked against
/// this list and against a scrape).
pub const NAMES: &[&str] = &[
    "decrypt_errors_total",
    "encrypt_operations_total",
    "decrypt_operations_total",
    "rows_rotated_total",
    "batches_total",
    "batch_duration_seconds",
    "batches_in_progress",
    "key_rotation_duration_seconds",
    "audit_log_gap_seconds",
    "rekey_run_state",
    "rekey_run_stage",
    "rekey_run_rows_rotated",
    "rekey_run_decrypt_error_rate",
    "rekey_batches_in_flight",
    "rekey_queue_depth",
    "rekey_probe_latency_ms",
    "rekey_probe_impact_pct",
    "rekey_throttle_window",
    "rekey_throttle_gap_ms",
    "rekey_run_events_total",
    "rekey_queue_consumers",
    "rekey_replication_lag_bytes",
    "rekey_active_backends",
    "rekey_checkpoints_requested",
    "rekey_slo_latency_ms",
];

/// Metrics that exist only when their feature is configured (the SLO query): the
/// observability test's scrapes do not hold them; their own tests do.
pub const CONFIGURED_ONLY: &[&str] = &["rekey_slo_latency_ms"];

/// The outcomes `batches_total` counts.
pub const BATCH_OUTCOMES: &[&str] = &[
    "done",
    "already_done",
    "skipped",
    "failed",
    "poison",
    "retried",
    "handed_back",
];

/// The instruments, and the exporter that renders them.
pub struct Metrics {
    provider: SdkMeterProvider,
    prometheus: PrometheusExporter,
    /// Values that failed to decrypt, by the key their header names (`key`).
    pub decrypt_errors: Counter<u64>,
    /// Encryptions, by key and outcome (`ok`, `failed`).
    pub encrypts: Counter<u64>,
    /// Decryptions, by key and outcome.
    pub decrypts: Counter<u64>,
    pub rows_rotated: Counter<u64>,
    /// Batches handled, by outcome: `done`, `already_done`, `skipped`, `failed`, `poison`,
    /// `retried` (a transient failure, tried again), `handed_back`.
    pub batches: Counter<u64>,
    pub batch_duration: Histogram<f64>,
    pub batches_in_progress: UpDownCounter<i64>,
    /// Coordinator: seconds since the run started (by `run_id`).
    pub rotation_duration: Gauge<f64>,
    /// Coordinator: seconds since the run's newest audit entry.
    pub audit_gap: Gauge<f64>,
    pub run_state: Gauge<u64>,
    pub run_stage: Gauge<u64>,
    pub run_rows_rotated: Gauge<u64>,
    pub run_error_rate: Gauge<f64>,
    pub batches_in_flight: Gauge<u64>,
    pub queue_depth: Gauge<u64>,
    /// The latency probe's median, 95th and 99th percentile (`quantile`), milliseconds.
    pub probe_latency: Gauge<f64>,
    pub probe_impact: Gauge<f64>,
    /// Batches the throttle lets be in flight.
    pub throttle_window: Gauge<u64>,
    /// While pacing, the gap between batch publications (milliseconds; 0: not pacing).
    pub throttle_gap: Gauge<f64>,
    /// Coordinator: run events (`stage_started`, `gate_breached`, `throttling`, …), by
    /// `run_id` and `event`.
    pub run_events: Counter<u64>,
    /// Coordinator: consumers on a queue (`queue`), as the driver last saw them.
    pub queue_consumers: Gauge<u64>,
    /// WAL bytes the farthest streaming replica's replay is behind (0 with none), by run.
    pub replication_lag_bytes: Gauge<u64>,
    /// Client backends running a statement in PostgreSQL, by run.
    pub active_backends: Gauge<u64>,
    /// Checkpoints PostgreSQL requested since its statistics were reset, by run.
    pub checkpoints_requested: Gauge<u64>,
    /// The application's p99 from its Prometheus (`--slo-query`), milliseconds, by run.
    pub slo_latency: Gauge<f64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The instruments of one process (`service`: `rekey-worker`, `rekey`).
    pub fn new(service: &str) -> Arc<Self> {
        let prometheus = PrometheusExporter::builder()
            .without_units()
            .without_counter_suffixes()
            .without_scope_info()
            .without_target_info()
            .build();
        let mut builder = SdkMeterProvider::builder()
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .with_reader(prometheus.clone());
        if crate::telemetry::otlp_configured() {
            crate::telemetry::install_crypto_provider();
            // Exported every OTEL_METRIC_EXPORT_INTERVAL (60 s by default) and at shutdown;
            // the exporter's blocking HTTP client is built off the async executor.
            match std::thread::spawn(|| opentelemetry_otlp::MetricExporter::builder().build())
                .join()
            {
                Ok(Ok(exporter)) => {
                    builder = builder.with_reader(
                        opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build(),
                    );
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "OTLP metric export not set up"),
                Err(_) => tracing::warn!("OTLP metric export not set up"),
            }
        }
        let provider = builder.build();
        let m: Meter = provider.meter("rekey");
        Arc::new(Self {
            decrypt_errors: m
                .u64_counter("decrypt_errors_total")
                .with_description("Values that failed to decrypt, by the key their header names")
                .build(),
            encrypts: m
                .u64_counter("encrypt_operations_total")
                .with_description("Field encryptions, by key and outcome")
                .build(),
            decrypts: m
                .u64_counter("decrypt_operations_total")
                .with_description("Field decryptions, by key and outcome")
                .build(),
            rows_rotated: m
                .u64_counter("rows_rotated_total")
                .with_description("Values re-encrypted under a run's key and committed")
                .build(),
            batches: m
                .u64_counter("batches_total")
                .with_description("Batch deliveries handled, by outcome")
                .build(),
            batch_duration: m
                .f64_histogram("batch_duration_seconds")
                .with_description("Time from a batch's claim to its commit")
                .with_boundaries(vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ])
                .build(),
            batches_in_progress: m
                .i64_up_down_counter("batches_in_progress")
                .with_description("Batches this worker is rotating now")
                .build(),
            rotation_duration: m
                .f64_gauge("key_rotation_duration_seconds")
                .with_description("Seconds since the run started (final once it ended)")
                .build(),
            audit_gap: m
                .f64_gauge("audit_log_gap_seconds")
                .with_description("Seconds since the run's newest audit entry")
                .build(),
            run_state: m
                .u64_gauge("rekey_run_state")
                .with_description("1 for the run's current state, 0 for the others")
                .build(),
            run_stage: m
                .u64_gauge("rekey_run_stage")
                .with_description("The run's current stage (0 is the canary)")
                .build(),
            run_rows_rotated: m
                .u64_gauge("rekey_run_rows_rotated")
                .with_description("Values the run rotated, from the ledger")
                .build(),
            run_error_rate: m
                .f64_gauge("rekey_run_decrypt_error_rate")
                .with_description("The run's decrypt errors over attempted decryptions")
                .build(),
            batches_in_flight: m
                .u64_gauge("rekey_batches_in_flight")
                .with_description("Batches published and not yet done")
                .build(),
            queue_depth: m
                .u64_gauge("rekey_queue_depth")
                .with_description("Messages ready in a queue")
                .build(),
            probe_latency: m
                .f64_gauge("rekey_probe_latency_ms")
                .with_description("The application-latency probe, by quantile")
                .build(),
            probe_impact: m
                .f64_gauge("rekey_probe_impact_pct")
                .with_description("The probe's median over its baseline, percent")
                .build(),
            throttle_window: m
                .u64_gauge("rekey_throttle_window")
                .with_description("Batches the throttle lets be in flight")
                .build(),
            throttle_gap: m
                .f64_gauge("rekey_throttle_gap_ms")
                .with_description("While pacing, milliseconds between batch publications")
                .build(),
            run_events: m
                .u64_counter("rekey_run_events_total")
                .with_description("Run events, by run and event")
                .build(),
            queue_consumers: m
                .u64_gauge("rekey_queue_consumers")
                .with_description("Consumers on a queue, as the driver last saw them")
                .build(),
            replication_lag_bytes: m
                .u64_gauge("rekey_replication_lag_bytes")
                .with_description(
                    "WAL bytes the farthest streaming replica's replay is behind the primary (0: none), by run",
                )
                .build(),
            active_backends: m
                .u64_gauge("rekey_active_backends")
                .with_description("Client backends running a statement in PostgreSQL, by run")
                .build(),
            checkpoints_requested: m
                .u64_gauge("rekey_checkpoints_requested")
                .with_description(
                    "Checkpoints PostgreSQL requested (WAL outgrew max_wal_size) since its statistics were reset, by run",
                )
                .build(),
            slo_latency: m
                .f64_gauge("rekey_slo_latency_ms")
                .with_description(
                    "The application's p99 latency from its Prometheus (--slo-query), milliseconds, by run",
                )
                .build(),
            provider,
            prometheus,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = self.prometheus.export(&mut out) {
            tracing::warn!(error = %e, "metrics could not be rendered");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Gives the worker's counters their zero series, so that a scrape (and an alert
    /// rule) finds them before the first batch.
    pub fn init_worker_series(&self) {
        let none = [key_label(None)];
        self.decrypt_errors.add(0, &none);
        let ok = [key_label(None), KeyValue::new("outcome", "ok")];
        self.encrypts.add(0, &ok);
        self.decrypts.add(0, &ok);
        self.rows_rotated.add(0, &[]);
        for outcome in BATCH_OUTCOMES {
            self.batches.add(0, &[KeyValue::new("outcome", *outcome)]);
        }
        self.batches_in_progress.add(0, &[]);
    }

    /// Records the run's state as 1 and every other state (`RunState::ALL`) as 0.
    pub fn set_run_state(&self, run_id: i64, state: RunState) {
        for s in RunState::ALL {
            self.run_state.record(
                u64::from(*s == state),
                &[
                    KeyValue::new("run_id", run_id),
                    KeyValue::new("state", s.as_str()),
                ],
            );
        }
    }

    /// Exports what an OTLP reader holds and stops (blocking: call it as the process ends).
    pub fn shutdown(&self) {
        let provider = self.provider.clone();
        let _ = std::thread::spawn(move || provider.shutdown()).join();
    }
}

/// Label for a key id (or `none` for values without a readable header).
pub fn key_label(key: Option<uuid::Uuid>) -> KeyValue {
    KeyValue::new("key", key.map_or("none".to_owned(), |k| k.to_string()))
}

/// Serves `GET /metrics` (and `GET /healthz`) on `addr` until the task is dropped. Returns
/// the address bound (so that port 0 picks a free one) and the server task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_text(addr, Arc::new(move || metrics.render())).await
}

/// Serves `GET /metrics` with what `render` returns (Prometheus's text format), and `GET
/// /healthz`, on `addr` until the task is dropped.
pub async fn serve_text(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen for metrics scrapes on {addr} (--metrics-addr)"))?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let render = render.clone();
                        async move { Ok::<_, std::convert::Infallible>(respond(&req, &*render)) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    tracing::info!(%bound, "metrics at http://{bound}/metrics");
    Ok((bound, task))
}

fn respond(
    req: &Request<hyper::body::Incoming>,
    render: &(dyn Fn() -> String + Send + Sync),
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        ("GET", "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n".to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_out_exactly_as_listed() {
        let m = Metrics::new("test");
        let k = [key_label(None)];
        m.decrypt_errors.add(1, &k);
        m.encrypts.add(1, &k);
        m.decrypts.add(1, &k);
        m.rows_rotated.add(3, &[]);
        m.batches.add(1, &[KeyValue::new("outcome", "done")]);
        m.batch_duration.record(0.2, &[]);
        m.batches_in_progress.add(0, &[]);
        m.rotation_duration
            .record(1.0, &[KeyValue::new("run_id", 1)]);
        m.audit_gap.record(1.0, &[KeyValue::new("run_id", 1)]);
        m.set_run_state(1, RunState::Running);
        m.run_stage.record(0, &[KeyValue::new("run_id", 1)]);
        m.run_rows_rotated.record(3, &[KeyValue::new("run_id", 1)]);
        m.run_error_rate.record(0.0, &[KeyValue::new("run_id", 1)]);
        m.batches_in_flight.record(2, &[KeyValue::new("run_id", 1)]);
        m.queue_depth.record(5, &[KeyValue::new("queue", "q")]);
        m.probe_latency
            .record(1.5, &[KeyValue::new("quantile", "0.5")]);
        m.probe_impact.record(3.0, &[KeyValue::new("run_id", 1)]);
        m.throttle_window.record(64, &[KeyValue::new("run_id", 1)]);
        m.throttle_gap.record(700.0, &[KeyValue::new("run_id", 1)]);
        m.run_events.add(
            1,
            &[
                KeyValue::new("run_id", 1),
                KeyValue::new("event", "started"),
            ],
        );
        m.queue_consumers
            .record(0, &[KeyValue::new("queue", "q.batches")]);
        m.replication_lag_bytes
            .record(0, &[KeyValue::new("run_id", 1)]);
        m.active_backends.record(2, &[KeyValue::new("run_id", 1)]);
        m.checkpoints_requested
            .record(7, &[KeyValue::new("run_id", 1)]);
        m.slo_latency.record(12.5, &[KeyValue::new("run_id", 1)]);
        let text = m.render();
        for name in NAMES {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name}{{"))
                    || l.starts_with(&format!("{name} "))
                    || l.starts_with(&format!("{name}_bucket{{"))),
                "{name} missing from:\n{text}"
            );
        }
        assert!(
            text.contains("rekey_run_state{run_id=\"1\",state=\"running\"} 1"),
            "{text}"
        );
    }
}
