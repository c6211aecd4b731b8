//! Logging setup shared by the binaries: human-readable lines on a terminal, JSON lines
//! with `--log-format json`, filtered by `RUST_LOG` (default `info`). Logs go to stderr so
//! that `--json` output on stdout stays machine-readable. lapin's own logs are off by
//! default (it logs a normal close as an error); rekey logs every broker failure itself.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber; a second call is a no-op (tests call it repeatedly).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,refinery_core=warn,tokio_postgres=warn,lapin=off")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
