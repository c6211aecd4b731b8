//! Logging and tracing setup shared by the binaries: human-readable lines on a terminal,
//! JSON lines with `--log-format json`, filtered by `RUST_LOG` (default `info`). Logs go to
//! stderr so that `--json` output on stdout stays machine-readable. lapin's own logs are
//! off by default (it logs a normal close as an error); rekey logs every broker failure
//! itself.
//!
//! When `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
//! spans are also exported over OTLP/HTTP (`OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`,
//! the default, or `http/json`), and [`crate::metrics::Metrics`] adds an OTLP metrics
//! reader. A batch's span joins the coordinator's run trace through the W3C `traceparent`
//! the coordinator puts in the batch message's headers ([`inject`], [`extract`]).

use std::collections::HashMap;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Colour codes only for a person at a terminal: never in a file, a pipe or a collector.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Directives appended after `RUST_LOG`, whatever it says: crates that log secrets at
/// their debug or trace levels (lapin and amq-protocol the AMQP login with its password,
/// tokio-postgres statement parameters: wrapped keys and ciphertexts; the HTTP stack the
/// webhook's URL, whose path is its token), and cryptoki's mechanism list, which logs an
/// ERROR for each vendor mechanism a token lists that cryptoki does not know (thirty lines
/// at every start with SoftHSM2; rekey reads the list only to find AES-GCM and AES-CMAC).
pub const LOG_FLOOR: &[&str] = &[
    "cryptoki::mechanism=off",
    "lapin=off",
    "amq_protocol=off",
    "amq_protocol_types=off",
    "amq_protocol_uri=off",
    "tokio_postgres=info",
    "postgres_protocol=info",
    "reqwest=info",
    "hyper=info",
    "hyper_util=info",
];

/// The filter without `RUST_LOG`. `cryptoki::mechanism` logs an error for each vendor
/// mechanism a token lists that cryptoki does not know (thirty lines at each start with
/// SoftHSM2); rekey asks for the list only to find AES-GCM and AES-CMAC in it.
pub const DEFAULT_FILTER: &str =
    "info,refinery_core=warn,tokio_postgres=warn,cryptoki::mechanism=off";

fn filter() -> EnvFilter {
    let mut f =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    for d in LOG_FLOOR {
        f = f.add_directive(d.parse().expect("a valid directive"));
    }
    f
}

/// Installs the global subscriber without OTLP; a second call is a no-op (tests call it
/// repeatedly).
pub fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(colour())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Makes ring the process's TLS crypto provider (idempotent). The HTTP clients (OTLP
/// exporters, the webhook) are built without a provider of their own; lapin uses ring too.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Whether the environment asks for OTLP export.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
}

/// Flushes the exported spans at exit; dropping it without [`Telemetry::shutdown`] loses
/// what is still buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops (blocking: call it as the process ends).
    pub fn shutdown(self) {
        if let Some(t) = self.tracer {
            // The exporter's HTTP client is a blocking one: run off the async executor.
            let _ = std::thread::spawn(move || t.shutdown()).join();
        }
    }
}

/// The binaries' setup: logs as [`init`], plus OTLP span export when configured, with
/// `service` as the service name.
pub fn init_for(format: LogFormat, service: &'static str) -> Telemetry {
    if !otlp_configured() {
        init(format);
        return Telemetry::default();
    }
    install_crypto_provider();
    // The exporter's blocking HTTP client is built off the async executor.
    let built = std::thread::spawn(move || {
        opentelemetry_otlp::SpanExporter::builder()
            .build()
            .map(|exporter| {
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(service)
                            .build(),
                    )
                    .build()
            })
    })
    .join();
    let provider = match built {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            init(format);
            tracing::warn!(error = %e, "OTLP span export not set up");
            return Telemetry::default();
        }
        Err(_) => {
            init(format);
            return Telemetry::default();
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("rekey"));
    let registry = tracing_subscriber::registry().with(filter()).with(otel);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(colour())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    Telemetry {
        tracer: Some(provider),
    }
}

struct Carrier<'a>(&'a mut HashMap<String, String>);

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct Headers<'a>(&'a FieldTable);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key) {
            Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// The current span's trace context as message headers (`traceparent`, `tracestate`);
/// empty when no trace is exported.
pub fn inject(span: &tracing::Span) -> Option<FieldTable> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut Carrier(&mut map));
    if map.is_empty() {
        return None;
    }
    let mut t = FieldTable::default();
    for (k, v) in map {
        t.insert(ShortString::from(k), AMQPValue::LongString(v.into()));
    }
    Some(t)
}

/// Makes the trace context in a message's headers, if any, the parent of `span`.
pub fn extract(span: &tracing::Span, headers: Option<&FieldTable>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if let Some(h) = headers {
        let cx = TraceContextPropagator::new().extract(&Headers(h));
        let _ = span.set_parent(cx);
    }
}
