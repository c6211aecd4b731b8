//! What driving a run works with: the options it is driven by (`DriveOptions`, with the
//! defaults the flags share), the session's context (`Driver`) and what the driver keeps in
//! memory about the current stage (`StageRuntime`).

use crate::{probe, throttle};
use deadpool_postgres::Pool;
use rekey_common::Settings;
use rekey_common::broker::Topology;
use rekey_common::keys::master::MasterKey;
use rekey_common::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::progress::ProgressMode;

/// How the driver paces a run.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// Batches published and not yet done, at most.
    pub max_in_flight: i64,
    /// A published batch not done within this time is published again.
    pub lease: Duration,
    /// Publications of one batch before it is marked failed.
    pub max_attempts: i32,
    /// How often the ledger is re-read when no report arrives.
    pub tick: Duration,
    /// Steps (ledger reads, publishing) come at most this often however fast reports come.
    pub min_step: Duration,
    /// Show an indicatif bar (terminal) or plain lines (elsewhere), or nothing.
    pub progress: ProgressMode,
    /// How often the throttle decides, on the probe's samples since its last decision.
    pub probe_every: Duration,
    /// How often the background probe queries while a stage rotates.
    pub probe_spacing: Duration,
    /// Where the run's gauges go (served by `--metrics-addr`).
    pub metrics: Option<Arc<Metrics>>,
    /// Batches waiting and no consumer on the batch queue for this long: a `no_consumer`
    /// event.
    pub no_consumer_after: Duration,
    /// Where run events go: the log, and the event counter and webhook if it has them.
    pub events: crate::events::Events,
    /// While this file exists, nothing new is published (gh-ost's throttle flag file).
    pub throttle_flag_file: Option<std::path::PathBuf>,
}

/// The driver's defaults, one place for the flags (`DriveArgs`) and `DriveOptions`.
pub const DEFAULT_MAX_IN_FLIGHT: i64 = 64;

pub const DEFAULT_LEASE: Duration = Duration::from_secs(120);

impl Default for DriveOptions {
    fn default() -> Self {
        Self {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            lease: DEFAULT_LEASE,
            max_attempts: 20,
            tick: Duration::from_millis(500),
            min_step: Duration::from_millis(100),
            progress: ProgressMode::Auto,
            probe_every: Duration::from_secs(2),
            probe_spacing: Duration::from_millis(50),
            metrics: None,
            throttle_flag_file: None,
            no_consumer_after: Duration::from_secs(30),
            events: crate::events::Events::default(),
        }
    }
}

/// What the driver keeps in memory about the current stage (lost on restart, which only
/// restarts the latency samples and the throttle).
#[derive(Debug, Default)]
pub(crate) struct StageRuntime {
    pub(crate) stage_no: Option<i32>,
    pub(crate) perf: throttle::PerfTracker,
    /// Set when the stage starts rotating.
    pub(crate) throttle: Option<throttle::Throttle>,
    pub(crate) prober: Option<probe::Prober>,
    pub(crate) last_publish: Option<Instant>,
    pub(crate) last_probe: Option<Instant>,
    pub(crate) last_observation: Option<Instant>,
    pub(crate) ring: Option<rekey_common::keys::ring::KeyRing>,
    /// What held publication at the last step, as said (event and driver row).
    pub(crate) said_throttle: Option<String>,
    /// Whether a hold (not the latency throttle) held publication at the last step.
    pub(crate) said_held: bool,
    /// The replicas' brake as last looked at (`brakes.rs`), and when.
    pub(crate) brake: Option<String>,
    pub(crate) last_brake_check: Option<Instant>,
    pub(crate) looks: crate::brakes::Looks,
    /// The application's Prometheus, when the run has an SLO query.
    pub(crate) slo: Option<crate::slo::Slo>,
    /// Why the last SLO query failed, while it fails (a `signal_lost` event once per
    /// failure streak; `rekey status` shows it).
    pub(crate) slo_error: Option<String>,
    /// Which latency signal holds the throttle back now, its value and limit.
    pub(crate) latency_reason: Option<String>,
    /// Judgements made while batches were worked on (slow start waits for them).
    pub(crate) judged: usize,
    /// The signal the last `throttling` event named (`probe`, `prometheus`).
    pub(crate) said_signal: Option<&'static str>,
    /// When the stage's rotation was first driven and last re-baselined, and since when a
    /// re-baseline holds publication (waiting for the batches in flight to finish).
    pub(crate) rotating_since: Option<Instant>,
    pub(crate) last_rebaseline: Option<Instant>,
    pub(crate) rebaselining: Option<Instant>,
    /// Since when a re-baseline has had nothing in flight (the application's own p99 is
    /// asked once its query's window is clear of the rotation).
    pub(crate) rebaseline_drained: Option<Instant>,
}

impl StageRuntime {
    /// While pacing: how long until the next batch may be published, if it must wait.
    pub(crate) fn paced_for(&self) -> Option<Duration> {
        let gap = self.throttle.as_ref()?.gap;
        if gap.is_zero() {
            return None;
        }
        // Once the gap has passed, the next batch waits only for room in the window,
        // which a report announces: no early wake-up then.
        let left = gap.saturating_sub(self.last_publish?.elapsed());
        (!left.is_zero()).then_some(left)
    }
}

/// What every step of a driving session works with: the run, where it lives, the master
/// key, the broker channel it publishes on, and how it is paced.
#[derive(Clone, Copy)]
pub(crate) struct Driver<'a> {
    pub(crate) pool: &'a Pool,
    pub(crate) settings: &'a Settings,
    pub(crate) master: &'a MasterKey,
    /// Tags the batch orders (derived from `master`).
    pub(crate) message_key: &'a rekey_common::messages::MessageKey,
    pub(crate) channel: &'a lapin::Channel,
    pub(crate) topo: &'a Topology,
    pub(crate) run_id: i64,
    pub(crate) opts: &'a DriveOptions,
    /// Consumers on the batch queue as last counted (-1: not yet).
    pub(crate) consumers: &'a std::sync::atomic::AtomicI32,
    /// Where the run's events go (`opts.events`).
    pub(crate) events: &'a crate::events::Events,
}

/// What the driver knows of the batch queue's consumers, across stages and sessions.
#[derive(Debug, Default)]
pub(crate) struct ConsumerWatch {
    pub(crate) last_check: Option<Instant>,
    /// Since when batches have waited with nobody consuming.
    pub(crate) none_since: Option<Instant>,
    /// Whether the `no_consumer` event was said for this stretch.
    pub(crate) said: bool,
    /// The failure kinds of live workers already said (`workers_failing`), until they clear.
    pub(crate) failing_said: std::collections::BTreeSet<String>,
}
