//! Run events posted to a webhook, the playbook's communication plan done by software: a
//! background task posts each event as Slack-compatible JSON (`text`, plus the structured
//! event under `rekey`), retrying with backoff. Sending never blocks the run: a full queue
//! drops the event with a warning, and a webhook that stays down only costs warnings. At
//! exit, [`Notifier::flush`] waits a bounded time for what is queued.
//!
//! The URL is secret (a Slack webhook's path is its token): logs name only "the webhook".

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// One run event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `started`, `resumed`, `stage_passed`, `gate_breached`, `no_consumer`,
    /// `consumers_back`, `workers_failing`, `halted`, `rolled_back`, `completed`.
    pub event: &'static str,
    pub run_id: i64,
    /// `rotation`, `rollback`, `dry_run`.
    pub kind: String,
    pub state: String,
    pub stage_no: Option<i32>,
    /// Why (a breach's or a halt's reason).
    pub reason: Option<String>,
    /// The run's figures from the ledger.
    pub figures: serde_json::Value,
    /// The evidence report's path, when one was written.
    pub report: Option<String>,
    pub at: DateTime<Utc>,
}

impl Event {
    /// The line a chat client shows.
    pub fn text(&self) -> String {
        let mut t = format!(
            "rekey {} run {}: {}",
            self.kind,
            self.run_id,
            self.event.replace('_', " ")
        );
        if let Some(s) = self.stage_no {
            t.push_str(&format!(" (stage {s})"));
        }
        let rate = self
            .figures
            .get("decrypt_error_rate")
            .and_then(|v| v.as_f64());
        for (key, verb) in [("rotated", "rotated"), ("would_rotate", "would rotate")] {
            if let (Some(r), Some(e)) = (self.figures.get(key).and_then(|v| v.as_i64()), rate) {
                t.push_str(&format!(
                    "; {r} values {verb}, decrypt error rate {:.4}%",
                    e * 100.0
                ));
            }
        }
        if let Some(r) = &self.reason {
            t.push_str(&format!("; reason: {r}"));
        }
        if let Some(p) = &self.report {
            t.push_str(&format!("; report: {p}"));
        }
        t
    }
}

enum Msg {
    Event(Box<Event>),
    Flush(oneshot::Sender<()>),
}

/// A handle on the webhook task; cheap to clone. Without a URL it does nothing.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Msg>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

/// Attempts per event, and the pause before the second (doubling after).
const ATTEMPTS: u32 = 4;
const FIRST_RETRY: Duration = Duration::from_millis(500);

impl Notifier {
    /// A notifier posting to `url`, or a silent one without.
    pub fn new(url: Option<&SecretString>) -> anyhow::Result<Self> {
        let Some(url) = url else {
            return Ok(Self::default());
        };
        crate::telemetry::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| anyhow::anyhow!("build the webhook client: {e}"))?;
        let url = url.clone();
        let (tx, mut rx) = mpsc::channel::<Msg>(256);
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                match msg {
                    Msg::Event(e) => post(&client, &url, &e).await,
                    Msg::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Ok(Self { tx: Some(tx) })
    }

    /// Whether events go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues an event; never waits.
    pub fn send(&self, event: Event) {
        if let Some(tx) = &self.tx
            && let Err(e) = tx.try_send(Msg::Event(Box::new(event)))
        {
            tracing::warn!(error = %e, "webhook queue full or closed: event dropped");
        }
    }

    /// Waits up to `within` for the queued events to be delivered (or given up).
    pub async fn flush(&self, within: Duration) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        if tx.send(Msg::Flush(done)).await.is_ok()
            && tokio::time::timeout(within, wait).await.is_err()
        {
            tracing::warn!("webhook: events still queued at exit were not all delivered");
        }
    }
}

async fn post(client: &reqwest::Client, url: &SecretString, e: &Event) {
    let body = serde_json::json!({ "text": e.text(), "rekey": e });
    let mut pause = FIRST_RETRY;
    for attempt in 1..=ATTEMPTS {
        let outcome = client
            .post(url.expose_secret())
            .json(&body)
            .send()
            .await
            .map(|r| r.status());
        match outcome {
            Ok(s) if s.is_success() => return,
            // The error's text could hold the URL: say only what kind of failure it was.
            Ok(s) => tracing::warn!(
                event = e.event,
                attempt,
                status = s.as_u16(),
                "webhook refused the event"
            ),
            Err(err) => tracing::warn!(
                event = e.event,
                attempt,
                timeout = err.is_timeout(),
                connect = err.is_connect(),
                "webhook unreachable"
            ),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }
    tracing::error!(
        event = e.event,
        run_id = e.run_id,
        "webhook: event given up after {ATTEMPTS} attempts"
    );
}
