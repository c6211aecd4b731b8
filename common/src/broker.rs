//! RabbitMQ: connecting (with the URL's password kept out of every message), the queue
//! topology, and publishing with publisher confirms and the mandatory flag.
//!
//! Topology, per `REKEY_QUEUE_PREFIX` (default `rekey`):
//! - `<prefix>.batches`: durable quorum queue of batch orders, with a delivery limit; a
//!   message delivered more often than that is dead-lettered, at least once, to
//! - `<prefix>.batches.dead`: durable quorum queue of refused batch orders; messages the
//!   worker refuses itself carry the reason in the `x-rekey-reason` header;
//! - `<prefix>.reports`: durable quorum queue of batch reports for the coordinator.

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

/// How many times a batch order may be delivered before the broker dead-letters it.
pub const DELIVERY_LIMIT: i64 = 10;

/// Header carrying why a worker refused a message.
pub const REASON_HEADER: &str = "x-rekey-reason";

/// The most messages a dead-letter queue keeps by default; beyond it the oldest are
/// dropped, so that a flood of refused messages cannot fill the broker.
pub const DEFAULT_DEAD_LETTER_MAX_LENGTH: i64 = 10_000;

/// The queue names of one prefix, and the dead-letter queue's length limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub batches: String,
    pub dead_letters: String,
    pub reports: String,
    pub dead_letter_max_length: i64,
}

impl Topology {
    /// The queues of `prefix`, with the default dead-letter limit.
    pub fn new(prefix: &str) -> Self {
        Self {
            batches: format!("{prefix}.batches"),
            dead_letters: format!("{prefix}.batches.dead"),
            reports: format!("{prefix}.reports"),
            dead_letter_max_length: DEFAULT_DEAD_LETTER_MAX_LENGTH,
        }
    }

    /// The queues these settings name: what every process that declares them uses.
    pub fn of(settings: &crate::Settings) -> Self {
        Self {
            dead_letter_max_length: settings.dead_letter_max_length,
            ..Self::new(&settings.queue_prefix)
        }
    }
}

/// What a RabbitMQ user may do in the vhost: the three regular expressions RabbitMQ
/// matches against queue and exchange names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

impl Topology {
    fn names_regex(&self, names: &[&str]) -> String {
        let alternatives: Vec<String> = names.iter().map(|n| n.replace('.', "\\.")).collect();
        format!("^({})$", alternatives.join("|"))
    }

    /// The coordinator's least permissions: declare (and, for the demo, delete) the three
    /// queues (declaring the batch queue with its dead-letter route needs read on it and
    /// write on the default exchange), publish through the default exchange, consume the
    /// reports.
    pub fn coordinator_permissions(&self) -> Permissions {
        Permissions {
            configure: self.names_regex(&[&self.batches, &self.dead_letters, &self.reports]),
            write: "^amq\\.default$".into(),
            read: self.names_regex(&[&self.batches, &self.reports]),
        }
    }

    /// A worker's least permissions: consume the batch queue and publish (reports and dead
    /// letters) through the default exchange. No configure: a worker only checks that the
    /// queues exist ([`check_or_declare`]). Publishing through the default exchange cannot
    /// be limited by queue in RabbitMQ, which is why batch orders carry a tag a worker (or
    /// anyone without the master key) cannot make.
    pub fn worker_permissions(&self) -> Permissions {
        Permissions {
            configure: "^$".into(),
            write: "^amq\\.default$".into(),
            read: self.names_regex(&[&self.batches]),
        }
    }
}

/// A password as RabbitMQ's definitions hold it (`rabbit_password_hashing_sha256`):
/// base64 of a random 4-byte salt followed by SHA-256(salt || password).
pub fn password_hash(password: &SecretString) -> String {
    use base64::Engine;
    use rand::TryRng;
    use sha2::{Digest, Sha256};
    let mut salt = [0u8; 4];
    rand::rngs::SysRng
        .try_fill_bytes(&mut salt)
        .expect("the operating system's random number generator failed");
    let digest = Sha256::new()
        .chain_update(salt)
        .chain_update(password.expose_secret().as_bytes())
        .finalize();
    let mut bytes = salt.to_vec();
    bytes.extend_from_slice(&digest);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `host:port/vhost` of an AMQP URL, without credentials, for messages.
pub fn redacted(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    rest.split('?').next().unwrap_or(rest).to_owned()
}

/// Connects once, naming `REKEY_AMQP_URL` and the address (never the password) on failure.
pub async fn connect(url: &SecretString, name: &str) -> anyhow::Result<Connection> {
    connect_from(url, "set by REKEY_AMQP_URL", name).await
}

/// How long one connection attempt to one node may take: a node that is paused or cut off
/// by a partition does not refuse, it never answers; past this the next node is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The node of [`crate::Settings::amqp_urls`] this process last connected to: the first
/// one tried next time, so that a reconnection after a node's loss does not wait on the
/// lost node first when another answered.
static PREFERRED_NODE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The node of [`crate::Settings::amqp_urls`] this process last connected to (`usize::MAX`:
/// none yet), to say when a connection goes to another node than before.
static CONNECTED_NODE: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(usize::MAX);

/// Connects to the first node of the settings' URLs that answers (several URLs are the
/// nodes of one RabbitMQ cluster), starting with the one this process last reached, each
/// attempt bounded by [`CONNECT_TIMEOUT`]. On failure names every address tried (never a
/// password) and where the URLs came from.
pub async fn connect_settings(
    settings: &crate::Settings,
    name: &str,
) -> anyhow::Result<Connection> {
    let urls = &settings.amqp_urls;
    if urls.len() <= 1 {
        let url = &settings.amqp_url;
        return tokio::time::timeout(
            CONNECT_TIMEOUT,
            connect_from(url, &settings.amqp_url_from, name),
        )
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "RabbitMQ at {} ({}) did not answer within {} s",
                redacted(url.expose_secret()),
                settings.amqp_url_from,
                CONNECT_TIMEOUT.as_secs()
            ))
        });
    }
    use std::sync::atomic::Ordering;
    let first = PREFERRED_NODE.load(Ordering::Relaxed) % urls.len();
    let mut failures = Vec::new();
    for k in 0..urls.len() {
        let i = (first + k) % urls.len();
        let url = &urls[i];
        let attempt = tokio::time::timeout(
            CONNECT_TIMEOUT,
            connect_from(url, &settings.amqp_url_from, name),
        )
        .await;
        match attempt {
            Ok(Ok(conn)) => {
                let before = CONNECTED_NODE.swap(i, Ordering::Relaxed);
                if before != usize::MAX && before != i {
                    tracing::warn!(
                        node = %redacted(url.expose_secret()),
                        previous = %redacted(urls[before % urls.len()].expose_secret()),
                        "connected to another RabbitMQ node of REKEY_AMQP_URL"
                    );
                }
                PREFERRED_NODE.store(i, Ordering::Relaxed);
                return Ok(conn);
            }
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(_) => failures.push(format!(
                "RabbitMQ at {} did not answer within {} s",
                redacted(url.expose_secret()),
                CONNECT_TIMEOUT.as_secs()
            )),
        }
    }
    bail!(
        "none of the {} RabbitMQ nodes of REKEY_AMQP_URL ({}) answered: {}",
        urls.len(),
        settings.amqp_url_from,
        failures.join("; ")
    )
}

/// After a session on the current node failed (a publish never confirmed, a queue that
/// did not answer: e.g. a node cut off in a minority partition still accepts connections),
/// the next connection tries the next node first.
pub fn prefer_another_node(settings: &crate::Settings) {
    if settings.amqp_urls.len() > 1 {
        PREFERRED_NODE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The node of the settings' URLs this process is connected to (or last was): its
/// address, without credentials.
pub fn current_node(settings: &crate::Settings) -> String {
    let urls = &settings.amqp_urls;
    if urls.is_empty() {
        return redacted(settings.amqp_url.expose_secret());
    }
    let i = PREFERRED_NODE.load(std::sync::atomic::Ordering::Relaxed) % urls.len();
    redacted(urls[i].expose_secret())
}

/// Connects once; on failure names the address (never the password) and `from`, where the
/// URL came from ("set by REKEY_AMQP_URL", …).
pub async fn connect_from(
    url: &SecretString,
    from: &str,
    name: &str,
) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    // `cacertfile` (RabbitMQ's URI parameter) names CA certificates to trust for amqps://.
    let (uri, ca_file) = crate::tls::take_param(url.expose_secret(), "cacertfile");
    let uri = with_default_heartbeat(uri);
    let connected = match ca_file {
        None => Connection::connect(&uri, props).await,
        Some(f) => {
            let pem = crate::tls::read_ca("REKEY_AMQP_URL (cacertfile)", &f)?;
            let tls = lapin::tcp::OwnedTLSConfig {
                identity: None,
                cert_chain: Some(pem),
            };
            let runtime = lapin::runtime::default_runtime()
                .map_err(|e| anyhow::anyhow!("no runtime for the broker connection: {e}"))?;
            Connection::connect_with_config(&uri, props, tls, runtime).await
        }
    };
    connected.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach RabbitMQ at {} ({from}): {}",
            redacted(url.expose_secret()),
            scrub(&scrub(&e.to_string(), url.expose_secret()), &uri)
        )
    })
}

/// The AMQP heartbeat rekey asks for unless the URL sets one (`?heartbeat=N`): a node cut
/// off by a partition (or a dead link) does not close its connections, and without
/// heartbeats a client notices only when a publish's confirm times out. RabbitMQ's own
/// default is 60 s; at 10 s a lost node is noticed within about 20 s and the client fails
/// over to another node of `REKEY_AMQP_URL`.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

fn with_default_heartbeat(uri: String) -> String {
    let query = uri.split_once('?').map(|(_, q)| q).unwrap_or("");
    if query.split('&').any(|p| p.starts_with("heartbeat=")) {
        return uri;
    }
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}heartbeat={DEFAULT_HEARTBEAT_SECS}")
}

/// Removes a URL (and so its password) from an error text, in case a library echoes it.
fn scrub(text: &str, url: &str) -> String {
    text.replace(url, "<REKEY_AMQP_URL>")
}

/// The reconnect policy of every rekey process: 200 ms after the first failure, doubling,
/// at most 10 s; back to 200 ms once connected.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(10);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The wait before the next attempt (the one after waits twice as long).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(Self::MAX);
        d
    }

    /// Connected: the next failure waits the shortest time again.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Connects to the settings' broker, retrying by `backoff` until it answers, or until
/// `stop` completes (then `None`): the reconnect loop of the worker and the coordinator.
/// Each failure is logged with its cause (never the password).
pub async fn connect_until(
    settings: &crate::Settings,
    name: &str,
    backoff: &mut Backoff,
    stop: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> Option<Connection> {
    loop {
        let attempt = tokio::select! {
            _ = &mut *stop => return None,
            c = connect_settings(settings, name) => c,
        };
        match attempt {
            Ok(c) => {
                backoff.reset();
                return Some(c);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "broker unreachable");
                tokio::select! {
                    _ = &mut *stop => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Connects, retrying by [`Backoff`] until `deadline` passes.
pub async fn connect_with_retry(
    url: &SecretString,
    name: &str,
    deadline: Duration,
) -> anyhow::Result<Connection> {
    let start = std::time::Instant::now();
    let mut backoff = Backoff::new();
    loop {
        match connect(url, name).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                let delay = backoff.next_delay();
                if start.elapsed() + delay >= deadline {
                    return Err(e);
                }
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "broker connection failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn quorum_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(ShortString::from("x-queue-type"), long("quorum"));
    t
}

/// Declares the queues (idempotent: the same arguments every time).
pub async fn declare(channel: &Channel, topo: &Topology) -> anyhow::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut dead = quorum_args();
    dead.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(topo.dead_letter_max_length),
    );
    dead.insert("x-overflow".into(), long("drop-head"));
    channel
        .queue_declare(topo.dead_letters.as_str().into(), durable, dead)
        .await
        .with_context(|| {
            format!(
                "declare queue {} (x-max-length {}: a queue declared before with another limit, or none, must be deleted first or given the same REKEY_DEAD_LETTER_MAX_LENGTH)",
                topo.dead_letters, topo.dead_letter_max_length
            )
        })?;
    let mut args = quorum_args();
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    args.insert("x-dead-letter-exchange".into(), long(""));
    args.insert("x-dead-letter-routing-key".into(), long(&topo.dead_letters));
    // At-least-once dead-lettering (RabbitMQ 3.10+) needs reject-publish overflow.
    args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    args.insert("x-overflow".into(), long("reject-publish"));
    channel
        .queue_declare(topo.batches.as_str().into(), durable, args)
        .await
        .with_context(|| format!("declare queue {}", topo.batches))?;
    channel
        .queue_declare(topo.reports.as_str().into(), durable, quorum_args())
        .await
        .with_context(|| format!("declare queue {}", topo.reports))?;
    Ok(())
}

/// For a worker: checks that the queues exist (a passive declaration, which needs no
/// permission), and declares them only if one is missing, which needs the configure
/// permission a least-privileged worker user does not have: then the error says that the
/// coordinator declares them (`rekey preflight`, `rekey rotate`).
pub async fn check_or_declare(conn: &Connection, topo: &Topology) -> anyhow::Result<()> {
    let ch = conn
        .create_channel()
        .await
        .context("open a broker channel")?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut all_there = true;
    for q in [&topo.batches, &topo.dead_letters, &topo.reports] {
        // A missing queue closes the channel: no need to look further.
        if ch
            .queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await
            .is_err()
        {
            all_there = false;
            break;
        }
    }
    if all_there {
        close_channel(&ch).await;
        return Ok(());
    }
    let ch = conn
        .create_channel()
        .await
        .context("open a broker channel")?;
    let declared = declare(&ch, topo).await.context(
        "the queues do not exist yet and this user could not declare them (a worker user without the configure permission needs the coordinator to declare them first: `rekey preflight` or `rekey rotate`)",
    );
    close_channel(&ch).await;
    declared
}

/// Opens a channel with publisher confirms on.
pub async fn confirmed_channel(conn: &Connection) -> anyhow::Result<Channel> {
    let ch = conn
        .create_channel()
        .await
        .context("open a broker channel")?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enable publisher confirms")?;
    Ok(ch)
}

/// How long a publish may wait for the broker's confirm. A broker under a memory or disk
/// alarm blocks publishers without a word; past this the publish is an error that says
/// so (the caller retries or reconnects) instead of a silent hang.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes a persistent message to `queue` through the default exchange, mandatory, and
/// waits for the broker's confirm (at most [`CONFIRM_TIMEOUT`]). A nack, a returned
/// message or no confirm in time is an error.
pub async fn publish(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    headers: Option<FieldTable>,
) -> anyhow::Result<()> {
    tokio::time::timeout(CONFIRM_TIMEOUT, publish_confirmed(channel, queue, payload, headers))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the broker did not confirm a message for {queue} within {} s (is it blocking publishers under a memory or disk alarm? `rabbitmq-diagnostics alarms`)",
                CONFIRM_TIMEOUT.as_secs()
            )
        })?
}

async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    headers: Option<FieldTable>,
) -> anyhow::Result<()> {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/x-rekey-bincode".into());
    if let Some(h) = headers {
        props = props.with_headers(h);
    }
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            payload,
            props,
        )
        .await
        .with_context(|| format!("publish to {queue}"))?
        .await
        .with_context(|| format!("await the broker's confirm for {queue}"))?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(ret)) => bail!(
            "the broker returned a message for {queue}: {} {}",
            ret.reply_code,
            ret.reply_text
        ),
        Confirmation::Nack(_) => bail!("the broker refused (nacked) a message for {queue}"),
        Confirmation::NotRequested => bail!("publisher confirms are not enabled on this channel"),
    }
}

/// Headers with the reason a message was refused.
pub fn reason_headers(reason: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(REASON_HEADER.into(), long(reason));
    t
}

/// A queue's state from a passive declare: (messages ready, consumers attached).
async fn inspect(channel: &Channel, queue: &str) -> anyhow::Result<(u32, u32)> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("inspect queue {queue}"))?;
    Ok((q.message_count(), q.consumer_count()))
}

/// Messages ready in a queue.
pub async fn queue_depth(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    Ok(inspect(channel, queue).await?.0)
}

/// Consumers attached to a queue: how many workers are listening.
pub async fn consumer_count(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    Ok(inspect(channel, queue).await?.1)
}

/// How long a polite close may take before the connection is simply dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes a connection politely, giving up after [`CLOSE_TIMEOUT`]: nothing rekey needs
/// depends on the broker's close-ok, and a driver or worker that has finished must never
/// hang on it (seen once in the test suite: a completed run's driver never returned).
pub async fn close(conn: &Connection, reason: &str) {
    if tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, reason.into()))
        .await
        .is_err()
    {
        tracing::warn!(
            reason,
            "the broker did not confirm the connection close within 5 s; dropping it"
        );
    }
}

/// Closes a channel politely, giving up after [`CLOSE_TIMEOUT`].
pub async fn close_channel(ch: &Channel) {
    if tokio::time::timeout(CLOSE_TIMEOUT, ch.close(200, "bye".into()))
        .await
        .is_err()
    {
        tracing::warn!("the broker did not confirm a channel close within 5 s; dropping it");
    }
}

/// Deletes the queues of a topology (tests and `rekey` clean-up).
pub async fn delete(channel: &Channel, topo: &Topology) -> anyhow::Result<()> {
    for q in [&topo.batches, &topo.dead_letters, &topo.reports] {
        channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("delete queue {q}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_heartbeat_is_asked_for_unless_the_url_sets_one() {
        use super::with_default_heartbeat as h;
        assert_eq!(h("amqp://h/%2f".into()), "amqp://h/%2f?heartbeat=10");
        assert_eq!(
            h("amqp://h/%2f?frame_max=8192".into()),
            "amqp://h/%2f?frame_max=8192&heartbeat=10"
        );
        assert_eq!(
            h("amqp://h/%2f?heartbeat=30".into()),
            "amqp://h/%2f?heartbeat=30"
        );
    }

    #[test]
    fn redacted_url_has_no_credentials() {
        assert_eq!(
            super::redacted("amqp://guest:s3cret@10.0.0.1:5672/%2f"),
            "10.0.0.1:5672/%2f"
        );
        assert_eq!(super::redacted("amqps://h:5671/v?heartbeat=5"), "h:5671/v");
    }
}
