//! The drain state machine: the process-wide state (serving, draining since, drained once the
//! grace has passed), who may start and cancel it, and the readiness poller's lease and failure
//! streak.

/// What started a drain; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrainSource {
    Admin,
    UpstreamSignal,
    Readiness,
}

impl DrainSource {
    pub const ALL: [DrainSource; 3] = [
        DrainSource::Admin,
        DrainSource::UpstreamSignal,
        DrainSource::Readiness,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DrainSource::Admin => "admin",
            DrainSource::UpstreamSignal => "upstream_signal",
            DrainSource::Readiness => "readiness",
        }
    }

    pub(super) fn code(self) -> u8 {
        match self {
            DrainSource::Admin => 1,
            DrainSource::UpstreamSignal => 2,
            DrainSource::Readiness => 3,
        }
    }

    pub(super) fn from_code(c: u8) -> Option<DrainSource> {
        match c {
            1 => Some(DrainSource::Admin),
            2 => Some(DrainSource::UpstreamSignal),
            3 => Some(DrainSource::Readiness),
            _ => None,
        }
    }
}

/// The phase a request sees, derived from the state and the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    Draining,
    Drained,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Drained => "drained",
        }
    }

    /// The value of the `handoff_drain_state` gauge.
    pub fn gauge(self) -> u64 {
        match self {
            Phase::Serving => 0,
            Phase::Draining => 1,
            Phase::Drained => 2,
        }
    }
}

/// Who cancels a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelBy {
    /// `DELETE` on the admin path: cancels any drain.
    Admin,
    /// The readiness endpoint answers again: cancels only a drain that readiness started.
    ReadinessRecovered,
}

/// The process-wide drain state. `drained` is not stored: it is `draining` once the grace has
/// passed, so no worker has to write anything when the grace ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainState {
    /// `None` while serving.
    pub source: Option<DrainSource>,
    /// Unix ms when the current state began.
    pub since_ms: u64,
    pub grace_s: u32,
    /// Incremented on every transition.
    pub generation: u32,
}

impl DrainState {
    pub fn serving(since_ms: u64) -> DrainState {
        DrainState {
            source: None,
            since_ms,
            grace_s: 0,
            generation: 0,
        }
    }

    pub fn phase(&self, now_ms: u64) -> Phase {
        match self.source {
            None => Phase::Serving,
            Some(_) => {
                let end = self.since_ms.saturating_add(u64::from(self.grace_s) * 1000);
                if now_ms >= end {
                    Phase::Drained
                } else {
                    Phase::Draining
                }
            }
        }
    }

    /// Starts a drain; `None` when one is already running (the first source keeps it).
    pub fn start(&self, source: DrainSource, now_ms: u64, grace_s: u32) -> Option<DrainState> {
        if self.source.is_some() {
            return None;
        }
        Some(DrainState {
            source: Some(source),
            since_ms: now_ms,
            grace_s,
            generation: self.generation.wrapping_add(1),
        })
    }

    /// Cancels a drain; `None` when there is nothing this canceller may cancel.
    pub fn cancel(&self, by: CancelBy, now_ms: u64) -> Option<DrainState> {
        let allowed = match (by, self.source) {
            (_, None) => false,
            (CancelBy::Admin, Some(_)) => true,
            (CancelBy::ReadinessRecovered, Some(s)) => s == DrainSource::Readiness,
        };
        allowed.then(|| DrainState {
            source: None,
            since_ms: now_ms,
            grace_s: 0,
            generation: self.generation.wrapping_add(1),
        })
    }
}

/// The readiness poller's shared record: which worker polls (a lease, so only one polls at a
/// time) and the consecutive failures seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PollLease {
    pub owner: u64,
    pub expires_ms: u64,
    pub failures: u32,
}

/// What a readiness answer means for the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadinessVerdict {
    /// Failures just reached the threshold: start a drain.
    Start,
    /// Ready: cancel a drain that readiness started.
    Recovered,
    Nothing,
}

impl PollLease {
    /// The lease renewed for `me`, or `None` when another live worker holds it.
    pub fn acquire(&self, me: u64, now_ms: u64, ttl_ms: u64) -> Option<PollLease> {
        if self.owner != me && self.owner != 0 && now_ms < self.expires_ms {
            return None;
        }
        Some(PollLease {
            owner: me,
            expires_ms: now_ms.saturating_add(ttl_ms),
            failures: self.failures,
        })
    }

    /// Records one poll result. The drain starts when the consecutive failures reach the
    /// threshold (once per failing streak, so an operator's cancel holds while it lasts).
    pub fn record(&self, ready: bool, threshold: u32) -> (PollLease, ReadinessVerdict) {
        if ready {
            let next = PollLease {
                failures: 0,
                ..*self
            };
            return (next, ReadinessVerdict::Recovered);
        }
        let failures = self.failures.saturating_add(1);
        let verdict = if failures == threshold {
            ReadinessVerdict::Start
        } else {
            ReadinessVerdict::Nothing
        };
        (PollLease { failures, ..*self }, verdict)
    }
}

/// A readiness answer: any 2xx is ready; anything else, or no answer, is a failure.
pub fn is_ready(status: Option<&str>) -> bool {
    status
        .and_then(|s| s.trim().parse::<u16>().ok())
        .is_some_and(|s| (200..300).contains(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine() {
        let s = DrainState::serving(1000);
        assert_eq!(s.phase(5000), Phase::Serving);
        let d = s.start(DrainSource::Admin, 2000, 10).unwrap();
        assert_eq!(d.phase(2000), Phase::Draining);
        assert_eq!(d.phase(11_999), Phase::Draining);
        assert_eq!(d.phase(12_000), Phase::Drained);
        assert_eq!(d.generation, 1);
        // A running drain keeps its first source and start time.
        assert!(d.start(DrainSource::Readiness, 3000, 10).is_none());
        // Readiness recovery does not cancel someone else's drain; the admin cancels any.
        assert!(d.cancel(CancelBy::ReadinessRecovered, 3000).is_none());
        let c = d.cancel(CancelBy::Admin, 13_000).unwrap();
        assert_eq!(c.phase(13_000), Phase::Serving);
        assert_eq!((c.since_ms, c.generation), (13_000, 2));
        assert!(c.cancel(CancelBy::Admin, 14_000).is_none());
        let r = c.start(DrainSource::Readiness, 15_000, 0).unwrap();
        assert_eq!(r.phase(15_000), Phase::Drained);
        assert!(r.cancel(CancelBy::ReadinessRecovered, 16_000).is_some());
    }

    #[test]
    fn readiness_lease_and_threshold() {
        let l = PollLease::default();
        let mine = l.acquire(7, 1000, 300).unwrap();
        assert_eq!((mine.owner, mine.expires_ms), (7, 1300));
        assert!(mine.acquire(8, 1200, 300).is_none());
        assert!(mine.acquire(7, 1200, 300).is_some());
        assert_eq!(mine.acquire(8, 1300, 300).unwrap().owner, 8);
        let (l1, v1) = mine.record(false, 2);
        let (l2, v2) = l1.record(false, 2);
        let (l3, v3) = l2.record(false, 2);
        assert_eq!(
            (v1, v2, v3),
            (
                ReadinessVerdict::Nothing,
                ReadinessVerdict::Start,
                ReadinessVerdict::Nothing
            )
        );
        let (l4, v4) = l3.record(true, 2);
        assert_eq!((l4.failures, v4), (0, ReadinessVerdict::Recovered));
        assert!(is_ready(Some("204")));
        assert!(!is_ready(Some("503")));
        assert!(!is_ready(None));
    }
}
