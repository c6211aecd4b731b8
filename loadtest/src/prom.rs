//! A Prometheus of the load test's own (Debian's `prometheus` package): started on a free
//! loopback port with a configuration written here, scraping the given targets every
//! second; stopped and its data removed when dropped. The bench's `--slo` and the SLO
//! test use it to give `rekey rotate --slo-query` the application's own p99.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

#[derive(Debug)]
pub struct Prometheus {
    pub url: String,
    child: Child,
    dir: PathBuf,
}

/// A free loopback port (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (job name, loopback port) every second, and
    /// waits (at most 60 s) until the first target has been scraped up.
    pub async fn start(name: &str, targets: &[(&str, u16)]) -> anyhow::Result<Self> {
        rekey_common::telemetry::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("{name}-prometheus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut config =
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
                .to_owned();
        for (job, port) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let port = free_port()?;
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "start prometheus (Debian's prometheus package; scripts/setup.sh installs it)",
            )?;
        let p = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            dir,
        };
        let start = Instant::now();
        let first = format!("max(up{{job=\"{}\"}})", targets[0].0);
        loop {
            if p.query(&first).await.is_ok_and(|v| v == 1.0) {
                return Ok(p);
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "Prometheus at {} did not scrape {} within 60 s",
                p.url,
                targets[0].0
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// An instant query's one value.
    pub async fn query(&self, q: &str) -> anyhow::Result<f64> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url),
            &[("query", q)],
        )?;
        let body: serde_json::Value = reqwest::get(url).await?.json().await?;
        let v = body["data"]["result"][0]["value"][1]
            .as_str()
            .with_context(|| format!("no value for {q}: {body}"))?;
        Ok(v.parse()?)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
