//! The latency throttle and the performance figures of a stage: how many batches may be in
//! flight and how fast they are published, from the probe's samples (see docs/throttle.md).

use rekey_common::ledger;

use serde::Serialize;

/// Performance figures of a stage, collected by the driver while the stage ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PerfFigures {
    pub baseline_ms: Option<f64>,
    pub samples: usize,
    pub median_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub impact_pct: f64,
    pub max_impact_pct: f64,
    /// Judgements at which probes over the throttle's threshold slowed the run.
    pub throttled_samples: usize,
    /// The longest gap between publications the throttle paced the stage at (0: never).
    pub max_gap_ms: u64,
    /// The probe's reads' 99th percentile before the run and over the stage (milliseconds),
    /// and its writes'.
    pub baseline_p99_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub write_baseline_p99_ms: Option<f64>,
    pub write_p99_ms: Option<f64>,
    /// A read (a write) slower than this counted against the throttle; how many probes
    /// were taken and how many were over (the throttle holds that share near 1%).
    pub throttle_threshold_ms: Option<f64>,
    pub write_throttle_threshold_ms: Option<f64>,
    pub probes: u64,
    pub probes_over: u64,
    /// Consecutive samples over the breach threshold, at most.
    pub max_consecutive_over_breach: usize,
    pub breached: bool,
    /// The application's p99 from its Prometheus (`--slo-query`): before the run, the
    /// last and the highest answer over the stage (milliseconds), how many answers were
    /// judged and how many were over the limit.
    pub slo_baseline_ms: Option<f64>,
    pub slo_ms: Option<f64>,
    pub slo_max_ms: Option<f64>,
    pub slo_limit_ms: Option<f64>,
    /// What the throttle steers the application's p99 to (see `SLO_AIM_SHARE`).
    pub slo_aim_ms: Option<f64>,
    pub slo_polls: u64,
    pub slo_polls_over: u64,
    /// Re-baselines during the stage, and the last one's p99 (reads, writes).
    pub rebaselines: u64,
    pub rebaselined_p99_ms: Option<f64>,
    pub rebaselined_write_p99_ms: Option<f64>,
}

/// Latency samples of one stage and the throttle decision.
#[derive(Debug, Clone, Default)]
pub struct PerfTracker {
    pub samples_ms: Vec<f64>,
    pub impacts: Vec<f64>,
    consecutive_over_breach: usize,
    reads: crate::probe::Histogram,
    writes: crate::probe::Histogram,
    pub figures: PerfFigures,
}

/// The throttle: how many batches may be in flight and, while pacing, how often one may be
/// published, both set by one level. Level 0 is full speed; each level up to log2(max)
/// halves the batches in flight; past that, at one batch, the gap between publications
/// grows to `GAP_UNIT × (2^x − 1)` x levels past (100 ms, 300 ms, 700 ms, … `MAX_GAP`).
///
/// The level follows the probes one by one. A probe over the threshold (the probe's p99
/// before the run plus the latency budget) raises it by `STEP`; a probe under it lowers
/// it by `STEP × p / (1 − p)`, p = `TARGET_SHARE` (1%). The level comes to rest where 1% of
/// the probes are over the threshold, that is where the probe's p99 is its baseline p99
/// plus the budget: the application's p99 is what the budget is about, and a p99 is moved
/// by rare stalls that a median or a 95th percentile does not see. Heavy impact (one probe
/// in five over) climbs a level every ten probes; clean probes take a level back every 198
/// (10 s at one probe per 50 ms). A stage starts at one batch in flight (a slow start), so
/// that a rotation never opens at full speed on a database it has not measured.
///
/// The application's own p99 (`--slo-query`), when given, moves a level of its own, and
/// the higher of the two levels governs (the worse signal). That level integrates the
/// signal's distance from its aim, symmetrically: `SLO_GAIN × ln(p99 / aim)` per judgement
/// (at most `SLO_MAX_UP` up and `SLO_MAX_DOWN` down), so a p99 that wanders around its aim
/// from window to window leaves the level where it is, and the level rests where the
/// application's p99 is its aim on (geometric) average. See [`SloReading`].
#[derive(Debug, Clone, PartialEq)]
pub struct Throttle {
    max: i64,
    level: f64,
    slo_level: Option<f64>,
    pub window: i64,
    pub gap: std::time::Duration,
    /// In slow start: paced, and each clean judgement doubles the pace until the first
    /// probe over the threshold (or full speed) ends it.
    pub slow: bool,
}

/// Slow start begins this many levels past one batch in flight: one batch per 1.5 s.
pub const SLOW_START_LEVELS: f64 = 4.0;

/// A judgement speeds a slow start up only on at least this many probes, all under.
pub const SLOW_START_MIN_PROBES: usize = 20;

/// The pacing unit and the longest gap between publications.
pub const GAP_UNIT: std::time::Duration = std::time::Duration::from_millis(100);

pub const MAX_GAP: std::time::Duration = std::time::Duration::from_secs(30);

/// What one probe over the threshold adds to the level.
pub const STEP: f64 = 0.5;

/// The share of probes over the threshold the throttle holds a run to.
pub const TARGET_SHARE: f64 = 0.01;

/// The application's p99 level: levels per judgement per unit of `ln(p99 / aim)` (15% over
/// its aim: +0.28; at a baseline 9% under its aim: −0.19, a level every 10 s at a
/// judgement every 2 s), and the most one judgement moves it.
pub const SLO_GAIN: f64 = 2.0;
pub const SLO_MAX_UP: f64 = 1.0;
pub const SLO_MAX_DOWN: f64 = 0.5;

/// The application's p99 at one judgement (milliseconds): the throttle steers it to its
/// aim, the part of the latency budget it spends on average (`SLO_AIM_SHARE`); over the
/// limit it ends a slow start and counts as a judgement over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SloReading {
    pub ms: f64,
    pub aim_ms: f64,
    pub limit_ms: f64,
}

impl SloReading {
    pub fn over_limit(&self) -> bool {
        self.ms > self.limit_ms
    }

    /// What this reading moves the application's level by.
    pub fn step(&self) -> f64 {
        if self.ms <= 0.0 || self.aim_ms <= 0.0 || !self.ms.is_finite() {
            return 0.0;
        }
        (SLO_GAIN * (self.ms / self.aim_ms).ln()).clamp(-SLO_MAX_DOWN, SLO_MAX_UP)
    }
}

impl Throttle {
    /// A stage's throttle: with `slow_start`, one batch per 1.5 s until the throttle has
    /// judged the database under the rotation; else from `max`.
    pub fn new(max: i64, slow_start: bool) -> Self {
        let mut t = Self {
            max: max.max(1),
            level: 0.0,
            slo_level: None,
            window: max.max(1),
            gap: std::time::Duration::ZERO,
            slow: slow_start,
        };
        if slow_start {
            t.level = t.halvings() + SLOW_START_LEVELS;
        }
        t.apply();
        t
    }

    /// One judgement of the probes and, when configured, the application's p99: in slow
    /// start a clean judgement (no probe over, the application under its limit) of at
    /// least [`SLOW_START_MIN_PROBES`] probes or with the application's word halves the gap
    /// (or doubles the window), the first unclean one ends slow start; after it,
    /// [`Throttle::adjust`] for the probes and [`Throttle::adjust_slo`] for the
    /// application.
    pub fn judge(&mut self, over: usize, under: usize, in_flight: i64, slo: Option<SloReading>) {
        if self.slow {
            if over == 0 && !slo.is_some_and(|r| r.over_limit()) {
                if under >= SLOW_START_MIN_PROBES || slo.is_some() {
                    self.level = (self.level - 1.0).max(0.0);
                    self.slow = self.level > 0.0;
                    self.apply();
                }
                return;
            }
            self.slow = false;
        }
        self.adjust(over, under, in_flight);
        if let Some(r) = slo {
            self.adjust_slo(r, in_flight);
        }
    }

    /// Moves the application's level by one reading ([`SloReading::step`]); the first
    /// reading starts it where the probes' level is.
    pub fn adjust_slo(&mut self, r: SloReading, in_flight: i64) {
        let mut level = self.slo_level.unwrap_or(self.level);
        if r.over_limit() && self.window > in_flight.max(1) {
            level = level.max((self.max as f64 / in_flight.max(1) as f64).log2());
        }
        self.slo_level = Some((level + r.step()).clamp(0.0, self.top()));
        self.apply();
    }

    /// The application's signal is lost: its level is dropped and the probes' governs
    /// until it answers again (then it starts from the probes' level).
    pub fn forget_slo(&mut self) {
        if self.slo_level.take().is_some() {
            self.apply();
        }
    }

    /// Which signal governs now: the application's p99 when its level is the higher.
    pub fn slo_governs(&self) -> bool {
        self.slo_level.is_some_and(|l| l > self.level)
    }

    /// Levels from `max` batches in flight down to one.
    fn halvings(&self) -> f64 {
        (self.max as f64).log2().ceil()
    }

    /// The highest level: one batch per `MAX_GAP`.
    fn top(&self) -> f64 {
        self.halvings() + (MAX_GAP.as_secs_f64() / GAP_UNIT.as_secs_f64() + 1.0).log2()
    }

    fn apply(&mut self) {
        let h = self.halvings();
        let level = self.level.max(self.slo_level.unwrap_or(0.0));
        if level < h {
            self.window = ((self.max as f64) / level.exp2()).floor().max(1.0) as i64;
            self.gap = std::time::Duration::ZERO;
        } else {
            self.window = 1;
            self.gap = GAP_UNIT.mul_f64((level - h).exp2() - 1.0).min(MAX_GAP);
        }
    }

    /// After `over` probes over the threshold and `under` probes under it; `in_flight` the
    /// batches in flight now.
    pub fn adjust(&mut self, over: usize, under: usize, in_flight: i64) {
        if over > 0 && self.window > in_flight.max(1) {
            // The window may be far above what the workers take: slowing down starts from
            // what is in flight, not from what is allowed.
            self.level = self
                .level
                .max((self.max as f64 / in_flight.max(1) as f64).log2());
        }
        let down = STEP * TARGET_SHARE / (1.0 - TARGET_SHARE);
        self.level += STEP * over as f64 - down * under as f64;
        self.level = self.level.clamp(0.0, self.top());
        self.apply();
    }

    /// Whether the throttle holds the run below its configured pace.
    pub fn engaged(&self) -> bool {
        self.window < self.max || !self.gap.is_zero()
    }
}

/// Samples over the breach threshold in a row that make a breach ("sustained").
pub const SUSTAINED_SAMPLES: usize = 3;

impl PerfTracker {
    /// Counts the stage's probes one by one against the throttle's threshold for their
    /// kind; returns how many were over it and how many under (both 0 when the throttle is
    /// off).
    pub fn probes(
        &mut self,
        settings: &ledger::RunSettings,
        samples: &[crate::probe::Sample],
    ) -> (usize, usize) {
        let (read_limit, write_limit) = (
            settings.throttle_threshold_ms(false),
            settings.throttle_threshold_ms(true),
        );
        let mut over = 0;
        for s in samples {
            let (h, limit) = if s.write {
                (&mut self.writes, write_limit)
            } else {
                (&mut self.reads, read_limit)
            };
            h.record(s.ms);
            if limit.is_some_and(|l| s.ms > l) {
                over += 1;
            }
        }
        let f = &mut self.figures;
        f.baseline_p99_ms = settings.probe_baseline_p99_ms;
        f.write_baseline_p99_ms = settings.probe_write_baseline_p99_ms;
        f.throttle_threshold_ms = read_limit;
        f.write_throttle_threshold_ms = write_limit.filter(|_| self.writes.count() > 0);
        f.probes = self.reads.count() + self.writes.count();
        f.probes_over += over as u64;
        f.p99_ms = self.reads.quantile(0.99);
        f.write_p99_ms = self.writes.quantile(0.99);
        if over > 0 {
            f.throttled_samples += 1;
        }
        match read_limit {
            Some(_) => (over, samples.len() - over),
            None => (0, 0),
        }
    }

    /// Records a judgement's median (milliseconds) for the breach: its median `breach_pct`
    /// over the baseline (and by more than `min_impact_ms`) for `SUSTAINED_SAMPLES`
    /// judgements in a row. Noise on a busy machine does not move a median; the throttle
    /// answers the tail (`probes`).
    pub fn record(&mut self, settings: &ledger::RunSettings, ms: f64) {
        let baseline = settings.probe_baseline_ms;
        let impact = baseline
            .map(|b| crate::probe::impact_pct(b, ms, settings.min_impact_ms))
            .unwrap_or(0.0);
        self.samples_ms.push(ms);
        self.impacts.push(impact);
        if impact > settings.breach_pct {
            self.consecutive_over_breach += 1;
        } else {
            self.consecutive_over_breach = 0;
        }
        let f = &mut self.figures;
        f.baseline_ms = baseline;
        f.samples = self.samples_ms.len();
        let mut sorted = self.samples_ms.clone();
        sorted.sort_by(f64::total_cmp);
        f.median_ms = Some(sorted[sorted.len() / 2]);
        f.max_ms = sorted.last().copied();
        f.impact_pct = baseline
            .map(|b| crate::probe::impact_pct(b, sorted[sorted.len() / 2], settings.min_impact_ms))
            .unwrap_or(0.0);
        f.max_impact_pct = f.max_impact_pct.max(impact);
        f.max_consecutive_over_breach = f
            .max_consecutive_over_breach
            .max(self.consecutive_over_breach);
        if self.consecutive_over_breach >= SUSTAINED_SAMPLES {
            f.breached = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ledger::RunSettings {
        ledger::RunSettings {
            probe_baseline_ms: Some(10.0),
            ..Default::default()
        }
    }

    #[test]
    fn a_median_over_20_percent_for_three_judgements_in_a_row_breaches() {
        let s = settings();
        let mut t = PerfTracker::default();
        t.record(&s, 11.0);
        assert!(
            t.figures.impact_pct == 0.0,
            "+10% (1 ms, under the noise floor) is no impact"
        );
        // Over 20% twice, a normal sample, then three in a row: only the last is a breach.
        t.record(&s, 13.0);
        t.record(&s, 13.0);
        t.record(&s, 10.0);
        assert!(!t.figures.breached);
        t.record(&s, 13.0);
        t.record(&s, 13.0);
        assert!(!t.figures.breached);
        t.record(&s, 13.0);
        assert!(t.figures.breached);
        assert_eq!(t.figures.max_consecutive_over_breach, SUSTAINED_SAMPLES);
    }

    #[test]
    fn probes_count_against_their_kinds_baseline_p99_plus_the_budget() {
        use crate::probe::Sample;
        let read = |ms| Sample { ms, write: false };
        let write = |ms| Sample { ms, write: true };
        let s = ledger::RunSettings {
            probe_baseline_ms: Some(0.3),
            probe_baseline_p99_ms: Some(2.0),
            probe_write_baseline_p99_ms: Some(6.0),
            ..Default::default()
        };
        // 15% of the probe's own 2 ms p99 is 0.3 ms, under the 0.5 ms floor.
        assert_eq!(s.throttle_threshold_ms(false), Some(2.5));
        assert_eq!(
            s.throttle_threshold_ms(true),
            Some(6.5),
            "the same budget on writes"
        );
        let app = ledger::RunSettings {
            app_p99_ms: Some(10.0),
            ..s.clone()
        };
        assert_eq!(
            app.throttle_threshold_ms(false),
            Some(3.5),
            "15% of the application's 10 ms"
        );
        let mut t = PerfTracker::default();
        assert_eq!(
            t.probes(
                &s,
                &[read(0.3), read(2.4), read(2.6), write(6.0), write(9.0)]
            ),
            (2, 3),
            "a read at 2.6 ms and a write at 9 ms are over; a write at 6 ms is not"
        );
        let clean: Vec<Sample> = (0..95)
            .map(|i| if i % 2 == 0 { read(0.3) } else { write(1.0) })
            .collect();
        assert_eq!(t.probes(&s, &clean), (0, 95));
        assert_eq!((t.figures.probes, t.figures.probes_over), (100, 2));
        assert_eq!(t.figures.throttled_samples, 1);
        assert_eq!(t.figures.write_throttle_threshold_ms, Some(6.5));
        let p99 = t.figures.p99_ms.unwrap();
        assert!((2.6..2.9).contains(&p99), "p99 of the stage's reads: {p99}");
        let off = ledger::RunSettings {
            throttle_pct: 0.0,
            ..s.clone()
        };
        assert_eq!(off.throttle_threshold_ms(false), None);
        assert_eq!(
            t.probes(&off, &[read(50.0)]),
            (0, 0),
            "a throttle_pct of 0 turns it off"
        );
        assert_eq!(
            ledger::RunSettings::default().throttle_threshold_ms(false),
            None,
            "without a baseline nothing throttles"
        );
        // A run planned before writes were probed: its writes are judged on the reads' p99.
        let old = ledger::RunSettings {
            probe_write_baseline_p99_ms: None,
            ..s
        };
        assert_eq!(old.throttle_threshold_ms(true), Some(2.5));
    }

    #[test]
    fn the_throttle_halves_what_is_in_flight_then_paces_and_recovers_slowly() {
        use std::time::Duration;
        let mut t = Throttle::new(64, false);
        assert!(!t.engaged());
        assert_eq!((t.window, t.gap), (64, Duration::ZERO));
        // 64 allowed, 4 actually in flight: the first probe over starts from 4, not 64.
        t.adjust(1, 0, 4);
        assert_eq!((t.window, t.gap), (2, Duration::ZERO));
        t.adjust(2, 0, 2);
        assert_eq!((t.window, t.gap), (1, Duration::ZERO));
        t.adjust(1, 0, 1);
        assert_eq!(
            (t.window, t.gap),
            (1, Duration::ZERO),
            "one batch, not yet paced"
        );
        t.adjust(2, 0, 1);
        assert_eq!(t.gap, GAP_UNIT, "one level past one batch: 100 ms");
        t.adjust(2, 0, 1);
        assert_eq!(t.gap, GAP_UNIT * 3);
        for _ in 0..20 {
            t.adjust(5, 0, 1);
        }
        assert_eq!(t.gap, MAX_GAP, "the gap is capped");
        // One probe over in a hundred holds the level where it is.
        let held = t.clone();
        t.adjust(1, 99, 1);
        assert!((t.level - held.level).abs() < 1e-9);
        // Clean probes take a level back every 198 probes: from the top to full speed
        // takes 198 × (8.2 + 6) probes, about 2,800, not one judgement.
        t.adjust(0, 198, 1);
        assert!(t.gap < MAX_GAP && t.gap > MAX_GAP / 3, "{:?}", t.gap);
        let mut probes = 198;
        while t.engaged() {
            t.adjust(0, 40, 1);
            probes += 40;
        }
        assert!((2_700..2_900).contains(&probes), "{probes} probes");
        assert_eq!((t.window, t.gap), (64, Duration::ZERO));
    }

    #[test]
    fn under_steady_impact_the_share_of_probes_over_settles_near_one_percent() {
        // A stand-in for the database: each batch in flight or paced adds a stall to some
        // probes; the share of slow probes falls as the throttle paces.
        let mut t = Throttle::new(8, true);
        let mut over_total = 0;
        let mut total = 0;
        let mut rng = 12345u64;
        for judgement in 0..2_000 {
            // The share of probes stalled: 30% at full speed (1 batch per 100 ms of
            // work), falling with the duty cycle.
            let busy = 0.1 * t.window as f64;
            let duty = busy / (busy + t.gap.as_secs_f64());
            let share = 0.3 * duty.min(1.0);
            let mut over = 0;
            for _ in 0..40 {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if ((rng >> 11) as f64 / (1u64 << 53) as f64) < share {
                    over += 1;
                }
            }
            t.judge(over, 40 - over, t.window, None);
            if judgement >= 500 {
                over_total += over;
                total += 40;
            }
        }
        let share = over_total as f64 / total as f64;
        assert!(
            (0.007..0.014).contains(&share),
            "share of probes over: {share}"
        );
        assert!(t.gap > std::time::Duration::from_secs(2), "{:?}", t.gap);
    }

    #[test]
    fn a_stage_starts_paced_and_speeds_up_only_on_judged_clean_probes() {
        use std::time::Duration;
        let mut t = Throttle::new(64, true);
        assert_eq!((t.window, t.gap), (1, GAP_UNIT * 15), "one batch per 1.5 s");
        assert!(t.engaged() && t.slow);
        // Too few probes to judge: no change.
        t.judge(0, SLOW_START_MIN_PROBES - 1, 1, None);
        assert_eq!(t.gap, GAP_UNIT * 15);
        // Each clean judgement halves the pace's period: 1.5 s, 700, 300, 100 ms, then
        // one, two, four … batches.
        t.judge(0, 40, 1, None);
        assert_eq!(t.gap, GAP_UNIT * 7);
        for _ in 0..3 {
            t.judge(0, 40, 1, None);
        }
        assert_eq!((t.window, t.gap), (1, Duration::ZERO));
        t.judge(0, 40, 1, None);
        assert_eq!(t.window, 2);
        // The first probe over ends slow start where it is, and the controller takes over.
        t.judge(1, 39, 2, None);
        assert!(!t.slow);
        assert_eq!(t.window, 1, "halved from two: {t:?}");
        // Clean judgements now come back at the controller's slow pace.
        t.judge(0, 40, 1, None);
        assert_eq!(t.window, 1);
        // Without a probe over, slow start runs until full speed.
        let mut t = Throttle::new(8, true);
        let mut judgements = 0;
        while t.slow {
            t.judge(0, 40, 1, None);
            judgements += 1;
        }
        assert_eq!(judgements, 3 + 4, "three halvings and four gap levels");
        assert!(!t.engaged());
    }

    fn reading(ms: f64) -> SloReading {
        // The application alone at 5.0 ms, a 15% budget: aim 5.5 ms, limit 5.75 ms.
        SloReading {
            ms,
            aim_ms: 5.5,
            limit_ms: 5.75,
        }
    }

    #[test]
    fn the_applications_level_moves_symmetrically_around_its_aim() {
        let mut t = Throttle::new(8, false);
        t.judge(0, 40, 8, Some(reading(11.0)));
        assert_eq!(
            t.slo_level,
            Some(SLO_MAX_UP),
            "twice its aim: capped at one level"
        );
        let at = t.slo_level.unwrap();
        // 4% over its aim (under its limit), then 4% under (as a ratio): back where it was.
        t.judge(0, 40, 1, Some(reading(5.5 * 1.04)));
        assert!(t.slo_level.unwrap() > at);
        t.judge(0, 40, 1, Some(reading(5.5 / 1.04)));
        assert!((t.slo_level.unwrap() - at).abs() < 1e-9, "{t:?}");
        // Under its limit but over its aim still slows; the probes' clean judgements do
        // not pull the application's level down: the worse one governs.
        let before = t.clone();
        t.judge(0, 40, 1, Some(reading(5.6)));
        assert!(t.slo_level > before.slo_level && t.slo_governs());
        assert!(t.gap >= before.gap);
        // The signal lost: the probes' level governs alone.
        t.forget_slo();
        assert!(!t.slo_governs());
        assert_eq!((t.window, t.gap), (8, std::time::Duration::ZERO), "{t:?}");
        // Back, over its limit with 64 allowed and 4 in flight: it starts from what is in
        // flight, as the probes do.
        let mut t = Throttle::new(64, false);
        t.judge(0, 40, 4, Some(reading(6.0)));
        assert!(t.window < 4, "{t:?}");
    }

    #[test]
    fn from_the_longest_gap_the_application_at_its_baseline_brings_full_speed_in_two_minutes() {
        let mut t = Throttle::new(8, false);
        for _ in 0..20 {
            t.judge(0, 40, 1, Some(reading(50.0)));
        }
        assert_eq!(t.gap, MAX_GAP);
        let mut judgements = 0;
        while t.engaged() {
            t.judge(0, 40, 1, Some(reading(5.0)));
            judgements += 1;
        }
        // (3 halvings + 8.2 gap levels) / (2 × ln(5.5 / 5.0)) = 59 judgements, 2 s each.
        assert!((55..=62).contains(&judgements), "{judgements} judgements");
    }

    #[test]
    fn on_a_noisy_signal_the_application_rests_at_its_aim_not_at_the_longest_gap() {
        // A stand-in for the application: 5.0 ms alone, 40% slower at full duty (one batch
        // in flight without a gap), each window's p99 ±10% of that (log-normal, the same
        // window seen by five judgements in a row, as a 10 s rate() polled every 2 s is).
        let mut t = Throttle::new(8, true);
        let mut rng = 99u64;
        let mut uniform = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        let (mut log_sum, mut duty_sum, mut n, mut at_max) = (0.0, 0.0, 0, 0);
        let mut noise = 1.0;
        for judgement in 0..5_000 {
            let busy = 0.5 * t.window as f64;
            let duty = (busy / (busy + t.gap.as_secs_f64())).min(1.0);
            if judgement % 5 == 0 {
                // Box–Muller: one normal deviate, σ = 0.1 in ln.
                let (u1, u2) = (uniform().max(1e-12), uniform());
                noise = (0.1 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()).exp();
            }
            let p99 = 5.0 * (1.0 + 0.4 * duty) * noise;
            t.judge(0, 40, t.window, Some(reading(p99)));
            if judgement >= 1_000 {
                log_sum += (p99 / 5.5).ln();
                duty_sum += duty;
                n += 1;
                at_max += usize::from(t.gap == MAX_GAP);
            }
        }
        let geo_mean = 5.5 * (log_sum / n as f64).exp();
        let duty = duty_sum / n as f64;
        assert!(
            (5.3..5.7).contains(&geo_mean),
            "the application's p99: {geo_mean} ms"
        );
        // 5.5 = 5.0 × (1 + 0.4 × duty): a duty of 25% on average.
        assert!((0.15..0.35).contains(&duty), "duty {duty}");
        assert!(
            at_max < n / 100,
            "{at_max} of {n} judgements at the longest gap"
        );
    }

    #[test]
    fn a_slow_start_ends_on_the_application_over_its_limit_and_speeds_up_on_its_word() {
        let mut t = Throttle::new(8, true);
        let start = t.gap;
        // Few probes, but the application says it is fine: judged clean.
        t.judge(0, 3, 1, Some(reading(5.2)));
        assert!(t.slow && t.gap < start, "{t:?}");
        // Over its aim, under its limit: still clean for a slow start.
        let paced = t.gap;
        t.judge(0, 40, 1, Some(reading(5.7)));
        assert!(t.slow && t.gap < paced);
        // Over its limit: slow start ends, slower than it was.
        let paced = t.gap;
        t.judge(0, 40, 1, Some(reading(6.5)));
        assert!(!t.slow && t.gap > paced, "{t:?}");
    }
}
