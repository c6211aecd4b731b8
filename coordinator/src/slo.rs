//! The application's own latency signal: a PromQL expression (`--slo-query`) that returns
//! the application's p99, asked of its Prometheus (`--slo-prometheus-url`) before a run for
//! the baseline and every judgement while a stage rotates. When it is configured it is the
//! throttle's preferred input; the probe stays beside it, and the worse of the two governs
//! (docs/throttle.md).

use std::time::Duration;

use anyhow::{Context, bail};
use rekey_common::config::SloSource;

/// A query that takes longer than this counts as no answer (the probe governs meanwhile).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The baseline before a run is the median of the query's values over this much of the
/// application's recent history, one every `BASELINE_STEP` (a Prometheus subquery): one
/// window's p99 moves by ±10% from window to window at 100 operations a second, a median
/// of twelve does not.
pub const BASELINE_HISTORY: &str = "2m";
pub const BASELINE_STEP: &str = "10s";

/// When the Prometheus has no history of the query yet: this many polls,
/// `BASELINE_SPACING` apart; their median is the baseline.
pub const BASELINE_POLLS: usize = 5;
pub const BASELINE_SPACING: Duration = Duration::from_secs(1);

/// A client for one source.
#[derive(Debug, Clone)]
pub struct Slo {
    source: SloSource,
    client: reqwest::Client,
}

impl Slo {
    pub fn new(source: &SloSource) -> anyhow::Result<Self> {
        rekey_common::telemetry::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(QUERY_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("build the Prometheus client: {e}"))?;
        Ok(Self {
            source: source.clone(),
            client,
        })
    }

    /// The query's value now, in milliseconds.
    pub async fn value_ms(&self) -> anyhow::Result<f64> {
        self.ask_ms(&self.source.query).await
    }

    /// The median of the query's values over the application's recent history
    /// ([`BASELINE_HISTORY`]), when its Prometheus has that history.
    pub async fn history_median_ms(&self) -> anyhow::Result<f64> {
        self.ask_ms(&history_query(&self.source.query)).await
    }

    /// `query`'s value now, in milliseconds.
    async fn ask_ms(&self, query: &str) -> anyhow::Result<f64> {
        let s = &self.source;
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", s.prometheus_url),
            &[("query", query)],
        )
        .with_context(|| {
            format!(
                "the SLO's Prometheus URL {} is not a URL (--slo-prometheus-url)",
                s.prometheus_url
            )
        })?;
        let where_ = || format!("the SLO query at {}", s.prometheus_url);
        let resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", where_(), describe(e)))?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.map_err(|e| {
            anyhow::anyhow!(
                "{}: HTTP {status}, not Prometheus's JSON: {}",
                where_(),
                describe(e)
            )
        })?;
        value_of(&body).with_context(where_).map(|v| v * s.unit_ms)
    }

    /// The baseline: the median of the query over the application's recent history
    /// ([`Slo::history_median_ms`]); without a history (a Prometheus that has just
    /// started, a query the subquery cannot wrap), the median of [`BASELINE_POLLS`]
    /// answers. An unanswered poll is an error (a run is not planned on a signal that does
    /// not answer).
    pub async fn baseline_ms(&self) -> anyhow::Result<f64> {
        match self.history_median_ms().await {
            Ok(v) if v.is_finite() && v > 0.0 => return Ok(v),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "no history of the SLO query; polling it")
            }
        }
        let mut values = Vec::with_capacity(BASELINE_POLLS);
        for i in 0..BASELINE_POLLS {
            if i > 0 {
                tokio::time::sleep(BASELINE_SPACING).await;
            }
            values.push(self.value_ms().await?);
        }
        values.sort_by(f64::total_cmp);
        Ok(values[values.len() / 2])
    }
}

/// The median of `query` over [`BASELINE_HISTORY`], a value every [`BASELINE_STEP`].
pub fn history_query(query: &str) -> String {
    format!("quantile_over_time(0.5, ({query})[{BASELINE_HISTORY}:{BASELINE_STEP}])")
}

/// reqwest's errors name the URL, whose query string is the whole PromQL expression: the
/// error's kind and causes are enough next to the base URL.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        text.push_str(&format!(": {s}"));
        src = s.source();
    }
    text
}

/// The one value of a query's answer (`vector` of one series, or `scalar`).
pub fn value_of(body: &serde_json::Value) -> anyhow::Result<f64> {
    if body["status"] != "success" {
        bail!(
            "Prometheus refused the query ({}: {})",
            body["errorType"].as_str().unwrap_or("error"),
            body["error"].as_str().unwrap_or("no reason given")
        );
    }
    let data = &body["data"];
    let sample = match data["resultType"].as_str() {
        Some("scalar") => &data["result"],
        Some("vector") => {
            let series = data["result"].as_array().map_or(&[][..], Vec::as_slice);
            match series {
                [one] => &one["value"],
                [] => bail!(
                    "the query returned no series (does the application's metric exist, and has it had requests in the query's window?)"
                ),
                many => bail!(
                    "the query returned {} series; it must return one (aggregate it, e.g. max(...) or sum by (le) before histogram_quantile)",
                    many.len()
                ),
            }
        }
        other => bail!(
            "the query returned a {}, not one value (a range vector? use an instant query)",
            other.unwrap_or("nothing")
        ),
    };
    let text = sample[1]
        .as_str()
        .context("Prometheus's answer has no value")?;
    let v: f64 = text
        .parse()
        .with_context(|| format!("the query's value {text:?} is not a number"))?;
    if !v.is_finite() || v < 0.0 {
        bail!(
            "the query's value is {text} (NaN: no requests in the query's window; the p99 of nothing is not a latency)"
        );
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::value_of;
    use serde_json::json;

    #[test]
    fn one_series_or_a_scalar_is_a_value_and_anything_else_says_what_to_fix() {
        let vector = |result: serde_json::Value| json!({"status": "success", "data": {"resultType": "vector", "result": result}});
        let one = vector(json!([{"metric": {}, "value": [1.0, "0.0125"]}]));
        assert_eq!(value_of(&one).unwrap(), 0.0125);
        let scalar =
            json!({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3"]}});
        assert_eq!(value_of(&scalar).unwrap(), 3.0);
        let none = value_of(&vector(json!([]))).unwrap_err().to_string();
        assert!(none.contains("no series"), "{none}");
        let two = vector(json!([
            {"metric": {"op": "read"}, "value": [1.0, "1"]},
            {"metric": {"op": "write"}, "value": [1.0, "2"]}
        ]));
        let two = value_of(&two).unwrap_err().to_string();
        assert!(two.contains("returned 2 series"), "{two}");
        let nan = vector(json!([{"metric": {}, "value": [1.0, "NaN"]}]));
        let nan = value_of(&nan).unwrap_err().to_string();
        assert!(nan.contains("NaN"), "{nan}");
        let refused =
            json!({"status": "error", "errorType": "bad_data", "error": "parse error at char 5"});
        let refused = value_of(&refused).unwrap_err().to_string();
        assert!(
            refused.contains("bad_data: parse error at char 5"),
            "{refused}"
        );
    }
}
