//! The idempotency state machine: what the record found for a key means for a new request.

use super::record::{Meta, State, StoredResponse};
use super::Outcome;

/// What to do with a request, given the record its key has in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No live record: take the lock and forward (outcome `first`).
    Acquire,
    /// A lock older than `lock_timeout_s`: the first request is abandoned; take its lock over
    /// and forward (outcome `first`).
    TakeOver,
    /// The first request is still in flight: 409, not forwarded.
    InFlight,
    /// The key was used with another method, path or body: 422, not forwarded.
    Mismatch,
    /// Completed with the same fingerprint: replay the stored response.
    Replay,
    /// Completed with a response too large to store: 409 `idempotency-not-replayable`.
    NotReplayable,
}

/// Decides for a request with fingerprint `fingerprint` at `now_ms`. The record's
/// `expires_at_ms` already encodes both limits: the lock timeout for an in-flight record, the
/// TTL for a completed one.
pub fn decide(existing: Option<&Meta>, fingerprint: &[u8; 32], now_ms: u64) -> Decision {
    let Some(m) = existing else {
        return Decision::Acquire;
    };
    match m.state {
        State::Free => Decision::Acquire,
        State::InFlight if !m.is_live(now_ms) => Decision::TakeOver,
        _ if !m.is_live(now_ms) => Decision::Acquire,
        // The payload check comes first: a different operation under a reused key is a client
        // bug that waiting will not fix.
        _ if m.fingerprint != *fingerprint => Decision::Mismatch,
        State::InFlight => Decision::InFlight,
        State::Completed => Decision::Replay,
        State::Unreplayable => Decision::NotReplayable,
    }
}

/// The in-flight record a request writes when it takes the lock.
pub fn lock_record(
    key: [u8; 32],
    fingerprint: [u8; 32],
    owner: u64,
    now_ms: u64,
    lock_timeout_ms: u64,
) -> Meta {
    Meta {
        state: State::InFlight,
        key,
        fingerprint,
        owner,
        locked_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(lock_timeout_ms),
    }
}

/// The record that replaces the lock once the response is known.
pub fn completed_record(lock: &Meta, replayable: bool, now_ms: u64, ttl_ms: u64) -> Meta {
    Meta {
        state: if replayable {
            State::Completed
        } else {
            State::Unreplayable
        },
        expires_at_ms: now_ms.saturating_add(ttl_ms),
        ..lock.clone()
    }
}

/// How a request that is not forwarded is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The stored response (outcome `replayed`).
    Replay(StoredResponse),
    /// The problem reply of this outcome.
    Problem(Outcome),
}

impl Verdict {
    /// The outcome counted for this answer.
    pub fn outcome(&self) -> Outcome {
        match self {
            Verdict::Replay(_) => Outcome::Replayed,
            Verdict::Problem(o) => *o,
        }
    }
}

/// The answer to a request whose key has a record that keeps it from being forwarded, given
/// the stored response when the record has one.
pub fn verdict(decision: Decision, stored: Option<StoredResponse>) -> Verdict {
    Verdict::Problem(match decision {
        Decision::Replay => match stored {
            Some(r) => return Verdict::Replay(r),
            // The response was overwritten (a local slot reused in between): the store cannot
            // answer for this key.
            None => Outcome::StoreError,
        },
        Decision::Mismatch => Outcome::Mismatch,
        Decision::NotReplayable => Outcome::NotReplayable,
        // The callers forward on Acquire / TakeOver; reaching here means they could not.
        Decision::InFlight | Decision::Acquire | Decision::TakeOver => Outcome::InFlightConflict,
    })
}

/// Whether a response with this status is stored (and replayed) or releases the lock so that
/// a retry executes again.
pub fn stores_status(status: u16, store_5xx: bool) -> bool {
    status < 500 || store_5xx
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: [u8; 32] = [1; 32];
    const OTHER: [u8; 32] = [2; 32];

    fn at(state: State, expires: u64) -> Meta {
        Meta {
            state,
            key: [3; 32],
            fingerprint: FP,
            owner: 1,
            locked_at_ms: 0,
            expires_at_ms: expires,
        }
    }

    #[test]
    fn the_table() {
        use Decision::*;
        let now = 1000;
        assert_eq!(decide(None, &FP, now), Acquire);
        assert_eq!(decide(Some(&Meta::free()), &FP, now), Acquire);
        assert_eq!(decide(Some(&at(State::InFlight, 2000)), &FP, now), InFlight);
        assert_eq!(
            decide(Some(&at(State::InFlight, 2000)), &OTHER, now),
            Mismatch
        );
        assert_eq!(decide(Some(&at(State::InFlight, 1000)), &FP, now), TakeOver);
        assert_eq!(
            decide(Some(&at(State::InFlight, 500)), &OTHER, now),
            TakeOver
        );
        assert_eq!(decide(Some(&at(State::Completed, 2000)), &FP, now), Replay);
        assert_eq!(
            decide(Some(&at(State::Completed, 2000)), &OTHER, now),
            Mismatch
        );
        assert_eq!(decide(Some(&at(State::Completed, 999)), &FP, now), Acquire);
        assert_eq!(
            decide(Some(&at(State::Unreplayable, 2000)), &FP, now),
            NotReplayable
        );
        assert_eq!(
            decide(Some(&at(State::Unreplayable, 2000)), &OTHER, now),
            Mismatch
        );
        assert_eq!(
            decide(Some(&at(State::Unreplayable, 10)), &FP, now),
            Acquire
        );
    }

    #[test]
    fn records() {
        let l = lock_record([3; 32], FP, 9, 100, 30);
        assert_eq!(
            (l.state, l.expires_at_ms, l.owner),
            (State::InFlight, 130, 9)
        );
        let c = completed_record(&l, true, 200, 1000);
        assert_eq!(
            (c.state, c.expires_at_ms, c.owner),
            (State::Completed, 1200, 9)
        );
        assert_eq!(
            completed_record(&l, false, 200, 1000).state,
            State::Unreplayable
        );
        assert!(stores_status(201, false) && stores_status(404, false));
        assert!(!stores_status(500, false) && stores_status(503, true));
    }

    #[test]
    fn verdicts() {
        let r = StoredResponse::default();
        assert_eq!(
            verdict(Decision::Replay, Some(r.clone())),
            Verdict::Replay(r)
        );
        for (d, o) in [
            (Decision::Replay, Outcome::StoreError),
            (Decision::InFlight, Outcome::InFlightConflict),
            (Decision::TakeOver, Outcome::InFlightConflict),
            (Decision::Mismatch, Outcome::Mismatch),
            (Decision::NotReplayable, Outcome::NotReplayable),
        ] {
            assert_eq!(verdict(d, None).outcome(), o);
        }
    }
}
