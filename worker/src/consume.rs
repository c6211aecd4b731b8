//! The consumer loop: takes batch orders with a small prefetch, runs up to `concurrency`
//! batches at once, retries transient failures with backoff, dead-letters poison messages
//! with their reason, acks only after the batch's transaction committed, and publishes a
//! report. When the broker connection drops it reconnects with backoff by itself; on
//! shutdown it stops taking orders, finishes and acks the batches in flight, and returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use opentelemetry::KeyValue;
use rekey_common::audit::{self, AuditEntry};
use rekey_common::broker::{self, Topology};
use rekey_common::messages::{BatchMessage, BatchReport, FORMAT_VERSION, MessageError, Outcome};
use rekey_common::metrics::{self, Metrics, key_label};
use rekey_common::{Settings, db, ledger, telemetry};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::presence::Health;
use crate::ring::RingHandle;
use crate::rotate::{BatchError, BatchResult, BatchSettings, error_kind, rotate_batch};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Batches processed at once.
    pub concurrency: usize,
    /// Unacknowledged deliveries the broker may hand over at once.
    pub prefetch: u16,
    pub lock_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    /// Attempts of a batch within one delivery before it is handed back to the broker
    /// (whose delivery limit then bounds the total).
    pub max_attempts: u32,
    pub worker_id: String,
    /// Values above which a batch's crypto runs on the blocking pool.
    pub blocking_threshold: usize,
    /// Where to serve Prometheus metrics (`/metrics`); `None`: nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// The worker's defaults, one place for the flags, `WorkerOptions` and `BatchSettings`.
pub const DEFAULT_CONCURRENCY: usize = 2;
pub const DEFAULT_PREFETCH: u16 = 4;
pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 2000;
pub const DEFAULT_STATEMENT_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_BLOCKING_THRESHOLD: usize = 256;

impl Default for WorkerOptions {
    fn default() -> Self {
        let host = ledger::host_name();
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            prefetch: DEFAULT_PREFETCH,
            lock_timeout_ms: DEFAULT_LOCK_TIMEOUT_MS,
            statement_timeout_ms: DEFAULT_STATEMENT_TIMEOUT_MS,
            max_attempts: 6,
            worker_id: format!("{host}-{}", std::process::id()),
            blocking_threshold: DEFAULT_BLOCKING_THRESHOLD,
            metrics_addr: None,
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C, logging that the worker drains. The handlers are
/// installed by this call: make it first thing, so that a SIGTERM during startup exits
/// cleanly too.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    let signalled = rekey_common::shutdown::signal();
    async move {
        signalled.await;
        tracing::info!("shutdown requested: finishing batches in flight");
    }
}

/// What every batch task shares.
pub(crate) struct Shared {
    pub(crate) pool: Pool,
    pub(crate) ring: RingHandle,
    pub(crate) topo: Topology,
    pub(crate) batch: BatchSettings,
    pub(crate) max_attempts: u32,
    pub(crate) metrics: Arc<Metrics>,
    /// What the worker's presence row says of it.
    pub(crate) health: Health,
    /// Messages refused before authentication, audited in aggregate.
    pub(crate) refusals: crate::refusals::Refusals,
}

/// Runs a worker until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    opts: WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let master = settings.load_master_key()?;
    let pool = db::pool(&settings, opts.concurrency + 1)?;
    db::check_connection(&pool, &settings).await?;
    let source = settings.clone();
    let ring = RingHandle::load(&pool, master)
        .await
        .context("load the key ring")?
        .with_master_source(Box::new(move || source.load_master_key()));
    let metrics = Metrics::new("rekey-worker");
    metrics.init_worker_series();
    let _server = match opts.metrics_addr {
        Some(addr) => Some(metrics::serve(addr, metrics.clone()).await?.1),
        None => None,
    };
    let shared = Arc::new(Shared {
        metrics,
        pool,
        ring,
        topo: Topology::of(&settings),
        batch: BatchSettings {
            lock_timeout_ms: opts.lock_timeout_ms,
            statement_timeout_ms: opts.statement_timeout_ms,
            worker_id: opts.worker_id.clone(),
            blocking_threshold: opts.blocking_threshold,
        },
        max_attempts: opts.max_attempts.max(1),
        health: Health::default(),
        refusals: Default::default(),
    });
    let presence = crate::presence::spawn(shared.clone());
    let result = run_sessions(&settings, &shared, &opts, shutdown).await;
    presence.stop(&shared).await;
    result
}

async fn run_sessions(
    settings: &Settings,
    shared: &Arc<Shared>,
    opts: &WorkerOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let mut backoff = broker::Backoff::new();
    let mut failed_sessions = broker::Backoff::new();
    loop {
        let Some(conn) =
            broker::connect_until(settings, &opts.worker_id, &mut backoff, &mut shutdown).await
        else {
            return Ok(());
        };
        tracing::info!(worker = %opts.worker_id, "connected to the broker");
        let pause = match serve(&conn, shared, opts, &mut shutdown).await {
            Ok(Served::Shutdown) => {
                broker::close(&conn, "worker shutting down").await;
                shared.metrics.shutdown();
                tracing::info!("worker stopped");
                return Ok(());
            }
            Ok(Served::Lost) => {
                tracing::warn!("broker connection lost; reconnecting");
                failed_sessions.reset();
                broker::Backoff::FIRST
            }
            Err(e) => {
                // E.g. the queues are not declared yet and this worker may not declare
                // them: wait longer each time (up to 10 s) for the coordinator.
                tracing::warn!(error = %format!("{e:#}"), "broker session failed; reconnecting");
                broker::close(&conn, "worker reconnecting").await;
                broker::prefer_another_node(settings);
                failed_sessions.next_delay()
            }
        };
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

enum Served {
    Shutdown,
    Lost,
}

/// How long the batches in flight may take to finish when a session ends.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(20);

/// How long a session's setup (queues checked, channels opened, consuming) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// One broker session: consume until the connection drops or shutdown is asked.
async fn serve(
    conn: &Connection,
    shared: &Arc<Shared>,
    opts: &WorkerOptions,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<Served> {
    // The session's setup, bounded and interruptible: a broker that restarts may leave a
    // channel operation unanswered (a quorum queue electing its leader, a half-open
    // connection), and a SIGTERM must still stop the worker then.
    let setup = async {
        broker::check_or_declare(conn, &shared.topo).await?;
        let consume_ch = conn.create_channel().await?;
        consume_ch
            .basic_qos(opts.prefetch, BasicQosOptions::default())
            .await?;
        let publish_ch = broker::confirmed_channel(conn).await?;
        let consumer = consume_ch
            .basic_consume(
                shared.topo.batches.as_str().into(),
                opts.worker_id.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("start consuming batch orders")?;
        anyhow::Ok((consume_ch, publish_ch, consumer))
    };
    let (consume_ch, publish_ch, mut consumer) = tokio::select! {
        _ = shutdown.as_mut() => return Ok(Served::Shutdown),
        set_up = tokio::time::timeout(SETUP_TIMEOUT, setup) => set_up.map_err(|_| {
            anyhow::anyhow!(
                "the broker did not answer the session's setup within {} s",
                SETUP_TIMEOUT.as_secs()
            )
        })??,
    };
    let permits = Arc::new(Semaphore::new(opts.concurrency));
    let mut tasks = JoinSet::new();
    let served = loop {
        let permit = tokio::select! {
            _ = shutdown.as_mut() => break Served::Shutdown,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        tokio::select! {
            _ = shutdown.as_mut() => break Served::Shutdown,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let shared = shared.clone();
                    let publish_ch = publish_ch.clone();
                    tasks.spawn(async move {
                        handle(&shared, &publish_ch, delivery).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break Served::Lost;
                }
                None => break Served::Lost,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
        while tasks.try_join_next().is_some() {}
    };
    if matches!(served, Served::Shutdown) {
        // Stop new deliveries; those prefetched but not started go back when the channel
        // closes. Then let the batches in flight commit and ack.
        let _ = tokio::time::timeout(
            broker::CLOSE_TIMEOUT,
            consume_ch.basic_cancel(opts.worker_id.as_str().into(), Default::default()),
        )
        .await;
    }
    // The batches in flight finish (each commits or rolls back in its own transaction),
    // within a bound: on a connection the broker reset, an ack or a nack may never be
    // answered, and a worker must still reconnect, or stop on SIGTERM. A batch cut off
    // here rolls back or is already committed; its message comes again either way.
    // A clean stop gives them longer (compose's stop_grace_period is 2 minutes).
    let grace = if matches!(served, Served::Shutdown) {
        IN_FLIGHT_GRACE * 4
    } else {
        IN_FLIGHT_GRACE
    };
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "batches in flight did not finish within {} s; abandoning them (their messages come again)",
            grace.as_secs()
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    broker::close_channel(&consume_ch).await;
    broker::close_channel(&publish_ch).await;
    Ok(served)
}

fn count(shared: &Shared, outcome: &'static str) {
    shared
        .metrics
        .batches
        .add(1, &[KeyValue::new("outcome", outcome)]);
}

/// What a handled batch adds to the metrics.
fn record_metrics(m: &Metrics, r: &BatchResult) {
    let outcome = match r.outcome {
        Outcome::Done => "done",
        Outcome::AlreadyDone => "already_done",
        Outcome::Skipped => "skipped",
        Outcome::DeadLettered => "poison",
    };
    m.batches.add(1, &[KeyValue::new("outcome", outcome)]);
    if r.outcome != Outcome::Done {
        return;
    }
    m.batch_duration.record(r.elapsed_ms as f64 / 1000.0, &[]);
    m.rows_rotated.add(r.counts.n_rotated as u64, &[]);
    for ((key, op, ok), n) in &r.ops {
        let labels = [
            key_label(*key),
            KeyValue::new("outcome", if *ok { "ok" } else { "failed" }),
        ];
        match *op {
            "encrypt" => m.encrypts.add(*n as u64, &labels),
            "decrypt" => {
                m.decrypts.add(*n as u64, &labels);
                if !ok {
                    m.decrypt_errors.add(*n as u64, &[key_label(*key)]);
                }
            }
            _ => {}
        }
    }
}

/// Handles one delivery from decode to ack. Never panics on bad input.
async fn handle(shared: &Shared, publish_ch: &Channel, delivery: Delivery) {
    shared.metrics.batches_in_progress.add(1, &[]);
    // The batch's span, a child of the coordinator's publish span when the message carries
    // its trace context.
    let span = tracing::info_span!(
        "batch",
        run_id = tracing::field::Empty,
        stage = tracing::field::Empty,
        batch_no = tracing::field::Empty,
        worker = %shared.batch.worker_id,
    );
    telemetry::extract(&span, delivery.properties.headers().as_ref());
    // A panic in a batch (a bug; never expected) must not leave its delivery unsettled,
    // which would stop the broker sending this worker anything once `prefetch` of them
    // pile up: the batch is marked failed and its message dead-lettered, and the worker
    // goes on.
    let handled = std::panic::AssertUnwindSafe(handle_in(shared, publish_ch, &delivery))
        .catch_unwind()
        .instrument(span)
        .await;
    if let Err(panic) = handled {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let reason = bounded_reason(&format!(
            "the worker panicked while handling the batch: {what}"
        ));
        count(shared, "failed");
        shared.health.failed();
        let msg = BatchMessage::decode(&delivery.data).ok();
        if let Some(m) = msg.as_ref().filter(|m| shared.ring.verifies(m)) {
            mark_failed(shared, m, &reason).await;
        }
        dead_letter(
            shared,
            publish_ch,
            &delivery,
            msg.as_ref(),
            &reason,
            Audit::Each,
        )
        .await;
    }
    shared.metrics.batches_in_progress.add(-1, &[]);
}

async fn handle_in(shared: &Shared, publish_ch: &Channel, delivery: &Delivery) {
    let msg = match BatchMessage::decode(&delivery.data) {
        Ok(m) => {
            let span = tracing::Span::current();
            span.record("run_id", m.run_id);
            span.record("stage", m.stage_no);
            span.record("batch_no", m.batch_no);
            m
        }
        Err(e) => {
            count(shared, "poison");
            let audit = Audit::Aggregated(e.kind());
            dead_letter(shared, publish_ch, delivery, None, &format!("{e}"), audit).await;
            return;
        }
    };
    // Nothing is read from the database for an order whose tag does not verify (but for
    // a look at which master key wraps the key store, at most every 10 s).
    match shared.ring.authenticate(&shared.pool, &msg).await {
        Ok(()) => {}
        Err(e @ MessageError::OtherMasterKey { .. }) => {
            // A genuine order this worker cannot check: it holds an old master key. Hand
            // it back (after a pause, so that a worker with the right key takes it); the
            // presence row and `rekey status` name the cause.
            count(shared, "handed_back");
            shared
                .health
                .retried("wrong_master_key", &anyhow::anyhow!("{e}"));
            tracing::error!(run_id = msg.run_id, batch_no = msg.batch_no, error = %e, "batch order under another master key; handing it back");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            return;
        }
        Err(e) => {
            count(shared, "poison");
            let audit = Audit::Aggregated(e.kind());
            dead_letter(
                shared,
                publish_ch,
                delivery,
                Some(&msg),
                &format!("{e}"),
                audit,
            )
            .await;
            return;
        }
    }
    let mut attempt = 0u32;
    let mut delay = Duration::from_millis(100);
    loop {
        attempt += 1;
        match rotate_batch(&shared.pool, &shared.ring, &msg, &shared.batch).await {
            Ok(result) => {
                shared.health.success();
                log_result(&msg, &result);
                record_metrics(&shared.metrics, &result);
                rekey_common::failpoint!("worker.after_commit");
                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                    // The batch is committed; a redelivery will find it done.
                    tracing::warn!(run_id = msg.run_id, batch_no = msg.batch_no, error = %e, "ack failed after commit");
                    return;
                }
                rekey_common::failpoint!("worker.after_ack");
                report(shared, publish_ch, &msg, &result).await;
                return;
            }
            Err(BatchError::Poison(reason)) => {
                count(shared, "poison");
                dead_letter(
                    shared,
                    publish_ch,
                    delivery,
                    Some(&msg),
                    &reason,
                    Audit::Each,
                )
                .await;
                return;
            }
            Err(BatchError::Failed(reason)) => {
                count(shared, "failed");
                shared.health.failed();
                mark_failed(shared, &msg, &reason).await;
                dead_letter(
                    shared,
                    publish_ch,
                    delivery,
                    Some(&msg),
                    &reason,
                    Audit::Each,
                )
                .await;
                return;
            }
            Err(BatchError::Transient(e)) if attempt < shared.max_attempts => {
                count(shared, "retried");
                shared.health.retried(error_kind(&e), &e);
                tracing::warn!(run_id = msg.run_id, batch_no = msg.batch_no, attempt, error = %format!("{e:#}"), "batch failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(BatchError::Transient(e)) => {
                count(shared, "handed_back");
                shared.health.retried(error_kind(&e), &e);
                tracing::error!(run_id = msg.run_id, batch_no = msg.batch_no, attempt, error = %format!("{e:#}"), "batch failed; handing it back to the broker");
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                return;
            }
        }
    }
}

/// Records in the ledger that a batch can never succeed, so the run shows it as failed
/// with its reason instead of publishing it again.
async fn mark_failed(shared: &Shared, msg: &BatchMessage, reason: &str) {
    let result = async {
        let c = shared.pool.get().await?;
        ledger::mark_failed(
            &**c,
            msg.run_id,
            msg.batch_no,
            reason,
            &shared.batch.worker_id,
        )
        .await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(run_id = msg.run_id, batch_no = msg.batch_no, error = %format!("{e:#}"), "could not mark a batch failed");
    }
}

fn log_result(msg: &BatchMessage, r: &BatchResult) {
    tracing::info!(
        run_id = msg.run_id,
        batch_no = msg.batch_no,
        outcome = ?r.outcome,
        n_rows = r.counts.n_rows,
        n_rotated = r.counts.n_rotated,
        n_errors = r.counts.n_errors,
        elapsed_ms = r.elapsed_ms,
        "batch handled"
    );
}

async fn report(shared: &Shared, publish_ch: &Channel, msg: &BatchMessage, r: &BatchResult) {
    let rep = BatchReport {
        format: FORMAT_VERSION,
        run_id: msg.run_id,
        batch_no: msg.batch_no,
        outcome: r.outcome,
        n_rows: r.counts.n_rows,
        n_rotated: r.counts.n_rotated,
        n_errors: r.counts.n_errors,
        worker: shared.batch.worker_id.clone(),
        elapsed_ms: r.elapsed_ms,
    };
    if let Err(e) = broker::publish(publish_ch, &shared.topo.reports, &rep.encode(), None).await {
        // Reports only wake the coordinator; the ledger already holds the truth.
        tracing::warn!(run_id = msg.run_id, batch_no = msg.batch_no, error = %format!("{e:#}"), "report not published");
    }
}

/// The most of a refusal's reason kept in the log, the audit entry and the dead letter's
/// header: a reason may quote the sender's text (a table name of any length).
pub const MAX_REASON_BYTES: usize = 256;

/// `reason` cut to [`MAX_REASON_BYTES`] at a character boundary, marked when cut.
pub fn bounded_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_BYTES - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

/// How a refusal is audited.
#[derive(Debug, Clone, Copy)]
enum Audit {
    /// An entry of its own: an authenticated order (or a panic) refused.
    Each,
    /// Counted by kind, one entry a minute (`refusals.rs`): a message refused before it
    /// was authenticated.
    Aggregated(&'static str),
}

/// Sends a refused message to the dead-letter queue with its reason, audits it, and acks
/// the original. If the publish fails, rejects it so the broker dead-letters it instead.
async fn dead_letter(
    shared: &Shared,
    publish_ch: &Channel,
    delivery: &Delivery,
    msg: Option<&BatchMessage>,
    reason: &str,
    audit: Audit,
) {
    let reason = bounded_reason(reason);
    let reason = reason.as_str();
    tracing::error!(
        run_id = msg.map(|m| m.run_id),
        batch_no = msg.map(|m| m.batch_no),
        reason,
        "message refused and dead-lettered"
    );
    match audit {
        Audit::Aggregated(kind) => shared.refusals.note(kind, reason, delivery.data.len()),
        Audit::Each => audit_one(shared, delivery, msg, reason).await,
    }
    let published = broker::publish(
        publish_ch,
        &shared.topo.dead_letters,
        &delivery.data,
        Some(broker::reason_headers(reason)),
    )
    .await;
    let settled = match published {
        Ok(()) => delivery.ack(BasicAckOptions::default()).await,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "dead-letter publish failed; rejecting to the broker's dead-letter route");
            delivery.reject(BasicRejectOptions { requeue: false }).await
        }
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "could not settle a refused message");
    }
}

async fn audit_one(shared: &Shared, delivery: &Delivery, msg: Option<&BatchMessage>, reason: &str) {
    let entry = AuditEntry {
        key_id: None,
        operation: "dead_letter".into(),
        success: false,
        n_ops: 1,
        run_id: msg.map(|m| m.run_id),
        batch_no: msg.map(|m| m.batch_no),
        actor: shared.batch.worker_id.clone(),
        detail: json!({ "reason": reason, "bytes": delivery.data.len() }),
    };
    match shared.pool.get().await {
        Ok(c) => {
            if let Err(e) = audit::record(&**c, &[entry]).await {
                tracing::warn!(error = %format!("{e:#}"), "could not audit a dead-lettered message");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not audit a dead-lettered message"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_cut_to_256_bytes_at_a_character_boundary() {
        assert_eq!(bounded_reason("short"), "short");
        let long = format!("table {} is unknown", "é".repeat(40_000));
        let cut = bounded_reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.starts_with("table éé"));
    }
}
