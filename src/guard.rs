//! Canary guard: judges the canary against stable on the exact cohorts, window by window, and
//! aborts the canary (everyone back to stable) after `bad_windows` bad windows in a row.
//!
//! Everything here is pure: the validated configuration (written and checked in
//! `config::canary`), the per-worker tallies and their shared-data encoding, the log-spaced latency histogram, the judgment of one window (a function of the
//! two cohorts' summed counts only, so counts summed over a whole fleet are judged the same
//! way), the guard's state machine and its encoding. The filter (`filter::guard`) counts,
//! publishes, sums and applies.
//!
//! ## The statistics
//! A window is bad when the canary has at least `min_requests` requests and fails a check.
//! Each check is the rule as configured, applied to the observed figures, and on top of it an
//! exact one-sided test at `ALPHA` (0.1%) that keeps noise from failing a healthy canary:
//! - errors, stable counted: the canary's share of all the window's errors is tested against
//!   its share of the requests (the conditional binomial test of two rates: under "the canary
//!   errs no more than stable", the canary's errors among `e` errors are at most
//!   Binomial(e, n_canary / n_total)); stable too thin: the canary's errors against
//!   Binomial(n_canary, max_error_rate);
//! - latency: the requests slower than the limit (`max_ms`, or `max_ratio` × stable's quantile
//!   when that is higher) are tested the same way: the canary's share of them against its
//!   share of the requests, or, stable too thin, against Binomial(n_canary, 1 - quantile) (a
//!   quantile above the limit means more than `1 - quantile` of the requests beyond it).
//!
//! The tail `P(X >= k)` is summed exactly while the variance is below 25 and taken from the
//! normal approximation (with continuity correction) above; no exp/log is needed, so the wasm
//! carries no libm.

use sha2::{Digest, Sha256};

use crate::cohort::Variant;

pub const DEFAULT_ADMIN_PATH: &str = "/.well-known/handoff/canary";
pub const FORBIDDEN_ANCHOR: &str = "canary-guard-admin-forbidden";
/// The significance level of every noise test.
pub const ALPHA: f64 = 0.001;
/// The one-sided normal critical value for [`ALPHA`].
const Z_ALPHA: f64 = 3.090_232;

// ---------------------------------------------------------------------------------------------
// Configuration (as written and validated in `config::canary`)

/// A validated guard.
#[derive(Debug, Clone)]
pub struct Guard {
    pub window_s: u32,
    pub min_requests: u64,
    pub max_error_rate: f64,
    pub max_error_ratio: f64,
    pub latency: Option<LatencyRule>,
    pub bad_windows: u32,
    pub admin: Option<crate::drain::Admin>,
}

#[derive(Debug, Clone)]
pub struct LatencyRule {
    pub quantile: f64,
    pub max_ms: u64,
    pub max_ratio: f64,
}

impl Guard {
    pub fn window_ms(&self) -> u64 {
        u64::from(self.window_s) * 1000
    }

    /// The tick of every worker: a sixteenth of the window, 100 ms to 500 ms, so a window is
    /// judged within a tick of its end and every worker applies an abort one tick later.
    pub fn tick_ms(&self) -> u32 {
        (self.window_s * 1000 / 16).clamp(100, 500)
    }

    /// The window `now_ms` falls in (windows are aligned on the clock, so every worker agrees).
    pub fn window_of(&self, now_ms: u64) -> u64 {
        now_ms / self.window_ms()
    }

    /// How long after a window's end it is judged even when a worker has not published its
    /// final counts (a worker that stopped ticking).
    pub fn judge_grace_ms(&self) -> u64 {
        2 * u64::from(self.tick_ms()) + 500
    }

    /// A record whose worker stopped ticking this long ago no longer counts.
    pub fn stale_after_ms(&self) -> u64 {
        3 * u64::from(self.tick_ms()) + 10_000
    }
}

/// The experiment a salt names: shared-data records of another salt are not this experiment's.
pub fn experiment_id(salt: &str) -> u64 {
    let d = Sha256::digest(salt.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

// ---------------------------------------------------------------------------------------------
// The latency histogram: fixed log-spaced buckets, four per octave. Bucket 0 holds [0, 64 µs);
// bucket i (1..=84) holds [2^((i+23)/4), 2^((i+24)/4)) µs, up to 2^27 µs (134 s); the last one
// holds the rest. A value read back as its bucket's geometric middle is within 2^(1/8) - 1 =
// 9.1% of the truth.

pub const BUCKETS: usize = 86;
const FIRST_EXP: u32 = 6; // 2^6 µs = 64 µs
const OCTAVES: u32 = 21;
/// 2^(j/4) × 2^40 for j = 1, 2, 3, rounded up (the exact values are not integers, so a scaled
/// value at least this is above the bound).
const QUARTERS: [u64; 3] = [1_307_547_050_780, 1_554_944_255_988, 1_849_150_772_654];
const QUARTERS_F: [f64; 4] = [
    1.0,
    1.189_207_115_002_721,
    std::f64::consts::SQRT_2,
    1.681_792_830_507_429,
];
/// 2^(1/8): from a bucket's floor to its geometric middle.
const EIGHTH: f64 = 1.090_507_732_665_257_7;

pub fn bucket_of(us: u64) -> usize {
    if us < 1 << FIRST_EXP {
        return 0;
    }
    let octave = 63 - us.leading_zeros();
    if octave >= FIRST_EXP + OCTAVES {
        return BUCKETS - 1;
    }
    // us / 2^octave in [1, 2), as a fixed-point number with 40 fraction bits (us < 2^27 here).
    let frac = us << (40 - octave);
    let sub = QUARTERS.iter().filter(|q| frac >= **q).count();
    1 + ((octave - FIRST_EXP) * 4) as usize + sub
}

/// The lower bound of bucket `i` in µs.
pub fn bucket_floor_us(i: usize) -> f64 {
    if i == 0 {
        return 0.0;
    }
    let k = (i - 1) as u32;
    (1u64 << (FIRST_EXP + k / 4)) as f64 * QUARTERS_F[(k % 4) as usize]
}

/// The value a bucket stands for: its geometric middle (32 µs for the first).
pub fn bucket_value_us(i: usize) -> f64 {
    match i {
        0 => 32.0,
        i if i >= BUCKETS - 1 => bucket_floor_us(i),
        i => bucket_floor_us(i) * EIGHTH,
    }
}

// ---------------------------------------------------------------------------------------------
// Counting

/// One cohort's counts in one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cohort {
    pub requests: u64,
    pub errors: u64,
    pub buckets: [u32; BUCKETS],
}

impl Default for Cohort {
    fn default() -> Self {
        Cohort {
            requests: 0,
            errors: 0,
            buckets: [0; BUCKETS],
        }
    }
}

impl Cohort {
    pub fn record(&mut self, latency_us: u64, error: bool) {
        self.requests += 1;
        self.errors += u64::from(error);
        let b = &mut self.buckets[bucket_of(latency_us)];
        *b = b.saturating_add(1);
    }

    pub fn add(&mut self, other: &Cohort) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// The `q` quantile in µs (the bucket holding the request of rank ceil(q × n)); 0 when
    /// empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let n: u64 = self.buckets.iter().map(|b| u64::from(*b)).sum();
        if n == 0 {
            return 0;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut cum = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            cum += u64::from(*b);
            if cum >= rank {
                return bucket_value_us(i) as u64;
            }
        }
        bucket_value_us(BUCKETS - 1) as u64
    }

    /// Requests certainly slower than `us`: those in the buckets wholly above it.
    pub fn slower_than(&self, us: f64) -> u64 {
        let b = bucket_of(us as u64);
        self.buckets[b + 1..].iter().map(|c| u64::from(*c)).sum()
    }
}

/// Both cohorts' counts in one window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    pub stable: Cohort,
    pub canary: Cohort,
}

impl Window {
    pub fn cohort_mut(&mut self, v: Variant) -> &mut Cohort {
        match v {
            Variant::Stable => &mut self.stable,
            Variant::Canary => &mut self.canary,
        }
    }

    pub fn add(&mut self, other: &Window) {
        self.stable.add(&other.stable);
        self.canary.add(&other.canary);
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for c in [&self.stable, &self.canary] {
            put(out, c.requests);
            put(out, c.errors);
            for b in c.buckets {
                out.extend_from_slice(&b.to_le_bytes());
            }
        }
    }

    fn decode(r: &mut Reader) -> Option<Window> {
        let mut w = Window::default();
        for c in [&mut w.stable, &mut w.canary] {
            c.requests = r.u64()?;
            c.errors = r.u64()?;
            for b in c.buckets.iter_mut() {
                *b = r.u32()?;
            }
        }
        Some(w)
    }
}

/// One worker's tallies: the window in progress and the one before it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub window: u64,
    pub current: Window,
    pub previous: Window,
}

impl Tally {
    /// Moves on to `window` (the current counts become the previous ones, or both are cleared
    /// when more than one window passed).
    pub fn roll(&mut self, window: u64) {
        if window == self.window {
            return;
        }
        if window == self.window + 1 {
            self.previous = std::mem::take(&mut self.current);
        } else {
            self.previous = Window::default();
            self.current = Window::default();
        }
        self.window = window;
    }

    pub fn record(&mut self, window: u64, v: Variant, latency_us: u64, error: bool) {
        self.roll(window);
        self.current.cohort_mut(v).record(latency_us, error);
    }

    /// This worker's counts of `window`, if it still has them.
    pub fn of(&self, window: u64) -> Option<&Window> {
        if window == self.window {
            Some(&self.current)
        } else if window + 1 == self.window {
            Some(&self.previous)
        } else {
            None
        }
    }
}

/// A worker's record in shared data: who owns the slot, when it last ticked, for which
/// experiment it counts, and its tallies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slot {
    pub owner: u64,
    pub heartbeat_ms: u64,
    pub experiment: u64,
    pub tally: Tally,
}

const SLOT_VERSION: u8 = 1;
/// Slots are reused when their worker is gone, so shared data holds at most this many.
pub const MAX_SLOTS: usize = 256;

impl Slot {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 32 + 2 * 2 * (16 + 4 * BUCKETS));
        out.push(SLOT_VERSION);
        for v in [
            self.owner,
            self.heartbeat_ms,
            self.experiment,
            self.tally.window,
        ] {
            put(&mut out, v);
        }
        self.tally.current.encode(&mut out);
        self.tally.previous.encode(&mut out);
        out
    }

    /// The owner and heartbeat alone (what claiming a slot needs).
    pub fn decode_head(b: &[u8]) -> Option<(u64, u64)> {
        let mut r = Reader::versioned(b, SLOT_VERSION)?;
        Some((r.u64()?, r.u64()?))
    }

    pub fn decode(b: &[u8]) -> Option<Slot> {
        let mut r = Reader::versioned(b, SLOT_VERSION)?;
        let owner = r.u64()?;
        let heartbeat_ms = r.u64()?;
        let experiment = r.u64()?;
        let window = r.u64()?;
        let current = Window::decode(&mut r)?;
        let previous = Window::decode(&mut r)?;
        Some(Slot {
            owner,
            heartbeat_ms,
            experiment,
            tally: Tally {
                window,
                current,
                previous,
            },
        })
    }

    pub fn live(&self, now_ms: u64, g: &Guard) -> bool {
        now_ms.saturating_sub(self.heartbeat_ms) < g.stale_after_ms()
    }
}

/// What claiming slot `i` does, given what is in it: `Some(true)` write my claim, `Some(false)`
/// it is mine already, `None` another live worker owns it.
pub fn claim(existing: Option<&[u8]>, me: u64, now_ms: u64, g: &Guard) -> Option<bool> {
    match existing.and_then(Slot::decode_head) {
        None => Some(true),
        Some((owner, _)) if owner == me => Some(false),
        Some((_, beat)) if now_ms.saturating_sub(beat) >= g.stale_after_ms() => Some(true),
        Some(_) => None,
    }
}

/// The summed counts of `window` over the live records of `experiment`, once every live worker
/// has moved past it (its final counts published) or the grace after its end has passed.
/// `None`: not yet.
pub fn sum_window(
    slots: &[Slot],
    experiment: u64,
    window: u64,
    now_ms: u64,
    g: &Guard,
) -> Option<Window> {
    let live: Vec<&Slot> = slots
        .iter()
        .filter(|s| s.experiment == experiment && s.live(now_ms, g))
        .collect();
    let end = (window + 1) * g.window_ms();
    let all_rolled = live.iter().all(|s| s.tally.window > window);
    if now_ms < end || (!all_rolled && now_ms < end + g.judge_grace_ms()) {
        return None;
    }
    let mut sum = Window::default();
    for s in live {
        if let Some(w) = s.tally.of(window) {
            sum.add(w);
        }
    }
    Some(sum)
}

// ---------------------------------------------------------------------------------------------
// The judgment of one window

/// `P(X >= k)` for `X ~ Binomial(n, p)` is below [`ALPHA`].
pub fn significant(k: u64, n: u64, p: f64) -> bool {
    if k == 0 || k > n || p >= 1.0 {
        return false;
    }
    if p <= 0.0 {
        return true; // k > 0 events where none can happen
    }
    let (nf, kf) = (n as f64, k as f64);
    let mean = nf * p;
    let var = mean * (1.0 - p);
    if var >= 25.0 {
        return (kf - 0.5 - mean) / var.sqrt() > Z_ALPHA;
    }
    if kf > mean + 40.0 * var.sqrt() + 40.0 {
        return true; // far beyond any tail worth summing
    }
    // Exact: 1 - P(X <= k - 1), the pmf walked up from (1 - p)^n, which cannot underflow
    // here (n p < 27 when the variance is below 25).
    let odds = p / (1.0 - p);
    let mut pmf = (1.0 - p).powi(n.min(i32::MAX as u64) as i32);
    let mut cdf = 0.0;
    for j in 0..k {
        cdf += pmf;
        pmf *= (nf - j as f64) / (j as f64 + 1.0) * odds;
    }
    1.0 - cdf < ALPHA
}

fn rate(c: &Cohort) -> f64 {
    if c.requests == 0 {
        0.0
    } else {
        c.errors as f64 / c.requests as f64
    }
}

/// Which checks a window fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Judgment {
    pub errors: bool,
    pub latency: bool,
}

impl Judgment {
    pub fn bad(&self) -> bool {
        self.errors || self.latency
    }
}

/// Judges one window from the two cohorts' counts (summed over whatever sees the traffic).
pub fn judge(g: &Guard, w: &Window) -> Judgment {
    let (s, c) = (&w.stable, &w.canary);
    if c.requests < g.min_requests {
        return Judgment::default();
    }
    let stable_counted = s.requests >= g.min_requests;
    let share = c.requests as f64 / (c.requests + s.requests) as f64;
    let errors = {
        let rc = rate(c);
        if rc <= g.max_error_rate {
            false
        } else if stable_counted {
            rc > g.max_error_ratio * rate(s) && significant(c.errors, c.errors + s.errors, share)
        } else {
            significant(c.errors, c.requests, g.max_error_rate)
        }
    };
    let latency = g.latency.as_ref().is_some_and(|l| {
        let qc = c.quantile_us(l.quantile) as f64;
        let max_us = l.max_ms as f64 * 1000.0;
        if qc <= max_us {
            return false;
        }
        if stable_counted {
            let limit = l.max_ratio * s.quantile_us(l.quantile) as f64;
            if qc <= limit {
                return false;
            }
            let t = limit.max(max_us);
            let (kc, ks) = (c.slower_than(t), s.slower_than(t));
            significant(kc, kc + ks, share)
        } else {
            significant(c.slower_than(max_us), c.requests, 1.0 - l.quantile)
        }
    });
    Judgment { errors, latency }
}

// ---------------------------------------------------------------------------------------------
// The state machine

/// What aborted the canary; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Errors,
    Latency,
    Admin,
}

impl Trigger {
    pub const ALL: [Trigger; 3] = [Trigger::Errors, Trigger::Latency, Trigger::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Errors => "errors",
            Trigger::Latency => "latency",
            Trigger::Admin => "admin",
        }
    }

    fn code(self) -> u8 {
        match self {
            Trigger::Errors => 1,
            Trigger::Latency => 2,
            Trigger::Admin => 3,
        }
    }

    fn from_code(c: u8) -> Option<Trigger> {
        Trigger::ALL.into_iter().find(|t| t.code() == c)
    }
}

/// One cohort's figures as reported: requests, errors, the quantile latency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figure {
    pub requests: u64,
    pub errors: u64,
    pub quantile_us: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub stable: Figure,
    pub canary: Figure,
}

impl Figures {
    pub fn of(w: &Window, quantile: f64) -> Figures {
        let f = |c: &Cohort| Figure {
            requests: c.requests,
            errors: c.errors,
            quantile_us: c.quantile_us(quantile),
        };
        Figures {
            stable: f(&w.stable),
            canary: f(&w.canary),
        }
    }

    /// Counts summed, quantiles of the later window (`next`).
    fn then(&self, next: &Figures) -> Figures {
        let f = |a: &Figure, b: &Figure| Figure {
            requests: a.requests + b.requests,
            errors: a.errors + b.errors,
            quantile_us: b.quantile_us,
        };
        Figures {
            stable: f(&self.stable, &next.stable),
            canary: f(&self.canary, &next.canary),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for f in [&self.stable, &self.canary] {
            put(out, f.requests);
            put(out, f.errors);
            put(out, f.quantile_us);
        }
    }

    fn decode(r: &mut Reader) -> Option<Figures> {
        let mut f = Figures::default();
        for x in [&mut f.stable, &mut f.canary] {
            x.requests = r.u64()?;
            x.errors = r.u64()?;
            x.quantile_us = r.u64()?;
        }
        Some(f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aborted {
    pub at_ms: u64,
    pub trigger: Trigger,
    /// The bad windows in a row that led to it (0 by the admin path).
    pub windows: u32,
    /// Counts summed over those windows, quantiles of the last one.
    pub figures: Figures,
}

/// The last judged window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Last {
    pub window: u64,
    pub figures: Figures,
    pub judgment: Judgment,
}

/// The guard's process-wide state, in shared data under a key of the experiment (salt).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardState {
    pub aborted: Option<Aborted>,
    /// Windows up to this one are judged (or skipped).
    pub judged: u64,
    /// Bad windows in a row so far, and their summed figures.
    pub streak: u32,
    pub streak_figures: Figures,
    pub last: Option<Last>,
}

const STATE_VERSION: u8 = 1;

impl GuardState {
    /// A fresh experiment: judging starts with the next whole window.
    pub fn start(now_window: u64) -> GuardState {
        GuardState {
            judged: now_window,
            ..GuardState::default()
        }
    }

    /// The state once `window` (with these summed counts) is judged; `None` when it is judged
    /// already or the canary is aborted (an aborted canary is not judged: its traffic is the
    /// overrides alone).
    pub fn after_window(&self, g: &Guard, window: u64, w: &Window, now_ms: u64) -> Option<Self> {
        if self.aborted.is_some() || window <= self.judged {
            return None;
        }
        let quantile = g.latency.as_ref().map_or(0.99, |l| l.quantile);
        let figures = Figures::of(w, quantile);
        let judgment = judge(g, w);
        let mut next = GuardState {
            judged: window,
            last: Some(Last {
                window,
                figures,
                judgment,
            }),
            ..*self
        };
        // A window that is not bad (too few requests included) breaks the row, and so does a
        // window that was never judged (no worker ticked through it).
        if !judgment.bad() {
            next.streak = 0;
            next.streak_figures = Figures::default();
            return Some(next);
        }
        let continues = self.streak > 0 && self.judged + 1 == window;
        (next.streak, next.streak_figures) = if continues {
            (self.streak + 1, self.streak_figures.then(&figures))
        } else {
            (1, figures)
        };
        if next.streak >= g.bad_windows {
            next.aborted = Some(Aborted {
                at_ms: now_ms,
                trigger: if judgment.errors {
                    Trigger::Errors
                } else {
                    Trigger::Latency
                },
                windows: next.streak,
                figures: next.streak_figures,
            });
        }
        Some(next)
    }

    /// Aborted by the admin path; `None` when already aborted.
    pub fn abort_by_admin(&self, now_ms: u64) -> Option<GuardState> {
        if self.aborted.is_some() {
            return None;
        }
        Some(GuardState {
            aborted: Some(Aborted {
                at_ms: now_ms,
                trigger: Trigger::Admin,
                windows: 0,
                figures: self.last.map(|l| l.figures).unwrap_or_default(),
            }),
            ..*self
        })
    }

    /// Resumed: judging starts again with the next whole window. `None` when not aborted.
    pub fn resume(&self, now_window: u64) -> Option<GuardState> {
        self.aborted?;
        Some(GuardState {
            aborted: None,
            judged: now_window,
            streak: 0,
            streak_figures: Figures::default(),
            last: self.last,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![STATE_VERSION];
        match &self.aborted {
            Some(a) => {
                out.push(a.trigger.code());
                put(&mut out, a.at_ms);
                put(&mut out, u64::from(a.windows));
                a.figures.encode(&mut out);
            }
            None => out.push(0),
        }
        put(&mut out, self.judged);
        put(&mut out, u64::from(self.streak));
        self.streak_figures.encode(&mut out);
        match &self.last {
            Some(l) => {
                out.push(1 | u8::from(l.judgment.errors) << 1 | u8::from(l.judgment.latency) << 2);
                put(&mut out, l.window);
                l.figures.encode(&mut out);
            }
            None => out.push(0),
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<GuardState> {
        let mut r = Reader::versioned(b, STATE_VERSION)?;
        let aborted = match r.u8()? {
            0 => None,
            c => Some(Aborted {
                trigger: Trigger::from_code(c)?,
                at_ms: r.u64()?,
                windows: r.u64()? as u32,
                figures: Figures::decode(&mut r)?,
            }),
        };
        let judged = r.u64()?;
        let streak = r.u64()? as u32;
        let streak_figures = Figures::decode(&mut r)?;
        let last = match r.u8()? {
            0 => None,
            flags => Some(Last {
                judgment: Judgment {
                    errors: flags & 2 != 0,
                    latency: flags & 4 != 0,
                },
                window: r.u64()?,
                figures: Figures::decode(&mut r)?,
            }),
        };
        r.done().then_some(GuardState {
            aborted,
            judged,
            streak,
            streak_figures,
            last,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Reports: the log line and the admin answer (integers only: no float formatting in the wasm)

/// `n / d` as a percentage with one decimal: `23.1%`.
fn percent(n: u64, d: u64) -> String {
    if d == 0 {
        return "0%".to_string();
    }
    let tenths = (n.saturating_mul(1000) + d / 2) / d;
    format!("{}.{}%", tenths / 10, tenths % 10)
}

/// µs as milliseconds: `612 ms`, `0.3 ms` under 10 ms.
fn millis(us: u64) -> String {
    if us < 10_000 {
        format!("{}.{} ms", us / 1000, (us % 1000 + 50) / 100 % 10)
    } else {
        format!("{} ms", (us + 500) / 1000)
    }
}

/// `p99`, `p99.9`, `p50`.
pub fn quantile_label(q: f64) -> String {
    let t = (q * 10_000.0).round() as u64;
    let mut s = format!("p{}", t / 100);
    let rest = t % 100;
    if rest != 0 {
        let r = format!("{rest:02}");
        s.push('.');
        s.push_str(r.trim_end_matches('0'));
    }
    s
}

/// Why the canary was aborted, with the figures:
/// `errors 23.1% (231/1000) vs stable 0.4% (4/1000), 2 windows of 10 s`.
pub fn describe(g: &Guard, a: &Aborted) -> String {
    let (s, c) = (&a.figures.stable, &a.figures.canary);
    let what = match a.trigger {
        Trigger::Admin => return "by the admin path".to_string(),
        Trigger::Errors => format!(
            "errors {} ({}/{}) vs stable {} ({}/{})",
            percent(c.errors, c.requests),
            c.errors,
            c.requests,
            percent(s.errors, s.requests),
            s.errors,
            s.requests
        ),
        Trigger::Latency => format!(
            "{} latency {} ({} requests) vs stable {} ({} requests)",
            quantile_label(g.latency.as_ref().map_or(0.99, |l| l.quantile)),
            millis(c.quantile_us),
            c.requests,
            millis(s.quantile_us),
            s.requests
        ),
    };
    format!("{what}, {} windows of {} s", a.windows, g.window_s)
}

fn figures_json(f: &Figures) -> String {
    let one = |x: &Figure| {
        format!(
            "{{\"requests\":{},\"errors\":{},\"quantile_us\":{}}}",
            x.requests, x.errors, x.quantile_us
        )
    };
    format!(
        "{{\"stable\":{},\"canary\":{}}}",
        one(&f.stable),
        one(&f.canary)
    )
}

/// A JSON string literal (through the same serializer as the problem bodies).
fn json_string(s: &str) -> String {
    let bytes = serde_json::to_vec(s).unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

/// The admin `GET` answer: the state, the current window's figures so far, the last judged
/// window's, and when and why the canary was aborted.
pub fn status_json(g: &Guard, state: &GuardState, current_window: u64, current: &Window) -> String {
    let quantile = g.latency.as_ref().map_or(0.99, |l| l.quantile);
    let label = json_string(&quantile_label(quantile));
    let mut out = format!(
        "{{\"state\":\"{}\",\"window_s\":{},\"quantile\":{label},\"streak\":{},\
         \"current\":{{\"window_start\":{},\"figures\":{}}}",
        if state.aborted.is_some() {
            "aborted"
        } else {
            "active"
        },
        g.window_s,
        state.streak,
        current_window * g.window_ms(),
        figures_json(&Figures::of(current, quantile)),
    );
    match &state.last {
        Some(l) => out.push_str(&format!(
            ",\"last\":{{\"window_start\":{},\"figures\":{},\"bad_errors\":{},\"bad_latency\":{}}}",
            l.window * g.window_ms(),
            figures_json(&l.figures),
            l.judgment.errors,
            l.judgment.latency
        )),
        None => out.push_str(",\"last\":null"),
    }
    match &state.aborted {
        Some(a) => out.push_str(&format!(
            ",\"aborted\":{{\"at\":{},\"trigger\":\"{}\",\"windows\":{},\"reason\":{},\"figures\":{}}}}}",
            a.at_ms,
            a.trigger.as_str(),
            a.windows,
            json_string(&describe(g, a)),
            figures_json(&a.figures)
        )),
        None => out.push_str(",\"aborted\":null}"),
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Byte encoding helpers

fn put(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Reads the little-endian encodings written with `put` (also the rollout counts).
pub(crate) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn versioned(b: &'a [u8], version: u8) -> Option<Reader<'a>> {
        match b.split_first() {
            Some((v, rest)) if *v == version => Some(Reader(rest)),
            _ => None,
        }
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }

    pub(crate) fn done(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests;
